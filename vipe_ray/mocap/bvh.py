"""BVH (Biovision hierarchy) parser and forward kinematics."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .asf import read_text
from .errors import MocapFormatError, finite_float
from .kinematics import axis_rotation

_CHANNELS = ("Xposition", "Yposition", "Zposition", "Xrotation", "Yrotation", "Zrotation")


@dataclass(frozen=True)
class BvhJoint:
    name: str  # End Sites are named "<parent>_End"
    parent: str | None
    offset: tuple[float, float, float]
    channels: tuple[str, ...]
    channel_start: int  # index of this joint's first channel in a motion line
    line: int


@dataclass(frozen=True)
class Bvh:
    """Parsed BVH file. ``joints`` are in file (depth-first) order, parents first;
    ``motion`` is (F, n_channels) float64 with all frames of the file (incl. frame 0)."""

    source: str
    joints: tuple[BvhJoint, ...]
    frame_time: float
    motion: np.ndarray
    frame_time_line: int = 0  # 1-based line of "Frame Time:"

    @property
    def n_channels(self) -> int:
        return int(self.motion.shape[1])

    @property
    def n_frames(self) -> int:
        return int(self.motion.shape[0])

    def joint(self, name: str) -> BvhJoint:
        for j in self.joints:
            if j.name == name:
                return j
        raise KeyError(name)


def parse_bvh_text(text: str, source: str = "<bvh>") -> Bvh:
    """Parse BVH text; ``source`` names the file in error messages."""
    lines = text.splitlines()
    n_lines = len(lines)
    joints: list[BvhJoint] = []
    names: set[str] = set()
    n_channels = 0

    # --- HIERARCHY: a tiny recursive-descent parser over (lineno, tokens)
    items = []
    for lineno, raw in enumerate(lines, 1):
        toks = raw.split()
        if toks:
            items.append((lineno, toks))
            if toks[0].upper() == "MOTION":
                break
    pos = 0

    def peek():
        if pos >= len(items):
            raise MocapFormatError(source, max(n_lines, 1), "file ends inside HIERARCHY")
        return items[pos]

    if not items or items[0][1][0].upper() != "HIERARCHY":
        ln, toks = items[0] if items else (1, [""])
        raise MocapFormatError(source, ln, f"expected 'HIERARCHY', got {' '.join(toks)[:40]!r}")
    pos = 1

    def parse_joint(parent: str | None):
        nonlocal pos, n_channels
        ln, toks = peek()
        kind = toks[0]
        if kind in ("ROOT", "JOINT"):
            if len(toks) != 2:
                raise MocapFormatError(source, ln, f"bad {kind} line {' '.join(toks)!r}")
            name = toks[1]
        elif kind == "End" and len(toks) == 2 and toks[1] == "Site":
            name = f"{parent}_End"
        else:
            raise MocapFormatError(source, ln, f"expected ROOT, JOINT or End Site, got {' '.join(toks)[:40]!r}")
        if name in names:
            raise MocapFormatError(source, ln, f"duplicate joint name {name!r}")
        names.add(name)
        start_line = ln
        pos += 1
        ln, toks = peek()
        if toks != ["{"]:
            raise MocapFormatError(source, ln, f"expected '{{' after {kind} {name!r}, got {' '.join(toks)[:40]!r}")
        pos += 1
        ln, toks = peek()
        if toks[0] != "OFFSET" or len(toks) != 4:
            raise MocapFormatError(source, ln, f"expected 'OFFSET x y z' for {name!r}, got {' '.join(toks)[:60]!r}")
        offset = tuple(finite_float(t, source, ln, f"OFFSET of {name!r}") for t in toks[1:])
        pos += 1
        channels: tuple[str, ...] = ()
        if kind != "End":
            ln, toks = peek()
            if toks[0] != "CHANNELS" or len(toks) < 2:
                raise MocapFormatError(source, ln, f"expected 'CHANNELS n ...' for {name!r}, got {' '.join(toks)[:60]!r}")
            try:
                n = int(toks[1])
            except ValueError:
                raise MocapFormatError(source, ln, f"channel count of {name!r}: non-integer value {toks[1]!r}") from None
            channels = tuple(toks[2:])
            if n != len(channels):
                raise MocapFormatError(source, ln, f"joint {name!r} declares {n} channels but lists {len(channels)}: {' '.join(channels)!r}")
            for c in channels:
                if c not in _CHANNELS:
                    raise MocapFormatError(source, ln, f"unknown channel {c!r} of joint {name!r}")
            if len(set(channels)) != len(channels):
                raise MocapFormatError(source, ln, f"repeated channel in {' '.join(channels)!r}")
            pos += 1
        joints.append(BvhJoint(name, parent, offset, channels, n_channels, start_line))
        n_channels += len(channels)
        while True:
            ln, toks = peek()
            if toks == ["}"]:
                pos += 1
                return
            if kind == "End":
                raise MocapFormatError(source, ln, f"expected '}}' closing End Site of {parent!r}, got {' '.join(toks)[:40]!r}")
            parse_joint(name)

    ln, toks = peek()
    if toks[0] != "ROOT":
        raise MocapFormatError(source, ln, f"expected 'ROOT', got {' '.join(toks)[:40]!r}")
    parse_joint(None)
    ln, toks = peek()
    if toks[0].upper() != "MOTION":
        raise MocapFormatError(source, ln, f"expected 'MOTION' after the hierarchy, got {' '.join(toks)[:40]!r}")
    motion_line = ln

    # --- MOTION header
    i = motion_line  # 0-based index of the line after MOTION
    header = {}
    for key in ("Frames:", "Frame Time:"):
        while i < n_lines and not lines[i].strip():
            i += 1
        if i >= n_lines:
            raise MocapFormatError(source, n_lines, f"file ends before {key!r}")
        s = lines[i].strip()
        if not s.startswith(key):
            raise MocapFormatError(source, i + 1, f"expected {key!r}, got {s[:40]!r}")
        header[key] = (s[len(key):].strip(), i + 1)
        i += 1
    val, ln = header["Frames:"]
    try:
        n_frames = int(val)
    except ValueError:
        raise MocapFormatError(source, ln, f"Frames: non-integer value {val!r}") from None
    if n_frames < 1:
        raise MocapFormatError(source, ln, f"Frames: must be >= 1, got {val!r}")
    val, ln = header["Frame Time:"]
    frame_time = finite_float(val, source, ln, "Frame Time")
    if frame_time <= 0:
        raise MocapFormatError(source, ln, f"Frame Time must be > 0, got {val!r}")

    # --- motion lines
    first = i
    data_lines = lines[first:]
    while data_lines and not data_lines[-1].strip():
        data_lines.pop()
    rows = []
    for k, raw in enumerate(data_lines):
        toks = raw.split()
        if len(toks) != n_channels:
            raise MocapFormatError(
                source, first + k + 1,
                f"motion frame {k} has {len(toks)} values, the hierarchy declares {n_channels} channels",
            )
        rows.append(toks)
    if len(rows) != n_frames:
        ln = header["Frames:"][1]
        raise MocapFormatError(source, ln, f"Frames: {n_frames} but the file has {len(rows)} motion lines")
    try:
        motion = np.array(rows, dtype=np.float64).reshape(n_frames, n_channels)
        bad = not np.isfinite(motion).all()
    except ValueError:
        bad = True
    if bad:
        for k, toks in enumerate(rows):
            for t in toks:
                finite_float(t, source, first + k + 1, f"motion frame {k}")
        raise AssertionError("bad value not found")  # pragma: no cover
    return Bvh(source=source, joints=tuple(joints), frame_time=frame_time, motion=motion,
               frame_time_line=header["Frame Time:"][1])


def parse_bvh(path: str | Path, source: str | None = None) -> Bvh:
    """Parse the BVH file at ``path``; ``source`` (default: the path) names it in errors."""
    return parse_bvh_text(read_text(path), str(path) if source is None else source)


def bvh_forward_kinematics(bvh: Bvh, frames: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
    """Global joint positions ``{joint: (F, 3)}`` in the file's units and axes.

    Rotation per joint = product of its rotation channels in channel order (intrinsic),
    position = parent position + R_parent · OFFSET (+ position channels, if any).
    """
    m = bvh.motion if frames is None else bvh.motion[frames]
    F = m.shape[0]
    R: dict[str, np.ndarray] = {}
    P: dict[str, np.ndarray] = {}
    eye = np.broadcast_to(np.eye(3), (F, 3, 3))
    for j in bvh.joints:
        off = np.asarray(j.offset, dtype=np.float64)
        local_t = np.broadcast_to(off, (F, 3)).copy()
        local_r = None
        for k, ch in enumerate(j.channels):
            col = m[:, j.channel_start + k]
            if ch.endswith("position"):
                local_t[:, "XYZ".index(ch[0])] += col
            else:
                rk = axis_rotation(ch[0], np.deg2rad(col))
                local_r = rk if local_r is None else local_r @ rk
        if local_r is None:
            local_r = eye
        if j.parent is None:
            P[j.name] = local_t
            R[j.name] = local_r
        else:
            Rp = R[j.parent]
            P[j.name] = P[j.parent] + np.einsum("fij,fj->fi", Rp, local_t)
            R[j.name] = Rp @ local_r
    return P



def rest_positions(bvh: Bvh) -> dict[str, np.ndarray]:
    """Rest-pose position of every joint and End Site (all channels 0), ``{joint: (3,)}`` in file units."""
    zero = replace(bvh, motion=np.zeros((1, bvh.n_channels)))
    return {name: p[0] for name, p in bvh_forward_kinematics(zero).items()}
