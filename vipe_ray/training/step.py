"""One optimisation step: Pr-VIPE's (views, embedding, mining, losses) and the 3D-lifting baseline's.

:func:`train_step` is the unit of work: one batch of 3D poses in, one optimizer step out. The training loop
(:mod:`vipe_ray.training.loop`) calls it in ``vipe-ray train`` and in every Ray Train worker.
"""

from __future__ import annotations

from typing import Callable

import torch

from vipe_ray.config import KeypointDropoutConfig, LossConfig, TrainConfig, lifter_recipe
from vipe_ray.prvipe.cameras import RIGS, Orbits, sample_orbits
from vipe_ray.prvipe.limb_swap import swap_limbs
from vipe_ray.prvipe.losses import gaussian_kl, graded_ranking_loss, kernel_distance, triplet_ratio_loss
from vipe_ray.prvipe.matching import CentredPoses, indexed_np_mpjpe
from vipe_ray.prvipe.mining import mine_triplets, nearest_candidates
from vipe_ray.prvipe.views import lift_target, view_features
from vipe_ray.training.optim import unwrap


def training_views(batch: int, config: TrainConfig, generator: torch.Generator) -> tuple[Orbits, Orbits]:
    """Cameras of the anchor and positive views: random cameras, or two different cameras of the fixed rig."""
    if config.cameras.augmentation:
        ranges = config.cameras.ranges()
        return sample_orbits(batch, ranges, generator), sample_orbits(batch, ranges, generator)
    rig = Orbits.from_cameras(RIGS[config.cameras.fixed_rig])
    count = rig.azimuth.shape[0]
    first = torch.randint(count, (batch,), generator=generator)
    second = (first + torch.randint(1, count, (batch,), generator=generator)) % count

    return rig.index(first), rig.index(second)


def embed(model: torch.nn.Module, features: torch.Tensor, precision: str = "fp32",
          lift: bool = False) -> tuple[torch.Tensor, ...]:
    """The model's (mean, sigma) ``[batch, D]`` in fp32, computed in ``precision``; with ``lift``, also its 3D
    head's poses ``[batch, 17, 3]``.

    ``bf16``: autocast runs the Linear layers' products in bfloat16 with fp32 accumulation (the weights stay
    fp32); the embedding returns to fp32 before the samples, kernels and losses.
    """
    device = features.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(features, lift=True) if lift else model(features)
    return tuple(t.float() for t in out)


