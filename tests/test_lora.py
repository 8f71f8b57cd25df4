import pytest
import torch

from relora.checkpoint import build_model
from relora.config import load_study, resolve_run
from relora.lora import LoRALinear, lora_modules, merge_and_reinit, wrap_with_lora
from relora.model import ModelConfig, PicoDecoder, count_parameters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return PicoDecoder(ModelConfig(vocab_size=128, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2,
                                   ffn_hidden=96, max_seq_len=16))


@pytest.mark.parametrize("size, total, trainable", [("tiny", 11_682_144, 10_060_128),
                                                    ("small", 66_192_768, 40_240_512)])
def test_paper_relora_parameter_counts(repo, size, total, trainable):
    study = load_study(repo / "workflow/studies/paper.yaml")
    run = resolve_run(study, size, "relora", 0)
    with torch.device("meta"):
        model = build_model(run["model"], run["method"])
    assert count_parameters(model) == (total, trainable)


def test_wrap_freezes_base_and_keeps_names():
    model = wrap_with_lora(tiny_model(), 4, 8, 0.0, TARGETS)
    assert len(lora_modules(model)) == 2 * 7
    names = set(model.state_dict())
    assert {"layers.0.attention.q_proj.weight", "layers.0.attention.q_proj.A_lora",
            "layers.0.attention.q_proj.B_lora", "layers.1.swiglu.w_2.B_lora"} <= names
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.{m}.weight" for i in range(2)
                      for m in ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                                "swiglu.w_0", "swiglu.w_1", "swiglu.w_2"]}
    assert model.embedding_proj.weight.requires_grad and model.de_embedding_proj.weight.requires_grad
    assert model.output_norm.weight.requires_grad


def test_fresh_adapter_leaves_the_function_unchanged():
    idx = torch.randint(0, 128, (2, 12))
    base = tiny_model().eval()
    expected = base(idx)
    wrapped = wrap_with_lora(base, 4, 8, 0.1, TARGETS).eval()
    torch.testing.assert_close(wrapped(idx), expected)


def _train_adapters(model, steps=3):
    optimizer = torch.optim.SGD([p for m in lora_modules(model) for p in (m.A_lora, m.B_lora)], lr=0.5)
    for _ in range(steps):
        idx = torch.randint(0, 128, (2, 12))
        model(idx[:, :-1], targets=idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        # B starts at zero: give it something so that B A is not zero
        with torch.no_grad():
            for m in lora_modules(model):
                m.B_lora.add_(0.05 * torch.randn_like(m.B_lora))


@pytest.mark.parametrize("rank, alpha", [(4, 8), (2, 2), (8, 32)])
def test_merge_and_reinit_preserves_the_function(rank, alpha):
    model = wrap_with_lora(tiny_model(), rank, alpha, 0.1, TARGETS)
    _train_adapters(model)
    model.eval()
    idx = torch.randint(0, 128, (3, 16))
    before = model(idx)
    effective = [m.effective_weight().clone() for m in lora_modules(model)]
    merge_and_reinit(model, "correct", torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    for m, w in zip(lora_modules(model), effective):
        torch.testing.assert_close(m.weight, w)
        assert torch.count_nonzero(m.B_lora) == 0 and torch.count_nonzero(m.A_lora) > 0


def test_paper_merge_loses_part_of_the_adapter_delta():
    model = wrap_with_lora(tiny_model(), 4, 8, 0.0, TARGETS)  # scale 2
    _train_adapters(model)
    module = lora_modules(model)[0]
    weight, delta = module.weight.clone(), module.adapter_delta().clone()
    merge_and_reinit(model, "paper")
    lost = weight + delta - module.effective_weight()
    # the paper adds B A instead of scale * B A: (scale - 1) / scale of the delta is thrown away
    torch.testing.assert_close(lost, delta * (module.scale - 1) / module.scale, rtol=1e-5, atol=1e-6)


def test_paper_init_gives_exactly_zero_adapter_gradients():
    model = wrap_with_lora(tiny_model(), 4, 8, 0.1, TARGETS, lora_init="paper")
    idx = torch.randint(0, 128, (2, 12))
    model(idx[:, :-1], targets=idx[:, 1:]).backward()
    for m in lora_modules(model):
        assert torch.count_nonzero(m.A_lora) == 0
        assert torch.count_nonzero(m.A_lora.grad) == 0 and torch.count_nonzero(m.B_lora.grad) == 0
    assert torch.count_nonzero(model.embedding_proj.weight.grad) > 0
    # after the first reset A is Kaiming-initialised and gradients flow into B
    merge_and_reinit(model, "paper", torch.Generator().manual_seed(0))
    model.zero_grad()
    model(idx[:, :-1], targets=idx[:, 1:]).backward()
    assert all(torch.count_nonzero(m.B_lora.grad) > 0 for m in lora_modules(model))


def test_shared_dropout_uses_one_mask_per_input():
    torch.manual_seed(0)
    x = torch.randn(4, 24)
    for mask, expect_equal in (("shared", True), ("per_adapter", False)):
        model = wrap_with_lora(tiny_model(), 4, 8, 0.5, ["q_proj", "k_proj"], dropout_mask=mask).train()
        attention = model.layers[0].attention
        for lora in (attention.q_proj, attention.k_proj):
            with torch.no_grad():
                lora.A_lora.copy_(torch.eye(4, 24))  # the adapter's input shows the dropout mask
                lora.B_lora.copy_(torch.eye(lora.out_features, 4))
                lora.weight.zero_()
        q, k = attention.q_proj(x)[:, :4], attention.k_proj(x)[:, :4]
        assert torch.equal(q == 0, k == 0) is expect_equal


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match="rank 30"):
        LoRALinear(24, 96, rank=30, alpha=1.0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_function_matches_the_plain_formula(dropout):
    """LoRAFunction (addmm-fused) computes x W^T + scale * dropout(x) A^T B^T and its gradients."""
    from relora.lora import LoRAFunction, dropout_keep_mask

    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    W = torch.randn(40, 24, dtype=torch.float64)
    A = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    B = torch.randn(40, 4, dtype=torch.float64, requires_grad=True)
    keep = dropout_keep_mask(x, dropout) if dropout else None
    x_adapter = x * keep if dropout else x
    scale = 2.0 / (1 - dropout)
    got = LoRAFunction.apply(x, x_adapter, W, A, B, scale)
    expected = x @ W.T + scale * ((x * keep if dropout else x) @ A.T) @ B.T
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, (x, A, B), grad), torch.autograd.grad(expected, (x, A, B), grad)):
        torch.testing.assert_close(g, e)


