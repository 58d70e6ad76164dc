"""Shared test fixtures: tiny, fast configurations on the committed real motion-capture table."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Test evaluations of the suite's own tiny runs go to a throwaway ledger, never the checkout's
# reports/test_ledger.jsonl (Ray workers inherit it: it is set before any ray.init).
os.environ["VIPE_RAY_TEST_LEDGER"] = os.path.join(tempfile.mkdtemp(prefix="vipe-ray-ledger-"), "test_ledger.jsonl")

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "data" / "cmu_h36m17_30fps.parquet"

#: A model small enough to train a few steps in seconds on 2 CPU cores.
TINY = {
    "model": {"width": 32, "blocks": 1, "embedding_dim": 4, "samples": 3, "dropout": 0.1},
    "optim": {"steps": 6, "batch_size": 24},
    "eval": {"max_queries": 40, "every": 24},
    "log_every": 2,
    "checkpoint_every": 3,
}


@pytest.fixture
def tiny_overrides() -> dict:
    import copy

    return copy.deepcopy(TINY)


@contextlib.contextmanager
def local_ray():
    """A private local 2-CPU Ray (reused if the session already started one), shut down if started here."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a private cluster even when `ray start` runs one on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def load_bench(name: str):
    """The benchmark script ``bench/<name>.py`` as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
