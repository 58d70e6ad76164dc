"""The Ray Tune driver of a sweep: start or join Ray (:func:`launched`, shared with studies), run the trials
(:func:`run_trial`, each a Ray Train run), close each trial's MLflow run the moment it ends
(:class:`TrialFinisher`), and :func:`summarize` the sweep once Tune is done."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import ray
from ray import tune
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback

from vipe_ray import log
from vipe_ray.config import ConfigError
from vipe_ray.data import DataError
from vipe_ray.platform.log_filters import filter_driver_records, filter_worker_logs
from vipe_ray.platform.mlflow_runs import (MlflowReporter, child_run, finalize_trial, log_metrics, log_search_plots,
                                           parent_run, reported_checkpoint, test_metrics)
from vipe_ray.platform.resources import check_cluster_stores, check_resources, cluster_limits, trial_resources
from vipe_ray.platform.search import build_scheduler, build_searcher, param_space
from vipe_ray.platform.sweep_spec import SweepConfig, base_values, trial_config
from vipe_ray.platform.tracking import (DESCRIPTION_TAG, default_tracking_uri, ensure_experiment, git_commit,
                                        source_tags)
from vipe_ray.storage import Location, StorageError, location
from vipe_ray.training.ray_train import data_info, fit


@dataclass(frozen=True)
class Launch:
    """What a sweep or a study runs with, once its storage is checked and Ray is up."""

    results: Location
    run_dir: Location
    base: dict
    checksum: str
    tracking_uri: str
    command: str
    limits: dict[str, float]


@contextlib.contextmanager
def launched(sweep, resume: bool, address: str | None, tracking_uri: str | None, storage: str | Path,
             command: str | None, cluster_max: dict[str, float] | None = None):
    """Check storage and data, pick the run folder (the latest one on ``resume``), start or join Ray and check
    the cluster's stores; yields a :class:`Launch`. ``sweep`` is a sweep or a study (name, path, resources,
    cluster_max). A Ray started here is shut down on exit, so no worker output follows the caller's summary."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = base_values(sweep)
    try:
        results = location(storage)
        results.check_access()
        results.mkdir()
        if resume:
            run_dir = latest_run_dir(results, sweep.name)
            if run_dir is None or not tune.Tuner.can_restore(run_dir.path, storage_filesystem=results.fs):
                raise ConfigError(f"--resume: nothing restorable named {sweep.name!r} under {results}")
        else:
            run_dir = results / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    except StorageError as exc:
        raise ConfigError(f"--storage: {exc}") from None
    try:  # the table (local or object store) is readable before Ray starts
        checksum = data_info(trial_config(base, {}))["checksum"]
    except DataError as exc:
        raise ConfigError(f"{sweep.path}: data.table: {exc}") from None
    tracking_uri = tracking_uri or default_tracking_uri()
    command = command or f"python -m vipe_ray.sweep {sweep.path}"
    filter_driver_records()
    started_ray = not ray.is_initialized()
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if started_ray and joined:
        ray.init(address=address)
    elif started_ray:
        ray.init(include_dashboard=False)  # Ray's own detection honours a container's CPU limit
    filter_worker_logs()
    try:
        limits = cluster_limits(sweep, cluster_max)
        if joined:
            now = ray.cluster_resources()
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            check_cluster_stores(tracking_uri, results, nodes, any(v > now.get(k, 0.0) for k, v in limits.items()))
        yield Launch(results, run_dir, base, checksum, tracking_uri, command, limits)
    finally:
        if started_ray:
            ray.shutdown()


def latest_run_dir(results: Location, name: str) -> Location | None:
    """The newest ``NAME-YYYYmmdd-HHMMSS`` run folder under the results location (local or object store)."""
    runs = [d for d in results.subdirs() if d.name.startswith(f"{name}-")]
    return runs[-1] if runs else None


def unfinished_trials(run_dir: Location) -> list[str]:
    """Trials that the saved experiment state (what ``--resume`` continues from) holds as not finished.

    On Ctrl-C Tune saves its state and then marks the running trials TERMINATED in memory, so the result grid
    cannot tell an interrupted trial from a finished one; the state it saved can.
    """
    saved = ExperimentAnalysis(run_dir.path, storage_filesystem=run_dir.ray_storage()["storage_filesystem"])
    return [t.trial_id for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]


