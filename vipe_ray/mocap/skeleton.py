"""Skeleton maps: which BVH joints give each Human3.6M-17 joint, in which unit and up axis.

A map is a small YAML file (see ``vipe_ray/mocap/skeletons/*.yaml``, the built-in maps for the
three cgspeed CMU BVH flavours)::

    name: cgspeed-motionbuilder
    metres_per_unit: 0.05644444444444444
    up: y
    joints:
      pelvis: Hips             # one BVH joint ...
      head: [leftEye, rightEye]  # ... or a list whose positions are averaged
    tpose_frame: true          # optional (default false): frame 0 is a T-pose, not the take
    offsets_from:              # optional: a joint takes another joint's rest OFFSET
      Neck: Spine1             # (stands in for a bone the file's converter dropped)

BVH End Sites are named ``<parent>_End`` (as :func:`vipe_ray.mocap.bvh.parse_bvh_text` names them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from .bvh import Bvh
from .kinematics import H36M17_JOINTS, cmu_to_zup

#: Folder of the built-in maps (shipped as package data).
SKELETONS_DIR: Path = Path(__file__).resolve().parent / "skeletons"
#: Built-in map names, in the order :func:`detect_skeleton_map` tries them.
BUILTIN_MAP_NAMES: tuple[str, ...] = ("cgspeed-motionbuilder", "cgspeed-daz", "cgspeed-3dsmax")
#: The up axes a map may declare: "y" (converted with :func:`cmu_to_zup`) or "z" (kept).
UP_AXES: tuple[str, ...] = ("y", "z")
#: Required keys of a map file, then the optional ones.
MAP_KEYS: tuple[str, ...] = ("name", "metres_per_unit", "up", "joints")
OPTIONAL_MAP_KEYS: tuple[str, ...] = ("tpose_frame", "offsets_from")


class SkeletonMapError(ValueError):
    """A skeleton map is invalid, or no map fits a BVH file's joints."""


@dataclass(frozen=True)
class SkeletonMap:
    """How to read Human3.6M-17 joints off one BVH skeleton.

    ``joints[k]`` names the BVH joint(s) of ``H36M17_JOINTS[k]``; several names mean the mean
    of their positions. ``metres_per_unit`` scales file lengths to metres; ``up`` is the file's
    up axis. ``source`` names the map (its YAML path) in messages. ``tpose_frame``: frame 0 of
    such files is a converter's T-pose, not part of the take (the converter drops it).
    ``offsets_from`` pairs (joint, donor): the joint takes the donor's rest OFFSET before
    forward kinematics (:meth:`prepare`), to put back a bone a converter collapsed to length 0.
    """

    name: str
    metres_per_unit: float
    up: str
    joints: tuple[tuple[str, ...], ...]  # 17 entries, H36M17_JOINTS order
    source: str
    tpose_frame: bool = False
    offsets_from: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # load_skeleton_map reports errors per key; this only guards hand-built maps.
        where = f"{self.source}: skeleton map {self.name!r}"
        if len(self.joints) != len(H36M17_JOINTS) or not all(
            e and all(isinstance(n, str) and n for n in e) for e in self.joints
        ):
            raise SkeletonMapError(f"{where}: joints must be {len(H36M17_JOINTS)} non-empty tuples of names")
        if self.up not in UP_AXES:
            raise SkeletonMapError(f"{where}: up must be one of {list(UP_AXES)}, got {self.up!r}")
        if not _positive_finite(self.metres_per_unit):
            raise SkeletonMapError(
                f"{where}: metres_per_unit must be a finite number > 0, got {self.metres_per_unit!r}")
        if not isinstance(self.tpose_frame, bool):
            raise SkeletonMapError(f"{where}: tpose_frame must be true or false, got {self.tpose_frame!r}")
        if not isinstance(self.offsets_from, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(n, str) and n for n in p)
            for p in self.offsets_from
        ):
            raise SkeletonMapError(
                f"{where}: offsets_from must be a tuple of (joint, donor) name pairs, got {self.offsets_from!r}")

    @property
    def bvh_joints(self) -> frozenset[str]:
        """Every BVH joint name the map reads."""
        return frozenset([n for e in self.joints for n in e] + [n for pair in self.offsets_from for n in pair])

    def missing(self, joint_names: Iterable[str]) -> list[str]:
        """H3.6M joints whose BVH joints are not in ``joint_names``, as ``"r_knee (rShin)"``
        (the absent names of that entry, comma-separated), in H36M17 order; [] if the map fits."""
        have = set(joint_names)
        out = self.missing_joints(have)
        for joint, donor in self.offsets_from:
            absent = [n for n in (joint, donor) if n not in have]
            if absent:
                out.append(f"offsets_from.{joint} ({', '.join(absent)})")
        return out

    def missing_joints(self, have: Iterable[str]) -> list[str]:
        """The part of :meth:`missing` about the 17 joint entries (``offsets_from`` aside)."""
        have = set(have)
        out = []
        for h36m, entry in zip(H36M17_JOINTS, self.joints):
            absent = [n for n in entry if n not in have]
            if absent:
                out.append(f"{h36m} ({', '.join(absent)})")
        return out

    def prepare(self, bvh: Bvh) -> Bvh:
        """``bvh`` with every ``offsets_from`` joint given its donor's OFFSET (unchanged if none)."""
        if not self.offsets_from:
            return bvh
        donor = dict(self.offsets_from)
        by_name = {j.name: j for j in bvh.joints}
        joints = tuple(dataclasses.replace(j, offset=by_name[donor[j.name]].offset) if j.name in donor else j
                       for j in bvh.joints)
        return dataclasses.replace(bvh, joints=joints)

    def apply(self, positions: Mapping[str, np.ndarray]) -> np.ndarray:
        """(F, 17, 3) float64 Human3.6M-17 joints, metres, right-handed z-up world.

        ``positions`` is :func:`vipe_ray.mocap.bvh.bvh_forward_kinematics` output (of
        :meth:`prepare`'s Bvh, for the map's ``offsets_from`` to count), ``{joint: (F, 3)}`` in
        file units and axes. Order of operations (kept so that the cgspeed MotionBuilder map on
        an unprepared Bvh reproduces earlier conversions bit for bit): stack, scale by
        ``metres_per_unit``, then convert y-up to z-up.
        """
        missing = self.missing_joints(positions)
        if missing:
            raise SkeletonMapError(
                f"{self.source}: skeleton map {self.name!r}: the positions lack {', '.join(missing)}"
            )
        cols = [
            positions[e[0]] if len(e) == 1 else np.mean(np.stack([positions[n] for n in e]), axis=0)
            for e in self.joints
        ]
        j = np.stack(cols, axis=1) * self.metres_per_unit
        return cmu_to_zup(j) if self.up == "y" else np.asarray(j, dtype=np.float64)


