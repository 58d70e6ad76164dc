"""The speed work of the training step (issue 8): what each shortcut must keep equal to the plain version.

No timings here (the bench measures them); these tests pin the math: the dropout distribution, bf16 gradients
close to fp32 ones, the fused optimizers, the precision field and the bench's FLOP count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_bench

from vipe_ray.config import ConfigError, load_config, merge
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.prvipe.model import Dropout
from vipe_ray.training.checkpoint import build_model
from vipe_ray.training.optim import build_optimizer
from vipe_ray.training.step import embed, train_step


def test_dropout_is_inverted_dropout_with_the_right_keep_rate():
    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = layer(x)
    kept = y > 0
    # The keep rate is 0.7 rounded to 2^-15 (22938 / 32768), and the kept units are scaled by its inverse.
    assert torch.unique(y).tolist() == [0.0, pytest.approx(32768 / 22938, rel=1e-6)]
    # Binomial(200000, 0.7): standard deviation ~0.001 of the share.
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01, "unbiased: E[y] = x"
    y.sum().backward()
    assert torch.equal(x.grad, y.detach()), "the gradient is the same scaled mask"
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0)(x) is x


@pytest.mark.parametrize("shape", [(7,), (3, 5), (256, 1024)])
def test_dropout_masks_are_independent_of_position_and_reproducible(shape):
    """Any size (not only multiples of the four masks cut from one 64-bit draw); every unit kept alike (no bit of
    the 16 biased); the same masks under the same global seed."""
    torch.manual_seed(1)
    layer = Dropout(0.3)
    x = torch.ones(shape)
    masks = torch.stack([layer(x) > 0 for _ in range(4000 if x.numel() < 100 else 4)])
    assert masks.shape[1:] == shape
    share = masks.float().mean(0)
    if x.numel() < 100:
        # 4000 draws per unit: standard deviation 0.007 of the share.
        assert (share - 0.7).abs().max().item() < 0.04, share
    else:
        # Units at each of the four positions within a 64-bit draw are kept alike (a keep rate of 0.7 reads
        # all 15 bits of each word, not only the top one).
        per_slot = masks.float().reshape(4, -1, 4).mean((0, 1))
        assert (per_slot - 0.7).abs().max().item() < 0.005, per_slot
    torch.manual_seed(1)
    again = torch.stack([layer(x) > 0 for _ in range(masks.shape[0])])
    assert torch.equal(masks, again)


def test_dropout_at_the_edges_of_its_keep_rate_resolution():
    """p below 2^-16 keeps every unit (no int16 wrap that would drop them all); p near 1 keeps 2^-15 of them."""
    torch.manual_seed(2)
    x = torch.ones(400_000)
    assert torch.equal(Dropout(1e-6)(x), x)
    y = Dropout(0.99999)(x)
    assert torch.isfinite(y).all()
    assert set(torch.unique(y).tolist()) <= {0.0, 32768.0}
    assert 0 < (y > 0).sum().item() < 60, "about 400000 / 32768 = 12 units kept"


def test_precision_is_a_validated_config_field():
    from vipe_ray.config import OptimConfig

    assert OptimConfig().precision == "fp32", "the reference precision unless a config asks for bf16"
    assert load_config().optim.precision == "bf16", "the shipped default trains with bf16 matmuls"
    assert load_config(overrides={"optim": {"precision": "fp32"}}).optim.precision == "fp32"
    with pytest.raises(ConfigError, match="optim.precision"):
        load_config(overrides={"optim": {"precision": "fp16"}})


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_optimizers_are_fused_and_step_like_the_plain_ones(tiny_overrides, name):
    config = load_config(overrides=merge(tiny_overrides, {"optim": {"optimizer": name}}))
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    assert optimizer.param_groups[0]["fused"] is True
    plain_model = copy.deepcopy(model)
    plain = (torch.optim.Adam if name == "adam" else torch.optim.Adagrad)(plain_model.parameters(),
                                                                          lr=config.optim.lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(model.parameters(), plain_model.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_bf16_embedding_and_gradients_stay_close_to_fp32():
    config = load_config(overrides={"model": {"width": 512}})
    torch.manual_seed(0)
    model = build_model(config)
    g = torch.Generator().manual_seed(1)
    features, probe = torch.randn(256, 39, generator=g), torch.randn(256, config.model.embedding_dim, generator=g)
    out, grads = {}, {}
    for precision in ("fp32", "bf16"):
        m = copy.deepcopy(model)
        m.train()
        torch.manual_seed(2)  # the same dropout masks
        mean, sigma = embed(m, features, precision)
        assert mean.dtype == sigma.dtype == torch.float32
        (mean * probe).sum().add(sigma.sum()).backward()
        out[precision] = mean.detach()
        grads[precision] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    relative = ((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()).item()
    assert relative < 0.02  # bf16 keeps 8 bits: ~0.4% per product, a few layers deep
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0).item() > 0.99


def test_bf16_step_trains(tiny_overrides):
    config = load_config(overrides=merge(tiny_overrides, {"optim": {"precision": "bf16"}}))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    metrics = train_step(model, optimizer, WindowSampler(table).sample(24, g), config, g)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_bench_counts_the_step_flops_by_hand(tiny_overrides):
    bench = load_bench("train_step")
    config = load_config(overrides=merge(tiny_overrides, {"model": {"width": 8, "blocks": 1, "embedding_dim": 4,
                                                                    "samples": 3}, "mining": {"samples": 2}}))
    model = build_model(config)
    rows, b = 10, 5
    features = torch.zeros(rows, 39)
    # Linears 39->8, 8->8, 8->8 and two heads 8->4: forward 2 rows (in x out), weight gradient the same,
    # input gradient for all but the first layer; the mining kernel (b x 2 samples)^2 x 4 dims.
    macs = 39 * 8 + 8 * 8 + 8 * 8 + 8 * 4 + 8 * 4
    expected = 2 * rows * (2 * macs + (macs - 39 * 8)) + 2 * (b * 2) ** 2 * 4
    assert bench.step_flops(model, features, config) == expected


def test_sigma_is_elu_plus_one_without_underflow():
    config = load_config(overrides={"model": {"width": 8, "blocks": 0}})
    model = build_model(config).eval()
    raw = torch.tensor([-60.0, -40.0, -17.5, -1.0, 0.0, 0.5, 3.0])
    with torch.no_grad():
        model.sigma_head.weight.zero_()
    features = torch.zeros(2, 39)
    for value in raw.double():
        with torch.no_grad():
            model.sigma_head.bias.fill_(value.item())
        _, sigma = model(features)
        # ELU(x) + 1 = x + 1 above 0 and exp(x) below (in float64, where the cancellation is harmless down to -17).
        want = value + 1.0 if value > 0 else torch.exp(value)
        assert sigma[0, 0].item() == pytest.approx(want.item(), rel=1e-6, abs=0.0)
        if value > -17:
            assert sigma[0, 0].item() == pytest.approx(torch.nn.functional.elu(value).item() + 1.0, rel=1e-6)
    # Where fp32 ELU + 1 gives exactly 0, this sigma stays positive and log(sigma) = raw.
    assert (torch.nn.functional.elu(torch.tensor(-40.0)) + 1.0).item() == 0.0
    model.sigma_head.bias.data.fill_(-40.0)
    _, sigma = model(features)
    assert torch.log(sigma[0, 0]).item() == pytest.approx(-40.0)
    # Gradients stay finite on both branches, large raw included.
    model.train()
    model.sigma_head.bias.data.copy_(torch.linspace(-200.0, 200.0, config.model.embedding_dim))
    _, sigma = model(features)
    sigma.sum().backward()
    assert torch.isfinite(model.sigma_head.bias.grad).all()
