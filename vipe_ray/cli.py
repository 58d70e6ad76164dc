"""``vipe-ray`` command line: convert motion capture, train, evaluate.

    vipe-ray convert RAW_DIR OUT.parquet [--fps 30]
    vipe-ray train [--config CONFIG.yaml] [--out DIR] [--resume] [--set key.path=value ...]
    vipe-ray evaluate --checkpoint DIR [--data TABLE.parquet] [--subjects 06 13] [--rig h36m --rig my_rig.yaml]
                      [--no-occlusion] [--json OUT.json]
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


def cmd_convert(args: argparse.Namespace) -> int:
    from vipe_ray.mocap.convert import convert_directory

    summary = convert_directory(args.raw_dir, args.out, fps=args.fps)
    print(f"wrote {args.out}: {summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vipe_ray.config import load_config
    from vipe_ray.train import train

    config = load_config(args.config, _overrides(args.set))
    summary = train(config, args.out, resume=args.resume)
    print(f"done: {args.out} {summary}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vipe_ray.data import load_table
    from vipe_ray.evaluate import evaluate_rigs, format_markdown, format_table, write_json
    from vipe_ray.storage import same_location
    from vipe_ray.train import load_checkpoint

    # Both methods with the same kind of weights: the average where the run kept one, or the trained ones.
    averaged = False if args.trained_weights else None
    checkpoint = load_checkpoint(args.checkpoint, averaged=averaged)
    config = checkpoint.config
    lifter_path = Path(args.checkpoint) / "lifter.pt"
    lifter = load_checkpoint(args.checkpoint, kind="lifter", averaged=averaged).model if lifter_path.exists() else None
    if lifter is None:
        print(f"note: {lifter_path} not found; the 3D-lifting baseline is left out", file=sys.stderr)
    table = load_table(args.data or config.data.table_path())
    own_table = args.data is None or same_location(args.data, config.data.table_path())
    # Another table (e.g. newly converted subjects): all of its subjects unless --subjects says otherwise.
    subjects = args.subjects or (list(config.data.test_subjects) if own_table else table.subjects)
    if not subjects:
        raise ConfigError("no evaluation subjects: pass --subjects or set data.test_subjects")
    leaked = sorted(set(subjects) & set(config.data.train_subjects))
    if leaked:
        print(f"warning: subjects {leaked} were trained on; this is not a held-out evaluation", file=sys.stderr)
    table = table.select(subjects)
    overrides: dict = {}
    if args.rig:
        overrides["rigs"] = tuple(args.rig)
    if args.no_occlusion:
        overrides["occlusion"] = False
    try:
        eval_config = replace(config.eval, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"--rig: {exc}") from None
    print(f"evaluating {args.checkpoint} (step {checkpoint.step}) on subjects {subjects} of {table.path}; "
          f"rigs {list(eval_config.rigs)}, occlusion {'on' if eval_config.occlusion else 'off'}")
    result = evaluate_rigs(checkpoint.model, config, table, lifter=lifter, eval_config=eval_config,
                           samples=args.samples)
    result["checkpoint"] = str(args.checkpoint)
    result["step"] = checkpoint.step
    result["weights"] = "average" if checkpoint.payload.get("ema") is not None and not args.trained_weights else "trained"
    print(format_markdown(result, eval_config.ks) if args.markdown else format_table(result, eval_config.ks))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vipe-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert CMU ASF/AMC (+ BVH) motion capture to a Parquet pose table")
    p.add_argument("raw_dir", help="folder with subjects/<SS>/<SS>.asf + <SS>_<TT>.amc and/or *.bvh")
    p.add_argument("out", help="output .parquet path (written atomically)")
    p.add_argument("--fps", type=int, default=30, help="output frame rate; must divide 120 (default 30)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train Pr-VIPE (and the 3D-lifting baseline)")
    p.add_argument("--config", help="training YAML (default: the shipped vipe_ray/configs/default.yaml)")
    p.add_argument("--out", default="runs/default", help="run directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints found in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.steps=100 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="cross-view retrieval Hit@k vs the 2D-NN and 3D-lifting baselines")
    p.add_argument("--checkpoint", required=True, help="run directory written by `vipe-ray train`")
    p.add_argument("--data", help="pose table (default: the table the model was trained with)")
    p.add_argument("--subjects", nargs="+", help="subjects to evaluate (default: the config's test subjects)")
    p.add_argument("--samples", type=int, help="embedding samples per pose for retrieval (default: model.samples)")
    p.add_argument("--rig", action="append", metavar="NAME_OR_YAML",
                   help="a built-in rig (h36m, novel, wide, wide-val) or a rig YAML file (repeatable; default: the "
                        "config's eval.rigs). YAML: cameras: [{azimuth, elevation, distance, roll, focal}, ...]")
    p.add_argument("--no-occlusion", action="store_true", help="only the clean protocol (skip occlusion)")
    p.add_argument("--trained-weights", action="store_true",
                   help="the trained weights, not the weight average the run kept (optim.ema)")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--json", help="write the results as JSON here")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"vipe-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
