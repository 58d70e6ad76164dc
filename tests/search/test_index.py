"""Pose indexes (vipe_ray.search.index) and the index/search commands: save and load, candidates re-ranked
against brute force, results that line up with the query file, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vipe_ray.cli import main
from vipe_ray.data import load_table
from vipe_ray.prvipe.keypoints import model_input
from vipe_ray.search.keypoint_files import read_keypoints
from vipe_ray.search.index import PoseIndexError, build_index, draws, load_index
from vipe_ray.search.library import embed_table
from vipe_ray.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "data" / "cmu_h36m17_30fps.parquet"
SAMPLE = REPO / "tests" / "fixtures" / "coco" / "person_keypoints_sample.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run of a small model: the mechanics of indexing do not need a trained one."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("search")
    cfg = root / "small.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "embedding_dim": 8, "samples": 5}}))
    assert main(["train", "--config", str(cfg), "--out", str(root / "run"), "--set", "optim.steps=4"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def library(run):
    checkpoint = load_checkpoint(run)
    table = load_table(TABLE).select(["06"])
    return checkpoint, embed_table(checkpoint.model, table, "h36m", every=40).only_valid()


def _build(path: Path, library, kind=None):
    checkpoint, lib = library
    return build_index(path, checkpoint, "test library", lib.mean, lib.sigma, lib.keypoints, lib.visible, lib.meta,
                       lib.poses3d, kind=kind)


def test_an_index_loads_back_what_was_written(library, tmp_path):
    checkpoint, lib = library
    index = load_index(_build(tmp_path / "idx", library))
    assert len(index) == len(lib) == 4 * len(range(0, len(load_table(TABLE).select(["06"])), 40))
    assert np.array_equal(index.mean, lib.mean) and np.array_equal(index.sigma, lib.sigma)
    assert np.array_equal(index.poses3d, lib.poses3d) and index.rows([0, 5]) == [lib.meta[0], lib.meta[5]]
    assert index.info["kind"] == "exact" and index.info["dim"] == 8 and index.info["samples"] == 5
    for name, value in checkpoint.model.state_dict().items():
        assert torch.equal(index.checkpoint.model.state_dict()[name], value), name
    with pytest.raises(PoseIndexError, match="exists and is not an empty directory"):
        _build(tmp_path / "idx", library)
    (tmp_path / "idx" / "vectors.faiss").unlink()
    with pytest.raises(PoseIndexError, match="vectors.faiss is missing"):
        load_index(tmp_path / "idx")
    with pytest.raises(PoseIndexError, match="not a vipe-ray index"):
        load_index(tmp_path)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_reranking_every_candidate_is_brute_force_by_match_probability(library, tmp_path, kind):
    checkpoint, lib = library
    index = load_index(_build(tmp_path / kind, library, kind=kind))
    queries = slice(0, 30)
    rows, probs = index.search(lib.mean[queries], lib.sigma[queries], top_k=5, candidates=len(index))
    exact_rows, exact_probs = index.exact_search(lib.mean[queries], lib.sigma[queries], top_k=5)
    assert np.allclose(probs, exact_probs, atol=1e-6)
    assert (rows == exact_rows).mean() > 0.95  # ties may swap places
    # By hand for one pair: the model's own match probability over the index's fixed K x K draws.
    q = torch.from_numpy(lib.mean[0]) + torch.from_numpy(lib.sigma[0]) * draws(index.info, "query")
    x = torch.from_numpy(lib.mean[rows[0, 0]]) + torch.from_numpy(lib.sigma[rows[0, 0]]) * draws(index.info, "library")
    match = checkpoint.model.match
    expected = ((1 - match.smoothing) * torch.sigmoid(-match.a * torch.cdist(q, x) + match.b) + match.smoothing / 2).mean()
    assert probs[0, 0] == pytest.approx(expected.item(), rel=1e-5)
    assert (np.diff(probs, axis=1) <= 1e-12).all(), "best first"


def test_index_and_search_commands_answer_every_annotation(run, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(run), "--data", str(TABLE), "--subjects", "06", "09", "--rig", "h36m",
                 "--every", "60", "--out", str(out)]) == 0
    info = json.loads((out / "index.json").read_text())
    assert info["count"] > 0 and info["has_poses3d"] and "rig h36m" in info["source"]
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--keypoints", str(SAMPLE), "--top-k", "3", "--json",
                 str(tmp_path / "hits.json"), "--figure", str(tmp_path / "hits.png")]) == 0
    printed = capsys.readouterr().out
    hits = json.loads((tmp_path / "hits.json").read_text())
    annotations = json.loads(SAMPLE.read_text())["annotations"]
    assert [h["annotation_id"] for h in hits] == [a["id"] for a in annotations]
    # Embeddable: two visible torso keypoints (the model's own rule); the sample has both kinds.
    _, valid = model_input(torch.from_numpy(read_keypoints(SAMPLE).keypoints))
    assert 0 < int(valid.sum()) < len(annotations)
    for hit, ann, ok in zip(hits, annotations, valid.tolist()):
        assert hit["image_id"] == ann["image_id"] and hit["valid"] is ok
        if not ok:
            assert hit["results"] == [] and "not embedded" in printed
            continue
        assert hit["valid"] and [r["rank"] for r in hit["results"]] == [1, 2, 3]
        for result in hit["results"]:
            assert {"probability", "subject", "clip", "frame", "camera"} <= set(result)
            assert result["subject"] in ("06", "09") and 0 <= result["camera"] < 4
            assert np.array(result["pose3d"]).shape == (17, 3)
    assert "against" in printed and (tmp_path / "hits.png").stat().st_size > 0
    # A library of keypoint files: results name the image and annotation.
    assert main(["index", "--checkpoint", str(run), "--keypoints", str(SAMPLE), "--out", str(tmp_path / "coco")]) == 0
    assert main(["search", "--index", str(tmp_path / "coco"), "--keypoints", str(SAMPLE), "--top-k", "2",
                 "--json", str(tmp_path / "coco.json")]) == 0
    first = json.loads((tmp_path / "coco.json").read_text())[0]
    assert {"image_id", "annotation_id", "probability"} <= set(first["results"][0]) and "pose3d" not in first["results"][0]


def test_index_command_errors_name_what_is_wrong(run, tmp_path, capsys):
    assert main(["index", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 2
    assert "either --data TABLE.parquet --rig RIG" in capsys.readouterr().err
    assert main(["index", "--checkpoint", str(run), "--data", str(TABLE), "--out", str(tmp_path / "b")]) == 2
    assert "--rig is required" in capsys.readouterr().err
    assert main(["index", "--checkpoint", str(run), "--data", str(TABLE), "--rig", "nowhere", "--out",
                 str(tmp_path / "c")]) == 2
    assert "rig 'nowhere'" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path), "--keypoints", str(SAMPLE)]) == 2
    assert "not a vipe-ray index" in capsys.readouterr().err


def test_mixed_libraries_keep_every_metadata_key_and_a_failed_build_leaves_nothing(run, tmp_path, monkeypatch):
    from vipe_ray.search import index as index_module
    from vipe_ray.search.index import metadata_table

    table = metadata_table([{"source": "a.npy", "annotation_id": 0}, {"source": "b.json", "image_id": 7},
                            {"source": "c.json", "image_id": "img_3.jpg"}])
    assert table.column_names == ["source", "annotation_id", "image_id"]
    assert table["image_id"].to_pylist() == [None, "7", "img_3.jpg"]  # mixed types: stored as text
    first = json.loads(SAMPLE.read_text())["annotations"][0]["keypoints"]  # 16 labelled keypoints
    np.save(tmp_path / "lib.npy", np.array([first, first], dtype=float).reshape(2, 17, 3))
    # A build that fails half-way leaves no index and no partial folder; the same --out works afterwards.
    real = index_module.save_model_only
    monkeypatch.setattr(index_module, "save_model_only", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        main(["index", "--checkpoint", str(run), "--keypoints", str(tmp_path / "lib.npy"), str(SAMPLE), "--out",
              str(tmp_path / "mixed")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.npy"]
    monkeypatch.setattr(index_module, "save_model_only", real)
    assert main(["index", "--checkpoint", str(run), "--keypoints", str(tmp_path / "lib.npy"), str(SAMPLE), "--out",
                 str(tmp_path / "mixed")]) == 0
    index = load_index(tmp_path / "mixed")
    coco_rows = [r for r in index.rows(np.arange(len(index))) if r["source"] == str(SAMPLE)]
    assert coco_rows and all("image_id" in r and "file_name" in r for r in coco_rows)
    assert all("image_id" not in r for r in index.rows(np.arange(len(index))) if r["source"].endswith("lib.npy"))


def test_search_caps_top_k_at_the_library_and_refuses_bad_requests(run, tmp_path, capsys):
    assert main(["index", "--checkpoint", str(run), "--keypoints", str(SAMPLE), "--out", str(tmp_path / "idx")]) == 0
    size = len(load_index(tmp_path / "idx"))
    assert main(["search", "--index", str(tmp_path / "idx"), "--keypoints", str(SAMPLE), "--top-k", "1000000000",
                 "--json", str(tmp_path / "all.json")]) == 0
    hits = json.loads((tmp_path / "all.json").read_text())
    assert max(len(h["results"]) for h in hits) == size
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--keypoints", str(SAMPLE), "--top-k", "-3"]) == 2
    assert "--top-k: -3 must be >= 1" in capsys.readouterr().err
    copy = tmp_path / "queries.json"
    copy.write_text(SAMPLE.read_text())
    assert main(["search", "--index", str(tmp_path / "idx"), "--keypoints", str(copy), "--json", str(copy)]) == 2
    assert "is the query file" in capsys.readouterr().err and copy.read_text() == SAMPLE.read_text()
    (tmp_path / "afile").write_text("x")
    assert main(["index", "--checkpoint", str(run), "--keypoints", str(SAMPLE), "--out", str(tmp_path / "afile")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_an_exported_model_holds_the_weight_average_and_says_so(run, tmp_path, monkeypatch):
    from vipe_ray.search.model_source import resolve_model
    from vipe_ray.training.checkpoint import weights_of

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 0
    source = load_checkpoint(run)
    exported = load_checkpoint(tmp_path / "model")
    assert weights_of(source) == weights_of(exported) == ("average" if source.payload.get("ema") else "trained")
    for name, value in source.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], value), name
    if weights_of(exported) == "average":
        with pytest.raises(ValueError, match="holds the weight average only"):
            load_checkpoint(tmp_path / "model", averaged=False)
    # A registry URI with no tracking store to read it from: a clear error, and no store created as a side effect.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tracking store"):
        resolve_model("models:/nothing/1")
    assert not (tmp_path / "mlflow.db").exists()
