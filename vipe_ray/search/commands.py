"""``vipe-ray index`` and ``vipe-ray search``.

    vipe-ray index --checkpoint RUN_DIR --data TABLE.parquet [--subjects 06 13] --rig RIG_OR_YAML [--every N]
                   --out INDEX_DIR
    vipe-ray index --checkpoint RUN_DIR --keypoints FILE.json [FILE ...] [--min-score S] --out INDEX_DIR
    vipe-ray search --index INDEX_DIR --keypoints QUERIES.json [--min-score S] [--top-k K] [--json OUT.json]
                    [--figure OUT.png]

A search answers every pose of the query file, in file order: ``{"annotation_id", "image_id", "file_name",
"score" (those the file has), "valid", "results": [...]}``. Each result: ``rank``, ``probability`` (the match
probability), ``source`` (the library's file) and, for a pose-table library, ``subject``, ``clip``, ``frame``
(the source frame index), ``camera`` (0-based, in the rig's camera order), ``rig`` and ``pose3d`` (17 x 3 world
metres, Human3.6M order); for a keypoint-file library, ``annotation_id``, ``image_id``, ``file_name`` and
``score`` (that library annotation's detector score). A query that cannot be embedded (:data:`NOT_EMBEDDED`)
has ``"valid": false`` and no results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

from vipe_ray import log
from vipe_ray.data import load_table
from vipe_ray.search.figure import describe, search_figure
from vipe_ray.search.index import PoseIndex, build_index, load_index
from vipe_ray.search.keypoint_files import read_keypoints
from vipe_ray.search.library import Embedded, concat, embed_keypoint_set, embed_table
from vipe_ray.search.model_source import resolve_model
from vipe_ray.training.checkpoint import checkpoint_file, load_checkpoint

#: Why a pose has no embedding (:func:`vipe_ray.prvipe.keypoints.normalize_masked`).
NOT_EMBEDDED = ("it cannot be normalized: fewer than two distinct visible torso keypoints, or a torso too "
                "foreshortened for its limbs")
#: Fields of a query's metadata repeated in its search result entry.
QUERY_FIELDS = ("annotation_id", "image_id", "file_name", "score")


def index_command(checkpoint: str, out: str, data: str | None = None, subjects: list[str] | None = None,
                  rig: str | None = None, every: int = 1, keypoints: list[str] | None = None, min_score: float = 0.0,
                  kind: str | None = None, progress=log) -> dict:
    """Embed a library and write its index; returns index.json's contents."""
    if (data is None) == (not keypoints):
        raise ValueError("index: give either --data TABLE.parquet --rig RIG (a pose table seen by a rig's cameras) "
                         "or --keypoints FILE ... (poses from keypoint files)")
    if data is not None and rig is None:
        raise ValueError("index --data: --rig is required (a built-in rig such as h36m, or a rig YAML)")
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty directory (an index is never overwritten)")
    start = time.perf_counter()
    model_file = resolve_model(checkpoint)
    ckpt = load_checkpoint(model_file)
    ckpt.payload["source"] = str(checkpoint) if ":/" in str(checkpoint) else str(checkpoint_file(model_file))
    if data is not None:
        table = load_table(data)
        if subjects:
            table = table.select(subjects)
        library = embed_table(ckpt.model, table, rig, every, progress)
        source = f"{data} subjects {table.subjects} rig {rig} every {every}"
    else:
        library = concat([embed_keypoint_set(ckpt.model, read_keypoints(path, min_score)) for path in keypoints])
        source = f"keypoints {list(keypoints)} min-score {min_score}"
    kept = library.only_valid()
    if len(kept) < len(library):
        progress(f"[index] {len(library) - len(kept)} of {len(library)} poses have fewer than two visible torso "
                 f"keypoints: left out")
    if not len(kept):
        raise ValueError("index: no pose of the library could be embedded")
    embedded = time.perf_counter() - start
    path = build_index(out, ckpt, source, kept.mean, kept.sigma, kept.keypoints, kept.visible, kept.meta, kept.poses3d,
                       kind=kind, progress=progress)
    info = json.loads((path / "index.json").read_text())
    seconds = time.perf_counter() - start
    progress(f"[index] {out}: {len(kept)} poses ({info['kind']}), embedded in {embedded:.1f} s, "
             f"{len(kept) / seconds:.0f} poses/s in all")
    return info


