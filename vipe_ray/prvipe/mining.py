"""Negative mining for Pr-VIPE triplets.

A batch holds N records (anchor view, positive view) of N 3D poses. The negative candidates of anchor i are
the positives j whose 3D pose is at least kappa away from anchor i's (NP-MPJPE >= kappa); poses closer than
kappa are neither positives nor negatives. Among the candidates, ranked by kernel distance to the anchor:

* ``semi_hard`` (the reference's default): the nearest candidate farther than the anchor's own positive;
  an anchor without one has no triplet;
* ``hard``: the nearest candidate;
* ``ratio`` (vipe-ray's extension): uniformly one of the hardest ``ceil(r * candidates)`` (at least one).
  r -> 0 approaches hard mining, r = 1 is a random valid negative.

Symmetric triplets (:func:`mine_triplets`, vipe-ray's extension, on in the default config): the positive
view of each record is an anchor too, its candidates the anchor views of the other records ranked by the same
kernel (transposed), so a batch of N records gives 2N triplets for the same forward pass.

Lazy labels (:func:`mine_negatives_lazy`). Semi-hard and hard mining need one label per anchor, not the
N x N NP-MPJPE matrix: rank anchor i's positives by kernel distance (semi-hard: only those farther than its
own positive), ties by column index as ``min``/``argmin`` break them; the chosen negative is the first ranked
j with NP-MPJPE(i, j) >= kappa. Labels are computed in rounds: the top-ranked column of every anchor (an
argmin, no sort), then, for the few anchors whose top column matches, the next ``block`` ranked columns and
doubled blocks after that, until each anchor has a negative or runs out of ranked columns. Since most
in-batch pairs are negatives, the first round settles almost every anchor: about N labels instead of N^2,
and exactly the triplets of the full matrix.
``ratio`` mining draws from the hardest ``ceil(r x count)`` candidates, and the count needs every label of the
row, so it keeps the full matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


#: Labels of (anchor ``rows[p]``, positive ``cols[p]``) pairs: ``[P]`` long x2 -> ``[P]`` NP-MPJPE.
PairLabels = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def mine_negatives_lazy(kernel: torch.Tensor, d_ap: torch.Tensor, labels: PairLabels, kappa: float, mode: str,
                        ratio: float = 1.0, generator: torch.Generator | None = None,
                        block: int = 2) -> Negatives:
    """:func:`mine_negatives` computing NP-MPJPE labels only where the ranking needs them.

    Args:
        kernel: ``[N, M]`` kernel distance from anchor i to positive j; d_ap: ``[N]``.
        labels: NP-MPJPE of given (anchor, positive) pairs (e.g. :func:`vipe_ray.prvipe.matching.indexed_np_mpjpe`);
            must give the same value for a pair whichever other pairs share the call.
        kappa: candidates have NP-MPJPE >= kappa; mode, ratio, generator: as :func:`mine_negatives`.
        block: ranked columns labelled per still-pending anchor in the round after the top-ranked one
            (doubling after each round).
    Returns:
        The same :class:`Negatives` as ``mine_negatives(kernel, d_ap, candidate_mask(full labels, kappa), ...)``.
    """
    if mode not in MODES:
        raise ValueError(f"mining mode must be one of {MODES}, got {mode!r}")
    n, m = kernel.shape
    device = kernel.device
    # ratio needs each row's candidate count; non-finite kernels make min/argmin pick non-candidate
    # columns among infinities: both take the full matrix, whose semantics are the definition.
    if mode == "ratio" or not bool(torch.isfinite(kernel).all()):
        rows = torch.arange(n, device=device).repeat_interleave(m)
        cols = torch.arange(m, device=device).repeat(n)
        candidates = candidate_mask(labels(rows, cols).reshape(n, m), kappa)
        return mine_negatives(kernel, d_ap, candidates, mode, ratio, generator)
    inf = torch.tensor(float("inf"), dtype=kernel.dtype, device=device)
    # Semi-hard: columns not farther than the positive rank last (inf) and end an anchor's search.
    key = torch.where(kernel > d_ap[:, None], kernel, inf) if mode == "semi_hard" else kernel
    all_rows = torch.arange(n, device=device)
    # Round 0, the top-ranked column of every anchor: argmin breaks ties by the lowest column, as min does.
    top = key.argmin(1)
    usable = torch.isfinite(key[all_rows, top])
    label = torch.full((n,), -inf.item(), dtype=kernel.dtype, device=device)
    label[usable] = labels(all_rows[usable], top[usable]).to(kernel.dtype)
    valid = label >= kappa
    index = torch.where(valid, top, torch.zeros_like(top))
    pending = all_rows[usable & ~valid]
    if pending.numel():
        # The few anchors whose top column matches: rank their row (stable sort: ties in column order, so
        # rank 0 is the argmin above) and label the next columns in doubling blocks.
        ranked, order = torch.sort(key[pending], dim=1, stable=True)
        slot = torch.arange(pending.numel(), device=device)
        start, width = 1, max(1, block)
        while slot.numel() and start < m:
            cols = order[slot, start:start + width]  # [p, w]
            usable = torch.isfinite(ranked[slot, start:start + width])
            rows = pending[slot][:, None].expand_as(cols)
            label = torch.full(cols.shape, -inf.item(), dtype=kernel.dtype, device=device)
            label[usable] = labels(rows[usable], cols[usable]).to(kernel.dtype)
            hit = usable & (label >= kappa)
            found = hit.any(1)
            first = hit.to(torch.uint8).argmax(1)  # the first hit in rank order
            index[pending[slot[found]]] = cols[found, first[found]]
            valid[pending[slot[found]]] = True
            # An unusable (inf) entry means every later one is too: that anchor has no negative.
            slot = slot[~found & usable.all(1)]
            start += width
            width *= 2
    return Negatives(index, valid)


def mine_triplets(kernel: torch.Tensor, labels: PairLabels, kappa: float, mode: str, ratio: float = 1.0,
                  generator: torch.Generator | None = None, symmetric: bool = False, count: int = 1) -> Negatives:
    """Negatives of a batch's anchor views and, when ``symmetric``, of its positive views too.

    Args:
        kernel: ``[N, N]`` kernel distance from anchor view i to positive view j (symmetric in the two
            embeddings, so its transpose ranks the anchor views for positive view i).
        labels: NP-MPJPE of (pose ``rows[p]``, pose ``cols[p]``); both views of record i show pose i.
        count: negatives per anchor (``semi_hard``/``hard`` only): the first ``count`` candidates in the
            mode's order, i.e. the negative of :func:`mine_negatives`, then the one it would pick with the
            earlier ones removed, and so on.
    Returns:
        ``index``/``valid`` ``[N, count]``: negatives of the anchors (indices into the positive views),
        followed when ``symmetric`` by those of the positives (indices into the anchor views): ``[2N, count]``.
    """
    if count < 1:
        raise ValueError(f"negatives per anchor must be >= 1, got {count}")
    if count > 1 and mode == "ratio":
        raise ValueError("several negatives per anchor need semi_hard or hard mining, not ratio")
    rankings = [kernel] + ([kernel.T.contiguous()] if symmetric else [])
    found = [_first_negatives(r, labels, kappa, mode, ratio, generator, count) for r in rankings]
    return Negatives(torch.cat([f.index for f in found]), torch.cat([f.valid for f in found]))


@torch.no_grad()
def nearest_candidates(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Each anchor's own positive followed by its ``count`` kernel-nearest other views of the pool (the graded
    ranking loss's candidates; row i and column i show the same pose): ``[N, N]`` -> ``[N, 1 + min(count, N - 1)]``
    column indices."""
    n = kernel.shape[0]
    others = kernel.float().clone()
    others.fill_diagonal_(float("inf"))
    nearest = others.topk(min(count, n - 1), dim=1, largest=False).indices
    return torch.cat([torch.arange(n, device=kernel.device)[:, None], nearest], 1)


