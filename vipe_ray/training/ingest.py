"""Ray Data ingest for Ray Train workers: what each worker reads from the pose table, and what it holds.

Design:

* **Read.** One Parquet scan; the split's subjects are a row filter pushed into the scan
  (``Dataset.filter(expr=...)`` is folded into the read by Ray Data's optimizer), so rows of other subjects
  never leave the reader (except for tables with row groups too large for pyarrow's filter: see
  :data:`SCAN_FILTER_MAX_ROW_GROUP`).
* **Pieces, mixed.** The scan emits blocks of about :data:`PIECE_ROWS` consecutive table rows (a piece: a
  run of frames of one clip, or the end of one and the start of the next), and the pieces' order is shuffled
  (``randomize_block_order``, reseeded every epoch) before Ray Train's ``streaming_split`` deals them to the
  workers. The shuffle moves block references, not rows. A subject's pieces are thus dealt at random: every
  shard holds pieces of every subject with many more pieces than there are workers, whatever the number of
  workers (contiguous shards of a file sorted by subject gave each worker a few subjects only), and the
  pieces reach a worker in random order, so whatever part of its shard a worker holds is a random sample.
* **Bounded memory.** A worker never collects its shard. A background thread reads the worker's stream
  into a small queue; the :class:`PoseBuffer` holds at most ``data.buffer_rows`` poses (float32 joints
  ``[rows, 17, 3]`` with each row's run bounds, int32: 212 bytes a pose, 3.5 MB for the default 16,384) in
  slots of one piece. Every step swaps about one batch of new poses in for the oldest piece, without waiting
  on the stream, so a pose is drawn about once per pass over the shard, as in epoch-based training; the
  stream restarts (a new Ray Data epoch) when the shard is exhausted. A shard that fits in the buffer is
  read once and the stream closed: nothing is streamed again. ``buffer_rows: 0`` always holds the whole
  shard (one compact copy; loading peaks at twice that). Triplet mining draws its negatives from the batch,
  and every batch is drawn uniformly from the buffer, a random sample of the shard. The reader re-cuts the
  stream into pieces of exactly :data:`PIECE_ROWS` rows (blocks vary in size), so every slot is full.
* **Runs, once.** The rows of a piece that share a clip and follow each other at the table's frame step
  form a run; each row's first and last run row are computed once, when its piece arrives (one vectorized
  comparison of neighbouring rows' clip and frame), and temporal windows are clamped to them: a window never
  bridges two clips, two pieces or a gap.
* **Validation** data (rank 0, a few thousand poses) is collected whole: :func:`dataset_to_table`.

Batches and learning rate: ``optim.batch_size`` is per worker (the reference's batch per worker); a run of N
workers steps on N x batch_size poses (DDP averages the N gradients) and its ``lr`` is not rescaled.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray.data
from ray.data import RandomSeedConfig
from ray.data.expressions import col
import torch

from vipe_ray import log, storage
from vipe_ray.data import SOURCE_FPS, DataError, PoseTable, draw_rows, joints_array, table_to_arrays, windows_within

#: Table rows per piece: the unit of shuffling, dealing to workers and buffer turnover. Windows are clamped
#: at piece ends: at 256 rows a 7-frame window (the default temporal one) is clamped in about 2% of draws.
PIECE_ROWS = 256
#: Bytes of one table row in Arrow (joints 204, frame 4, subject and clip strings): sizes Ray Data's blocks.
ROW_BYTES = 240
#: CPUs of each Ray Data read task: with trials and workers holding most of a small machine, a task that
#: needs a whole CPU never schedules and the training waits on its data forever.
DATA_TASK_CPUS = 0.1
#: Pieces the background thread reads ahead of the buffer.
READ_AHEAD = 8
#: How long closing a shard waits for its reader to leave Ray Data.
CLOSE_TIMEOUT_S = 120.0


#: Row groups up to this many rows get the subject filter inside the Parquet scan. pyarrow 25.0.1 crashes
#: (SIGSEGV) selecting rows of the nested joints column of larger ones -- ``filter`` in the scan or in a Ray
#: task, ``take`` on the slices Ray Data hands a task (a 537,540-row group does, 65,536-row groups do not):
#: such tables select their rows block by block in numpy (:func:`_keep_subjects`).
SCAN_FILTER_MAX_ROW_GROUP = 65536


def largest_row_group(path: str | Path) -> int:
    """Rows of the largest Parquet row group of a table (a file, a directory of files or a URI)."""

    table = storage.location(path)
    sizes = [fragment.metadata.row_group(i).num_rows
             for fragment in pds.dataset(table.path, format="parquet", filesystem=table.fs).get_fragments()
             for i in range(fragment.metadata.num_row_groups)]
    return max(sizes, default=0)


def _keep_subjects(batch: pa.Table, subjects: list[str]) -> pa.Table:
    """The rows of ``subjects``; the joints are selected in numpy, never by an Arrow kernel (see
    :data:`SCAN_FILTER_MAX_ROW_GROUP`)."""
    keep = np.flatnonzero(pc.is_in(batch["subject"], value_set=pa.array(subjects, pa.string()))
                          .to_numpy(zero_copy_only=False))
    if len(keep) == batch.num_rows:
        return batch
    if not len(keep):
        return batch.slice(0, 0)
    column = batch.schema.get_field_index("joints3d")
    field = batch.schema.field(column)
    flat = np.concatenate([chunk.flatten().flatten().to_numpy(zero_copy_only=False)
                           for chunk in batch["joints3d"].chunks]).reshape(batch.num_rows, -1)[keep]
    inner = field.type.value_type
    joints = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), inner.value_type), inner.list_size),
        field.type.list_size)
    rest = batch.remove_column(column).take(pa.array(keep, pa.int64()))
    return rest.add_column(column, field, joints.cast(field.type))


def pose_dataset(path: str | Path, subjects: tuple[str, ...] | list[str], seed: int = 0):
    """A Ray Dataset of the table's rows for ``subjects`` (columns subject, clip, frame, joints3d) in pieces
    of about :data:`PIECE_ROWS` consecutive rows, the pieces in a random order (reseeded every epoch)."""

    if not subjects:
        raise ValueError(f"{path}: no subjects to read")
    table = storage.location(path)
    # The filesystem travels with the read tasks, endpoint included (credentials come from each worker's
    # environment); a local table lets Ray Data pick its own.
    dataset = ray.data.read_parquet(table.path, filesystem=None if table.is_local else table.fs,
                                    num_cpus=DATA_TASK_CPUS)
    if largest_row_group(path) <= SCAN_FILTER_MAX_ROW_GROUP:
        dataset = dataset.filter(expr=col("subject").is_in(list(subjects)))
    else:
        dataset = dataset.map_batches(_keep_subjects, fn_kwargs={"subjects": list(subjects)}, batch_format="pyarrow",
                                      batch_size=None, num_cpus=DATA_TASK_CPUS)
    dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # The dataset carries its own copy of the DataContext (Train copies it again for every shard): these
    # settings leave the caller's global context alone. Blocks of a piece each: the read cuts them to size.
    dataset.context.target_max_block_size = PIECE_ROWS * ROW_BYTES
    # Progress bars of every epoch only spam the worker logs.
    dataset.context.enable_progress_bars = False
    return dataset


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of a shard: ``joints`` ``[rows, 17, 3]`` float32; ``first``/``last`` ``[rows]`` int32,
    each row's run (same clip, consecutive frames) as row indices within the piece."""

    joints: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.joints)


