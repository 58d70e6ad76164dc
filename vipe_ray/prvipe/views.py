"""2D views of 3D poses: what the model sees.

A view renders world poses through a virtual camera and keeps the 13 input keypoints; keypoint dropout
hides some of them; :func:`vipe_ray.prvipe.keypoints.model_input` -- the same function the deployed model runs --
normalizes from the visible keypoints only and packs the features; optional jitter is added last.
"""

from __future__ import annotations

import torch

from vipe_ray.prvipe.cameras import Orbits, camera_frame, render
from vipe_ray.prvipe.dropout import KeypointDropoutConfig, keypoint_visibility
from vipe_ray.prvipe.keypoints import (TORSO_2D, KeypointError, NUM_KEYPOINTS_2D, body_frame, model_input, normalize_2d,
                                      normalize_3d)


def rendered_view(joints3d: torch.Tensor, orbits: Orbits) -> torch.Tensor:
    """Pixels of one camera per window: ``[batch, frames, 17, 3]`` world metres -> ``[batch, frames, 13, 2]``.

    Each window is seen by one camera (index ``batch``), aimed at the pelvis of every frame.
    """
    b, t = joints3d.shape[:2]
    expanded = orbits.repeat_interleave(t)
    pixels = render(joints3d.reshape(b * t, *joints3d.shape[2:]).double(), expanded)
    return pixels.reshape(b, t, *pixels.shape[1:])


def normalized_view(joints3d: torch.Tensor, orbits: Orbits) -> torch.Tensor:
    """Render and normalize with every keypoint visible: ``[batch, frames, 17, 3] -> [batch, frames, 13, 2]``."""
    return normalize_2d(rendered_view(joints3d, orbits)).float()


def view_features(joints3d: torch.Tensor, orbits: Orbits, dropout: KeypointDropoutConfig,
                  jitter: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Model features of one view per window: ``[batch, frames, 17, 3] -> [batch, frames, 39]``."""
    pixels = rendered_view(joints3d, orbits)
    visible = keypoint_visibility(tuple(pixels.shape[:2]), dropout, generator)
    features, valid = model_input(pixels, visible)
    if not valid.all():
        # Dropout left a torso that cannot be normalized (too few torso keypoints, or only the hips seen from
        # the side): a training view keeps its whole torso -- the one place this rule lives.
        bad = ~valid.all(-1, keepdim=True).expand_as(valid) if valid.ndim == 2 else ~valid  # whole windows
        restore = torch.zeros_like(visible)
        restore[..., list(TORSO_2D)] = True
        features, valid = model_input(pixels, visible | (restore & bad[..., None]))
        if not valid.all():
            raise KeypointError("a rendered view cannot be normalized even with its whole torso visible")
    features = features.float()
    if jitter > 0:
        # Reference-style jitter in normalized units, on visible keypoints only (hidden ones stay 0).
        noise = jitter * torch.randn((*features.shape[:-1], NUM_KEYPOINTS_2D, 2), generator=generator)
        vis = features[..., 2 * NUM_KEYPOINTS_2D:, None]
        features = torch.cat([features[..., :2 * NUM_KEYPOINTS_2D] + (noise * vis).flatten(-2),
                              features[..., 2 * NUM_KEYPOINTS_2D:]], dim=-1)
    return features


def lift_target(joints3d: torch.Tensor, orbits: Orbits, frame: str = "camera") -> torch.Tensor:
    """The 3D regression target of one view of each pose: ``[batch, 17, 3]`` world joints -> ``[batch, 17, 3]``
    normalized joints (torso units, pelvis at the origin), in the view's camera frame (``camera``, the lifting
    baseline's target) or in the pose's own body frame (``body``, the same for every view)."""
    if frame == "body":
        return body_frame(normalize_3d(joints3d.double())).float()
    return normalize_3d(camera_frame(joints3d.double(), orbits)).float()
