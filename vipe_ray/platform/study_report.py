"""The study's report: read every trial back from MLflow, aggregate over seeds, write Markdown and plots.

Every number comes from the child runs' logged scores (``test/...``, or ``validation/...`` for a recipe search;
nothing is recomputed here), so the report and MLflow agree by construction. Per variant and protocol: the mean over seeds with its 95% Student-t
interval, and the difference from the reference variant paired by seed (:mod:`vipe_ray.evaluation.stats`). A
difference whose interval excludes 0 is called better/worse; otherwise "no difference detected" -- with 3
seeds only large effects are detected, which the report says.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import mlflow
import numpy
import ray
import torch
import yaml

from vipe_ray.config import config_to_dict, lifter_recipe, load_config
from vipe_ray.evaluation.stats import Interval, mean_interval, paired_difference
from vipe_ray.platform.study_spec import variant_config
from vipe_ray.platform.sweep_spec import base_values
from vipe_ray.platform.tracking import git_commit
from vipe_ray.training.ray_train import data_info


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as MLflow holds it."""

    variant: str
    seed: int
    run_id: str
    metrics: dict[str, float]  # test/... (or validation/...) names with '@' (MLflow's '_at_' undone)
    step: int | None


def _metric_name(key: str) -> str:
    return key.replace("_at_", "@")


