"""Training configuration: typed, frozen dataclasses loaded from YAML with validation.

Every field has the reference's default unless noted; a YAML file only names what it changes. Unknown keys
and values of the wrong type are rejected with the key's dotted path, e.g. ``model.widht: unknown key``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from vipe_ray import REPO_ROOT
from vipe_ray.errors import ConfigError
from vipe_ray.prvipe.dropout import KeypointDropoutConfig
from vipe_ray.prvipe.losses import LossConfig
from vipe_ray.prvipe.model import ModelConfig
from vipe_ray.prvipe.cameras import RIGS, CameraRanges, RigError, load_rig
from vipe_ray.prvipe.keypoints import OCCLUSION_GROUPS
from vipe_ray.prvipe.mining import MODES
from vipe_ray.storage import is_uri


@dataclass(frozen=True)
class DataConfig:
    """Where the poses come from and how subjects are split (never by frame)."""

    table: str = "data/cmu_h36m17_30fps.parquet"
    train_subjects: tuple[str, ...] = ("01", "02", "05", "16", "29", "49", "93", "105")
    val_subjects: tuple[str, ...] = ("06", "09", "10", "13")
    #: Drawn once from the subjects the 20-subject table added, before any evaluation (reports/data/split.md).
    test_subjects: tuple[str, ...] = ("03", "07", "08", "11", "12", "17", "35", "131")
    #: Poses a Ray Train worker holds to draw its batches from, streamed from its shard so that its memory
    #: stays flat as the table grows (see :mod:`vipe_ray.training.ingest`); a shard that fits is read once. 0 = hold
    #: the whole shard. ``vipe-ray train`` (one process) always holds the training subjects.
    buffer_rows: int = 16384

    def __post_init__(self) -> None:
        if self.buffer_rows < 0:
            raise ConfigError(f"data.buffer_rows: {self.buffer_rows} must be >= 0 (0 = the whole shard)")
        sets = {"train_subjects": self.train_subjects, "val_subjects": self.val_subjects,
                "test_subjects": self.test_subjects}
        if not self.train_subjects:
            raise ConfigError("data.train_subjects: must name at least one subject")
        for a, b in (("train_subjects", "val_subjects"), ("train_subjects", "test_subjects"),
                     ("val_subjects", "test_subjects")):
            shared = sorted(set(sets[a]) & set(sets[b]))
            if shared:
                raise ConfigError(f"data.{a} and data.{b}: subjects {shared} are in both; splits must be disjoint")

    def table_path(self) -> Path | str:
        """The table path; relative paths resolve against the working directory, then the source checkout.
        An object-store URI (``s3://bucket/x.parquet``, see :mod:`vipe_ray.storage`) is returned as is."""
        if is_uri(self.table):
            return self.table
        path = Path(self.table.removeprefix("file://")).expanduser()
        if path.is_absolute() or path.exists():
            return path
        return REPO_ROOT / path


@dataclass(frozen=True)
class CameraConfig:
    """Views of each training pose. ``augmentation`` draws random cameras; off, views come from ``fixed_rig``."""

    augmentation: bool = True
    azimuth: tuple[float, float] = (-180.0, 180.0)
    elevation: tuple[float, float] = (-30.0, 30.0)
    roll: tuple[float, float] = (-30.0, 30.0)
    distance: tuple[float, float] = (2.5, 6.0)
    focal: tuple[float, float] = (1000.0, 1000.0)
    fixed_rig: str = "h36m"

    def __post_init__(self) -> None:
        if self.fixed_rig not in RIGS:
            raise ConfigError(f"cameras.fixed_rig: {self.fixed_rig!r} is not one of {sorted(RIGS)}")
        try:
            self.ranges()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def ranges(self) -> CameraRanges:
        return CameraRanges(self.azimuth, self.elevation, self.roll, self.distance, self.focal)


@dataclass(frozen=True)
class LimbSwapConfig:
    """Limb swapping (:mod:`vipe_ray.prvipe.limb_swap`): each limb of each training pose is replaced, with ``prob``,
    by the same limb of another pose of the batch (its bone directions in the body frame, the pose's own bone
    lengths). Pr-VIPE trains on the swapped poses; the lifting baseline too unless ``lifter`` is false (then
    it trains on the original poses, drawing nothing for the swap)."""

    prob: float = 0.0
    lifter: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"limb_swap.prob: {self.prob} is not a probability in [0, 1]")


