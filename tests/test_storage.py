"""Storage by URI (:mod:`vipe_ray.storage`) against a real S3 endpoint: moto's server, started here on
127.0.0.1. The AWS variables (endpoint, credentials, region) exist only in these tests' environment: set with
``monkeypatch`` in-process, passed explicitly to the sweep's subprocesses.

The sweep test runs a tiny sweep with ``--storage s3://...`` and its pose table on S3, interrupts it after
its first trial, deletes every local trace of Ray (its temp dir and the working directory), and resumes from
the bucket alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from vipe_ray import storage
from vipe_ray.data import DataError, file_sha256, load_table, read_metadata

# Integration tests (an S3 server (moto) and Ray sweeps): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "data" / "cmu_h36m17_30fps.parquet"
BUCKET = "vipe-ray-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with one bucket; yields the AWS variables that reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture
def s3(s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return s3_env


def test_local_paths_and_uris_parse(tmp_path):
    local = storage.location(tmp_path / "a")
    assert local.is_local and local.uri == str((tmp_path / "a").resolve()) and local.ray_storage() == {
        "storage_path": str((tmp_path / "a").resolve()), "storage_filesystem": None}
    assert storage.location(f"file://{tmp_path}/a").uri == local.uri
    assert not storage.is_uri(str(tmp_path)) and not storage.is_uri("file:///x") and storage.is_uri("s3://b/p")
    with pytest.raises(storage.StorageError, match="name a bucket"):
        storage.location("s3://")
    with pytest.raises(storage.StorageError, match="foo://x/y: not a usable storage URI"):
        storage.location("foo://x/y")


def test_s3_location_round_trip(s3, tmp_path):
    root = storage.location(f"s3://{BUCKET}/unit/")
    assert root.uri == f"s3://{BUCKET}/unit" and root.path == f"{BUCKET}/unit" and not root.is_local
    assert root.ray_storage()["storage_filesystem"] is root.fs
    root.check_access()
    note = root / "run-1" / "note.txt"
    assert not note.exists()
    note.write_text("parent-run-id\n")
    (root / "run-2" / "x.txt").write_text("x")
    assert note.exists() and note.read_text() == "parent-run-id\n"
    assert [d.name for d in root.subdirs()] == ["run-1", "run-2"] and (root / "run-1").is_dir()
    copy = (root / "run-1").download(tmp_path)
    assert (copy / "note.txt").read_text() == "parent-run-id\n"
    assert not list(Path.cwd().glob("s3:*")), "no local folder named after the URI"
    # The endpoint travels with a pickled filesystem (to Ray workers); credentials do not.
    import pickle

    options = pickle.loads(pickle.dumps(root.fs)).__reduce__()[1][0]
    assert options["endpoint_override"] == s3["AWS_ENDPOINT_URL"] and options["secret_key"] is None


def test_missing_bucket_or_endpoint_fails_clearly(s3, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        storage.location("s3://no-such-bucket/p").check_access()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(storage.StorageError, match="cannot access.*AWS_ACCESS_KEY_ID"):
        storage.location(f"s3://{BUCKET}/p").check_access()


def test_pose_table_on_s3_reads_like_the_local_file(s3):
    uri = f"s3://{BUCKET}/data/table.parquet"
    storage.copy_tree(TABLE, uri)
    remote, local = load_table(uri), load_table(TABLE)
    assert remote.path == uri and remote.checksum == local.checksum == file_sha256(uri)
    assert (remote.joints == local.joints).all() and remote.subjects == local.subjects
    assert read_metadata(uri)["fps"] == 30
    with pytest.raises(DataError, match=f"s3://{BUCKET}/data/missing.parquet: pose table not found"):
        load_table(f"s3://{BUCKET}/data/missing.parquet")


def test_mlflow_artifacts_reach_the_bucket_through_the_same_variables(s3, tmp_path):
    """MLflow's S3 artifact store (what `mlflow server --artifacts-destination s3://...` writes with, see
    deploy/mlflow.yaml) needs nothing beyond the AWS variables pyarrow reads."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("s3-artifacts", artifact_location=f"s3://{BUCKET}/mlflow")
    run = client.create_run(experiment).info.run_id
    client.log_dict(run, {"hit@1": 0.5}, "result.json")
    stored = storage.location(f"s3://{BUCKET}/mlflow") / run / "artifacts" / "result.json"
    assert json.loads(stored.read_text()) == {"hit@1": 0.5}


SWEEP = """
name: s3resume
base_config: vipe_ray/configs/tiny.yaml
overrides:
  data: {table: s3://BUCKET/data/cmu.parquet}
  model: {width: 32, samples: 3, embedding_dim: 4}
  optim: {steps: 6, batch_size: 24}
  eval: {max_queries: 20}
  checkpoint_every: 3
  log_every: 3
  lifter_baseline: false
search_space:
  mining.kappa: {type: uniform, low: 0.08, high: 0.15}
trials: 2
concurrency: 1
scheduler: {type: fifo}
resources: {num_workers: 1, cpus_per_worker: 0.49}
seed: 0
time_budget_s: 300
validation_queries: 20
""".replace("BUCKET", BUCKET)


