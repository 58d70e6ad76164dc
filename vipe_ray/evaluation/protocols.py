"""Cross-view pose retrieval: Hit@k of Pr-VIPE against the 2D nearest-neighbour and 3D-lifting baselines.

Protocol. Query frames are every 24th source frame (5 Hz) of the evaluation subjects. Each camera of a rig
renders all of them. For every ordered pair of cameras (query camera, index camera), each query pose
retrieves its k nearest poses among all renders of the index camera; a query hits at k when one of the top
k has a 3D pose within NP-MPJPE ``kappa`` (0.1) of the query's 3D. Hit@k is averaged over queries, then
over camera pairs. All methods answer the same queries on the same renders:

* ``prvipe``: kernel distance ``-log P`` between sampled embeddings (the training kernel);
* ``prvipe_mean``: Euclidean distance between embedding means (the reference leaves the choice open);
* ``nn2d``: mean keypoint distance between normalized 2D poses after a 2D similarity Procrustes over the
  keypoints visible in both;
* ``lift3d``: NP-MPJPE between the poses lifted to 3D by the lifter baseline.

Rigs: built-in names (:data:`vipe_ray.prvipe.cameras.RIGS`: ``h36m``, ``novel``, the randomized ``wide``) or rig
YAML files (:func:`vipe_ray.prvipe.cameras.load_rig`). Every method sees keypoints through
:func:`vipe_ray.prvipe.keypoints.model_input`, the deployed model's own path.

Occlusion protocols (per rig, beside the clean one): the queries of every camera lose keypoints --
``group:NAME`` hides exactly one occlusion group (:data:`vipe_ray.prvipe.keypoints.OCCLUSION_GROUPS`) in every
query, ``independent:R`` hides each keypoint independently with probability R (seeded) -- and are matched
against a ``clean`` index and against an ``occluded`` one (the index renders hidden the same way, drawn
anew per camera). To bound its cost, each camera's queries search the next camera of the rig (a ring of
C pairs instead of all C(C-1)); the clean protocol uses every pair, and the occlusion block's ``none`` row
gives clean queries on the same ring, the reference the occluded rows compare with. ``invalid`` gives, per
rig and pattern, the share of occluded queries that could not be normalized (counted as misses). A pose that cannot be normalized (fewer than two visible torso keypoints) has no
embedding: as a query it misses, as an index pose it is never retrieved. Result JSON::

    {"rigs": {rig: {method: {"hit@k": fraction}}},
     "occlusion": {rig: {pattern: {"clean" | "occluded": {method: {"hit@k": fraction}}}}},
     "invalid": {rig: {pattern: fraction}}, "cameras": {rig: [camera, ...]},
     "se": {rig: {method: {"hit@k": standard error over queries}}},
     "paired": {rig: {"prvipe-lift3d" | "prvipe-nn2d": {"hit@k": {"mean": difference, "se": its error}}}},
     "misses": {rig: {"exclusive": {"prvipe-lift3d": {"both", "only_prvipe", "only_lift3d", "neither"}, ...},
                      "methods": {method: {"miss", "near_miss", "miss_error", "miss_matches"}},
                      "matches": median, "near": 1.25}}, ...}

``misses`` (clean protocol, :mod:`vipe_ray.evaluation.misses`) says where each method loses its Hit@1: on the same
queries as a baseline or on others, near misses (the right neighbourhood ordered wrong) or far ones, and on
poses with few matches in the index or many.

``se`` (clean protocol) treats each query, its hits averaged over the camera pairs, as one observation: the
standard error says how far a Hit@k could move with other poses of the same subjects, which is what decides
whether two configurations can be told apart on that set. ``paired`` compares Pr-VIPE with a baseline on the
same queries: the mean and standard error of the per-query differences (the methods share the hard queries,
so it is tighter than either method's ``se``). Both treat the queries as independent, which frames 200 ms
apart in continuous clips are not, so they understate the uncertainty; and neither holds the variation
between training runs of the same recipe (a new seed moves Hit@1 by about a point here): read them as a
floor, and compare seeds (``vipe_ray.platform.study``) before calling a difference real.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from vipe_ray import log
from vipe_ray.prvipe.cameras import RIGS, OrbitCamera, Orbits, load_rig
from vipe_ray.config import EvalConfig, TrainConfig
from vipe_ray.data import PoseTable, evaluation_rows, window_rows
from vipe_ray.prvipe.dropout import group_visibility, independent_visibility
from vipe_ray.prvipe.keypoints import NUM_KEYPOINTS_2D, model_input
from vipe_ray.prvipe.losses import MatchProbability, kernel_distance
from vipe_ray.prvipe.matching import pairwise_np_mpjpe
from vipe_ray.evaluation.misses import miss_report
from vipe_ray.evaluation.stats import standard_error
from vipe_ray.prvipe.views import rendered_view

METHODS = ("prvipe", "prvipe_mean", "nn2d", "lift3d")
INDEX_MODES = ("clean", "occluded")


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


def resolve_rig(rig: str) -> tuple[str, tuple[OrbitCamera, ...]]:
    """A built-in rig name or a rig YAML path -> (name, cameras)."""
    if rig in RIGS:
        return rig, RIGS[rig]
    if rig.endswith((".yaml", ".yml")):
        return load_rig(rig)
    raise ValueError(f"rig {rig!r}: neither a built-in rig ({sorted(RIGS)}) nor a .yaml rig file")


def occlusion_patterns(ev: EvalConfig) -> list[str]:
    """Pattern names of the occlusion protocols: ``group:NAME`` and ``independent:RATE``."""
    return [f"group:{g}" for g in ev.occlusion_groups] + [f"independent:{r:g}" for r in ev.occlusion_rates]


def pattern_visibility(pattern: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Visibility ``[batch, 13]`` of one occlusion pattern (see :func:`occlusion_patterns`)."""
    kind, _, value = pattern.partition(":")
    if kind == "group":
        return group_visibility(batch, value)
    if kind == "independent":
        return independent_visibility(batch, float(value), generator)
    raise ValueError(f"unknown occlusion pattern {pattern!r}")


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def _embed(model: torch.nn.Module, features: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sigma) of CPU features ``[n, ..., 39]``: the model runs on its own device (a GPU worker's
    validation), the results come back to the CPU, where the retrieval arithmetic runs."""
    model.eval()
    device = _device(model)
    means, sigmas = [], []
    for start in range(0, features.shape[0], batch):
        m, s = model(features[start:start + batch].to(device))
        means.append(m.cpu())
        sigmas.append(s.cpu())
    return torch.cat(means), torch.cat(sigmas)


@torch.no_grad()
def _view(model: torch.nn.Module, lifter: torch.nn.Module | None, pixels: torch.Tensor, visible: torch.Tensor,
          k: int, probabilistic: bool, generator: torch.Generator) -> dict:
    """Everything the methods need of one camera's renders ``[n, frames, 13, 2]`` under ``visible`` ``[n, 13]``."""
    frames = pixels.shape[1]
    vis = visible[:, None, :].expand(-1, frames, -1)
    feats, valid_frames = model_input(pixels, vis)
    feats = feats.float()
    valid = valid_frames.all(1)  # a window needs every frame
    mean, sigma = _embed(model, feats)
    eps = torch.randn((mean.shape[0], k, mean.shape[1]), generator=generator)
    centre = frames // 2
    view = {"mean": mean, "samples": mean[:, None] + (sigma[:, None] * eps if probabilistic else 0.0),
            "keypoints": feats[:, centre, :2 * NUM_KEYPOINTS_2D].reshape(-1, NUM_KEYPOINTS_2D, 2).double(),
            "visible": feats[:, centre, 2 * NUM_KEYPOINTS_2D:] > 0, "valid": valid}
    if lifter is not None:
        lifter.eval()
        view["lifted"] = lifter(feats[:, centre].to(_device(lifter))).double().cpu()
    return view