def _positive_finite(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _joint_entry(value: object, where: str) -> tuple[str, ...]:
    """One ``joints:`` value (a name or a non-empty list of names) as a tuple of names."""
    names = value if isinstance(value, list) else [value]
    if not names:
        raise SkeletonMapError(f"{where}: empty list []; give one BVH joint name or a list of them")
    for n in names:
        if n is None:
            raise SkeletonMapError(f"{where}: no BVH joint name given (None)")
        if not isinstance(n, str):
            raise SkeletonMapError(
                f"{where}: BVH joint names must be strings, got {n!r} ({type(n).__name__}); quote it")
        if not n or n != n.strip() or any(c.isspace() for c in n):
            raise SkeletonMapError(f"{where}: bad BVH joint name {n!r} (empty or with whitespace)")
    return tuple(names)


def parse_skeleton_map(text: str, source: str = "<skeleton map>") -> SkeletonMap:
    """Parse and strictly validate skeleton-map YAML text; ``source`` names it in errors.

    Raises :class:`SkeletonMapError` naming the source, the key and the bad value.
    """
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SkeletonMapError(f"{source}: invalid YAML{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise SkeletonMapError(
            f"{source}: a skeleton map must be a YAML mapping with keys {', '.join(MAP_KEYS)}, "
            f"got {type(doc).__name__} {doc!r:.60}")
    for key in doc:
        if key not in MAP_KEYS + OPTIONAL_MAP_KEYS:
            raise SkeletonMapError(
                f"{source}: unknown key {key!r} (value {doc[key]!r:.60}); "
                f"allowed keys: {', '.join(MAP_KEYS + OPTIONAL_MAP_KEYS)}")
    for key in MAP_KEYS:
        if key not in doc:
            raise SkeletonMapError(f"{source}: missing key {key!r}")

    name = doc["name"]
    if not isinstance(name, str) or not name.strip():
        raise SkeletonMapError(f"{source}: name: must be a non-empty string, got {name!r}")
    mpu = doc["metres_per_unit"]
    if not _positive_finite(mpu):
        raise SkeletonMapError(f"{source}: metres_per_unit: must be a finite number > 0, got {mpu!r}")
    up = doc["up"]
    if up not in UP_AXES:
        raise SkeletonMapError(f"{source}: up: must be 'y' or 'z' (the file's up axis), got {up!r}")
    tpose = doc.get("tpose_frame", False)
    if not isinstance(tpose, bool):
        raise SkeletonMapError(f"{source}: tpose_frame: must be true or false, got {tpose!r}")

    offsets = doc.get("offsets_from")
    if offsets is None:  # absent, or the key with no value
        offsets = {}
    if not isinstance(offsets, dict):
        raise SkeletonMapError(
            f"{source}: offsets_from: must be a mapping of BVH joint -> BVH joint, got {offsets!r:.60}")
    offsets_from = tuple((_joint_entry(k, f"{source}: offsets_from")[0],
                          _joint_entry(v, f"{source}: offsets_from.{k}")[0]) for k, v in offsets.items())
    for k, v in offsets.items():
        if isinstance(v, list):
            raise SkeletonMapError(f"{source}: offsets_from.{k}: must be one BVH joint name, got {v!r}")

    joints = doc["joints"]
    if not isinstance(joints, dict):
        raise SkeletonMapError(
            f"{source}: joints: must be a mapping of the {len(H36M17_JOINTS)} Human3.6M-17 joints to "
            f"BVH joint names, got {type(joints).__name__} {joints!r:.60}")
    for key in joints:
        if key not in H36M17_JOINTS:
            raise SkeletonMapError(
                f"{source}: joints: unknown Human3.6M-17 joint {key!r} (value {joints[key]!r:.60}); "
                f"the joints are {', '.join(H36M17_JOINTS)}")
    absent = [j for j in H36M17_JOINTS if j not in joints]
    if absent:
        raise SkeletonMapError(f"{source}: joints: missing Human3.6M-17 joint(s) {', '.join(absent)}")
    entries = tuple(_joint_entry(joints[j], f"{source}: joints.{j}") for j in H36M17_JOINTS)
    return SkeletonMap(name=name, metres_per_unit=float(mpu), up=up, joints=entries, source=source,
                       tpose_frame=tpose, offsets_from=offsets_from)


def load_skeleton_map(path: str | Path) -> SkeletonMap:
    """Read and strictly validate the skeleton-map YAML file at ``path`` (see module doc).

    Raises :class:`SkeletonMapError` naming the file, the key and the bad value
    (an unreadable file too).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SkeletonMapError(f"{path}: cannot read skeleton map: {exc}") from None
    return parse_skeleton_map(text, str(path))


@cache
def builtin_maps() -> tuple[SkeletonMap, ...]:
    """The shipped maps (``SKELETONS_DIR/<name>.yaml``), in ``BUILTIN_MAP_NAMES`` order."""
    maps = tuple(load_skeleton_map(SKELETONS_DIR / f"{n}.yaml") for n in BUILTIN_MAP_NAMES)
    for n, m in zip(BUILTIN_MAP_NAMES, maps):
        if m.name != n:  # a packaging slip, not a user error
            raise SkeletonMapError(f"{m.source}: name {m.name!r} differs from the file name {n!r}")
    return maps


def builtin_map(name: str) -> SkeletonMap:
    """The built-in map called ``name`` (e.g. "cgspeed-daz")."""
    for m in builtin_maps():
        if m.name == name:
            return m
    raise SkeletonMapError(f"unknown built-in skeleton map {name!r}; built-in maps: {', '.join(BUILTIN_MAP_NAMES)}")


def detect_skeleton_map(joint_names: Iterable[str], source: str) -> SkeletonMap:
    """The built-in map that fits a BVH file whose joints (End Sites as ``<parent>_End``)
    are ``joint_names``; ``source`` names the file in the error.

    Rule when several fit: the first in ``BUILTIN_MAP_NAMES`` order (the built-in maps share
    no complete name set, so this only matters for files that merge two namings).
    When none fits, raises :class:`SkeletonMapError` listing, for the closest built-in map
    (fewest missing Human3.6M joints, ties in that order), the missing joints with the BVH
    names it expected, and the file's own joint names.
    """
    names = list(joint_names)
    maps = builtin_maps()
    missing = [m.missing(names) for m in maps]
    for m, miss in zip(maps, missing):
        if not miss:
            return m
    k = min(range(len(maps)), key=lambda i: len(missing[i]))
    raise SkeletonMapError(
        f"{source}: cannot map this BVH skeleton to Human3.6M-17: no built-in skeleton map fits. "
        f"Closest built-in map {maps[k].name!r} lacks {len(missing[k])} of {len(H36M17_JOINTS)} joints: "
        f"{'; '.join(missing[k])}. The file's joints: {', '.join(names)}. "
        f"Pass --skeleton map.yaml (copy one of vipe_ray/mocap/skeletons/*.yaml and name this file's joints)."
    )
