"""Pose search: index a pose library with a trained model and search it with 2D keypoints.

``vipe-ray index`` embeds a library (a pose table seen by a rig's cameras, or keypoint files) into an index
directory (:mod:`vipe_ray.search.index`); ``vipe-ray search`` embeds queries from keypoint files
(:mod:`vipe_ray.search.keypoint_files`) and returns each one's best library poses by match probability.
"""
