"""Do CMU's ASF/AMC and the cgspeed BVH of the same take give the same Human3.6M-17 joints?

    python bench/amc_bvh_agreement.py [--shared PATH] [--max-offset N]

Take 01_01 (subject 01) exists in the shared data twice: ``cmu-mocap-more/subjects/01/01.asf`` +
``01_01.amc`` (CMU's originals, frames numbered from 1) and ``cmu-mocap/bvh/01_01.bvh`` (Bruce Hahne's
cgspeed MotionBuilder-friendly conversion, motion line 0 a T-pose the converter added). Both go through the
product's per-take converters, every frame (step 1), as the table stores them (float32), compared in float64:
:func:`convert_amc_clip`, and :func:`convert_bvh_clip` (skeleton map detected: ``cgspeed-motionbuilder``,
``smap.apply(bvh_forward_kinematics(smap.prepare(bvh)))``, line 0 dropped). The BVH is compared in two versions:

- ``converted``: the rows vipe-ray writes. The map's ``offsets_from`` gives Neck, LeftShoulder and
  RightShoulder the rest OFFSET of Spine1 (the ASF ``upperback`` bone), standing in for the ASF ``thorax``
  bone that cgspeed dropped.
- ``cgspeed``: the same map applied WITHOUT ``prepare``, i.e. the geometry the file defines (those three
  joints at Spine1 with OFFSET 0): why ``offsets_from`` exists.

The script finds the BVH-line / AMC-frame offset that minimises the joint error, then prints for both versions
per-joint differences (cm) raw, pelvis-aligned and after per-frame rigid and similarity Procrustes alignment,
what explains the upper-body difference, segment lengths, the BVH HIERARCHY offsets that disagree with the ASF
bone vectors, and the project's NP-MPJPE between the formats (both directions) against kappa.

``--shared`` defaults to ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package

from vipe_ray.config import load_config  # noqa: E402
from vipe_ray.prvipe.matching import matches, np_mpjpe, procrustes_align  # noqa: E402
from vipe_ray.mocap import (  # noqa: E402
    H36M17_JOINTS, builtin_map, bvh_forward_kinematics, cmu_to_zup, forward_kinematics, parse_amc, parse_asf,
    parse_asf_text, parse_bvh, parse_bvh_text,
)
from vipe_ray.mocap.asf import read_text  # noqa: E402
from vipe_ray.mocap.bvh import rest_positions  # noqa: E402
from vipe_ray.mocap.kinematics import rest_bone_ends  # noqa: E402
from vipe_ray.mocap.convert import convert_amc_clip, convert_bvh_clip  # noqa: E402

DEFAULT_SHARED = REPO.parent / "shared" / "data"
ASF_REL = "cmu-mocap-more/subjects/01/01.asf"
AMC_REL = "cmu-mocap-more/subjects/01/01_01.amc"
BVH_REL = "cmu-mocap/bvh/01_01.bvh"
#: The built-in skeleton map that detection picks for the cgspeed MotionBuilder-friendly BVH.
MAP_NAME = "cgspeed-motionbuilder"
#: The BVH versions compared with the AMC (see the module doc).
VERSIONS = ("converted", "cgspeed")

#: ASF bone -> the cgspeed (MotionBuilder-friendly) BVH joint at the bone's START (shared cmu-mocap README).
ASF_TO_BVH = {
    "root": "Hips", "lowerback": "LowerBack", "upperback": "Spine", "thorax": "Spine1",
    "lowerneck": "Neck", "upperneck": "Neck1", "head": "Head",
    **{f"{s}{b}": f"{side}{j}" for s, side in (("l", "Left"), ("r", "Right")) for b, j in (
        ("femur", "UpLeg"), ("tibia", "Leg"), ("foot", "Foot"), ("toes", "ToeBase"), ("clavicle", "Shoulder"),
        ("humerus", "Arm"), ("radius", "ForeArm"), ("wrist", "Hand"), ("hand", "FingerBase"))},
    "lhipjoint": "LHipJoint", "rhipjoint": "RHipJoint", "lfingers": "LFingers", "rfingers": "RFingers",
    "lthumb": "LThumb", "rthumb": "RThumb",
}

#: H3.6M-17 segments compared between the skeletons: name -> (joint, joint).
SEGMENTS: dict[str, tuple[str, str]] = {
    "pelvis-r_hip": ("pelvis", "r_hip"), "pelvis-l_hip": ("pelvis", "l_hip"),
    "r_thigh": ("r_hip", "r_knee"), "l_thigh": ("l_hip", "l_knee"),
    "r_shin": ("r_knee", "r_ankle"), "l_shin": ("l_knee", "l_ankle"),
    "pelvis-spine": ("pelvis", "spine"), "spine-thorax": ("spine", "thorax"),
    "pelvis-thorax": ("pelvis", "thorax"), "thorax-neck": ("thorax", "neck"), "neck-head": ("neck", "head"),
    "thorax-l_shoulder": ("thorax", "l_shoulder"), "thorax-r_shoulder": ("thorax", "r_shoulder"),
    "l_upper_arm": ("l_shoulder", "l_elbow"), "r_upper_arm": ("r_shoulder", "r_elbow"),
    "l_forearm": ("l_elbow", "l_wrist"), "r_forearm": ("r_elbow", "r_wrist"),
    "shoulder_width": ("l_shoulder", "r_shoulder"),
}
J = {name: k for k, name in enumerate(H36M17_JOINTS)}
ALL_JOINTS = list(range(len(H36M17_JOINTS)))
#: Joints whose bone chain from the root is the same in both files (pelvis, hips, knees, ankles, spine);
#: thorax and everything above it hang from the ASF ``thorax`` bone that the BVH drops.
SHARED_CHAIN = [J[n] for n in ("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "spine")]
ABOVE_THORAX = [j for j in ALL_JOINTS if j not in SHARED_CHAIN]


def amc_joints(asf_path: Path, amc_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """AMC frame numbers (1-based) and their (F, 17, 3) joints as :func:`convert_amc_clip` converts them
    (metres, z-up, float32 as stored; returned as float64)."""
    skeleton = parse_asf_text(read_text(asf_path), str(asf_path))
    clip = convert_amc_clip(skeleton, read_text(amc_path), str(amc_path), Path(asf_path).stem, 1)
    return clip.frames.astype(np.int64) + 1, clip.joints3d.astype(np.float64)


def bvh_joints(bvh_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """BVH motion-line numbers (1.., the T-pose line 0 dropped as the converter drops it) and their (F, 17, 3)
    joints in each of :data:`VERSIONS` (metres, z-up, float32 as stored; returned as float64).

    ``converted`` is :func:`convert_bvh_clip`'s output; ``cgspeed`` is the same map on the same lines, without
    :meth:`~vipe_ray.mocap.skeleton.SkeletonMap.prepare`.
    """
    text = read_text(bvh_path)
    clip, smap = convert_bvh_clip(text, str(bvh_path), 1)
    if smap.name != MAP_NAME:
        raise ValueError(f"{bvh_path}: detected skeleton map {smap.name!r}, expected {MAP_NAME!r}")
    raw = smap.apply(bvh_forward_kinematics(parse_bvh_text(text, str(bvh_path)), clip.frames))
    return clip.frames.astype(np.int64), {"converted": clip.joints3d.astype(np.float64),
                                          "cgspeed": raw.astype(np.float32).astype(np.float64)}


def pair(amc_numbers: np.ndarray, amc: np.ndarray, bvh_lines: np.ndarray, bvh: np.ndarray, offset: int):
    """Pair BVH line ``n + offset`` with AMC frame number ``n`` (``bvh_lines`` ascending, the line of each row
    of ``bvh``). Returns (amc joints, bvh joints, AMC frame numbers) of the pairs, in frame order."""
    want = amc_numbers + offset
    at = np.minimum(np.searchsorted(bvh_lines, want), len(bvh_lines) - 1)
    keep = bvh_lines[at] == want
    return amc[keep], bvh[at[keep]], amc_numbers[keep]


def mean_error(a: np.ndarray, b: np.ndarray, joints=ALL_JOINTS) -> float:
    """Mean distance (m) of ``joints`` over all frames."""
    return float(np.linalg.norm(a[:, joints] - b[:, joints], axis=-1).mean())


def find_offset(amc_numbers, amc, bvh_lines, bvh, max_offset: int = 10, min_pairs: int = 10,
                joints=ALL_JOINTS) -> tuple[int, dict[int, float]]:
    """The offset (BVH line - AMC frame number) with the least mean error of ``joints``, and each tried one's."""
    errors = {}
    for offset in range(-max_offset, max_offset + 1):
        a, b, _ = pair(amc_numbers, amc, bvh_lines, bvh, offset)
        if len(a) >= min_pairs:
            errors[offset] = mean_error(a, b, joints)
    if not errors:
        raise ValueError(f"fewer than {min_pairs} paired frames for every offset within +-{max_offset}")
    return min(errors, key=errors.get), errors


