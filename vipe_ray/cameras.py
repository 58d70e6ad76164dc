"""Pinhole virtual cameras: orbit extrinsics, projection, evaluation rigs and the augmentation sampler.

World frame: right-handed, z up, metres (the converted motion-capture table's frame).
Camera frame: x to the image right, y to the image bottom, z along the optical axis (OpenCV convention).

An *orbit* camera is placed around a target point (the pelvis of the frame, so it follows the subject) at
``azimuth`` (about the vertical axis, from +x towards +y), ``elevation`` above the horizon and
``distance``, aimed at the target, then rolled about its optical axis. Its world-to-camera rotation is
always proper (det +1): a mirrored projection would teach the model to confuse left and right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vipe_ray.keypoints import h36m17_to_coco13

#: Intrinsics of every virtual camera: a 1000 x 1000 px image, focal 1000 px (53 deg field of view).
FOCAL_PX = 1000.0
PRINCIPAL_PX = (500.0, 500.0)


@dataclass(frozen=True)
class OrbitCamera:
    """One fixed camera of an evaluation rig (angles in degrees, distance in metres)."""

    azimuth: float
    elevation: float
    distance: float
    roll: float = 0.0


RIGS: dict[str, tuple[OrbitCamera, ...]] = {
    "h36m": (
        OrbitCamera(45, 10, 5.0, 0), OrbitCamera(135, 10, 5.0, 0),
        OrbitCamera(225, 10, 5.0, 0), OrbitCamera(315, 10, 5.0, 0),
    ),
    "novel": (
        OrbitCamera(0, 35, 3.0, 0), OrbitCamera(100, -10, 4.0, 15),
        OrbitCamera(200, 55, 6.0, -10), OrbitCamera(290, 20, 2.5, 25),
    ),
}


@dataclass(frozen=True)
class Orbits:
    """A batch of orbit cameras; every field is ``[batch]`` (radians, metres)."""

    azimuth: torch.Tensor
    elevation: torch.Tensor
    distance: torch.Tensor
    roll: torch.Tensor

    @staticmethod
    def from_cameras(cameras: tuple[OrbitCamera, ...] | list[OrbitCamera]) -> "Orbits":
        def col(name: str, deg: bool) -> torch.Tensor:
            v = torch.tensor([getattr(c, name) for c in cameras], dtype=torch.float64)
            return torch.deg2rad(v) if deg else v

        return Orbits(col("azimuth", True), col("elevation", True), col("distance", False), col("roll", True))

    def expand(self, n: int) -> "Orbits":
        """Repeat a single camera ``n`` times."""
        return Orbits(*(t.expand(n) for t in (self.azimuth, self.elevation, self.distance, self.roll)))


def orbit_direction(azimuth: torch.Tensor, elevation: torch.Tensor) -> torch.Tensor:
    """Unit vector from the target to the camera: ``[...] -> [..., 3]``."""
    ce = torch.cos(elevation)
    return torch.stack([ce * torch.cos(azimuth), ce * torch.sin(azimuth), torch.sin(elevation)], dim=-1)


def orbit_rotation(azimuth: torch.Tensor, elevation: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotation of an orbit camera looking at its target: ``[...] -> [..., 3, 3]``.

    Rows are the camera's x (image right), y (image down) and z (optical axis) in world coordinates.
    """
    if (elevation.abs() >= math.radians(89.0)).any():
        raise ValueError("orbit camera elevation must lie strictly within (-89, 89) degrees")
    forward = -orbit_direction(azimuth, elevation)
    up = torch.zeros_like(forward)
    up[..., 2] = 1.0
    right = torch.linalg.cross(forward, up)
    right = right / torch.linalg.vector_norm(right, dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    base = torch.stack([right, down, forward], dim=-2)
    c, s = torch.cos(roll), torch.sin(roll)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    spin = torch.stack([
        torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1), torch.stack([zero, zero, one], -1),
    ], dim=-2)
    return spin @ base


def project(points: torch.Tensor, rotation: torch.Tensor, center: torch.Tensor,
            focal: float = FOCAL_PX, principal: tuple[float, float] = PRINCIPAL_PX) -> torch.Tensor:
    """Pinhole projection of world points to pixels.

    Args:
        points: ``[batch, joints, 3]`` world points (metres).
        rotation: ``[batch, 3, 3]`` world-to-camera rotation.
        center: ``[batch, 3]`` camera centre in world coordinates.
    Returns:
        ``[batch, joints, 2]`` pixel coordinates (x right, y down).
    """
    cam = torch.einsum("bij,bkj->bki", rotation, points - center[:, None, :])
    depth = cam[..., 2:3]
    if (depth <= 1e-3).any():
        raise ValueError("a projected point lies behind or on the camera plane; increase the camera distance")
    uv = cam[..., :2] / depth * focal
    return uv + torch.tensor(principal, dtype=uv.dtype)


