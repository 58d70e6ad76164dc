"""How a sweep ends: each trial's best-validation checkpoint is the one kept, logged and registered, and a
sweep that runs out of its time budget ends normally (summary, best model registered, test metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vipe_ray.platform.sweep_spec import load_sweep
from vipe_ray.platform.tune_driver import TrialFinisher

# Integration tests (Ray Tune sweeps): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def _sweep(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "budget.yaml"
    path.write_text(f"""name: budget
base_config: {REPO / "vipe_ray/configs/tiny.yaml"}
overrides:
  model: {{width: 64, samples: 4}}
  optim: {{steps: 100000, batch_size: 64}}
  eval: {{max_queries: 60, occlusion_groups: [left_arm], occlusion_rates: [0.1]}}
  checkpoint_every: 20
  log_every: 20
search_space:
  mining.kappa: {{type: uniform, low: 0.08, high: 0.15}}
trials: 2
concurrency: 1
scheduler: {{type: fifo}}
resources: {{num_workers: 1, cpus_per_worker: 0.49}}
validation_queries: 60
{extra}""")
    return path


def test_finisher_keeps_the_best_checkpoint_still_on_disk(tmp_path):
    finisher = TrialFinisher(load_sweep(_sweep(tmp_path)), {}, "sqlite://", "0", "p")
    paths = []
    for step, value in ((20, 0.10), (40, 0.30), (60, 0.20), (80, 0.30), (100, 0.05)):
        path = tmp_path / f"checkpoint_{step}"
        path.mkdir()
        paths.append(path)
        finisher.on_trial_result("t1", {"step": step, "val_hit@1": value, "checkpoint_path": str(path)})
    finisher.on_trial_result("t1", {"step": 120, "val_hit@1": 0.9})  # a report without a checkpoint
    assert finisher.best("t1") == (0.30, str(paths[3])), "ties go to the later checkpoint"
    paths[3].rmdir()  # Ray Train kept the other one of the tie
    assert finisher.best("t1") == (0.30, str(paths[1]))
    assert finisher.last_step["t1"] == 120 and finisher.best("unknown") is None


@pytest.mark.timeout(600)
def test_sweep_out_of_time_budget_ends_normally_with_its_best_checkpoint_registered(tmp_path):
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = _sweep(tmp_path, "time_budget_s: 100\ntest_best: true\n")  # the best trial is also tested
    out = subprocess.run([sys.executable, "-m", "vipe_ray.sweep", str(sweep),
                          "--tracking-uri", tracking, "--storage", str(tmp_path / "results")],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=560)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "time budget of 100 s used up" in out.stdout
    assert "registered model: vipe-ray-budget version 1" in out.stdout

    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("vipe-ray-budget")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["ended"] == "time_budget"
    best = client.get_run(parent.data.tags["best_run_id"])
    assert best.info.status == "FINISHED" and best.data.tags["stopped_early"]
    # The reports Tune received with a checkpoint (the last report MLflow holds may have been cut off by the
    # budget before its checkpoint was saved): the registered one is the best of them.
    trial_id = best.data.tags["ray.trial_id"]
    result_file = next((tmp_path / "results").glob(f"budget-*/run_trial_{trial_id}*/result.json"))
    reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    saved = [(r["val_hit@1"], r["step"]) for r in reports if r.get("checkpoint_path")]
    assert saved, "Tune received checkpoints"
    top = max(v for v, _ in saved)
    assert int(best.data.tags["checkpoint_step"]) == max(s for v, s in saved if v == top), (
        "the registered checkpoint is the best-validation one (latest of ties)")
    version = client.get_model_version("vipe-ray-budget", "1")
    assert version.run_id == best.info.run_id
    assert version.tags["checkpoint_step"] == best.data.tags["checkpoint_step"]
    assert 0.0 <= best.data.metrics["test/hit_at_1"] <= 1.0 and "test/h36m/lift3d/hit_at_1" not in best.data.metrics
    assert float(version.tags["test/hit_at_1"]) == pytest.approx(best.data.metrics["test/hit_at_1"], abs=1e-4)
    assert {"plots/hit_at_k.png"} <= {a.path for a in client.list_artifacts(best.info.run_id, "plots")}


def test_test_metrics_are_logged_past_mlflows_batch_limit(tmp_path):
    """A full evaluation on several rigs of one's own has more than MLflow's 1,000 metrics per request: every
    finite one reaches the run (a real SQLite store), non-finite ones are left out."""
    import math

    import mlflow

    from vipe_ray.platform.mlflow_runs import log_metrics

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("batches"))
    values = {f"test/rig{i // 100}/m{i % 100}/hit@1": i / 2500 for i in range(2500)}
    log_metrics(client, run.info.run_id, {**values, "test/empty/near_miss": math.nan})
    logged = client.get_run(run.info.run_id).data.metrics
    assert len(logged) == 2500
    assert logged["test/rig24/m99/hit_at_1"] == pytest.approx(2499 / 2500)
