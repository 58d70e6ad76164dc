"""Ablation studies and recipe searches: a grid of variants x seeds, every trial scored on one split.

    python -m vipe_ray.sweep sweeps/ablation_study.yaml [--resume] [--address ADDR] [--tracking-uri URI]

A study YAML (a ``study:`` block where a sweep has ``search_space``) names a base config, overrides, the
variants (each a set of dotted config overrides; one of them the ``reference``, the full model) and the
seeds; :mod:`vipe_ray.platform.study_spec` reads and validates it. There is no sampler and no early
stopping: Ray Tune runs the full grid, each trial a Ray Train run that keeps its best-validation checkpoint.
When a trial's training ends, the trial

1. evaluates that checkpoint with the full protocol of :mod:`vipe_ray.evaluation.protocols` on the study's
   ``split``: the *test* subjects with every rig (recorded in the test ledger), or, for a recipe search
   (``split: validation``), the validation subjects with the validation rigs; every occlusion protocol,
   temporal windows for a temporal variant. A retrieval hits when the 3D NP-MPJPE is at most ``eval.kappa``
   for every variant, whatever kappa it was trained with;
2. for the reference variant with ``baselines: true``, trains the 3D-lifting baseline with the same config
   and seed (same data and views, its own recipe: the config's ``lifter`` section), keeps its
   best-validation checkpoint and evaluates it beside Pr-VIPE and 2D-NN. Steps 1-2 run in a Ray task that
   asks for one training worker's CPUs and GPUs (:func:`extras_resources`), on that task's device;
3. logs the scores (``test/...`` or ``validation/...``), the retrieval JSON, the model and its plots on its
   MLflow run.

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
from dataclasses import replace
from pathlib import Path

import mlflow
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from vipe_ray import log
from vipe_ray.config import ConfigError
from vipe_ray.platform import study_report
from vipe_ray.platform.mlflow_runs import (PARENT_RUN_FILE, MlflowReporter, child_run, finalize_trial, log_metrics,
                                           parent_run, split_metrics)
from vipe_ray.platform.resources import check_resources, trial_resources
from vipe_ray.platform.study_spec import StudyConfig, variant_config
from vipe_ray.platform.tracking import (DESCRIPTION_TAG, default_tracking_uri, ensure_experiment, git_commit,
                                        source_tags)
from vipe_ray.platform.tune_driver import latest_run_dir, launched, unfinished_trials
from vipe_ray.storage import location
from vipe_ray.training.checkpoint import load_checkpoint
from vipe_ray.training.loop import default_device, train_lifter
from vipe_ray.training.ray_train import BEST_METRIC, Scaling, data_info, fit


def run_study_trial(params: dict, settings: dict) -> None:
    """Tune function trainable: train one (variant, seed), then test its best-validation checkpoint."""
    study: StudyConfig = settings["study"]
    variant, seed = params["variant"], int(params["seed"])
    trial_id = tune.get_context().get_trial_id()
    config = variant_config(study, settings["base"], variant, seed)
    mlflow.set_tracking_uri(settings["tracking_uri"])  # log_model's fluent run, in this trial's process
    client = mlflow.MlflowClient(settings["tracking_uri"])
    run_id = child_run(client, settings["experiment_id"], settings["parent_run_id"], trial_id, study,
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
        baseline = study.baselines and variant == study.reference
        command = f"study {study.path}: {variant} seed {seed}"
        subjects = config.data.test_subjects if study.split == "test" else config.data.val_subjects
        log(f"[study] {variant} seed {seed}: {'training the 3D-lifting baseline and ' if baseline else ''}scoring "
            f"step {load_checkpoint(work).step} on the {study.split} subjects {list(subjects)}")
        start = time.perf_counter()
        if study.resources.num_workers == 0:
            # Local mode: this trial already holds the CPUs its training used; the extras run here on them.
            client.set_tag(run_id, "extras_resources", "the trial's own")
            metrics, full = trial_extras(str(work / "checkpoint.pt"), baseline, command, study.split)
        else:
            # Ray Train's workers are gone: the extras ask Ray for what one of them held, on any node.
            asked = extras_resources(study.resources)
            client.set_tag(run_id, "extras_resources", json.dumps(asked, sort_keys=True))
            # No retry: a second attempt would train and test again, and write a second ledger line. DEFAULT
            # scheduling: Tune runs this trial in a placement group that captures its child tasks, and the
            # trial's bundle holds only the driver's sliver of a CPU, where this task would wait forever.
            task = ray.remote(remote_trial_extras).options(**asked, max_retries=0, scheduling_strategy="DEFAULT")
            metrics, full = ray.get(task.remote((work / "checkpoint.pt").read_bytes(), baseline, command,
                                                study.split))
        log_metrics(client, run_id, metrics)
        # A validation study's name differs from the selection result finalize_trial logs (validation_retrieval.json).
        client.log_dict(run_id, full, "test_retrieval.json" if study.split == "test" else "study_validation_retrieval.json")
        client.set_tag(run_id, f"{study.split}_seconds", f"{time.perf_counter() - start:.0f}")
        finalize_trial(client, run_id, str(work / "checkpoint.pt"), "FINISHED", study.validation_queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def extras_resources(resources: Scaling) -> dict[str, float]:
    """What a trial's work besides Ray Train (the lifting baseline, the test evaluation) asks Ray for: the
    CPUs and GPUs of one of its training workers."""
    return {"num_cpus": resources.cpus_per_worker, "num_gpus": resources.gpus}


def trial_extras(checkpoint: str, baseline: bool, command: str, split: str = "test") -> tuple[dict, dict]:
    """Train the lifting baseline beside a trial's best Pr-VIPE ``checkpoint`` (with ``baseline``; on this
    process's device, keeping its best-validation checkpoint) and score both on ``split``; returns (metrics,
    the full result). A test evaluation is recorded in this node's test ledger under ``command``."""
    lifter = None
    if baseline:
        config = load_checkpoint(checkpoint).config
        # Validated at every checkpoint: the baseline is tested at its best, as Pr-VIPE is.
        config = replace(config, val_every=config.val_every or config.checkpoint_every)
        work = Path(checkpoint).parent
        train_lifter(config, work, progress=lambda _m: None, device=default_device())
        lifter = load_checkpoint(work, kind="lifter").model
    return split_metrics(checkpoint, split, lifter, with_result=True, command=command)


