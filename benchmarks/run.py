"""All performance figures of the README (Benchmarks) in one table, each beside its baseline.

    python benchmarks/run.py [--repeats 5] [--quick] [--sizes tiny,small,d192,d384]
                             [--precisions fp32,bf16] [--skip-eval] [--skip-train] [--skip-user-path]
                             [--user-steps N] [--threads N]

Every figure and its baseline are measured in this one process, variants interleaved round by
round and repeated (these shared machines vary by 10-15% between processes, and by more from
minute to minute); the table gives medians and the ratio. "GEMM" is a 2048 x 2048 matmul on all
threads, timed in every round between the variants (fp32 for the MFU column; bf16 GEMM beside
it for bf16 rows). Model FLOPs follow docs/design.md, Model FLOPs
(relora.model_config.model_flops_per_token) and the ReLoRA FLOP bound
relora.model_config.relora_flops_per_token.

The user-path rows time what a user runs: whole `relora train` processes (data loading, the
autotune cache, metrics, checkpoints, resume state, publishing) on a generated data folder,
against a process running a bare loop of transformers' LlamaForCausalLM (+ peft) with fused AdamW
over the same batches; tokens / wall time of each process, best of two, interleaved. Every table
names the CPU, its ISA flags and the kernels the autotune chose (relora.autotune), and every row
its target.

Baselines: transformers LlamaForCausalLM (+ peft LoRA for ReLoRA, same rank, alpha, dropout,
targets and trainable set) with fused AdamW (transformers.Trainer's default optimizer for torch >=
2.8), run with glibc's default allocator settings as a user runs it; our rows run as relora's
trainer does on CPU (relora.optim.build_optimizer, relora.runtime.retain_freed_memory). Ablation
rows switch one of our changes back: glibc's default allocator, PyTorch's bernoulli_ dropout mask
instead of the SFC64 one, PyTorch's fused attention kernel instead of the small-head path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import relora.lora as lora_module  # noqa: E402
import relora.model as model_module  # noqa: E402
from relora.checkpoint import build_model  # noqa: E402
from relora.model import SmallHeadCausalAttention  # noqa: E402
from relora.model_config import (LINEAR_MODULES, ModelConfig, model_flops_per_token,  # noqa: E402
                                 relora_flops_per_token)
from relora.autotune import choose_kernels, cpu_flags, cpu_model, measure  # noqa: E402
from relora.optim import build_optimizer  # noqa: E402

TARGETS = list(LINEAR_MODULES)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (d_model, vocab, seq_len, batch, rank): the default study's sizes (seq 128, batch 16, as
# config.yaml) and the sizes the FLOP bound is quoted at (vocab 8192, seq 256)
SHAPES = {
    "tiny": (48, 8192, 128, 16, 8),
    "small": (96, 8192, 128, 16, 8),
    "d192": (192, 8192, 256, 8, 16),
    "d384": (384, 8192, 256, 8, 16),
}

# --- glibc allocator switch (in-process, so both settings share the machine's minute) ----------

_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def malloc_mode(mode: str) -> None:
    """`keep`: relora.runtime.retain_freed_memory. `default`: glibc's state once its dynamic mmap
    threshold has reached its 32 MiB maximum (where it sits after the first large free), so
    blocks of 32 MiB or more are mapped and unmapped on every use."""
    if _libc is None:
        return
    if mode == "keep":
        _libc.mallopt(M_MMAP_MAX, 0)
        _libc.mallopt(M_TRIM_THRESHOLD, -1)
    else:
        _libc.mallopt(M_MMAP_MAX, 65536)
        _libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        _libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


# --- switches back to the code before the optimisation, for the ablation rows --------------------

def bernoulli_keep_mask(x, p):
    return torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p)  # what F.dropout draws


# PyTorch's kernel where the model has its own beside it (relora.model.KERNEL_CHOICES): the
# "ours with PyTorch's kernels" rows. RoPE and the LM head's chunk have no PyTorch kernel.
PYTORCH_KERNELS = {"attention": "sdpa"}


@contextlib.contextmanager
def patched(keep_mask=None, kernels=None):
    saved = lora_module.dropout_keep_mask, dict(model_module.KERNELS)
    try:
        if keep_mask is not None:
            lora_module.dropout_keep_mask = keep_mask
        if kernels:
            model_module.set_kernels(kernels)
        yield
    finally:
        lora_module.dropout_keep_mask = saved[0]
        model_module.KERNELS.update(saved[1])


# --- models ----------------------------------------------------------------------------------

def model_config(d: int, vocab: int, seq: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=12, n_heads=12, n_kv_heads=4,
                       ffn_hidden=4 * d, max_seq_len=seq)


def ours(config: ModelConfig, relora: bool, rank: int, dropout: float = 0.0, mask: str = "per_adapter"):
    method = {"name": "relora", "rank": rank, "alpha": 2 * rank, "dropout": dropout, "dropout_mask": mask,
              "targets": TARGETS} if relora else {"name": "full"}
    model = build_model(config.to_dict(), method).train()
    optimizer = build_optimizer(model, {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                        "decay_on": "all"})
    # as relora's trainer calls it: the fused LM head + cross-entropy (no logits materialised)
    return model, (lambda idx, targets: model(idx, targets=targets)), optimizer


def hugging_face(config: ModelConfig, relora: bool, rank: int, dropout: float = 0.0):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).train()
    if relora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                           target_modules=HF_TARGETS))
        for name, p in model.named_parameters():  # ReLoRA also trains embeddings, norms and head
            if "lora_" not in name and ("embed" in name or "norm" in name or "lm_head" in name):
                p.requires_grad_(True)
    def forward(idx, targets):  # what LlamaForCausalLM(labels=...) computes, without its shift copy
        return F.cross_entropy(model(input_ids=idx).logits.float().flatten(0, 1), targets.flatten())

    # transformers.Trainer's default optimizer (optim="adamw_torch_fused" for torch >= 2.8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.01, fused=True)
    return model, forward, optimizer


def make_step(forward, optimizer, vocab: int, batch: int, seq: int, precision: str):
    """One optimizer update as relora's trainer runs it: forward + fp32 cross-entropy, backward, AdamW."""
    idx = torch.randint(0, vocab, (batch, seq + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = forward(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def optimizer_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.ndim > 0)


def gemm_seconds(dtype=torch.float32, n: int = 2048, _cache={}) -> float:
    if dtype not in _cache:
        _cache[dtype] = (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
        _cache[dtype][0] @ _cache[dtype][1]
    a, b = _cache[dtype]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)  # the best of three back-to-back calls: the GEMM limit of this minute


def interleave(variants: dict, repeats: int, gemm_dtypes=(torch.float32,)) -> tuple[dict, dict]:
    """Median seconds of each variant (a callable; a (callable, setup context) pair) and of the GEMM,
    all timed round by round."""
    times = {k: [] for k in variants}
    gemm = {dt: [] for dt in gemm_dtypes}
    for fn in variants.values():  # warm up: allocations, optimizer state, first-call paths
        fn()
    for _ in range(repeats):
        for dt in gemm_dtypes:
            gemm[dt].append(gemm_seconds(dt))
        for key, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return ({k: statistics.median(v) for k, v in times.items()},
            {dt: statistics.median(v) for dt, v in gemm.items()})


def with_setup(step, malloc="keep", keep_mask=None, kernels=None):
    def run():
        malloc_mode(malloc)
        with patched(keep_mask, kernels):
            step()
    return run


# --- training ----------------------------------------------------------------------------------

def autotune_kernels(config: ModelConfig, batch: int, seq: int, precision: str) -> dict:
    """The kernels `relora train` would use at this shape (relora.autotune: cached, else measured
    now and cached for the train processes of the user-path rows), set for this process."""
    run = {"model": config.to_dict(), "data": {"seq_len": seq}, "training": {"precision": precision, "kernels": {}}}
    kernels = choose_kernels(run, batch, "cpu")
    model_module.set_kernels(kernels)
    return kernels


def bench_training(name: str, precision: str, repeats: int, with_hf: bool, ablations: bool) -> list[dict]:
    d, vocab, seq, batch, rank = SHAPES[name]
    config = model_config(d, vocab, seq)
    tokens = batch * seq
    autotune_kernels(config, batch, seq, precision)
    built = {
        "ours full": ours(config, False, rank),
        "ours relora p=0": ours(config, True, rank),
        "ours relora p=0.1 per_adapter": ours(config, True, rank, 0.1),
        "ours relora p=0.1 shared": ours(config, True, rank, 0.1, "shared"),
    }
    if with_hf:
        built["hf llama full"] = hugging_face(config, False, rank)
        built["hf llama + peft p=0"] = hugging_face(config, True, rank)
        built["hf llama + peft p=0.1"] = hugging_face(config, True, rank, 0.1)
    steps = {k: make_step(fwd, opt, vocab, batch, seq, precision) for k, (_, fwd, opt) in built.items()}
    variants = {k: with_setup(s, "default" if k.startswith("hf") else "keep") for k, (s, _) in steps.items()}
    if ablations:
        variants["ours full, glibc default malloc"] = with_setup(steps["ours full"][0], "default")
        model, forward, _ = built["ours full"]
        loop_adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)  # PyTorch's CPU default
        variants["ours full, PyTorch default AdamW"] = with_setup(make_step(forward, loop_adamw, vocab, batch, seq,
                                                                            precision)[0])
        if any(model_module.KERNELS[k] != v for k, v in PYTORCH_KERNELS.items()):
            variants["ours full, PyTorch's kernels"] = with_setup(steps["ours full"][0], kernels=PYTORCH_KERNELS)
        variants["ours relora p=0.1 per_adapter, bernoulli_ mask"] = with_setup(
            steps["ours relora p=0.1 per_adapter"][0], keep_mask=bernoulli_keep_mask)
        variants["ours relora p=0.1 shared, bernoulli_ mask"] = with_setup(
            steps["ours relora p=0.1 shared"][0], keep_mask=bernoulli_keep_mask)
    gemm_dtypes = (torch.float32, torch.bfloat16) if precision == "bf16" else (torch.float32,)
    seconds, gemm = interleave(variants, repeats, gemm_dtypes)
    malloc_mode("keep")
    full_flops = model_flops_per_token(config, seq)
    relora_flops = relora_flops_per_token(config, seq, rank, TARGETS)
    gemm_flops = 2 * 2048**3 / gemm[torch.float32]
    rows = []
    for key, s in seconds.items():
        flops = full_flops if "full" in key else relora_flops
        base = key.split(",")[0]
        rows.append({"shape": name, "precision": precision, "variant": key, "step_s": s,
                     "tokens_per_s": tokens / s, "model_tflops": flops * tokens / s / 1e12,
                     "mfu_vs_gemm": flops * tokens / s / gemm_flops,
                     "optimizer_mb": optimizer_bytes(steps[base][1]) / 2**20 if base in steps else float("nan")})
    return rows, {"gemm_fp32_gflops": gemm_flops / 1e9, "kernels": dict(model_module.KERNELS),
                  "gemm_bf16_gflops": 2 * 2048**3 / gemm[torch.bfloat16] / 1e9 if torch.bfloat16 in gemm else None,
                  "flop_bound": relora_flops / full_flops}


def training_table(rows: list[dict], info: dict) -> list[str]:
    by = {r["variant"]: r for r in rows}
    lines = []
    full = by["ours full"]
    shape, precision = full["shape"], full["precision"]
    gemm = f"GEMM fp32 {info['gemm_fp32_gflops']:.0f} GFLOP/s" + (
        f", bf16 {info['gemm_bf16_gflops']:.0f}" if info["gemm_bf16_gflops"] else "")
    lines.append(f"[train {shape} {precision}, model step in this process] {gemm}; kernels {info['kernels']}")

    def line(figure, value, baseline_name, baseline, ratio, target=""):
        lines.append(f"  {figure:46} {value:>14} | {baseline_name:38} {baseline:>14} | {ratio:>7} {target}")

    fmt = lambda r: f"{r['tokens_per_s']:,.0f} tok/s"  # noqa: E731
    line("ours full: model FLOPs / GEMM", f"{full['model_tflops'] * 1e3:.0f} GFLOP/s", "GEMM fp32 2048^3",
         f"{info['gemm_fp32_gflops']:.0f} GFLOP/s", f"{full['mfu_vs_gemm']:.2f}",
         ">= 0.50 at d >= 192" if precision == "fp32" else "")
    if info["gemm_bf16_gflops"]:
        bf16_share = full["model_tflops"] * 1e3 / info["gemm_bf16_gflops"]
        line("ours full: model FLOPs / bf16 GEMM", f"{full['model_tflops'] * 1e3:.0f} GFLOP/s", "GEMM bf16 2048^3",
             f"{info['gemm_bf16_gflops']:.0f} GFLOP/s", f"{bf16_share:.2f}",
             (">= 0.40 (AMX)" if cpu_flags()["amx_bf16"] else ">= 0.50 (AVX-512 bf16)") if shape == "d384" else "")
    if "hf llama full" in by:
        target = {"tiny": ">= 1.20", "small": ">= 1.20", "d384": ">= 1.00"}.get(shape, "")
        line("ours full", fmt(full), "hf llama full", fmt(by["hf llama full"]),
             f"{full['tokens_per_s'] / by['hf llama full']['tokens_per_s']:.2f}x", target)
        for ours_key, hf_key in (("ours relora p=0", "hf llama + peft p=0"),
                                 ("ours relora p=0.1 per_adapter", "hf llama + peft p=0.1"),
                                 ("ours relora p=0.1 shared", "hf llama + peft p=0.1")):
            line(ours_key, fmt(by[ours_key]), hf_key, fmt(by[hf_key]),
                 f"{by[ours_key]['tokens_per_s'] / by[hf_key]['tokens_per_s']:.2f}x", ">= 1.30")
    measured = by["ours relora p=0"]["step_s"] / full["step_s"]
    line("ours relora p=0 step / full step", f"{measured:.3f}", "FLOP bound",
         f"{info['flop_bound']:.3f}", f"{measured / info['flop_bound']:.2f}x",
         "<= 1.15x at d384" if shape == "d384" else "")
    for mask in ("per_adapter", "shared"):
        key = f"ours relora p=0.1 {mask}"
        line(f"dropout 0.1 overhead, {mask}", f"{by[key]['step_s'] / by['ours relora p=0']['step_s'] - 1:+.1%}",
             "ours relora p=0", f"{by['ours relora p=0']['step_s'] * 1e3:.0f} ms", "")
        old = by.get(f"{key}, bernoulli_ mask")
        if old:
            line("  (with PyTorch's bernoulli_ mask)", f"{old['step_s'] / by['ours relora p=0']['step_s'] - 1:+.1%}",
                 "", "", f"{old['step_s'] / by[key]['step_s']:.2f}x")
    for key, what in (("ours full, glibc default malloc", "retained memory (mallopt) vs glibc default"),
                      ("ours full, PyTorch default AdamW", "fused AdamW vs PyTorch's default loop"),
                      ("ours full, PyTorch's kernels", "autotuned kernels vs PyTorch's")):
        if key in by:
            line(f"ours full: {what}", fmt(full), key.split(", ")[1], fmt(by[key]),
                 f"{full['tokens_per_s'] / by[key]['tokens_per_s']:.2f}x",
                 ">= 1.00" if key.endswith("kernels") else "")
    line("optimizer state relora / full", f"{by['ours relora p=0']['optimizer_mb']:.1f} MB", "ours full",
         f"{full['optimizer_mb']:.1f} MB", f"{by['ours relora p=0']['optimizer_mb'] / full['optimizer_mb']:.2f}x")
    return lines


def attention_variants(d: int, batch: int, seq: int) -> dict:
    """Forward + backward of one layer's causal GQA attention (12 query, 4 kv heads) by each path."""
    hs = d // 12
    # as the projections leave them: (B, T, heads, hs) memory seen as (B, heads, T, hs)
    q, k, v = (torch.randn(batch, seq, n, hs).transpose(1, 2).requires_grad_() for n in (12, 4, 4))
    grad = torch.randn(batch, seq, d)

    def sdpa():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y.transpose(1, 2).reshape(batch, seq, d).backward(grad)

    return {"small": lambda: SmallHeadCausalAttention.apply(q, k, v).backward(grad), "sdpa": sdpa}


def bench_attention(repeats: int) -> list[str]:
    """The small-head path against PyTorch's fused kernel, with what the autotune chooses there."""
    lines = ["[attention] one layer, forward + backward, fp32, 12 query / 4 kv heads"]
    for d, batch, seq in ((48, 16, 128), (96, 16, 128), (96, 4, 512), (192, 8, 256)):
        hs = d // 12
        seconds, _ = interleave(attention_variants(d, batch, seq), repeats * 4)
        model = {"d_model": d, "n_heads": 12, "n_kv_heads": 4, "vocab_size": 8192}
        used = measure(model, batch, seq, "fp32", "cpu", ["attention"])["kernels"]["attention"]
        used = "chosen" if used == "small_head" else "not chosen"
        lines.append("  {:46} {:>14} | {:38} {:>14} | {:>7}".format(
            f"small-head, hs {hs}, B {batch}, T {seq} ({used})", f"{seconds['small'] * 1e3:.1f} ms",
            "PyTorch SDPA (flash, CPU)", f"{seconds['sdpa'] * 1e3:.1f} ms", f"{seconds['sdpa'] / seconds['small']:.2f}x"))
    return lines


# --- the user's path: whole processes ----------------------------------------------------------

USER_STEPS = {"tiny": 60, "small": 40, "d192": 16, "d384": 10}  # about 10-40 s per process on 2 cores


def user_study(name: str, precision: str, steps: int) -> dict:
    d, vocab, seq, batch, rank = SHAPES[name]
    return {
        "study": "bench", "data": {"seq_len": seq, "tokenizer": {"vocab_size": vocab}},
        "sizes": {name: {"d_model": d, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4}},
        "training": {"steps": steps, "batch_size": batch, "lr": 1e-4, "precision": precision, "device": "cpu",
                     "schedule": {"name": "linear", "warmup": 2}, "checkpoint_every": steps // 2,
                     "save_state_every": steps // 2, "log_every": steps},
        # the paper's ReLoRA setting: dropout 0.1 on every linear, merges during the run
        "conditions": {"full": {"method": "full"},
                       "relora": {"method": "relora", "rank": rank, "alpha": 2 * rank, "dropout": 0.1,
                                  "reset_every": steps // 2, "restart_warmup": 1}},
        "seeds": [0],
    }


def hf_loop(spec: dict) -> None:
    """The baseline process: transformers' LlamaForCausalLM (+ peft) with fused AdamW over the
    batches `relora train` reads (relora.data.batches, same seed), nothing else."""
    from relora.data.batches import training_batches

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    d, vocab, seq, batch, rank = SHAPES[spec["name"]]
    config = model_config(d, vocab, seq)
    _, forward, optimizer = hugging_face(config, spec["relora"], rank, 0.1 if spec["relora"] else 0.0)
    batches = training_batches(Path(spec["data"]), seq, batch, 0, vocab)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    for k in range(1, spec["steps"] + 1):
        tokens = batches.batch(k)
        with autocast:
            loss = forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()


def bench_user_path(name: str, precision: str, repeats: int, steps: int | None = None) -> list[str]:
    """Tokens / wall time of whole processes: `relora train` (data loading, autotune cache,
    metrics, checkpoints, state and publishing included) against the bare transformers (+ peft)
    loop, each on the same batches, best of `repeats`, the four processes interleaved."""
    import tempfile

    import numpy as np
    import yaml

    d, vocab, seq, batch, rank = SHAPES[name]
    steps = steps or USER_STEPS[name]
    threads = torch.get_num_threads()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    kernels = autotune_kernels(model_config(d, vocab, seq), batch, seq, precision)
    with tempfile.TemporaryDirectory(prefix="relora-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        tokens = np.random.default_rng(0).integers(0, vocab, batch * steps * (seq + 1) + 1).astype(np.uint16)
        np.save(tmp / "data" / "train.npy", tokens)
        (tmp / "study.yaml").write_text(yaml.safe_dump(user_study(name, precision, steps)))

        def ours(condition):
            return [sys.executable, "-m", "relora.cli", "train", "-q", "--config", str(tmp / "study.yaml"),
                    "--size", name, "--condition", condition, "--seed", "0", "--data", str(tmp / "data"),
                    "--out", str(tmp / "runs" / condition), "--resume-dir", str(tmp / "resume" / condition),
                    "--threads", str(threads)]

        def theirs(relora):
            spec = {"name": name, "precision": precision, "steps": steps, "relora": relora, "threads": threads,
                    "data": str(tmp / "data")}
            return [sys.executable, str(Path(__file__).resolve()), "--hf-loop", json.dumps(spec)]

        commands = {"ours full": ours("full"), "transformers full": theirs(False),
                    "ours relora p=0.1": ours("relora"), "transformers + peft p=0.1": theirs(True)}
        best = {}
        for _ in range(repeats):
            for key, command in commands.items():
                if key.startswith("ours"):
                    shutil.rmtree(tmp / "runs", ignore_errors=True)  # our own folders: a fresh run each time
                start = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{key}: exit {done.returncode}\n{done.stderr[-3000:]}")
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    n = batch * seq * steps
    rate = {k: n / s for k, s in best.items()}
    target = {"full": ">= 1.20" if d <= 96 else ">= 1.00", "relora": ">= 1.30"}
    lines = [f"[user path {name} {precision}] whole processes, {steps} steps of {batch} x {seq} tokens, "
             f"{threads} threads, best of {repeats}; kernels {kernels}"]
    for ours_key, hf_key, kind in (("ours full", "transformers full", "full"),
                                   ("ours relora p=0.1", "transformers + peft p=0.1", "relora")):
        lines.append("  {:46} {:>14} | {:38} {:>14} | {:>7} {}".format(
            f"relora train {ours_key[5:]}", f"{rate[ours_key]:,.0f} tok/s", hf_key, f"{rate[hf_key]:,.0f} tok/s",
            f"{rate[ours_key] / rate[hf_key]:.2f}x", target[kind]))
    return lines


# --- evaluation and dynamics -----------------------------------------------------------------

def bench_evaluation(repeats: int, blimp_dir: Path | None) -> list[str]:
    import numpy as np

    from relora.evaluate import score_documents, score_sentence_naive, score_sentences
    from relora.model import PicoDecoder

    config = ModelConfig(vocab_size=8192, d_model=96, n_layers=12, n_heads=12, n_kv_heads=4,
                         ffn_hidden=384, max_seq_len=128)
    torch.manual_seed(0)
    model = PicoDecoder(config).eval()
    rng = np.random.default_rng(0)
    # BLiMP-like sentences: lengths of the real pairs when present (8-20 tokens), else 6-18
    lengths = rng.integers(6, 19, 2000)
    if blimp_dir and blimp_dir.is_dir():
        words = []
        for file in sorted(blimp_dir.glob("*.jsonl"))[:20]:
            for line in file.read_text().splitlines()[:50]:
                row = json.loads(line)
                words += [len(row["sentence_good"].split()) + 2, len(row["sentence_bad"].split()) + 2]
        lengths = np.asarray(words[:2000])
    sentences = [rng.integers(0, 8192, int(n)).tolist() for n in lengths]
    pairs = len(sentences) // 2
    naive_subset = sentences[:40]
    docs = [rng.integers(0, 8192, int(n)).tolist() for n in rng.integers(20, 600, 150)]
    n_predicted = sum(len(d) - 1 for d in docs)

    variants = {
        "blimp bucketed (batch_tokens 16384)": lambda: score_sentences(model, sentences, 0, batch_tokens=16384),
        "blimp bucketed (batch_tokens 4096)": lambda: score_sentences(model, sentences, 0, batch_tokens=4096),
        "blimp one sentence at a time (40)": lambda: [score_sentence_naive(model, s, 0) for s in naive_subset],
        "perplexity batch_tokens 65536": lambda: score_documents(model, docs, None, stride=64, batch_tokens=65536),
        "perplexity batch_tokens 4096": lambda: score_documents(model, docs, None, stride=64, batch_tokens=4096),
        "perplexity batch_tokens 512": lambda: score_documents(model, docs, None, stride=64, batch_tokens=512),
    }
    seconds, _ = interleave(variants, repeats)
    per = lambda key, n: n / seconds[key]  # noqa: E731
    big, mid, naive = (per("blimp bucketed (batch_tokens 16384)", pairs), per("blimp bucketed (batch_tokens 4096)", pairs),
                       per("blimp one sentence at a time (40)", len(naive_subset) / 2))
    lines = [f"[evaluate] model d=96, 12 layers, vocab 8192, context 128; {pairs} pairs, {len(docs)} documents"]
    fmt = "  {:46} {:>14} | {:38} {:>14} | {:>7}"
    lines.append(fmt.format("BLiMP length-bucketed, 16k tokens/batch", f"{big:,.0f} pairs/s",
                            "one sentence at a time, full logits", f"{naive:,.0f} pairs/s", f"{big / naive:.1f}x"))
    lines.append(fmt.format("BLiMP length-bucketed, 4k tokens/batch", f"{mid:,.0f} pairs/s",
                            "one sentence at a time, full logits", f"{naive:,.0f} pairs/s", f"{mid / naive:.1f}x"))
    p64, p4, p05 = (per(f"perplexity batch_tokens {n}", n_predicted) for n in (65536, 4096, 512))
    lines.append(fmt.format("perplexity, 64k tokens/batch", f"{p64:,.0f} tok/s", "512 tokens/batch",
                            f"{p05:,.0f} tok/s", f"{p64 / p05:.1f}x"))
    lines.append(fmt.format("perplexity, 4k tokens/batch (default)", f"{p4:,.0f} tok/s", "512 tokens/batch",
                            f"{p05:,.0f} tok/s", f"{p4 / p05:.1f}x"))
    return lines


def bench_dynamics(repeats: int) -> list[str]:
    from bench_evaluate_dynamics import relora_snapshot

    from relora.dynamics import matrix_metrics, snapshot_targets, spectra_rows

    config = ModelConfig(vocab_size=512, d_model=384, n_layers=12, n_heads=12, n_kv_heads=4,
                         ffn_hidden=1536, max_seq_len=16)
    snap, initial = relora_snapshot(config, 16, 1), relora_snapshot(config, 16, 0)
    items, extra = snapshot_targets(snap, initial, None, ("weight", "update", "adapter"))

    def loop():
        for M in extra.values():
            torch.linalg.svdvals(M)
        for t in items:
            matrix_metrics(t.matrix, t.stored_dtype)

    seconds, _ = interleave({"batched": lambda: spectra_rows(items, extra), "loop": loop}, repeats)
    return [f"[dynamics] spectra of one d=384, 12-layer ReLoRA checkpoint: {len(items)} matrices "
            f"(weight, update, adapter) + {len(extra)} norms, float64",
            "  {:46} {:>14} | {:38} {:>14} | {:>7}".format(
                "batched svdvals per shape", f"{seconds['batched']:.2f} s", "one svdvals per matrix (loop)",
                f"{seconds['loop']:.2f} s", f"{seconds['loop'] / seconds['batched']:.2f}x")]


def bench_startup(repeats: int) -> list[str]:
    """Wall time of `relora --help` (process start-up and imports), and the heaviest imports."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "relora.cli", "--help"], env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    bare = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, check=True)
        bare.append(time.perf_counter() - start)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "relora.cli", "--help"], env=env,
                         capture_output=True, text=True).stderr
    cumulative = []
    for row in out.splitlines():
        parts = row.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            if len(name) - len(name.lstrip()) <= 1:  # top-level imports only
                cumulative.append((int(parts[1]) / 1e6, name.strip()))
    top = ", ".join(f"{n} {s:.2f}s" for s, n in sorted(cumulative, reverse=True)[:4])
    return ["[startup] python -m relora.cli --help",
            "  {:46} {:>14} | {:38} {:>14} | {:>7}".format(
                "relora --help wall time", f"{statistics.median(times):.2f} s", "python -c 'import torch'",
                f"{statistics.median(bare):.2f} s", f"{statistics.median(times) / statistics.median(bare):.2f}x"),
            f"  heaviest top-level imports: {top}"]


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    flags = " ".join(f"{flag}{'+' if present else '-'}" for flag, present in cpu_flags().items())
    return (f"{cpu_model()} ({flags}), {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), load average {load}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,small,d192,d384")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="tiny and d384 in fp32, 3 repeats")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-user-path", action="store_true", help="no whole-process `relora train` rows")
    parser.add_argument("--user-steps", type=int, default=None, help="steps per user-path process (default: by size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a loaded machine 1 avoids waiting for a descheduled thread")
    parser.add_argument("--hf-loop", default=None, help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--blimp-dir", type=Path, default=os.environ.get("RELORA_BLIMP_DIR"),
                        help="published BLiMP's <UID>.jsonl files, for real sentence lengths "
                             "(default: $RELORA_BLIMP_DIR; without it, 6-18 tokens)")
    args = parser.parse_args()
    if args.hf_loop:
        return hf_loop(json.loads(args.hf_loop))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.precisions, args.repeats = "tiny,d384", "fp32", 3
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.manual_seed(0)
    malloc_mode("keep")
    print(f"machine: {machine()}")
    print(f"{'figure':48} {'value':>14} | {'baseline (same run)':38} {'value':>14} | {'ratio':>7} target")
    print("-" * 140)
    if not args.skip_train:
        print("\n".join(bench_attention(args.repeats)), flush=True)
        bf16_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        for precision in args.precisions.split(","):
            if precision == "bf16" and not bf16_ok:
                print("[train bf16] skipped: this CPU has no native bf16")
                continue
            for name in args.sizes.split(","):
                print(f"machine: {machine()}")
                rows, info = bench_training(name, precision, args.repeats, not args.no_hf, not args.no_ablations)
                print("\n".join(training_table(rows, info)), flush=True)
                if not args.skip_user_path and not args.no_hf:
                    print("\n".join(bench_user_path(name, precision, 1 if args.quick else 2, args.user_steps)),
                          flush=True)
    if not args.skip_eval:
        print("\n".join(bench_evaluation(args.repeats, args.blimp_dir)), flush=True)
        print("\n".join(bench_dynamics(max(2, args.repeats // 2))), flush=True)
        print("\n".join(bench_startup(args.repeats)), flush=True)
    print(f"machine at the end: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
