"""When do two 3D poses match? NP-MPJPE: Procrustes-aligned mean per-joint error on normalized poses.

Both poses are normalized (:func:`vipe_ray.keypoints.normalize_3d`); the source is aligned to the target
by a similarity transform (rotation without reflection, isotropic scale, translation), and the Euclidean
joint errors are averaged. Units: torso lengths of the target. Two poses *match* when NP-MPJPE <= kappa.
Temporal windows compare frame by frame and take the maximum (the reference's choice).
"""

from __future__ import annotations

import torch

from vipe_ray.keypoints import NUM_JOINTS_3D, normalize_3d


def _centred(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = normalize_3d(joints)
    mean = x.mean(dim=-2, keepdim=True)
    return x - mean, mean


def _optimal_rotation_and_scale(h: torch.Tensor, norm_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best proper rotation ``R`` and scale for ``min |s X R - Y|`` given ``H = X^T Y``: ``[..., 3, 3]``."""
    u, s, vh = torch.linalg.svd(h)
    sign = torch.sign(torch.linalg.det(u @ vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = torch.ones_like(s)
    d[..., 2] = sign
    rotation = (u * d[..., None, :]) @ vh
    scale = (s * d).sum(-1) / norm_sq.clamp_min(1e-12)
    return rotation, scale


def procrustes_align(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Similarity-align ``source`` to ``target`` (no normalization): ``[..., J, 3] x2 -> [..., J, 3]``."""
    mu_s, mu_t = source.mean(-2, keepdim=True), target.mean(-2, keepdim=True)
    xs, xt = source - mu_s, target - mu_t
    rotation, scale = _optimal_rotation_and_scale(xs.transpose(-1, -2) @ xt, (xs ** 2).sum((-1, -2)))
    return scale[..., None, None] * (xs @ rotation) + mu_t


def np_mpjpe(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NP-MPJPE of paired poses: ``[..., 17, 3] x2 -> [...]`` (torso units of the target)."""
    xs, _ = _centred(source)
    xt, _ = _centred(target)
    rotation, scale = _optimal_rotation_and_scale(xs.transpose(-1, -2) @ xt, (xs ** 2).sum((-1, -2)))
    aligned = scale[..., None, None] * (xs @ rotation)
    return torch.linalg.vector_norm(aligned - xt, dim=-1).mean(-1)


@torch.no_grad()
def pairwise_np_mpjpe(sources: torch.Tensor, targets: torch.Tensor, chunk_pairs: int = 1 << 16) -> torch.Tensor:
    """NP-MPJPE of every (source, target) pair, vectorized (no loop over pairs).

    Args:
        sources: ``[n, 17, 3]`` or temporal ``[n, frames, 17, 3]``.
        targets: ``[m, 17, 3]`` or ``[m, frames, 17, 3]`` (same number of frames).
        chunk_pairs: pairs per vectorized chunk, bounding memory to ``chunk_pairs x joints x 3`` floats.
    Returns:
        ``[n, m]``: entry ``(i, j)`` aligns source ``i`` to target ``j``; temporal inputs give the max over frames.
    """
    if sources.shape[-2:] != (NUM_JOINTS_3D, 3) or targets.shape[-2:] != (NUM_JOINTS_3D, 3):
        raise ValueError(f"NP-MPJPE needs [..., {NUM_JOINTS_3D}, 3] poses, got {list(sources.shape)} "
                         f"and {list(targets.shape)}")
    if sources.ndim == 4:
        if targets.ndim != 4 or targets.shape[1] != sources.shape[1]:
            raise ValueError(f"temporal NP-MPJPE needs equal frame counts, got {list(sources.shape)} "
                             f"and {list(targets.shape)}")
        per_frame = [pairwise_np_mpjpe(sources[:, t], targets[:, t], chunk_pairs) for t in range(sources.shape[1])]
        return torch.stack(per_frame).amax(0)
    xs, _ = _centred(sources)
    xt, _ = _centred(targets)
    norm_sq = (xs ** 2).sum((-1, -2))  # [n]
    n, m = xs.shape[0], xt.shape[0]
    out = torch.empty(n, m, dtype=xs.dtype, device=xs.device)
    rows = max(1, chunk_pairs // max(m, 1))
    for start in range(0, n, rows):
        x = xs[start:start + rows]  # [r, J, 3]
        h = torch.einsum("rjc,mjd->rmcd", x, xt)  # [r, m, 3, 3]
        rotation, scale = _optimal_rotation_and_scale(h, norm_sq[start:start + rows, None].expand(-1, m))
        aligned = scale[..., None, None] * torch.einsum("rjc,rmcd->rmjd", x, rotation)
        out[start:start + rows] = torch.linalg.vector_norm(aligned - xt[None], dim=-1).mean(-1)
    return out


def matches(distance: torch.Tensor, kappa: float) -> torch.Tensor:
    """Whether NP-MPJPE values mark a match: ``distance <= kappa`` (same shape, bool)."""
    return distance <= kappa
