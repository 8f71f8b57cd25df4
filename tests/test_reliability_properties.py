"""Property-based tests (hypothesis) of the pure parts: LR schedules, merge-and-reinit, spectra.

Each property runs a modest number of examples (seconds in all); the example-based tests of the
same functions are in tests/test_optim.py, tests/test_lora.py and tests/test_dynamics.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relora.dynamics import batched_singular_values, matrix_metrics, spectrum_metrics, tolerance
from relora.lora import LoRALinear
from relora.optim import lr_factor

FAST = settings(max_examples=60, deadline=None)


# --- schedules ---------------------------------------------------------------------------------

@st.composite
def schedules(draw, names=("constant", "linear", "cosine", "jagged_cosine")):
    """A schedule the config accepts: W <= R and w <= R (reset period checks), W <= T."""
    name = draw(st.sampled_from(names))
    R = draw(st.integers(1, 400))
    W = draw(st.integers(0, R if name == "jagged_cosine" else 2000))
    T = draw(st.integers(max(W, 1), 5000))
    return {"name": name, "warmup": W, "horizon": T, "min_ratio": draw(st.floats(0, 1)),
            "reset_every": R, "restart_warmup": draw(st.integers(1, R))}


def resets(schedule) -> bool:
    return schedule["name"] == "jagged_cosine"


@FAST
@given(schedules(), st.integers(0, 20_000))
def test_schedules_stay_in_0_1(schedule, step):
    assert 0.0 <= lr_factor(step, schedule) <= 1.0


@FAST
@given(schedules(), st.floats(0, 6000, allow_nan=False))
def test_schedules_are_continuous_where_the_formula_is(schedule, s):
    """|f(s + h) - f(s)| -> 0 as h -> 0, except across a reset s = nR >= W (the restart drops
    the LR to 0) and at s = W when the decay has no length (T = W)."""
    W, T, R = schedule["warmup"], schedule["horizon"], schedule["reset_every"]
    h = 1e-6
    # the steepest slope of any piece: warmup 1/W, re-warmup 1/w, cosine/linear decay (pi/2)/(T - W)
    slope = max(1 / max(W, 1), 1 / schedule["restart_warmup"], 2 / max(T - W, 1))
    jumps = [n * R for n in range(1, int((s + h) // R) + 1) if n * R >= W] if resets(schedule) else []
    if any(s < j <= s + h for j in jumps) or (T == W and s < W <= s + h):
        return
    assert abs(lr_factor(s + h, schedule) - lr_factor(s, schedule)) <= 2 * slope * h + 1e-12


@FAST
@given(schedules(names=("jagged_cosine",)), st.integers(1, 50))
def test_jagged_cosine_is_zero_exactly_at_every_reset(schedule, n):
    """f(nR) = 0 for nR >= W: the update just before each merge runs with learning rate zero."""
    step = n * schedule["reset_every"]
    if step >= schedule["warmup"]:
        assert lr_factor(step, schedule) == 0.0
        if schedule["restart_warmup"] < schedule["reset_every"]:  # then back on the cosine
            assert lr_factor(step + schedule["restart_warmup"], schedule) > 0 or schedule["min_ratio"] == 0


@FAST
@given(schedules(names=("linear", "cosine", "jagged_cosine")), st.integers(0, 6000))
def test_warmup_reaches_the_peak(schedule, step):
    """Rising linearly from 0 to 1 over W steps, and never above 1 after it."""
    W = schedule["warmup"]
    if step < W:
        assert lr_factor(step, schedule) == pytest.approx(step / W)
    if W and schedule["horizon"] > W and not (resets(schedule) and W == schedule["reset_every"]):
        assert lr_factor(W, schedule) == pytest.approx(1.0)  # (W = R: the first reset, f = 0)


# --- merge-and-reinit ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24), data=st.data(),
       alpha=st.floats(0.25, 64), seed=st.integers(0, 2**31 - 1))
def test_merge_and_reinit_preserves_the_function(out_features, in_features, data, alpha, seed):
    rank = data.draw(st.integers(1, min(out_features, in_features)), label="rank")
    generator = torch.Generator().manual_seed(seed)
    layer = LoRALinear(in_features, out_features, rank, alpha, dropout=0.1).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.A_lora.copy_(torch.randn(rank, in_features, generator=generator))
        layer.B_lora.copy_(torch.randn(out_features, rank, generator=generator))
    x = torch.randn(5, in_features, generator=generator)
    before, effective = layer(x), layer.effective_weight().clone()
    layer.merge_and_reinit(layer.scale, torch.Generator().manual_seed(seed + 1))
    scale = max(1.0, float(effective.abs().max()) * in_features)
    torch.testing.assert_close(layer.weight, effective, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5 * scale)
    assert torch.count_nonzero(layer.B_lora) == 0  # a fresh adapter starts from zero
    assert torch.count_nonzero(layer.A_lora) > 0 or in_features * rank == 0


@settings(max_examples=30, deadline=None)
@given(out_features=st.integers(1, 16), in_features=st.integers(1, 16), alpha=st.floats(0.5, 32),
       seed=st.integers(0, 2**31 - 1))
def test_paper_merge_adds_b_a_without_the_scale(out_features, in_features, alpha, seed):
    rank = min(out_features, in_features, 4)
    generator = torch.Generator().manual_seed(seed)
    layer = LoRALinear(in_features, out_features, rank, alpha)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.B_lora.copy_(torch.randn(out_features, rank, generator=generator))
    W, BA = layer.weight.clone(), layer.B_lora @ layer.A_lora
    layer.merge_and_reinit(1.0)  # merge_scale: paper
    torch.testing.assert_close(layer.weight, W + BA, rtol=1e-5, atol=1e-5)


# --- spectra ------------------------------------------------------------------------------------

def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@st.composite
def spectra(draw):
    """A float64 matrix U diag(sigma) V^T with a drawn shape and spectrum (some exact zeros, the
    rest within 6 orders of magnitude), so its rank is unambiguous at float32's tolerance."""
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    k = min(m, n)
    sigma = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(k), range(k)] = torch.tensor(sorted(sigma, reverse=True), dtype=torch.float64)
    return orthogonal(m, g) @ S @ orthogonal(n, g).T, seed


