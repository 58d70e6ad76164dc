"""Hyperparameter and ablation sweeps: Ray Tune + Optuna (+ ASHA) over Ray Train runs, tracked in MLflow.

    python -m vipe_ray.sweep SWEEP.yaml [--resume] [--address ADDR] [--tracking-uri URI] [--storage DIR]

A sweep YAML names a base training config, fixed overrides, a search space over dotted config keys, the
objective, trials, concurrency, resources per trial and a seed (see ``sweeps/``). Everything is validated
before Ray starts a trial: unknown keys, wrong types, empty spaces, values the training config rejects and
resources the cluster cannot provide fail with the file and key.

On one machine it starts a local Ray and an embedded MLflow store (``./mlflow.db``); under
``ray job submit`` it joins the job's cluster. Each sweep gets an MLflow parent run, each trial a nested
run with params, per-report metrics, the model and plots; the best trial's model is registered. The command
ends with a summary table read back from MLflow (:mod:`vipe_ray.report`) and the URL that opens the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from vipe_ray import REPO_ROOT, log
from vipe_ray.distributed import Scaling
from vipe_ray.config import (DEFAULT_CONFIG, ConfigError, TrainConfig, _build, config_from_dict, config_to_dict,
                             flatten, merge)

PARENT_RUN_FILE = "mlflow_parent_run_id"


@dataclass(frozen=True)
class Objective:
    metric: str = "val_hit@1"
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class Scheduler:
    """``asha`` stops weak trials at report boundaries (every ``checkpoint_every`` steps), on the training
    step with ``max_t`` the run's steps; ``grace_period`` counts reports. ``fifo`` never stops a trial."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError(f"scheduler: grace_period {self.grace_period} must be >= 1 and reduction_factor "
                              f"{self.reduction_factor} >= 2")


@dataclass(frozen=True)
class Param:
    """One search dimension: ``uniform``/``loguniform``/``randint`` over [low, high], or ``choice`` of values."""

    type: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None

    def candidates(self) -> list[Any]:
        """Representative values used to validate the dimension against the training config."""
        if self.type == "choice":
            return list(self.values or ())
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def tune(self):
        from ray import tune

        if self.type == "choice":
            return tune.choice(list(self.values))
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))


@dataclass(frozen=True)
class SweepConfig:
    name: str
    search_space: dict[str, Param] = field(default_factory=dict)
    base_config: str | None = None
    overrides: dict = field(default_factory=dict)
    objective: Objective = field(default_factory=Objective)
    trials: int = 8
    concurrency: int = 2
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Scaling = field(default_factory=Scaling)
    seed: int = 0
    time_budget_s: float = 3600.0
    max_failures: int = 1
    experiment: str | None = None
    register_model: str | None = None
    validation_queries: int = 200
    #: Fixed first trials ({dotted key: value}); Optuna samples the rest.
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    #: Trials TPE samples at random before it models the objective (0: half the trials, at most 10 --
    #: Optuna's own default of 10 turns a sweep of 8 to 12 trials into random search).
    startup_trials: int = 0
    path: str = "<dict>"

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"vipe-ray-{self.name}"

    @property
    def registered_model(self) -> str:
        return self.register_model or f"vipe-ray-{self.name}"


