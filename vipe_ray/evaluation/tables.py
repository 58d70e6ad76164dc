"""Evaluation results as text: the console tables, Markdown, JSON, and the flat metrics MLflow logs."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from vipe_ray.evaluation.protocols import INDEX_MODES, METHODS


def format_table(result: dict, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Plain-text tables: Hit@k (percent) per rig and method, then Hit@1 per occlusion protocol."""
    width = max([7] + [len(r) for r in result["rigs"]])
    header = f"{'rig':<{width}} {'method':<12}" + "".join(f"{'Hit@' + str(k):>9}" for k in ks)
    lines = [header, "-" * len(header)]
    for rig, methods in result["rigs"].items():
        for method in METHODS:
            if method in methods:
                cells = "".join(f"{100 * methods[method][f'hit@{k}']:>9.1f}" for k in ks)
                lines.append(f"{rig:<{width}} {method:<12}{cells}")
    differences = _paired_rows(result, ks)
    if differences:
        lines += ["", "paired differences (points, +- standard error over queries)"]
        lines += [f"{rig:<{width}} {name:<20} " + "  ".join(cells) for rig, name, cells in differences]
    legend, per_method, exclusive = _miss_tables(result)
    if per_method:
        lines += [""] + textwrap.wrap(legend, 110)
        for rows, columns in ((per_method, MISS_COLUMNS), (exclusive, EXCLUSIVE_COLUMNS)):
            names = max([len("method")] + [len(name) for _, name, _ in rows])
            header = f"{'rig':<{width}} {'method':<{names}}" + "".join(f"{h:>15}" for h in columns)
            lines += ["", header, "-" * len(header)]
            lines += [f"{rig:<{width}} {name:<{names}}" + "".join(f"{c:>15}" for c in cells)
                      for rig, name, cells in rows]
    occlusion = result.get("occlusion") or {}
    if any(occlusion.values()):
        methods = [m for m in METHODS if m in next(iter(result["rigs"].values()))]
        header = (f"{'rig':<{width}} {'occlusion (Hit@1)':<24} {'index':<9}" + "".join(f"{m:>12}" for m in methods)
                  + f"{'no embedding':>14}")
        lines += ["", header, "-" * len(header)]
        for rig, patterns in occlusion.items():
            for pattern, modes in patterns.items():
                lost = result.get("invalid", {}).get(rig, {}).get(pattern, 0.0)
                for mode, per_method in modes.items():
                    cells = "".join(f"{100 * per_method[m]['hit@1']:>12.1f}" for m in methods)
                    lines.append(f"{rig:<{width}} {pattern:<24} {mode:<9}{cells}{100 * lost:>13.1f}%")
    return "\n".join(lines)


def _paired_rows(result: dict, ks: tuple[int, ...]) -> list[tuple[str, str, list[str]]]:
    """(rig, "Pr-VIPE - lifting", ["+1.2 +- 0.8", ...]) per rig and pair of the result's ``paired`` block."""
    names = {"prvipe-lift3d": "Pr-VIPE - lifting", "prvipe-nn2d": "Pr-VIPE - 2D-NN"}
    return [(rig, names.get(pair, pair), [f"{100 * d[f'hit@{k}']['mean']:+.1f} +- {100 * d[f'hit@{k}']['se']:.1f}"
                                          for k in ks])
            for rig, pairs in (result.get("paired") or {}).items() for pair, d in pairs.items()]


#: Column titles of the two miss tables: per method (:func:`vipe_ray.evaluation.misses.miss_profile`), and Pr-VIPE
#: against each baseline (:func:`vipe_ray.evaluation.misses.exclusive_hits`; "only" = only that method hits).
MISS_COLUMNS = ("missed", "near misses", "top-1 error", "matches")
EXCLUSIVE_COLUMNS = ("both hit", "only Pr-VIPE", "only baseline", "neither")


def _miss_tables(result: dict) -> tuple[str, list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]:
    """A legend and the (rig, row name, cells) rows of the ``misses`` block's two tables.

    Per method: its misses (% of queries over the camera pairs), the share of those that are near misses, their
    median top-1 NP-MPJPE, and the median matches of the missed queries (first row: of all queries). Per
    baseline: the shares of queries both Pr-VIPE and it hit, only one of them, or neither."""
    per_method, exclusive = [], []
    near = 0.0
    for rig, report in (result.get("misses") or {}).items():
        near = report["near"]
        per_method.append((rig, "all queries", ["", "", "", f"{report['matches']:.0f}"]))
        for method in METHODS:
            if method in report["methods"]:
                m = report["methods"][method]
                per_method.append((rig, METHOD_NAMES[method], [
                    f"{100 * m['miss']:.1f}%", _percent(m["near_miss"]), _number(m["miss_error"], ".3f"),
                    _number(m["miss_matches"], ".0f")]))
        for pair, shares in report["exclusive"].items():
            a, b = pair.split("-")
            exclusive.append((rig, f"{_SHORT[a]} vs {_SHORT[b]}",
                              [f"{100 * shares[k]:.1f}%" for k in ("both", f"only_{a}", f"only_{b}", "neither")]))
    legend = (f"where Hit@1 misses: missed = share of queries (over the camera pairs); near misses = share of the "
              f"misses whose top-1 pose is within {near:g} x kappa of the query; top-1 error = their median "
              f"NP-MPJPE; matches = median index poses within kappa (the query's own included) of the missed "
              f"queries, and of all queries")
    return legend, per_method, exclusive


def _percent(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.0f}%"


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


_SHORT = {"prvipe": "Pr-VIPE", "prvipe_mean": "Pr-VIPE means", "nn2d": "2D-NN", "lift3d": "lifting"}


