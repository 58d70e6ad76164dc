"""The sweep's closing summary: one table of the trials as MLflow recorded them, and where to look next.

Values come from MLflow (each trial run's metrics at the checkpoint it kept -- its best-validation one --,
the registry), not from Ray's in-memory results, so the console says exactly what the UI shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

#: Hit@k of the rig ``{rig}`` as the trials log it (``val_{rig}_hit@{k}``, ``@`` spelled ``_at_`` in MLflow).
RIG_METRIC = "val_{rig}_hit_at_{k}"
UI_WORKFLOW = "workflowType=machine_learning"


@dataclass(frozen=True)
class TrialLine:
    trial_id: str
    run_id: str | None
    status: str
    params: dict[str, Any]
    steps: int | None
    checkpoint_step: int | None
    objective: float | None
    hits: dict[str, dict[int, float | None]]  # rig -> k -> fraction


def mlflow_key(metric: str) -> str:
    return metric.replace("@", "_at_")


def collect(client, summary: dict, objective: str, rigs: tuple[str, ...], ks: tuple[int, ...]) -> list[TrialLine]:
    """One line per trial of ``summary`` (from :func:`vipe_ray.platform.tune_driver.summarize`), metrics read
    from MLflow."""
    lines = []
    for row in summary["trials"]:
        metrics: dict[str, float] = {}
        status = "FAILED" if row.get("error") else "FINISHED"
        step = None
        if row.get("run_id"):
            run = client.get_run(row["run_id"])
            metrics, status = dict(run.data.metrics), run.info.status
            if "checkpoint_step" in run.data.tags:
                step = int(run.data.tags["checkpoint_step"])
                keys = [mlflow_key(objective)] + [RIG_METRIC.format(rig=rig, k=k) for rig in rigs for k in ks]
                for key in keys:
                    at_step = [m.value for m in client.get_metric_history(row["run_id"], key) if m.step == step]
                    if at_step:
                        metrics[key] = at_step[-1]
        hits = {rig: {k: metrics.get(RIG_METRIC.format(rig=rig, k=k)) for k in ks} for rig in rigs}
        lines.append(TrialLine(str(row.get("trial_id")), row.get("run_id"), status, dict(row.get("params") or {}),
                               row.get("steps"), step, metrics.get(mlflow_key(objective)), hits))
    return lines


def ui_hint(tracking_uri: str, experiment_id: str | None) -> tuple[str, str]:
    """(command to start the UI or "" for a server, the URL of the experiment's runs)."""
    # MLflow 3.17's UI picks GenAI or model-training navigation from a per-browser switch that defaults to
    # GenAI (the experiment's kind tag does not change it); this URL parameter opens the runs table.
    page = (f"#/experiments/{experiment_id}/runs?{UI_WORKFLOW}" if experiment_id else f"#/experiments?{UI_WORKFLOW}")
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        return "", f"{tracking_uri.rstrip('/')}/{page}"
    store = tracking_uri if parsed.scheme else f"file://{tracking_uri}"
    return f"mlflow ui --backend-store-uri {store}", f"http://127.0.0.1:5000/{page}"


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(summary: dict, lines: list[TrialLine], objective: str, mode: str, rigs: tuple[str, ...],
           ks: tuple[int, ...]) -> str:
    """The summary as plain text: a table (``*`` marks the best trial), then the best trial, the registered
    model and the command that opens MLflow."""
    best = summary.get("best") or {}
    param_keys = sorted({key for line in lines for key in line.params})
    header = ["trial", "status", *param_keys, "steps", "kept", objective, *[f"{rig}@{k}" for rig in rigs for k in ks]]
    body = []
    for line in lines:
        mark = "*" if best and line.trial_id == str(best.get("trial_id")) else " "
        body.append([f"{mark}{line.trial_id}", line.status, *[_value(line.params.get(k, "-")) for k in param_keys],
                     "-" if line.steps is None else str(line.steps),
                     "-" if line.checkpoint_step is None else str(line.checkpoint_step), _pct(line.objective),
                     *[_pct(line.hits[rig][k]) for rig in rigs for k in ks]])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [cell.ljust(w) if i < 2 + len(param_keys) else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    out = [f"Sweep {summary['sweep']}: {len(lines)} trials, objective {objective} ({mode})", rule, fmt(header), rule]
    out += [fmt(row) for row in body]
    out += [rule, f"kept: step of the trial's best-{objective} checkpoint, the one it keeps; the metrics are at that step",
            f"rig@k: Hit@k in % of validation queries (Pr-VIPE, mean over the rig's camera pairs); "
            f"{objective} = mean over rigs"]
    if best:
        step = f" at step {best['step']}" if best.get("step") is not None else ""
        out.append(f"best trial: {best.get('trial_id')} ({objective} {_pct(best.get('value'))}%{step}, its best "
                   f"validation checkpoint), MLflow run {best.get('run_id')}")
    else:
        out.append("best trial: none (no trial finished with a score)")
    test = summary.get("test") or {}
    if "test/hit@1" in test:
        limb = f", one limb hidden {_pct(test['test/hit@1_1limb'])}%" if "test/hit@1_1limb" in test else ""
        out.append(f"its test subjects (never selected on): Pr-VIPE Hit@1 {_pct(test['test/hit@1'])}% over the "
                   f"evaluation rigs{limb}; every protocol is logged on the run as test/...")
    registered = summary.get("registered_model")
    if registered:
        out.append(f"registered model: {registered['name']} version {registered['version']} "
                   f"(models:/{registered['name']}/{registered['version']})")
    command, url = ui_hint(summary["tracking_uri"], summary.get("experiment_id"))
    out.append(f"MLflow: {command}  then open {url}" if command else f"MLflow: open {url}")
    return "\n".join(out)
