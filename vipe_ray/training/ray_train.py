"""Ray Train: distributed data-parallel training of the Pr-VIPE step, fed by Ray Data.

* Ray Data reads the pose table (the split's subjects filtered in the scan), in pieces dealt in random order
  to the workers; each worker keeps a bounded buffer of its shard and renders fresh random views of it every
  step (see :mod:`vipe_ray.training.ingest`: nothing is rendered up front, no worker holds the table).
* ``TorchTrainer`` runs :func:`vipe_ray.training.step.train_step` in every worker under DDP: gloo on CPU, nccl on GPU
  (Ray picks the backend from ``use_gpu``). Each worker draws its own batch of ``optim.batch_size`` poses
  (the reference's "batch per worker"): N workers step on N x batch_size poses, with the same ``lr``.
* Each worker runs torch on its device (:func:`start_state`) with one intra-op thread per whole Ray CPU it
  holds; validation runs the model on that device.
* Every ``checkpoint_every`` steps the workers report metrics (rank 0 adds validation Hit@k) and rank 0 a
  checkpoint in the same format as ``vipe-ray train``, plus the Ray node of every rank; a restarted worker
  group resumes from the last registered checkpoint (``FailureConfig``).
* Whatever observes a worker (MLflow logging, tests) is a :class:`WorkerCallback`, outside the loop.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vipe_ray import storage
from vipe_ray.config import ConfigError, TrainConfig, config_from_dict
from vipe_ray.data import PoseTable, SOURCE_FPS, file_sha256, read_metadata
from vipe_ray.training.ingest import StreamedShard, dataset_to_table, pose_dataset
from vipe_ray.evaluation.validation import PRVIPE_SCORE, validation_metrics
from vipe_ray.training.checkpoint import CHECKPOINT, check_resumable
from vipe_ray.training.loop import TrainState, checkpoint_payload, evaluated_model, run_steps, start_state
from vipe_ray.training.step import train_step


@dataclass(frozen=True)
class Scaling:
    """Workers of one training run (a sweep's ``resources``): ``num_workers`` = 0 trains in the calling
    process (Ray Train local mode); ``use_gpu`` gives each worker ``gpus_per_worker`` GPUs (default 1; a
    fraction lets the runs of several trials share a GPU), DDP over nccl."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"resources.num_workers: {self.num_workers} must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker: {self.cpus_per_worker} must be > 0")
        if self.use_gpu and self.num_workers == 0:
            raise ConfigError("resources.use_gpu: GPU training needs num_workers >= 1")
        g = self.gpus_per_worker
        if g is None:
            return
        if not self.use_gpu:
            raise ConfigError(f"resources.gpus_per_worker: {g} needs use_gpu: true")
        if not g > 0:
            raise ConfigError(f"resources.gpus_per_worker: {g} must be > 0")
        if g > 1 and not float(g).is_integer():
            raise ConfigError(f"resources.gpus_per_worker: {g}: above 1 GPU, Ray gives whole GPUs only")
        if g < 1 and self.num_workers > 1:
            # Two ranks of one DDP group could land on one GPU, which nccl refuses.
            raise ConfigError(f"resources.gpus_per_worker: {g} with num_workers {self.num_workers}: a fraction of "
                              f"a GPU is for one worker per trial (trials share the GPU); DDP ranks need a GPU each")

    @property
    def gpus(self) -> float:
        """GPUs of each worker (0 without ``use_gpu``)."""
        if not self.use_gpu:
            return 0.0
        return 1.0 if self.gpus_per_worker is None else float(self.gpus_per_worker)

    @property
    def cpus_per_trial(self) -> float:
        """CPUs one run holds: its workers, or the calling process in local mode."""
        return max(self.num_workers, 1) * self.cpus_per_worker

    def ray(self):

        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=resources)


#: The validation metric that ranks a run's checkpoints.
BEST_METRIC = PRVIPE_SCORE[0]


@dataclass(frozen=True)
class WorkerInfo:
    """One training worker: its rank of ``world``, Ray node, torch device and the step it (re)started at."""

    rank: int
    world: int
    node_id: str
    device: str
    start_step: int


class WorkerCallback:
    """Observes a worker's training loop from outside it (e.g. MLflow logging, tests). Subclass and override;
    pass picklable instances in ``loop_config["callbacks"]``: every rank runs them."""

    def on_start(self, worker: WorkerInfo) -> None:
        """The worker's state is ready (fresh or resumed from ``worker.start_step``); no data read yet."""

    def on_step(self, worker: WorkerInfo, step: int) -> None:
        """An optimizer step finished; ``step`` counts them from the start of the run."""

    def on_report(self, worker: WorkerInfo, step: int, metrics: dict[str, float]) -> None:
        """This worker's metrics, just before they are reported (rank 0's include validation)."""


