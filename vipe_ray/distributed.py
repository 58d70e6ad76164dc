"""Stable import path of Ray Train (``vipe_ray.distributed.Scaling``, ``fit``), as before the package layout:
sweep state saved then names it. The code lives in :mod:`vipe_ray.training.ray_train`."""

from vipe_ray.training.ray_train import BEST_METRIC, Scaling, build_trainer, data_info, fit  # noqa: F401
