"""Retrieval metrics, the 2D Procrustes baseline distance and the evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vipe_ray.config import load_config
from vipe_ray.data import evaluation_rows, load_table
from vipe_ray.evaluate import evaluate_rigs, format_table, hits_at_k, pairwise_procrustes_2d, retrieval_objective
from vipe_ray.train import build_model


def test_hits_at_k_hand_case():
    # 3 queries x 4 index poses; smaller distance = retrieved first.
    distance = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                             [0.4, 0.3, 0.2, 0.1],
                             [0.2, 0.1, 0.4, 0.3]])
    match = torch.tensor([[True, False, False, False],   # hit at rank 1
                          [True, False, False, False],   # true match retrieved last: hit only at 4
                          [False, False, False, False]])  # never
    hits = hits_at_k(distance, match, (1, 2, 4))
    assert hits == pytest.approx({"hit@1": 1 / 3, "hit@2": 1 / 3, "hit@4": 2 / 3})


def _reference_procrustes_2d(q: np.ndarray, x: np.ndarray) -> float:
    """Loop reference: align x onto q with a 2D similarity (via SVD, reflection removed)."""
    qc, xc = q - q.mean(0), x - x.mean(0)
    u, s, vt = np.linalg.svd(xc.T @ qc)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1, d]) @ vt
    scale = (s * [1, d]).sum() / (xc ** 2).sum()
    return float(np.linalg.norm(scale * xc @ rot - qc, axis=1).mean())


def test_procrustes_2d_matches_reference_and_is_similarity_invariant():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 13, 2, generator=g, dtype=torch.float64)
    x = torch.randn(7, 13, 2, generator=g, dtype=torch.float64)
    d = pairwise_procrustes_2d(q, x, chunk_pairs=3)
    for i in range(5):
        for j in range(7):
            assert d[i, j].item() == pytest.approx(_reference_procrustes_2d(q[i].numpy(), x[j].numpy()), abs=1e-9)
    angle = 0.7
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    moved = 2.5 * q @ rot.T + torch.tensor([3.0, -1.0], dtype=torch.float64)
    assert torch.allclose(pairwise_procrustes_2d(q, moved).diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    mirrored = q * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert (pairwise_procrustes_2d(q, mirrored).diagonal() > 1e-3).all(), "a reflection is not a similarity"


def test_evaluation_rows_are_5hz_frames():
    table = load_table(load_config().data.table_path()).select(["10"])
    rows = evaluation_rows(table, every=24)
    assert len(rows) > 0 and (table.frame[rows] % 24 == 0).all()
    assert len(evaluation_rows(table, every=24, max_rows=10)) == 10


def test_protocol_on_real_subject(tiny_overrides):
    """An untrained model on real data: the protocol's invariants, not its quality."""
    config = load_config(overrides=tiny_overrides)
    table = load_table(config.data.table_path()).select(["10"])
    torch.manual_seed(0)
    model = build_model(config)
    result = evaluate_rigs(model, config, table, progress=lambda _: None)
    assert result["queries"] == 40
    assert set(result["rigs"]) == {"h36m", "novel"}
    for methods in result["rigs"].values():
        assert set(methods) == {"prvipe", "prvipe_mean", "nn2d"}
        for hits in methods.values():
            values = [hits[f"hit@{k}"] for k in (1, 5, 10, 20)]
            assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    # The same poses rendered by the same camera would be found exactly; across cameras, 2D-NN is imperfect.
    assert result["rigs"]["h36m"]["nn2d"]["hit@1"] < 1.0
    assert 0.0 <= retrieval_objective(result) <= 1.0
    text = format_table(result)
    assert "h36m" in text and "novel" in text and "Hit@20" in text
