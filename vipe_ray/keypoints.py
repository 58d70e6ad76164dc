"""Stable import path of the keypoint profiles (``vipe_ray.keypoints.model_input``, ``normalize_2d``, ...).

The code lives in :mod:`vipe_ray.prvipe.keypoints`; this alias keeps code written against the earlier layout
working.
"""

from vipe_ray.prvipe.keypoints import *  # noqa: F401,F403
