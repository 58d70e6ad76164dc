"""Training: the Pr-VIPE step, the 3D-lifter baseline step, and a resumable single-process loop.

:func:`train_step` is the unit of work: one batch of 3D poses in, one optimizer step out. The Ray Train loop
calls the same function inside each DDP worker; :func:`train` is the plain single-process driver behind
``vipe-ray train``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from vipe_ray import log
from vipe_ray.prvipe.cameras import RIGS, Orbits, camera_frame, sample_orbits
from vipe_ray.config import (ConfigError, KeypointDropoutConfig, LossConfig, TrainConfig, config_from_dict,
                             config_to_dict, flatten)
from vipe_ray.data import PoseTable, WindowSampler, load_table
from vipe_ray.prvipe.keypoints import body_frame, normalize_3d
from vipe_ray.prvipe.limb_swap import swap_limbs
from vipe_ray.prvipe.losses import gaussian_kl, graded_ranking_loss, kernel_distance, triplet_ratio_loss
from vipe_ray.prvipe.matching import CentredPoses, indexed_np_mpjpe
from vipe_ray.prvipe.mining import mine_triplets, nearest_candidates
from vipe_ray.prvipe.model import Lifter, PrVipe
from vipe_ray.prvipe.views import view_features

CHECKPOINT = "checkpoint.pt"
LIFTER_CHECKPOINT = "lifter.pt"
FORMAT = "vipe-ray/1"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


class WeightAverage:
    """Exponential moving average of a model's weights, as the reference keeps (TF's ExponentialMovingAverage
    with ``num_updates``): after update t, ``avg = d_t avg + (1 - d_t) w`` with ``d_t = min(decay,
    (1 + t) / (10 + t))``, so that the first steps' weights do not linger. Floating-point buffers (BatchNorm's
    running statistics) are averaged too; integer ones (its batch counter) copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.average = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in unwrap(model).state_dict().items():
            average = self.average[key]
            if average.is_floating_point():
                average.lerp_(value, 1.0 - d)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.average = {k: v.to(self.average[k].device) for k, v in state["average"].items()}

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``model`` holding the averaged weights, in eval mode."""
        averaged = copy.deepcopy(unwrap(model))
        averaged.load_state_dict(self.average)
        return averaged.eval()


def weight_average(config: TrainConfig, model: torch.nn.Module, payload: dict | None = None) -> WeightAverage | None:
    """The run's weight average (None when ``optim.ema`` is 0), restored from a checkpoint ``payload``."""
    if config.optim.ema <= 0:
        return None
    average = WeightAverage(model, config.optim.ema)
    if payload is not None and payload.get("ema") is not None:
        average.load_state_dict(payload["ema"])
    return average


def build_model(config: TrainConfig) -> PrVipe:
    return PrVipe(config.model, config.loss, frames=config.temporal.window)


def parameter_groups(model: torch.nn.Module, lr: float, kernel_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups: the match kernel's a and b (Pr-VIPE only) at ``lr * kernel_lr_scale``.

    Two scalars against a million weights: at Adam's ``lr`` each moves at most about ``lr`` a step, and over
    a CPU-budget run b rises at nearly that pace to the end (the reference's Adagrad at 0.02 moves them far
    faster early on).
    """
    match = getattr(unwrap(model), "match", None)
    if match is None or kernel_lr_scale == 1.0:
        return [{"params": list(model.parameters())}]
    kernel = {id(p) for p in match.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in kernel]},
            {"params": list(match.parameters()), "lr": lr * kernel_lr_scale}]


def build_optimizer(config: TrainConfig, model: torch.nn.Module):
    """Optimizer and a cosine decay to ``lr * lr_final_fraction`` over the run."""
    o = config.optim
    groups = parameter_groups(model, o.lr, o.kernel_lr_scale)
    # fused: one kernel over all parameters instead of ~6 elementwise passes per tensor (same update rule).
    if o.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    else:
        optimizer = torch.optim.Adagrad(groups, lr=o.lr, weight_decay=o.weight_decay, fused=True)

    def factor(step: int) -> float:
        progress = min(step / o.steps, 1.0)
        return o.lr_final_fraction + (1 - o.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def lift_target(joints3d: torch.Tensor, orbits: Orbits, frame: str = "camera") -> torch.Tensor:
    """The 3D regression target of one view of each pose: ``[batch, 17, 3]`` world joints -> ``[batch, 17, 3]``
    normalized joints (torso units, pelvis at the origin), in the view's camera frame (``camera``, the lifting
    baseline's target) or in the pose's own body frame (``body``, the same for every view)."""
    if frame == "body":
        return body_frame(normalize_3d(joints3d.double())).float()
    return normalize_3d(camera_frame(joints3d.double(), orbits)).float()


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
            _graded_ranking(kern, anchors[:, :rank_k], pool[:, :rank_k], poses, match, config.loss)
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


def _graded_ranking(kernel: torch.Tensor, anchors: torch.Tensor, pool: torch.Tensor, poses: CentredPoses,
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
    """The limb-swap probability of the lifting baseline's poses (0 where ``limb_swap.lifter`` is false)."""
    return config.limb_swap.prob if config.limb_swap.lifter else 0.0


def lifter_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, joints3d: torch.Tensor,
                config: TrainConfig, generator: torch.Generator, progress: float = 1.0) -> dict[str, float]:
    """One step of the 3D-lifting baseline: regress the normalized camera-frame 3D of every view.

    It sees what a Pr-VIPE step sees: the same two views of each pose (cameras, dropout, jitter drawn the
    same way), so both methods get the same data per step; limb-swapped poses only with ``limb_swap.lifter``
    (:func:`lifter_limb_swap`). ``joints3d``: ``[batch, frames, 17, 3]``; the lifter reads the centre frame.
    """
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


