"""Keypoint dropout: simulate missed detections (independent) and occlusion (structured joint groups).

An instance is selected with ``instance_prob``. Independent dropout then hides each keypoint with
``keypoint_prob``; structured dropout hides one whole occlusion group (an arm, a leg, the lower body, ...).
The result is a visibility mask; the model sees hidden keypoints as zeros with their flag off. A training
view that this leaves impossible to normalize keeps its torso (:func:`vipe_ray.prvipe.views.view_features`, the one
place that rule lives); deployment has no such guarantee and reports such poses as invalid instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from vipe_ray.errors import ConfigError
from vipe_ray.prvipe.keypoints import NUM_KEYPOINTS_2D, OCCLUSION_GROUPS


@dataclass(frozen=True)
class KeypointDropoutConfig:
    """Keypoint dropout: ``independent`` drops single keypoints, ``structured`` occludes joint groups together.

    An instance is picked with ``instance_prob``; then each keypoint is dropped with ``keypoint_prob``
    (independent) and/or one random occlusion group is hidden (structured). Dropped keypoints are zeroed and
    flagged in the visibility mask that the model reads.
    """

    mode: Literal["off", "independent", "structured", "both"] = "off"
    instance_prob: float = 0.3
    keypoint_prob: float = 0.1
    #: Which training views lose keypoints: both, or the anchor only (its positive stays whole).
    views: Literal["both", "anchor"] = "both"
    #: Fraction of the run over which ``instance_prob`` rises linearly from 0 (0 = from the first step).
    ramp: float = 0.0

    def at(self, progress: float) -> "KeypointDropoutConfig":
        """The dropout in force at ``progress`` (step / steps) of a run."""
        if self.ramp <= 0 or progress >= self.ramp:
            return self
        return dataclasses.replace(self, instance_prob=self.instance_prob * max(progress, 0.0) / self.ramp)

    def __post_init__(self) -> None:
        for name in ("instance_prob", "keypoint_prob", "ramp"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"keypoint_dropout.{name}: {v} is not a probability in [0, 1]")


_GROUP_MASKS = torch.zeros(len(OCCLUSION_GROUPS), NUM_KEYPOINTS_2D, dtype=torch.bool)
for _g, _members in enumerate(OCCLUSION_GROUPS.values()):
    _GROUP_MASKS[_g, list(_members)] = True


def keypoint_visibility(shape: tuple[int, ...], config: KeypointDropoutConfig,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Visibility ``[*shape, 13]`` bool; ``shape`` is the batch shape (``[batch]`` or ``[batch, frames]``).

    A temporal window shares one draw over its frames (an occluder stays for the whole window).
    """
    batch = shape[0]
    hidden = torch.zeros(batch, NUM_KEYPOINTS_2D, dtype=torch.bool)
    if config.mode != "off":
        picked = torch.rand(batch, generator=generator) < config.instance_prob
        if config.mode in ("independent", "both"):
            hidden |= torch.rand(batch, NUM_KEYPOINTS_2D, generator=generator) < config.keypoint_prob
        if config.mode in ("structured", "both"):
            group = torch.randint(len(OCCLUSION_GROUPS), (batch,), generator=generator)
            hidden |= _GROUP_MASKS[group]
        hidden &= picked[:, None]
    visible = ~hidden
    if len(shape) == 2:
        visible = visible[:, None, :].expand(batch, shape[1], NUM_KEYPOINTS_2D)
    elif len(shape) != 1:
        raise ValueError(f"batch shape must be [batch] or [batch, frames], got {list(shape)}")
    return visible


def group_visibility(batch: int, group: str) -> torch.Tensor:
    """Visibility ``[batch, 13]`` with exactly the keypoints of one occlusion group hidden."""
    if group not in OCCLUSION_GROUPS:
        raise ValueError(f"unknown occlusion group {group!r}; known: {sorted(OCCLUSION_GROUPS)}")
    visible = torch.ones(batch, NUM_KEYPOINTS_2D, dtype=torch.bool)
    visible[:, list(OCCLUSION_GROUPS[group])] = False
    return visible


def independent_visibility(batch: int, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Visibility ``[batch, 13]`` with each keypoint hidden independently with probability ``rate``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"independent occlusion rate must lie in [0, 1), got {rate}")
    return torch.rand(batch, NUM_KEYPOINTS_2D, generator=generator) >= rate
