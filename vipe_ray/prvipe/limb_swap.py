"""Limb swapping: new training poses from the limbs of others.

Unseen subjects perform poses that no training pose matches within kappa; a model must place them by their
parts. Each limb (an arm: shoulder, elbow, wrist; a leg: hip, knee, ankle) of a training pose is, with a given
probability, replaced by the same limb of another pose of the batch: the donor's bone *directions*, taken in
the donor's body frame (:func:`vipe_ray.prvipe.keypoints.body_rotation`: of the hips for a leg, of the shoulders for
an arm) and carried into the recipient's, hung from the recipient's own shoulder or hip with the recipient's
own bone *lengths*. The torso, head and the other limbs stay. The result is a whole 3D pose, so every label
read from it (NP-MPJPE matching, the lifter's target) stays exact.
"""

from __future__ import annotations

import torch

from vipe_ray.prvipe.keypoints import L_HIP, L_SHOULDER, NUM_JOINTS_3D, R_HIP, R_SHOULDER, body_rotation

#: (root, middle, end) H36M17 joints of each limb (right leg, left leg, left arm, right arm); the root stays,
#: the other two move.
LIMB_CHAINS: tuple[tuple[int, int, int], ...] = ((1, 2, 3), (4, 5, 6), (11, 12, 13), (14, 15, 16))
#: The (left, right) joints whose frame carries each limb: the hips for the legs, the shoulders for the arms,
#: so that an arm keeps its place against the chest when the donor's chest is turned against its hips.
LIMB_FRAMES: tuple[tuple[int, int], ...] = ((L_HIP, R_HIP), (L_HIP, R_HIP), (L_SHOULDER, R_SHOULDER),
                                            (L_SHOULDER, R_SHOULDER))


def swap_limbs(joints: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each limb of each pose, with probability ``prob``, by that limb of another pose of the batch.

    Args:
        joints: ``[batch, frames, 17, 3]`` world joints (any unit); a temporal window takes its donor's limb
            frame by frame from the donor's window. Donors come from this batch (a DDP worker's own).
        prob: per pose and limb; 0 returns ``joints`` itself and draws nothing from ``generator``.
    Returns:
        ``[batch, frames, 17, 3]``, new poses (the input is not modified).
    """
    if joints.ndim != 4 or joints.shape[-2:] != (NUM_JOINTS_3D, 3):
        raise ValueError(f"swap_limbs: expected [batch, frames, {NUM_JOINTS_3D}, 3] joints, got {list(joints.shape)}")
    if prob <= 0.0:
        return joints
    batch = joints.shape[0]
    if batch < 2:
        return joints
    limbs = len(LIMB_CHAINS)
    swap = torch.rand((batch, limbs), generator=generator) < prob
    # A donor per (pose, limb), never the pose itself.
    donors = (torch.arange(batch)[:, None] + torch.randint(1, batch, (batch, limbs), generator=generator)) % batch
    swap, donors = swap.to(joints.device), donors.to(joints.device)
    rotations = {frame: body_rotation(joints, *frame) for frame in set(LIMB_FRAMES)}  # [batch, frames, 3, 3]
    out = joints.clone()
    for limb, ((root, middle, end), frame) in enumerate(zip(LIMB_CHAINS, LIMB_FRAMES)):
        chosen = swap[:, limb]
        if not chosen.any():
            continue
        rotation = rotations[frame]
        take = torch.nonzero(chosen).squeeze(1)
        own = joints[take]
        donor = joints[donors[take, limb]]
        # Donor bone directions in its body frame, then in the recipient's input frame (R^T of the recipient).
        to_own = rotation[take].transpose(-1, -2) @ rotation[donors[take, limb]]  # [n, frames, 3, 3]
        position = own[..., root, :]
        for parent, child in ((root, middle), (middle, end)):
            direction = torch.nn.functional.normalize(donor[..., child, :] - donor[..., parent, :], dim=-1)
            length = torch.linalg.vector_norm(own[..., child, :] - own[..., parent, :], dim=-1, keepdim=True)
            position = position + length * (to_own @ direction[..., None])[..., 0]
            out[take, :, child] = position
    return out
