"""More trials than concurrent slots on a 2-CPU machine: every trial gets its data and finishes.

A real 3-trial sweep at concurrency 2 once hung in its third trial, started after the first two ended, with
Ray Data reporting "Cluster resources are not enough to run any task from ReadFilesParquetV2". Each trial's
workers now stream their shard for the whole run (see ``vipe_ray.training.ingest``), so Ray Data executions of
concurrent trials overlap: this runs the sweep command end to end on its own local Ray and checks that all
three trials finish, the third started after others ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Integration tests (Ray Tune sweeps): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SWEEP = """\
name: three
base_config: vipe_ray/configs/tiny.yaml
overrides:
  model: {width: 32, samples: 3, embedding_dim: 4}
  optim: {steps: 6, batch_size: 32}
  checkpoint_every: 3
  log_every: 3
  data: {buffer_rows: 2048}
search_space:
  mining.kappa: {type: uniform, low: 0.08, high: 0.15}
objective: {metric: val_hit@1, mode: max}
trials: 3
concurrency: 2
scheduler: {type: fifo}
resources: {num_workers: 1, cpus_per_worker: 0.49}
seed: 0
time_budget_s: 600
validation_queries: 20
"""


@pytest.mark.timeout(600)
def test_three_trials_two_at_a_time_all_finish(tmp_path):
    sweep = tmp_path / "three.yaml"
    sweep.write_text(SWEEP)
    ray_tmp = Path(f"/tmp/vr-3t-{os.getpid()}")  # its own Ray: never another cluster on this machine
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-m", "vipe_ray.sweep", str(sweep), "--tracking-uri",
                              f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "results")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "Cluster resources are not enough" not in log
    summary = json.loads(next((tmp_path / "results").glob("three-*/sweep_summary.json")).read_text())
    assert [t["steps"] for t in summary["trials"]] == [6, 6, 6]
    assert not any(t["error"] for t in summary["trials"])
