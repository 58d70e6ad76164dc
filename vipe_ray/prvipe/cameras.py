"""Pinhole virtual cameras: orbit extrinsics, projection, evaluation rigs and the augmentation sampler.

World frame: right-handed, z up, metres (the converted motion-capture table's frame).
Camera frame: x to the image right, y to the image bottom, z along the optical axis (OpenCV convention).

An *orbit* camera is placed around a target point (the pelvis of the frame, so it follows the subject) at
``azimuth`` (about the vertical axis, from +x towards +y), ``elevation`` above the horizon and
``distance``, aimed at the target, then rolled about its optical axis. Its world-to-camera rotation is
always proper (det +1): a mirrored projection would teach the model to confuse left and right.

Rigs. ``h36m`` (four chest-high cameras, like Human3.6M's) and ``novel`` are fixed; ``wide`` is a randomized
rig, seeded, drawn from :data:`WIDE_RANGES` -- wider than training's reference ranges: elevations from below
the hips to nearly overhead, close to far, strong roll, varied focal length. ``wide-val`` is drawn from the same
ranges with another seed, for choosing settings on validation subjects without touching the evaluation
rigs. Users describe their own rigs in YAML (:func:`load_rig`).

Focal length scales the image about the principal point; the normalization removes that scale, so for an
ideal pinhole aimed at the subject it changes nothing the model sees. It is kept per camera so that rigs
describe real cameras and so that pixel-level effects added later (crops, detector noise) see real sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml

from vipe_ray.prvipe.keypoints import h36m17_to_coco13

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
    focal: float = FOCAL_PX

    def __post_init__(self) -> None:
        problem = camera_problem(self)
        if problem:
            raise ValueError(problem)


#: Limits every camera must respect: the body (about 1 m around the pelvis) stays in front of the camera
#: and the orbit's "up" direction is defined.
MIN_DISTANCE_M = 1.2
MAX_ELEVATION_DEG = 89.0


def camera_problem(camera: "OrbitCamera") -> str | None:
    """Why a camera cannot be used (field name first), or None."""
    for name in ("azimuth", "elevation", "distance", "roll", "focal"):
        if not math.isfinite(getattr(camera, name)):
            return f"{name}: {getattr(camera, name)} is not a finite number"
    if not abs(camera.elevation) < MAX_ELEVATION_DEG:
        return f"elevation: {camera.elevation} must lie strictly within (-{MAX_ELEVATION_DEG:g}, {MAX_ELEVATION_DEG:g}) degrees"
    if not -180.0 <= camera.roll <= 180.0:
        return f"roll: {camera.roll} must lie within [-180, 180] degrees"
    if not camera.distance >= MIN_DISTANCE_M:
        return f"distance: {camera.distance} m is closer than {MIN_DISTANCE_M} m (the body would reach the camera)"
    if not camera.focal > 0:
        return f"focal: {camera.focal} must be > 0 (pixels)"
    return None


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
    #: ``[batch]`` pixels, or None for :data:`FOCAL_PX`.
    focal: torch.Tensor | None = None

    @staticmethod
    def from_cameras(cameras: tuple[OrbitCamera, ...] | list[OrbitCamera]) -> "Orbits":
        def col(name: str, deg: bool) -> torch.Tensor:
            v = torch.tensor([getattr(c, name) for c in cameras], dtype=torch.float64)
            return torch.deg2rad(v) if deg else v

        return Orbits(col("azimuth", True), col("elevation", True), col("distance", False), col("roll", True),
                      col("focal", False))

    def _map(self, fn) -> "Orbits":
        return Orbits(*(None if t is None else fn(t) for t in (self.azimuth, self.elevation, self.distance,
                                                               self.roll, self.focal)))

    def expand(self, n: int) -> "Orbits":
        """Repeat a single camera ``n`` times."""
        return self._map(lambda t: t.expand(n))

    def repeat_interleave(self, t: int) -> "Orbits":
        """Each camera ``t`` times in a row (one camera per frame of a window)."""
        return self if t == 1 else self._map(lambda x: x.repeat_interleave(t))

    def index(self, rows: torch.Tensor) -> "Orbits":
        return self._map(lambda x: x[rows])


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
            focal: float | torch.Tensor = FOCAL_PX, principal: tuple[float, float] = PRINCIPAL_PX) -> torch.Tensor:
    """Pinhole projection of world points to pixels.

    Args:
        points: ``[batch, joints, 3]`` world points (metres).
        rotation: ``[batch, 3, 3]`` world-to-camera rotation.
        center: ``[batch, 3]`` camera centre in world coordinates.
        focal: pixels, a number or ``[batch]``.
    Returns:
        ``[batch, joints, 2]`` pixel coordinates (x right, y down).
    """
    if isinstance(focal, torch.Tensor):
        focal = focal.to(points.dtype)[:, None, None]
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
    focal = FOCAL_PX if orbits.focal is None else orbits.focal
    return h36m17_to_coco13(project(joints3d, rotation, center, focal))


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
    focal: tuple[float, float] = (FOCAL_PX, FOCAL_PX)

    def __post_init__(self) -> None:
        for name in ("azimuth", "elevation", "roll", "distance", "focal"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"cameras.{name}: range low {lo} exceeds high {hi}")
        if not (-89 < self.elevation[0] and self.elevation[1] < 89):
            raise ValueError(f"cameras.elevation: {list(self.elevation)} must lie within (-89, 89) degrees")
        if self.distance[0] < MIN_DISTANCE_M:
            raise ValueError(f"cameras.distance: {list(self.distance)} must stay at or above {MIN_DISTANCE_M} m")
        if self.focal[0] <= 0:
            raise ValueError(f"cameras.focal: {list(self.focal)} must be > 0 pixels")


def sample_orbits(n: int, ranges: CameraRanges, generator: torch.Generator | None = None) -> Orbits:
    """Draw ``n`` random orbit cameras uniformly within ``ranges``."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    deg = torch.deg2rad
    return Orbits(
        deg(uniform(*ranges.azimuth)), deg(uniform(*ranges.elevation)),
        uniform(*ranges.distance), deg(uniform(*ranges.roll)), uniform(*ranges.focal),
    )


