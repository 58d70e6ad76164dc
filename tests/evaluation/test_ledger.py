"""Test discipline: `vipe-ray evaluate` scores validation by default; the test split only with --split test,
and every such evaluation lands in the test ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vipe_ray.cli import main
from vipe_ray.config import load_config
from vipe_ray.evaluation.ledger import config_sha256, count_evaluations, headline, read_ledger, record_test_evaluation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run (both methods) to evaluate."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("ledger")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "eval": {"max_queries": 24, "every": 24}}))
    assert main(["train", "--config", str(cfg), "--out", str(root / "run"), "--set", "optim.steps=4"]) == 0
    return root / "run"


def test_evaluate_defaults_to_validation_and_says_so(run, tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    out = tmp_path / "val.json"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--no-occlusion", "--json", str(out),
                 "--ledger", str(ledger)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    config = load_config()
    assert result["split"] == "validation"
    assert result["subjects"] == sorted(config.data.val_subjects)
    assert list(result["rigs"]) == list(config.eval.val_rigs) == ["wide-val"]
    assert "validation subjects" in printed and not ledger.exists()


def test_split_test_is_recorded_in_the_ledger(run, tmp_path, capsys):
    ledger = tmp_path / "reports" / "test_ledger.jsonl"
    out = tmp_path / "test.json"
    argv = ["evaluate", "--checkpoint", str(run), "--split", "test", "--subjects", "35", "07", "--rig", "h36m",
            "--no-occlusion", "--json", str(out), "--ledger", str(ledger)]
    for expected in (1, 2):
        assert main(argv) == 0
        assert len(read_ledger(ledger)) == expected
    printed = capsys.readouterr().out
    assert "1 earlier test evaluations of this config, 1 in all" in printed
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["subjects"] == ["07", "35"]
    record = read_ledger(ledger)[-1]
    trained = load_config(run / "config.yaml")
    assert record["config_sha256"] == config_sha256(trained) and record["step"] == 4
    assert record["command"] == "vipe-ray " + " ".join(argv)
    assert record["subjects"] == ["07", "35"] and record["rigs"] == ["h36m"]
    assert record["hit@1"] == headline(result) and set(record["hit@1"]["h36m"]) == {"prvipe", "prvipe_mean",
                                                                                   "nn2d", "lift3d"}
    assert len(record["commit"]) == 40 or record["commit"] == "unknown"
    assert count_evaluations(trained, ledger) == 2 and count_evaluations(load_config(), ledger) == 0


def test_test_subjects_need_the_test_split(run, tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    assert main(["evaluate", "--checkpoint", str(run), "--subjects", "10", "131", "--ledger", str(ledger)]) == 2
    err = capsys.readouterr().err
    assert "subjects ['131'] are test subjects" in err and "--split test" in err
    assert main(["evaluate", "--checkpoint", str(run), "--split", "test", "--subjects", "10",
                 "--ledger", str(ledger)]) == 2
    assert "['10'] are not test subjects" in capsys.readouterr().err
    # Another table holding test subjects (the cgspeed fixtures of subjects 08, 12 and 131) needs --split test too.
    other = tmp_path / "other.parquet"
    assert main(["convert", str(Path(__file__).parents[1] / "fixtures" / "bvh-flavours"), str(other), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(other), "--ledger", str(ledger)]) == 2
    assert "subjects ['08', '12', '131'] are test subjects" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(other), "--subjects", "08", "--split", "test",
                 "--subjects", "10", "--ledger", str(ledger)]) == 2
    assert not ledger.exists()


def test_ledger_names_a_bad_line(tmp_path):
    ledger = tmp_path / "l.jsonl"
    ledger.write_text('{"config_sha256": "x"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"l.jsonl:3: not a JSON line"):
        read_ledger(ledger)
    assert read_ledger(tmp_path / "missing.jsonl") == []


def test_record_appends_one_line_per_evaluation(tmp_path):
    result = {"subjects": ["03"], "queries": 5,
              "rigs": {"h36m": {"prvipe": {"hit@1": 0.5, "hit@5": 0.9}, "nn2d": {"hit@1": 0.1}}}}
    config = load_config()
    for k in range(3):
        record_test_evaluation(result, config, f"cmd {k}", "runs/x", 10, tmp_path / "l.jsonl")
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    assert [json.loads(l)["command"] for l in lines] == ["cmd 0", "cmd 1", "cmd 2"]
    assert json.loads(lines[0])["hit@1"] == {"h36m": {"prvipe": 0.5, "nn2d": 0.1}}


def test_sweeps_and_studies_record_their_test_evaluations(run, tmp_path, monkeypatch):
    """`test_metrics` (a sweep's best trial, every study trial) appends to the ledger the environment names."""
    from vipe_ray.evaluation.ledger import LEDGER_ENV, ledger_path
    from vipe_ray.platform.mlflow_runs import test_metrics

    ledger = tmp_path / "suite.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    assert ledger_path() == ledger
    metrics = test_metrics(str(run / "checkpoint.pt"), command="study sweeps/x.yaml: full seed 0")
    (record,) = read_ledger()
    assert record["command"] == "study sweeps/x.yaml: full seed 0" and record["checkpoint"].endswith("checkpoint.pt")
    assert record["subjects"] == sorted(load_config().data.test_subjects)
    assert record["hit@1"]["h36m"]["prvipe"] == pytest.approx(metrics["test/h36m/prvipe/hit@1"])


def test_a_recipe_search_scores_validation_and_leaves_the_ledger_alone(run, tmp_path, monkeypatch):
    """`split_metrics(..., "validation")` (a study with ``split: validation``) scores the validation subjects
    on the validation rigs, as `vipe-ray evaluate` does, and records nothing."""
    from vipe_ray.evaluation.ledger import LEDGER_ENV
    from vipe_ray.platform.mlflow_runs import split_metrics

    ledger = tmp_path / "suite.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    metrics, result = split_metrics(str(run / "checkpoint.pt"), "validation", with_result=True)
    assert not ledger.exists()
    config = load_config()
    assert result["split"] == "validation" and result["subjects"] == sorted(config.data.val_subjects)
    assert list(result["rigs"]) == list(config.eval.val_rigs)
    assert metrics and all(k.startswith("validation/") for k in metrics)
    assert metrics["validation/hit@1"] == pytest.approx(result["rigs"]["wide-val"]["prvipe"]["hit@1"])
    with pytest.raises(ValueError, match="split: 'train'"):
        split_metrics(str(run / "checkpoint.pt"), "train")
