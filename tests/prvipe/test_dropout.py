"""Tests for vipe_ray.prvipe.dropout (keypoint visibility masks) and vipe_ray.prvipe.views (what the model sees)."""

from __future__ import annotations

import math

import pytest
import torch

from vipe_ray.prvipe.cameras import CameraRanges, OrbitCamera, Orbits, render, sample_orbits
from vipe_ray.config import ConfigError, KeypointDropoutConfig
from vipe_ray.prvipe.dropout import keypoint_visibility
from vipe_ray.prvipe.keypoints import OCCLUSION_GROUPS, TORSO_2D, normalize_2d, normalize_masked
from vipe_ray.prvipe.views import normalized_view, rendered_view, view_features

GROUP_SETS = [frozenset(g) for g in OCCLUSION_GROUPS.values()]


def cfg(mode: str, instance: float = 0.3, keypoint: float = 0.1) -> KeypointDropoutConfig:
    return KeypointDropoutConfig(mode=mode, instance_prob=instance, keypoint_prob=keypoint)


def hidden_sets(visible: torch.Tensor) -> list[frozenset]:
    return [frozenset(torch.nonzero(~row).flatten().tolist()) for row in visible]


# ----------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("shape", [(7,), (5, 3)])
def test_off_keeps_everything_visible(shape):
    vis = keypoint_visibility(shape, cfg("off", 1.0, 1.0), torch.Generator().manual_seed(0))
    assert vis.shape == (*shape, 13)
    assert vis.dtype == torch.bool
    assert vis.all()


def test_independent_hidden_fraction():
    n = 20000
    vis = keypoint_visibility((n,), cfg("independent", 0.5, 0.2), torch.Generator().manual_seed(1))
    hidden = ~vis
    # Each keypoint is hidden with instance_prob * keypoint_prob = 0.1 (std of the mean ~0.0008).
    assert hidden.float().mean().item() == pytest.approx(0.1, abs=0.005)
    # Per keypoint too (std ~0.002).
    assert torch.allclose(hidden.float().mean(0), torch.full((13,), 0.1), atol=0.01)
    # An instance shows any hidden keypoint with 0.5 * (1 - 0.8 ** 13).
    assert hidden.any(1).float().mean().item() == pytest.approx(0.5 * (1 - 0.8 ** 13), abs=0.015)


def test_independent_extremes():
    vis = keypoint_visibility((50,), cfg("independent", 0.0, 1.0), torch.Generator().manual_seed(2))
    assert vis.all()
    vis = keypoint_visibility((50,), cfg("independent", 1.0, 1.0), torch.Generator().manual_seed(2))
    assert not vis.any()
    vis = keypoint_visibility((50,), cfg("independent", 1.0, 0.0), torch.Generator().manual_seed(2))
    assert vis.all()


def test_training_views_keep_a_torso_they_can_be_normalized_with():
    """Dropout that hides every keypoint leaves the torso visible in the training view, and only the torso."""
    joints = windows(16, 1)
    o = sample_orbits(16, CameraRanges(), torch.Generator().manual_seed(4))
    feats = view_features(joints, o, cfg("independent", 1.0, 1.0), generator=torch.Generator().manual_seed(5))
    visible = feats[..., 26:] > 0
    assert torch.equal(visible.nonzero()[:, 2].unique(), torch.tensor(sorted(TORSO_2D)))
    assert visible[..., list(TORSO_2D)].all()


def test_structured_hides_exactly_one_group():
    n = 4000
    vis = keypoint_visibility((n,), cfg("structured", 1.0), torch.Generator().manual_seed(3))
    sets = hidden_sets(vis)
    assert all(s in GROUP_SETS for s in sets)
    # Every group gets drawn, roughly uniformly.
    counts = {g: sets.count(g) for g in GROUP_SETS}
    expected = n / len(GROUP_SETS)
    assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts


def test_structured_respects_instance_prob():
    n = 4000
    vis = keypoint_visibility((n,), cfg("structured", 0.25), torch.Generator().manual_seed(4))
    sets = hidden_sets(vis)
    assert all(s == frozenset() or s in GROUP_SETS for s in sets)
    touched = sum(1 for s in sets if s)
    assert touched / n == pytest.approx(0.25, abs=0.03)


def test_both_hides_a_group_plus_independent_keypoints():
    n = 2000
    vis = keypoint_visibility((n,), cfg("both", 1.0, 0.1), torch.Generator().manual_seed(5))
    sets = hidden_sets(vis)
    assert all(any(g <= s for g in GROUP_SETS) for s in sets)
    assert any(s not in GROUP_SETS for s in sets)  # independent drops add to the group


def test_temporal_windows_share_one_mask():
    vis = keypoint_visibility((300, 5), cfg("both", 0.8, 0.3), torch.Generator().manual_seed(6))
    assert vis.shape == (300, 5, 13)
    assert torch.equal(vis, vis[:, :1].expand_as(vis))
    assert (~vis).any()


