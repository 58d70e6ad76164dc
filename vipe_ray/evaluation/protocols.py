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
import math
import time
import zlib
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
from vipe_ray.evaluation.retrieval import nearest, pairwise_procrustes_2d, ranked_hits
from vipe_ray.evaluation.stats import standard_error
from vipe_ray.prvipe.views import rendered_view

METHODS = ("prvipe", "prvipe_mean", "nn2d", "lift3d")
INDEX_MODES = ("clean", "occluded")


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
def embed_features(model: torch.nn.Module, features: torch.Tensor, batch: int = 2048
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sigma) ``[n, D]`` of CPU features ``[n, ..., 39]``: the model runs on its own device (a GPU
    worker's validation), in batches, and the results come back to the CPU, where retrieval runs."""
    model.eval()
    device = _device(model)
    means, sigmas = [], []
    for start in range(0, features.shape[0], batch):
        m, s = model(features[start:start + batch].to(device))
        means.append(m.float().cpu())
        sigmas.append(s.float().cpu())
    if not means:  # no poses
        dim = model.config.embedding_dim
        return torch.zeros(0, dim), torch.zeros(0, dim)
    return torch.cat(means), torch.cat(sigmas)


@torch.no_grad()
def camera_view(model: torch.nn.Module, lifter: torch.nn.Module | None, pixels: torch.Tensor, visible: torch.Tensor,
                k: int, probabilistic: bool, generator: torch.Generator) -> dict:
    """Everything the methods need of one camera's renders ``[n, frames, 13, 2]`` under ``visible`` ``[n, 13]``."""
    frames = pixels.shape[1]
    vis = visible[:, None, :].expand(-1, frames, -1)
    feats, valid_frames = model_input(pixels, vis)
    feats = feats.float()
    valid = valid_frames.all(1)  # a window needs every frame
    mean, sigma = embed_features(model, feats)
    eps = torch.randn((mean.shape[0], k, mean.shape[1]), generator=generator)
    centre = frames // 2
    view = {"mean": mean, "samples": mean[:, None] + (sigma[:, None] * eps if probabilistic else 0.0),
            "keypoints": feats[:, centre, :2 * NUM_KEYPOINTS_2D].reshape(-1, NUM_KEYPOINTS_2D, 2).double(),
            "visible": feats[:, centre, 2 * NUM_KEYPOINTS_2D:] > 0, "valid": valid}
    if lifter is not None:
        lifter.eval()
        view["lifted"] = lifter(feats[:, centre].to(_device(lifter))).double().cpu()
    return view


def pair_hits(q: dict, x: dict, match: MatchProbability, match3d: torch.Tensor, ks: tuple[int, ...],
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


def average_pairs(per_pair: list[dict[str, dict[str, torch.Tensor]]], se: dict | None = None,
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
        clean = [camera_view(model, lifter, p, all_visible, k, probabilistic, _generator(seed, name, i, "clean"))
                 for i, p in enumerate(pixels)]
        pairs = [(i, j) for i in range(len(cameras)) for j in range(len(cameras)) if i != j]
        tops = [{} for _ in pairs]
        per_pair = [pair_hits(clean[i], clean[j], match, match3d, ev.ks, methods, top1=top)
                    for (i, j), top in zip(pairs, tops)]
        result["rigs"][name] = average_pairs(per_pair, se=result["se"].setdefault(name, {}),
                                        paired=result["paired"].setdefault(name, {}))
        result["misses"][name] = miss_report({m: torch.stack([t[m] for t in tops]) for m in methods}, error3d,
                                             ev.kappa, tuple(p for p in PAIRED if all(m in methods for m in p)))
        progress(f"[evaluate] rig {name}: {len(rows)} queries x {len(pairs)} camera pairs "
                 f"({time.perf_counter() - start:.0f} s)")
        if not ev.occlusion:
            continue
        ring = [(i, (i + 1) % len(cameras)) for i in range(len(cameras))]
        # The reference for the occlusion rows: clean queries on the same ring of camera pairs.
        on_ring = average_pairs([pair_hits(clean[i], clean[j], match, match3d, ev.ks, methods) for i, j in ring])
        occluded_result: dict = {"none": {"clean": on_ring, "occluded": on_ring}}
        invalid: dict = {}
        for pattern in occlusion_patterns(ev):
            # One draw per camera: an independent pattern hides different keypoints in each camera's renders.
            occluded = []
            for i, p in enumerate(pixels):
                g = _generator(seed, name, i, pattern)
                occluded.append(camera_view(model, lifter, p, pattern_visibility(pattern, len(rows), g), k, probabilistic, g))
            invalid[pattern] = float(torch.stack([~v["valid"] for v in occluded]).float().mean())
            occluded_result[pattern] = {
                "clean": average_pairs([pair_hits(occluded[i], clean[j], match, match3d, ev.ks, methods)
                                   for i, j in ring]),
                "occluded": average_pairs([pair_hits(occluded[i], occluded[j], match, match3d, ev.ks, methods)
                                      for i, j in ring]),
            }
        result["occlusion"][name] = occluded_result
        result["invalid"][name] = invalid
        progress(f"[evaluate] rig {name}: {len(occluded_result)} occlusion patterns "
                 f"({time.perf_counter() - start:.0f} s)")
    result["seconds"] = time.perf_counter() - start
    return result
