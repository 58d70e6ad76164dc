"""Intervals over seeds: what a study reports for each variant and protocol.

A variant is trained once per seed; each seed gives one number (say Hit@1 on a rig). Over ``n`` seeds the
study reports the mean with its two-sided Student-t interval (``level`` 95% by default):
``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``, ``sd`` the sample standard deviation (ddof 1). A
difference between two variants is *paired* by seed: seed ``s`` of both shares the same evaluation queries,
cameras and occlusion draws, so the interval is taken over the per-seed differences, which removes the
variance the two share. Fewer than two values give no interval (``low`` = ``high`` = NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its confidence interval [low, high] at ``level``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """The interval lies entirely on one side of 0 (NaN bounds never do)."""
        return self.low > 0 or self.high < 0


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed) with its Student-t interval; NaN values are an error."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval: no values")
    if any(math.isnan(x) for x in xs):
        raise ValueError(f"mean_interval: NaN among {xs}")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Interval:
    """``a - b`` paired by seed: the interval over ``a[s] - b[s]`` for the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"paired_difference: no common seed ({sorted(a)} vs {sorted(b)})")
    return mean_interval([a[s] - b[s] for s in seeds], level)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample sd / sqrt(n)); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