def run_bounds(clip: pa.Array | pa.ChunkedArray, frame: np.ndarray, frame_step: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last row (``[rows]`` int32 each) of every row's run: rows of one clip whose frames follow
    each other by ``frame_step`` source frames. Rows need no order: unordered rows form runs of one."""
    n = len(frame)
    if n == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty
    if isinstance(clip, pa.ChunkedArray):
        clip = clip.combine_chunks()
    same = pc.equal(clip.slice(1), clip.slice(0, n - 1)).fill_null(False).to_numpy(zero_copy_only=False)
    starts_run = np.concatenate([[True], ~(same & (np.diff(frame) == frame_step))])
    starts = np.flatnonzero(starts_run)
    ends = np.concatenate([starts[1:], [n]]) - 1
    run = np.cumsum(starts_run) - 1
    return starts[run].astype(np.int32), ends[run].astype(np.int32)


def to_pieces(batch: pa.Table, frame_step: int, where: str) -> list[Piece]:
    """A batch of table rows as pieces of at most :data:`PIECE_ROWS` rows (validated joints, run bounds)."""
    for name in ("clip", "frame", "joints3d"):
        if name not in batch.column_names:
            raise DataError(f"{where}: missing column {name!r} (has {batch.column_names})")
    out = []
    for start in range(0, batch.num_rows, PIECE_ROWS):
        rows = batch.slice(start, PIECE_ROWS)
        frame = rows.column("frame").to_numpy().astype(np.int64)
        first, last = run_bounds(rows.column("clip"), frame, frame_step)
        out.append(Piece(joints_array(rows, where), first, last))
    return out


class PoseBuffer:
    """The poses a worker draws its training windows from: pieces in slots of :data:`PIECE_ROWS` rows.

    Storage: ``joints`` ``[slots * PIECE_ROWS, 17, 3]`` float32 and each row's run bounds (``first``,
    ``last``, absolute rows); rows past a slot's piece are never drawn. :meth:`replace` puts a new piece in
    the oldest slot.
    """

    def __init__(self, pieces: list[Piece], frames: int = 1, stride: int = 1, neighbours: int = 0):
        if not pieces:
            raise DataError("no poses to draw from")
        self.frames, self.stride, self.neighbours = frames, stride, neighbours
        slots = len(pieces)
        self.joints = np.zeros((slots * PIECE_ROWS, *pieces[0].joints.shape[1:]), np.float32)
        self.first = np.zeros(slots * PIECE_ROWS, np.int32)
        self.last = np.zeros(slots * PIECE_ROWS, np.int32)
        self.lengths = np.zeros(slots, np.int64)
        self._tensor = torch.from_numpy(self.joints)
        self._oldest = 0
        for slot, piece in enumerate(pieces):
            self._put(slot, piece)
        self._index()

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        """Poses held."""
        return len(self._rows)

    def _put(self, slot: int, piece: Piece) -> None:
        base, n = slot * PIECE_ROWS, len(piece)
        self.joints[base:base + n] = piece.joints
        self.first[base:base + n] = base + piece.first
        self.last[base:base + n] = base + piece.last
        self.lengths[slot] = n

    def _index(self) -> None:
        # The rows that hold a pose, slot by slot: rebuilt on each change (slots are few).
        self._rows = np.concatenate([s * PIECE_ROWS + np.arange(n) for s, n in enumerate(self.lengths)])

    def replace(self, pieces: list[Piece]) -> None:
        """Put ``pieces`` in the oldest slots."""
        for piece in pieces:
            self._put(self._oldest, piece)
            self._oldest = (self._oldest + 1) % self.slots
        if pieces:
            self._index()

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` windows ``[batch, frames, 17, 3]`` centred on poses drawn uniformly from the buffer
        (``neighbours`` > 0: half of them, each paired with a neighbouring frame; see ``data.draw_rows``)."""
        rows = draw_rows(self._rows, batch, self.first, self.last, self.neighbours, generator)
        idx = windows_within(rows, self.first, self.last, self.frames, self.stride)
        return self._tensor[torch.from_numpy(idx)]