def remote_trial_extras(checkpoint: bytes, baseline: bool, command: str, split: str = "test") -> tuple[dict, dict]:
    """:func:`trial_extras` in a Ray task holding :func:`extras_resources`: torch uses its CPUs (and the GPU Ray
    gave it, where it asked for one)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    torch.set_num_threads(max(1, int(cpus or 1)))
    work = Path(tempfile.mkdtemp(prefix="vipe-study-extras-"))
    try:
        (work / "checkpoint.pt").write_bytes(checkpoint)
        return trial_extras(str(work / "checkpoint.pt"), baseline, command, split)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_study(study: StudyConfig, tracking_uri: str | None = None, storage: str | Path = "ray_results",
                 command: str | None = None) -> dict:
    """(Re)write the report of the latest run of ``study`` from MLflow alone -- no Ray, no training. A run
    whose grid is not complete gets a report marked partial."""
    run_dir = latest_run_dir(location(storage), study.name)
    if run_dir is None or not (run_dir / PARENT_RUN_FILE).exists():
        raise ConfigError(f"--report: no run of study {study.name!r} under {storage}")
    parent_id = (run_dir / PARENT_RUN_FILE).read_text().strip()
    tracking_uri = tracking_uri or default_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    done = len(study_report.collect(client, experiment_id, parent_id, study.prefix))
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
    with launched(study, resume, address, tracking_uri, storage, command, cluster_max) as run:
        cluster = ray.cluster_resources()
        concurrency = check_resources(study, cluster, run.limits)
        capacity = {**cluster, **{k: max(v, cluster.get(k, 0.0)) for k, v in run.limits.items()}}
        mlflow.set_tracking_uri(run.tracking_uri)
        client = mlflow.MlflowClient(run.tracking_uri)
        experiment_id = ensure_experiment(client, study.experiment_name, run.tracking_uri)
        commit, trials = git_commit(), study.trials()
        data = variant_config(study, run.base, study.reference, study.seeds[0]).data
        scored = list(data.test_subjects if study.split == "test" else data.val_subjects)
        parent_id, created = parent_run(client, experiment_id, run.run_dir, resume, {
            "study": study.name, "sweep_file": study.path, "git_commit": commit, "data_checksum": run.checksum,
            **source_tags(study.path, run.command, commit),
            DESCRIPTION_TAG: (f"Study `{study.name}`: {len(study.variants)} variants x {len(study.seeds)} seeds = "
                              f"{len(trials)} trials, each scored on the {study.split} subjects {scored}; report under "
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
        if grid.num_terminated + grid.num_errors < total or unfinished_trials(run.run_dir):
            client.update_run(parent_id, status="KILLED")
            resume_with = f"python -m vipe_ray.sweep {study.path} --resume"
            log(f"[study] interrupted with {grid.num_terminated} of {total} trials finished; continue with: "
                f"{resume_with}")
            summary = {"study": study.name, "interrupted": True, "run_dir": run.run_dir.uri, "parent_run_id": parent_id}
            if study_report.collect(client, experiment_id, parent_id, study.prefix):  # what is done is worth reading
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
