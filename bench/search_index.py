"""How fast is pose search, and how much does the approximate index lose against exact search?

    python bench/search_index.py [--checkpoint data/prvipe-small] [--sizes 10000 100000 1000000]
                                 [--queries 200] [--exact-queries 50] [--json OUT.json]

For each library size, all measured in this run on the same embeddings:

* the library: table poses (the bundled table, every row, cycled) each seen by its own random camera of the
  wide distribution (WIDE_RANGES), embedded by the model; ``embed poses/s``;
* ``build poses/s`` of each vector index over the means: exact (FAISS flat L2) and HNSW;
* top-10 query latency, one query at a time as `vipe-ray search` runs them (candidates from the vector index,
  re-ranked by match probability), p50 and p99 in ms, for the exact and the HNSW index, beside exact brute
  force (the match probability of every library pose: :meth:`PoseIndex.exact_search`);
* recall@10 of each index against that brute force: the share of brute force's top 10 that the search
  returns (on ``--exact-queries`` queries; brute force at 1M poses takes about a second per query).

Queries are other table poses seen by other random cameras. Threads: torch's and FAISS's defaults (every core).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's package, not whichever one is installed

from vipe_ray.data import load_table  # noqa: E402
from vipe_ray.prvipe.cameras import WIDE_RANGES, render, sample_orbits  # noqa: E402
from vipe_ray.search.index import build_index, load_index  # noqa: E402
from vipe_ray.search.library import embed_keypoints  # noqa: E402
from vipe_ray.training.checkpoint import load_checkpoint  # noqa: E402


def random_views(joints: np.ndarray, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` renders: table rows cycled, each by its own random camera -> (pixels [n, 13, 2], rows [n])."""
    generator = torch.Generator().manual_seed(seed)
    rows = np.arange(n) % len(joints)
    pixels = []
    for start in range(0, n, 100_000):
        part = rows[start:start + 100_000]
        orbits = sample_orbits(len(part), WIDE_RANGES, generator)
        pixels.append(render(torch.from_numpy(joints[part]).double(), orbits))
    return torch.cat(pixels), rows


def latencies(index, mean: np.ndarray, sigma: np.ndarray, top_k: int) -> tuple[np.ndarray, list[float]]:
    """Search one query at a time: (rows [m, top_k], per-query seconds)."""
    rows, seconds = [], []
    for i in range(len(mean)):
        start = time.perf_counter()
        r, _ = index.search(mean[i:i + 1], sigma[i:i + 1], top_k)
        seconds.append(time.perf_counter() - start)
        rows.append(r[0])
    return np.stack(rows), seconds


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "data" / "prvipe-small"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    table = load_table(checkpoint.config.data.table_path())
    print(f"model {args.checkpoint} (step {checkpoint.step}, {checkpoint.config.model.embedding_dim} dims, K = "
          f"{checkpoint.config.model.samples}); table {table.path} ({len(table)} poses); torch threads "
          f"{torch.get_num_threads()}")
    query_pixels, _ = random_views(table.joints[::-1].copy(), args.queries, seed=1)
    queries = embed_keypoints(checkpoint.model, query_pixels)
    rows_out = []
    for size in args.sizes:
        pixels, _ = random_views(table.joints, size, seed=0)
        start = time.perf_counter()
        library = embed_keypoints(checkpoint.model, pixels).only_valid()
        embed_rate = len(library) / (time.perf_counter() - start)
        meta = [{"row": i} for i in range(len(library))]
        row = {"size": len(library), "embed_poses_per_s": round(embed_rate)}
        work = Path(tempfile.mkdtemp(prefix="vipe-search-bench-"))
        try:
            found = {}
            for kind in ("exact", "hnsw"):
                start = time.perf_counter()
                build_index(work / kind, checkpoint, "bench", library.mean, library.sigma, library.keypoints,
                            library.visible, meta, kind=kind)
                row[f"{kind}_build_poses_per_s"] = round(len(library) / (time.perf_counter() - start))
                index = load_index(work / kind)
                index.search(queries.mean[:2], queries.sigma[:2], args.top_k)  # warm-up
                found[kind], seconds = latencies(index, queries.mean, queries.sigma, args.top_k)
                row[f"{kind}_p50_ms"] = round(1000 * float(np.percentile(seconds, 50)), 2)
                row[f"{kind}_p99_ms"] = round(1000 * float(np.percentile(seconds, 99)), 2)
            m = min(args.exact_queries, len(queries))
            seconds = []
            truth = []
            for i in range(m):
                start = time.perf_counter()
                r, _ = index.exact_search(queries.mean[i:i + 1], queries.sigma[i:i + 1], args.top_k)
                seconds.append(time.perf_counter() - start)
                truth.append(r[0])
            truth = np.stack(truth)
            row["brute_force_p50_ms"] = round(1000 * float(np.percentile(seconds, 50)), 1)
            row["exact_recall@10"] = round(recall(found["exact"][:m], truth), 4)
            row["hnsw_recall@10"] = round(recall(found["hnsw"][:m], truth), 4)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    columns = ["size", "embed_poses_per_s", "exact_build_poses_per_s", "hnsw_build_poses_per_s", "exact_p50_ms",
               "exact_p99_ms", "hnsw_p50_ms", "hnsw_p99_ms", "brute_force_p50_ms", "exact_recall@10",
               "hnsw_recall@10"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows_out:
        print("| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2) + "\n")


if __name__ == "__main__":
    main()
