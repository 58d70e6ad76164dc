"""The test ledger: one JSON line per evaluation of the test split.

The test subjects decide nothing (validation does); the ledger makes every look at them visible, so that a
test number can be read with how many times the test split was used before it. ``vipe-ray evaluate --split
test`` appends to it. Each line: date (UTC), commit (and whether the checkout had uncommitted changes),
config sha256, command, checkpoint and its step, subjects, rigs, and the headline Hit@1 per rig and method.
Sweeps (their best trial) and studies (every trial) test through :func:`vipe_ray.platform.mlflow_runs.test_metrics`, which
records there too; a Ray worker on another machine writes the ledger of its own copy of the code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path

from vipe_ray import REPO_ROOT
from vipe_ray.config import TrainConfig, config_to_dict

#: The ledger of a source checkout.
LEDGER = REPO_ROOT / "reports" / "test_ledger.jsonl"
#: Environment variable naming another ledger file (the test suite points it at a temporary one).
LEDGER_ENV = "VIPE_RAY_TEST_LEDGER"


def ledger_path() -> Path:
    """The ledger to use: ``$VIPE_RAY_TEST_LEDGER`` if set, else the checkout's :data:`LEDGER`."""
    return Path(os.environ.get(LEDGER_ENV) or LEDGER)


def config_sha256(config: TrainConfig) -> str:
    """sha256 of the config's canonical JSON: equal configs hash equal, whatever file they came from."""
    return hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode("utf-8")).hexdigest()


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it); ("unknown", False) outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        # The ledger itself changes with every test evaluation: it does not make the code dirty.
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)reports/test_ledger.jsonl"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return head, dirty


def headline(result: dict) -> dict[str, dict[str, float]]:
    """Hit@1 of every method on every rig of an :func:`vipe_ray.evaluation.protocols.evaluate_rigs` result."""
    return {rig: {method: hits["hit@1"] for method, hits in methods.items() if "hit@1" in hits}
            for rig, methods in result["rigs"].items()}


def record_test_evaluation(result: dict, config: TrainConfig, command: str, checkpoint: str, step: int,
                           path: str | Path | None = None) -> dict:
    """Append one line for this test evaluation to the ledger at ``path`` (default :func:`ledger_path`);
    returns the line's record."""
    commit, dirty = git_commit()
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "config_sha256": config_sha256(config),
        "command": command,
        "checkpoint": str(checkpoint),
        "step": int(step),
        "subjects": list(result["subjects"]),
        "rigs": list(result["rigs"]),
        "queries": int(result["queries"]),
        "hit@1": headline(result),
    }
    path = Path(path) if path is not None else ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line in append mode: concurrent evaluations never interleave within a line.
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def read_ledger(path: str | Path | None = None) -> list[dict]:
    """Every record of the ledger at ``path`` (default :func:`ledger_path`; none if it does not exist); a bad
    line names its number."""
    path = Path(path) if path is not None else ledger_path()
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return records


def count_evaluations(config: TrainConfig | None = None, path: str | Path | None = None) -> int:
    """Test evaluations in the ledger: all of them, or those of configs equal to ``config``."""
    records = read_ledger(path)
    if config is None:
        return len(records)
    digest = config_sha256(config)
    return sum(r.get("config_sha256") == digest for r in records)
