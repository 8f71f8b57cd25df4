import pytest
import torch
import torch.nn.functional as F

import relora.model as model_module
from relora.config import load_study, model_config
from relora.model import (ModelConfig, PicoDecoder, SmallHeadCausalAttention, apply_rope, count_parameters, pad_vocab,
                          rope_real, rope_tables)


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


def test_reference_module_names():
    names = set(PicoDecoder(small_config()).state_dict())
    for expected in ["embedding_proj.weight", "layers.0.attention.q_proj.weight", "layers.1.attention.o_proj.weight",
                     "layers.0.swiglu.w_0.weight", "layers.0.swiglu.w_2.weight", "layers.0.attention_norm.weight",
                     "layers.0.swiglu_norm.weight", "output_norm.weight", "de_embedding_proj.weight"]:
        assert expected in names
    assert not any("bias" in n for n in names)


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


@pytest.mark.parametrize("rope", [apply_rope, rope_real])  # eager (complex) and compiled (real) forms
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
        monkeypatch.setitem(model_module.LM_HEAD_CHUNK_LOGITS, "cpu", chunk_logits)
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
    model = PicoDecoder(small_config()).train()  # head size 4: the small-head path
    idx = torch.randint(0, 128, (3, 13))
    small_loss, small_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    monkeypatch.setattr(model_module, "SMALL_HEAD_MAX_DIM", 0)  # PyTorch's fused kernel
    sdpa_loss, sdpa_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(small_loss, sdpa_loss)
    for name in small_grads:
        torch.testing.assert_close(small_grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_small_head_attention_under_bf16_autocast_computes_in_fp32(monkeypatch):
    torch.manual_seed(0)
    model = PicoDecoder(small_config()).train()
    idx = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small_loss, small_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
        monkeypatch.setattr(model_module, "SMALL_HEAD_MAX_DIM", 0)
        sdpa_loss, sdpa_grads = _loss_and_grads(model, idx[:, :-1], idx[:, 1:])
    # both paths see the same bf16 q, k, v; they differ only by the kernels' own rounding
    torch.testing.assert_close(small_loss, sdpa_loss, rtol=1e-2, atol=1e-2)
    for name in small_grads:
        assert small_grads[name].dtype == torch.float32
        torch.testing.assert_close(small_grads[name], sdpa_grads[name], rtol=0.1, atol=2e-3, msg=name)
