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
from vipe_ray.mocap import table as table_mod
from vipe_ray.mocap.convert import convert_directory

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "cmu-mini"
COMMITTED = REPO / "data" / "cmu_h36m17_30fps.parquet"
SHARED = Path(__file__).parents[3] / "shared" / "data" / "cmu-mocap"

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
    # one process per take here (2 takes): progress lines count takes in the order they finish
    takes = [m for m in messages if m.startswith("[")]
    assert sorted(m.split("] ")[1].split(":")[0] for m in takes) == ["bvh/01_01.bvh", "subjects/02/02_03.amc"]
    assert {m.split("]")[0] for m in takes} == {"[1/2", "[2/2"}
    assert messages[-1].startswith("wrote 53 rows")


def test_fixture_metadata(fixture_table):
    _, t, _, _ = fixture_table
    raw = t.schema.metadata[b"vipe_ray"]
    meta = json.loads(raw)
    assert raw.decode() == json.dumps(meta, sort_keys=True)
    assert meta["format_version"] == 1 and meta["fps"] == 30 and meta["source_fps"] == 120
    assert meta["joints"] == list(H36M17_JOINTS) and len(meta["joints"]) == 17
    assert meta["joints"][:4] == ["pelvis", "r_hip", "r_knee", "r_ankle"]
    assert meta["units"] == "metres" and meta["left_out"] == []
    assert meta["skeletons"] == {"bvh/01_01.bvh": "cgspeed-motionbuilder"}
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

    monkeypatch.setattr(table_mod.pq, "write_table", half_write)
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
    assert np.isfinite(joints(t)).all()
    # 01_01 comes from CMU's AMC (frames from 0); its cgspeed BVH and the truncated 07_12 are listed as left out
    assert [f for _, c, f in keys if c == "01_01"][:2] == [0, 4]
    assert [d["file"] for d in meta["left_out"]] == ["cmu-mocap-more/subjects/07/07_12.amc", "cmu-mocap/bvh/01_01.bvh"]
    assert sorted(set(meta["skeletons"].values())) == ["cgspeed-3dsmax", "cgspeed-daz", "cgspeed-motionbuilder"]


SHARED_MORE = SHARED.parent / "cmu-mocap-more"


def _shared_sums(folder: Path, prefix: str = "") -> dict[str, str]:
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines() if line.strip())
    return {prefix + k: v for k, v in sums.items() if k.endswith((".asf", ".amc", ".bvh"))}


@pytest.mark.skipif(not SHARED_MORE.is_dir(), reason=f"shared raw CMU data not present at {SHARED_MORE}")
def test_full_shared_conversion_equals_committed(tmp_path):
    """The bundled table is exactly `vipe-ray convert cmu-mocap cmu-mocap-more OUT --skip-invalid --prefer amc`."""
    out = tmp_path / "full.parquet"
    summary = convert_directory([SHARED, SHARED_MORE], out, fps=30, progress=None, skip_invalid=True, prefer="amc")
    mine, committed = pq.read_table(out), pq.read_table(COMMITTED)
    assert mine.equals(committed, check_metadata=True)
    assert meta_of(mine) == meta_of(committed)
    assert summary["rows"] == committed.num_rows == 65467
    assert summary["clips"] == 214 and summary["subjects"] == 20
    # every raw data file listed in SHA256SUMS was read, with matching hashes, except the two left out
    sums = {**_shared_sums(SHARED, "cmu-mocap/"), **_shared_sums(SHARED_MORE, "cmu-mocap-more/")}
    left_out = {d["file"] for d in summary["left_out"]}
    assert meta_of(mine)["sources"] == {k: v for k, v in sums.items() if k not in left_out}