def atomic_save(obj: dict, path: Path) -> None:
    """Write with torch.save to a temp file beside ``path``, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode, its config and its bookkeeping."""

    model: torch.nn.Module
    config: TrainConfig
    step: int
    data_checksum: str
    payload: dict


def load_checkpoint(path: str | Path, kind: str = "prvipe", map_location: str = "cpu",
                    averaged: bool | None = None) -> Checkpoint:
    """Load ``checkpoint.pt`` (``kind="prvipe"``) or ``lifter.pt`` (``kind="lifter"``) from a run directory.

    ``averaged``: the weight average (``optim.ema``) or the trained weights; None: the average where the run
    kept one.
    """
    path = Path(path)
    file = path / (CHECKPOINT if kind == "prvipe" else LIFTER_CHECKPOINT) if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no {kind} checkpoint (train one with `vipe-ray train --out DIR`)")
    payload = torch.load(file, map_location=map_location, weights_only=False)
    if payload.get("format") != FORMAT or payload.get("kind") != kind:
        raise ValueError(f"{file}: not a vipe-ray {kind} checkpoint (format {payload.get('format')!r}, "
                         f"kind {payload.get('kind')!r})")
    config = config_from_dict(payload["config"], str(file))
    model: torch.nn.Module = build_model(config) if kind == "prvipe" else Lifter(config.model)
    average = payload.get("ema")
    if averaged and average is None:
        raise ValueError(f"{file}: no weight average in this checkpoint (trained with optim.ema = 0)")
    use_average = average is not None if averaged is None else averaged
    model.load_state_dict(average["average"] if use_average else payload["model"])
    model.eval()
    return Checkpoint(model, config, payload["step"], payload["data_checksum"], payload)


def _format_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def resumable_checkpoint(path: Path, config: TrainConfig, table: PoseTable, resume: bool) -> dict | None:
    """The checkpoint at ``path`` to resume (None when there is none), refused unless ``resume`` and
    :func:`check_resumable`. Memory-mapped: its tensors are read when the model and optimizer load them."""
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out")
    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    check_resumable(payload, config, table.checksum, str(path), f"{table.path} ({table.checksum})")
    return payload


#: Config keys a resumed run may change: they say where the data is read from (its checksum is checked
#: instead), how it is buffered, what is logged, saved and evaluated, not what is trained.
RESUME_FREE_KEYS = ("data.table", "data.buffer_rows", "log_every", "checkpoint_every", "val_every", "eval.")


