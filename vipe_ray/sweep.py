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

This module is the command line; the work is in :mod:`vipe_ray.platform`: the sweep YAML in
:mod:`~vipe_ray.platform.sweep_spec`, Optuna and ASHA in :mod:`~vipe_ray.platform.search`, the cluster's
resources in :mod:`~vipe_ray.platform.resources`, the MLflow runs in :mod:`~vipe_ray.platform.mlflow_runs`
and the Ray Tune driver in :mod:`~vipe_ray.platform.tune_driver`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# MLflow starts its telemetry client when it is imported (by the modules below): a sweep has it off unless the
# environment says otherwise, as launched() does for Ray's usage stats.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from vipe_ray import log  # noqa: E402
from vipe_ray.config import ConfigError  # noqa: E402
from vipe_ray.platform import sweep_summary  # noqa: E402
from vipe_ray.platform.study import report_study, run_study  # noqa: E402
from vipe_ray.platform.study_spec import is_study, load_study  # noqa: E402
from vipe_ray.platform.sweep_spec import (SweepConfig, base_values, load_sweep, parse_resources,  # noqa: E402
                                          trial_config)
from vipe_ray.platform.tune_driver import run_sweep  # noqa: E402
# Tune state saved before the platform modules (a sweep to --resume) names these here.
from vipe_ray.platform.sweep_spec import Objective, Param, Scheduler  # noqa: E402,F401
from vipe_ray.platform.tune_driver import TrialFinisher, run_trial  # noqa: E402,F401


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report and args.resume:
        parser.error("--report and --resume: choose one")
    command = shlex.join(["python", "-m", "vipe_ray.sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        if is_study(args.sweep):
            study = load_study(args.sweep)
            if args.report:
                summary = report_study(study, args.tracking_uri, args.storage)
                log(f"[study] report: {summary['report']}")
                return 0
            summary = run_study(study, args.resume, args.address, args.tracking_uri, args.storage, command=command,
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
    evaluation = trial_config(base_values(sweep), {}).eval
    client = mlflow.MlflowClient(summary["tracking_uri"])
    metric, mode = sweep.objective.metric, sweep.objective.mode
    lines = sweep_summary.collect(client, summary, metric, evaluation.val_rigs, evaluation.ks)
    return sweep_summary.render(summary, lines, metric, mode, evaluation.val_rigs, evaluation.ks)


if __name__ == "__main__":
    sys.exit(main())
