"""Hyperparameter and ablation sweeps: Ray Tune + Optuna (+ ASHA) over Ray Train runs, tracked in MLflow.

    python -m vipe_ray.sweep SWEEP.yaml [--resume] [--address ADDR] [--tracking-uri URI] [--storage DIR|URI]
                                        [--cluster-max CPU=N,GPU=N]

(A YAML with a ``study:`` block is an ablation study: a grid of variants x seeds, see :mod:`vipe_ray.platform.study`.)

A sweep YAML names a base training config, fixed overrides, a search space over dotted config keys, the
objective, trials, concurrency, resources per trial and a seed (see ``sweeps/``). Everything is validated
before Ray starts a trial: unknown keys, wrong types, empty spaces, values the training config rejects and
resources the cluster cannot provide fail with the file and key.

On one machine it starts a local Ray and an embedded MLflow store (``./mlflow.db``); under
``ray job submit`` it joins the job's cluster. Each sweep gets an MLflow parent run, each trial a nested
run with params, per-report metrics, the model and plots; the best trial's model is registered. The command
ends with a summary table read back from MLflow (:mod:`vipe_ray.platform.sweep_summary`) and the URL that opens the runs.

Results, checkpoints and the resume state go to ``--storage``: a local folder or an object-store URI
(``s3://bucket/prefix``, ``gs://...``; see :mod:`vipe_ray.storage`), which a cluster needs so that every node
and a later ``--resume`` see the same state.
"""

from __future__ import annotations

