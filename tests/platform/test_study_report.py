"""The study report on hand-made trial records: a recipe search (``split: validation``) reads and reports
its ``validation/`` scores, says they are validation numbers, and leaves test scores out."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from vipe_ray.platform.study_report import TrialRecord, aggregate, markdown
from vipe_ray.platform.study_spec import load_study

REPO = Path(__file__).resolve().parents[2]
PROVENANCE = {"scale": "s", "eval_kappa": 0.1, "command": "c", "commit": "x", "data": "d", "checksum": "0",
              "versions": "v", "written": "w", "experiment": "e", "parent_run_id": "p"}


def _records(prefix: str, hits: dict[str, list[float]]) -> list[TrialRecord]:
    return [TrialRecord(variant, seed, f"{variant}-{seed}", {f"{prefix}wide-val/prvipe/hit@1": value,
                                                             f"{prefix}hit@1": value}, 1000)
            for variant, values in hits.items() for seed, value in enumerate(values)]


def test_a_validation_study_reports_its_validation_scores():
    study = load_study(REPO / "sweeps" / "recipe.yaml")
    assert study.split == "validation"
    hits = {"default": [0.80, 0.82, 0.81], "no_limb_swap": [0.75, 0.78, 0.76]}
    records = _records("validation/", hits)
    table = aggregate(records, list(hits), study.reference)
    report = markdown(study, records, table, PROVENANCE, plots=[])
    assert "6 trials with validation scores" in report and "no test subject was touched" in report
    assert "tested once on the held-out test subjects" not in report
    row = next(line for line in report.splitlines() if line.startswith("| `no_limb_swap` |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1].startswith(f"{100 * statistics.mean(hits['no_limb_swap']):.1f} [")
    diff = statistics.mean(a - b for a, b in zip(hits["no_limb_swap"], hits["default"]))
    assert cells[3].startswith(f"{100 * diff:+.1f} [") and cells[4] == "worse"


def test_a_test_study_reads_only_its_test_scores():
    study = load_study(REPO / "sweeps" / "ablation_study_cpu.yaml")
    assert study.split == "test" and study.prefix == "test/"
    records = _records("test/", {"full": [0.5, 0.6, 0.7]})
    table = aggregate(records, ["full"], study.reference)
    report = markdown(study, records, table, PROVENANCE, plots=[])
    assert "3 trials with test scores" in report and "tested once on the held-out test subjects" in report
    assert table["full"]["test/hit@1"]["mean"].mean == pytest.approx(0.6)
