"""Tests for vipe_ray.prvipe.mining: negative candidates and the three mining modes."""

from __future__ import annotations


import pytest
import torch

from vipe_ray.prvipe.mining import MODES, candidate_mask, mine_negatives

INF = float("inf")


def test_modes():
    assert set(MODES) == {"semi_hard", "hard", "ratio"}


def test_candidate_mask_threshold_is_inclusive():
    d = torch.tensor([[0.0, 0.1, 0.05], [0.2, 0.0999, 0.1], [0.3, 0.11, 0.0]])
    assert candidate_mask(d, 0.1).tolist() == [[False, True, False], [True, False, True], [True, True, False]]


def hand_case():
    kernel = torch.tensor([
        [0.5, 0.9, 0.3, 1.2, 2.0],
        [0.4, 0.6, 0.7, 0.2, 1.0],
        [1.0, 1.1, 0.8, 1.3, 0.9],
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ])
    d_ap = torch.tensor([0.5, 0.6, 2.0, 0.4])
    candidates = torch.tensor([
        [False, True, True, True, False],
        [True, False, True, True, True],
        [True, True, False, True, True],
        [False, False, False, False, False],
    ])
    return kernel, d_ap, candidates


def test_hard_picks_the_nearest_candidate():
    kernel, d_ap, candidates = hand_case()
    neg = mine_negatives(kernel, d_ap, candidates, "hard")
    assert neg.valid.tolist() == [True, True, True, False]
    # Row 0: candidates {1: 0.9, 2: 0.3, 3: 1.2} -> 2 (the non-candidate 0 at 0.5 is skipped).
    # Row 1: {0: 0.4, 2: 0.7, 3: 0.2, 4: 1.0} -> 3. Row 2: {0: 1.0, 1: 1.1, 3: 1.3, 4: 0.9} -> 4.
    assert neg.index[:3].tolist() == [2, 3, 4]


def test_semi_hard_picks_the_nearest_candidate_beyond_the_positive():
    kernel, d_ap, candidates = hand_case()
    neg = mine_negatives(kernel, d_ap, candidates, "semi_hard")
    # Row 0 (d_ap 0.5): candidates farther than 0.5 are 1 (0.9) and 3 (1.2) -> 1.
    # Row 1 (d_ap 0.6): 2 (0.7), 4 (1.0) -> 2. Row 2 (d_ap 2.0): none -> invalid. Row 3: no candidate.
    assert neg.valid.tolist() == [True, True, False, False]
    assert neg.index[:2].tolist() == [1, 2]


def test_semi_hard_needs_strictly_farther():
    kernel = torch.tensor([[0.0, 0.5, 0.7], [0.5, 0.0, 0.5]])
    d_ap = torch.tensor([0.5, 0.5])
    candidates = torch.tensor([[False, True, True], [True, False, True]])
    neg = mine_negatives(kernel, d_ap, candidates, "semi_hard")
    assert neg.valid.tolist() == [True, False]
    assert neg.index[0].item() == 2


@pytest.mark.parametrize("mode", MODES)
def test_anchors_without_candidates_are_invalid(mode):
    kernel = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    candidates = torch.zeros(4, 4, dtype=torch.bool)
    candidates[1, 2] = True
    neg = mine_negatives(kernel, torch.zeros(4), candidates, mode, ratio=0.5,
                         generator=torch.Generator().manual_seed(1))
    assert neg.valid.tolist() == [False, True, False, False]
    assert neg.index[1].item() == 2
    assert neg.index.shape == neg.valid.shape == (4,)


@pytest.mark.parametrize("mode", MODES)
def test_never_picks_an_invalid_candidate(mode):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        kernel = torch.rand(32, 32, generator=g, dtype=torch.float64) * 3
        d_ap = kernel.diagonal().clone()
        candidates = torch.rand(32, 32, generator=g) < 0.3
        neg = mine_negatives(kernel, d_ap, candidates, mode, ratio=0.4, generator=g)
        rows = torch.arange(32)[neg.valid]
        assert candidates[rows, neg.index[neg.valid]].all()
        if mode == "semi_hard":
            assert (kernel[rows, neg.index[neg.valid]] > d_ap[neg.valid]).all()
            has = (candidates & (kernel > d_ap[:, None])).any(1)
            assert torch.equal(neg.valid, has)
        else:
            assert torch.equal(neg.valid, candidates.any(1))