#: The randomized wide rig's distribution: from 40 degrees below the pelvis (a camera on the floor) to
#: 80 degrees (nearly overhead), 1.5 to 10 m, roll up to 45 degrees, focal 500 to 2500 px.
WIDE_RANGES = CameraRanges(azimuth=(-180.0, 180.0), elevation=(-40.0, 80.0), roll=(-45.0, 45.0),
                           distance=(1.5, 10.0), focal=(500.0, 2500.0))
WIDE_SEED, VAL_SEED, RANDOM_RIG_CAMERAS = 2026, 7, 6


def random_rig(count: int, ranges: CameraRanges, seed: int) -> tuple[OrbitCamera, ...]:
    """``count`` fixed cameras drawn from ``ranges`` with ``seed`` (reproducible on any machine)."""
    o = sample_orbits(count, ranges, torch.Generator().manual_seed(seed))
    return tuple(OrbitCamera(round(math.degrees(a), 2), round(math.degrees(e), 2), round(d, 3),
                             round(math.degrees(r), 2), round(f, 1))
                 for a, e, d, r, f in zip(o.azimuth.tolist(), o.elevation.tolist(), o.distance.tolist(),
                                          o.roll.tolist(), o.focal.tolist()))


RIGS["wide"] = random_rig(RANDOM_RIG_CAMERAS, WIDE_RANGES, WIDE_SEED)
RIGS["wide-val"] = random_rig(RANDOM_RIG_CAMERAS, WIDE_RANGES, VAL_SEED)


class RigError(ValueError):
    """A rig file that cannot be used; the message names the file and the key."""


_CAMERA_KEYS = {f.name for f in fields(OrbitCamera)}


def load_rig(path: str | Path) -> tuple[str, tuple[OrbitCamera, ...]]:
    """Read a rig YAML: ``name`` (optional, default the file stem) and ``cameras``, a list of mappings with
    ``azimuth``, ``elevation`` (degrees), ``distance`` (metres), optional ``roll`` (degrees, default 0) and
    ``focal`` (pixels, default 1000). Returns (name, cameras); errors name the file and key."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RigError(f"{path}: rig file not found") from None
    except yaml.YAMLError as exc:
        raise RigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise RigError(f"{path}: expected a mapping with 'cameras', got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"name", "cameras"})
    if unknown:
        raise RigError(f"{path}: {unknown[0]}: unknown key (expected 'name' and 'cameras')")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise RigError(f"{path}: name: {name!r} must be a non-empty string")
    cameras = doc.get("cameras")
    if not isinstance(cameras, list) or len(cameras) < 2:
        raise RigError(f"{path}: cameras: need a list of at least 2 cameras (cross-view pairs), got {cameras!r}")
    out = []
    for i, entry in enumerate(cameras):
        where = f"{path}: cameras[{i}]"
        if not isinstance(entry, dict):
            raise RigError(f"{where}: expected a mapping, got {entry!r}")
        unknown = sorted(set(entry) - _CAMERA_KEYS)
        if unknown:
            raise RigError(f"{where}.{unknown[0]}: unknown key (known: {sorted(_CAMERA_KEYS)})")
        missing = sorted({"azimuth", "elevation", "distance"} - set(entry))
        if missing:
            raise RigError(f"{where}.{missing[0]}: missing")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RigError(f"{where}.{key}: {value!r} is not a number")
        try:
            out.append(OrbitCamera(**{k: float(v) for k, v in entry.items()}))
        except ValueError as exc:  # camera_problem's "field: why"
            raise RigError(f"{where}.{exc}") from None
    return name, tuple(out)
