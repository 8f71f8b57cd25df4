"""Checkpoints: writing this project's, and the one reader for every checkpoint a stage reads.

This project's layout: a directory `step_<k>/` holds `model.safetensors` (the reference's module
names; a ReLoRA linear stores `weight`, `A_lora` and `B_lora` separately) and `config.json` with
the model config, the method (for ReLoRA: rank, alpha, scale, targets, so `W + scale * B A` and
the adapter are both recoverable), the step, and the sha256 of the weights file. Folders are
written under a temporary name and renamed into place.

The paper's released checkpoints are Hugging Face folders: Pico's config keys in config.json and
the weights under Pico's names, possibly prefixed (`pico_decoder.`, or `_orig_mod.` / `module.`
from torch.compile and DDP), in model.safetensors or an older pytorch_model.bin. Both layouts are
read by `load_snapshot`; `load_checkpoint` rebuilds the trained module (with its adapters) from
this project's layout. Either way a weights file is checked against the sha256 in its config.json
once (`verify_weights`), before anything is computed from it, so a truncated or altered
checkpoint is reported by name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model_config import LINEAR_PARENTS, adapter_scale, linear_key
from .io import atomic_dir, sha256_file
from .lora import wrap_with_lora
from .model import ModelConfig, PicoDecoder, rope_tables

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "pytorch_model.bin"  # older Hugging Face uploads
CONFIG = "config.json"
# prefixes of released state dicts: Pico's module name, torch.compile's wrapper, DDP's wrapper
STATE_PREFIXES = ("pico_decoder.", "_orig_mod.", "module.")
# Pico's Hugging Face config keys -> ModelConfig fields
HF_CONFIG_KEYS = {"vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers",
                  "attention_n_heads": "n_heads", "attention_n_kv_heads": "n_kv_heads",
                  "activation_hidden_dim": "ffn_hidden", "max_seq_len": "max_seq_len",
                  "position_emb_theta": "rope_theta", "norm_eps": "norm_eps"}
HF_OPTIONAL_KEYS = ("position_emb_theta", "norm_eps")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder, config or weights file that is not there."""


class CheckpointWriteError(OSError):
    """A checkpoint or resume state could not be written (a full disk, a quota); the message
    names the file, and the previous checkpoints and state are left as they were."""


# ----------------------------------------------------------------------------------------------
# Writing


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
    """Write step_dir atomically: a temporary directory renamed into place. An existing step_dir
    is replaced only when it is a checkpoint (an earlier write of it)."""
    from safetensors.torch import save_file

    step_dir = Path(step_dir)
    try:
        with atomic_dir(step_dir, CONFIG) as tmp:
            try:
                state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
                save_file(state, tmp / WEIGHTS)
                meta = {"model": model_config, "method": method, "step": step,
                        "sha256": sha256_file(tmp / WEIGHTS), **(extra or {})}
                (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
            except Exception as e:  # OSError, or safetensors' error wrapping one (a full disk)
                raise CheckpointWriteError(f"{step_dir}: could not write the checkpoint ({e}); "
                                           "the checkpoints written before are unchanged") from e
    except CheckpointWriteError:
        raise
    except ValueError as e:  # step_dir exists and is not a checkpoint
        raise CheckpointWriteError(str(e)) from None
    except OSError as e:  # the temporary folder could not be made
        raise CheckpointWriteError(f"{step_dir}: could not write the checkpoint ({e}); "
                                   "the checkpoints written before are unchanged") from e
    return step_dir


# ----------------------------------------------------------------------------------------------
# Reading: folder, config, verification, tensors


def step_dir(checkpoints: Path, step: int) -> Path:
    """checkpoints/step_<k>, with an error naming the folder (and what exists) when absent."""
    path = Path(checkpoints) / f"step_{step}"
    if not path.is_dir():
        have = sorted(p.name for p in Path(checkpoints).glob("step_*")) if Path(checkpoints).is_dir() else []
        raise CheckpointNotFoundError(f"{path}: no checkpoint at step {step} "
                                      f"(found: {', '.join(have) if have else 'none'})")
    return path


def read_checkpoint_meta(step_dir: Path) -> dict:
    """config.json of a checkpoint folder (either layout)."""
    path = Path(step_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: checkpoint config not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


@dataclass(frozen=True)
class Verified:
    """A weights file as it was when its sha256 matched its config.json. A stage checks every
    checkpoint before it computes anything, then loads them one at a time (some twice): a file
    still the same (size, modification time, inode) is not hashed again."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "Verified":
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ino)

    def unchanged(self, path: Path) -> bool:
        try:
            return str(path) == self.path and Verified.of(path) == self
        except OSError:
            return False


def verify_weights(step_dir: Path, meta: dict | None = None,
                   verified: Verified | None = None) -> Verified | None:
    """Check model.safetensors of a checkpoint against the sha256 in its config.json: the one
    verification every reader uses. A checkpoint without a recorded sha256 (a Hugging Face
    download) is not checked (None). `verified`: an earlier success for this file, trusted while
    the file is unchanged."""
    meta = read_checkpoint_meta(step_dir) if meta is None else meta
    weights = Path(step_dir) / WEIGHTS
    if not meta.get("sha256") or not weights.is_file():
        return None
    if verified is not None and verified.unchanged(weights):
        return verified
    if sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from {CONFIG} (truncated or altered checkpoint)")
    return Verified.of(weights)


def strip_prefixes(state: dict) -> dict:
    """A state dict under the reference's module names: released checkpoints' prefixes removed."""
    out = {}
    for key, value in state.items():
        for prefix in STATE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_tensors(step_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The stored tensors of a checkpoint folder under the reference's names (no verification:
    `verify_weights` does that)."""
    step_dir = Path(step_dir)
    weights = step_dir / WEIGHTS
    if weights.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights), device=str(device))
        except Exception as e:  # safetensors raises its own error types, or an OSError
            raise CheckpointError(f"{weights}: unreadable checkpoint ({e})") from None
    elif (step_dir / LEGACY_WEIGHTS).is_file():
        state = torch.load(step_dir / LEGACY_WEIGHTS, map_location=device, weights_only=True)
    else:
        raise CheckpointNotFoundError(f"{weights}: checkpoint weights not found")
    return strip_prefixes(state)


