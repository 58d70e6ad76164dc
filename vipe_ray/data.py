"""Pose tables: reading the converted motion capture, subject splits, training windows and evaluation frames.

A pose table (written by ``vipe-ray convert``) has one row per frame: ``subject``, ``clip``, ``frame`` (index
in the source file) and ``joints3d`` (``[17, 3]`` float32 metres, Human3.6M order, z up).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vipe_ray import storage
from vipe_ray.prvipe.keypoints import H36M17_JOINTS, NUM_JOINTS_3D

SOURCE_FPS = 120
METADATA_KEY = b"vipe_ray"


class DataError(ValueError):
    """A pose table that cannot be used; the message names the file, column and value."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file or an object-store URI (``s3://...``)."""
    digest = hashlib.sha256()
    loc = storage.location(path)
    with loc.fs.open_input_stream(loc.path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PoseTable:
    """Frames of a pose table, as arrays: ``joints`` ``[rows, 17, 3]``; ``subject``/``clip`` ``[rows]`` str;
    ``frame`` ``[rows]`` int (source frame index); ``fps`` of the table; ``checksum`` (sha256 of the file)."""

    subject: np.ndarray
    clip: np.ndarray
    frame: np.ndarray
    joints: np.ndarray
    fps: int
    checksum: str
    path: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def subjects(self) -> list[str]:
        return sorted(set(self.subject.tolist()))

    def select(self, subjects: tuple[str, ...] | list[str]) -> "PoseTable":
        """Rows of the given subjects (each must be present)."""
        missing = sorted(set(subjects) - set(self.subject.tolist()))
        if missing:
            raise DataError(f"{self.path}: subjects {missing} not in the table (has {self.subjects})")
        keep = np.isin(self.subject, list(subjects))
        return PoseTable(self.subject[keep], self.clip[keep], self.frame[keep], self.joints[keep],
                         self.fps, self.checksum, self.path)

    @property
    def frame_step(self) -> int:
        """Source frames between consecutive table rows of a clip."""
        return SOURCE_FPS // self.fps


def table_to_arrays(table: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns of a pose table (or a batch of it) as numpy; validates the joints column."""
    for name in ("subject", "clip", "frame", "joints3d"):
        if name not in table.column_names:
            raise DataError(f"{where}: missing column {name!r} (has {table.column_names})")
    joints = joints_array(table, where)
    subject = np.asarray(table.column("subject").to_pylist(), dtype=object).astype(str)
    clip = np.asarray(table.column("clip").to_pylist(), dtype=object).astype(str)
    frame = table.column("frame").to_numpy().astype(np.int64)
    return subject, clip, frame, joints


def joints_array(table: pa.Table, where: str) -> np.ndarray:
    """The validated ``joints3d`` column as a new float32 array ``[rows, 17, 3]`` (finite values only)."""
    column = table.column("joints3d").combine_chunks()
    try:
        flat = column.flatten().flatten().to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, AttributeError) as exc:
        raise DataError(f"{where}: column 'joints3d' is not a [17, 3] float list ({column.type})") from exc
    if len(flat) != len(table) * NUM_JOINTS_3D * 3:
        raise DataError(f"{where}: column 'joints3d' has {len(flat)} values for {len(table)} rows; "
                        f"expected {NUM_JOINTS_3D} joints x 3 per row ({column.type})")
    joints = flat.astype(np.float32).reshape(len(table), NUM_JOINTS_3D, 3)
    finite = np.isfinite(joints).all(axis=(1, 2))
    if not finite.all():
        row = int(np.argmin(finite))
        raise DataError(f"{where}: column 'joints3d' row {row} holds a non-finite value")
    return joints


def read_metadata(path: str | Path) -> dict:
    """The table's ``vipe_ray`` schema metadata (joint names, fps, sources); ``path`` may be a URI."""
    try:
        loc = storage.location(path)
        schema = pq.read_schema(loc.path, filesystem=loc.fs)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return _metadata(schema, path)


def _metadata(schema: pa.Schema, path: str | Path) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: no '{METADATA_KEY.decode()}' schema metadata; convert it with `vipe-ray convert`")
    return json.loads(raw)


def load_table(path: str | Path) -> PoseTable:
    """Read and validate a pose table: a local path or an object-store URI (``s3://bucket/x.parquet``)."""
    where = str(path) if storage.is_uri(path) else str(Path(path))
    try:
        loc = storage.location(path)
        found = loc.exists()
    except storage.StorageError as exc:
        raise DataError(str(exc)) from None
    if not found:
        raise DataError(f"{where}: pose table not found (convert raw motion capture with `vipe-ray convert`)")
    try:
        # One read serves the checksum and the parse (tables are megabytes; an object store is read once).
        data = loc.read_bytes()
        table = pq.read_table(pa.BufferReader(data))
        meta = _metadata(table.schema, where)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{where}: not a readable Parquet file ({exc})") from None
    if tuple(meta.get("joints", ())) != H36M17_JOINTS:
        raise DataError(f"{where}: metadata joints {meta.get('joints')} differ from the Human3.6M-17 profile")
    fps = int(meta.get("fps", 0))
    if fps <= 0 or SOURCE_FPS % fps:
        raise DataError(f"{where}: metadata fps {meta.get('fps')!r} must divide {SOURCE_FPS}")
    subject, clip, frame, joints = table_to_arrays(table, where)
    return PoseTable(subject, clip, frame, joints, fps, hashlib.sha256(data).hexdigest(), where)


def clip_bounds(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by clip: the first and last row index of each row's clip, ``[rows]`` each."""
    change = np.flatnonzero(clip[1:] != clip[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(clip)]]) - 1
    lengths = ends - starts + 1
    return np.repeat(starts, lengths), np.repeat(ends, lengths)


def windows_within(rows: np.ndarray, first: np.ndarray, last: np.ndarray, frames: int, stride: int) -> np.ndarray:
    """Row indices of windows centred on ``rows``, clamped to each row's run ``[first, last]``:
    ``[n] -> [n, frames]``; ``first``/``last`` give every row's bounds (``[rows]``)."""
    offsets = (np.arange(frames) - frames // 2) * stride
    idx = rows[:, None] + offsets[None, :]
    return np.clip(idx, first[rows][:, None], last[rows][:, None])


def window_rows(table: PoseTable, rows: np.ndarray, frames: int, stride: int) -> np.ndarray:
    """Row indices of windows centred on ``rows``: ``[n] -> [n, frames]``, clamped inside each clip."""
    first, last = clip_bounds(table.clip)
    return windows_within(rows, first, last, frames, stride)


def neighbour_rows(rows: np.ndarray, first: np.ndarray, last: np.ndarray, spread: int,
                   generator: torch.Generator) -> np.ndarray:
    """A temporal neighbour of each row: ``[n] -> [n]``, ``rows[i] +- o`` with ``o`` uniform in
    ``1..spread``, clamped to the row's run ``[first, last]`` (a run of one row gives the row itself)."""
    n = len(rows)
    offset = torch.randint(1, spread + 1, (n,), generator=generator).numpy()
    sign = 2 * torch.randint(0, 2, (n,), generator=generator).numpy() - 1
    return np.clip(rows + sign * offset, first[rows], last[rows])


def draw_rows(population: np.ndarray, batch: int, first: np.ndarray, last: np.ndarray, neighbours: int,
              generator: torch.Generator) -> np.ndarray:
    """``batch`` training rows drawn uniformly from ``population`` (``[rows]``, row indices).

    ``neighbours`` > 0: only the first half is drawn at random; the second half holds a temporal neighbour of
    each (:func:`neighbour_rows`), so a batch holds pairs of poses a few frames apart, some of them just
    beyond kappa: hard negatives that random draws from a large table rarely pair.
    """
    drawn = batch if neighbours <= 0 else (batch + 1) // 2
    rows = population[torch.randint(len(population), (drawn,), generator=generator).numpy()]
    if drawn == batch:
        return rows
    return np.concatenate([rows, neighbour_rows(rows[:batch - drawn], first, last, neighbours, generator)])


class WindowSampler:
    """Draws random training windows ``[batch, frames, 17, 3]`` (frames = 1 without temporal embedding);
    ``neighbours`` > 0 pairs each drawn pose with a neighbouring frame of its clip (:func:`draw_rows`)."""

    def __init__(self, table: PoseTable, frames: int = 1, stride: int = 1, neighbours: int = 0):
        if len(table) == 0:
            raise DataError(f"{table.path}: no rows to sample from")
        self.table, self.frames, self.stride, self.neighbours = table, frames, stride, neighbours
        self.joints = torch.from_numpy(table.joints)
        # Once: recomputed at every step they cost ~0.4 ms on the bundled table (as much as drawing the batch),
        # growing with the table.
        self.first, self.last = clip_bounds(table.clip)
        self.all_rows = np.arange(len(table))

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return self.windows(draw_rows(self.all_rows, batch, self.first, self.last, self.neighbours, generator))

    def windows(self, rows: np.ndarray) -> torch.Tensor:
        idx = windows_within(rows, self.first, self.last, self.frames, self.stride)
        return self.joints[torch.from_numpy(idx)]


def evaluation_rows(table: PoseTable, every: int = 24, max_rows: int = 0) -> np.ndarray:
    """Rows used as retrieval queries: source frames that are multiples of ``every`` (24 of 120 Hz = 5 Hz).

    ``max_rows`` > 0 keeps an evenly spaced subset (for quick validation).
    """
    if every % table.frame_step:
        raise DataError(f"{table.path}: eval every {every} source frames is not a multiple of the table's "
                        f"frame step {table.frame_step} ({table.fps} fps)")
    rows = np.flatnonzero(table.frame % every == 0)
    if max_rows and len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(int)]
    return rows
