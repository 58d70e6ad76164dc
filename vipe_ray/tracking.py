"""Stable import path of MLflow tracking and the served model (``vipe_ray.tracking.PoseEmbedder``,
``git_commit``, ...), as before the package layout; the code lives in :mod:`vipe_ray.platform.tracking`."""

from vipe_ray.platform.tracking import *  # noqa: F401,F403
