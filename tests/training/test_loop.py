"""Training: the step, checkpoints, resume, determinism and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from vipe_ray.cli import main
from vipe_ray.config import ConfigError, load_config, merge
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.training.checkpoint import build_model, load_checkpoint
from vipe_ray.training.loop import train
from vipe_ray.training.optim import build_optimizer
from vipe_ray.training.step import lifter_step, train_step
from vipe_ray.prvipe.model import Lifter


def test_train_step_updates_parameters_and_reports_metrics(tiny_overrides):
    config = load_config(overrides=tiny_overrides)
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    generator = torch.Generator().manual_seed(0)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    before = [p.detach().clone() for p in model.parameters()]
    batch = WindowSampler(table).sample(config.optim.batch_size, generator)
    phases = []
    metrics = train_step(model, optimizer, batch, config, generator, timer=phases.append)
    assert phases == ["views", "forward", "mining", "loss", "backward"]
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed), "every parameter, a and b included, receives a gradient step"
    assert 0.0 < metrics["active_triplets"] <= 1.0
    assert 0.0 < metrics["valid_negatives"] <= 1.0
    # Kernel distances are bounded by the smoothing: -log(0.95) < d < -log(0.05).
    assert 0.05 < metrics["d_ap"] < 3.0
    assert metrics["a"] > 0 and metrics["sigma"] > 0


@pytest.mark.parametrize("variant", [
    {"cameras": {"augmentation": False}},
    {"temporal": {"enabled": True, "frames": 3, "stride": 2}},
    {"keypoint_dropout": {"mode": "both"}},
    {"model": {"probabilistic": False}},
    {"mining": {"mode": "ratio", "hard_negative_ratio": 0.25, "samples": 2}},
    {"mining": {"symmetric": True}, "keypoint_dropout": {"mode": "both", "views": "anchor"}},
    {"mining": {"symmetric": True, "negatives": 3}},
])
def test_every_variant_trains(tiny_overrides, variant):
    from vipe_ray.config import merge

    config = load_config(overrides=merge(tiny_overrides, variant))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    generator = torch.Generator().manual_seed(1)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    sampler = WindowSampler(table, config.temporal.window, config.temporal.stride)
    metrics = train_step(model, optimizer, sampler.sample(16, generator), config, generator)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    if not config.model.probabilistic:
        assert metrics["kl_loss"] == 0.0
    lifter = Lifter(config.model)
    lifter_optimizer, _ = build_optimizer(config, lifter)
    assert lifter_step(lifter, lifter_optimizer, sampler.sample(16, generator), config, generator)["lifter_mpjpe"] > 0


def test_training_is_deterministic_and_resume_matches_uninterrupted(tmp_path, tiny_overrides):
    config = load_config(overrides=tiny_overrides)
    full = train(config, tmp_path / "full", progress=lambda _: None)
    again = train(config, tmp_path / "again", progress=lambda _: None)
    assert full["prvipe"]["loss"] == again["prvipe"]["loss"]

    # Interrupt after 3 steps (a checkpoint), then resume to 6 with the same config.
    short = load_config(overrides={**tiny_overrides, "optim": {**tiny_overrides["optim"], "steps": 3}})
    train(short, tmp_path / "resumed", progress=lambda _: None)
    payload = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    payload["config"]["optim"]["steps"] = 6  # the run was cut short; its schedule is otherwise the same
    torch.save(payload, tmp_path / "resumed" / "checkpoint.pt")
    (tmp_path / "resumed" / "lifter.pt").unlink()
    messages = []
    resumed = train(config, tmp_path / "resumed", resume=True, progress=messages.append)
    assert any("resumed from" in m and "step 3" in m for m in messages)
    assert resumed["prvipe"]["steps"] == 6


def test_resume_is_exact_after_a_crash(tmp_path, tiny_overrides):
    """A run killed after a checkpoint continues bit-identically: model, optimizer and RNG are restored."""
    config = load_config(overrides=tiny_overrides)
    reference = train(config, tmp_path / "ref", progress=lambda _: None)
    ref_model = load_checkpoint(tmp_path / "ref").model

    crashed = tmp_path / "crashed"
    calls = {"n": 0}

    def crash_after_checkpoint(message: str) -> None:
        calls["n"] += 1
        if "step 4/" in message:  # log line after the step-3 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, crashed, progress=crash_after_checkpoint)
    assert load_checkpoint(crashed).step == 3
    resumed = train(config, crashed, resume=True, progress=lambda _: None)
    assert resumed["prvipe"]["loss"] == pytest.approx(reference["prvipe"]["loss"], abs=0)
    for a, b in zip(ref_model.state_dict().values(), load_checkpoint(crashed).model.state_dict().values()):
        assert torch.equal(a, b)


def test_existing_run_needs_resume_and_same_config(tmp_path, tiny_overrides):
    config = load_config(overrides=tiny_overrides)
    train(config, tmp_path / "run", progress=lambda _: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path / "run", progress=lambda _: None)
    other = load_config(overrides={**tiny_overrides, "seed": 5})
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"different config \(seed: 0 -> 5\)"):
        train(other, tmp_path / "run", resume=True, progress=lambda _: None)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before, "a refused resume leaves the checkpoint alone"


def test_a_finished_run_resumes_both_checkpoints_without_training_or_rewriting(tmp_path, tiny_overrides):
    """train(resume=True) checks both checkpoints before anything is written and hands each loop its own
    (the lifter's included): a finished run trains no step and rewrites neither file."""
    config = load_config(overrides=merge(tiny_overrides, {"lifter_baseline": True}))
    train(config, tmp_path, progress=lambda _: None)
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "lifter.pt")}
    summary = train(config, tmp_path, resume=True, progress=lambda _: None)
    assert summary["prvipe"]["steps"] == summary["lifter"]["steps"] == config.optim.steps
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # What is logged and evaluated may change on resume; what is trained may not.
    moved = load_config(overrides=merge(tiny_overrides, {"lifter_baseline": True, "log_every": 1,
                                                         "eval": {"every": 12}}))
    train(moved, tmp_path, resume=True, progress=lambda _: None)
    other = load_config(overrides=merge(tiny_overrides, {"lifter_baseline": True, "model": {"dropout": 0.2}}))
    with pytest.raises(ConfigError, match=r"checkpoint was trained with a different config \(model.dropout: "
                                          rf"{config.model.dropout!r} -> 0.2\)"):
        train(other, tmp_path, resume=True, progress=lambda _: None)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_checkpoint_contents(tmp_path, tiny_overrides):
    config = load_config(overrides=tiny_overrides)
    train(config, tmp_path / "run", progress=lambda _: None)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 6
    assert ckpt.config == config
    assert ckpt.data_checksum == load_table(config.data.table_path()).checksum
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(ckpt.payload)
    assert not ckpt.model.training
    lifter = load_checkpoint(tmp_path / "run", kind="lifter")
    assert lifter.step == 6
    lines = (tmp_path / "run" / "prvipe_metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [2, 4, 6]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["steps"] == 6
    with pytest.raises(ValueError, match="not a vipe-ray lifter"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt", kind="lifter")


def test_cli_train_and_evaluate(tmp_path, tiny_overrides, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_overrides))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--set", "optim.steps=4",
                 "--set", "optim.ema=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "[prvipe] step 4/4" in printed and "[lifter] step 4/4" in printed
    result_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out), "--json", str(result_path), "--subjects", "10",
                 "--rig", "h36m", "--rig", "wide"]) == 0
    printed = capsys.readouterr().out
    assert "Hit@1" in printed and "nn2d" in printed and "group:lower_body" in printed
    result = json.loads(result_path.read_text())
    assert set(result["rigs"]) == {"h36m", "wide"} and set(result["occlusion"]) == {"h36m", "wide"}
    for rig in result["rigs"].values():
        assert set(rig) == {"prvipe", "prvipe_mean", "nn2d", "lift3d"}
        for hits in rig.values():
            values = [hits[f"hit@{k}"] for k in (1, 5, 10, 20)]
            assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values)
    assert result["weights"] == "average"
    assert main(["evaluate", "--checkpoint", str(out), "--json", str(result_path), "--subjects", "10",
                 "--rig", "h36m", "--no-occlusion", "--trained-weights"]) == 0
    assert json.loads(result_path.read_text())["weights"] == "trained"


