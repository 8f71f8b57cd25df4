"""Training-step throughput: ours (full-rank and ReLoRA) against Hugging Face transformers
LlamaForCausalLM (+ peft LoRA), and against the machine's measured fp32 GEMM throughput.

    python benchmarks/train_step.py [--repeats 5] [--sizes default,d384] [--precision fp32]

Every variant runs the same shapes, batch, precision and dropout; variants are interleaved and
repeated in one process (these machines vary 10-15% between processes) and the median step time
is reported. Model FLOPs follow DESIGN 5 (relora.model.model_flops_per_token); the ReLoRA FLOP
bound is relora.describe.relora_flops_per_token. "GEMM" = a 2048 x 2048 fp32 matmul on all
threads, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from relora.checkpoint import build_model
from relora.describe import relora_flops_per_token
from relora.model import ModelConfig, model_flops_per_token

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (name, d_model, vocab, seq_len, batch): the default study's sizes and the DESIGN 5 reference size
SHAPES = {
    "tiny": (48, 8192, 128, 16),
    "small": (96, 8192, 128, 16),
    "d192": (192, 8192, 256, 8),
    "d384": (384, 8192, 256, 8),
}


def gemm_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def model_config(d: int, vocab: int, seq: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=12, n_heads=12, n_kv_heads=4,
                       ffn_hidden=4 * d, max_seq_len=seq)


def ours(config: ModelConfig, relora: bool, dropout: float, dropout_mask: str = "per_adapter"):
    method = {"name": "relora", "rank": 16, "alpha": 32, "dropout": dropout, "dropout_mask": dropout_mask,
              "targets": TARGETS} if relora else {"name": "full"}
    model = build_model(config.to_dict(), method).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, lambda idx: model(idx), params


def hugging_face(config: ModelConfig, relora: bool, dropout: float):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).train()
    if relora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                           target_modules=HF_TARGETS))
        for name, p in model.named_parameters():  # ReLoRA also trains embeddings, norms and head
            if "lora_" not in name and ("embed" in name or "norm" in name or "lm_head" in name):
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, lambda idx: model(input_ids=idx).logits, params


def make_step(forward, params, vocab: int, batch: int, seq: int, precision: str):
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    idx = torch.randint(0, vocab, (batch, seq + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        with autocast:
            logits = forward(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def optimizer_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.ndim > 0)


def bench_shape(name: str, repeats: int, precision: str, with_hf: bool) -> list[dict]:
    d, vocab, seq, batch = SHAPES[name]
    config = model_config(d, vocab, seq)
    full_flops = model_flops_per_token(config, seq)
    variants = {
        "ours full": ours(config, False, 0.0),
        "ours relora dropout 0": ours(config, True, 0.0),
        "ours relora dropout 0.1 per_adapter": ours(config, True, 0.1),
        "ours relora dropout 0.1 shared": ours(config, True, 0.1, "shared"),
    }
    relora_flops = relora_flops_per_token(variants["ours relora dropout 0"][0], seq)
    if with_hf:
        variants["hf llama full"] = hugging_face(config, False, 0.0)
        variants["hf llama + peft lora dropout 0.1"] = hugging_face(config, True, 0.1)
    steps, times = {}, {k: [] for k in variants}
    for key, (model, forward, params) in variants.items():
        steps[key] = make_step(forward, params, vocab, batch, seq, precision)
        steps[key][0]()  # warm up (allocations, optimizer state)
    for _ in range(repeats):  # interleaved
        for key, (step, _) in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    rows = []
    for key in variants:
        flops = full_flops if key.endswith("full") else relora_flops
        seconds = statistics.median(times[key])
        rows.append({"shape": name, "variant": key, "step_s": seconds, "flop_ratio": flops / full_flops, "tokens_per_s": batch * seq / seconds,
                     "model_flops_per_s": flops * batch * seq / seconds,
                     "optimizer_bytes": optimizer_bytes(steps[key][1])})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,small,d384")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers / peft")
    args = parser.parse_args()
    torch.manual_seed(0)
    gemm = gemm_flops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {args.precision}")
    print(f"measured fp32 GEMM (2048^3): {gemm / 1e9:.1f} GFLOP/s\n")
    header = f"{'shape':6} {'variant':38} {'step ms':>9} {'tok/s':>9} {'MFU/GEMM':>9} {'vs full':>8} {'vs HF':>7} {'opt MB':>8}"
    print(header)
    print("-" * len(header))
    for name in args.sizes.split(","):
        rows = bench_shape(name, args.repeats, args.precision, not args.no_hf)
        by_variant = {r["variant"]: r for r in rows}
        full = by_variant["ours full"]
        for r in rows:
            versus_full = r["step_s"] / full["step_s"]
            hf_key = "hf llama full" if "full" in r["variant"] else "hf llama + peft lora dropout 0.1"
            versus_hf = by_variant[hf_key]["step_s"] / r["step_s"] if hf_key in by_variant else float("nan")
            print(f"{r['shape']:6} {r['variant']:38} {1000 * r['step_s']:9.1f} {r['tokens_per_s']:9.0f} "
                  f"{r['model_flops_per_s'] / gemm:9.2f} {versus_full:8.3f} {versus_hf:7.2f} "
                  f"{r['optimizer_bytes'] / 2**20:8.1f}")
        bound = by_variant["ours relora dropout 0"]["flop_ratio"]
        measured = by_variant["ours relora dropout 0"]["step_s"] / full["step_s"]
        print(f"{name:6} ReLoRA FLOP bound {bound:.3f}x full; measured {measured:.3f}x "
              f"({measured / bound:.2f}x the bound)\n")
    print("MFU/GEMM: model FLOPs/s over measured GEMM FLOP/s. vs full: step time over ours full-rank. "
          "vs HF: HF step time over ours (> 1: ours faster); ReLoRA rows compare with HF + peft.")


if __name__ == "__main__":
    main()
