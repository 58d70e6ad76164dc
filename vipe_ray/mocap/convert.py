"""Convert raw motion-capture collections (CMU ASF/AMC, BVH of any skeleton) into the pose table.

A collection is one or more folders holding ``subjects/<SS>/<SS>.asf`` with ``<SS>_<TT>.amc``
motions (CMU's layout) and/or ``*.bvh`` files anywhere below. Every file is one *take*
(subject, clip); takes are converted in parallel, one process per core, and written as one
table (:mod:`vipe_ray.mocap.table`) whose rows do not depend on the number of processes.

A broken file stops the run and nothing is written, unless ``skip_invalid``: then it is
reported as ``file:line: what``, left out, and listed in the summary and the table metadata.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .amc import parse_amc_text
from .asf import Skeleton, decode_bytes, parse_asf_text
from .bvh import parse_bvh_text, bvh_forward_kinematics
from .errors import MocapFormatError
from .kinematics import asf_amc_h36m17
from .skeleton import SkeletonMap, SkeletonMapError, detect_skeleton_map
from .table import SOURCE_FPS, Clip, clips_to_table, table_metadata, write_table_atomic

PREFER = ("amc", "bvh")


def frame_step(fps: int) -> int:
    """Source frames per output frame; ``fps`` must be a positive int dividing 120."""
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0 or SOURCE_FPS % fps:
        raise ValueError(f"fps must be a positive integer dividing {SOURCE_FPS}, got {fps!r}")
    return SOURCE_FPS // int(fps)


def _subsample(n_frames: int, step: int, first: int = 0) -> np.ndarray:
    idx = np.arange(n_frames, dtype=np.int64)
    return idx[(idx % step == 0) & (idx >= first)]


def convert_amc_clip(skeleton: Skeleton, amc_text: str, amc_rel: str, subject: str, step: int) -> Clip:
    """One AMC take on its subject's skeleton, every ``step``-th frame."""
    motion = parse_amc_text(amc_text, skeleton, amc_rel)
    j = asf_amc_h36m17(skeleton, motion)  # (F, 17, 3) float64
    frames = motion.frame_numbers - 1
    keep = frames % step == 0
    return Clip(subject, Path(amc_rel).stem, frames[keep].astype(np.int32), j[keep].astype(np.float32))


def bvh_skeleton_map(joint_names: Sequence[str], bvh_rel: str, line: int,
                     skeleton: SkeletonMap | None = None) -> SkeletonMap:
    """The map for a BVH: ``skeleton`` where it fits, else the built-in map that fits."""
    missing = skeleton.missing(joint_names) if skeleton is not None else []
    if skeleton is not None and not missing:
        return skeleton
    try:
        return detect_skeleton_map(joint_names, bvh_rel)
    except SkeletonMapError as exc:
        detail = str(exc).removeprefix(f"{bvh_rel}: ")
        if skeleton is not None:
            detail = f"the skeleton map {skeleton.name!r} ({skeleton.source}) lacks {', '.join(missing)}, and {detail}"
        raise MocapFormatError(bvh_rel, line, detail) from None


def convert_bvh_clip(bvh_text: str, bvh_rel: str, step: int,
                     skeleton: SkeletonMap | None = None) -> tuple[Clip, SkeletonMap]:
    """One BVH take, every ``step``-th frame, mapped by ``skeleton`` (default: detected)."""
    bvh = parse_bvh_text(bvh_text, bvh_rel)
    if abs(1.0 / bvh.frame_time - SOURCE_FPS) > 0.01:
        raise MocapFormatError(
            bvh_rel, bvh.frame_time_line, f"Frame Time {bvh.frame_time!r} is not 1/{SOURCE_FPS} s"
        )
    smap = bvh_skeleton_map([j.name for j in bvh.joints], bvh_rel, bvh.joints[0].line, skeleton)
    stem = Path(bvh_rel).stem
    # cgspeed's converters prepend a T-pose that is not part of the take.
    keep = _subsample(bvh.n_frames, step, first=1 if smap.tpose_frame else 0)
    j = smap.apply(bvh_forward_kinematics(smap.prepare(bvh), keep))
    return Clip(stem.split("_")[0], stem, keep.astype(np.int32), j.astype(np.float32)), smap


@dataclass(frozen=True)
class Take:
    """One file to convert: ``path`` on disk, ``rel`` its name in reports and metadata."""

    kind: str  # "amc" or "bvh"
    path: Path
    rel: str
    subject: str
    clip: str
    skeleton: Skeleton | None = None  # the subject's ASF skeleton, for AMC takes


@dataclass(frozen=True)
class TakeResult:
    rel: str
    sha256: str
    clip: Clip | None = None
    skeleton_map: str | None = None
    error: MocapFormatError | None = None


