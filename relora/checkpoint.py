"""Checkpoints: safetensors weights under the reference's module names, plus config.json.

A checkpoint directory `step_<k>/` holds `model.safetensors` and `config.json` with the model
config, the method (for ReLoRA: rank, alpha, scale, targets, so `W + scale * B A` and the
adapter are both recoverable), the step, and the sha256 of the weights file, which is checked
on load so that a truncated or altered checkpoint is reported before anything is computed
from it. Files are written under temporary names and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .io import atomic_write_text, replace_dir, sha256_file  # noqa: F401 (re-exported)
from .lora import wrap_with_lora
from .model import ModelConfig, PicoDecoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint or resume state could not be written (a full disk, a quota); the message
    names the file, and the previous checkpoints and state are left as they were."""


def build_model(model: dict | ModelConfig, method: dict) -> PicoDecoder:
    """A PicoDecoder for a model config, with adapters in place when the method is ReLoRA."""
    config = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    net = PicoDecoder(config)
    if method.get("name") == "relora" and method.get("attached", True):
        wrap_with_lora(net, method["rank"], method["alpha"], method.get("dropout", 0.0), method["targets"],
                       method.get("dropout_mask", "per_adapter"))
    return net


def save_checkpoint(model: torch.nn.Module, step_dir: Path, model_config: dict, method: dict,
                    step: int, extra: dict | None = None) -> Path:
    """Write step_dir atomically: a temporary directory renamed into place."""
    from safetensors.torch import save_file

    step_dir = Path(step_dir)
    tmp = step_dir.with_name(f".{step_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS)
        meta = {"model": model_config, "method": method, "step": step,
                "sha256": sha256_file(tmp / WEIGHTS), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    except Exception as e:  # OSError, or safetensors' error wrapping one (a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"{step_dir}: could not write the checkpoint ({e}); "
                                   "the checkpoints written before are unchanged") from e
    try:  # an existing step_dir is replaced only when it is a checkpoint (an earlier write of it)
        replace_dir(tmp, step_dir, CONFIG)
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(str(e)) from None
    return step_dir


def read_checkpoint_meta(step_dir: Path) -> dict:
    path = Path(step_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint config not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def verify_weights(step_dir: Path) -> None:
    """Check the weights of a checkpoint against the sha256 in its config.json (a checkpoint
    without one, e.g. a Hugging Face download, is not checked): a command that reads many
    checkpoints calls this for all of them before computing anything from the first."""
    meta = read_checkpoint_meta(step_dir)
    weights = Path(step_dir) / WEIGHTS
    if meta.get("sha256") and weights.is_file() and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from {CONFIG} (truncated or altered checkpoint)")


def load_checkpoint(step_dir: Path, device: str | torch.device = "cpu", verify: bool = True):
    """(model in eval mode, meta) from a checkpoint directory, whatever its condition."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    meta = read_checkpoint_meta(step_dir)
    weights = step_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint weights not found")
    if verify and "sha256" in meta and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from {CONFIG} (truncated or altered checkpoint)")
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable checkpoint ({e})") from None
    model = build_model(meta["model"], meta["method"]).to(device)
    load_state_dict(model, state, source=str(weights))
    return model.eval(), meta


def load_state_dict(model: torch.nn.Module, state: dict, source: str = "state dict") -> None:
    """Load by the reference's module names, with or without the `pico_decoder.` prefix of the
    paper's released checkpoints; a mismatch names the missing and unexpected keys."""
    state = {k.removeprefix("pico_decoder."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"shape of {k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointError(f"{source}: does not match the model config: {'; '.join(details)}")
    model.load_state_dict(state)
