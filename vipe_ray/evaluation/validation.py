"""Validation during training: the numbers that pick each method's best checkpoint.

Both run on the validation subjects and the validation rigs (``eval.val_rigs``, never the evaluation rigs),
with every keypoint visible: Pr-VIPE by its cross-view retrieval Hit@k, the lifting baseline by the error of
its own output, the normalized camera-frame 3D pose (retrieval through lifted poses costs a Procrustes fit
per pair of views, about 100 s a validation on the bundled subjects: too slow to run at every checkpoint).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vipe_ray.config import TrainConfig
from vipe_ray.data import PoseTable, evaluation_rows
from vipe_ray.evaluation.protocols import evaluate_rigs, resolve_rig
from vipe_ray.prvipe.cameras import Orbits
from vipe_ray.prvipe.keypoints import model_input
from vipe_ray.prvipe.views import lift_target, rendered_view

#: The validation metric that ranks each method's checkpoints, and whether higher is better.
PRVIPE_SCORE = ("val_hit@1", "max")
LIFTER_SCORE = ("val_lift_mpjpe", "min")


def validation_metrics(model: torch.nn.Module, config: TrainConfig, table: PoseTable,
                       max_queries: int = 0) -> dict[str, float]:
    """Cross-view Hit@k of Pr-VIPE on ``table`` (the validation subjects) and the validation rigs, averaged
    over the rigs: ``val_hit@k`` keys, with ``val_hit@k_se`` (standard error over the queries, the largest
    over the rigs) and ``val_queries``. Queries every ``eval.val_every`` source frames, at most
    ``max_queries`` (0: all)."""
    model.eval()
    # The clean protocol only: occlusion protocols cost ~20x more and belong to the final evaluation.
    result = evaluate_rigs(model, config, table, progress=lambda _m: None,
                           eval_config=replace(config.eval, rigs=config.eval.val_rigs, max_queries=max_queries,
                                               every=config.eval.val_every, occlusion=False))
    out: dict[str, float] = {"val_queries": float(result["queries"])}
    for k in config.eval.ks:
        values = [methods["prvipe"][f"hit@{k}"] for methods in result["rigs"].values()]
        out[f"val_hit@{k}"] = float(np.mean(values))
        out[f"val_hit@{k}_se"] = max(se["prvipe"][f"hit@{k}"] for se in result["se"].values())
        for rig, methods in result["rigs"].items():
            out[f"val_{rig}_hit@{k}"] = methods["prvipe"][f"hit@{k}"]
            out[f"val_{rig}_nn2d_hit@{k}"] = methods["nn2d"][f"hit@{k}"]
    return out


@torch.no_grad()
def lifter_validation_metrics(lifter: torch.nn.Module, config: TrainConfig, table: PoseTable,
                              batch: int = 4096) -> dict[str, float]:
    """Mean per-joint error of the lifter's 3D poses (normalized, camera frame: its training target) on
    ``table``'s frames every ``eval.val_every`` source frames, seen by every camera of the validation rigs:
    ``val_lift_mpjpe`` (in torso units) and ``val_lift_queries``."""
    lifter.eval()
    device = next(lifter.parameters()).device
    rows = evaluation_rows(table, config.eval.val_every)
    joints = torch.from_numpy(table.joints[rows]).double()
    errors = []
    for rig in config.eval.val_rigs:
        for camera in resolve_rig(rig)[1]:
            orbits = Orbits.from_cameras([camera]).expand(len(rows))
            feats, _valid = model_input(rendered_view(joints[:, None], orbits))
            target = lift_target(joints, orbits)
            for start in range(0, len(rows), batch):
                lifted = lifter(feats[start:start + batch, 0].float().to(device)).float().cpu()
                errors.append(torch.linalg.vector_norm(lifted - target[start:start + batch], dim=-1).mean(-1))
    return {"val_lift_mpjpe": torch.cat(errors).mean().item(), "val_lift_queries": float(len(rows))}
