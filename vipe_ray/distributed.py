"""Ray Data + Ray Train: distributed data-parallel training of the Pr-VIPE step.

* Ray Data reads the pose table, keeps the split's subjects and shards the training rows across the
  workers (each worker holds only its shard; pose tables are megabytes, so a worker keeps its shard in memory
  and renders fresh random views of it every step: nothing is rendered up front).
* ``TorchTrainer`` runs :func:`vipe_ray.train.train_step` in every worker under DDP: gloo on CPU, nccl on GPU
  (Ray picks the backend from ``use_gpu``). Each worker draws its own batch of ``optim.batch_size`` poses
  (the reference's "batch per worker").
* Every ``checkpoint_every`` steps the workers report metrics (rank 0 adds validation Hit@k) and rank 0 a
  checkpoint in the same format as ``vipe-ray train``; a restarted worker group resumes from the last
  registered checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vipe_ray import storage
from vipe_ray.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from vipe_ray.data import PoseTable, SOURCE_FPS, file_sha256, read_metadata, table_to_arrays
from vipe_ray.train import CHECKPOINT, FORMAT, build_model, build_optimizer, rng_state, train_step


@dataclass(frozen=True)
class Scaling:
    """Workers of one training run (a sweep's ``resources``): ``num_workers`` = 0 trains in the calling
    process (Ray Train local mode); ``use_gpu`` gives each worker one GPU (DDP over nccl)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"resources.num_workers: {self.num_workers} must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker: {self.cpus_per_worker} must be > 0")
        if self.use_gpu and self.num_workers == 0:
            raise ConfigError("resources.use_gpu: GPU training needs num_workers >= 1")

    @property
    def cpus_per_trial(self) -> float:
        """CPUs one run holds: its workers, or the calling process in local mode."""
        return max(self.num_workers, 1) * self.cpus_per_worker

    def ray(self):
        from ray.train import ScalingConfig

        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=resources)


DATA_TASK_CPUS = 0.1
#: The validation metric that ranks a run's checkpoints.
BEST_METRIC = "val_hit@1"


def _keep_subjects(batch: pa.Table, subjects: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["subject"], value_set=pa.array(subjects, pa.string())))


def pose_dataset(path: str | Path, subjects: tuple[str, ...] | list[str]):
    """A Ray Dataset of the table's rows for ``subjects`` (columns subject, clip, frame, joints3d); ``path``
    is a local path or an object-store URI (:mod:`vipe_ray.storage`)."""
    import ray.data

    table = storage.location(path)
    # Fractional CPUs for the read tasks: with trials and workers holding most of a small machine, a task
    # that needs a whole CPU never schedules and the training waits on its data forever. The filesystem
    # travels with the read tasks, endpoint included (credentials come from each worker's environment).
    dataset = ray.data.read_parquet(table.path, filesystem=None if table.is_local else table.fs, num_cpus=DATA_TASK_CPUS).map_batches(
        _keep_subjects, fn_kwargs={"subjects": list(subjects)}, batch_format="pyarrow", batch_size=None,
        num_cpus=DATA_TASK_CPUS)
    # Progress bars of a megabyte table only spam the worker logs. The dataset carries its own copy of the
    # DataContext (Train copies it again for every shard), so this leaves the caller's global context alone.
    dataset.context.enable_progress_bars = False
    return dataset


