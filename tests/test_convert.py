"""Tests for vipe_ray.mocap.convert (raw directory -> Parquet table)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vipe_ray.mocap import H36M17_JOINTS, MocapFormatError
from vipe_ray.mocap import convert as convert_mod
from vipe_ray.mocap.convert import convert_directory

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "cmu-mini"
COMMITTED = REPO / "data" / "cmu_h36m17_30fps.parquet"
SHARED = Path(__file__).parents[2] / "shared" / "data" / "cmu-mocap"

JOINTS3D_TYPE = pa.list_(pa.list_(pa.float32(), 3), 17)


def meta_of(table):
    return json.loads(table.schema.metadata[b"vipe_ray"])


def joints(table):
    return np.asarray(table.column("joints3d").combine_chunks().flatten().flatten()).reshape(-1, 17, 3)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dir_listing(d):
    return sorted(p.name for p in Path(d).iterdir())


@pytest.fixture(scope="module")
def fixture_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "mini.parquet"
    messages = []
    summary = convert_directory(FIXTURES, out, fps=30, progress=messages.append)
    return summary, pq.read_table(out), messages, out


def test_fixture_conversion_schema_and_rows(fixture_table):
    summary, t, messages, out = fixture_table
    assert t.schema.names == ["subject", "clip", "frame", "joints3d"]
    assert t.schema.field("subject").type == pa.string() and t.schema.field("clip").type == pa.string()
    assert t.schema.field("frame").type == pa.int32()
    assert t.schema.field("joints3d").type == JOINTS3D_TYPE
    # 02_03: 173 frames at 120 Hz -> frames 0, 4, ..., 172 (44 rows); BVH: 40 lines, T-pose
    # line 0 dropped -> 4, 8, ..., 36 (9 rows)
    assert t.num_rows == 44 + 9
    assert summary["rows"] == 53 and summary["clips"] == 2 and summary["subjects"] == 2
    assert summary["rows_per_subject"] == {"01": 9, "02": 44}
    assert summary["seconds"] >= 0 and summary["bytes"] == out.stat().st_size
    subj, clip, frame = (t.column(c).to_pylist() for c in ("subject", "clip", "frame"))
    assert subj == ["01"] * 9 + ["02"] * 44
    assert clip == ["01_01"] * 9 + ["02_03"] * 44
    assert frame == list(range(4, 40, 4)) + list(range(0, 173, 4))
    j = joints(t)
    assert j.dtype == np.float32 and np.isfinite(j).all()
    # z up, metres: pelvis about 1 m above the floor, head above pelvis
    assert (0.8 < j[:, 0, 2]).all() and (j[:, 0, 2] < 1.2).all()
    assert (j[:, 10, 2] > j[:, 0, 2]).all()
    assert len(messages) == 3 and messages[0].startswith("subjects/02/02_03.amc") and messages[1].startswith("bvh/01_01.bvh")


def test_fixture_metadata(fixture_table):
    _, t, _, _ = fixture_table
    raw = t.schema.metadata[b"vipe_ray"]
    meta = json.loads(raw)
    assert raw.decode() == json.dumps(meta, sort_keys=True)
    assert meta["format_version"] == 1 and meta["fps"] == 30 and meta["source_fps"] == 120
    assert meta["joints"] == list(H36M17_JOINTS) and len(meta["joints"]) == 17
    assert meta["joints"][:4] == ["pelvis", "r_hip", "r_knee", "r_ankle"]
    assert meta["units"] == "metres"
    assert meta["axes"] == "right-handed, z up; X = x_cmu, Y = -z_cmu, Z = y_cmu"
    assert meta["sources"] == {
        rel: sha256(FIXTURES / rel)
        for rel in ("bvh/01_01.bvh", "subjects/02/02.asf", "subjects/02/02_03.amc")
    }
    assert "/work" not in raw.decode() and str(FIXTURES) not in raw.decode()


def test_fixture_rows_equal_committed_table(fixture_table):
    _, t, _, _ = fixture_table
    committed = pq.read_table(COMMITTED)
    mask = np.asarray(committed.column("clip").to_pylist()) == "02_03"
    expected = committed.filter(pa.array(mask))
    mine = t.filter(pa.array(np.asarray(t.column("clip").to_pylist()) == "02_03"))
    assert expected.num_rows == 44
    assert mine.select(["subject", "clip", "frame"]).equals(expected.select(["subject", "clip", "frame"]))
    np.testing.assert_array_equal(joints(mine), joints(expected))  # float-equal
    # the committed BVH rows start with the fixture's 9 rows (same first 40 lines)
    bvh = committed.filter(pa.array(np.asarray(committed.column("clip").to_pylist()) == "01_01"))
    np.testing.assert_array_equal(joints(bvh)[:9], joints(t)[:9])
    assert bvh.column("frame").to_pylist()[:9] == t.column("frame").to_pylist()[:9]


def test_deterministic_and_fps_120(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    convert_directory(FIXTURES, a, fps=30, progress=None)
    convert_directory(FIXTURES, b, fps=30, progress=None)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.parquet"
    s = convert_directory(FIXTURES, c, fps=120, progress=None)
    t = pq.read_table(c)
    assert s["rows"] == 173 + 39 and meta_of(t)["fps"] == 120
    assert t.column("frame").to_pylist() == list(range(1, 40)) + list(range(173))
    # 30 fps rows are exactly every 4th 120 fps row
    t30 = pq.read_table(a)
    j120 = joints(t)
    f120 = np.asarray(t.column("frame").to_pylist())
    keep = f120 % 4 == 0
    np.testing.assert_array_equal(j120[keep], joints(t30))


@pytest.mark.parametrize("fps", [7, 0, -30, 50, 240, 30.0, "30", True])
def test_fps_validation(tmp_path, fps):
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError) as ei:
        convert_directory(FIXTURES, out, fps=fps, progress=None)
    assert repr(fps) in str(ei.value) and "120" in str(ei.value)
    assert dir_listing(tmp_path) == []


def test_crlf_copy_converts_identically(tmp_path, fixture_table):
    _, t, _, _ = fixture_table
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES, raw)
    for p in list(raw.rglob("*.asf")) + list(raw.rglob("*.amc")) + list(raw.rglob("*.bvh")):
        p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    out = tmp_path / "crlf.parquet"
    convert_directory(raw, out, progress=None)
    t2 = pq.read_table(out)
    assert t2.select(["subject", "clip", "frame"]).equals(t.select(["subject", "clip", "frame"]))
    np.testing.assert_array_equal(joints(t2), joints(t))
    assert meta_of(t2)["sources"] != meta_of(t)["sources"]  # hashes of the bytes actually read


def _broken_raw(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES, raw)
    amc = raw / "subjects" / "02" / "02_03.amc"
    lines = amc.read_text().splitlines(keepends=True)
    k = next(i for i, l in enumerate(lines) if l.startswith("lfemur "))
    lines[k] = lines[k].replace("lfemur", "lfemurx")
    amc.write_text("".join(lines))
    return raw, k + 1


def test_failing_conversion_leaves_nothing(tmp_path):
    raw, line = _broken_raw(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(MocapFormatError) as ei:
        convert_directory(raw, outdir / "t.parquet", progress=None)
    assert str(ei.value) == f"subjects/02/02_03.amc:{line}: bone 'lfemurx' not in skeleton 02.asf"
    assert dir_listing(outdir) == []


def test_failing_conversion_keeps_existing_output(tmp_path):
    raw, _ = _broken_raw(tmp_path)
    out = tmp_path / "t.parquet"
    convert_directory(FIXTURES, out, progress=None)
    before = out.read_bytes()
    with pytest.raises(MocapFormatError):
        convert_directory(raw, out, progress=None)
    assert out.read_bytes() == before
    assert dir_listing(tmp_path) == ["raw", "t.parquet"]


def test_failure_while_writing_removes_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "t.parquet"
    out.write_bytes(b"previous content")

    def half_write(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(convert_mod.pq, "write_table", half_write)
    with pytest.raises(OSError, match="simulated"):
        convert_directory(FIXTURES, out, progress=None)
    assert out.read_bytes() == b"previous content"
    assert dir_listing(tmp_path) == ["t.parquet"]


def test_bad_raw_dirs(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_directory(tmp_path / "missing", tmp_path / "o.parquet", progress=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no subjects"):
        convert_directory(tmp_path / "empty", tmp_path / "o.parquet", progress=None)
    raw = tmp_path / "noasf"
    (raw / "subjects" / "02").mkdir(parents=True)
    shutil.copy(FIXTURES / "subjects/02/02_03.amc", raw / "subjects/02/")
    with pytest.raises(MocapFormatError, match="subjects/02/02.asf"):
        convert_directory(raw, tmp_path / "o.parquet", progress=None)
    assert not (tmp_path / "o.parquet").exists()


def test_bvh_only_directory(tmp_path):
    raw = tmp_path / "raw" / "nested"
    raw.mkdir(parents=True)
    shutil.copy(FIXTURES / "bvh" / "01_01.bvh", raw / "01_01.bvh")
    s = convert_directory(tmp_path / "raw", tmp_path / "o.parquet", progress=None)
    t = pq.read_table(tmp_path / "o.parquet")
    assert s["rows"] == 9 and set(t.column("subject").to_pylist()) == {"01"}
    assert list(meta_of(t)["sources"]) == ["nested/01_01.bvh"]


def test_committed_table_contract():
    t = pq.read_table(COMMITTED)
    meta = meta_of(t)
    assert meta["fps"] == 30 and meta["joints"] == list(H36M17_JOINTS)
    assert t.schema.field("joints3d").type == JOINTS3D_TYPE
    keys = list(zip(*(t.column(c).to_pylist() for c in ("subject", "clip", "frame"))))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(f % 4 == 0 for _, _, f in keys)
    assert all(f >= 4 for s, c, f in keys if c == "01_01")
    assert np.isfinite(joints(t)).all()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared raw CMU data not present at {SHARED}")
def test_full_shared_conversion_equals_committed(tmp_path):
    out = tmp_path / "full.parquet"
    summary = convert_directory(SHARED, out, fps=30, progress=None)
    mine, committed = pq.read_table(out), pq.read_table(COMMITTED)
    assert mine.equals(committed, check_metadata=True)
    assert meta_of(mine) == meta_of(committed)
    assert summary["rows"] == committed.num_rows and summary["clips"] == 132
    assert summary["subjects"] == 11
    # every raw data file listed in SHA256SUMS was read, with matching hashes
    sums = dict(reversed(line.split()) for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert meta_of(mine)["sources"] == {k: v for k, v in sums.items() if k.endswith((".asf", ".amc", ".bvh"))}


def test_bvh_wrong_frame_rate_is_rejected(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = (FIXTURES / "bvh" / "01_01.bvh").read_text().splitlines(keepends=True)
    k = lines.index("Frame Time: .0083333\n")
    lines[k] = "Frame Time: .0166667\n"
    (raw / "01_01.bvh").write_text("".join(lines))
    with pytest.raises(MocapFormatError) as ei:
        convert_directory(raw, tmp_path / "o.parquet", progress=None)
    assert str(ei.value).startswith(f"01_01.bvh:{k + 1}: ") and "0.0166667" in str(ei.value)
    assert not (tmp_path / "o.parquet").exists()
