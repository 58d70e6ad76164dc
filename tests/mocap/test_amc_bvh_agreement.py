"""CMU take 01_01 as ASF/AMC and as cgspeed BVH, both as vipe-ray converts them: they agree to 0.53 cm.

Fixtures: ``tests/fixtures/amc-bvh-01_01`` (01.asf, the first 40 frames of 01_01.amc) and
``tests/fixtures/cmu-mini/bvh/01_01.bvh`` (the first 40 motion lines, T-pose included); see the README there.
The comparison itself is ``bench/amc_bvh_agreement.py``; reports/data/amc_bvh_agreement.md has the numbers.
Two BVH versions (see the bench): ``converted`` (the rows ``convert_bvh_clip`` writes; the skeleton map's
``offsets_from`` puts back the ASF ``thorax`` bone that cgspeed dropped, using the upper back's OFFSET) and
``cgspeed`` (the same map without ``prepare``: the file's own geometry, 11.655 cm short at thorax and above,
which is why ``offsets_from`` exists).

Every bound is a maximum MEASURED on the full clip (2751 aligned frames, ``python bench/amc_bvh_agreement.py``
on the shared data) times ``MARGIN``; the measured values are written below, per H3.6M joint in
VideoPose3D order (pelvis, r_hip, r_knee, r_ankle, l_hip, l_knee, l_ankle, spine, thorax, neck, head,
l_shoulder, l_elbow, l_wrist, r_shoulder, r_elbow, r_wrist), in centimetres.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, load_bench

bench = load_bench("amc_bvh_agreement")

FIXTURE = REPO / "tests" / "fixtures" / "amc-bvh-01_01"
FIXTURE_BVH = REPO / "tests" / "fixtures" / "cmu-mini" / "bvh" / "01_01.bvh"
FIXTURE_PATHS = (FIXTURE / "01.asf", FIXTURE / "01_01.amc", FIXTURE_BVH)
SHARED = bench.DEFAULT_SHARED  # <repo>/../shared/data
SHARED_PATHS = tuple(SHARED / rel for rel in (bench.ASF_REL, bench.AMC_REL, bench.BVH_REL))

MARGIN = 1.25

#: Full-clip maximum |converted BVH - AMC| per joint (cm), rounded up in the 4th significant digit.
#: Pelvis..spine: rounding of the BVH's 5-decimal text and float32 rows (<= 5 micrometres). Thorax and above:
#: the upper back's OFFSET standing in for the ASF thorax bone; the two rest vectors differ by 0.5285 cm, which
#: every joint from the thorax up carries in every frame (0.5280..0.5289 cm), so Procrustes spreads 0.1-0.4 cm.
MEASURED_MAX_CM = {
    "raw": [0.0004026, 0.0004176, 0.0004416, 0.0004889, 0.0004261, 0.0004559, 0.0004817, 0.0004555,
            0.5289, 0.5289, 0.5289, 0.5289, 0.5289, 0.5289, 0.5290, 0.5289, 0.5289],
    "pelvis-aligned": [0.0, 0.00003863, 0.0001218, 0.0002496, 0.00004309, 0.0001194, 0.0002255, 0.00008597,
                       0.5286, 0.5286, 0.5287, 0.5286, 0.5286, 0.5287, 0.5287, 0.5286, 0.5287],
    "rigid Procrustes": [0.2870, 0.2505, 0.2156, 0.1577, 0.2487, 0.1993, 0.1561, 0.3791,
                         0.1124, 0.08501, 0.08343, 0.1299, 0.2302, 0.2781, 0.1249, 0.2434, 0.2897],
    "similarity Procrustes": [0.2859, 0.2513, 0.1679, 0.1247, 0.2489, 0.1533, 0.1272, 0.3792,
                              0.09778, 0.07640, 0.07819, 0.1106, 0.2177, 0.2779, 0.1132, 0.2459, 0.2890],
}
#: Full-clip maximum NP-MPJPE (torso units of the target) of the same instant in the two formats, converted BVH:
#: 27x under kappa = 0.1 both ways (min 0.003285 / 0.003288).
MEASURED_MAX_NP_MPJPE = {"BVH onto AMC": 0.003665, "AMC onto BVH": 0.003672}
#: Full-clip maximum | |converted BVH - AMC| - |ASF thorax - ASF upperback| | over thorax..r_wrist (cm): the
#: residual is that rest-vector gap (0.52846 cm) turned with the chest, up to the files' rounding.
MEASURED_MAX_GAP_DEVIATION_CM = 0.0004663

#: The file's own geometry (cgspeed version), kept as the reason for offsets_from. Full-clip maximum
#: |cgspeed BVH + ASF thorax bone vector - AMC| over thorax..r_wrist (cm); NP-MPJPE maxima as above.
MEASURED_MAX_THORAX_RESIDUAL_CM = 0.0005010
MEASURED_MAX_NP_MPJPE_CGSPEED = {"BVH onto AMC": 0.09536, "AMC onto BVH": 0.1174}
THORAX_BONE_UNITS = 2.06488  # subject 01's ASF thorax length; x (1 / 0.45) * 0.0254 m = 0.116551 m


@pytest.fixture(scope="module")
def fixture_result():
    return bench.agreement(*FIXTURE_PATHS)


def kappa() -> float:
    from vipe_ray.config import load_config

    return load_config(None).mining.kappa


def check_bounds(result, asf_path) -> None:
    """Converted BVH: per-joint maxima under MARGIN x the measured full-clip maxima; NP-MPJPE likewise, and both
    directions a match at kappa; the upper-body residual is the ASF thorax/upperback rest-vector gap."""
    stats = result.stats["converted"]
    for name, measured in MEASURED_MAX_CM.items():
        got = stats[name][:, 3]
        bound = MARGIN * np.asarray(measured)
        over = {bench.H36M17_JOINTS[j]: (round(float(got[j]), 6), float(bound[j]))
                for j in np.flatnonzero(got > bound)}
        assert not over, f"{name}: joint max (cm) over bound: {over}"
    for name, measured in MEASURED_MAX_NP_MPJPE.items():
        e = result.np_mpjpe["converted"][name]
        assert e.max() <= MARGIN * measured and (e <= kappa()).all(), name
    gap = bench.stand_in_gap_cm(bench.parse_asf(asf_path))
    assert gap == pytest.approx(0.52846, abs=1e-5)
    err = bench.above_thorax_error_cm(result.amc, result.bvh["converted"])
    assert np.abs(err - gap).max() <= MARGIN * MEASURED_MAX_GAP_DEVIATION_CM


def check_cgspeed_explanation(result, asf_path, amc_path) -> None:
    """cgspeed version: adding the ASF thorax bone vector (start -> end, per frame) to every joint above it
    reproduces the AMC joints; pelvis..spine are the converted rows bit for bit."""
    thorax = bench.thorax_bone_vectors(asf_path, amc_path, result.amc_frames)
    metres = THORAX_BONE_UNITS * (1.0 / 0.45) * 0.0254
    assert np.allclose(np.linalg.norm(thorax, axis=-1), metres, atol=1e-9)
    residual = bench.thorax_residual_cm(result.amc, result.bvh["cgspeed"], thorax)
    assert residual <= MARGIN * MEASURED_MAX_THORAX_RESIDUAL_CM
    err = bench.above_thorax_error_cm(result.amc, result.bvh["cgspeed"])
    assert np.abs(err - 100 * metres).max() < 0.001  # measured 11.65485..11.65528 cm: one thorax bone
    shared = bench.SHARED_CHAIN
    assert np.array_equal(result.bvh["cgspeed"][:, shared], result.bvh["converted"][:, shared])
    for name, measured in MEASURED_MAX_NP_MPJPE_CGSPEED.items():
        assert result.np_mpjpe["cgspeed"][name].max() <= MARGIN * measured, name


def test_converted_version_is_convert_bvh_clip_output():
    from vipe_ray.mocap.asf import read_text
    from vipe_ray.mocap.convert import convert_bvh_clip

    lines, versions = bench.bvh_joints(FIXTURE_BVH)
    clip, smap = convert_bvh_clip(read_text(FIXTURE_BVH), "01_01.bvh", 1)
    assert smap.name == bench.MAP_NAME and dict(smap.offsets_from) == dict.fromkeys(
        ("Neck", "LeftShoulder", "RightShoulder"), "Spine1")
    assert lines.tolist() == clip.frames.tolist() == list(range(1, 40))  # T-pose line 0 dropped
    assert np.array_equal(versions["converted"], clip.joints3d.astype(np.float64))


def test_frame_alignment_is_bvh_line_equals_amc_frame_number(fixture_result):
    # BVH motion line k (line 0 = the converter's T-pose, dropped) is AMC frame number k: offset 0, 39 pairs.
    assert fixture_result.offset == 0
    assert fixture_result.amc_frames.tolist() == list(range(1, 40))
    numbers, amc, lines, versions = bench._all_frames(FIXTURE_PATHS)
    bvh = versions["converted"]
    # On the joints whose bone chain both files share, offset 0 agrees to micrometres and +-1 does not.
    best, errors = bench.find_offset(numbers, amc, lines, bvh, max_offset=3, joints=bench.SHARED_CHAIN)
    assert best == 0 and errors[0] < 1e-5 and min(errors[-1], errors[1]) > 20 * errors[0]
    # A shifted BVH is found at its shift: 3 lines removed after the T-pose, or 2 lines inserted.
    cut = (lines[:-3], bvh[3:])
    padded = (np.arange(1, len(lines) + 3), np.concatenate([bvh[:1], bvh[:1], bvh]))
    assert bench.find_offset(numbers, amc, *cut)[0] == -3
    assert bench.find_offset(numbers, amc, *padded)[0] == 2


def test_fixture_converted_within_full_clip_bounds_and_a_match_at_kappa(fixture_result):
    check_bounds(fixture_result, FIXTURE_PATHS[0])


def test_fixture_cgspeed_offset_is_the_dropped_asf_thorax_bone(fixture_result):
    check_cgspeed_explanation(fixture_result, *FIXTURE_PATHS[:2])
    # Without offsets_from the same instant matches (<= kappa) only with the AMC pose as target: the cgspeed
    # torso unit is 0.116 m shorter (measured 0.086..0.095 BVH onto AMC, 0.106..0.117 AMC onto BVH).
    np_cgspeed = fixture_result.np_mpjpe["cgspeed"]
    assert (np_cgspeed["BVH onto AMC"] <= kappa()).all() and (np_cgspeed["AMC onto BVH"] > kappa()).all()


def test_bvh_hierarchy_zeroes_exactly_the_thorax_and_wrist_bones():
    # The cgspeed HIERARCHY repeats every ASF bone vector as an OFFSET except thorax (Neck, LeftShoulder and
    # RightShoulder sit at Spine1) and lwrist/rwrist (LeftFingerBase/LThumb sit at LeftHand; not H3.6M joints).
    skeleton, bvh = bench.parse_asf(FIXTURE_PATHS[0]), bench.parse_bvh(FIXTURE_PATHS[2])
    compared, bad = bench.hierarchy_mismatches(skeleton, bvh)
    assert compared == 34
    assert sorted({row[0] for row in bad}) == ["lwrist", "rwrist", "thorax"]
    assert all(row[4] == 0.0 for row in bad)
    # prepare() gives the three thorax children Spine1's OFFSET (upperback, 0.1157 m for the 0.1166 m thorax)
    _, bad = bench.hierarchy_mismatches(skeleton, bench.builtin_map(bench.MAP_NAME).prepare(bvh))
    thorax = [row for row in bad if row[0] == "thorax"]
    assert len(thorax) == 3 and all(abs(row[4] - 2.05008 * skeleton.metres_per_unit) < 1e-6 for row in thorax)


@pytest.mark.skipif(not all(p.is_file() for p in SHARED_PATHS), reason=f"shared data absent ({SHARED})")
def test_full_clip_within_bounds():
    result = bench.agreement(*SHARED_PATHS)
    assert result.offset == 0 and len(result.amc) == 2751
    check_bounds(result, SHARED_PATHS[0])
    check_cgspeed_explanation(result, *SHARED_PATHS[:2])
