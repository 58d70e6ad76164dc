"""A quiet sweep console: known, harmless log lines of Ray, MLflow and Optuna are dropped where they arise.

Every entry below names the line, where it comes from and why the user can do nothing about it. Anything
not listed still reaches the console; no warning category or logger is silenced as a whole.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KnownLine:
    """A harmless line forwarded from a Ray worker: ``source`` is the actor/process prefix Ray prints
    (``PlacementGroupCleaner``, ``raylet``, ...), ``pattern`` a regex searched in the line."""

    source: str
    pattern: str
    why: str

    def matches(self, source: str, line: str) -> bool:
        return source == self.source and re.search(self.pattern, line) is not None


#: Lines that Ray's driver forwards from workers on every sweep, with nothing for the user to act on.
HARMLESS_WORKER_LINES: tuple[KnownLine, ...] = (
    KnownLine("PlacementGroupCleaner", r"Failed to query Ray Train Controller actor state",
              "Ray Train polls the state API, which needs the dashboard we do not start; ~40 lines a sweep"),
    KnownLine("raylet", r"PYTHON worker processes have been started on node",
              "each Ray Train run starts ~10 short-lived actors; on 2 CPUs that exceeds Ray's startup heuristic"),
    KnownLine("TrainController", r"Actor with class name: 'PreemptionWatcher' .* max_restarts > 0",
              "Ray Train's own preemption watcher; an internal note about its constructor arguments"),
    KnownLine("DatasetManager", r"RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
              "raised inside Ray Train's own dataset manager, not by our code"),
    KnownLine("DatasetManager", r"^\s+self\.exclude_resources = exclude_resources$",
              "the source line Python prints under the warning above"),
    KnownLine("SplitCoordinator", r"Starting execution of Dataset|Execution plan of Dataset|"
              r"Progress bars disabled|Dataset .* execution finished",
              "Ray Data's per-epoch execution notes for the training shard"),
    KnownLine("RayTrainWorker", r"Starting execution of Dataset|Execution plan of Dataset|"
              r"Progress bars disabled|Dataset .* execution finished",
              "Ray Data's execution notes for the validation split"),
    KnownLine("RayTrainWorker", r"Checkpoint successfully created at|Reporting training result \d+",
              "Ray Train echoes every report; Tune's trial table already shows them"),
    KnownLine("RayTrainWorker", r"Setting up process group for",
              "torch.distributed set-up note of every worker"),
    KnownLine("gcs_server", r"Failed to kill actor NIL_ID",
              "Ray's control store cleaning up an actor that never started during Ray Train's teardown"),
    KnownLine("TrainController", r"Requesting resources|Attempting to start training worker group|"
              r"Started training worker group of size|world_rank=\d+, local_rank=\d+",
              "Ray Train's worker-group start-up notes, one block per trial"),
)

#: Driver-side log records: (logger name, message prefix, why).
HARMLESS_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray",
     "a local Ray started by the sweep keeps Ray's default token auth; the note only says how to opt out"),
)


def _source(data: dict) -> str:
    """The prefix Ray prints for a batch of worker lines: the actor's class, else the process (``raylet``)."""
    name = data.get("actor_name") or data.get("task_name") or str(data.get("pid", ""))
    return name.split(".")[0].split("(")[0]


def drop_known_lines(data: dict, known: tuple[KnownLine, ...] = HARMLESS_WORKER_LINES) -> dict | None:
    """``data`` (a batch of worker lines as Ray's log dispatcher passes it) without the known lines;
    None if nothing is left."""
    source = _source(data)
    lines = [line for line in data.get("lines", []) if not any(k.matches(source, line) for k in known)]
    if not lines:
        return None
    return {**data, "lines": lines}


def filter_worker_logs() -> bool:
    """Filter what Ray's driver prints from workers and the raylet (call after ``ray.init``).

    Ray offers no public hook for this. In ray 2.60, worker output reaches the console through the
    ``ray_print_logs`` handler of its stdstream dispatcher, raylet warnings through
    ``ray._private.worker.print_to_stdstream``; both are wrapped. Where Ray changes them, logs print
    unfiltered rather than break (returns False).
    """
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(ray_worker, "print_to_stdstream") or not hasattr(dispatcher, "handlers"):
        return False
    if not getattr(ray_worker.print_to_stdstream, "_vipe_filtered", False):
        original = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = _filtered(lambda data, **kw: original(data, **kw))
    with dispatcher._lock:
        dispatcher.handlers = [(name, _filtered(handler) if name == "ray_print_logs"
                                and not getattr(handler, "_vipe_filtered", False) else handler)
                               for name, handler in dispatcher.handlers]
    return True


def _filtered(handler: Callable[..., None]) -> Callable[..., None]:
    def emit(data: dict, **kwargs: Any) -> None:
        kept = drop_known_lines(data)
        if kept is not None:
            handler(kept, **kwargs)

    emit._vipe_filtered = True  # type: ignore[attr-defined]
    return emit


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def filter_driver_records() -> None:
    """Attach message filters to the few driver loggers listed in :data:`HARMLESS_RECORDS` (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix, _why in HARMLESS_RECORDS:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


@contextlib.contextmanager
def quiet_optuna_plots() -> Iterator[None]:
    """Optuna marks its matplotlib plots experimental (since v2.2) and warns on every call."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        # Matched by message: the warning is attributed to our calling module, not to optuna.
        warnings.filterwarnings("ignore", category=ExperimentalWarning, message=r"optuna\.visualization\.")
        yield
