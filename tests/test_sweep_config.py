"""Sweep YAMLs: every shipped sweep validates; bad ones fail before any trial, naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vipe_ray.config import ConfigError
from vipe_ray.sweep import check_resources, load_sweep, trial_config, base_values

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))
REQUIRED = {"kappa", "embedding", "sigmoid_init", "hard_negatives", "ablations", "smoke"}


def test_required_sweeps_are_shipped():
    assert REQUIRED <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_validates_and_names_its_command(path):
    sweep = load_sweep(path)
    assert sweep.name == path.stem
    first = path.read_text().splitlines()[0]
    assert first == f"# python -m vipe_ray.sweep sweeps/{path.name}", "every sweep starts with its exact command"
    base = base_values(sweep)
    for key, param in sweep.search_space.items():
        for value in param.candidates():
            config = trial_config(base, {key: value})
            node = config
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value or node == pytest.approx(value)


GOOD = """
name: t
base_config: vipe_ray/configs/tiny.yaml
search_space:
  mining.kappa: {type: uniform, low: 0.05, high: 0.2}
"""


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    (GOOD + "trails: 3\n", "trails: unknown key"),
    (GOOD + "trials: three\n", "trials: expected an integer"),
    (GOOD + "concurrency: 0\n", "concurrency: 0 must be >= 1"),
    (GOOD + "objective: {metric: val_hit@1, mode: up}\n", "objective.mode"),
    (GOOD + "resources: {num_workers: 1, cpus_per_worker: 0}\n", "resources.cpus_per_worker"),
    (GOOD + "scheduler: {type: hyperband}\n", "scheduler.type"),
    (GOOD + "resources: {num_workers: 1, gpus_per_worker: 0.5}\n", "resources.gpus_per_worker: 0.5 needs use_gpu"),
    (GOOD + "resources: {num_workers: 1, use_gpu: true, gpus_per_worker: 0}\n", "gpus_per_worker: 0.0 must be > 0"),
    (GOOD + "resources: {num_workers: 1, use_gpu: true, gpus_per_worker: 1.5}\n", "whole GPUs only"),
    (GOOD + "resources: {num_workers: 2, use_gpu: true, gpus_per_worker: 0.5}\n", "DDP ranks need a GPU each"),
    ("name: t\nsearch_space: {}\n", "search_space: must be a non-empty mapping"),
    ("name: t\n", "search_space: required"),
    ("name: t\nsearch_space:\n  model.widht: {type: choice, values: [1, 2]}\n", "search_space.model.widht = 1"),
    ("name: t\nsearch_space:\n  mining.kappa: {type: uniform, low: 0.2, high: 0.1}\n", "empty range"),
    ("name: t\nsearch_space:\n  mining.kappa: {type: uniform, low: -0.1, high: 0.1}\n", "mining.kappa: -0.1 must be > 0"),
    ("name: t\nsearch_space:\n  optim.lr: {type: loguniform, low: 0, high: 0.1}\n", "loguniform needs low > 0"),
    ("name: t\nsearch_space:\n  model.width: {type: choice, values: []}\n", "non-empty list"),
    ("name: t\nsearch_space:\n  model.width: {type: gaussian}\n", "search_space.model.width.type"),
    ("name: t\nsearch_space:\n  model.width: {type: choice, values: [8], low: 1}\n", "search_space.model.width.low"),
    ("name: t\nsearch_space:\n  model.probabilistic: {type: choice, values: [yes-please]}\n", "expected true/false"),
    ("name: t\noverrides: {optim: {stepz: 3}}\nsearch_space:\n  mining.kappa: {type: uniform, low: 0.05, high: 0.2}\n",
     "optim.stepz: unknown key"),
    (GOOD + "points_to_evaluate: [{mining.kappa: 0.3}]\n", "points_to_evaluate[0].mining.kappa: 0.3 is outside"),
    (GOOD + "points_to_evaluate: [{model.width: 8, mining.kappa: 0.1}]\n", "points_to_evaluate[0].model.width: not a key"),
    (GOOD + "points_to_evaluate: [{}]\n", "points_to_evaluate[0].mining.kappa: missing"),
    (GOOD + "points_to_evaluate: {mining.kappa: 0.1}\n", "points_to_evaluate: expected a list"),
    (GOOD + "trials: 1\npoints_to_evaluate: [{mining.kappa: 0.1}, {mining.kappa: 0.2}]\n", "2 fixed points but only 1"),
    (GOOD + "trials: 4\nstartup_trials: 5\n", "startup_trials: 5 must lie in [0, trials = 4]"),
    ("name: [t\n", "malformed YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_bad_sweeps_fail_naming_the_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_smoke_sweep_starts_from_a_fixed_point_unlike_optunas_first_sample():
    """The README's main command shows a search: its first trial is fixed, away from Optuna's first draw."""
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    assert sweep.points_to_evaluate == ({"mining.kappa": 0.08, "model.embedding_dim": 16},)
    assert sweep.trials == 2


def test_impossible_resources_fail_before_trials(tmp_path):
    sweep = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 4, cpus_per_worker: 1.0}\n"))
    with pytest.raises(ConfigError, match=r"4 worker\(s\) x 1.0 CPU = 4.0 CPUs .* cluster has 2.0 CPUs"):
        check_resources(sweep, {"CPU": 2.0})
    # One trial of 1.5 CPUs fits 2 CPUs, but not with the CPU that Ray Data's file listing needs.
    tight = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 1, cpus_per_worker: 1.5}\n"))
    with pytest.raises(ConfigError, match="Ray Data"):
        check_resources(tight, {"CPU": 2.0})
    gpu = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 1, cpus_per_worker: 0.5, use_gpu: true}\n"))
    with pytest.raises(ConfigError, match="resources.use_gpu"):
        check_resources(gpu, {"CPU": 2.0})
    # Half a GPU per one-worker trial: two trials share a GPU, and the GPUs bound the concurrency.
    half = load_sweep(_write(tmp_path, GOOD + "concurrency: 4\nresources: {num_workers: 1, cpus_per_worker: 1.0, "
                                              "use_gpu: true, gpus_per_worker: 0.5}\n"))
    assert half.resources.gpus == 0.5 and half.resources.ray().resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert check_resources(half, {"CPU": 16.0, "GPU": 2.0}) == 4
    assert check_resources(half, {"CPU": 16.0, "GPU": 1.0}) == 2
    assert load_sweep(_write(tmp_path, GOOD)).resources.gpus == 0.0
    two = load_sweep(_write(tmp_path, GOOD + "concurrency: 2\nresources: {num_workers: 1, cpus_per_worker: 0.49}\n"))
    assert check_resources(two, {"CPU": 2.0}) == 2
    assert check_resources(two, {"CPU": 1.6}) == 1, "concurrency shrinks to what leaves a CPU for data loading"


def test_tpe_starts_modelling_within_the_sweep_and_lies_under_concurrency(tmp_path):
    from vipe_ray.sweep import build_searcher

    for extra, startup in (("trials: 8\n", 4), ("trials: 40\n", 10), ("trials: 8\nstartup_trials: 2\n", 2)):
        searcher = build_searcher(load_sweep(_write(tmp_path, GOOD + extra)))
        sampler = searcher._sampler
        assert sampler._n_startup_trials == startup, extra
        assert sampler._constant_liar


def test_asha_runs_on_the_training_step_up_to_the_longest_run(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from vipe_ray.sweep import build_scheduler

    sweep = load_sweep(_write(tmp_path, GOOD + "scheduler: {type: asha, grace_period: 2, reduction_factor: 3}\n"))
    base = trial_config(base_values(sweep), {})
    asha = build_scheduler(sweep, base)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "step" and asha._max_t == base.optim.steps
    assert asha._reduction_factor == 3
    searched = load_sweep(_write(tmp_path, GOOD.replace(
        "search_space:\n", "search_space:\n  optim.steps: {type: choice, values: [6, 400]}\n")))
    assert build_scheduler(searched, base)._max_t == 400, "a run of 400 steps is never cut at a shorter max_t"
    fifo = load_sweep(_write(tmp_path, GOOD + "scheduler: {type: fifo}\n"))
    assert isinstance(build_scheduler(fifo, base), FIFOScheduler)
