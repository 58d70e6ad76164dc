"""Tests for vipe_ray.prvipe.model: input features, the Pr-VIPE embedder and the 3D-lifting baseline."""

from __future__ import annotations

import math

import pytest
import torch

from vipe_ray.config import LossConfig, ModelConfig
from vipe_ray.prvipe.keypoints import pose_features
from vipe_ray.prvipe.model import FEATURES_PER_POSE, Embedding, Lifter, PrVipe

SMALL = ModelConfig(width=32, blocks=1, dropout=0.1, embedding_dim=4, samples=3)


def features(b: int, *frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *frames, FEATURES_PER_POSE, generator=g)


def build(model: ModelConfig = SMALL, frames: int = 1, seed: int = 0, loss: LossConfig | None = None) -> PrVipe:
    torch.manual_seed(seed)
    return PrVipe(model, loss or LossConfig(), frames=frames)


# ----------------------------------------------------------------------------------------------- features


def test_pose_features_layout_and_zeroing():
    kp = torch.arange(26, dtype=torch.float32).reshape(13, 2) + 1.0
    visible = torch.ones(13, dtype=torch.bool)
    visible[[0, 5]] = False
    f = pose_features(kp, visible)
    assert FEATURES_PER_POSE == 39
    assert f.shape == (39,)
    expected = kp.clone()
    expected[[0, 5]] = 0.0
    assert torch.equal(f[:26], expected.flatten())  # (x0, y0, x1, y1, ...)
    assert torch.equal(f[26:], visible.float())
    batch = pose_features(kp.expand(2, 3, 13, 2), visible.expand(2, 3, 13))
    assert batch.shape == (2, 3, 39)


# ----------------------------------------------------------------------------------------------- PrVipe


def test_output_shapes_and_positive_sigma():
    model = build()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        mean, sigma = model(features(5))
        assert mean.shape == sigma.shape == (5, 4)
        assert (sigma > 0).all()
        assert torch.isfinite(mean).all() and torch.isfinite(sigma).all()


def test_sigma_head_is_elu_plus_one():
    model = build().eval()
    with torch.no_grad():
        model.sigma_head.weight.zero_()
        model.sigma_head.bias.fill_(-100.0)
        _, sigma = model(features(3))
    # ELU(-100) + 1 = exp(-100) > 0 (tiny but not negative).
    assert (sigma >= 0).all() and sigma.max().item() < 1e-6
    with torch.no_grad():
        model.sigma_head.bias.fill_(2.0)
        _, sigma = model(features(3))
    torch.testing.assert_close(sigma, torch.full((3, 4), 3.0))


def test_match_probability_follows_the_loss_config():
    model = build(loss=LossConfig(a_init=2.0, b_init=0.3, smoothing=0.2))
    assert model.match.a.item() == pytest.approx(2.0)
    assert model.match.b.item() == pytest.approx(0.3)
    assert model.match.smoothing == pytest.approx(0.2)
    names = {n for n, _ in model.named_parameters()}
    assert {"match.a_raw", "match.b"} <= names  # trained with the network


def test_embed_and_samples():
    model = build().eval()
    x = features(6)
    emb = model.embed(x)
    assert isinstance(emb, Embedding)
    assert emb.sigma is not None
    z = emb.sample(5, torch.Generator().manual_seed(1))
    assert z.shape == (6, 5, 4)
    z2 = emb.sample(5, torch.Generator().manual_seed(1))
    assert torch.equal(z, z2)
    many = emb.sample(4000, torch.Generator().manual_seed(2))
    torch.testing.assert_close(many.mean(1), emb.mean, atol=0.15 * emb.sigma.max().item(), rtol=0)
    torch.testing.assert_close(many.std(1), emb.sigma, rtol=0.1, atol=0)


def test_deterministic_variant():
    cfg = ModelConfig(width=32, blocks=1, embedding_dim=4, probabilistic=False)
    model = build(cfg).eval()
    assert model.sigma_head is None
    x = features(5)
    mean, sigma = model(x)
    assert torch.equal(sigma, torch.ones(5, 4))
    emb = model.embed(x)
    assert emb.sigma is None
    z = emb.sample(7, torch.Generator().manual_seed(0))
    assert z.shape == (5, 1, 4)
    assert torch.equal(z[:, 0], mean)


def test_single_frame_model_accepts_a_window_of_one():
    model = build().eval()
    x = features(4)
    a, _ = model(x)
    b, _ = model(x[:, None])
    torch.testing.assert_close(a, b)


def test_temporal_model():
    model = build(frames=3).eval()
    mean, sigma = model(features(4, 3))
    assert mean.shape == sigma.shape == (4, 4)
    assert (sigma > 0).all()
    # The frames are fused: changing one frame changes the embedding.
    x = features(4, 3)
    y = x.clone()
    y[:, 2] += 1.0
    assert not torch.allclose(model(x)[0], model(y)[0])
    model.train()
    mean, _ = model(features(4, 3))
    mean.sum().backward()
    assert model.base[0][0].weight.grad is not None


@pytest.mark.parametrize("shape", [(4, 38), (4, 40), (4, 2, 39), (39,), (4, 13, 3)])
def test_wrong_input_shape_raises(shape):
    model = build().eval()
    with pytest.raises(ValueError, match="39"):
        model(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(4, 39), (4, 2, 39), (4, 3, 38), (4, 1, 39)])
def test_temporal_wrong_input_shape_raises(shape):
    model = build(frames=3).eval()
    with pytest.raises(ValueError, match="3"):
        model(torch.zeros(shape))


def test_same_seed_same_model_and_outputs():
    a, b, c = build(seed=11), build(seed=11), build(seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    x = features(5)
    a.eval(), b.eval()
    for out_a, out_b in zip(a(x), b(x)):
        assert torch.equal(out_a, out_b)
    # Dropout in training mode is reproducible under the same global seed too.
    a.train(), b.train()
    torch.manual_seed(3)
    ta = a(x)
    torch.manual_seed(3)
    tb = b(x)
    assert torch.equal(ta[0], tb[0]) and torch.equal(ta[1], tb[1])


def test_backbone_structure_follows_the_reference():
    model = build(ModelConfig(width=16, blocks=2, embedding_dim=4, dropout=0.3))
    fc = model.base[0]
    assert [type(m).__name__ for m in fc] == ["Linear", "BatchNorm1d", "ReLU", "Dropout"]
    assert fc[0].in_features == 39 and fc[0].out_features == 16
    assert math.isclose(fc[3].p, 0.3)
    assert len(model.base) == 1 + 2  # first FC + residual blocks


def test_gradients_reach_all_heads():
    model = build()
    mean, sigma = model(features(8))
    (mean.pow(2).sum() + sigma.sum()).backward()
    assert model.mean_head.weight.grad.abs().sum() > 0
    assert model.sigma_head.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- Lifter


def test_lifter_shapes_and_centre_frame():
    torch.manual_seed(0)
    lifter = Lifter(SMALL).eval()
    out = lifter(features(5))
    assert out.shape == (5, 17, 3)
    window = features(5, 3, seed=1)
    torch.testing.assert_close(lifter(window), lifter(window[:, 1]))


def test_lifter_is_deterministic_for_a_seed():
    torch.manual_seed(4)
    a = Lifter(SMALL).eval()
    torch.manual_seed(4)
    b = Lifter(SMALL).eval()
    x = features(3)
    assert torch.equal(a(x), b(x))