def pelvis_aligned(poses: np.ndarray) -> np.ndarray:
    """Poses translated so that each frame's pelvis is at the origin."""
    return poses - poses[:, J["pelvis"]][:, None]


def rigid_align(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-frame Kabsch: rotate and translate ``source`` onto ``target`` (no scale, no reflection), (F, 17, 3)."""
    mu_s, mu_t = source.mean(1, keepdims=True), target.mean(1, keepdims=True)
    u, _, vh = np.linalg.svd((source - mu_s).transpose(0, 2, 1) @ (target - mu_t))
    d = np.sign(np.linalg.det(u @ vh))
    u[:, :, 2] *= d[:, None]
    return (source - mu_s) @ (u @ vh) + mu_t


def similarity_align(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-frame similarity Procrustes of ``source`` onto ``target`` (the project's :func:`procrustes_align`)."""
    return procrustes_align(torch.from_numpy(source), torch.from_numpy(target)).numpy()


def joint_stats_cm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(17, 4) per-joint distance mean, median, p95, max over frames, in centimetres."""
    d = np.linalg.norm(a - b, axis=-1) * 100.0
    return np.stack([d.mean(0), np.median(d, 0), np.percentile(d, 95, axis=0), d.max(0)], axis=1)


def comparisons(amc: np.ndarray, bvh: np.ndarray) -> dict[str, np.ndarray]:
    """Per-joint stats (cm) of BVH vs AMC: raw, pelvis-aligned, rigid and similarity Procrustes per frame."""
    return {
        "raw": joint_stats_cm(bvh, amc),
        "pelvis-aligned": joint_stats_cm(pelvis_aligned(bvh), pelvis_aligned(amc)),
        "rigid Procrustes": joint_stats_cm(rigid_align(bvh, amc), amc),
        "similarity Procrustes": joint_stats_cm(similarity_align(bvh, amc), amc),
    }


def segment_lengths(poses: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame length (m) of each of :data:`SEGMENTS`."""
    return {name: np.linalg.norm(poses[:, J[a]] - poses[:, J[b]], axis=-1) for name, (a, b) in SEGMENTS.items()}


def format_np_mpjpe(amc: np.ndarray, bvh: np.ndarray) -> dict[str, np.ndarray]:
    """The project's NP-MPJPE per frame, both directions (torso units of the target)."""
    a, b = torch.from_numpy(amc), torch.from_numpy(bvh)
    return {"BVH onto AMC": np_mpjpe(b, a).numpy(), "AMC onto BVH": np_mpjpe(a, b).numpy()}


def lag_np_mpjpe(poses: np.ndarray, lags=(1, 4, 8, 16, 24)) -> dict[int, float]:
    """Median NP-MPJPE between frames ``n`` and ``n + lag`` of one format: how far the pose moves."""
    p = torch.from_numpy(poses)
    return {lag: float(np_mpjpe(p[lag:], p[:-lag]).median()) for lag in lags if lag < len(poses)}


def thorax_bone_vectors(asf_path: Path, amc_path: Path, amc_frames: np.ndarray) -> np.ndarray:
    """(F, 3) vector from the start to the end of the ASF ``thorax`` bone at the given AMC frame numbers, m, z-up."""
    skeleton = parse_asf(asf_path)
    ends = forward_kinematics(skeleton, parse_amc(amc_path, skeleton))
    return cmu_to_zup(ends["thorax"] - ends["upperback"])[amc_frames - 1]


def thorax_residual_cm(amc: np.ndarray, bvh: np.ndarray, thorax: np.ndarray) -> float:
    """Largest |BVH + thorax bone vector - AMC| (cm) over the joints above the thorax: what the dropped bone
    leaves unexplained."""
    moved = bvh[:, ABOVE_THORAX] + thorax[:, None]
    return float(np.linalg.norm(moved - amc[:, ABOVE_THORAX], axis=-1).max() * 100.0)


def above_thorax_error_cm(amc: np.ndarray, bvh: np.ndarray) -> np.ndarray:
    """(F, 9) |BVH - AMC| (cm) of thorax and the joints above it."""
    return np.linalg.norm(bvh[:, ABOVE_THORAX] - amc[:, ABOVE_THORAX], axis=-1) * 100.0


def bone_vector(skeleton, name: str) -> np.ndarray:
    """An ASF bone's rest vector (direction x length), ASF length units, CMU axes."""
    bone = skeleton.bones[name]
    return np.asarray(bone.direction) * bone.length


def stand_in_gap_cm(skeleton) -> float:
    """|ASF thorax - ASF upperback| rest vectors (cm): what ``offsets_from`` (upperback's OFFSET for the dropped
    thorax bone) leaves, in every frame, at thorax and above (both vectors turn with the same chest rotation)."""
    gap = bone_vector(skeleton, "thorax") - bone_vector(skeleton, "upperback")
    return float(np.linalg.norm(gap) * skeleton.metres_per_unit * 100.0)


def hierarchy_mismatches(skeleton, bvh, tol_units: float = 1e-3) -> tuple[int, list[tuple]]:
    """ASF bone vectors vs the BVH rest-pose vectors between the joints at the bone's start and end.

    The joint at a bone's end is the BVH joint of each ASF child bone (the End Site for a leaf bone).
    Returns (pairs compared, [(bone, start joint, end joint, ASF length m, BVH length m)] of the mismatches).
    """
    ends, rest = rest_bone_ends(skeleton), rest_positions(bvh)
    scale = skeleton.metres_per_unit
    compared, bad = 0, []
    for name in skeleton.topological_order():
        start = ASF_TO_BVH[name]
        vec = ends[name] - ends[skeleton.parent[name]]
        for end in [ASF_TO_BVH[c] for c in skeleton.children.get(name, ())] or [f"{start}_End"]:
            compared += 1
            got = rest[end] - rest[start]
            if np.abs(got - vec).max() > tol_units:
                bad.append((name, start, end, np.linalg.norm(vec) * scale, np.linalg.norm(got) * scale))
    return compared, bad


class Agreement(NamedTuple):
    """Everything the report prints; :func:`agreement` builds it (a NamedTuple: loadable without a package)."""

    offset: int
    offset_errors: dict[int, float]  # over all 17 joints of the converted BVH
    amc_frames: np.ndarray  # AMC frame numbers of the aligned pairs
    amc: np.ndarray  # (F, 17, 3) aligned AMC joints, m
    bvh: dict[str, np.ndarray]  # version -> (F, 17, 3) aligned BVH joints, m
    stats: dict[str, dict[str, np.ndarray]]  # version -> comparisons()
    np_mpjpe: dict[str, dict[str, np.ndarray]]  # version -> format_np_mpjpe()


def _all_frames(paths):
    """AMC frame numbers, AMC joints, BVH line numbers and BVH joints by version of ``paths`` = (asf, amc, bvh)."""
    return (*amc_joints(paths[0], paths[1]), *bvh_joints(paths[2]))


def agreement(asf_path: Path, amc_path: Path, bvh_path: Path, max_offset: int = 10) -> Agreement:
    """Convert both formats, align frames at the best offset (converted BVH, all joints), compare each version."""
    return compare(*_all_frames((asf_path, amc_path, bvh_path)), max_offset)


def compare(numbers: np.ndarray, amc_all: np.ndarray, lines: np.ndarray, bvh_all: dict[str, np.ndarray],
            max_offset: int = 10) -> Agreement:
    """:func:`agreement` of already converted frames (:func:`_all_frames`)."""
    offset, errors = find_offset(numbers, amc_all, lines, bvh_all["converted"], max_offset)
    bvh, stats, nps = {}, {}, {}
    for version in VERSIONS:
        amc, bvh[version], frames = pair(numbers, amc_all, lines, bvh_all[version], offset)
        stats[version] = comparisons(amc, bvh[version])
        nps[version] = format_np_mpjpe(amc, bvh[version])
    return Agreement(offset, errors, frames, amc, bvh, stats, nps)


def print_joint_table(stats: dict[str, np.ndarray]) -> None:
    """Per-joint mean/median/p95/max (cm) for each comparison, side by side."""
    print(f"{'joint':<11}" + "".join(f" | {k:^31}" for k in stats))
    print(f"{'':<11}" + " |  mean    median  p95     max    " * len(stats))
    for j, name in enumerate(H36M17_JOINTS):
        print(f"{name:<11}" + "".join(" | " + " ".join(f"{v:7.4f}" for v in s[j]) for s in stats.values()))


def print_segments(amc: np.ndarray, bvh: dict[str, np.ndarray]) -> None:
    """Mean [min, max] segment lengths (m) of the AMC and each BVH version, and the BVH - AMC mean."""
    lengths = {"AMC": segment_lengths(amc), **{v: segment_lengths(b) for v, b in bvh.items()}}
    print(f"{'segment':<18}" + "".join(f" {k + ' mean [min, max]':>26}" for k in lengths)
          + "".join(f" {v + '-AMC':>14}" for v in bvh))
    for name in SEGMENTS:
        row = "".join(f" {x[name].mean():8.4f} [{x[name].min():.4f}, {x[name].max():.4f}]" for x in lengths.values())
        diff = "".join(f" {lengths[v][name].mean() - lengths['AMC'][name].mean():+14.4f}" for v in bvh)
        print(f"{name:<18}{row}{diff}")


def print_np_mpjpe(result: Agreement, kappa: float) -> None:
    """NP-MPJPE summary per version and direction, and its relation to kappa."""
    print(f"NP-MPJPE between the formats (torso units of the target; kappa = {kappa:g}):")
    for version in VERSIONS:
        for name, e in result.np_mpjpe[version].items():
            hit = matches(torch.from_numpy(e), kappa).double().mean().item()
            print(f"  {version:<9} {name}: mean {e.mean():.4f} median {np.median(e):.4f} "
                  f"p95 {np.percentile(e, 95):.4f} min {e.min():.4f} max {e.max():.4f}; "
                  f"<= kappa in {100 * hit:.1f}% of {len(e)} frames")
    for name, poses in (("AMC", result.amc), *result.bvh.items()):
        torso = segment_lengths(poses)
        scale = torso["pelvis-spine"] + torso["spine-thorax"]
        print(f"  {name} torso unit |pelvis-spine| + |spine-thorax|: mean {scale.mean():.4f} m")
    lags = lag_np_mpjpe(result.amc)
    print("  for scale, AMC against itself n frames later (median): "
          + ", ".join(f"{lag}: {v:.4f}" for lag, v in lags.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                        help="the shared data folder holding cmu-mocap/ and cmu-mocap-more/ (default: %(default)s)")
    parser.add_argument("--max-offset", type=int, default=10, help="frame offsets tried: +-N (default: 10)")
    args = parser.parse_args(argv)
    paths = [args.shared / rel for rel in (ASF_REL, AMC_REL, BVH_REL)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"shared data missing ({', '.join(missing)}); pass --shared PATH (the folder holding "
                     "cmu-mocap/ and cmu-mocap-more/)")
    frames = _all_frames(paths)
    result = compare(*frames, max_offset=args.max_offset)
    tried = ", ".join(f"{o:+d}: {100 * e:.3f}" for o, e in sorted(result.offset_errors.items()) if abs(o) <= 3)
    print(f"{len(result.amc)} aligned frames (AMC {result.amc_frames[0]}..{result.amc_frames[-1]}); best offset "
          f"BVH line = AMC frame number {result.offset:+d}; mean joint error of the converted BVH (cm) by offset: "
          f"{tried}")
    numbers, amc_all, lines, bvh_all = frames
    _, shared = find_offset(numbers, amc_all, lines, bvh_all["converted"], max_offset=1, joints=SHARED_CHAIN)
    print("  the same over pelvis, hips, knees, ankles, spine only: "
          + ", ".join(f"{o:+d}: {100 * e:.4f}" for o, e in sorted(shared.items())))
    for version in VERSIONS:
        stats = result.stats[version]
        print(f"\nPer-joint |BVH - AMC| (cm), BVH {version}:")
        print_joint_table(stats)
        mpjpe = {k: np.linalg.norm(a - result.amc, axis=-1).mean(1) * 100 for k, a in (
            ("rigid", rigid_align(result.bvh[version], result.amc)),
            ("similarity", similarity_align(result.bvh[version], result.amc)))}
        print("  per-frame MPJPE after alignment (cm): "
              + "; ".join(f"{k} mean {v.mean():.4f} max {v.max():.4f}" for k, v in mpjpe.items()))

    skeleton = parse_asf(paths[0])
    thorax = thorax_bone_vectors(paths[0], paths[1], result.amc_frames)
    print(f"\ncgspeed: max |BVH + ASF thorax bone vector - AMC| over thorax..r_wrist = "
          f"{thorax_residual_cm(result.amc, result.bvh['cgspeed'], thorax):.5f} cm "
          f"(thorax bone {np.linalg.norm(bone_vector(skeleton, 'thorax')) * skeleton.metres_per_unit * 100:.4f} cm)")
    err = above_thorax_error_cm(result.amc, result.bvh["converted"])
    print(f"converted: |BVH - AMC| over thorax..r_wrist min {err.min():.4f} max {err.max():.4f} cm; "
          f"|ASF thorax - ASF upperback| rest vectors = {stand_in_gap_cm(skeleton):.4f} cm "
          f"(thorax {skeleton.bones['thorax'].length:g}, upperback {skeleton.bones['upperback'].length:g} units)")

    print("\nSegment lengths (m):")
    print_segments(result.amc, result.bvh)
    bvh = parse_bvh(paths[2])
    for label, b in (("cgspeed file", bvh), ("converted (prepared)", builtin_map(MAP_NAME).prepare(bvh))):
        compared, bad = hierarchy_mismatches(skeleton, b)
        print(f"\nBVH HIERARCHY ({label}) vs ASF bone vectors: {compared - len(bad)} of {compared} agree "
              "(1e-3 units); differ:")
        for bone, start, end, a, bl in bad:
            print(f"  ASF {bone:<9} ({start} -> {end}): ASF {a:.4f} m, BVH {bl:.4f} m")
    print()
    print_np_mpjpe(result, load_config(None).mining.kappa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
