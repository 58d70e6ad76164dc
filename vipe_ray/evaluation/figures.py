"""Drawing normalized 2D poses: one skeleton per matplotlib axis (retrieval figures of runs and searches)."""

from __future__ import annotations

import numpy as np

#: Bones of the COCO13 input keypoints (index pairs), for drawing.
COCO13_BONES = ((1, 3), (3, 5), (2, 4), (4, 6), (1, 2), (7, 8), (1, 7), (2, 8), (7, 9), (9, 11), (8, 10), (10, 12),
                (0, 1), (0, 2))


def draw_pose(ax, keypoints, title: str, colour: str = "black", visible=None) -> None:
    """Draw one normalized COCO13 pose ``[13, 2]`` (y down, as in images) on ``ax``: bones between visible
    keypoints in ``colour``, left-side keypoints as blue dots, hidden keypoints left out."""
    kp = np.asarray(keypoints, dtype=float)
    shown = np.ones(len(kp), dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    for a, b in COCO13_BONES:
        if shown[a] and shown[b]:
            ax.plot(kp[[a, b], 0], kp[[a, b], 1], color=colour, lw=1.5)
    left = np.arange(1, len(kp), 2)
    left = left[shown[left]]
    ax.scatter(kp[left, 0], kp[left, 1], s=6, color="tab:blue")
    ax.set_title(title, fontsize=8, color=colour)
    ax.set_xlim(-1, 1)
    ax.set_ylim(1.2, -1.2)
    ax.set_aspect("equal")
    ax.axis("off")
