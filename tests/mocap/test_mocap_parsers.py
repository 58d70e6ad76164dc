"""Tests for the ASF/AMC/BVH parsers and forward kinematics (vipe_ray.mocap)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vipe_ray.mocap import (
    H36M17_JOINTS,
    MocapFormatError,
    asf_amc_h36m17,
    builtin_map,
    bvh_forward_kinematics,
    cmu_to_zup,
    forward_kinematics,
    parse_amc,
    parse_amc_text,
    parse_asf,
    parse_asf_text,
    parse_bvh,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cmu-mini"
ASF = FIXTURES / "subjects" / "02" / "02.asf"
AMC = FIXTURES / "subjects" / "02" / "02_03.amc"
BVH = FIXTURES / "bvh" / "01_01.bvh"
SHARED = Path(__file__).parents[3] / "shared" / "data" / "cmu-mocap"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared raw CMU data not present at {SHARED}"
)

J = {name: i for i, name in enumerate(H36M17_JOINTS)}


def seg(joints, a, b):
    return np.linalg.norm(joints[:, J[a]] - joints[:, J[b]], axis=-1)


@pytest.fixture(scope="module")
def skel():
    return parse_asf(ASF)


@pytest.fixture(scope="module")
def motion(skel):
    return parse_amc(AMC, skel)


def lines_of(path):
    return path.read_text().splitlines(keepends=True)


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


def find_line(lines, prefix, start=0):
    """1-based number of the first line at/after 0-based index ``start`` starting with prefix."""
    for i in range(start, len(lines)):
        if lines[i].startswith(prefix):
            return i + 1
    raise AssertionError(prefix)


def assert_error(exc_info, path, line, *values):
    msg = str(exc_info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    for v in values:
        assert v in msg, (v, msg)
    assert exc_info.value.line == line


# ---------------------------------------------------------------- ASF


def test_asf_fixture(skel):
    assert skel.length_unit == 0.45 and skel.angle_unit == "deg"
    assert skel.metres_per_unit == pytest.approx(0.0564444, rel=1e-5)
    assert skel.root_order == ("TX", "TY", "TZ", "RX", "RY", "RZ") and skel.root_axis == "XYZ"
    assert len(skel.bones) == 30  # + root = 31 ASF bones
    assert skel.bones["lfemur"].dofs == ("rx", "ry", "rz")
    assert skel.bones["lfoot"].dofs == ("rx", "rz")
    assert skel.bones["lhipjoint"].dofs == ()
    assert skel.bones["lfemur"].axis == (0.0, 0.0, 20.0)
    assert skel.bones["lfemur"].length == pytest.approx(7.59371)
    assert skel.parent["lfemur"] == "lhipjoint" and skel.parent["lowerback"] == "root"
    assert skel.parent["lthumb"] == "lwrist"
    order = skel.topological_order()
    assert sorted(order) == sorted(skel.bones)
    assert all(skel.parent[b] == "root" or order.index(skel.parent[b]) < order.index(b) for b in order)


def test_asf_crlf_equals_lf(skel):
    crlf = ASF.read_text().replace("\n", "\r\n")
    other = parse_asf_text(crlf, skel.source)
    assert other == skel


@pytest.mark.parametrize(
    "edit, expect_line_of, values",
    [
        # missing sections
        (lambda t: t.replace(":hierarchy", ":documentation_removed", 1), None, ["unknown section"]),
        (lambda t: t[: t.index(":hierarchy")], "LAST", ["missing section ':hierarchy'"]),
        (lambda t: t.replace(":units\n  mass 1.0\n  length 0.45\n  angle deg\n", ""), "LAST", ["missing section ':units'"]),
        # bad values
        (lambda t: t.replace("length 7.59371", "length 7.5x9371", 1), "     length 7.5x9371", ["'7.5x9371'"]),
        (lambda t: t.replace("length 7.59371", "length nan", 1), "     length nan", ["'nan'"]),
        (lambda t: t.replace("lfemur ltibia", "lfemur ltibiaX", 1), "    lfemur ltibiaX", ["'ltibiaX'"]),
        (lambda t: t.replace("dof rx ry rz", "dof rx ry rq", 1), "    dof rx ry rq", ["'rq'"]),
        (lambda t: t.replace("axis 0 0 20  XYZ", "axis 0 0 20  XYQ", 1), "     axis 0 0 20  XYQ", ["'XYQ'"]),
    ],
)
def test_asf_errors(tmp_path, edit, expect_line_of, values):
    text = edit(ASF.read_text())
    p = tmp_path / "02.asf"
    p.write_text(text)
    lines = text.splitlines()
    with pytest.raises(MocapFormatError) as ei:
        parse_asf(p)
    if expect_line_of == "LAST":
        line = len(lines)
    elif expect_line_of is None:
        line = next(i + 1 for i, l in enumerate(lines) if l.startswith(":documentation_removed"))
    else:
        line = next(i + 1 for i, l in enumerate(lines) if l == expect_line_of.rstrip() or l.rstrip() == expect_line_of)
    assert_error(ei, p, line, *values)


# ---------------------------------------------------------------- AMC


def test_amc_fixture(motion, skel):
    assert motion.n_frames == 173
    assert motion.frame_numbers[0] == 1 and motion.frame_numbers[-1] == 173
    assert motion.root.shape == (173, 6) and motion.angle_unit == "deg"
    assert set(motion.angles) == {b for b, bone in skel.bones.items() if bone.dofs}
    assert motion.angles["lfemur"].shape == (173, 3)
    assert motion.angles["ltibia"].shape == (173, 1)
    # spot values: first frame's root line and last frame's ltoes line, straight from the file
    lines = AMC.read_text().splitlines()
    root1 = [float(v) for v in lines[lines.index("1") + 1].split()[1:]]
    np.testing.assert_array_equal(motion.root[0], root1)
    last_ltoes = [l for l in lines if l.startswith("ltoes ")][-1]
    assert motion.angles["ltoes"][-1, 0] == float(last_ltoes.split()[1])


def test_amc_crlf_equals_lf(motion, skel):
    other = parse_amc_text(AMC.read_text().replace("\n", "\r\n"), skel, motion.source)
    np.testing.assert_array_equal(other.root, motion.root)
    for k, v in motion.angles.items():
        np.testing.assert_array_equal(other.angles[k], v)


def _frame_start(lines, n):
    return lines.index(f"{n}\n")


def test_amc_truncated_mid_frame(tmp_path, skel):
    lines = lines_of(AMC)
    start = _frame_start(lines, 173)
    p = write(tmp_path, "02_03.amc", lines[: start + 10])  # frame 173 has only 9 bone lines
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel)
    assert_error(ei, p, start + 1, "frame 173", "file ends", "'lfemur'")


def test_amc_missing_bone_line_in_middle(tmp_path, skel):
    lines = lines_of(AMC)
    start = _frame_start(lines, 50)
    k = find_line(lines, "rradius ", start) - 1
    p = write(tmp_path, "02_03.amc", lines[:k] + lines[k + 1 :])
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel)
    assert_error(ei, p, start + 1, "frame 50", "'rradius'")


def test_amc_unknown_bone(tmp_path, skel):
    lines = lines_of(AMC)
    k = find_line(lines, "lfemur ", _frame_start(lines, 14)) - 1
    lines[k] = lines[k].replace("lfemur", "lfemurx")
    p = write(tmp_path, "02_03.amc", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel, source="subjects/02/02_03.amc")
    assert str(ei.value) == f"subjects/02/02_03.amc:{k + 1}: bone 'lfemurx' not in skeleton 02.asf"


@pytest.mark.parametrize("bone, extra", [("rtibia", " 3.5"), ("root", " 1"), ("lfemur", None)])
def test_amc_wrong_dof_count(tmp_path, skel, bone, extra):
    lines = lines_of(AMC)
    k = find_line(lines, f"{bone} ", _frame_start(lines, 7)) - 1
    toks = lines[k].split()
    lines[k] = (lines[k].rstrip("\n") + extra + "\n") if extra else " ".join(toks[:-1]) + "\n"
    p = write(tmp_path, "02_03.amc", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel)
    n_values = len(lines[k].split()) - 1
    assert_error(ei, p, k + 1, f"'{bone}'", f"has {n_values} values", lines[k].split(None, 1)[1].strip())


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "1.2.3", "abc"])
def test_amc_bad_values(tmp_path, skel, bad):
    lines = lines_of(AMC)
    k = find_line(lines, "lhumerus ", _frame_start(lines, 99)) - 1
    toks = lines[k].split()
    toks[2] = bad
    lines[k] = " ".join(toks) + "\n"
    p = write(tmp_path, "02_03.amc", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel)
    assert_error(ei, p, k + 1, f"'{bad}'", "'lhumerus'")


def test_amc_frame_number_gap_and_garbage(tmp_path, skel):
    lines = lines_of(AMC)
    start = _frame_start(lines, 20)
    bad = lines.copy()
    bad[start] = "21\n"
    p = write(tmp_path, "02_03.amc", bad)
    with pytest.raises(MocapFormatError) as ei:
        parse_amc(p, skel)
    assert_error(ei, p, start + 1, "'21'", "expected 20")
    header_only = write(tmp_path, "empty.amc", lines[:3])
    with pytest.raises(MocapFormatError, match="no frames"):
        parse_amc(header_only, skel)


# ---------------------------------------------------------------- FK


def _one_bone_skeleton(direction, axis, dof):
    return parse_asf_text(
        f""":units
  length 0.45
  angle deg
