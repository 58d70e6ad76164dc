"""Checkpoints: the file format, atomic writes, loading a run's model, and the rules for resuming one."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vipe_ray.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, flatten, lifter_recipe
from vipe_ray.data import PoseTable
from vipe_ray.prvipe.model import Lifter, PrVipe

CHECKPOINT = "checkpoint.pt"
LIFTER_CHECKPOINT = "lifter.pt"
#: The run directory's folder holding each method's best-validation checkpoint (same file names).
BEST = "best"
FORMAT = "vipe-ray/1"


def build_model(config: TrainConfig) -> PrVipe:
    """A fresh Pr-VIPE embedder of ``config``."""
    return PrVipe(config.model, config.loss, frames=config.temporal.window)


def build_lifter(config: TrainConfig) -> Lifter:
    """A fresh 3D-lifting baseline of ``config``'s lifter recipe (its ``lifter`` section over Pr-VIPE's)."""
    return Lifter(lifter_recipe(config).model)


def checkpoint_file(path: str | Path, kind: str = "prvipe", which: str = "best") -> Path:
    """The checkpoint file of ``kind`` (``prvipe``, ``lifter``) in a run directory: its best-validation one
    (``which="best"``, where the run validated) or the latest (``"latest"``, what a resume continues); a
    file path is returned as is."""
    path = Path(path)
    if not path.is_dir():
        return path
    name = CHECKPOINT if kind == "prvipe" else LIFTER_CHECKPOINT
    if which not in ("best", "latest"):
        raise ValueError(f"which: {which!r} must be 'best' or 'latest'")
    best = path / BEST / name
    return best if which == "best" and best.exists() else path / name


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
    """The random streams a resume must continue: the run's generator, torch's CPU stream and, where CUDA is in
    use, every GPU's stream (backbone dropout draws there on a GPU)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    """Restore :func:`rng_state`; GPU streams where this process has as many GPUs as the run that saved them
    (a resume on another machine shape keeps its own)."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode, its config and its bookkeeping."""

    model: torch.nn.Module
    config: TrainConfig
    step: int
    data_checksum: str
    payload: dict
    averaged: bool = False  # the model holds the weight average (optim.ema) rather than the trained weights


def load_checkpoint(path: str | Path, kind: str = "prvipe", map_location: str = "cpu",
                    averaged: bool | None = None, which: str = "best") -> Checkpoint:
    """Load ``checkpoint.pt`` (``kind="prvipe"``) or ``lifter.pt`` (``kind="lifter"``) from a run directory:
    the best-validation one where the run kept one (``best/``), else the latest (see :func:`checkpoint_file`).

    ``averaged``: the weight average (``optim.ema``) or the trained weights; None: the average where the run
    kept one.
    """
    file = checkpoint_file(path, kind, which)
    if not file.exists():
        raise FileNotFoundError(f"{file}: no {kind} checkpoint (train one with `vipe-ray train --out DIR`)")
    payload = torch.load(file, map_location=map_location, weights_only=False)
    if payload.get("format") != FORMAT or payload.get("kind") != kind:
        raise ValueError(f"{file}: not a vipe-ray {kind} checkpoint (format {payload.get('format')!r}, "
                         f"kind {payload.get('kind')!r})")
    config = config_from_dict(payload["config"], str(file))
    model: torch.nn.Module = build_model(config) if kind == "prvipe" else build_lifter(config)
    average = payload.get("ema")
    saved = payload.get("weights")  # a model saved alone (save_model_only) says which weights it holds
    if averaged and average is None and saved != "average":
        raise ValueError(f"{file}: no weight average in this checkpoint (trained with optim.ema = 0)")
    if averaged is False and saved == "average":
        raise ValueError(f"{file}: holds the weight average only (a model saved alone); its trained weights are "
                         f"in the run it came from")
    use_average = average is not None if averaged is None else bool(averaged and average is not None)
    model.load_state_dict(average["average"] if use_average else payload["model"])
    model.eval()
    return Checkpoint(model, config, payload["step"], payload["data_checksum"], payload,
                      use_average or saved == "average")


def weights_of(checkpoint: Checkpoint) -> str:
    """Which weights a loaded checkpoint's model holds: ``"average"`` (the weight average) or ``"trained"``."""
    return "average" if checkpoint.averaged else "trained"


def save_model_only(model: torch.nn.Module, config: TrainConfig, step: int, data_checksum: str, path: str | Path,
                    kind: str = "prvipe", weights: str = "trained") -> Path:
    """Save the weights ``model`` holds now with the config and bookkeeping, without optimizer or RNG state: a
    file :func:`load_checkpoint` reads, a fraction of a run's checkpoint (what a pose index and a logged model
    carry). ``weights`` says which they are (``"average"`` or ``"trained"``, :func:`weights_of`). Written
    atomically."""
    if weights not in ("average", "trained"):
        raise ValueError(f"weights: {weights!r} must be 'average' or 'trained'")
    path = Path(path)
    atomic_save({"format": FORMAT, "kind": kind, "model": model.state_dict(), "config": config_to_dict(config),
                 "step": step, "data_checksum": data_checksum, "weights": weights}, path)
    return path


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


