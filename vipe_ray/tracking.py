"""Stable import path of MLflow tracking and the served model (``vipe_ray.tracking.PoseEmbedder``).

Models logged before the package layout pickled ``vipe_ray.tracking.PoseEmbedder``: this alias loads them.
The code lives in :mod:`vipe_ray.platform.tracking`.
"""

from vipe_ray.platform.tracking import *  # noqa: F401,F403
