"""Skeleton maps (vipe_ray.mocap.skeleton): the three built-in cgspeed maps, detection, the
strict YAML validation and user maps. Fixtures: tests/fixtures/bvh-flavours (see its README);
the checks against the full shared data are skipped where /work/shared is absent."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from vipe_ray.mocap.asf import INCH_M, parse_asf
from vipe_ray.mocap.bvh import bvh_forward_kinematics, parse_bvh, parse_bvh_text, rest_positions
from vipe_ray.mocap.kinematics import H36M17_JOINTS, cmu_to_zup, rest_bone_ends
from vipe_ray.mocap.skeleton import (
    BUILTIN_MAP_NAMES, SKELETONS_DIR, SkeletonMap, SkeletonMapError, builtin_map, builtin_maps,
    detect_skeleton_map, load_skeleton_map, parse_skeleton_map,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
FLAVOURS_DIR = FIXTURES / "bvh-flavours"
MINI_BVH = FIXTURES / "cmu-mini" / "bvh" / "01_01.bvh"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "cmu-mocap-more").is_dir(), reason="needs /work/shared data")

#: fixture -> (its built-in map, the BVH End Sites at the left and right toe tips)
FLAVOURS = {
    "08_01.bvh": ("cgspeed-motionbuilder", "LeftToeBase_End", "RightToeBase_End"),
    "12_01.bvh": ("cgspeed-daz", "lFoot_End", "rFoot_End"),
    "131_01.bvh": ("cgspeed-3dsmax", "LeftToe_End", "RightToe_End"),
}
J = {n: i for i, n in enumerate(H36M17_JOINTS)}
#: Today's cgspeed scale, written out so this test does not depend on convert.py's constant.
CGSPEED_MPU = (1.0 / 0.45) * INCH_M
MB = "cgspeed-motionbuilder"
#: The MotionBuilder map's joints, written out (the former ``bvh.CGSPEED_H36M17_JOINTS``).
MB_JOINTS = ("Hips", "RightUpLeg", "RightLeg", "RightFoot", "LeftUpLeg", "LeftLeg", "LeftFoot",
             "Spine1", "Neck1", "Head", "Head_End",
             "LeftArm", "LeftForeArm", "LeftHand", "RightArm", "RightForeArm", "RightHand")
#: Built-in map -> its offsets_from pairs (the joints cgspeed hangs at the chest with OFFSET 0).
OFFSETS_FROM = {
    MB: (("Neck", "Spine1"), ("LeftShoulder", "Spine1"), ("RightShoulder", "Spine1")),
    "cgspeed-daz": (),
    "cgspeed-3dsmax": (("lowerneck", "Chest2"), ("LeftCollar", "Chest2"), ("RightCollar", "Chest2")),
}
#: Joints at or below the spine: their bone chains do not pass the offsets_from joints.
BELOW_THORAX = [J[n] for n in ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine")]


def _names(bvh) -> list[str]:
    return [j.name for j in bvh.joints]


@pytest.fixture(scope="module")
def flavours():
    """fixture name -> (Bvh, FK positions of all frames)."""
    out = {}
    for f in FLAVOURS:
        b = parse_bvh(FLAVOURS_DIR / f)
        out[f] = (b, bvh_forward_kinematics(b))
    return out


# --- the shipped maps -----------------------------------------------------------------------

def test_builtin_maps_are_shipped_commented_and_ordered():
    maps = builtin_maps()
    assert [m.name for m in maps] == list(BUILTIN_MAP_NAMES)
    assert builtin_maps() is maps  # cached
    for m in maps:
        path = SKELETONS_DIR / f"{m.name}.yaml"
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and "vipe-ray convert RAW_DIR OUT.parquet --skeleton this.yaml" in first
        assert len(m.joints) == 17 and m.up == "y" and m.source == str(path)
        assert builtin_map(m.name) is m
    with pytest.raises(SkeletonMapError, match=r"unknown built-in skeleton map 'nope'.*cgspeed-daz"):
        builtin_map("nope")


def test_motionbuilder_map_is_todays_mapping():
    mb = builtin_map("cgspeed-motionbuilder")
    assert mb.joints == tuple((n,) for n in MB_JOINTS)
    assert mb.metres_per_unit == CGSPEED_MPU  # exact: the YAML holds the full float
    assert mb.up == "y" and mb.tpose_frame  # convert drops the T-pose frame 0, as before
    for m in builtin_maps():
        assert m.offsets_from == OFFSETS_FROM[m.name], m.name


def test_motionbuilder_map_without_prepare_reproduces_the_former_conversion_bit_for_bit():
    """apply() on the file's own geometry is the former cgspeed conversion (stack, scale, z-up);
    prepare() (offsets_from) changes exactly the thorax and the joints above it."""
    bvh = parse_bvh(MINI_BVH)
    assert detect_skeleton_map(_names(bvh), str(MINI_BVH)).name == "cgspeed-motionbuilder"
    mb = builtin_map("cgspeed-motionbuilder")
    for frames in (None, np.arange(1, bvh.n_frames, 4)):  # all frames; convert's 30 fps subsample
        pos = bvh_forward_kinematics(bvh, frames)
        old = cmu_to_zup(np.stack([pos[n] for n in MB_JOINTS], axis=1) * CGSPEED_MPU)
        new = mb.apply(pos)
        assert new.dtype == np.float64 and new.shape == old.shape == (len(next(iter(pos.values()))), 17, 3)
        assert np.array_equal(new, old)
        assert old.astype(np.float32).tobytes() == new.astype(np.float32).tobytes()
        prepared = mb.apply(bvh_forward_kinematics(mb.prepare(bvh), frames))
        assert np.array_equal(prepared[:, BELOW_THORAX], old[:, BELOW_THORAX])
        above = [j for j in range(17) if j not in BELOW_THORAX]
        moved = np.linalg.norm(prepared[:, above] - old[:, above], axis=-1)
        # each moves by Spine1's OFFSET turned with the chest: 2.05008 units = 0.1157 m in 01_01
        np.testing.assert_allclose(moved, np.linalg.norm(bvh.joint("Spine1").offset) * CGSPEED_MPU, atol=1e-12)


# --- detection and anatomy ----------------------------------------------------------------------

@pytest.mark.parametrize("fixture", sorted(FLAVOURS))
def test_each_flavour_detects_to_its_own_map(flavours, fixture):
    bvh, _ = flavours[fixture]
    expected = FLAVOURS[fixture][0]
    assert detect_skeleton_map(_names(bvh), fixture).name == expected
    for m in builtin_maps():  # and no other built-in map fits it
        assert (m.missing(_names(bvh)) == []) == (m.name == expected)


@pytest.mark.parametrize("fixture", sorted(FLAVOURS))
def test_each_flavour_gives_a_plausible_body(flavours, fixture):
    bvh, pos = flavours[fixture]
    p = builtin_map(FLAVOURS[fixture][0]).apply(pos)
    assert p.shape == (bvh.n_frames, 17, 3) and np.isfinite(p).all()

    def length(a, b):
        return np.linalg.norm(p[:, J[a]] - p[:, J[b]], axis=-1)

    z = p[..., 2]  # z-up metres
    assert (z[:, J["head"]] > z[:, J["neck"]]).all() and (z[:, J["neck"]] > z[:, J["pelvis"]]).all()
    assert (z[:, J["thorax"]] > z[:, J["spine"]]).all() and (z[:, J["spine"]] > z[:, J["pelvis"]]).all()
    for s in "lr":
        assert (z[:, J[f"{s}_ankle"]] < z[:, J[f"{s}_knee"]]).all()
        assert (z[:, J[f"{s}_knee"]] < z[:, J[f"{s}_hip"]]).all()
        assert (z[:, J[f"{s}_shoulder"]] > z[:, J["pelvis"]]).all()
    # frame 0 stands upright: head (top or eyes) over the lower ankle, i.e. stature less the
    # head-top/heel bits, which is 1.35-1.49 m in the shared files of all three flavours
    top = z[0, J["head"]] - min(z[0, J["l_ankle"]], z[0, J["r_ankle"]])
    assert 1.25 < top < 1.9, top
    for a, b, lo, hi in [("hip", "knee", 0.3, 0.5), ("knee", "ankle", 0.3, 0.5),
                         ("shoulder", "elbow", 0.2, 0.35), ("elbow", "wrist", 0.15, 0.3)]:
        left, right = length(f"l_{a}", f"l_{b}"), length(f"r_{a}", f"r_{b}")
        assert (lo < left).all() and (left < hi).all() and (lo < right).all() and (right < hi).all(), (a, b)
        assert np.allclose(left, right, rtol=0.1), (a, b)  # rigid bones, left ~ right
        assert np.ptp(left) < 1e-9  # a bone keeps its length over frames
    hip_w, shoulder_w = length("l_hip", "r_hip"), length("l_shoulder", "r_shoulder")
    assert (0.1 < hip_w).all() and (hip_w < shoulder_w).all() and (shoulder_w < 0.5).all()
    # the pelvis sits above the hip joints, as CMU's root does (by 8-10 cm in all flavours)
    above = z[:, J["pelvis"]] - (z[:, J["l_hip"]] + z[:, J["r_hip"]]) / 2
    assert ((0.05 < above) & (above < 0.12)).all(), above


@pytest.mark.parametrize("fixture", sorted(FLAVOURS))
def test_left_is_the_subjects_left(flavours, fixture):
    """l_* joints lie on the subject's left: with the toes giving 'forward' and z up,
    (left - right) x forward points down (right-handed world)."""
    bvh, pos = flavours[fixture]
    name, l_toe, r_toe = FLAVOURS[fixture]
    m = builtin_map(name)
    p = m.apply(pos)
    toes = cmu_to_zup(np.stack([pos[l_toe], pos[r_toe]], axis=1) * m.metres_per_unit)
    forward = toes.mean(axis=1) - (p[:, J["l_ankle"]] + p[:, J["r_ankle"]]) / 2
    for a in ("hip", "shoulder"):
        side = p[:, J[f"l_{a}"]] - p[:, J[f"r_{a}"]]
        assert (np.cross(side, forward)[:, 2] < 0).all(), a


@pytest.mark.parametrize("fixture", sorted(FLAVOURS))
def test_tpose_frame_flags_a_frame_0_that_is_not_part_of_the_take(flavours, fixture):
    """cgspeed's MotionBuilder and Daz files start with a T-pose (the body jumps from it to
    frame 1); the 3dsMax files (subject 131) start in the take (frame 0 -> 1 like any step)."""
    _, pos = flavours[fixture]
    m = builtin_map(FLAVOURS[fixture][0])
    p = m.apply(pos)
    p = p - p[:, :1]  # body shape only
    step = np.linalg.norm(np.diff(p, axis=0), axis=-1).max(axis=1)
    assert m.tpose_frame == (fixture != "131_01.bvh")
    if m.tpose_frame:
        assert step[0] > 0.15 and step[0] > 5 * step[-3:].max()
        arms = p[0, [J["l_wrist"], J["r_wrist"]], 2] - p[0, [J["l_shoulder"], J["r_shoulder"]], 2]
        assert (np.abs(arms) < 0.1).all()  # a T: wrists about level with the shoulders (<= 6.4 cm)
    else:
        assert step[0] < 0.02 and step[0] < 3 * np.median(step[1:])


def test_detect_picks_the_first_builtin_map_when_several_fit():
    names = list(builtin_map("cgspeed-daz").bvh_joints | builtin_map("cgspeed-3dsmax").bvh_joints)
    assert detect_skeleton_map(names, "x.bvh").name == "cgspeed-daz"
    names += list(builtin_map("cgspeed-motionbuilder").bvh_joints)
    assert detect_skeleton_map(names, "x.bvh").name == "cgspeed-motionbuilder"


def _renamed_daz_text() -> str:
    text = (FLAVOURS_DIR / "12_01.bvh").read_text()
    text = re.sub(r"\bJOINT rShin\b", "JOINT rKnee", text)
    return re.sub(r"\bJOINT lFoot\b", "JOINT lAnkle", text)


def test_unmappable_bvh_names_missing_joints_and_the_files_joints():
    bvh = parse_bvh_text(_renamed_daz_text(), "odd/12_01.bvh")
    with pytest.raises(SkeletonMapError) as e:
        detect_skeleton_map(_names(bvh), "odd/12_01.bvh")
    msg = str(e.value)
    assert msg.startswith("odd/12_01.bvh: cannot map this BVH skeleton to Human3.6M-17")
    assert "Closest built-in map 'cgspeed-daz' lacks 2 of 17 joints: r_knee (rShin); l_ankle (lFoot)." in msg
    own = msg.split("The file's joints: ")[1]
    for n in ("hip", "rKnee", "lAnkle", "lAnkle_End", "leftEye"):
        assert re.search(rf"(^|, ){n}(,|\.)", own), n
    assert "--skeleton map.yaml" in msg and "vipe_ray/mocap/skeletons/*.yaml" in msg


def test_missing_lists_each_h36m_joint_with_its_absent_bvh_joints(flavours):
    daz = builtin_map("cgspeed-daz")
    bvh, _ = flavours["08_01.bvh"]
    missing = daz.missing(_names(bvh))
    assert len(missing) == 17
    assert "r_knee (rShin)" in missing and "pelvis (hip, abdomen)" in missing
    assert "head (leftEye, rightEye)" in missing
    assert daz.missing([n for n in daz.bvh_joints if n != "rightEye"]) == ["head (rightEye)"]
    with pytest.raises(SkeletonMapError, match=r"lack .*head \(rightEye\)"):
        daz.apply({n: np.zeros((1, 3)) for n in daz.bvh_joints if n != "rightEye"})


# --- offsets_from: putting back a bone the converter dropped -------------------------------------

@pytest.mark.parametrize("name, fixture", [(MB, MINI_BVH), (MB, FLAVOURS_DIR / "08_01.bvh"),
                                           ("cgspeed-3dsmax", FLAVOURS_DIR / "131_01.bvh")],
                         ids=["motionbuilder-01_01", "motionbuilder-08_01", "3dsmax-131_01"])
def test_prepare_gives_exactly_the_donor_offsets_and_touches_nothing_else(name, fixture):
    bvh = parse_bvh(fixture)
    before = [dataclasses.astuple(j) for j in bvh.joints]
    m = builtin_map(name)
    prepared = m.prepare(bvh)
    donors = dict(m.offsets_from)
    assert all(bvh.joint(j).offset == (0.0, 0.0, 0.0) for j in donors)  # cgspeed's collapsed thorax bone
    assert prepared is not bvh and len(prepared.joints) == len(bvh.joints)
    for old, new in zip(bvh.joints, prepared.joints):
        if old.name in donors:
            assert new.offset == bvh.joint(donors[old.name]).offset != old.offset
            assert new == dataclasses.replace(old, offset=new.offset)  # name, parent, channels, line kept
        else:
            assert new is old
    assert prepared.motion is bvh.motion
    assert (prepared.source, prepared.frame_time, prepared.frame_time_line) == (
        bvh.source, bvh.frame_time, bvh.frame_time_line)
    assert [dataclasses.astuple(j) for j in bvh.joints] == before  # the input Bvh is not changed
    # joints off the moved chains keep their positions bit for bit
    old, new = bvh_forward_kinematics(bvh), bvh_forward_kinematics(prepared)
    base = next(iter(donors.values()))
    for j in ("Hips", base) + ("RightUpLeg", "LeftUpLeg") * (name == MB) + ("RightHip", "LeftHip") * (name != MB):
        assert np.array_equal(new[j], old[j]), j


def test_a_map_without_offsets_from_returns_the_same_bvh(flavours):
    daz = builtin_map("cgspeed-daz")
    assert daz.offsets_from == ()
    for bvh, _ in flavours.values():
        assert daz.prepare(bvh) is bvh
    text = re.sub(r"(?m)^offsets_from:\n(  .*\n)+", "", _map_text(MB))
    assert "offsets_from:" not in text
    m = parse_skeleton_map(text, "no-offsets.yaml")
    assert m.offsets_from == () and m.joints == builtin_map(MB).joints
    assert m.prepare(bvh := parse_bvh(MINI_BVH)) is bvh
    assert parse_skeleton_map(_offsets(_map_text(MB), "offsets_from:"), "x.yaml").offsets_from == ()  # no value


def test_hand_built_maps_check_offsets_from():
    joints = builtin_map(MB).joints
    assert SkeletonMap("x", 1.0, "y", joints, "<t>", offsets_from=(("Neck", "Spine1"),)).offsets_from
    for bad in ({"Neck": "Spine1"}, (("Neck",),), (("Neck", 7),), [("Neck", "Spine1")], (("Neck", ""),)):
        with pytest.raises(SkeletonMapError, match=r"<t>: skeleton map 'x': offsets_from must be a tuple"):
            SkeletonMap("x", 1.0, "y", joints, "<t>", offsets_from=bad)


def test_missing_reports_absent_offsets_from_joints_and_detection_needs_them(flavours):
    mb = builtin_map(MB)
    names = _names(flavours["08_01.bvh"][0])
    assert mb.missing(names) == []
    assert mb.missing([n for n in names if n != "LeftShoulder"]) == ["offsets_from.LeftShoulder (LeftShoulder)"]
    assert mb.missing([n for n in names if n != "Spine1"]) == [
        "spine (Spine1)", "offsets_from.Neck (Spine1)", "offsets_from.LeftShoulder (Spine1)",
        "offsets_from.RightShoulder (Spine1)"]
    assert {"Neck", "LeftShoulder", "RightShoulder", "Spine1"} <= mb.bvh_joints
    with pytest.raises(SkeletonMapError, match=re.escape(
            "Closest built-in map 'cgspeed-motionbuilder' lacks 1 of 17 joints: offsets_from.Neck (Neck).")):
        detect_skeleton_map([n for n in names if n != "Neck"], "x.bvh")
    # apply() needs only the 17 joint entries
    assert mb.apply({n: np.zeros((1, 3)) for n in MB_JOINTS}).shape == (1, 17, 3)
    tds = builtin_map("cgspeed-3dsmax")
    names = _names(flavours["131_01.bvh"][0])
    assert tds.missing([n for n in names if n != "RightCollar"]) == ["offsets_from.RightCollar (RightCollar)"]
    for fixture, (expected, *_) in FLAVOURS.items():  # every flavour still detects to its own map
        assert detect_skeleton_map(_names(flavours[fixture][0]), fixture).name == expected


#: map -> (ASF, BVH, the BVH joint at the end of ASF upperback, {BVH joint: the ASF bone ending there}), and the
#: largest |restored rest position - ASF rest position| (cm) measured over those joints, relative to upperback's end.
#: The residual is |ASF thorax - ASF upperback| (direction x length): subject 131: thorax 1.98337 vs upperback
#: 1.99035 units, 0.0739 cm; subject 01: 2.06488 vs 2.05008 units, 0.5285 cm. Without offsets_from the gap is
#: the whole thorax bone (11.195 / 11.655 cm).
RESTORATION = {
    "cgspeed-3dsmax": (
        SHARED / "cmu-mocap-more" / "subjects" / "131" / "131.asf", FLAVOURS_DIR / "131_01.bvh", "Chest2",
        {"lowerneck": "thorax", "LeftCollar": "thorax", "RightCollar": "thorax", "Neck": "lowerneck",
         "Head": "upperneck", "Head_End": "head", "LeftShoulder": "lclavicle", "RightShoulder": "rclavicle"},
        0.07390),  # measured 0.073897 (lowerneck and the collars)
    MB: (
        FIXTURES / "amc-bvh-01_01" / "01.asf", MINI_BVH, "Spine1",
        {"Neck": "thorax", "LeftShoulder": "thorax", "RightShoulder": "thorax", "Neck1": "lowerneck",
         "Head": "upperneck", "Head_End": "head", "LeftArm": "lclavicle", "RightArm": "rclavicle"},
        0.5285),  # measured 0.528493 (RightArm)
}


@pytest.mark.parametrize("name", sorted(RESTORATION))
def test_offsets_from_restores_the_asf_thorax_end_to_the_measured_residual(name):
    asf_path, bvh_path, base, ends, measured_cm = RESTORATION[name]
    if not asf_path.is_file():
        pytest.skip(f"needs {asf_path}")
    asf, bvh, m = parse_asf(asf_path), parse_bvh(bvh_path), builtin_map(name)
    asf_ends = rest_bone_ends(asf)
    thorax_cm = asf.bones["thorax"].length * asf.metres_per_unit * 100
    # the residual is the ASF thorax vector less the donor OFFSET (the base joint's, = ASF upperback)
    donor = np.asarray(bvh.joint(base).offset)
    np.testing.assert_allclose(donor, asf_ends["upperback"] - asf_ends["lowerback"], atol=1e-4)
    gap_cm = np.linalg.norm(asf_ends["thorax"] - asf_ends["upperback"] - donor) * asf.metres_per_unit * 100
    assert gap_cm == pytest.approx(measured_cm, abs=1e-4)

    def error_cm(b) -> np.ndarray:
        rest = rest_positions(b)
        return np.array([np.linalg.norm((rest[j] - rest[base]) - (asf_ends[bone] - asf_ends["upperback"]))
                         for j, bone in ends.items()]) * asf.metres_per_unit * 100

    np.testing.assert_allclose(error_cm(bvh), thorax_cm, atol=1e-4)  # the file: one thorax bone short
    restored = error_cm(m.prepare(bvh))
    assert restored.max() <= 1.25 * measured_cm, restored
    assert restored.min() >= 0.75 * measured_cm, restored  # an approximation, not the ASF bone itself


# --- averaging, up axis, user maps -------------------------------------------------------------

def _map_text(name: str = "cgspeed-motionbuilder") -> str:
    return (SKELETONS_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def test_a_list_entry_averages_its_joints(tmp_path, flavours):
    _, pos = flavours["08_01.bvh"]
    text = _map_text().replace("pelvis: Hips ", "pelvis: [LeftUpLeg, RightUpLeg] ")
    text = text.replace("r_hip: RightUpLeg ", "r_hip: [RightUpLeg] ")  # one-name list == plain name
    (tmp_path / "avg.yaml").write_text(text)
    m = load_skeleton_map(tmp_path / "avg.yaml")
    assert m.joints[0] == ("LeftUpLeg", "RightUpLeg") and m.joints[1] == ("RightUpLeg",)
    p, ref = m.apply(pos), builtin_map("cgspeed-motionbuilder").apply(pos)
    mid = cmu_to_zup((pos["LeftUpLeg"] + pos["RightUpLeg"]) / 2 * CGSPEED_MPU)
    np.testing.assert_allclose(p[:, 0], mid, rtol=0, atol=1e-12)
    assert np.array_equal(p[:, 1:], ref[:, 1:])
    # the Daz head is the mean of the eyes
    _, dpos = flavours["12_01.bvh"]
    eyes = cmu_to_zup((dpos["leftEye"] + dpos["rightEye"]) / 2 * 0.01)
    np.testing.assert_allclose(builtin_map("cgspeed-daz").apply(dpos)[:, J["head"]], eyes, atol=1e-12)


def test_up_z_keeps_the_axes_and_up_y_turns_them():
    pos = {n: np.arange(6, dtype=np.float64).reshape(2, 3) + i for i, n in enumerate(MB_JOINTS)}
    y = builtin_map("cgspeed-motionbuilder")
    z = SkeletonMap("z", 2.0, "z", y.joints, "<test>")
    stacked = np.stack([pos[n] for n in MB_JOINTS], axis=1)
    assert np.array_equal(z.apply(pos), stacked * 2.0)
    assert np.array_equal(y.apply(pos), cmu_to_zup(stacked * y.metres_per_unit))
    assert np.array_equal(y.apply(pos)[..., 2], stacked[..., 1] * y.metres_per_unit)  # file y is up


def test_user_map_from_yaml_maps_a_renamed_daz_file(tmp_path):
    text = _map_text("cgspeed-daz").replace("name: cgspeed-daz", "name: my-daz")
    text = re.sub(r"(?m)^  r_knee: rShin\b", "  r_knee: rKnee", text)
    text = re.sub(r"(?m)^  l_ankle: lFoot\b", "  l_ankle: lAnkle", text)
    path = tmp_path / "my-daz.yaml"
    path.write_text(text)
    mine = load_skeleton_map(path)
    assert (mine.name, mine.source, mine.metres_per_unit) == ("my-daz", str(path), 0.01)
    renamed = parse_bvh_text(_renamed_daz_text(), "odd/12_01.bvh")
    assert mine.missing(_names(renamed)) == []
    original = parse_bvh(FLAVOURS_DIR / "12_01.bvh")
    expected = builtin_map("cgspeed-daz").apply(bvh_forward_kinematics(original))
    assert np.array_equal(mine.apply(bvh_forward_kinematics(renamed)), expected)


def test_tpose_frame_is_optional_and_defaults_to_false(tmp_path):
    text = re.sub(r"(?m)^tpose_frame: .*\n", "", _map_text(MB))
    assert "tpose_frame:" not in text
    (tmp_path / "m.yaml").write_text(text)
    m = load_skeleton_map(tmp_path / "m.yaml")
    assert m.tpose_frame is False and m.joints == builtin_map(MB).joints
    assert SkeletonMap("x", 1.0, "z", m.joints, "<test>").tpose_frame is False


def test_maps_and_errors_pickle():  # convert may map files in worker processes
    m = builtin_map("cgspeed-daz")
    assert pickle.loads(pickle.dumps(m)) == m
    err = pickle.loads(pickle.dumps(SkeletonMapError("x.yaml: up: bad")))
    assert isinstance(err, SkeletonMapError) and str(err) == "x.yaml: up: bad"


# --- strict validation ------------------------------------------------------------------------------

def _offsets(text: str, block: str) -> str:
    """The map text with its offsets_from block replaced by ``block``."""
    out = re.sub(r"(?m)^offsets_from:\n(  .*\n)+", block + "\n", text)
    assert out != text
    return out


def _unit(value: str):
    return lambda t: re.sub(r"(?m)^metres_per_unit: .*$", f"metres_per_unit: {value}", t)


def _line_of(snippet: str):
    """Expected text naming the 1-based line where ``snippet`` starts in the edited map."""
    return lambda text: f"invalid YAML (line {text[: text.index(snippet)].count(chr(10)) + 1}, column 3)"


BAD_MAPS = [
    # (id, edit of the MotionBuilder YAML text, substrings the message must contain)
    ("yaml-syntax", lambda t: t.replace("name: cgspeed-motionbuilder", "name: [oops"), ["invalid YAML (line ", ", column 1)"]),
    ("not-a-mapping", lambda t: "- Hips\n- Head\n", ["must be a YAML mapping", "list", "'Hips'"]),
    ("empty-file", lambda t: "# nothing\n", ["must be a YAML mapping", "None"]),
    ("unknown-key", lambda t: t + "scale: 2\n", ["unknown key 'scale'", "value 2"]),
    ("missing-key", lambda t: re.sub(r"(?m)^up: y.*\n", "", t), ["missing key 'up'"]),
    ("duplicate-key", lambda t: t.replace("  r_hip: RightUpLeg", "  pelvis: Hips\n  r_hip: RightUpLeg"),
     [_line_of("  pelvis: Hips\n  r_hip"), "duplicate key 'pelvis'"]),
    ("unknown-joint", lambda t: t.replace("  neck: Head ", "  nose: Head_End\n  neck: Head "),
     ["joints", "unknown Human3.6M-17 joint 'nose'", "Head_End"]),
    ("missing-joint", lambda t: re.sub(r"(?m)^  r_knee: .*\n", "", t), ["joints", "missing", "r_knee"]),
    ("negative-unit", _unit("-0.01"), ["metres_per_unit", "-0.01"]),
    ("zero-unit", _unit("0"), ["metres_per_unit", "got 0"]),
    ("nan-unit", _unit(".nan"), ["metres_per_unit", "nan"]),
    ("inf-unit", _unit(".inf"), ["metres_per_unit", "inf"]),
    ("string-unit", _unit("cm"), ["metres_per_unit", "'cm'"]),
    ("bool-unit", _unit("true"), ["metres_per_unit", "True"]),
    ("tpose-not-bool", lambda t: re.sub(r"(?m)^tpose_frame: true", "tpose_frame: 1", t), ["tpose_frame", "got 1"]),
    ("bad-up", lambda t: re.sub(r"(?m)^up: y", "up: x", t), ["up:", "'x'"]),
    ("empty-list", lambda t: t.replace("pelvis: Hips ", "pelvis: [] "), ["joints.pelvis", "empty list []"]),
    ("int-name", lambda t: t.replace("pelvis: Hips ", "pelvis: 123 "), ["joints.pelvis", "123", "must be strings"]),
    ("int-in-list", lambda t: t.replace("pelvis: Hips ", "pelvis: [Hips, 7] "), ["joints.pelvis", "7 (int)"]),
    ("null-name", lambda t: t.replace("pelvis: Hips ", "pelvis: "), ["joints.pelvis", "None"]),
    ("space-in-name", lambda t: t.replace("pelvis: Hips ", "pelvis: 'Hi ps' "), ["joints.pelvis", "'Hi ps'"]),
    ("joints-not-mapping", lambda t: t.split("joints:")[0] + "joints: [Hips, Head]\n", ["joints", "['Hips', 'Head']"]),
    ("empty-name", lambda t: t.replace("name: cgspeed-motionbuilder", "name: ''"), ["name", "''"]),
    ("offsets-not-mapping", lambda t: _offsets(t, "offsets_from: [Neck, Spine1]"),
     ["offsets_from: must be a mapping", "['Neck', 'Spine1']"]),
    ("offsets-empty-list", lambda t: _offsets(t, "offsets_from: []"), ["offsets_from: must be a mapping", "[]"]),
    ("offsets-false", lambda t: _offsets(t, "offsets_from: false"), ["offsets_from: must be a mapping", "False"]),
    ("offsets-list-value", lambda t: _offsets(t, "offsets_from:\n  Neck: [Spine1, Spine]"),
     ["offsets_from.Neck: must be one BVH joint name", "['Spine1', 'Spine']"]),
    ("offsets-int-value", lambda t: _offsets(t, "offsets_from:\n  Neck: 7"),
     ["offsets_from.Neck", "7 (int)", "must be strings"]),
    ("offsets-int-key", lambda t: _offsets(t, "offsets_from:\n  7: Spine1"), ["offsets_from", "7 (int)"]),
    ("offsets-null-value", lambda t: _offsets(t, "offsets_from:\n  Neck:"), ["offsets_from.Neck", "None"]),
    ("offsets-space-in-name", lambda t: _offsets(t, "offsets_from:\n  Neck: 'Spi ne1'"),
     ["offsets_from.Neck", "bad BVH joint name 'Spi ne1'"]),
    ("offsets-empty-name", lambda t: _offsets(t, "offsets_from:\n  Neck: ''"), ["offsets_from.Neck", "''"]),
    ("offsets-duplicate-joint", lambda t: _offsets(t, "offsets_from:\n  Neck: Spine1\n  Neck: Spine"),
     ["duplicate key 'Neck'"]),
]


@pytest.mark.parametrize("edit, expected", [b[1:] for b in BAD_MAPS], ids=[b[0] for b in BAD_MAPS])
def test_invalid_maps_are_rejected_naming_file_key_and_value(tmp_path, edit, expected):
    path = tmp_path / "bad.yaml"
    text = edit(_map_text(MB))
    assert text != _map_text(MB)
    path.write_text(text)
    with pytest.raises(SkeletonMapError) as e:
        load_skeleton_map(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    for s in expected:
        s = s(text) if callable(s) else s
        assert s in msg, (s, msg)
    assert isinstance(e.value, ValueError)


def test_unreadable_map_file_names_the_path(tmp_path):
    with pytest.raises(SkeletonMapError, match=re.escape(str(tmp_path / "none.yaml"))):
        load_skeleton_map(tmp_path / "none.yaml")


# --- fixtures and the full shared data (optional) -----------------------------------------------

def test_fixtures_are_small_cuts():
    for f in FLAVOURS:
        path = FLAVOURS_DIR / f
        assert path.stat().st_size < 60_000
        assert parse_bvh(path).n_frames == 12


@needs_shared
def test_fixtures_equal_the_shared_files_but_for_the_frames_line():
    for f in FLAVOURS:
        full = (SHARED / "cmu-mocap-more" / "bvh" / f).read_bytes().splitlines(keepends=True)
        cut = (FLAVOURS_DIR / f).read_bytes().splitlines(keepends=True)
        differ = [i for i, (a, b) in enumerate(zip(full, cut)) if a != b]
        assert len(differ) == 1 and cut[differ[0]].split() == [b"Frames:", b"12"], f
        assert len(cut) == differ[0] + 2 + 12


@needs_shared
def test_every_shared_bvh_detects_to_its_flavour():
    expected = {"07": MB, "08": MB, "01": MB, "12": "cgspeed-daz", "131": "cgspeed-3dsmax"}
    files = sorted((SHARED / "cmu-mocap-more" / "bvh").glob("*.bvh")) + [SHARED / "cmu-mocap" / "bvh" / "01_01.bvh"]
    assert len(files) == 19
    for path in files:
        names = [j.name for j in parse_bvh(path).joints]
        assert detect_skeleton_map(names, str(path)).name == expected[path.stem.split("_")[0]], path


@needs_shared
def test_3dsmax_unit_matches_subject_131_asf_bone_lengths():
    m = builtin_map("cgspeed-3dsmax")
    asf = parse_asf(SHARED / "cmu-mocap-more" / "subjects" / "131" / "131.asf")
    bvh = parse_bvh(FLAVOURS_DIR / "131_01.bvh")
    # each 3dsMax joint's OFFSET is the ASF bone that ends there
    bones = {"LeftHip": "lhipjoint", "LeftKnee": "lfemur", "LeftAnkle": "ltibia", "RightHip": "rhipjoint",
             "RightKnee": "rfemur", "RightAnkle": "rtibia", "Chest": "lowerback", "Chest2": "upperback",
             "Neck": "lowerneck", "Head": "upperneck", "Head_End": "head", "LeftShoulder": "lclavicle",
             "LeftElbow": "lhumerus", "LeftWrist": "lradius", "RightShoulder": "rclavicle",
             "RightElbow": "rhumerus", "RightWrist": "rradius"}
    for joint, bone in bones.items():
        bvh_m = np.linalg.norm(bvh.joint(joint).offset) * m.metres_per_unit
        asf_m = asf.bones[bone].length * asf.metres_per_unit
        assert abs(bvh_m - asf_m) < 1e-5, (joint, bvh_m, asf_m)