def check_resumable(payload: dict, config: TrainConfig, checksum: str, where: str, data: str) -> None:
    """Refuse to continue the checkpoint ``payload`` (read from ``where``) with another config or other data.

    Keys added since the checkpoint was written fill in with their defaults (which keep old behaviour), and
    :data:`RESUME_FREE_KEYS` may change; any other difference is named, up to five keys, with the
    checkpoint's value and the new one.
    """
    saved = flatten(config_to_dict(config_from_dict(payload.get("config") or {}, where)))
    now = flatten(config_to_dict(config))
    changed = [key for key in now if saved.get(key) != now[key]
               and not any(key == free or (free.endswith(".") and key.startswith(free)) for free in RESUME_FREE_KEYS)]
    if changed:
        shown = "; ".join(f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ConfigError(f"{where}: checkpoint was trained with a different config ({shown}{more}); resume "
                          "needs the same one (the run directory's config.yaml holds it)")
    if payload.get("data_checksum") != checksum:
        raise ConfigError(f"{where}: checkpoint data checksum {payload.get('data_checksum')} differs from {data}")


class TrainingDiverged(RuntimeError):
    """A step gave a non-finite loss: training stops before anything of that step is saved."""


def check_finite(metrics: dict[str, float], step: int, where: str) -> None:
    """Raise :class:`TrainingDiverged` naming the step and its losses when any of them is not finite."""
    losses = {k: v for k, v in metrics.items() if k.endswith("loss") or k == "lifter_mpjpe"}
    if not all(math.isfinite(v) for v in losses.values()):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        raise TrainingDiverged(f"{where}: step {step} diverged ({terms}); this step was not saved, the last "
                               "checkpoint is intact. Lower optim.lr or the loss weights (loss.*_weight).")


def _run_loop(name: str, out: Path, file: str, kind: str, config: TrainConfig, table: PoseTable,
              model: torch.nn.Module, step_fn: Callable, payload: dict | None, progress: Callable[[str], None],
              log_keys: tuple[str, ...], on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Shared resumable loop of the Pr-VIPE and lifter runs; ``payload``: the checkpoint to continue
    (:func:`resumable_checkpoint`), or None."""
    path = out / file
    optimizer, scheduler = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(config.seed + (0 if kind == "prvipe" else 7919))
    torch.manual_seed(config.seed)
    step = 0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(generator, payload["rng"])
        step = payload["step"]
        progress(f"[{name}] resumed from {path} at step {step}")
    average = weight_average(config, model, payload)
    # Neighbouring frames serve triplet mining; the lifter has none and draws every pose at random.
    neighbours = config.mining.neighbours if kind == "prvipe" else 0
    sampler = WindowSampler(table.select(config.data.train_subjects), config.temporal.window, config.temporal.stride,
                            neighbours)

    def save(metrics: dict) -> None:
        atomic_save({
            "format": FORMAT, "kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "config": config_to_dict(config), "step": step,
            "data_checksum": table.checksum, "data_path": table.path, "rng": rng_state(generator),
            "metrics": metrics, "ema": average.state_dict() if average is not None else None,
        }, path)

    total = config.optim.steps
    start_time, start_step = time.perf_counter(), step
    metrics: dict[str, float] = {}
    log = (out / f"{kind}_metrics.jsonl").open("a")
    try:
        while step < total:
            batch = sampler.sample(config.optim.batch_size, generator)
            metrics = step_fn(model, optimizer, batch, config, generator, progress=step / total)
            check_finite(metrics, step + 1, str(path))
            scheduler.step()
            if average is not None:
                average.update(model)
            step += 1
            if step % config.log_every == 0 or step == total:
                elapsed = time.perf_counter() - start_time
                rate = (step - start_step) / max(elapsed, 1e-9)
                metrics["lr"] = scheduler.get_last_lr()[0]
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                log.flush()
                progress(f"[{name}] step {step}/{total} {_format_metrics(metrics, log_keys)} "
                         f"{rate:.1f} it/s eta {(total - step) / max(rate, 1e-9) / 60:.1f} min")
                if on_log is not None:
                    on_log(step, metrics)
            if step % config.checkpoint_every == 0 or step == total:
                save(metrics)
    finally:
        log.close()
    return {"steps": step, "seconds": time.perf_counter() - start_time, **metrics}


def train(config: TrainConfig, out: str | Path, resume: bool = False,
          progress: Callable[[str], None] = log) -> dict:
    """Train Pr-VIPE (and, unless disabled, the 3D-lifter baseline with the same data, views and budget).

    Writes ``out/checkpoint.pt``, ``out/lifter.pt``, ``out/config.yaml`` and per-step metric logs.
    Returns a summary dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_table(config.data.table_path())
    progress(f"data: {table.path} ({len(table)} frames at {table.fps} fps, sha256 {table.checksum[:12]}); "
             f"train subjects {list(config.data.train_subjects)}")
    # Refuse a run directory it may not continue before overwriting anything in it.
    payload = resumable_checkpoint(out / CHECKPOINT, config, table, resume)
    lifter_payload = resumable_checkpoint(out / LIFTER_CHECKPOINT, config, table, resume) \
        if config.lifter_baseline else None
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    torch.manual_seed(config.seed)
    summary = {"prvipe": _run_loop(
        "prvipe", out, CHECKPOINT, "prvipe", config, table, build_model(config), train_step, payload, progress,
        ("loss", "triplet_loss", "ranking_loss", "active_triplets", "a", "b"))}
    del payload  # the model and optimizer hold its state now: drop the mapped checkpoint before the lifter trains
    if config.lifter_baseline:
        summary["lifter"] = _lifter_loop(config, out, table, lifter_payload, progress)
    return summary


def train_lifter(config: TrainConfig, out: str | Path, resume: bool = False,
                 progress: Callable[[str], None] = log, table: PoseTable | None = None) -> dict:
    """Train the 3D-lifting baseline alone (same data, views, dropout, precision and steps as Pr-VIPE) into
    ``out/lifter.pt``; returns its summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = table if table is not None else load_table(config.data.table_path())
    return _lifter_loop(config, out, table, resumable_checkpoint(out / LIFTER_CHECKPOINT, config, table, resume),
                        progress)


def _lifter_loop(config: TrainConfig, out: Path, table: PoseTable, payload: dict | None,
                 progress: Callable[[str], None]) -> dict:
    torch.manual_seed(config.seed)
    return _run_loop("lifter", out, LIFTER_CHECKPOINT, "lifter", config, table, Lifter(config.model), lifter_step,
                     payload, progress, ("lifter_mpjpe",))
