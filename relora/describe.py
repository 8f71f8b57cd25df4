"""What a study costs before it runs: parameters, FLOPs per token, optimizer state, tokens."""

from __future__ import annotations

import torch

from .checkpoint import build_model
from .config import resolve_run
from .lora import lora_modules
from .model import count_parameters, model_flops_per_token


def relora_flops_per_token(model, seq_len: int) -> float:
    """DESIGN 5: a frozen weight needs no weight gradient (4 FLOPs per parameter per token
    instead of 6) while every adapter parameter costs the usual 6."""
    full = model_flops_per_token(model.config, seq_len)
    frozen = sum(m.weight.numel() for m in lora_modules(model))
    adapter = sum(m.A_lora.numel() + m.B_lora.numel() for m in lora_modules(model))
    return full - 2 * frozen + 6 * adapter


def describe_run(run: dict) -> dict:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(run["model"], run["method"])
    total, trainable = count_parameters(model)
    seq_len = run["data"]["seq_len"]
    full_flops = model_flops_per_token(model.config, seq_len)
    flops = relora_flops_per_token(model, seq_len) if run["method"]["name"] == "relora" else full_flops
    training = run["training"]
    tokens = training["steps"] * training["batch_size"] * seq_len
    warm = run["method"].get("warm_start_steps", 0) * training["batch_size"] * seq_len
    return {
        "size": run["size"], "condition": run["condition"], "method": run["method"]["name"],
        "params_total": total, "params_trainable": trainable,
        "flops_per_token": flops, "flop_ratio_to_full": flops / full_flops,
        # AdamW keeps two fp32 moments per trainable parameter
        "optimizer_state_bytes": 2 * 4 * trainable,
        "tokens": tokens, "total_flops": full_flops * warm + flops * (tokens - warm),
    }


def describe_study(study: dict) -> list[dict]:
    seed = study["seeds"][0]
    return [describe_run(resolve_run(study, size, condition, seed))
            for size in study["sizes"] for condition in study["conditions"]]