def unproject(pixels: torch.Tensor, depth: torch.Tensor, rotation: torch.Tensor, center: torch.Tensor,
              focal: float = FOCAL_PX, principal: tuple[float, float] = PRINCIPAL_PX) -> torch.Tensor:
    """Inverse of :func:`project` given each point's camera depth.

    Args:
        pixels: ``[batch, joints, 2]``; depth: ``[batch, joints]``; rotation ``[batch, 3, 3]``; center ``[batch, 3]``.
    Returns:
        ``[batch, joints, 3]`` world points.
    """
    xy = (pixels - torch.tensor(principal, dtype=pixels.dtype)) / focal * depth[..., None]
    cam = torch.cat([xy, depth[..., None]], dim=-1)
    return torch.einsum("bji,bkj->bki", rotation, cam) + center[:, None, :]


def orbit_pose(joints3d: torch.Tensor, orbits: Orbits) -> tuple[torch.Tensor, torch.Tensor]:
    """Extrinsics of orbit cameras aimed at each pose's pelvis.

    Args:
        joints3d: ``[batch, 17, 3]`` world joints (metres); orbits: a batch of ``batch`` cameras.
    Returns:
        rotation ``[batch, 3, 3]`` and camera centre ``[batch, 3]``.
    """
    dtype = joints3d.dtype
    az, el, dist, roll = (t.to(dtype) for t in (orbits.azimuth, orbits.elevation, orbits.distance, orbits.roll))
    target = joints3d[:, 0, :]
    center = target + dist[:, None] * orbit_direction(az, el)
    return orbit_rotation(az, el, roll), center


def render(joints3d: torch.Tensor, orbits: Orbits) -> torch.Tensor:
    """Project H36M17 poses with orbit cameras and keep the 13 input keypoints.

    Args:
        joints3d: ``[batch, 17, 3]`` world joints (metres).
        orbits: ``batch`` cameras, one per pose.
    Returns:
        ``[batch, 13, 2]`` COCO13 pixel keypoints (head top in the nose slot).
    """
    rotation, center = orbit_pose(joints3d, orbits)
    return h36m17_to_coco13(project(joints3d, rotation, center))


def camera_frame(joints3d: torch.Tensor, orbits: Orbits) -> torch.Tensor:
    """Express poses in their camera's frame (the target of a 3D lifter): ``[batch, 17, 3] -> [batch, 17, 3]``."""
    rotation, center = orbit_pose(joints3d, orbits)
    return torch.einsum("bij,bkj->bki", rotation, joints3d - center[:, None, :])


@dataclass(frozen=True)
class CameraRanges:
    """Uniform ranges of the random virtual cameras of camera augmentation (degrees, metres).

    Angles follow the reference (azimuth +-180, elevation +-30, roll +-30); the reference fixes the depth
    at 2 torso units, we draw a distance range in metres that covers the evaluation rigs.
    """

    azimuth: tuple[float, float] = (-180.0, 180.0)
    elevation: tuple[float, float] = (-30.0, 30.0)
    roll: tuple[float, float] = (-30.0, 30.0)
    distance: tuple[float, float] = (2.5, 6.0)

    def __post_init__(self) -> None:
        for name in ("azimuth", "elevation", "roll", "distance"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"cameras.{name}: range low {lo} exceeds high {hi}")
        if not (-89 < self.elevation[0] and self.elevation[1] < 89):
            raise ValueError(f"cameras.elevation: {list(self.elevation)} must lie within (-89, 89) degrees")
        if self.distance[0] <= 0.5:
            raise ValueError(f"cameras.distance: {list(self.distance)} must stay above 0.5 m")


def sample_orbits(n: int, ranges: CameraRanges, generator: torch.Generator | None = None) -> Orbits:
    """Draw ``n`` random orbit cameras uniformly within ``ranges``."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    deg = torch.deg2rad
    return Orbits(
        deg(uniform(*ranges.azimuth)), deg(uniform(*ranges.elevation)),
        uniform(*ranges.distance), deg(uniform(*ranges.roll)),
    )
