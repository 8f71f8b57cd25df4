"""Peak GPU memory of a training micro-step, estimated from the model's shapes without torch
(docs/design.md, GPU memory).

What a micro-step of `micro_batch` sequences of T tokens (N = micro_batch x T tokens) holds at its
peak, the start of the backward pass, as PyTorch's eager mode on CUDA allocates it:

    static        4 bytes per parameter (fp32 weights, frozen ones included), and per trainable
                  parameter 4 for its gradient and 8 for AdamW's two moments; with bf16 autocast
                  also a 2-byte copy of every block linear's weight (autocast's cache for trainable
                  weights, LoRAFunction's saved copy for frozen ones)
    activations   what autograd saves for the backward, per token: each block's
                  `layer_activation_bytes` (below) and the head's (token ids, the output norm,
                  the LM head's input gradient), plus the LM head's weight gradient (V x d fp32)
    workspace     the larger of the LM head's chunk of logits (fp32 and bf16 copies of
                  2^27 logits, model.LM_HEAD_CHUNK_LOGITS) and the backward of one block, taken as
                  large as what that block saved

With activation checkpointing a block keeps only its input (the fp32 residual stream, 4 d bytes
a token) and recomputes the rest during the backward, so the workspace is two blocks' worth: the
recomputed activations and their gradients.

Assumptions, which benchmarks/gpu_memory.py checks on a GPU: attention runs in PyTorch's fused
flash kernel in bf16 (saving q, k, v, the output and a log-sum-exp per head, nothing of size T^2);
in fp32 with grouped-query attention no fused kernel applies and the math path keeps the (T, T)
probabilities of every head. torch.compile usually saves less than eager; the CUDA context, cuBLAS
workspaces and the allocator's fragmentation are not counted here (USABLE_FRACTION leaves room).
"""

from __future__ import annotations

from .model_config import ModelConfig, n_parameters

GIB = 2**30
# The share of a GPU's memory a run may plan for: the rest holds the CUDA context (about 0.5 GB),
# cuBLAS workspaces, the caching allocator's fragmentation and this estimate's error.
USABLE_FRACTION = 0.9
# logits per chunk of the fused LM head + cross-entropy on CUDA (relora/model.py, LM_HEAD_CHUNK_LOGITS)
LM_HEAD_CHUNK_LOGITS = 2**27
# the linears of a block grouped by the tensor they read: q, k, v read the attention norm's output
# and w_0, w_1 the SwiGLU norm's (both fp32); o_proj reads the attention output and w_2 the SwiGLU
# product (both in the compute dtype)
NORM_READERS = (("q_proj", "k_proj", "v_proj"), ("w_0", "w_1"))


def _norm_readers_bytes(in_features: int, readers, method: dict, compute: int) -> int:
    """Bytes per token saved for the linears reading one fp32 norm output x (in_features wide).

    Full-rank, bf16: each linear saves its own bf16 cast of x (autocast casts inputs per call);
    fp32: all share x. An adapter with dropout saves a bool keep mask (1 byte; one for all readers
    with `dropout_mask: shared`) and its own dropped-out input in the compute dtype, instead of the
    plain input (fp32 and a shared mask: one tensor for all); SharedDropout also holds x and the
    masked x (fp32) until the next forward. Each adapter saves its rank-r activation x A^T."""
    adapted = [m for m in readers if method["name"] == "relora" and m in method["targets"]]
    dropout = bool(adapted) and method.get("dropout", 0.0) > 0
    shared = dropout and method.get("dropout_mask", "per_adapter") == "shared"
    plain = [m for m in readers if m not in adapted or not dropout]  # save the plain input
    total = len(adapted) * compute * method.get("rank", 0)
    if compute == 2:
        total += 2 * in_features * len(plain)
    elif plain:
        total += 4 * in_features
    if dropout:
        total += in_features * (1 if shared else len(adapted))  # keep masks
        total += compute * in_features * (1 if shared and compute == 4 else len(adapted))
        if shared:  # SharedDropout's cache: x (unless saved anyway) and x * keep (unless it is the saved input)
            total += 4 * in_features * ((not (plain and compute == 4)) + (compute == 2))
    return total


