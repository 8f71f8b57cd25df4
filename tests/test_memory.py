"""The GPU memory estimate (relora/memory.py) against closed forms and against what PyTorch holds.

Peak allocator memory on CPU is not a reliable measure, but two parts are exact anywhere: the
bytes of parameters, gradients and AdamW moments, and the tensors autograd saves for the backward
(counted with saved-tensor hooks, each storage once). The CPU's fused attention kernel saves what
CUDA's flash kernel saves (q, k, v, output, log-sum-exp) at head size 16."""

import pytest
import torch

from relora.lora import lora_modules, wrap_with_lora
from relora.memory import (GIB, head_activation_bytes, largest_fitting_micro_batch, layer_activation_bytes,
                           training_memory)
from relora.model import PicoDecoder
from relora.model_config import LINEAR_MODULES, ModelConfig, n_parameters
from relora.optim import build_optimizer

TARGETS = list(LINEAR_MODULES)
METHODS = {
    "full": {"name": "full"},
    "relora": {"name": "relora", "rank": 4, "targets": TARGETS, "dropout": 0.1, "dropout_mask": "per_adapter"},
    "relora-no-dropout": {"name": "relora", "rank": 4, "targets": TARGETS, "dropout": 0.0,
                          "dropout_mask": "per_adapter"},
    "relora-shared-masks": {"name": "relora", "rank": 4, "targets": TARGETS, "dropout": 0.1, "dropout_mask": "shared"},
    "relora-attention-only": {"name": "relora", "rank": 4, "targets": ["q_proj", "v_proj", "o_proj"],
                              "dropout": 0.1, "dropout_mask": "per_adapter"},
}


def config(n_kv_heads=2, **overrides):
    spec = dict(vocab_size=128, d_model=96, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, ffn_hidden=384,
                max_seq_len=64)
    return ModelConfig(**{**spec, **overrides})


def build(cfg, method):
    torch.manual_seed(0)
    model = PicoDecoder(cfg)
    if method["name"] == "relora":
        wrap_with_lora(model, method["rank"], 2 * method["rank"], method["dropout"], method["targets"],
                       method["dropout_mask"])
    return model.train()


def test_layer_bytes_in_closed_form():
    # full-rank bf16, d 96, kv 2 x 16 = 32, h 384, 6 heads: norms 2 (8 d + 4) = 1544; the bf16
    # inputs of q, k, v, w_0, w_1, 5 x 2 d = 960; attention q 2 d + k, v 2 x 2 kv + output 2 d +
    # log-sum-exp 4 x 6 = 536; SwiGLU 4 x 2 h = 3072
    assert layer_activation_bytes(config(), METHODS["full"], "bf16") == 1544 + 960 + 536 + 3072
    # ReLoRA with dropout adds a 1-byte mask per input feature of each adapter (5 x 96 + 96 + 384)
    # and 2 bytes for each rank-4 activation (7 x 8), and o_proj's dropped-out input (2 d)
    assert layer_activation_bytes(config(), METHODS["relora"], "bf16") == 6112 + 960 + 56 + 192
    # fp32 with grouped-query attention: the math path keeps 4 x heads x T bytes of probabilities
    fp32 = layer_activation_bytes(config(), METHODS["full"], "fp32")
    assert fp32 - layer_activation_bytes(config(max_seq_len=32), METHODS["full"], "fp32") == 4 * 6 * 32


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("precision, n_kv_heads", [("bf16", 2), ("fp32", 6)])
def test_layer_bytes_are_what_autograd_saves(name, precision, n_kv_heads):
    method, cfg = METHODS[name], config(n_kv_heads)
    model = build(cfg, method)
    block, (B, T) = model.layers[0], (3, cfg.max_seq_len)
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.shape and tensor.shape[0] in (B, B * T):  # per-token tensors, not weight copies or RoPE tables
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = block(x, model.rope_cos[:T], model.rope_sin[:T])
    # SharedDropout (no child module: it belongs to the block) holds its last input and output
    # outside autograd, until the next forward
    caches = {id(d): d for m in lora_modules(block) for d in m._shared_dropout}
    for cache in caches.values():
        if cache._last_input is not None:
            for tensor in (cache._last_input, cache._last_output):
                saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
    assert sum(saved.values()) == B * T * layer_activation_bytes(cfg, method, precision)
    assert out.requires_grad and bool(caches) == (method.get("dropout_mask") == "shared")


@pytest.mark.parametrize("name", ["full", "relora"])
def test_parameters_gradients_and_adam_moments_are_exact(name):
    method, cfg = METHODS[name], config()
    model = build(cfg, method)
    optimizer = build_optimizer(model, {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                        "decay_on": "all"})
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    model(idx[:, :-1], targets=idx[:, 1:]).backward()
    gradients = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    moments = sum(state[k].nbytes for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    estimate = training_memory(cfg, 2, method)
    assert estimate["weights"] == sum(p.nbytes for p in model.parameters())
    assert estimate["gradients"] == gradients
    assert estimate["optimizer"] == moments
    if name == "relora":  # frozen weights: no gradient, no moments
        assert gradients < 4 * n_parameters(cfg)


def test_peak_adds_up_and_grows_with_the_micro_batch():
    cfg = config()
    for method in METHODS.values():
        for checkpointing in (False, True):
            parts = training_memory(cfg, 4, method, "bf16", checkpointing)
            assert parts["peak"] == sum(v for k, v in parts.items() if k != "peak")
    one, two = (training_memory(cfg, m, METHODS["full"], "bf16")["activations"] for m in (1, 2))
    tokens = cfg.max_seq_len
    assert two - one == tokens * (cfg.n_layers * layer_activation_bytes(cfg, METHODS["full"], "bf16")
                                  + head_activation_bytes(cfg, "bf16"))


def test_checkpointing_stores_block_inputs_only():
    cfg = config()
    plain = training_memory(cfg, 8, METHODS["relora"], "bf16")
    checkpointed = training_memory(cfg, 8, METHODS["relora"], "bf16", activation_checkpointing=True)
    tokens = 8 * cfg.max_seq_len
    layer = tokens * layer_activation_bytes(cfg, METHODS["relora"], "bf16")
    assert plain["activations"] - checkpointed["activations"] == cfg.n_layers * (layer - tokens * 4 * cfg.d_model)
    assert checkpointed["peak"] < plain["peak"]


def test_paper_small_at_256_sequences_does_not_fit_80_gb_and_64_does():
    small = ModelConfig(vocab_size=50304, d_model=384, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=1536,
                        max_seq_len=2048)
    relora = {"name": "relora", "rank": 16, "targets": TARGETS, "dropout": 0.1, "dropout_mask": "per_adapter"}
    limit = 0.9 * 80 * GIB
    assert training_memory(small, 256, relora)["peak"] > 2 * limit
    assert largest_fitting_micro_batch(small, 256, relora, "bf16", False, limit) == 64
    assert largest_fitting_micro_batch(small, 256, relora, "bf16", True, limit) == 256
