"""Throughput of the evaluation and dynamics stages (not a test).

    python benchmarks/bench_evaluate_dynamics.py [--threads N] [--blimp-dir BLIMP_DIR]

1. Spectra of a whole d=384, 12-layer ReLoRA checkpoint (targets weight, update, adapter:
   84 linears x 3 = 252 matrices, float64): the batched path (`spectra_rows`, one svdvals call
   per shape) against a Python loop of one svdvals + metrics call per matrix. Interleaved and
   repeated, as timings on shared machines vary by 10-15%.
2. BLiMP pairs/s and perplexity tokens/s of a model of the default study's `small` size
   (d=96, 12 layers, vocab 8192, context 128).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from relora.checkpoint import Snapshot
from relora.dynamics import matrix_metrics, snapshot_targets, spectra_rows
from relora.evaluate import score_documents, score_sentences
from relora.model import PicoDecoder
from relora.model_config import LINEAR_MODULES, ModelConfig, linear_key


def relora_snapshot(config: ModelConfig, rank: int, seed: int) -> Snapshot:
    torch.manual_seed(seed)
    with torch.device("cpu"):
        state = {k: v for k, v in PicoDecoder(config).state_dict().items()}
    for layer in range(config.n_layers):
        for module in LINEAR_MODULES:
            out_f, in_f = state[f"{linear_key(layer, module)}.weight"].shape
            state[f"{linear_key(layer, module)}.A_lora"] = torch.randn(rank, in_f) * 0.05
            state[f"{linear_key(layer, module)}.B_lora"] = torch.randn(out_f, rank) * 0.05
    return Snapshot(path=Path("bench"), config=config, tensors=state, step=1, scale=2.0)


def bench_spectra(repeats: int) -> dict:
    config = ModelConfig(vocab_size=512, d_model=384, n_layers=12, n_heads=12, n_kv_heads=4,
                         ffn_hidden=1536, max_seq_len=16)
    snap, initial = relora_snapshot(config, 16, 1), relora_snapshot(config, 16, 0)
    items, extra = snapshot_targets(snap, initial, None, ("weight", "update", "adapter"))

    def batched():
        spectra_rows(items, extra)

    def loop():
        sigma_max = {}
        for key, M in extra.items():
            sigma_max[key] = float(torch.linalg.svdvals(M)[0])
        for t in items:
            matrix_metrics(t.matrix, t.stored_dtype)  # one svdvals + metrics per matrix

    times = {"batched": [], "loop": []}
    for _ in range(repeats):
        for name, fn in (("batched", batched), ("loop", loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"matrices": len(items) + len(extra), **{f"{k}_s_median": statistics.median(v) for k, v in times.items()},
            **{f"{k}_s_all": [round(x, 3) for x in v] for k, v in times.items()}}


def bench_scoring(blimp_dir: Path | None) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    config = ModelConfig(vocab_size=8192, d_model=96, n_layers=12, n_heads=12, n_kv_heads=4,
                         ffn_hidden=384, max_seq_len=128)
    torch.manual_seed(0)
    model = PicoDecoder(config).eval()
    result = {}
    if blimp_dir and blimp_dir.is_dir():
        pairs = []
        for file in sorted(blimp_dir.glob("*.jsonl"))[:4]:
            pairs += [json.loads(line) for line in file.read_text().splitlines()[:500]]
        sentences = [p[k] for p in pairs for k in ("sentence_good", "sentence_bad")]
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
        tokenizer.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<unk>"],
                                                                     show_progress=False))
        encoded = [tokenizer.encode(s).ids for s in sentences]
        t0 = time.perf_counter()
        score_sentences(model, encoded, 0, batch_tokens=4096)
        seconds = time.perf_counter() - t0
        result["blimp"] = {"pairs": len(pairs), "mean_tokens": float(np.mean([len(e) for e in encoded])),
                           "pairs_per_s": len(pairs) / seconds}
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 8192, n).tolist() for n in rng.integers(20, 600, 200)]
    t0 = time.perf_counter()
    score = score_documents(model, docs, [1] * len(docs), stride=64, batch_tokens=4096)
    seconds = time.perf_counter() - t0
    result["perplexity"] = {"documents": len(docs), "predicted_tokens": score.tokens,
                            "tokens_per_s": score.tokens / seconds}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blimp-dir", type=Path, default=os.environ.get("RELORA_BLIMP_DIR"),
                        help="published BLiMP's <UID>.jsonl files (default: $RELORA_BLIMP_DIR; "
                             "without it, no BLiMP timing)")
    parser.add_argument("--skip-spectra", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_spectra:
        out["spectra_d384_12_layers"] = bench_spectra(args.repeats)
    out.update(bench_scoring(args.blimp_dir))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
