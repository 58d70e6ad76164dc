"""Study mode: the YAML's validation, the grid, and a miniature study end to end (real Ray, real MLflow)
whose report must carry exactly the child runs' numbers."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vipe_ray.config import ConfigError
from vipe_ray.platform.study_spec import load_study

# Integration tests (Ray Tune studies): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}

MINI = f"""# python -m vipe_ray.sweep mini.yaml
name: mini
base_config: {REPO / "vipe_ray/configs/tiny.yaml"}
overrides:
  model: {{width: 64, samples: 4}}
  optim: {{steps: 40, batch_size: 64}}
  eval: {{max_queries: 60, occlusion_groups: [left_arm, right_arm, left_leg, right_leg], occlusion_rates: [0.1]}}
  checkpoint_every: 20
  log_every: 20
study:
  variants:
    full: {{}}
    point: {{model.probabilistic: false}}
  seeds: [0, 1]
concurrency: 2
resources: {{num_workers: 1, cpus_per_worker: 0.49}}
validation_queries: 60
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_grid_is_every_variant_for_every_seed(tmp_path):
    study = load_study(_write(tmp_path, MINI.replace("seeds: [0, 1]", "seeds: [3, 1, 2]")))
    trials = study.trials()
    assert len(trials) == 6 and len(set(trials)) == 6
    assert {v for v, _ in trials} == {"full", "point"} and {s for _, s in trials} == {1, 2, 3}


@pytest.mark.parametrize("change, expected", [
    (("seeds: [0, 1]", "seeds: [0, 0]"), "study.seeds"),
    (("study:", "study:\n  samplr: tpe"), "study.samplr: unknown key"),
    (("point: {model.probabilistic: false}", "point: {model.probabilistc: false}"), "study.variants.point"),
    (("point: {model.probabilistic: false}", "point: {model.width: -3}"), "study.variants.point"),
    (("study:", "study:\n  reference: nope"), "study.reference: 'nope'"),
    (("study:", "study:\n  series: {mining.kappa: [full, ghost]}"), "'ghost' is not a variant"),
    (("concurrency: 2", "concurency: 2"), "concurency: unknown key"),
    (("study:", "study:\n  split: tests"), "study.split: 'tests' is not one of ['test', 'validation']"),
])
def test_bad_studies_fail_naming_file_and_key(tmp_path, change, expected):
    path = _write(tmp_path, MINI.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_a_validation_study_needs_no_test_subjects(tmp_path):
    text = MINI.replace("study:", "study:\n  split: validation").replace(
        "  checkpoint_every: 20", "  checkpoint_every: 20\n  data: {test_subjects: []}")
    study = load_study(_write(tmp_path, text))
    assert study.split == "validation" and study.prefix == "validation/"
    with pytest.raises(ConfigError, match="with split test, data.test_subjects"):
        load_study(_write(tmp_path, text.replace("  split: validation\n", "")))


def _cells(report: str, title: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under ``## title``: first cell -> the other cells."""
    section = report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[1:]}


def _interval(cell: str) -> tuple[float, float, float]:
    mean, low, high = (float(x) for x in re.match(r"([-+\d.]+) \[([-+\d.]+), ([-+\d.]+)\]", cell).groups())
    return mean, low, high


def _expected(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval in % computed here by hand (n = 2: t(0.975, 1) = 12.7062)."""
    assert len(values) == 2
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = 12.7062 * sd / 2 ** 0.5
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


@pytest.mark.timeout(900)
def test_a_trials_extras_ask_for_one_training_workers_cpus_and_gpus():
    from vipe_ray.platform.study import extras_resources
    from vipe_ray.training.ray_train import Scaling

    assert extras_resources(Scaling(num_workers=2, cpus_per_worker=3)) == {"num_cpus": 3, "num_gpus": 0.0}
    assert extras_resources(Scaling(num_workers=1, cpus_per_worker=4, use_gpu=True)) == {"num_cpus": 4,
                                                                                         "num_gpus": 1.0}
    shared = Scaling(num_workers=1, cpus_per_worker=2, use_gpu=True, gpus_per_worker=0.5)
    assert extras_resources(shared) == {"num_cpus": 2, "num_gpus": 0.5}


def test_miniature_study_reports_the_mlflow_runs_numbers(tmp_path):
    import mlflow

    path = _write(tmp_path, MINI)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-m", "vipe_ray.sweep", str(path), "--tracking-uri", tracking,
                          "--storage", str(tmp_path / "results")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=840)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = (tmp_path / "reports" / "mini" / "report.md").read_text()

    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("vipe-ray-mini")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted((c.data.tags["variant"], c.data.tags["seed"]) for c in children) == [
        ("full", "0"), ("full", "1"), ("point", "0"), ("point", "1")]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {"report/report.md", "report/configs.yaml", "report/hit_at_1_per_variant.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    for child in children:
        # The lifter and the test evaluation ran in a task holding one training worker's CPUs.
        assert child.data.tags["extras_resources"] == '{"num_cpus": 0.49, "num_gpus": 0.0}'
        assert {"plots/hit_at_k.png", "plots/retrievals.png"} <= {
            a.path for a in client.list_artifacts(child.info.run_id, "plots")}, "each trial logs its own plots"

    def values(variant: str, key: str) -> list[float]:
        by_seed = {c.data.tags["seed"]: c.data.metrics[key] for c in children if c.data.tags["variant"] == variant}
        return [by_seed["0"], by_seed["1"]]

    clean = _cells(report, "Cross-view retrieval, clean keypoints (Hit@1)")
    for variant in ("full", "point"):
        row = clean[f"`{variant}`"]
        for i, rig in enumerate(("h36m", "novel", "wide")):
            assert _interval(row[i]) == pytest.approx(_expected(values(variant, f"test/{rig}/prvipe/hit_at_1")),
                                                      abs=0.051)
        assert _interval(row[3]) == pytest.approx(_expected(values(variant, "test/hit_at_1")), abs=0.051)
    diffs = [p - f for p, f in zip(values("point", "test/hit_at_1"), values("full", "test/hit_at_1"))]
    assert _interval(clean["`point`"][4]) == pytest.approx(_expected(diffs), abs=0.051)
    # The baselines: the lifter trained beside each seed of the reference, 2D-NN on the same queries.
    lifting = clean["3D lifting (baseline)"]
    assert _interval(lifting[3]) == pytest.approx(_expected(values("full", "test/lift3d_hit_at_1")), abs=0.051)
    assert "2D nearest neighbour (baseline)" in clean
    occluded = _cells(report, "Occluded queries against a clean index (Hit@1, mean over rigs)")
    limb = [statistics.mean(values("full", f"test/{rig}/group:left_arm/clean/prvipe/hit_at_1"))
            for rig in ("h36m", "novel", "wide")]
    assert _interval(occluded["`full`"][1])[0] == pytest.approx(100 * statistics.mean(limb), abs=0.051)
    for line in ("- command: ", "- git commit: ", "sha256 ", "- versions: python "):
        assert line in report
