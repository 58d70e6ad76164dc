"""Stable import path of training (``vipe_ray.train.load_checkpoint``, ``train``, ``train_lifter``).

The code lives in :mod:`vipe_ray.training`; this alias keeps scripts and notebooks written against the
earlier layout working.
"""

from vipe_ray.training.loop import *  # noqa: F401,F403