:root
   order TX TY TZ RX RY RZ
   axis XYZ
   position 0 0 0
   orientation 0 0 0
:bonedata
  begin
     name a
     direction {direction}
     length {1 / 0.0564444444444:.12f}
     axis {axis} XYZ
     dof {dof}
  end
:hierarchy
  begin
    root a
  end
""",
        "one.asf",
    )


@pytest.mark.parametrize(
    "direction, axis, dof, root_rot, angle, expected",
    [
        ("1 0 0", "0 0 0", "rz", "0 0 0", 90, (0, 1, 0)),  # Rz(90)·x = y
        ("1 0 0", "0 0 90", "rx", "0 0 0", 90, (0, 0, -1)),  # C·Rx·C⁻¹ = Ry(90) -> x to -z
        ("0 1 0", "0 0 0", "rx", "90 0 0", 0, (0, 0, 1)),  # root Rx(90)·y = z
        ("0 1 0", "0 0 0", "rx", "0 0 90", 0, (-1, 0, 0)),  # root Rz(90)·y = -x
        ("1 0 0", "0 0 0", "rx", "0 90 90", 0, (0, 0, -1)),  # Rz(90)·Ry(90)·x = Rz(90)·(-z) = -z
        # bone L = Rz·Ry·Rx: Rx(90)·y = z, then Ry(90)·z = x (Rx·Ry·Rz would give z)
        ("0 1 0", "0 0 0", "rx ry rz", "0 0 0", "90 90 0", (1, 0, 0)),
        # dof listed in another order: values follow the dof list, the product stays Rz·Ry·Rx
        ("0 1 0", "0 0 0", "rz rx ry", "0 0 0", "0 90 90", (1, 0, 0)),
    ],
)
def test_fk_hand_computed(direction, axis, dof, root_rot, angle, expected):
    sk = _one_bone_skeleton(direction, axis, dof)
    mo = parse_amc_text(f":FULLY-SPECIFIED\n:DEGREES\n1\nroot 0 0 0 {root_rot}\na {angle}\n", sk, "one.amc")
    pos = forward_kinematics(sk, mo)
    np.testing.assert_allclose(pos["root"][0], 0, atol=1e-12)
    np.testing.assert_allclose(pos["a"][0], expected, atol=1e-9)


def test_cmu_to_zup_is_proper_rotation():
    np.testing.assert_array_equal(cmu_to_zup(np.array([1.0, 2.0, 3.0])), [1.0, -3.0, 2.0])
    m = cmu_to_zup(np.eye(3)).T  # columns = images of the basis vectors
    assert np.linalg.det(m) == pytest.approx(1.0)


# README, subject 02 (02_01, same skeleton as the fixture's 02_03): H3.6M-17 bone lengths in m
SUBJECT02_RIGID = [
    ("pelvis", "r_hip", 0.141), ("r_hip", "r_knee", 0.428), ("r_knee", "r_ankle", 0.407),
    ("pelvis", "l_hip", 0.143), ("l_hip", "l_knee", 0.429), ("l_knee", "l_ankle", 0.411),
    ("thorax", "neck", 0.088), ("neck", "head", 0.092),
    ("l_shoulder", "l_elbow", 0.275), ("l_elbow", "l_wrist", 0.189),
    ("r_shoulder", "r_elbow", 0.284), ("r_elbow", "r_wrist", 0.190),
]


def test_fk_bone_lengths_subject02(skel, motion):
    j = asf_amc_h36m17(skel, motion)
    assert j.shape == (173, 17, 3) and j.dtype == np.float64 and np.isfinite(j).all()
    for a, b, expected in SUBJECT02_RIGID:
        length = seg(j, a, b)
        assert length.std() < 1e-9, (a, b)  # rigid: exactly constant over frames
        assert length.mean() == pytest.approx(expected, abs=0.002), (a, b)
    # non-rigid (spine joints) still close to the README's 02_01 values
    assert seg(j, "pelvis", "spine").mean() == pytest.approx(0.232, abs=0.005)
    assert seg(j, "spine", "thorax").mean() == pytest.approx(0.205, abs=0.005)
    # z up: head above thorax above pelvis above ankles in every frame
    z = j[..., 2]
    assert (z[:, J["head"]] > z[:, J["thorax"]]).all() and (z[:, J["thorax"]] > z[:, J["pelvis"]]).all()
    assert (z[:, J["pelvis"]] > z[:, J["l_ankle"]]).all()


@needs_shared
def test_fk_readme_numbers_02_01_and_105():
    sk = parse_asf(SHARED / "subjects/02/02.asf")
    j = asf_amc_h36m17(sk, parse_amc(SHARED / "subjects/02/02_01.amc", sk))
    assert np.median(j[:, J["pelvis"], 2]) == pytest.approx(0.971, abs=0.002)
    assert j[:, J["head"], 2].max() == pytest.approx(1.620, abs=0.002)
    # subject 105: CRLF files, a small performer
    sk = parse_asf(SHARED / "subjects/105/105.asf")
    j = asf_amc_h36m17(sk, parse_amc(SHARED / "subjects/105/105_34.amc", sk))
    assert seg(j, "l_hip", "l_knee").mean() == pytest.approx(0.372, abs=0.002)
    assert seg(j, "r_hip", "r_knee").mean() == pytest.approx(0.368, abs=0.002)
    assert seg(j, "l_knee", "l_ankle").mean() == pytest.approx(0.380, abs=0.002)
    assert seg(j, "r_knee", "r_ankle").mean() == pytest.approx(0.366, abs=0.002)
    assert j[:, J["head"], 2].max() == pytest.approx(1.430, abs=0.002)


# ---------------------------------------------------------------- BVH


@pytest.fixture(scope="module")
def bvh():
    return parse_bvh(BVH)


def test_bvh_fixture(bvh):
    assert bvh.n_frames == 40 and bvh.n_channels == 96
    assert len(bvh.joints) == 38 and sum(j.name.endswith("_End") for j in bvh.joints) == 7
    assert bvh.frame_time == pytest.approx(1 / 120, rel=1e-4)
    assert bvh.joints[0].name == "Hips" and bvh.joints[0].channels[:3] == ("Xposition", "Yposition", "Zposition")
    # frame 0 is the converter's T-pose: only the root position and +-17 deg thighs, +-5 deg arms
    t_pose = bvh.motion[0, 6:]
    assert sorted(np.unique(t_pose).tolist()) == [-17, -5, 0, 5, 17]
    assert np.count_nonzero(bvh.motion[1, 6:]) > 50


def test_bvh_bone_lengths_consistent(bvh):
    mb = builtin_map("cgspeed-motionbuilder")  # as convert maps it (none of these segments spans the thorax)
    j = mb.apply(bvh_forward_kinematics(mb.prepare(bvh), slice(1, None)))
    # README (cgspeed 01_01): thighs 0.404/0.420, shins 0.423/0.424, pelvis-hip 0.136/0.134,
    # upper arms 0.281/0.296, forearms 0.197/0.194
    for a, b, expected in [
        ("l_hip", "l_knee", 0.404), ("r_hip", "r_knee", 0.420),
        ("l_knee", "l_ankle", 0.423), ("r_knee", "r_ankle", 0.424),
        ("pelvis", "l_hip", 0.136), ("pelvis", "r_hip", 0.134),
        ("l_shoulder", "l_elbow", 0.281), ("r_shoulder", "r_elbow", 0.296),
        ("l_elbow", "l_wrist", 0.197), ("r_elbow", "r_wrist", 0.194),
    ]:
        length = seg(j, a, b)
        assert length.std() < 1e-9 and length.mean() == pytest.approx(expected, abs=0.002), (a, b)
    # each rigid segment equals its OFFSET length (spine chain included)
    for child, h36m in [("LeftLeg", ("l_hip", "l_knee")), ("Spine1", ("spine", None))]:
        off = np.linalg.norm(bvh.joint(child).offset) * mb.metres_per_unit
        if h36m[1] is not None:
            assert seg(j, *h36m).mean() == pytest.approx(off, abs=1e-9)
    assert 0.9 < np.median(j[:, J["pelvis"], 2]) < 1.1


def test_bvh_fk_matches_asf_convention_on_hand_computed_case(tmp_path):
    text = """HIERARCHY
