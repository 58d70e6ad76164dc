"""End-to-end platform tests on real services: a Ray head started with `ray start`, `ray job submit` of the
smoke sweep, MLflow (SQLite, and a real `mlflow server` on PostgreSQL), and an interrupted sweep resumed.

Every service is started here on loopback with a time budget and stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
       "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


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
    from vipe_ray.cameras import RIGS, Orbits, render
    from vipe_ray.data import load_table

    table = load_table(REPO / "data" / "cmu_h36m17_30fps.parquet").select(["10"])
    poses = torch.from_numpy(table.joints[:6]).double()
    pixels = render(poses, Orbits.from_cameras([RIGS["h36m"][0]]).expand(6)).float()
    pixels[0, 3] = float("nan")  # a missing keypoint is allowed
    with torch.no_grad():
        embedding = model(pixels)
    assert embedding.shape[0] == 6 and torch.isfinite(embedding).all()
    return {"parent": parent, "children": children}


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback via `ray start`, stopped afterwards."""
    port = _free_port()
    dash = _free_port()
    env = dict(ENV)  # Ray's default /tmp/ray: pytest's long tmp paths overflow Unix socket names
    subprocess.run(["ray", "start", "--head", "--num-cpus=2", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, timeout=120, capture_output=True)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{dash}/api/version"), 60, "ray dashboard")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, timeout=120, capture_output=True)


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_smoke_sweep(ray_head, tmp_path):
    address, env = ray_head
    db = tmp_path / "mlflow.db"
    storage = tmp_path / "results"
    # Artifacts land beside the SQLite file; the job runs in Ray's copy of the working dir.
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "-m", "vipe_ray.sweep", "sweeps/smoke.yaml", "--tracking-uri", f"sqlite:///{db}",
           "--storage", str(storage)]
    out = subprocess.run(cmd, env=env, timeout=540, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[sweep] best:" in out.stdout
    _check_sweep_in_mlflow(f"sqlite:///{db}", "vipe-ray-smoke")


@pytest.fixture
def postgres(tmp_path):
    """A private PostgreSQL server (Debian's binaries) on loopback, run as the postgres user."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindir:
        pytest.fail("PostgreSQL binaries not found under /usr/lib/postgresql; .ci/run installs them")
    bindir = bindir[-1]
    root = Path(f"/tmp/vipe-pg-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sock, "postgres")
    port = _free_port()

    def as_postgres(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True,
                              text=True, timeout=60)

    as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    # -l: the server must not inherit our pipes, or capturing pg_ctl's output waits for it forever.
    as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-o",
                f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "-w", "start")
    try:
        as_postgres(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on 127.0.0.1 backed by PostgreSQL, with a local artifact store."""
    port = _free_port()
    env = {**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/health"), 120, "mlflow server", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
        _wait(lambda: any(_finished_trials(d, 40) >= 1 for d in storage.glob("resume-*")), 400,
              "first trial", first)
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
    assert _finished_trials(run_dir, 40) == 3
    for name, mtime in mtimes.items():
        assert (run_dir / name / "result.json").stat().st_mtime == mtime, f"{name} was retrained"
    runs = _check_sweep_in_mlflow(mlflow_server, "vipe-ray-resume", min_trials=3)
    assert len(runs["children"]) == 3, "resumed trials reuse their MLflow runs"
