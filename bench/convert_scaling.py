"""Motion-capture conversion: clips/s on one process and on every core, side by side in one run.

    python bench/convert_scaling.py [RAW_DIR ...] [--repeats 2] [--fps 30]

Converts the collection (default: ``../shared/data/cmu-mocap-more``, with ``--skip-invalid`` since it holds
one truncated file) once untimed (it brings the files into the page cache: a cold first run would make the
one-process figure look slower than it is), then with ``workers=1`` and with every core, alternating the two
``--repeats`` times, each into a temporary file. It prints per run the wall time, clips/s, rows/s and the CPU
time of this process and its worker processes, and the ratio of the medians. A ratio above the number of
cores cannot come from parallelism and is flagged as a measurement error. The two outputs must be
byte-identical (rows do not depend on the number of processes); the bench stops if they are not. The host's
load average is printed with every run: other processes on a small machine skew every number.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from vipe_ray.mocap.convert import convert_directory, default_workers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO.parent / "shared" / "data" / "cmu-mocap-more"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished worker processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_once(raw_dirs: list[Path], out: Path, workers: int, fps: int) -> dict:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    summary = convert_directory(raw_dirs, out, fps=fps, progress=None, skip_invalid=True, workers=workers)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "seconds": seconds, "cpu": cpu_seconds() - cpu0, "clips": summary["clips"],
            "rows": summary["rows"], "left_out": len(summary["left_out"]), "bytes": out.read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_dir", nargs="*", type=Path, default=[DEFAULT_RAW])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args()
    for d in args.raw_dir:
        if not d.is_dir():
            raise SystemExit(f"raw mocap folder not found: {d} (pass the collection's path)")
    cores = default_workers()
    print(f"collection {[str(d) for d in args.raw_dir]}, {cores} cores, {args.repeats} repeats")
    runs: dict[int, list[dict]] = {1: [], cores: []}
    with tempfile.TemporaryDirectory() as tmp:
        run_once(args.raw_dir, Path(tmp, "warm-up.parquet"), cores, args.fps)
        for k in range(args.repeats):
            for workers in runs:
                r = run_once(args.raw_dir, Path(tmp, f"w{workers}_{k}.parquet"), workers, args.fps)
                runs[workers].append(r)
                print(f"workers {workers:>2}: {r['seconds']:7.2f} s  {r['clips'] / r['seconds']:6.2f} clips/s  "
                      f"{r['rows'] / r['seconds']:8.0f} rows/s  cpu {r['cpu']:6.2f} s  ({r['clips']} clips, "
                      f"{r['rows']} rows, {r['left_out']} left out; load {os.getloadavg()[0]:.2f})")
    outputs = {r["bytes"] for rs in runs.values() for r in rs}
    if len(outputs) != 1:
        raise SystemExit("the outputs differ between runs: conversion is not deterministic")
    median = {w: statistics.median(r["seconds"] for r in rs) for w, rs in runs.items()}
    cpu = {w: statistics.median(r["cpu"] for r in rs) for w, rs in runs.items()}
    clips = runs[1][0]["clips"]
    print("\n| processes | median s | clips/s | CPU s |\n|---|---|---|---|")
    for w, s in median.items():
        print(f"| {w} | {s:.2f} | {clips / s:.2f} | {cpu[w]:.2f} |")
    ratio = median[1] / median[cores]
    print(f"\n{cores} processes vs 1: {ratio:.2f}x (outputs byte-identical)")
    if ratio > cores * 1.05:
        print(f"MEASUREMENT ERROR: {ratio:.2f}x on {cores} cores is more than parallelism can give; "
              "the one-process runs were slowed by something else (load, a cold cache)")


if __name__ == "__main__":
    main()
