"""`relora train`, `relora describe`, `relora export-hf`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one run (size x condition x seed)")
    p.add_argument("--config", required=True, type=Path, help="study YAML")
    p.add_argument("--size", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--data", required=True, type=Path, help="data directory with train.npy")
    p.add_argument("--out", required=True, type=Path, help="run directory to publish into")
    p.add_argument("--resume-dir", type=Path, default=None,
                   help="where state lives until the run ends (default: <out>/../.resume-<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, e.g. training.lr=1e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stop-after", type=int, default=None, help=argparse_hidden())
    p.set_defaults(handler=run_train)

    p = subparsers.add_parser("describe", help="parameters, FLOPs and optimizer state of every run of a study")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_describe)

    p = subparsers.add_parser("export-hf", help="export a checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("checkpoint", type=Path, help="checkpoints/step_<k> directory")
    p.add_argument("out", type=Path)
    p.set_defaults(handler=run_export)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def run_train(args) -> int:
    from ..config import load_study, resolve_run
    from ..train import Preempted, TrainingDiverged, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    study = load_study(args.config, args.overrides)
    run = resolve_run(study, args.size, args.condition, args.seed)
    resume_dir = args.resume_dir or args.out.parent / f".resume-{args.out.name}"
    try:
        result = train(run, args.data, args.out, resume_dir, threads=args.threads, stop_after=args.stop_after)
    except Preempted as e:
        print(f"relora train: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingDiverged as e:
        print(f"relora train: error: {e}", file=sys.stderr)
        return 3
    if "stopped_at" in result:
        print(f"relora train: stopped after step {result['stopped_at']}; state in {resume_dir}", file=sys.stderr)
    return 0


def run_describe(args) -> int:
    from ..config import load_study
    from ..describe import describe_study

    rows = describe_study(load_study(args.config, args.overrides))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    columns = ["size", "condition", "params_total", "params_trainable", "flops_per_token",
               "flop_ratio_to_full", "optimizer_state_bytes", "tokens", "total_flops", "n_merges",
               "lr_after_merge", "paper_lr_after_merge", "lr_after_merge_over_paper"]
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(w) for c, w in zip(columns, widths)))
    if any(r["lr_after_merge"] is not None for r in rows):
        print("lr_after_merge: lr * f(k) of the first update after the first merge (after update k); "
              "paper_lr_after_merge: the paper's 3e-4 * f(2001)")
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if value < 1e4 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run_export(args) -> int:
    from ..export import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0