METHOD_NAMES = {"prvipe": "Pr-VIPE (-log P over samples)", "prvipe_mean": "Pr-VIPE (embedding means)",
                "nn2d": "2D nearest neighbour (Procrustes)", "lift3d": "3D lifting + NP-MPJPE"}


def format_markdown(result: dict, ks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
    """Markdown tables of a result: Hit@k per rig and method, then Hit@1 per occlusion protocol (rows) and
    rig x method (columns), with the largest share of queries without an embedding over the rigs."""
    lines = ["| rig | method | " + " | ".join(f"Hit@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for rig, methods in result["rigs"].items():
        for method in METHODS:
            if method in methods:
                cells = " | ".join(f"{100 * methods[method][f'hit@{k}']:.1f}" for k in ks)
                lines.append(f"| {rig} | {METHOD_NAMES[method]} | {cells} |")
    differences = _paired_rows(result, ks)
    if differences:
        lines += ["", "| rig | paired difference (points, +- standard error over queries) | "
                  + " | ".join(f"Hit@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
        lines += [f"| {rig} | {name} | " + " | ".join(cells) + " |" for rig, name, cells in differences]
    legend, per_method, exclusive = _miss_tables(result)
    if per_method:
        lines += ["", legend[0].upper() + legend[1:] + "."]
        for rows, columns in ((per_method, MISS_COLUMNS), (exclusive, EXCLUSIVE_COLUMNS)):
            lines += ["", "| rig | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
            lines += [f"| {rig} | {name} | " + " | ".join(cells) + " |" for rig, name, cells in rows]
    occlusion = {rig: patterns for rig, patterns in (result.get("occlusion") or {}).items() if patterns}
    if occlusion:
        methods = [m for m in ("prvipe", "nn2d", "lift3d") if m in next(iter(result["rigs"].values()))]
        columns = [(rig, m) for rig in occlusion for m in methods]
        short = _SHORT
        lines += ["", "| occlusion (Hit@1) | index | " + " | ".join(f"{rig} {short[m]}" for rig, m in columns)
                  + " | no embedding |", "|---|---|" + "---|" * (len(columns) + 1)]
        first = next(iter(occlusion.values()))
        for pattern in sorted(first, key=lambda name: name != "none"):  # the clean reference row first
            lost = [result.get("invalid", {}).get(rig, {}).get(pattern, 0.0) for rig in occlusion]
            for mode in (INDEX_MODES if pattern != "none" else ("clean",)):
                cells = " | ".join(f"{100 * occlusion[rig][pattern][mode][m]['hit@1']:.1f}" for rig, m in columns)
                lines.append(f"| {pattern} | {mode} | {cells} | {100 * max(lost):.1f}% |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


LIMBS = ("group:left_arm", "group:right_arm", "group:left_leg", "group:right_leg")


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """A result as flat metric names: ``{prefix}{rig}/{method}/hit@k`` (clean), ``{prefix}{rig}/{a}-{b}/hit@k``
    (paired differences), ``{prefix}{rig}/misses/{method or pair}/{key}`` (where Hit@1 misses),
    ``{prefix}{rig}/{pattern}/{index}/{method}/hit@1`` (occlusion), ``{prefix}{rig}/{method}/hit@k_se``,
    and the summaries ``{prefix}hit@k`` (Pr-VIPE over the rigs) and ``{prefix}hit@1_1limb`` (Pr-VIPE, one
    limb hidden, clean index, over the limbs and rigs); the lifter and 2D-NN get ``{prefix}{method}_hit@k``."""
    out: dict[str, float] = {}
    for rig, methods in result["rigs"].items():
        for method, hits in methods.items():
            for key, value in hits.items():
                out[f"{prefix}{rig}/{method}/{key}"] = value
                se = result.get("se", {}).get(rig, {}).get(method, {}).get(key)
                if se is not None:
                    out[f"{prefix}{rig}/{method}/{key}_se"] = se
    for rig, pairs in (result.get("paired") or {}).items():
        for pair, hits in pairs.items():
            for key, value in hits.items():
                out[f"{prefix}{rig}/{pair}/{key}"] = value["mean"]
                out[f"{prefix}{rig}/{pair}/{key}_se"] = value["se"]
    for rig, report in (result.get("misses") or {}).items():
        for group in ("methods", "exclusive"):
            for name, values in report[group].items():
                out.update({f"{prefix}{rig}/misses/{name}/{key}": value for key, value in values.items()
                            if not math.isnan(value)})
    for rig, patterns in (result.get("occlusion") or {}).items():
        for pattern, modes in patterns.items():
            for mode, methods in modes.items():
                if pattern == "none" and mode == "occluded":
                    continue  # the same numbers as the clean index
                for method, hits in methods.items():
                    out[f"{prefix}{rig}/{pattern}/{mode}/{method}/hit@1"] = hits["hit@1"]
    rigs = list(result["rigs"])
    for method in next(iter(result["rigs"].values())):
        name = "" if method == "prvipe" else f"{method}_"
        for key in next(iter(result["rigs"].values()))[method]:
            out[f"{prefix}{name}{key}"] = sum(result["rigs"][r][method][key] for r in rigs) / len(rigs)
        occlusion = result.get("occlusion") or {}
        limbs = [occlusion[r][p]["clean"][method]["hit@1"] for r in occlusion for p in LIMBS if p in occlusion[r]]
        if limbs:
            out[f"{prefix}{name}hit@1_1limb"] = sum(limbs) / len(limbs)
    return out


def retrieval_objective(result: dict, metric: str = "hit@1") -> float:
    """Mean of a Pr-VIPE Hit@k over the rigs (the sweeps' default objective)."""
    values = [methods["prvipe"][metric] for methods in result["rigs"].values()]
    return float(sum(values) / len(values)) if values else math.nan
