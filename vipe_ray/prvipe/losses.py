"""Pr-VIPE's match probability and losses.

Match probability between two embeddings (each K samples of a Gaussian, or one point)::

    p(z1, z2) = (1 - s) * sigmoid(-a * |z1 - z2| + b) + s / 2,      a = ELU(a_raw) + 1 > 0
    P(e1, e2) = mean of p over the K x K sample pairs;   kernel distance d = -log P

Smoothing ``s`` keeps P in (s/2, 1 - s/2), so d never reaches log(0). Losses:

* triplet ratio loss ``max(0, d(a, p) - d(a, n) + margin)`` averaged over active triplets (margin ln 2 asks
  P(a, p) >= 2 P(a, n));
* positive pairwise loss ``d(a, p)``, averaged over the batch;
* Gaussian prior ``KL(N(mu, diag sigma^2) || N(0, I))``, averaged over all embeddings;
* graded ranking loss (vipe-ray's extension, off by default): the triplet sees one binary label per
  negative; this term asks the match probabilities of an anchor's nearest candidates to follow their 3D
  NP-MPJPE, so near-kappa poses rank below true matches (:func:`graded_ranking_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vipe_ray.errors import ConfigError


@dataclass(frozen=True)
class LossConfig:
    """Sigmoid initialisation and loss weights (reference values)."""

    a_init: float = math.exp(-0.65)
    b_init: float = -0.5
    smoothing: float = 0.1
    margin: float = math.log(2.0)
    positive_weight: float = 0.005
    kl_weight: float = 0.001
    #: Graded ranking loss (vipe-ray's extension, off at 0): each anchor's own positive and its
    #: ``ranking_candidates`` kernel-nearest other poses, ranked by 3D NP-MPJPE at ``ranking_temperature``
    #: (see :func:`vipe_ray.prvipe.losses.graded_ranking_loss`). ``ranking_views``: ``both`` ranks from the anchor
    #: views and (with symmetric triplets) from the positive views too; ``anchor`` from the anchor views only
    #: (half the ranking's cost; about 5% of the default's step).
    ranking_weight: float = 0.0
    ranking_candidates: int = 8
    ranking_temperature: float = 0.05
    ranking_views: str = "both"
    #: The ranking's scores: ``sigmoid``, ``log mean sigmoid(-a d + b)``; ``tail``, ``log mean exp(-a d)``, the
    #: same without the sigmoid's ceiling (see :meth:`vipe_ray.prvipe.losses.MatchProbability.ranking_logits`).
    ranking_scores: str = "sigmoid"
    #: What the ranking compares: ``samples``, the ranking kernel's samples (``mining.samples`` of each
    #: Gaussian); ``means``, the embedding means alone, free of the samples' noise (about ``sqrt(2 D) sigma``
    #: added to every distance), which retrieval by means never sees.
    ranking_on: str = "samples"
    #: Auxiliary 3D head (vipe-ray's extension, off at 0): a linear head on Pr-VIPE's backbone regresses each
    #: view's normalized 3D pose, its mean per-joint error weighted by ``lift_weight`` -- the direct 3D signal
    #: the lifting baseline trains on. ``lift_frame``: ``camera``, the lifter's target (the pose in the view's
    #: camera frame); ``body``, the pose in its own hip-and-spine frame, the same target for every view.
    #: Retrieval still reads the embedding alone.
    lift_weight: float = 0.0
    lift_frame: str = "camera"

    def __post_init__(self) -> None:
        if self.a_init <= 0:
            raise ConfigError(f"loss.a_init: {self.a_init} must be > 0 (a = ELU(raw) + 1 is positive)")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"loss.smoothing: {self.smoothing} must lie in [0, 1)")
        for name in ("margin", "positive_weight", "kl_weight", "ranking_weight", "lift_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}: {getattr(self, name)} must be >= 0")
        if self.ranking_candidates < 1:
            raise ConfigError(f"loss.ranking_candidates: {self.ranking_candidates} must be >= 1")
        if not self.ranking_temperature > 0:
            raise ConfigError(f"loss.ranking_temperature: {self.ranking_temperature} must be > 0")
        if self.ranking_scores not in ("sigmoid", "tail"):
            raise ConfigError(f"loss.ranking_scores: {self.ranking_scores!r} must be 'sigmoid' or 'tail'")
        if self.ranking_views not in ("both", "anchor"):
            raise ConfigError(f"loss.ranking_views: {self.ranking_views!r} must be 'both' or 'anchor'")
        if self.ranking_on not in ("samples", "means"):
            raise ConfigError(f"loss.ranking_on: {self.ranking_on!r} must be 'samples' or 'means'")
        if self.lift_frame not in ("camera", "body"):
            raise ConfigError(f"loss.lift_frame: {self.lift_frame!r} must be 'camera' or 'body'")



def a_to_raw(a: float) -> float:
    """Inverse of ``a = ELU(raw) + 1`` for a > 0."""
    if a <= 0:
        raise ValueError(f"sigmoid slope a must be positive, got {a}")
    return a - 1.0 if a >= 1.0 else math.log(a)


def sample_distances(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of every sample pair of each row: ``[..., K1, D] x [..., K2, D] -> [..., K1, K2]``.

    Many samples (K1 K2 >= 64) take one batched product, ``|x|^2 + |y|^2 - 2 x.y``, on samples centred on
    the mean of ``z2``'s, in fp32 whatever autocast says: its forward and backward are ~1.6x faster than
    ``cdist``'s on the step's 20 x 20 pairs, and centring keeps the cancellation to rounding of the pairs'
    own spread (values and gradients are tested against float64 ``cdist``). The centre is held fixed
    (distances do not depend on it). Few samples keep ``cdist``, faster there.
    """
    k1, k2 = z1.shape[-2], z2.shape[-2]
    if k1 * k2 < 64:
        return torch.cdist(z1, z2, compute_mode="donot_use_mm_for_euclid_dist")
    lead = torch.broadcast_shapes(z1.shape[:-2], z2.shape[:-2])
    with torch.autocast(z1.device.type, enabled=False):
        x = z1.float().expand(*lead, k1, z1.shape[-1]).reshape(-1, k1, z1.shape[-1])
        y = z2.float().expand(*lead, k2, z2.shape[-1]).reshape(-1, k2, z2.shape[-1])
        centre = y.detach().mean(-2, keepdim=True)
        x, y = x - centre, y - centre
        sq = torch.baddbmm((y * y).sum(-1)[:, None, :], x, y.transpose(-1, -2), alpha=-2.0)
        # Gradient 0 where rounding puts a pair at (or below) zero, as cdist's at coinciding points.
        return sq.add_((x * x).sum(-1)[:, :, None]).clamp_min(1e-12).sqrt().reshape(*lead, k1, k2)


