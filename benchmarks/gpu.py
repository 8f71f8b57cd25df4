"""GPU throughput of the paper's models: tokens/s and MFU, full vs ReLoRA, eager vs torch.compile,
and the GPU-hours of the paper's four 20k-step runs extrapolated from them.

    python benchmarks/gpu.py                 # on a GPU machine: a few minutes
    python benchmarks/gpu.py --tiny          # small shapes, runs anywhere (CPU: shows it works)

Imports only torch and relora's core modules (relora.model_config, relora.model, relora.lora):
the GPU machines have torch but no Snakemake, DuckDB, Altair, jsonschema or PyYAML, so configs
are built here in Python. The paper's setup (docs/design.md, Model and training recipe): d=384
("small"; d=96 "tiny"), 12 layers, 12 query / 4 key-value heads, vocab 50304, seq 2048, bf16
mixed precision, AdamW; ReLoRA with r=16, alpha=32, dropout 0.1 on q, k, v, o, w_0, w_1, w_2. A
run is 20k updates of 1024 sequences (41.9B tokens); the paper reports about 3,400 A100-hours
for its four runs (2 sizes x 2 methods). MFU = model FLOPs (docs/design.md, Model FLOPs: 6 per
matmul weight per token + attention; for ReLoRA its own, smaller count) / the GPU's dense bf16
peak; "GEMM" is a measured 8192^3 bf16 matmul.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relora.lora import wrap_with_lora  # noqa: E402
from relora.model import PicoDecoder, count_parameters  # noqa: E402
from relora.model_config import (LINEAR_MODULES, ModelConfig, model_flops_per_token,  # noqa: E402
                                 relora_flops_per_token)

TARGETS = list(LINEAR_MODULES)
PAPER = {"steps": 20_000, "batch": 1024, "seq": 2048, "a100_hours_reported": 3400}
# dense bf16 peak TFLOP/s (vendor data sheets; no sparsity)
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def paper_config(d_model: int, seq: int, vocab: int = 50304, n_layers: int = 12) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=12, n_kv_heads=4,
                       ffn_hidden=4 * d_model, max_seq_len=seq)


def build(config: ModelConfig, method: str, device, dropout: float, rank: int):
    torch.manual_seed(0)
    model = PicoDecoder(config)
    if method == "relora":
        wrap_with_lora(model, rank, 2 * rank, dropout, TARGETS)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=device.type in ("cuda", "cpu") or None)
    flops = relora_flops_per_token(config, config.max_seq_len, rank, TARGETS) if method == "relora" else \
        model_flops_per_token(config, config.max_seq_len)
    return model, optimizer, flops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, method, compiled, device, batch, steps, warmup, dropout, rank, precision) -> dict:
    model, optimizer, flops = build(config, method, device, dropout, rank)
    forward = torch.compile(model) if compiled else model
    idx = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = forward(idx[:, :-1], targets=idx[:, 1:])  # as relora's trainer
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch * config.max_seq_len
    total, trainable = count_parameters(model)
    row = {"method": method, "compiled": compiled, "step_s": seconds, "tokens_per_s": tokens / seconds,
           "model_tflops": flops * tokens / seconds / 1e12, "flops_per_token": flops, "warmup_s": warm_s,
           "params": total, "trainable": trainable}
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def gemm_tflops(device, n: int) -> float:
    dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (d=96, 2 layers, vocab 512, seq 128)")
    parser.add_argument("--sizes", default="small,tiny", help="paper sizes to measure: small (d=384), tiny (d=96)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch sequences (default 8; --tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --tiny 3)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: by name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name), None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = args.batch or (4 if args.tiny else 8)
    steps = args.steps or (3 if args.tiny else 10)
    sizes = {"small": 384, "tiny": 96}
    if args.tiny:
        shapes = {"tiny-shape": paper_config(96, 128, vocab=512, n_layers=2)}
    else:
        shapes = {size: paper_config(sizes[size], PAPER["seq"]) for size in args.sizes.split(",")}
    gemm = gemm_tflops(device, 1024 if args.tiny or device.type == "cpu" else 8192)
    print(f"device: {name}; torch {torch.__version__}; {args.precision}; measured bf16 GEMM {gemm:.1f} TFLOP/s; "
          f"peak {peak or 'unknown'} TFLOP/s; micro-batch {batch} x seq {next(iter(shapes.values())).max_seq_len}")
    header = f"{'size':10} {'method':7} {'mode':8} {'step s':>8} {'tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'/GEMM':>6} {'warm s':>7} {'mem GB':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for size, config in shapes.items():
        for method in ("full", "relora"):
            for compiled in ((False,) if args.no_compile else (False, True)):
                row = measure(config, method, compiled, device, batch, steps, 3 if compiled else 2,
                              0.1, 16, args.precision)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the variant's model and optimizer are gone
                row.update(size=size, d_model=config.d_model)
                rows.append(row)
                mfu = row["model_tflops"] / peak if peak else float("nan")
                print(f"{size:10} {method:7} {'compiled' if compiled else 'eager':8} {row['step_s']:8.3f} "
                      f"{row['tokens_per_s']:11,.0f} {row['model_tflops']:8.2f} {mfu:6.1%} "
                      f"{row['model_tflops'] / gemm:6.1%} {row['warmup_s']:7.1f} {row.get('peak_memory_gb', float('nan')):7.1f}",
                      flush=True)

    # the paper's four runs: 20k updates x 1024 sequences x 2048 tokens each, at the best
    # measured mode of each (size, method); sizes not measured scale by model FLOPs per token
    tokens = PAPER["steps"] * PAPER["batch"] * PAPER["seq"]
    print(f"\nGPU-hours of the paper's four 20k-step runs ({tokens / 1e9:.1f}B tokens each) on this {name}:")
    best = {}
    for row in rows:
        key = (row["size"], row["method"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row
    total = 0.0
    for size in ("tiny", "small"):
        for method in ("full", "relora"):
            if (size, method) in best:
                rate, how = best[(size, method)]["tokens_per_s"], "measured"
            else:  # same achieved FLOP/s as the measured size, the other size's FLOPs per token
                ref = next((r for (s, m), r in best.items() if m == method), None)
                if ref is None:
                    continue
                other = paper_config(sizes[size], PAPER["seq"])
                flops = (model_flops_per_token(other, PAPER["seq"]) if method == "full" else
                         relora_flops_per_token(other, PAPER["seq"], 16, TARGETS))
                rate, how = ref["model_tflops"] * 1e12 / flops, f"{ref['size']}'s FLOP/s, extrapolated by FLOPs"
            hours = tokens / rate / 3600
            total += hours
            print(f"  {size:6} {method:7} {hours:8.1f} GPU-hours ({rate:,.0f} tok/s, {how})")
    if total:
        print(f"  total  {total:8.1f} GPU-hours on this device", end="")
        if peak:
            a100 = total * peak / PEAK_BF16["A100"]
            print(f"; about {a100:,.0f} A100-hours at equal MFU (paper: ~{PAPER['a100_hours_reported']:,})", end="")
        print()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "gemm_tflops": gemm, "peak_tflops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