@dataclass(frozen=True)
class LifterConfig:
    """The 3D-lifting baseline's own recipe (:func:`lifter_recipe`). A setting left unset (null) takes
    Pr-VIPE's value, so that the default compares the two methods on one recipe; a tuned lifter sets its own."""

    #: Optimizer, learning rate, poses per step and steps (``optim.*`` when unset).
    optimizer: Literal["adam", "adagrad"] | None = None
    lr: float | None = None
    batch_size: int | None = None
    steps: int | None = None
    #: Backbone width, residual blocks and dropout (``model.*`` when unset).
    width: int | None = None
    blocks: int | None = None
    dropout: float | None = None
    #: Views whose keypoints are dropped: ``anchor`` (one view of each pose) or ``both``
    #: (``keypoint_dropout.views`` when unset).
    dropout_views: Literal["anchor", "both"] | None = None
    #: Limb-swap probability of its training poses (unset: ``limb_swap.prob`` where ``limb_swap.lifter``,
    #: else 0).
    limb_swap: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lifter.lr: {self.lr} must be > 0")
        for name in ("batch_size", "steps", "width", "blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"lifter.{name}: {value} must be >= 1")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lifter.dropout: {self.dropout} must lie in [0, 1)")
        if self.limb_swap is not None and not 0.0 <= self.limb_swap <= 1.0:
            raise ConfigError(f"lifter.limb_swap: {self.limb_swap} is not a probability in [0, 1]")


@dataclass(frozen=True)
class TemporalConfig:
    """Temporal embedding: ``frames`` consecutive poses (``stride`` table frames apart) give one embedding."""

    enabled: bool = False
    frames: int = 7
    stride: int = 1

    def __post_init__(self) -> None:
        if self.frames < 2 or self.frames % 2 == 0:
            raise ConfigError(f"temporal.frames: {self.frames} must be an odd number >= 3 (centred windows)")
        if self.stride < 1:
            raise ConfigError(f"temporal.stride: {self.stride} must be >= 1")

    @property
    def window(self) -> int:
        return self.frames if self.enabled else 1


