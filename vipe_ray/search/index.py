"""A searchable pose library: embedding means in a vector index, candidates re-ranked by match probability.

Search runs in two stages. (1) The ``candidates`` library poses whose embedding *means* are nearest the
query's (Euclidean), from a FAISS index: exact (``IndexFlatL2``) for libraries below :data:`EXACT_BELOW`
poses, where brute force is fast enough, and a graph index (HNSW) above. (2) Those candidates re-ranked by the
model's own score, the match probability ``p = mean over K x K sample pairs of sigmoid(-a d + b)`` with the
trained (a, b): the quantity Pr-VIPE is trained and evaluated on. The K samples of every embedding use one
fixed bank of normal draws per side (drawn from the index's seed when it is built and stored with it), so a
search is deterministic and all candidates of a query are compared on the same draws.

An index is a directory::

    index.json        what it holds: size, dimension, index kind, samples, the model it was built with
    vectors.faiss     the FAISS index over the means
    embeddings.npz    means and sigmas [n, D] float32; normalized 2D keypoints [n, 13, 2] and visibility [n, 13];
                      the two banks of sample draws [K, D]
    poses3d.npy       the 3D pose of every library pose [n, 17, 3] (pose-table libraries only)
    metadata.parquet  one row per pose: source, subject/clip/frame/camera or annotation/image ids
    model.pt          the embedding model (a vipe-ray checkpoint with its config): queries embed with it
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vipe_ray.prvipe.losses import MatchProbability
from vipe_ray.training.checkpoint import Checkpoint, load_checkpoint, save_model_only, weights_of

INDEX_FORMAT = "vipe-ray-index/1"
#: Below this many poses the candidates come from exact search (bench/search_index.py measures the crossover).
EXACT_BELOW = 50_000
#: HNSW graph degree, build depth and the least search depth (bench/search_index.py: recall and latency).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
#: Candidates re-ranked per query, at least (a search asks for max(this, 10 x top-k)).
CANDIDATES = 100
#: Sample distances held at once while re-ranking (4 M floats; with the samples they are computed from, about
#: 100 MB at 64 dimensions): bounds a search's memory at any top-k.
RERANK_FLOATS = 1 << 22
MODEL_FILE = "model.pt"


class PoseIndexError(ValueError):
    """An index directory that cannot be used (missing files, another format, a mismatched model)."""


@dataclass
class PoseIndex:
    """A loaded index. ``mean``/``sigma`` ``[n, D]`` float32; ``keypoints`` ``[n, 13, 2]`` normalized 2D and
    ``visible`` ``[n, 13]`` (for figures); ``poses3d`` ``[n, 17, 3]`` or None; ``meta`` a pyarrow table."""

    mean: np.ndarray
    sigma: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    poses3d: np.ndarray | None
    meta: pa.Table
    vectors: faiss.Index
    info: dict
    checkpoint: Checkpoint
    sample_draws: dict = field(default_factory=dict, repr=False)  # side -> [K, D] normal draws

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def match(self) -> MatchProbability:
        return self.checkpoint.model.match

    def samples(self, mean: torch.Tensor, sigma: torch.Tensor, side: str) -> torch.Tensor:
        """Samples ``[..., K, D]`` of embeddings ``[..., D]`` from the index's fixed draws of ``side``
        (``"query"`` or ``"library"``); a point embedding is its mean (K = 1)."""
        if not self.info["probabilistic"]:
            return mean[..., None, :]
        return mean[..., None, :] + sigma[..., None, :] * self.sample_draws[side]

    def probabilities(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Match probability of each query's candidates: samples ``[b, K, D]`` x ``[b, C, K, D]`` -> ``[b, C]``
        (the model's own :class:`MatchProbability`, over the K x K sample pairs of each candidate)."""
        return self.match(queries[:, None], candidates)

    @torch.no_grad()
    def search(self, mean: np.ndarray, sigma: np.ndarray, top_k: int, candidates: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` library poses of each query embedding (``mean``, ``sigma`` ``[m, D]``): (row indices
        ``[m, top_k]``, match probabilities ``[m, top_k]``), best first; -1 / NaN where the library is short.
        ``candidates``: library poses re-ranked per query (default :data:`CANDIDATES`; at least 10 x top_k)."""
        if top_k < 1:
            raise ValueError(f"--top-k: {top_k} must be >= 1")
        m = len(mean)
        top_k = min(top_k, max(1, len(self)))
        want = min(len(self), max(candidates or CANDIDATES, 10 * top_k))
        # Queries per re-ranking batch: its sample distances [batch, K, want K] stay within RERANK_FLOATS.
        k = self.info["samples"]
        batch = max(1, RERANK_FLOATS // (k * k * max(want, 1)))
        rows = np.full((m, top_k), -1, dtype=np.int64)
        probs = np.full((m, top_k), np.nan, dtype=np.float64)
        if m == 0 or len(self) == 0:
            return rows, probs
        if isinstance(self.vectors, faiss.IndexHNSW):
            self.vectors.hnsw.efSearch = max(HNSW_EF_SEARCH, want)
        _, found = self.vectors.search(np.ascontiguousarray(mean, dtype=np.float32), want)  # [m, want]
        keep = min(top_k, want)
        for start in range(0, m, batch):
            cand = found[start:start + batch]  # [b, want], -1 where HNSW found fewer
            safe = np.where(cand >= 0, cand, 0)
            q = self.samples(torch.from_numpy(mean[start:start + batch]).float(),
                             torch.from_numpy(sigma[start:start + batch]).float(), "query")  # [b, K, D]
            c = self.samples(torch.from_numpy(self.mean[safe]), torch.from_numpy(self.sigma[safe]), "library")
            p = self.probabilities(q, c).masked_fill_(torch.from_numpy(cand < 0), float("-inf"))  # [b, want]
            best = torch.topk(p, keep, dim=1)
            top = np.take_along_axis(cand, best.indices.numpy(), 1)
            value = best.values.double().numpy()
            rows[start:start + batch, :keep] = np.where(np.isfinite(value), top, -1)
            probs[start:start + batch, :keep] = np.where(np.isfinite(value), value, np.nan)
        return rows, probs

    @torch.no_grad()
    def exact_search(self, mean: np.ndarray, sigma: np.ndarray, top_k: int, chunk: int = 65536
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The same scoring over the whole library, without candidates (the reference the bench measures
        recall against): (row indices, probabilities) ``[m, top_k]``."""
        q = self.samples(torch.from_numpy(mean).float(), torch.from_numpy(sigma).float(), "query")
        best_p = torch.full((len(mean), 0), float("-inf"), dtype=torch.float64)
        best_i = torch.zeros((len(mean), 0), dtype=torch.int64)
        for start in range(0, len(self), chunk):
            c = self.samples(torch.from_numpy(self.mean[start:start + chunk]),
                             torch.from_numpy(self.sigma[start:start + chunk]), "library")
            p = self.match.pairwise(q, c).double()  # [m, chunk]
            best_p = torch.cat([best_p, p], 1)
            best_i = torch.cat([best_i, torch.arange(start, start + p.shape[1]).expand(len(mean), -1)], 1)
            keep = torch.topk(best_p, min(top_k, best_p.shape[1]), dim=1)
            best_p, best_i = keep.values, best_i.gather(1, keep.indices)
        return best_i.numpy(), best_p.numpy()

    def rows(self, indices: np.ndarray) -> list[dict]:
        """Metadata rows (dicts, without the keys a row has no value for) of library rows ``indices``."""
        rows = self.meta.take(pa.array(indices, type=pa.int64())).to_pylist()
        return [{k: v for k, v in row.items() if v is not None} for row in rows]


def draws(info: dict, side: str) -> torch.Tensor:
    """The fixed normal draws ``[K, D]`` of one side of the match probability (seeded by the index)."""
    offset = {"query": 0, "library": 1}[side]
    generator = torch.Generator().manual_seed(int(info["seed"]) * 2 + offset)
    return torch.randn((info["samples"], info["dim"]), generator=generator)


def vector_index(mean: np.ndarray, kind: str | None = None) -> faiss.Index:
    """A FAISS index over ``mean`` ``[n, D]``: ``"exact"`` (flat L2) or ``"hnsw"``; None picks by size."""
    n, dim = mean.shape
    kind = kind or ("exact" if n < EXACT_BELOW else "hnsw")
    if kind == "exact":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        raise ValueError(f"index kind: {kind!r} must be 'exact' or 'hnsw'")
    index.add(np.ascontiguousarray(mean, dtype=np.float32))
    return index


def build_index(out: str | Path, checkpoint: Checkpoint, source: str, mean: np.ndarray, sigma: np.ndarray,
                keypoints: np.ndarray, visible: np.ndarray, meta: list[dict], poses3d: np.ndarray | None = None,
                kind: str | None = None, seed: int = 0, progress=lambda _m: None) -> Path:
    """Write an index directory at ``out`` (see the module docstring) and return its path. ``source`` says what
    the library was built from (the command's inputs); ``checkpoint`` is the model that embedded it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PoseIndexError(f"{out}: exists and is not an empty directory; choose a new --out (an index is never "
                             f"overwritten)")
    n = len(mean)
    if not (len(sigma) == len(keypoints) == len(visible) == len(meta) == n) or (poses3d is not None and len(poses3d) != n):
        raise ValueError("build_index: mean, sigma, keypoints, visible, meta (and poses3d) must have one row per pose")
    table = metadata_table(meta)
    start = time.perf_counter()
    vectors = vector_index(mean, kind)
    progress(f"[index] {n} poses in a {type(vectors).__name__} ({time.perf_counter() - start:.1f} s)")
    model = checkpoint.model
    info = {"format": INDEX_FORMAT, "count": n, "dim": int(mean.shape[1]),
            "kind": "hnsw" if isinstance(vectors, faiss.IndexHNSW) else "exact",
            "samples": int(model.config.samples) if model.config.probabilistic else 1,
            "probabilistic": bool(model.config.probabilistic), "seed": seed, "source": source,
            "model": {"step": checkpoint.step, "data_checksum": checkpoint.data_checksum,
                      "checkpoint": str(checkpoint.payload.get("source", ""))},
            "has_poses3d": poses3d is not None, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside out under a private name, renamed into place when complete: a failure leaves no index.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        faiss.write_index(vectors, str(tmp / "vectors.faiss"))
        np.savez(tmp / "embeddings.npz", mean=mean.astype(np.float32), sigma=sigma.astype(np.float32),
                 keypoints=keypoints.astype(np.float16), visible=visible.astype(bool),
                 draws_query=draws(info, "query").numpy(), draws_library=draws(info, "library").numpy())
        if poses3d is not None:
            np.save(tmp / "poses3d.npy", poses3d.astype(np.float32))
        pq.write_table(table, tmp / "metadata.parquet")
        save_model_only(model, checkpoint.config, checkpoint.step, checkpoint.data_checksum, tmp / MODEL_FILE,
                        weights=weights_of(checkpoint))
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def metadata_table(meta: list[dict]) -> pa.Table:
    """One metadata row per pose as a table with every key any row has (missing values null). A key whose
    values mix types (an image id that is a number in one file and a name in another) is stored as text."""
    keys = list(dict.fromkeys(k for row in meta for k in row)) or ["source"]
    columns = {}
    for key in keys:
        values = [row.get(key) for row in meta]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def load_index(path: str | Path) -> PoseIndex:
    """Open an index directory written by :func:`build_index`."""
    path = Path(path)
    info_file = path / "index.json"
    if not info_file.is_file():
        raise PoseIndexError(f"{path}: not a vipe-ray index (no index.json; build one with `vipe-ray index`)")
    info = json.loads(info_file.read_text())
    if info.get("format") != INDEX_FORMAT:
        raise PoseIndexError(f"{info_file}: format {info.get('format')!r}, expected {INDEX_FORMAT!r}")
    for name in ("vectors.faiss", "embeddings.npz", "metadata.parquet", MODEL_FILE):
        if not (path / name).is_file():
            raise PoseIndexError(f"{path}: {name} is missing")
    arrays = np.load(path / "embeddings.npz")
    checkpoint = load_checkpoint(path / MODEL_FILE)
    vectors = faiss.read_index(str(path / "vectors.faiss"))
    poses3d = np.load(path / "poses3d.npy") if info.get("has_poses3d") else None
    meta = pq.read_table(path / "metadata.parquet")
    index = PoseIndex(arrays["mean"], arrays["sigma"], arrays["keypoints"].astype(np.float32), arrays["visible"],
                      poses3d, meta, vectors, info, checkpoint,
                      {"query": torch.from_numpy(arrays["draws_query"]),
                       "library": torch.from_numpy(arrays["draws_library"])})
    dim = checkpoint.config.model.embedding_dim
    if vectors.d != info["dim"] or dim != info["dim"]:
        raise PoseIndexError(f"{path}: the vectors ({vectors.d}), index.json ({info['dim']}) and the model "
                             f"({dim}) disagree on the embedding dimension")
    if vectors.ntotal != len(index) or meta.num_rows != len(index) or len(index) != info["count"]:
        raise PoseIndexError(f"{path}: its files disagree on the number of poses (vectors {vectors.ntotal}, "
                          f"embeddings {len(index)}, metadata {meta.num_rows}, index.json {info['count']})")
    return index

