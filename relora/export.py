"""Export a checkpoint to a Hugging Face `LlamaForCausalLM` folder with the same logits.

The Pico decoder is LLaMA with other module names and one layout difference: its RoPE rotates
adjacent pairs (2i, 2i + 1) of each head's dimensions, while Hugging Face's `rotate_half`
rotates (i, i + hs/2). Permuting the output rows of q_proj and k_proj within each head maps one
onto the other (the inverse of the permutation in transformers' LLaMA conversion script).
ReLoRA checkpoints are exported with their effective weights W + scale * B A.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .io import atomic_dir, check_replaceable, write_marker
from .lora import LoRALinear

HF_NAMES = {"attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
            "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.o_proj",
            "swiglu.w_0": "mlp.gate_proj", "swiglu.w_1": "mlp.up_proj", "swiglu.w_2": "mlp.down_proj",
            "attention_norm": "input_layernorm", "swiglu_norm": "post_attention_layernorm"}


def adjacent_to_half_rotation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (x0, x1, x2, x3, ...) to (x0, x2, ..., x1, x3, ...)."""
    out, d_in = weight.shape
    head_dim = out // n_heads
    return weight.view(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    config = model.config
    state = {"model.embed_tokens.weight": model.embedding_proj.weight,
             "model.norm.weight": model.output_norm.weight,
             "lm_head.weight": model.de_embedding_proj.weight}
    for i, block in enumerate(model.layers):
        for ours, theirs in HF_NAMES.items():
            module = block.get_submodule(ours)
            weight = module.effective_weight() if isinstance(module, LoRALinear) else module.weight
            if ours == "attention.q_proj":
                weight = adjacent_to_half_rotation(weight, config.n_heads)
            elif ours == "attention.k_proj":
                weight = adjacent_to_half_rotation(weight, config.n_kv_heads)
            state[f"model.layers.{i}.{theirs}.weight"] = weight
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def hf_config(config) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


EXPORT_MARKER = ".relora-export"  # an export folder this command made, which a later export may replace


def export_hf(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write `config.json` and `model.safetensors` of a LlamaForCausalLM into out_dir (absent,
    empty or an earlier export; any other folder is refused)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    check_replaceable(out_dir, EXPORT_MARKER)  # before the work: an earlier export, or nothing
    model, meta = load_checkpoint(checkpoint_dir)
    with atomic_dir(out_dir, EXPORT_MARKER) as tmp:
        write_marker(tmp, EXPORT_MARKER, {"checkpoint": str(Path(checkpoint_dir).resolve())})
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    return out_dir
