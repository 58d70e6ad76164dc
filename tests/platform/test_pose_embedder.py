"""The deployable embedder: one normalization with training, per-pose results for poses it cannot read."""

from __future__ import annotations

import math

import torch

from vipe_ray.prvipe.cameras import OrbitCamera, Orbits
from vipe_ray.config import KeypointDropoutConfig, load_config
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.prvipe.keypoints import COCO13_KEYPOINTS
from vipe_ray.platform.tracking import PoseEmbedder
from vipe_ray.training.checkpoint import build_model
from vipe_ray.prvipe.views import rendered_view, view_features

L_HIP, R_HIP = COCO13_KEYPOINTS.index("l_hip"), COCO13_KEYPOINTS.index("r_hip")
L_SHOULDER = COCO13_KEYPOINTS.index("l_shoulder")


def _model_and_poses(tiny_overrides, n: int = 32):
    config = load_config(overrides=tiny_overrides)
    torch.manual_seed(0)
    model = build_model(config).eval()
    table = load_table(config.data.table_path()).select(["10"])
    joints = WindowSampler(table).sample(n, torch.Generator().manual_seed(1))  # [n, 1, 17, 3]
    camera = Orbits.from_cameras([OrbitCamera(30, 15, 4.0, 10)]).expand(n)
    return model, joints, camera


def test_training_views_and_deployment_see_the_same_masked_input(tiny_overrides):
    """A dropout-trained model sees in use exactly what it saw in training (hidden keypoints never count)."""
    model, joints, camera = _model_and_poses(tiny_overrides)
    dropout = KeypointDropoutConfig(mode="both", instance_prob=1.0, keypoint_prob=0.3)
    feats = view_features(joints, camera, dropout, generator=torch.Generator().manual_seed(2))[:, 0]
    visible = feats[:, 26:] > 0
    assert (~visible).any(1).all(), "every pose lost keypoints"
    pixels = rendered_view(joints, camera)[:, 0]
    missing = torch.where(visible[..., None], pixels, torch.full_like(pixels, math.nan))
    embedder = PoseEmbedder(model).eval()
    with torch.no_grad():
        mean, sigma, valid = embedder.embed(missing)
        expected_mean, expected_sigma = model(feats)
    assert valid.all()
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, expected_sigma, atol=1e-5, rtol=1e-5)


def test_a_pose_without_hips_or_torso_gets_its_own_nan_result(tiny_overrides):
    model, joints, camera = _model_and_poses(tiny_overrides, n=6)
    pixels = rendered_view(joints, camera)[:, 0].float()
    embedder = PoseEmbedder(model).eval()
    with torch.no_grad():
        clean = embedder(pixels)
    broken = pixels.clone()
    broken[1, [L_HIP, R_HIP]] = math.nan  # no hips: centred on the shoulders, still embedded
    broken[3, [L_HIP, R_HIP, L_SHOULDER]] = math.nan  # one torso keypoint left: cannot be normalized
    broken[4] = math.nan  # nothing visible
    with torch.no_grad():
        out = embedder(broken)
        mean, _, valid = embedder.embed(broken)
    assert valid.tolist() == [True, True, True, False, False, True]
    assert torch.isnan(out[[3, 4]]).all() and torch.isfinite(out[[0, 1, 2, 5]]).all()
    torch.testing.assert_close(out[[0, 2, 5]], clean[[0, 2, 5]])
    assert not torch.allclose(out[1], clean[1]), "hidden hips change the input"
    assert torch.isnan(mean[3]).all()


def test_temporal_window_is_invalid_when_any_frame_is(tiny_overrides):
    tiny_overrides["temporal"] = {"enabled": True, "frames": 3}
    config = load_config(overrides=tiny_overrides)
    model = build_model(config).eval()
    g = torch.Generator().manual_seed(0)
    pixels = 500 + 100 * torch.randn(4, 3, 13, 2, generator=g)
    pixels[2, 1] = math.nan
    with torch.no_grad():
        out = PoseEmbedder(model).eval()(pixels)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


def test_an_unbatched_pose_gets_a_clear_error(tiny_overrides):
    import pytest

    from vipe_ray.prvipe.keypoints import KeypointError

    model, _, _ = _model_and_poses(tiny_overrides, n=2)
    with pytest.raises(KeypointError, match=r"expected keypoints \[batch, 13, 2\].*got \[13, 2\]"):
        PoseEmbedder(model).eval()(torch.zeros(13, 2))
    with pytest.raises(KeypointError, match=r"got \[4, 17, 2\]"):
        PoseEmbedder(model).eval()(torch.zeros(4, 17, 2))