@dataclass(frozen=True)
class MiningConfig:
    """Triplet mining: kappa (NP-MPJPE, torso units) separates negatives; see :mod:`vipe_ray.prvipe.mining`."""

    kappa: float = 0.1
    mode: str = "semi_hard"
    hard_negative_ratio: float = 1.0
    #: Embedding samples per pose used to rank candidates (0 = all K, the reference). The chosen triplets'
    #: losses always use all K samples; ranking with fewer cuts the K^2 x batch^2 kernel on small machines.
    samples: int = 0
    #: Both views of a record serve as anchor: the positive view also gets a negative, mined among the
    #: anchor views (the same kernel, transposed), so a step forms 2N triplets instead of N (vipe-ray's
    #: extension; the reference mines for the anchor view only).
    symmetric: bool = False
    #: Negatives per anchor, the first ones in the mode's order (vipe-ray's extension; 1 = the reference).
    negatives: int = 1
    #: Batches of pose pairs: half the poses drawn at random, each paired with a frame of its clip at most
    #: this many table rows away, so that the batch holds near-kappa negatives (0 = every pose drawn at
    #: random, the reference; vipe-ray's extension). Only Pr-VIPE's batches; the lifter draws at random.
    #: Off by default: 10 and 20 gave no retrieval gain on validation
    #: (reports/recipe/history-11-subjects.md, third round).
    neighbours: int = 0
    #: From this fraction of the run on, mining takes the hardest negative, whatever ``mode`` says (1 = never,
    #: the reference; vipe-ray's extension). Hard mining from the first step collapses the embedding; once it
    #: is organized, the hardest negatives are the retrieval errors that semi-hard mining passes over.
    #: Off by default: 0.5 and 0.75 lost occluded Hit@1 on validation
    #: (reports/recipe/history-11-subjects.md, fourth round).
    hard_from: float = 1.0

    def mode_at(self, progress: float) -> str:
        """The mining mode at ``progress`` (step / steps) of the run."""
        return "hard" if self.hard_from < 1.0 and progress >= self.hard_from else self.mode

    def __post_init__(self) -> None:
        if not 0.0 <= self.hard_from <= 1.0:
            raise ConfigError(f"mining.hard_from: {self.hard_from} must lie in [0, 1] (1 = never)")
        if self.neighbours < 0:
            raise ConfigError(f"mining.neighbours: {self.neighbours} must be >= 0 (0 = no neighbour pairs)")
        if self.negatives < 1:
            raise ConfigError(f"mining.negatives: {self.negatives} must be >= 1")
        if self.negatives > 1 and self.mode == "ratio":
            raise ConfigError(f"mining.negatives: {self.negatives} needs mode semi_hard or hard, not ratio")
        if self.kappa <= 0:
            raise ConfigError(f"mining.kappa: {self.kappa} must be > 0")
        if self.mode not in MODES:
            raise ConfigError(f"mining.mode: {self.mode!r} is not one of {list(MODES)}")
        if not 0.0 < self.hard_negative_ratio <= 1.0:
            raise ConfigError(f"mining.hard_negative_ratio: {self.hard_negative_ratio} must lie in (0, 1]")
        if self.samples < 0:
            raise ConfigError(f"mining.samples: {self.samples} must be >= 0 (0 = all embedding samples)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation. The reference uses Adagrad 0.02 for 5M steps; a CPU budget wants Adam."""

    optimizer: Literal["adam", "adagrad"] = "adam"
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    weight_decay: float = 0.0
    steps: int = 3000
    #: Poses per step of each worker: a Ray Train run of N workers steps on N x batch_size poses (the
    #: reference's batch per worker); lr is not rescaled with N.
    batch_size: int = 256
    jitter: float = 0.0
    #: Arithmetic of the embedder's forward and backward: ``fp32``, or ``bf16`` autocast (the Linear layers'
    #: products in bfloat16 with fp32 accumulation; weights, BatchNorm, the kernel and the losses stay fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    #: Decay of the exponential moving average of the weights that checkpoints keep beside the trained ones
    #: and that evaluation and deployment use (the reference keeps one, 0.9999 over 5M steps); 0 = off.
    ema: float = 0.0
    #: Learning rate of the match kernel's a and b, as a multiple of ``lr`` (see
    #: :func:`vipe_ray.training.optim.parameter_groups`).
    kernel_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.kernel_lr_scale > 0:
            raise ConfigError(f"optim.kernel_lr_scale: {self.kernel_lr_scale} must be > 0")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"optim.ema: {self.ema} must lie in [0, 1) (0 = no weight average)")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: {self.lr} must be > 0")
        if not 0.0 < self.lr_final_fraction <= 1.0:
            raise ConfigError(f"optim.lr_final_fraction: {self.lr_final_fraction} must lie in (0, 1]")
        if self.steps < 1:
            raise ConfigError(f"optim.steps: {self.steps} must be >= 1")
        if self.batch_size < 4:
            raise ConfigError(f"optim.batch_size: {self.batch_size} must be >= 4 (negatives come from the batch)")
        if self.jitter < 0:
            raise ConfigError(f"optim.jitter: {self.jitter} must be >= 0")


#: Occlusion protocols of the evaluation: one limb, both arms, both legs, the lower body.
EVAL_OCCLUSION_GROUPS = ("left_arm", "right_arm", "left_leg", "right_leg", "both_arms", "both_legs", "lower_body")