@pytest.mark.skipif(not SHARED_MORE.is_dir(), reason=f"shared raw CMU data not present at {SHARED_MORE}")
def test_cli_converts_a_real_collection_with_a_broken_file(tmp_path, capsys):
    from vipe_ray.cli import main

    out = tmp_path / "more.parquet"
    assert main(["convert", str(SHARED_MORE), str(out)]) == 2
    err = capsys.readouterr().err
    assert "subjects/07/07_12.amc:7324: frame 245 is incomplete" in err and "--skip-invalid" in err
    assert dir_listing(tmp_path) == []
    assert main(["convert", str(SHARED_MORE), str(out), "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "left out subjects/07/07_12.amc:7324: frame 245 is incomplete" in printed
    t = pq.read_table(out)
    meta = meta_of(t)
    assert len(set(t.column("clip").to_pylist())) == 83 and len(meta["skeletons"]) == 18
    assert [d["file"] for d in meta["left_out"]] == ["subjects/07/07_12.amc"]


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


# --- whole collections: --skip-invalid, several folders, one take in two formats, processes


def _truncate(amc: Path) -> int:
    """Cut an AMC inside its last frame, as a broken copy would be; returns that frame's line."""
    lines = amc.read_text().splitlines(keepends=True)[:-3]
    amc.write_text("".join(lines))
    return max(k for k, line in enumerate(lines, 1) if line.strip().isdigit())


def test_truncated_file_stops_the_run_and_writes_nothing(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES, raw)
    last = _truncate(raw / "subjects/02/02_03.amc")
    with pytest.raises(MocapFormatError) as ei:
        convert_directory(raw, tmp_path / "out" / "t.parquet", progress=None, workers=2)
    assert str(ei.value).startswith(f"subjects/02/02_03.amc:{last}: frame 173 is incomplete")
    assert not (tmp_path / "out").exists()


def test_skip_invalid_reports_and_lists_the_file(tmp_path, fixture_table):
    _, complete, _, _ = fixture_table
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES, raw)
    last = _truncate(raw / "subjects/02/02_03.amc")
    messages = []
    out = tmp_path / "t.parquet"
    summary = convert_directory(raw, out, progress=messages.append, skip_invalid=True, workers=2)
    t = pq.read_table(out)
    assert summary["clips"] == 1 and summary["rows"] == 9 and set(t.column("clip").to_pylist()) == {"01_01"}
    assert len(summary["left_out"]) == 1
    item = summary["left_out"][0]
    assert item["file"] == "subjects/02/02_03.amc" and item["line"] == last
    assert item["reason"].startswith("frame 173 is incomplete")
    assert meta_of(t)["left_out"] == summary["left_out"]
    assert "subjects/02/02_03.amc" not in meta_of(t)["sources"]  # sources: the files the rows came from
    assert any(m.startswith("[") and f"left out: subjects/02/02_03.amc:{last}:" in m for m in messages)
    np.testing.assert_array_equal(joints(t), joints(complete)[:9])


def test_skip_invalid_broken_skeleton_leaves_out_its_subject(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES, raw)
    asf = raw / "subjects/02/02.asf"
    asf.write_text(asf.read_text().replace(":units", ":unitz", 1))
    summary = convert_directory(raw, tmp_path / "t.parquet", progress=None, skip_invalid=True, workers=1)
    assert summary["clips"] == 1
    files = [d["file"] for d in summary["left_out"]]
    assert files == ["subjects/02/02.asf", "subjects/02/02_03.amc"]
    assert summary["left_out"][1]["reason"] == "its skeleton subjects/02/02.asf is invalid"


def test_skip_invalid_with_nothing_valid_is_an_error(tmp_path):
    raw = tmp_path / "raw" / "subjects" / "02"
    raw.mkdir(parents=True)
    shutil.copy(FIXTURES / "subjects/02/02.asf", raw)
    shutil.copy(FIXTURES / "subjects/02/02_03.amc", raw)
    _truncate(raw / "02_03.amc")
    with pytest.raises(ValueError, match="no valid take"):
        convert_directory(tmp_path / "raw", tmp_path / "t.parquet", progress=None, skip_invalid=True)
    assert not (tmp_path / "t.parquet").exists()


def test_rows_do_not_depend_on_the_number_of_processes(tmp_path):
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}.parquet"
        convert_directory(FIXTURES, out, progress=None, workers=workers)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def _two_formats(tmp_path):
    """Two folders holding take 01_01 of subject 01 as AMC and as BVH."""
    amc_dir, bvh_dir = tmp_path / "amc", tmp_path / "bvh-only"
    (amc_dir / "subjects" / "01").mkdir(parents=True)
    for name in ("01.asf", "01_01.amc"):
        shutil.copy(REPO / "tests/fixtures/amc-bvh-01_01" / name, amc_dir / "subjects/01" / name)
    bvh_dir.mkdir()
    shutil.copy(FIXTURES / "bvh/01_01.bvh", bvh_dir / "01_01.bvh")
    return amc_dir, bvh_dir