def convert_take(take: Take, step: int, skeleton: SkeletonMap | None = None) -> TakeResult:
    """Convert one take; a malformed file comes back as ``error`` (runs in a worker process)."""
    data = take.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    text = decode_bytes(data)
    try:
        if take.kind == "amc":
            return TakeResult(take.rel, sha, convert_amc_clip(take.skeleton, text, take.rel, take.subject, step))
        clip, smap = convert_bvh_clip(text, take.rel, step, skeleton)
        return TakeResult(take.rel, sha, clip, skeleton_map=smap.name)
    except MocapFormatError as exc:
        return TakeResult(take.rel, sha, error=exc)


def _left_out(rel: str, line: int, reason: str) -> dict:
    return {"file": rel, "line": int(line), "reason": reason}


def _find_takes(raw_dirs: list[Path], skip_invalid: bool, sources: dict[str, str],
                left_out: list[dict], say: Callable[[str], None]) -> list[Take]:
    """Every take of the collection, ASF skeletons parsed (a broken ASF leaves out its subject)."""
    takes: list[Take] = []
    prefixed = len(raw_dirs) > 1
    for raw_dir in raw_dirs:
        def rel_of(p: Path) -> str:
            rel = p.relative_to(raw_dir).as_posix()
            return f"{raw_dir.name}/{rel}" if prefixed else rel

        subjects_dir = raw_dir / "subjects"
        subject_dirs = sorted(p for p in subjects_dir.iterdir() if p.is_dir()) if subjects_dir.is_dir() else []
        bvh_files = sorted(p for p in raw_dir.rglob("*.bvh") if p.is_file())
        if not subject_dirs and not bvh_files:
            raise ValueError(f"{raw_dir} has no subjects/<SS>/ directories and no .bvh files")
        for sdir in subject_dirs:
            ss = sdir.name
            asf_path = sdir / f"{ss}.asf"
            amcs = sorted(sdir.glob(f"{ss}_*.amc"))
            if not amcs and not asf_path.is_file():
                continue  # no ASF/AMC subject here (BVH files below it are found on their own)
            try:
                if not asf_path.is_file():
                    raise MocapFormatError(rel_of(asf_path), 0, f"missing skeleton file for subject {ss!r}")
                data = asf_path.read_bytes()
                skeleton = parse_asf_text(decode_bytes(data), rel_of(asf_path))
                sources[rel_of(asf_path)] = hashlib.sha256(data).hexdigest()
            except MocapFormatError as exc:
                if not skip_invalid:
                    raise
                say(f"left out: {exc} (and the {len(amcs)} motions of subject {ss})")
                left_out.append(_left_out(exc.path, exc.line, exc.detail))
                left_out.extend(_left_out(rel_of(p), 0, f"its skeleton {exc.path} is invalid") for p in amcs)
                continue
            takes.extend(Take("amc", p, rel_of(p), ss, p.stem, skeleton) for p in amcs)
        takes.extend(Take("bvh", p, rel_of(p), p.stem.split("_")[0], p.stem) for p in bvh_files)
    return takes


def _resolve_duplicates(takes: list[Take], prefer: str | None, left_out: list[dict],
                        say: Callable[[str], None]) -> list[Take]:
    """One file per (subject, clip); the same take in both formats needs ``prefer``."""
    by_key: dict[tuple[str, str], list[Take]] = {}
    for t in takes:
        by_key.setdefault((t.subject, t.clip), []).append(t)
    keep: list[Take] = []
    for (subject, clip), group in sorted(by_key.items()):
        if len(group) == 1:
            keep.append(group[0])
            continue
        files = [t.rel for t in group]
        kinds = {t.kind for t in group}
        if prefer is None or len(kinds) == 1 or len(group) > 2:
            one_each = len(kinds) == 2 and len(group) == 2
            hint = " (pass --prefer amc or --prefer bvh to keep one format)" if one_each else ""
            raise ValueError(f"take {clip} of subject {subject} comes from several files: {files}{hint}")
        chosen = next(t for t in group if t.kind == prefer)
        keep.append(chosen)
        for t in group:
            if t is not chosen:
                say(f"left out: {t.rel}: the same take as {chosen.rel} (--prefer {prefer})")
                left_out.append(_left_out(t.rel, 0, f"the same take as {chosen.rel} (prefer {prefer})"))
    return keep


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe: fast, and a script without a ``__main__`` guard can call the converter; but
    forkserver while this process runs other threads (Ray, a server), whose locks a fork could copy held."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver")


