"""Ablation studies: a grid of variants x seeds, every trial tested on the held-out subjects.

    python -m vipe_ray.sweep sweeps/ablation_study.yaml [--resume] [--address ADDR] [--tracking-uri URI]

A study YAML (a ``study:`` block where a sweep has ``search_space``) names a base config, overrides, the
variants (each a set of dotted config overrides; one of them the ``reference``, the full model) and the
seeds. There is no sampler and no early stopping: Ray Tune runs the full grid, each trial a Ray Train run
that keeps its best-validation checkpoint. When a trial's training ends, the trial

1. evaluates that checkpoint with the full protocol of :mod:`vipe_ray.evaluate` on the *test* subjects
   (every rig, every occlusion protocol; temporal windows for a temporal variant) -- a retrieval hits when
   the 3D NP-MPJPE is at most ``eval.kappa`` for every variant, whatever kappa it was trained with;
2. for the reference variant with ``baselines: true``, trains the 3D-lifting baseline with the same config
   and seed (same data, views, dropout and steps) and evaluates it beside Pr-VIPE and 2D-NN;
3. logs the test metrics (``test/...``), the retrieval JSON, the model and its plots on its MLflow run.

After the grid, :mod:`vipe_ray.study_report` reads the runs back from MLflow, aggregates per variant and
protocol (mean and 95% interval over seeds, the paired difference from the reference) and writes the
Markdown report with its plots to ``reports/<name>/``, and logs it on the parent run. ``--resume``
continues an interrupted study: Tune reruns only the unfinished trials.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vipe_ray import REPO_ROOT, log
from vipe_ray.config import ConfigError, TrainConfig, _build
from vipe_ray.distributed import BEST_METRIC, Scaling
from vipe_ray.sweep import (PARENT_RUN_FILE, MlflowReporter, _child_run, _latest_run_dir, _mlflow_metrics,
                            base_values, check_resources, finalize_trial, trial_config)

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
_TOP_KEYS = {"name", "base_config", "overrides", "study", "concurrency", "resources", "max_failures",
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
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read study ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key for a study (known: {sorted(_TOP_KEYS)})")
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
    simple = {k: v for k, v in raw.items() if k not in ("study", "overrides")}
    simple.update({k: block[k] for k in ("reference", "baselines") if k in block})
    try:
        study = _build(StudyConfig, simple)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping, got {overrides!r}")
    study = replace(study, variants=dict(variants), seeds=tuple(seeds), overrides=overrides, path=where,
                    series={k: tuple(v) for k, v in series.items()})
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

    from vipe_ray.distributed import data_info, fit
    from vipe_ray.sweep import test_metrics
    from vipe_ray.train import load_checkpoint, train_lifter

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
        metrics, full = test_metrics(str(work / "checkpoint.pt"), lifter, with_result=True)
        client.log_batch(run_id, metrics=_mlflow_metrics(metrics))
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

    from vipe_ray import study_report
    from vipe_ray.tracking import default_tracking_uri

    run_dir = _latest_run_dir(Path(storage).expanduser().resolve(), study.name)
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
              storage: str | Path = "ray_results", command: str | None = None) -> dict:
    """Run (or resume) a study end to end; returns the report's summary (see :mod:`vipe_ray.study_report`)."""
    import mlflow
    import ray
    from ray import tune

    from vipe_ray import study_report
    from vipe_ray.console import filter_driver_records, filter_worker_logs
    from vipe_ray.distributed import data_info
    from vipe_ray.tracking import DESCRIPTION_TAG, default_tracking_uri, ensure_experiment, git_commit, source_tags

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = base_values(study)
    storage = Path(storage).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if resume:
        run_dir = _latest_run_dir(storage, study.name)
        if run_dir is None or not tune.Tuner.can_restore(str(run_dir)):
            raise ConfigError(f"--resume: no restorable study named {study.name!r} under {storage}")
    else:
        run_dir = storage / f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = tracking_uri or default_tracking_uri()
    command = command or f"python -m vipe_ray.sweep {study.path}"
    filter_driver_records()
    started_ray = not ray.is_initialized()
    if started_ray and (address or os.environ.get("RAY_ADDRESS")):
        ray.init(address=address)
    elif started_ray:
        ray.init(include_dashboard=False)
    filter_worker_logs()
    try:
        concurrency = check_resources(study, ray.cluster_resources())
        mlflow.set_tracking_uri(tracking_uri)
        client = mlflow.MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, study.experiment_name, tracking_uri)
        parent_file = run_dir / PARENT_RUN_FILE
        if resume and parent_file.exists():
            parent_id = parent_file.read_text().strip()
            client.update_run(parent_id, status="RUNNING")
            log(f"[study] resuming {run_dir} (MLflow parent run {parent_id})")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            commit = git_commit()
            config = variant_config(study, base, study.reference, study.seeds[0])
            trials = study.trials()
            parent = client.create_run(experiment_id, run_name=run_dir.name, tags={
                "study": study.name, "sweep_file": study.path, "git_commit": commit,
                "data_checksum": data_info(config)["checksum"], **source_tags(study.path, command, commit),
                DESCRIPTION_TAG: (f"Study `{study.name}`: {len(study.variants)} variants x {len(study.seeds)} seeds "
                                  f"= {len(trials)} trials, each tested on subjects "
                                  f"{list(config.data.test_subjects)}; report under `report/`. "
                                  f"Started with `{command}`.")})
            parent_id = parent.info.run_id
            parent_file.write_text(parent_id)
            if Path(study.path).is_file():
                client.log_artifact(parent_id, study.path, artifact_path="study")
            client.log_dict(parent_id, {"variants": study.variants, "seeds": list(study.seeds),
                                        "reference": study.reference}, "study.json")
            log(f"[study] {study.name}: {len(study.variants)} variants x {len(study.seeds)} seeds = {len(trials)} "
                f"trials, concurrency {concurrency}; Ray results {run_dir}; MLflow {tracking_uri} experiment "
                f"{study.experiment_name!r} run {parent_id}")
        settings = {"study": study, "base": base, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
                    "parent_run_id": parent_id, "storage": str(run_dir / "train")}
        trial_cpus = study.resources.cpus_per_worker if study.resources.num_workers == 0 else 0.01
        trainable = tune.with_resources(tune.with_parameters(run_study_trial, settings=settings), {"cpu": trial_cpus})
        if resume:
            tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                # Tune varies the first key fastest: every variant of seed 0 first, so a study stopped part-way
                # has whole seeds of every variant rather than whole variants.
                param_space={"variant": tune.grid_search(list(study.variants)),
                             "seed": tune.grid_search(list(study.seeds))},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=run_dir.name, storage_path=str(storage), verbose=1),
            )
        grid = tuner.fit()
        total = len(study.trials())
        if grid.num_terminated + grid.num_errors < total:
            client.update_run(parent_id, status="KILLED")
            resume_with = f"python -m vipe_ray.sweep {study.path} --resume"
            log(f"[study] interrupted with {grid.num_terminated} of {total} trials finished; continue with: "
                f"{resume_with}")
            summary = {"study": study.name, "interrupted": True, "run_dir": str(run_dir), "parent_run_id": parent_id}
            if grid.num_terminated:  # what is done is worth reading: a report marked partial
                summary.update(study_report.write(study, client, experiment_id, parent_id, tracking_uri,
                                                  command=command, partial=f"{grid.num_terminated} of {total} "
                                                  f"trials finished when the study was interrupted; `{resume_with}` "
                                                  f"runs the rest and rewrites this report"))
                log(f"[study] partial report: {summary['report']}")
            return summary
        summary = study_report.write(study, client, experiment_id, parent_id, tracking_uri, command=command)
        client.set_terminated(parent_id, "FINISHED" if not grid.num_errors else "FAILED")
        (run_dir / "study_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        if started_ray:
            ray.shutdown()