def test_one_take_in_two_formats_needs_prefer(tmp_path):
    amc_dir, bvh_dir = _two_formats(tmp_path)
    with pytest.raises(ValueError) as ei:
        convert_directory([amc_dir, bvh_dir], tmp_path / "t.parquet", progress=None)
    msg = str(ei.value)
    assert "amc/subjects/01/01_01.amc" in msg and "bvh-only/01_01.bvh" in msg and "--prefer" in msg
    assert not (tmp_path / "t.parquet").exists()
    for prefer, kept, dropped in (("amc", "amc/subjects/01/01_01.amc", "bvh-only/01_01.bvh"),
                                  ("bvh", "bvh-only/01_01.bvh", "amc/subjects/01/01_01.amc")):
        out = tmp_path / f"{prefer}.parquet"
        summary = convert_directory([amc_dir, bvh_dir], out, progress=None, prefer=prefer)
        meta = meta_of(pq.read_table(out))
        assert summary["clips"] == 1 and kept in meta["sources"] and dropped not in meta["sources"]
        assert summary["left_out"] == [{"file": dropped, "line": 0,
                                        "reason": f"the same take as {kept} (prefer {prefer})"}]
    # AMC frame numbers start at 1 (stored 0-based); the BVH's line 0 is cgspeed's T-pose
    t = pq.read_table(tmp_path / "amc.parquet")
    assert t.column("frame").to_pylist()[:3] == [0, 4, 8]


def test_bad_collection_arguments(tmp_path):
    with pytest.raises(ValueError, match="prefer"):
        convert_directory(FIXTURES, tmp_path / "o.parquet", progress=None, prefer="c3d")
    with pytest.raises(ValueError, match="workers"):
        convert_directory(FIXTURES, tmp_path / "o.parquet", progress=None, workers=0)
    other = tmp_path / "cmu-mini"
    shutil.copytree(FIXTURES, other)
    with pytest.raises(ValueError, match="distinct names"):
        convert_directory([FIXTURES, other], tmp_path / "o.parquet", progress=None)
    assert dir_listing(tmp_path) == ["cmu-mini"]


# --- BVH skeletons: the three cgspeed flavours, a user's map, a file no map fits

FLAVOURS = Path(__file__).parents[1] / "fixtures" / "bvh-flavours"


def test_every_cgspeed_flavour_converts_with_its_own_map(tmp_path):
    out = tmp_path / "flavours.parquet"
    summary = convert_directory(FLAVOURS, out, fps=120, progress=None, workers=2)
    t = pq.read_table(out)
    meta = meta_of(t)
    assert meta["skeletons"] == {"08_01.bvh": "cgspeed-motionbuilder", "12_01.bvh": "cgspeed-daz",
                                 "131_01.bvh": "cgspeed-3dsmax"}
    frames = {c: [f for cc, f in zip(t.column("clip").to_pylist(), t.column("frame").to_pylist()) if cc == c]
              for c in ("08_01", "12_01", "131_01")}
    # MotionBuilder and Daz files open with a T-pose (dropped); the 3dsMax files start with the take
    assert frames["08_01"][0] == 1 and frames["12_01"][0] == 1 and frames["131_01"][0] == 0
    assert summary["subjects"] == 3
    j = joints(t)
    stature = j[:, 10, 2] - np.minimum(j[:, 3, 2], j[:, 6, 2])  # head top over the lower ankle, metres
    assert (stature > 1.2).all() and (stature < 2.0).all()


