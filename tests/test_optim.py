import math

import pytest
import torch

from relora.optim import build_optimizer, lr_factor, parameter_groups, reset_optimizer_state

PAPER_JAGGED = {"name": "jagged_cosine", "warmup": 2000, "horizon": 200_000, "min_ratio": 0.1,
                "reset_every": 2000, "restart_warmup": 100}


@pytest.mark.parametrize("step, expected", [(0, 0.0), (1000, 0.5), (1999, 0.9995), (2000, 0.0),
                                            (2050, 0.5), (2100, 1.0), (4000, 0.0), (4050, 0.5)])
def test_jagged_cosine_matches_the_paper(step, expected):
    assert lr_factor(step, PAPER_JAGGED) == pytest.approx(expected, abs=1e-3)


def jagged_formula(s, W, R, w, m, T):
    c = lambda p: 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    if s < W:
        return s / W
    if s >= R and s % R < w:
        k = s // R
        return (s % R) / w * (m + (1 - m) * c((k * R + w - W) / (T - W)))
    return m + (1 - m) * c((s - W) / (T - W))


@pytest.mark.parametrize("W, R, w, m, T", [(2000, 2000, 100, 0.1, 200_000), (50, 100, 10, 0.0, 1000),
                                          (100, 300, 25, 0.2, 3000)])
def test_jagged_cosine_equals_its_formula_everywhere(W, R, w, m, T):
    schedule = {"name": "jagged_cosine", "warmup": W, "horizon": T, "min_ratio": m, "reset_every": R,
                "restart_warmup": w}
    for s in range(0, T, max(1, T // 5000)):
        assert lr_factor(s, schedule) == pytest.approx(jagged_formula(s, W, R, w, m, T), abs=1e-12)


def test_paper_baseline_linear_schedule():
    schedule = {"name": "linear", "warmup": 2500, "horizon": 200_000, "min_ratio": 0.0}
    assert lr_factor(1250, schedule) == pytest.approx(0.5)
    assert lr_factor(2500, schedule) == pytest.approx(1.0)
    # at the 20k steps the paper trains, the LR has only decayed by ~9%
    assert lr_factor(20_000, schedule) == pytest.approx((200_000 - 20_000) / (200_000 - 2500))
    assert lr_factor(200_000, schedule) == 0.0
    assert lr_factor(250_000, schedule) == 0.0


def test_cosine_and_constant():
    cosine = {"name": "cosine", "warmup": 10, "horizon": 110, "min_ratio": 0.1}
    assert lr_factor(10, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.55)
    assert lr_factor(110, cosine) == pytest.approx(0.1)
    assert lr_factor(500, cosine) == pytest.approx(0.1)
    assert lr_factor(5, {"name": "constant", "warmup": 10, "horizon": 1, "min_ratio": 0}) == 0.5
    assert lr_factor(50, {"name": "constant", "warmup": 10, "horizon": 1, "min_ratio": 0}) == 1.0


def _optimizer_with_state(n=10_000):
    param = torch.nn.Parameter(torch.randn(n))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.randn(n)
    optimizer.step()
    optimizer.state[param]["exp_avg"].copy_(torch.arange(1, n + 1, dtype=torch.float32))
    return param, optimizer


def test_random_reset_zeroes_the_ratio_and_keeps_the_step():
    param, optimizer = _optimizer_with_state()
    step_before = optimizer.state[param]["step"].clone()
    reset_optimizer_state(optimizer, [param], "random", 0.9, torch.Generator().manual_seed(0))
    state = optimizer.state[param]
    kept = (state["exp_avg"] != 0).float().mean().item()
    assert kept == pytest.approx(0.1, abs=0.015)
    assert (state["exp_avg_sq"] != 0).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert torch.equal(state["step"], step_before)


def test_magnitude_reset_keeps_the_largest():
    param, optimizer = _optimizer_with_state(1000)
    reset_optimizer_state(optimizer, [param], "magnitude", 0.9)
    exp_avg = optimizer.state[param]["exp_avg"]
    assert torch.equal(exp_avg[:900], torch.zeros(900))
    assert torch.equal(exp_avg[900:], torch.arange(901, 1001, dtype=torch.float32))


def test_zero_and_none_resets():
    param, optimizer = _optimizer_with_state(100)
    reset_optimizer_state(optimizer, [param], "none", 0.999)
    assert optimizer.state[param]["exp_avg"].count_nonzero() == 100
    reset_optimizer_state(optimizer, [param], "zero", 0.0)
    assert optimizer.state[param]["exp_avg"].count_nonzero() == 0
    assert optimizer.state[param]["exp_avg_sq"].count_nonzero() == 0


def test_random_reset_is_identical_for_identical_generators():
    masks = []
    for _ in range(2):
        torch.manual_seed(1)
        param, optimizer = _optimizer_with_state(1000)
        reset_optimizer_state(optimizer, [param], "random", 0.5, torch.Generator().manual_seed(42))
        masks.append(optimizer.state[param]["exp_avg"] != 0)
    assert torch.equal(masks[0], masks[1])


def test_weight_decay_groups():
    from relora.model import ModelConfig, PicoDecoder

    model = PicoDecoder(ModelConfig(vocab_size=64, d_model=12, n_layers=1, n_heads=3, n_kv_heads=1,
                                    ffn_hidden=48, max_seq_len=8))
    everything = parameter_groups(model, 0.01, "all")
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))
    decay, no_decay = parameter_groups(model, 0.01, "matrices")
    assert no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embedding_proj.weight) in no_decay_ids
    assert id(model.output_norm.weight) in no_decay_ids
    assert id(model.de_embedding_proj.weight) not in no_decay_ids
    training = {"weight_decay": 0.01, "decay_on": "all", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}
    assert build_optimizer(model, training).defaults["eps"] == 1e-8