def worker_threads(cpus: float | None) -> int | None:
    """Torch intra-op threads of a worker holding ``cpus`` Ray CPUs: its whole CPUs, at least 1 (a fraction
    of a CPU still runs one thread). None (no Ray CPUs known, e.g. local mode outside Tune): leave torch's."""
    if cpus is None:
        return None
    return max(1, int(cpus))


def resumed_payload(directory: str, config: TrainConfig, data: dict) -> dict:
    """The checkpoint a restarted or resumed worker continues, from Ray Train's checkpoint ``directory``.

    Refused (:class:`ConfigError`, naming the changed keys) when it was trained with another config or data: a
    sweep's ``--resume`` rebuilds every trial's config from the sweep and base-config files as they are now,
    so an edit to them (or to the shipped default) would otherwise change unfinished trials silently.
    """
    path = os.path.join(directory, CHECKPOINT)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    try:
        check_resumable(payload, config, data["checksum"], path, f"{data['path']} ({data['checksum']})")
    except ConfigError as exc:
        raise ConfigError(f"{exc}. A sweep --resume rebuilds each trial's config from the sweep YAML and its "
                          "base config as they are now: restore them, or start the sweep afresh") from None
    return payload


def _write_checkpoint(payload: dict) -> Any:

    directory = tempfile.mkdtemp(prefix="vipe-ray-ckpt-")
    torch.save(payload, os.path.join(directory, CHECKPOINT))
    return Checkpoint.from_directory(directory)


def _all_ranks(value: Any, world: int) -> list:
    """``value`` of every rank, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return [value]

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _ray_cpus() -> float | None:
    """The Ray CPUs this process holds: a Ray worker's assignment; None in a driver (local mode)."""

    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return context.get_assigned_resources().get("CPU")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: DDP Pr-VIPE training with periodic validation, reports and checkpoints.

    ``loop_config``: ``config`` (the TrainConfig, or its dict), ``data`` (path, fps, checksum), optional ``callbacks``
    (:class:`WorkerCallback` instances, run on every rank), ``on_report`` (a picklable callable run on rank 0
    with (step, metrics)), ``val_queries`` (at most this many validation queries per rig; 0, the default: all).
    """

    # The validated, frozen config crosses to the workers as it is; a dict (a caller of the earlier API) is
    # validated here.
    config = loop_config["config"]
    if not isinstance(config, TrainConfig):
        config = config_from_dict(config, "train_loop_config")
    data = loop_config["data"]
    callbacks: list[WorkerCallback] = list(loop_config.get("callbacks") or [])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = worker_threads(_ray_cpus())
    if threads is not None:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    payload = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = resumed_payload(directory, config, data)
    state = start_state(config, "prvipe", device, config.seed * 1000 + rank, payload, keep_average=rank == 0)
    if payload is not None:
        # Each worker's stream restarts from a seed of (seed, rank, step): distinct per worker, reproducible.
        state.generator.manual_seed(config.seed * 1000 + rank + 7919 * state.step)
    nodes = _all_ranks(ray.get_runtime_context().get_node_id(), world)
    worker = WorkerInfo(rank, world, nodes[rank], str(device), state.step)
    if payload is not None:
        print(f"[rank {rank}] resumed from checkpoint at step {state.step}", flush=True)
    for callback in callbacks:
        callback.on_start(worker)
    shard = StreamedShard(ray.train.get_dataset_shard("train"), config.data.buffer_rows, config.optim.batch_size,
                          config.temporal.window, config.temporal.stride, data["fps"],
                          f"{data['path']} (rank {rank} of {world})", config.mining.neighbours)
    try:
        val_table = None
        if rank == 0 and config.data.val_subjects:
            val_table = dataset_to_table(ray.train.get_dataset_shard("val"), data["path"], data["fps"],
                                         data["checksum"])
        # prepare_model wraps in DDP (gloo on CPU, nccl on GPU); the optimizer holds the same parameters.
        ddp_model = ray.train.torch.prepare_model(state.model) if world > 1 else state.model
        _train(loop_config, config, data, state, ddp_model, shard, val_table, worker, nodes, callbacks)
    finally:
        shard.close()


def _train(loop_config: dict, config: TrainConfig, data: dict, state: TrainState, ddp_model: torch.nn.Module,
           shard: StreamedShard, val_table: PoseTable | None, worker: WorkerInfo, nodes: list[str],
           callbacks: list[WorkerCallback]) -> None:
    """The reports and checkpoints of :func:`train_loop_per_worker` around the training loop's steps."""

    total, batch = config.optim.steps, config.optim.batch_size
    start, start_step = time.perf_counter(), state.step
    window: list[dict] = []
    # Local mode: the temporary directories of the best-scoring checkpoint and of the latest.
    score_metric, score_mode = loop_config.get("score", (BEST_METRIC, "max"))
    kept: dict[str, tuple[float, str]] = {}

    def after_step(step: int, step_metrics: dict[str, float]) -> None:
        window.append(step_metrics)
        for callback in callbacks:
            callback.on_step(worker, step)
        if step % config.checkpoint_every != 0 and step != total:
            return
        metrics = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        window.clear()
        # Poses/s of all workers since this (re)start: earlier reports' validation counts, this one's not.
        rate = (step - start_step) * batch * worker.world / max(time.perf_counter() - start, 1e-9)
        metrics.update(step=step, lr=state.scheduler.get_last_lr()[0], samples_per_s=rate,
                       global_batch=batch * worker.world, worker_nodes=len(set(nodes)),
                       peak_rss_mb=_peak_rss_mb(), **shard.stats())
        ckpt = None
        if worker.rank == 0:
            if val_table is not None:
                metrics.update(validation_metrics(evaluated_model(state), config, val_table,
                                                  max_queries=loop_config.get("val_queries", 0)))
            ckpt = _write_checkpoint(checkpoint_payload(
                state, config, "prvipe", data["checksum"], data["path"], metrics,
                workers=[{"rank": r, "node_id": n} for r, n in enumerate(nodes)]))
            if loop_config.get("on_report") is not None:
                loop_config["on_report"](step, metrics)
        for callback in callbacks:
            callback.on_report(worker, step, metrics)
        # The temporary checkpoint directory is removed once uploaded to the run's storage. Local mode
        # ignores the flag and uploads nothing: its latest directory is the Result's checkpoint, so only
        # the one before it is removed here.
        ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None)
        if ckpt is not None and os.path.isdir(ckpt.path):
            value = metrics.get(score_metric, math.nan) * (1 if score_mode == "max" else -1)
            previous = dict(kept)
            kept["latest"] = (value, ckpt.path)
            if "best" not in kept or value > kept["best"][0]:  # NaN never replaces a best
                kept["best"] = (value, ckpt.path)
            for _, path in previous.values():
                if path not in {p for _, p in kept.values()}:
                    shutil.rmtree(path, ignore_errors=True)

    run_steps(state, ddp_model, train_step, shard.sample, config, f"worker {worker.rank}", after_step)


