"""Where a training step's time goes: torch.profiler's top operators of one model step.

    python benchmarks/profile_step.py [--size d384] [--precision bf16] [--method full|relora]
                                      [--threads N] [--steps 2] [--top 20]

The step is the trainer's (fused LM head + loss, backward, fused AdamW) at a benchmark shape
(benchmarks/run.py SHAPES), with the kernels relora.autotune chooses there; the table gives each
operator's self CPU time over the profiled steps, and the header the step's model FLOPs against
the measured GEMM of the step's precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import SHAPES, TARGETS, autotune_kernels, gemm_seconds, machine, make_step, model_config, ours  # noqa: E402

from relora.model_config import model_flops_per_token, relora_flops_per_token  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="d384", choices=sorted(SHAPES))
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--method", default="full", choices=["full", "relora"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, vocab, seq, batch, rank = SHAPES[args.size]
    config = model_config(d, vocab, seq)
    kernels = autotune_kernels(config, batch, seq, args.precision)
    _, forward, optimizer = ours(config, args.method == "relora", rank)
    step, _ = make_step(forward, optimizer, vocab, batch, seq, args.precision)
    step()  # warm-up: optimizer state, first-call paths
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gemm = min(gemm_seconds(dtype) for _ in range(3))
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - started) / args.steps
    flops = (relora_flops_per_token(config, seq, rank, TARGETS) if args.method == "relora"
             else model_flops_per_token(config, seq)) * batch * seq
    gemm_rate = 2 * 2048**3 / gemm
    print(f"machine: {machine()}")
    print(f"{args.size} {args.precision} {args.method}: batch {batch} x {seq}, kernels {kernels}")
    print(f"step {seconds * 1e3:.0f} ms (profiled), model {flops / seconds / 1e9:.0f} GFLOP/s, "
          f"{args.precision} GEMM 2048^3 {gemm_rate / 1e9:.0f} GFLOP/s: {flops / seconds / gemm_rate:.2f} of it")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
