"""2D keypoints from files: COCO person-keypoints JSON (as COCO or a detector writes it) and NumPy arrays.

Both become a :class:`KeypointSet`: COCO13 pixel keypoints ``[n, 13, 2]`` with NaN where a keypoint is hidden
(the model's input convention, :func:`vipe_ray.prvipe.keypoints.model_input`) and one metadata row per pose.

COCO JSON: ``annotations[].keypoints`` holds 17 x (x, y, v) in COCO-17 order. The third value is COCO's
visibility flag (0: not labelled, 1: labelled but occluded, 2: visible) or a detector's confidence; a
keypoint is hidden when it is 0, or below ``min_score``. Flagged-occluded keypoints (1) keep their labelled
position: the model reads where the joint is, not whether it is seen. Every annotation becomes a pose (a
crowd annotation or one without keypoints too, so that results line up with the file); one that cannot be
normalized gets no embedding downstream. ``images[]`` supplies each pose's image size and file name.

NumPy: ``.npy`` of shape ``[n, 17 or 13, 3]`` (x, y, visibility or score) or ``[n, 17 or 13, 2]`` (NaN marks a
hidden keypoint), and ``.npz`` with ``keypoints`` ``[n, J, 2]`` and optional ``visible`` ``[n, J]`` bool.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vipe_ray.prvipe.keypoints import COCO17_TO_COCO13, NUM_KEYPOINTS_2D

COCO17 = 17


class KeypointFileError(ValueError):
    """A keypoint file that cannot be read: the message names the file, the annotation and the field."""


@dataclass(frozen=True)
class KeypointSet:
    """Poses read from one file: ``keypoints`` ``[n, 13, 2]`` float64 pixels, NaN where hidden; ``meta`` one
    dict per pose (``source`` and, for COCO, ``annotation_id``, ``image_id``, ``file_name``, ``score``)."""

    keypoints: np.ndarray
    meta: list[dict] = field(default_factory=list)
    source: str = ""
    #: The file's third values look like a detector's confidences (fractions), not COCO's 0/1/2 flags.
    scored: bool = False

    def __len__(self) -> int:
        return len(self.keypoints)


def read_keypoints(path: str | Path, min_score: float = 0.0) -> KeypointSet:
    """Read a COCO JSON, ``.npy`` or ``.npz`` keypoint file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise KeypointFileError(f"{path}: no such file")
    if not 0.0 <= min_score <= 2.0:
        raise KeypointFileError(f"--min-score: {min_score} must lie in [0, 2] (a score in [0, 1], or a COCO flag)")
    if path.suffix == ".json":
        return read_coco(path, min_score)
    if path.suffix in (".npy", ".npz"):
        return read_array(path, min_score)
    raise KeypointFileError(f"{path}: unknown keypoint file type {path.suffix!r} (expected .json, .npy or .npz)")


