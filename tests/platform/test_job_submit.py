"""End-to-end platform tests on real services: a Ray head started with `ray start`, `ray job submit` of the
smoke sweep, MLflow (SQLite, and a real `mlflow server` on PostgreSQL), and an interrupted sweep resumed.

Every service is started here on loopback with a time budget and stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import ENV, free_port, http_ok, lean_mlflow_server, mlflow_server, postgres, wait_for  # noqa: F401  (fixtures)

# Integration tests (Ray jobs, an MLflow server on PostgreSQL, Chromium): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _check_sweep_in_mlflow(tracking_uri: str, experiment: str, min_trials: int = 2) -> dict:
    """The MLflow side of a finished smoke sweep: parent/children, params, metrics, model, plots, registry."""
    import mlflow
    import torch

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing in {tracking_uri}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) >= min_trials
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert "searched.mining.kappa" in child.data.params and "model.width" in child.data.params
        assert child.data.tags["data_checksum"] == parent.data.tags["data_checksum"]
        history = client.get_metric_history(child.info.run_id, "val_hit_at_1")
        assert len(history) >= 2, "per-report metrics are logged"
        assert all(0.0 <= m.value <= 1.0 for m in history)
        for key in ("loss", "a", "b", "val_hit_at_5", "val_hit_at_10", "val_hit_at_20", "triplet_loss"):
            assert key in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert {"plots/hit_at_k.png", "plots/retrievals.png"} <= artifacts
    parent_plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optuna_history.png" in parent_plots
    best_run = parent.data.tags["best_run_id"]
    versions = client.search_model_versions(f"run_id = '{best_run}'")
    assert versions, "the best trial's model is registered"
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{versions[0].name}/{versions[0].version}")
    from vipe_ray.prvipe.cameras import RIGS, Orbits, render
    from vipe_ray.data import load_table

    table = load_table(REPO / "data" / "cmu_h36m17_30fps.parquet").select(["10"])
    poses = torch.from_numpy(table.joints[:6]).double()
    pixels = render(poses, Orbits.from_cameras([RIGS["h36m"][0]]).expand(6)).float()
    pixels[0, 3] = float("nan")  # a missing keypoint is allowed
    with torch.no_grad():
        embedding = model(pixels)
    assert embedding.shape[0] == 6 and torch.isfinite(embedding).all()
    return {"parent": parent, "children": children}


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory) -> dict:
    """The smoke sweep, submitted with `ray job submit` to a Ray head started with `ray start` on loopback
    (stopped before the tests look at the result). Shared by the tests of the finished sweep, its console
    summary and its MLflow UI, so the suite runs it once."""
    tmp = tmp_path_factory.mktemp("smoke-job")
    port, dash = free_port(), free_port()
    env = dict(ENV)  # Ray's default /tmp/ray: pytest's long tmp paths overflow Unix socket names
    # A free job-agent port too: Ray's default (52365) is taken whenever another Ray runs on the machine, and the
    # job server then answers "No available agent to submit job" for good.
    subprocess.run(["ray", "start", "--head", "--num-cpus=2", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, timeout=120, capture_output=True)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{dash}/api/version"), 60, "ray dashboard")
        db = tmp / "mlflow.db"
        # Artifacts land beside the SQLite file; the job runs in Ray's copy of the working dir.
        cmd = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
               "python", "-m", "vipe_ray.sweep", "sweeps/smoke.yaml", "--tracking-uri", f"sqlite:///{db}",
               "--storage", str(tmp / "results")]
        for _ in range(4):
            out = subprocess.run(cmd, env=env, timeout=540, capture_output=True, text=True)
            # The dashboard can answer before its job agent is up (a busy machine); nothing was submitted then.
            if "No available agent to submit job" not in out.stdout + out.stderr:
                break
            time.sleep(5)
        (tmp / "job.log").write_text(out.stdout + out.stderr)  # for a look after a failure
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, timeout=120, capture_output=True)
    return {"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr,
            "tracking_uri": f"sqlite:///{db}", "experiment": "vipe-ray-smoke"}


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_smoke_sweep(smoke_job):
    assert smoke_job["returncode"] == 0, smoke_job["stdout"][-4000:] + smoke_job["stderr"][-4000:]
    _check_sweep_in_mlflow(smoke_job["tracking_uri"], smoke_job["experiment"])
    # A one-node cluster may keep a SQLite store on the driver's node, with a warning (refused on several nodes).
    assert f"warning: MLflow store {smoke_job['tracking_uri']} is a file on the driver's node" in smoke_job["stdout"]


def _job_output(stdout: str) -> str:
    """The job's own output: without the trailing lines of `ray job submit` itself ("<time> SUCC cli.py:68
    -- Job '...' succeeded" and its rules)."""
    lines = stdout.rstrip().splitlines()
    while lines and (not lines[-1].strip() or re.match(r"\d{4}-\d\d-\d\d [\d:,.]+\s+\w+ cli\.py:\d+ -- ", lines[-1])):
        lines.pop()
    return "\n".join(lines)