def collect(client, experiment_id: str, parent_id: str, prefix: str = "test/") -> list[TrialRecord]:
    """The parent run's finished trials that logged scores under ``prefix`` (a study's :attr:`prefix`)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=10000)
    records = []
    for run in runs:
        tags = run.data.tags
        metrics = {_metric_name(k): v for k, v in run.data.metrics.items() if k.startswith(prefix)}
        if "variant" not in tags or not metrics:
            continue
        step = int(tags["checkpoint_step"]) if "checkpoint_step" in tags else None
        records.append(TrialRecord(tags["variant"], int(tags["seed"]), run.info.run_id, metrics, step))
    return sorted(records, key=lambda r: (r.variant, r.seed))


def by_seed(records: list[TrialRecord], variant: str, key: str) -> dict[int, float]:
    """``{seed: value}`` of one metric of one variant (seeds that lack it are left out)."""
    return {r.seed: r.metrics[key] for r in records if r.variant == variant and key in r.metrics}


def cell(values: dict[int, float]) -> Interval | None:
    return mean_interval(list(values.values())) if values else None


def _pct(interval: Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    sign = "+" if signed else ""
    if math.isnan(interval.low):
        return f"{100 * interval.mean:{sign}.1f}"
    return f"{100 * interval.mean:{sign}.1f} [{100 * interval.low:{sign}.1f}, {100 * interval.high:{sign}.1f}]"


def verdict(diff: Interval | None) -> str:
    if diff is None or math.isnan(diff.low):
        return "-"
    if diff.low > 0:
        return "better"
    if diff.high < 0:
        return "worse"
    return "no difference detected"


def rigs_of(records: list[TrialRecord]) -> list[str]:
    """The evaluation rigs in the metrics (``{split}/{rig}/prvipe/hit@1``), in first-seen order."""
    rigs: list[str] = []
    for r in records:
        for key in r.metrics:
            parts = key.split("/")
            if len(parts) == 4 and parts[2] == "prvipe" and parts[3] == "hit@1" and parts[1] not in rigs:
                rigs.append(parts[1])
    return rigs


def patterns_of(records: list[TrialRecord], rig: str) -> list[str]:
    """Occlusion patterns of a rig (``{split}/{rig}/{pattern}/clean/prvipe/hit@1``), ``none`` first."""
    found = []
    for r in records:
        for key in r.metrics:
            parts = key.split("/")
            if len(parts) == 6 and parts[1] == rig and parts[3] == "clean" and parts[4] == "prvipe":
                if parts[2] not in found:
                    found.append(parts[2])
    return sorted(found, key=lambda p: p != "none")


def aggregate(records: list[TrialRecord], variants: list[str], reference: str) -> dict:
    """Per variant and metric: ``{"mean": Interval, "diff": Interval | None}`` for every metric any run has."""
    keys = sorted({k for r in records for k in r.metrics})
    out: dict = {}
    for variant in variants:
        out[variant] = {}
        for key in keys:
            values = by_seed(records, variant, key)
            if not values:
                continue
            ref = by_seed(records, reference, key)
            diff = paired_difference(values, ref) if variant != reference and set(values) & set(ref) else None
            out[variant][key] = {"mean": mean_interval(list(values.values())), "diff": diff}
    return out


def markdown(study, records: list[TrialRecord], table: dict, provenance: dict, plots: list[str]) -> str:
    """The report as Markdown."""
    P = study.prefix
    variants = [v for v in study.variants if v in table]
    rigs = rigs_of(records)
    ref = study.reference
    seeds = sorted({r.seed for r in records})
    lines = [f"# Study `{study.name}`", ""]
    if provenance.get("partial"):
        lines += [f"**Partial report**: {provenance['partial']}.", ""]
    counts = sorted({sum(1 for r in records if r.variant == v) for v in variants})
    per_variant = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    scored = ("was then tested once on the held-out test subjects with every protocol" if study.split == "test"
              else "was then scored on the validation subjects and rigs with every protocol (a recipe search: no "
                   "test subject was touched; the checkpoint was chosen on the same subjects, so the scores are "
                   "optimistic, by an amount that may differ between variants: they rank recipes, they do not "
                   "estimate a test score)")
    lines += [f"{len(variants)} variants, {per_variant} seeds each (of {seeds}): {len(records)} trials with "
              f"{study.split} scores. "
              f"Each trial trained on the training subjects, kept its best-validation checkpoint (validation "
              f"subjects, validation rigs) and {scored}. Cells: mean over seeds of Hit@k in %, with the 95% Student-t interval over seeds in "
              f"brackets. Differences are paired by seed against the reference variant `{ref}`; "
              f"\"better\"/\"worse\" when the difference's interval excludes 0. With {len(seeds)} seeds only "
              f"large effects can be detected: \"no difference detected\" is not \"no difference\".", ""]
    lines += [f"Scale: {provenance['scale']}.", ""]
    kappa = provenance.get("eval_kappa")
    lines += [f"Match criterion: a retrieval hits when the retrieved pose's 3D is within NP-MPJPE {kappa} of the "
              f"query's, for every variant (the `kappa` variants were *trained* with their own kappa, scored "
              f"with this one).", ""]
    # 1. Clean retrieval per rig.
    lines += ["## Cross-view retrieval, clean keypoints (Hit@1)", "",
              "| variant | " + " | ".join(rigs) + " | mean over rigs | difference from " + f"`{ref}` | |",
              "|---|" + "---|" * (len(rigs) + 3)]
    for v in variants:
        cells = [_pct(table[v].get(f"{P}{rig}/prvipe/hit@1", {}).get("mean")) for rig in rigs]
        entry = table[v].get(f"{P}hit@1", {})
        diff = entry.get("diff")
        lines.append(f"| `{v}` | " + " | ".join(cells) + f" | {_pct(entry.get('mean'))} | "
                     f"{_pct(diff, signed=True) if diff else '(reference)' if v == ref else '-'} | "
                     f"{verdict(diff) if diff else ''} |")
    for method, label in (("lift3d", "3D lifting (baseline)"), ("nn2d", "2D nearest neighbour (baseline)")):
        if f"{P}{rigs[0]}/{method}/hit@1" in table.get(ref, {}):
            cells = [_pct(table[ref].get(f"{P}{rig}/{method}/hit@1", {}).get("mean")) for rig in rigs]
            entry = table[ref].get(f"{P}{method}_hit@1", {})
            vs = paired_difference(by_seed(records, ref, f"{P}hit@1"), by_seed(records, ref, f"{P}{method}_hit@1"))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(entry.get('mean'))} | "
                         f"`{ref}` minus it: {_pct(vs, signed=True)} | {verdict(vs).replace('better', f'`{ref}` better').replace('worse', f'`{ref}` worse')} |")
    lines.append("")
    # 2. Hit@k over rigs.
    ks = sorted({int(k.split("@")[1]) for r in records for k in r.metrics
                 if k.startswith(f"{P}hit@") and "_" not in k.split("@")[1]})
    lines += ["## Hit@k, mean over rigs", "", "| variant | " + " | ".join(f"Hit@{k}" for k in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for v in variants:
        lines.append(f"| `{v}` | " + " | ".join(_pct(table[v].get(f"{P}hit@{k}", {}).get("mean")) for k in ks) + " |")
    lines.append("")
    # 3. Occlusion (clean index), mean over rigs per pattern.
    patterns = patterns_of(records, rigs[0]) if rigs else []
    if patterns:
        lines += ["## Occluded queries against a clean index (Hit@1, mean over rigs)", "",
                  "One limb = the four single limbs averaged. `none` = clean queries on the same camera ring.", "",
                  "| variant | " + " | ".join(patterns) + " | one limb, difference from " + f"`{ref}` |",
                  "|---|" + "---|" * (len(patterns) + 1)]
        for v in variants:
            cells = []
            for p in patterns:
                per_seed = _rig_mean(records, v, [f"{P}{rig}/{p}/clean/prvipe/hit@1" for rig in rigs])
                cells.append(_pct(cell(per_seed)))
            entry = table[v].get(f"{P}hit@1_1limb", {})
            diff = entry.get("diff")
            lines.append(f"| `{v}` | " + " | ".join(cells) + " | "
                         + (f"{_pct(diff, signed=True)} ({verdict(diff)})" if diff else "(reference)" if v == ref else "-")
                         + " |")
        for method, label in (("lift3d", "3D lifting"), ("nn2d", "2D-NN")):
            keys = [f"{P}{rig}/{patterns[-1]}/clean/{method}/hit@1" for rig in rigs]
            if any(k in table.get(ref, {}) for k in keys):
                cells = [_pct(cell(_rig_mean(records, ref, [f"{P}{rig}/{p}/clean/{method}/hit@1" for rig in rigs])))
                         for p in patterns]
                lines.append(f"| {label} (baseline) | " + " | ".join(cells) + " | |")
        lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    # Provenance.
    lines += ["## Provenance", "", f"- command: `{provenance['command']}`", f"- git commit: `{provenance['commit']}`",
              f"- data: `{provenance['data']}` (sha256 `{provenance['checksum']}`)",
              f"- versions: {provenance['versions']}", f"- written: {provenance['written']}",
              f"- MLflow: experiment `{provenance['experiment']}`, parent run `{provenance['parent_run_id']}`",
              "- per-variant configs: `configs.yaml` beside this report (each run adds its seed)", "",
              "| variant | seed | MLflow run | checkpoint step |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| `{r.variant}` | {r.seed} | `{r.run_id}` | {r.step if r.step is not None else '-'} |")
    return "\n".join(lines) + "\n"


def _scale(config, split: str = "test") -> str:
    """The reference variant's model and training sizes (Pr-VIPE's and the lifter's), its evaluation size, and
    how they compare with the default config's."""
    default = load_config()
    m, o, e = config.model, config.optim, config.eval
    queries = f"at most {e.max_queries}" if e.max_queries else "all"
    same = (m.width, m.blocks, m.samples, o.steps, o.batch_size) == (default.model.width, default.model.blocks,
                                                                      default.model.samples, default.optim.steps,
                                                                      default.optim.batch_size)
    note = ("the default config's scale" if same else
            f"smaller than the default config (width {default.model.width}, {default.model.blocks} blocks, "
            f"K = {default.model.samples}, {default.optim.steps} steps of {default.optim.batch_size}): numbers are "
            f"lower than the default model's and rank variants at this budget only")
    lifter = lifter_recipe(config)
    lm, lo = lifter.model, lifter.optim
    return (f"Pr-VIPE: width {m.width}, {m.blocks} blocks, K = {m.samples} samples, embedding {m.embedding_dim}, "
            f"{o.steps} steps of {o.batch_size} poses, {o.optimizer} lr {o.lr} ({o.precision}); the 3D-lifting "
            f"baseline (its `lifter` recipe): width {lm.width}, {lm.blocks} blocks, {lo.steps} steps of "
            f"{lo.batch_size} poses, {lo.optimizer} lr {lo.lr}, keypoint dropout on {lifter.keypoint_dropout.views}, "
            f"limb swap {lifter.limb_swap.prob}; {split} queries per rig: {queries} "
            f"(every {e.every} source frames) -- {note}")


