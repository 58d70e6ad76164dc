"""Ray Data + Ray Train (``vipe_ray.training.ray_train``) on a real local Ray cluster: no mocks.

One ``ray.init(num_cpus=2)`` is shared by the module and shut down at its end. Every multi-worker run uses
0.5 CPU per worker (2 workers x 1 CPU on 2 CPUs leaves Ray Data no CPU and hangs silently), and every test
has a pytest timeout (on the test body: the shared cluster's start-up is the fixture's), because resource
deadlocks never raise. The timeouts only catch hangs; they are several times the fits' usual 25-45 s
because the machine may be shared.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import local_ray
import torch

from vipe_ray.config import config_from_dict, config_to_dict, load_config, merge
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.training.ray_train import (Scaling, WorkerCallback, WorkerInfo, dataset_to_table, fit, pose_dataset,
                                  resumed_payload, worker_threads)
from vipe_ray.training.loop import start_state
from vipe_ray.training.checkpoint import build_model, load_checkpoint

# Integration tests (Ray Train): `pytest -m "not integration"` is the fast unit suite.
from vipe_ray.training.optim import build_optimizer

# Integration tests (Ray Train): `pytest -m "not integration"` is the fast unit suite.
from vipe_ray.training.step import train_step

# Integration tests (Ray Train): `pytest -m "not integration"` is the fast unit suite.
pytestmark = pytest.mark.integration

#: Two workers on a 2-CPU cluster, leaving room for Ray Data's tasks.
TWO_WORKERS = Scaling(num_workers=2, cpus_per_worker=0.5)
#: Per-rank batch generator seeds of the DDP-gradient test.
BATCH_SEED = 4242


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module (reused if the session already started one)."""
    import ray.cloudpickle

    # Train functions defined here travel by value: Ray workers cannot import this test module by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with local_ray() as ray_module:
            yield ray_module
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(tiny_overrides: dict, **changes):
    return load_config(overrides=merge(tiny_overrides, changes))


def _row_keys(clip: np.ndarray, frame: np.ndarray) -> list[str]:
    return [f"{c}:{f}" for c, f in zip(clip.tolist(), frame.tolist())]


def _checkpoint_step(result) -> int:
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(directory).step


class MetricsLog(WorkerCallback):
    """Every rank writes its latest report (metrics, node, device) to ``rank{r}.json`` in ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_report(self, worker: WorkerInfo, step: int, metrics: dict[str, float]) -> None:
        record = {**metrics, "node_id": worker.node_id, "device": worker.device}
        Path(self.directory, f"rank{worker.rank}.json").write_text(json.dumps(record))


class KillOnce(WorkerCallback):
    """The last rank SIGKILLs itself once, at ``step``: it writes ``marker`` first, then waits ``delay_s`` so
    that the controller registers the latest checkpoint."""

    def __init__(self, step: int, marker: str, delay_s: float):
        self.step, self.marker, self.delay_s = step, marker, delay_s

    def on_step(self, worker: WorkerInfo, step: int) -> None:
        if step == self.step and worker.rank == worker.world - 1 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(step))
            time.sleep(self.delay_s)
            os.kill(os.getpid(), 9)


class ResumeLog(WorkerCallback):
    """Each worker that resumes appends a line ``rank step`` to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_start(self, worker: WorkerInfo) -> None:
        if worker.start_step:
            with open(self.path, "a") as handle:
                handle.write(f"{worker.rank} {worker.start_step}\n")


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
def test_two_workers_hold_halves_of_the_train_rows_and_report_per_worker(ray_cluster, tiny_overrides, tmp_path):
    # Validation subjects join the test subjects: rank 0 then skips reading a validation set (~10 s of Ray
    # Data), and the count below still excludes every held-out subject. buffer_rows 0: each worker holds its
    # whole shard, so its buffer size is its shard size (tests/training/test_ingest.py checks the rows themselves).
    config = _config(tiny_overrides, optim={"steps": 2, "ema": 0.5}, checkpoint_every=2,
                     data={"val_subjects": [], "test_subjects": ["06", "13", "09", "10"], "buffer_rows": 0})
    logs = tmp_path / "logs"
    logs.mkdir()
    result = fit(config, TWO_WORKERS, "shards", tmp_path / "runs", max_failures=0,
                 extra={"callbacks": [MetricsLog(str(logs))]})
    assert result.error is None
    assert result.metrics["step"] == 2
    reports = [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]
    table = load_table(config.data.table_path())
    train_rows = int(np.isin(table.subject, config.data.train_subjects).sum())
    shards = [r["data_buffer_rows"] for r in reports]
    # streaming_split(equal=True) deals equal shards: it may leave out fewer rows than there are workers.
    assert shards[0] == shards[1] and train_rows - 1 <= sum(shards) <= train_rows, shards
    assert all(r["data_epochs"] == 1 for r in reports), "a shard that fits is read once"
    assert all(r["global_batch"] == 2 * config.optim.batch_size for r in reports)
    assert all(r["worker_nodes"] == 1 and r["device"] == "cpu" for r in reports)
    assert all(r["peak_rss_mb"] > 0 for r in reports)
    # Rank 0 kept the weight average: the checkpoint's model is it, the trained weights beside it.
    with result.checkpoint.as_directory() as directory:
        checkpoint = load_checkpoint(directory)
    assert checkpoint.payload["ema"]["updates"] == config.optim.steps
    for key, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, checkpoint.payload["ema"]["average"][key]), key
    assert any(not torch.equal(v, checkpoint.payload["model"][k]) for k, v in checkpoint.model.state_dict().items())


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
    ddp_model = ray.train.torch.prepare_model(model)  # as vipe_ray.training.ray_train does with 2+ workers
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
                 extra={"callbacks": [KillOnce(7, str(marker), delay_s=4.0), ResumeLog(str(resumes))]})
    assert result.error is None
    assert marker.read_text() == "7", "the last rank killed itself at step 7"
    lines = resumes.read_text().splitlines()
    resumed = dict(line.split() for line in lines)
    assert len(lines) == 2 and sorted(resumed) == ["0", "1"], "the whole group restarted once, from a checkpoint"
    steps = {int(s) for s in resumed.values()}
    assert len(steps) == 1 and steps.pop() in (3, 6), resumed  # a checkpoint registered before the kill
    assert result.metrics["step"] == config.optim.steps
    assert _checkpoint_step(result) == config.optim.steps


