"""The lifting baseline's own recipe (``lifter:``) and its best-validation checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from vipe_ray.config import ConfigError, config_to_dict, lifter_recipe, load_config, merge
from vipe_ray.evaluation.validation import LIFTER_SCORE
from vipe_ray.training.checkpoint import BEST, LIFTER_CHECKPOINT, checkpoint_file, load_checkpoint
from vipe_ray.training.loop import better, train_lifter
from vipe_ray.training.step import lifter_limb_swap


def test_an_empty_lifter_section_takes_pr_vipes_recipe():
    config = load_config()
    recipe = lifter_recipe(config)
    assert recipe.optim == config.optim and recipe.model == config.model
    assert recipe.keypoint_dropout == config.keypoint_dropout
    # The shipped default trains the lifter on unswapped poses (limb_swap.lifter: false).
    assert config.limb_swap.prob > 0 and lifter_limb_swap(config) == 0.0


def test_the_lifter_section_overrides_only_the_lifter():
    config = load_config(overrides={"lifter": {"optimizer": "adagrad", "lr": 0.004, "batch_size": 512,
                                               "steps": 123, "width": 256, "blocks": 3, "dropout": 0.2,
                                               "dropout_views": "both", "limb_swap": 0.5}})
    recipe = lifter_recipe(config)
    assert (recipe.optim.optimizer, recipe.optim.lr, recipe.optim.batch_size, recipe.optim.steps) == \
        ("adagrad", 0.004, 512, 123)
    assert (recipe.model.width, recipe.model.blocks, recipe.model.dropout) == (256, 3, 0.2)
    assert recipe.keypoint_dropout.views == "both" and lifter_limb_swap(config) == 0.5
    # Pr-VIPE's own settings are untouched, and the shared ones (data, cameras, precision) stay shared.
    default = load_config()
    assert config.optim == default.optim and config.model == default.model
    assert recipe.cameras == config.cameras and recipe.optim.precision == config.optim.precision
    assert lifter_recipe(recipe) == recipe  # applying it twice changes nothing


def test_limb_swap_lifter_flag_still_sets_the_lifters_swap():
    """``limb_swap.lifter`` (the key before the ``lifter:`` section) keeps its meaning when ``lifter.limb_swap``
    is unset."""
    on = load_config(overrides={"limb_swap": {"prob": 0.3, "lifter": True}})
    assert lifter_limb_swap(on) == 0.3
    both = load_config(overrides={"limb_swap": {"prob": 0.3, "lifter": False}, "lifter": {"limb_swap": 0.1}})
    assert lifter_limb_swap(both) == 0.1


@pytest.mark.parametrize("values, message", [
    ({"lr": 0}, r"lifter\.lr: 0\.0 must be > 0"),
    ({"batch_size": 0}, r"lifter\.batch_size: 0 must be >= 1"),
    ({"dropout": 1.5}, r"lifter\.dropout: 1\.5 must lie in \[0, 1\)"),
    ({"limb_swap": -0.1}, r"lifter\.limb_swap: -0\.1 is not a probability"),
    ({"dropout_views": "all"}, r"lifter\.dropout_views: 'all' fits none of its types .*'anchor', 'both'"),
    ({"optimizer": "sgd"}, r"lifter\.optimizer: 'sgd'"),
    ({"learning_rate": 0.1}, r"lifter\.learning_rate: unknown key"),
])
def test_a_bad_lifter_setting_is_refused_naming_it(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"lifter": values})


def test_validation_falls_on_checkpoints():
    with pytest.raises(ConfigError, match=r"val_every: 300 must be a multiple of checkpoint_every \(500\)"):
        load_config(overrides={"val_every": 300, "checkpoint_every": 500})
    assert load_config(overrides={"val_every": 1000, "checkpoint_every": 500}).val_every == 1000


def test_the_lifter_section_round_trips_through_a_checkpoint_config():
    config = load_config(overrides={"lifter": {"lr": 0.002, "width": 64}})
    from vipe_ray.config import config_from_dict

    assert config_from_dict(config_to_dict(config)) == config
    assert config_to_dict(load_config())["lifter"]["lr"] is None


def test_better_prefers_the_lower_error_and_never_nan():
    mode = LIFTER_SCORE[1]
    assert mode == "min"
    assert better(0.2, None, mode) and better(0.1, 0.2, mode) and not better(0.3, 0.2, mode)
    assert not better(float("nan"), 0.2, mode) and better(0.9, 0.5, "max")


def test_the_lifter_trains_its_recipe_and_keeps_its_best_validation_checkpoint(tiny_overrides, tmp_path):
    overrides = merge(tiny_overrides, {"lifter": {"width": 16, "steps": 9, "lr": 0.003}, "val_every": 3,
                                       "data": {"val_subjects": ["06"]}})
    config = load_config(overrides=overrides)
    lines = []
    summary = train_lifter(config, tmp_path, progress=lines.append, device="cpu")
    assert summary["steps"] == 9
    assert any(line.startswith("[lifter] step 3 validation val_lift_mpjpe=") for line in lines)
    latest = load_checkpoint(tmp_path, kind="lifter", which="latest")
    assert latest.step == 9 and latest.model.head.in_features == 16  # the recipe's width, not model.width
    # Every checkpoint was validated; the best one is the lowest validation error, kept in best/.
    logged = [json.loads(line) for line in (tmp_path / "lifter_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4, 6, 8, 9]
    best_file = tmp_path / BEST / LIFTER_CHECKPOINT
    assert checkpoint_file(tmp_path, "lifter") == best_file
    best = torch.load(best_file, weights_only=False)
    assert summary["val_lift_mpjpe"] == pytest.approx(best["metrics"]["val_lift_mpjpe"])
    # The best is no worse than the latest checkpoint's own validation, and is what load_checkpoint loads.
    latest_error = torch.load(tmp_path / LIFTER_CHECKPOINT, weights_only=False)["metrics"]["val_lift_mpjpe"]
    assert best["metrics"]["val_lift_mpjpe"] <= latest_error
    assert best["step"] in (3, 6, 9) and load_checkpoint(tmp_path, kind="lifter").step == best["step"]


def test_without_val_every_the_latest_checkpoint_is_the_runs(tiny_overrides, tmp_path):
    config = load_config(overrides=merge(tiny_overrides, {"lifter": {"width": 16}}))
    train_lifter(config, tmp_path, progress=lambda _m: None, device="cpu")
    assert not (tmp_path / BEST).exists()
    assert checkpoint_file(tmp_path, "lifter") == tmp_path / LIFTER_CHECKPOINT
    with pytest.raises(ValueError, match="which: 'newest'"):
        checkpoint_file(tmp_path, "lifter", which="newest")


def test_evaluate_scores_the_best_checkpoints_or_with_which_latest_the_latest(tiny_overrides, tmp_path):
    import yaml

    from vipe_ray.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(merge(tiny_overrides, {"optim": {"steps": 9}, "val_every": 3,
                                                         "eval": {"max_queries": 24, "every": 24}})))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    steps = {}
    for which in ("best", "latest"):
        out = tmp_path / f"{which}.json"
        assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--which", which, "--no-occlusion",
                     "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        steps[which] = (result["step"], result["lifter_step"])
    assert steps["latest"] == (9, 9)
    assert steps["best"] == (load_checkpoint(tmp_path / "run").step,
                             load_checkpoint(tmp_path / "run", kind="lifter").step)