def data_info(config: TrainConfig) -> dict:
    path = config.data.table_path()
    meta = read_metadata(path)
    fps = int(meta["fps"])
    if SOURCE_FPS % fps:
        raise ValueError(f"{path}: fps {fps} must divide {SOURCE_FPS}")
    return {"path": storage.location(path).uri, "fps": fps, "checksum": file_sha256(path)}


def build_trainer(config: TrainConfig, scaling: Scaling, name: str, storage_path: str | Path,
                  max_failures: int = 1, callbacks: list | None = None, extra: dict | None = None,
                  score: tuple[str, str] = (BEST_METRIC, "max")):
    """A ``TorchTrainer`` for one Pr-VIPE run (not started). ``storage_path``: a local folder or an
    object-store URI (``s3://bucket/prefix``) for the run's results and checkpoints; ``score`` (metric, mode)
    ranks its checkpoints."""

    data = data_info(config)
    datasets = {"train": pose_dataset(data["path"], config.data.train_subjects, seed=config.seed)}
    if config.data.val_subjects:
        datasets["val"] = pose_dataset(data["path"], config.data.val_subjects)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "data": data, "score": score, **(extra or {})},
        scaling_config=scaling.ray(),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name, **storage.location(storage_path).ray_storage(),
            failure_config=FailureConfig(max_failures=max_failures),
            # Keep the best-validation checkpoint (what a sweep registers and a study tests) and the latest
            # (what a restart resumes from; Ray never deletes the latest).
            checkpoint_config=(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score[0],
                                                checkpoint_score_order=score[1])
                               if config.data.val_subjects else CheckpointConfig(num_to_keep=2)),
            callbacks=callbacks or [],
        ),
    )


def fit(config: TrainConfig, scaling: Scaling, name: str, storage_path: str | Path, max_failures: int = 1,
        callbacks: list | None = None, extra: dict | None = None, score: tuple[str, str] = (BEST_METRIC, "max")):
    """Train with Ray Train and return its ``Result`` (rerunning the same name/storage resumes).

    In local mode (``scaling.num_workers == 0``) nothing is written under ``storage_path``: the Result's
    checkpoint is a temporary directory that the caller owns (copy or remove it).
    """
    return build_trainer(config, scaling, name, storage_path, max_failures, callbacks, extra, score).fit()
