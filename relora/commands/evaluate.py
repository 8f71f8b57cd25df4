"""`relora evaluate`: per-domain perplexity, bits per byte and BLiMP of a run's checkpoints.

This command and `relora dynamics` (relora/commands/dynamics.py, which uses the helpers below)
read RUN_DIR/run.json for the run's size, condition and seed, ask the resolver for the run's
evaluation / analysis steps, and read RUN_DIR/checkpoints/step_<k>/ in this project's layout or
as a Hugging Face folder of the paper's released checkpoints (so a user can put the paper's
models through the same analysis: a run.json naming size, condition and seed plus the downloaded
snapshots under checkpoints/step_<k>/). Every checkpoint is verified before
the first metric is computed, and not hashed again when it is loaded. Tables are written by
relora.tables.write_table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from . import add_command, add_study_options

log = logging.getLogger("relora.commands.evaluate")


def add_run_options(p) -> None:
    """The options `relora evaluate` and `relora dynamics` share."""
    add_study_options(p)
    p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR",
                   help="data directory (eval/, blimp/, probe.npy, manifest.json)")
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR",
                   help="run directory with run.json and checkpoints/")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=_step_list, default=None, metavar="K[,K...]",
                   help="comma-separated steps instead of the resolver's (e.g. for a partial run)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder of step_<k>/ checkpoints (default: RUN_DIR/checkpoints); a Pico run's "
                        "checkpoints/ folder of the paper's Hugging Face snapshots works as it is")
    p.add_argument("--hf-repo", default=None, metavar="REPO[@BRANCH]",
                   help="first download the paper's released checkpoints (commits 'Saving HF Model -- "
                        "Step <k>' of a pico-train repository and branch) for the missing steps into "
                        "the checkpoints folder (needs internet and huggingface_hub)")


def _step_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of steps (e.g. 0,100,200)") from None


def register(subparsers) -> None:
    p = add_command(subparsers, "evaluate", run_evaluate,
                    "per-domain perplexity / bits per byte and BLiMP of a run's checkpoints",
                    "Score a run's checkpoints at the study's evaluation steps: perplexity and bits per byte "
                    "per held-out domain (perplexity.parquet) and BLiMP accuracy per paradigm "
                    "(blimp.parquet).")
    add_run_options(p)
    p.add_argument("--out-dir", type=Path, default=None, help="where the tables go (default: the run directory)")


def setup_run(args, kind: str):
    """(study, run, steps, device) for a run directory; errors name the file."""
    import torch

    from ..config import load_study, resolve_run

    if args.threads:
        torch.set_num_threads(args.threads)
    run_json = args.run / "run.json"
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_json}: run description not found")
    try:
        info = json.loads(run_json.read_text())
        size, condition, seed = info["size"], info["condition"], int(info["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run_json}: needs size, condition and seed ({e})") from None
    study = load_study(args.config, args.overrides)
    run = resolve_run(study, size, condition, seed)
    steps = args.steps or run["steps"][kind]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = sorted(steps)
    _use_training_kernels(info, torch.device(device), run_json)
    if kind == "analysis" and "update" in study["analysis"].get("targets", ["update"]) and 0 not in steps:
        steps = [0, *steps]  # W_0 is needed; step 0 is always a checkpoint step
    args.checkpoints = args.checkpoints or args.run / "checkpoints"
    if args.hf_repo:
        fetch_pico_checkpoints(args.hf_repo, steps, args.checkpoints)
    return study, run, steps, torch.device(device)


def _use_training_kernels(info: dict, device, run_json) -> None:
    """Score with the kernels the run trained with on this kind of device (measured for this
    model's shapes by relora.autotune); results do not depend on them beyond rounding."""
    from ..model import set_kernels

    kernels, trained_on = info.get("kernels"), str(info.get("device", ""))
    if isinstance(kernels, dict) and trained_on.split(":")[0] == device.type:
        try:
            set_kernels(kernels)
        except ValueError as e:
            raise ValueError(f"{run_json}: {e}") from None


def fetch_pico_checkpoints(repo: str, steps, dest: Path) -> None:
    """Download the paper's released checkpoints into dest/step_<k>/ (skipping those present).

    pico-train pushes every checkpoint as a commit titled 'Saving HF Model -- Step <k>' on the
    run's branch (`REPO@BRANCH`; default main), holding config.json and the weights."""
    import re

    from ..checkpoint import CONFIG, LEGACY_WEIGHTS, WEIGHTS
    from ..io import atomic_dir

    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ValueError("--hf-repo needs the huggingface_hub package (pip install huggingface_hub)") from None
    repo_id, _, branch = repo.partition("@")
    missing = [s for s in steps if not (Path(dest) / f"step_{s}" / "config.json").is_file()]
    if not missing:
        return
    commits = {}
    for commit in HfApi().list_repo_commits(repo_id=repo_id, revision=branch or None):
        match = re.search(r"Saving HF Model -- Step (\d+)", commit.title)
        if match:
            commits.setdefault(int(match.group(1)), commit.commit_id)  # newest first: keep the latest
    absent = [s for s in missing if s not in commits]
    if absent:
        raise FileNotFoundError(f"{repo}: no 'Saving HF Model -- Step k' commit for step(s) {absent} "
                                f"(available: {sorted(commits)[:10]}{' ...' if len(commits) > 10 else ''})")
    for step in missing:
        target = Path(dest) / f"step_{step}"
        with atomic_dir(target, CONFIG) as tmp:
            snapshot_download(repo_id=repo_id, revision=commits[step], local_dir=str(tmp),
                              allow_patterns=[CONFIG, WEIGHTS, LEGACY_WEIGHTS])
        log.info("downloaded %s@%s (step %d) -> %s", repo_id, commits[step][:8], step, target)


def snapshot_loader(args, run, step):
    from ..checkpoint import load_snapshot, step_dir, verify_weights
    from ..model import ModelConfig

    path = step_dir(args.checkpoints, step)  # raises naming the folder
    verified = verify_weights(path)  # every checkpoint intact before the first metric is computed
    expected = ModelConfig(**run["model"])
    scale = run["method"].get("scale")
    return lambda: load_snapshot(path, expected=expected, scale=scale, verified=verified)


def progress(label: str, total: int):
    start = time.perf_counter()
    done = [0]

    def tick(step):
        done[0] += 1
        log.info("%s: step %d done (%d/%d, %.1fs)", label, step, done[0], total, time.perf_counter() - start)

    return tick


def run_evaluate(args) -> int:
    from ..data.manifest import verify_inputs
    from ..evaluate import blimp_scores, load_tokenizer, read_blimp, read_eval_domains, score_documents
    from ..tables import BLIMP, PERPLEXITY, write_table

    study, run, steps, device = setup_run(args, "evaluation")
    evaluation = study.get("evaluation", {})
    context = run["model"]["max_seq_len"]
    stride = (evaluation.get("perplexity") or {}).get("stride")
    if stride is not None and stride >= context:
        raise ValueError(f"{args.config}: evaluation.perplexity.stride {stride} must be below the context {context}")
    batch_tokens = evaluation.get("batch_tokens", 4096)
    max_docs = (evaluation.get("perplexity") or {}).get("max_docs")
    long_documents = (evaluation.get("perplexity") or {}).get("long_documents", "sliding")
    first_token = (evaluation.get("blimp") or {}).get("first_token", "scored")
    loaders = {step: snapshot_loader(args, run, step) for step in steps}  # every step exists before work starts
    verify_inputs(args.data, ["eval/", "blimp/", "tokenizer.json"])  # against the data manifest
    domains = read_eval_domains(args.data / "eval", max_docs)
    pairs = read_blimp(args.data / "blimp")
    encode, eos_id = load_tokenizer(args.data)
    token_bytes = None
    if long_documents == "truncate":  # the bytes of a cut document are recounted from its tokens
        from ..data.tokenizer import load_tokenizer as load_hf_tokenizer, token_byte_lengths

        token_bytes = token_byte_lengths(load_hf_tokenizer(args.data / "tokenizer.json"))
    vocab = run["model"]["vocab_size"]
    source = str((evaluation.get("blimp") or {}).get("source", "local"))
    keys = {"size": run["size"], "condition": run["condition"], "seed": run["seed"]}
    ppl_rows, blimp_rows = [], []
    tick = progress("relora evaluate", len(steps))
    for step in steps:
        model = loaders[step]().model(device)
        for domain, (docs, n_bytes) in domains.items():
            if docs and max(max(d) if len(d) else 0 for d in docs) >= vocab:
                raise ValueError(f"{args.data / 'eval' / (domain + '.parquet')}: token ids exceed the "
                                 f"model's vocabulary of {vocab}")
            t0 = time.perf_counter()
            score = score_documents(model, docs, n_bytes, stride, batch_tokens, device,
                                    long_documents, token_bytes)
            ppl_rows.append({**keys, "step": step, "domain": domain, "docs": score.docs, "tokens": score.tokens,
                             "bytes": score.bytes, "nll": score.nll, "perplexity": score.perplexity,
                             "bits_per_byte": score.bits_per_byte,
                             "perplexity_doc_mean": score.perplexity_doc_mean,
                             "seconds": time.perf_counter() - t0, "long_documents": long_documents})
        for row in blimp_scores(model, pairs, encode, eos_id, batch_tokens, device, first_token):
            blimp_rows.append({**keys, "step": step, **row, "source": row["source"] or source})
        tick(step)
    out = args.out_dir or args.run
    write_table(PERPLEXITY, ppl_rows, out / "perplexity.parquet")
    write_table(BLIMP, blimp_rows, out / "blimp.parquet")
    log.info("wrote %s (%d rows) and %s (%d rows)", out / "perplexity.parquet", len(ppl_rows),
             out / "blimp.parquet", len(blimp_rows))
    return 0
