"""Tests for vipe_ray.prvipe.keypoints: profiles, index tables, 2D / 3D normalizations and shape checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vipe_ray.prvipe.keypoints import (
    body_frame,
    COCO13_FLIP,
    COCO13_KEYPOINTS,
    COCO17_KEYPOINTS,
    COCO17_TO_COCO13,
    H36M17_JOINTS,
    H36M17_TO_COCO13,
    NUM_JOINTS_3D,
    NUM_KEYPOINTS_2D,
    OCCLUSION_GROUPS,
    PELVIS,
    SPINE,
    THORAX,
    KeypointError,
    check_shape,
    coco17_to_coco13,
    h36m17_to_coco13,
    model_input,
    normalize_2d,
    normalize_masked,
    normalize_3d,
)

L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 1, 2, 7, 8
TORSO = (L_SHOULDER, R_SHOULDER, L_HIP, R_HIP)


def rot2(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def max_torso_distance(kp: torch.Tensor, members=TORSO) -> torch.Tensor:
    """Largest pairwise distance among the given COCO13 slots: ``[..., 13, 2] -> [...]``."""
    d = [torch.linalg.vector_norm(kp[..., i, :] - kp[..., j, :], dim=-1) for i, j in itertools.combinations(members, 2)]
    return torch.stack(d, -1).amax(-1)


# ----------------------------------------------------------------------------------------------- profiles


def test_profile_sizes():
    assert NUM_JOINTS_3D == len(H36M17_JOINTS) == 17
    assert NUM_KEYPOINTS_2D == len(COCO13_KEYPOINTS) == 13
    assert len(COCO17_KEYPOINTS) == 17
    assert len(H36M17_TO_COCO13) == len(COCO17_TO_COCO13) == len(COCO13_FLIP) == 13
    assert (H36M17_JOINTS[PELVIS], H36M17_JOINTS[SPINE], H36M17_JOINTS[THORAX]) == ("pelvis", "spine", "thorax")


def test_h36m17_to_coco13_names_match():
    for slot, joint in enumerate(H36M17_TO_COCO13):
        if COCO13_KEYPOINTS[slot] == "nose":
            # The top of the head fills the nose slot (as the reference does for projections).
            assert H36M17_JOINTS[joint] == "head"
        else:
            assert H36M17_JOINTS[joint] == COCO13_KEYPOINTS[slot], slot
    assert len(set(H36M17_TO_COCO13)) == 13


def test_coco17_to_coco13_names_match():
    for slot, kp in enumerate(COCO17_TO_COCO13):
        assert COCO17_KEYPOINTS[kp] == COCO13_KEYPOINTS[slot], slot
    dropped = set(COCO17_KEYPOINTS) - {COCO17_KEYPOINTS[i] for i in COCO17_TO_COCO13}
    assert dropped == {"l_eye", "r_eye", "l_ear", "r_ear"}


def test_selection_functions_use_the_tables_and_keep_batch_dims():
    joints = torch.arange(17, dtype=torch.float64)[:, None].expand(17, 3)
    batch = joints.expand(2, 4, 17, 3)
    out = h36m17_to_coco13(batch)
    assert out.shape == (2, 4, 13, 3)
    assert out[1, 2, :, 0].tolist() == list(map(float, H36M17_TO_COCO13))
    out = coco17_to_coco13(batch[..., :2])
    assert out.shape == (2, 4, 13, 2)
    assert out[0, 0, :, 1].tolist() == list(map(float, COCO17_TO_COCO13))


def test_flip_swaps_left_and_right_names():
    for slot, other in enumerate(COCO13_FLIP):
        name, flipped = COCO13_KEYPOINTS[slot], COCO13_KEYPOINTS[other]
        if name == "nose":
            assert flipped == "nose"
        else:
            side = name[:2]
            assert side in ("l_", "r_")
            assert flipped == ("r_" if side == "l_" else "l_") + name[2:]
    assert [COCO13_FLIP[i] for i in COCO13_FLIP] == list(range(13))  # an involution


def test_occlusion_groups_name_the_right_keypoints():
    names = {g: {COCO13_KEYPOINTS[i] for i in idx} for g, idx in OCCLUSION_GROUPS.items()}
    assert names["head"] == {"nose"}
    assert names["left_arm"] == {"l_elbow", "l_wrist"}
    assert names["right_arm"] == {"r_elbow", "r_wrist"}
    assert names["left_leg"] == {"l_knee", "l_ankle"}
    assert names["right_leg"] == {"r_knee", "r_ankle"}
    assert names["both_arms"] == names["left_arm"] | names["right_arm"]
    assert names["both_legs"] == {"l_knee", "r_knee", "l_ankle", "r_ankle"}
    assert names["lower_body"] == names["both_legs"] | {"l_hip", "r_hip"}
    assert names["upper_left"] == {"l_shoulder", "l_elbow", "l_wrist"}
    assert names["upper_right"] == {"r_shoulder", "r_elbow", "r_wrist"}
    assert names["left_side"] == {n for n in COCO13_KEYPOINTS if n.startswith("l_")}
    assert names["right_side"] == {n for n in COCO13_KEYPOINTS if n.startswith("r_")}
    for idx in OCCLUSION_GROUPS.values():
        assert all(0 <= i < 13 for i in idx)


# ----------------------------------------------------------------------------------------------- 2D


def hand_pose() -> torch.Tensor:
    """Hips at (2, 2) / (4, 2), shoulders at (2, 6) / (4, 6): centre (3, 2), largest distance sqrt(20)."""
    kp = torch.zeros(13, 2, dtype=torch.float64)
    kp[:, 0] = torch.arange(13, dtype=torch.float64)
    kp[:, 1] = 10.0
    kp[L_HIP] = torch.tensor([4.0, 2.0])
    kp[R_HIP] = torch.tensor([2.0, 2.0])
    kp[L_SHOULDER] = torch.tensor([4.0, 6.0])
    kp[R_SHOULDER] = torch.tensor([2.0, 6.0])
    return kp


def test_normalize_2d_hand_case():
    kp = hand_pose()
    out = normalize_2d(kp)
    scale = math.sqrt(20.0)
    expected = (kp - torch.tensor([3.0, 2.0], dtype=torch.float64)) / scale * 0.5
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[L_HIP], torch.tensor([1.0, 0.0], dtype=torch.float64) / scale * 0.5)
    torch.testing.assert_close(0.5 * (out[L_HIP] + out[R_HIP]), torch.zeros(2, dtype=torch.float64))
    assert max_torso_distance(out).item() == pytest.approx(0.5)


def test_normalize_2d_random_batch_properties():
    g = torch.Generator().manual_seed(0)
    kp = torch.randn(3, 5, 13, 2, generator=g, dtype=torch.float64) * 100 + 400
    out = normalize_2d(kp)
    assert out.shape == kp.shape
    torch.testing.assert_close(0.5 * (out[..., L_HIP, :] + out[..., R_HIP, :]),
                               torch.zeros(3, 5, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(max_torso_distance(out), torch.full((3, 5), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("theta,scale,shift", [(0.0, 3.0, (10.0, -4.0)), (0.7, 0.25, (-300.0, 55.0)),
                                                (-2.5, 17.0, (0.0, 1000.0))])
def test_normalize_2d_translation_scale_rotation(theta, scale, shift):
    g = torch.Generator().manual_seed(1)
    kp = torch.randn(4, 13, 2, generator=g, dtype=torch.float64) * 50
    rot = rot2(theta)
    moved = scale * kp @ rot.T + torch.tensor(shift, dtype=torch.float64)
    base = normalize_2d(kp)
    # Invariant to translation and scale, equivariant to in-plane rotation.
    torch.testing.assert_close(normalize_2d(moved), base @ rot.T)
    if theta == 0.0:
        torch.testing.assert_close(normalize_2d(moved), base)


def test_normalize_2d_all_visible_mask_equals_no_mask():
    g = torch.Generator().manual_seed(2)
    kp = torch.randn(6, 13, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(normalize_2d(kp, torch.ones(6, 13, dtype=torch.bool)), normalize_2d(kp))


def test_normalize_2d_hidden_shoulder_is_ignored():
    kp = hand_pose()
    visible = torch.ones(13, dtype=torch.bool)
    visible[L_SHOULDER] = False
    out = normalize_2d(kp, visible)
    # Remaining torso: r_shoulder (2, 6), hips (2, 2), (4, 2): largest distance is still sqrt(20).
    torch.testing.assert_close(out[visible], normalize_2d(kp)[visible])
    assert (out[L_SHOULDER] == 0).all(), "a hidden keypoint reaches the model as 0"
    # Moving the hidden shoulder far away changes nothing at all.
    far = kp.clone()
    far[L_SHOULDER] = torch.tensor([1000.0, -500.0])
    torch.testing.assert_close(normalize_2d(far, visible), out)
    # Without the mask the far shoulder dominates the scale.
    assert not torch.allclose(normalize_2d(far)[visible], out[visible])

    # Hide the right shoulder too: torso = the two hips only (distance 2).
    visible[R_SHOULDER] = False
    out2 = normalize_2d(kp, visible)
    expected = (kp - torch.tensor([3.0, 2.0], dtype=torch.float64)) / 2.0 * 0.5
    torch.testing.assert_close(out2[visible], expected[visible])


def test_normalize_2d_hidden_hip_uses_the_other_hip_as_centre():
    kp = hand_pose()
    visible = torch.ones(13, dtype=torch.bool)
    visible[L_HIP] = False
    out = normalize_2d(kp, visible)
    # Centre = r_hip (2, 2); torso = r_hip, both shoulders: largest is r_hip - l_shoulder = sqrt(20).
    expected = (kp - torch.tensor([2.0, 2.0], dtype=torch.float64)) / math.sqrt(20.0) * 0.5
    torch.testing.assert_close(out[visible], expected[visible])
    torch.testing.assert_close(out[R_HIP], torch.zeros(2, dtype=torch.float64))


def test_normalize_2d_mask_is_per_pose():
    kp = torch.stack([hand_pose(), hand_pose() * 2 + 7])
    visible = torch.ones(2, 13, dtype=torch.bool)
    visible[0, L_HIP] = False
    out = normalize_2d(kp, visible)
    torch.testing.assert_close(out[0], normalize_2d(kp[0], visible[0]))
    torch.testing.assert_close(out[1], normalize_2d(kp[1]))


def test_normalize_2d_without_hips_centres_on_the_shoulders():
    kp = hand_pose()
    visible = torch.ones(13, dtype=torch.bool)
    visible[[L_HIP, R_HIP]] = False
    out = normalize_2d(kp, visible)
    # Centre = shoulder midpoint (3, 6); torso = the two shoulders only (distance 2).
    expected = (kp - torch.tensor([3.0, 6.0], dtype=torch.float64)) / 2.0 * 0.5
    torch.testing.assert_close(out[visible], expected[visible])


def test_normalize_masked_marks_each_pose_and_never_raises():
    kp = torch.stack([hand_pose(), hand_pose(), hand_pose()])
    visible = torch.ones(3, 13, dtype=torch.bool)
    visible[1, [L_HIP, R_HIP, L_SHOULDER]] = False  # one torso keypoint left: no scale
    visible[2, list(TORSO)] = False  # no torso at all
    out, valid = normalize_masked(kp, visible)
    assert valid.tolist() == [True, False, False]
    torch.testing.assert_close(out[0], normalize_2d(hand_pose()))
    assert (out[1:] == 0).all()
    with pytest.raises(KeypointError, match="pose 1 cannot be normalized"):
        normalize_2d(kp, visible)


def test_model_input_nan_marks_missing_and_matches_training_views():
    """Deployment (NaN = missing) and training (a visibility mask) give the same features."""
    g = torch.Generator().manual_seed(5)
    kp = hand_pose()[None].repeat(4, 1, 1) + 0.3 * torch.randn(4, 13, 2, generator=g, dtype=torch.float64)
    visible = torch.rand(4, 13, generator=g) > 0.3
    visible[:, [L_HIP, R_SHOULDER]] = True
    with_nan = torch.where(visible[..., None], kp, torch.full_like(kp, float("nan")))
    feats_nan, valid_nan = model_input(with_nan)
    feats_mask, valid_mask = model_input(kp, visible)
    torch.testing.assert_close(feats_nan, feats_mask)
    assert valid_nan.all() and valid_mask.all()
    assert torch.equal(feats_nan[:, 26:] > 0, visible)
    # Hidden keypoints never influence the features, wherever they are.
    moved = torch.where(visible[..., None], kp, kp + 100.0)
    torch.testing.assert_close(model_input(moved, visible)[0], feats_mask)


def test_normalize_2d_degenerate_torso_raises():
    kp = hand_pose()
    kp[list(TORSO)] = torch.tensor([5.0, 5.0], dtype=torch.float64)
    with pytest.raises(KeypointError, match="degenerate"):
        normalize_2d(kp)
    # One visible hip and nothing else visible in the torso: no distance to scale by.
    visible = torch.ones(13, dtype=torch.bool)
    visible[[L_SHOULDER, R_SHOULDER, L_HIP]] = False
    with pytest.raises(KeypointError):
        normalize_2d(hand_pose(), visible)


# ----------------------------------------------------------------------------------------------- 3D


def test_normalize_3d_hand_case():
    joints = torch.zeros(17, 3, dtype=torch.float64)
    joints[:] = torch.tensor([1.0, 1.0, 1.0])
    joints[SPINE] = torch.tensor([1.0, 1.0, 4.0])   # |pelvis - spine| = 3
    joints[THORAX] = torch.tensor([1.0, 5.0, 4.0])  # |spine - thorax| = 4
    joints[10] = torch.tensor([8.0, 1.0, 1.0])
    out = normalize_3d(joints)
    torch.testing.assert_close(out[PELVIS], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out[10], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[SPINE], torch.tensor([0.0, 0.0, 3.0 / 7.0], dtype=torch.float64))
    torch.testing.assert_close(out[THORAX], torch.tensor([0.0, 4.0 / 7.0, 3.0 / 7.0], dtype=torch.float64))


def test_normalize_3d_random_batch_properties():
    g = torch.Generator().manual_seed(3)
    joints = torch.randn(2, 5, 17, 3, generator=g, dtype=torch.float64) * 0.4 + 3.0
    out = normalize_3d(joints)
    assert out.shape == joints.shape
    torch.testing.assert_close(out[..., PELVIS, :], torch.zeros(2, 5, 3, dtype=torch.float64))
    torso = (torch.linalg.vector_norm(out[..., PELVIS, :] - out[..., SPINE, :], dim=-1)
             + torch.linalg.vector_norm(out[..., SPINE, :] - out[..., THORAX, :], dim=-1))
    torch.testing.assert_close(torso, torch.ones(2, 5, dtype=torch.float64))
    # Invariant to translation and positive scale.
    torch.testing.assert_close(normalize_3d(joints * 7.5 - 2.0), out)


def test_body_frame_hand_case():
    """Hips on the y axis (left at +y), thorax up z: the body frame turns the hip line onto +x."""
    from vipe_ray.prvipe.keypoints import L_HIP, R_HIP  # H36M17's; this file's own L_HIP, R_HIP are COCO13's

    joints = torch.zeros(17, 3, dtype=torch.float64)
    joints[R_HIP] = torch.tensor([0.0, -1.0, 0.0])
    joints[L_HIP] = torch.tensor([0.0, 1.0, 0.0])
    joints[THORAX] = torch.tensor([0.0, 0.0, 2.0])
    joints[10] = torch.tensor([3.0, 0.0, 1.0])  # off the hip line, where y = z x x points
    out = body_frame(joints)
    torch.testing.assert_close(out[R_HIP], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[L_HIP], torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[THORAX], torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out[10], torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64))


def test_body_frame_is_the_same_for_every_view_and_keeps_the_pose():
    g = torch.Generator().manual_seed(4)
    joints = normalize_3d(torch.randn(6, 17, 3, generator=g, dtype=torch.float64))
    out = body_frame(joints)
    # Any proper rotation of the input (another camera's frame) gives the same body-frame pose.
    q, _ = torch.linalg.qr(torch.randn(6, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.linalg.det(q)[:, None, None]  # det +1
    torch.testing.assert_close(body_frame(joints @ q.transpose(1, 2)), out)
    # A rotation: every distance to the pelvis is kept, and a mirror image is not undone.
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=-1), torch.linalg.vector_norm(joints, dim=-1))
    mirrored = joints * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert not torch.allclose(body_frame(mirrored), out)


def test_normalize_3d_degenerate_raises():
    joints = torch.ones(17, 3)
    with pytest.raises(KeypointError, match="degenerate"):
        normalize_3d(joints)


# ----------------------------------------------------------------------------------------------- check_shape


def test_check_shape_accepts_good_input():
    check_shape(torch.zeros(17, 3), 17, 3, "joints")
    check_shape(torch.zeros(2, 4, 13, 2), 13, 2, "keypoints")


@pytest.mark.parametrize("shape", [(16, 3), (2, 18, 3), (17, 2), (2, 17, 4), (17,)])
def test_check_shape_wrong_shape_message(shape):
    with pytest.raises(KeypointError) as info:
        check_shape(torch.zeros(shape), 17, 3, "my_joints")
    msg = str(info.value)
    assert "my_joints" in msg
    assert "17, 3" in msg
    assert str(list(shape)) in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_shape_non_finite_message(bad):
    x = torch.zeros(2, 17, 3)
    x[1, 5, 2] = bad
    with pytest.raises(KeypointError) as info:
        check_shape(x, 17, 3, "poses")
    msg = str(info.value)
    assert "poses" in msg and "non-finite" in msg
    assert str(bad) in msg
    assert "[1, 5, 2]" in msg


def test_keypoint_error_is_a_value_error():
    assert issubclass(KeypointError, ValueError)