_TOP_KEYS = {"name", "base_config", "overrides", "search_space", "objective", "trials", "concurrency", "scheduler",
             "resources", "seed", "time_budget_s", "max_failures", "experiment", "register_model",
             "validation_queries", "points_to_evaluate", "startup_trials"}


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: search_space.{key}: expected a mapping with 'type', got {spec!r}")
    kind = spec.get("type")
    allowed = {"choice": {"type", "values"}, "uniform": {"type", "low", "high"},
               "loguniform": {"type", "low", "high"}, "randint": {"type", "low", "high"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: search_space.{key}.type: {kind!r} is not one of {sorted(allowed)}")
    extra = sorted(set(spec) - allowed[kind])
    if extra:
        raise ConfigError(f"{where}: search_space.{key}.{extra[0]}: unknown key for a {kind} dimension")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: search_space.{key}.values: a choice needs a non-empty list, got {values!r}")
        return Param("choice", values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: search_space.{key}.{name}: expected a number, got {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: search_space.{key}: empty range low {low} >= high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: search_space.{key}.low: loguniform needs low > 0, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: search_space.{key}: randint bounds must be integers, got {low}, {high}")
    return Param(kind, low=low, high=high)


def _parse_points(raw: Any, space: dict[str, Param], where: str) -> tuple[dict[str, Any], ...]:
    """``points_to_evaluate``: a list of mappings, each giving a value to every searched key."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: points_to_evaluate: expected a list of mappings, got {raw!r}")
    points = []
    for i, point in enumerate(raw):
        at = f"{where}: points_to_evaluate[{i}]"
        if not isinstance(point, dict):
            raise ConfigError(f"{at}: expected a mapping of searched keys, got {point!r}")
        unknown, missing = sorted(set(point) - set(space)), sorted(set(space) - set(point))
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}: not a key of search_space")
        if missing:
            raise ConfigError(f"{at}.{missing[0]}: missing (a fixed point gives every searched key a value)")
        for key, value in point.items():
            param = space[key]
            inside = (value in param.values if param.type == "choice" else
                      not isinstance(value, bool) and isinstance(value, (int, float))
                      and param.low <= value <= param.high)
            if not inside:
                span = list(param.values) if param.type == "choice" else f"[{param.low}, {param.high}]"
                raise ConfigError(f"{at}.{key}: {value!r} is outside the search space {span}")
        points.append(dict(point))
    return tuple(points)


def nested(dotted: dict[str, Any]) -> dict:
    """``{"a.b": 1} -> {"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def base_values(sweep: SweepConfig) -> dict:
    """The trial-independent training config values (base YAML + overrides) as a nested dict."""
    path = Path(sweep.base_config) if sweep.base_config else DEFAULT_CONFIG
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{sweep.path}: base_config: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{sweep.path}: base_config: malformed YAML in {path}: {exc}") from None
    return merge(values, sweep.overrides)


def trial_config(base: dict, params: dict[str, Any], source: str = "trial") -> TrainConfig:
    """The training config of one trial: base values with the sampled parameters applied."""
    return config_from_dict(merge(base, nested(params)), source)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and fully validate a sweep YAML (every search dimension is tried against the training config)."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read sweep ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key (known: {sorted(_TOP_KEYS)})")
    for key in ("name", "search_space"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: required")
    space_raw = raw["search_space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{where}: search_space: must be a non-empty mapping of dotted config keys")
    space = {key: _parse_param(key, spec, where) for key, spec in space_raw.items()}
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping, got {overrides!r}")
    simple = {k: v for k, v in raw.items() if k not in ("search_space", "overrides", "points_to_evaluate")}
    try:
        sweep = _build(SweepConfig, simple)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    points = _parse_points(raw.get("points_to_evaluate"), space, where)
    sweep = replace(sweep, search_space=space, overrides=overrides, points_to_evaluate=points, path=where)
    for key in ("trials", "concurrency", "validation_queries"):
        if getattr(sweep, key) < 1:
            raise ConfigError(f"{where}: {key}: {getattr(sweep, key)} must be >= 1")
    if sweep.time_budget_s <= 0:
        raise ConfigError(f"{where}: time_budget_s: {sweep.time_budget_s} must be > 0")
    if not 0 <= sweep.startup_trials <= sweep.trials:
        raise ConfigError(f"{where}: startup_trials: {sweep.startup_trials} must lie in [0, trials = {sweep.trials}]")
    base = base_values(sweep)
    config = trial_config(base, {}, f"{where} (base_config + overrides)")
    for key, param in space.items():
        for value in param.candidates():
            try:
                trial_config(base, {key: value}, where)
            except ConfigError as exc:
                raise ConfigError(f"{where}: search_space.{key} = {value!r}: {exc}") from None
    for i, point in enumerate(points):
        try:
            trial_config(base, point, where)
        except ConfigError as exc:
            raise ConfigError(f"{where}: points_to_evaluate[{i}]: {exc}") from None
    if len(points) > sweep.trials:
        raise ConfigError(f"{where}: points_to_evaluate: {len(points)} fixed points but only {sweep.trials} trials")
    if sweep.objective.metric.startswith("val_") and not config.data.val_subjects:
        raise ConfigError(f"{where}: objective.metric {sweep.objective.metric!r} needs data.val_subjects")
    return sweep


def build_searcher(sweep: SweepConfig):
    """Optuna's TPE behind Tune: seeded, ``startup_trials`` random trials first, constant liar so that
    concurrent trials do not all sample the same region, and the sweep's fixed first points."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    startup = sweep.startup_trials or min(10, max(1, sweep.trials // 2))
    sampler = optuna.samplers.TPESampler(n_startup_trials=startup, seed=sweep.seed, constant_liar=True)
    return OptunaSearch(points_to_evaluate=[dict(p) for p in sweep.points_to_evaluate] or None, sampler=sampler)


def build_scheduler(sweep: SweepConfig, base: TrainConfig):
    """ASHA on the training step (the ``step`` every report carries), with ``max_t`` the longest run the
    search space allows: a run is never cut for reporting often. ``grace_period`` counts reports of the base
    config (``checkpoint_every`` steps each). FIFO when the sweep asks for it."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type != "asha":
        return FIFOScheduler()
    steps = [base.optim.steps]
    if "optim.steps" in sweep.search_space:
        steps += [int(v) for v in sweep.search_space["optim.steps"].candidates()]
    return ASHAScheduler(time_attr="step", max_t=max(steps), reduction_factor=sweep.scheduler.reduction_factor,
                         grace_period=min(sweep.scheduler.grace_period * base.checkpoint_every, max(steps)))


#: Ray Data's file-listing task always asks for one whole CPU (ray 2.60 offers no knob for it), so running
#: trials must leave one CPU free or their data never loads.
DATA_LISTING_CPUS = 1.0


def check_resources(sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """Fail before any trial if one trial can never run on this cluster; return the usable concurrency."""
    r = sweep.resources
    cpus = cluster.get("CPU", 0.0)
    need = r.cpus_per_trial + 0.01
    if need + DATA_LISTING_CPUS > cpus + 1e-9:
        raise ConfigError(f"{sweep.path}: resources: a trial needs {max(r.num_workers, 1)} worker(s) x "
                          f"{r.cpus_per_worker} CPU = {r.cpus_per_trial} CPUs (+0.01 for the trial, +1 free for "
                          f"Ray Data's file listing), but the cluster has {cpus} CPUs; lower num_workers or "
                          f"cpus_per_worker")
    gpus = r.num_workers * r.gpus
    if r.use_gpu and cluster.get("GPU", 0.0) + 1e-9 < gpus:
        raise ConfigError(f"{sweep.path}: resources.use_gpu: {r.num_workers} GPU worker(s) x {r.gpus} GPU per "
                          f"trial but the cluster has {cluster.get('GPU', 0.0)} GPUs")
    fits = max(1, int((cpus - DATA_LISTING_CPUS + 1e-9) // need))
    if r.use_gpu:
        fits = min(fits, int((cluster.get("GPU", 0.0) + 1e-9) // gpus))
    if sweep.concurrency > fits:
        per_trial = f"{need:.2f} CPUs" + (f" and {gpus:g} GPUs" if r.use_gpu else "")
        have = f"{cpus} CPUs" + (f" and {cluster.get('GPU', 0.0):g} GPUs" if r.use_gpu else "")
        log(f"[sweep] note: concurrency {sweep.concurrency} x {per_trial} per trial (+1 CPU for data loading) "
            f"exceeds the cluster's {have}; running {fits} trial(s) at a time")
        return fits
    return sweep.concurrency


class MlflowReporter:
    """Logs a trial's per-report metrics into its MLflow run (runs in the Ray Train rank-0 worker)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(self.tracking_uri)
        now = int(time.time() * 1000)
        batch = [Metric(key.replace("@", "_at_"), float(v), now, step) for key, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        client.log_batch(self.run_id, metrics=batch)


def _child_run(client, experiment_id: str, parent_id: str, trial_id: str, sweep: SweepConfig,
               params: dict, config: TrainConfig, checksum: str) -> str:
    """The trial's nested MLflow run: found again on resume (tag ``ray.trial_id``), created otherwise."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`ray.trial_id` = '{trial_id}' and "
                                                             f"tags.`mlflow.parentRunId` = '{parent_id}'")
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param as MlflowParam
    from vipe_ray.tracking import DESCRIPTION_TAG, git_commit

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


def run_trial(params: dict, settings: dict) -> None:
    """Tune function trainable: one Pr-VIPE training run (Ray Train) whose reports drive Tune and MLflow."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vipe_ray.distributed import data_info, fit

    sweep: SweepConfig = settings["sweep"]
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(settings["base"], params, f"{sweep.path} trial {trial_id}")
    client = mlflow.MlflowClient(settings["tracking_uri"])
    run_id = _child_run(client, settings["experiment_id"], settings["parent_run_id"], trial_id, sweep, params,
                        config, data_info(config)["checksum"])
    fit(config, sweep.resources, name=f"train-{trial_id}",
        storage_path=settings["storage"], max_failures=sweep.max_failures, callbacks=[TuneReportCallback()],
        extra={"on_report": MlflowReporter(settings["tracking_uri"], run_id), "val_queries": sweep.validation_queries})


def _latest_run_dir(storage: Path, name: str) -> Path | None:
    runs = sorted(p for p in storage.glob(f"{name}-*") if p.is_dir())
    return runs[-1] if runs else None


def finalize_trial(client, run_id: str, checkpoint_path: str | None, status: str, sweep: SweepConfig) -> dict:
    """Log a trial's model, Hit@k plot and retrieval figure from its last checkpoint; close its run."""
    import mlflow
    import torch

    from vipe_ray.data import load_table
    from vipe_ray.evaluate import evaluate_rigs
    from vipe_ray.train import load_checkpoint
    from vipe_ray.tracking import hit_plot, log_figure, log_model, retrieval_figure

    summary: dict = {}
    if checkpoint_path:
        ckpt = load_checkpoint(checkpoint_path)
        config = ckpt.config
        table = load_table(config.data.table_path()).select(config.data.val_subjects)
        # The validation protocol the trial was selected on: validation rigs, clean keypoints.
        result = evaluate_rigs(ckpt.model, config, table, progress=lambda _m: None,
                               eval_config=replace(config.eval, rigs=config.eval.val_rigs, occlusion=False,
                                                   max_queries=sweep.validation_queries))
        log_figure(client, run_id, hit_plot, result, name="hit_at_k.png")
        log_figure(client, run_id, retrieval_figure, ckpt.model, config, table, name="retrievals.png")
        client.log_dict(run_id, result, "validation_retrieval.json")
        example = torch.from_numpy(table.joints[:4]).double()
        from vipe_ray.cameras import RIGS, Orbits, render

        pixels = render(example, Orbits.from_cameras([RIGS["h36m"][0]]).expand(4)).float()
        if config.temporal.enabled:
            pixels = pixels[:, None].expand(-1, config.temporal.window, -1, -1).contiguous()
        with mlflow.start_run(run_id=run_id, nested=True):
            info = log_model(mlflow, ckpt.model, config, pixels)
        summary = {"model_uri": info.model_uri, "step": ckpt.step}
        client.set_tag(run_id, "checkpoint", checkpoint_path)
    client.set_terminated(run_id, status)
    return summary


def run_sweep(sweep: SweepConfig, resume: bool = False, address: str | None = None,
              tracking_uri: str | None = None, storage: str | Path = "ray_results",
              command: str | None = None) -> dict:
    """Run (or resume) a sweep end to end; returns a summary with the best trial.

    ``command`` is recorded as the parent run's source (default: the sweep's ``python -m`` command). A Ray
    started here is shut down before returning, so no worker output follows the caller's summary.
    """
    import optuna
    import ray
    from ray import tune

    from vipe_ray.console import filter_driver_records, filter_worker_logs
    from vipe_ray.tracking import default_tracking_uri

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = base_values(sweep)
    storage = Path(storage).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if resume:
        run_dir = _latest_run_dir(storage, sweep.name)
        if run_dir is None or not tune.Tuner.can_restore(str(run_dir)):
            raise ConfigError(f"--resume: no restorable sweep named {sweep.name!r} under {storage}")
    else:
        run_dir = storage / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = tracking_uri or default_tracking_uri()
    command = command or f"python -m vipe_ray.sweep {sweep.path}"
    filter_driver_records()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" on every sweep
    started_ray = not ray.is_initialized()
    if started_ray and (address or os.environ.get("RAY_ADDRESS")):
        ray.init(address=address)
    elif started_ray:
        ray.init(include_dashboard=False)  # Ray's own detection honours a container's CPU limit
    filter_worker_logs()
    try:
        return _run(sweep, resume, tracking_uri, storage, run_dir, base, command)
    finally:
        if started_ray:
            ray.shutdown()


def _run(sweep: SweepConfig, resume: bool, tracking_uri: str, storage: Path, run_dir: Path, base: dict,
         command: str) -> dict:
    import mlflow
    import ray
    from ray import tune

    from vipe_ray.tracking import DESCRIPTION_TAG, ensure_experiment, git_commit, source_tags

    concurrency = check_resources(sweep, ray.cluster_resources())

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, sweep.experiment_name, tracking_uri)
    parent_file = run_dir / PARENT_RUN_FILE
    if resume and parent_file.exists():
        parent_id = parent_file.read_text().strip()
        client.update_run(parent_id, status="RUNNING")
        log(f"[sweep] resuming {run_dir} (MLflow parent run {parent_id})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = trial_config(base, {})
        from vipe_ray.distributed import data_info

        commit = git_commit()
        parent = client.create_run(experiment_id, run_name=run_dir.name, tags={
            "sweep": sweep.name, "sweep_file": sweep.path, "git_commit": commit,
            "data_checksum": data_info(config)["checksum"], **source_tags(sweep.path, command, commit),
            DESCRIPTION_TAG: _parent_description(sweep, command)})
        parent_id = parent.info.run_id
        parent_file.write_text(parent_id)
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
                "parent_run_id": parent_id, "storage": str(run_dir / "train")}
    trial_cpus = sweep.resources.cpus_per_worker if sweep.resources.num_workers == 0 else 0.01
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": trial_cpus})
    metric, mode = sweep.objective.metric, sweep.objective.mode
    if resume:
        tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = build_scheduler(sweep, trial_config(base_values(sweep), {}))
        tuner = tune.Tuner(
            trainable,
            param_space={key: param.tune() for key, param in sweep.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=sweep.trials, max_concurrent_trials=concurrency,
                search_alg=build_searcher(sweep),
                scheduler=scheduler, time_budget_s=sweep.time_budget_s),
            run_config=tune.RunConfig(name=run_dir.name, storage_path=str(storage), verbose=1),
        )
    grid = tuner.fit()
    if len(grid) < sweep.trials or grid.num_terminated + grid.num_errors < len(grid):
        # Interrupted (e.g. Ctrl-C): Tune saved its state; leave the runs open for --resume.
        client.update_run(parent_id, status="KILLED")
        log(f"[sweep] interrupted with {grid.num_terminated} of {sweep.trials} trials finished; "
            f"continue with: python -m vipe_ray.sweep {sweep.path} --resume")
        return {"sweep": sweep.name, "run_dir": str(run_dir), "parent_run_id": parent_id,
                "tracking_uri": tracking_uri, "trials": [], "best": None, "interrupted": True}
    return summarize(grid, sweep, client, parent_id, experiment_id, tracking_uri, run_dir)


def _parent_description(sweep: SweepConfig, command: str) -> str:
    keys = ", ".join(sweep.search_space)
    fixed = f" ({len(sweep.points_to_evaluate)} fixed first)" if sweep.points_to_evaluate else ""
    return (f"Sweep `{sweep.name}`: {sweep.trials} trials{fixed} of Optuna search over {keys}, objective "
            f"{sweep.objective.metric} ({sweep.objective.mode}); each trial is a nested run. The sweep YAML is "
            f"attached under `sweep/`. Started with `{command}`.")


def summarize(grid, sweep: SweepConfig, client, parent_id: str, experiment_id: str, tracking_uri: str,
              run_dir: Path) -> dict:
    """Close every trial's run, log the sweep's plots on the parent and register the best model."""
    import mlflow

    metric, mode = sweep.objective.metric, sweep.objective.mode
    rows = []
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    steps = trial_config(base_values(sweep), {}).optim.steps
    for result in grid:
        metrics = result.metrics or {}
        config_params = dict(result.config or {})
        run = next((r for r in runs if r.data.tags.get("ray.trial_id") == metrics.get("trial_id")), None)
        status = "FAILED" if result.error else "FINISHED"
        info: dict = {}
        if run is not None:
            if result.error:
                client.set_tag(run.info.run_id, "error", str(result.error)[:5000])
            if metrics.get("step", 0) < steps and not result.error:
                client.set_tag(run.info.run_id, "stopped_early", "asha")
            info = finalize_trial(client, run.info.run_id, metrics.get("checkpoint_path"), status, sweep)
        rows.append({"trial_id": metrics.get("trial_id"), "params": config_params, "value": metrics.get(metric),
                     "steps": metrics.get("step"), "run_id": run.info.run_id if run else None,
                     "error": bool(result.error), **info})
    scored = [r for r in rows if isinstance(r["value"], (int, float)) and not r["error"]]
    best = (max if mode == "max" else min)(scored, key=lambda r: r["value"]) if scored else None
    summary = {"sweep": sweep.name, "run_dir": str(run_dir), "parent_run_id": parent_id, "tracking_uri": tracking_uri,
               "experiment_id": experiment_id, "trials": rows, "best": best}
    _log_search_plots(client, parent_id, sweep, rows)
    if best is not None and best.get("model_uri"):
        client.log_metric(parent_id, f"best_{metric.replace('@', '_at_')}", float(best["value"]))
        for key, value in best["params"].items():
            client.set_tag(parent_id, f"best.{key}", value)
        mlflow.set_tracking_uri(tracking_uri)
        # The logged model's own URI: MLflow 3 keeps models outside run artifacts and warns on runs:/.../model.
        version = mlflow.register_model(best["model_uri"], sweep.registered_model)
        summary["registered_model"] = {"name": version.name, "version": version.version}
        client.set_tag(parent_id, "best_run_id", best["run_id"])
    client.log_dict(parent_id, summary, "sweep_summary.json")
    client.set_terminated(parent_id, "FINISHED" if best else "FAILED")
    (run_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _log_search_plots(client, parent_id: str, sweep: SweepConfig, rows: list[dict]) -> None:
    """Optuna's optimization-history and parameter-importance plots, from the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import create_trial

    def distribution(param: Param):
        if param.type == "choice":
            return CategoricalDistribution(list(param.values))
        if param.type == "randint":
            return IntDistribution(int(param.low), int(param.high) - 1)
        return FloatDistribution(param.low, param.high, log=param.type == "loguniform")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.objective.mode == "max" else "minimize")
    for row in rows:
        if isinstance(row["value"], (int, float)) and not row["error"]:
            params = {k: v for k, v in row["params"].items() if k in sweep.search_space}
            study.add_trial(create_trial(params=params, value=float(row["value"]), distributions={
                k: distribution(sweep.search_space[k]) for k in params}))
    if not study.trials:
        return
    import tempfile

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    from vipe_ray.console import quiet_optuna_plots

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipe_ray.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML (see sweeps/)")
    parser.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this sweep")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--storage", default="ray_results", help="Ray Tune/Train results folder")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "vipe_ray.sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        sweep = load_sweep(args.sweep)
        summary = run_sweep(sweep, args.resume, args.address, args.tracking_uri, args.storage, command=command)
    except ConfigError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 130
    log("\n" + summary_table(sweep, summary))
    return 0 if summary["best"] else 1


def summary_table(sweep: SweepConfig, summary: dict) -> str:
    """The closing table of a finished sweep, read back from MLflow (see :mod:`vipe_ray.report`)."""
    import mlflow

    from vipe_ray import report

    evaluation = trial_config(base_values(sweep), {}).eval
    client = mlflow.MlflowClient(summary["tracking_uri"])
    metric, mode = sweep.objective.metric, sweep.objective.mode
    lines = report.collect(client, summary, metric, evaluation.val_rigs, evaluation.ks)
    return report.render(summary, lines, metric, mode, evaluation.val_rigs, evaluation.ks)

if __name__ == "__main__":
    sys.exit(main())