# --- a worker's state and device ------------------------------------------------------------------------


def _trained_payload(config, steps: int = 2) -> dict:
    """The state a checkpoint holds after ``steps`` CPU steps (what rank 0 writes)."""
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    state = start_state(config, "prvipe", "cpu", 0)
    for _ in range(steps):
        batch = WindowSampler(table).sample(config.optim.batch_size, state.generator)
        train_step(state.model, state.optimizer, batch, config, state.generator)
        state.scheduler.step()
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "step": steps}


def test_a_resumed_worker_state_is_on_its_device_and_steps(tiny_overrides):
    config = _config(tiny_overrides)
    payload = _trained_payload(config)
    # "meta" holds no data but keeps every tensor's device: the optimizer state must follow the parameters.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # values, not devices
        meta = start_state(config, "prvipe", torch.device("meta"), 0, payload)
    moments = [v for state in meta.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert moments and all(t.device.type == "meta" for t in moments)
    assert all(p.device.type == "meta" for p in meta.model.parameters())
    # The order this guards: state loaded before the move stays behind on the CPU.
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    optimizer.load_state_dict(payload["optimizer"])
    model.to("meta")
    assert all(v.device.type == "cpu" for state in optimizer.state.values() for v in state.values())

    resumed = start_state(config, "prvipe", "cpu", 0, payload)
    assert resumed.step == 2 and resumed.scheduler.last_epoch == 2
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, payload["model"][name]), name
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    batch = WindowSampler(table).sample(config.optim.batch_size, resumed.generator)
    metrics = train_step(resumed.model, resumed.optimizer, batch, config, resumed.generator)
    assert np.isfinite(metrics["loss"])


def test_a_worker_refuses_a_checkpoint_of_another_config_or_data(tiny_overrides, tmp_path):
    """A sweep --resume rebuilds trial configs from today's files: a worker must not continue a checkpoint
    trained with another config (named key by key) or data, and continues its own."""
    from vipe_ray.config import ConfigError
    from vipe_ray.training.ray_train import CHECKPOINT

    config = _config(tiny_overrides)
    data = {"path": "poses.parquet", "checksum": "abc"}
    payload = {**_trained_payload(config), "config": config_to_dict(config), "data_checksum": "abc"}
    torch.save(payload, tmp_path / CHECKPOINT)
    assert resumed_payload(str(tmp_path), config, data)["step"] == 2
    edited = config_from_dict(merge(config_to_dict(config), {"loss": {"ranking_weight": 1.0}, "seed": 3}))
    with pytest.raises(ConfigError, match=r"different config .*sweep --resume") as refused:
        resumed_payload(str(tmp_path), edited, data)
    assert "seed: 0 -> 3" in str(refused.value)
    assert f"loss.ranking_weight: {config.loss.ranking_weight!r} -> 1.0" in str(refused.value)
    with pytest.raises(ConfigError, match=r"data checksum abc differs from poses.parquet \(xyz\)"):
        resumed_payload(str(tmp_path), config, {**data, "checksum": "xyz"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_resumed_gpu_worker_steps_and_validates_on_the_gpu(tiny_overrides):
    from vipe_ray.evaluation.validation import validation_metrics

    config = _config(tiny_overrides)
    payload = _trained_payload(config)
    state = start_state(config, "prvipe", "cuda", 0, payload)
    table = load_table(config.data.table_path())
    batch = WindowSampler(table.select(config.data.train_subjects)).sample(config.optim.batch_size, state.generator)
    assert np.isfinite(train_step(state.model, state.optimizer, batch, config, state.generator)["loss"])
    assert all(v.is_cuda for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    on_gpu = validation_metrics(state.model, config, table.select(config.data.val_subjects), max_queries=30)
    on_cpu = validation_metrics(state.model.cpu(), config, table.select(config.data.val_subjects), max_queries=30)
    assert 0.0 <= on_gpu["val_hit@1"] <= 1.0
    assert on_gpu["val_hit@5"] == pytest.approx(on_cpu["val_hit@5"], abs=0.05)


def test_worker_threads_are_its_whole_cpus_at_least_one():
    assert worker_threads(None) is None
    assert [worker_threads(c) for c in (0.1, 0.5, 1.0, 2.0, 3.9)] == [1, 1, 1, 2, 3]


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
        # Each checkpoint was a temporary directory; the returned (last) one is left, and the best-validation
        # one when it is another (what a sweep registers), no more.
        left = {str(d) for d in scratch.glob("vipe-ray-ckpt-*")}
        assert result.checkpoint.path in left and len(left) <= 2
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
