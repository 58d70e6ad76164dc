"""MLflow tracking: one parent run per sweep, one nested run per trial, models, plots and the registry.

Default store: an embedded SQLite file (``./mlflow.db``) with artifacts under ``./mlartifacts``, no server
needed; ``MLFLOW_TRACKING_URI`` (or a sweep's ``tracking_uri``) points everything at a server instead. Such a
node-local store is refused by a sweep on a Ray cluster of several nodes (see :func:`is_node_local_store`).
Open the UI on the default store with ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` and the URL a
sweep prints (``.../#/experiments/ID/runs?workflowType=machine_learning``, see :mod:`vipe_ray.platform.sweep_summary`).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import infer_signature
from torch import nn

from vipe_ray import REPO_ROOT
from vipe_ray.config import TrainConfig
from vipe_ray.data import evaluation_rows, window_rows
from vipe_ray.evaluation.figures import draw_pose
from vipe_ray.evaluation.protocols import resolve_rig
from vipe_ray.prvipe.cameras import Orbits
from vipe_ray.prvipe.keypoints import NUM_KEYPOINTS_2D, KeypointError, model_input, pose_features
from vipe_ray.prvipe.matching import pairwise_np_mpjpe
from vipe_ray.prvipe.views import normalized_view
from vipe_ray.search.model_source import MODEL_CHECKPOINT
from vipe_ray.training.checkpoint import save_model_only

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
#: MLflow's experiment-kind tag: without it, MLflow 3's UI treats an experiment as GenAI (traces, judges).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The tag MLflow's UI shows as a run's description.
DESCRIPTION_TAG = "mlflow.note.content"


def default_tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute ``sqlite:///`` path under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(root) / DEFAULT_DB).resolve()}"


def is_node_local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file on one machine (``sqlite:``, ``file:`` or a plain path)
    rather than a server or a database that other nodes reach."""
    head = uri.split(":", 1)[0].lower()
    if head in ("databricks", "databricks-uc", "uc"):  # MLflow's hosted stores, named without "://"
        return False
    scheme = head if "://" in uri or head in ("sqlite", "file") else ""
    return scheme in ("", "sqlite", "file")


def ensure_experiment(client, name: str, tracking_uri: str, root: str | Path = ".") -> str:
    """Experiment id of ``name``, created if needed as a model-training experiment (SQLite stores get an
    absolute local artifact root); an existing experiment without a kind is marked as one."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(root) / DEFAULT_ARTIFACTS).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


def source_tags(source: str, command: str, commit: str) -> dict[str, str]:
    """MLflow's source tags: the UI's Source column shows the base name of ``source`` (the sweep YAML) with
    the git commit; ``command`` keeps the whole command line."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "command": command}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


#: Written by deploy/Dockerfile (build arg GIT_COMMIT) at the root of the image's copy of the repository.
COMMIT_FILE = "GIT_COMMIT"
#: The image's commit as an environment variable (deploy/Dockerfile, from the same build arg).
COMMIT_ENV = "VIPE_RAY_GIT_COMMIT"


def git_commit(root: str | Path = REPO_ROOT) -> str:
    """The commit of the code under ``root``, else ``unknown``.

    1. ``git rev-parse HEAD`` in a git checkout;
    2. the ``GIT_COMMIT`` file that deploy/Dockerfile writes into the image's copy of the repository (/app):
       a RayJob uploads that copy as its working dir, and the file travels with the code;
    3. ``VIPE_RAY_GIT_COMMIT`` (the same build arg) when ``root`` is no source tree, i.e. the package the
       image pip-installed into site-packages runs.

    A source tree with neither (a developer's checkout uploaded by ``ray job submit --working-dir .`` without
    its .git) runs code the image's commit does not describe: ``unknown``.
    """
    root = Path(root)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if (root / COMMIT_FILE).is_file():
        return (root / COMMIT_FILE).read_text().strip() or "unknown"
    if not (root / "pyproject.toml").is_file():
        return os.environ.get(COMMIT_ENV) or "unknown"
    return "unknown"


class PoseEmbedder(nn.Module):
    """The deployable model: raw COCO13 2D keypoints in, embedding mean and sigma out.

    ``forward``: ``[batch, 13, 2]`` (or temporal ``[batch, frames, 13, 2]``) keypoints in any pixel unit,
    NaN marking a missing keypoint -> ``[batch, 2 * D]`` = mean followed by sigma. Normalization runs
    inside (:func:`vipe_ray.prvipe.keypoints.model_input`, the code path training views use), so callers pass
    detector output as is. Missing keypoints never influence the centre or scale. A pose that cannot be
    normalized (fewer than two visible torso keypoints: shoulders and hips) gets a row of NaN; the rest of
    its batch is embedded normally. :meth:`embed` returns the validity flags beside the embedding.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def embed(self, keypoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean ``[batch, D]``, sigma ``[batch, D]``, valid ``[batch]`` bool); invalid rows are NaN."""
        if keypoints.ndim not in (3, 4) or tuple(keypoints.shape[-2:]) != (NUM_KEYPOINTS_2D, 2):
            raise KeypointError(f"PoseEmbedder: expected keypoints [batch, {NUM_KEYPOINTS_2D}, 2] or "
                                f"[batch, frames, {NUM_KEYPOINTS_2D}, 2], got {list(keypoints.shape)}")
        features, valid = model_input(keypoints)
        if valid.ndim == 2:  # temporal: a window needs every frame
            valid = valid.all(-1)
        mean, sigma = self.model(features.to(next(self.model.parameters()).dtype))
        nan = torch.full_like(mean, float("nan"))
        return torch.where(valid[:, None], mean, nan), torch.where(valid[:, None], sigma, nan), valid

    def forward(self, keypoints: torch.Tensor) -> torch.Tensor:
        mean, sigma, _ = self.embed(keypoints)
        return torch.cat([mean, sigma], dim=-1)