def test_bf16_weight_copy_is_made_once_per_merge_and_always_equals_the_weight():
    """Under bf16 autocast the frozen weight is cast once and reused until W changes in place
    (a merge, a loaded state); the output is bitwise that of a fresh cast at every step."""
    from relora.lora import LoRAFunction

    torch.manual_seed(0)
    lora = LoRALinear(24, 40, rank=4, alpha=8.0)
    torch.nn.init.normal_(lora.B_lora)
    x = torch.randn(3, 5, 24)

    def fresh_cast(module):  # what every step did before: W.to(bf16) inside the Function
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return LoRAFunction.apply(x, x, module.weight, module.A_lora, module.B_lora, module.scale)

    def cached(module):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x)

    first = lora.weight_as(torch.bfloat16)
    assert first.dtype == torch.bfloat16 and lora.weight_as(torch.bfloat16) is first
    assert torch.equal(cached(lora), fresh_cast(lora))
    lora.merge_and_reinit(lora.scale)
    torch.nn.init.normal_(lora.B_lora)
    assert lora.weight_as(torch.bfloat16) is not first  # the merge changed W: a new copy
    assert torch.equal(cached(lora), fresh_cast(lora))
    with torch.no_grad():
        lora.load_state_dict({k: v + 1 for k, v in lora.state_dict().items()})
    assert torch.equal(cached(lora), fresh_cast(lora))
    assert lora.weight_as(torch.float32) is lora.weight  # no autocast: W itself
    out = cached(lora)
    out.float().sum().backward()
    assert lora.weight.grad is None and lora.A_lora.grad is not None


def test_dropout_keep_mask_rate_and_seed():
    from relora.lora import dropout_keep_mask

    x = torch.empty(1000, 1000)
    torch.manual_seed(0)
    first = dropout_keep_mask(x, 0.1)
    assert first.dtype == torch.bool and first.shape == x.shape
    assert abs(first.float().mean().item() - 0.9) < 0.002  # 1e6 draws: sd 3e-4
    torch.manual_seed(0)
    assert torch.equal(dropout_keep_mask(x, 0.1), first)  # torch's seed determines the mask
    assert not torch.equal(dropout_keep_mask(x, 0.1), first)  # and it advances torch's generator