def _pair_hits(q: dict, x: dict, match: MatchProbability, match3d: torch.Tensor, ks: tuple[int, ...],
               methods: tuple[str, ...], top1: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per-query hits at each k of every method for one (query view, index view) pair; invalid poses never
    match. With ``top1``, also fill it with each method's top-1 index pose per query (-1: none retrieved)."""
    out = {}
    for method in methods:
        if method == "prvipe":
            d = kernel_distance(match.pairwise(q["samples"], x["samples"]))
        elif method == "prvipe_mean":
            d = torch.cdist(q["mean"], x["mean"])
        elif method == "nn2d":
            d = pairwise_procrustes_2d(q["keypoints"], x["keypoints"], q["visible"], x["visible"])
        else:
            d = pairwise_np_mpjpe(x["lifted"], q["lifted"]).T
        d = d.masked_fill(~q["valid"][:, None] | ~x["valid"][None, :], math.inf)
        top = nearest(d, ks)
        out[method] = ranked_hits(top, match3d, ks)
        if top1 is not None:
            top1[method] = torch.where(torch.isfinite(top.values[:, 0]), top.indices[:, 0], -1)
    return out


def _generator(seed: int, rig: str, camera: int, protocol: str) -> torch.Generator:
    """Its own seeded stream per (rig, camera, protocol): a rig's numbers do not depend on which other rigs or
    protocols ran before it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{rig}/{camera}/{protocol}".encode()))


#: Paired differences the clean protocol reports: Pr-VIPE against each baseline on the same queries.
PAIRED = (("prvipe", "lift3d"), ("prvipe", "nn2d"))


def _average(per_pair: list[dict[str, dict[str, torch.Tensor]]], se: dict | None = None,
             paired: dict | None = None) -> dict[str, dict[str, float]]:
    """Hit@k over queries and camera pairs; with ``se``, also fill it with each value's standard error over
    queries (a query's hits averaged over the pairs is one observation: the queries are the sample); with
    ``paired``, the difference of each pair of :data:`PAIRED` methods and its standard error over the per-query
    differences (much smaller than either method's own when the two miss the same hard queries)."""
    out: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, torch.Tensor]] = {}
    for method in per_pair[0]:
        out[method] = {}
        for key in per_pair[0][method]:
            hits = torch.stack([p[method][key] for p in per_pair]).double().mean(0)  # [queries]
            per_query.setdefault(method, {})[key] = hits
            out[method][key] = hits.mean().item()
            if se is not None:
                se.setdefault(method, {})[key] = standard_error(hits.tolist())
    if paired is not None:
        for a, b in PAIRED:
            if a in per_query and b in per_query:
                differences = {key: (per_query[a][key] - per_query[b][key]).tolist() for key in per_query[a]}
                paired[f"{a}-{b}"] = {key: {"mean": sum(d) / len(d), "se": standard_error(d)}
                                      for key, d in differences.items()}
    return out


@torch.no_grad()
def evaluate_rigs(model: torch.nn.Module, config: TrainConfig, table: PoseTable,
                  lifter: torch.nn.Module | None = None, eval_config: EvalConfig | None = None,
                  samples: int | None = None, seed: int = 0,
                  progress: Callable[[str], None] = log) -> dict:
    """Run the retrieval protocols of ``eval_config`` (clean, and occlusion unless off) on every rig.

    Returns ``{"rigs": {rig: {method: {"hit@k": fraction}}}, "occlusion": {rig: {pattern: {index_mode:
    {method: ...}}}}, "cameras": {rig: [...]}, "queries": n, "seconds": ...}``.
    """
    ev = eval_config or config.eval
    start = time.perf_counter()
    frames, stride = config.temporal.window, config.temporal.stride
    rows = evaluation_rows(table, ev.every, ev.max_queries)
    if len(rows) < 2:
        raise ValueError(f"{table.path}: only {len(rows)} evaluation frames for subjects {table.subjects}")
    joints = torch.from_numpy(table.joints[rows]).double()
    # match3d[q, i]: index pose i (aligned onto query q) is within kappa of the query's 3D.
    error3d = pairwise_np_mpjpe(joints, joints).T.contiguous()  # [query, index]
    match3d = error3d <= ev.kappa
    probabilistic = config.model.probabilistic
    k = samples or (config.model.samples if probabilistic else 1)
    # The match probability's two scalars on the CPU, beside the embeddings (the same module on a CPU model).
    match: MatchProbability = model.match if _device(model).type == "cpu" else copy.deepcopy(model.match).cpu()
    methods = tuple(m for m in METHODS if m != "lift3d" or lifter is not None)
    result: dict = {"rigs": {}, "se": {}, "paired": {}, "misses": {}, "occlusion": {}, "invalid": {}, "cameras": {},
                    "queries": int(len(rows)),
                    "subjects": table.subjects, "match_rate_3d": match3d.float().mean().item(), "kappa": ev.kappa,
                    "frames": frames}
    windows = torch.from_numpy(table.joints[window_rows(table, rows, frames, stride)]).double()
    all_visible = torch.ones(len(rows), NUM_KEYPOINTS_2D, dtype=torch.bool)
    for rig in ev.rigs:
        name, cameras = resolve_rig(rig)
        if name in result["cameras"]:
            raise ValueError(f"eval.rigs: two rigs are named {name!r} ({rig!r} and an earlier one); rename one")
        result["cameras"][name] = [vars(c) for c in cameras]
        pixels = [rendered_view(windows, Orbits.from_cameras([c]).expand(len(rows))) for c in cameras]
        clean = [_view(model, lifter, p, all_visible, k, probabilistic, _generator(seed, name, i, "clean"))
                 for i, p in enumerate(pixels)]
        pairs = [(i, j) for i in range(len(cameras)) for j in range(len(cameras)) if i != j]
        tops = [{} for _ in pairs]
        per_pair = [_pair_hits(clean[i], clean[j], match, match3d, ev.ks, methods, top1=top)
                    for (i, j), top in zip(pairs, tops)]
        result["rigs"][name] = _average(per_pair, se=result["se"].setdefault(name, {}),
                                        paired=result["paired"].setdefault(name, {}))
        result["misses"][name] = miss_report({m: torch.stack([t[m] for t in tops]) for m in methods}, error3d,
                                             ev.kappa, tuple(p for p in PAIRED if all(m in methods for m in p)))
        progress(f"[evaluate] rig {name}: {len(rows)} queries x {len(pairs)} camera pairs "
                 f"({time.perf_counter() - start:.0f} s)")
        if not ev.occlusion:
            continue
        ring = [(i, (i + 1) % len(cameras)) for i in range(len(cameras))]
        # The reference for the occlusion rows: clean queries on the same ring of camera pairs.
        on_ring = _average([_pair_hits(clean[i], clean[j], match, match3d, ev.ks, methods) for i, j in ring])
        occluded_result: dict = {"none": {"clean": on_ring, "occluded": on_ring}}
        invalid: dict = {}
        for pattern in occlusion_patterns(ev):
            # One draw per camera: an independent pattern hides different keypoints in each camera's renders.
            occluded = []
            for i, p in enumerate(pixels):
                g = _generator(seed, name, i, pattern)
                occluded.append(_view(model, lifter, p, pattern_visibility(pattern, len(rows), g), k, probabilistic, g))
            invalid[pattern] = float(torch.stack([~v["valid"] for v in occluded]).float().mean())
            occluded_result[pattern] = {
                "clean": _average([_pair_hits(occluded[i], clean[j], match, match3d, ev.ks, methods)
                                   for i, j in ring]),
                "occluded": _average([_pair_hits(occluded[i], occluded[j], match, match3d, ev.ks, methods)
                                      for i, j in ring]),
            }
        result["occlusion"][name] = occluded_result
        result["invalid"][name] = invalid
        progress(f"[evaluate] rig {name}: {len(occluded_result)} occlusion patterns "
                 f"({time.perf_counter() - start:.0f} s)")
    result["seconds"] = time.perf_counter() - start
    return result


def format_table(result: dict, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Plain-text tables: Hit@k (percent) per rig and method, then Hit@1 per occlusion protocol."""
    width = max([7] + [len(r) for r in result["rigs"]])
    header = f"{'rig':<{width}} {'method':<12}" + "".join(f"{'Hit@' + str(k):>9}" for k in ks)
    lines = [header, "-" * len(header)]
    for rig, methods in result["rigs"].items():
        for method in METHODS:
            if method in methods:
                cells = "".join(f"{100 * methods[method][f'hit@{k}']:>9.1f}" for k in ks)
                lines.append(f"{rig:<{width}} {method:<12}{cells}")
    differences = _paired_rows(result, ks)
    if differences:
        lines += ["", "paired differences (points, +- standard error over queries)"]
        lines += [f"{rig:<{width}} {name:<20} " + "  ".join(cells) for rig, name, cells in differences]
    legend, per_method, exclusive = _miss_tables(result)
    if per_method:
        lines += [""] + textwrap.wrap(legend, 110)
        for rows, columns in ((per_method, MISS_COLUMNS), (exclusive, EXCLUSIVE_COLUMNS)):
            names = max([len("method")] + [len(name) for _, name, _ in rows])
            header = f"{'rig':<{width}} {'method':<{names}}" + "".join(f"{h:>15}" for h in columns)
            lines += ["", header, "-" * len(header)]
            lines += [f"{rig:<{width}} {name:<{names}}" + "".join(f"{c:>15}" for c in cells)
                      for rig, name, cells in rows]
    occlusion = result.get("occlusion") or {}
    if any(occlusion.values()):
        methods = [m for m in METHODS if m in next(iter(result["rigs"].values()))]
        header = (f"{'rig':<{width}} {'occlusion (Hit@1)':<24} {'index':<9}" + "".join(f"{m:>12}" for m in methods)
                  + f"{'no embedding':>14}")
        lines += ["", header, "-" * len(header)]
        for rig, patterns in occlusion.items():
            for pattern, modes in patterns.items():
                lost = result.get("invalid", {}).get(rig, {}).get(pattern, 0.0)
                for mode, per_method in modes.items():
                    cells = "".join(f"{100 * per_method[m]['hit@1']:>12.1f}" for m in methods)
                    lines.append(f"{rig:<{width}} {pattern:<24} {mode:<9}{cells}{100 * lost:>13.1f}%")
    return "\n".join(lines)


def _paired_rows(result: dict, ks: tuple[int, ...]) -> list[tuple[str, str, list[str]]]:
    """(rig, "Pr-VIPE - lifting", ["+1.2 +- 0.8", ...]) per rig and pair of the result's ``paired`` block."""
    names = {"prvipe-lift3d": "Pr-VIPE - lifting", "prvipe-nn2d": "Pr-VIPE - 2D-NN"}
    return [(rig, names.get(pair, pair), [f"{100 * d[f'hit@{k}']['mean']:+.1f} +- {100 * d[f'hit@{k}']['se']:.1f}"
                                          for k in ks])
            for rig, pairs in (result.get("paired") or {}).items() for pair, d in pairs.items()]


#: Column titles of the two miss tables: per method (:func:`vipe_ray.evaluation.misses.miss_profile`), and Pr-VIPE
#: against each baseline (:func:`vipe_ray.evaluation.misses.exclusive_hits`; "only" = only that method hits).
MISS_COLUMNS = ("missed", "near misses", "top-1 error", "matches")
EXCLUSIVE_COLUMNS = ("both hit", "only Pr-VIPE", "only baseline", "neither")


def _miss_tables(result: dict) -> tuple[str, list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]:
    """A legend and the (rig, row name, cells) rows of the ``misses`` block's two tables.

    Per method: its misses (% of queries over the camera pairs), the share of those that are near misses, their
    median top-1 NP-MPJPE, and the median matches of the missed queries (first row: of all queries). Per
    baseline: the shares of queries both Pr-VIPE and it hit, only one of them, or neither."""
    per_method, exclusive = [], []
    near = 0.0
    for rig, report in (result.get("misses") or {}).items():
        near = report["near"]
        per_method.append((rig, "all queries", ["", "", "", f"{report['matches']:.0f}"]))
        for method in METHODS:
            if method in report["methods"]:
                m = report["methods"][method]
                per_method.append((rig, METHOD_NAMES[method], [
                    f"{100 * m['miss']:.1f}%", _percent(m["near_miss"]), _number(m["miss_error"], ".3f"),
                    _number(m["miss_matches"], ".0f")]))
        for pair, shares in report["exclusive"].items():
            a, b = pair.split("-")
            exclusive.append((rig, f"{_SHORT[a]} vs {_SHORT[b]}",
                              [f"{100 * shares[k]:.1f}%" for k in ("both", f"only_{a}", f"only_{b}", "neither")]))
    legend = (f"where Hit@1 misses: missed = share of queries (over the camera pairs); near misses = share of the "
              f"misses whose top-1 pose is within {near:g} x kappa of the query; top-1 error = their median "
              f"NP-MPJPE; matches = median index poses within kappa (the query's own included) of the missed "
              f"queries, and of all queries")
    return legend, per_method, exclusive


def _percent(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.0f}%"


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


_SHORT = {"prvipe": "Pr-VIPE", "prvipe_mean": "Pr-VIPE means", "nn2d": "2D-NN", "lift3d": "lifting"}


METHOD_NAMES = {"prvipe": "Pr-VIPE (-log P over samples)", "prvipe_mean": "Pr-VIPE (embedding means)",
                "nn2d": "2D nearest neighbour (Procrustes)", "lift3d": "3D lifting + NP-MPJPE"}


def format_markdown(result: dict, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Markdown tables of a result: Hit@k per rig and method, then Hit@1 per occlusion protocol (rows) and
    rig x method (columns), with the largest share of queries without an embedding over the rigs."""
    lines = ["| rig | method | " + " | ".join(f"Hit@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for rig, methods in result["rigs"].items():
        for method in METHODS:
            if method in methods:
                cells = " | ".join(f"{100 * methods[method][f'hit@{k}']:.1f}" for k in ks)
                lines.append(f"| {rig} | {METHOD_NAMES[method]} | {cells} |")
    differences = _paired_rows(result, ks)
    if differences:
        lines += ["", "| rig | paired difference (points, +- standard error over queries) | "
                  + " | ".join(f"Hit@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
        lines += [f"| {rig} | {name} | " + " | ".join(cells) + " |" for rig, name, cells in differences]
    legend, per_method, exclusive = _miss_tables(result)
    if per_method:
        lines += ["", legend[0].upper() + legend[1:] + "."]
        for rows, columns in ((per_method, MISS_COLUMNS), (exclusive, EXCLUSIVE_COLUMNS)):
            lines += ["", "| rig | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
            lines += [f"| {rig} | {name} | " + " | ".join(cells) + " |" for rig, name, cells in rows]
    occlusion = {rig: patterns for rig, patterns in (result.get("occlusion") or {}).items() if patterns}
    if occlusion:
        methods = [m for m in ("prvipe", "nn2d", "lift3d") if m in next(iter(result["rigs"].values()))]
        columns = [(rig, m) for rig in occlusion for m in methods]
        short = _SHORT
        lines += ["", "| occlusion (Hit@1) | index | " + " | ".join(f"{rig} {short[m]}" for rig, m in columns)
                  + " | no embedding |", "|---|---|" + "---|" * (len(columns) + 1)]
        first = next(iter(occlusion.values()))
        for pattern in sorted(first, key=lambda name: name != "none"):  # the clean reference row first
            lost = [result.get("invalid", {}).get(rig, {}).get(pattern, 0.0) for rig in occlusion]
            for mode in (INDEX_MODES if pattern != "none" else ("clean",)):
                cells = " | ".join(f"{100 * occlusion[rig][pattern][mode][m]['hit@1']:.1f}" for rig, m in columns)
                lines.append(f"| {pattern} | {mode} | {cells} | {100 * max(lost):.1f}% |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


LIMBS = ("group:left_arm", "group:right_arm", "group:left_leg", "group:right_leg")


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """A result as flat metric names: ``{prefix}{rig}/{method}/hit@k`` (clean), ``{prefix}{rig}/{a}-{b}/hit@k``
    (paired differences), ``{prefix}{rig}/misses/{method or pair}/{key}`` (where Hit@1 misses),
    ``{prefix}{rig}/{pattern}/{index}/{method}/hit@1`` (occlusion), ``{prefix}{rig}/{method}/hit@k_se``,
    and the summaries ``{prefix}hit@k`` (Pr-VIPE over the rigs) and ``{prefix}hit@1_1limb`` (Pr-VIPE, one
    limb hidden, clean index, over the limbs and rigs); the lifter and 2D-NN get ``{prefix}{method}_hit@k``."""
    out: dict[str, float] = {}
    for rig, methods in result["rigs"].items():
        for method, hits in methods.items():
            for key, value in hits.items():
                out[f"{prefix}{rig}/{method}/{key}"] = value
                se = result.get("se", {}).get(rig, {}).get(method, {}).get(key)
                if se is not None:
                    out[f"{prefix}{rig}/{method}/{key}_se"] = se
    for rig, pairs in (result.get("paired") or {}).items():
        for pair, hits in pairs.items():
            for key, value in hits.items():
                out[f"{prefix}{rig}/{pair}/{key}"] = value["mean"]
                out[f"{prefix}{rig}/{pair}/{key}_se"] = value["se"]
    for rig, report in (result.get("misses") or {}).items():
        for group in ("methods", "exclusive"):
            for name, values in report[group].items():
                out.update({f"{prefix}{rig}/misses/{name}/{key}": value for key, value in values.items()
                            if not math.isnan(value)})
    for rig, patterns in (result.get("occlusion") or {}).items():
        for pattern, modes in patterns.items():
            for mode, methods in modes.items():
                if pattern == "none" and mode == "occluded":
                    continue  # the same numbers as the clean index
                for method, hits in methods.items():
                    out[f"{prefix}{rig}/{pattern}/{mode}/{method}/hit@1"] = hits["hit@1"]
    rigs = list(result["rigs"])
    for method in next(iter(result["rigs"].values())):
        name = "" if method == "prvipe" else f"{method}_"
        for key in next(iter(result["rigs"].values()))[method]:
            out[f"{prefix}{name}{key}"] = sum(result["rigs"][r][method][key] for r in rigs) / len(rigs)
        occlusion = result.get("occlusion") or {}
        limbs = [occlusion[r][p]["clean"][method]["hit@1"] for r in occlusion for p in LIMBS if p in occlusion[r]]
        if limbs:
            out[f"{prefix}{name}hit@1_1limb"] = sum(limbs) / len(limbs)
    return out


def retrieval_objective(result: dict, metric: str = "hit@1") -> float:
    """Mean of a Pr-VIPE Hit@k over the rigs (the sweeps' default objective)."""
    values = [methods["prvipe"][metric] for methods in result["rigs"].values()]
    return float(sum(values) / len(values)) if values else math.nan
