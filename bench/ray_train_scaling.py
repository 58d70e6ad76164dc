"""Ray Train data-parallel scaling: training throughput of 2 workers vs 1 worker, measured side by side.

    python bench/ray_train_scaling.py [--steps 100] [--cpus-per-worker 0.5] [--repeats 1] [--set key=value ...]

Starts one local Ray cluster (``num_cpus=2``, no dashboard) and runs :func:`vipe_ray.training.ray_train.fit` with
1 worker, then 2 workers (alternating, ``--repeats`` times each), the same config and per-worker batch
("batch per worker": 2 workers train on twice the poses per step). Throughput is the loop's own
``samples_per_s`` from its single report at the last step: poses trained by all workers divided by rank 0's
wall time of the training loop proper (from the first step to the last; Ray start-up, data loading, model
construction, validation and teardown are excluded). The fit's wall time is printed beside it.

Every worker gets ``--cpus-per-worker`` Ray CPUs (0.5 by default: 2 x 1 CPU on a 2-CPU cluster leaves Ray
Data no CPU and hangs); Ray sets OMP_NUM_THREADS = max(1, floor(cpus)), so each worker runs 1 torch thread
either way. On a 2-core machine the ideal ratio is 2; other processes on the machine lower it, so the host's
load average is printed with every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from vipe_ray.cli import _overrides
from vipe_ray.config import load_config, merge

#: A model between the tests' tiny one and the default run: a step takes tens of ms on one thread.
BENCH = {
    "model": {"width": 256, "blocks": 2, "samples": 8},
    "mining": {"samples": 4},
    "optim": {"batch_size": 128},
    "data": {"val_subjects": []},
}


def _load() -> str:
    """The host's 1-minute load average: other processes on a small machine skew every number here."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    overrides = merge(merge(BENCH, {"optim": {"steps": args.steps}, "checkpoint_every": args.steps}),
                      _overrides(args.set))
    config = load_config(args.config, overrides)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from vipe_ray.training.ray_train import Scaling, fit

    print(f"config: width {config.model.width}, blocks {config.model.blocks}, K {config.model.samples}, "
          f"batch {config.optim.batch_size} per worker, {config.optim.steps} steps, "
          f"{args.cpus_per_worker} Ray CPU per worker; host load {_load()} before start", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory(prefix="vipe-ray-bench-") as storage:
            for repeat in range(args.repeats):
                for workers in (1, 2):
                    started = time.perf_counter()
                    result = fit(config, Scaling(num_workers=workers, cpus_per_worker=args.cpus_per_worker),
                                 f"scaling-{workers}w-{repeat}", storage, max_failures=0)
                    wall = time.perf_counter() - started
                    rate = result.metrics["samples_per_s"]
                    rates[workers].append(rate)
                    print(f"  {workers} worker{'s' if workers > 1 else ' '}: {rate:8.1f} samples/s "
                          f"(training loop; fit wall time {wall:.1f} s; host load {_load()})", flush=True)
    finally:
        ray.shutdown()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"Ray Train throughput, training loop proper (loop-reported samples_per_s"
          f"{', median of %d' % args.repeats if args.repeats > 1 else ''}):")
    print(f"  1 worker : {one:8.1f} samples/s")
    print(f"  2 workers: {two:8.1f} samples/s")
    print(f"  ratio 2/1: {two / one:.2f}x (ideal 2.00x on 2 idle cores)")


if __name__ == "__main__":
    main()
