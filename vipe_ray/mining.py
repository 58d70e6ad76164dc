"""Negative mining for Pr-VIPE triplets.

A batch holds N records (anchor view, positive view) of N 3D poses. The negative candidates of anchor i are
the positives j whose 3D pose is at least kappa away from anchor i's (NP-MPJPE >= kappa); poses closer than
kappa are neither positives nor negatives. Among the candidates, ranked by kernel distance to the anchor:

* ``semi_hard`` (the reference's default): the nearest candidate farther than the anchor's own positive;
  an anchor without one has no triplet;
* ``hard``: the nearest candidate;
* ``ratio`` (vipe-ray's extension): uniformly one of the hardest ``ceil(r * candidates)`` (at least one).
  r -> 0 approaches hard mining, r = 1 is a random valid negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("semi_hard", "hard", "ratio")


@dataclass(frozen=True)
class Negatives:
    """Chosen negatives: ``index`` ``[N]`` (into the positives) and ``valid`` ``[N]`` bool."""

    index: torch.Tensor
    valid: torch.Tensor


def candidate_mask(np_mpjpe: torch.Tensor, kappa: float) -> torch.Tensor:
    """Valid negative candidates: ``[N, N]`` NP-MPJPE (anchor 3D vs positive 3D) -> bool ``[N, N]``."""
    return np_mpjpe >= kappa


@torch.no_grad()
def mine_negatives(kernel: torch.Tensor, d_ap: torch.Tensor, candidates: torch.Tensor, mode: str,
                   ratio: float = 1.0, generator: torch.Generator | None = None) -> Negatives:
    """Pick one negative per anchor.

    Args:
        kernel: ``[N, N]`` kernel distance from anchor i to positive j.
        d_ap: ``[N]`` kernel distance from each anchor to its own positive.
        candidates: ``[N, N]`` bool, valid negative candidates.
        mode: one of :data:`MODES`; ratio: r in (0, 1] for ``ratio``.
    """
    if mode not in MODES:
        raise ValueError(f"mining mode must be one of {MODES}, got {mode!r}")
    inf = torch.tensor(float("inf"), dtype=kernel.dtype, device=kernel.device)
    if mode == "semi_hard":
        allowed = candidates & (kernel > d_ap[:, None])
        masked = torch.where(allowed, kernel, inf)
        best, index = masked.min(1)
        return Negatives(index, torch.isfinite(best))
    masked = torch.where(candidates, kernel, inf)
    count = candidates.sum(1)
    valid = count > 0
    if mode == "hard":
        return Negatives(masked.argmin(1), valid)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"hard_negative_ratio must lie in (0, 1], got {ratio}")
    order = masked.argsort(1)  # hardest first; non-candidates (inf) last
    # float64 with a tolerance: ceil(0.3 * 50) must be 15, not 16 from rounding noise.
    pool = torch.ceil(ratio * count.double() - 1e-9).clamp_min(1).to(kernel.dtype)
    u = torch.rand(kernel.shape[0], generator=generator, dtype=kernel.dtype).to(kernel.device)
    rank = torch.minimum((u * pool).long(), (pool - 1).long())
    return Negatives(order.gather(1, rank[:, None]).squeeze(1), valid)