def test_cli_evaluates_a_newly_converted_table(tmp_path, tiny_overrides, capsys):
    """Convert raw motion capture with the converter, then evaluate on all of its subjects by default."""
    from pathlib import Path

    fixtures = Path(__file__).parents[1] / "fixtures" / "cmu-mini"
    table = tmp_path / "new.parquet"
    assert main(["convert", str(fixtures), str(table), "--fps", "30"]) == 0
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_overrides))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "optim.steps=2",
                 "--set", "lifter_baseline=false"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(table),
                 "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    assert "['01', '02']" in captured.out, "all subjects of the new table are evaluated"
    assert "were trained on" in captured.err, "subjects 01 and 02 are in the default training split"
    assert "lift3d" not in json.loads((tmp_path / "e.json").read_text())["rigs"]["h36m"]


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "model.widht" in err
    assert not (tmp_path / "x").exists(), "a rejected config writes nothing"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no prvipe checkpoint" in capsys.readouterr().err


def test_mining_turns_hard_from_its_fraction_of_the_run(tiny_overrides):
    """``mining.hard_from``: the configured mode before that fraction of the run, the hardest negative after."""
    import copy

    from vipe_ray.config import merge

    late = load_config(overrides=merge(tiny_overrides, {"mining": {"hard_from": 0.5}}))
    assert [late.mining.mode_at(p) for p in (0.0, 0.49, 0.5, 1.0)] == ["semi_hard", "semi_hard", "hard", "hard"]
    assert load_config(overrides=tiny_overrides).mining.mode_at(1.0) == "semi_hard", "1 (the default) = never"
    hard = load_config(overrides=merge(tiny_overrides, {"mining": {"mode": "hard"}}))
    semi = load_config(overrides=tiny_overrides)
    table = load_table(late.data.table_path()).select(late.data.train_subjects)
    batch = WindowSampler(table).sample(32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(late)

    def step(config, progress):
        m = copy.deepcopy(model)
        optimizer, _ = build_optimizer(config, m)
        torch.manual_seed(1)  # the model's own dropout layers
        return train_step(m, optimizer, batch, config, torch.Generator().manual_seed(3), progress=progress)

    # The same step as the mode it stands for, on the same batch, views and samples.
    assert step(late, 0.25) == step(semi, 0.25)
    assert step(late, 0.75) == step(hard, 0.75)
    assert step(hard, 0.75)["d_an"] < step(semi, 0.75)["d_an"], "hard negatives lie nearer than semi-hard ones"


def test_dropout_ramp_and_anchor_only_views():
    """``keypoint_dropout.ramp`` raises the occluded share linearly; ``views: anchor`` keeps positives whole."""
    from vipe_ray.config import KeypointDropoutConfig
    from vipe_ray.training.step import view_dropouts

    config = load_config(overrides={"keypoint_dropout": {"mode": "both", "instance_prob": 0.6, "views": "anchor",
                                                         "ramp": 0.5}})
    anchor, positive = view_dropouts(config, 0.0)
    assert anchor.instance_prob == 0.0 and positive == KeypointDropoutConfig()
    assert view_dropouts(config, 0.125)[0].instance_prob == pytest.approx(0.15)
    assert view_dropouts(config, 0.5)[0].instance_prob == 0.6 and view_dropouts(config, 0.9)[0].instance_prob == 0.6
    both = load_config(overrides={"keypoint_dropout": {"mode": "structured", "instance_prob": 0.4, "views": "both",
                                                       "ramp": 0.0}})
    anchor, positive = view_dropouts(both, 0.0)
    assert anchor == positive == both.keypoint_dropout, "no ramp, both views: the configured dropout throughout"
    with pytest.raises(ConfigError, match="keypoint_dropout.views"):
        load_config(overrides={"keypoint_dropout": {"views": "positive"}})
    with pytest.raises(ConfigError, match="keypoint_dropout.ramp"):
        load_config(overrides={"keypoint_dropout": {"ramp": 1.5}})


def test_lifter_learns_in_bf16_like_in_fp32(tiny_overrides):
    """The baseline trains in the precision Pr-VIPE trains in; its regression head stays fp32."""
    from vipe_ray.prvipe.model import Lifter

    table = load_table(load_config().data.table_path()).select(["10"])
    curves = {}
    for precision in ("fp32", "bf16"):
        tiny_overrides["optim"].update({"precision": precision, "lr": 3e-3})
        config = load_config(overrides=tiny_overrides)
        torch.manual_seed(0)
        lifter = Lifter(config.model)
        optimizer, _ = build_optimizer(config, lifter)
        generator = torch.Generator().manual_seed(0)
        sampler = WindowSampler(table)
        curves[precision] = [lifter_step(lifter, optimizer, sampler.sample(64, generator), config, generator)
                             ["lifter_mpjpe"] for _ in range(60)]
        assert lifter.head.weight.dtype == torch.float32
    for precision, curve in curves.items():
        assert sum(curve[-10:]) < 0.8 * sum(curve[:10]), f"{precision}: the lifter's error does not fall"
    assert abs(sum(curves["bf16"][-10:]) - sum(curves["fp32"][-10:])) < 0.1 * sum(curves["fp32"][-10:])


def test_weight_average_by_hand():
    from vipe_ray.training.optim import WeightAverage

    layer = torch.nn.Linear(1, 1, bias=False)
    bn = torch.nn.BatchNorm1d(1)
    model = torch.nn.Sequential(layer, bn)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    bn.num_batches_tracked.fill_(7)
    average.update(model)  # d_1 = min(0.2, 2/11) = 2/11
    assert average.average["0.weight"].item() == pytest.approx(9 / 11)
    assert average.average["1.num_batches_tracked"].item() == 7, "integer buffers are copied"
    with torch.no_grad():
        layer.weight.fill_(2.0)
    average.update(model)  # d_2 = min(0.2, 3/12) = 0.2
    assert average.average["0.weight"].item() == pytest.approx(0.2 * 9 / 11 + 0.8 * 2.0)
    assert layer.weight.item() == 2.0, "averaging leaves the trained weights alone"
    copy_ = average.model(model)
    assert copy_[0].weight.item() == pytest.approx(0.2 * 9 / 11 + 1.6) and not copy_.training


def test_weight_average_is_checkpointed_used_and_resumed_exactly(tmp_path, tiny_overrides):
    overrides = {**tiny_overrides, "optim": {**tiny_overrides["optim"], "ema": 0.9}}
    config = load_config(overrides=overrides)
    train(config, tmp_path / "ref", progress=lambda _: None)
    averaged = load_checkpoint(tmp_path / "ref")
    trained = load_checkpoint(tmp_path / "ref", averaged=False)
    assert averaged.payload["ema"]["updates"] == 6
    weights = [k for k in averaged.model.state_dict() if k.endswith("weight")]
    assert any(not torch.equal(averaged.model.state_dict()[k], trained.model.state_dict()[k]) for k in weights)
    for k, v in averaged.payload["ema"]["average"].items():
        assert torch.equal(averaged.model.state_dict()[k], v), "evaluation loads the average by default"
    assert load_checkpoint(tmp_path / "ref", kind="lifter").payload["ema"]["updates"] == 6

    crashed = tmp_path / "crashed"

    def crash_after_checkpoint(message: str) -> None:
        if "step 4/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, crashed, progress=crash_after_checkpoint)
    train(config, crashed, resume=True, progress=lambda _: None)
    resumed = load_checkpoint(crashed).payload["ema"]
    for k, v in averaged.payload["ema"]["average"].items():
        assert torch.equal(resumed["average"][k], v), k

    plain = tmp_path / "plain"
    train(load_config(overrides={**tiny_overrides, "optim": {**tiny_overrides["optim"], "ema": 0.0}}), plain,
          progress=lambda _: None)
    with pytest.raises(ValueError, match="no weight average"):
        load_checkpoint(plain, averaged=True)


def test_graded_ranking_loss_joins_the_step(tiny_overrides):
    """``loss.ranking_weight``: off (0) the step is the plain one; on, the step reports the ranking loss and
    adds its weighted value to the total."""
    import copy
    from dataclasses import replace

    from vipe_ray.config import merge

    plain = load_config(overrides=merge(tiny_overrides, {"loss": {"ranking_weight": 0.0, "ranking_candidates": 8,
                                                                  "ranking_views": "both"}}))
    ranked = load_config(overrides=merge(tiny_overrides, {"loss": {"ranking_weight": 0.5, "ranking_candidates": 8,
                                                                   "ranking_views": "both"}}))
    table = load_table(plain.data.table_path()).select(plain.data.train_subjects)
    batch = WindowSampler(table).sample(32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(plain)

    def step(config):
        m = copy.deepcopy(model)
        optimizer, _ = build_optimizer(config, m)
        torch.manual_seed(1)
        return train_step(m, optimizer, batch, config, torch.Generator().manual_seed(3))

    off, on = step(plain), step(ranked)
    assert off["ranking_loss"] == 0.0
    # The same views, samples and triplets: only the ranking term differs. Its candidates are the positive
    # and 8 others, so the cross-entropy is positive and near log 9 at initialisation.
    assert on["triplet_loss"] == off["triplet_loss"]
    assert 1.0 < on["ranking_loss"] < 4.0
    assert on["loss"] == pytest.approx(off["loss"] + 0.5 * on["ranking_loss"], rel=1e-5)
    # From the anchor views only: one of the two directions' lists, so a different mean, the same triplets.
    anchor = step(replace(ranked, loss=replace(ranked.loss, ranking_views="anchor")))
    assert anchor["triplet_loss"] == off["triplet_loss"] and anchor["ranking_loss"] != on["ranking_loss"]
    assert 1.0 < anchor["ranking_loss"] < 4.0
    with pytest.raises(ConfigError, match="loss.ranking_views"):
        load_config(overrides={"loss": {"ranking_views": "positive"}})
    with pytest.raises(ConfigError, match="loss.ranking_temperature"):
        load_config(overrides={"loss": {"ranking_temperature": 0.0}})
    with pytest.raises(ConfigError, match="loss.ranking_candidates"):
        load_config(overrides={"loss": {"ranking_candidates": 0}})


def test_a_diverged_step_stops_training_and_keeps_the_last_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    """A non-finite loss raises naming the step, before that step's weights reach a checkpoint."""
    import math

    from vipe_ray.training import loop
    from vipe_ray.training.checkpoint import CHECKPOINT
    from vipe_ray.training.loop import TrainingDiverged, check_finite

    check_finite({"loss": 0.5, "triplet_loss": 0.4, "a": float("nan")}, 3, "x")  # only losses are checked
    with pytest.raises(TrainingDiverged, match=r"x: step 12 diverged \(loss=nan, triplet_loss=0.5\)"):
        check_finite({"loss": float("nan"), "triplet_loss": 0.5}, 12, "x")
    config = load_config(overrides=merge(tiny_overrides, {"lifter_baseline": False}))  # 6 steps, a checkpoint every 3
    calls = []

    def diverging_step(*args, **kwargs):
        metrics = train_step(*args, **kwargs)
        calls.append(1)
        return {**metrics, "loss": math.inf} if len(calls) == 5 else metrics

    monkeypatch.setattr(loop, "train_step", diverging_step)
    with pytest.raises(TrainingDiverged, match=f"{CHECKPOINT}: step 5 diverged"):
        train(config, tmp_path, progress=lambda _m: None)
    kept = load_checkpoint(tmp_path, which="latest")
    assert kept.step == 3
    assert all(torch.isfinite(p).all() for p in kept.model.parameters())


def test_resume_fills_keys_added_since_the_checkpoint(tiny_overrides, tmp_path):
    """A checkpoint saved before a config key existed resumes when the new key keeps its default (the old
    behaviour), and is refused, without touching the run's files, when it does not."""
    from vipe_ray.config import merge
    from vipe_ray.training.checkpoint import CHECKPOINT

    old_behaviour = {"loss": {"ranking_weight": 0.0, "ranking_candidates": 8, "ranking_temperature": 0.05,
                              "ranking_views": "both"}, "lifter_baseline": False}
    config = load_config(overrides=merge(tiny_overrides, old_behaviour))
    train(config, tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    for key in ("ranking_weight", "ranking_candidates", "ranking_temperature", "ranking_views"):
        del payload["config"]["loss"][key]
    torch.save(payload, tmp_path / CHECKPOINT)
    assert train(config, tmp_path, resume=True)["prvipe"]["steps"] == config.optim.steps
    saved = (tmp_path / "config.yaml").read_text()
    ranked = load_config(overrides=merge(tiny_overrides, {"lifter_baseline": False}))  # the default's loss
    with pytest.raises(ConfigError, match="different config"):
        train(ranked, tmp_path, resume=True)
    assert (tmp_path / "config.yaml").read_text() == saved, "a refused resume leaves config.yaml as it was"


def test_graded_ranking_of_a_one_pose_batch_is_zero():
    from vipe_ray.prvipe.losses import MatchProbability
    from vipe_ray.prvipe.matching import CentredPoses
    from vipe_ray.training.step import graded_ranking

    config = load_config(overrides={"loss": {"ranking_weight": 1.0}})
    z = torch.randn(1, 4, 8, requires_grad=True)
    poses = CentredPoses.of(torch.randn(1, 1, 17, 3))
    loss = graded_ranking(torch.zeros(1, 1), z, z, poses, MatchProbability(), config.loss)
    assert loss.item() == 0.0


def test_kernel_lr_scale_gives_a_and_b_their_own_learning_rate(tiny_overrides):
    config = load_config(overrides=merge(tiny_overrides, {"optim": {"kernel_lr_scale": 10.0, "lr": 0.001}}))
    model = build_model(config)
    optimizer, scheduler = build_optimizer(config, model)
    rest, kernel = optimizer.param_groups
    assert {id(p) for p in kernel["params"]} == {id(model.match.a_raw), id(model.match.b)}
    assert len(rest["params"]) + 2 == len(list(model.parameters())), "every parameter in one group"
    assert kernel["lr"] == pytest.approx(0.01) and rest["lr"] == pytest.approx(0.001)
    # The schedule scales both alike.
    optimizer.step()
    scheduler.step()
    assert kernel["lr"] / rest["lr"] == pytest.approx(10.0)
    # The lifter has no kernel: one group, whatever the scale.
    lifter_optimizer, _ = build_optimizer(config, Lifter(config.model))
    assert len(lifter_optimizer.param_groups) == 1
    with pytest.raises(ConfigError, match="optim.kernel_lr_scale: 0"):
        load_config(overrides=merge(tiny_overrides, {"optim": {"kernel_lr_scale": 0}}))


def test_graded_ranking_reads_the_configured_scores():
    """``loss.ranking_scores`` reaches the ranking: ``tail`` scores give the loss of the tail logits, which differs
    from the sigmoid's at a large b, and only the embeddings get its gradient."""
    from vipe_ray.config import LossConfig
    from vipe_ray.prvipe.losses import MatchProbability, graded_ranking_loss
    from vipe_ray.prvipe.matching import CentredPoses, indexed_np_mpjpe
    from vipe_ray.training.step import graded_ranking

    g = torch.Generator().manual_seed(0)
    n, k, d = 6, 3, 4
    anchors = torch.randn(n, k, d, generator=g, requires_grad=True)
    pool = (anchors.detach() + 0.3 * torch.randn(n, k, d, generator=g)).requires_grad_()
    poses = CentredPoses.of(torch.randn(n, 17, 3, generator=g))
    kernel = torch.cdist(anchors.detach().mean(1), pool.detach().mean(1))
    match = MatchProbability(a_init=1.0, b_init=8.0)
    losses = {}
    for scores in ("sigmoid", "tail"):
        config = LossConfig(ranking_weight=1.0, ranking_candidates=2, ranking_scores=scores)
        losses[scores] = graded_ranking(kernel, anchors, pool, poses, match, config)
        # The same loss by hand: positive first, then the 2 kernel-nearest others.
        cols = torch.cat([torch.arange(n)[:, None], torch.full((n, 2), -1)], 1)
        for i in range(n):
            others = [j for j in kernel[i].argsort().tolist() if j != i][:2]
            cols[i, 1:] = torch.tensor(others)
        rows = torch.arange(n)[:, None].expand_as(cols)
        error = indexed_np_mpjpe(poses, poses, rows.reshape(-1), cols.reshape(-1)).reshape(n, -1)
        logits = match.ranking_logits(anchors[rows.reshape(-1)], pool[cols.reshape(-1)], scores).reshape(n, -1)
        expected = graded_ranking_loss(logits, error.float(), config.ranking_temperature)
        assert losses[scores].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert abs(losses["sigmoid"].item() - losses["tail"].item()) > 1e-3
    losses["tail"].backward()
    assert anchors.grad.abs().sum() > 0 and pool.grad.abs().sum() > 0
    assert match.a_raw.grad is None and match.b.grad is None


@pytest.mark.parametrize("frame", ["camera", "body"])
def test_auxiliary_3d_head_trains_on_its_target(tiny_overrides, frame):
    """``loss.lift_weight`` adds a 3D head whose loss is the mean per-joint error against ``lift_target``; the
    embedding (and so retrieval and deployment) is unchanged in shape, and off at 0 there is no head."""
    from vipe_ray.prvipe.cameras import sample_orbits
    from vipe_ray.prvipe.views import lift_target

    config = load_config(overrides=merge(tiny_overrides, {"loss": {"lift_weight": 2.0, "lift_frame": frame}}))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    generator = torch.Generator().manual_seed(2)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    batch = WindowSampler(table).sample(16, generator)
    head = model.lift_head.weight.detach().clone()
    metrics = train_step(model, optimizer, batch, config, generator)
    assert metrics["lift_loss"] > 0 and not torch.equal(head, model.lift_head.weight)
    mean, sigma = model(torch.zeros(3, 39))
    assert mean.shape == sigma.shape == (3, config.model.embedding_dim)
    assert model(torch.zeros(3, 39), lift=True)[2].shape == (3, 17, 3)
    # The targets: the lifter's (camera frame, one per view) or the body frame (the same for both views).
    centre = batch[:, 0]
    ranges = config.cameras.ranges()
    one, two = sample_orbits(16, ranges, generator), sample_orbits(16, ranges, generator)
    same = torch.allclose(lift_target(centre, one, frame), lift_target(centre, two, frame), atol=1e-5)
    assert same == (frame == "body")
    off = build_model(load_config(overrides=tiny_overrides))
    assert off.lift_head is None
    with pytest.raises(ValueError, match="no 3D head"):
        off(torch.zeros(3, 39), lift=True)
    assert train_step(off, build_optimizer(config, off)[0], batch, load_config(overrides=tiny_overrides),
                      generator)["lift_loss"] == 0.0


def test_ranking_on_means_ranks_the_means(tiny_overrides):
    """``loss.ranking_on: means`` ranks the embedding means (one noise-free sample each): under the same seed
    the ranking loss differs from the samples' ranking, and a model without sigma noise (a point embedding
    ranked on its samples) gives the same loss either way."""
    config = load_config(overrides=merge(tiny_overrides, {"loss": {"ranking_weight": 1.0},
                                                          "mining": {"symmetric": True, "samples": 2}}))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    batch = WindowSampler(table).sample(16, torch.Generator().manual_seed(3))

    def ranking(overrides):
        cfg = load_config(overrides=merge(tiny_overrides, merge({"loss": {"ranking_weight": 1.0},
                                                                 "mining": {"symmetric": True, "samples": 2}},
                                                                overrides)))
        torch.manual_seed(0)
        model = build_model(cfg)
        return train_step(model, build_optimizer(cfg, model)[0], batch, cfg, torch.Generator().manual_seed(4))

    samples, means = ranking({}), ranking({"loss": {"ranking_on": "means"}})
    assert means["ranking_loss"] > 0 and abs(means["ranking_loss"] - samples["ranking_loss"]) > 1e-4
    point = {"model": {"probabilistic": False}}
    assert ranking(point)["ranking_loss"] == pytest.approx(
        ranking(merge(point, {"loss": {"ranking_on": "means"}}))["ranking_loss"], rel=1e-6)
