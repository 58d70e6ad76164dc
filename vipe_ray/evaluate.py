"""Cross-view pose retrieval: Hit@k of Pr-VIPE against the 2D nearest-neighbour and 3D-lifting baselines.

Protocol. Query frames are every 24th source frame (5 Hz) of the evaluation subjects. Each camera of a rig
renders all of them. For every ordered pair of cameras (query camera, index camera), each query pose
retrieves its k nearest poses among all renders of the index camera; a query hits at k when one of the top
k has a 3D pose within NP-MPJPE ``kappa`` (0.1) of the query's 3D. Hit@k is averaged over queries, then
over camera pairs. All methods answer the same queries on the same renders:

* ``prvipe``: kernel distance ``-log P`` between sampled embeddings (the training kernel);
* ``prvipe_mean``: Euclidean distance between embedding means (the reference leaves the choice open);
* ``nn2d``: mean keypoint distance between normalized 2D poses after a 2D similarity Procrustes;
* ``lift3d``: NP-MPJPE between the poses lifted to 3D by the lifter baseline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vipe_ray import log
from vipe_ray.cameras import RIGS, Orbits
from vipe_ray.config import EvalConfig, KeypointDropoutConfig, TrainConfig
from vipe_ray.data import PoseTable, evaluation_rows, window_rows
from vipe_ray.dropout import keypoint_visibility
from vipe_ray.losses import MatchProbability, kernel_distance
from vipe_ray.matching import pairwise_np_mpjpe
from vipe_ray.model import pose_features
from vipe_ray.views import normalized_view

METHODS = ("prvipe", "prvipe_mean", "nn2d", "lift3d")
_NO_DROPOUT = KeypointDropoutConfig()


@torch.no_grad()
def pairwise_procrustes_2d(queries: torch.Tensor, index: torch.Tensor, chunk_pairs: int = 1 << 17) -> torch.Tensor:
    """2D similarity-Procrustes distance of every pair: ``[n, 13, 2] x [m, 13, 2] -> [n, m]``.

    Each index pose is aligned (rotation, isotropic scale, translation; no reflection) onto the query, then
    the Euclidean keypoint errors are averaged.
    """
    q = queries - queries.mean(-2, keepdim=True)
    x = index - index.mean(-2, keepdim=True)
    x_norm = (x ** 2).sum((-1, -2)).clamp_min(1e-12)  # [m]
    n, m = q.shape[0], x.shape[0]
    out = torch.empty(n, m, dtype=q.dtype)
    rows = max(1, chunk_pairs // max(m, 1))
    for start in range(0, n, rows):
        qc = q[start:start + rows]  # [r, J, 2]
        # Optimal rotation angle and scale in closed form: dot and cross sums of the centred points.
        dot = torch.einsum("rjc,mjc->rm", qc, x)
        cross = torch.einsum("rj,mj->rm", qc[..., 1], x[..., 0]) - torch.einsum("rj,mj->rm", qc[..., 0], x[..., 1])
        norm = torch.sqrt(dot ** 2 + cross ** 2).clamp_min(1e-12)
        cos, sin = dot / norm, cross / norm
        scale = norm / x_norm[None, :]
        xr = torch.stack([
            cos[..., None] * x[None, :, :, 0] - sin[..., None] * x[None, :, :, 1],
            sin[..., None] * x[None, :, :, 0] + cos[..., None] * x[None, :, :, 1],
        ], dim=-1) * scale[..., None, None]
        out[start:start + rows] = torch.linalg.vector_norm(xr - qc[:, None], dim=-1).mean(-1)
    return out


def hits_at_k(distance: torch.Tensor, match3d: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Hit@k from a retrieval distance and the 3D match table.

    Args:
        distance: ``[queries, index]``, smaller = more similar.
        match3d: ``[queries, index]`` bool, index pose matches the query's 3D.
    """
    kmax = min(max(ks), distance.shape[1])
    top = distance.topk(kmax, dim=1, largest=False).indices
    hit = match3d.gather(1, top)  # [queries, kmax]
    first = torch.cumsum(hit.int(), dim=1) > 0
    return {f"hit@{k}": first[:, min(k, kmax) - 1].float().mean().item() for k in ks}


@torch.no_grad()
def _render_camera(table: PoseTable, rows: np.ndarray, frames: int, stride: int, camera: Orbits) -> torch.Tensor:
    """Normalized 2D windows of one camera: ``[n, frames, 13, 2]``."""
    idx = window_rows(table, rows, frames, stride)
    joints = torch.from_numpy(table.joints[idx]).double()  # [n, frames, 17, 3]
    return normalized_view(joints, camera.expand(len(rows)))


