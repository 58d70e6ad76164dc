"""Retrieval arithmetic: 2D Procrustes distances, the nearest index poses of each query and their Hit@k.

Pure functions of distance matrices ``[queries, index]`` and 3D match masks of the same shape; the
protocols (:mod:`vipe_ray.evaluation.protocols`) decide what the queries and the index are.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def pairwise_procrustes_2d(queries: torch.Tensor, index: torch.Tensor, query_visible: torch.Tensor | None = None,
                           index_visible: torch.Tensor | None = None, chunk_pairs: int = 1 << 17) -> torch.Tensor:
    """2D similarity-Procrustes distance of every pair: ``[n, 13, 2] x [m, 13, 2] -> [n, m]``.

    Each index pose is aligned (rotation, isotropic scale, translation; no reflection) onto the query using
    the keypoints visible in both (``query_visible`` ``[n, 13]``, ``index_visible`` ``[m, 13]`` bool; default
    all), then the Euclidean errors over those keypoints are averaged. Pairs sharing fewer than two visible
    keypoints get ``inf``.
    """
    n, m = queries.shape[0], index.shape[0]
    vq = torch.ones(queries.shape[:2], dtype=queries.dtype) if query_visible is None else query_visible.to(queries.dtype)
    vx = torch.ones(index.shape[:2], dtype=index.dtype) if index_visible is None else index_visible.to(index.dtype)
    q, x = queries * vq[..., None], index * vx[..., None]
    out = torch.empty(n, m, dtype=queries.dtype)
    rows = max(1, chunk_pairs // max(m, 1))
    for start in range(0, n, rows):
        qc, vqc = q[start:start + rows], vq[start:start + rows]  # [r, J, 2], [r, J]
        # Weighted sums over the common keypoints w = vq * vx, all separable into matrix products.
        w = vqc @ vx.T  # [r, m] common keypoints
        sq = torch.einsum("rjc,mj->rmc", qc, vx)
        sx = torch.einsum("rj,mjc->rmc", vqc, x)
        wsafe = w.clamp_min(1)[..., None]
        mq, mx = sq / wsafe, sx / wsafe  # [r, m, 2] centroids over the common keypoints
        dot = torch.einsum("rjc,mjc->rm", qc, x) - w * (mq * mx).sum(-1)
        cross = (torch.einsum("rj,mj->rm", qc[..., 1], x[..., 0]) - torch.einsum("rj,mj->rm", qc[..., 0], x[..., 1])
                 - w * (mq[..., 1] * mx[..., 0] - mq[..., 0] * mx[..., 1]))
        x_norm = (torch.einsum("rj,mj->rm", vqc, (x ** 2).sum(-1)) - w * (mx ** 2).sum(-1)).clamp_min(1e-12)
        norm = torch.sqrt(dot ** 2 + cross ** 2).clamp_min(1e-12)
        cos, sin, scale = dot / norm, cross / norm, norm / x_norm
        xc = x[None] - mx[:, :, None, :]  # [r, m, J, 2]
        xr = torch.stack([cos[..., None] * xc[..., 0] - sin[..., None] * xc[..., 1],
                          sin[..., None] * xc[..., 0] + cos[..., None] * xc[..., 1]], dim=-1) * scale[..., None, None]
        err = torch.linalg.vector_norm(xr - (qc[:, None] - mq[:, :, None, :]), dim=-1)  # [r, m, J]
        common = vqc[:, None, :] * vx[None, :, :]
        d = (err * common).sum(-1) / wsafe[..., 0]
        out[start:start + rows] = torch.where(w >= 2, d, torch.full_like(d, math.inf))
    return out


def query_hits(distance: torch.Tensor, match3d: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-query hits at each k: ``{"hit@k": [queries] float (1 = hit)}``.

    Args:
        distance: ``[queries, index]``, smaller = more similar; ``inf`` = never retrieved (a query whose
            row is all ``inf`` misses at every k).
        match3d: ``[queries, index]`` bool, index pose matches the query's 3D.
    """
    return ranked_hits(nearest(distance, ks), match3d, ks)


def nearest(distance: torch.Tensor, ks: tuple[int, ...]):
    """The ``max(ks)`` nearest index poses of each query, nearest first (``topk`` of ``[queries, index]``)."""
    return distance.topk(min(max(ks), distance.shape[1]), dim=1, largest=False)


def ranked_hits(top, match3d: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """:func:`query_hits` from the queries' :func:`nearest` index poses."""
    kmax = top.indices.shape[1]
    hit = match3d.gather(1, top.indices) & torch.isfinite(top.values)  # [queries, kmax]
    first = torch.cumsum(hit.int(), dim=1) > 0
    return {f"hit@{k}": first[:, min(k, kmax) - 1].float() for k in ks}


def hits_at_k(distance: torch.Tensor, match3d: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Hit@k (fraction of queries) from a retrieval distance ``[queries, index]`` and the 3D match table."""
    return {key: hits.mean().item() for key, hits in query_hits(distance, match3d, ks).items()}
