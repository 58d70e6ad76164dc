"""Sweep YAMLs: every shipped sweep validates; bad ones fail before any trial, naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vipe_ray.config import ConfigError
from vipe_ray.platform.resources import check_resources
from vipe_ray.platform.study_spec import is_study, load_study, variant_config
from vipe_ray.platform.sweep_spec import base_values, load_sweep, trial_config

REPO = Path(__file__).resolve().parents[2]
ALL = sorted((REPO / "sweeps").glob("*.yaml"))
SHIPPED = [p for p in ALL if not is_study(p)]
STUDIES = [p for p in ALL if is_study(p)]
REQUIRED = {"kappa", "embedding", "sigmoid_init", "hard_negatives", "ablations", "smoke", "ablation_study",
            "ablation_study_cpu"}


def test_required_sweeps_are_shipped():
    assert REQUIRED <= {p.stem for p in ALL}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_validates_and_names_its_command(path):
    study = load_study(path)
    assert study.name == path.stem and len(study.seeds) >= 3 and len(study.variants) >= 8
    assert path.read_text().splitlines()[0] == f"# python -m vipe_ray.sweep sweeps/{path.name}"
    base = base_values(study)
    for variant, overrides in study.variants.items():
        config = variant_config(study, base, variant, 5)
        assert config.seed == 5
        for key, value in overrides.items():
            node = config
            for part in key.split("."):
                node = getattr(node, part)
            assert node == (tuple(value) if isinstance(value, list) else value) or node == pytest.approx(value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_validates_and_names_its_command(path):
    sweep = load_sweep(path)
    assert sweep.name == path.stem
    first = path.read_text().splitlines()[0]
    assert first == f"# python -m vipe_ray.sweep sweeps/{path.name}", "every sweep starts with its exact command"
    base = base_values(sweep)
    if path.stem != "smoke":  # the smoke sweep's first point is a corner of its space, to differ visibly
        reference = trial_config(base, {})
        for key, value in sweep.points_to_evaluate[0].items():
            node = reference
            for part in key.split("."):
                node = getattr(node, part)
            assert node == pytest.approx(value), f"the first trial is the base config ({key} = {node})"
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
    from vipe_ray.platform.search import build_searcher

    for extra, startup in (("trials: 8\n", 4), ("trials: 40\n", 10), ("trials: 8\nstartup_trials: 2\n", 2)):
        searcher = build_searcher(load_sweep(_write(tmp_path, GOOD + extra)))
        sampler = searcher._sampler
        assert sampler._n_startup_trials == startup, extra
        assert sampler._constant_liar


def test_asha_runs_on_the_training_step_up_to_the_longest_run(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from vipe_ray.platform.search import build_scheduler

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


def test_a_cluster_that_can_grow_is_judged_by_its_limits(tmp_path, capsys):
    """An autoscaling cluster: a sweep that fits only once it grows goes ahead with a warning; one that never
    fits still fails before any trial, saying what the cluster has now and what it can grow to."""
    big = load_sweep(_write(tmp_path, GOOD + "concurrency: 4\nresources: {num_workers: 4, cpus_per_worker: 1.0}\n"))
    assert check_resources(big, {"CPU": 2.0}, {"CPU": 32.0}) == 4
    assert "trials wait for the autoscaler" in capsys.readouterr().out
    assert check_resources(big, {"CPU": 2.0}, {"CPU": 12.0}) == 2, "concurrency from what the cluster grows to"
    with pytest.raises(ConfigError, match=r"cluster has 2.0 CPUs now and can grow to 4.0"):
        check_resources(big, {"CPU": 2.0}, {"CPU": 4.0})
    gpu = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 2, cpus_per_worker: 1.0, use_gpu: true}\n"))
    assert check_resources(gpu, {"CPU": 4.0}, {"GPU": 4.0}) == 1
    with pytest.raises(ConfigError, match=r"resources.use_gpu: 2 GPU worker\(s\) .* 0.0 GPUs now and can grow to 1.0"):
        check_resources(gpu, {"CPU": 4.0}, {"GPU": 1.0})
    assert check_resources(big, {"CPU": 2.0}, {"CPU": float("inf")}) == 4, "an unbounded group"


def test_cluster_max_from_the_sweep_or_the_command_line(tmp_path):
    from vipe_ray.platform.resources import cluster_limits
    from vipe_ray.platform.sweep_spec import parse_resources

    sweep = load_sweep(_write(tmp_path, GOOD + "cluster_max: {cpu: 64, GPU: 8, trial_driver: 100}\n"))
    assert sweep.cluster_max == {"CPU": 64.0, "GPU": 8.0, "trial_driver": 100.0}
    assert parse_resources("CPU=16, gpu=2", "--cluster-max") == {"CPU": 16.0, "GPU": 2.0}
    # No Ray here: the autoscaler's limits are unknown, the command line wins over the YAML.
    assert cluster_limits(sweep, {"GPU": 2.0}) == {"CPU": 64.0, "GPU": 2.0, "trial_driver": 100.0}
    for bad, expected in (("CPU", "expected RESOURCE=AMOUNT"), ("CPU=lots", "CPU: expected a number"),
                          ("CPU=-1", "CPU: expected a number >= 0")):
        with pytest.raises(ConfigError, match=f"--cluster-max.*{expected}"):
            parse_resources(bad, "--cluster-max")
    for text, expected in (("cluster_max: 64\n", "cluster_max: expected a mapping"),
                           ("cluster_max: {GPU: many}\n", "cluster_max.GPU: expected a number >= 0")):
        with pytest.raises(ConfigError, match=expected) as info:
            load_sweep(_write(tmp_path, GOOD + text))
        assert str(tmp_path / "sweep.yaml") in str(info.value)


def test_trial_drivers_use_the_trial_driver_resource_where_the_cluster_has_it(tmp_path):
    from vipe_ray.platform.resources import TRIAL_DRIVER_RESOURCE, trial_resources

    train = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 2, cpus_per_worker: 1.0, use_gpu: true}\n"))
    assert trial_resources(train, {"CPU": 8.0, "GPU": 2.0}) == {"cpu": 0.01}
    assert trial_resources(train, {"CPU": 8.0, TRIAL_DRIVER_RESOURCE: 100.0}) == {"cpu": 0.01, TRIAL_DRIVER_RESOURCE: 1.0}
    local = load_sweep(_write(tmp_path, GOOD + "resources: {num_workers: 0, cpus_per_worker: 0.5}\n"))
    assert trial_resources(local, {"CPU": 2.0}) == {"cpu": 0.5}


def test_a_node_local_mlflow_store_is_refused_on_a_multi_node_cluster(tmp_path, capsys):
    from vipe_ray.storage import location
    from vipe_ray.platform.resources import check_cluster_stores

    results = location(tmp_path / "results")
    from vipe_ray.platform.tracking import is_node_local_store

    assert not any(map(is_node_local_store, ("http://mlflow:5000", "https://x", "databricks", "postgresql://d")))
    for uri in ("sqlite:////x/mlflow.db", "file:///x/mlruns", "./mlruns", "/abs/mlruns"):
        assert is_node_local_store(uri)
        with pytest.raises(ConfigError, match=r"--tracking-uri: .* 3 nodes .*MLFLOW_TRACKING_URI or --tracking-uri"):
            check_cluster_stores(uri, results, nodes=3, grows=False)
        with pytest.raises(ConfigError, match="1 node that can grow"):
            check_cluster_stores(uri, results, nodes=1, grows=True)
    check_cluster_stores("sqlite:////x/mlflow.db", results, nodes=1, grows=False)
    out = capsys.readouterr().out
    assert "warning: MLflow store sqlite:////x/mlflow.db is a file on the driver's node" in out
    assert "MLFLOW_TRACKING_URI" in out
    import pyarrow.fs

    from vipe_ray.storage import Location

    bucket = Location(pyarrow.fs.S3FileSystem(region="us-east-1"), "bucket/prefix", "s3")  # no network here
    check_cluster_stores("http://mlflow:5000", bucket, nodes=3, grows=True)
    assert capsys.readouterr().out == ""
    check_cluster_stores("postgresql+psycopg2://u@db/mlflow", results, nodes=2, grows=False)
    assert "must be a shared mount" in capsys.readouterr().out