def assert_same_metrics(a: dict, b: dict):
    assert a["numerical_rank"] == b["numerical_rank"]
    for key in ("effective_rank", "proportional_effective_rank", "condition_number", "spectral_norm", "frobenius_norm"):
        if math.isnan(a[key]) or math.isinf(a[key]):
            assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-8, abs=1e-12), key


@FAST
@given(spectra())
def test_spectra_are_invariant_to_rotations_and_transposition(matrix_seed):
    M, seed = matrix_seed
    g = torch.Generator().manual_seed(seed + 7)
    rotated = orthogonal(M.shape[0], g) @ M @ orthogonal(M.shape[1], g)
    base = matrix_metrics(M, torch.float32)
    s = base["spectral_norm"] if base["spectral_norm"] > 0 else None
    for other in (rotated, M.T, rotated.T):
        assert_same_metrics(base, matrix_metrics(other, torch.float32, s=s))


@FAST
@given(st.lists(spectra(), min_size=1, max_size=5))
def test_batched_spectra_equal_each_matrix_alone(matrices):
    """The batched path (grouped by shape, transposed to tall) gives each matrix's own values."""
    Ms = [M for M, _ in matrices] + [M.T for M, _ in matrices]
    for M, sigma in zip(Ms, batched_singular_values(Ms)):
        alone = torch.linalg.svdvals(M)
        top = float(alone.max())
        torch.testing.assert_close(sigma, alone, rtol=1e-10, atol=1e-10 * max(1.0, top))
        tol = torch.tensor(tolerance(min(M.shape), torch.float32, top))
        assert spectrum_metrics(sigma, tol)["numerical_rank"] == spectrum_metrics(alone, tol)["numerical_rank"]
