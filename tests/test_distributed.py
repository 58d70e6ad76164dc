"""Ray Data + Ray Train (``vipe_ray.distributed``) on a real local Ray cluster: no mocks.

One ``ray.init(num_cpus=2)`` is shared by the module and shut down at its end. Every multi-worker run uses
0.5 CPU per worker (2 workers x 1 CPU on 2 CPUs leaves Ray Data no CPU and hangs silently), and every test
has a pytest timeout (on the test body: the shared cluster's start-up is the fixture's), because resource
deadlocks never raise. The timeouts only catch hangs; they are several times the fits' usual 25-45 s
because the machine may be shared.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vipe_ray.config import config_from_dict, config_to_dict, load_config, merge
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.distributed import Scaling, dataset_to_table, fit, pose_dataset
from vipe_ray.train import build_model, build_optimizer, load_checkpoint, train_step

#: Two workers on a 2-CPU cluster, leaving room for Ray Data's tasks.
TWO_WORKERS = Scaling(num_workers=2, cpus_per_worker=0.5)
#: Per-rank batch generator seeds of the DDP-gradient test.
BATCH_SEED = 4242


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module (reused if the session already started one)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.cloudpickle

    # Train functions defined here travel by value: Ray workers cannot import this test module by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if started:
            ray.shutdown()


def _config(tiny_overrides: dict, **changes):
    return load_config(overrides=merge(tiny_overrides, changes))


def _row_keys(clip: np.ndarray, frame: np.ndarray) -> list[str]:
    return [f"{c}:{f}" for c, f in zip(clip.tolist(), frame.tolist())]


def _checkpoint_step(result) -> int:
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(directory).step


# --- data ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120, func_only=True)
def test_pose_dataset_keeps_subjects_and_worker_tables_split_clips_at_gaps(ray_cluster, tiny_overrides):
    import ray.data

    config = _config(tiny_overrides)
    table = load_table(config.data.table_path())
    global_bars = ray.data.DataContext.get_current().enable_progress_bars
    dataset = pose_dataset(table.path, ["02", "93"])
    assert dataset.context.enable_progress_bars is False
    assert ray.data.DataContext.get_current().enable_progress_bars == global_bars  # the caller's is left alone
    shard = dataset_to_table(dataset, table.path, table.fps, table.checksum)
    expected = table.select(["02", "93"])
    assert sorted(_row_keys(shard.clip, shard.frame)) == sorted(_row_keys(expected.clip, expected.frame))
    assert set(shard.subject.tolist()) == {"02", "93"}

    # A shard holding two separate pieces of one clip: windows must not bridge the gap.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(table.path).filter(pa.compute.equal(pa.compute.field("subject"), "93"))
    clip = rows["clip"][0].as_py()
    rows = rows.filter(pa.compute.equal(pa.compute.field("clip"), clip)).sort_by("frame")
    pieces = pa.concat_tables([rows.slice(20, 10), rows.slice(0, 10)])  # frames 0-9 and 20-29, unordered
    shard = dataset_to_table(ray.data.from_arrow(pieces), table.path, table.fps, table.checksum)
    assert shard.clip.tolist() == [clip] * 10 + [f"{clip}#1"] * 10
    assert np.all(np.diff(shard.frame[:10]) == table.frame_step)
    windows = WindowSampler(shard, frames=3).windows(np.array([9, 10]))
    assert torch.equal(windows[0, 2], windows[0, 1]) and torch.equal(windows[1, 0], windows[1, 1])


# --- Ray Train, 2 workers --------------------------------------------------------------------------------


@pytest.mark.timeout(300, func_only=True)
def test_two_workers_train_on_disjoint_shards_covering_exactly_the_train_subjects(
        ray_cluster, tiny_overrides, tmp_path):
    # Validation subjects join the test subjects: rank 0 then skips reading a validation set (~10 s of Ray
    # Data), and the check below still covers every held-out subject.
    config = _config(tiny_overrides, optim={"steps": 2}, checkpoint_every=2,
                     data={"val_subjects": [], "test_subjects": ["06", "13", "09", "10"]})
    shards = tmp_path / "shards"
    shards.mkdir()
    result = fit(config, TWO_WORKERS, "shards", tmp_path / "runs", max_failures=0,
                 extra={"shard_log": str(shards)})
    assert result.error is None
    assert result.metrics["step"] == 2

    logged = [(shards / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    first, second = set(logged[0]), set(logged[1])
    assert len(first) == len(logged[0]) and len(second) == len(logged[1]), "a row twice in one shard"
    assert first and second
    assert not first & second, "shards overlap"

    table = load_table(config.data.table_path())
    keys = np.asarray(_row_keys(table.clip, table.frame))
    train = set(keys[np.isin(table.subject, config.data.train_subjects)].tolist())
    held_out = set(keys[np.isin(table.subject, config.data.val_subjects + config.data.test_subjects)].tolist())
    assert set(table.subject[np.isin(keys, list(held_out))].tolist()) == {"06", "09", "10", "13"}
    assert first | second == train
    assert not (first | second) & held_out


def _ddp_gradient_loop(loop_config: dict) -> None:
    """Ray Train worker: one DDP ``train_step`` on this rank's seeded batch; save the batch and the gradients."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    config = config_from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    table = load_table(loop_config["table"]).select(config.data.train_subjects)
    generator = torch.Generator().manual_seed(BATCH_SEED + rank)
    batch = WindowSampler(table).sample(config.optim.batch_size, generator)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    ddp_model = ray.train.torch.prepare_model(model)  # as vipe_ray.distributed does with 2+ workers
    assert isinstance(ddp_model, DistributedDataParallel)
    train_step(ddp_model, optimizer, batch, config, generator)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    torch.save({"batch": batch, "grads": grads}, Path(loop_config["out"], f"rank{rank}.pt"))


