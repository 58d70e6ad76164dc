"""Retrieval metrics, the 2D Procrustes baseline distance and the evaluation protocol."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from vipe_ray.config import EVAL_OCCLUSION_GROUPS, ConfigError, load_config
from vipe_ray.data import evaluation_rows, load_table
from vipe_ray.evaluation.protocols import evaluate_rigs, pattern_visibility, resolve_rig
from vipe_ray.evaluation.retrieval import hits_at_k, pairwise_procrustes_2d
from vipe_ray.evaluation.tables import format_markdown, format_table, retrieval_objective
from vipe_ray.prvipe.keypoints import COCO13_KEYPOINTS, OCCLUSION_GROUPS
from vipe_ray.training.checkpoint import build_model


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
    assert set(result["rigs"]) == {"h36m", "novel", "wide"}
    patterns = {f"group:{g}" for g in EVAL_OCCLUSION_GROUPS} | {"independent:0.1", "independent:0.2"}
    for rig in ("h36m", "novel", "wide"):
        assert set(result["occlusion"][rig]) == patterns | {"none"}
        assert set(result["invalid"][rig]) == patterns
        assert result["invalid"][rig]["group:left_arm"] == 0.0, "an arm leaves the torso: always embedded"
        assert result["occlusion"][rig]["none"]["clean"] == result["occlusion"][rig]["none"]["occluded"]
        for modes in result["occlusion"][rig].values():
            assert set(modes) == {"clean", "occluded"}
            assert all(set(per) == {"prvipe", "prvipe_mean", "nn2d"} for per in modes.values())
    assert set(result["paired"]) == {"h36m", "novel", "wide"}
    for rig, pairs in result["paired"].items():
        assert set(pairs) == {"prvipe-nn2d"}, "no lifter: no difference to it"
        difference = result["rigs"][rig]["prvipe"]["hit@1"] - result["rigs"][rig]["nn2d"]["hit@1"]
        assert pairs["prvipe-nn2d"]["hit@1"]["mean"] == pytest.approx(difference, abs=1e-12)
    for methods in result["rigs"].values():
        assert set(methods) == {"prvipe", "prvipe_mean", "nn2d"}
        for hits in methods.values():
            values = [hits[f"hit@{k}"] for k in (1, 5, 10, 20)]
            assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    for rig, report in result["misses"].items():
        # The miss report judges each top-1 pose by its NP-MPJPE aligned onto the query (error3d [query, index]),
        # the retrieval's own match table: read the other way round, it would disagree with Hit@1 here.
        for method, profile in report["methods"].items():
            assert profile["miss"] == pytest.approx(1 - result["rigs"][rig][method]["hit@1"], abs=1e-12)
            assert math.isnan(profile["near_miss"]) or 0 <= profile["near_miss"] <= 1
        shares = report["exclusive"]["prvipe-nn2d"]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert shares["both"] + shares["only_prvipe"] == pytest.approx(result["rigs"][rig]["prvipe"]["hit@1"])
        assert report["matches"] >= 1, "the query's own pose is always in the index"
    # The same poses rendered by the same camera would be found exactly; across cameras, 2D-NN is imperfect.
    assert result["rigs"]["h36m"]["nn2d"]["hit@1"] < 1.0
    assert 0.0 <= retrieval_objective(result) <= 1.0
    text = format_table(result)
    assert "h36m" in text and "novel" in text and "Hit@20" in text and "group:left_arm" in text
    markdown = format_markdown(result).splitlines()
    assert markdown[0] == "| rig | method | Hit@1 | Hit@5 | Hit@10 | Hit@20 |"
    row = next(line for line in markdown if line.startswith("| group:lower_body | occluded |"))
    cells = [float(c) for c in row.strip("|").split("|")[2:-1]]
    expected = [100 * result["occlusion"][rig]["group:lower_body"]["occluded"][m]["hit@1"]
                for rig in ("h36m", "novel", "wide") for m in ("prvipe", "nn2d")]
    assert cells == pytest.approx(expected, abs=0.051)


def test_paired_difference_by_hand():
    """Per-query hits averaged over the camera pairs, then differenced query by query: mean and its standard
    error over the queries (here two camera pairs, four queries)."""
    from vipe_ray.evaluation.protocols import average_pairs
    from vipe_ray.evaluation.tables import format_markdown

    pair_a = {"prvipe": {"hit@1": torch.tensor([1.0, 1.0, 0.0, 1.0])},
              "lift3d": {"hit@1": torch.tensor([1.0, 0.0, 0.0, 1.0])}}
    pair_b = {"prvipe": {"hit@1": torch.tensor([1.0, 0.0, 0.0, 1.0])},
              "lift3d": {"hit@1": torch.tensor([1.0, 0.0, 1.0, 1.0])}}
    se, paired = {}, {}
    out = average_pairs([pair_a, pair_b], se=se, paired=paired)
    # Per query: Pr-VIPE (1, 0.5, 0, 1), lifting (1, 0, 0.5, 1); differences (0, 0.5, -0.5, 0).
    assert out["prvipe"]["hit@1"] == pytest.approx(0.625) and out["lift3d"]["hit@1"] == pytest.approx(0.625)
    differences = torch.tensor([0.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    assert paired["prvipe-lift3d"]["hit@1"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert paired["prvipe-lift3d"]["hit@1"]["se"] == pytest.approx(differences.std().item() / 2)
    assert "prvipe-nn2d" not in paired, "only pairs whose methods both ran"
    assert se["prvipe"]["hit@1"] == pytest.approx(torch.tensor([1, 0.5, 0, 1.0]).std().item() / 2)
    result = {"rigs": {"h36m": out}, "paired": {"h36m": paired}}
    assert "| h36m | Pr-VIPE - lifting | +0.0 +- 20.4 |" in format_markdown(result, ks=(1,)).splitlines()


def test_hits_at_k_never_counts_an_unretrievable_query():
    distance = torch.tensor([[math.inf, math.inf], [0.2, math.inf]])
    match = torch.ones(2, 2, dtype=torch.bool)
    # Query 0 has no embedding (all inf): it misses at every k; query 1 finds its only finite neighbour.
    assert hits_at_k(distance, match, (1, 2)) == {"hit@1": 0.5, "hit@2": 0.5}


def test_masked_procrustes_2d_uses_only_common_keypoints():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 13, 2, generator=g, dtype=torch.float64)
    x = torch.randn(5, 13, 2, generator=g, dtype=torch.float64)
    vq = torch.rand(4, 13, generator=g) > 0.3
    vx = torch.rand(5, 13, generator=g) > 0.3
    d = pairwise_procrustes_2d(q, x, vq, vx, chunk_pairs=7)
    for i in range(4):
        for j in range(5):
            common = (vq[i] & vx[j]).numpy()
            ref = _reference_procrustes_2d(q[i].numpy()[common], x[j].numpy()[common])
            assert d[i, j].item() == pytest.approx(ref, abs=1e-9)
    # Hidden keypoints can hold anything: the distance does not move.
    moved = torch.where(vx[..., None], x, x + 50.0)
    torch.testing.assert_close(pairwise_procrustes_2d(q, moved, vq, vx), d)
    # Fewer than two common keypoints: no distance at all.
    lonely = torch.zeros(1, 13, dtype=torch.bool)
    lonely[0, 0] = True
    assert torch.isinf(pairwise_procrustes_2d(q[:1], x[:1], lonely, vx[:1])).all()


@pytest.mark.parametrize("group", ["left_arm", "right_arm", "left_leg", "right_leg", "both_arms", "both_legs",
                                   "lower_body"])
def test_occlusion_protocol_hides_exactly_its_group(group):
    visible = pattern_visibility(f"group:{group}", 6, torch.Generator())
    hidden = {COCO13_KEYPOINTS[i] for i in torch.nonzero(~visible[0]).flatten().tolist()}
    assert hidden == {COCO13_KEYPOINTS[i] for i in OCCLUSION_GROUPS[group]}
    assert (visible == visible[0]).all(), "every query of the pattern hides the same keypoints"


def test_independent_occlusion_rate_and_seed():
    a = pattern_visibility("independent:0.2", 20000, torch.Generator().manual_seed(1))
    b = pattern_visibility("independent:0.2", 20000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (~a).float().mean().item() == pytest.approx(0.2, abs=0.005)


def test_rig_yaml_loads_and_errors_name_file_and_key(tmp_path):
    good = tmp_path / "studio.yaml"
    good.write_text("cameras:\n  - {azimuth: 0, elevation: 20, distance: 4}\n"
                    "  - {azimuth: 90, elevation: -10, distance: 3.5, roll: 20, focal: 1400}\n")
    name, cameras = resolve_rig(str(good))
    assert name == "studio" and len(cameras) == 2 and cameras[1].focal == 1400.0 and cameras[0].roll == 0.0
    cases = {
        "cameras:\n  - {azimuth: 0, elevation: 20, distance: 4, zoom: 2}\n  - {azimuth: 9, elevation: 0, distance: 4}\n":
            r"cameras\[0\]\.zoom: unknown key",
        "cameras:\n  - {azimuth: 0, elevation: 95, distance: 4}\n  - {azimuth: 9, elevation: 0, distance: 4}\n":
            r"cameras\[0\]\.elevation: 95.0 must lie strictly within",
        "cameras:\n  - {azimuth: 0, elevation: 20, distance: 4}\n  - {azimuth: 9, elevation: 0, distance: 0.3}\n":
            r"cameras\[1\]\.distance: 0.3 m is closer",
        "cameras:\n  - {azimuth: 0, elevation: 20, distance: 4}\n  - {azimuth: 9, elevation: 0}\n":
            r"cameras\[1\]\.distance: missing",
        "cameras:\n  - {azimuth: 0, elevation: 20, distance: 4}\n  - {azimuth: 9, elevation: 0, distance: far}\n":
            r"cameras\[1\]\.distance: 'far' is not a number",
        "cameras:\n  - {azimuth: 0, elevation: 20, distance: 4}\n": r"at least 2 cameras",
        "name: x\nlens: 3\ncameras: []\n": r"lens: unknown key",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            resolve_rig(str(bad))
        assert str(bad) in str(info.value)
        # Through the config too: the error names eval.rigs and the file.
        with pytest.raises(ConfigError, match="eval.rigs"):
            load_config(overrides={"eval": {"rigs": ["h36m", str(bad)]}})


def test_custom_rig_file_is_evaluated(tiny_overrides, tmp_path):
    rig = tmp_path / "ceiling.yaml"
    rig.write_text("name: ceiling\ncameras:\n  - {azimuth: 10, elevation: 70, distance: 3}\n"
                   "  - {azimuth: 200, elevation: 75, distance: 2.5, roll: 30}\n")
    tiny_overrides["eval"].update({"rigs": [str(rig)], "occlusion": False, "max_queries": 20})
    config = load_config(overrides=tiny_overrides)
    table = load_table(config.data.table_path()).select(["10"])
    result = evaluate_rigs(build_model(config), config, table, progress=lambda _: None)
    assert list(result["rigs"]) == ["ceiling"] and result["occlusion"] == {}
    assert result["cameras"]["ceiling"][1]["elevation"] == 75.0


def test_a_rigs_numbers_do_not_depend_on_the_other_protocols(tiny_overrides):
    """Every (rig, camera, protocol) draws from its own seeded stream."""
    config = load_config(overrides=tiny_overrides)
    table = load_table(config.data.table_path()).select(["10"])
    torch.manual_seed(0)
    model = build_model(config)
    alone = evaluate_rigs(model, config, table, progress=lambda _: None,
                          eval_config=replace(config.eval, rigs=("novel",), occlusion=False))
    after = evaluate_rigs(model, config, table, progress=lambda _: None,
                          eval_config=replace(config.eval, rigs=("h36m", "novel")))
    assert alone["rigs"]["novel"] == after["rigs"]["novel"]


def test_two_rigs_with_one_name_are_refused(tiny_overrides, tmp_path):
    rig = tmp_path / "h36m.yaml"
    rig.write_text("cameras:\n  - {azimuth: 0, elevation: 0, distance: 4}\n  - {azimuth: 90, elevation: 0, distance: 4}\n")
    config = load_config(overrides=tiny_overrides)
    table = load_table(config.data.table_path()).select(["10"])
    with pytest.raises(ValueError, match="two rigs are named 'h36m'"):
        evaluate_rigs(build_model(config), config, table, progress=lambda _: None,
                      eval_config=replace(config.eval, rigs=("h36m", str(rig)), occlusion=False))