@dataclass(frozen=True)
class EvalConfig:
    """Cross-view retrieval protocols (see :mod:`vipe_ray.evaluation.protocols`).

    ``rigs`` are built-in rig names or rig YAML files; ``occlusion`` adds, per rig, the queries with
    ``occlusion_groups`` hidden and with keypoints hidden independently at ``occlusion_rates``.
    """

    rigs: tuple[str, ...] = ("h36m", "novel", "wide")
    #: Rigs of the validation that training runs and sweeps select on: never the evaluation rigs.
    val_rigs: tuple[str, ...] = ("wide-val",)
    every: int = 24
    #: Source frames between validation queries: 3x the evaluation's queries (457 on the bundled validation
    #: subjects, against 153 at ``every``), so that the standard error of a validation Hit@1 (logged beside
    #: it) is below the differences sweeps rank.
    val_every: int = 8
    kappa: float = 0.1
    ks: tuple[int, ...] = (1, 5, 10, 20)
    max_queries: int = 0
    occlusion: bool = True
    occlusion_groups: tuple[str, ...] = EVAL_OCCLUSION_GROUPS
    occlusion_rates: tuple[float, ...] = (0.1, 0.2)

    def __post_init__(self) -> None:
        for rig in self.rigs + self.val_rigs:
            if rig in RIGS:
                continue
            if not rig.endswith((".yaml", ".yml")):
                raise ConfigError(f"eval.rigs: {rig!r} is neither a built-in rig {sorted(RIGS)} nor a .yaml rig file")
            try:
                load_rig(rig)
            except RigError as exc:
                raise ConfigError(f"eval.rigs: {exc}") from None
        if not self.rigs or not self.val_rigs:
            raise ConfigError("eval.rigs, eval.val_rigs: name at least one rig each")
        for name in ("every", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}: {getattr(self, name)} must be >= 1 (source frames between queries)")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"eval.ks: {list(self.ks)} must be positive integers")
        bad = [g for g in self.occlusion_groups if g not in OCCLUSION_GROUPS]
        if bad:
            raise ConfigError(f"eval.occlusion_groups: {bad} not among {sorted(OCCLUSION_GROUPS)}")
        bad = [r for r in self.occlusion_rates if not 0.0 < r < 1.0]
        if bad:
            raise ConfigError(f"eval.occlusion_rates: {bad} must lie in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    keypoint_dropout: KeypointDropoutConfig = field(default_factory=KeypointDropoutConfig)
    limb_swap: LimbSwapConfig = field(default_factory=LimbSwapConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lifter: LifterConfig = field(default_factory=LifterConfig)
    lifter_baseline: bool = True
    log_every: int = 50
    checkpoint_every: int = 500
    #: Steps between validations in ``vipe-ray train`` (at checkpoints; each method keeps its best-validation
    #: checkpoint in ``out/best/``); 0: none, the latest checkpoint is the run's. Ray Train runs validate at
    #: every checkpoint.
    val_every: int = 0

    def __post_init__(self) -> None:
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.val_every > 0 and self.val_every % self.checkpoint_every:
            raise ConfigError(f"val_every: {self.val_every} must be a multiple of checkpoint_every "
                              f"({self.checkpoint_every}): validation picks among the checkpoints")
        if self.val_every < 0:
            raise ConfigError(f"val_every: {self.val_every} must be >= 0 (0 = no validation in `vipe-ray train`)")


def lifter_recipe(config: TrainConfig) -> TrainConfig:
    """The config the lifting baseline trains with: ``config`` with the settings of its ``lifter`` section in
    place of Pr-VIPE's (optimizer, model, keypoint-dropout views, limb swap); data, cameras and precision
    stay shared."""
    lifter = config.lifter

    def pick(value, default):
        return default if value is None else value

    swap = pick(lifter.limb_swap, config.limb_swap.prob if config.limb_swap.lifter else 0.0)
    return replace(
        config,
        optim=replace(config.optim, optimizer=pick(lifter.optimizer, config.optim.optimizer),
                      lr=pick(lifter.lr, config.optim.lr), batch_size=pick(lifter.batch_size, config.optim.batch_size),
                      steps=pick(lifter.steps, config.optim.steps)),
        model=replace(config.model, width=pick(lifter.width, config.model.width),
                      blocks=pick(lifter.blocks, config.model.blocks), dropout=pick(lifter.dropout, config.model.dropout)),
        keypoint_dropout=replace(config.keypoint_dropout,
                                 views=pick(lifter.dropout_views, config.keypoint_dropout.views)),
        limb_swap=replace(config.limb_swap, prob=swap, lifter=True))


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check and convert one YAML value to the annotated type; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, path + ".")
    if origin is Literal:
        # YAML 1.1 reads an unquoted off/on (``mode: off``, ``--set keypoint_dropout.mode=off``) as a boolean.
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if origin in (typing.Union, types.UnionType):
        reasons = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                reasons.append(str(exc).removeprefix(f"{path}: "))
        raise ConfigError(f"{path}: {value!r} fits none of its types ({'; '.join(reasons)})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        # Subject ids like 05 must stay strings; YAML would read a bare 5 as an int.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value) if isinstance(value, str) else f"{value:02d}"
    raise ConfigError(f"{path}: unsupported type {tp}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """A frozen config dataclass ``cls`` from a YAML mapping: values coerced to the field types, unknown keys and
    invalid values refused with :class:`ConfigError` naming ``prefix`` + the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def config_from_dict(values: dict | None, source: str = "<dict>") -> TrainConfig:
    """Build a validated :class:`TrainConfig`; errors name ``source`` and the key."""
    try:
        return build_dataclass(TrainConfig, values or {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Load a YAML config (the shipped default without ``path``), then apply nested ``overrides``."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(values).__name__}")
    if overrides:
        values = merge(values, overrides)
    return config_from_dict(values, str(path))


def merge(base: dict, updates: dict) -> dict:
    """Nested dict merge (``updates`` wins)."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists), the inverse of :func:`config_from_dict`."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for logging parameters)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
