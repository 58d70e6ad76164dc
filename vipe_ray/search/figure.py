"""The search figure: each query's skeleton beside its best library poses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vipe_ray.evaluation.figures import draw_pose
from vipe_ray.search.index import PoseIndex
from vipe_ray.search.library import Embedded


def describe(row: dict) -> str:
    """A short label of a library pose: subject/clip/frame/camera, or image and annotation ids."""
    if "subject" in row:
        return f"{row['clip']} f{row['frame']} cam {row['camera']}"
    return f"image {row.get('image_id')} ann {row.get('annotation_id')}"


def search_figure(path: str | Path, queries: Embedded, hits: list[dict], index: PoseIndex, rows: np.ndarray,
                  top: int = 4, max_queries: int = 8) -> Path:
    """Draw up to ``max_queries`` embedded queries (left column) and their ``top`` results (``rows``: library
    row indices per query, -1 for none) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"): no display

    shown = [i for i in range(len(queries)) if queries.valid[i]][:max_queries]
    if not shown:
        raise ValueError("--figure: no query could be embedded (each needs two visible torso keypoints)")
    top = min(top, rows.shape[1])
    fig, axes = plt.subplots(len(shown), top + 1, figsize=(2.0 * (top + 1), 2.2 * len(shown)), squeeze=False)
    for r, q in enumerate(shown):
        label = hits[q].get("annotation_id", q)
        draw_pose(axes[r][0], queries.keypoints[q], f"query {label}", "black", queries.visible[q])
        for c in range(top):
            ax = axes[r][c + 1]
            i = rows[q, c]
            if i < 0:
                ax.axis("off")
                continue
            result = hits[q]["results"][c]
            draw_pose(ax, index.keypoints[i], f"#{c + 1} p={result['probability']:.2f}\n{describe(result)}",
                      "tab:green", index.visible[i])
    fig.suptitle("query (hidden keypoints left out) and its best library poses by match probability", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
