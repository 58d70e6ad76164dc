"""Pose tables: reading, validation errors, splits, windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vipe_ray.config import load_config
from vipe_ray.data import DataError, WindowSampler, clip_bounds, draw_rows, load_table, neighbour_rows, window_rows

import torch


@pytest.fixture(scope="module")
def table():
    return load_table(load_config().data.table_path())


def test_bundled_table(table):
    assert len(table) == 65467 and table.fps == 30
    assert table.joints.shape == (65467, 17, 3) and table.joints.dtype == np.float32
    assert table.subjects == ["01", "02", "03", "05", "06", "07", "08", "09", "10", "105", "11", "12", "13", "131",
                              "16", "17", "29", "35", "49", "93"]
    assert (table.frame % 4 == 0).all(), "30 fps keeps every 4th frame of the 120 Hz source"


def test_select_and_unknown_subject(table):
    sub = table.select(["02", "93"])
    assert set(sub.subject.tolist()) == {"02", "93"} and len(sub) == 205 + 101
    with pytest.raises(DataError, match=r"\['77'\] not in the table"):
        table.select(["77"])


def test_windows_stay_inside_their_clip(table):
    sub = table.select(["02"])
    first, last = clip_bounds(sub.clip)
    rows = np.array([first[0], first[0] + 1, last[0]])
    idx = window_rows(sub, rows, frames=5, stride=2)
    assert idx.shape == (3, 5)
    assert (sub.clip[idx] == sub.clip[rows][:, None]).all()
    assert list(idx[0]) == [first[0]] * 3 + [first[0] + 2, first[0] + 4]
    windows = WindowSampler(sub, frames=5, stride=2).sample(8, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 5, 17, 3)


def test_neighbours_are_a_few_frames_away_in_the_same_clip(table):
    sub = table.select(["02", "93"])
    first, last = clip_bounds(sub.clip)
    rows = np.arange(len(sub))
    partner = neighbour_rows(rows, first, last, 3, torch.Generator().manual_seed(0))
    assert (sub.clip[partner] == sub.clip).all()
    gap = np.abs(partner - rows)
    inside = (rows - 3 >= first) & (rows + 3 <= last)  # rows whose neighbours are never clamped
    assert set(gap[inside].tolist()) == {1, 2, 3}
    # At a clip's ends the neighbour is clamped to the clip (never past it).
    assert ((partner >= first) & (partner <= last)).all()


def test_a_batch_of_neighbour_pairs(table):
    sub = table.select(["02", "93"])
    first, last = clip_bounds(sub.clip)
    population = np.arange(len(sub))
    rows = draw_rows(population, 9, first, last, 4, torch.Generator().manual_seed(1))
    assert rows.shape == (9,)
    # Five drawn poses; the last four paired with a neighbour of the first four.
    assert (sub.clip[rows[5:]] == sub.clip[rows[:4]]).all() and (np.abs(rows[5:] - rows[:4]) <= 4).all()
    # Without neighbours, the draw is the plain uniform one (runs without them reproduce as before).
    plain = draw_rows(population, 9, first, last, 0, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(plain, torch.randint(len(sub), (9,), generator=torch.Generator().manual_seed(1)))
    windows = WindowSampler(sub, neighbours=4).sample(9, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(windows[:, 0].numpy(), sub.joints[rows])


def _write(tmp_path, table, metadata):
    path = tmp_path / "bad.parquet"
    pq.write_table(table.replace_schema_metadata({b"vipe_ray": json.dumps(metadata)}), path)
    return path


def _good_meta():
    from vipe_ray.prvipe.keypoints import H36M17_JOINTS

    return {"joints": list(H36M17_JOINTS), "fps": 30}


def test_bad_tables_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "missing.parquet")
    joints = np.zeros((2, 16, 3), dtype=np.float32).tolist()
    wrong_count = pa.table({"subject": ["01", "01"], "clip": ["a", "a"], "frame": [0, 4],
                            "joints3d": pa.array(joints, pa.list_(pa.list_(pa.float32(), 3)))})
    with pytest.raises(DataError, match="joints3d.*expected 17 joints"):
        load_table(_write(tmp_path, wrong_count, _good_meta()))
    values = np.ones((2, 17, 3), dtype=np.float32)
    values[1, 4, 2] = np.nan
    nan = pa.table({"subject": ["01", "01"], "clip": ["a", "a"], "frame": [0, 4],
                    "joints3d": pa.array(values.tolist(), pa.list_(pa.list_(pa.float32(), 3), 17))})
    with pytest.raises(DataError, match="row 1 holds a non-finite"):
        load_table(_write(tmp_path, nan, _good_meta()))
    with pytest.raises(DataError, match="fps"):
        load_table(_write(tmp_path, nan, {**_good_meta(), "fps": 7}))
    plain = tmp_path / "plain.parquet"
    pq.write_table(nan.replace_schema_metadata({}), plain)
    with pytest.raises(DataError, match="vipe-ray convert"):
        load_table(plain)