class MatchProbability(nn.Module):
    """The trainable sigmoid ``p = (1-s) sigmoid(-a d + b) + s/2`` with a > 0."""

    def __init__(self, a_init: float = math.exp(-0.65), b_init: float = -0.5, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
        self.a_raw = nn.Parameter(torch.tensor(a_to_raw(a_init)))
        self.b = nn.Parameter(torch.tensor(float(b_init)))
        self.smoothing = smoothing

    @property
    def a(self) -> torch.Tensor:
        return F.elu(self.a_raw) + 1.0

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        """``p`` for Euclidean sample distances (any shape)."""
        s = self.smoothing
        return (1.0 - s) * torch.sigmoid(-self.a * distance + self.b) + 0.5 * s

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Paired probabilities: ``[batch, K1, D] x [batch, K2, D] -> [batch]`` (mean over the K1 x K2 pairs)."""
        return self.from_distance(sample_distances(z1, z2)).mean((-1, -2))

    def ranking_logits(self, z1: torch.Tensor, z2: torch.Tensor, scores: str = "sigmoid") -> torch.Tensor:
        """``log mean sigmoid(-a d + b)`` over the K1 x K2 sample pairs, without smoothing and with a and b held
        fixed: ``[batch, K1, D] x [batch, K2, D] -> [batch]``. ``scores="tail"``: ``log mean exp(-a d)``, the
        sigmoid's tail (the same up to the constant b where ``-a d + b << 0``) without its ceiling.

        The graded ranking loss's scores. Smoothing puts a floor under ``log P``, where every candidate scores
        the same and the gradient vanishes: a ranking on ``log P`` drove training onto that plateau, where it
        stayed (triplet loss at ln 2). ``log sigmoid(x) ~ x`` for x << 0 has no floor; fixed a and b leave the
        sigmoid to the triplet loss. The sigmoid has a ceiling instead: as training raises b, the poses
        nearest an anchor score alike near ``log 1`` and their ranking's gradient shrinks by ``1 - sigmoid``;
        the tail ranks them at any distance.
        """
        logits = -self.a.detach() * sample_distances(z1, z2)
        if scores == "sigmoid":
            logits = F.logsigmoid(logits + self.b.detach())
        elif scores != "tail":
            raise ValueError(f"scores must be 'sigmoid' or 'tail', got {scores!r}")
        logits = logits.flatten(-2)
        return torch.logsumexp(logits, -1) - math.log(logits.shape[-1])

    @torch.no_grad()
    def pairwise(self, z1: torch.Tensor, z2: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """All pairs: ``[n, K1, D] x [m, K2, D] -> [n, m]``, vectorized in row chunks to bound memory.

        Retrieval calls this on ~600 x 600 poses x 20 x 20 samples, where memory traffic bounds it: small
        chunks keep the ``[chunk * K1, m * K2]`` block in cache (16 rows: 0.26 s, 64 rows: 0.33 s here).
        """
        n, k1, _ = z1.shape
        m, k2, _ = z2.shape
        flat2 = z2.reshape(m * k2, -1)
        sq2 = (flat2 ** 2).sum(-1)
        out = torch.empty(n, m, dtype=z1.dtype, device=z1.device)
        a, b, s = self.a, self.b, self.smoothing
        for start in range(0, n, chunk):
            flat1 = z1[start:start + chunk].reshape(-1, z1.shape[-1])
            # Squared distances by one matrix product (|x|^2 + |y|^2 - 2 x.y, fused into addmm); clamp
            # rounding below zero before the root. In place: no graph to keep.
            sq = torch.addmm(sq2[None, :], flat1, flat2.T, alpha=-2.0).add_((flat1 ** 2).sum(-1)[:, None])
            sigmoid = sq.clamp_min_(0.0).sqrt_().mul_(-a).add_(b).sigmoid_()
            # p = (1 - s) sigmoid + s/2 is affine: average the sigmoids over the K1 x K2 pairs, then map.
            out[start:start + chunk] = sigmoid.reshape(-1, k1, m, k2).mean((1, 3)).mul_(1.0 - s).add_(0.5 * s)
        return out


def kernel_distance(probability: torch.Tensor) -> torch.Tensor:
    """``d = -log P`` (same shape)."""
    return -torch.log(probability)


def triplet_ratio_loss(d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor,
                       margin: float = math.log(2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplet loss on kernel distances, averaged over active triplets only.

    Args:
        d_ap, d_an: ``[batch]`` anchor-positive and anchor-negative kernel distances.
        valid: ``[batch]`` bool, whether the anchor has a negative at all.
    Returns:
        (loss scalar, active mask ``[batch]``); the loss is 0 when no triplet is active.
    """
    per = torch.relu(d_ap - d_an + margin) * valid
    active = per > 0
    count = active.sum()
    loss = per.sum() / count.clamp_min(1)
    return loss, active


def positive_pairwise_loss(d_ap: torch.Tensor) -> torch.Tensor:
    """Mean anchor-positive kernel distance: ``[batch] -> scalar``."""
    return d_ap.mean()


def graded_ranking_loss(scores: torch.Tensor, error: torch.Tensor, temperature: float) -> torch.Tensor:
    """Listwise cross-entropy between 3D closeness and match scores over each anchor's candidates.

    Target ``q_ij = softmax_j(-error_ij / temperature)``, prediction ``softmax_j(s_ij)``; the loss is
    ``-sum_j q_ij log softmax_j(s_ij)`` averaged over anchors.

    Args:
        scores: ``[anchors, candidates]`` match scores (:meth:`MatchProbability.ranking_logits`).
        error: ``[anchors, candidates]`` NP-MPJPE of the same pairs (torso units).
        temperature: NP-MPJPE scale of the target (> 0).
    """
    target = torch.softmax(-error / temperature, dim=1)
    return -(target * torch.log_softmax(scores, dim=1)).sum(1).mean()


def gaussian_kl(mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over embeddings of ``KL(N(mean, diag sigma^2) || N(0, I))``: ``[batch, D] x2 -> scalar``."""
    return 0.5 * (sigma ** 2 + mean ** 2 - 1.0 - 2.0 * torch.log(sigma)).sum(-1).mean()