def _rig_mean(records: list[TrialRecord], variant: str, keys: list[str]) -> dict[int, float]:
    """Per seed, the mean of ``keys`` (one per rig); seeds missing any key are left out."""
    per_key = [by_seed(records, variant, k) for k in keys]
    seeds = set.intersection(*(set(p) for p in per_key)) if per_key else set()
    return {s: sum(p[s] for p in per_key) / len(per_key) for s in sorted(seeds)}


def _plots(study, records: list[TrialRecord], table: dict, out: Path) -> list[str]:
    """Hit@1 per variant (clean and one limb hidden), and Hit@1 against each ``series`` key, with intervals."""
    P = study.prefix
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"): a driver has no display

    names = []
    variants = [v for v in study.variants if v in table]

    def err(intervals):
        return [[0 if math.isnan(i.low) else i.mean - i.low for i in intervals],
                [0 if math.isnan(i.high) else i.high - i.mean for i in intervals]]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(variants)), 4))
    x = range(len(variants))
    for offset, key, label in ((-0.2, f"{P}hit@1", "clean"), (0.2, f"{P}hit@1_1limb", "one limb hidden")):
        intervals = [table[v][key]["mean"] for v in variants if key in table[v]]
        if len(intervals) == len(variants):
            ax.bar([i + offset for i in x], [100 * i.mean for i in intervals], width=0.4, label=label,
                   yerr=[[100 * e for e in side] for side in err(intervals)], capsize=3)
    ax.set_xticks(list(x), variants, rotation=45, ha="right")
    ax.set_ylabel("Hit@1 (%), mean over rigs")
    ax.set_title(f"{study.name}: {study.split} Hit@1 per variant (95% interval over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hit_at_1_per_variant.png", dpi=90)
    plt.close(fig)
    names.append("hit_at_1_per_variant.png")
    for key, members in study.series.items():
        base = base_values(study)
        points = []
        for v in members:
            if f"{P}hit@1" not in table.get(v, {}):
                continue
            value = variant_config(study, base, v, study.seeds[0])
            for part in key.split("."):
                value = getattr(value, part)
            points.append((float(value), table[v][f"{P}hit@1"]["mean"]))
        if len(points) < 2:
            continue
        points.sort()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([p[0] for p in points], [100 * p[1].mean for p in points],
                    yerr=[[100 * e for e in side] for side in err([p[1] for p in points])], marker="o", capsize=3)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{study.split} Hit@1 (%), mean over rigs")
        ax.set_title(f"Hit@1 against {key} (95% interval)")
        fig.tight_layout()
        name = f"hit_at_1_vs_{key.replace('.', '_')}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def write(study, client, experiment_id: str, parent_id: str, tracking_uri: str, command: str,
          out_root: str | Path | None = None, partial: str | None = None) -> dict:
    """Collect, aggregate and write the report to ``{report_dir}/{name}/`` and the parent run's ``report/``."""
    P = study.prefix
    records = collect(client, experiment_id, parent_id, P)
    if not records:
        raise RuntimeError(f"study {study.name}: no trial of parent run {parent_id} logged {study.split} scores")
    variants = [v for v in study.variants if any(r.variant == v for r in records)]
    table = aggregate(records, variants, study.reference)
    out = Path(out_root or study.report_dir) / study.name
    out.mkdir(parents=True, exist_ok=True)
    base = base_values(study)
    reference = variant_config(study, base, study.reference, study.seeds[0])
    data = data_info(reference)
    parent_tags = client.get_run(parent_id).data.tags
    trained, writing = parent_tags.get("git_commit", "unknown"), git_commit()
    provenance = {
        "command": parent_tags.get("command", command),
        "commit": trained if trained == writing else f"{trained} (trials); report written by {writing}", "data": reference.data.table, "checksum": data["checksum"],
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
                    f"mlflow {mlflow.__version__}, numpy {numpy.__version__}",
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "experiment": study.experiment_name,
        "parent_run_id": parent_id, "eval_kappa": reference.eval.kappa, "partial": partial,
        "scale": _scale(reference, study.split),
    }
    plots = _plots(study, records, table, out)
    text = markdown(study, records, table, provenance, plots)
    (out / "report.md").write_text(text)
    configs = {v: {"overrides": study.variants[v], "config": config_to_dict(variant_config(study, base, v, 0))}
               for v in study.variants}
    (out / "configs.yaml").write_text(yaml.safe_dump(configs, sort_keys=False))
    for path in sorted(out.iterdir()):
        client.log_artifact(parent_id, str(path), artifact_path="report")
    summary = {"study": study.name, "report": str(out / "report.md"), "parent_run_id": parent_id,
               "tracking_uri": tracking_uri, "experiment_id": experiment_id, "trials": len(records),
               "table": {v: {k: {"mean": e["mean"].mean, "low": e["mean"].low, "high": e["mean"].high,
                                 **({"diff": e["diff"].mean, "diff_low": e["diff"].low, "diff_high": e["diff"].high}
                                    if e["diff"] else {})}
                             for k, e in entries.items() if k in (f"{P}hit@1", f"{P}hit@1_1limb")}
                         for v, entries in table.items()}}
    client.log_dict(parent_id, summary, "study_summary.json")
    return summary
