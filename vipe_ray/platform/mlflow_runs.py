"""The MLflow runs of a sweep or a study: the parent run, each trial's nested run (its params, per-report
metrics, and once it ends its model, plots and test metrics) and the parent's Optuna search plots."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import mlflow
import optuna
import torch
from mlflow.entities import Metric
from mlflow.entities import Param as MlflowParam
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

from vipe_ray import log
from vipe_ray.config import TrainConfig, config_to_dict, flatten
from vipe_ray.data import load_table
from vipe_ray.evaluation.ledger import record_test_evaluation
from vipe_ray.evaluation.protocols import evaluate_rigs
from vipe_ray.evaluation.tables import flat_metrics
from vipe_ray.platform.log_filters import quiet_optuna_plots
from vipe_ray.platform.sweep_spec import Param, SweepConfig
from vipe_ray.platform.tracking import (DESCRIPTION_TAG, git_commit, hit_plot, log_figure, log_model,
                                        retrieval_figure)
from vipe_ray.prvipe.cameras import RIGS, Orbits, render
from vipe_ray.storage import Location, location
from vipe_ray.training.checkpoint import load_checkpoint, weights_of

try:
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH
except ImportError:  # an internal module of MLflow's: its documented limit if it moves
    MAX_METRICS_PER_BATCH = 1000

#: The file in a run folder that holds the id of its MLflow parent run (found again on ``--resume``).
PARENT_RUN_FILE = "mlflow_parent_run_id"


class MlflowReporter:
    """Logs a trial's per-report metrics into its MLflow run (runs in the Ray Train rank-0 worker)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        client = mlflow.MlflowClient(self.tracking_uri)
        now = int(time.time() * 1000)
        batch = [Metric(key.replace("@", "_at_"), float(v), now, step) for key, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        client.log_batch(self.run_id, metrics=batch)


def parent_run(client, experiment_id: str, run_dir: Location, resume: bool, tags: dict[str, str],
               what: str) -> tuple[str, bool]:
    """The MLflow parent run of the run folder ``run_dir``: found again on ``resume`` (its id is kept in the
    folder), created otherwise with ``tags``; returns (run id, created)."""
    parent_file = run_dir / PARENT_RUN_FILE
    if resume and parent_file.exists():
        parent_id = parent_file.read_text().strip()
        client.update_run(parent_id, status="RUNNING")
        log(f"[{what}] resuming {run_dir} (MLflow parent run {parent_id})")
        return parent_id, False
    run_dir.mkdir()
    parent_id = client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
    parent_file.write_text(parent_id)
    return parent_id, True


def child_run(client, experiment_id: str, parent_id: str, trial_id: str, sweep: SweepConfig,
              params: dict, config: TrainConfig, checksum: str) -> str:
    """The trial's nested MLflow run: found again on resume (tag ``ray.trial_id``), created otherwise."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`ray.trial_id` = '{trial_id}' and "
                                                             f"tags.`mlflow.parentRunId` = '{parent_id}'")
    if found:
        return found[0].info.run_id
    searched = ", ".join(f"{k} = {_short(v)}" for k, v in params.items())
    description = (f"Trial {trial_id} of sweep `{sweep.name}`: Pr-VIPE trained for {config.optim.steps} steps "
                   f"with {searched}; validation Hit@k every {config.checkpoint_every} steps.")
    run = client.create_run(experiment_id, run_name=f"trial-{trial_id}", tags={
        "mlflow.parentRunId": parent_id, "ray.trial_id": trial_id, "sweep": sweep.name,
        "git_commit": git_commit(), "data_checksum": checksum, DESCRIPTION_TAG: description})
    values = {f"searched.{k}": v for k, v in params.items()}
    values.update(flatten(config_to_dict(config)))
    client.log_batch(run.info.run_id, params=[MlflowParam(k, str(v)[:6000]) for k, v in values.items()])
    return run.info.run_id


def _short(value: Any) -> str:
    """A searched value as people read it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mlflow_metrics(values: dict[str, float]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]


def log_metrics(client, run_id: str, values: dict[str, float]) -> None:
    """Log ``values`` (finite ones; ``@`` spelled ``_at_``) on a run, in batches under MLflow's limit of 1,000
    metrics per request: a full evaluation on a few rigs of one's own has more."""
    metrics = _mlflow_metrics(values)
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])


def _load(checkpoint: Location):
    """A checkpoint file, local or downloaded from an object store into a temporary folder."""
    if checkpoint.is_local:
        return load_checkpoint(checkpoint.path)
    with tempfile.TemporaryDirectory(prefix="vipe-ray-ckpt-") as directory:
        return load_checkpoint(checkpoint.download(directory))


#: What a study scores each trial on: ``test`` (the held-out subjects, once, into the ledger) or ``validation``
#: (the recipe search: the validation subjects and rigs, no test subject touched).
SPLITS = ("test", "validation")