@pytest.mark.timeout(600)
def test_sweep_output_ends_with_a_summary_matching_mlflow(smoke_job):
    """The main command's last lines are the summary table, and every number in it is MLflow's."""
    import mlflow

    assert smoke_job["returncode"] == 0, smoke_job["stdout"][-4000:] + smoke_job["stderr"][-4000:]
    lines = _job_output(smoke_job["stdout"]).splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Sweep smoke: "))
    table = lines[start:]
    client = mlflow.MlflowClient(smoke_job["tracking_uri"])
    exp = client.get_experiment_by_name(smoke_job["experiment"])
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags["ray.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert table[0] == f"Sweep smoke: {len(children)} trials, objective val_hit@1 (max)"
    header = table[2].split()
    rigs_ks = [h.split("@") for h in header[7:]]
    assert header[:7] == ["trial", "status", "mining.kappa", "model.embedding_dim", "steps", "kept", "val_hit@1"]
    assert {rig for rig, _ in rigs_ks} == {"wide-val"} and {k for _, k in rigs_ks} == {"1", "5", "10", "20"}
    rows = table[4:4 + len(children)]
    assert table[4 + len(children)].startswith("---"), "one row per trial, nothing else"
    best_trial = client.get_run(parent.data.tags["best_run_id"]).data.tags["ray.trial_id"]
    kappas = set()
    for row in rows:
        mark, cells = row[0], row[1:].split()
        run = children[cells[0]]
        assert mark == ("*" if cells[0] == best_trial else " ")
        assert cells[1] == run.info.status == "FINISHED"
        kappa = float(run.data.params["mining.kappa"])
        kappas.add(kappa)
        assert float(cells[2]) == pytest.approx(kappa, rel=1e-3)
        assert cells[3] == run.data.params["model.embedding_dim"]
        assert cells[4] == run.data.params["optim.steps"]
        kept = int(cells[5])
        assert kept == int(run.data.tags["checkpoint_step"])

        def at_kept(key: str) -> float:
            return next(m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == kept)

        history = client.get_metric_history(run.info.run_id, "val_hit_at_1")
        assert at_kept("val_hit_at_1") == max(m.value for m in history), "the kept checkpoint is the best"
        assert float(cells[6]) == pytest.approx(100 * at_kept("val_hit_at_1"), abs=0.051)
        for (rig, k), cell in zip(rigs_ks, cells[7:]):
            assert float(cell) == pytest.approx(100 * at_kept(f"val_{rig}_hit_at_{k}"), abs=0.051)
    assert max(kappas) - min(kappas) > 0.01, "the smoke trials differ visibly"
    version = client.search_model_versions(f"run_id = '{parent.data.tags['best_run_id']}'")[0]
    assert f"registered model: {version.name} version {version.version} " in "\n".join(table)
    assert f"MLflow run {parent.data.tags['best_run_id']}" in "\n".join(table)
    assert table[-1] == (f"MLflow: mlflow ui --backend-store-uri {smoke_job['tracking_uri']}  then open "
                         f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    # The parent run says where it came from and carries its sweep YAML.
    assert parent.data.tags["mlflow.source.name"] == "sweeps/smoke.yaml"
    assert parent.data.tags["command"].startswith("python -m vipe_ray.sweep sweeps/smoke.yaml")
    assert parent.data.tags["mlflow.note.content"].startswith("Sweep `smoke`")
    assert all(r.data.tags["mlflow.note.content"].startswith("Trial ") for r in children.values())
    yaml_copy = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="sweep/smoke.yaml",
                                                         tracking_uri=smoke_job["tracking_uri"]))
    assert yaml_copy.read_text() == (REPO / "sweeps" / "smoke.yaml").read_text()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # Known-harmless noise is gone from the console.
    for noise in ("Failed to query Ray Train Controller", "PYTHON worker processes", "Saving pytorch model by Pickle",
                  "ExperimentalWarning", "has no artifacts at artifact path"):
        assert noise not in smoke_job["stdout"] + smoke_job["stderr"], noise


def _chromium() -> str | None:
    """Debian's Chromium (`apt-get install chromium`; .ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def mlflow_ui(smoke_job, tmp_path):
    """The MLflow UI on the smoke sweep's store."""
    with lean_mlflow_server(smoke_job["tracking_uri"], tmp_path / "mlflow-ui.log") as url:
        yield url


