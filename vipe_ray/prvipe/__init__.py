"""The Pr-VIPE maths: keypoints, cameras, views, matching (NP-MPJPE), mining, losses, dropout, limb swapping and
the models.
"""
