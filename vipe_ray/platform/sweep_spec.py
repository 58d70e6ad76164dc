"""The sweep YAML: its dataclasses (:class:`SweepConfig` and its parts), :func:`load_sweep` that reads and fully
validates one, and the helpers that turn a sweep's base config, overrides and sampled values into a trial's
training config (shared with studies, :mod:`vipe_ray.platform.study_spec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from vipe_ray import REPO_ROOT
from vipe_ray.config import DEFAULT_CONFIG, ConfigError, TrainConfig, build_dataclass, config_from_dict, merge
from vipe_ray.training.ray_train import Scaling


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
    """One search dimension: ``uniform``/``loguniform``/``randint`` over [low, high], or ``choice`` of values
    (Tune's domain for it: :func:`vipe_ray.platform.search.tune_domain`)."""

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
    #: is judged by these rather than by the resources it has now (see
    #: :func:`vipe_ray.platform.resources.cluster_limits`).
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