def check_mlflow_ui(url: str, chromium: str, tracking_uri: str, experiment: str, shots: Path) -> None:
    """Open the experiment the way the sweep's summary says, in headless Chromium: the model-training runs
    table with the sweep's parent run, its nested trials once expanded, and the Hit@1 chart."""
    import mlflow
    from playwright.sync_api import sync_playwright

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags]
    visited: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("framenavigated", lambda frame: visited.append(frame.url))
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
            parent_cell = page.locator("[role=gridcell]", has_text=parent.info.run_name).first
            parent_cell.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "runs.png"))
            for genai in ("Judges", "Evaluation runs", "Token Usage"):
                assert page.get_by_text(genai, exact=True).count() == 0, f"GenAI view shown ({genai})"
            parent_cell.locator("button").first.click()  # expand the sweep's nested trials
            for name in trials:
                page.locator("[role=gridcell]", has_text=name).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "nested.png"))
            page.locator("input[name=runs-view-mode][value=CHART]").dispatch_event("click")
            # 35 metric charts render lazily in alphabetical order: search brings Hit@1 into view.
            page.get_by_placeholder("Search metric charts").fill("val_hit_at_1")
            page.get_by_text("val_hit_at_1", exact=True).first.wait_for(timeout=60_000)
            for name in trials:  # the chart's legend has a line per nested trial
                page.get_by_text(f"{name} (val_hit_at_1)", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "charts.png"))
        finally:
            browser.close()
    assert not any(re.search(r"/(overview|traces|evaluation-runs)\b", u) for u in visited), visited


@pytest.mark.timeout(300)
def test_mlflow_ui_opens_runs_with_nested_trials_and_hit_chart(smoke_job, mlflow_ui, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` package (.ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the `test` extra: pip install -e '.[test]'")
    assert smoke_job["returncode"] == 0, smoke_job["stdout"][-4000:]
    check_mlflow_ui(mlflow_ui, chromium, smoke_job["tracking_uri"], smoke_job["experiment"], tmp_path)


def _finished_trials(run_dir: Path, steps: int) -> int:
    count = 0
    for result in run_dir.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if any(line.get("step") == steps for line in lines):
            count += 1
    return count


@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_on_mlflow_server_with_postgres(mlflow_server, tmp_path):
    """SIGINT a running sweep after its first trial finished; `--resume` completes the rest, tracked on a
    real MLflow server backed by PostgreSQL, without retraining the finished trial."""
    sweep = tmp_path / "resume.yaml"
    sweep.write_text((REPO / "sweeps" / "smoke.yaml").read_text().replace("name: smoke", "name: resume")
                     .replace("trials: 2", "trials: 3").replace("concurrency: 2", "concurrency: 1"))
    storage = tmp_path / "results"
    cmd = [sys.executable, "-m", "vipe_ray.sweep", str(sweep), "--tracking-uri", mlflow_server,
           "--storage", str(storage)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        # Interrupt once Tune has closed a trial: its step-40 result arrives seconds before Ray Train's teardown
        # ends, and a trial interrupted in between is (correctly) run again on resume.
        wait_for(lambda: any(_finished_trials(d, 40) >= 1 for d in storage.glob("resume-*"))
              and re.search(r"Trial run_trial_\w+ completed after", (tmp_path / "first.log").read_text()),
              400, "first trial", first)
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    run_dir = next(storage.glob("resume-*"))
    finished_before = {p.parent.name for p in run_dir.glob("run_trial_*/result.json")
                       if '"step": 40' in p.read_text()}
    assert finished_before, "a trial finished before the interruption"
    mtimes = {name: (run_dir / name / "result.json").stat().st_mtime for name in finished_before}

    second = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resuming" in second.stdout
    # Run directly (not under `ray job submit`), the command's output ends with the summary table.
    tail = second.stdout.rstrip().splitlines()
    assert tail[-1] == f"MLflow: open {mlflow_server}/#/experiments/{tail[-1].split('/experiments/')[1]}"
    assert tail[-1].endswith("/runs?workflowType=machine_learning") and tail[-2].startswith("registered model: ")
    assert sum(1 for line in tail if re.match(r"[ *][0-9a-f]{8}  FINISHED ", line)) == 3
    assert _finished_trials(run_dir, 40) == 3
    for name, mtime in mtimes.items():
        assert (run_dir / name / "result.json").stat().st_mtime == mtime, f"{name} was retrained"
    runs = _check_sweep_in_mlflow(mlflow_server, "vipe-ray-resume", min_trials=3)
    assert len(runs["children"]) == 3, "resumed trials reuse their MLflow runs"