def _processes_under(ray_tmp: Path, wait_s: float) -> list[str]:
    """Command lines of live processes of the Ray whose temp dir is ``ray_tmp``, after waiting up to ``wait_s``
    for them to exit."""
    deadline = time.time() + wait_s
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(ray_tmp) in cmdline:
                found.append(cmdline)
        if not found or time.time() > deadline:
            return found
        time.sleep(0.5)


def _finished(fs: pafs.FileSystem, prefix: str, steps: int) -> set[str]:
    """Trials whose Tune result.json on S3 has reached ``steps``."""
    done = set()
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    for info in infos:
        if info.base_name == "result.json" and "/run_trial_" in info.path and "/train-" not in info.path:
            with fs.open_input_stream(info.path) as handle:
                if f'"step": {steps}' in handle.read().decode():
                    done.add(info.path.split("/")[-2])
    return done


@pytest.mark.timeout(900)
def test_sweep_on_s3_resumes_from_the_bucket_alone(s3, tmp_path):
    """`python -m vipe_ray.sweep ... --storage s3://...` with the table on S3: nothing named after the URI is
    created locally; SIGINT after the first trial, delete Ray's local state, and `--resume` completes the
    sweep from the bucket, without retraining the finished trial."""
    env = {**os.environ, **s3, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    storage.copy_tree(TABLE, f"s3://{BUCKET}/data/cmu.parquet")
    fs = storage.location(f"s3://{BUCKET}").fs
    sweep = tmp_path / "s3resume.yaml"
    sweep.write_text(SWEEP)
    db = tmp_path / "mlflow.db"
    prefix = f"{BUCKET}/sweeps"
    cmd = [sys.executable, "-m", "vipe_ray.sweep", str(sweep), "--storage", f"s3://{prefix}",
           "--tracking-uri", f"sqlite:///{db}"]
    # Ray's temp dir (sockets, session logs, Tune's driver staging) on a short private path, deleted between runs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="vrs3-", dir="/tmp"))
    first_cwd, second_cwd = tmp_path / "first", tmp_path / "second"
    first_cwd.mkdir()
    second_cwd.mkdir()
    log_path = tmp_path / "first.log"
    try:
        with open(log_path, "w") as log:
            first = subprocess.Popen(cmd, cwd=first_cwd, env={**env, "RAY_TMPDIR": str(ray_tmp)}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.time() + 400
                while not (_finished(fs, prefix, 6) and re.search(r"Trial run_trial_\w+ completed after",
                                                                   log_path.read_text())):
                    assert first.poll() is None, log_path.read_text()[-12000:]
                    assert time.time() < deadline, "no trial finished in time"
                    time.sleep(0.5)
                finished_before = _finished(fs, prefix, 6)
                os.killpg(first.pid, signal.SIGINT)
                first.wait(timeout=90)
            finally:
                if first.poll() is None:
                    os.killpg(first.pid, signal.SIGKILL)
                    first.wait()
        first_log = log_path.read_text()
        assert first.returncode == 130, first_log[-4000:]
        assert len(finished_before) == 1, finished_before
        assert not _processes_under(ray_tmp, wait_s=15), "the interrupted sweep left Ray processes behind"
        shutil.rmtree(ray_tmp)
        ray_tmp.mkdir()
        for cwd in (first_cwd, REPO):
            assert not [p for p in cwd.iterdir() if p.name.startswith("s3:") or p.name == BUCKET], (
                f"a local folder named after the URI in {cwd}")

        second = subprocess.run(cmd + ["--resume"], cwd=second_cwd, env={**env, "RAY_TMPDIR": str(ray_tmp)},
                                capture_output=True, text=True, timeout=400, start_new_session=True)
        out = second.stdout + second.stderr
        assert second.returncode == 0, first_log[-3000:] + "\n=====\n" + out[-5000:]
        assert f"resuming s3://{prefix}/s3resume-" in out
        assert not [p for p in second_cwd.iterdir() if p.name != "mlartifacts"], list(second_cwd.iterdir())
        assert not _processes_under(ray_tmp, wait_s=15), "the resumed sweep left Ray processes behind"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(_finished(fs, prefix, 6)) == 2
    run_dir = storage.location(f"s3://{prefix}").subdirs()[0]
    for trial in finished_before:  # the finished trial was not trained again
        result = (run_dir / trial / "result.json").read_text()
        assert result.count('"step": 6') == 1, result
    summary = json.loads((run_dir / "sweep_summary.json").read_text())
    assert summary["best"] and all(not t["error"] for t in summary["trials"]) and len(summary["trials"]) == 2
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("vipe-ray-s3resume").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for child in children:  # the model came from a checkpoint on S3, the data from S3
        assert child.data.tags["checkpoint"].startswith(f"s3://{prefix}/s3resume-")
        assert child.data.params["data.table"] == f"s3://{BUCKET}/data/cmu.parquet"