import argparse
import contextlib
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
from vipe_ray.training.ray_train import Scaling
from vipe_ray.evaluation.ledger import record_test_evaluation
from vipe_ray.storage import Location, StorageError, location
from vipe_ray.config import (DEFAULT_CONFIG, ConfigError, TrainConfig, build_dataclass, config_from_dict, config_to_dict,
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
    #: At most this many validation queries per rig (0: all, every ``eval.val_every`` source frames).
    validation_queries: int = 0
    #: Also evaluate the best trial on the test subjects (recorded in the test ledger). Off: a search selects
    #: on validation and leaves the test split to the verdicts that need it (studies, `evaluate --split test`).
    test_best: bool = False
    #: Fixed first trials ({dotted key: value}); Optuna samples the rest.
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    #: Trials TPE samples at random before it models the objective (0: half the trials, at most 10 --
    #: Optuna's own default of 10 turns a sweep of 8 to 12 trials into random search).
    startup_trials: int = 0
    #: What the cluster can grow to ({Ray resource: amount}, e.g. {CPU: 64, GPU: 8}): an autoscaling cluster
    #: is judged by these rather than by the resources it has now (see :func:`cluster_limits`).
    cluster_max: dict[str, float] = field(default_factory=dict)
    path: str = "<dict>"

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"vipe-ray-{self.name}"

    @property
    def registered_model(self) -> str:
        return self.register_model or f"vipe-ray-{self.name}"


_TOP_KEYS = {"name", "base_config", "overrides", "search_space", "objective", "trials", "concurrency", "scheduler",
             "resources", "seed", "time_budget_s", "max_failures", "experiment", "register_model",
             "validation_queries", "points_to_evaluate", "startup_trials", "cluster_max", "test_best"}


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


def read_mapping(path: str | Path, what: str, known: set[str]) -> dict:
    """A YAML file's top-level mapping, every key among ``known``; errors name the file and the key."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key for a {what} (known: {sorted(known)})")
    return raw


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and fully validate a sweep YAML (every search dimension is tried against the training config)."""
    path = Path(path)
    where = str(path)
    raw = read_mapping(path, "sweep", _TOP_KEYS)
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
    simple = {k: v for k, v in raw.items()
              if k not in ("search_space", "overrides", "points_to_evaluate", "cluster_max")}
    try:
        sweep = build_dataclass(SweepConfig, simple)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    points = _parse_points(raw.get("points_to_evaluate"), space, where)
    cluster_max = parse_resources(raw.get("cluster_max"), f"{where}: cluster_max")
    sweep = replace(sweep, search_space=space, overrides=overrides, points_to_evaluate=points,
                    cluster_max=cluster_max, path=where)
    for key in ("trials", "concurrency"):
        if getattr(sweep, key) < 1:
            raise ConfigError(f"{where}: {key}: {getattr(sweep, key)} must be >= 1")
    if sweep.validation_queries < 0:
        raise ConfigError(f"{where}: validation_queries: {sweep.validation_queries} must be >= 0 (0: all)")
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


#: Custom Ray resource that marks the nodes where trial drivers (the Tune function that starts a trial's
#: Ray Train run, 0.01 CPU) may run. Where the cluster offers it (deploy/raycluster.yaml puts it on the CPU
#: worker group only), every trial asks for one unit, so trial drivers never hold a GPU node or keep the
#: autoscaler from removing one; elsewhere (a local Ray, a cluster without it) they ask for CPU only.
TRIAL_DRIVER_RESOURCE = "trial_driver"


def parse_resources(raw: Any, where: str) -> dict[str, float]:
    """``{CPU: 64, GPU: 8, ...}`` (a mapping, or ``CPU=64,GPU=8`` from the command line) as Ray resources;
    ``cpu``/``gpu`` are accepted for ``CPU``/``GPU``."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        pairs = [item.partition("=") for item in raw.split(",") if item.strip()]
        if not pairs or any(not sep or not name.strip() for name, sep, _ in pairs):
            raise ConfigError(f"{where}: expected RESOURCE=AMOUNT[,RESOURCE=AMOUNT...] (e.g. CPU=64,GPU=8), "
                              f"got {raw!r}")
        raw = {}
        for name, _, value in pairs:
            try:
                raw[name.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {name.strip()}: expected a number, got {value!r}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of Ray resources to amounts (e.g. {{CPU: 64, GPU: 8}}), "
                          f"got {raw!r}")
    out: dict[str, float] = {}
    for name, amount in raw.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise ConfigError(f"{where}.{name}: expected a number >= 0, got {amount!r}")
        key = str(name).upper() if str(name).lower() in ("cpu", "gpu") else str(name)
        out[key] = float(amount)
    return out


def autoscaler_limits() -> dict[str, float]:
    """The most of each resource the cluster's autoscaler may provide, or {} when unknown.

    Read from the cluster config that Ray's autoscaler v2 publishes in the GCS (what Ray Train and Ray Data
    consult for the same question; a private API in ray 2.60, hence the broad guard). A local Ray, or a
    cluster with the v1 autoscaler (KubeRay's default), publishes none: pass ``cluster_max`` /
    ``--cluster-max`` there. An unbounded group counts as infinite.
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a missing or changed private API means "unknown", never a failure
        return {}
    return {k: (math.inf if v >= sys.maxsize else float(v)) for k, v in limits.items()}


def cluster_limits(sweep: SweepConfig, cli: dict[str, float] | None = None) -> dict[str, float]:
    """What the cluster can grow to: the autoscaler's limits, overridden per resource by the sweep's
    ``cluster_max``, overridden by ``--cluster-max``."""
    return {**autoscaler_limits(), **sweep.cluster_max, **(cli or {})}


def check_resources(sweep: SweepConfig, cluster: dict[str, float], limits: dict[str, float] | None = None) -> int:
    """Fail before any trial if one trial can never run on this cluster; return the usable concurrency.

    ``cluster``: the resources now (``ray.cluster_resources()``); ``limits``: what the cluster can grow to
    (:func:`cluster_limits`; a resource it omits counts as it is now). A sweep that fits only once the
    cluster grows goes ahead with a warning: Ray queues its trials and the autoscaler adds nodes.
    """
    limits = limits or {}
    capacity = {k: max(cluster.get(k, 0.0), limits.get(k, 0.0)) for k in {*cluster, *limits}}

    def has(key: str) -> str:
        now, most = cluster.get(key, 0.0), capacity.get(key, 0.0)
        return f"{now} {key}s" if most <= now else f"{now} {key}s now and can grow to {most}"

    r = sweep.resources
    cpus = capacity.get("CPU", 0.0)
    need = r.cpus_per_trial + 0.01
    if need + DATA_LISTING_CPUS > cpus + 1e-9:
        raise ConfigError(f"{sweep.path}: resources: a trial needs {max(r.num_workers, 1)} worker(s) x "
                          f"{r.cpus_per_worker} CPU = {r.cpus_per_trial} CPUs (+0.01 for the trial, +1 free for "
                          f"Ray Data's file listing), but the cluster has {has('CPU')}; lower num_workers or "
                          f"cpus_per_worker, or give the cluster's size with cluster_max / --cluster-max")
    gpus = r.num_workers * r.gpus
    if r.use_gpu and capacity.get("GPU", 0.0) + 1e-9 < gpus:
        raise ConfigError(f"{sweep.path}: resources.use_gpu: {r.num_workers} GPU worker(s) x {r.gpus} GPU per "
                          f"trial but the cluster has {has('GPU')}; give the cluster's size with cluster_max / "
                          f"--cluster-max")
    now_cpus, now_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need + DATA_LISTING_CPUS > now_cpus + 1e-9 or (r.use_gpu and now_gpus + 1e-9 < gpus):
        log(f"[sweep] warning: a trial does not fit the cluster as it is now ({now_cpus} CPUs, {now_gpus} GPUs); "
            f"it can grow to {cpus} CPUs, {capacity.get('GPU', 0.0)} GPUs: trials wait for the autoscaler")
    if math.isinf(cpus):
        return sweep.concurrency
    fits = max(1, int((cpus - DATA_LISTING_CPUS + 1e-9) // need))
    if r.use_gpu:
        fits = max(1, min(fits, int((capacity.get("GPU", 0.0) + 1e-9) // gpus)))
    if sweep.concurrency > fits:
        per_trial = f"{need:.2f} CPUs" + (f" and {gpus:g} GPUs" if r.use_gpu else "")
        have = f"{cpus} CPUs" + (f" and {capacity.get('GPU', 0.0):g} GPUs" if r.use_gpu else "")
        log(f"[sweep] note: concurrency {sweep.concurrency} x {per_trial} per trial (+1 CPU for data loading) "
            f"exceeds the cluster's {have}; running {fits} trial(s) at a time")
        return fits
    return sweep.concurrency


def trial_resources(sweep: SweepConfig, capacity: dict[str, float]) -> dict[str, float]:
    """What a trial's driver asks Tune for: its CPUs (the training itself in local mode, else 0.01 beside
    its Ray Train workers) and, where the cluster offers it, one :data:`TRIAL_DRIVER_RESOURCE`."""
    r = sweep.resources
    resources = {"cpu": r.cpus_per_worker if r.num_workers == 0 else 0.01}
    if capacity.get(TRIAL_DRIVER_RESOURCE, 0.0) >= 1:
        resources[TRIAL_DRIVER_RESOURCE] = 1.0
    return resources


def check_cluster_stores(tracking_uri: str, results: Location, nodes: int, grows: bool) -> None:
    """On a cluster the sweep joined: refuse an MLflow store that is a file on one node when trials can run on
    other nodes (each would log into its own copy), warn when the cluster is a single node; warn when the
    results folder is a local path on a multi-node cluster (it must then be a shared mount)."""
    from vipe_ray.platform.tracking import is_node_local_store

    if is_node_local_store(tracking_uri):
        where = (f"MLflow store {tracking_uri} is a file on the driver's node (under `ray job submit "
                 f"--working-dir`, the default ./mlflow.db is inside Ray's unpacked copy of the upload, which "
                 f"Ray deletes)")
        fix = ("set MLFLOW_TRACKING_URI or --tracking-uri to an MLflow server (http://...) or a database "
               "every node reaches (postgresql+psycopg2://...)")
        if nodes > 1 or grows:
            size = f"{nodes} nodes" if nodes > 1 else "1 node that can grow"
            raise ConfigError(f"--tracking-uri: {where}, but this Ray cluster has {size} and trials on the other "
                              f"nodes cannot log to it; {fix}")
        log(f"[sweep] warning: {where}; {fix} to keep the runs")
    if results.is_local and nodes > 1:
        log(f"[sweep] warning: --storage {results} is a local folder on a {nodes}-node cluster: it must be a "
            f"shared mount at the same path on every node; an object store (s3://BUCKET/PREFIX) needs none")


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
    from vipe_ray.platform.tracking import DESCRIPTION_TAG, git_commit

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

    from vipe_ray.training.ray_train import data_info, fit

    sweep: SweepConfig = settings["sweep"]
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(settings["base"], params, f"{sweep.path} trial {trial_id}")
    client = mlflow.MlflowClient(settings["tracking_uri"])
    run_id = _child_run(client, settings["experiment_id"], settings["parent_run_id"], trial_id, sweep, params,
                        config, data_info(config)["checksum"])
    fit(config, sweep.resources, name=f"train-{trial_id}",
        storage_path=settings["storage"], max_failures=sweep.max_failures, callbacks=[TuneReportCallback()],
        extra={"on_report": MlflowReporter(settings["tracking_uri"], run_id), "val_queries": sweep.validation_queries},
        score=(sweep.objective.metric, sweep.objective.mode))


def _latest_run_dir(results: Location, name: str) -> Location | None:
    """The newest ``NAME-YYYYmmdd-HHMMSS`` run folder under the results location (local or object store)."""
    runs = [d for d in results.subdirs() if d.name.startswith(f"{name}-")]
    return runs[-1] if runs else None


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
        import mlflow

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
        from ray.tune import Callback

        finisher = self

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                finisher.on_trial_result(trial.trial_id, result, trial.config)

            def on_trial_complete(self, iteration, trials, trial, **info):
                finisher.on_trial_end(trial.trial_id)

            def on_trial_error(self, iteration, trials, trial, **info):
                finisher.on_trial_end(trial.trial_id, error=str(getattr(trial, "error_file", None) or "error"))

        return _Callback()


def reported_checkpoint(results: Location, path: str) -> Location:
    """Where a checkpoint path reported by Ray Train lives: on the results' filesystem, except an absolute
    local path (Train's local mode, ``num_workers: 0``, keeps checkpoints in local temporary folders)."""
    return location(path) if path.startswith("/") else results.at(path)


def finalize_trial(client, run_id: str, checkpoint_path: str | None, status: str, validation_queries: int = 0,
                   results: Location | None = None) -> dict:
    """Log a trial's model, Hit@k plot and retrieval figure from its best checkpoint; close its run.
    ``checkpoint_path`` is as Ray reported it, on the filesystem of ``results`` (default: local)."""
    import tempfile

    import mlflow
    import torch

    from vipe_ray.data import load_table
    from vipe_ray.evaluation.protocols import evaluate_rigs
    from vipe_ray.training.loop import load_checkpoint
    from vipe_ray.platform.tracking import hit_plot, log_figure, log_model, retrieval_figure

    summary: dict = {}
    if checkpoint_path:
        checkpoint = reported_checkpoint(results or location("."), checkpoint_path)
        if checkpoint.is_local:
            ckpt = load_checkpoint(checkpoint.path)
        else:
            with tempfile.TemporaryDirectory(prefix="vipe-ray-ckpt-") as directory:
                ckpt = load_checkpoint(checkpoint.download(directory))
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
        from vipe_ray.prvipe.cameras import RIGS, Orbits, render

        pixels = render(example, Orbits.from_cameras([RIGS["h36m"][0]]).expand(4)).float()
        if config.temporal.enabled:
            pixels = pixels[:, None].expand(-1, config.temporal.window, -1, -1).contiguous()
        with mlflow.start_run(run_id=run_id, nested=True):
            info = log_model(mlflow, ckpt.model, config, pixels)
        summary = {"model_uri": info.model_uri, "step": ckpt.step, "checkpoint": checkpoint.uri}
        client.set_tag(run_id, "model_uri", info.model_uri)
        client.set_tag(run_id, "checkpoint", checkpoint.uri)
        client.set_tag(run_id, "checkpoint_step", str(ckpt.step))
    client.set_terminated(run_id, status)
    return summary


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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" on every sweep
    with launched(sweep, resume, address, tracking_uri, storage, command, cluster_max) as run:
        return _run(sweep, resume, run)


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
    import ray
    from ray import tune

    from vipe_ray.platform.log_filters import filter_driver_records, filter_worker_logs
    from vipe_ray.data import DataError
    from vipe_ray.training.ray_train import data_info
    from vipe_ray.platform.tracking import default_tracking_uri

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = base_values(sweep)
    try:
        results = location(storage)
        results.check_access()
        results.mkdir()
        if resume:
            run_dir = _latest_run_dir(results, sweep.name)
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


def parent_run(client, experiment_id: str, run: Launch, resume: bool, tags: dict[str, str], what: str) -> tuple[str, bool]:
    """The MLflow parent run of ``run``: found again on ``resume`` (its id is kept in the run folder), created
    otherwise with ``tags``; returns (run id, created)."""
    parent_file = run.run_dir / PARENT_RUN_FILE
    if resume and parent_file.exists():
        parent_id = parent_file.read_text().strip()
        client.update_run(parent_id, status="RUNNING")
        log(f"[{what}] resuming {run.run_dir} (MLflow parent run {parent_id})")
        return parent_id, False
    run.run_dir.mkdir()
    parent_id = client.create_run(experiment_id, run_name=run.run_dir.name, tags=tags).info.run_id
    parent_file.write_text(parent_id)
    return parent_id, True


def _run(sweep: SweepConfig, resume: bool, launch: Launch) -> dict:
    import mlflow
    import ray
    from ray import tune

    from vipe_ray.platform.tracking import DESCRIPTION_TAG, ensure_experiment, git_commit, source_tags

    results, run_dir, base, tracking_uri = launch.results, launch.run_dir, launch.base, launch.tracking_uri
    cluster = ray.cluster_resources()
    concurrency = check_resources(sweep, cluster, launch.limits)
    capacity = {**cluster, **{k: max(v, cluster.get(k, 0.0)) for k, v in launch.limits.items()}}

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, sweep.experiment_name, tracking_uri)
    commit, command = git_commit(), launch.command
    parent_id, created = parent_run(client, experiment_id, launch, resume, {
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
            param_space={key: param.tune() for key, param in sweep.search_space.items()},
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
    elif len(grid) < sweep.trials or _unfinished(run_dir) or grid.num_terminated + grid.num_errors < len(grid):
        # Interrupted (e.g. Ctrl-C): Tune saved its state; leave the runs open for --resume.
        client.update_run(parent_id, status="KILLED")
        log(f"[sweep] interrupted with {grid.num_terminated} of {sweep.trials} trials finished; "
            f"continue with: python -m vipe_ray.sweep {sweep.path} --resume")
        return {"sweep": sweep.name, "run_dir": run_dir.uri, "parent_run_id": parent_id,
                "tracking_uri": tracking_uri, "trials": [], "best": None, "interrupted": True}
    return summarize(grid, sweep, client, parent_id, experiment_id, tracking_uri, run_dir, finisher)


def _unfinished(run_dir: Location) -> list[str]:
    """Trials that the saved experiment state (what ``--resume`` continues from) holds as not finished.

    On Ctrl-C Tune saves its state and then marks the running trials TERMINATED in memory, so the result grid
    cannot tell an interrupted trial from a finished one; the state it saved can.
    """
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(run_dir.path, storage_filesystem=run_dir.ray_storage()["storage_filesystem"])
    return [t.trial_id for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]


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
    import mlflow

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
    _log_search_plots(client, parent_id, sweep, rows)
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


def _mlflow_metrics(values: dict[str, float]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]


def log_metrics(client, run_id: str, values: dict[str, float]) -> None:
    """Log ``values`` (finite ones; ``@`` spelled ``_at_``) on a run, in batches under MLflow's limit of 1,000
    metrics per request: a full evaluation on a few rigs of one's own has more."""
    try:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH as per_batch
    except ImportError:  # an internal module of MLflow's: its documented limit if it moves
        per_batch = 1000
    metrics = _mlflow_metrics(values)
    for start in range(0, len(metrics), per_batch):
        client.log_batch(run_id, metrics=metrics[start:start + per_batch])


def test_metrics(checkpoint: str, lifter=None, progress=lambda _m: None, with_result: bool = False,
                 command: str = ""):
    """A checkpoint's full evaluation (its config's rigs and occlusion protocols) on the *test* subjects,
    flattened for MLflow (:func:`vipe_ray.evaluation.protocols.flat_metrics`, prefix ``test/``); with ``with_result``,
    also the full result. ``checkpoint``: a local path or an object-store URI. The evaluation is recorded in
    the test ledger (:mod:`vipe_ray.evaluation.ledger`) under ``command``."""
    import tempfile

    from vipe_ray.data import load_table
    from vipe_ray.evaluation.protocols import evaluate_rigs, flat_metrics
    from vipe_ray.training.loop import load_checkpoint

    where = location(checkpoint)
    if where.is_local:
        ckpt = load_checkpoint(where.path)
    else:
        with tempfile.TemporaryDirectory(prefix="vipe-ray-ckpt-") as directory:
            ckpt = load_checkpoint(where.download(directory))
    table = load_table(ckpt.config.data.table_path()).select(ckpt.config.data.test_subjects)
    result = evaluate_rigs(ckpt.model, ckpt.config, table, lifter=lifter, progress=progress)
    record_test_evaluation(result, ckpt.config, command or f"test_metrics {checkpoint}", checkpoint, ckpt.step)
    metrics = flat_metrics(result, "test/")
    return (metrics, result) if with_result else metrics


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

    from vipe_ray.platform.log_filters import quiet_optuna_plots

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
    parser.add_argument("--storage", default="ray_results",
                        help="Ray Tune/Train results, checkpoints and resume state: a folder or an object-store URI "
                             "(s3://BUCKET/PREFIX; endpoint and credentials from AWS_ENDPOINT_URL, "
                             "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    parser.add_argument("--cluster-max", metavar="CPU=N,GPU=N",
                        help="what an autoscaling cluster can grow to (overrides the sweep's cluster_max and the "
                             "autoscaler's limits); trials that fit only then wait for the autoscaler")
    parser.add_argument("--report", action="store_true",
                        help="studies only: rewrite the latest run's report from MLflow (no training)")
    args = parser.parse_args(argv)
    if args.report and args.resume:
        parser.error("--report and --resume: choose one")
    command = shlex.join(["python", "-m", "vipe_ray.sweep", *(sys.argv[1:] if argv is None else argv)])
    from vipe_ray.platform import study as studies  # a study is run by this command too; it builds on this module

    try:
        if studies.is_study(args.sweep):
            study = studies.load_study(args.sweep)
            if args.report:
                summary = studies.report_study(study, args.tracking_uri, args.storage)
                log(f"[study] report: {summary['report']}")
                return 0
            summary = studies.run_study(study, args.resume, args.address, args.tracking_uri, args.storage,
                                        command=command,
                                        cluster_max=parse_resources(args.cluster_max, "--cluster-max"))
            if summary.get("interrupted"):
                return 130
            log(f"\n[study] report: {summary['report']} (also on MLflow parent run {summary['parent_run_id']})")
            return 0
        sweep = load_sweep(args.sweep)
        cluster_max = parse_resources(args.cluster_max, "--cluster-max")
        summary = run_sweep(sweep, args.resume, args.address, args.tracking_uri, args.storage, command=command,
                            cluster_max=cluster_max)
    except ConfigError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 130
    log("\n" + summary_table(sweep, summary))
    return 0 if summary["best"] else 1


def summary_table(sweep: SweepConfig, summary: dict) -> str:
    """The closing table of a finished sweep, read back from MLflow (see :mod:`vipe_ray.platform.sweep_summary`)."""
    import mlflow

    from vipe_ray.platform import sweep_summary as report

    evaluation = trial_config(base_values(sweep), {}).eval
    client = mlflow.MlflowClient(summary["tracking_uri"])
    metric, mode = sweep.objective.metric, sweep.objective.mode
    lines = report.collect(client, summary, metric, evaluation.val_rigs, evaluation.ks)
    return report.render(summary, lines, metric, mode, evaluation.val_rigs, evaluation.ks)

if __name__ == "__main__":
    sys.exit(main())
