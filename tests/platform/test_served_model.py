"""A registered model you can use: `mlflow models serve` answers an HTTP request with the embedder's own
embeddings, and `vipe-ray index` loads the same model by name and version from the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from services import ENV, free_port, http_ok, wait_for

from vipe_ray.cli import main
from vipe_ray.data import load_table
from vipe_ray.platform.tracking import PoseEmbedder, log_model
from vipe_ray.search.model_source import resolve_model
from vipe_ray.prvipe.cameras import RIGS, Orbits, render
from vipe_ray.training.checkpoint import load_checkpoint

# Integration tests (an MLflow model server): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "data" / "cmu_h36m17_30fps.parquet"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A 4-step run, logged as a model and registered as version 1 of `vipe-ray-served` in a SQLite store."""
    import mlflow
    from conftest import TINY

    root = tmp_path_factory.mktemp("served")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", "--config", str(cfg), "--out", str(root / "run"), "--set", "optim.steps=4"]) == 0
    checkpoint = load_checkpoint(root / "run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("served")
    poses = load_table(TABLE).joints[:5]
    example = render(torch.from_numpy(poses).double(), Orbits.from_cameras([RIGS["h36m"][0]]).expand(5)).float()
    cwd = os.getcwd()
    os.chdir(root)  # the SQLite store's default artifact root (./mlruns) lands in the test's folder
    try:
        with mlflow.start_run(experiment_id=experiment.experiment_id):
            info = log_model(mlflow, checkpoint.model, checkpoint.config, example, step=checkpoint.step,
                             data_checksum=checkpoint.data_checksum)
        mlflow.register_model(info.model_uri, "vipe-ray-served")
    finally:
        os.chdir(cwd)
    return {"root": root, "uri": uri, "checkpoint": checkpoint, "example": example}


def test_mlflow_models_serve_answers_with_the_embedders_embeddings(registered):
    port = free_port()
    env = {**ENV, "MLFLOW_TRACKING_URI": registered["uri"]}
    log = open(registered["root"] / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/vipe-ray-served/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=registered["root"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 240, "mlflow models serve", server)
        keypoints = registered["example"].clone()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": keypoints.numpy().tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    expected = PoseEmbedder(registered["checkpoint"].model).eval()(keypoints).detach()
    assert served.shape == tuple(expected.shape) == (5, 2 * registered["checkpoint"].config.model.embedding_dim)
    assert np.allclose(served, expected.numpy(), atol=1e-5)


def test_index_loads_the_registered_model_by_name_and_version(registered, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.chdir(registered["root"])
    path = resolve_model("models:/vipe-ray-served/1")
    loaded = load_checkpoint(path)
    for name, value in registered["checkpoint"].model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert main(["index", "--checkpoint", "models:/vipe-ray-served/1", "--data", str(TABLE), "--subjects", "06",
                 "--rig", "h36m", "--every", "100", "--out", str(tmp_path / "idx")]) == 0
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["model"]["checkpoint"] == "models:/vipe-ray-served/1" and info["model"]["step"] == 4
    with pytest.raises(FileNotFoundError, match="models:/vipe-ray-served/9: cannot download"):
        resolve_model("models:/vipe-ray-served/9")
