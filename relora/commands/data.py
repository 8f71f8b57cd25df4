"""`relora corpus | tokenizer | tokenize | probe | blimp | manifest`: the data stage
(docs/design.md, Data).

Each subcommand takes the study config and explicit paths, so each Snakemake rule is one line:

    relora corpus    --config S --out DATA/corpus
    relora tokenizer --config S --corpus DATA/corpus --out DATA/tokenizer.json
    relora tokenize  --config S --corpus DATA/corpus --tokenizer DATA/tokenizer.json --out DATA
    relora probe     --config S --eval DATA/eval --out DATA/probe.npy
    relora blimp     --config S --corpus DATA/corpus --tokenizer DATA/tokenizer.json --out DATA/blimp
                     (after tokenize: also DATA/blimp_unigram.parquet, the frequency baseline)
    relora manifest  --data DATA [--verify]

Every stage records its files (size, sha256) in DATA/stages/<stage>.json and refreshes
DATA/manifest.json, the data directory being the parent of each --out (tokenize: --out itself).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import add_command, add_study_options

log = logging.getLogger("relora.commands.data")


def _study(args) -> dict:
    from relora.config import load_study

    return load_study(args.config, overrides=args.overrides)


def _threads(args) -> int:
    if args.threads:
        return args.threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _log(message: str) -> None:
    """What the data builders report as they go (their `log` argument)."""
    log.info("%s", message)


def corpus(args) -> int:
    from relora.data.corpus import build_corpus

    started = time.perf_counter()
    build_corpus(_study(args)["data"], args.out, log=_log)
    _log(f"corpus: done in {time.perf_counter() - started:.1f} s")
    return 0


def tokenizer(args) -> int:
    from relora.data.tokenizer import build_tokenizer

    started = time.perf_counter()
    build_tokenizer(_study(args)["data"], args.corpus, args.out, threads=_threads(args), log=_log)
    _log(f"tokenizer: done in {time.perf_counter() - started:.1f} s")
    return 0


def tokenize(args) -> int:
    from relora.data.shards import build_shards

    started = time.perf_counter()
    build_shards(_study(args)["data"], args.corpus, args.tokenizer, args.out,
                 threads=_threads(args), log=_log)
    _log(f"tokenize: done in {time.perf_counter() - started:.1f} s")
    return 0


def probe(args) -> int:
    from relora.data.shards import build_probe

    build_probe(_study(args)["data"], args.eval, args.out, args.tokenizer, log=_log)
    return 0


def blimp(args) -> int:
    from relora.data.blimp import build_blimp

    started = time.perf_counter()
    build_blimp(_study(args), args.out, corpus_dir=args.corpus, tokenizer=args.tokenizer, log=_log)
    _log(f"blimp: done in {time.perf_counter() - started:.1f} s")
    return 0


def manifest(args) -> int:
    from relora.data.manifest import verify_manifest, write_manifest

    if args.verify:
        found = verify_manifest(args.data)
        _log(f"manifest: {len(found['files'])} files match {args.data}/manifest.json")
    else:
        found = write_manifest(args.data)
        _log(f"manifest: {len(found['files'])} files -> {args.data}/manifest.json")
    return 0


def register(subparsers) -> None:
    def add(name, handler, summary, description=None):
        return add_command(subparsers, name, handler, summary, description)

    def common(p, threads=False):
        add_study_options(p)
        if threads:
            p.add_argument("--threads", type=int, default=None,
                           help="encoding threads (default: every core available)")

    p = add("corpus", corpus, "documents per domain, cleaned, deduplicated, split train/held-out",
            "Collect the study's documents per domain (data.corpus: bundled, local files or Hugging Face), "
            "clean and deduplicate them, and split each domain into train and held-out.")
    common(p)
    p.add_argument("--out", required=True, type=Path, help="corpus folder to write (DATA/corpus)")

    p = add("tokenizer", tokenizer, "train or fetch the tokenizer and check its size",
            "Train a byte-level BPE tokenizer on the corpus's train split, or fetch the one the study "
            "names, and check its size against data.tokenizer.vocab_size.")
    common(p, threads=True)
    p.add_argument("--corpus", required=True, type=Path, help="corpus folder (from `relora corpus`)")
    p.add_argument("--out", required=True, type=Path, help="tokenizer.json to write (DATA/tokenizer.json)")

    p = add("tokenize", tokenize, "train.npy and eval/<domain>.parquet",
            "Tokenize the corpus: the train split into DATA/train.npy (documents joined by end-of-text), "
            "the held-out split into DATA/eval/<domain>.parquet.")
    common(p, threads=True)
    p.add_argument("--corpus", required=True, type=Path, help="corpus folder (from `relora corpus`)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json")
    p.add_argument("--out", required=True, type=Path, help="data folder to write train.npy and eval/ into")

    p = add("probe", probe, "the fixed probe batch of held-out windows (probe.npy)",
            "Draw the fixed probe batch of held-out token windows (probe.npy) on which `relora dynamics` "
            "computes gradients and CKA.")
    common(p)
    p.add_argument("--eval", required=True, type=Path, help="folder of eval/<domain>.parquet")
    p.add_argument("--tokenizer", default=None, type=Path, help="tokenizer.json (default: beside --eval)")
    p.add_argument("--out", required=True, type=Path, help="probe.npy to write")

    p = add("blimp", blimp, "BLiMP minimal pairs (local folder, Hugging Face or generated)",
            "Write the BLiMP minimal pairs the study evaluates (evaluation.blimp.source: a local folder, "
            "Hugging Face or generated from the corpus's words) as <UID>.jsonl.")
    common(p)
    p.add_argument("--corpus", default=None, type=Path,
                   help="corpus folder; the generator keeps words frequent in its training split")
    p.add_argument("--tokenizer", default=None, type=Path,
                   help="tokenizer.json: with it, the unigram frequency baseline (counts from the "
                        "data folder's train.npy or training stream) balances generated pairs and "
                        "is written to DATA/blimp_unigram.parquet")
    p.add_argument("--out", required=True, type=Path, help="folder to write <UID>.jsonl into (DATA/blimp)")

    p = add("manifest", manifest, "merge the stage records into manifest.json, or --verify it",
            "Merge the records of the data stages (DATA/stages/*.json) into DATA/manifest.json, or with "
            "--verify check every file it lists.")
    p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR", help="data folder")
    p.add_argument("--verify", action="store_true",
                   help="check the size and sha256 of every file listed instead of writing")
    return None