def _first_negatives(kernel: torch.Tensor, labels: PairLabels, kappa: float, mode: str, ratio: float,
                     generator: torch.Generator | None, count: int) -> Negatives:
    """The first ``count`` negatives of every row, ``[N, count]``: mine, move the chosen columns past every
    other (a finite value, so the lazy labels still apply), mine again."""
    d_ap = kernel.diagonal().clone()
    first = mine_negatives_lazy(kernel, d_ap, labels, kappa, mode, ratio, generator)
    if count == 1:
        return Negatives(first.index[:, None], first.valid[:, None])
    rows = torch.arange(kernel.shape[0], device=kernel.device)
    ranking = kernel.clone()
    last = ranking[torch.isfinite(ranking)].max() + 1.0 if torch.isfinite(ranking).any() else 1.0
    index, valid = [first.index], [first.valid]
    for _ in range(count - 1):
        ranking[rows, index[-1]] = last
        more = mine_negatives_lazy(ranking, d_ap, labels, kappa, mode, ratio, generator)
        index.append(more.index)
        # A moved column comes back only when nothing else is left: that anchor has no further negative.
        valid.append(more.valid & valid[-1] & (ranking[rows, more.index] < last))
    return Negatives(torch.stack(index, 1), torch.stack(valid, 1))
