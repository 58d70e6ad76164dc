"""Tests for vipe_ray.prvipe.losses: the match probability, kernel distance and the three losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vipe_ray.prvipe.losses import (
    MatchProbability,
    a_to_raw,
    gaussian_kl,
    graded_ranking_loss,
    kernel_distance,
    positive_pairwise_loss,
    sample_distances,
    triplet_ratio_loss,
)

A0, B0, S = math.exp(-0.65), -0.5, 0.1


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def p_hand(d: float, a: float = A0, b: float = B0, s: float = S) -> float:
    return (1 - s) * sigmoid(-a * d + b) + s / 2


# ----------------------------------------------------------------------------------------------- a, b


@pytest.mark.parametrize("a", [0.01, math.exp(-0.65), 0.999, 1.0, 1.5, 7.0])
def test_a_to_raw_inverts_elu_plus_one(a):
    raw = a_to_raw(a)
    assert (F.elu(torch.tensor(raw, dtype=torch.float64)) + 1.0).item() == pytest.approx(a, rel=1e-12)


def test_a_to_raw_branches():
    assert a_to_raw(2.5) == pytest.approx(1.5)
    assert a_to_raw(math.exp(-0.65)) == pytest.approx(-0.65)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            a_to_raw(bad)


def test_default_parameters_follow_the_reference():
    m = MatchProbability()
    assert m.a.item() == pytest.approx(A0, rel=1e-6)
    assert m.a_raw.item() == pytest.approx(-0.65, rel=1e-6)
    assert m.b.item() == pytest.approx(-0.5)
    assert m.smoothing == pytest.approx(0.1)
    assert {n for n, _ in m.named_parameters()} == {"a_raw", "b"}


def test_a_stays_positive():
    m = MatchProbability()
    with torch.no_grad():
        m.a_raw.fill_(-10.0)
    assert m.a.item() > 0


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_bad_smoothing_raises(s):
    with pytest.raises(ValueError, match="smoothing"):
        MatchProbability(smoothing=s)


# ----------------------------------------------------------------------------------------------- probability


def test_hand_case_distance_two():
    m = MatchProbability().double()
    z1 = torch.tensor([[[0.0, 0.0, 0.0]]], dtype=torch.float64)
    z2 = torch.tensor([[[0.0, 2.0, 0.0]]], dtype=torch.float64)
    p = m(z1, z2)
    assert p.shape == (1,)
    expected = 0.9 * sigmoid(-A0 * 2.0 - 0.5) + 0.05  # a_raw is stored in float32: compare to 1e-6
    assert p.item() == pytest.approx(expected, rel=1e-6)
    assert kernel_distance(p).item() == pytest.approx(-math.log(expected), rel=1e-6)


def test_k_by_k_averaging_hand_case():
    m = MatchProbability(a_init=1.5, b_init=0.25, smoothing=0.2).double()
    z1 = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)   # K1 = 2
    z2 = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)   # K2 = 2
    # Sample distances: 0, 3, 1, 2.
    expected = sum(p_hand(d, 1.5, 0.25, 0.2) for d in (0.0, 3.0, 1.0, 2.0)) / 4
    assert m(z1, z2).item() == pytest.approx(expected, rel=1e-12)
    # Uneven sample counts: K1 = 2 against K2 = 1.
    expected = (p_hand(0.0, 1.5, 0.25, 0.2) + p_hand(1.0, 1.5, 0.25, 0.2)) / 2
    assert m(z1, z2[:, :1]).item() == pytest.approx(expected, rel=1e-12)


def test_batch_is_paired():
    m = MatchProbability().double()
    z1 = torch.tensor([[[0.0]], [[0.0]]], dtype=torch.float64)
    z2 = torch.tensor([[[1.0]], [[4.0]]], dtype=torch.float64)
    torch.testing.assert_close(m(z1, z2), torch.tensor([p_hand(1.0), p_hand(4.0)], dtype=torch.float64))


def test_probability_is_bounded_by_smoothing():
    m = MatchProbability().double()
    d = torch.tensor([0.0, 1e-3, 1.0, 10.0, 100.0, 1e6], dtype=torch.float64)
    p = m.from_distance(d)
    assert (p >= 0.05).all() and (p <= 0.95).all()
    assert (p[:4] > 0.05).all() and (p[:4] < 0.95).all()
    assert p[-1].item() == pytest.approx(0.05, abs=1e-12)
    assert (p[1:] < p[:-1]).sum() >= 4  # decreasing with distance
    # A very confident sigmoid (large b) still stops at 1 - s/2.
    m2 = MatchProbability(b_init=100.0).double()
    assert m2.from_distance(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(0.95, abs=1e-12)
    # Hence the kernel distance stays within (-log 0.95, -log 0.05) ~ (0.051, 3.0).
    dist = kernel_distance(torch.cat([p, m2.from_distance(torch.zeros(1, dtype=torch.float64))]))
    assert dist.min().item() >= -math.log(0.95) - 1e-12
    assert dist.max().item() <= -math.log(0.05) + 1e-12


def test_zero_smoothing_allows_the_full_range():
    m = MatchProbability(smoothing=0.0).double()
    assert m.from_distance(torch.tensor([0.0], dtype=torch.float64)).item() == pytest.approx(sigmoid(B0))


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_pairwise_matches_forward_for_all_pairs(chunk):
    g = torch.Generator().manual_seed(0)
    m = MatchProbability().double()
    z1 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(4, 2, 4, generator=g, dtype=torch.float64)
    pw = m.pairwise(z1, z2, chunk=chunk)
    assert pw.shape == (5, 4)
    for j in range(4):
        with torch.no_grad():
            col = m(z1, z2[j:j + 1].expand(5, 2, 4))
        torch.testing.assert_close(pw[:, j], col, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_pairwise_diagonal_equals_forward(chunk):
    g = torch.Generator().manual_seed(1)
    m = MatchProbability().double()
    z1 = torch.randn(6, 4, 8, generator=g, dtype=torch.float64)
    z2 = z1 + 0.1 * torch.randn(6, 4, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m.pairwise(z1, z2, chunk=chunk).diagonal(), m(z1, z2), atol=1e-10, rtol=1e-10)
        # Identical samples (distance exactly 0 in forward): the squared-distance expansion stays close.
        torch.testing.assert_close(m.pairwise(z1, z1, chunk=chunk).diagonal(), m(z1, z1), atol=1e-6, rtol=0)


def test_pairwise_float32_close_to_forward():
    g = torch.Generator().manual_seed(2)
    m = MatchProbability()
    z = torch.randn(6, 5, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m.pairwise(z, z, chunk=4).diagonal(), m(z, z), atol=1e-4, rtol=0)


def test_gradients_reach_a_b_and_embeddings():
    g = torch.Generator().manual_seed(3)
    m = MatchProbability()
    z1 = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    z2 = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    loss = kernel_distance(m(z1, z2)).mean()
    loss.backward()
    for t in (m.a_raw, m.b, z1, z2):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum().item() > 0
    # Increasing b raises every probability, so it lowers the kernel distance: dL/db < 0.
    assert m.b.grad.item() < 0
    # A steeper sigmoid lowers the probability at positive distances: dL/da_raw > 0.
    assert m.a_raw.grad.item() > 0


@pytest.mark.parametrize("k1,k2", [(20, 20), (8, 8), (4, 4), (1, 3)])
def test_sample_distances_equal_cdist_in_value_and_gradient(k1, k2):
    """Both paths (the centred product for many samples, cdist for few) give cdist's distances and gradients."""
    g = torch.Generator().manual_seed(4)
    # Embeddings far from the origin, with samples close together: where an uncentred |x|^2 + |y|^2 - 2 x.y
    # would cancel.
    centre = 30.0 * torch.randn(6, 1, 64, generator=g)
    z1 = (centre + 0.05 * torch.randn(6, k1, 64, generator=g)).requires_grad_()
    z2 = (centre + 0.05 * torch.randn(6, k2, 64, generator=g)).requires_grad_()
    probe = torch.randn(6, k1, k2, generator=g)
    d = sample_distances(z1, z2)
    (d * probe).sum().backward()
    z1d, z2d = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    exact = torch.cdist(z1d, z2d)
    (exact * probe.double()).sum().backward()
    assert d.shape == (6, k1, k2)
    torch.testing.assert_close(d.double(), exact, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(z1.grad.double(), z1d.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(z2.grad.double(), z2d.grad, atol=1e-3, rtol=1e-3)


def test_sample_distances_take_any_leading_shape_and_stay_fp32_under_autocast():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(2, 3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    d = sample_distances(z1, z2)
    assert d.shape == (2, 3, 10, 10)
    torch.testing.assert_close(d, torch.cdist(z1, z2.expand(2, 3, 10, 8)), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sample_distances(z1[0], z2)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, d[0], atol=1e-5, rtol=1e-5)


def test_sample_distances_of_coinciding_samples_are_zero_with_a_finite_gradient():
    z = torch.randn(3, 10, 16, requires_grad=True)
    d = sample_distances(z, z)
    # Rounding of |x|^2 ~ 16 (fp32: ~1e-6) under the root: a self-distance of ~1e-3, not cdist's exact 0.
    assert d.diagonal(dim1=1, dim2=2).max().item() < 1e-2
    d.sum().backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------- losses


def test_triplet_ratio_loss_hand_case():
    d_ap = torch.tensor([1.0, 0.2, 2.0, 0.5, 0.3])
    d_an = torch.tensor([0.5, 2.0, 1.0, 0.1, 0.3 + math.log(2.0) + 0.5])
    valid = torch.tensor([True, True, False, True, True])
    loss, active = triplet_ratio_loss(d_ap, d_an, valid)
    ln2 = math.log(2.0)
    # Active: 0 (1 - 0.5 + ln2), 3 (0.5 - 0.1 + ln2); 1 and 4 are satisfied; 2 has no negative.
    expected = ((1.0 - 0.5 + ln2) + (0.5 - 0.1 + ln2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert active.tolist() == [True, False, False, True, False]


def test_triplet_ratio_loss_custom_margin():
    d_ap = torch.tensor([1.0, 1.0])
    d_an = torch.tensor([1.0, 1.5])
    loss, active = triplet_ratio_loss(d_ap, d_an, torch.tensor([True, True]), margin=1.0)
    assert loss.item() == pytest.approx((1.0 + 0.5) / 2)
    assert active.tolist() == [True, True]


def test_triplet_ratio_loss_all_inactive_is_zero():
    d_ap = torch.tensor([0.1, 0.2], requires_grad=True)
    d_an = torch.tensor([3.0, 3.0], requires_grad=True)
    loss, active = triplet_ratio_loss(d_ap, d_an, torch.tensor([True, True]))
    assert loss.item() == 0.0
    assert not active.any()
    loss.backward()
    assert torch.isfinite(d_ap.grad).all() and d_ap.grad.abs().sum() == 0
    # No valid anchors at all: also 0, nothing active.
    loss, active = triplet_ratio_loss(torch.tensor([3.0]), torch.tensor([0.1]), torch.tensor([False]))
    assert loss.item() == 0.0 and not active.any()


def test_triplet_ratio_loss_gradient_only_from_active():
    d_ap = torch.tensor([1.0, 0.1, 1.0], requires_grad=True)
    d_an = torch.tensor([1.0, 3.0, 1.0], requires_grad=True)
    loss, _ = triplet_ratio_loss(d_ap, d_an, torch.tensor([True, True, False]))
    loss.backward()
    torch.testing.assert_close(d_ap.grad, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(d_an.grad, torch.tensor([-1.0, 0.0, 0.0]))


def test_positive_pairwise_loss_is_the_mean():
    assert positive_pairwise_loss(torch.tensor([0.5, 1.5, 4.0])).item() == pytest.approx(2.0)


def test_gaussian_kl_zero_at_the_prior():
    assert gaussian_kl(torch.zeros(3, 16), torch.ones(3, 16)).item() == pytest.approx(0.0, abs=1e-7)


def test_gaussian_kl_hand_case():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    sigma = torch.tensor([[2.0, 0.5], [1.0, 1.0]], dtype=torch.float64)
    # Row 0: 0.5 * [(4 + 1 - 1 - 2 ln 2) + (0.25 + 4 - 1 + 2 ln 2)] = 3.625; row 1: 0. Mean over rows.
    assert gaussian_kl(mean, sigma).item() == pytest.approx(3.625 / 2, rel=1e-12)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(5, 4, generator=g, dtype=torch.float64)
    sigma = 0.2 + torch.rand(5, 4, generator=g, dtype=torch.float64) * 2
    q = torch.distributions.Normal(mean, sigma)
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(sigma))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(gaussian_kl(mean, sigma), expected)
    assert gaussian_kl(mean, sigma).item() > 0


# ---------------------------------------------------------------------------------------- graded ranking


def test_graded_ranking_loss_hand_case():
    """Two candidates: target softmax(-e / t), prediction softmax(s); cross-entropy by hand."""
    scores = torch.tensor([[0.0, math.log(3.0)]])  # prediction 1/4, 3/4
    error = torch.tensor([[0.0, 0.1]])
    q0 = 1.0 / (1.0 + math.exp(-0.1 / 0.05))
    expected = -(q0 * math.log(0.25) + (1 - q0) * math.log(0.75))
    assert graded_ranking_loss(scores, error, 0.05).item() == pytest.approx(expected, rel=1e-6)


def test_graded_ranking_loss_is_least_when_scores_follow_the_errors():
    error = torch.tensor([[0.0, 0.05, 0.3], [0.2, 0.0, 0.1]], dtype=torch.float64)
    t = 0.05
    following = graded_ranking_loss(-error / t, error, t)
    # At scores equal to the target's logits the cross-entropy is the target's entropy, its minimum.
    target = torch.softmax(-error / t, 1)
    assert following.item() == pytest.approx(-(target * target.log()).sum(1).mean().item(), rel=1e-12)
    reversed_ = graded_ranking_loss(error / t, error, t)
    shifted = graded_ranking_loss(-error / t + 5.0, error, t)
    assert reversed_ > following
    assert shifted.item() == pytest.approx(following.item(), rel=1e-12), "a shift of a row's scores changes nothing"


def test_ranking_logits_have_no_floor_and_leave_a_b_fixed():
    """Unlike log P (floored at log(s/2) by smoothing), the scores keep falling with distance, and only the
    embeddings get their gradient."""
    match = MatchProbability()
    z1 = torch.zeros(2, 1, 1)
    z2 = torch.tensor([[[40.0]], [[80.0]]], requires_grad=True)
    log_p = kernel_distance(match(z1, z2)).neg()
    assert log_p[0].item() == pytest.approx(log_p[1].item(), abs=1e-9), "log P sits at its floor for both"
    scores = match.ranking_logits(z1, z2)
    assert scores[0].item() == pytest.approx(math.log(sigmoid(-A0 * 40 + B0)), rel=1e-6)
    assert scores[1] < scores[0] - 20
    scores.sum().backward()
    assert match.a_raw.grad is None and match.b.grad is None
    assert z2.grad.abs().min() > 0


def test_ranking_logits_average_the_sample_pairs():
    match = MatchProbability()
    z1 = torch.tensor([[[0.0], [1.0]]])
    z2 = torch.tensor([[[0.0], [3.0]]])
    ds = [0.0, 3.0, 1.0, 2.0]
    expected = math.log(sum(sigmoid(-A0 * d + B0) for d in ds) / 4)
    assert match.ranking_logits(z1, z2).item() == pytest.approx(expected, rel=1e-6)


def test_tail_ranking_logits_rank_near_poses_the_sigmoid_ceiling_flattens():
    """At a large b the sigmoid scores two near candidates alike (both near log 1); the tail keeps their gap,
    ``-a (d1 - d2)``, and is ``log mean exp(-a d)`` over the sample pairs."""
    match = MatchProbability(a_init=2.0, b_init=20.0)
    z1 = torch.zeros(2, 1, 1)
    z2 = torch.tensor([[[0.1]], [[0.3]]])
    ceiling = match.ranking_logits(z1, z2)
    assert abs((ceiling[0] - ceiling[1]).item()) < 1e-7
    tail = match.ranking_logits(z1, z2, scores="tail")
    assert (tail[0] - tail[1]).item() == pytest.approx(2.0 * 0.2, rel=1e-5)
    z1 = torch.tensor([[[0.0], [1.0]]])
    z2 = torch.tensor([[[0.0], [3.0]]])
    expected = math.log(sum(math.exp(-2.0 * d) for d in [0.0, 3.0, 1.0, 2.0]) / 4)
    assert match.ranking_logits(z1, z2, scores="tail").item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="'cosine'"):
        match.ranking_logits(z1, z2, scores="cosine")
