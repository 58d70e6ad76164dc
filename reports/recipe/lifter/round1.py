"""python reports/recipe/lifter/round1.py OUT_DIR [STEPS] [CANDIDATE,...]  (run from the repository root)

Round 1 of the lifter's recipe search: one setting at a time from Pr-VIPE's values, on validation.

Each candidate trains the lifting baseline alone (train_lifter) for STEPS steps and is scored on the
validation subjects: clean wide-val Hit@1 at eval.every (779 queries) and the four single-limb occlusion
patterns on 300 of those queries. The Pr-VIPE model beside it (runs/default) is fixed; only
the lifter's numbers matter here. Results: one JSON line per candidate in OUT_DIR/results.jsonl
(this round's: round1.jsonl beside this file).
"""
import json, sys, time
from dataclasses import replace
from pathlib import Path


from vipe_ray.config import load_config
from vipe_ray.data import load_table
from vipe_ray.evaluation.protocols import evaluate_rigs
from vipe_ray.training.checkpoint import load_checkpoint
from vipe_ray.training.loop import train_lifter

STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
OUT = Path(sys.argv[1])
#: Each candidate's ``lifter:`` section (round 1 ran before the section existed, with the same values set on
#: the shared keys of a lifter-only run).
CANDIDATES = {
    "base": {},
    "lr-0.002": {"lr": 0.002},
    "lr-0.004": {"lr": 0.004},
    "lr-0.0005": {"lr": 0.0005},
    "batch-512": {"batch_size": 512},
    "batch-1024": {"batch_size": 1024},
    "views-both": {"dropout_views": "both"},
    "width-2048": {"width": 2048},
    "blocks-3": {"blocks": 3},
    "dropout-0.1": {"dropout": 0.1},
    "limb-swap": {"limb_swap": 0.25},
}
only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(CANDIDATES)
prvipe = load_checkpoint("runs/default", which="latest").model  # the retrained default (vipe-ray train)
results_file = OUT / "results.jsonl"
OUT.mkdir(parents=True, exist_ok=True)
done = {json.loads(l)["name"] for l in results_file.open()} if results_file.exists() else set()
for name in only:
    if name in done:
        continue
    overrides = {"lifter": {"steps": STEPS, **CANDIDATES[name]}, "checkpoint_every": STEPS}
    config = load_config("vipe_ray/configs/default.yaml", overrides)
    work = OUT / name
    t0 = time.time()
    summary = train_lifter(config, work, resume=True, progress=lambda m: print(m, flush=True))
    train_s = time.time() - t0
    lifter = load_checkpoint(work, kind="lifter", which="latest").model
    table = load_table(config.data.table_path()).select(list(config.data.val_subjects))
    t1 = time.time()
    clean = evaluate_rigs(prvipe, config, table, lifter=lifter, progress=lambda m: None,
                          eval_config=replace(config.eval, rigs=config.eval.val_rigs, occlusion=False))
    occl = evaluate_rigs(prvipe, config, table, lifter=lifter, progress=lambda m: None,
                         eval_config=replace(config.eval, rigs=config.eval.val_rigs, occlusion=True, max_queries=300,
                                             occlusion_groups=("left_arm", "right_arm", "left_leg", "right_leg"),
                                             occlusion_rates=()))
    rig = config.eval.val_rigs[0]
    limbs = occl["occlusion"][rig]
    row = {"name": name, "overrides": CANDIDATES[name], "steps": STEPS, "train_s": round(train_s, 1),
           "eval_s": round(time.time() - t1, 1), "final_mpjpe": summary.get("lifter_mpjpe"),
           "clean_queries": clean["queries"], "limb_queries": occl["queries"],
           "clean": {m: clean["rigs"][rig][m]["hit@1"] for m in clean["rigs"][rig]},
           "clean_se": {m: clean["se"][rig][m]["hit@1"] for m in clean["se"][rig]},
           "limbs": {p: {m: v["hit@1"] for m, v in modes.get("clean", modes[next(iter(modes))]).items()}
                     for p, modes in limbs.items()}}
    print(json.dumps(row), flush=True)
    with results_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
