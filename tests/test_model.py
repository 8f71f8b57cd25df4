import pytest
import torch
import torch.nn.functional as F

import relora.model as model_module
from relora.config import load_schema, load_study, model_config
from relora.lora import lora_modules, wrap_with_lora
from relora.model import (ModelConfig, PicoDecoder, SmallHeadCausalAttention, apply_rope, count_parameters,
                          rope_complex, rope_real, rope_tables)
from relora.model_config import (LINEAR_MODULES, LINEAR_PARENTS, model_flops_per_token, n_parameters, pad_vocab,
                                 relora_flops_per_token)


def small_config(**overrides):
    spec = dict(vocab_size=128, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=96, max_seq_len=16)
    spec.update(overrides)
    return ModelConfig(**spec)


@pytest.mark.parametrize("size, expected", [("tiny", 11_282_784), ("small", 64_595_328)])
def test_paper_parameter_counts(repo, size, expected):
    study = load_study(repo / "workflow/studies/paper.yaml")
    config = model_config(study, size)
    assert config.vocab_size == pad_vocab(50280) == 50304
    with torch.device("meta"):
        model = PicoDecoder(config)
    assert count_parameters(model) == (expected, expected)
    assert n_parameters(config) == expected


def test_reference_module_names():
    names = set(PicoDecoder(small_config()).state_dict())
    for expected in ["embedding_proj.weight", "layers.0.attention.q_proj.weight", "layers.1.attention.o_proj.weight",
                     "layers.0.swiglu.w_0.weight", "layers.0.swiglu.w_2.weight", "layers.0.attention_norm.weight",
                     "layers.0.swiglu_norm.weight", "output_norm.weight", "de_embedding_proj.weight"]:
        assert expected in names
    assert not any("bias" in n for n in names)


def test_linear_names_and_shapes_are_the_models():
    config = small_config()
    model = PicoDecoder(config)
    linears = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {f"layers.{i}.{LINEAR_PARENTS[m]}.{m}": shape
                for i in range(config.n_layers) for m, shape in config.linear_shapes.items()}
    assert linears == {**expected, "de_embedding_proj": (128, 24)}
    assert n_parameters(config) == count_parameters(model)[0]
    # k and v project to n_kv_heads * head size = 2 * 4; the SwiGLU's hidden size is 96
    assert config.linear_shapes["k_proj"] == (8, 24) and config.linear_shapes["w_2"] == (24, 96)
    # a study may target exactly these (the schema's enum and default)
    targets = load_schema()["$defs"]["condition"]["properties"]["targets"]
    assert tuple(targets["items"]["enum"]) == tuple(targets["default"]) == LINEAR_MODULES


def test_model_flops_per_token_by_hand():
    # d = 384, 12 layers, kv 4 * 32 = 128, ffn 1536, vocab 8192, seq 256: per layer
    # 2 * 384^2 + 2 * 384 * 128 + 3 * 384 * 1536 = 2,162,688 matmul weights; with the head
    # 12 * 2,162,688 + 384 * 8192 = 29,097,984; 6 x that + 12 * 12 * 256 * 384 = 188,743,680
    config = ModelConfig(vocab_size=8192, d_model=384, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=1536,
                         max_seq_len=256)
    assert model_flops_per_token(config, 256) == 188_743_680
    # ReLoRA r = 16 on all seven: frozen 12 * 2,162,688, adapters 12 * 16 * (sum of in + out) =
    # 12 * 16 * 11,520; 188,743,680 - 2 * 25,952,256 + 6 * 2,211,840 = 146,423,808
    assert relora_flops_per_token(config, 256, 16, LINEAR_MODULES) == 146_423_808
    # the bounds docs/design.md quotes: 0.776 here, 0.89 and 0.99 at the paper's sizes
    assert relora_flops_per_token(config, 256, 16, LINEAR_MODULES) / 188_743_680 == pytest.approx(0.776, abs=5e-4)
    for d, bound in ((384, 0.89), (96, 0.99)):
        paper = ModelConfig(vocab_size=50304, d_model=d, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=4 * d,
                            max_seq_len=2048)
        ratio = relora_flops_per_token(paper, 2048, 16, LINEAR_MODULES) / model_flops_per_token(paper, 2048)
        assert ratio == pytest.approx(bound, abs=5e-3)


@pytest.mark.parametrize("targets", [LINEAR_MODULES, ("q_proj", "w_2")])
def test_relora_flops_count_the_wrapped_models_weights(targets):
    config = small_config()
    with torch.device("meta"):
        model = wrap_with_lora(PicoDecoder(config), 4, 8, 0.0, targets)
    frozen = sum(m.weight.numel() for m in lora_modules(model))
    adapter = sum(m.A_lora.numel() + m.B_lora.numel() for m in lora_modules(model))
    assert relora_flops_per_token(config, 16, 4, targets) == model_flops_per_token(config, 16) - 2 * frozen + 6 * adapter