ROOT Hips
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation
  JOINT A
  {
    OFFSET 0 1 0
    CHANNELS 3 Zrotation Yrotation Xrotation
    End Site
    {
      OFFSET 1 0 0
    }
  }
}
MOTION
Frames: 1
Frame Time: .0083333
1 2 3 90 0 0 0 90 0
"""
    p = tmp_path / "t.bvh"
    p.write_text(text)
    pos = bvh_forward_kinematics(parse_bvh(p))
    np.testing.assert_allclose(pos["Hips"][0], (1, 2, 3))
    np.testing.assert_allclose(pos["A"][0], (1 - 1, 2, 3), atol=1e-12)  # Rz(90)·y = -x
    # R_A = Rz(90)·Ry(90); Ry(90)·x = -z; Rz(90)·(-z) = -z
    np.testing.assert_allclose(pos["A_End"][0], (0, 2, 2), atol=1e-12)


def _bvh_lines():
    return lines_of(BVH)


def test_bvh_channel_count_mismatch(tmp_path):
    lines = _bvh_lines()
    k = lines.index("MOTION\n") + 3 + 5  # the 6th motion line
    lines[k] = " ".join(lines[k].split()[:-1]) + "\n"
    p = write(tmp_path, "01_01.bvh", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_bvh(p)
    assert_error(ei, p, k + 1, "95 values", "96 channels")


def test_bvh_declared_channels_mismatch(tmp_path):
    lines = _bvh_lines()
    k = next(i for i, l in enumerate(lines) if "CHANNELS 3" in l)
    lines[k] = lines[k].replace("CHANNELS 3", "CHANNELS 4")
    p = write(tmp_path, "01_01.bvh", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_bvh(p)
    assert_error(ei, p, k + 1, "declares 4 channels")


@pytest.mark.parametrize("frames", ["41", "39"])
def test_bvh_frame_count_mismatch(tmp_path, frames):
    lines = _bvh_lines()
    k = lines.index("Frames: 40\n")
    lines[k] = f"Frames: {frames}\n"
    p = write(tmp_path, "01_01.bvh", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_bvh(p)
    assert_error(ei, p, k + 1, f"Frames: {frames}", "40 motion lines")


@pytest.mark.parametrize("bad", ["nan", "inf", "x1"])
def test_bvh_bad_motion_value(tmp_path, bad):
    lines = _bvh_lines()
    k = lines.index("MOTION\n") + 3 + 20
    toks = lines[k].split()
    toks[10] = bad
    lines[k] = " ".join(toks) + "\n"
    p = write(tmp_path, "01_01.bvh", lines)
    with pytest.raises(MocapFormatError) as ei:
        parse_bvh(p)
    assert_error(ei, p, k + 1, f"'{bad}'")


def test_bvh_truncated_hierarchy(tmp_path):
    lines = _bvh_lines()
    p = write(tmp_path, "01_01.bvh", lines[:60])
    with pytest.raises(MocapFormatError) as ei:
        parse_bvh(p)
    assert_error(ei, p, 60, "file ends inside HIERARCHY")
    assert re.search(r"01_01\.bvh:60: ", str(ei.value))
