"""Tests for vipe_ray.prvipe.cameras: orbit extrinsics, projection, rigs, the augmentation sampler."""

from __future__ import annotations

import math

import pytest
import torch

from vipe_ray.prvipe.cameras import (
    FOCAL_PX,
    PRINCIPAL_PX,
    RIGS,
    CameraRanges,
    OrbitCamera,
    Orbits,
    camera_frame,
    orbit_direction,
    orbit_pose,
    orbit_rotation,
    project,
    render,
    sample_orbits,
    unproject,
)
from vipe_ray.prvipe.keypoints import COCO13_KEYPOINTS

L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = (COCO13_KEYPOINTS.index(n) for n in ("l_shoulder", "r_shoulder",
                                                                              "l_hip", "r_hip"))
NOSE = COCO13_KEYPOINTS.index("nose")
PRINCIPAL = torch.tensor(PRINCIPAL_PX, dtype=torch.float64)


def standing_pose(pelvis=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """An upright H36M17 pose facing +x with its left side towards +y (z up, metres)."""
    j = torch.tensor([
        [0.00, 0.00, 1.00],   # pelvis
        [0.00, -0.12, 1.00],  # r_hip
        [0.02, -0.12, 0.55],  # r_knee
        [0.00, -0.12, 0.10],  # r_ankle
        [0.00, 0.12, 1.00],   # l_hip
        [0.02, 0.12, 0.55],   # l_knee
        [0.00, 0.12, 0.10],   # l_ankle
        [0.00, 0.00, 1.25],   # spine
        [0.00, 0.00, 1.50],   # thorax
        [0.02, 0.00, 1.60],   # neck
        [0.03, 0.00, 1.75],   # head
        [0.00, 0.20, 1.45],   # l_shoulder
        [0.00, 0.25, 1.20],   # l_elbow
        [0.10, 0.25, 1.00],   # l_wrist
        [0.00, -0.20, 1.45],  # r_shoulder
        [0.00, -0.25, 1.20],  # r_elbow
        [0.10, -0.25, 1.00],  # r_wrist
    ], dtype=torch.float64)
    return j - j[0] + torch.tensor(pelvis, dtype=torch.float64)


def orbits(az, el, dist, roll=0.0) -> Orbits:
    return Orbits.from_cameras([OrbitCamera(az, el, dist, roll)])


def random_angles(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    az = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    el = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(88.0)
    roll = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return az, el, roll


# ----------------------------------------------------------------------------------------------- rotations


def test_orbit_rotation_is_proper_and_orthonormal():
    az, el, roll = random_angles(64, 0)
    rot = orbit_rotation(az, el, roll)
    assert rot.shape == (64, 3, 3)
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(64, dtype=torch.float64))


def test_orbit_rotation_optical_axis_points_at_target():
    az, el, roll = random_angles(32, 1)
    rot = orbit_rotation(az, el, roll)
    # Row 2 is the optical axis in world coordinates: from the camera towards the target.
    torch.testing.assert_close(rot[:, 2], -orbit_direction(az, el))


def test_orbit_rotation_without_roll_keeps_the_image_upright():
    az, el, _ = random_angles(32, 2)
    rot = orbit_rotation(az, el, torch.zeros_like(az))
    # Image x (row 0) is horizontal; image y (row 1, "down") has a negative world-z component.
    torch.testing.assert_close(rot[:, 0, 2], torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (rot[:, 1, 2] < 0).all()


def test_orbit_rotation_rejects_vertical_cameras():
    with pytest.raises(ValueError, match="elevation"):
        orbit_rotation(torch.tensor([0.0]), torch.tensor([math.radians(89.5)]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="elevation"):
        orbit_rotation(torch.tensor([0.0]), torch.tensor([-math.pi / 2]), torch.tensor([0.0]))


def test_orbit_direction_conventions():
    d = orbit_direction(torch.deg2rad(torch.tensor([0.0, 90.0, 180.0, 0.0], dtype=torch.float64)),
                        torch.deg2rad(torch.tensor([0.0, 0.0, 0.0, 30.0], dtype=torch.float64)))
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0],
                             [math.cos(math.radians(30)), 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(d, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("cam", [OrbitCamera(0, 0, 3.0), OrbitCamera(45, 10, 5.0), OrbitCamera(200, 55, 6.0, -10),
                                 OrbitCamera(-120, -20, 2.5, 25)])
def test_camera_sits_at_distance_and_direction_from_pelvis(cam):
    pose = standing_pose(pelvis=(1.5, -2.0, 0.9))[None]
    o = Orbits.from_cameras([cam])
    rot, center = orbit_pose(pose, o)
    offset = center[0] - pose[0, 0]
    assert torch.linalg.vector_norm(offset).item() == pytest.approx(cam.distance)
    az, el = math.radians(cam.azimuth), math.radians(cam.elevation)
    expected_dir = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)],
                                dtype=torch.float64)
    torch.testing.assert_close(offset / cam.distance, expected_dir)
    # The pelvis projects to the principal point and sits on the optical axis at depth = distance.
    pix = project(pose, rot, center)
    torch.testing.assert_close(pix[0, 0], PRINCIPAL)
    cam_pts = camera_frame(pose, o)
    torch.testing.assert_close(cam_pts[0, 0], torch.tensor([0.0, 0.0, cam.distance], dtype=torch.float64))


def test_camera_follows_each_pose_pelvis():
    poses = torch.stack([standing_pose((0.0, 0.0, 1.0)), standing_pose((3.0, 4.0, 0.5))])
    o = orbits(30, 10, 4.0).expand(2)
    _, center = orbit_pose(poses, o)
    torch.testing.assert_close(center[1] - center[0], poses[1, 0] - poses[0, 0])
    pix = render(poses, o)
    torch.testing.assert_close(pix[0], pix[1])  # same pose, same relative camera -> same image


def test_front_camera_sees_left_shoulder_on_image_right():
    """Pitfall 1 (mirroring): facing the subject's front, its left side appears on the image's right."""
    pose = standing_pose()[None]  # faces +x, left side +y
    for cam in (OrbitCamera(0, 0, 4.0), OrbitCamera(0, 10, 5.0), OrbitCamera(10, 20, 3.0, 5)):
        pix = render(pose, Orbits.from_cameras([cam]))[0]
        assert pix[L_SHOULDER, 0] > pix[R_SHOULDER, 0], cam
        assert pix[L_HIP, 0] > pix[R_HIP, 0], cam
        assert pix[NOSE, 1] < pix[L_HIP, 1], cam  # head above the hips (image y points down)
    # From behind the subject, its left side is on the image's left.
    pix = render(pose, orbits(180, 0, 4.0))[0]
    assert pix[L_SHOULDER, 0] < pix[R_SHOULDER, 0]
    assert pix[NOSE, 1] < pix[L_HIP, 1]


def test_front_camera_hand_projection():
    # Camera at azimuth 0, elevation 0, distance 4 from the pelvis (0, 0, 1): image right = +y, down = -z.
    pose = standing_pose()[None]
    pix = project(pose, *orbit_pose(pose, orbits(0, 0, 4.0)))[0]
    l_shoulder = pose[0, 11]  # (0, 0.2, 1.45): depth 4
    expected = torch.tensor([500 + FOCAL_PX * 0.2 / 4.0, 500 - FOCAL_PX * 0.45 / 4.0], dtype=torch.float64)
    torch.testing.assert_close(pix[11], expected)
    assert l_shoulder[1] > 0


def test_project_hand_case():
    points = torch.tensor([[[1.0, 2.0, 4.0], [0.0, 0.0, 2.0]]], dtype=torch.float64)
    rot = torch.eye(3, dtype=torch.float64)[None]
    center = torch.zeros(1, 3, dtype=torch.float64)
    pix = project(points, rot, center)
    torch.testing.assert_close(pix, torch.tensor([[[750.0, 1000.0], [500.0, 500.0]]], dtype=torch.float64))
    pix = project(points, rot, center, focal=10.0, principal=(0.0, 0.0))
    torch.testing.assert_close(pix, torch.tensor([[[2.5, 5.0], [0.0, 0.0]]], dtype=torch.float64))


def test_project_unproject_round_trip():
    az, el, roll = random_angles(8, 3)
    g = torch.Generator().manual_seed(4)
    dist = 2.5 + 3.0 * torch.rand(8, generator=g, dtype=torch.float64)
    poses = standing_pose()[None] + 0.3 * torch.randn(8, 17, 3, generator=g, dtype=torch.float64)
    poses[:, 0] = standing_pose()[0]
    o = Orbits(az, el, dist, roll)
    rot, center = orbit_pose(poses, o)
    pix = project(poses, rot, center)
    depth = camera_frame(poses, o)[..., 2]
    assert (depth > 0).all()
    back = unproject(pix, depth, rot, center)
    torch.testing.assert_close(back, poses, atol=1e-10, rtol=0)


@pytest.mark.parametrize("roll_deg", [15.0, -40.0, 90.0])
def test_roll_rotates_the_image_about_the_principal_point(roll_deg):
    pose = standing_pose()[None]
    base = render(pose, orbits(30, 15, 4.0, 0.0))[0] - PRINCIPAL
    rolled = render(pose, orbits(30, 15, 4.0, roll_deg))[0] - PRINCIPAL
    # Distances to the principal point are kept; every keypoint turns by the same angle, of size |roll|.
    torch.testing.assert_close(torch.linalg.vector_norm(rolled, dim=-1), torch.linalg.vector_norm(base, dim=-1))
    turn = torch.atan2(rolled[:, 1], rolled[:, 0]) - torch.atan2(base[:, 1], base[:, 0])
    turn = torch.remainder(turn + math.pi, 2 * math.pi) - math.pi
    assert torch.allclose(turn, turn[0].expand_as(turn), atol=1e-9)
    assert abs(turn[0].item()) == pytest.approx(math.radians(abs(roll_deg)), abs=1e-9)
    # Opposite rolls turn the image the opposite way.
    other = render(pose, orbits(30, 15, 4.0, -roll_deg))[0] - PRINCIPAL
    turn_other = torch.atan2(other[0, 1], other[0, 0]) - torch.atan2(base[0, 1], base[0, 0])
    turn_other = (turn_other + math.pi) % (2 * math.pi) - math.pi
    assert turn_other.item() == pytest.approx(-turn[0].item(), abs=1e-9)


def test_points_behind_the_camera_raise():
    points = torch.tensor([[[0.0, 0.0, -1.0]]], dtype=torch.float64)
    rot = torch.eye(3, dtype=torch.float64)[None]
    with pytest.raises(ValueError, match="behind"):
        project(points, rot, torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        project(torch.zeros(1, 1, 3, dtype=torch.float64), rot, torch.zeros(1, 3, dtype=torch.float64))
    # A camera 0.2 m from the pelvis would have the feet/head behind it: refused when it is made.
    with pytest.raises(ValueError, match="distance: 0.2 m is closer"):
        render(standing_pose()[None], orbits(0, 60, 0.2))
    raw = Orbits(*(torch.tensor([v], dtype=torch.float64) for v in (0.0, math.radians(60), 0.2, 0.0)))
    with pytest.raises(ValueError, match="behind"):
        render(standing_pose()[None], raw)


# ----------------------------------------------------------------------------------------------- rigs / orbits


def test_rigs_have_the_specified_cameras():
    assert set(RIGS) >= {"h36m", "novel"}
    h36m = [(c.azimuth, c.elevation, c.distance, c.roll) for c in RIGS["h36m"]]
    assert h36m == [(45, 10, 5.0, 0), (135, 10, 5.0, 0), (225, 10, 5.0, 0), (315, 10, 5.0, 0)]
    novel = [(c.azimuth, c.elevation, c.distance, c.roll) for c in RIGS["novel"]]
    assert novel == [(0, 35, 3.0, 0), (100, -10, 4.0, 15), (200, 55, 6.0, -10), (290, 20, 2.5, 25)]


@pytest.mark.parametrize("rig", sorted(RIGS))
def test_every_rig_renders_the_standing_pose(rig):
    o = Orbits.from_cameras(RIGS[rig])
    n = len(RIGS[rig])
    pix = render(standing_pose()[None].expand(n, 17, 3), o)
    assert pix.shape == (n, 13, 2)
    assert torch.isfinite(pix).all()


def test_orbits_from_cameras_converts_degrees_and_expands():
    o = Orbits.from_cameras([OrbitCamera(90, -45, 2.0, 180), OrbitCamera(0, 0, 3.0)])
    torch.testing.assert_close(o.azimuth, torch.tensor([math.pi / 2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(o.elevation, torch.tensor([-math.pi / 4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(o.distance, torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(o.roll, torch.tensor([math.pi, 0.0], dtype=torch.float64))
    e = orbits(10, 20, 4.0, 5).expand(3)
    assert e.azimuth.shape == e.elevation.shape == e.distance.shape == e.roll.shape == (3,)
    torch.testing.assert_close(e.distance, torch.full((3,), 4.0, dtype=torch.float64))


def test_sample_orbits_within_ranges():
    ranges = CameraRanges(azimuth=(-90.0, 45.0), elevation=(-10.0, 25.0), roll=(5.0, 6.0), distance=(3.0, 3.5))
    o = sample_orbits(2000, ranges, torch.Generator().manual_seed(0))
    for name, (lo, hi), deg in (("azimuth", ranges.azimuth, True), ("elevation", ranges.elevation, True),
                                ("roll", ranges.roll, True), ("distance", ranges.distance, False)):
        v = getattr(o, name)
        assert v.shape == (2000,)
        lo_r, hi_r = (math.radians(lo), math.radians(hi)) if deg else (lo, hi)
        assert v.min().item() >= lo_r and v.max().item() <= hi_r, name
        # Uniform: spread over the whole range, mean near the middle.
        span = hi_r - lo_r
        assert v.min().item() < lo_r + 0.02 * span and v.max().item() > hi_r - 0.02 * span, name
        assert v.mean().item() == pytest.approx(0.5 * (lo_r + hi_r), abs=0.05 * span), name


def test_sample_orbits_is_deterministic_for_a_seeded_generator():
    ranges = CameraRanges()
    a = sample_orbits(16, ranges, torch.Generator().manual_seed(7))
    b = sample_orbits(16, ranges, torch.Generator().manual_seed(7))
    c = sample_orbits(16, ranges, torch.Generator().manual_seed(8))
    for name in ("azimuth", "elevation", "distance", "roll"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))


def test_sampled_cameras_render_the_pose():
    o = sample_orbits(32, CameraRanges(), torch.Generator().manual_seed(9))
    pix = render(standing_pose()[None].expand(32, 17, 3), o)
    assert pix.shape == (32, 13, 2) and torch.isfinite(pix).all()


# ----------------------------------------------------------------------------------------------- ranges


def test_camera_ranges_defaults_follow_the_reference():
    r = CameraRanges()
    assert r.azimuth == (-180.0, 180.0)
    assert r.elevation == (-30.0, 30.0)
    assert r.roll == (-30.0, 30.0)
    assert r.distance[0] > 0.5 and r.distance[0] <= r.distance[1]


@pytest.mark.parametrize("kwargs,key", [
    ({"azimuth": (10.0, -10.0)}, "azimuth"),
    ({"roll": (5.0, 4.0)}, "roll"),
    ({"elevation": (20.0, 10.0)}, "elevation"),
    ({"distance": (6.0, 3.0)}, "distance"),
    ({"distance": (0.3, 3.0)}, "distance"),
    ({"elevation": (-95.0, 30.0)}, "elevation"),
])
def test_camera_ranges_validation(kwargs, key):
    with pytest.raises(ValueError, match=f"cameras.{key}"):
        CameraRanges(**kwargs)


@pytest.mark.parametrize("elevation", [(-30.0, 95.0), (-95.0, 95.0), (0.0, 89.0)])
def test_camera_ranges_reject_elevation_at_or_above_89(elevation):
    # orbit_rotation refuses |elevation| >= 89 degrees, so the sampler's range must stay within (-89, 89).
    with pytest.raises(ValueError, match="cameras.elevation"):
        CameraRanges(elevation=elevation)
