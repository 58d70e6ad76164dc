"""Pr-VIPE embedder and the 3D-lifting baseline.

Input features of one pose: its 13 normalized 2D keypoints (dropped ones zeroed) and their 13 visibility
flags, ``[..., 39]``. The backbone is the Martinez "simple baseline": FC(width) then residual blocks of two
FC layers, each FC = Linear -> BatchNorm -> ReLU -> Dropout. The Gaussian head gives a mean and a diagonal
sigma = ELU(raw) + 1; the deterministic variant (ablation) gives a point.

Temporal embedding (late fusion, as the reference): a shared per-frame backbone, the frames' features
concatenated, one FC + one residual block, then the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vipe_ray.errors import ConfigError
from vipe_ray.prvipe.keypoints import NUM_JOINTS_3D, NUM_KEYPOINTS_2D
from vipe_ray.prvipe.losses import LossConfig, MatchProbability


@dataclass(frozen=True)
class ModelConfig:
    """Residual MLP backbone (Martinez-style) with a Gaussian embedding head."""

    width: int = 1024
    blocks: int = 2
    dropout: float = 0.3
    embedding_dim: int = 16
    samples: int = 20
    probabilistic: bool = True

    def __post_init__(self) -> None:
        for name in ("width", "embedding_dim", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: {getattr(self, name)} must be >= 1")
        if self.blocks < 0:
            raise ConfigError(f"model.blocks: {self.blocks} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout} must lie in [0, 1)")


FEATURES_PER_POSE = NUM_KEYPOINTS_2D * 3


class Dropout(nn.Dropout):
    """Inverted dropout with a mask drawn from 16 random bits per unit: the keep rate is ``1 - p`` rounded to a
    multiple of 2^-15 (at least 2^-15; 1 when p < 2^-16) and the kept units are scaled by its inverse, so the
    layer is unbiased up to the rounding of that scale in ``x``'s dtype.

    On CPU the random bits cost most of a dropout layer: four 16-bit draws cut from each 64-bit one make the
    layer half as costly as one fp32 uniform per unit (0.63 against 1.25 ms for a ``[512, 1024]`` mask on 2
    threads), and ``nn.Dropout``'s ``bernoulli_`` is 3.5x slower than the uniforms (a training step has five
    ``[2 batch, width]`` masks).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Clamped so the int16 comparison below never wraps (32768) and the scale never divides by 0.
        threshold = max(round((1.0 - self.p) * 32768), 1)
        if threshold >= 32768:
            return x
        words = -(-x.numel() // 4)
        # random_() on int64 draws from [0, 2^63): the lowest 15 bits of every 16 are uniform.
        bits = torch.empty(words, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:x.numel()]
        keep = (bits & 0x7FFF) < threshold
        return x * keep.view(x.shape).to(x.dtype).mul_(32768.0 / threshold)


class FullyConnected(nn.Sequential):
    def __init__(self, fan_in: int, fan_out: int, dropout: float):
        super().__init__(nn.Linear(fan_in, fan_out), nn.BatchNorm1d(fan_out), nn.ReLU(), Dropout(dropout))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(FullyConnected(width, width, dropout), FullyConnected(width, width, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class Backbone(nn.Sequential):
    """``[batch, fan_in] -> [batch, width]``."""

    def __init__(self, fan_in: int, width: int, blocks: int, dropout: float):
        super().__init__(FullyConnected(fan_in, width, dropout), *[ResidualBlock(width, dropout) for _ in range(blocks)])


@dataclass
class Embedding:
    """A batch of embeddings: ``mean`` ``[batch, D]``, ``sigma`` ``[batch, D]`` (None for points)."""

    mean: torch.Tensor
    sigma: torch.Tensor | None

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized samples ``[batch, k, D]`` (the mean itself, k = 1, for point embeddings)."""
        if self.sigma is None:
            return self.mean[:, None, :]
        eps = torch.randn((*self.mean.shape[:-1], k, self.mean.shape[-1]), generator=generator,
                          dtype=self.mean.dtype).to(self.mean.device)
        return self.mean[:, None, :] + self.sigma[:, None, :] * eps


class PrVipe(nn.Module):
    """Maps 2D pose features to a Gaussian embedding; also holds the trainable match probability (a, b).

    ``forward``: ``[batch, 39]`` or temporal ``[batch, frames, 39]`` -> (mean ``[batch, D]``, sigma ``[batch, D]``);
    sigma is a tensor of ones' shape but ignored when ``probabilistic`` is off. With ``lift=True`` (training
    with ``loss.lift_weight > 0``), also the auxiliary 3D head's pose ``[batch, 17, 3]`` (the centre frame's).
    """

    def __init__(self, model: ModelConfig, loss: LossConfig, frames: int = 1):
        super().__init__()
        self.config = model
        self.frames = frames
        self.base = Backbone(FEATURES_PER_POSE, model.width, model.blocks, model.dropout)
        if frames > 1:
            self.fuse = nn.Sequential(FullyConnected(frames * model.width, model.width, model.dropout),
                                      ResidualBlock(model.width, model.dropout))
        self.mean_head = nn.Linear(model.width, model.embedding_dim)
        self.sigma_head = nn.Linear(model.width, model.embedding_dim) if model.probabilistic else None
        self.match = MatchProbability(loss.a_init, loss.b_init, loss.smoothing)
        self.lift_head = nn.Linear(model.width, NUM_JOINTS_3D * 3) if loss.lift_weight > 0 else None

    def forward(self, features: torch.Tensor, lift: bool = False) -> tuple[torch.Tensor, ...]:
        if self.frames > 1:
            if features.ndim != 3 or features.shape[1] != self.frames or features.shape[2] != FEATURES_PER_POSE:
                raise ValueError(f"temporal model expects [batch, {self.frames}, {FEATURES_PER_POSE}], "
                                 f"got {list(features.shape)}")
            b = features.shape[0]
            h = self.base(features.reshape(b * self.frames, -1)).reshape(b, -1)
            h = self.fuse(h)
        else:
            if features.ndim == 3 and features.shape[1] == 1:
                features = features[:, 0]
            if features.ndim != 2 or features.shape[1] != FEATURES_PER_POSE:
                raise ValueError(f"model expects [batch, {FEATURES_PER_POSE}], got {list(features.shape)}")
            h = self.base(features)
        # The heads always in fp32, also under bf16 autocast: sigma = ELU + 1 would round to 0 in bf16.
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            mean = self.mean_head(h)
            if self.sigma_head is None:
                sigma = torch.ones_like(mean)
            else:
                raw = self.sigma_head(h)
                # ELU(raw) + 1, written as exp(raw) for raw <= 0: the same function, but (exp(raw) - 1) + 1
                # rounds to 0 in fp32 below raw ~ -17 and the KL's log(sigma) became -inf. The clamp keeps exp
                # finite in the branch that where() discards (an inf there would turn its zero gradient into NaN).
                sigma = torch.where(raw > 0, raw + 1.0, torch.exp(raw.clamp_max(0.0)))
            if not lift:
                return mean, sigma
            if self.lift_head is None:
                raise ValueError("this model has no 3D head: it was built with loss.lift_weight = 0")
            return mean, sigma, self.lift_head(h).reshape(-1, NUM_JOINTS_3D, 3)

    def embed(self, features: torch.Tensor) -> Embedding:
        mean, sigma = self(features)
        return Embedding(mean, sigma if self.config.probabilistic else None)


class Lifter(nn.Module):
    """3D-lifting baseline: the same backbone regressing the normalized 3D pose in the camera frame.

    ``[batch, 39]`` (or ``[batch, frames, 39]``, centre frame used) -> ``[batch, 17, 3]``.
    """

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.base = Backbone(FEATURES_PER_POSE, model.width, model.blocks, model.dropout)
        self.head = nn.Linear(model.width, NUM_JOINTS_3D * 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            features = features[:, features.shape[1] // 2]
        h = self.base(features)
        with torch.autocast(h.device.type, enabled=False):  # the regression head in fp32, as Pr-VIPE's heads
            return self.head(h.float()).reshape(-1, NUM_JOINTS_3D, 3)
