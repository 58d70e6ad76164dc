"""The training loop: one loop for Pr-VIPE and the lifting baseline, in ``vipe-ray train`` and in every Ray
Train worker (:mod:`vipe_ray.training.ray_train`).

:func:`start_state` builds what a run trains (model on its device, optimizer, schedule, batch generator,
weight average), fresh or from a checkpoint; :func:`run_steps` steps it, checking every loss; the callers
decide what happens between steps (logs, validation, checkpoints, Ray reports). :func:`train` is the
single-process driver: with ``val_every``, each method validates and keeps its best-validation checkpoint in
``out/best/`` beside the latest (what ``--resume`` continues).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from vipe_ray import log
from vipe_ray.config import TrainConfig, config_to_dict, lifter_recipe
from vipe_ray.data import PoseTable, WindowSampler, load_table
from vipe_ray.evaluation.validation import (LIFTER_SCORE, PRVIPE_SCORE, lifter_validation_metrics,
                                            validation_metrics)
from vipe_ray.training.checkpoint import (BEST, CHECKPOINT, FORMAT, LIFTER_CHECKPOINT, atomic_save, build_lifter,
                                          build_model, resumable_checkpoint, rng_state, set_rng_state)
from vipe_ray.training.optim import WeightAverage, build_optimizer, weight_average
from vipe_ray.training.step import lifter_step, train_step


@dataclass
class TrainState:
    """What a run trains: the model (on its device), optimizer, LR schedule, batch generator and step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    step: int
    #: The weight average (``optim.ema``); a Ray Train run keeps it on rank 0 only (the ranks' weights are
    #: equal after each step).
    average: WeightAverage | None = None


def start_state(config: TrainConfig, kind: str, device: torch.device | str, stream_seed: int,
                payload: dict | None = None, keep_average: bool = True) -> TrainState:
    """A run's state on ``device``, fresh or from a checkpoint ``payload``; ``kind``: ``prvipe`` or ``lifter``
    (then ``config`` is the lifter's recipe). The batch generator, seeded with ``stream_seed``, stays on the
    CPU: cameras, dropout and noise are drawn there, so a GPU run draws what a CPU run draws.

    The model moves to its device before the optimizer is built and its state loaded: ``load_state_dict``
    puts the optimizer state on the parameters' device.
    """
    torch.manual_seed(config.seed)
    model = (build_model(config) if kind == "prvipe" else build_lifter(config)).to(device)
    optimizer, scheduler = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(stream_seed)
    step = 0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        step = payload["step"]
    average = weight_average(config, model, payload) if keep_average else None
    return TrainState(model, optimizer, scheduler, generator, step, average)


class TrainingDiverged(RuntimeError):
    """A step gave a non-finite loss: training stops before anything of that step is saved."""


def check_finite(metrics: dict[str, float], step: int, where: str) -> None:
    """Raise :class:`TrainingDiverged` naming the step and its losses when any of them is not finite."""
    losses = {k: v for k, v in metrics.items() if k.endswith("loss") or k == "lifter_mpjpe"}
    if not all(math.isfinite(v) for v in losses.values()):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        raise TrainingDiverged(f"{where}: step {step} diverged ({terms}); this step was not saved, the last "
                               "checkpoint is intact. Lower optim.lr or the loss weights (loss.*_weight).")


def run_steps(state: TrainState, model: torch.nn.Module, step_fn: Callable, sample: Callable, config: TrainConfig,
              where: str, after_step: Callable[[int, dict[str, float]], None]) -> None:
    """Step ``state`` to ``config.optim.steps``: a batch from ``sample(batch_size, generator)``, one
    ``step_fn`` (:func:`train_step` or :func:`lifter_step`) on ``model`` (``state.model`` or its DDP
    wrapper), a finite-loss check before anything of the step is kept, the schedule and weight average, then
    ``after_step(step, metrics)``."""
    total = config.optim.steps
    while state.step < total:
        metrics = step_fn(model, state.optimizer, sample(config.optim.batch_size, state.generator), config,
                          state.generator, progress=state.step / total)
        check_finite(metrics, state.step + 1, where)
        state.scheduler.step()
        if state.average is not None:
            state.average.update(state.model)
        state.step += 1
        after_step(state.step, metrics)