def run_trial(params: dict, settings: dict) -> None:
    """Tune function trainable: one Pr-VIPE training run (Ray Train) whose reports drive Tune and MLflow."""
    sweep: SweepConfig = settings["sweep"]
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(settings["base"], params, f"{sweep.path} trial {trial_id}")
    client = mlflow.MlflowClient(settings["tracking_uri"])
    run_id = child_run(client, settings["experiment_id"], settings["parent_run_id"], trial_id, sweep, params,
                       config, data_info(config)["checksum"])
    fit(config, sweep.resources, name=f"train-{trial_id}",
        storage_path=settings["storage"], max_failures=sweep.max_failures, callbacks=[TuneReportCallback()],
        extra={"on_report": MlflowReporter(settings["tracking_uri"], run_id), "val_queries": sweep.validation_queries},
        score=(sweep.objective.metric, sweep.objective.mode))


class TrialFinisher:
    """Tune callback on the driver: follows each trial's best checkpoint (by the objective) and, the moment a
    trial ends (finished, stopped early by ASHA or by the time budget, or failed), logs its model and plots
    and closes its MLflow run -- a sweep stopped late still has every ended trial's model.

    Holds only strings and the sweep (it is pickled with Tune's state and restored on ``--resume``).
    """

    def __init__(self, sweep: SweepConfig, base: dict, tracking_uri: str, experiment_id: str, parent_id: str,
                 results: Location | None = None):
        self.sweep, self.base, self.tracking_uri, self.results = sweep, base, tracking_uri, results
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.checkpoints: dict[str, dict[str, tuple[float, int]]] = {}  # trial id -> {path: (objective, step)}
        self.last_step: dict[str, int] = {}
        self.steps: dict[str, int] = {}  # trial id -> its config's steps
        self.finished: dict[str, dict] = {}  # trial id -> finalize_trial's summary (+ run id)

    def on_trial_result(self, trial_id: str, result: dict, params: dict | None = None) -> None:
        if params is not None and trial_id not in self.steps:
            self.steps[trial_id] = trial_config(self.base, params).optim.steps
        step = int(result.get("step", 0))
        self.last_step[trial_id] = max(self.last_step.get(trial_id, 0), step)
        value, path = result.get(self.sweep.objective.metric), result.get("checkpoint_path")
        if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(path, str):
            self.checkpoints.setdefault(trial_id, {})[path] = (float(value), step)

    def best(self, trial_id: str) -> tuple[float, str] | None:
        """(objective, path) of the trial's best checkpoint still on disk: ties go to the later step (Ray Train
        keeps the best two and the latest, so of tied ones the earlier may be gone)."""
        sign = 1.0 if self.sweep.objective.mode == "max" else -1.0
        ranked = sorted(self.checkpoints.get(trial_id, {}).items(), key=lambda kv: (sign * kv[1][0], kv[1][1]),
                        reverse=True)
        for path, (value, _) in ranked:
            if reported_checkpoint(self.results or location("."), path).exists():
                return value, path
        return None

    def on_trial_end(self, trial_id: str, error: str | None = None) -> dict:
        """Finalize one trial's run (once); returns its summary."""
        if trial_id in self.finished:
            return self.finished[trial_id]
        client = mlflow.MlflowClient(self.tracking_uri)
        found = client.search_runs([self.experiment_id], filter_string=(
            f"tags.`ray.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_id}'"))
        info: dict = {"run_id": found[0].info.run_id if found else None}
        if found and found[0].info.status != "RUNNING":  # closed before a --resume
            tags = found[0].data.tags
            info.update({k: tags[k] for k in ("model_uri", "checkpoint") if k in tags})
            if "checkpoint_step" in tags:
                info["step"] = int(tags["checkpoint_step"])
        elif found:
            run_id = found[0].info.run_id
            if error:
                client.set_tag(run_id, "error", error[:5000])
            elif self.last_step.get(trial_id, 0) < self.steps.get(trial_id, 0):
                client.set_tag(run_id, "stopped_early", "asha or time budget")
            best = self.best(trial_id)
            info.update(finalize_trial(client, run_id, best[1] if best else None, "FAILED" if error else "FINISHED",
                                       self.sweep.validation_queries, self.results))
        self.finished[trial_id] = info
        return info

    def tune_callback(self):
        """This finisher as a ``ray.tune.Callback``."""
        finisher = self

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                finisher.on_trial_result(trial.trial_id, result, trial.config)

            def on_trial_complete(self, iteration, trials, trial, **info):
                finisher.on_trial_end(trial.trial_id)

            def on_trial_error(self, iteration, trials, trial, **info):
                finisher.on_trial_end(trial.trial_id, error=str(getattr(trial, "error_file", None) or "error"))

        return _Callback()