def ratio_rows(n: int, values: list[float], cand_cols: list[int]):
    """``n`` identical anchors: kernel row ``values`` (padded with 0s), candidates ``cand_cols``."""
    kernel = torch.zeros(n, n, dtype=torch.float64)
    kernel[:, :len(values)] = torch.tensor(values, dtype=torch.float64)
    candidates = torch.zeros(n, n, dtype=torch.bool)
    candidates[:, cand_cols] = True
    return kernel, candidates


def test_ratio_one_is_uniform_over_valid_candidates():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.05, 0.6]
    cand = [0, 2, 3, 4, 7]  # 0.05 and 0.1 (the nearest) are not candidates
    n = 400
    kernel, candidates = ratio_rows(n, values, cand)
    counts = torch.zeros(n, dtype=torch.long)
    for seed in range(3):
        neg = mine_negatives(kernel, torch.zeros(n, dtype=torch.float64), candidates, "ratio", ratio=1.0,
                             generator=torch.Generator().manual_seed(seed))
        assert neg.valid.all()
        counts += torch.bincount(neg.index, minlength=n)
    total = 3 * n
    assert counts.sum().item() == total
    assert counts[[c for c in range(n) if c not in cand]].sum().item() == 0
    expected = total / len(cand)
    chi2 = sum((counts[c].item() - expected) ** 2 / expected for c in cand)
    assert chi2 < 18.5  # 4 degrees of freedom: p ~ 0.001


def test_small_ratio_stays_among_the_hardest():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.05, 0.6]
    cand = [0, 2, 3, 4, 5, 7]  # sorted by kernel: 5 (0.2), 3 (0.3), 2 (0.5), 7, 4, 0
    n = 300
    kernel, candidates = ratio_rows(n, values, cand)
    for ratio, allowed in ((0.25, {5, 3}), (0.1, {5}), (0.5, {5, 3, 2})):
        seen = set()
        for seed in range(2):
            neg = mine_negatives(kernel, torch.zeros(n, dtype=torch.float64), candidates, "ratio", ratio=ratio,
                                 generator=torch.Generator().manual_seed(seed))
            seen |= set(neg.index.tolist())
        assert seen == allowed, ratio  # within ceil(r * 6) hardest, and each of them is drawn


@pytest.mark.parametrize("dtype,ratio,count", [(torch.float32, 0.3, 50), (torch.float64, 0.28, 25)])
def test_ratio_pool_size_is_exactly_ceil_of_ratio_times_count(dtype, ratio, count):
    # ceil(0.3 * 50) = 15 and ceil(0.28 * 25) = 7, but in floating point the products round up to
    # 15.000001 (float32) and 7.000000000000001 (float64): a naive ceil makes the pool one too large.
    n = 64
    kernel, candidates = ratio_rows(n, [float(v) for v in range(count)], list(range(count)))
    pool = round(ratio * count)  # both products are whole numbers
    picked = set()
    for seed in range(6):
        neg = mine_negatives(kernel.to(dtype), torch.zeros(n, dtype=dtype), candidates, "ratio", ratio=ratio,
                             generator=torch.Generator().manual_seed(seed))
        picked |= set(neg.index.tolist())
    assert max(picked) == pool - 1  # only the `pool` hardest (kernel values 0 .. pool-1) are drawn


def test_ratio_is_deterministic_for_a_seeded_generator():
    g = torch.Generator().manual_seed(5)
    kernel = torch.rand(16, 16, generator=g)
    candidates = torch.rand(16, 16, generator=g) < 0.5
    a = mine_negatives(kernel, torch.zeros(16), candidates, "ratio", 1.0, torch.Generator().manual_seed(9))
    b = mine_negatives(kernel, torch.zeros(16), candidates, "ratio", 1.0, torch.Generator().manual_seed(9))
    assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)


def test_tiny_ratio_equals_hard_mining():
    g = torch.Generator().manual_seed(6)
    kernel = torch.rand(20, 20, generator=g, dtype=torch.float64)
    candidates = torch.rand(20, 20, generator=g) < 0.5
    hard = mine_negatives(kernel, torch.zeros(20, dtype=torch.float64), candidates, "hard")
    tiny = mine_negatives(kernel, torch.zeros(20, dtype=torch.float64), candidates, "ratio", ratio=1e-6,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(hard.valid, tiny.valid)
    assert torch.equal(hard.index[hard.valid], tiny.index[tiny.valid])


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        mine_negatives(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2, dtype=torch.bool), "easy")


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="ratio"):
        mine_negatives(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2, dtype=torch.bool), "ratio", ratio=ratio)