def log_model(mlflow, model: nn.Module, config: TrainConfig, example: torch.Tensor, name: str = "model",
              step: int = 0, data_checksum: str = "", weights: str = "trained"):
    """Log a :class:`PoseEmbedder` with MLflow's PyTorch flavour, a signature and an input example.

    Format "pt2" (``torch.export``): no pickle, and the loaded model needs neither vipe-ray nor its code;
    the batch dimension stays dynamic (the example has more than one pose). Loading returns the exported
    module, called like the embedder: keypoints ``[batch, 13, 2]`` -> ``[batch, 2 * D]``. The model also
    carries its vipe-ray checkpoint (weights, config and the trained match probability, :data:`MODEL_CHECKPOINT`),
    which ``vipe-ray index --checkpoint models:/NAME/VERSION`` loads
    (:func:`vipe_ray.search.model_source.resolve_model`); ``weights`` says which weights ``model`` holds.
    """

    embedder = PoseEmbedder(model).eval()
    with torch.no_grad():
        output = embedder(example)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_model_only(model, config, step, data_checksum, Path(tmp) / MODEL_CHECKPOINT.name,
                                     weights=weights)
        return mlflow.pytorch.log_model(
            embedder, name=name, serialization_format="pt2",
            signature=infer_signature(example.numpy(), output.numpy()), input_example=example.numpy(),
            pip_requirements=["torch==2.13.0"], extra_files=[str(checkpoint)],
        )


def hit_plot(result: dict, path: Path) -> Path:
    """Bar chart of Hit@k per rig and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rigs = list(result["rigs"])
    fig, axes = plt.subplots(1, len(rigs), figsize=(5 * len(rigs), 3.5), squeeze=False)
    for ax, rig in zip(axes[0], rigs):
        methods = result["rigs"][rig]
        ks = sorted(int(k.split("@")[1]) for k in next(iter(methods.values())))
        width = 0.8 / len(methods)
        for i, (method, hits) in enumerate(methods.items()):
            ax.bar(np.arange(len(ks)) + i * width, [100 * hits[f"hit@{k}"] for k in ks], width, label=method)
        ax.set_xticks(np.arange(len(ks)) + 0.4 - width / 2, [f"Hit@{k}" for k in ks])
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(f"rig {rig}: {result['queries']} queries")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def retrieval_figure(model: nn.Module, config: TrainConfig, table, path: Path, queries: int = 4) -> Path:
    """Query 2D poses from one camera of the validation rig and their top-3 retrievals from another camera."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    rows = evaluation_rows(table, config.eval.every, 200)
    frames, stride = config.temporal.window, config.temporal.stride
    joints = torch.from_numpy(table.joints[window_rows(table, rows, frames, stride)]).double()
    views = []
    rig, cameras = resolve_rig(config.eval.val_rigs[0])  # figures of validation runs: the validation rig
    for camera in cameras[:2]:
        keypoints = normalized_view(joints, Orbits.from_cameras([camera]).expand(len(rows)))
        feats = pose_features(keypoints, torch.ones(keypoints.shape[:-1], dtype=torch.bool))
        model.eval()
        with torch.no_grad():
            mean, _ = model(feats)
        views.append((keypoints[:, frames // 2], mean))
    centre = joints[:, frames // 2]
    distance = torch.cdist(views[0][1], views[1][1])
    match = pairwise_np_mpjpe(centre, centre).T <= config.eval.kappa
    picks = np.linspace(0, len(rows) - 1, queries).round().astype(int)
    fig, axes = plt.subplots(queries, 4, figsize=(8, 2.2 * queries), squeeze=False)
    for r, q in enumerate(picks):
        top = distance[q].topk(3, largest=False).indices.tolist()
        panels = [(views[0][0][q], f"query ({rig} cam 1)", "black")]
        panels += [(views[1][0][i], f"#{n + 1} ({rig} cam 2)", "green" if match[q, i] else "red")
                   for n, i in enumerate(top)]
        for ax, (kp, title, colour) in zip(axes[r], panels):
            draw_pose(ax, kp, title, colour)
    fig.suptitle("green = 3D match (NP-MPJPE <= kappa); blue dots = left side", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_figure(client, run_id: str, figure_fn, *args: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = figure_fn(*args, Path(directory) / name)
        client.log_artifact(run_id, str(path), artifact_path="plots")

