"""Parser for Acclaim motion files (AMC), as used by the CMU motion-capture database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .asf import Skeleton, read_text
from .errors import MocapFormatError, finite_float

#: Names of the root's six AMC values, in the order stored in :attr:`Motion.root`.
ROOT_CHANNELS = ("TX", "TY", "TZ", "RX", "RY", "RZ")


@dataclass(frozen=True)
class Motion:
    """Parsed AMC motion.

    ``frame_numbers``: (F,) int64, the 1-based frame numbers (always 1..F).
    ``root``: (F, 6) float64, root values reordered to TX TY TZ RX RY RZ (ASF units / angle unit).
    ``angles``: bone -> (F, len(dofs)) float64, in the bone's ASF dof order.
    ``angle_unit``: "deg" or "rad".
    """

    source: str
    frame_numbers: np.ndarray
    root: np.ndarray
    angles: dict[str, np.ndarray]
    angle_unit: str

    @property
    def n_frames(self) -> int:
        return int(self.frame_numbers.shape[0])


def _locate_bad_value(lines, first_frame_line, source):
    """Slow path: find the first line holding a non-numeric or non-finite value."""
    for lineno in range(first_frame_line, len(lines) + 1):
        toks = lines[lineno - 1].split()
        if len(toks) < 2:
            continue
        for t in toks[1:]:
            finite_float(t, source, lineno, f"bone {toks[0]!r}")
    raise AssertionError("bad value not found on second pass")  # pragma: no cover


def parse_amc_text(text: str, skeleton: Skeleton, source: str = "<amc>") -> Motion:
    """Parse AMC text against ``skeleton``. ``source`` names the file in error messages.

    Every frame must start with its 1-based frame number (1, 2, 3, ... without gaps) and
    list each bone that has DOFs (and the root) exactly once, with exactly as many values as
    the bone's ASF ``dof`` list (6 for the root). Bones without DOFs may be omitted.
    """
    skel_name = Path(skeleton.source).name
    lines = text.splitlines()
    n_lines = len(lines)

    # expected value counts per bone; bones without dofs are optional (0 values)
    width: dict[str, int] = {"root": 6}
    for b in skeleton.bones.values():
        width[b.name] = len(b.dofs)
    required = [n for n, w in width.items() if w > 0]
    n_required = len(required)
    tokens: dict[str, list[list[str]]] = {n: [] for n in required}

    # header
    angle_unit = skeleton.angle_unit
    i = 0
    while i < n_lines:
        s = lines[i].strip()
        if not s or s.startswith("#"):
            i += 1
            continue
        if s.startswith(":"):
            key = s.split()[0].upper()
            if key == ":DEGREES":
                angle_unit = "deg"
            elif key == ":RADIANS":
                angle_unit = "rad"
            i += 1
            continue
        break
    first_frame_line = i + 1

    frame_count = 0
    frame_line = 0  # line number of the current frame's header
    n_in_frame = 0
    seen_in_frame: dict[str, int] = {}  # bone -> frame index where last seen
    append = {n: tokens[n].append for n in required}

    def _incomplete(at_eof: bool):
        missing = [n for n in required if seen_in_frame.get(n) != frame_count]
        where = "file ends" if at_eof else "next frame starts"
        raise MocapFormatError(
            source, frame_line,
            f"frame {frame_count} is incomplete ({where} after {n_in_frame} of {n_required} bones); "
            f"missing {', '.join(repr(m) for m in missing)}",
        )

    for lineno in range(first_frame_line, n_lines + 1):
        toks = lines[lineno - 1].split()
        if not toks:
            continue
        name = toks[0]
        if len(toks) == 1 and name.isdigit():
            if frame_count and n_in_frame != n_required:
                _incomplete(False)
            num = int(name)
            if num != frame_count + 1:
                raise MocapFormatError(source, lineno, f"frame number {name!r} out of sequence (expected {frame_count + 1})")
            frame_count = num
            frame_line = lineno
            n_in_frame = 0
            continue
        w = width.get(name)
        if w is None:
            if frame_count == 0:
                raise MocapFormatError(source, lineno, f"expected a frame number, got {lines[lineno - 1].strip()[:60]!r}")
            if name.isdigit() or name.lstrip("+-").replace(".", "", 1).isdigit():
                raise MocapFormatError(source, lineno, f"malformed frame line {lines[lineno - 1].strip()[:60]!r}")
            raise MocapFormatError(source, lineno, f"bone {name!r} not in skeleton {skel_name}")
        if frame_count == 0:
            raise MocapFormatError(source, lineno, f"bone line {name!r} before the first frame number")
        if len(toks) - 1 != w:
            dofs = "TX TY TZ RX RY RZ" if name == "root" else " ".join(skeleton.bones[name].dofs) or "none"
            raise MocapFormatError(
                source, lineno,
                f"bone {name!r} has {len(toks) - 1} values {' '.join(toks[1:])!r}, expected {w} (dof {dofs} in {skel_name})",
            )
        if w == 0:
            continue
        if seen_in_frame.get(name) == frame_count:
            raise MocapFormatError(source, lineno, f"bone {name!r} appears twice in frame {frame_count}")
        seen_in_frame[name] = frame_count
        n_in_frame += 1
        append[name](toks[1:])

    if frame_count == 0:
        raise MocapFormatError(source, max(n_lines, 1), "no frames")
    if n_in_frame != n_required:
        _incomplete(True)

    arrays: dict[str, np.ndarray] = {}
    try:
        for n in required:
            arrays[n] = np.array(tokens[n], dtype=np.float64).reshape(frame_count, width[n])
    except ValueError:
        _locate_bad_value(lines, first_frame_line, source)
    for n, a in arrays.items():
        if not np.isfinite(a).all():
            _locate_bad_value(lines, first_frame_line, source)

    root_raw = arrays.pop("root")
    perm = [skeleton.root_order.index(c) for c in ROOT_CHANNELS]
    root = np.ascontiguousarray(root_raw[:, perm])
    return Motion(
        source=source,
        frame_numbers=np.arange(1, frame_count + 1, dtype=np.int64),
        root=root,
        angles=arrays,
        angle_unit=angle_unit,
    )


def parse_amc(path: str | Path, skeleton: Skeleton, source: str | None = None) -> Motion:
    """Parse the AMC file at ``path``; ``source`` (default: the path) names it in errors."""
    return parse_amc_text(read_text(path), skeleton, str(path) if source is None else source)