# --- lazy labels: the same triplets as the full NP-MPJPE matrix ---------------------------------------------

from vipe_ray.prvipe.matching import CentredPoses, indexed_np_mpjpe, pairwise_np_mpjpe  # noqa: E402
from vipe_ray.prvipe.mining import mine_negatives_lazy  # noqa: E402


def clustered_poses(n: int, g: torch.Generator, frames: int | None = None, prototypes: int = 5) -> torch.Tensor:
    """Poses around a few prototypes, so that many pairs match (NP-MPJPE < kappa) and many do not."""
    shape = (17, 3) if frames is None else (frames, 17, 3)
    centres = torch.randn((prototypes, *shape), generator=g, dtype=torch.float64)
    noise = torch.rand((n, *[1] * len(shape)), generator=g, dtype=torch.float64) * 0.06
    return centres[torch.randint(prototypes, (n,), generator=g)] + noise * torch.randn((n, *shape), generator=g,
                                                                                 dtype=torch.float64)


class CountingLabels:
    def __init__(self, poses: torch.Tensor):
        self.poses = CentredPoses.of(poses)
        self.pairs = 0

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        self.pairs += rows.numel()
        return indexed_np_mpjpe(self.poses, self.poses, rows, cols)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frames", [None, 3])
def test_lazy_labels_give_the_triplets_of_the_full_matrix(mode, frames):
    g = torch.Generator().manual_seed(3)
    seen_matches = seen_invalid = 0
    for trial in range(12):
        n = int(torch.randint(4, 48, (1,), generator=g))
        # Trial 0: one cluster, where some anchors have no candidate at all.
        poses = clustered_poses(n, g, frames, prototypes=1 if trial == 0 else 5)
        full = pairwise_np_mpjpe(poses, poses)
        candidates = candidate_mask(full, 0.1)
        seen_matches += int((~candidates).sum()) - n
        # Kernel values on a coarse grid: ties, which min/argmin break by the lowest column.
        kernel = torch.randint(0, 6, (n, n), generator=g).float() / 4
        d_ap = kernel.diagonal().clone() if trial % 2 else torch.rand(n, generator=g)
        for block in (1, 3, 64):
            expected = mine_negatives(kernel, d_ap, candidates, mode, 0.3, torch.Generator().manual_seed(trial))
            got = mine_negatives_lazy(kernel, d_ap, CountingLabels(poses), 0.1, mode, 0.3,
                                      torch.Generator().manual_seed(trial), block=block)
            assert torch.equal(got.valid, expected.valid), (trial, block)
            assert torch.equal(got.index, expected.index), (trial, block)
        seen_invalid += int((~expected.valid).sum())
    assert seen_matches > 0 and seen_invalid > 0, "the batches exercise matches and anchors without a negative"


@pytest.mark.parametrize("mode", ["semi_hard", "hard"])
def test_lazy_labels_compute_few_entries(mode):
    # Unrelated poses: nearly every pair is a negative, so the first round settles almost every anchor.
    g = torch.Generator().manual_seed(4)
    poses = torch.randn(128, 17, 3, generator=g, dtype=torch.float64)
    kernel = torch.rand(128, 128, generator=g)
    labels = CountingLabels(poses)
    negatives = mine_negatives_lazy(kernel, kernel.diagonal(), labels, 0.1, mode)
    assert negatives.valid.any()
    assert labels.pairs <= 128 + 4 * 6 < 128 * 128 // 50


def test_lazy_labels_fall_back_to_the_full_matrix_for_non_finite_kernels():
    g = torch.Generator().manual_seed(5)
    poses = clustered_poses(12, g)
    candidates = candidate_mask(pairwise_np_mpjpe(poses, poses), 0.1)
    kernel = torch.rand(12, 12, generator=g)
    kernel[0] = float("inf")
    kernel[1, :6] = float("inf")
    for mode in ("semi_hard", "hard"):
        expected = mine_negatives(kernel, kernel.diagonal(), candidates, mode)
        got = mine_negatives_lazy(kernel, kernel.diagonal(), CountingLabels(poses), 0.1, mode)
        assert torch.equal(got.index, expected.index) and torch.equal(got.valid, expected.valid)


def test_lazy_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        mine_negatives_lazy(torch.zeros(2, 2), torch.zeros(2), CountingLabels(torch.randn(2, 17, 3)), 0.1, "easy")


