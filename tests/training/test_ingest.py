"""Ray Data ingest (``vipe_ray.training.ingest``): pieces, runs, the bounded buffer, and real Ray Data shards.

The Ray tests share one local 2-CPU cluster (or the session's) and read the bundled table.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import local_ray
import torch

from vipe_ray.prvipe import matching
from vipe_ray.config import load_config
from vipe_ray.data import load_table
from vipe_ray.training.ingest import (PIECE_ROWS, SCAN_FILTER_MAX_ROW_GROUP, PoseBuffer, StreamedShard, _keep_subjects,
                             largest_row_group, pose_dataset, run_bounds, to_pieces)

# Integration tests (Ray Data on a local Ray): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

TRAIN = ["01", "02", "05", "16", "49", "93", "105"]


@pytest.fixture(scope="module")
def table():
    return load_table(load_config().data.table_path())


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module (reused if the session already started one)."""
    with local_ray() as ray:
        yield ray


def _keys(table: pa.Table) -> list[str]:
    return [f"{c}:{f}" for c, f in zip(table["clip"].to_pylist(), table["frame"].to_pylist())]


# --- pieces and runs -------------------------------------------------------------------------------------


def test_runs_end_at_clip_changes_and_frame_gaps():
    clip = pa.array(["a", "a", "a", "a", "b", "b", "a"])
    frame = np.array([0, 4, 8, 16, 0, 4, 20])  # a gap (8 -> 16), a new clip, "a" again
    first, last = run_bounds(clip, frame, frame_step=4)
    assert first.tolist() == [0, 0, 0, 3, 4, 4, 6]
    assert last.tolist() == [2, 2, 2, 3, 5, 5, 6]
    assert first.dtype == np.int32
    empty = run_bounds(pa.array([], pa.string()), np.zeros(0, np.int64), 4)
    assert [len(a) for a in empty] == [0, 0]


def test_batches_become_pieces_of_validated_float32_joints(table):
    rows = pq.read_table(table.path).slice(0, PIECE_ROWS + 10)
    pieces = to_pieces(rows, frame_step=table.frame_step, where="t")
    assert [len(p) for p in pieces] == [PIECE_ROWS, 10]
    assert pieces[0].joints.dtype == np.float32 and pieces[0].joints.shape == (PIECE_ROWS, 17, 3)
    np.testing.assert_array_equal(pieces[1].joints, table.joints[PIECE_ROWS:PIECE_ROWS + 10])
    from vipe_ray.data import DataError

    with pytest.raises(DataError, match="t: missing column 'clip'"):
        to_pieces(rows.drop_columns(["clip"]), 4, "t")


def test_subjects_are_selected_in_numpy_from_sliced_chunked_batches(table):
    raw = pq.read_table(table.path)
    batch = pa.concat_tables([raw.slice(1000, 3000), raw.slice(20000, 5000)])  # two chunks, both offset
    out = _keep_subjects(batch, ["05", "93"])
    expected = batch.combine_chunks()
    expected = expected.filter(pa.compute.is_in(expected["subject"], value_set=pa.array(["05", "93"])))
    assert out.schema == batch.schema and out.num_rows == expected.num_rows > 0
    assert out.to_pylist() == expected.to_pylist()


# --- the buffer ------------------------------------------------------------------------------------------


def _pieces(table, start: int, count: int, size: int = PIECE_ROWS):
    raw = pq.read_table(table.path)
    return [to_pieces(raw.slice(start + i * size, size), table.frame_step, "t")[0] for i in range(count)]


def test_buffer_windows_stay_inside_runs_and_pieces(table):
    pieces = _pieces(table, 0, 4, size=100)  # slots of PIECE_ROWS rows, 100 used each
    buffer = PoseBuffer(pieces, frames=5, stride=2)
    assert len(buffer) == 400 and buffer.slots == 4
    assert buffer.joints.nbytes == 4 * PIECE_ROWS * 17 * 3 * 4
    windows = buffer.sample(64, torch.Generator().manual_seed(0))
    assert windows.shape == (64, 5, 17, 3)
    # Every window is a run of one piece's rows (clamped at its ends): find its centre among the pieces.
    flat = np.concatenate([p.joints for p in pieces])
    first = np.concatenate([i * 100 + p.first for i, p in enumerate(pieces)])
    last = np.concatenate([i * 100 + p.last for i, p in enumerate(pieces)])
    for window in windows.numpy():
        centre = int(np.flatnonzero((flat == window[2]).all(axis=(1, 2)))[0])
        expected = np.clip(centre + np.array([-4, -2, 0, 2, 4]), first[centre], last[centre])
        np.testing.assert_array_equal(window, flat[expected])


