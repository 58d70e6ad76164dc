"""The ablation study YAML: :class:`StudyConfig` (variants x seeds), :func:`load_study` that reads and fully
validates one, and :func:`variant_config`, the training config of one (variant, seed).

A study YAML (a ``study:`` block where a sweep has ``search_space``) names a base config, overrides, the
variants (each a set of dotted config overrides; one of them the ``reference``, the full model) and the
seeds. How a study runs: :mod:`vipe_ray.platform.study`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vipe_ray.config import ConfigError, TrainConfig, build_dataclass, merge
from vipe_ray.platform.mlflow_runs import SPLITS
from vipe_ray.platform.sweep_spec import Objective, base_values, nested, parse_resources, read_mapping, trial_config
from vipe_ray.training.ray_train import BEST_METRIC, Scaling

#: Keys whose variants the report plots Hit@1 against (``series`` in the YAML).
SERIES_KEYS = ("mining.kappa", "mining.hard_negative_ratio", "model.embedding_dim", "loss.a_init", "loss.b_init",
               "keypoint_dropout.instance_prob")


@dataclass(frozen=True)
class StudyConfig:
    """One study: ``variants`` (name -> dotted overrides) x ``seeds``."""

    name: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    base_config: str | None = None
    overrides: dict = field(default_factory=dict)
    #: Train the 3D-lifting baseline beside every seed of the reference variant.
    baselines: bool = True
    #: Where each trial is scored: ``test`` (the held-out subjects, recorded in the test ledger) or
    #: ``validation`` (the validation subjects and rigs: a recipe search, which never touches the test split).
    split: str = "test"
    #: Hit@1 against a config value: {dotted key: [variant, ...]} (the x values come from each variant).
    series: dict[str, tuple[str, ...]] = field(default_factory=dict)
    concurrency: int = 2
    resources: Scaling = field(default_factory=Scaling)
    #: What an autoscaling cluster can grow to (as for a sweep).
    cluster_max: dict[str, float] = field(default_factory=dict)
    max_failures: int = 1
    validation_queries: int = 0
    experiment: str | None = None
    #: Where the report goes (a folder per study inside it), relative to the working directory.
    report_dir: str = "reports"
    path: str = "<dict>"

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"vipe-ray-{self.name}"

    @property
    def prefix(self) -> str:
        """The MLflow metric prefix of the trials' scores: ``test/`` or ``validation/``."""
        return f"{self.split}/"

    @property
    def objective(self) -> Objective:  # what the sweep machinery ranks checkpoints by
        return Objective(BEST_METRIC, "max")

    def trials(self) -> list[tuple[str, int]]:
        """The grid in the order Tune runs it: every variant for seed 0, then seed 1, ..."""
        return [(variant, seed) for seed in self.seeds for variant in self.variants]


_STUDY_KEYS = {"variants", "reference", "seeds", "baselines", "series", "split"}
_TOP_KEYS = {"name", "base_config", "overrides", "study", "concurrency", "resources", "cluster_max", "max_failures",
             "validation_queries", "experiment", "report_dir"}


def is_study(path: str | Path) -> bool:
    """Does this YAML describe a study (a ``study:`` block) rather than a search?"""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_sweep reports the problem with the file and key
    return isinstance(raw, dict) and "study" in raw


def load_study(path: str | Path) -> StudyConfig:
    """Read and fully validate a study YAML: every variant x seed must build a valid training config."""
    where = str(path)
    raw = read_mapping(path, "study", _TOP_KEYS)
    if "name" not in raw:
        raise ConfigError(f"{where}: name: required")
    block = raw.get("study")
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: study: expected a mapping with variants and seeds, got {block!r}")
    unknown = sorted(set(block) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: study.{unknown[0]}: unknown key (known: {sorted(_STUDY_KEYS)})")
    variants = block.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: study.variants: a non-empty mapping of name -> dotted overrides, got {variants!r}")
    for name, overrides in variants.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"{where}: study.variants: name {name!r} must be letters, digits, '_', '-' or '.'")
        if overrides is None:
            variants[name] = {}
        elif not isinstance(overrides, dict):
            raise ConfigError(f"{where}: study.variants.{name}: expected a mapping of dotted keys, got {overrides!r}")
    seeds = block.get("seeds", [0, 1, 2])
    if (not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where}: study.seeds: a list of distinct integers, got {seeds!r}")
    series = block.get("series") or {}
    if not isinstance(series, dict):
        raise ConfigError(f"{where}: study.series: a mapping of dotted key -> [variant, ...], got {series!r}")
    for key, names in series.items():
        if key not in SERIES_KEYS:
            raise ConfigError(f"{where}: study.series.{key}: not a plottable key {list(SERIES_KEYS)}")
        if not isinstance(names, list) or len(names) < 2:
            raise ConfigError(f"{where}: study.series.{key}: at least two variant names, got {names!r}")
        missing = [n for n in names if n not in variants]
        if missing:
            raise ConfigError(f"{where}: study.series.{key}: {missing[0]!r} is not a variant")
    simple = {k: v for k, v in raw.items() if k not in ("study", "overrides", "cluster_max")}
    simple.update({k: block[k] for k in ("reference", "baselines", "split") if k in block})
    try:
        study = build_dataclass(StudyConfig, simple)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping, got {overrides!r}")
    study = replace(study, variants=dict(variants), seeds=tuple(seeds), overrides=overrides, path=where,
                    series={k: tuple(v) for k, v in series.items()},
                    cluster_max=parse_resources(raw.get("cluster_max"), f"{where}: cluster_max"))
    if study.reference not in study.variants:
        raise ConfigError(f"{where}: study.reference: {study.reference!r} is not one of the variants "
                          f"{sorted(study.variants)}")
    if study.split not in SPLITS:
        raise ConfigError(f"{where}: study.split: {study.split!r} is not one of {list(SPLITS)}")
    if study.concurrency < 1:
        raise ConfigError(f"{where}: concurrency: {study.concurrency} must be >= 1")
    if study.validation_queries < 0:
        raise ConfigError(f"{where}: validation_queries: {study.validation_queries} must be >= 0 (0: all)")
    base = base_values(study)
    for variant in study.variants:
        config = variant_config(study, base, variant, study.seeds[0])
        if not config.data.val_subjects or (study.split == "test" and not config.data.test_subjects):
            raise ConfigError(f"{where}: study.variants.{variant}: a study needs data.val_subjects (to pick each "
                              f"trial's checkpoint) and, with split test, data.test_subjects (to test it)")
    return study


def variant_config(study: StudyConfig, base: dict, variant: str, seed: int) -> TrainConfig:
    """The training config of one trial: base + overrides, the variant's dotted overrides, the seed."""
    values = merge(base, nested(study.variants[variant]))
    values["seed"] = seed
    try:
        return trial_config(values, {}, f"{study.path}: study.variants.{variant}")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None