def test_seeded_determinism():
    c = cfg("both", 0.7, 0.3)
    a = keypoint_visibility((64,), c, torch.Generator().manual_seed(7))
    b = keypoint_visibility((64,), c, torch.Generator().manual_seed(7))
    d = keypoint_visibility((64,), c, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, d)


def test_bad_batch_shape_raises():
    with pytest.raises(ValueError, match="batch shape"):
        keypoint_visibility((2, 3, 4), cfg("off"))


@pytest.mark.parametrize("field", ["instance_prob", "keypoint_prob"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probabilities_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"keypoint_dropout.{field}"):
        KeypointDropoutConfig(**{field: value})


# ----------------------------------------------------------------------------------------------- views


def standing_pose() -> torch.Tensor:
    return torch.tensor([
        [0.00, 0.00, 1.00], [0.00, -0.12, 1.00], [0.02, -0.12, 0.55], [0.00, -0.12, 0.10],
        [0.00, 0.12, 1.00], [0.02, 0.12, 0.55], [0.00, 0.12, 0.10], [0.00, 0.00, 1.25],
        [0.00, 0.00, 1.50], [0.02, 0.00, 1.60], [0.03, 0.00, 1.75], [0.00, 0.20, 1.45],
        [0.00, 0.25, 1.20], [0.10, 0.25, 1.00], [0.00, -0.20, 1.45], [0.00, -0.25, 1.20],
        [0.10, -0.25, 1.00],
    ])


def windows(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = standing_pose()[None, None].expand(b, t, 17, 3)
    moved = base + 0.05 * torch.randn(b, t, 17, 3, generator=g)
    return moved + torch.randn(b, 1, 1, 3, generator=g)  # each window somewhere else in the room


def test_normalized_view_shape_and_normalization():
    joints = windows(3, 2)
    o = sample_orbits(3, CameraRanges(), torch.Generator().manual_seed(1))
    kp = normalized_view(joints, o)
    assert kp.shape == (3, 2, 13, 2)
    assert kp.dtype == torch.float32
    torch.testing.assert_close(0.5 * (kp[..., 7, :] + kp[..., 8, :]), torch.zeros(3, 2, 2), atol=1e-6, rtol=0)
    # Each window is seen by its own camera in every frame.
    for i in range(3):
        one = Orbits(*(x[i:i + 1].expand(2) for x in (o.azimuth, o.elevation, o.distance, o.roll)))
        expected = normalize_2d(render(joints[i].double(), one)).float()
        torch.testing.assert_close(kp[i], expected)


def test_view_features_without_dropout():
    joints = windows(4, 3)
    o = sample_orbits(4, CameraRanges(), torch.Generator().manual_seed(2))
    feats = view_features(joints, o, cfg("off"))
    assert feats.shape == (4, 3, 39)
    assert torch.equal(feats[..., 26:], torch.ones(4, 3, 13))
    torch.testing.assert_close(feats[..., :26], normalized_view(joints, o).flatten(-2))


def test_view_features_hidden_keypoints_are_zeroed_and_flagged():
    joints = windows(64, 2)
    o = Orbits.from_cameras([OrbitCamera(30, 10, 4.0)]).expand(64)
    clean = view_features(joints, o, cfg("off"))
    feats = view_features(joints, o, cfg("both", 1.0, 0.2), generator=torch.Generator().manual_seed(3))
    flags = feats[..., 26:]
    coords = feats[..., :26].reshape(64, 2, 13, 2)
    hidden = flags == 0
    assert set(flags.unique().tolist()) == {0.0, 1.0}
    assert hidden.any()
    assert (coords[hidden] == 0).all()
    # Visible keypoints are normalized from the visible ones only (the deployed model's rule); the mask is
    # shared over the window's frames.
    expected, valid = normalize_masked(rendered_view(joints, o), ~hidden)
    assert valid.all()
    torch.testing.assert_close(coords, expected.float())
    clean_coords = clean[..., :26].reshape(64, 2, 13, 2)
    torso_seen = (~hidden[..., list(TORSO_2D)]).all(-1)
    torch.testing.assert_close(coords[torso_seen][~hidden[torso_seen]], clean_coords[torso_seen][~hidden[torso_seen]])
    assert torch.equal(flags[:, 0], flags[:, 1])


def test_view_features_jitter_is_seeded():
    joints = windows(4, 1)
    o = Orbits.from_cameras([OrbitCamera(0, 0, 3.0)]).expand(4)
    a = view_features(joints, o, cfg("off"), jitter=0.01, generator=torch.Generator().manual_seed(4))
    b = view_features(joints, o, cfg("off"), jitter=0.01, generator=torch.Generator().manual_seed(4))
    clean = view_features(joints, o, cfg("off"))
    assert torch.equal(a, b)
    diff = (a - clean)[..., :26]
    assert 0 < diff.abs().max().item() < 0.1
    assert diff.std().item() == pytest.approx(0.01, rel=0.5)
    assert math.isclose((a - clean)[..., 26:].abs().max().item(), 0.0)
