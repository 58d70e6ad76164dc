"""``vipe-ray`` command line: convert motion capture, train, evaluate, index and search poses.

    vipe-ray convert RAW_DIR [RAW_DIR ...] OUT.parquet [--fps 30] [--skip-invalid] [--skeleton MAP.yaml]
                     [--prefer amc|bvh] [--workers N]
    vipe-ray train [--config CONFIG.yaml] [--out DIR] [--resume] [--set key.path=value ...]
    vipe-ray evaluate --checkpoint DIR [--split validation|test] [--data TABLE.parquet] [--subjects 06 13]
                      [--rig h36m --rig my_rig.yaml] [--no-occlusion] [--json OUT.json] [--ledger LEDGER]
    vipe-ray export --checkpoint DIR --out MODEL_DIR
    vipe-ray index --checkpoint DIR (--data TABLE.parquet --rig RIG | --keypoints FILE.json) --out INDEX_DIR
    vipe-ray search --index INDEX_DIR --keypoints QUERIES.json [--top-k 5] [--json OUT.json] [--figure OUT.png]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from vipe_ray.config import ConfigError


def _overrides(pairs: list[str]) -> dict:
    """``["optim.steps=10", "model.width=64"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


# Each command imports what it runs: `vipe-ray convert` forks its worker processes before torch (and its
# thread pools) is ever loaded, and `--help` answers at once.
def cmd_convert(args: argparse.Namespace) -> int:
    from vipe_ray.mocap.convert import convert_directory
    from vipe_ray.mocap.errors import MocapFormatError
    from vipe_ray.mocap.skeleton import load_skeleton_map

    skeleton = load_skeleton_map(args.skeleton) if args.skeleton else None
    try:
        summary = convert_directory(args.raw_dir, args.out, fps=args.fps, skip_invalid=args.skip_invalid,
                                    skeleton=skeleton, prefer=args.prefer, workers=args.workers)
    except MocapFormatError as exc:
        raise MocapFormatError(exc.path, exc.line, f"{exc.detail} (nothing was written; --skip-invalid leaves "
                                                   "broken files out and converts the rest)") from None
    for item in summary["left_out"]:
        print(f"left out {item['file']}:{item['line']}: {item['reason']}")
    counts = {k: summary[k] for k in ("rows", "clips", "subjects", "seconds", "bytes")}
    print(f"wrote {args.out}: {counts}, {len(summary['left_out'])} files left out")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vipe_ray.config import load_config
    from vipe_ray.training.loop import train

    config = load_config(args.config, _overrides(args.set))
    summary = train(config, args.out, resume=args.resume, device=args.device)
    print(f"done: {args.out} {summary}")
    return 0


def evaluation_split(args: argparse.Namespace, config, own_table: bool, table_subjects: list[str]):
    """(split, subjects, rigs or None for the config's) of an evaluate command.

    ``--split validation`` (the default on the config's own table) scores the validation subjects on the
    validation rigs; ``--split test`` the test subjects on the evaluation rigs, and test subjects are scored
    only with it (the command records them in the test ledger), from the config's table or another one
    (``--data``). Without ``--split``, another table scores all of its subjects, or ``--subjects``, on the
    evaluation rigs: none of them may be a test subject.
    """
    data = config.data
    split = args.split or ("validation" if own_table else "other table")
    if split == "test":
        available = [s for s in data.test_subjects if s in table_subjects]
        subjects = list(args.subjects or available)
        outside = sorted(set(subjects) - set(data.test_subjects))
        if outside:
            raise ConfigError(f"--split test: subjects {outside} are not test subjects (data.test_subjects: "
                              f"{list(data.test_subjects)})")
    elif split == "validation":
        subjects = list(args.subjects or [s for s in data.val_subjects if s in table_subjects])
    else:
        subjects = list(args.subjects or table_subjects)
    if not subjects:
        raise ConfigError(f"no {split} subjects in the table: pass --subjects or set data.val_subjects / "
                          "data.test_subjects")
    tested = sorted(set(subjects) & set(data.test_subjects))
    if split != "test" and tested:
        raise ConfigError(f"subjects {tested} are test subjects: evaluate them with --split test, which records "
                          "the evaluation in the test ledger (reports/test_ledger.jsonl)")
    return split, subjects, (config.eval.val_rigs if split == "validation" else None)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vipe_ray.data import load_table
    from vipe_ray.evaluation.protocols import evaluate_rigs
    from vipe_ray.evaluation.tables import format_markdown, format_table, write_json
    from vipe_ray.evaluation.ledger import count_evaluations, ledger_path, record_test_evaluation
    from vipe_ray.storage import same_location
    from vipe_ray.training.checkpoint import load_checkpoint, weights_of

    # Both methods with the same kind of weights: the average where the run kept one, or the trained ones.
    averaged = False if args.trained_weights else None
    checkpoint = load_checkpoint(args.checkpoint, averaged=averaged, which=args.which)
    config = checkpoint.config
    lifter_path = Path(args.checkpoint) / "lifter.pt"
    lifter_checkpoint = load_checkpoint(args.checkpoint, kind="lifter", averaged=averaged, which=args.which) \
        if lifter_path.exists() else None
    lifter = lifter_checkpoint.model if lifter_checkpoint is not None else None
    if lifter is None:
        print(f"note: {lifter_path} not found; the 3D-lifting baseline is left out", file=sys.stderr)
    table = load_table(args.data or config.data.table_path())
    own_table = args.data is None or same_location(args.data, config.data.table_path())
    split, subjects, split_rigs = evaluation_split(args, config, own_table, table.subjects)
    leaked = sorted(set(subjects) & set(config.data.train_subjects))
    if leaked:
        print(f"warning: subjects {leaked} were trained on; this is not a held-out evaluation", file=sys.stderr)
    table = table.select(subjects)
    overrides: dict = {}
    if args.rig or split_rigs:
        overrides["rigs"] = tuple(args.rig or split_rigs)
    if args.no_occlusion:
        overrides["occlusion"] = False
    try:
        eval_config = replace(config.eval, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"--rig: {exc}") from None
    ledger = Path(args.ledger) if args.ledger else ledger_path()
    if split == "test":
        print(f"test split: {count_evaluations(config, ledger)} earlier test evaluations of this config, "
              f"{count_evaluations(None, ledger)} in all ({ledger})")
    # Each method's best-validation checkpoint where the run kept one (out/best/): their steps may differ.
    steps = f"step {checkpoint.step}" + (f", lifter step {lifter_checkpoint.step}" if lifter_checkpoint else "")
    print(f"evaluating {args.checkpoint} ({steps}) on the {split} subjects {subjects} of "
          f"{table.path}; rigs {list(eval_config.rigs)}, occlusion {'on' if eval_config.occlusion else 'off'}")
    result = evaluate_rigs(checkpoint.model, config, table, lifter=lifter, eval_config=eval_config,
                           samples=args.samples)
    result["split"] = split
    result["checkpoint"] = str(args.checkpoint)
    result["step"] = checkpoint.step
    if lifter_checkpoint is not None:
        result["lifter_step"] = lifter_checkpoint.step
    result["weights"] = weights_of(checkpoint)
    print(format_markdown(result, eval_config.ks) if args.markdown else format_table(result, eval_config.ks))
    if split == "test":
        record_test_evaluation(result, config, "vipe-ray " + " ".join(args.argv), args.checkpoint, checkpoint.step,
                               ledger)
        print(f"recorded in the test ledger {ledger}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vipe_ray.data import file_sha256
    from vipe_ray.training.checkpoint import CHECKPOINT, load_checkpoint, save_model_only, weights_of

    checkpoint = load_checkpoint(args.checkpoint)
    out = Path(args.out) / CHECKPOINT
    if out.exists():
        raise FileExistsError(f"{out}: exists; export to a new directory")
    save_model_only(checkpoint.model, checkpoint.config, checkpoint.step, checkpoint.data_checksum, out,
                    weights=weights_of(checkpoint))
    print(f"wrote {out} (step {checkpoint.step}, {out.stat().st_size / 1e6:.1f} MB, sha256 {file_sha256(out)})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from vipe_ray.search.commands import index_command

    index_command(args.checkpoint, args.out, data=args.data, subjects=args.subjects, rig=args.rig, every=args.every,
                  keypoints=args.keypoints, min_score=args.min_score, kind=args.kind)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from vipe_ray.search.commands import search_command

    search_command(args.index, args.keypoints, top_k=args.top_k, min_score=args.min_score,
                   candidates=args.candidates, json_out=args.json, figure=args.figure)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vipe-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert CMU ASF/AMC and BVH motion capture to a Parquet pose table")
    p.add_argument("raw_dir", nargs="+", help="folder(s) with subjects/<SS>/<SS>.asf + <SS>_<TT>.amc and/or *.bvh")
    p.add_argument("out", help="output .parquet path (written atomically)")
    p.add_argument("--fps", type=int, default=30, help="output frame rate; must divide 120 (default 30)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="report a broken file (file:line: what), leave it out and convert the rest")
    p.add_argument("--skeleton", metavar="MAP.yaml",
                   help="map every BVH's joints to Human3.6M-17 with this file (default: detect the cgspeed "
                        "flavour; copy one of vipe_ray/mocap/skeletons/*.yaml for another naming)")
    p.add_argument("--prefer", choices=["amc", "bvh"],
                   help="a take found both as AMC and as BVH: keep this format (default: an error)")
    p.add_argument("--workers", type=int, help="conversion processes (default: every core)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train Pr-VIPE (and the 3D-lifting baseline)")
    p.add_argument("--config", help="training YAML (default: the shipped vipe_ray/configs/default.yaml)")
    p.add_argument("--out", default="runs/default", help="run directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints found in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.steps=100 (repeatable)")
    p.add_argument("--device", help="torch device of both methods, e.g. cpu or cuda:1 (default: the first GPU "
                                    "where there is one, else the CPU)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="cross-view retrieval Hit@k vs the 2D-NN and 3D-lifting baselines")
    p.add_argument("--checkpoint", required=True, help="run directory written by `vipe-ray train`")
    p.add_argument("--data", help="pose table (default: the table the model was trained with)")
    p.add_argument("--split", choices=["validation", "test"],
                   help="the config's validation subjects on its validation rigs (the default on its own table), or "
                        "its test subjects on the evaluation rigs, recorded in reports/test_ledger.jsonl (also "
                        "with --data); without it, --data scores all of that table's subjects")
    p.add_argument("--subjects", nargs="+", help="subjects to evaluate, within the split (default: all of the split's)")
    p.add_argument("--ledger", help="the test ledger to append to (default: reports/test_ledger.jsonl)")
    p.add_argument("--samples", type=int, help="embedding samples per pose for retrieval (default: model.samples)")
    p.add_argument("--rig", action="append", metavar="NAME_OR_YAML",
                   help="a built-in rig (h36m, novel, wide, wide-val) or a rig YAML file (repeatable; default: the "
                        "config's eval.val_rigs for validation, eval.rigs otherwise). "
                        "YAML: cameras: [{azimuth, elevation, distance, roll, focal}, ...]")
    p.add_argument("--no-occlusion", action="store_true", help="only the clean protocol (skip occlusion)")
    p.add_argument("--which", choices=["best", "latest"], default="best",
                   help="each method's best-validation checkpoint (out/best/, the default where the run kept one) "
                        "or the latest one")
    p.add_argument("--trained-weights", action="store_true",
                   help="the trained weights, not the weight average the run kept (optim.ema)")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--json", help="write the results as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a run's model alone (weights and config, no optimizer state)")
    p.add_argument("--checkpoint", required=True, help="run directory written by `vipe-ray train` (its best model)")
    p.add_argument("--out", required=True, help="directory for the model's checkpoint.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("index", help="embed a pose library (a pose table seen by a rig, or keypoint files) for search")
    p.add_argument("--checkpoint", required=True,
                   help="the model: a run directory of `vipe-ray train` (its best checkpoint), a logged model's "
                        "directory, or an MLflow model URI (models:/NAME/VERSION, runs:/RUN_ID/model)")
    p.add_argument("--out", required=True, help="new index directory")
    p.add_argument("--data", help="pose table to index (every pose seen by every camera of --rig)")
    p.add_argument("--subjects", nargs="+", help="subjects of --data to index (default: all)")
    p.add_argument("--rig", metavar="NAME_OR_YAML", help="the cameras that see the table's poses: a built-in rig "
                                                        "(h36m, novel, wide, wide-val) or a rig YAML file")
    p.add_argument("--every", type=int, default=1, help="index every N-th table row (default: all)")
    p.add_argument("--keypoints", nargs="+", metavar="FILE",
                   help="keypoint files to index: COCO person-keypoints JSON, .npy or .npz")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="hide keypoints whose visibility flag or score is below this (default 0: only v = 0)")
    p.add_argument("--kind", choices=["exact", "hnsw"], help="vector index (default: exact below 50,000 poses)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index with 2D keypoints (COCO JSON, .npy or .npz)")
    p.add_argument("--index", required=True, help="index directory written by `vipe-ray index`")
    p.add_argument("--keypoints", required=True, metavar="FILE", help="query keypoints: COCO JSON, .npy or .npz")
    p.add_argument("--top-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="hide keypoints whose visibility flag or score is below this (default 0: only v = 0)")
    p.add_argument("--candidates", type=int,
                   help="library poses re-ranked per query by match probability (default 100; never fewer than "
                        "10 x top-k)")
    p.add_argument("--json", help="write the results as JSON here (one entry per query)")
    p.add_argument("--figure", help="draw the queries beside their best matches to this PNG")
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # the command as given, for the test ledger
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"vipe-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