# --- symmetric triplets: the positive views mine among the anchor views ----------------------------------

from vipe_ray.prvipe.mining import mine_triplets  # noqa: E402


@pytest.mark.parametrize("mode", ["semi_hard", "hard"])
def test_symmetric_triplets_mine_the_transposed_kernel(mode):
    g = torch.Generator().manual_seed(6)
    n = 24
    poses = clustered_poses(n, g)
    candidates = candidate_mask(pairwise_np_mpjpe(poses, poses), 0.1)
    # An asymmetric ranking: row i (anchor view i) and column i (positive view i) rank differently.
    kernel = torch.rand(n, n, generator=g)
    one_way = mine_triplets(kernel, CountingLabels(poses), 0.1, mode)
    both = mine_triplets(kernel, CountingLabels(poses), 0.1, mode, symmetric=True)
    assert one_way.index.shape == (n, 1) and both.index.shape == (2 * n, 1)
    forward = mine_negatives(kernel, kernel.diagonal(), candidates, mode)
    # Positive view i is the anchor: its candidates are the anchor views j, ranked by kernel[j, i].
    reverse = mine_negatives(kernel.T, kernel.diagonal(), candidates, mode)
    assert torch.equal(one_way.index[:, 0], forward.index) and torch.equal(one_way.valid[:, 0], forward.valid)
    assert torch.equal(both.index[:, 0], torch.cat([forward.index, reverse.index]))
    assert torch.equal(both.valid[:, 0], torch.cat([forward.valid, reverse.valid]))
    # Hand check of one reverse negative: the nearest candidate in column 0 (hard mining).
    if mode == "hard":
        column = torch.where(candidates[0], kernel[:, 0], torch.tensor(float("inf")))
        assert int(both.index[n, 0]) == int(column.argmin())
    assert not torch.equal(forward.index, reverse.index), "the directions pick different negatives here"


@pytest.mark.parametrize("mode", ["semi_hard", "hard"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_several_negatives_are_the_first_in_the_modes_order(mode, symmetric):
    g = torch.Generator().manual_seed(7)
    n, count = 20, 3
    poses = clustered_poses(n, g, prototypes=3)
    candidates = candidate_mask(pairwise_np_mpjpe(poses, poses), 0.1)
    kernel = torch.rand(n, n, generator=g)
    got = mine_triplets(kernel, CountingLabels(poses), 0.1, mode, symmetric=symmetric, count=count)
    assert got.index.shape == got.valid.shape == ((2 if symmetric else 1) * n, count)
    short = 0
    for direction, ranking in enumerate([kernel] + ([kernel.T] if symmetric else [])):
        d_ap = kernel.diagonal()
        for i in range(n):
            # By hand: the anchor's candidates in order of kernel distance (semi-hard: farther than its positive).
            allowed = candidates[i] & ((ranking[i] > d_ap[i]) if mode == "semi_hard" else True)
            expected = [int(j) for j in torch.argsort(ranking[i], stable=True) if allowed[j]][:count]
            row = direction * n + i
            chosen = got.index[row][got.valid[row]].tolist()
            assert chosen == expected, (direction, i)
            assert got.valid[row].tolist() == [True] * len(expected) + [False] * (count - len(expected))
            short += len(expected) < count
    if mode == "semi_hard":
        assert short > 0, "some anchors have fewer candidates than asked for"


def test_several_negatives_refuse_ratio_mining():
    with pytest.raises(ValueError, match="semi_hard or hard"):
        mine_triplets(torch.rand(4, 4), CountingLabels(torch.randn(4, 17, 3)), 0.1, "ratio", count=2)


def test_nearest_candidates_put_the_positive_first_then_the_nearest_others():
    from vipe_ray.prvipe.mining import nearest_candidates

    kernel = torch.tensor([[5.0, 1.0, 3.0, 2.0],
                           [0.5, 9.0, 0.1, 4.0],
                           [1.0, 2.0, 3.0, 0.0],
                           [7.0, 6.0, 5.0, 0.0]])
    assert nearest_candidates(kernel, 2).tolist() == [[0, 1, 3], [1, 2, 0], [2, 3, 0], [3, 2, 1]]
    # The diagonal is never picked twice, and the count is capped by the others there are.
    assert nearest_candidates(kernel, 10).shape == (4, 4)
    assert nearest_candidates(kernel, 10)[:, 1:].eq(torch.arange(4)[:, None]).sum() == 0