def search_entries(index: PoseIndex, queries: Embedded, top_k: int, candidates: int | None = None
                   ) -> tuple[list[dict], np.ndarray]:
    """Search every query; returns (one entry per query, in order; the library rows ``[m, top_k]``)."""
    if top_k < 1:
        raise ValueError(f"--top-k: {top_k} must be >= 1")
    top_k = min(top_k, max(1, len(index)))  # a library of n poses answers at most n
    rows = np.full((len(queries), top_k), -1, dtype=np.int64)
    probs = np.full((len(queries), top_k), np.nan)
    valid = np.flatnonzero(queries.valid)
    if len(valid):
        rows[valid], probs[valid] = index.search(queries.mean[valid], queries.sigma[valid], top_k, candidates)
    entries = []
    for q in range(len(queries)):
        entry = {k: queries.meta[q][k] for k in QUERY_FIELDS if k in queries.meta[q]}
        entry["valid"] = bool(queries.valid[q])
        found = rows[q][rows[q] >= 0]
        results = []
        for rank, (row, meta) in enumerate(zip(found, index.rows(found)), start=1):
            result = {"rank": rank, "probability": round(float(probs[q, rank - 1]), 6), **meta}
            if index.poses3d is not None:
                result["pose3d"] = [[round(float(v), 4) for v in joint] for joint in index.poses3d[row]]
            results.append(result)
        entry["results"] = results
        entries.append(entry)
    return entries, rows


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: a failure never leaves half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def search_command(index_dir: str, keypoints: str, top_k: int = 5, min_score: float = 0.0,
                   candidates: int | None = None, json_out: str | None = None, figure: str | None = None,
                   print_fn=print) -> list[dict]:
    """Search an index with the poses of a keypoint file; prints a table, writes JSON and the figure."""
    if top_k < 1:
        raise ValueError(f"--top-k: {top_k} must be >= 1")
    if json_out and Path(json_out).resolve() == Path(keypoints).resolve():
        raise ValueError(f"--json {json_out}: is the query file; choose another path")
    if figure and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--figure needs matplotlib (pip install -e '.[platform]')")
    index = load_index(index_dir)
    poses = read_keypoints(keypoints, min_score)
    if poses.scored and min_score == 0:
        print_fn(f"note: {keypoints} holds detector confidences; --min-score 0 keeps every keypoint, the "
                 f"low-confidence guesses too (try --min-score 0.3)")
    queries = embed_keypoint_set(index.checkpoint.model, poses)
    if figure and not queries.valid.any():
        raise ValueError("--figure: no query could be embedded (each needs a normalizable torso)")
    start = time.perf_counter()
    entries, rows = search_entries(index, queries, top_k, candidates)
    seconds = time.perf_counter() - start
    print_fn(f"{len(queries)} queries ({int(queries.valid.sum())} embedded) against {len(index)} library poses "
             f"({index.info['kind']}) in {seconds:.2f} s")
    for entry in entries:
        head = f"query {entry.get('annotation_id')}" + (f" (image {entry['image_id']})" if "image_id" in entry else "")
        if not entry["valid"]:
            print_fn(f"{head}: not embedded ({NOT_EMBEDDED})")
            continue
        print_fn(head)
        for result in entry["results"]:
            print_fn(f"  #{result['rank']:<3} p={result['probability']:.3f}  {describe(result)}"
                     + (f"  subject {result['subject']}" if "subject" in result else ""))
    if json_out:
        write_atomic(Path(json_out), json.dumps(entries, indent=1) + "\n")
        print_fn(f"wrote {json_out}")
    if figure:
        search_figure(figure, queries, entries, index, rows)
        print_fn(f"wrote {figure}")
    return entries