def _identifier(value, where: str):
    """An id (of an image or an annotation): an integer or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise KeypointFileError(f"{where}: expected an integer or a string, got {value!r}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KeypointFileError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def read_coco(path: str | Path, min_score: float = 0.0) -> KeypointSet:
    """COCO person-keypoints JSON -> :class:`KeypointSet` (one pose per annotation, in file order)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeypointFileError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(doc, list):  # COCO's results format: a bare list of annotations
        doc = {"annotations": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise KeypointFileError(f"{path}: annotations: expected a list of person annotations")
    images = {}
    for i, image in enumerate(doc.get("images") or []):
        if not isinstance(image, dict) or "id" not in image:
            raise KeypointFileError(f"{path}: images[{i}]: expected a mapping with an id")
        images[_identifier(image["id"], f"{path}: images[{i}]: id")] = image
    keypoints = np.full((len(doc["annotations"]), NUM_KEYPOINTS_2D, 2), np.nan)
    meta = []
    scored = False
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            raise KeypointFileError(f"{path}: annotations[{i}]: expected a mapping, got {type(ann).__name__}")
        label = f"{path}: annotations[{i}] (id {ann.get('id', '?')})"
        for key in ("id", "image_id"):
            if key in ann:
                _identifier(ann[key], f"{label}: {key}")
        raw = ann.get("keypoints")
        if not isinstance(raw, list) or len(raw) != 3 * COCO17:
            got = f"{len(raw)} values" if isinstance(raw, list) else repr(raw)
            raise KeypointFileError(f"{label}: keypoints: expected {3 * COCO17} numbers (17 x (x, y, v)), got {got}")
        triples = np.array([_number(v, f"{label}: keypoints[{j}]") for j, v in enumerate(raw)]).reshape(COCO17, 3)
        if (triples[:, 2] < 0).any():
            j = int(np.flatnonzero(triples[:, 2] < 0)[0])
            raise KeypointFileError(f"{label}: keypoints[{3 * j + 2}]: visibility/score {triples[j, 2]} is negative")
        scored = scored or bool((triples[:, 2] != np.round(triples[:, 2])).any())
        shown = (triples[:, 2] > 0) & (triples[:, 2] >= min_score)
        xy = np.where(shown[:, None], triples[:, :2], np.nan)
        keypoints[i] = xy[list(COCO17_TO_COCO13)]
        image = images.get(ann.get("image_id"), {})
        row = {"source": str(path), "annotation_id": ann.get("id", i), "image_id": ann.get("image_id")}
        if "file_name" in image:
            row["file_name"] = image["file_name"]
        if "score" in ann:
            row["score"] = _number(ann["score"], f"{label}: score")
        meta.append(row)
    return KeypointSet(keypoints, meta, str(path), scored)


def _floats(values, where: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise KeypointFileError(f"{where}: expected numbers ({exc})") from None


def read_array(path: str | Path, min_score: float = 0.0) -> KeypointSet:
    """``.npy`` / ``.npz`` keypoints -> :class:`KeypointSet` (``annotation_id`` = row number)."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise KeypointFileError(f"{path}: not a readable NumPy file ({exc})") from None
    if path.suffix == ".npz":
        if "keypoints" not in loaded:
            raise KeypointFileError(f"{path}: keypoints: missing (the archive has {sorted(loaded.files)})")
        array = _floats(loaded["keypoints"], f"{path}: keypoints")
        visible = np.asarray(loaded["visible"]) if "visible" in loaded else None
        if array.ndim != 3 or array.shape[-1] != 2:
            raise KeypointFileError(f"{path}: keypoints: expected shape [n, 17 or 13, 2], got {list(array.shape)}")
        if visible is not None:
            if visible.shape != array.shape[:2]:
                raise KeypointFileError(f"{path}: visible: expected shape {list(array.shape[:2])}, "
                                        f"got {list(visible.shape)}")
            array = np.where(visible.astype(bool)[..., None], array, np.nan)
    else:
        array = _floats(loaded, str(path))
        if array.ndim != 3 or array.shape[-1] not in (2, 3):
            raise KeypointFileError(f"{path}: expected shape [n, 17 or 13, 2 or 3], got {list(array.shape)}")
        if array.shape[-1] == 3:
            score = array[..., 2]
            if (score < 0).any():
                n, j = (int(v) for v in np.argwhere(score < 0)[0])
                raise KeypointFileError(f"{path}: pose {n} keypoint {j}: visibility/score {score[n, j]} is negative")
            shown = (score > 0) & (score >= min_score)
            array = np.where(shown[..., None], array[..., :2], np.nan)
    if array.shape[1] not in (COCO17, NUM_KEYPOINTS_2D):
        raise KeypointFileError(f"{path}: {array.shape[1]} keypoints per pose; expected 17 (COCO-17) or 13 (COCO13)")
    if np.isinf(array).any():
        n, j = (int(v) for v in np.argwhere(np.isinf(array))[0][:2])
        raise KeypointFileError(f"{path}: pose {n} keypoint {j}: infinite coordinate")
    if array.shape[1] == COCO17:
        array = array[:, list(COCO17_TO_COCO13)]
    meta = [{"source": str(path), "annotation_id": i} for i in range(len(array))]
    return KeypointSet(array, meta, str(path))