def run_sweep(sweep: SweepConfig, resume: bool = False, address: str | None = None,
              tracking_uri: str | None = None, storage: str | Path = "ray_results",
              command: str | None = None, cluster_max: dict[str, float] | None = None) -> dict:
    """Run (or resume) a sweep end to end; returns a summary with the best trial.

    ``storage``: where Ray Tune/Train keep results, checkpoints and the resume state, a local folder or an
    object-store URI (``s3://bucket/prefix``). ``cluster_max``: what the cluster can grow to (``--cluster-max``,
    over the sweep's ``cluster_max``). ``command`` is recorded as the parent run's source (default: the sweep's
    ``python -m`` command). A Ray started here is shut down before returning, so no worker output follows the
    caller's summary.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" on every sweep
    with launched(sweep, resume, address, tracking_uri, storage, command, cluster_max) as run:
        return _run(sweep, resume, run)


def _run(sweep: SweepConfig, resume: bool, launch: Launch) -> dict:
    """A launched sweep: its parent run, Tune's search, then the summary (or the state left for --resume)."""
    results, run_dir, base, tracking_uri = launch.results, launch.run_dir, launch.base, launch.tracking_uri
    cluster = ray.cluster_resources()
    concurrency = check_resources(sweep, cluster, launch.limits)
    capacity = {**cluster, **{k: max(v, cluster.get(k, 0.0)) for k, v in launch.limits.items()}}

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, sweep.experiment_name, tracking_uri)
    commit, command = git_commit(), launch.command
    parent_id, created = parent_run(client, experiment_id, launch.run_dir, resume, {
        "sweep": sweep.name, "sweep_file": sweep.path, "git_commit": commit, "data_checksum": launch.checksum,
        **source_tags(sweep.path, command, commit), DESCRIPTION_TAG: _parent_description(sweep, command)}, "sweep")
    if created:
        if Path(sweep.path).is_file():  # a sweep built in code has no YAML to attach
            client.log_artifact(parent_id, sweep.path, artifact_path="sweep")
        client.log_dict(parent_id, {k: v.__dict__ for k, v in sweep.search_space.items()}, "search_space.json")
        for key, value in {"trials": sweep.trials, "concurrency": sweep.concurrency, "seed": sweep.seed,
                           "objective": sweep.objective.metric, "scheduler": sweep.scheduler.type,
                           "num_workers": sweep.resources.num_workers}.items():
            client.log_param(parent_id, key, value)
        log(f"[sweep] {sweep.name}: {sweep.trials} trials, concurrency {sweep.concurrency}; "
            f"Ray results {run_dir}; MLflow {tracking_uri} experiment {sweep.experiment_name!r} run {parent_id}")

    settings = {"sweep": sweep, "base": base, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
                "parent_run_id": parent_id, "storage": (run_dir / "train").uri}
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                    trial_resources(sweep, capacity))
    metric, mode = sweep.objective.metric, sweep.objective.mode
    finisher = TrialFinisher(sweep, base, tracking_uri, experiment_id, parent_id, results)
    if resume:
        tuner = tune.Tuner.restore(run_dir.path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=results.ray_storage()["storage_filesystem"])
    else:
        scheduler = build_scheduler(sweep, trial_config(base_values(sweep), {}))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=sweep.trials, max_concurrent_trials=concurrency,
                search_alg=build_searcher(sweep),
                scheduler=scheduler, time_budget_s=sweep.time_budget_s),
            run_config=tune.RunConfig(name=run_dir.name, verbose=1, callbacks=[finisher.tune_callback()],
                                      **results.ray_storage()),
        )
    started = time.monotonic()
    grid = tuner.fit()
    # Tune ends a sweep that exhausts time_budget_s like an interruption; here it is the sweep's normal end:
    # the trials that ended are summarized and the best is registered.
    out_of_time = time.monotonic() - started >= 0.98 * sweep.time_budget_s
    if out_of_time:
        log(f"[sweep] time budget of {sweep.time_budget_s:.0f} s used up: {len(grid)} of {sweep.trials} trials "
            f"started; summarizing those")
        client.set_tag(parent_id, "ended", "time_budget")
    elif len(grid) < sweep.trials or unfinished_trials(run_dir) or grid.num_terminated + grid.num_errors < len(grid):
        # Interrupted (e.g. Ctrl-C): Tune saved its state; leave the runs open for --resume.
        client.update_run(parent_id, status="KILLED")
        log(f"[sweep] interrupted with {grid.num_terminated} of {sweep.trials} trials finished; "
            f"continue with: python -m vipe_ray.sweep {sweep.path} --resume")
        return {"sweep": sweep.name, "run_dir": run_dir.uri, "parent_run_id": parent_id,
                "tracking_uri": tracking_uri, "trials": [], "best": None, "interrupted": True}
    return summarize(grid, sweep, client, parent_id, experiment_id, tracking_uri, run_dir, finisher)