def dataset_to_table(iterator, path: str, fps: int, checksum: str) -> PoseTable:
    """Collect a Ray Data iterator (a worker's shard) into a :class:`PoseTable` sorted by (subject, clip, frame)."""
    batches = [b for b in iterator.iter_batches(batch_format="pyarrow", batch_size=None)]
    if not batches:
        raise ValueError(f"{path}: this worker's data shard is empty; use fewer workers or more subjects")
    table = pa.concat_tables(batches).sort_by([("subject", "ascending"), ("clip", "ascending"),
                                               ("frame", "ascending")])
    subject, clip, frame, joints = table_to_arrays(table, f"{path} (worker shard)")
    return PoseTable(subject, _split_at_gaps(clip, frame, SOURCE_FPS // fps), frame, joints, fps, checksum, path)


def _split_at_gaps(clip: np.ndarray, frame: np.ndarray, frame_step: int) -> np.ndarray:
    """Clip names with every run of consecutive frames as its own clip (``name#1``, ``name#2`` ... after gaps).

    A shard holds whichever blocks the split handed this worker, so it can hold pieces of one clip with a gap
    between them; temporal windows are clamped to clip bounds and must not bridge such a gap.
    """
    same = clip[1:] == clip[:-1]
    gap = same & (np.diff(frame) != frame_step)
    if not gap.any():
        return clip
    clip_start = np.concatenate([[True], ~same])
    pieces = np.cumsum(clip_start | np.concatenate([[False], gap]))
    first_row = np.maximum.accumulate(np.where(clip_start, np.arange(len(clip)), 0))
    ordinal = pieces - pieces[first_row]
    return np.asarray([c if k == 0 else f"{c}#{k}" for c, k in zip(clip.tolist(), ordinal.tolist())])


def _write_checkpoint(payload: dict) -> Any:
    from ray.train import Checkpoint

    directory = tempfile.mkdtemp(prefix="vipe-ray-ckpt-")
    torch.save(payload, os.path.join(directory, CHECKPOINT))
    return Checkpoint.from_directory(directory)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: DDP Pr-VIPE training with periodic validation, reports and checkpoints.

    ``loop_config``: ``config`` (a TrainConfig dict), ``data`` (path, fps, checksum), optional
    ``fail_at_step`` with ``fail_marker`` (testing: the last rank SIGKILLs itself once at that step, after
    ``fail_delay_s``, and writes the marker file first), ``shard_log`` (testing: a directory; each worker writes
    its row keys ``clip:frame`` to ``rank{r}.txt``), ``resume_log`` (testing: a file; each worker that resumes
    appends a line ``rank step``), ``on_report`` (a picklable callable run on rank 0 with (step, metrics)),
    ``val_queries`` (at most this many validation queries per rig; 0, the default: all).
    """
    import ray.train
    import ray.train.torch

    config: TrainConfig = config_from_dict(loop_config["config"], "train_loop_config")
    data = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    table = dataset_to_table(ray.train.get_dataset_shard("train"), data["path"], data["fps"], data["checksum"])
    if loop_config.get("shard_log"):
        keys = [f"{c.split('#')[0]}:{f}" for c, f in zip(table.clip.tolist(), table.frame.tolist())]
        Path(loop_config["shard_log"], f"rank{rank}.txt").write_text("\n".join(keys))
    val_table = None
    if rank == 0 and config.data.val_subjects:
        val_table = dataset_to_table(ray.train.get_dataset_shard("val"), data["path"], data["fps"], data["checksum"])

    from vipe_ray.data import WindowSampler

    sampler = WindowSampler(table, config.temporal.window, config.temporal.stride)
    torch.manual_seed(config.seed)
    model = build_model(config)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    optimizer, scheduler = build_optimizer(config, model)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = torch.load(os.path.join(directory, CHECKPOINT), map_location="cpu", weights_only=False)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        step = payload["step"]
        # Each worker's stream restarts from a seed of (seed, rank, step): distinct per worker, reproducible.
        generator.manual_seed(config.seed * 1000 + rank + 7919 * step)
        print(f"[rank {rank}] resumed from checkpoint at step {step}", flush=True)
        if loop_config.get("resume_log"):
            with open(loop_config["resume_log"], "a") as handle:
                handle.write(f"{rank} {step}\n")
    # prepare_model moves to the worker's device and wraps in DDP (gloo on CPU, nccl on GPU).
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model.to(ray.train.torch.get_device())
    # Optimizer state was loaded before wrapping; parameters are the same objects.
    total = config.optim.steps
    start, start_step = time.perf_counter(), step
    window: list[dict] = []
    # Local mode: the temporary directories of the best-scoring checkpoint and of the latest.
    score_metric, score_mode = loop_config.get("score", (BEST_METRIC, "max"))
    kept: dict[str, tuple[float, str]] = {}
    while step < total:
        batch = sampler.sample(config.optim.batch_size, generator)
        window.append(train_step(ddp_model, optimizer, batch, config, generator, progress=step / total))
        scheduler.step()
        step += 1
        fail_at = loop_config.get("fail_at_step")
        if fail_at is not None and step == fail_at and rank == world - 1:
            marker = Path(loop_config["fail_marker"])
            if not marker.exists():
                marker.write_text(str(step))
                time.sleep(loop_config.get("fail_delay_s", 3.0))  # let the controller register the checkpoint
                os.kill(os.getpid(), 9)
        if step % config.checkpoint_every == 0 or step == total:
            metrics = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            window = []
            # Poses/s of all workers since this (re)start: earlier reports' validation counts, this one's not.
            rate = (step - start_step) * config.optim.batch_size * world / max(time.perf_counter() - start, 1e-9)
            metrics.update(step=step, lr=scheduler.get_last_lr()[0], samples_per_s=rate)
            ckpt = None
            if rank == 0:
                if val_table is not None:
                    metrics.update(validation_metrics(model, config, val_table,
                                                      max_queries=loop_config.get("val_queries", 0)))
                payload = {"format": FORMAT, "kind": "prvipe", "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "config": config_to_dict(config), "step": step, "data_checksum": data["checksum"],
                           "data_path": data["path"], "rng": rng_state(generator), "metrics": metrics}
                ckpt = _write_checkpoint(payload)
                if loop_config.get("on_report") is not None:
                    loop_config["on_report"](step, metrics)
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


def validation_metrics(model: torch.nn.Module, config: TrainConfig, table: PoseTable,
                       max_queries: int = 0) -> dict[str, float]:
    """Cross-view Hit@k of Pr-VIPE on validation subjects and validation rigs (``eval.val_rigs``, never the
    evaluation rigs), averaged over the rigs: ``val_hit@k`` keys, with ``val_hit@k_se`` (standard error over
    the queries, the largest over the rigs) and ``val_queries``. Queries every ``eval.val_every`` source
    frames, at most ``max_queries`` (0: all)."""
    from dataclasses import replace

    from vipe_ray.evaluate import evaluate_rigs

    model.eval()
    # The clean protocol only: occlusion protocols cost ~20x more and belong to the final evaluation.
    result = evaluate_rigs(model, config, table, progress=lambda _m: None,
                           eval_config=replace(config.eval, rigs=config.eval.val_rigs, max_queries=max_queries,
                                               every=config.eval.val_every, occlusion=False))
    out: dict[str, float] = {"val_queries": float(result["queries"])}
    for k in config.eval.ks:
        values = [methods["prvipe"][f"hit@{k}"] for methods in result["rigs"].values()]
        out[f"val_hit@{k}"] = float(np.mean(values))
        out[f"val_hit@{k}_se"] = max(se["prvipe"][f"hit@{k}"] for se in result["se"].values())
        for rig, methods in result["rigs"].items():
            out[f"val_{rig}_hit@{k}"] = methods["prvipe"][f"hit@{k}"]
            out[f"val_{rig}_nn2d_hit@{k}"] = methods["nn2d"][f"hit@{k}"]
    return out


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
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    data = data_info(config)
    datasets = {"train": pose_dataset(data["path"], config.data.train_subjects)}
    if config.data.val_subjects:
        datasets["val"] = pose_dataset(data["path"], config.data.val_subjects)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(config), "data": data, "score": score, **(extra or {})},
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