_EPOCH_END = object()


def _calls_into_ray(thread: threading.Thread) -> bool:
    """A Ray Data (2.60) thread that may call into Ray after its iteration was closed: the pipeline's worker,
    and in local mode the execution engine and its metadata fetcher. Not the block prefetcher: after an early
    close it idles until garbage collection and never ends on its own."""
    return (thread.name in ("iter_threaded", "ray-data-metadata-prefetch")
            or thread.name.startswith("StreamingExecutor-"))


class _Reader(threading.Thread):
    """Reads a Ray Data iterator into a bounded queue of pieces, ``_EPOCH_END`` after each epoch. After the
    first epoch it waits for :meth:`stream_on` (read more epochs) or :meth:`stop`."""

    def __init__(self, iterator, frame_step: int, where: str):
        super().__init__(name="vipe-ray-ingest", daemon=True)
        self.iterator, self.frame_step, self.where = iterator, frame_step, where
        self.queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self.error: BaseException | None = None
        self._halt, self._more = threading.Event(), threading.Event()
        #: Ray Data's threads that started while this reader iterated (see :meth:`join_helpers`).
        self.helpers: list[threading.Thread] = []

    def stop(self) -> None:
        self._halt.set()

    def join_helpers(self, timeout: float) -> list[threading.Thread]:
        """Wait for the Ray Data threads that started while this reader iterated; returns those still alive
        after ``timeout``.

        Closing an iteration early only signals Ray Data's threads (the pipeline's ``iter_threaded``; in
        local mode the execution engine too): each finishes the step it is in first. One still calling
        into Ray when the driver shuts Ray down makes Ray's core worker exit the whole process with status
        1 (seen in local mode, where the training loop runs in the driver).
        """
        deadline = time.monotonic() + timeout
        for thread in self.helpers:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in self.helpers if t.is_alive()]

    def _iterate(self):
        """One epoch's batches; the Ray Data threads that start meanwhile are recorded in ``helpers``."""
        self.helpers = [t for t in self.helpers if t.is_alive()]
        before = set(threading.enumerate())
        batches = iter(self.iterator.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            first = True
            for batch in batches:
                if first:  # the pipeline's threads exist once the first batch is out
                    self._record_helpers(before)
                    first = False
                yield batch
        finally:
            # Closing ends this epoch's iteration now, not at garbage collection: Ray Data then shuts its
            # execution down and releases the cluster resources it holds for it.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            self._record_helpers(before)

    def _record_helpers(self, before: set[threading.Thread]) -> None:
        known = set(self.helpers)
        self.helpers += [t for t in threading.enumerate()
                         if t not in before and t not in known and _calls_into_ray(t)]

    def stream_on(self) -> None:
        self._more.set()

    def _put(self, item) -> bool:
        while not self._halt.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            epoch = 0
            while True:
                # A shard that fits in the buffer is read once: a second epoch waits for the verdict.
                while epoch and not (self._more.is_set() or self._halt.is_set()):
                    self._more.wait(0.1)
                if self._halt.is_set():
                    return
                batches = self._iterate()
                try:
                    # Whole pieces of the stream, whatever the blocks' sizes: a slot of the buffer holds one.
                    pending = None
                    for batch in batches:
                        pending = batch if pending is None else pa.concat_tables([pending, batch])
                        whole = pending.num_rows - pending.num_rows % PIECE_ROWS
                        for piece in to_pieces(pending.slice(0, whole), self.frame_step, self.where):
                            if not self._put(piece):
                                return
                        pending = pending.slice(whole)
                    if pending is not None and pending.num_rows:
                        for piece in to_pieces(pending, self.frame_step, self.where):
                            if not self._put(piece):
                                return
                finally:
                    batches.close()
                epoch += 1
                if not self._put(_EPOCH_END):
                    return
        except BaseException as exc:  # handed to the training loop, which raises it
            self.error = exc
            self._put(_EPOCH_END)


class StreamedShard:
    """A worker's training data: a :class:`PoseBuffer` filled from its Ray Data shard and kept fresh.

    ``capacity`` poses at most (0: the whole shard). The constructor blocks until the buffer is full or
    the shard is exhausted (then the whole shard is held and the stream closed); afterwards
    :meth:`sample` never waits on the stream. Call :meth:`close` when training ends.
    """

    def __init__(self, iterator, capacity: int, batch: int, frames: int = 1, stride: int = 1,
                 fps: int = 30, where: str = "worker shard", neighbours: int = 0):
        if capacity < 0:
            raise ValueError(f"buffer capacity {capacity} must be >= 0 (0 = the whole shard)")
        self.where, self.capacity = where, capacity
        # Pieces to swap in per step: about one batch of poses (see the module docstring).
        self._per_step = batch / PIECE_ROWS
        self._credit = 0.0
        self.pieces_read = 0
        self.epochs = 0
        self._reader = _Reader(iterator, SOURCE_FPS // fps, where)
        self._reader.start()
        pieces: list[Piece] = []
        rows = 0
        item = None
        try:
            while capacity == 0 or rows < capacity:
                item = self._take(block=True)
                if item is _EPOCH_END:
                    break
                pieces.append(item)
                rows += len(item)
        except BaseException:
            self.close()  # the caller never gets a shard to close
            raise
        self.complete = item is _EPOCH_END  # the whole shard is in the buffer
        if not pieces:
            self.close()
            raise DataError(f"{where}: this worker's data shard is empty; use fewer workers or more subjects")
        if self.complete:
            self.close()
        else:
            self._reader.stream_on()
        self.buffer = PoseBuffer(pieces, frames, stride, neighbours)

    def _take(self, block: bool):
        """The next piece or ``_EPOCH_END`` from the reader; None when nothing is queued (``block`` False)."""
        while True:
            try:
                item = self._reader.queue.get(timeout=1.0) if block else self._reader.queue.get_nowait()
            except queue.Empty:
                self._raise_if_failed()
                if not block:
                    return None
                if not self._reader.is_alive():
                    raise DataError(f"{self.where}: the data stream ended before the buffer was filled")
                continue
            if item is _EPOCH_END:
                self._raise_if_failed()
                self.epochs += 1
            else:
                self.pieces_read += 1
            return item

    def _raise_if_failed(self) -> None:
        error = self._reader.error
        if error is not None:
            raise DataError(f"{self.where}: reading the data shard failed: {error}") from error

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Swap in the pieces that arrived (up to about a batch of poses per call), then draw ``batch``
        windows ``[batch, frames, 17, 3]`` from the buffer."""
        if not self.complete:
            self._credit = min(self._credit + self._per_step, self.buffer.slots)
            fresh = []
            while self._credit >= 1.0:
                item = self._take(block=False)
                if item is None:
                    break
                if item is not _EPOCH_END:
                    fresh.append(item)
                    self._credit -= 1.0
            self.buffer.replace(fresh)
        return self.buffer.sample(batch, generator)

    def stats(self) -> dict[str, float]:
        """Report metrics: poses held, pieces read from the stream, Ray Data epochs completed."""
        return {"data_buffer_rows": float(len(self.buffer)), "data_pieces_read": float(self.pieces_read),
                "data_epochs": float(self.epochs)}

    def close(self) -> None:
        """Stop the background reader (its iteration ends and Ray Data's execution with it).

        Waits for it: a reader still inside Ray Data when the caller shuts Ray down can make Ray's core
        worker exit the whole process (local mode runs the training loop in the driver), and on a loaded
        2-core machine its reader was seen still shutting Ray Data's execution down after the old 10 s wait.
        """
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        self._reader.stop()
        self._reader.join(timeout=CLOSE_TIMEOUT_S)
        if self._reader.is_alive():
            log(f"{self.where}: the data reader did not stop within {CLOSE_TIMEOUT_S:.0f} s")
            return
        left = self._reader.join_helpers(max(0.0, deadline - time.monotonic()))
        if left:
            log(f"{self.where}: {len(left)} Ray Data thread(s) still running {CLOSE_TIMEOUT_S:.0f} s after close")


def dataset_to_table(iterator, path: str, fps: int, checksum: str) -> PoseTable:
    """Collect a Ray Data iterator (validation rows) into a :class:`PoseTable` sorted by (subject, clip,
    frame): each batch becomes compact arrays at once, then one concatenation and one reordering."""
    parts = [table_to_arrays(b, f"{path} (worker shard)")
             for b in iterator.iter_batches(batch_format="pyarrow", batch_size=None)]
    if not parts:
        raise DataError(f"{path}: this worker's data shard is empty; use fewer workers or more subjects")
    subject, clip, frame, joints = (np.concatenate([p[i] for p in parts]) for i in range(4))
    del parts
    order = np.lexsort((frame, clip, subject))
    subject, clip, frame, joints = subject[order], clip[order], frame[order], joints[order]
    return PoseTable(subject, _split_at_gaps(clip, frame, SOURCE_FPS // fps), frame, joints, fps, checksum, path)


def _split_at_gaps(clip: np.ndarray, frame: np.ndarray, frame_step: int) -> np.ndarray:
    """Clip names with every run of consecutive frames as its own clip (``name#1``, ``name#2`` ... after gaps).

    A shard can hold pieces of one clip with a gap between them; temporal windows are clamped to clip bounds
    and must not bridge such a gap.
    """
    same = clip[1:] == clip[:-1]
    gap = same & (np.diff(frame) != frame_step)
    if not gap.any():
        return clip
    clip_start = np.concatenate([[True], ~same])
    pieces = np.cumsum(clip_start | np.concatenate([[False], gap]))
    first_row = np.maximum.accumulate(np.where(clip_start, np.arange(len(clip)), 0))
    ordinal = pieces - pieces[first_row]
    return np.asarray([c if k == 0 else f"{c}#{k}" for c, k in zip(clip.tolist(), ordinal.tolist())])