@pytest.mark.timeout(300, func_only=True)
def test_ddp_gradients_equal_the_mean_of_single_process_steps(ray_cluster, tiny_overrides, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = _config(tiny_overrides, model={"dropout": 0.0})
    out = tmp_path / "grads"
    out.mkdir()
    trainer = TorchTrainer(
        _ddp_gradient_loop,
        train_loop_config={"config": config_to_dict(config), "table": str(config.data.table_path().resolve()),
                           "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp-grads", storage_path=str(tmp_path / "runs")),
    )
    assert trainer.fit().error is None
    ddp = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    single = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rank in (0, 1):
            generator = torch.Generator().manual_seed(BATCH_SEED + rank)
            batch = WindowSampler(table).sample(config.optim.batch_size, generator)
            assert torch.equal(batch, ddp[rank]["batch"])
            torch.manual_seed(config.seed)
            model = build_model(config)
            optimizer, _ = build_optimizer(config, model)
            train_step(model, optimizer, batch, config, generator)
            single.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)

    names = [name for name, _ in build_model(config).named_parameters()]
    assert sorted(ddp[0]["grads"]) == sorted(names)
    assert not torch.equal(ddp[0]["batch"], ddp[1]["batch"])
    differs = 0
    for name in names:
        expected = (single[0][name] + single[1][name]) / 2
        torch.testing.assert_close(ddp[0]["grads"][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(ddp[1]["grads"][name], ddp[0]["grads"][name], rtol=1e-6, atol=1e-8, msg=name)
        differs += not torch.allclose(single[0][name], expected, rtol=1e-3, atol=1e-6)
    assert differs > len(names) // 2, "the two ranks' batches should give different gradients"


@pytest.mark.timeout(360, func_only=True)
def test_a_killed_worker_resumes_from_the_registered_checkpoint(ray_cluster, tiny_overrides, tmp_path):
    config = _config(tiny_overrides, optim={"steps": 12}, checkpoint_every=3, data={"val_subjects": []})
    marker, resumes = tmp_path / "killed", tmp_path / "resumes.txt"
    result = fit(config, TWO_WORKERS, "resume", tmp_path / "runs", max_failures=1,
                 extra={"fail_at_step": 7, "fail_marker": str(marker), "fail_delay_s": 4.0,
                        "resume_log": str(resumes)})
    assert result.error is None
    assert marker.read_text() == "7", "the last rank killed itself at step 7"
    lines = resumes.read_text().splitlines()
    resumed = dict(line.split() for line in lines)
    assert len(lines) == 2 and sorted(resumed) == ["0", "1"], "the whole group restarted once, from a checkpoint"
    steps = {int(s) for s in resumed.values()}
    assert len(steps) == 1 and steps.pop() in (3, 6), resumed  # a checkpoint registered before the kill
    assert result.metrics["step"] == config.optim.steps
    assert _checkpoint_step(result) == config.optim.steps


# --- Ray Train local mode --------------------------------------------------------------------------------


@pytest.mark.timeout(180, func_only=True)
def test_local_mode_fit_returns_a_loadable_checkpoint_with_validation_metrics(
        ray_cluster, tiny_overrides, tmp_path, monkeypatch):
    import tempfile

    config = _config(tiny_overrides)  # 6 steps, a checkpoint every 3
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # local mode writes checkpoints in this process
    result = fit(config, Scaling(num_workers=0), "local", tmp_path / "runs", max_failures=0,
                 extra={"val_queries": 30})
    try:
        assert result.checkpoint is not None
        # Each checkpoint was a temporary directory; only the returned (last) one is left.
        assert [str(d) for d in scratch.glob("vipe-ray-ckpt-*")] == [result.checkpoint.path]
        with result.checkpoint.as_directory() as directory:
            checkpoint = load_checkpoint(directory)
        assert checkpoint.step == config.optim.steps
        assert checkpoint.config == config
        assert checkpoint.data_checksum == load_table(config.data.table_path()).checksum
        assert result.metrics["step"] == config.optim.steps
        assert 0.0 <= result.metrics["val_hit@1"] <= 1.0
        assert result.metrics["val_hit@1"] <= result.metrics["val_hit@5"]
        assert checkpoint.payload["metrics"]["val_hit@1"] == result.metrics["val_hit@1"]
    finally:
        if result.checkpoint is not None:  # local mode keeps the worker's temporary directory
            shutil.rmtree(result.checkpoint.path, ignore_errors=True)
