"""Keypoint profiles and the Pr-VIPE 2D / 3D pose normalizations.

Two profiles matter:

* ``H36M17`` -- the 17 Human3.6M joints of the 3D poses (VideoPose3D order), the label space of matching;
* ``COCO13`` -- the 13-keypoint 2D input of the reference model (COCO order without eyes and ears). When a 3D
  pose is projected, the top of the head fills the nose slot, as the reference does for its projections.

Normalizations follow the reference (poem ``keypoint_profiles``):

* 2D: centre at the hip midpoint, scale so that the largest of the 6 pairwise distances among the two
  shoulders and two hips becomes 0.5;
* 3D: centre at the pelvis, divide by ``|pelvis - spine| + |spine - thorax|`` (one "torso unit").
"""

from __future__ import annotations

import torch

H36M17_JOINTS: tuple[str, ...] = (
    "pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine", "thorax",
    "neck", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist",
)
PELVIS, SPINE, THORAX = 0, 7, 8

COCO13_KEYPOINTS: tuple[str, ...] = (
    "nose", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist",
    "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)
COCO17_KEYPOINTS: tuple[str, ...] = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
    "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)

#: H36M17 joint feeding each COCO13 slot (head top in the nose slot).
H36M17_TO_COCO13: tuple[int, ...] = (10, 11, 14, 12, 15, 13, 16, 4, 1, 5, 2, 6, 3)
#: COCO17 keypoint feeding each COCO13 slot (a detector's output; drops eyes and ears).
COCO17_TO_COCO13: tuple[int, ...] = (0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)

NUM_JOINTS_3D = len(H36M17_JOINTS)
NUM_KEYPOINTS_2D = len(COCO13_KEYPOINTS)

# COCO13 indices used by the 2D normalization.
_L_SHOULDER, _R_SHOULDER, _L_HIP, _R_HIP = 1, 2, 7, 8
_TORSO_2D = (_L_SHOULDER, _R_SHOULDER, _L_HIP, _R_HIP)

#: Joint groups occluded together by structured keypoint dropout (COCO13 indices).
OCCLUSION_GROUPS: dict[str, tuple[int, ...]] = {
    "head": (0,),
    "left_arm": (3, 5),
    "right_arm": (4, 6),
    "left_leg": (9, 11),
    "right_leg": (10, 12),
    "lower_body": (9, 10, 11, 12),
    "upper_left": (1, 3, 5),
    "upper_right": (2, 4, 6),
}

#: Left/right swap of COCO13 slots (for mirroring checks).
COCO13_FLIP: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11)


class KeypointError(ValueError):
    """Keypoints of the wrong shape or with non-finite values."""


def check_shape(x: torch.Tensor, joints: int, dims: int, name: str) -> None:
    """Raise :class:`KeypointError` unless ``x`` is ``[..., joints, dims]`` and finite."""
    if x.ndim < 2 or x.shape[-2] != joints or x.shape[-1] != dims:
        raise KeypointError(f"{name}: expected shape [..., {joints}, {dims}], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise KeypointError(f"{name}: non-finite value {x[tuple(bad)].item()} at index {bad}")


def h36m17_to_coco13(joints: torch.Tensor) -> torch.Tensor:
    """Select the 13 input keypoints from H36M17 joints: ``[..., 17, C] -> [..., 13, C]``."""
    return joints[..., list(H36M17_TO_COCO13), :]


def coco17_to_coco13(keypoints: torch.Tensor) -> torch.Tensor:
    """Select the 13 input keypoints from a detector's COCO-17 output: ``[..., 17, C] -> [..., 13, C]``."""
    return keypoints[..., list(COCO17_TO_COCO13), :]


def normalize_2d(keypoints: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Centre on the hip midpoint and scale the largest torso distance to 0.5.

    Args:
        keypoints: ``[..., 13, 2]`` COCO13 keypoints, any unit (pixels).
        visible: optional ``[..., 13]`` bool; invisible torso keypoints are ignored for the centre/scale.
            A pose needs at least one visible hip and two visible torso keypoints.
    Returns:
        ``[..., 13, 2]`` normalized keypoints (invisible keypoints are transformed too; mask them after).
    """
    torso = keypoints[..., list(_TORSO_2D), :]  # [..., 4, 2]
    if visible is None:
        centre = 0.5 * (keypoints[..., _L_HIP, :] + keypoints[..., _R_HIP, :])
        pair_vis = None
    else:
        hips_vis = visible[..., [_L_HIP, _R_HIP]].to(keypoints.dtype)  # [..., 2]
        if (hips_vis.sum(-1) == 0).any():
            raise KeypointError("normalize_2d: a pose has neither hip visible; cannot centre it")
        hips = keypoints[..., [_L_HIP, _R_HIP], :]
        centre = (hips * hips_vis[..., None]).sum(-2) / hips_vis.sum(-1, keepdim=True)
        tv = visible[..., list(_TORSO_2D)]
        pair_vis = tv[..., :, None] & tv[..., None, :]
    dist = torch.linalg.vector_norm(torso[..., :, None, :] - torso[..., None, :, :], dim=-1)  # [..., 4, 4]
    if pair_vis is not None:
        dist = torch.where(pair_vis, dist, torch.zeros_like(dist))
    scale = dist.flatten(-2).amax(-1)
    if (scale <= 0).any():
        raise KeypointError("normalize_2d: degenerate torso (all torso keypoints coincide or are hidden)")
    return (keypoints - centre[..., None, :]) / scale[..., None, None] * 0.5


def normalize_3d(joints: torch.Tensor) -> torch.Tensor:
    """Centre on the pelvis and divide by ``|pelvis-spine| + |spine-thorax|``.

    Args:
        joints: ``[..., 17, 3]`` H36M17 joints, any unit.
    Returns:
        ``[..., 17, 3]`` in torso units.
    """
    pelvis, spine, thorax = joints[..., PELVIS, :], joints[..., SPINE, :], joints[..., THORAX, :]
    scale = torch.linalg.vector_norm(pelvis - spine, dim=-1) + torch.linalg.vector_norm(spine - thorax, dim=-1)
    if (scale <= 0).any():
        raise KeypointError("normalize_3d: degenerate torso (pelvis, spine and thorax coincide)")
    return (joints - pelvis[..., None, :]) / scale[..., None, None]
