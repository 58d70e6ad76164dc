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
PELVIS, R_HIP, L_HIP, SPINE, THORAX, L_SHOULDER, R_SHOULDER = 0, 1, 4, 7, 8, 11, 14

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

#: Joint groups occluded together by structured keypoint dropout (COCO13 indices): limbs, pairs of limbs,
#: the lower body (a desk, the frame's edge), one side of the body (self-occlusion seen from the side).
OCCLUSION_GROUPS: dict[str, tuple[int, ...]] = {
    "head": (0,),
    "left_arm": (3, 5),
    "right_arm": (4, 6),
    "left_leg": (9, 11),
    "right_leg": (10, 12),
    "both_arms": (3, 4, 5, 6),
    "both_legs": (9, 10, 11, 12),
    "lower_body": (7, 8, 9, 10, 11, 12),
    "upper_left": (1, 3, 5),
    "upper_right": (2, 4, 6),
    "left_side": (1, 3, 5, 7, 9, 11),
    "right_side": (2, 4, 6, 8, 10, 12),
}
TORSO_2D = _TORSO_2D

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


#: Largest normalized coordinate of a valid pose (see :func:`normalize_masked`).
MAX_NORMALIZED = 4.0


def normalize_masked(keypoints: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one 2D normalization of training, evaluation and deployment; hidden keypoints never count.

    Centre: the midpoint of the visible hips; with both hips hidden, the midpoint of the visible shoulders
    (a person cut off at the waist). Scale: the largest distance among the visible torso keypoints (two
    shoulders, two hips) becomes 0.5. The visibility flags reach the model, so it knows which rule applied.
    A pose is *valid* when it has a centre and a scale that describes the body: two distinct visible torso
    keypoints, and no visible keypoint farther than :data:`MAX_NORMALIZED` from the centre. With the whole
    torso visible no pose comes near that bound (the largest coordinate over 50,000 training views is 1.6);
    a pose beyond it has a foreshortened visible torso (e.g. only the hips, seen from the side) whose
    scale would blow the keypoints up.

    Args:
        keypoints: ``[..., 13, 2]`` COCO13 keypoints in any unit (pixels); hidden ones may hold anything
            finite (callers fill NaN with zeros first).
        visible: ``[..., 13]`` bool.
    Returns:
        (normalized ``[..., 13, 2]`` with hidden keypoints set to 0 and invalid poses all 0,
        valid ``[...]`` bool).
    """
    dtype = keypoints.dtype
    vis = visible.to(dtype)
    hips_vis = vis[..., [_L_HIP, _R_HIP]]  # [..., 2]
    shoulders_vis = vis[..., [_L_SHOULDER, _R_SHOULDER]]
    use_hips = hips_vis.sum(-1) > 0
    anchor_vis = torch.where(use_hips[..., None], hips_vis, shoulders_vis)  # [..., 2]
    anchors = torch.where(use_hips[..., None, None], keypoints[..., [_L_HIP, _R_HIP], :],
                          keypoints[..., [_L_SHOULDER, _R_SHOULDER], :])
    count = anchor_vis.sum(-1, keepdim=True)
    centre = (anchors * anchor_vis[..., None]).sum(-2) / count.clamp_min(1)
    torso = keypoints[..., list(_TORSO_2D), :]  # [..., 4, 2]
    tv = visible[..., list(_TORSO_2D)]
    pair_vis = tv[..., :, None] & tv[..., None, :]
    dist = torch.linalg.vector_norm(torso[..., :, None, :] - torso[..., None, :, :], dim=-1)  # [..., 4, 4]
    scale = torch.where(pair_vis, dist, torch.zeros_like(dist)).flatten(-2).amax(-1)
    valid = (count[..., 0] > 0) & (scale > 0) & torch.isfinite(scale)
    safe = torch.where(valid, scale, torch.ones_like(scale))
    out = (keypoints - centre[..., None, :]) / safe[..., None, None] * 0.5
    reach = torch.where(visible, out.abs().amax(-1), torch.zeros_like(out[..., 0])).amax(-1)
    valid = valid & (reach <= MAX_NORMALIZED)
    keep = visible & valid[..., None]
    return torch.where(keep[..., None], out, torch.zeros_like(out)), valid


def normalize_2d(keypoints: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`normalize_masked` for batches that must all be valid (rendered views): raises otherwise.

    Args:
        keypoints: ``[..., 13, 2]`` COCO13 keypoints, any unit (pixels).
        visible: optional ``[..., 13]`` bool (default: all visible).
    Returns:
        ``[..., 13, 2]`` normalized keypoints; hidden keypoints are 0.
    """
    if visible is None:
        visible = torch.ones(keypoints.shape[:-1], dtype=torch.bool, device=keypoints.device)
    out, valid = normalize_masked(keypoints, visible)
    if not valid.all():
        bad = torch.nonzero(~valid.reshape(-1))[0].item()
        raise KeypointError(f"normalize_2d: pose {bad} cannot be normalized (fewer than two visible torso "
                            f"keypoints, or a degenerate torso)")
    return out


def pose_features(keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Model input: ``[..., 13, 2]`` normalized keypoints and ``[..., 13]`` bool -> ``[..., 39]``."""
    vis = visible.to(keypoints.dtype)
    return torch.cat([(keypoints * vis[..., None]).flatten(-2), vis], dim=-1)


def model_input(keypoints: torch.Tensor, visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw keypoints to model features, the path shared by training views, evaluation and deployment.

    Args:
        keypoints: ``[..., 13, 2]`` pixels; NaN (or ``visible`` False) marks a missing keypoint.
        visible: optional ``[..., 13]`` bool, ANDed with finiteness.
    Returns:
        (features ``[..., 39]``, valid ``[...]`` bool); invalid poses have all-zero features.
    """
    finite = torch.isfinite(keypoints).all(-1)
    visible = finite if visible is None else visible & finite
    filled = torch.where(visible[..., None], keypoints, torch.zeros_like(keypoints))
    normalized, valid = normalize_masked(filled, visible)
    return pose_features(normalized, visible & valid[..., None]), valid


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


def body_frame(joints: torch.Tensor) -> torch.Tensor:
    """Rotate pelvis-centred poses into their own body frame: x from the left to the right hip, z the
    pelvis-to-thorax direction made orthogonal to x, y = z x x. Every view of a pose gives the same result.

    Args:
        joints: ``[..., 17, 3]`` H36M17 joints centred on the pelvis (as :func:`normalize_3d` returns them).
    Returns:
        ``[..., 17, 3]``, the same poses in their body frames (a proper rotation: lengths and chirality kept).
    """
    return torch.einsum("...ij,...kj->...ki", body_rotation(joints), joints)


def body_rotation(joints: torch.Tensor, left: int = L_HIP, right: int = R_HIP) -> torch.Tensor:
    """The rotation from the input frame into a pose's own body frame: ``[..., 17, 3] -> [..., 3, 3]``, rows the
    body axes in the input frame (x from the ``left`` to the ``right`` joint, the hips by default, z the
    pelvis-to-thorax direction made orthogonal to x, y = z x x: a proper rotation). Translation-invariant: any
    centring will do. With the shoulders as ``left``/``right``, the frame of the chest (which turns against the
    hips)."""
    x = torch.nn.functional.normalize(joints[..., right, :] - joints[..., left, :], dim=-1)
    up = joints[..., THORAX, :] - joints[..., PELVIS, :]
    z = torch.nn.functional.normalize(up - (up * x).sum(-1, keepdim=True) * x, dim=-1)
    y = torch.linalg.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-2)
