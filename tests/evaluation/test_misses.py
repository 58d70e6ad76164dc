"""Where retrieval misses (vipe_ray.evaluation.misses): hand cases and the report's agreement with the Hit@1 it explains."""

import math

import pytest
import torch

from vipe_ray.evaluation.tables import format_markdown, format_table
from vipe_ray.evaluation.misses import exclusive_hits, miss_profile, miss_report


def test_exclusive_hits_hand_case():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    shares = exclusive_hits(a, b)
    assert shares == pytest.approx({"both": 0.4, "only_a": 0.2, "only_b": 0.2, "neither": 0.2})
    assert sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal, non-empty"):
        exclusive_hits(a, b[:3])


def test_miss_profile_hand_case():
    """Five observations, three misses: one near (0.12 <= 1.25 x 0.1), one far (0.30), one with nothing
    retrieved (NaN: a miss, but no top-1 error to judge)."""
    hit = torch.tensor([True, False, False, True, False])
    error = torch.tensor([0.0, 0.12, 0.30, 0.05, math.nan], dtype=torch.float64)
    matches = torch.tensor([30, 4, 9, 50, 2])
    profile = miss_profile(hit, error, matches, kappa=0.1)
    assert profile["miss"] == pytest.approx(0.6)
    assert profile["near_miss"] == pytest.approx(0.5)
    assert profile["miss_error"] == pytest.approx(0.12)  # the lower middle of (0.12, 0.30)
    assert profile["miss_matches"] == 4  # median of (4, 9, 2)
    nothing_missed = miss_profile(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.float64),
                                  torch.ones(3, dtype=torch.long), kappa=0.1)
    assert nothing_missed["miss"] == 0.0
    assert math.isnan(nothing_missed["near_miss"]) and math.isnan(nothing_missed["miss_error"])


def _report():
    """Two camera pairs x three queries over an index of the same three poses. ``error3d[q, i]`` aligns index
    pose i onto query q, which is not symmetric: (0, 1) matches at 0.09 one way and misses at 0.12 the other."""
    error3d = torch.tensor([[0.00, 0.09, 0.40],
                            [0.12, 0.00, 0.08],
                            [0.45, 0.07, 0.00]], dtype=torch.float64)
    top1 = {"prvipe": torch.tensor([[0, 0, 2], [0, 2, -1]]),
            "lift3d": torch.tensor([[1, 1, 1], [2, 1, 2]])}
    return miss_report(top1, error3d, kappa=0.1, pairs=(("prvipe", "lift3d"),))


def test_miss_report_hand_case():
    report = _report()
    # Matches per query (row <= 0.1): query 0 -> 2 (itself, pose 1), query 1 -> 2, query 2 -> 2.
    assert report["matches"] == 2
    prvipe = report["methods"]["prvipe"]
    # Hits: (0,0) 0.00, (0,1) 0.12 miss, (0,2) 0.00, (1,0) 0.00, (1,1) 0.08, (1,2) nothing retrieved: a miss.
    assert prvipe["miss"] == pytest.approx(2 / 6)
    assert prvipe["near_miss"] == 1.0 and prvipe["miss_error"] == pytest.approx(0.12)
    assert prvipe["miss_matches"] == 2
    lift = report["methods"]["lift3d"]
    # (0,0) 0.09 hit -- read the other way round it would be 0.12, a miss; (0,1) 0.00; (0,2) 0.07;
    # (1,0) 0.40, a far miss; (1,1) 0.00; (1,2) 0.00.
    assert lift["miss"] == pytest.approx(1 / 6)
    assert lift["near_miss"] == 0.0 and lift["miss_error"] == pytest.approx(0.40) and lift["miss_matches"] == 2
    shares = report["exclusive"]["prvipe-lift3d"]
    assert shares == pytest.approx({"both": 3 / 6, "only_prvipe": 1 / 6, "only_lift3d": 2 / 6, "neither": 0.0})


def test_miss_tables_show_the_report():
    result = {"rigs": {"h36m": {m: {"hit@1": 0.5} for m in ("prvipe", "lift3d")}}, "misses": {"h36m": _report()}}
    markdown = format_markdown(result, ks=(1,)).splitlines()
    assert "| h36m | Pr-VIPE (-log P over samples) | 33.3% | 100% | 0.120 | 2 |" in markdown
    assert "| rig | method | both hit | only Pr-VIPE | only baseline | neither |" in markdown
    assert "| h36m | Pr-VIPE vs lifting | 50.0% | 16.7% | 33.3% | 0.0% |" in markdown
    assert any(line.startswith("Where Hit@1 misses:") and "within 1.25 x kappa" in line for line in markdown)
    text = format_table(result, ks=(1,))
    assert "within 1.25 x kappa" in text and "only Pr-VIPE" in text and "3D lifting + NP-MPJPE" in text
