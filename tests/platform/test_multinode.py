"""A sweep on a multi-node Ray cluster shaped like KubeRay's, tracked on an MLflow server backed by PostgreSQL.

One machine runs a head node with no CPUs (KubeRay's head schedules no work) and two worker nodes
(``ray.cluster_utils.Cluster``: separate raylets and object stores, one GCS). Each worker node has 3 CPUs and
each DDP worker asks for 1.6, so the trial's two workers cannot share a node and Ray places one per node; the
node ids that the workers record in the checkpoint and the ``worker_nodes`` metric in MLflow prove it.
Ray's files go to a private temporary directory (``RAY_TMPDIR``), so that ``ray.init()`` elsewhere on the
machine never finds this cluster; every process it started is gone when the test ends.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from services import mlflow_server, postgres  # noqa: F401  (fixtures)

# Integration tests (a multi-node Ray cluster): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

SWEEP = """\
name: multinode
base_config: vipe_ray/configs/tiny.yaml
overrides:
  model: {width: 32, samples: 3, embedding_dim: 4}
  optim: {steps: 4, batch_size: 24}
  checkpoint_every: 2
  log_every: 2
  data: {buffer_rows: 1024}
search_space:
  mining.kappa: {type: uniform, low: 0.08, high: 0.15}
objective: {metric: val_hit@1, mode: max}
trials: 1
concurrency: 1
scheduler: {type: fifo}
resources: {num_workers: 2, cpus_per_worker: 1.6}
seed: 0
time_budget_s: 300
max_failures: 0
validation_queries: 20
"""


def _processes_of(root: Path) -> list[int]:
    """Live processes whose command line names ``root`` (every raylet, GCS and worker of the cluster does:
    its session directory lies there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(root) in line and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def kuberay_like_cluster(monkeypatch):
    """Head with 0 CPUs + two 3-CPU worker nodes, Ray's files in a private short directory."""
    from ray.cluster_utils import Cluster

    root = Path(f"/tmp/vr-mn-{os.getpid()}")  # short: Unix socket paths must fit in 107 bytes
    root.mkdir(exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, root, {node.node_id for node in workers}, cluster.head_node.node_id
    finally:
        cluster.shutdown()
        for pid in _processes_of(root):  # none when shutdown works (the test checks)
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(400)
def test_sweep_on_a_kuberay_like_cluster_spreads_ddp_workers_over_nodes(kuberay_like_cluster, mlflow_server,
                                                                         tmp_path):
    import mlflow
    import torch

    from vipe_ray.platform.sweep_spec import load_sweep
    from vipe_ray.platform.tune_driver import run_sweep

    cluster, root, worker_nodes, head = kuberay_like_cluster
    sweep_file = tmp_path / "multinode.yaml"
    sweep_file.write_text(SWEEP)
    summary = run_sweep(load_sweep(sweep_file), address=cluster.address, tracking_uri=mlflow_server,
                        storage=tmp_path / "results")
    assert summary["best"] is not None, summary
    trial = summary["trials"][0]
    assert trial["steps"] == 4 and not trial["error"]

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(trial["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["worker_nodes"] == 2.0
    assert run.data.metrics["global_batch"] == 48.0
    payload = torch.load(Path(run.data.tags["checkpoint"]) / "checkpoint.pt", map_location="cpu", weights_only=False)
    placed = [w["node_id"] for w in payload["workers"]]
    assert [w["rank"] for w in payload["workers"]] == [0, 1]
    assert set(placed) == worker_nodes and head not in placed, (placed, worker_nodes, head)

    assert _processes_of(root), "the cluster's processes are found by their directory"
    cluster.shutdown()
    assert not _processes_of(root), "Ray processes outlived the cluster"