def layer_activation_bytes(config: ModelConfig, method: dict, precision: str) -> int:
    """Bytes per token one block saves for the backward (eager mode, CUDA), summed term by term:

    norms         each RMSNorm saves its fp32 input and normed output (4 d + 4 d) and 1 / rms (4)
    q, k, v       the attention norm's output as its readers save it (_norm_readers_bytes)
    attention     bf16 flash kernel: q (2 d), k and v (2 kv each), output (2 d) and the
                  log-sum-exp (4 per head); fp32 with grouped-query attention (math path): q, k
                  and v repeated to every head (4 d each), the probabilities (4 x heads x T)
                  and the output reshaped for o_proj (4 d)
    o_proj        bf16 full-rank: its input is the flash output (no extra bytes)
    SwiGLU        w_0, w_1 as q, k, v; silu's input, its output and w_1's output (b h each) and
                  w_2's input (b h), b the compute dtype's bytes
    adapters      with dropout a keep mask (1 byte) and the dropped-out input (b) per input
                  feature, and per adapter its rank-r activation (b r)
    """
    d, h, T = config.d_model, config.ffn_hidden, config.max_seq_len
    kv, heads = config.n_kv_heads * config.head_dim, config.n_heads
    compute = 2 if precision == "bf16" else 4
    adapted = set(method["targets"]) if method["name"] == "relora" else set()
    dropout = method.get("dropout", 0.0) > 0 and method["name"] == "relora"
    rank = method.get("rank", 0)
    total = 2 * (8 * d + 4)  # the two RMSNorms
    total += _norm_readers_bytes(d, NORM_READERS[0], method, compute)
    total += _norm_readers_bytes(d, NORM_READERS[1], method, compute)
    fused_attention = precision == "bf16" or config.n_kv_heads == config.n_heads
    if fused_attention:
        total += compute * (2 * d + 2 * kv) + 4 * heads
    else:
        total += 4 * 3 * d + 4 * heads * T + 4 * d
    # o_proj: a plain input is the attention output (fused) or its reshaped copy (math, counted)
    if "o_proj" in adapted:
        total += compute * rank + (d + compute * d if dropout else 0)
    total += 3 * compute * h  # silu's input and output, w_1's output
    total += compute * h  # w_2's input (an adapter with dropout saves the dropped-out input instead)
    if "w_2" in adapted:
        total += compute * rank + (h if dropout else 0)
    return total


def head_activation_bytes(config: ModelConfig, precision: str) -> int:
    """Bytes per token saved outside the blocks: token ids and targets (int64, 8 each, and the
    embedding's saved ids), the output norm (4 d + 4 d + 4) and the LM head's input gradient,
    computed in the forward (2 d in bf16, 4 d in fp32)."""
    return 3 * 8 + 8 * config.d_model + 4 + (2 if precision == "bf16" else 4) * config.d_model


def adapter_parameters(config: ModelConfig, method: dict) -> int:
    if method["name"] != "relora":
        return 0
    shapes = config.linear_shapes
    return config.n_layers * sum(method["rank"] * (shapes[t][0] + shapes[t][1]) for t in method["targets"])


def training_memory(config: ModelConfig, micro_batch: int, method: dict, precision: str = "bf16",
                    activation_checkpointing: bool = False) -> dict[str, int]:
    """The estimate's parts in bytes and their sum, `peak`. `method` is a resolved run's (name,
    and for ReLoRA rank, targets, dropout, dropout_mask); a ReLoRA run with a full-rank warm
    start peaks in whichever phase needs more (warm_start_steps > 0: the larger of both)."""
    if method["name"] == "relora" and method.get("warm_start_steps", 0) > 0:
        phases = [training_memory(config, micro_batch, m, precision, activation_checkpointing)
                  for m in ({"name": "full"}, {**method, "warm_start_steps": 0})]
        return max(phases, key=lambda p: p["peak"])
    V, d, L = config.vocab_size, config.d_model, config.n_layers
    tokens = micro_batch * config.max_seq_len
    adapters = adapter_parameters(config, method)
    total = n_parameters(config) + adapters
    linear = L * sum(o * i for o, i in config.linear_shapes.values())
    frozen = L * sum(o * i for t, (o, i) in config.linear_shapes.items()
                     if method["name"] == "relora" and t in method["targets"])
    trainable = total - frozen
    layer = tokens * layer_activation_bytes(config, method, precision)
    if activation_checkpointing:
        stored_layers = tokens * L * 4 * d  # each block's input, the fp32 residual stream
        stored_layers += tokens * L * _shared_dropout_cache_bytes(config, method, precision)
        backward = 2 * layer
    else:
        stored_layers, backward = L * layer, layer
    if precision == "bf16":
        chunk = 6 * LM_HEAD_CHUNK_LOGITS + 8 * V * d  # fp32 + bf16 logits; bf16 W and dW, fp32 dW
    else:
        chunk = 4 * LM_HEAD_CHUNK_LOGITS
    parts = {
        "weights": 4 * total,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "weight_copies": 2 * (linear + adapters) if precision == "bf16" else 0,
        "activations": stored_layers + tokens * head_activation_bytes(config, precision) + 4 * V * d,
        "workspace": max(chunk, backward),
    }
    parts["peak"] = sum(parts.values())
    return parts


def _shared_dropout_cache_bytes(config: ModelConfig, method: dict, precision: str) -> int:
    """SharedDropout keeps its last input and output (fp32) alive outside autograd, so
    activation checkpointing does not free them: 8 bytes per feature of each shared input."""
    if method["name"] != "relora" or method.get("dropout", 0.0) == 0 or method.get("dropout_mask") != "shared":
        return 0
    return sum(8 * config.d_model for readers in NORM_READERS if set(readers) & set(method["targets"]))


def largest_fitting_micro_batch(config: ModelConfig, per_device: int, method: dict, precision: str,
                                activation_checkpointing: bool, limit_bytes: float) -> int | None:
    """The largest divisor of `per_device` (sequences per device and update) whose estimate fits
    in `limit_bytes`; None when not even one sequence fits."""
    for micro in sorted((m for m in range(1, per_device + 1) if per_device % m == 0), reverse=True):
        if training_memory(config, micro, method, precision, activation_checkpointing)["peak"] <= limit_bytes:
            return micro
    return None