def checkpoint_payload(state: TrainState, config: TrainConfig, kind: str, data_checksum: str, data_path: str,
                       metrics: dict[str, float], **extra) -> dict:
    """The checkpoint of ``state``, the same in ``vipe-ray train`` and Ray Train (``config``: the run's
    whole config, the lifter's recipe included)."""
    return {"format": FORMAT, "kind": kind, "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "config": config_to_dict(config), "step": state.step, "data_checksum": data_checksum,
            "data_path": data_path, "rng": rng_state(state.generator), "metrics": metrics,
            "ema": state.average.state_dict() if state.average is not None else None, **extra}


def evaluated_model(state: TrainState) -> torch.nn.Module:
    """The weights checkpoints are scored and deployed with: the average where the run keeps one."""
    return state.average.model(state.model) if state.average is not None else state.model


def better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` (None: nothing yet); NaN never does."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _format_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


#: Per method: checkpoint file, stream seed offset (the lifter draws its own batches), metrics shown in the
#: progress lines, and the validation that scores its checkpoints.
_METHODS = {
    "prvipe": (CHECKPOINT, 0, ("loss", "triplet_loss", "ranking_loss", "active_triplets", "a", "b"), PRVIPE_SCORE),
    "lifter": (LIFTER_CHECKPOINT, 7919, ("lifter_mpjpe",), LIFTER_SCORE),
}


def _train_method(kind: str, config: TrainConfig, out: Path, table: PoseTable, val_table: PoseTable | None,
                  payload: dict | None, progress: Callable[[str], None], device: torch.device) -> dict:
    """Train one method in this process: logs every ``log_every`` steps, the latest checkpoint every
    ``checkpoint_every``, and at checkpoints every ``val_every`` steps (with validation subjects) a validation
    and, when it scores best so far, a copy of the checkpoint in ``out/best/``."""
    file, offset, log_keys, (score, mode) = _METHODS[kind]
    recipe = config if kind == "prvipe" else lifter_recipe(config)
    state = start_state(recipe, kind, device, config.seed + offset, payload)
    torch.manual_seed(config.seed)  # the model's own random draws (dropout layers) start from the seed
    if payload is not None:
        set_rng_state(state.generator, payload["rng"])
        progress(f"[{kind}] resumed from {out / file} at step {state.step}")
    best_file = out / BEST / file
    if config.val_every == 0 and best_file.exists():
        progress(f"[{kind}] note: {best_file} is from a run that validated; with val_every 0 it is kept but no "
                 "longer updated, and load_checkpoint / evaluate still prefer it (which='latest' reads the latest)")
    best = None
    if payload is not None and best_file.exists():
        best = torch.load(best_file, map_location="cpu", weights_only=False, mmap=True)["metrics"].get(score)
    # Neighbouring frames serve triplet mining; the lifter has none and draws every pose at random.
    neighbours = config.mining.neighbours if kind == "prvipe" else 0
    sampler = WindowSampler(table.select(config.data.train_subjects), config.temporal.window, config.temporal.stride,
                            neighbours)
    total = recipe.optim.steps
    start_time, start_step = time.perf_counter(), state.step
    last: dict[str, float] = {}
    log_file = (out / f"{kind}_metrics.jsonl").open("a")

    def after_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal best
        if step % config.log_every == 0 or step == total:
            rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
            metrics["lr"] = state.scheduler.get_last_lr()[0]
            log_file.write(json.dumps({"step": step, **metrics}) + "\n")
            log_file.flush()
            progress(f"[{kind}] step {step}/{total} {_format_metrics(metrics, log_keys)} "
                     f"{rate:.1f} it/s eta {(total - step) / max(rate, 1e-9) / 60:.1f} min")
        last.clear()
        last.update(metrics)
        if step % config.checkpoint_every == 0 or step == total:
            scored = dict(metrics)
            validate = val_table is not None and config.val_every > 0 and (step % config.val_every == 0
                                                                          or step == total)
            if validate:
                model = evaluated_model(state)
                scored.update(validation_metrics(model, config, val_table, config.eval.max_queries)
                              if kind == "prvipe" else lifter_validation_metrics(model, config, val_table))
                progress(f"[{kind}] step {step} validation {score}={scored[score]:.4f}")
            payload = checkpoint_payload(state, config, kind, table.checksum, table.path, scored)
            # The best before the latest: a crash between the two never leaves a resumed run without its best.
            if validate and better(scored[score], best, mode):
                best = scored[score]
                atomic_save(payload, best_file)
            atomic_save(payload, out / file)

    try:
        run_steps(state, state.model, train_step if kind == "prvipe" else lifter_step, sampler.sample, recipe,
                  str(out / file), after_step)
    finally:
        log_file.close()
    return {"steps": state.step, "seconds": time.perf_counter() - start_time, **last,
            **({score: best} if best is not None else {})}


def default_device() -> torch.device:
    """The device ``vipe-ray train`` trains on: the first GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validation_table(config: TrainConfig, table: PoseTable) -> PoseTable | None:
    subjects = [s for s in config.data.val_subjects if s in table.subjects]
    return table.select(subjects) if subjects else None


def train(config: TrainConfig, out: str | Path, resume: bool = False, progress: Callable[[str], None] = log,
          device: str | torch.device | None = None) -> dict:
    """Train Pr-VIPE and, unless ``lifter_baseline`` is false, the 3D-lifting baseline (same data and views,
    its own recipe: :func:`vipe_ray.config.lifter_recipe`) on ``device`` (default: :func:`default_device`).

    Writes ``out/checkpoint.pt`` and ``out/lifter.pt`` (latest), ``out/best/`` (each method's best-validation
    checkpoint, with ``val_every`` and validation subjects), ``out/config.yaml`` and per-step metric logs.
    Returns a summary dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    table = load_table(config.data.table_path())
    progress(f"data: {table.path} ({len(table)} frames at {table.fps} fps, sha256 {table.checksum[:12]}); "
             f"train subjects {list(config.data.train_subjects)}; device {device}")
    # Refuse a run directory it may not continue before overwriting anything in it.
    payload = resumable_checkpoint(out / CHECKPOINT, config, table, resume)
    lifter_payload = resumable_checkpoint(out / LIFTER_CHECKPOINT, config, table, resume) \
        if config.lifter_baseline else None
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    val_table = _validation_table(config, table)
    summary = {"prvipe": _train_method("prvipe", config, out, table, val_table, payload, progress, device)}
    del payload  # the model and optimizer hold its state now: drop the mapped checkpoint before the lifter trains
    if config.lifter_baseline:
        summary["lifter"] = _train_method("lifter", config, out, table, val_table, lifter_payload, progress, device)
    return summary


def train_lifter(config: TrainConfig, out: str | Path, resume: bool = False, progress: Callable[[str], None] = log,
                 table: PoseTable | None = None, device: str | torch.device | None = None) -> dict:
    """Train the 3D-lifting baseline alone (its recipe: :func:`vipe_ray.config.lifter_recipe`) into
    ``out/lifter.pt``, its best-validation checkpoint into ``out/best/lifter.pt``; returns its summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    table = table if table is not None else load_table(config.data.table_path())
    payload = resumable_checkpoint(out / LIFTER_CHECKPOINT, config, table, resume)
    return _train_method("lifter", config, out, table, _validation_table(config, table), payload, progress, device)

