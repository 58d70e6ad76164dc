"""vipe-ray: Pr-VIPE probabilistic view-invariant pose embeddings, trained on real motion capture."""

from pathlib import Path

__version__ = "0.1.0"

#: Root of a source checkout (holds data/ and sweeps/ when installed editable).
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    """Default progress sink: one line to stdout, flushed (progress must show up in piped logs)."""
    print(message, flush=True)
