"""The sweep console without Ray: known worker lines are dropped and nothing else, warnings are filtered only
where they arise, and the closing table renders what MLflow holds (extra rigs included)."""

from __future__ import annotations

import logging
import warnings

import pytest

from vipe_ray.platform.log_filters import drop_known_lines, filter_driver_records, quiet_optuna_plots
from vipe_ray.platform.sweep_summary import TrialLine, render, ui_hint


def _batch(lines: list[str], actor: str | None = None, pid: str = "123") -> dict:
    return {"ip": "127.0.0.1", "pid": pid, "job": "01", "is_err": False, "lines": lines, "actor_name": actor or ""}


def test_known_worker_lines_are_dropped_and_others_kept():
    cleaner = _batch(["Failed to query Ray Train Controller actor state. State API may be temporarily "
                      "unavailable. Continuing to monitor."], actor="PlacementGroupCleaner")
    assert drop_known_lines(cleaner) is None
    raylet = _batch(["WARNING: 18 PYTHON worker processes have been started on node: abc with address: 1.2.3.4"],
                    pid="raylet")
    assert drop_known_lines(raylet) is None
    mixed = _batch(["Setting up process group for: env:// [rank=0, world_size=1]",
                    "[rank 0] resumed from checkpoint at step 20",
                    "Traceback (most recent call last):"], actor="RayTrainWorker")
    assert drop_known_lines(mixed)["lines"] == ["[rank 0] resumed from checkpoint at step 20",
                                                "Traceback (most recent call last):"]
    # The same text from another source is not "known": filters are per source.
    other = _batch(["Failed to query Ray Train Controller actor state."], actor="MyActor")
    assert drop_known_lines(other)["lines"] == other["lines"]


def test_driver_filters_drop_only_the_listed_message(caplog):
    filter_driver_records()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    # caplog's handler on the logger itself: once Ray has started, its "ray" logger no longer propagates.
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one copy of each record, whatever Ray did to its parents
    try:
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication failed: bad token")
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate
    assert [r.getMessage() for r in caplog.records] == ["Token authentication failed: bad token"]


def test_optuna_experimental_warnings_are_quiet_only_for_the_plots():
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_optuna_plots():
            warnings.warn("optuna.visualization.matplotlib._x.plot_x is experimental", ExperimentalWarning)
            warnings.warn("optuna.samplers.NewSampler is experimental", ExperimentalWarning)
        warnings.warn("optuna.visualization.matplotlib._x.plot_x is experimental", ExperimentalWarning)
    assert [str(w.message) for w in caught] == ["optuna.samplers.NewSampler is experimental",
                                                "optuna.visualization.matplotlib._x.plot_x is experimental"]


def test_summary_table_renders_every_rig_and_marks_the_best():
    rigs, ks = ("h36m", "novel", "wide"), (1, 5)
    lines = [TrialLine("aaaa0001", "r1", "FINISHED", {"mining.kappa": 0.08, "model.embedding_dim": 16}, 40, 20, 0.1,
                       {"h36m": {1: 0.125, 5: 0.5}, "novel": {1: 0.075, 5: 0.25}, "wide": {1: None, 5: None}}),
             TrialLine("aaaa0002", "r2", "FINISHED", {"mining.kappa": 0.1184, "model.embedding_dim": 8}, 40, None, 0.05,
                       {"h36m": {1: 0.05, 5: 0.3}, "novel": {1: 0.05, 5: 0.2}, "wide": {1: 0.01, 5: 0.02}})]
    summary = {"sweep": "smoke", "tracking_uri": "sqlite:////x/mlflow.db", "experiment_id": "7",
               "best": {"trial_id": "aaaa0001", "value": 0.1, "run_id": "r1"},
               "registered_model": {"name": "vipe-ray-smoke", "version": "3"}}
    text = render(summary, lines, "val_hit@1", "max", rigs, ks)
    rows = text.splitlines()
    header = next(r for r in rows if r.startswith("trial"))
    assert header.split()[:7] == ["trial", "status", "mining.kappa", "model.embedding_dim", "steps", "kept",
                                  "val_hit@1"]
    assert "wide@5" in header
    first = next(r for r in rows if "aaaa0001" in r)
    assert first.startswith("*aaaa0001") and first.split()[2:] == ["0.08", "16", "40", "20", "10.0", "12.5",
                                                                    "50.0", "7.5", "25.0", "-", "-"]
    second = next(r for r in rows if "aaaa0002" in r)
    assert second.startswith(" aaaa0002") and second.split()[5] == "-", "no kept checkpoint: a dash"
    assert "registered model: vipe-ray-smoke version 3 (models:/vipe-ray-smoke/3)" in rows
    assert rows[-1] == ("MLflow: mlflow ui --backend-store-uri sqlite:////x/mlflow.db  then open "
                        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")


@pytest.mark.parametrize("uri, command, url", [
    ("sqlite:////a/b.db", "mlflow ui --backend-store-uri sqlite:////a/b.db", "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"),
    ("http://mlflow:5000/", "", "http://mlflow:5000/#/experiments/1/runs?workflowType=machine_learning"),
])
def test_ui_hint(uri, command, url):
    assert ui_hint(uri, "1") == (command, url)