def _run_takes(takes: list[Take], step: int, skeleton: SkeletonMap | None, workers: int,
               stop_on_error: bool, on_result: Callable[[TakeResult], None]) -> None:
    """Convert ``takes`` with ``workers`` processes (in-process for 1), calling ``on_result`` as
    each finishes; with ``stop_on_error`` the first failure cancels the takes not yet started."""
    if workers <= 1 or len(takes) <= 1:
        for t in takes:
            r = convert_take(t, step, skeleton)
            on_result(r)
            if stop_on_error and r.error is not None:
                return
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(takes)), mp_context=_pool_context())
    try:
        # Largest files first, so that one long take does not finish alone at the end.
        order = sorted(takes, key=lambda t: -t.path.stat().st_size)
        pending: set[Future] = {pool.submit(convert_take, t, step, skeleton) for t in order}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            try:
                results = [f.result() for f in done]
            except BrokenProcessPool:
                raise RuntimeError("a conversion process died (out of memory?); nothing was written. Rerun with "
                                   "fewer processes (--workers)") from None
            for r in results:
                on_result(r)
            if stop_on_error and any(r.error is not None for r in results):
                return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert_directory(
    raw_dir: str | Path | Sequence[str | Path],
    out_path: str | Path,
    fps: int = 30,
    progress: Callable[[str], None] | None = print,
    *,
    skip_invalid: bool = False,
    skeleton: SkeletonMap | None = None,
    prefer: str | None = None,
    workers: int | None = None,
) -> dict:
    """Convert one collection folder (or several) to the pose table at ``out_path``.

    ``skeleton`` maps every BVH (default: the built-in map each file fits); ``prefer`` keeps
    the AMC or the BVH of a take found in both; ``workers`` processes (default: every core).
    Returns a summary: rows, clips, subjects (counts), rows_per_subject, left_out, seconds,
    bytes, path. Raises ValueError for a bad argument, :class:`MocapFormatError` for a malformed
    raw file (unless ``skip_invalid``), FileNotFoundError for a missing folder. On any error
    nothing is written to ``out_path`` (an existing file there is left untouched).
    """
    t0 = time.perf_counter()
    step = frame_step(fps)
    if prefer is not None and prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    raw_dirs = [Path(raw_dir)] if isinstance(raw_dir, (str, Path)) else [Path(d) for d in raw_dir]
    if not raw_dirs:
        raise ValueError("no raw mocap directory given")
    for d in raw_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"raw mocap directory not found: {d}")
    if Path(out_path).is_dir():
        raise ValueError(f"output {out_path} is a directory; name the .parquet file to write")
    # Absolute paths: `.` or `x/..` have no usable name of their own.
    raw_dirs = [d.resolve() for d in raw_dirs]
    names = [d.name for d in raw_dirs]
    if len(raw_dirs) > 1 and len(set(names)) != len(names):
        raise ValueError(f"raw mocap directories must have distinct names, got {[str(d) for d in raw_dirs]}")
    nested = [(a, b) for a in raw_dirs for b in raw_dirs if a != b and b.is_relative_to(a)]
    if nested:
        raise ValueError(f"raw mocap directory {nested[0][1]} lies inside {nested[0][0]}: give each folder once")
    say = progress or (lambda _msg: None)

    sources: dict[str, str] = {}
    left_out: list[dict] = []
    takes = _find_takes(raw_dirs, skip_invalid, sources, left_out, say)
    takes = _resolve_duplicates(takes, prefer, left_out, say)
    say(f"converting {len(takes)} takes with {min(workers, max(len(takes), 1))} process(es)")

    clips: list[Clip] = []
    skeletons: dict[str, str] = {}
    errors: dict[str, MocapFormatError] = {}
    done = 0

    def on_result(r: TakeResult) -> None:
        nonlocal done
        done += 1
        if r.error is not None:
            errors[r.rel] = r.error
            if skip_invalid:
                say(f"[{done}/{len(takes)}] left out: {r.error}")
                left_out.append(_left_out(r.error.path, r.error.line, r.error.detail))
            return
        sources[r.rel] = r.sha256
        clips.append(r.clip)
        if r.skeleton_map is not None:
            skeletons[r.rel] = r.skeleton_map
        say(f"[{done}/{len(takes)}] {r.rel}: {len(r.clip.frames)} rows")

    _run_takes(takes, step, skeleton, workers, not skip_invalid, on_result)
    if errors and not skip_invalid:
        raise errors[min(errors)]  # of the broken files found before the run stopped, the first by name
    if not clips:
        raise ValueError(f"no valid take in {[str(d) for d in raw_dirs]}: all {len(left_out)} files were left out")

    table = clips_to_table(clips, table_metadata(fps, sources, left_out, skeletons))
    write_table_atomic(table, out_path)
    rows_per_subject: dict[str, int] = {}
    for c in sorted(clips, key=lambda c: (c.subject, c.clip)):
        rows_per_subject[c.subject] = rows_per_subject.get(c.subject, 0) + len(c.frames)
    summary = {
        "rows": table.num_rows,
        "clips": len(clips),
        "subjects": len(rows_per_subject),
        "rows_per_subject": rows_per_subject,
        "left_out": sorted(left_out, key=lambda d: d["file"]),
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": Path(out_path).stat().st_size,
        "path": str(out_path),
    }
    say(f"wrote {summary['rows']} rows, {summary['clips']} clips, {summary['subjects']} subjects "
        f"to {out_path} ({summary['bytes']} bytes) in {summary['seconds']} s"
        + (f"; left out {len(left_out)} files" if left_out else ""))
    return summary
