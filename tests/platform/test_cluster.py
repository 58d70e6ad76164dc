"""The sweep on a real multi-node Ray cluster (two raylets on this machine, ``ray.cluster_utils.Cluster``):
it refuses an MLflow store that lives on one node, and it reads what the autoscaler says the cluster can grow
to from the GCS, where Ray's autoscaler v2 reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

# Integration tests (Ray clusters of several nodes): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one worker node, 1 CPU each, without dashboard or token auth; shut down at the end."""
    from ray.cluster_utils import Cluster

    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "disabled")  # the raw GCS client below sends no token
    patch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        patch.undo()


@pytest.mark.timeout(120)
def test_sweep_refuses_a_node_local_mlflow_store_on_two_nodes(two_nodes, tmp_path, capsys):
    import ray

    from vipe_ray.sweep import main

    db = tmp_path / "mlflow.db"
    code = main([str(REPO / "sweeps" / "smoke.yaml"), "--address", two_nodes.address, "--storage",
                 str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--tracking-uri: MLflow store sqlite:///{db} is a file on the driver's node" in err
    assert "this Ray cluster has 2 nodes" in err and "set MLFLOW_TRACKING_URI or --tracking-uri" in err
    assert not db.exists(), "refused before anything was logged"
    assert not ray.is_initialized(), "the sweep disconnected from the cluster"


@pytest.mark.timeout(120)
def test_autoscaler_limits_come_from_the_cluster_config_in_the_gcs(two_nodes, tmp_path, capsys):
    import grpc
    import ray
    from ray.core.generated import autoscaler_pb2, autoscaler_pb2_grpc

    from vipe_ray.platform.resources import (TRIAL_DRIVER_RESOURCE, autoscaler_limits, check_resources,
                                             cluster_limits, trial_resources)
    from vipe_ray.platform.sweep_spec import load_sweep

    ray.init(address=two_nodes.address, logging_level="ERROR")
    try:
        assert autoscaler_limits() == {}, "no autoscaler has reported a config yet"
        # What Ray's autoscaler v2 reports at start-up (KubeRay: one node group per worker group).
        config = autoscaler_pb2.ClusterConfig(node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="cpu-workers", resources={"CPU": 4, TRIAL_DRIVER_RESOURCE: 100},
                                           max_count=8),
            autoscaler_pb2.NodeGroupConfig(name="gpu-workers", resources={"CPU": 8, "GPU": 1}, max_count=4)])
        with grpc.insecure_channel(two_nodes.gcs_address) as channel:
            autoscaler_pb2_grpc.AutoscalerStateServiceStub(channel).ReportClusterConfig(
                autoscaler_pb2.ReportClusterConfigRequest(cluster_config=config), timeout=30)
        limits = autoscaler_limits()
        assert limits == {"CPU": 64.0, "GPU": 4.0, TRIAL_DRIVER_RESOURCE: 800.0}
        path = tmp_path / "gpu.yaml"
        path.write_text("name: gpu\nbase_config: vipe_ray/configs/tiny.yaml\nsearch_space:\n"
                        "  mining.kappa: {type: uniform, low: 0.05, high: 0.2}\nconcurrency: 4\n"
                        "resources: {num_workers: 2, cpus_per_worker: 4.0, use_gpu: true}\ncluster_max: {GPU: 2}\n")
        sweep = load_sweep(path)
        now = ray.cluster_resources()
        assert now["CPU"] == 2.0 and "GPU" not in now
        grown = cluster_limits(sweep)
        assert grown == {"CPU": 64.0, "GPU": 2.0, TRIAL_DRIVER_RESOURCE: 800.0}, "the sweep's cluster_max wins"
        assert check_resources(sweep, now, grown) == 1, "2 GPUs hold one trial of 2 GPU workers at a time"
        assert "trials wait for the autoscaler" in capsys.readouterr().out
        assert trial_resources(sweep, grown) == {"cpu": 0.01, TRIAL_DRIVER_RESOURCE: 1.0}
    finally:
        ray.shutdown()
