"""Intervals over seeds (vipe_ray.evaluation.stats) on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from vipe_ray.evaluation.stats import mean_interval, paired_difference, standard_error, t_quantile


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.975, 100000) == pytest.approx(1.95996, abs=1e-4)


def test_mean_interval_by_hand():
    # mean 0.6, sd 0.1, se 0.1 / sqrt(3), t(0.975, 2) = 4.302653: half width 0.248414.
    interval = mean_interval([0.5, 0.6, 0.7])
    assert interval.mean == pytest.approx(0.6)
    assert interval.low == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert interval.high == pytest.approx(0.6 + 0.248414, abs=1e-6)
    assert interval.n == 3 and interval.half_width == pytest.approx(0.248414, abs=1e-6)


def test_identical_values_give_a_zero_width_interval_and_one_value_none():
    same = mean_interval([0.3, 0.3, 0.3])
    assert same.low == same.high == pytest.approx(0.3)
    single = mean_interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.low) and math.isnan(single.high)
    assert not single.excludes_zero()


def test_paired_difference_by_hand_and_narrower_than_unpaired():
    a = {0: 0.5, 1: 0.6, 2: 0.7}
    b = {0: 0.4, 1: 0.55, 2: 0.6}
    # differences 0.1, 0.05, 0.1: mean 1/12, sd 0.0288675, se 0.0166667, half 0.0717109.
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(1 / 12)
    assert diff.low == pytest.approx(1 / 12 - 0.0717109, abs=1e-6)
    assert diff.high == pytest.approx(1 / 12 + 0.0717109, abs=1e-6)
    assert diff.excludes_zero()
    # The seeds share their variance: pairing removes it, so the interval is far narrower than the two
    # variants' own intervals suggest.
    assert diff.half_width < mean_interval(list(a.values())).half_width / 3


def test_paired_difference_uses_common_seeds_only_and_refuses_none():
    diff = paired_difference({0: 0.5, 1: 0.7, 5: 0.9}, {0: 0.4, 1: 0.6, 2: 0.1})
    assert diff.n == 2 and diff.mean == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no common seed"):
        paired_difference({0: 0.5}, {1: 0.5})


def test_nan_values_are_refused_and_standard_error_by_hand():
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.5, math.nan])
    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(standard_error([1.0]))