def _renamed(text: str, renames: dict[str, str]) -> str:
    import re

    for old, new in renames.items():
        text = re.sub(rf"\b{old}\b", new, text)
    return text


def test_a_user_skeleton_map_converts_another_naming(tmp_path, capsys):
    from vipe_ray.cli import main
    from vipe_ray.mocap.skeleton import SKELETONS_DIR

    renames = {"rShin": "rKnee", "lShin": "lKnee"}
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "12_01.bvh").write_text(_renamed((FLAVOURS / "12_01.bvh").read_text(), renames))
    out = tmp_path / "o.parquet"
    assert main(["convert", str(raw), str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vipe-ray convert: error: 12_01.bvh:") and "r_knee (rShin)" in err
    assert "rKnee" in err and "--skeleton" in err and not out.exists()
    mine = tmp_path / "my-daz.yaml"
    mine.write_text(_renamed((SKELETONS_DIR / "cgspeed-daz.yaml").read_text(), renames)
                    .replace("name: cgspeed-daz", "name: my-daz"))
    shutil.copy(FLAVOURS / "08_01.bvh", raw / "08_01.bvh")  # a file the user's map does not fit
    assert main(["convert", str(raw), str(out), "--skeleton", str(mine)]) == 0
    assert meta_of(pq.read_table(out))["skeletons"] == {"08_01.bvh": "cgspeed-motionbuilder", "12_01.bvh": "my-daz"}
    (raw / "08_01.bvh").unlink()
    assert main(["convert", str(raw), str(out), "--skeleton", str(mine)]) == 0
    expected = tmp_path / "expected.parquet"
    convert_directory(FLAVOURS, expected, progress=None)
    daz = pq.read_table(expected).filter(pa.array(np.asarray(pq.read_table(expected).column("clip").to_pylist()) == "12_01"))
    np.testing.assert_array_equal(joints(pq.read_table(out)), joints(daz))
    assert meta_of(pq.read_table(out))["skeletons"] == {"12_01.bvh": "my-daz"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert main(["convert", str(raw), str(out), "--skeleton", str(bad)]) == 2
    assert f"{bad}: missing key 'metres_per_unit'" in capsys.readouterr().err


def test_a_script_without_a_main_guard_converts_in_parallel(tmp_path):
    """Worker processes must not re-run the calling script (as spawn/forkserver children do)."""
    import subprocess
    import sys

    script = tmp_path / "convert_it.py"
    script.write_text(
        "from vipe_ray.mocap.convert import convert_directory\n"
        f"s = convert_directory({str(FIXTURES)!r}, {str(tmp_path / 'o.parquet')!r}, progress=None, workers=2)\n"
        "print('clips', s['clips'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clips 2"
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 53


def test_folder_names_nesting_and_output_checks(tmp_path, monkeypatch):
    raw = tmp_path / "take-folder"
    shutil.copytree(FIXTURES, raw)
    (raw / "subjects" / "08").mkdir()  # BVH files may sit in a subject folder without an ASF
    shutil.copy(FLAVOURS / "08_01.bvh", raw / "subjects" / "08" / "08_01.bvh")
    monkeypatch.chdir(raw)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(FLAVOURS / "12_01.bvh", other / "12_01.bvh")
    out = tmp_path / "o.parquet"
    summary = convert_directory([".", str(other)], out, progress=None)
    assert summary["clips"] == 4
    assert sorted(meta_of(pq.read_table(out))["sources"]) == [
        "other/12_01.bvh", "take-folder/bvh/01_01.bvh", "take-folder/subjects/02/02.asf",
        "take-folder/subjects/02/02_03.amc", "take-folder/subjects/08/08_01.bvh"]
    with pytest.raises(ValueError, match="lies inside"):
        convert_directory([raw, raw / "subjects"], tmp_path / "n.parquet", progress=None)
    with pytest.raises(ValueError, match="is a directory"):
        convert_directory(raw, other, progress=None)
    assert not (tmp_path / "n.parquet").exists() and sorted(p.name for p in other.iterdir()) == ["12_01.bvh"]
