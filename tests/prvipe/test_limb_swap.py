"""Limb swapping (vipe_ray.prvipe.limb_swap): what moves, what stays, and that it is a property of the poses, not of
the frame they are written in."""

import math

import pytest
import torch

from vipe_ray.config import ConfigError, load_config
from vipe_ray.data import load_table
from vipe_ray.prvipe.keypoints import L_HIP, R_HIP, body_rotation
from vipe_ray.prvipe.limb_swap import LIMB_CHAINS, LIMB_FRAMES, swap_limbs

MOVING = sorted(j for _, middle, end in LIMB_CHAINS for j in (middle, end))


def _poses(n: int = 16) -> torch.Tensor:
    """Real poses: ``[n, 1, 17, 3]`` world metres from the bundled table, frames far apart."""
    table = load_table(load_config().data.table_path()).select(["10"])
    rows = torch.linspace(0, len(table.frame) - 1, n).long()
    return torch.from_numpy(table.joints[rows.numpy()]).double()[:, None]


def test_probability_zero_is_the_identity_and_draws_nothing():
    joints = _poses()
    g = torch.Generator().manual_seed(3)
    assert swap_limbs(joints, 0.0, g) is joints
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())


def _limb_bones():
    """(parent, child, frame) of every moving bone."""
    return [(parent, child, frame) for (root, middle, end), frame in zip(LIMB_CHAINS, LIMB_FRAMES)
            for parent, child in ((root, middle), (middle, end))]


def _directions(joints: torch.Tensor, parent: int, child: int, frame: tuple[int, int]) -> torch.Tensor:
    """Unit bone directions in the limb's body frame: ``[..., 17, 3] -> [..., 3]``."""
    bone = torch.nn.functional.normalize(joints[..., child, :] - joints[..., parent, :], dim=-1)
    return (body_rotation(joints, *frame) @ bone[..., None])[..., 0]


@pytest.mark.parametrize("frames", [1, 5])
def test_every_limb_swapped_keeps_torso_and_bone_lengths_and_takes_a_donors_directions(frames):
    """Each new bone has the recipient's length and points, in the limb's body frame, exactly where the same
    bone of another pose of the batch points in its own -- in every frame of a window the same donor's."""
    poses = _poses(16 * frames)
    joints = poses.reshape(16, frames, 17, 3)  # windows of poses far apart: only the shapes matter here
    out = swap_limbs(joints, 1.0, torch.Generator().manual_seed(0))
    still = [j for j in range(17) if j not in MOVING]
    assert torch.equal(out[..., still, :], joints[..., still, :]), "torso, head and limb roots stay"
    assert not torch.allclose(out[..., MOVING, :], joints[..., MOVING, :])
    for parent, child, frame in _limb_bones():
        own = torch.linalg.vector_norm(joints[..., child, :] - joints[..., parent, :], dim=-1)
        new = torch.linalg.vector_norm(out[..., child, :] - out[..., parent, :], dim=-1)
        torch.testing.assert_close(new, own)
        new_dir, old_dir = _directions(out, parent, child, frame), _directions(joints, parent, child, frame)
        # [recipient, donor]: how well donor d's bone explains recipient r's new bone over the whole window.
        agreement = torch.einsum("rfc,dfc->rd", new_dir, old_dir) / frames
        agreement -= 3 * torch.eye(len(agreement), dtype=agreement.dtype)  # never itself
        torch.testing.assert_close(agreement.max(1).values, torch.ones(len(agreement), dtype=agreement.dtype))


def test_swapping_commutes_with_a_rigid_motion_of_the_batch():
    """The same draws on the batch seen from elsewhere (rotated, moved) give the same poses seen from there."""
    joints = _poses()
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]], dtype=joints.dtype)
    moved = joints @ rotation.T + torch.tensor([1.0, -2.0, 0.5], dtype=joints.dtype)
    a = swap_limbs(joints, 0.5, torch.Generator().manual_seed(1))
    b = swap_limbs(moved, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a @ rotation.T + torch.tensor([1.0, -2.0, 0.5], dtype=joints.dtype))


def test_swap_rate_follows_the_probability():
    joints = _poses(64).repeat(8, 1, 1, 1)  # 512 poses
    out = swap_limbs(joints, 0.25, torch.Generator().manual_seed(2))
    ends = [end for _, _, end in LIMB_CHAINS]
    changed = (out[:, 0, ends] - joints[:, 0, ends]).abs().amax(-1) > 1e-9  # [poses, limbs]
    assert changed.float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_body_rotation_is_proper_and_puts_the_hips_on_x():
    joints = _poses()[:, 0]
    rotation = body_rotation(joints)
    identity = torch.eye(3, dtype=joints.dtype).expand_as(rotation)
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), identity)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(len(joints), dtype=joints.dtype))
    hips = (rotation @ (joints[:, R_HIP] - joints[:, L_HIP])[..., None])[..., 0]
    torch.testing.assert_close(hips[:, 1:], torch.zeros_like(hips[:, 1:]))
    assert (hips[:, 0] > 0).all(), "left to right hip along +x"


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected \[batch, frames, 17, 3\] joints, got \[4, 17, 3\]"):
        swap_limbs(torch.zeros(4, 17, 3), 0.5, torch.Generator())


def test_limb_swap_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"limb_swap.prob: 1.5 is not a probability"):
        load_config(overrides={"limb_swap": {"prob": 1.5}})
    with pytest.raises(ConfigError, match="limb_swap"):
        load_config(overrides={"limb_swap": {"rate": 0.5}})


def test_the_lifter_trains_on_the_original_poses_when_told(tiny_overrides):
    """``limb_swap.lifter: false``: the lifter's step draws nothing for the swap and trains exactly as without
    limb swapping; with ``lifter: true`` it trains on other poses. Pr-VIPE's step swaps either way."""
    from vipe_ray.config import merge
    from vipe_ray.prvipe.model import Lifter
    from vipe_ray.training.checkpoint import build_model
    from vipe_ray.training.optim import build_optimizer
    from vipe_ray.training.step import lifter_step, train_step

    poses = _poses(24)

    def lifter_after_a_step(limb_swap: dict) -> torch.Tensor:
        config = load_config(overrides=merge(tiny_overrides, {"limb_swap": limb_swap, "model": {"dropout": 0.0}}))
        torch.manual_seed(0)
        lifter = Lifter(config.model)
        optimizer, _ = build_optimizer(config, lifter)
        lifter_step(lifter, optimizer, poses, config, torch.Generator().manual_seed(1))
        return torch.cat([p.detach().flatten() for p in lifter.parameters()])

    off = lifter_after_a_step({"prob": 0.0})
    assert torch.equal(lifter_after_a_step({"prob": 0.5, "lifter": False}), off)
    assert not torch.equal(lifter_after_a_step({"prob": 0.5, "lifter": True}), off)

    def prvipe_loss(limb_swap: dict) -> float:
        config = load_config(overrides=merge(tiny_overrides, {"limb_swap": limb_swap, "model": {"dropout": 0.0}}))
        torch.manual_seed(0)
        model = build_model(config)
        optimizer, _ = build_optimizer(config, model)
        return train_step(model, optimizer, poses, config, torch.Generator().manual_seed(1))["loss"]

    assert prvipe_loss({"prob": 0.5, "lifter": False}) == prvipe_loss({"prob": 0.5, "lifter": True})
    assert prvipe_loss({"prob": 0.5, "lifter": False}) != prvipe_loss({"prob": 0.0})
