"""Convert a raw CMU motion-capture directory (ASF/AMC + BVH) into the project's Parquet table.

Table contract (rows sorted by subject, clip, frame):

- ``subject`` (string), ``clip`` (string, the file stem), ``frame`` (int32, 0-based index of
  the frame in its source file: AMC frame number - 1; BVH motion-line index, whose T-pose
  frame 0 is dropped),
- ``joints3d``: fixed-size list of 17 fixed-size lists of 3 float32, metres, Human3.6M-17
  joints in VideoPose3D order, right-handed z-up world (X = x_cmu, Y = -z_cmu, Z = y_cmu).

Schema metadata key ``b"vipe_ray"`` holds a JSON description (see :func:`table_metadata`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .amc import parse_amc_text
from .asf import INCH_M, decode_bytes, parse_asf_text
from .bvh import cgspeed_h36m17, bvh_forward_kinematics, parse_bvh_text
from .errors import MocapFormatError
from .kinematics import H36M17_JOINTS, asf_amc_h36m17, cmu_to_zup

FORMAT_VERSION = 1
SOURCE_FPS = 120
METADATA_KEY = b"vipe_ray"
AXES = "right-handed, z up; X = x_cmu, Y = -z_cmu, Z = y_cmu"
#: cgspeed BVH files keep CMU length units (ASF ``length 0.45``): metres = value / 0.45 * 0.0254.
CGSPEED_BVH_METRES_PER_UNIT = (1.0 / 0.45) * INCH_M

JOINTS3D_TYPE = pa.list_(pa.list_(pa.float32(), 3), 17)
#: Deterministic writer options: zstd; dictionary-encode only the id columns; byte-stream-split
#: the coordinates (about 25% smaller than plain zstd for float32 data).
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["subject", "clip"],
    use_byte_stream_split=["joints3d.list.element.list.element"],
)
SCHEMA = pa.schema(
    [
        pa.field("subject", pa.string()),
        pa.field("clip", pa.string()),
        pa.field("frame", pa.int32()),
        pa.field("joints3d", JOINTS3D_TYPE),
    ]
)


@dataclass
class Clip:
    subject: str
    clip: str
    frames: np.ndarray  # (N,) int32, 0-based source frame indices
    joints3d: np.ndarray  # (N, 17, 3) float32


def frame_step(fps: int) -> int:
    """Source frames per output frame; ``fps`` must be a positive int dividing 120."""
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0 or SOURCE_FPS % fps:
        raise ValueError(f"fps must be a positive integer dividing {SOURCE_FPS}, got {fps!r}")
    return SOURCE_FPS // int(fps)


def _read(path: Path, raw_dir: Path, sources: dict[str, str]) -> tuple[str, str]:
    """Read a raw file, record its sha256 under its POSIX path relative to raw_dir."""
    rel = path.relative_to(raw_dir).as_posix()
    data = path.read_bytes()
    sources[rel] = hashlib.sha256(data).hexdigest()
    return decode_bytes(data), rel


def _subsample(n_frames: int, step: int, first: int = 0) -> np.ndarray:
    idx = np.arange(n_frames, dtype=np.int64)
    return idx[(idx % step == 0) & (idx >= first)]


def convert_amc_clip(skeleton, amc_text: str, amc_rel: str, subject: str, step: int) -> Clip:
    motion = parse_amc_text(amc_text, skeleton, amc_rel)
    j = asf_amc_h36m17(skeleton, motion)  # (F, 17, 3) float64
    frames = motion.frame_numbers - 1
    keep = frames % step == 0
    return Clip(subject, Path(amc_rel).stem, frames[keep].astype(np.int32), j[keep].astype(np.float32))


def convert_bvh_clip(bvh_text: str, bvh_rel: str, step: int) -> Clip:
    bvh = parse_bvh_text(bvh_text, bvh_rel)
    if abs(1.0 / bvh.frame_time - SOURCE_FPS) > 0.01:
        raise MocapFormatError(
            bvh_rel, bvh.frame_time_line, f"Frame Time {bvh.frame_time!r} is not 1/{SOURCE_FPS} s"
        )
    stem = Path(bvh_rel).stem
    keep = _subsample(bvh.n_frames, step, first=1)  # frame 0 is the converter's T-pose
    try:
        j = cgspeed_h36m17(bvh_forward_kinematics(bvh, keep))
    except KeyError as e:
        raise MocapFormatError(bvh_rel, 1, f"not a cgspeed CMU BVH: {e.args[0]}") from None
    j = cmu_to_zup(j * CGSPEED_BVH_METRES_PER_UNIT)
    return Clip(stem.split("_")[0], stem, keep.astype(np.int32), j.astype(np.float32))


def table_metadata(fps: int, sources: dict[str, str]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "joints": list(H36M17_JOINTS),
        "fps": int(fps),
        "source_fps": SOURCE_FPS,
        "units": "metres",
        "axes": AXES,
        "sources": dict(sorted(sources.items())),
    }


def clips_to_table(clips: list[Clip], metadata: dict) -> pa.Table:
    clips = sorted(clips, key=lambda c: (c.subject, c.clip))
    n = sum(len(c.frames) for c in clips)
    subject = pa.array([c.subject for c in clips for _ in range(len(c.frames))], pa.string())
    clip = pa.array([c.clip for c in clips for _ in range(len(c.frames))], pa.string())
    if clips:
        frame = np.concatenate([c.frames for c in clips]).astype(np.int32)
        j = np.concatenate([c.joints3d for c in clips]).astype(np.float32)
    else:
        frame = np.zeros(0, np.int32)
        j = np.zeros((0, 17, 3), np.float32)
    flat = pa.array(np.ascontiguousarray(j).reshape(-1), pa.float32())
    inner = pa.FixedSizeListArray.from_arrays(flat, 3)
    joints = pa.FixedSizeListArray.from_arrays(inner, 17)
    assert len(joints) == n
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")}
    return pa.Table.from_arrays(
        [subject, clip, pa.array(frame, pa.int32()), joints], schema=SCHEMA.with_metadata(meta)
    )


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_table_atomic(table: pa.Table, out_path: str | Path) -> None:
    """Write ``table`` (zstd) via a temp file in the target directory, then os.replace."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, **PARQUET_OPTIONS)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def convert_directory(
    raw_dir: str | Path,
    out_path: str | Path,
    fps: int = 30,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Convert ``raw_dir`` (``subjects/<SS>/<SS>.asf`` + ``<SS>_*.amc``, ``**/*.bvh``) to Parquet.

    Returns a summary: rows, clips, subjects (counts), rows_per_subject, seconds, bytes, path.
    Raises ValueError for a bad ``fps``, :class:`MocapFormatError` for malformed raw files,
    FileNotFoundError/ValueError for a missing or empty ``raw_dir``. On any error nothing is
    written to ``out_path`` (an existing file there is left untouched).
    """
    t0 = time.perf_counter()
    step = frame_step(fps)
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw mocap directory not found: {raw_dir}")
    say = progress or (lambda _msg: None)
    subjects_dir = raw_dir / "subjects"
    subject_dirs = sorted(p for p in subjects_dir.iterdir() if p.is_dir()) if subjects_dir.is_dir() else []
    bvh_files = sorted(p for p in raw_dir.rglob("*.bvh") if p.is_file())
    if not subject_dirs and not bvh_files:
        raise ValueError(f"{raw_dir} has no subjects/<SS>/ directories and no .bvh files")

    sources: dict[str, str] = {}
    clips: list[Clip] = []
    for sdir in subject_dirs:
        ss = sdir.name
        asf_path = sdir / f"{ss}.asf"
        if not asf_path.is_file():
            raise MocapFormatError(asf_path.relative_to(raw_dir).as_posix(), 0, f"missing skeleton file for subject {ss!r}")
        text, rel = _read(asf_path, raw_dir, sources)
        skeleton = parse_asf_text(text, rel)
        for amc_path in sorted(sdir.glob(f"{ss}_*.amc")):
            text, rel = _read(amc_path, raw_dir, sources)
            c = convert_amc_clip(skeleton, text, rel, ss, step)
            clips.append(c)
            say(f"{rel}: {len(c.frames)} rows")
    for bvh_path in bvh_files:
        text, rel = _read(bvh_path, raw_dir, sources)
        c = convert_bvh_clip(text, rel, step)
        clips.append(c)
        say(f"{rel}: {len(c.frames)} rows")

    keys = [(c.subject, c.clip) for c in clips]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate (subject, clip) from different files: {dupes}")

    table = clips_to_table(clips, table_metadata(fps, sources))
    write_table_atomic(table, out_path)
    rows_per_subject: dict[str, int] = {}
    for c in sorted(clips, key=lambda c: (c.subject, c.clip)):
        rows_per_subject[c.subject] = rows_per_subject.get(c.subject, 0) + len(c.frames)
    summary = {
        "rows": table.num_rows,
        "clips": len(clips),
        "subjects": len(rows_per_subject),
        "rows_per_subject": rows_per_subject,
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": Path(out_path).stat().st_size,
        "path": str(out_path),
    }
    say(f"wrote {summary['rows']} rows, {summary['clips']} clips, {summary['subjects']} subjects "
        f"to {out_path} ({summary['bytes']} bytes) in {summary['seconds']} s")
    return summary
