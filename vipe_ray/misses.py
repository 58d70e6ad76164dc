"""Where retrieval misses: which queries each method gets wrong at Hit@1, and how wrong.

Hit@1 alone cannot tell a method that cannot find a pose's neighbourhood from one that finds it but orders
the nearest poses badly. Per rig (clean protocol, every camera pair; one observation per query and pair):

* ``exclusive``: for Pr-VIPE against each baseline, the share of observations both methods hit, only one of
  them hits, or neither -- whether the two fail on the same queries;
* ``near_miss``: per method, the share of its misses whose top-1 pose is within ``near x kappa`` NP-MPJPE of
  the query (retrieved the right neighbourhood, ordered it wrong);
* ``miss_error``: per method, the median NP-MPJPE of the top-1 pose over its misses;
* ``matches``: the median number of index poses within kappa of the query, over all observations (``all``)
  and over each method's misses: misses on rare poses have few matches to find.

An observation with nothing retrieved (a query or index without an embedding) is a miss with no top-1 pose:
it counts in ``exclusive`` and ``matches`` but not in ``near_miss`` or ``miss_error``.
"""

from __future__ import annotations

import math

import torch

#: A miss whose top-1 pose is within this multiple of kappa counts as a near miss.
NEAR_FACTOR = 1.25


def exclusive_hits(hit_a: torch.Tensor, hit_b: torch.Tensor) -> dict[str, float]:
    """Shares of observations that both, only ``a``, only ``b`` or neither hit: ``[n]`` bool each.

    The four shares sum to 1."""
    if hit_a.shape != hit_b.shape or hit_a.numel() == 0:
        raise ValueError(f"exclusive_hits: need two equal, non-empty shapes, got {tuple(hit_a.shape)} "
                         f"and {tuple(hit_b.shape)}")
    a, b = hit_a.bool(), hit_b.bool()
    n = a.numel()
    return {"both": (a & b).sum().item() / n, "only_a": (a & ~b).sum().item() / n,
            "only_b": (~a & b).sum().item() / n, "neither": (~a & ~b).sum().item() / n}


def _median(values: torch.Tensor) -> float:
    """The median (the lower of the two middle values for an even count); NaN for no values."""
    return values.double().median().item() if values.numel() else math.nan


def miss_profile(hit: torch.Tensor, top1_error: torch.Tensor, matches: torch.Tensor, kappa: float,
                 near: float = NEAR_FACTOR) -> dict[str, float]:
    """One method's misses.

    Args:
        hit: ``[n]`` bool, the observation hits at 1.
        top1_error: ``[n]`` NP-MPJPE of the top-1 pose to the query; NaN where nothing was retrieved.
        matches: ``[n]`` index poses within kappa of the query.
    Returns:
        ``{"miss": share of observations missed, "near_miss": share of the misses with a top-1 pose within
        near x kappa, "miss_error": median top-1 NP-MPJPE of the misses, "miss_matches": median matches of the
        missed queries}``; NaN where there is nothing to take a share or median of.
    """
    missed = ~hit.bool()
    retrieved = missed & ~torch.isnan(top1_error)
    errors = top1_error[retrieved]
    return {"miss": missed.double().mean().item(),
            "near_miss": (errors <= near * kappa).double().mean().item() if errors.numel() else math.nan,
            "miss_error": _median(errors), "miss_matches": _median(matches[missed])}


def miss_report(hits: dict[str, torch.Tensor], top1: dict[str, torch.Tensor], error3d: torch.Tensor,
                kappa: float, pairs: tuple[tuple[str, str], ...], near: float = NEAR_FACTOR) -> dict:
    """The misses of every method on one rig.

    Args:
        hits: method -> ``[pairs, queries]`` bool, hit at 1 for each camera pair and query.
        top1: method -> ``[pairs, queries]`` long, the top-1 index pose; -1 where nothing was retrieved.
        error3d: ``[queries, index]`` NP-MPJPE of each index pose to each query's 3D pose (the index of every
            camera renders the same poses, so one table serves every pair).
        pairs: (a, b) methods to compare by :func:`exclusive_hits`, each present in ``hits``.
    Returns:
        ``{"near": near, "exclusive": {"a-b": {"both", "only_a", "only_b", "neither"}}, "methods": {method:
        miss_profile}, "matches": median matches over all observations}``.
    """
    matches = (error3d <= kappa).sum(1)  # [queries]
    out: dict = {"near": near, "exclusive": {}, "methods": {}}
    for method, hit in hits.items():
        index = top1[method]
        if index.shape != hit.shape:
            raise ValueError(f"miss_report: {method}: top1 {tuple(index.shape)} and hits {tuple(hit.shape)} differ")
        queries = torch.arange(hit.shape[1]).expand_as(index)
        error = torch.where(index >= 0, error3d[queries, index.clamp_min(0)],
                            torch.full(index.shape, math.nan, dtype=error3d.dtype))
        out["methods"][method] = miss_profile(hit.flatten(), error.flatten(),
                                              matches.expand_as(index).flatten(), kappa, near)
    for a, b in pairs:
        shares = exclusive_hits(hits[a].flatten(), hits[b].flatten())
        out["exclusive"][f"{a}-{b}"] = {"both": shares["both"], f"only_{a}": shares["only_a"],
                                        f"only_{b}": shares["only_b"], "neither": shares["neither"]}
    out["matches"] = _median(matches.expand_as(next(iter(hits.values()))).flatten()) if hits else math.nan
    return out