def _parent_description(sweep: SweepConfig, command: str) -> str:
    keys = ", ".join(sweep.search_space)
    fixed = f" ({len(sweep.points_to_evaluate)} fixed first)" if sweep.points_to_evaluate else ""
    return (f"Sweep `{sweep.name}`: {sweep.trials} trials{fixed} of Optuna search over {keys}, objective "
            f"{sweep.objective.metric} ({sweep.objective.mode}); each trial is a nested run. The sweep YAML is "
            f"attached under `sweep/`. Started with `{command}`.")


def summarize(grid, sweep: SweepConfig, client, parent_id: str, experiment_id: str, tracking_uri: str,
              run_dir: Location, finisher: TrialFinisher) -> dict:
    """Close every trial's run (those the finisher has not), log the sweep's plots on the parent, register
    the best trial's best-validation checkpoint and log its test-set metrics."""
    metric, mode = sweep.objective.metric, sweep.objective.mode
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        if not trial_id:  # never reported: its run was closed by the finisher's on_trial_error
            continue
        # After a --resume the finisher has not seen the earlier reports: Tune's history has them all.
        history = result.metrics_dataframe
        if history is not None and {metric, "checkpoint_path"} <= set(history.columns):
            for record in history[[metric, "checkpoint_path", "step"]].to_dict("records"):
                finisher.on_trial_result(trial_id, record)
        finisher.steps.setdefault(trial_id, trial_config(finisher.base, dict(result.config or {})).optim.steps)
        info = finisher.on_trial_end(trial_id, error=str(result.error) if result.error else None)
        best = finisher.best(trial_id)
        rows.append({"trial_id": trial_id, "params": dict(result.config or {}),
                     "value": best[0] if best else metrics.get(metric),
                     "steps": finisher.last_step.get(trial_id, metrics.get("step")),
                     "error": bool(result.error), **info})
    scored = [r for r in rows if isinstance(r["value"], (int, float)) and not r["error"] and r.get("model_uri")]
    best = (max if mode == "max" else min)(scored, key=lambda r: r["value"]) if scored else None
    summary = {"sweep": sweep.name, "run_dir": run_dir.uri, "parent_run_id": parent_id, "tracking_uri": tracking_uri,
               "experiment_id": experiment_id, "trials": rows, "best": best}
    log_search_plots(client, parent_id, sweep, rows)
    if best is not None:
        client.log_metric(parent_id, f"best_{metric.replace('@', '_at_')}", float(best["value"]))
        for key, value in best["params"].items():
            client.set_tag(parent_id, f"best.{key}", value)
        mlflow.set_tracking_uri(tracking_uri)
        # The logged model's own URI: MLflow 3 keeps models outside run artifacts and warns on runs:/.../model.
        version = mlflow.register_model(best["model_uri"], sweep.registered_model)
        summary["registered_model"] = {"name": version.name, "version": version.version}
        client.set_tag(parent_id, "best_run_id", best["run_id"])
        client.set_model_version_tag(version.name, version.version, "checkpoint_step", str(best.get("step")))
        if sweep.test_best:
            test = test_metrics(best["checkpoint"], command=f"sweep {sweep.path}: best trial {best['trial_id']}")
            log_metrics(client, best["run_id"], test)
            log_metrics(client, parent_id, {f"best_{k}": v for k, v in test.items()})
            for key in ("test/hit@1", "test/hit@1_1limb"):
                if key in test:
                    client.set_model_version_tag(version.name, version.version, key.replace("@", "_at_"),
                                                 f"{test[key]:.4f}")
            summary["test"] = test
    client.log_dict(parent_id, summary, "sweep_summary.json")
    client.set_terminated(parent_id, "FINISHED" if best else "FAILED")
    (run_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
