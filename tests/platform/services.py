"""Services the platform tests start on loopback and stop at the end: a private PostgreSQL server and a
lean `mlflow server` (on SQLite or on that PostgreSQL). Test modules import the fixtures by name."""

from __future__ import annotations

import contextlib
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

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
       "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def lean_mlflow_server(backend: str, log_path: Path, *extra: str):
    """A lean `mlflow server` (no job runner, one worker) on ``backend``, on 127.0.0.1; yields its URL."""
    port = free_port()
    env = {**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, *extra,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120, "mlflow server", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
    port = free_port()

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
    with lean_mlflow_server(postgres, tmp_path / "mlflow-server.log",
                             "--artifacts-destination", str(tmp_path / "artifacts")) as url:
        yield url
