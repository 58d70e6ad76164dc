"""Tests for vipe_ray.prvipe.matching: NP-MPJPE (normalized, Procrustes-aligned MPJPE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vipe_ray.prvipe.matching import matches, np_mpjpe, pairwise_np_mpjpe, procrustes_align

PELVIS, SPINE, THORAX = 0, 7, 8


def reference_np_mpjpe(source: np.ndarray, target: np.ndarray) -> float:
    """Independent NumPy NP-MPJPE (Umeyama, column-vector form) of one [17, 3] pair."""

    def normalize(j: np.ndarray) -> np.ndarray:
        scale = np.linalg.norm(j[PELVIS] - j[SPINE]) + np.linalg.norm(j[SPINE] - j[THORAX])
        return (j - j[PELVIS]) / scale

    x, y = normalize(source), normalize(target)
    x = x - x.mean(0)
    y = y - y.mean(0)
    n = len(x)
    cov = y.T @ x / n                      # Sigma_yx
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[2, 2] = -1.0                     # no reflections
    rot = u @ s @ vt                       # y ~ c * rot @ x
    var_x = (x ** 2).sum() / n
    c = np.trace(np.diag(d) @ s) / var_x
    aligned = (c * rot @ x.T).T
    return float(np.linalg.norm(aligned - y, axis=1).mean())


def random_rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_poses(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 17, 3, generator=g, dtype=torch.float64)


def test_reference_is_sane():
    # The reference itself: 0 on a similarity copy, > 0 on an unrelated pose.
    p = random_poses(2, 0).numpy()
    assert reference_np_mpjpe(p[0], 2.0 * p[0] + 1.0) == pytest.approx(0.0, abs=1e-12)
    assert reference_np_mpjpe(p[0], p[1]) > 0.1


def test_zero_for_similarity_copies():
    g = torch.Generator().manual_seed(1)
    poses = random_poses(6, 1)
    copies = []
    for i in range(6):
        rot = random_rotation(g)
        scale = 0.1 + 5.0 * torch.rand((), generator=g, dtype=torch.float64)
        shift = 10.0 * torch.randn(3, generator=g, dtype=torch.float64)
        copies.append(scale * poses[i] @ rot.T + shift)
    copies = torch.stack(copies)
    d = np_mpjpe(copies, poses)
    assert d.shape == (6,)
    assert d.abs().max().item() < 1e-6
    assert np_mpjpe(poses, copies).abs().max().item() < 1e-6
    assert pairwise_np_mpjpe(copies, poses).diagonal().abs().max().item() < 1e-6


def test_zero_for_identical_poses_float32():
    poses = random_poses(4, 2).float()
    assert np_mpjpe(poses, poses).abs().max().item() < 1e-4


def test_matches_the_numpy_reference():
    src, tgt = random_poses(8, 3), random_poses(8, 4)
    # Also a near pair, where the alignment matters most.
    near = tgt[0] + 0.05 * random_poses(1, 5)[0]
    src = torch.cat([src, near[None]])
    tgt = torch.cat([tgt, tgt[:1]])
    got = np_mpjpe(src, tgt)
    expected = torch.tensor([reference_np_mpjpe(s.numpy(), t.numpy()) for s, t in zip(src, tgt)],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    assert got[-1] < got[:-1].min()


def test_mirrored_copy_is_not_a_match():
    pose = random_poses(1, 6)[0]
    mirror = pose * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    d = np_mpjpe(mirror, pose).item()
    assert d > 0.05
    assert d == pytest.approx(reference_np_mpjpe(mirror.numpy(), pose.numpy()), abs=1e-9)
    # With reflections allowed, the mirrored copy would align perfectly: the sign fix is what matters.
    x = (pose - pose.mean(0)).numpy()
    y = (mirror - mirror.mean(0)).numpy()
    u, _, vt = np.linalg.svd(x.T @ y)
    assert np.abs(x @ (u @ vt) - y).max() < 1e-9


def test_pairwise_equals_paired_entries():
    sources, targets = random_poses(5, 7), random_poses(4, 8)
    pw = pairwise_np_mpjpe(sources, targets)
    assert pw.shape == (5, 4)
    for i in range(5):
        paired = np_mpjpe(sources[i:i + 1].expand(4, 17, 3), targets)
        torch.testing.assert_close(pw[i], paired, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 20, 1 << 16])
def test_pairwise_is_independent_of_chunking(chunk):
    sources, targets = random_poses(6, 9), random_poses(4, 10)
    full = pairwise_np_mpjpe(sources, targets)
    torch.testing.assert_close(pairwise_np_mpjpe(sources, targets, chunk_pairs=chunk), full,
                               atol=1e-12, rtol=1e-12)


def test_pairwise_self_distance_diagonal_is_zero():
    poses = random_poses(5, 11)
    pw = pairwise_np_mpjpe(poses, poses)
    assert pw.diagonal().abs().max().item() < 1e-6
    off = pw[~torch.eye(5, dtype=torch.bool)]
    assert (off > 0.1).all()


def test_temporal_input_takes_the_max_over_frames():
    g = torch.Generator().manual_seed(12)
    sources = torch.randn(3, 4, 17, 3, generator=g, dtype=torch.float64)
    targets = torch.randn(2, 4, 17, 3, generator=g, dtype=torch.float64)
    out = pairwise_np_mpjpe(sources, targets)
    assert out.shape == (3, 2)
    per_frame = torch.stack([pairwise_np_mpjpe(sources[:, t], targets[:, t]) for t in range(4)])
    torch.testing.assert_close(out, per_frame.amax(0))
    # One frame that differs is enough to break a match of otherwise identical windows.
    window = sources[:1].clone()
    other = window.clone()
    other[0, 2] = targets[0, 2]
    d = pairwise_np_mpjpe(window, other)
    assert d.item() == pytest.approx(np_mpjpe(window[0, 2], targets[0, 2]).item(), rel=1e-9)
    assert d.item() > 0.1


@pytest.mark.parametrize("src_shape,tgt_shape", [((2, 3, 17, 3), (2, 4, 17, 3)), ((2, 3, 17, 3), (2, 17, 3))])
def test_temporal_shape_mismatch_raises(src_shape, tgt_shape):
    with pytest.raises(ValueError, match="frame"):
        pairwise_np_mpjpe(torch.randn(src_shape, dtype=torch.float64), torch.randn(tgt_shape, dtype=torch.float64))


def test_procrustes_align_recovers_a_similarity_copy():
    g = torch.Generator().manual_seed(13)
    src = torch.randn(17, 3, generator=g, dtype=torch.float64)
    rot = random_rotation(g)
    tgt = 0.7 * src @ rot + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(procrustes_align(src, tgt), tgt, atol=1e-10, rtol=0)


def test_matches_is_inclusive_at_kappa():
    d = torch.tensor([0.0, 0.05, 0.1, 0.1000001, 2.0], dtype=torch.float64)
    assert matches(d, 0.1).tolist() == [True, True, True, False, False]


# --- closed-form reflection sign and per-pair entries -------------------------------------------------------

from vipe_ray.prvipe.matching import CentredPoses, det3, indexed_np_mpjpe, reflection_sign  # noqa: E402


def test_det3_hand_computed():
    m = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]],
                      [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],   # a swap: -1
                      [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 10.0]],  # 1(50-48) - 2(40-42) + 3(32-35) = -3
                      [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]]], dtype=torch.float64)  # rank 2
    assert det3(m).tolist() == [24.0, -1.0, -3.0, 0.0]
    r = torch.randn(50, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(det3(r), torch.linalg.det(r), atol=1e-12, rtol=1e-12)


def svd_sign(h: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(h)
    return torch.sign(torch.linalg.det(u @ vh))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reflection_sign_agrees_with_the_svd_on_random_matrices(dtype):
    h = torch.randn(2000, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    sign = reflection_sign(h)
    assert sign.dtype == dtype
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(sign, svd_sign(h))


@pytest.mark.parametrize("dtype,smallest", [(torch.float64, [1e-3, 1e-6, 1e-9, 1e-12]),
                                            (torch.float32, [1e-2, 1e-3, 1e-4])])
def test_reflection_sign_agrees_with_the_svd_on_near_degenerate_matrices(dtype, smallest):
    # H = A diag(1, t, e) B with random orthogonal A, B (either handedness): the sign rests on the tiny e.
    g = torch.Generator().manual_seed(2)
    a, _ = torch.linalg.qr(torch.randn(400, 3, 3, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(400, 3, 3, generator=g, dtype=torch.float64))
    for e in smallest:
        s = torch.tensor([1.0, 0.5, e], dtype=torch.float64)
        h = ((a * s[None, None, :]) @ b).to(dtype)
        assert torch.equal(reflection_sign(h), svd_sign(h)), e
        assert torch.equal(reflection_sign(h.double()), torch.sign(torch.linalg.det(a) * torch.linalg.det(b)))


def test_reflection_sign_of_a_singular_matrix_falls_back_to_the_svd():
    h = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]]], dtype=torch.float64)
    u, _, vh = torch.linalg.svd(h)
    assert torch.equal(reflection_sign(h, u, vh), torch.sign(torch.linalg.det(u @ vh)))
    assert reflection_sign(h).tolist() == [1.0]  # no factors given: +1, as the former sign(0) -> 1


def test_rotation_is_proper_even_when_the_best_orthogonal_map_is_a_reflection():
    pose = random_poses(1, 14)[0]
    mirror = pose * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    aligned = procrustes_align(mirror, pose)
    xs, xt = mirror - mirror.mean(0), aligned - pose.mean(0)
    rotation = torch.linalg.lstsq(xs, xt).solution
    assert torch.linalg.det(rotation).item() > 0


@pytest.mark.parametrize("frames", [None, 3])
def test_indexed_entries_equal_the_pairwise_matrix_bit_for_bit(frames):
    g = torch.Generator().manual_seed(15)
    shape = (9, 17, 3) if frames is None else (9, frames, 17, 3)
    sources = torch.randn(shape, generator=g)
    targets = torch.randn((7, *shape[1:]), generator=g)
    full = pairwise_np_mpjpe(sources, targets)
    src, tgt = CentredPoses.of(sources), CentredPoses.of(targets)
    rows, cols = torch.randint(9, (25,), generator=g), torch.randint(7, (25,), generator=g)
    assert torch.equal(indexed_np_mpjpe(src, tgt, rows, cols), full[rows, cols])
    # One pair alone gives the value it has among many.
    assert torch.equal(indexed_np_mpjpe(src, tgt, rows[:1], cols[:1]), full[rows[:1], cols[:1]])
