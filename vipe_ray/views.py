"""2D views of 3D poses: what the model sees.

A view renders world poses through a virtual camera, keeps the 13 input keypoints, applies the reference
2D normalization, optional jitter, and keypoint dropout, and packs the model features.
"""

from __future__ import annotations

import torch

from vipe_ray.cameras import Orbits, render
from vipe_ray.config import KeypointDropoutConfig
from vipe_ray.dropout import keypoint_visibility
from vipe_ray.keypoints import normalize_2d
from vipe_ray.model import pose_features


def normalized_view(joints3d: torch.Tensor, orbits: Orbits) -> torch.Tensor:
    """Render and normalize: ``[batch, frames, 17, 3]`` world metres -> ``[batch, frames, 13, 2]``.

    Each window is seen by one camera (index ``batch``), aimed at the pelvis of every frame.
    """
    b, t = joints3d.shape[:2]
    expanded = Orbits(*(x.repeat_interleave(t) for x in (orbits.azimuth, orbits.elevation,
                                                          orbits.distance, orbits.roll)))
    pixels = render(joints3d.reshape(b * t, *joints3d.shape[2:]).double(), expanded)
    return normalize_2d(pixels).reshape(b, t, *pixels.shape[1:]).float()


def view_features(joints3d: torch.Tensor, orbits: Orbits, dropout: KeypointDropoutConfig,
                  jitter: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Model features of one view per window: ``[batch, frames, 17, 3] -> [batch, frames, 39]``."""
    keypoints = normalized_view(joints3d, orbits)
    if jitter > 0:
        keypoints = keypoints + jitter * torch.randn(keypoints.shape, generator=generator)
    visible = keypoint_visibility(tuple(keypoints.shape[:2]), dropout, generator)
    return pose_features(keypoints, visible)
