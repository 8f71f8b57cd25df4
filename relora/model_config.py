"""The Pico decoder's configuration and what follows from it without torch: the names and shapes
of its linear layers, its parameter count, the adapter scale, and the model FLOPs of a training
step.

relora/model.py builds the decoder from a ModelConfig; the resolver (relora/config.py), the
Snakefile and the data and results stages import only this module, so they run where torch is
not installed (envs/data.yaml, envs/results.yaml) and start in a fraction of the time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# The linear layers of a block by the reference checkpoints' names, each with the sub-module that
# holds it: `layers.<i>.<parent>.<name>`. The order is the block's (attention, then SwiGLU).
LINEAR_PARENTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
                  "w_0": "swiglu", "w_1": "swiglu", "w_2": "swiglu"}
LINEAR_MODULES = tuple(LINEAR_PARENTS)
# the last linear of each sub-module (o_proj, w_2) reads what the others computed; the others all
# read the sub-module's input, one tensor (so their adapters can share one dropout mask)
READS_SUBMODULE_INPUT = frozenset(LINEAR_MODULES) - {"o_proj", "w_2"}


def pad_vocab(vocab_size: int, multiple: int = 64) -> int:
    """The model's vocabulary: the tokenizer's padded to a multiple of 64 (50280 -> 50304)."""
    return multiple * math.ceil(vocab_size / multiple)


def block_linear_shapes(d_model: int, kv_dim: int, ffn_hidden: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of a block; kv_dim = n_kv_heads * head size."""
    d, kv, h = d_model, kv_dim, ffn_hidden
    return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "w_0": (h, d), "w_1": (h, d), "w_2": (d, h)}


@dataclass
class ModelConfig:
    vocab_size: int  # already padded
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size {self.d_model // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear of a block."""
        return block_linear_shapes(self.d_model, self.n_kv_heads * self.head_dim, self.ffn_hidden)

    def to_dict(self) -> dict:
        return asdict(self)


def n_parameters(config: ModelConfig) -> int:
    """Parameters of the full-rank decoder: input embedding and LM head (untied), per block the
    seven linears and two RMSNorm weights, and the output norm."""
    per_block = sum(out * inp for out, inp in config.linear_shapes.values()) + 2 * config.d_model
    return 2 * config.vocab_size * config.d_model + config.n_layers * per_block + config.d_model


def adapter_scale(alpha: float, rank: float) -> float:
    """The scale of a LoRA adapter's update, alpha / r (Hu et al. 2021): y = x W^T + scale * x A^T B^T."""
    return alpha / rank


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward; docs/design.md, Model FLOPs), after Kaplan et
    al. 2020 and nanoGPT's estimate_mfu: 6 per weight of every matrix multiply (all linears and the
    LM head; the input embedding is a lookup) plus 12 * layers * seq_len * d for attention
    scores."""
    d, L = config.d_model, config.n_layers
    per_layer = sum(out * inp for out, inp in config.linear_shapes.values())
    matmul_params = L * per_layer + d * config.vocab_size
    return 6 * matmul_params + 12 * L * seq_len * d


def relora_flops_per_token(config: ModelConfig, seq_len: int, rank: int, targets) -> float:
    """docs/design.md, Model FLOPs: a ReLoRA step's bound. A frozen weight needs no weight
    gradient (4 FLOPs per parameter per token instead of 6), while every adapter parameter
    (rank x (in + out) per targeted linear) costs the usual 6."""
    shapes = config.linear_shapes
    frozen = config.n_layers * sum(shapes[t][0] * shapes[t][1] for t in targets)
    adapter = config.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return model_flops_per_token(config, seq_len) - 2 * frozen + 6 * adapter


def training_flops(run: dict) -> dict:
    """A run's training FLOPs from its resolved config (run.json): `flops_per_token` of its method
    (ReLoRA: the bound above, after any full-rank warm start), `full_flops_per_token` (the
    full-rank model's), `tokens_per_step` (sequences x seq_len of one update) and `total` (every
    update's; warm-start updates cost the full-rank model's)."""
    config = ModelConfig(**run["model"])
    seq_len = run["data"]["seq_len"]
    method, training = run["method"], run["training"]
    full = model_flops_per_token(config, seq_len)
    flops = (relora_flops_per_token(config, seq_len, method["rank"], method["targets"])
             if method["name"] == "relora" else full)
    tokens_per_step = training["batch_size"] * seq_len
    warm = min(method.get("warm_start_steps", 0), training["steps"])
    return {"flops_per_token": flops, "full_flops_per_token": full, "tokens_per_step": tokens_per_step,
            "total": tokens_per_step * (warm * full + (training["steps"] - warm) * flops)}


def linear_key(layer: int, module: str) -> str:
    """State-dict prefix of a linear module: `layers.<i>.attention.q_proj`, `layers.<i>.swiglu.w_0`."""
    return f"layers.{layer}.{LINEAR_PARENTS[module]}.{module}"