# ----------------------------------------------------------------------------------------------
# Snapshots: a checkpoint of any condition and either layout


@dataclass
class Snapshot:
    """One checkpoint's stored tensors (reference names) and what is needed to read them."""

    path: Path
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    step: int | None = None
    scale: float | None = None  # adapter scale alpha / r, when the checkpoint has adapters
    layout: str = "relora"  # "relora" (this project) or "huggingface" (the paper's releases)
    meta: dict = field(default_factory=dict)

    def has_adapter(self, layer: int, module: str) -> bool:
        return f"{linear_key(layer, module)}.A_lora" in self.tensors

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """The stored (frozen, for ReLoRA) weight W, out x in, in its stored dtype."""
        return self.tensors[f"{linear_key(layer, module)}.weight"]

    def adapter(self, layer: int, module: str) -> torch.Tensor | None:
        """scale * B @ A in float64 from the stored factors; None for a plain linear."""
        if not self.has_adapter(layer, module):
            return None
        key = linear_key(layer, module)
        A, B = self.tensors[f"{key}.A_lora"].double(), self.tensors[f"{key}.B_lora"].double()
        return self.scale * (B @ A)  # (out, r) @ (r, in)

    def effective_weight(self, layer: int, module: str) -> torch.Tensor:
        """W + scale * B @ A in float64 (W for a plain linear)."""
        W = self.weight(layer, module).double()
        delta = self.adapter(layer, module)
        return W if delta is None else W + delta

    def effective_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """A plain PicoDecoder state dict with every adapter folded into its weight."""
        state = {k: v.to(dtype) for k, v in self.tensors.items() if not k.endswith(("A_lora", "B_lora"))}
        for layer in range(self.config.n_layers):
            for module in LINEAR_PARENTS:
                if self.has_adapter(layer, module):
                    state[f"{linear_key(layer, module)}.weight"] = self.effective_weight(layer, module).to(dtype)
        return state

    def model(self, device="cpu", dtype=torch.float32) -> PicoDecoder:
        """A plain decoder computing what the checkpoint computes (adapter dropout off), eval mode."""
        with torch.device("meta"):
            model = PicoDecoder(self.config)
        model = model.to_empty(device=device)
        model.load_state_dict(self.effective_state_dict(dtype), strict=True)
        # the RoPE tables are not in the state dict (non-persistent): rebuild them on the device
        model.rope_cos, model.rope_sin = rope_tables(self.config.head_dim, self.config.max_seq_len,
                                                     self.config.rope_theta, device)
        return model.to(dtype).eval()


def _hf_scale(config: dict) -> float | None:
    """An adapter scale from a Hugging Face config, if it records one."""
    for section in (config, config.get("relora") or {}, config.get("lora") or {}, config.get("method") or {}):
        if not isinstance(section, dict):
            continue
        if "scale" in section:
            return float(section["scale"])
        alpha = section.get("lora_alpha", section.get("alpha"))
        rank = section.get("lora_r", section.get("r", section.get("rank")))
        if alpha is not None and rank:
            return adapter_scale(float(alpha), float(rank))
    return None


