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


def _moments_in_unrelated_orders(n):
    """AdamW state whose exp_avg and exp_avg_sq have unrelated magnitude orders (as after
    training, where |m| and v rank the entries differently), no entry zero."""
    param, optimizer = _optimizer_with_state(n)
    state = optimizer.state[param]
    generator = torch.Generator().manual_seed(7)
    state["exp_avg"].copy_(torch.randn(n, generator=generator).abs() + 1e-3)
    state["exp_avg"][::2] *= -1  # first moments of both signs
    state["exp_avg_sq"].copy_(torch.rand(n, generator=generator) + 1e-3)
    return param, optimizer


def _first_moment_without_second(optimizer, param) -> int:
    """Entries a reset left with v == 0 but m != 0: they move by lr * m_hat / eps next update."""
    state = optimizer.state[param]
    return int(((state["exp_avg_sq"] == 0) & (state["exp_avg"] != 0)).sum())


@pytest.mark.parametrize("mode, ratio", [("random", 0.999), ("random", 0.5), ("magnitude", 0.999),
                                         ("magnitude", 0.9)])
def test_shared_masks_leave_no_first_moment_without_its_second(mode, ratio):
    n = 100_000
    param, optimizer = _moments_in_unrelated_orders(n)
    v_before = optimizer.state[param]["exp_avg_sq"].clone()
    reset_optimizer_state(optimizer, [param], mode, ratio, torch.Generator().manual_seed(3), masks="shared")
    state = optimizer.state[param]
    assert _first_moment_without_second(optimizer, param) == 0
    # one mask for both moments: the same entries survive in each, about (1 - ratio) of them
    assert torch.equal(state["exp_avg"] != 0, state["exp_avg_sq"] != 0)
    kept = int((state["exp_avg_sq"] != 0).sum())
    if mode == "magnitude":  # exactly the largest v survive
        assert kept == n - round(ratio * n)
        assert torch.equal(state["exp_avg_sq"] != 0, v_before >= v_before.sort().values[round(ratio * n)])
    else:
        assert kept == pytest.approx((1 - ratio) * n, rel=0.2)


@pytest.mark.parametrize("mode, ratio", [("random", 0.999), ("magnitude", 0.999), ("magnitude", 0.9)])
def test_independent_masks_leave_first_moments_without_second(mode, ratio):
    """Quirk 4, the reference's behaviour: about ratio * (1 - ratio) of the entries keep m
    while v is zeroed (random: independent draws; magnitude: unrelated rankings)."""
    n = 100_000
    param, optimizer = _moments_in_unrelated_orders(n)
    reset_optimizer_state(optimizer, [param], mode, ratio, torch.Generator().manual_seed(3))
    orphans = _first_moment_without_second(optimizer, param)
    assert orphans == pytest.approx(ratio * (1 - ratio) * n, rel=0.35)
    assert orphans > 0


def test_shared_magnitude_mask_ranks_by_the_second_moment():
    param, optimizer = _optimizer_with_state(1000)
    state = optimizer.state[param]
    state["exp_avg_sq"].copy_(torch.arange(1000, 0, -1, dtype=torch.float32))  # the reverse order of m
    reset_optimizer_state(optimizer, [param], "magnitude", 0.9, masks="shared")
    assert torch.equal(state["exp_avg_sq"][:100], torch.arange(1000, 900, -1, dtype=torch.float32))
    assert torch.equal(state["exp_avg"][:100], torch.arange(1, 101, dtype=torch.float32))
    assert state["exp_avg"][100:].count_nonzero() == 0 and state["exp_avg_sq"][100:].count_nonzero() == 0


@pytest.mark.parametrize("masks", ["independent", "shared"])
def test_random_reset_is_deterministic_per_generator_seed(masks):
    states = []
    for _ in range(2):
        param, optimizer = _moments_in_unrelated_orders(5000)
        reset_optimizer_state(optimizer, [param], "random", 0.9, torch.Generator().manual_seed(11), masks=masks)
        states.append({k: optimizer.state[param][k].clone() for k in ("exp_avg", "exp_avg_sq")})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_reset_masks_is_an_error():
    param, optimizer = _optimizer_with_state(10)
    with pytest.raises(ValueError, match="masks 'both'"):
        reset_optimizer_state(optimizer, [param], "random", 0.5, masks="both")


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
