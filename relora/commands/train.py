"""`relora train`, `relora describe`, `relora export-hf`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import add_command, add_study_options

log = logging.getLogger("relora.commands.train")


def register(subparsers) -> None:
    p = add_command(subparsers, "train", run_train, "train one run (size x condition x seed)",
                    "Train one run of a study (size x condition x seed) and publish it into --out: "
                    "checkpoints/, train_metrics.parquet and run.json. A killed run restarted with the same "
                    "command resumes from its last saved state in --resume-dir.")
    add_study_options(p)
    p.add_argument("--size", required=True, help="a model size of the study (a key of `sizes`)")
    p.add_argument("--condition", required=True, help="a condition of the study (a key of `conditions`)")
    p.add_argument("--seed", required=True, type=int,
                   help="a seed of the study (one of `seeds`): initial weights and batch order")
    p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR",
                   help="data directory with train.npy (or a streamed-data manifest) and manifest.json")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory to publish into")
    p.add_argument("--resume-dir", type=Path, default=None, metavar="DIR",
                   help="where state lives until the run ends (default: <out>/../.resume-<name>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop, keep state

    p = add_command(subparsers, "describe", run_describe,
                    "parameters, FLOPs and optimizer state of every run of a study",
                    "Print, per size and condition of a study, the parameter counts, training FLOPs per "
                    "token (and relative to full-rank), optimizer state, tokens, merges and the learning "
                    "rate right after the first merge, the micro-batch and accumulation on each device and "
                    "the estimated peak GPU memory; then each run's checkpoints (count and disk use) "
                    "and evaluations (count and FLOPs). Nothing is trained.")
    add_study_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                   help="tokens scored per evaluation (held-out documents + BLiMP sentences, e.g. from "
                        "the data manifest) for the evaluation FLOPs; without it they are not estimated")

    p = add_command(subparsers, "export-hf", run_export,
                    "export a checkpoint as a Hugging Face LlamaForCausalLM folder",
                    "Export one checkpoint (ReLoRA adapters merged) as a Hugging Face LlamaForCausalLM "
                    "folder with the same logits.")
    p.add_argument("checkpoint", type=Path, help="a checkpoints/step_<k> directory")
    p.add_argument("out", type=Path, help="the folder to write (absent, empty or an earlier export)")


def run_train(args) -> int:
    from ..config import load_study, resolve_run
    from ..train import Preempted, train

    study = load_study(args.config, args.overrides)
    run = resolve_run(study, args.size, args.condition, args.seed)
    resume_dir = args.resume_dir or args.out.parent / f".resume-{args.out.name}"
    try:
        result = train(run, args.data, args.out, resume_dir, threads=args.threads, stop_after=args.stop_after)
    except Preempted as e:
        log.warning("%s", e)
        return e.exit_code
    if "stopped_at" in result:
        log.info("stopped after step %d; state in %s", result["stopped_at"], resume_dir)
    return 0


def run_describe(args) -> int:
    from ..config import load_study
    from ..describe import compact_steps, describe_study

    rows = describe_study(load_study(args.config, args.overrides), args.eval_tokens)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    _print_table(rows, ["size", "condition", "params_total", "params_trainable", "flops_per_token",
                        "flop_ratio_to_full", "optimizer_state_bytes", "tokens", "total_flops", "n_merges",
                        "lr_after_merge", "paper_lr_after_merge", "lr_after_merge_over_paper",
                        "micro_batch_size", "grad_accum", "gpu_memory_gib"])
    if any(r["lr_after_merge"] is not None for r in rows):
        print("lr_after_merge: lr * f(k) of the first update after the first merge (after update k); "
              "paper_lr_after_merge: the paper's 3e-4 * f(2001)")
    print("micro_batch_size: sequences per forward/backward pass on each of the run's devices; grad_accum: "
          "passes per update; gpu_memory_gib: the estimated peak GPU memory of a pass (relora/memory.py)")
    print()
    _print_table(rows, ["size", "condition", "n_checkpoints", "checkpoint_bytes", "checkpoints_disk_bytes",
                        "n_evaluations", "n_analyses", "eval_flops"])
    print("checkpoints_disk_bytes: n_checkpoints x checkpoint_bytes (state dict with adapters, stored dtype); "
          "eval_flops: n_evaluations x --eval-tokens x forward FLOPs per token"
          + ("" if args.eval_tokens is not None else " (give --eval-tokens)"))
    print()
    for r in rows:
        print(f"{r['size']} {r['condition']}\n  evaluated at: {compact_steps(r['evaluation_steps'])}"
              f"\n  analysed at:  {compact_steps(r['analysis_steps'])}")
    print("a..b/s: every s-th step from a to b")
    return 0


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(w) for c, w in zip(columns, widths)))


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
    log.info("wrote %s", out)
    return 0