def _config_of(raw: dict, config_path: Path) -> tuple[str, ModelConfig, float | None]:
    """(layout, model config, stored adapter scale or None) from a checkpoint's config.json."""
    if isinstance(raw.get("model"), dict):  # this project's layout
        try:
            config = ModelConfig(**raw["model"])
        except TypeError as e:
            raise CheckpointError(f"{config_path}: model section does not describe a Pico decoder: {e}") from None
        method = raw.get("method") or {}
        scale = method.get("scale")
        if scale is None and method.get("alpha") is not None and method.get("rank"):
            scale = adapter_scale(method["alpha"], method["rank"])
        return "relora", config, scale
    if "d_model" in raw:  # the paper's Hugging Face releases
        missing = [k for k in HF_CONFIG_KEYS if k not in raw and k not in HF_OPTIONAL_KEYS]
        if missing:
            raise CheckpointError(f"{config_path}: Pico config lacks {', '.join(missing)}")
        config = ModelConfig(**{field_: raw[key] for key, field_ in HF_CONFIG_KEYS.items() if key in raw})
        return "huggingface", config, _hf_scale(raw)
    raise CheckpointError(f"{config_path}: neither a relora checkpoint config (a 'model' section) "
                          "nor a Pico Hugging Face config (d_model, n_layers, ...)")


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = PicoDecoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_tensors(tensors: dict, shapes: dict, weights_file: Path) -> bool:
    """Every tensor of the plain decoder present with its shape, and nothing else but complete
    adapter pairs that fit their weight; returns whether there are adapters."""
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise CheckpointError(f"{weights_file}: missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights_file}: {key} has shape {tuple(tensors[key].shape)}, "
                                  f"the config implies {shape}")
    has_adapters = False
    for key in tensors:
        if key in shapes:
            continue
        base, _, leaf = key.rpartition(".")
        if leaf in ("A_lora", "B_lora") and f"{base}.weight" in shapes:
            out_f, in_f = shapes[f"{base}.weight"]
            A, B = tensors.get(f"{base}.A_lora"), tensors.get(f"{base}.B_lora")
            if A is None or B is None:
                raise CheckpointError(f"{weights_file}: {base} has only one of A_lora / B_lora")
            rank = A.shape[0]
            if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
                raise CheckpointError(f"{weights_file}: {base} adapter shapes A {tuple(A.shape)}, "
                                      f"B {tuple(B.shape)} do not fit a {out_f} x {in_f} weight")
            has_adapters = True
        else:
            raise CheckpointError(f"{weights_file}: unexpected tensor {key}")
    return has_adapters


def load_snapshot(path, expected: ModelConfig | None = None, scale: float | None = None,
                  verify: bool = True, verified: Verified | None = None) -> Snapshot:
    """Read a checkpoint folder of either layout and check it against the run's model config.

    `expected`: the run's ModelConfig (a mismatch is an error naming the file and the field);
    `scale`: the run's adapter scale, used when the checkpoint does not record one;
    `verified`: what `verify_weights` returned for this folder earlier (no second hash while the
    file is unchanged).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: checkpoint folder not found")
    raw = read_checkpoint_meta(path)
    config_path = path / CONFIG
    layout, config, stored_scale = _config_of(raw, config_path)
    if expected is not None:
        for name, want in expected.to_dict().items():
            got = getattr(config, name)
            if not (got == want or (isinstance(want, float) and math.isclose(got, want, rel_tol=1e-9))):
                raise CheckpointError(f"{config_path}: checkpoint does not match the run config: "
                                      f"{name} is {got} in the checkpoint, {want} in the run")
    if verify:
        verify_weights(path, raw, verified)
    tensors = read_tensors(path)
    has_adapters = _check_tensors(tensors, _expected_shapes(config), path / WEIGHTS)
    if has_adapters:
        if stored_scale is not None and scale is not None and not math.isclose(stored_scale, scale, rel_tol=1e-9):
            raise CheckpointError(f"{config_path}: adapter scale {stored_scale} differs from the run's {scale}")
        stored_scale = stored_scale if stored_scale is not None else scale
        if stored_scale is None:
            raise CheckpointError(f"{config_path}: the checkpoint has adapters but records no scale (alpha / r)")
    return Snapshot(path=path, config=config, tensors=tensors, step=raw.get("step"),
                    scale=stored_scale if has_adapters else None, layout=layout, meta=raw)


# ----------------------------------------------------------------------------------------------
# The trained module of this project's layout


def load_checkpoint(step_dir: Path, device: str | torch.device = "cpu", verify: bool = True):
    """(model in eval mode, meta) from a checkpoint directory of this project's layout, whatever
    its condition: the module as trained, adapters (for ReLoRA) in place."""
    step_dir = Path(step_dir)
    meta = read_checkpoint_meta(step_dir)
    weights = step_dir / WEIGHTS
    if not isinstance(meta.get("model"), dict) or "method" not in meta:
        raise CheckpointError(f"{step_dir / CONFIG}: not a relora checkpoint config (no 'model' and "
                              "'method' sections); a Hugging Face folder is read with load_snapshot")
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{weights}: checkpoint weights not found")
    if verify:
        verify_weights(step_dir, meta)
    state = read_tensors(step_dir, device)
    model = build_model(meta["model"], meta["method"]).to(device)
    load_state_dict(model, state, source=str(weights))
    return model.eval(), meta


def load_state_dict(model: torch.nn.Module, state: dict, source: str = "state dict") -> None:
    """Load by the reference's module names, with or without the prefixes of released
    checkpoints (`strip_prefixes`); a mismatch names the missing and unexpected keys."""
    state = strip_prefixes(state)
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
