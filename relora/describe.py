"""What a study costs before it runs: parameters, FLOPs per token, optimizer state, tokens, and
the learning rate of the first update after a ReLoRA merge beside the paper's."""

from __future__ import annotations

import torch

from .checkpoint import build_model
from .config import micro_batch_and_accumulation, resolve_run, runs, training_devices
from .memory import GIB, training_memory
from .model import count_parameters
from .model_config import ModelConfig, training_flops
from .optim import lr_factor

# The paper's ReLoRA recipe (arXiv 2509.12960, as in workflow/studies/paper.yaml): peak LR 3e-4,
# jagged cosine with first warmup W = 2000, reset period R = 2000, re-warmup w = 100, floor
# m = 0.1 and horizon T = 200k; its first merge follows update 2001.
PAPER_RELORA = {"lr": 3.0e-4, "first_merge": 2001,
                "schedule": {"name": "jagged_cosine", "warmup": 2000, "horizon": 200_000, "min_ratio": 0.1,
                             "reset_every": 2000, "restart_warmup": 100}}


def lr_after_merge(lr: float, schedule: dict, merge_step: int) -> float:
    """Learning rate of the first update after the merge that follows update k = merge_step:
    update k + 1 runs with lr * f(k) (k mod R == 1, so f(k) = (1 / w) x the cosine's value)."""
    return lr * lr_factor(merge_step, schedule)


def paper_lr_after_merge() -> float:
    """The same for the paper's recipe: 3e-4 * f(2001), from the paper's schedule formula."""
    return lr_after_merge(PAPER_RELORA["lr"], PAPER_RELORA["schedule"], PAPER_RELORA["first_merge"])


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes of one checkpoint's tensors: every entry of the state dict (parameters, adapters
    A and B included, and persistent buffers) at its stored dtype; the file adds a small header
    and config.json."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def describe_run(run: dict, eval_tokens: int | None = None, devices: int = 1) -> dict:
    """One run's sizes and costs. `eval_tokens`: tokens scored per evaluation (held-out
    documents and BLiMP sentences), when known, for the evaluation FLOPs."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(run["model"], run["method"])
    total, trainable = count_parameters(model)
    flops = training_flops(run)
    training = run["training"]
    merges = run["steps"]["merge"]
    after_merge = lr_after_merge(training["lr"], training["schedule"], merges[0]) if merges else None
    return {
        "size": run["size"], "condition": run["condition"], "method": run["method"]["name"],
        "params_total": total, "params_trainable": trainable,
        "flops_per_token": flops["flops_per_token"],
        "flop_ratio_to_full": flops["flops_per_token"] / flops["full_flops_per_token"],
        # AdamW keeps two fp32 moments per trainable parameter
        "optimizer_state_bytes": 2 * 4 * trainable,
        "tokens": training["steps"] * flops["tokens_per_step"], "total_flops": flops["total"],
        # the step size right after a reset, the run's (first merge) and the paper's: with a short
        # reset period the re-warmup 1 / w cannot be the paper's 1 / 100, and this shows how far off
        "n_merges": len(merges),
        "lr_after_merge": after_merge,
        "paper_lr_after_merge": paper_lr_after_merge() if merges else None,
        "lr_after_merge_over_paper": after_merge / paper_lr_after_merge() if merges else None,
        # every evaluated (and analysed) step is a checkpoint kept on disk
        "n_checkpoints": len(run["steps"]["checkpoint"]),
        "checkpoint_bytes": checkpoint_bytes(model),
        "checkpoints_disk_bytes": len(run["steps"]["checkpoint"]) * checkpoint_bytes(model),
        "n_evaluations": len(run["steps"]["evaluation"]),
        "n_analyses": len(run["steps"]["analysis"]),  # checkpoints `relora dynamics` analyses
        "evaluation_steps": run["steps"]["evaluation"],
        "analysis_steps": run["steps"]["analysis"],
        # evaluation scores the effective weights in a plain decoder: a forward pass, a third of
        # the training FLOPs per token of the full-rank model
        "eval_flops": (len(run["steps"]["evaluation"]) * eval_tokens * flops["full_flops_per_token"] / 3
                       if eval_tokens is not None else None),
        **describe_memory(run, devices),
    }


def describe_memory(run: dict, devices: int) -> dict:
    """Sequences per pass on each device, passes per update, and the estimated peak GPU memory
    of a pass (relora/memory.py) in GiB."""
    training = run["training"]
    micro, accum = micro_batch_and_accumulation(training, devices)
    memory = training_memory(ModelConfig(**run["model"]), micro, run["method"], training["precision"],
                             training["activation_checkpointing"])
    return {"devices": devices, "micro_batch_size": micro, "grad_accum": accum,
            "activation_checkpointing": training["activation_checkpointing"],
            "gpu_memory_gib": memory["peak"] / GIB}


def describe_study(study: dict, eval_tokens: int | None = None) -> list[dict]:
    """One row per (size, condition) the study runs, described at the condition's first seed."""
    devices = training_devices(study)
    first = {}
    for size, condition, seed in runs(study):
        first.setdefault((size, condition), seed)
    return [describe_run(resolve_run(study, size, condition, seed), eval_tokens, devices)
            for (size, condition), seed in first.items()]


def compact_steps(steps: list[int]) -> str:
    """Sorted steps as runs of a common stride: [0, 50, 100, 150, 2100] -> '0..150/50, 2100'.
    A run needs at least three steps; the text lists every step exactly once."""
    parts, i = [], 0
    while i < len(steps):
        j = i + 1
        if j + 1 < len(steps) and steps[j] - steps[i] == steps[j + 1] - steps[j]:
            stride = steps[j] - steps[i]
            while j + 1 < len(steps) and steps[j + 1] - steps[j] == stride:
                j += 1
            parts.append(f"{steps[i]}..{steps[j]}/{stride}")
            i = j + 1
        else:
            parts.append(str(steps[i]))
            i += 1
    return ", ".join(parts)