def test_buffer_pairs_poses_with_neighbours_of_their_run(table):
    pieces = _pieces(table, 0, 2, size=100)
    buffer = PoseBuffer(pieces, neighbours=5)
    windows = buffer.sample(64, torch.Generator().manual_seed(0))[:, 0].numpy()
    flat = np.concatenate([p.joints for p in pieces])
    first = np.concatenate([i * 100 + p.first for i, p in enumerate(pieces)])
    where = [int(np.flatnonzero((flat == w).all(axis=(1, 2)))[0]) for w in windows]
    for centre, partner in zip(where[:32], where[32:]):
        assert first[partner] == first[centre] and abs(partner - centre) <= 5


def test_buffer_replaces_its_oldest_piece(table):
    old, new = _pieces(table, 0, 3), _pieces(table, 3 * PIECE_ROWS, 2)
    buffer = PoseBuffer(old)
    buffer.replace(new[:1])
    np.testing.assert_array_equal(buffer.joints[:PIECE_ROWS], new[0].joints)
    np.testing.assert_array_equal(buffer.joints[PIECE_ROWS:2 * PIECE_ROWS], old[1].joints)
    buffer.replace(new[1:])
    np.testing.assert_array_equal(buffer.joints[PIECE_ROWS:2 * PIECE_ROWS], new[1].joints)
    assert len(buffer) == 3 * PIECE_ROWS


# --- real Ray Data ---------------------------------------------------------------------------------------


@pytest.mark.timeout(180, func_only=True)
def test_subjects_are_filtered_in_the_scan_and_every_shard_mixes_subjects(ray_cluster, table):
    dataset = pose_dataset(table.path, TRAIN)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dataset.explain()
    optimized = out.getvalue().split("Logical Plan (Optimized)")[1].split("Physical Plan")[0]
    assert "ReadFiles" in optimized and "Filter" not in optimized, out.getvalue()

    # Two consumers of streaming_split(2, equal=True), as Ray Train's DataConfig deals shards.
    splits = dataset.streaming_split(2, equal=True)
    shards: dict[int, list[pa.Table]] = {}

    def consume(i: int) -> None:
        shards[i] = list(splits[i].iter_batches(batch_size=None, batch_format="pyarrow"))

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert sorted(shards) == [0, 1]
    keys = [set(_keys(pa.concat_tables(shards[i]))) for i in (0, 1)]
    assert not keys[0] & keys[1], "shards overlap"
    expected = table.select(TRAIN)
    wanted = {f"{c}:{f}" for c, f in zip(expected.clip.tolist(), expected.frame.tolist())}
    assert keys[0] | keys[1] <= wanted and len(wanted - (keys[0] | keys[1])) <= 1  # equal=True may drop 1
    assert max(b.num_rows for i in (0, 1) for b in shards[i]) <= 2 * PIECE_ROWS
    # Subjects of 10+ pieces reach both workers (a contiguous split gave each worker a few subjects).
    counts = {s: int((expected.subject == s).sum()) for s in TRAIN}
    big = {s for s, n in counts.items() if n >= 10 * PIECE_ROWS}
    assert big == {"01", "05", "16", "49", "105"}
    for i in (0, 1):
        assert big <= set(pa.concat_tables(shards[i])["subject"].to_pylist())