def reference_forward(model, idx):
    """The decoder written out: embedding, every block, output norm, LM head."""
    T = idx.shape[1]
    x = model.embedding_proj(idx)
    blocks = []
    for block in model.layers:
        x = block(x, model.rope_cos[:T], model.rope_sin[:T])
        blocks.append(x)
    return blocks, model.de_embedding_proj(model.output_norm(x)).float()


def test_forward_and_residual_stream_are_the_written_out_decoder():
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).eval()
    idx = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        blocks, logits = reference_forward(model, idx)
        assert torch.equal(model(idx), logits)
        got, hidden = model(idx, return_hidden=True)
        assert torch.equal(got, logits) and len(hidden) == 2
        assert all(torch.equal(h, b) for h, b in zip(hidden, blocks))
        assert torch.equal(model.residual_stream(idx), blocks[-1])
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model.residual_stream(torch.zeros(1, 17, dtype=torch.long))


def test_forward_is_causal_and_fp32():
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).eval()
    idx = torch.randint(0, 128, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 128) and logits.dtype == torch.float32
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 128
    # positions before the change do not see it
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_rope_rotates_adjacent_pairs_by_position():
    cos, sin = rope_tables(head_dim=4, seq_len=3, theta=10000.0)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).expand(1, 1, 3, 4)
    y = apply_rope(x, cos, sin)[0, 0]
    # pair 0 rotates by angle t, pair 1 by t / 100 (theta^(-2/4))
    for t in range(3):
        torch.testing.assert_close(y[t, :2], torch.tensor([torch.cos(torch.tensor(t * 1.0)), torch.sin(torch.tensor(t * 1.0))]))
        torch.testing.assert_close(y[t, 2:], torch.tensor([torch.cos(torch.tensor(t / 100)), torch.sin(torch.tensor(t / 100))]))


@pytest.mark.parametrize("rope", [rope_complex, rope_real, apply_rope])  # both kernels, and the chosen one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_pairwise_rotation_formula(rope, dtype):
    torch.manual_seed(0)
    cos, sin = rope_tables(head_dim=8, seq_len=5, theta=10000.0)
    x = torch.randn(2, 5, 3, 8).transpose(1, 2).to(dtype)  # (B, n, T, hs) as the projections leave it
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    expected = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    y = rope(x, cos, sin)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected.to(dtype))


def use_kernels(monkeypatch, **kernels):
    """Switch the model's kernels for one test (relora.model.KERNELS, restored afterwards)."""
    for name, value in kernels.items():
        monkeypatch.setitem(model_module.KERNELS, name, value)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_gives_the_same_loss_and_gradients_whichever_kernels_run(monkeypatch, precision):
    """Every combination of the kernels relora.autotune chooses between computes the same loss
    and gradients up to rounding: a choice made by measurement never changes a result."""
    import itertools

    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()  # head size 4
    idx = torch.randint(0, 128, (3, 13))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    results = {}
    names = list(model_module.KERNEL_CHOICES)
    for combination in itertools.product(*(model_module.KERNEL_CHOICES[n] for n in names)):
        use_kernels(monkeypatch, **dict(zip(names, combination)))
        with autocast:
            results[combination] = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    (first, (loss0, grads0)), *others = results.items()
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if precision == "fp32" else {"rtol": 0.1, "atol": 2e-3}
    for combination, (loss, grads) in others:
        torch.testing.assert_close(loss, loss0, **({"rtol": 1e-2, "atol": 1e-2} if precision == "bf16" else {}),
                                   msg=f"{combination} vs {first}")
        for name in grads:
            torch.testing.assert_close(grads[name], grads0[name], **tolerance, msg=f"{name}: {combination}")


