"""The optimizer, its learning-rate schedule and the weight average that checkpoints keep."""

from __future__ import annotations

import copy
import math

import torch

from vipe_ray.config import TrainConfig


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


