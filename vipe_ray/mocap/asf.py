"""Parser for Acclaim skeleton files (ASF), as used by the CMU motion-capture database."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import MocapFormatError, finite_float

#: Metres per inch; ASF lengths are in inches scaled by ``1 / length_unit``.
INCH_M = 0.0254

_ROTATION_DOFS = ("rx", "ry", "rz")
_SECTIONS = ("version", "name", "units", "documentation", "root", "bonedata", "hierarchy")
_ROOT_ORDER_TOKENS = {"TX", "TY", "TZ", "RX", "RY", "RZ"}


@dataclass(frozen=True)
class Bone:
    name: str
    direction: tuple[float, float, float]  # unit vector, world frame, rest pose
    length: float  # in ASF length units
    axis: tuple[float, float, float]  # bone-frame Euler angles (ASF angle unit)
    axis_order: str  # e.g. "XYZ"
    dofs: tuple[str, ...]  # subset of rx ry rz, in AMC value order
    line: int  # 1-based line of the bone's ``begin``


@dataclass(frozen=True)
class Skeleton:
    """A parsed ASF skeleton. ``source`` is the name used in error messages."""

    source: str
    name: str
    length_unit: float  # ``:units length``
    angle_unit: str  # "deg" or "rad"
    root_order: tuple[str, ...]  # e.g. ("TX", "TY", "TZ", "RX", "RY", "RZ")
    root_axis: str  # e.g. "XYZ"
    root_position: tuple[float, float, float]
    root_orientation: tuple[float, float, float]
    bones: dict[str, Bone]
    parent: dict[str, str]  # bone -> parent ("root" for top-level bones)
    children: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def metres_per_unit(self) -> float:
        """metres = value * (1 / length_unit) * 0.0254."""
        return (1.0 / self.length_unit) * INCH_M

    def topological_order(self) -> list[str]:
        """Bones (without "root") so that every parent precedes its children."""
        order: list[str] = []
        stack = list(reversed(self.children.get("root", ())))
        while stack:
            b = stack.pop()
            order.append(b)
            stack.extend(reversed(self.children.get(b, ())))
        return order


def _floats(tokens, path, lineno, what):
    return [finite_float(t, path, lineno, what) for t in tokens]


def _check_axis_order(order, path, lineno):
    o = order.upper()
    if sorted(o) != ["X", "Y", "Z"]:
        raise MocapFormatError(path, lineno, f"bad axis order {order!r} (expected a permutation of XYZ)")
    return o


def parse_asf_text(text: str, source: str = "<asf>") -> Skeleton:
    """Parse ASF text. ``source`` names the file in error messages."""
    lines = text.splitlines()
    n_lines = len(lines)
    sections: dict[str, int] = {}
    name = ""
    root: dict[str, object] = {}
    bones: dict[str, Bone] = {}
    parent: dict[str, str] = {}
    children: dict[str, list[str]] = {}

    section = None
    bone: dict[str, object] | None = None
    in_hierarchy_block = False
    last_key = None

    units: dict[str, object] = {}

    def _parse_units(toks, lineno, s):
        if len(toks) % 2:
            raise MocapFormatError(source, lineno, f"bad :units line {s!r} (expected 'name value' pairs)")
        for key, val in zip(toks[0::2], toks[1::2]):
            key = key.lower()
            if key == "length":
                (v,) = _floats([val], source, lineno, "units length")
                if v <= 0:
                    raise MocapFormatError(source, lineno, f"units length must be > 0, got {val!r}")
                units["length"] = v
            elif key == "angle":
                if val.lower() not in ("deg", "rad"):
                    raise MocapFormatError(source, lineno, f"units angle must be 'deg' or 'rad', got {val!r}")
                units["angle"] = val.lower()
            elif key == "mass":
                _floats([val], source, lineno, "units mass")
            else:
                raise MocapFormatError(source, lineno, f"unknown unit {key!r}")

    for lineno, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        toks = s.split()
        if s.startswith(":"):
            if bone is not None:
                raise MocapFormatError(source, lineno, f"section {toks[0]!r} starts inside bone block opened at line {bone['line']} (missing 'end')")
            if in_hierarchy_block:
                raise MocapFormatError(source, lineno, f"section {toks[0]!r} starts inside :hierarchy block (missing 'end')")
            section = toks[0][1:].lower()
            if section not in _SECTIONS:
                raise MocapFormatError(source, lineno, f"unknown section {toks[0]!r}")
            if section in sections:
                raise MocapFormatError(source, lineno, f"duplicate section {toks[0]!r}")
            sections[section] = lineno
            rest = toks[1:]
            if section == "name":
                name = " ".join(rest)
            elif section == "units" and rest:
                _parse_units(rest, lineno, s)
            continue
        if section == "units":
            _parse_units(toks, lineno, s)
        elif section == "root":
            key = toks[0].lower()
            if key == "order":
                order = tuple(t.upper() for t in toks[1:])
                if len(order) != 6 or set(order) != _ROOT_ORDER_TOKENS:
                    raise MocapFormatError(source, lineno, f"root order must list TX TY TZ RX RY RZ once each, got {' '.join(toks[1:])!r}")
                root["order"] = order
            elif key == "axis":
                if len(toks) != 2:
                    raise MocapFormatError(source, lineno, f"bad root axis {s!r}")
                root["axis"] = _check_axis_order(toks[1], source, lineno)
            elif key in ("position", "orientation"):
                if len(toks) != 4:
                    raise MocapFormatError(source, lineno, f"root {key} needs 3 values, got {' '.join(toks[1:])!r}")
                root[key] = tuple(_floats(toks[1:], source, lineno, f"root {key}"))
            else:
                raise MocapFormatError(source, lineno, f"unknown :root key {toks[0]!r}")
        elif section == "bonedata":
            key = toks[0].lower()
            if bone is None:
                if key != "begin":
                    raise MocapFormatError(source, lineno, f"expected 'begin' in :bonedata, got {toks[0]!r}")
                bone = {"line": lineno}
                last_key = None
                continue
            if key == "end":
                for req in ("name", "direction", "length", "axis"):
                    if req not in bone:
                        raise MocapFormatError(source, lineno, f"bone block from line {bone['line']} has no {req!r}")
                bname = bone["name"]
                if bname in bones or bname == "root":
                    raise MocapFormatError(source, bone["name_line"], f"duplicate bone name {bname!r}")
                dofs = tuple(bone.get("dof", ()))
                bones[bname] = Bone(
                    name=bname,
                    direction=bone["direction"],
                    length=bone["length"],
                    axis=bone["axis"],
                    axis_order=bone["axis_order"],
                    dofs=dofs,
                    line=bone["line"],
                )
                bone = None
                continue
            if key == "name":
                if len(toks) != 2:
                    raise MocapFormatError(source, lineno, f"bad bone name line {s!r}")
                bone["name"] = toks[1]
                bone["name_line"] = lineno
            elif key == "id":
                pass
            elif key == "direction":
                if len(toks) != 4:
                    raise MocapFormatError(source, lineno, f"direction needs 3 values, got {' '.join(toks[1:])!r}")
                bone["direction"] = tuple(_floats(toks[1:], source, lineno, "direction"))
            elif key == "length":
                if len(toks) != 2:
                    raise MocapFormatError(source, lineno, f"length needs 1 value, got {' '.join(toks[1:])!r}")
                (length,) = _floats(toks[1:], source, lineno, "length")
                if length < 0:
                    raise MocapFormatError(source, lineno, f"negative bone length {toks[1]!r}")
                bone["length"] = length
            elif key == "axis":
                if len(toks) != 5:
                    raise MocapFormatError(source, lineno, f"axis needs 3 angles and an order, got {' '.join(toks[1:])!r}")
                bone["axis"] = tuple(_floats(toks[1:4], source, lineno, "axis"))
                bone["axis_order"] = _check_axis_order(toks[4], source, lineno)
            elif key == "dof":
                dofs = [t.lower() for t in toks[1:]]
                for d in dofs:
                    if d not in _ROTATION_DOFS:
                        raise MocapFormatError(source, lineno, f"unsupported dof {d!r} (only rx ry rz are supported)")
                if len(set(dofs)) != len(dofs) or not dofs:
                    raise MocapFormatError(source, lineno, f"bad dof list {' '.join(toks[1:])!r}")
                bone["dof"] = dofs
            elif key in ("limits", "bodymass", "cofmass"):
                pass
            elif s.startswith("(") and last_key == "limits":
                continue  # continuation line of a limits block
            else:
                raise MocapFormatError(source, lineno, f"unknown bone key {toks[0]!r}")
            last_key = key
        elif section == "hierarchy":
            key = toks[0].lower()
            if not in_hierarchy_block:
                if key != "begin":
                    raise MocapFormatError(source, lineno, f"expected 'begin' in :hierarchy, got {toks[0]!r}")
                in_hierarchy_block = True
                continue
            if key == "end":
                in_hierarchy_block = False
                section = "hierarchy-done"
                continue
            p = toks[0]
            if p != "root" and p not in bones:
                raise MocapFormatError(source, lineno, f"hierarchy names unknown bone {p!r}")
            if len(toks) < 2:
                raise MocapFormatError(source, lineno, f"hierarchy line for {p!r} lists no children")
            for c in toks[1:]:
                if c not in bones:
                    raise MocapFormatError(source, lineno, f"hierarchy names unknown bone {c!r}")
                if c in parent:
                    raise MocapFormatError(source, lineno, f"bone {c!r} has two parents ({parent[c]!r} and {p!r})")
                parent[c] = p
                children.setdefault(p, []).append(c)
        elif section in ("version", "name", "documentation"):
            continue
        elif section == "hierarchy-done":
            raise MocapFormatError(source, lineno, f"unexpected text after :hierarchy end: {s!r}")
        elif section is None:
            raise MocapFormatError(source, lineno, f"text before the first section: {s!r}")
        else:
            raise MocapFormatError(source, lineno, f"unknown section ':{section}'")

    end_line = max(n_lines, 1)
    if bone is not None:
        raise MocapFormatError(source, end_line, f"file ends inside bone block opened at line {bone['line']} (missing 'end')")
    if in_hierarchy_block:
        raise MocapFormatError(source, end_line, "file ends inside the :hierarchy block (missing 'end')")
    for req in ("units", "root", "bonedata", "hierarchy"):
        if req not in sections:
            raise MocapFormatError(source, end_line, f"missing section ':{req}'")
    length_unit = units.get("length")
    angle_unit = units.get("angle", "deg")
    if length_unit is None:
        raise MocapFormatError(source, sections["units"], "':units' has no 'length'")
    for req in ("order", "axis"):
        if req not in root:
            raise MocapFormatError(source, sections["root"], f"':root' has no {req!r}")
    if not bones:
        raise MocapFormatError(source, sections["bonedata"], "':bonedata' defines no bones")
    orphans = [b for b in bones if b not in parent]
    if orphans:
        b = orphans[0]
        raise MocapFormatError(source, bones[b].line, f"bone {b!r} is not in the :hierarchy")
    # every bone must be reachable from root (rules out cycles)
    seen = set()
    stack = list(children.get("root", ()))
    while stack:
        b = stack.pop()
        seen.add(b)
        stack.extend(children.get(b, ()))
    unreachable = [b for b in bones if b not in seen]
    if unreachable:
        b = unreachable[0]
        raise MocapFormatError(source, sections["hierarchy"], f"bone {b!r} is not connected to root (cycle in :hierarchy)")

    return Skeleton(
        source=source,
        name=name,
        length_unit=length_unit,
        angle_unit=angle_unit,
        root_order=root["order"],
        root_axis=root["axis"],
        root_position=root.get("position", (0.0, 0.0, 0.0)),
        root_orientation=root.get("orientation", (0.0, 0.0, 0.0)),
        bones=bones,
        parent=parent,
        children={k: tuple(v) for k, v in children.items()},
    )


def read_text(path: str | Path) -> str:
    """Read a raw text file (ASCII/UTF-8, Latin-1 fallback; any line endings)."""
    data = Path(path).read_bytes()
    return decode_bytes(data)


def decode_bytes(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_asf(path: str | Path, source: str | None = None) -> Skeleton:
    """Parse the ASF file at ``path``; ``source`` (default: the path) names it in errors."""
    return parse_asf_text(read_text(path), str(path) if source is None else source)
