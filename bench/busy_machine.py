"""Does the training step survive a busy machine? The step alone and beside a CPU-bound process, per thread
setting, side by side in one run.

    python bench/busy_machine.py [--steps 15] [--set key=value ...]

For each setting -- torch's default (2 threads, OpenMP's default spin-waiting), 2 threads with
``OMP_WAIT_POLICY=PASSIVE``, 2 threads with GNU OpenMP's spin count cut to 10,000 and 1,000 iterations, and
1 thread -- runs ``bench/train_step.py --baseline none`` (the default
config's step; ``--set`` passes through) in a fresh process, once on the otherwise idle machine and once
beside a busy process that holds one core (a Python loop), and prints the step time of each and their
ratio. OpenMP reads its wait policy when it starts, hence a process per setting.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "2 threads, spin-waiting (torch's default)": ({}, []),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "2 threads, GOMP_SPINCOUNT=10000": ({"GOMP_SPINCOUNT": "10000"}, []),
    "2 threads, GOMP_SPINCOUNT=1000": ({"GOMP_SPINCOUNT": "1000"}, []),
    "1 thread": ({}, ["--threads", "1"]),
}


def step_ms(env: dict, extra: list[str], steps: int, sets: list[str]) -> float:
    """The step time (ms) that bench/train_step.py prints, run in a fresh process with ``env``."""
    command = [sys.executable, str(REPO / "bench" / "train_step.py"), "--baseline", "none", "--steps", str(steps),
               *extra, *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    found = re.search(r"train step: ([\d.]+) ms", out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    for name, (env, extra) in SETTINGS.items():
        alone = step_ms(env, extra, args.steps, args.set)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = step_ms(env, extra, args.steps, args.set)
        finally:
            hog.kill()
            hog.wait()
        rows.append((name, alone, busy))
        print(f"{name}: alone {alone:.1f} ms, beside a busy process {busy:.1f} ms ({busy / alone:.1f}x)", flush=True)
    print("\n| setting | step alone (ms) | beside a CPU-bound process (ms) | slowdown |\n|---|---|---|---|")
    for name, alone, busy in rows:
        print(f"| {name} | {alone:.1f} | {busy:.1f} | {busy / alone:.1f}x |")


if __name__ == "__main__":
    main()
