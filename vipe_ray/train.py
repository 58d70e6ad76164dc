"""Stable import path of training: ``vipe_ray.train.load_checkpoint``, ``train``, ``train_lifter`` and the step
functions, as before the package layout; the code lives in :mod:`vipe_ray.training`."""

from vipe_ray.prvipe.views import lift_target  # noqa: F401
from vipe_ray.training.checkpoint import (CHECKPOINT, FORMAT, LIFTER_CHECKPOINT, RESUME_FREE_KEYS,  # noqa: F401
                                          Checkpoint, atomic_save, build_lifter, build_model, check_resumable,
                                          load_checkpoint, resumable_checkpoint, rng_state, set_rng_state)
from vipe_ray.training.loop import TrainingDiverged, check_finite, train, train_lifter  # noqa: F401
from vipe_ray.training.optim import (WeightAverage, build_optimizer, parameter_groups, unwrap,  # noqa: F401
                                     weight_average)
from vipe_ray.training.step import (embed, lifter_limb_swap, lifter_step, train_step, training_views,  # noqa: F401
                                    view_dropouts)