def view_dropouts(config: TrainConfig, progress: float) -> tuple[KeypointDropoutConfig, KeypointDropoutConfig]:
    """Keypoint dropout of the anchor and the positive view at ``progress`` (step / steps) of the run."""
    dropout = config.keypoint_dropout.at(progress)
    return dropout, (dropout if dropout.views == "both" else KeypointDropoutConfig())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, joints3d: torch.Tensor,
               config: TrainConfig, generator: torch.Generator,
               timer: Callable[[str], None] | None = None, progress: float = 1.0) -> dict[str, float]:
    """One Pr-VIPE optimisation step on a batch of 3D poses.

    Args:
        model: a :class:`PrVipe`, possibly wrapped in DistributedDataParallel.
        joints3d: ``[batch, frames, 17, 3]`` world joints in metres (frames = 1 without temporal embedding).
        generator: CPU generator for cameras, dropout, sampling and mining (the step's only randomness
            besides the model's dropout layers).
        progress: step / steps of the run (keypoint dropout may ramp up with it; mining may turn hard); the
            default, 1, is the end of the run.
        timer: optional callback marking the end of each phase, in order: "views", "forward" (the embedding),
            "mining" (ranking kernel and lazy labels), "loss" (K-sample kernels and losses), "backward" (with
            the optimizer step).
    Returns:
        Scalar metrics of the step (losses, a, b, active-triplet share, ...).
    """
    mark = timer or (lambda _name: None)
    module = unwrap(model)
    device = next(module.parameters()).device
    joints3d = swap_limbs(joints3d, config.limb_swap.prob, generator)
    b = joints3d.shape[0]
    orbits_a, orbits_p = training_views(b, config, generator)
    jitter = config.optim.jitter
    dropout_a, dropout_p = view_dropouts(config, progress)
    feats = torch.cat([
        view_features(joints3d, orbits_a, dropout_a, jitter, generator),
        view_features(joints3d, orbits_p, dropout_p, jitter, generator),
    ]).to(device)
    mark("views")

    model.train()
    lift_weight = config.loss.lift_weight
    mean, sigma, *lifted = embed(model, feats, config.optim.precision, lift=lift_weight > 0)
    k = config.model.samples if config.model.probabilistic else 1
    eps = torch.randn((2 * b, k, mean.shape[-1]), generator=generator).to(device)
    samples = mean[:, None, :] + (sigma[:, None, :] * eps if config.model.probabilistic else 0.0)
    z_a, z_p = samples[:b], samples[b:]
    match = module.match
    mark("forward")
    # Anchor i and positive j show the 3D poses i and j: labels of (pose i, pose j), computed only where the
    # kernel ranking asks for them (see vipe_ray.prvipe.mining); the same triplets as the full matrix.
    poses = CentredPoses.of(joints3d.to(device))
    rank_k = config.mining.samples or k
    kernel = kernel_distance(match.pairwise(z_a[:, :rank_k].detach(), z_p[:, :rank_k].detach()))
    mining = config.mining
    negatives = mine_triplets(kernel, lambda i, j: indexed_np_mpjpe(poses, poses, i, j), mining.kappa,
                              mining.mode_at(progress), mining.hard_negative_ratio, generator, mining.symmetric,
                              mining.negatives)
    mark("mining")
    d_ap = kernel_distance(match(z_a, z_p))
    # Anchors and the views their negatives come from: the positive views, and (symmetric) the other way.
    pairs = [(z_a, z_p)] + ([(z_p, z_a)] if mining.symmetric else [])
    m = mining.negatives
    d_an = torch.cat([
        kernel_distance(match(anchors.repeat_interleave(m, 0), pool.index_select(0, index.reshape(-1))))
        for (anchors, pool), index in zip(pairs, negatives.index.split(b))])
    triplet, active = triplet_ratio_loss(d_ap.repeat_interleave(m).repeat(len(pairs)), d_an,
                                         negatives.valid.reshape(-1), config.loss.margin)
    positive = d_ap.mean()
    kl = gaussian_kl(mean, sigma) if config.model.probabilistic else torch.zeros((), device=device)
    loss = triplet + config.loss.positive_weight * positive + config.loss.kl_weight * kl
    ranking = torch.zeros((), device=device)
    if config.loss.ranking_weight > 0:
        # With the ranking kernel's samples (the candidates are several per anchor, and K^2 pairs each would
        # cost more than the triplets) or with the means, as one sample each.
        ranked = pairs if config.loss.ranking_on == "samples" else \
            [(mean[:b, None], mean[b:, None]), (mean[b:, None], mean[:b, None])][:len(pairs)]
        views = ranked if config.loss.ranking_views == "both" else ranked[:1]
        ranking = torch.stack([
            graded_ranking(kern, anchors[:, :rank_k], pool[:, :rank_k], poses, match, config.loss)
            for kern, (anchors, pool) in zip([kernel, kernel.T], views)]).mean()
        loss = loss + config.loss.ranking_weight * ranking
    lift = torch.zeros((), device=device)
    if lift_weight > 0:
        centre = joints3d[:, joints3d.shape[1] // 2]
        target = torch.cat([lift_target(centre, orbits, config.loss.lift_frame) for orbits in (orbits_a, orbits_p)])
        lift = torch.linalg.vector_norm(lifted[0] - target.to(device), dim=-1).mean()
        loss = loss + lift_weight * lift
    mark("loss")

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    mark("backward")
    valid = negatives.valid.reshape(-1).float()
    return {
        "loss": loss.item(), "triplet_loss": triplet.item(), "positive_loss": positive.item(),
        "kl_loss": kl.item(), "ranking_loss": ranking.item(), "lift_loss": lift.item(),
        "a": match.a.item(), "b": match.b.item(),
        "active_triplets": active.float().mean().item(), "valid_negatives": valid.mean().item(),
        "d_ap": d_ap.mean().item(),
        "d_an": ((d_an * valid).sum() / valid.sum().clamp_min(1)).item(),
        "sigma": sigma.mean().item() if config.model.probabilistic else 0.0,
    }


def graded_ranking(kernel: torch.Tensor, anchors: torch.Tensor, pool: torch.Tensor, poses: CentredPoses,
                    match: torch.nn.Module, loss: LossConfig) -> torch.Tensor:
    """:func:`graded_ranking_loss` of ``anchors`` ``[N, K, D]`` over their positive and kernel-nearest views in
    ``pool`` ``[N, K, D]`` (``kernel`` ``[N, N]`` ranks them; row i and column j show poses i and j)."""
    cols = nearest_candidates(kernel, loss.ranking_candidates)  # [N, C], the positive first
    rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)
    with torch.no_grad():
        # A pose against itself is 0 by definition: only the others need a Procrustes fit.
        others = indexed_np_mpjpe(poses, poses, rows[:, 1:].reshape(-1), cols[:, 1:].reshape(-1))
        error = torch.cat([others.new_zeros(cols.shape[0], 1), others.reshape(cols.shape[0], -1)], 1)
    # index_select, not pool[cols]: its backward (index_add) is ~4x faster on CPU than advanced indexing's
    # (on CUDA its atomic adds make GPU runs repeat only up to rounding).
    scores = match.ranking_logits(anchors.index_select(0, rows.reshape(-1)),
                                  pool.index_select(0, cols.reshape(-1)), loss.ranking_scores).reshape(cols.shape)
    return graded_ranking_loss(scores, error.to(scores.dtype), loss.ranking_temperature)


