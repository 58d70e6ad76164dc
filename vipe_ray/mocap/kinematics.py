"""Forward kinematics for ASF/AMC data, vectorised over frames (numpy, float64).

Per bone: L = Rz(rz)·Ry(ry)·Rx(rx) from its AMC angles (missing DOFs = 0); the global
rotation is R_bone = R_parent · C · L · C⁻¹ where C is the bone's ASF ``axis`` rotation;
bone end = bone start + length · metres_per_unit · (R_bone · direction). The root's global
rotation is C_root · L_root · C_root⁻¹ (C_root from ``orientation``, identity in CMU files) with
L_root composed in the root ``axis`` order; the root sits at the AMC translation (+ ASF
``position``). Results are in metres in CMU's own axes (y up).
"""

from __future__ import annotations

import numpy as np

from .amc import Motion
from .asf import Skeleton

#: Human3.6M-17 joint names in VideoPose3D order.
H36M17_JOINTS: tuple[str, ...] = (
    "pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle",
    "spine", "thorax", "neck", "head",
    "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist",
)

#: ASF bone whose END gives each H3.6M-17 joint ("root": the root translation).
ASF_H36M17_BONES: tuple[str, ...] = (
    "root", "rhipjoint", "rfemur", "rtibia", "lhipjoint", "lfemur", "ltibia",
    "upperback", "lowerneck", "upperneck", "head",
    "lclavicle", "lhumerus", "lradius", "rclavicle", "rhumerus", "rradius",
)

def axis_rotation(axis: str, angle_rad: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) about a coordinate axis ("X", "Y" or "Z")."""
    a = np.asarray(angle_rad, dtype=np.float64)
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    ax = axis.upper()
    if ax == "X":
        rows = ((o, z, z), (z, c, -s), (z, s, c))
    elif ax == "Y":
        rows = ((c, z, s), (z, o, z), (-s, z, c))
    elif ax == "Z":
        rows = ((c, -s, z), (s, c, z), (z, z, o))
    else:
        raise ValueError(f"axis must be X, Y or Z, got {axis!r}")
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def euler_matrix(order: str, angles_rad: dict[str, np.ndarray]) -> np.ndarray:
    """Rotation for Euler angles applied in ``order`` (e.g. "XYZ" -> Rz·Ry·Rx).

    ``angles_rad`` maps "X"/"Y"/"Z" to arrays of equal shape.
    """
    r = None
    for ax in order.upper():  # first axis is applied first, i.e. rightmost
        m = axis_rotation(ax, angles_rad[ax])
        r = m if r is None else m @ r
    return r


def _to_rad(values, unit):
    return np.deg2rad(values) if unit == "deg" else np.asarray(values, dtype=np.float64)


def forward_kinematics(skeleton: Skeleton, motion: Motion) -> dict[str, np.ndarray]:
    """Global bone END positions, ``{bone: (F, 3)}`` in metres (CMU axes, y up).

    ``"root"`` holds the root position (AMC translation).
    """
    F = motion.n_frames
    scale = skeleton.metres_per_unit
    zero = np.zeros(F)

    # root
    rv = motion.root  # TX TY TZ RX RY RZ
    rot = _to_rad(rv[:, 3:], motion.angle_unit)
    L_root = euler_matrix(skeleton.root_axis, {"X": rot[:, 0], "Y": rot[:, 1], "Z": rot[:, 2]})
    c_ang = _to_rad(np.array(skeleton.root_orientation), skeleton.angle_unit)
    C_root = euler_matrix(skeleton.root_axis, {"X": c_ang[0], "Y": c_ang[1], "Z": c_ang[2]})
    R = {"root": C_root @ L_root @ C_root.T}
    pos = {"root": (rv[:, :3] + np.asarray(skeleton.root_position)) * scale}

    for name in skeleton.topological_order():
        bone = skeleton.bones[name]
        parent = skeleton.parent[name]
        c = _to_rad(np.array(bone.axis), skeleton.angle_unit)
        C = euler_matrix(bone.axis_order, {"X": c[0], "Y": c[1], "Z": c[2]})
        if bone.dofs:
            vals = _to_rad(motion.angles[name], motion.angle_unit)
            ang = {"X": zero, "Y": zero, "Z": zero}
            for k, d in enumerate(bone.dofs):
                ang[d[1].upper()] = vals[:, k]
            L = euler_matrix("XYZ", ang)  # Rz·Ry·Rx
            Rb = R[parent] @ (C @ L @ C.T)
        else:
            Rb = R[parent] @ np.broadcast_to(C @ C.T, (F, 3, 3))
        R[name] = Rb
        offset = Rb @ (np.asarray(bone.direction) * (bone.length * scale))
        pos[name] = pos[parent] + offset
    return pos


def rest_bone_ends(skeleton: Skeleton) -> dict[str, np.ndarray]:
    """Rest-pose END of every ASF bone, ``{bone: (3,)}`` in ASF length units and CMU axes (root at 0)."""
    ends = {"root": np.zeros(3)}
    for name in skeleton.topological_order():
        bone = skeleton.bones[name]
        ends[name] = ends[skeleton.parent[name]] + np.asarray(bone.direction) * bone.length
    return ends


def h36m17_from_asf(positions: dict[str, np.ndarray]) -> np.ndarray:
    """(F, 17, 3) Human3.6M-17 joints (VideoPose3D order) from :func:`forward_kinematics`."""
    return np.stack([positions[b] for b in ASF_H36M17_BONES], axis=1)


def cmu_to_zup(points: np.ndarray) -> np.ndarray:
    """Map (..., 3) CMU y-up coordinates to the z-up world: X = x, Y = -z, Z = y."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1)


def asf_amc_h36m17(skeleton: Skeleton, motion: Motion) -> np.ndarray:
    """(F, 17, 3) float64 H3.6M-17 joints in metres, z-up world axes."""
    return cmu_to_zup(h36m17_from_asf(forward_kinematics(skeleton, motion)))
