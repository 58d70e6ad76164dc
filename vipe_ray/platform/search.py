"""How a sweep searches: its search space as Tune domains, Optuna's TPE sampler behind Tune, and the ASHA (or
FIFO) scheduler that stops weak trials early."""

from __future__ import annotations

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from vipe_ray.config import TrainConfig
from vipe_ray.platform.sweep_spec import Param, SweepConfig


def tune_domain(param: Param):
    """One search dimension as Tune samples it."""
    if param.type == "choice":
        return tune.choice(list(param.values))
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    return tune.randint(int(param.low), int(param.high))


def param_space(sweep: SweepConfig) -> dict:
    """The sweep's search space as Tune's ``param_space`` ({dotted key: domain})."""
    return {key: tune_domain(param) for key, param in sweep.search_space.items()}


def build_searcher(sweep: SweepConfig):
    """Optuna's TPE behind Tune: seeded, ``startup_trials`` random trials first, constant liar so that
    concurrent trials do not all sample the same region, and the sweep's fixed first points."""
    startup = sweep.startup_trials or min(10, max(1, sweep.trials // 2))
    sampler = optuna.samplers.TPESampler(n_startup_trials=startup, seed=sweep.seed, constant_liar=True)
    return OptunaSearch(points_to_evaluate=[dict(p) for p in sweep.points_to_evaluate] or None, sampler=sampler)


def build_scheduler(sweep: SweepConfig, base: TrainConfig):
    """ASHA on the training step (the ``step`` every report carries), with ``max_t`` the longest run the
    search space allows: a run is never cut for reporting often. ``grace_period`` counts reports of the base
    config (``checkpoint_every`` steps each). FIFO when the sweep asks for it."""
    if sweep.scheduler.type != "asha":
        return FIFOScheduler()
    steps = [base.optim.steps]
    if "optim.steps" in sweep.search_space:
        steps += [int(v) for v in sweep.search_space["optim.steps"].candidates()]
    return ASHAScheduler(time_attr="step", max_t=max(steps), reduction_factor=sweep.scheduler.reduction_factor,
                         grace_period=min(sweep.scheduler.grace_period * base.checkpoint_every, max(steps)))