@torch.no_grad()
def _embed(model: torch.nn.Module, features: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    means, sigmas = [], []
    for start in range(0, features.shape[0], batch):
        m, s = model(features[start:start + batch])
        means.append(m)
        sigmas.append(s)
    return torch.cat(means), torch.cat(sigmas)


@torch.no_grad()
def evaluate_rigs(model: torch.nn.Module, config: TrainConfig, table: PoseTable,
                  lifter: torch.nn.Module | None = None, eval_config: EvalConfig | None = None,
                  samples: int | None = None, seed: int = 0,
                  progress: Callable[[str], None] = log) -> dict:
    """Run the retrieval protocol on every rig of ``eval_config`` for the subjects in ``table``.

    Returns ``{"rigs": {rig: {method: {"hit@k": fraction}}}, "queries": n, "pairs": ..., "seconds": ...}``.
    """
    ev = eval_config or config.eval
    start = time.perf_counter()
    frames, stride = config.temporal.window, config.temporal.stride
    rows = evaluation_rows(table, ev.every, ev.max_queries)
    if len(rows) < 2:
        raise ValueError(f"{table.path}: only {len(rows)} evaluation frames for subjects {table.subjects}")
    joints = torch.from_numpy(table.joints[rows]).double()
    # match3d[q, i]: index pose i (aligned onto query q) is within kappa of the query's 3D.
    match3d = (pairwise_np_mpjpe(joints, joints) <= ev.kappa).T.contiguous()
    probabilistic = config.model.probabilistic
    k = samples or (config.model.samples if probabilistic else 1)
    generator = torch.Generator().manual_seed(seed)
    match: MatchProbability = model.match
    result: dict = {"rigs": {}, "queries": int(len(rows)), "subjects": table.subjects,
                    "match_rate_3d": match3d.float().mean().item()}
    for rig in ev.rigs:
        cameras = RIGS[rig]
        views = []
        for camera in cameras:
            keypoints = _render_camera(table, rows, frames, stride, Orbits.from_cameras([camera]))
            visible = keypoint_visibility(tuple(keypoints.shape[:2]), _NO_DROPOUT)
            feats = pose_features(keypoints, visible)
            mean, sigma = _embed(model, feats)
            eps = torch.randn((mean.shape[0], k, mean.shape[1]), generator=generator)
            z = mean[:, None] + (sigma[:, None] * eps if probabilistic else 0.0)
            view = {"mean": mean, "samples": z, "keypoints": keypoints[:, frames // 2].double()}
            if lifter is not None:
                lifter.eval()
                view["lifted"] = lifter(feats[:, frames // 2]).double()
            views.append(view)
        totals: dict[str, dict[str, float]] = {}
        pairs = [(i, j) for i in range(len(cameras)) for j in range(len(cameras)) if i != j]
        for qi, ii in pairs:
            q, x = views[qi], views[ii]
            distances = {
                "prvipe": kernel_distance(match.pairwise(q["samples"], x["samples"])),
                "prvipe_mean": torch.cdist(q["mean"], x["mean"]),
                "nn2d": pairwise_procrustes_2d(q["keypoints"], x["keypoints"]),
            }
            if lifter is not None:
                distances["lift3d"] = pairwise_np_mpjpe(x["lifted"], q["lifted"]).T
            for method, distance in distances.items():
                for key, value in hits_at_k(distance, match3d, ev.ks).items():
                    totals.setdefault(method, {}).setdefault(key, 0.0)
                    totals[method][key] += value / len(pairs)
        result["rigs"][rig] = totals
        progress(f"[evaluate] rig {rig}: {len(rows)} queries x {len(pairs)} camera pairs "
                 f"({time.perf_counter() - start:.0f} s)")
    result["seconds"] = time.perf_counter() - start
    return result


def format_table(result: dict, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """A plain-text table of Hit@k (percent) per rig and method."""
    lines = []
    header = f"{'rig':<7} {'method':<12}" + "".join(f"{'Hit@' + str(k):>9}" for k in ks)
    lines.append(header)
    lines.append("-" * len(header))
    for rig, methods in result["rigs"].items():
        for method in METHODS:
            if method in methods:
                cells = "".join(f"{100 * methods[method][f'hit@{k}']:>9.1f}" for k in ks)
                lines.append(f"{rig:<7} {method:<12}{cells}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def retrieval_objective(result: dict, metric: str = "hit@1") -> float:
    """Mean of a Pr-VIPE Hit@k over the rigs (the sweeps' default objective)."""
    values = [methods["prvipe"][metric] for methods in result["rigs"].values()]
    return float(sum(values) / len(values)) if values else math.nan