def split_metrics(checkpoint: str, split: str = "test", lifter=None, progress=lambda _m: None,
                  with_result: bool = False, command: str = ""):
    """A checkpoint's full evaluation on one split, flattened for MLflow with the prefix ``{split}/``
    (:func:`vipe_ray.evaluation.tables.flat_metrics`); with ``with_result``, also the full result.

    ``test``: the config's rigs and occlusion protocols on the test subjects, recorded in the test ledger
    (:mod:`vipe_ray.evaluation.ledger`) under ``command``. ``validation``: the same protocols on the validation
    subjects, rendered by the validation rigs (``eval.val_rigs``), as ``vipe-ray evaluate --split validation``
    scores them; nothing is recorded. ``checkpoint``: a local path or an object-store URI."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    ckpt = _load(location(checkpoint))
    config = ckpt.config
    test = split == "test"
    table = load_table(config.data.table_path()).select(config.data.test_subjects if test else config.data.val_subjects)
    eval_config = config.eval if test else replace(config.eval, rigs=config.eval.val_rigs)
    result = evaluate_rigs(ckpt.model, config, table, lifter=lifter, eval_config=eval_config, progress=progress)
    if test:
        record_test_evaluation(result, config, command or f"test_metrics {checkpoint}", checkpoint, ckpt.step)
    result["split"] = split
    metrics = flat_metrics(result, f"{split}/")
    return (metrics, result) if with_result else metrics


def test_metrics(checkpoint: str, lifter=None, progress=lambda _m: None, with_result: bool = False,
                 command: str = ""):
    """:func:`split_metrics` on the test split (a sweep's best trial, every trial of a study)."""
    return split_metrics(checkpoint, "test", lifter, progress, with_result, command)


def reported_checkpoint(results: Location, path: str) -> Location:
    """Where a checkpoint path reported by Ray Train lives: on the results' filesystem, except an absolute
    local path (Train's local mode, ``num_workers: 0``, keeps checkpoints in local temporary folders)."""
    return location(path) if path.startswith("/") else results.at(path)


def finalize_trial(client, run_id: str, checkpoint_path: str | None, status: str, validation_queries: int = 0,
                   results: Location | None = None) -> dict:
    """Log a trial's model, Hit@k plot and retrieval figure from its best checkpoint; close its run.
    ``checkpoint_path`` is as Ray reported it, on the filesystem of ``results`` (default: local)."""
    summary: dict = {}
    if checkpoint_path:
        checkpoint = reported_checkpoint(results or location("."), checkpoint_path)
        ckpt = _load(checkpoint)
        config = ckpt.config
        table = load_table(config.data.table_path()).select(config.data.val_subjects)
        # The validation protocol the trial was selected on: validation rigs, clean keypoints.
        result = evaluate_rigs(ckpt.model, config, table, progress=lambda _m: None,
                               eval_config=replace(config.eval, rigs=config.eval.val_rigs, occlusion=False,
                                                   every=config.eval.val_every,
                                                   max_queries=validation_queries))
        log_figure(client, run_id, hit_plot, result, name="hit_at_k.png")
        log_figure(client, run_id, retrieval_figure, ckpt.model, config, table, name="retrievals.png")
        client.log_dict(run_id, result, "validation_retrieval.json")
        example = torch.from_numpy(table.joints[:4]).double()
        pixels = render(example, Orbits.from_cameras([RIGS["h36m"][0]]).expand(4)).float()
        if config.temporal.enabled:
            pixels = pixels[:, None].expand(-1, config.temporal.window, -1, -1).contiguous()
        with mlflow.start_run(run_id=run_id, nested=True):
            info = log_model(mlflow, ckpt.model, config, pixels, step=ckpt.step, data_checksum=ckpt.data_checksum,
                             weights=weights_of(ckpt))
        summary = {"model_uri": info.model_uri, "step": ckpt.step, "checkpoint": checkpoint.uri}
        client.set_tag(run_id, "model_uri", info.model_uri)
        client.set_tag(run_id, "checkpoint", checkpoint.uri)
        client.set_tag(run_id, "checkpoint_step", str(ckpt.step))
    client.set_terminated(run_id, status)
    return summary


def _distribution(param: Param):
    """One search dimension as Optuna's distribution (for the plots' study)."""
    if param.type == "choice":
        return CategoricalDistribution(list(param.values))
    if param.type == "randint":
        return IntDistribution(int(param.low), int(param.high) - 1)
    return FloatDistribution(param.low, param.high, log=param.type == "loguniform")


def log_search_plots(client, parent_id: str, sweep: SweepConfig, rows: list[dict]) -> None:
    """Optuna's optimization-history and parameter-importance plots, from the finished trials."""
    matplotlib.use("Agg")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.objective.mode == "max" else "minimize")
    for row in rows:
        if isinstance(row["value"], (int, float)) and not row["error"]:
            params = {k: v for k, v in row["params"].items() if k in sweep.search_space}
            study.add_trial(create_trial(params=params, value=float(row["value"]), distributions={
                k: _distribution(sweep.search_space[k]) for k in params}))
    if not study.trials:
        return
    # pyplot (which Optuna's matplotlib plots import) only after matplotlib.use("Agg"): a driver has no display.
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    with tempfile.TemporaryDirectory() as directory, quiet_optuna_plots():
        ax = ov.plot_optimization_history(study)
        ax.figure.savefig(Path(directory) / "optuna_history.png", dpi=90, bbox_inches="tight")
        plt.close(ax.figure)
        client.log_artifact(parent_id, str(Path(directory) / "optuna_history.png"), artifact_path="plots")
        if len(study.trials) >= 2:
            try:
                ax = ov.plot_param_importances(study)
            except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same
                client.set_tag(parent_id, "param_importance", f"not computed: {exc}")
            else:
                ax.figure.savefig(Path(directory) / "optuna_importance.png", dpi=90, bbox_inches="tight")
                plt.close(ax.figure)
                client.log_artifact(parent_id, str(Path(directory) / "optuna_importance.png"), artifact_path="plots")
