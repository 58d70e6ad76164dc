"""When do two 3D poses match? NP-MPJPE: Procrustes-aligned mean per-joint error on normalized poses.

Both poses are normalized (:func:`vipe_ray.prvipe.keypoints.normalize_3d`) and centred; the source ``X`` is aligned
to the target ``Y`` (``[17, 3]`` each) by the similarity (rotation without reflection, isotropic scale,
translation) that minimizes the squared error: with ``H = X^T Y = U S V^T`` (Kabsch/Umeyama),

    R = U diag(1, 1, d) V^T,   s = (s1 + s2 + d s3) / |X|^2,   d = det(U V^T) = sign(det H),

and the Euclidean joint errors ``|s X R - Y|`` are averaged. Units: torso lengths of the target. Two poses
*match* when NP-MPJPE <= kappa. Temporal windows compare frame by frame and take the maximum (the
reference's choice).

The reflection sign needs no determinant of ``U V^T``: ``det H = det U det S det V^T`` and ``det S > 0``
whenever ``H`` has full rank, so ``d = sign(det H)`` from the explicit 3x3 cofactor formula. Only an exactly
singular ``H`` (``det H = 0``, where the sign says nothing) falls back to ``det(U V^T)``.

Every entry is computed by one per-pair routine (:func:`indexed_np_mpjpe`) on poses normalized once
(:class:`CentredPoses`): the full matrix (:func:`pairwise_np_mpjpe`) and a few entries picked by the miner
(:func:`vipe_ray.prvipe.mining.mine_negatives_lazy`) give bit-identical values for the same pair (tested on CPU;
a GPU's batched kernels may round differently with the batch size, so a label lying exactly on kappa could
differ there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vipe_ray.prvipe.keypoints import NUM_JOINTS_3D, normalize_3d


def det3(m: torch.Tensor) -> torch.Tensor:
    """Determinant of 3x3 matrices by cofactor expansion along the first row: ``[..., 3, 3] -> [...]``.

    Elementwise arithmetic only (no LU factorization), so it vectorizes over any batch.
    """
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def reflection_sign(h: torch.Tensor, u: torch.Tensor | None = None, vh: torch.Tensor | None = None) -> torch.Tensor:
    """``d = det(U V^T)`` (+1 or -1) for ``H = U S V^T``: ``[..., 3, 3] -> [...]`` in ``h``'s dtype.

    Closed form ``sign(det H)``, with the determinant in float64 so the sign of a float32 ``H`` is exact up to
    the rounding of ``H`` itself. Exactly singular ``H`` take ``det(U V^T)`` when the SVD factors are given,
    else +1.
    """
    sign = torch.sign(det3(h.double())).to(h.dtype)
    singular = sign == 0
    if bool(singular.any()):
        fallback = torch.ones_like(sign[singular])
        if u is not None and vh is not None:
            fallback = torch.sign(torch.linalg.det(u[singular] @ vh[singular]))
            fallback = torch.where(fallback == 0, torch.ones_like(fallback), fallback)
        sign = sign.masked_scatter(singular, fallback)
    return sign


def _optimal_rotation_and_scale(h: torch.Tensor, norm_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best proper rotation ``R`` and scale for ``min |s X R - Y|`` given ``H = X^T Y``: ``[..., 3, 3]``."""
    u, s, vh = torch.linalg.svd(h)
    sign = reflection_sign(h, u, vh)
    # R = U diag(1, 1, d) V^T = U V^T - (1 - d) u3 v3^T: a rank-one correction instead of a second product.
    rotation = u @ vh - (1.0 - sign)[..., None, None] * (u[..., :, 2:] * vh[..., 2:, :])
    scale = (s[..., 0] + s[..., 1] + sign * s[..., 2]) / norm_sq.clamp_min(1e-12)
    return rotation, scale


