"""Embedding pose libraries and queries with a trained model.

Two kinds of library: a pose table seen by the cameras of a rig (every selected pose rendered by every camera;
each library pose keeps its subject, clip, frame, camera and 3D pose), and poses read from keypoint files
(:mod:`vipe_ray.search.keypoint_files`). Queries are keypoint files, or rendered table poses. All of them go
through :func:`vipe_ray.prvipe.keypoints.model_input`, the path of training, evaluation and the deployed
model, so a keypoint hidden in a file is hidden exactly as keypoint dropout hides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vipe_ray.data import PoseTable
from vipe_ray.evaluation.protocols import embed_features, resolve_rig
from vipe_ray.prvipe.cameras import Orbits, render
from vipe_ray.prvipe.keypoints import NUM_KEYPOINTS_2D, model_input
from vipe_ray.search.keypoint_files import KeypointSet

#: Poses per forward pass when embedding.
BATCH = 4096


@dataclass
class Embedded:
    """Embedded poses: ``mean``/``sigma`` ``[n, D]`` float32, ``valid`` ``[n]`` (a pose with fewer than two
    visible torso keypoints has no embedding: NaN rows), normalized ``keypoints`` ``[n, 13, 2]`` and
    ``visible`` ``[n, 13]``, ``meta`` one dict per pose, ``poses3d`` ``[n, 17, 3]`` or None."""

    mean: np.ndarray
    sigma: np.ndarray
    valid: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    meta: list[dict] = field(default_factory=list)
    poses3d: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mean)

    def only_valid(self) -> "Embedded":
        """The poses that have an embedding (what a library indexes)."""
        keep = np.flatnonzero(self.valid)
        return Embedded(self.mean[keep], self.sigma[keep], self.valid[keep], self.keypoints[keep], self.visible[keep],
                        [self.meta[i] for i in keep], None if self.poses3d is None else self.poses3d[keep])


def check_single_frame(model: torch.nn.Module) -> None:
    """Index and search embed single poses: a temporal model (windows of frames) cannot serve them."""
    if getattr(model, "frames", 1) > 1:
        raise ValueError(f"this model embeds windows of {model.frames} frames; index and search need a "
                         f"single-frame model (temporal.enabled: false)")


@torch.no_grad()
def embed_keypoints(model: torch.nn.Module, pixels: torch.Tensor | np.ndarray, meta: list[dict] | None = None,
                    poses3d: np.ndarray | None = None) -> Embedded:
    """Embed COCO13 pixel keypoints ``[n, 13, 2]`` (NaN: hidden) with ``model`` (a :class:`PrVipe`)."""
    check_single_frame(model)
    pixels = torch.as_tensor(pixels, dtype=torch.float64)
    if pixels.ndim != 3 or tuple(pixels.shape[1:]) != (NUM_KEYPOINTS_2D, 2):
        raise ValueError(f"embed_keypoints: expected [n, {NUM_KEYPOINTS_2D}, 2] keypoints, got {list(pixels.shape)}")
    features, valid = model_input(pixels)
    mean, sigma = embed_features(model, features.float(), BATCH)
    nan = torch.tensor(float("nan"))
    mean = torch.where(valid[:, None], mean, nan)
    sigma = torch.where(valid[:, None], sigma, nan)
    keypoints = features[:, :2 * NUM_KEYPOINTS_2D].reshape(-1, NUM_KEYPOINTS_2D, 2)
    visible = features[:, 2 * NUM_KEYPOINTS_2D:] > 0
    return Embedded(mean.numpy(), sigma.numpy(), valid.numpy(), keypoints.float().numpy(), visible.numpy(),
                    list(meta) if meta is not None else [{} for _ in range(len(pixels))], poses3d)


def embed_keypoint_set(model: torch.nn.Module, keypoints: KeypointSet) -> Embedded:
    """Embed the poses of a keypoint file (its metadata rows carried along)."""
    return embed_keypoints(model, keypoints.keypoints, keypoints.meta)


def table_rows(table: PoseTable, every: int = 1) -> np.ndarray:
    """Row indices of every ``every``-th table row (all rows with 1)."""
    if every < 1:
        raise ValueError(f"--every: {every} must be >= 1")
    return np.arange(0, len(table), every)


def render_table(table: PoseTable, rows: np.ndarray, rig: str) -> tuple[str, list, list[torch.Tensor]]:
    """Render table ``rows`` with every camera of ``rig`` (a built-in name or a rig YAML): (rig name, cameras,
    one ``[len(rows), 13, 2]`` pixel tensor per camera)."""
    name, cameras = resolve_rig(rig)
    joints = torch.from_numpy(table.joints[rows]).double()
    return name, list(cameras), [render(joints, Orbits.from_cameras([c]).expand(len(rows))) for c in cameras]


def embed_table(model: torch.nn.Module, table: PoseTable, rig: str, every: int = 1,
                progress=lambda _m: None) -> Embedded:
    """A library from a pose table: every ``every``-th row seen by every camera of ``rig``, camera-major."""
    rows = table_rows(table, every)
    name, cameras, pixels = render_table(table, rows, rig)
    parts = []
    for c, (camera, px) in enumerate(zip(cameras, pixels)):
        meta = [{"source": table.path, "subject": str(table.subject[r]), "clip": str(table.clip[r]),
                 "frame": int(table.frame[r]), "camera": c, "rig": name} for r in rows]
        parts.append(embed_keypoints(model, px, meta, table.joints[rows].astype(np.float32)))
        progress(f"[index] {name} camera {c + 1}/{len(cameras)}: {len(rows)} poses embedded")
    return concat(parts)


def concat(parts: list[Embedded]) -> Embedded:
    """One :class:`Embedded` of several (rows in order)."""
    poses = [p.poses3d for p in parts]
    return Embedded(np.concatenate([p.mean for p in parts]), np.concatenate([p.sigma for p in parts]),
                    np.concatenate([p.valid for p in parts]), np.concatenate([p.keypoints for p in parts]),
                    np.concatenate([p.visible for p in parts]), [m for p in parts for m in p.meta],
                    None if any(x is None for x in poses) else np.concatenate(poses))