def test_gqa_equals_explicit_kv_repeat():
    torch.manual_seed(0)
    gqa = PicoDecoder(small_config()).eval()
    full = PicoDecoder(small_config(n_kv_heads=6)).eval()
    state = gqa.state_dict()
    hs = 4
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, hs, 24)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(3, dim=0).reshape(24, 24)
    full.load_state_dict(state)
    idx = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(gqa(idx), full(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [("n_heads", 5), ("n_kv_heads", 4)])
def test_bad_shapes_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_logits", [None, 3 * 128])  # one chunk; 3-row chunks, the last short
def test_fused_head_loss_and_gradients_equal_cross_entropy_on_logits(monkeypatch, chunk_logits):
    if chunk_logits:
        monkeypatch.setitem(model_module.KERNELS, "lm_head_chunk_logits", chunk_logits)
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()
    idx = torch.randint(0, 128, (2, 11))
    targets = idx[:, 1:].clone()
    targets[0, :4] = -100  # unpredicted positions count in neither the mean nor the gradient
    fused, fused_grads = _loss_and_grads(model, idx[:, :-1], targets)
    model.zero_grad(set_to_none=True)
    reference = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(fused, reference.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_head_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()
    idx = torch.randint(0, 128, (2, 11))
    fp32, _ = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.02
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("chunk_scores", [2**18, 800])  # one chunk; chunks of 3-4 groups, the last short
@pytest.mark.parametrize("B, nh, nkv, T, hs", [(2, 6, 2, 9, 4), (3, 8, 2, 7, 8), (2, 4, 4, 5, 2), (1, 3, 1, 1, 4)])
def test_small_head_attention_equals_sdpa_with_its_gradients(monkeypatch, chunk_scores, B, nh, nkv, T, hs):
    monkeypatch.setattr(model_module, "SMALL_HEAD_CHUNK_SCORES", chunk_scores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(0)
    # q, k, v as the projections leave them: (B, T, heads, hs) memory seen as (B, heads, T, hs)
    q, k, v = (torch.randn(B, T, n, hs, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for n in (nh, nkv, nkv))
    ours = SmallHeadCausalAttention.apply(q, k, v)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
    torch.testing.assert_close(ours, reference.transpose(1, 2).reshape(B, T, nh * hs))
    assert torch.autograd.gradcheck(SmallHeadCausalAttention.apply, (q, k, v))
    with torch.no_grad():  # without gradients, one chunk's buffer serves every chunk
        torch.testing.assert_close(SmallHeadCausalAttention.apply(q, k, v), ours.detach())


def test_model_with_small_head_attention_equals_model_with_sdpa(monkeypatch):
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()  # head size 4
    idx = torch.randint(0, 128, (3, 13))
    use_kernels(monkeypatch, attention="small_head")
    small_loss, small_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    use_kernels(monkeypatch, attention="sdpa")  # PyTorch's fused kernel
    sdpa_loss, sdpa_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(small_loss, sdpa_loss)
    for name in small_grads:
        torch.testing.assert_close(small_grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_small_head_attention_under_bf16_autocast_computes_in_fp32(monkeypatch):
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()
    idx = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        use_kernels(monkeypatch, attention="small_head")
        small_loss, small_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
        use_kernels(monkeypatch, attention="sdpa")
        sdpa_loss, sdpa_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    # both paths see the same bf16 q, k, v; they differ only by the kernels' own rounding
    torch.testing.assert_close(small_loss, sdpa_loss, rtol=1e-2, atol=1e-2)
    for name in small_grads:
        assert small_grads[name].dtype == torch.float32
        torch.testing.assert_close(small_grads[name], sdpa_grads[name], rtol=0.1, atol=2e-3, msg=name)


@pytest.mark.parametrize("method", [
    {"name": "full"},
    {"name": "relora", "dropout": 0.1, "dropout_mask": "per_adapter"},
    {"name": "relora", "dropout": 0.1, "dropout_mask": "shared"},
])
@pytest.mark.parametrize("head_dim", [4, 16])  # the CPU's small-head attention and SDPA
def test_activation_checkpointing_gives_the_same_loss_and_gradients(method, head_dim):
    """Recomputing each block in the backward (dropout masks included: the RNG state is restored)
    changes neither the loss nor any gradient."""
    config = small_config(d_model=6 * head_dim, n_heads=6, n_kv_heads=2, ffn_hidden=4 * 6 * head_dim)
    torch.manual_seed(0)
    model = PicoDecoder(config)
    if method["name"] == "relora":
        wrap_with_lora(model, 2, 4, method["dropout"], list(LINEAR_MODULES), method["dropout_mask"])
        for module in lora_modules(model):  # B = 0 would hide A's gradient
            torch.nn.init.normal_(module.B_lora, std=0.1)
    model.train()
    idx = torch.randint(0, config.vocab_size, (3, config.max_seq_len + 1))

    def loss_and_gradients(checkpointing):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_gradients(False)
    loss_ckpt, grads_ckpt = loss_and_gradients(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads.keys() and any("A_lora" in n for n in grads) == (method["name"] == "relora")
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # a different dropout draw would change the loss: the equality above is not vacuous
    if method["name"] == "relora":
        model.activation_checkpointing = False
        torch.manual_seed(2)
        assert not torch.equal(model(idx[:, :-1], targets=idx[:, 1:]).detach(), loss)
