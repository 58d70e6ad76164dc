"""Where retrieval misses: which queries each method gets wrong at Hit@1, and how wrong.

Hit@1 alone cannot tell a method that cannot find a pose's neighbourhood from one that finds it but orders
the nearest poses badly. Per rig (clean protocol, every camera pair; one observation per query and pair):

* ``exclusive``: for Pr-VIPE against each baseline, the share of observations both methods hit, only one of
  them hits, or neither -- whether the two fail on the same queries;
* ``miss``: per method, the share of observations it misses (1 - Hit@1);
* ``near_miss``: per method, the share of its misses whose top-1 pose is within ``near x kappa`` NP-MPJPE of
  the query (retrieved the right neighbourhood, ordered it wrong), out of the misses that retrieved a pose;
* ``miss_error``: per method, the median NP-MPJPE of the top-1 pose over its misses;
* ``matches``: the median number of index poses within kappa of the query (its own pose, seen by the index
  camera, included), over all observations, and per method ``miss_matches`` over its misses: misses on rare
  poses have few matches to find.

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


def miss_report(top1: dict[str, torch.Tensor], error3d: torch.Tensor, kappa: float,
                pairs: tuple[tuple[str, str], ...], near: float = NEAR_FACTOR) -> dict:
    """The misses of every method on one rig.

    Args:
        top1: method -> ``[pairs, queries]`` long, the top-1 index pose of each query for each camera pair;
            -1 where nothing was retrieved.
        error3d: ``[queries, index]`` NP-MPJPE of each index pose aligned onto each query's 3D pose (the index
            of every camera renders the same poses, so one table serves every pair). A hit at 1 is a top-1 pose
            within ``kappa``: the Hit@1 of the evaluation.
        pairs: (a, b) methods to compare by :func:`exclusive_hits`, each present in ``top1``.
    Returns:
        ``{"near": near, "exclusive": {"a-b": {"both", "only_a", "only_b", "neither"}}, "methods": {method:
        miss_profile}, "matches": median matches over all observations}`` (the query's own pose counts as one
        of its matches).
    """
    matches = (error3d <= kappa).sum(1)  # [queries]
    out: dict = {"near": near, "exclusive": {}, "methods": {}}
    hits = {}
    for method, index in top1.items():
        queries = torch.arange(index.shape[1]).expand_as(index)
        error = torch.where(index >= 0, error3d[queries, index.clamp_min(0)],
                            torch.full(index.shape, math.nan, dtype=error3d.dtype))
        hits[method] = error <= kappa  # NaN (nothing retrieved) compares False: a miss
        out["methods"][method] = miss_profile(hits[method].flatten(), error.flatten(),
                                              matches.expand_as(index).flatten(), kappa, near)
    for a, b in pairs:
        shares = exclusive_hits(hits[a].flatten(), hits[b].flatten())
        out["exclusive"][f"{a}-{b}"] = {"both": shares["both"], f"only_{a}": shares["only_a"],
                                        f"only_{b}": shares["only_b"], "neither": shares["neither"]}
    out["matches"] = _median(matches.expand_as(next(iter(top1.values()))).flatten()) if top1 else math.nan
    return out
