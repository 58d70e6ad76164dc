"""Tests for vipe_ray.config: YAML loading, validation messages, round trips."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

import vipe_ray
from vipe_ray.config import (
    DEFAULT_CONFIG,
    ConfigError,
    DataConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
    merge,
)

CONFIG_DIR = Path(vipe_ray.__file__).resolve().parent / "configs"
SHIPPED = sorted([*CONFIG_DIR.glob("**/*.yaml"), *CONFIG_DIR.glob("**/*.yml")])


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, name: str = "bad_config.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert name in msg  # every message names the file
    return msg


# ----------------------------------------------------------------------------------------------- shipped


def test_default_config_loads_and_validates():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert DEFAULT_CONFIG.exists()
    assert cfg == load_config(DEFAULT_CONFIG)
    assert cfg.mining.kappa == pytest.approx(0.1), "kappa stays at the reference value for comparability"
    # The default evaluates on subjects it never trains on, and every split exists in the bundled table.
    from vipe_ray.data import load_table

    subjects = set(load_table(cfg.data.table_path()).subjects)
    splits = [set(cfg.data.train_subjects), set(cfg.data.val_subjects), set(cfg.data.test_subjects)]
    assert all(split and split <= subjects for split in splits)
    assert not (splits[0] & splits[2]) and not (splits[0] & splits[1]) and not (splits[1] & splits[2])


def test_reference_defaults():
    cfg = TrainConfig()
    assert cfg.loss.a_init == pytest.approx(math.exp(-0.65))
    assert cfg.loss.b_init == -0.5 and cfg.loss.smoothing == 0.1
    assert cfg.loss.margin == pytest.approx(math.log(2.0))
    assert cfg.loss.positive_weight == 0.005 and cfg.loss.kl_weight == 0.001
    assert cfg.model.dropout == 0.3
    assert cfg.temporal.frames == 7


def test_some_configs_are_shipped():
    assert DEFAULT_CONFIG in [p.resolve() for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == TrainConfig()
    assert config_from_dict(None) == TrainConfig()
    assert config_from_dict({}) == TrainConfig()


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text,key", [
    ("model:\n  widht: 512\n", "model.widht"),
    ("optim:\n  step: 10\n", "optim.step"),
    ("learning_rate: 0.1\n", "learning_rate"),
])
def test_unknown_key_names_the_dotted_path(tmp_path, text, key):
    msg = load_error(tmp_path, text)
    assert key in msg and "unknown key" in msg


@pytest.mark.parametrize("text,key", [
    ("model:\n  width: '512'\n", "model.width"),         # string for int
    ("model:\n  width: 3.5\n", "model.width"),           # float for int
    ("model:\n  width: true\n", "model.width"),          # bool for int
    ("loss:\n  smoothing: true\n", "loss.smoothing"),    # bool for float
    ("optim:\n  lr: fast\n", "optim.lr"),                # string for float
    ("optim:\n  lr: .nan\n", "optim.lr"),                # non-finite
    ("model:\n  probabilistic: 1\n", "model.probabilistic"),  # int for bool
    ("model: 5\n", "model"),                             # scalar for a section
    ("cameras:\n  azimuth: 30\n", "cameras.azimuth"),    # scalar for a range
    ("cameras:\n  azimuth: [1, 2, 3]\n", "cameras.azimuth"),  # wrong tuple length
    ("data:\n  train_subjects: [[1]]\n", "data.train_subjects[0]"),
    ("seed: 1.5\n", "seed"),
])
def test_wrong_types_name_the_key(tmp_path, text, key):
    msg = load_error(tmp_path, text)
    assert f"{key}:" in msg


@pytest.mark.parametrize("text,key", [
    ("optim:\n  optimizer: sgd\n", "optim.optimizer"),
    ("keypoint_dropout:\n  mode: sometimes\n", "keypoint_dropout.mode"),
    ("mining:\n  mode: easy\n", "mining.mode"),
    ("cameras:\n  fixed_rig: moon\n", "cameras.fixed_rig"),
    ("eval:\n  rigs: [h36m, moon]\n", "eval.rigs"),
])
def test_bad_literals_name_the_key(tmp_path, text, key):
    msg = load_error(tmp_path, text)
    assert key in msg


@pytest.mark.parametrize("text,key", [
    ("model:\n  dropout: 1.5\n", "model.dropout"),
    ("loss:\n  ranking_scores: exp\n", "loss.ranking_scores"),
    ("loss:\n  lift_weight: -1\n", "loss.lift_weight"),
    ("loss:\n  lift_frame: world\n", "loss.lift_frame"),
    ("loss:\n  ranking_on: modes\n", "loss.ranking_on"),
    ("optim:\n  kernel_lr_scale: -1\n", "optim.kernel_lr_scale"),
    ("model:\n  width: 0\n", "model.width"),
    ("model:\n  blocks: -1\n", "model.blocks"),
    ("loss:\n  a_init: 0\n", "loss.a_init"),
    ("loss:\n  smoothing: 1.0\n", "loss.smoothing"),
    ("loss:\n  kl_weight: -1\n", "loss.kl_weight"),
    ("mining:\n  kappa: 0\n", "mining.kappa"),
    ("mining:\n  hard_negative_ratio: 0\n", "mining.hard_negative_ratio"),
    ("mining:\n  samples: -2\n", "mining.samples"),
    ("mining:\n  negatives: 0\n", "mining.negatives: 0 must be >= 1"),
    ("mining:\n  negatives: 2\n  mode: ratio\n", "mining.negatives: 2 needs mode semi_hard or hard"),
    ("mining:\n  symmetric: yes please\n", "mining.symmetric"),
    ("mining:\n  neighbours: -1\n", "mining.neighbours: -1 must be >= 0"),
    ("mining:\n  hard_from: 1.5\n", "mining.hard_from: 1.5 must lie in [0, 1]"),
    ("optim:\n  batch_size: 2\n", "optim.batch_size"),
    ("optim:\n  lr: 0\n", "optim.lr"),
    ("optim:\n  lr_final_fraction: 1.5\n", "optim.lr_final_fraction"),
    ("optim:\n  steps: 0\n", "optim.steps"),
    ("temporal:\n  frames: 4\n", "temporal.frames"),
    ("temporal:\n  stride: 0\n", "temporal.stride"),
    ("keypoint_dropout:\n  instance_prob: 1.2\n", "keypoint_dropout.instance_prob"),
    ("cameras:\n  distance: [0.2, 3.0]\n", "cameras.distance"),
    ("cameras:\n  azimuth: [90, -90]\n", "cameras.azimuth"),
    ("cameras:\n  elevation: [-95, 30]\n", "cameras.elevation"),
    ("eval:\n  ks: [0, 5]\n", "eval.ks"),
    ("eval:\n  every: 0\n", "eval.every"),
    ("log_every: 0\n", "log_every"),
    ("val_every: -1\n", "val_every"),
    ("data:\n  train_subjects: []\n", "data.train_subjects"),
])
def test_out_of_range_values_name_the_key(tmp_path, text, key):
    msg = load_error(tmp_path, text)
    assert key in msg


def test_elevation_beyond_89_degrees_is_rejected(tmp_path):
    # orbit_rotation refuses |elevation| >= 89 degrees; the config must catch it before training starts.
    msg = load_error(tmp_path, "cameras:\n  elevation: [-30, 95]\n")
    assert "cameras.elevation" in msg


def test_overlapping_splits(tmp_path):
    msg = load_error(tmp_path, "data:\n  val_subjects: ['01', '10']\n")
    assert "data.train_subjects" in msg and "data.val_subjects" in msg and "'01'" in msg
    msg = load_error(tmp_path, "data:\n  test_subjects: ['10']\n")
    assert "data.val_subjects" in msg and "data.test_subjects" in msg
    with pytest.raises(ConfigError):
        DataConfig(train_subjects=("01",), val_subjects=(), test_subjects=("01",))


def test_malformed_yaml(tmp_path):
    msg = load_error(tmp_path, "model: [1, 2\noptim: {\n")
    assert "malformed YAML" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just a string\n"])
def test_non_mapping_top_level(tmp_path, text):
    msg = load_error(tmp_path, text)
    assert "top level must be a mapping" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_config_from_dict_names_the_source():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"widht": 1}}, source="sweep-trial-3")
    assert "sweep-trial-3" in str(info.value) and "model.widht" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------- values


def test_integer_subject_ids_become_zero_padded_strings(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train_subjects: [1, 5, 105]\n  val_subjects: [10]\n"
                                      "  test_subjects: [6, '13']\n"))
    assert cfg.data.train_subjects == ("01", "05", "105")
    assert cfg.data.val_subjects == ("10",)
    assert cfg.data.test_subjects == ("06", "13")
    # The padded ints collide with the equivalent strings: overlap is still detected.
    msg = load_error(tmp_path, "data:\n  train_subjects: [1]\n  val_subjects: ['01']\n  test_subjects: []\n")
    assert "data.train_subjects" in msg


def test_int_values_are_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\ncameras:\n  distance: [3, 4]\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.cameras.distance == (3.0, 4.0)


def test_overrides_merge_into_the_file(tmp_path):
    path = write(tmp_path, "model:\n  width: 64\n  blocks: 1\n")
    cfg = load_config(path, overrides={"model": {"width": 32}, "seed": 5})
    assert cfg.model.width == 32 and cfg.model.blocks == 1 and cfg.seed == 5
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(path, overrides={"model": {"widht": 32}})


def test_merge_and_flatten():
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}, "e": 6}) == {"a": {"b": 5, "c": 2}, "d": 3, "e": 6}
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(overrides={
        "seed": 3, "model": {"width": 48, "probabilistic": False}, "mining": {"mode": "ratio",
                                                                            "hard_negative_ratio": 0.25},
        "keypoint_dropout": {"mode": "both"}, "temporal": {"enabled": True, "frames": 3},
        "eval": {"rigs": ["novel"], "ks": [1, 3]}, "cameras": {"elevation": [-10, 20]},
    })
    plain = config_to_dict(cfg)
    assert isinstance(plain["data"]["train_subjects"], list)
    assert isinstance(plain["cameras"]["elevation"], list)
    assert config_from_dict(plain) == cfg
    path = write(tmp_path, yaml.safe_dump(plain), "dumped.yaml")
    assert load_config(path) == cfg
    default = TrainConfig()
    assert config_from_dict(config_to_dict(default)) == default
    assert set(plain) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_unquoted_off_in_yaml_means_the_literal(tmp_path):
    """YAML 1.1 reads `off` as False; a literal field that has an "off" value takes it as meant."""
    path = tmp_path / "c.yaml"
    path.write_text("keypoint_dropout:\n  mode: off\n")
    assert load_config(path).keypoint_dropout.mode == "off"
    from vipe_ray.cli import _overrides

    assert load_config(overrides=_overrides(["keypoint_dropout.mode=off"])).keypoint_dropout.mode == "off"
    path.write_text("keypoint_dropout:\n  mode: yes\n")
    with pytest.raises(ConfigError, match="keypoint_dropout.mode: True is not one of"):
        load_config(path)