def lifter_limb_swap(config: TrainConfig) -> float:
    """The limb-swap probability of the lifting baseline's poses (``lifter.limb_swap``; unset, ``limb_swap.prob``
    where ``limb_swap.lifter``, else 0)."""
    return lifter_recipe(config).limb_swap.prob


def lifter_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, joints3d: torch.Tensor,
                config: TrainConfig, generator: torch.Generator, progress: float = 1.0) -> dict[str, float]:
    """One step of the 3D-lifting baseline: regress the normalized camera-frame 3D of every view.

    It sees what a Pr-VIPE step sees: two views of each pose, cameras, dropout and jitter drawn the same
    way, under its own recipe (:func:`vipe_ray.config.lifter_recipe`: which views lose keypoints, the limb
    swap of :func:`lifter_limb_swap`). ``joints3d``: ``[batch, frames, 17, 3]``; the lifter reads the centre
    frame.
    """
    config = lifter_recipe(config)
    device = next(unwrap(model).parameters()).device
    # Only the centre frame is read: swap that one (the draws depend on the batch alone, so it is the same pose).
    middle = joints3d.shape[1] // 2
    centre = swap_limbs(joints3d[:, middle:middle + 1], lifter_limb_swap(config), generator)[:, 0]
    orbits_a, orbits_p = training_views(joints3d.shape[0], config, generator)
    feats, targets = [], []
    for orbits, dropout in zip((orbits_a, orbits_p), view_dropouts(config, progress)):
        feats.append(view_features(centre[:, None], orbits, dropout, config.optim.jitter, generator)[:, 0])
        targets.append(lift_target(centre, orbits))
    model.train()
    # The same precision as the Pr-VIPE step (bf16 products under autocast when the config asks for it).
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.optim.precision == "bf16"):
        predicted = model(torch.cat(feats).to(device)).float()
    loss = torch.linalg.vector_norm(predicted - torch.cat(targets).to(device), dim=-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"lifter_mpjpe": loss.item()}


