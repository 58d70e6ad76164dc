"""Ablation studies: a grid of variants x seeds, every trial tested on the held-out subjects.

    python -m vipe_ray.sweep sweeps/ablation_study.yaml [--resume] [--address ADDR] [--tracking-uri URI]

A study YAML (a ``study:`` block where a sweep has ``search_space``) names a base config, overrides, the
variants (each a set of dotted config overrides; one of them the ``reference``, the full model) and the
seeds. There is no sampler and no early stopping: Ray Tune runs the full grid, each trial a Ray Train run
that keeps its best-validation checkpoint. When a trial's training ends, the trial

1. evaluates that checkpoint with the full protocol of :mod:`vipe_ray.evaluation.protocols` on the *test* subjects
   (every rig, every occlusion protocol; temporal windows for a temporal variant) -- a retrieval hits when
   the 3D NP-MPJPE is at most ``eval.kappa`` for every variant, whatever kappa it was trained with;
2. for the reference variant with ``baselines: true``, trains the 3D-lifting baseline with the same config
   and seed (same data, views, dropout and steps) and evaluates it beside Pr-VIPE and 2D-NN;
3. logs the test metrics (``test/...``), the retrieval JSON, the model and its plots on its MLflow run.

After the grid, :mod:`vipe_ray.platform.study_report` reads the runs back from MLflow, aggregates per variant and
protocol (mean and 95% interval over seeds, the paired difference from the reference) and writes the
Markdown report with its plots to ``reports/<name>/``, and logs it on the parent run. ``--resume``
continues an interrupted study: Tune reruns only the unfinished trials.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vipe_ray import log
from vipe_ray.config import ConfigError, TrainConfig, build_dataclass
from vipe_ray.training.ray_train import BEST_METRIC, Scaling
from vipe_ray.storage import location
from vipe_ray.sweep import (PARENT_RUN_FILE, MlflowReporter, _child_run, _latest_run_dir, _unfinished,
                            base_values, check_resources, finalize_trial, launched, log_metrics, parent_run,
                            parse_resources, read_mapping, trial_config, trial_resources)

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
    def objective(self):  # what the sweep machinery ranks checkpoints by
        from vipe_ray.sweep import Objective

        return Objective(BEST_METRIC, "max")

    def trials(self) -> list[tuple[str, int]]:
        """The grid in the order Tune runs it: every variant for seed 0, then seed 1, ..."""
        return [(variant, seed) for seed in self.seeds for variant in self.variants]


_STUDY_KEYS = {"variants", "reference", "seeds", "baselines", "series"}
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
    simple.update({k: block[k] for k in ("reference", "baselines") if k in block})
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
    if study.concurrency < 1:
        raise ConfigError(f"{where}: concurrency: {study.concurrency} must be >= 1")
    if study.validation_queries < 0:
        raise ConfigError(f"{where}: validation_queries: {study.validation_queries} must be >= 0 (0: all)")
    base = base_values(study)
    for variant in study.variants:
        config = variant_config(study, base, variant, study.seeds[0])
        if not config.data.val_subjects or not config.data.test_subjects:
            raise ConfigError(f"{where}: study.variants.{variant}: a study needs data.val_subjects (to pick each "
                              f"trial's checkpoint) and data.test_subjects (to test it)")
    return study


def variant_config(study: StudyConfig, base: dict, variant: str, seed: int) -> TrainConfig:
    """The training config of one trial: base + overrides, the variant's dotted overrides, the seed."""
    from vipe_ray.config import merge
    from vipe_ray.sweep import nested

    values = merge(base, nested(study.variants[variant]))
    values["seed"] = seed
    try:
        return trial_config(values, {}, f"{study.path}: study.variants.{variant}")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def run_study_trial(params: dict, settings: dict) -> None:
    """Tune function trainable: train one (variant, seed), then test its best-validation checkpoint."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vipe_ray.training.ray_train import data_info, fit
    from vipe_ray.sweep import test_metrics
    from vipe_ray.training.loop import load_checkpoint, train_lifter

    study: StudyConfig = settings["study"]
    variant, seed = params["variant"], int(params["seed"])
    trial_id = ray.tune.get_context().get_trial_id()
    config = variant_config(study, settings["base"], variant, seed)
    mlflow.set_tracking_uri(settings["tracking_uri"])  # log_model's fluent run, in this trial's process
    client = mlflow.MlflowClient(settings["tracking_uri"])
    run_id = _child_run(client, settings["experiment_id"], settings["parent_run_id"], trial_id, study,
                        {"variant": variant, "seed": seed}, config, data_info(config)["checksum"])
    client.set_tag(run_id, "variant", variant)
    client.set_tag(run_id, "seed", str(seed))
    client.set_tag(run_id, "mlflow.runName", f"{variant}-seed{seed}")
    result = fit(config, study.resources, name=f"train-{variant}-seed{seed}", storage_path=settings["storage"],
                 max_failures=study.max_failures, callbacks=[TuneReportCallback()],
                 extra={"on_report": MlflowReporter(settings["tracking_uri"], run_id),
                        "val_queries": study.validation_queries}, score=(BEST_METRIC, "max"))
    best = result.get_best_checkpoint(BEST_METRIC, "max") or result.checkpoint
    work = Path(tempfile.mkdtemp(prefix=f"vipe-study-{variant}-"))
    try:
        with best.as_directory() as directory:
            shutil.copy(Path(directory) / "checkpoint.pt", work / "checkpoint.pt")
        lifter = None
        if study.baselines and variant == study.reference:
            log(f"[study] {variant} seed {seed}: training the 3D-lifting baseline ({config.optim.steps} steps)")
            train_lifter(config, work, progress=lambda _m: None)
            lifter = load_checkpoint(work, kind="lifter").model
        log(f"[study] {variant} seed {seed}: testing step {load_checkpoint(work).step} on subjects "
            f"{list(config.data.test_subjects)}")
        start = time.perf_counter()
        metrics, full = test_metrics(str(work / "checkpoint.pt"), lifter, with_result=True,
                                     command=f"study {study.path}: {variant} seed {seed}")
        log_metrics(client, run_id, metrics)
        client.log_dict(run_id, full, "test_retrieval.json")
        client.set_tag(run_id, "test_seconds", f"{time.perf_counter() - start:.0f}")
        finalize_trial(client, run_id, str(work / "checkpoint.pt"), "FINISHED", study.validation_queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_study(study: StudyConfig, tracking_uri: str | None = None, storage: str | Path = "ray_results",
                 command: str | None = None) -> dict:
    """(Re)write the report of the latest run of ``study`` from MLflow alone -- no Ray, no training. A run
    whose grid is not complete gets a report marked partial."""
    import mlflow

    from vipe_ray.platform import study_report
    from vipe_ray.platform.tracking import default_tracking_uri

    run_dir = _latest_run_dir(location(storage), study.name)
    if run_dir is None or not (run_dir / PARENT_RUN_FILE).exists():
        raise ConfigError(f"--report: no run of study {study.name!r} under {storage}")
    parent_id = (run_dir / PARENT_RUN_FILE).read_text().strip()
    tracking_uri = tracking_uri or default_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    done = len(study_report.collect(client, experiment_id, parent_id))
    total = len(study.trials())
    partial = None if done >= total else (f"{done} of {total} trials had finished when this report was written; "
                                          f"`python -m vipe_ray.sweep {study.path} --resume` runs the rest")
    return study_report.write(study, client, experiment_id, parent_id, tracking_uri,
                              command=command or f"python -m vipe_ray.sweep {study.path}", partial=partial)


def run_study(study: StudyConfig, resume: bool = False, address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path = "ray_results", command: str | None = None,
              cluster_max: dict[str, float] | None = None) -> dict:
    """Run (or resume) a study end to end; returns the report's summary (see :mod:`vipe_ray.platform.study_report`).
    ``storage``: a folder or an object-store URI, as for a sweep."""
    import mlflow
    import ray
    from ray import tune

    from vipe_ray.platform import study_report
    from vipe_ray.platform.tracking import DESCRIPTION_TAG, ensure_experiment, git_commit, source_tags

    with launched(study, resume, address, tracking_uri, storage, command, cluster_max) as run:
        cluster = ray.cluster_resources()
        concurrency = check_resources(study, cluster, run.limits)
        capacity = {**cluster, **{k: max(v, cluster.get(k, 0.0)) for k, v in run.limits.items()}}
        mlflow.set_tracking_uri(run.tracking_uri)
        client = mlflow.MlflowClient(run.tracking_uri)
        experiment_id = ensure_experiment(client, study.experiment_name, run.tracking_uri)
        commit, trials = git_commit(), study.trials()
        test_subjects = list(variant_config(study, run.base, study.reference, study.seeds[0]).data.test_subjects)
        parent_id, created = parent_run(client, experiment_id, run, resume, {
            "study": study.name, "sweep_file": study.path, "git_commit": commit, "data_checksum": run.checksum,
            **source_tags(study.path, run.command, commit),
            DESCRIPTION_TAG: (f"Study `{study.name}`: {len(study.variants)} variants x {len(study.seeds)} seeds = "
                              f"{len(trials)} trials, each tested on subjects {test_subjects}; report under "
                              f"`report/`. Started with `{run.command}`.")}, "study")
        if created:
            if Path(study.path).is_file():
                client.log_artifact(parent_id, study.path, artifact_path="study")
            client.log_dict(parent_id, {"variants": study.variants, "seeds": list(study.seeds),
                                        "reference": study.reference}, "study.json")
            log(f"[study] {study.name}: {len(study.variants)} variants x {len(study.seeds)} seeds = {len(trials)} "
                f"trials, concurrency {concurrency}; Ray results {run.run_dir}; MLflow {run.tracking_uri} "
                f"experiment {study.experiment_name!r} run {parent_id}")
        settings = {"study": study, "base": run.base, "tracking_uri": run.tracking_uri,
                    "experiment_id": experiment_id, "parent_run_id": parent_id, "storage": (run.run_dir / "train").uri}
        trainable = tune.with_resources(tune.with_parameters(run_study_trial, settings=settings),
                                        trial_resources(study, capacity))
        storage_args = run.results.ray_storage()
        if resume:
            tuner = tune.Tuner.restore(run.run_dir.path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_args["storage_filesystem"])
        else:
            tuner = tune.Tuner(
                trainable,
                # Tune varies the first key fastest: every variant of seed 0 first, so a study stopped part-way
                # has whole seeds of every variant rather than whole variants.
                param_space={"variant": tune.grid_search(list(study.variants)),
                             "seed": tune.grid_search(list(study.seeds))},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=run.run_dir.name, verbose=1, **storage_args),
            )
        grid = tuner.fit()
        total = len(trials)
        if grid.num_terminated + grid.num_errors < total or _unfinished(run.run_dir):
            client.update_run(parent_id, status="KILLED")
            resume_with = f"python -m vipe_ray.sweep {study.path} --resume"
            log(f"[study] interrupted with {grid.num_terminated} of {total} trials finished; continue with: "
                f"{resume_with}")
            summary = {"study": study.name, "interrupted": True, "run_dir": run.run_dir.uri, "parent_run_id": parent_id}
            if study_report.collect(client, experiment_id, parent_id):  # what is done is worth reading
                summary.update(study_report.write(study, client, experiment_id, parent_id, run.tracking_uri,
                                                  command=run.command, partial=(
                                                      f"the study was interrupted; `{resume_with}` runs the rest "
                                                      f"and rewrites this report")))
                summary["interrupted"] = True
                log(f"[study] partial report: {summary['report']}")
            return summary
        summary = study_report.write(study, client, experiment_id, parent_id, run.tracking_uri, command=run.command)
        client.set_terminated(parent_id, "FINISHED" if not grid.num_errors else "FAILED")
        (run.run_dir / "study_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
