"""Does `vipe-ray search` retrieve as well as the evaluation protocol does, on the same queries?

Queries are rendered motion capture made to look like a detector's output: every pose of a camera of a rig,
with keypoints hidden (``--hide``: an occlusion group, or independent keypoints at a rate) and Gaussian pixel
noise of ``noise`` x the pose's 2D height. They are written as a COCO person-keypoints JSON (hidden keypoints
``v = 0``) and searched with the search command against an index of the next camera's renders of the same
poses (a ring of camera pairs, as the evaluation's occlusion protocol uses). Hit@k counts a hit when a
returned pose's 3D is within ``eval.kappa`` NP-MPJPE of the query's. The same query pixels then go through
the evaluation's own path (:func:`vipe_ray.evaluation.protocols.camera_view` and
:func:`~vipe_ray.evaluation.protocols.pair_hits`). The two differ only in the Monte Carlo draws of the match
probability and in the search's candidate stage; the report gives both Hit@k and their per-query paired
difference with its standard error.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vipe_ray.data import PoseTable, evaluation_rows
from vipe_ray.evaluation.protocols import camera_view, pair_hits, pattern_visibility
from vipe_ray.evaluation.stats import standard_error
from vipe_ray.prvipe.keypoints import COCO17_TO_COCO13
from vipe_ray.prvipe.matching import pairwise_np_mpjpe
from vipe_ray.search.commands import search_entries
from vipe_ray.search.index import build_index, load_index
from vipe_ray.search.keypoint_files import read_keypoints
from vipe_ray.search.library import embed_keypoint_set, embed_keypoints, render_table
from vipe_ray.training.checkpoint import Checkpoint


def detector_like(pixels: torch.Tensor, hide: str | None, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``[n, 13, 2]`` pixels with keypoints hidden by pattern ``hide`` (NaN) and N(0, (noise x 2D height)^2)
    added to each visible coordinate."""
    height = (pixels[..., 1].amax(-1) - pixels[..., 1].amin(-1)).clamp_min(1.0)  # [n]
    noisy = pixels + noise * height[:, None, None] * torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    if hide:
        visible = pattern_visibility(hide, len(pixels), generator)
        noisy = torch.where(visible[..., None], noisy, torch.tensor(float("nan"), dtype=pixels.dtype))
    return noisy


def coco_json(pixels: torch.Tensor, path: Path) -> Path:
    """Write COCO13 pixels ``[n, 13, 2]`` (NaN: hidden) as a COCO person-keypoints JSON, annotation id = row."""
    annotations = []
    for i, pose in enumerate(pixels.tolist()):
        triples = [[0.0, 0.0, 0]] * 17
        for slot, joint in enumerate(COCO17_TO_COCO13):
            x, y = pose[slot]
            triples[joint] = [0.0, 0.0, 0] if np.isnan(x) else [x, y, 2]
        annotations.append({"id": i, "image_id": i, "category_id": 1, "keypoints": [v for t in triples for v in t]})
    path.write_text(json.dumps({"annotations": annotations}))
    return path


def agreement(checkpoint: Checkpoint, table: PoseTable, rig: str, every: int, hide: str | None, noise: float,
              ks: tuple[int, ...] = (1, 5, 10), seed: int = 0, max_queries: int = 0) -> dict:
    """Hit@k of the search command and of the evaluation on the same detector-like queries (see the module
    docstring): ``{"search": {hit@k}, "evaluation": {hit@k}, "difference": {hit@k: {"mean", "se"}}, ...}``."""
    model, config = checkpoint.model, checkpoint.config
    rows = evaluation_rows(table, every, max_queries)
    joints = torch.from_numpy(table.joints[rows]).double()
    match3d = pairwise_np_mpjpe(joints, joints).T <= config.eval.kappa  # [query, index]
    name, cameras, pixels = render_table(table, rows, rig)
    k = config.model.samples if config.model.probabilistic else 1
    per_query = {"search": {f"hit@{x}": [] for x in ks}, "evaluation": {f"hit@{x}": [] for x in ks}}
    work = Path(tempfile.mkdtemp(prefix="vipe-agreement-"))
    for i in range(len(cameras)):
        j = (i + 1) % len(cameras)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{i}/{hide}".encode()))
        queries = detector_like(pixels[i], hide, noise, generator)
        # The search command's path: a COCO file, read back, embedded, searched.
        library = embed_keypoints(model, pixels[j], [{"row": r} for r in range(len(rows))])
        build_index(work / f"pair{i}", checkpoint, f"agreement {name} camera {j}", library.mean, library.sigma,
                    library.keypoints, library.visible, library.meta, kind="exact")
        index = load_index(work / f"pair{i}")
        read = embed_keypoint_set(index.checkpoint.model, read_keypoints(coco_json(queries, work / f"q{i}.json")))
        entries, _ = search_entries(index, read, max(ks))
        for q, entry in enumerate(entries):
            found = [r["row"] for r in entry["results"]]
            for x in ks:
                per_query["search"][f"hit@{x}"].append(float(bool(match3d[q, found[:x]].any())) if found else 0.0)
        # The evaluation's path on the same pixels: its views, its probability, its ranking.
        visible = ~torch.isnan(queries).any(-1)
        q_view = camera_view(model, None, queries[:, None], visible, k, config.model.probabilistic,
                             torch.Generator().manual_seed(2 * i))
        x_view = camera_view(model, None, pixels[j][:, None], torch.ones_like(visible), k,
                             config.model.probabilistic, torch.Generator().manual_seed(2 * i + 1))
        hits = pair_hits(q_view, x_view, model.match, match3d, ks, ("prvipe",))["prvipe"]
        for x in ks:
            per_query["evaluation"][f"hit@{x}"] += hits[f"hit@{x}"].double().tolist()
    out: dict = {"rig": name, "pairs": len(cameras), "queries_per_pair": int(len(rows)), "hide": hide,
                 "noise": noise, "subjects": table.subjects, "every": every, "kappa": config.eval.kappa}
    for method in ("search", "evaluation"):
        out[method] = {key: float(np.mean(v)) for key, v in per_query[method].items()}
    out["difference"] = {}
    for key in per_query["search"]:
        diff = np.array(per_query["search"][key]) - np.array(per_query["evaluation"][key])
        out["difference"][key] = {"mean": float(diff.mean()), "se": standard_error(diff.tolist()),
                                  "disagreeing_queries": float((diff != 0).mean())}
    return out
