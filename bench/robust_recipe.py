"""Choose the robust default recipe on validation data: camera distribution, keypoint dropout, triplets.

    python bench/robust_recipe.py [--steps 1500] [--width 512] [--out runs/recipe] [--queries 500] [--only ...]
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe3 \
        --only default symmetric symmetric+dim64          # round 2 (lifter-sharing candidates after their donor)
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe4 \
        --only default neighbours10 neighbours20         # round 3 (and the other candidates after "default")
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe4 \
        --only hard_from0.5 hard_from0.75 point batch512 batch512_half_steps rank_all_samples  # round 4
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe4 \
        --only ranking0.1 ranking1 ranking3 ranking1_4candidates      # round 5 (graded ranking loss)
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 \
        --only default rank_anchor4 rank_both4_t0.025 rank_both4_t0.1 rank_both8   # round 6
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 \
        --only rank_both4+neighbours10 rank_both4+neighbours20                     # round 7
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 \
        --only kernel_lr10 rank_tail dim128 backbone_dropout0.1 backbone_dropout0   # round 8
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 \
        --only backbone_dropout0 lift_camera1 lift_camera5 lift_body5              # round 9 (the default's lifter)
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 --only blocks3 ranking5  # round 10
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 --only rank_means     # round 11
    python bench/robust_recipe.py --width 1024 --steps 5000 --out runs/recipe6 \
        --only limb_swap0.25 limb_swap0.5                                          # round 12 (own lifters)

Trains each candidate (Pr-VIPE and the lifting baseline, same data, views, dropout and steps) on the
training subjects and evaluates on the *validation* subjects only (every ``eval.val_every`` source frames),
rendered by the ``wide-val`` rig -- random cameras from the wide distribution with their own seed, never the
evaluation rigs (``h36m``, ``novel``, ``wide``) nor the test subjects. Candidates that change Pr-VIPE alone
reuse the lifter of the candidate named in :data:`SHARED_LIFTER` (checked to be the same training). Prints
Hit@1 clean and under occlusion (single limbs, clean index) per candidate and method, and writes the results
as JSON beside the runs. Candidates are changes to the shipped default config as it is now: the rows of rounds
1-4 in reports/recipe/history-11-subjects.md were measured on the defaults of their time (round 5 added the graded ranking loss; add
``loss: {ranking_weight: 0}`` to re-run an earlier candidate as it ran; round 6 made it rank from both views;
rounds 1-8 ran with the reference's backbone dropout, which round 8 removed: add ``model: {dropout: 0.3}``;
rounds 1-11 ran without limb swapping, which round 12 added: add ``limb_swap: {prob: 0}``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from vipe_ray.config import load_config, merge
from vipe_ray.data import load_table
from vipe_ray.evaluation.protocols import evaluate_rigs
from vipe_ray.evaluation.tables import LIMBS
from vipe_ray.training.checkpoint import load_checkpoint
from vipe_ray.training.loop import train
from vipe_ray.training.step import lifter_limb_swap

PAPER = {"elevation": [-30, 30], "roll": [-30, 30], "distance": [2.5, 6.0]}
BROAD = {"elevation": [-45, 85], "roll": [-60, 60], "distance": [1.5, 10.0], "focal": [400, 3000]}
DROPOUT = {"mode": "both", "instance_prob": 0.5, "keypoint_prob": 0.1}
CANDIDATES = {
    "paper_cameras+dropout": {"cameras": PAPER, "keypoint_dropout": DROPOUT},
    "broad_cameras+dropout": {"cameras": BROAD, "keypoint_dropout": DROPOUT},
    "broad_cameras": {"cameras": BROAD, "keypoint_dropout": {"mode": "off"}},
    "broad+dropout_ramp": {"cameras": BROAD, "keypoint_dropout": {**DROPOUT, "ramp": 0.5}},
    "broad+dropout_anchor": {"cameras": BROAD, "keypoint_dropout": {**DROPOUT, "views": "anchor"}},
    "broad+dropout_anchor_ramp": {"cameras": BROAD, "keypoint_dropout": {**DROPOUT, "views": "anchor", "ramp": 0.5}},
    # Round 2, from the shipped default (the round-1 winner): Pr-VIPE's own settings and the dropout share.
    "default": {},
    "symmetric": {"mining": {"symmetric": True}},
    "symmetric+dim32": {"mining": {"symmetric": True}, "model": {"embedding_dim": 32}},
    "symmetric+dim64": {"mining": {"symmetric": True}, "model": {"embedding_dim": 64}},
    "symmetric+structured": {"mining": {"symmetric": True}, "keypoint_dropout": {"mode": "structured"}},
    "symmetric+share0.3": {"mining": {"symmetric": True}, "keypoint_dropout": {"instance_prob": 0.3}},
    "symmetric+dim64+neg4": {"mining": {"symmetric": True, "negatives": 4}, "model": {"embedding_dim": 64}},
    "symmetric+dim64+margin_ln4": {"mining": {"symmetric": True}, "model": {"embedding_dim": 64},
                                   "loss": {"margin": 1.3862943611198906}},
    "symmetric+dim64+share0.3": {"mining": {"symmetric": True}, "model": {"embedding_dim": 64},
                                 "keypoint_dropout": {"instance_prob": 0.3}},
    # Round 3, from the round-2 default ("default" is whatever default.yaml holds; the third table of reports/recipe/history-11-subjects.md):
    # batches of neighbour pairs,
    "neighbours10": {"mining": {"neighbours": 10}},
    "neighbours20": {"mining": {"neighbours": 20}},
    # Pr-VIPE's own loss settings (training kappa, positive weight) and size,
    "kappa0.07": {"mining": {"kappa": 0.07}},
    "positive0.05": {"loss": {"positive_weight": 0.05}},
    "dim128": {"model": {"embedding_dim": 128}},
    # the Gaussian prior's weight, hard mining, and the learning rate (for both methods),
    "kl0.0001": {"loss": {"kl_weight": 0.0001}},
    "hard": {"mining": {"mode": "hard"}},
    "lr0.002": {"optim": {"lr": 0.002}},
    "kl0.003": {"loss": {"kl_weight": 0.003}},
    "kl0.01": {"loss": {"kl_weight": 0.01}},
    # a smaller triplet margin (ln 4 lost 2.6 points against ln 2 in round 2).
    "margin_ln1.5": {"loss": {"margin": 0.4054651081081644}},
    "margin_ln1.25": {"loss": {"margin": 0.22314355131420976}},
    # Round 4: semi-hard mining, then the hardest negative for the rest of the run (hard from the first step
    # collapsed in round 3).
    "hard_from0.5": {"mining": {"hard_from": 0.5}},
    "hard_from0.75": {"mining": {"hard_from": 0.75}},
    # and a point embedding (the reference's deterministic ablation), a batch of twice the poses.
    "point": {"model": {"probabilistic": False}},
    "batch512": {"optim": {"batch_size": 512}},
    "batch512_half_steps": {"optim": {"batch_size": 512, "steps": 2500}},  # batch512 in the default's time
    "rank_all_samples": {"mining": {"samples": 0}},
    # Round 5: the graded ranking loss (an anchor's positive and kernel-nearest poses ranked by 3D NP-MPJPE),
    # from the round-4 default, which had none; spelled out in full since the default now has it.
    "no_ranking": {"loss": {"ranking_weight": 0.0}},
    "ranking0.1": {"loss": {"ranking_weight": 0.1, "ranking_candidates": 8, "ranking_views": "both"}},
    "ranking1": {"loss": {"ranking_weight": 1.0, "ranking_candidates": 8, "ranking_views": "both"}},
    "ranking3": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 8, "ranking_views": "both"}},
    "ranking1_4candidates": {"loss": {"ranking_weight": 1.0, "ranking_candidates": 4, "ranking_views": "both"}},
    # Round 6, after the step got 1.2x faster: the round-5 default (ranking from the anchor views only) against
    # ranking from both views (today's default), its temperature and candidates; spelled out in full.
    "rank_anchor4": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "anchor"}},
    "rank_both4": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "both"}},
    "rank_both4_t0.025": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "both",
                                   "ranking_temperature": 0.025}},
    "rank_both4_t0.1": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "both",
                                 "ranking_temperature": 0.1}},
    "rank_both8": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 8, "ranking_views": "both"}},
    # Round 7: batches of neighbour pairs give the ranking loss near misses (frames a few apart, around kappa)
    # to order, where random batches give it only coarse candidates.
    "rank_both4+neighbours10": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "both"},
                                "mining": {"neighbours": 10}},
    "rank_both4+neighbours20": {"loss": {"ranking_weight": 3.0, "ranking_candidates": 4, "ranking_views": "both"},
                                "mining": {"neighbours": 20}},
    # Round 8, what holds clean Hit@1 back: b rises at Adam's top pace to the end of the run (the kernel's a and
    # b learn faster), and as it rises the sigmoid's ceiling flattens the ranking of the nearest poses (the
    # ranking on the sigmoid's tail).
    "kernel_lr10": {"optim": {"kernel_lr_scale": 10.0}},
    "rank_tail": {"loss": {"ranking_scores": "tail"}},
    # the backbone's dropout (for both methods: the lifter shares the backbone) and, with the ranking loss asking
    # for finer distances, more dimensions ("dim128" above).
    "backbone_dropout0.1": {"model": {"dropout": 0.1}},
    "backbone_dropout0": {"model": {"dropout": 0.0}},
    # Round 9, the lifter's direct 3D signal for Pr-VIPE: an auxiliary 3D head on its backbone (the embedding
    # alone still retrieves), regressing the lifter's camera-frame target or the view-invariant body frame.
    "lift_camera1": {"loss": {"lift_weight": 1.0}},
    "lift_camera5": {"loss": {"lift_weight": 5.0}},
    "lift_body5": {"loss": {"lift_weight": 5.0, "lift_frame": "body"}},
    # Round 10: Pr-VIPE's view invariance is learned, the lifter's comes from the Procrustes fit at retrieval:
    # does a deeper backbone (for both) help Pr-VIPE more, and does a heavier ranking loss order the top better?
    "blocks3": {"model": {"blocks": 3}},
    "ranking5": {"loss": {"ranking_weight": 5.0}},
    # Round 11: the ranking on the embedding means, free of the samples' noise.
    "rank_means": {"loss": {"ranking_on": "means"}},
    # Round 12: new poses from the limbs of others (both methods train on them: each gets its own lifter).
    "limb_swap0.25": {"limb_swap": {"prob": 0.25, "lifter": True}},
    "limb_swap0.5": {"limb_swap": {"prob": 0.5, "lifter": True}},
    # ... and Pr-VIPE alone on them, the lifter on the original poses (the default's lifter).
    "limb_swap0.25_prvipe": {"limb_swap": {"prob": 0.25, "lifter": False}},
}
#: Candidates that change only Pr-VIPE (mining, embedding) share the lifter of the candidate named here:
#: the lifter's training reads none of those keys, so it would be the same model.
SHARED_LIFTER = {"symmetric": "default", "symmetric+dim32": "default", "symmetric+dim64": "default",
                 "symmetric+dim64+neg4": "default", "symmetric+dim64+margin_ln4": "default",
                 "symmetric+dim64+share0.3": "symmetric+share0.3", "neighbours10": "default",
                 "neighbours20": "default", "kappa0.07": "default", "positive0.05": "default", "dim128": "default",
                 "kl0.0001": "default", "hard": "default", "kl0.003": "default", "kl0.01": "default",
                 "margin_ln1.5": "default", "margin_ln1.25": "default", "hard_from0.5": "default",
                 "hard_from0.75": "default", "point": "default", "rank_all_samples": "default",
                 "no_ranking": "default", "ranking0.1": "default", "ranking1": "default",
                 "ranking3": "default", "ranking1_4candidates": "default", "rank_anchor4": "default",
                 "rank_both4": "default", "rank_both4_t0.025": "default", "rank_both4_t0.1": "default",
                 "rank_both8": "default", "rank_both4+neighbours10": "default", "rank_both4+neighbours20": "default",
                 "kernel_lr10": "default", "rank_tail": "default", "lift_camera1": "backbone_dropout0",
                 "lift_camera5": "backbone_dropout0", "lift_body5": "backbone_dropout0", "ranking5": "backbone_dropout0",
                 "rank_means": "backbone_dropout0",
                 "limb_swap0.25_prvipe": "backbone_dropout0"}


def same_lifter_training(config, theirs) -> bool:
    """Whether two configs train the same lifter: they may differ only in what Pr-VIPE alone reads."""
    own_only = {"mining": theirs.mining, "loss": theirs.loss, "lifter_baseline": theirs.lifter_baseline,
                # Limb swapping only as far as the lifter reads it.
                "limb_swap": (theirs.limb_swap if lifter_limb_swap(config) == lifter_limb_swap(theirs)
                              else config.limb_swap),
                "optim": replace(config.optim, kernel_lr_scale=theirs.optim.kernel_lr_scale),
                "model": replace(config.model, embedding_dim=theirs.model.embedding_dim, samples=theirs.model.samples,
                                 probabilistic=theirs.model.probabilistic)}
    return replace(config, **own_only) == theirs


def candidate_config(name: str, steps: int, width: int):
    """Candidate ``name``'s training config at the bench's scale."""
    scale = {"model": {"width": width}, "optim": {"steps": steps}, "log_every": 500, "checkpoint_every": steps}
    return load_config(overrides=merge(scale, CANDIDATES[name]))


def check_shared_lifter(config, lifter_run: Path) -> None:
    """Refuse a shared lifter unless it was trained exactly as this candidate's own would be."""
    if not (lifter_run / "lifter.pt").exists():
        raise SystemExit(f"{lifter_run}: no lifter.pt yet; run candidate {lifter_run.name!r} with the same "
                         "--steps/--width/--out first")
    if not same_lifter_training(config, load_checkpoint(lifter_run, kind="lifter").config):
        raise SystemExit(f"{lifter_run}/lifter.pt was trained with another lifter config than this candidate's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--out", default="runs/recipe")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="candidates to run")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    # Train every candidate first, then evaluate: a candidate sharing the lifter of one trained by another
    # process finds it ready more often.
    for name in CANDIDATES:
        if args.only and name not in args.only:
            continue
        config = candidate_config(name, args.steps, args.width)
        out = Path(args.out) / name
        lifter_run = Path(args.out) / SHARED_LIFTER.get(name, name)
        if lifter_run != out:
            config = replace(config, lifter_baseline=False)
        start = time.perf_counter()
        # A finished run resumes at its last step: nothing to train, and a run of another config (e.g. of the
        # default before it changed) is refused instead of being reported under this candidate's name.
        train(config, out, resume=True)
        runs[name] = (config, out, lifter_run, time.perf_counter() - start)
    results = {}
    for name, (config, out, lifter_run, trained) in runs.items():
        if lifter_run != out:
            check_shared_lifter(config, lifter_run)
        table = load_table(config.data.table_path()).select(list(config.data.val_subjects))
        ev = replace(config.eval, rigs=config.eval.val_rigs, every=config.eval.val_every, max_queries=args.queries,
                     occlusion_groups=tuple(g.split(":")[1] for g in LIMBS), occlusion_rates=(0.1,))
        result = evaluate_rigs(load_checkpoint(out).model, config, table,
                               lifter=load_checkpoint(lifter_run, kind="lifter").model, eval_config=ev)
        result["train_seconds"] = trained
        results[name] = result
        (out / "val_retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nvalidation subjects, rig 'wide-val', Hit@1 % ({args.steps} steps, width {args.width})")
    print(f"{'candidate':<24} {'method':<12} {'clean':>7} {'1 limb':>7} {'indep 0.1':>10}")
    for name, result in results.items():
        rig = next(iter(result["rigs"]))
        for method in result["rigs"][rig]:
            clean = 100 * result["rigs"][rig][method]["hit@1"]
            occ = result["occlusion"][rig]
            limb = 100 * sum(occ[p]["clean"][method]["hit@1"] for p in LIMBS) / len(LIMBS)
            indep = 100 * occ["independent:0.1"]["clean"][method]["hit@1"]
            print(f"{name:<24} {method:<12} {clean:>7.1f} {limb:>7.1f} {indep:>10.1f}")


if __name__ == "__main__":
    main()
