"""A sweep's wall time against running the same trials one after another in plain Python.

    python bench/sweep_vs_sequential.py [--sweep sweeps/smoke.yaml]

Runs the sweep (Ray Tune + Optuna + Ray Train + MLflow, in a scratch folder), reads back the parameters of
the trials it ran, then trains exactly those trial configs sequentially with ``vipe_ray.training.loop.train`` (no
Ray, no MLflow, no lifter) and prints both wall times and their ratio, measured in this one run. The sweep's
time includes what the platform adds (Ray start-up, per-trial Train start-up, validation, MLflow logging);
the ratio says what concurrency buys back on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vipe_ray.platform.sweep_spec import base_values, load_sweep, trial_config
from vipe_ray.platform.tune_driver import run_sweep
from vipe_ray.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="sweeps/smoke.yaml")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        summary = run_sweep(sweep, tracking_uri=f"sqlite:///{scratch}/mlflow.db", storage=Path(scratch) / "ray")
        sweep_s = time.perf_counter() - start
        import ray

        ray.shutdown()
        base = base_values(sweep)
        start = time.perf_counter()
        for i, row in enumerate(summary["trials"]):
            config = replace(trial_config(base, row["params"]), lifter_baseline=False)
            train(config, Path(scratch) / f"plain-{i}", progress=lambda _m: None)
        plain_s = time.perf_counter() - start
    n = len(summary["trials"])
    print(f"sweep {sweep.name}: {n} trials, concurrency {sweep.concurrency}, {sweep.resources.num_workers} "
          f"worker(s) x {sweep.resources.cpus_per_worker} CPU per trial")
    print(f"  Ray Tune sweep (incl. Ray start, validation, MLflow): {sweep_s:8.1f} s")
    print(f"  same trials one after another, plain Python:          {plain_s:8.1f} s")
    print(f"  ratio sweep / sequential = {sweep_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