def _aligned_error(xs: torch.Tensor, xt: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """Mean joint error after similarity alignment of centred poses: ``[..., J, 3] x2, [...] -> [...]``."""
    rotation, scale = _optimal_rotation_and_scale(xs.transpose(-1, -2) @ xt, norm_sq)
    aligned = scale[..., None, None] * (xs @ rotation)
    return torch.linalg.vector_norm(aligned - xt, dim=-1).mean(-1)


def _centred(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = normalize_3d(joints)
    mean = x.mean(dim=-2, keepdim=True)
    return x - mean, mean


@dataclass(frozen=True)
class CentredPoses:
    """Poses normalized and centred once: ``x`` ``[n, frames, 17, 3]``, ``norm_sq`` ``[n, frames]`` (``|x|^2``).

    Built by :meth:`of` from ``[n, 17, 3]`` (one frame) or temporal ``[n, frames, 17, 3]`` joints.
    """

    x: torch.Tensor
    norm_sq: torch.Tensor

    @classmethod
    def of(cls, joints: torch.Tensor) -> "CentredPoses":
        if joints.shape[-2:] != (NUM_JOINTS_3D, 3) or joints.ndim not in (3, 4):
            raise ValueError(f"NP-MPJPE needs [n, 17, 3] or [n, frames, 17, 3] poses, got {list(joints.shape)}")
        x, _ = _centred(joints if joints.ndim == 4 else joints[:, None])
        return cls(x, (x ** 2).sum((-1, -2)))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def frames(self) -> int:
        return self.x.shape[1]


def indexed_np_mpjpe(sources: CentredPoses, targets: CentredPoses, rows: torch.Tensor,
                     cols: torch.Tensor) -> torch.Tensor:
    """NP-MPJPE of the pairs (source ``rows[p]``, target ``cols[p]``): ``[P]`` indices -> ``[P]``.

    Temporal poses give the max over frames. Each pair is computed by per-pair kernels only (batched 3x3
    SVDs, small batched products, reductions over its own joints), so a pair's value does not depend on which
    other pairs share the call.
    """
    if sources.frames != targets.frames:
        raise ValueError(f"temporal NP-MPJPE needs equal frame counts, got {sources.frames} and {targets.frames}")
    error = _aligned_error(sources.x[rows], targets.x[cols], sources.norm_sq[rows])  # [P, frames]
    return error.amax(-1)


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
    return _aligned_error(xs, xt, (xs ** 2).sum((-1, -2)))


@torch.no_grad()
def pairwise_np_mpjpe(sources: torch.Tensor, targets: torch.Tensor, chunk_pairs: int = 1 << 14) -> torch.Tensor:
    """NP-MPJPE of every (source, target) pair, vectorized (no loop over pairs).

    Args:
        sources: ``[n, 17, 3]`` or temporal ``[n, frames, 17, 3]``.
        targets: ``[m, 17, 3]`` or ``[m, frames, 17, 3]`` (same number of frames).
        chunk_pairs: pair-frames per vectorized chunk, bounding memory to ``chunk_pairs x joints x 3 x 2`` floats.
    Returns:
        ``[n, m]``: entry ``(i, j)`` aligns source ``i`` to target ``j``; temporal inputs give the max over frames.
        Entries equal :func:`indexed_np_mpjpe` of the same pairs bit for bit.
    """
    if sources.shape[-2:] != (NUM_JOINTS_3D, 3) or targets.shape[-2:] != (NUM_JOINTS_3D, 3):
        raise ValueError(f"NP-MPJPE needs [..., {NUM_JOINTS_3D}, 3] poses, got {list(sources.shape)} "
                         f"and {list(targets.shape)}")
    if (sources.ndim == 4 or targets.ndim == 4) and (sources.ndim != targets.ndim
                                                      or targets.shape[1] != sources.shape[1]):
        raise ValueError(f"temporal NP-MPJPE needs equal frame counts, got {list(sources.shape)} "
                         f"and {list(targets.shape)}")
    src, tgt = CentredPoses.of(sources), CentredPoses.of(targets)
    n, m = len(src), len(tgt)
    out = torch.empty(n * m, dtype=src.x.dtype, device=src.x.device)
    step = max(1, chunk_pairs // src.frames)
    for start in range(0, n * m, step):
        flat = torch.arange(start, min(start + step, n * m), device=src.x.device)
        out[start:start + step] = indexed_np_mpjpe(src, tgt, flat // m, flat % m)
    return out.reshape(n, m)


def matches(distance: torch.Tensor, kappa: float) -> torch.Tensor:
    """Whether NP-MPJPE values mark a match: ``distance <= kappa`` (same shape, bool)."""
    return distance <= kappa
