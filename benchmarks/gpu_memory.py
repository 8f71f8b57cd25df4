"""Peak GPU memory of one training micro-step, measured beside relora/memory.py's estimate.

    python benchmarks/gpu_memory.py                          # on a GPU: the paper's small at micro-batch 16
    python benchmarks/gpu_memory.py --size small --micro-batch 64 --checkpointing both
    python benchmarks/gpu_memory.py --tiny                   # small shapes, runs anywhere (CPU: shows it works)

For each method (full-rank; ReLoRA r=16, alpha=32, dropout 0.1 on every linear) it builds the
model as the trainer does, takes one warm-up step (so AdamW's moments exist, as in every later
step), resets the peak statistics and measures a second step: the forward and backward of one
micro-batch under bf16 autocast, the optimizer step and zero_grad. On CUDA it prints
torch.cuda.max_memory_allocated (what the estimate models) and max_memory_reserved (with the
allocator's fragmentation) beside the estimate; on CPU, where peak allocator memory is not
measured, the bytes autograd saved (saved-tensor hooks, each storage once) beside the estimate's
activations and bf16 weight copies (CPU attention and LM-head chunks differ from CUDA's, so these
agree only roughly). Imports only torch and relora's torch-only modules: the GPU machines have no PyYAML
or jsonschema.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relora.lora import wrap_with_lora  # noqa: E402
from relora.memory import GIB, training_memory  # noqa: E402
from relora.model import PicoDecoder  # noqa: E402
from relora.model_config import LINEAR_MODULES, ModelConfig  # noqa: E402
from relora.optim import build_optimizer  # noqa: E402

TARGETS = list(LINEAR_MODULES)
# the paper's shapes (workflow/studies/paper.yaml) and a tiny stand-in for machines without a GPU
SIZES = {"tiny": 96, "small": 384}
OPTIMIZER = {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "decay_on": "all"}


def model_config(d_model: int, tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                           max_seq_len=128)
    return ModelConfig(vocab_size=50304, d_model=d_model, n_layers=12, n_heads=12, n_kv_heads=4,
                       ffn_hidden=4 * d_model, max_seq_len=2048)


def method_spec(name: str) -> dict:
    if name == "full":
        return {"name": "full"}
    return {"name": "relora", "rank": 16, "alpha": 32, "targets": TARGETS, "dropout": 0.1,
            "dropout_mask": "per_adapter"}


def measure(config: ModelConfig, method: dict, micro_batch: int, checkpointing: bool, device) -> dict:
    torch.manual_seed(0)
    model = PicoDecoder(config)
    if method["name"] == "relora":
        wrap_with_lora(model, method["rank"], method["alpha"], method["dropout"], method["targets"],
                       method["dropout_mask"])
    model = model.to(device).train()
    model.activation_checkpointing = checkpointing
    optimizer = build_optimizer(model, OPTIMIZER)
    idx = torch.randint(0, config.vocab_size, (micro_batch, config.max_seq_len + 1), device=device)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def step(count_saved: bool):
        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved
                 else contextlib.nullcontext())
        with hooks, torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(idx[:, :-1], targets=idx[:, 1:])  # as the trainer: the fused LM head
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(False)  # AdamW's moments now exist, as in every later step
    row = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        row["loss"] = step(False)
        torch.cuda.synchronize(device)
        row.update(allocated_before_gib=before / GIB,
                   measured_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    else:  # parameter storages are not activations
        row["loss"] = step(True)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        row["saved_activations_gib"] = sum(n for ptr, n in saved.items() if ptr not in params) / GIB
    del model, optimizer
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small", help="the paper's model size (default small)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per pass (default 16; --tiny 4)")
    parser.add_argument("--methods", nargs="+", choices=["full", "relora"], default=["full", "relora"])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                        help="activation checkpointing (default off)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (d=64, 2 layers, seq 128): runs on CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    micro = args.micro_batch or (4 if args.tiny else 16)
    config = model_config(SIZES[args.size], args.tiny)
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {name}; d={config.d_model}, {config.n_layers} layers, seq {config.max_seq_len}, "
          f"vocab {config.vocab_size}; micro-batch {micro}; bf16 autocast")
    rows = []
    for method_name in args.methods:
        for checkpointing in flags:
            method = method_spec(method_name)
            estimate = training_memory(config, micro, method, "bf16", checkpointing)
            row = {"size": "tiny-test" if args.tiny else args.size, "method": method_name,
                   "checkpointing": checkpointing, "micro_batch": micro,
                   **{f"estimate_{k}_gib": v / GIB for k, v in estimate.items()}}
            row.update(measure(config, method, micro, checkpointing, device))
            if "measured_gib" in row:
                row["estimate_over_measured"] = row["estimate_peak_gib"] / row["measured_gib"]
                print(f"{method_name:>6} checkpointing {checkpointing!s:>5}: estimate {row['estimate_peak_gib']:.2f} "
                      f"GiB, max_memory_allocated {row['measured_gib']:.2f} GiB (reserved {row['reserved_gib']:.2f}), "
                      f"estimate / measured {row['estimate_over_measured']:.3f}")
            else:
                saved_estimate = row["estimate_activations_gib"] + row["estimate_weight_copies_gib"]
                print(f"{method_name:>6} checkpointing {checkpointing!s:>5}: estimate {row['estimate_peak_gib']:.4f} "
                      f"GiB, of which saved for the backward {saved_estimate:.4f} (activations and bf16 weight "
                      f"copies); autograd saved {row['saved_activations_gib']:.4f} GiB (no CUDA: peak "
                      "allocator memory not measured)")
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