@pytest.mark.timeout(180, func_only=True)
def test_a_bounded_shard_keeps_streaming_and_a_small_one_is_read_once(ray_cluster, table):
    generator = torch.Generator().manual_seed(0)
    shard = StreamedShard(pose_dataset(table.path, TRAIN).iterator(), capacity=4 * PIECE_ROWS,
                          batch=PIECE_ROWS, frames=3)
    try:
        assert not shard.complete
        assert len(shard.buffer) == 4 * PIECE_ROWS and shard.buffer.slots == 4  # whole pieces of the stream
        before, slots = shard.pieces_read, shard.buffer.slots
        # Sampling never waits on the stream: keep drawing until more than one pass went through, and the
        # pass's last, partial piece has left the buffer again.
        per_pass = -(-len(table.select(TRAIN)) // PIECE_ROWS)
        while not (shard.epochs >= 1 and shard.pieces_read > before + per_pass + slots):
            assert shard.sample(16, generator).shape == (16, 3, 17, 3)
            time.sleep(0.005)
        assert shard.buffer.slots == slots and len(shard.buffer) == 4 * PIECE_ROWS, "the buffer never grows"
    finally:
        shard.close()
    assert not shard._reader.is_alive()
    # Ray Data's pipeline threads of the closed iterations are done too: one still calling into Ray when
    # the driver shuts Ray down exits the whole process (local mode trains in the driver).
    names = {t.name for t in shard._reader.helpers}
    assert "iter_threaded" in names, f"the reader records Ray Data's threads: {names}"
    assert not [t for t in shard._reader.helpers if t.is_alive()]

    whole = StreamedShard(pose_dataset(table.path, ["02", "93"]).iterator(), capacity=0, batch=8)
    assert whole.complete and len(whole.buffer) == 205 + 101 and whole.stats()["data_epochs"] == 1
    assert not whole._reader.is_alive(), "the stream of a shard held whole is closed"
    fits = StreamedShard(pose_dataset(table.path, ["02", "93"]).iterator(), capacity=4096, batch=8, neighbours=3)
    assert fits.complete and len(fits.buffer) == 306 and fits.buffer.neighbours == 3
    # Poses 4..7 are neighbours of poses 0..3: a few frames apart, closer than another pair of the batch.
    pairs = fits.sample(8, torch.Generator().manual_seed(0))[:, 0]
    assert (matching.np_mpjpe(pairs[:4], pairs[4:]) < matching.np_mpjpe(pairs[:4], pairs[4:].roll(1, 0))).all()


@pytest.mark.timeout(180, func_only=True)
def test_a_shard_that_fails_while_filling_names_where_and_stops_reading(ray_cluster, table):
    import ray.data

    from vipe_ray.data import DataError

    rows = pq.read_table(table.path).slice(0, 4 * PIECE_ROWS).drop_columns(["clip"])
    threads = set(threading.enumerate())
    failed = r"bad\.parquet \(rank 0 of 1\): reading the data shard failed: .*missing column 'clip'"
    with pytest.raises(DataError, match=failed):
        StreamedShard(ray.data.from_arrow(rows).iterator(), capacity=2 * PIECE_ROWS, batch=8,
                      where="bad.parquet (rank 0 of 1)")
    # The constructor closed what it started: no reader, and no Ray Data thread that could call into Ray.
    left = [t for t in set(threading.enumerate()) - threads if t.name in ("vipe-ray-ingest", "iter_threaded")]
    assert not left, left


@pytest.mark.timeout(240, func_only=True)
def test_a_table_with_a_large_row_group_is_read_without_crashing(ray_cluster, table, tmp_path):
    """pyarrow 25.0.1 segfaults selecting rows of the joints column of a large row group (Ray retries the
    read task forever): 10 copies of the table in one row group take the numpy path and read in full."""
    raw = pq.read_table(table.path)
    copies = [raw.set_column(1, "clip", pa.array([f"{c}~{k}" for c in raw["clip"].to_pylist()])) for k in range(10)]
    path = tmp_path / "x10.parquet"
    pq.write_table(pa.concat_tables(copies).replace_schema_metadata(raw.schema.metadata), path,
                   row_group_size=10 * len(raw))
    assert largest_row_group(path) == 10 * len(raw) > SCAN_FILTER_MAX_ROW_GROUP
    assert largest_row_group(table.path) <= SCAN_FILTER_MAX_ROW_GROUP, "the bundled table is filtered in the scan"
    rows = sum(b.num_rows for b in pose_dataset(path, TRAIN).iter_batches(batch_size=None, batch_format="pyarrow"))
    assert rows == 10 * len(table.select(TRAIN))
