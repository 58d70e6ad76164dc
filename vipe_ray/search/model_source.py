"""Where a model comes from: a run directory, a checkpoint file, a logged MLflow model or a registry URI."""

from __future__ import annotations

import os
from pathlib import Path

#: Where a logged model keeps its vipe-ray checkpoint (MLflow copies ``extra_files`` under this folder; see
#: :func:`vipe_ray.platform.tracking.log_model`).
MODEL_CHECKPOINT = Path("extra_files") / "checkpoint.pt"
#: The tracking store a registry URI is read from when ``MLFLOW_TRACKING_URI`` is unset (the project default).
DEFAULT_STORE = "mlflow.db"


def resolve_model(source: str | Path) -> Path:
    """A model to load with :func:`vipe_ray.training.checkpoint.load_checkpoint`, wherever it is: a run directory
    or a checkpoint file (returned as is), a logged model's directory (its :data:`MODEL_CHECKPOINT`), or an
    MLflow model URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, ``models:/m-...``), downloaded from
    the tracking server ``MLFLOW_TRACKING_URI`` (default: ``./mlflow.db``, which must exist)."""
    text = str(source)
    if ":/" in text and not Path(text).exists():
        # mlflow belongs to the platform extra: a core install indexes and searches local models without it.
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            if not Path(DEFAULT_STORE).is_file():
                raise FileNotFoundError(f"{text}: no tracking store to read it from: set MLFLOW_TRACKING_URI, or run "
                                        f"where the sweeps' {DEFAULT_STORE} is")
            uri = f"sqlite:///{Path(DEFAULT_STORE).resolve()}"
        mlflow.set_tracking_uri(uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(text))
        except Exception as exc:  # MlflowException and friends: say which URI and why
            raise FileNotFoundError(f"{text}: cannot download this model from {uri} ({exc})") from None
    else:
        local = Path(text)
    if (local / "MLmodel").is_file():
        if not (local / MODEL_CHECKPOINT).is_file():
            raise FileNotFoundError(f"{text}: a logged model without a vipe-ray checkpoint ({MODEL_CHECKPOINT}); "
                                    f"models logged before vipe-ray carried one cannot be indexed")
        return local / MODEL_CHECKPOINT
    return local
