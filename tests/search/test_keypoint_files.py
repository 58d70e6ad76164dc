"""Keypoint files (vipe_ray.search.keypoint_files): real COCO annotations, detector scores, NumPy arrays, and
bad files that fail naming the file, the annotation and the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vipe_ray.prvipe.keypoints import COCO17_TO_COCO13
from vipe_ray.search.keypoint_files import KeypointFileError, read_keypoints

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "person_keypoints_sample.json"


def _doc() -> dict:
    return json.loads(SAMPLE.read_text())


def _write(tmp_path: Path, doc, name: str = "q.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_real_coco_annotations_become_coco13_pixels_with_hidden_keypoints_as_nan():
    doc = _doc()
    poses = read_keypoints(SAMPLE)
    assert len(poses) == len(doc["annotations"]) == 7
    for pose, meta, ann in zip(poses.keypoints, poses.meta, doc["annotations"]):
        triples = np.array(ann["keypoints"], dtype=float).reshape(17, 3)[list(COCO17_TO_COCO13)]
        labelled = triples[:, 2] > 0
        assert np.array_equal(~np.isnan(pose).any(-1), labelled)
        assert np.array_equal(pose[labelled], triples[labelled, :2])
        assert meta["annotation_id"] == ann["id"] and meta["image_id"] == ann["image_id"]
        assert meta["file_name"] == next(i["file_name"] for i in doc["images"] if i["id"] == ann["image_id"])
    # A keypoint flagged occluded (v = 1) keeps its labelled position.
    ann = next(a for a in doc["annotations"] if 1 in a["keypoints"][2::3])
    j = ann["keypoints"][2::3].index(1)
    row = doc["annotations"].index(ann)
    assert j in COCO17_TO_COCO13
    assert poses.keypoints[row, COCO17_TO_COCO13.index(j)].tolist() == ann["keypoints"][3 * j:3 * j + 2]
    # An annotation without keypoints is kept (results line up with the file), all hidden.
    empty = next(i for i, a in enumerate(doc["annotations"]) if a["num_keypoints"] == 0)
    assert np.isnan(poses.keypoints[empty]).all()


def test_min_score_hides_low_confidence_detector_keypoints(tmp_path):
    # COCO's results format (a detector's output): a bare list, the third value a confidence.
    keypoints = []
    for j in range(17):
        keypoints += [100.0 + j, 200.0 + 2 * j, 0.05 if j in (9, 10) else 0.9]
    path = _write(tmp_path, [{"image_id": 7, "category_id": 1, "keypoints": keypoints, "score": 0.8}])
    kept = read_keypoints(path)
    assert not np.isnan(kept.keypoints).any() and kept.scored
    assert not read_keypoints(SAMPLE).scored  # COCO's 0/1/2 flags
    hidden = read_keypoints(path, min_score=0.3)
    wrists = [COCO17_TO_COCO13.index(9), COCO17_TO_COCO13.index(10)]
    assert np.isnan(hidden.keypoints[0, wrists]).all()
    assert np.isnan(hidden.keypoints).any(-1).sum() == 2
    assert hidden.meta[0]["score"] == 0.8 and hidden.meta[0]["annotation_id"] == 0


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("annotations"), "annotations: expected a list"),
    (lambda d: d["annotations"][1].update(keypoints=[1, 2, 2]), "annotations[1] (id 488820): keypoints: expected 51 numbers"),
    (lambda d: d["annotations"][2]["keypoints"].__setitem__(4, "x"), "annotations[2] (id 513633): keypoints[4]: expected a finite number, got 'x'"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(5, -1), "annotations[0] (id 1710500): keypoints[5]: visibility/score -1.0 is negative"),
    (lambda d: d["annotations"].__setitem__(3, [1, 2]), "annotations[3]: expected a mapping"),
    (lambda d: d["images"].__setitem__(0, {"file_name": "x.jpg"}), "images[0]: expected a mapping with an id"),
])
def test_bad_coco_files_name_the_file_annotation_and_field(tmp_path, edit, expected):
    doc = _doc()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(KeypointFileError) as info:
        read_keypoints(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_unreadable_and_unknown_files_fail_clearly(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [')
    with pytest.raises(KeypointFileError, match="broken.json: not a readable JSON file"):
        read_keypoints(broken)
    with pytest.raises(KeypointFileError, match="no such file"):
        read_keypoints(tmp_path / "missing.json")
    (tmp_path / "poses.csv").write_text("1,2\n")
    with pytest.raises(KeypointFileError, match="unknown keypoint file type '.csv'"):
        read_keypoints(tmp_path / "poses.csv")


def test_numpy_arrays_with_scores_nan_or_a_visibility_mask(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, size=(3, 17, 2))
    score = np.full((3, 17, 1), 0.9)
    score[1, 0] = 0.0
    np.save(tmp_path / "scored.npy", np.concatenate([xy, score], -1))
    scored = read_keypoints(tmp_path / "scored.npy")
    assert scored.keypoints.shape == (3, 13, 2) and np.isnan(scored.keypoints[1, 0]).all()
    assert np.array_equal(scored.keypoints[0], xy[0, list(COCO17_TO_COCO13)])
    visible = np.ones((3, 13), dtype=bool)
    visible[2, 5] = False
    np.savez(tmp_path / "masked.npz", keypoints=xy[:, list(COCO17_TO_COCO13)], visible=visible)
    masked = read_keypoints(tmp_path / "masked.npz")
    assert np.isnan(masked.keypoints[2, 5]).all() and np.isnan(masked.keypoints).any(-1).sum() == 1
    np.save(tmp_path / "wrong.npy", np.zeros((3, 15, 2)))
    with pytest.raises(KeypointFileError, match="15 keypoints per pose; expected 17"):
        read_keypoints(tmp_path / "wrong.npy")
    np.savez(tmp_path / "nokeys.npz", points=xy)
    with pytest.raises(KeypointFileError, match="keypoints: missing"):
        read_keypoints(tmp_path / "nokeys.npz")


def test_ids_must_be_numbers_or_names_and_arrays_numbers(tmp_path):
    doc = _doc()
    doc["images"][0]["id"] = [1]
    path = _write(tmp_path, doc)
    with pytest.raises(KeypointFileError, match=r"images\[0\]: id: expected an integer or a string, got \[1\]"):
        read_keypoints(path)
    doc = _doc()
    doc["annotations"][2]["image_id"] = {"id": 3}
    with pytest.raises(KeypointFileError, match=r"annotations\[2\] \(id 513633\): image_id: expected an integer"):
        read_keypoints(_write(tmp_path, doc))
    np.save(tmp_path / "text.npy", np.array([[["a"] * 3] * 17]))
    with pytest.raises(KeypointFileError, match="text.npy: expected numbers"):
        read_keypoints(tmp_path / "text.npy")
    scored = np.ones((2, 17, 3))
    scored[1, 4, 2] = -0.5
    np.save(tmp_path / "negative.npy", scored)
    with pytest.raises(KeypointFileError, match="negative.npy: pose 1 keypoint 4: visibility/score -0.5 is negative"):
        read_keypoints(tmp_path / "negative.npy")
