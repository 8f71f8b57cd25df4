import math
from collections import defaultdict

import pytest
import torch

from relora.dynamics import (TARGETS, analyse_checkpoints, batched_singular_values, linear_cka,
                             matrix_metrics, probe_gradients_and_activations, snapshot_targets,
                             spectra_rows, spectrum_metrics, tolerance)
from relora.checkpoint import load_snapshot
from relora.model_config import linear_key
from test_evaluate import make_model, relora_adapters, save_checkpoint, tiny_config


# ---------------------------------------------------------------- closed forms


def test_identity_has_full_rank_per_one_and_condition_one():
    m = matrix_metrics(torch.eye(8))
    assert m["numerical_rank"] == 8
    assert m["effective_rank"] == pytest.approx(8) and m["proportional_effective_rank"] == pytest.approx(1.0)
    assert m["condition_number"] == pytest.approx(1.0)
    assert m["spectral_norm"] == pytest.approx(1.0) and m["frobenius_norm"] == pytest.approx(math.sqrt(8))


def test_rank_one_matrix():
    torch.manual_seed(0)
    M = torch.outer(torch.randn(12), torch.randn(5))  # float32 storage: rounding noise must not count
    m = matrix_metrics(M)
    assert m["numerical_rank"] == 1
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["condition_number"] == math.inf


def test_zero_matrix_has_rank_zero_and_nan_metrics():
    m = matrix_metrics(torch.zeros(6, 4))
    assert m["numerical_rank"] == 0
    assert math.isnan(m["effective_rank"]) and math.isnan(m["proportional_effective_rank"]) and math.isnan(m["condition_number"])
    assert m["frobenius_norm"] == 0 and m["spectral_norm"] == 0


def test_known_spectrum_gives_exact_effective_rank():
    torch.manual_seed(1)
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(7, 4, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    M = U @ torch.diag(sigma) @ V.T
    p = sigma / sigma.sum()
    expected = math.exp(-float((p * p.log()).sum()))
    m = matrix_metrics(M)
    assert m["effective_rank"] == pytest.approx(expected, rel=1e-12)
    assert m["proportional_effective_rank"] == pytest.approx(expected / 4, rel=1e-12)
    assert m["condition_number"] == pytest.approx(4.0, rel=1e-12)
    assert m["frobenius_norm"] == pytest.approx(math.sqrt(16 + 4 + 1 + 1), rel=1e-12)


def test_tolerance_follows_the_stored_dtype_and_the_given_scale():
    sigma = torch.tensor([[1.0, 1e-5, 0.0]], dtype=torch.float64)
    # float32: tol = 3 * 1.19e-7 * 1 -> 1e-5 counts; bfloat16: tol = 3 * 7.8e-3 -> it does not
    assert spectrum_metrics(sigma, torch.tensor([tolerance(3, torch.float32, 1.0)]))["numerical_rank"].item() == 2
    assert spectrum_metrics(sigma, torch.tensor([tolerance(3, torch.bfloat16, 1.0)]))["numerical_rank"].item() == 1
    # values AT the tolerance count as zero
    assert spectrum_metrics(sigma, torch.tensor([1e-5], dtype=torch.float64))["numerical_rank"].item() == 1
    # the effective rank only sees the kept values: [1, 0, 0] -> 1
    assert spectrum_metrics(sigma, torch.tensor([1e-5], dtype=torch.float64))["effective_rank"].item() == pytest.approx(1.0)


def test_cka_invariances():
    torch.manual_seed(2)
    X = torch.randn(50, 6)
    Q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, 3 * X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X + 5.0) == pytest.approx(1.0, abs=1e-12)  # column-centred
    assert linear_cka(X, torch.randn(50, 6)) < 0.5


# ---------------------------------------------------------------- batched == naive


def test_batched_spectra_equal_the_per_matrix_loop():
    torch.manual_seed(3)
    shapes = [(24, 24), (8, 24), (96, 24), (24, 96), (24, 24), (96, 24)]
    matrices = [torch.randn(*s) for s in shapes] + [torch.zeros(8, 24), torch.outer(torch.randn(24), torch.randn(96))]
    batched = batched_singular_values(matrices)
    for M, sigma in zip(matrices, batched):
        torch.testing.assert_close(sigma, torch.linalg.svdvals(M.double()), rtol=1e-10, atol=1e-12)
    from relora.dynamics import Target

    targets = [Target(0, f"m{i}", "weight", M.double(), M.dtype) for i, M in enumerate(matrices)]
    rows = spectra_rows(targets)
    for i, M in enumerate(matrices):
        naive = matrix_metrics(M)
        got = {r["metric"]: r["value"] for r in rows if r["module"] == f"m{i}"}
        for name, value in naive.items():
            if math.isnan(value):
                assert math.isnan(got[name]), name
            else:
                assert got[name] == pytest.approx(value, rel=1e-9), (i, name)


# ---------------------------------------------------------------- checkpoints


def test_effective_weight_of_a_relora_checkpoint(tmp_path):
    config = tiny_config()
    model = make_model(config, seed=0)
    adapters = relora_adapters(config, rank=4, seed=1)
    save_checkpoint(tmp_path / "step_5", model, step=5, adapters=adapters, rank=4, alpha=8.0)
    snap = load_snapshot(tmp_path / "step_5", expected=config)
    assert snap.scale == 2.0
    key = linear_key(1, "w_2")
    W = model.state_dict()[f"{key}.weight"].double()
    A, B = adapters[f"{key}.A_lora"].double(), adapters[f"{key}.B_lora"].double()
    torch.testing.assert_close(snap.effective_weight(1, "w_2"), W + 2.0 * B @ A)
    torch.testing.assert_close(snap.adapter(1, "w_2"), 2.0 * B @ A)
    # the plain model built from it computes x (W + scale B A)^T
    plain = snap.model()
    torch.testing.assert_close(plain.layers[1].swiglu.w_2.weight, (W + 2.0 * B @ A).float())


def test_effective_weight_matches_the_trainers_lora_module(tmp_path):
    lora = pytest.importorskip("relora.lora")
    config = tiny_config()
    model = make_model(config, seed=0)
    lora.wrap_with_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "w_2"])
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.B_lora.normal_()
    from safetensors.torch import save_file
    import json

    (tmp_path / "step_1").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "step_1" / "model.safetensors")
    (tmp_path / "step_1" / "config.json").write_text(json.dumps(
        {"model": config.to_dict(), "method": {"name": "relora", "rank": 4, "alpha": 8.0, "scale": 2.0}, "step": 1}))
    snap = load_snapshot(tmp_path / "step_1", expected=config)
    torch.testing.assert_close(snap.effective_weight(0, "q_proj").float(),
                               model.layers[0].attention.q_proj.effective_weight())
    idx = torch.randint(0, config.vocab_size, (2, 12))
    torch.testing.assert_close(snap.model()(idx), model.eval()(idx), rtol=1e-5, atol=1e-5)


def test_update_is_zero_at_step_zero_and_adapter_zero_after_reset(tmp_path):
    config = tiny_config()
    model = make_model(config, seed=0)
    adapters = relora_adapters(config, rank=4, seed=1, zero_b=True)
    save_checkpoint(tmp_path / "step_0", model, step=0, adapters=adapters, rank=4, alpha=8.0)
    snap = load_snapshot(tmp_path / "step_0")
    items, extra = snapshot_targets(snap, snap, None, ("weight", "update", "adapter"))
    rows = spectra_rows(items, extra)
    for target in ("update", "adapter"):
        ranks = [r["value"] for r in rows if r["target"] == target and r["metric"] == "numerical_rank"]
        effective_ranks = [r["value"] for r in rows if r["target"] == target and r["metric"] == "effective_rank"]
        assert ranks and all(v == 0 for v in ranks) and all(math.isnan(v) for v in effective_ranks)
    weight_ranks = [r["value"] for r in rows if r["target"] == "weight" and r["metric"] == "numerical_rank"]
    assert all(v > 0 for v in weight_ranks)


def test_adapter_rank_is_the_lora_rank(tmp_path):
    config = tiny_config()
    model = make_model(config, seed=0)
    save_checkpoint(tmp_path / "s", model, step=3, adapters=relora_adapters(config, rank=4, seed=2), rank=4, alpha=8.0)
    snap = load_snapshot(tmp_path / "s")
    items, extra = snapshot_targets(snap, None, None, ("adapter",))
    rows = spectra_rows(items, extra)
    ranks = {r["value"] for r in rows if r["metric"] == "numerical_rank"}
    assert ranks == {4.0}
    pers = [r["value"] for r in rows if r["metric"] == "proportional_effective_rank"]
    assert all(p <= 4 / 8 + 1e-12 for p in pers)  # capped at r / k (k = 8 for k/v, 24 otherwise)


def test_probe_gradient_equals_autograd_of_the_loss():
    config = tiny_config()
    model = make_model(config, seed=0)
    probe = torch.randint(0, config.vocab_size, (4, 9))
    grads, acts = probe_gradients_and_activations(model, probe, micro_batch=3)
    reference = make_model(config, seed=0)
    loss = reference(probe[:, :-1], targets=probe[:, 1:])
    loss.backward()
    torch.testing.assert_close(grads[(1, "k_proj")], reference.layers[1].attention.k_proj.weight.grad,
                               rtol=1e-5, atol=1e-7)
    _, hidden = reference(probe[:, :-1], return_hidden=True)
    torch.testing.assert_close(acts[0], hidden[0].detach().flatten(0, 1))
    assert len(acts) == config.n_layers and acts[0].shape == (4 * 8, config.d_model)
    grads_only, no_acts = probe_gradients_and_activations(model, probe, want_activations=False)
    torch.testing.assert_close(grads_only[(0, "w_1")], grads[(0, "w_1")], rtol=1e-5, atol=1e-7)
    assert no_acts == [None] * config.n_layers


def test_analyse_checkpoints_rows(tmp_path):
    config = tiny_config()
    paths = {}
    for step, seed in [(0, 0), (2, 1), (4, 2)]:
        model = make_model(config, seed=seed)
        save_checkpoint(tmp_path / f"step_{step}", model, step=step,
                        adapters=relora_adapters(config, rank=4, seed=seed, zero_b=step == 0), rank=4, alpha=8.0)
        paths[step] = tmp_path / f"step_{step}"
    probe = torch.randint(0, config.vocab_size, (2, 9))
    rows = analyse_checkpoints({s: (lambda p=p: load_snapshot(p)) for s, p in paths.items()}, probe)
    n_linear = config.n_layers * 7
    # 5 spectral targets x 6 metrics, the adapter's condition_number_top_r and _raw, 2 adapter_A
    # metrics; from the second step on 3 more comparing A with the previous step's
    per_step = n_linear * (5 * 6 + 2 + 2) + config.n_layers
    assert len(rows) == 3 * per_step + 2 * n_linear * 3
    cka_final = [r["value"] for r in rows if r["metric"] == "cka_to_final" and r["step"] == 4]
    assert cka_final == pytest.approx([1.0] * config.n_layers)
    assert {r["target"] for r in rows} == set(TARGETS) | {"activation"}


def _orthonormal_columns(n, k, seed):
    Q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return Q


def test_base_is_the_frozen_weight_and_weight_the_effective_one(tmp_path):
    """Known matrices: W = U diag(5, 4, ...) V^T, and an adapter that adds 10 along a fresh
    direction; `base` has W's spectrum, `weight` the merged one's."""
    config = tiny_config()
    model = make_model(config, seed=0)
    d = config.d_model
    U, V = _orthonormal_columns(d, d, 1), _orthonormal_columns(d, d, 2)
    sigma_w = torch.linspace(5.0, 1.0, d, dtype=torch.float64)
    W = U @ torch.diag(sigma_w) @ V.T
    with torch.no_grad():
        model.layers[0].attention.q_proj.weight.copy_(W)
    adapters = relora_adapters(config, rank=4, seed=1)
    key = linear_key(0, "q_proj")
    # scale * B A = 2 * (5 u_0) (v_0)^T: the top direction of W grows from 5 to 15
    A = torch.zeros(4, d, dtype=torch.float64)
    B = torch.zeros(d, 4, dtype=torch.float64)
    A[0], B[:, 0] = V[:, 0], 5.0 * U[:, 0]
    adapters[f"{key}.A_lora"], adapters[f"{key}.B_lora"] = A.float(), B.float()
    save_checkpoint(tmp_path / "s", model, step=3, adapters=adapters, rank=4, alpha=8.0)
    rows = analyse_checkpoints({3: lambda: load_snapshot(tmp_path / "s")}, None,
                               targets=("weight", "base", "adapter"), cka=False)
    got = {(r["target"], r["metric"]): r["value"] for r in rows if r["layer"] == 0 and r["module"] == "q_proj"}
    assert got[("base", "spectral_norm")] == pytest.approx(5.0, rel=1e-6)
    assert got[("base", "condition_number")] == pytest.approx(5.0, rel=1e-5)
    assert got[("weight", "spectral_norm")] == pytest.approx(15.0, rel=1e-6)
    assert got[("weight", "condition_number")] == pytest.approx(15.0, rel=1e-5)
    p = sigma_w / sigma_w.sum()
    assert got[("base", "effective_rank")] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-6)
    assert got[("adapter", "numerical_rank")] == 1
    # a linear without adapter: base and weight rows identical, whatever the matrix
    full = tmp_path / "full"
    save_checkpoint(full, model, step=3)
    rows = analyse_checkpoints({3: lambda: load_snapshot(full)}, None, targets=("weight", "base"), cka=False)
    weight = {(r["layer"], r["module"], r["metric"]): r["value"] for r in rows if r["target"] == "weight"}
    base = {(r["layer"], r["module"], r["metric"]): r["value"] for r in rows if r["target"] == "base"}
    assert weight.keys() == base.keys() and len(weight) == config.n_layers * 7 * 6
    assert all(base[k] == weight[k] or (math.isnan(base[k]) and math.isnan(weight[k])) for k in weight)
    assert base[(0, "q_proj", "spectral_norm")] == pytest.approx(5.0, rel=1e-6)
    # `base` alone (no weight target) is computed, not copied
    alone = analyse_checkpoints({3: lambda: load_snapshot(full)}, None, targets=("base",), cka=False)
    assert {(r["layer"], r["module"], r["metric"]): r["value"] for r in alone if r["metric"] != "effective_rank"} == \
        pytest.approx({k: v for k, v in base.items() if k[2] != "effective_rank"}, rel=1e-12)


@pytest.mark.parametrize("top, expected", [([4.0, 3.0, 2.0, 0.5], 8.0), ([4.0, 3.0, 2.0, 0.0], math.nan)])
def test_adapter_condition_number_over_its_top_r_singular_values(tmp_path, top, expected):
    """scale * B A with B = U diag(top), A = V^T (orthonormal U, V): its singular values are
    scale * top, so sigma_1 / sigma_r = top[0] / top[-1]; NaN when B A has rank below r."""
    config = tiny_config()
    model = make_model(config, seed=0)
    adapters = relora_adapters(config, rank=4, seed=1)
    key = linear_key(1, "w_2")  # 24 x 96: r = 4 of k = 24
    out_f, in_f = model.layers[1].swiglu.w_2.weight.shape
    U, V = _orthonormal_columns(out_f, 4, 3), _orthonormal_columns(in_f, 4, 4)
    adapters[f"{key}.B_lora"] = (U @ torch.diag(torch.tensor(top, dtype=torch.float64))).float()
    adapters[f"{key}.A_lora"] = V.T.float()
    save_checkpoint(tmp_path / "s", model, step=3, adapters=adapters, rank=4, alpha=8.0)
    items, extra = snapshot_targets(load_snapshot(tmp_path / "s"), None, None, ("adapter",))
    rows = spectra_rows(items, extra)
    got = {r["metric"]: r["value"] for r in rows if r["layer"] == 1 and r["module"] == "w_2"}
    assert got["condition_number"] == math.inf or math.isnan(got["condition_number"])  # rank r < k
    if math.isnan(expected):
        assert got["numerical_rank"] == 3 and math.isnan(got["condition_number_top_r"])
    else:
        assert got["spectral_norm"] == pytest.approx(2.0 * top[0], rel=1e-6)
        assert got["condition_number_top_r"] == pytest.approx(expected, rel=1e-5)
    # every adapter has the metric; none of the other targets does
    assert sum(r["metric"] == "condition_number_top_r" for r in rows) == config.n_layers * 7
    weight_items, weight_extra = snapshot_targets(load_snapshot(tmp_path / "s"), None, None, ("weight",))
    assert not any(r["metric"] == "condition_number_top_r" for r in spectra_rows(weight_items, weight_extra))


def test_adapter_a_outliers_against_the_init_bound(tmp_path):
    """A known factor A of w_0 (in_features 24, bound 1/sqrt(24)): entries at 5, -3.5, 3.2 and
    2.8 times the bound give max 5 and three entries above 3x."""
    from relora.dynamics import adapter_a_rows

    config = tiny_config()
    model = make_model(config, seed=0)
    adapters = relora_adapters(config, rank=4, seed=1)
    for k in adapters:
        if k.endswith("A_lora"):  # every other adapter inside its bound: |A| <= 0.5 / sqrt(in)
            adapters[k] = adapters[k].clamp(-1, 1) * 0.5 / math.sqrt(adapters[k].shape[1])
    key = linear_key(1, "w_0")
    bound = 1 / math.sqrt(24)
    A = torch.zeros(4, 24)
    A[0, 0], A[1, 2], A[2, 3], A[3, 4] = 5 * bound, -3.5 * bound, 3.2 * bound, 2.8 * bound
    adapters[f"{key}.A_lora"] = A
    save_checkpoint(tmp_path / "s", model, step=3, adapters=adapters, rank=4, alpha=8.0)
    rows = adapter_a_rows(load_snapshot(tmp_path / "s"))
    assert len(rows) == config.n_layers * 7 * 2 and {r["target"] for r in rows} == {"adapter_A"}
    got = {(r["layer"], r["module"], r["metric"]): r["value"] for r in rows}
    assert got[(1, "w_0", "max_abs_over_init_bound")] == pytest.approx(5.0, rel=1e-6)
    assert got[(1, "w_0", "entries_over_3x_bound")] == 3
    # w_2's in_features is 96: its bound is 1/sqrt(96), half of 1/sqrt(24)
    others = [v for (layer, module, metric), v in got.items() if (layer, module) != (1, "w_0")]
    assert all(v <= 0.5 + 1e-6 for v in others[0::2]) and all(v == 0 for v in others[1::2])
    # a full-rank checkpoint has no adapter: no rows
    save_checkpoint(tmp_path / "full", model, step=3)
    assert adapter_a_rows(load_snapshot(tmp_path / "full")) == []


def test_spectral_norms_from_the_gram_matrix_match_svd():
    from relora.dynamics import batched_spectral_norms

    torch.manual_seed(4)
    matrices = [torch.randn(24, 96, dtype=torch.float64), torch.randn(96, 24, dtype=torch.float64),
                torch.zeros(8, 24, dtype=torch.float64), torch.randn(8, 24, dtype=torch.float64) * 1e-3]
    for M, s in zip(matrices, batched_spectral_norms(matrices)):
        assert s == pytest.approx(float(torch.linalg.svdvals(M)[0]), rel=1e-12, abs=1e-300)


# ---------------------------------------------------------------- the paper's measurements


def _snapshot_with(tensors: dict, config=None):
    from pathlib import Path

    from relora.checkpoint import Snapshot

    return Snapshot(Path("synthetic"), config or tiny_config(), tensors, scale=2.0)


def test_raw_condition_number_of_a_full_rank_product_is_its_closed_form():
    """r = k: B = U diag(4, 3, 2, 0.5), A = V^T (orthonormal U, V): B A has singular values
    4, 3, 2, 0.5, so sigma_max / sigma_min = 8 (the scale does not enter)."""
    from relora.dynamics import raw_condition_rows

    U, V = _orthonormal_columns(4, 4, 5), _orthonormal_columns(6, 4, 6)
    key = linear_key(0, "q_proj")
    B = U @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 0.5], dtype=torch.float64))
    rows = raw_condition_rows(_snapshot_with({f"{key}.A_lora": V.T.float(), f"{key}.B_lora": B.float()}))
    assert [(r["layer"], r["module"], r["target"], r["metric"]) for r in rows] == \
        [(0, "q_proj", "adapter", "condition_number_raw")]
    assert rows[0]["value"] == pytest.approx(8.0, rel=1e-5)


def test_raw_condition_number_measures_the_dtype_for_a_rank_r_product():
    """r < k: the exact product has k - r zero singular values. Exact zeros (a product of
    coordinate vectors) give inf; a generic rank-4 product rounded to float32 leaves rounding
    noise as sigma_min (a ratio far above 1e4, where sigma_1 / sigma_r is about 2), and the
    same factors in float64 leave noise some nine orders of magnitude smaller."""
    from relora.dynamics import raw_condition_rows

    key = linear_key(1, "w_2")
    A = torch.zeros(4, 96)
    A[:, :4] = torch.eye(4)
    B = torch.zeros(24, 4)
    B[:4] = torch.diag(torch.tensor([4.0, 3.0, 2.0, 0.5]))
    exact = raw_condition_rows(_snapshot_with({f"{key}.A_lora": A, f"{key}.B_lora": B}))
    assert exact[0]["value"] == math.inf
    U, V = _orthonormal_columns(24, 4, 7), _orthonormal_columns(96, 4, 8)
    B = U @ torch.diag(torch.tensor([2.0, 1.8, 1.5, 1.0], dtype=torch.float64))
    fp32 = raw_condition_rows(_snapshot_with({f"{key}.A_lora": V.T.float(), f"{key}.B_lora": B.float()}))[0]["value"]
    fp64 = raw_condition_rows(_snapshot_with({f"{key}.A_lora": V.T, f"{key}.B_lora": B}))[0]["value"]
    assert 1e4 < fp32 < 1e12
    assert fp64 > 1e6 * fp32
    zero = raw_condition_rows(_snapshot_with({f"{key}.A_lora": V.T.float(), f"{key}.B_lora": torch.zeros(24, 4)}))
    assert math.isnan(zero[0]["value"])


def _hand_built_attention(config, a_kv, d_heads):
    """W_V: key/value head kv reads residual dims [kv hd, (kv+1) hd) times a_kv; W_O: head h
    writes diag(d_heads[h]) of its output back to the dims of its key/value head."""
    hd, group = config.head_dim, config.n_heads // config.n_kv_heads
    d = config.d_model
    W_V = torch.zeros(config.n_kv_heads * hd, d, dtype=torch.float64)
    W_O = torch.zeros(d, config.n_heads * hd, dtype=torch.float64)
    for kv in range(config.n_kv_heads):
        W_V[kv * hd:(kv + 1) * hd, kv * hd:(kv + 1) * hd] = a_kv[kv] * torch.eye(hd, dtype=torch.float64)
    for h in range(config.n_heads):
        kv = h // group
        W_O[kv * hd:(kv + 1) * hd, h * hd:(h + 1) * hd] = torch.diag(torch.tensor(d_heads[h], dtype=torch.float64))
    return W_V, W_O


def test_ov_circuit_of_hand_built_weights(tmp_path):
    """OV_h = W_V[kv(h)] @ W_O[:, h] = a_kv(h) diag(d_h): singular values |a d_h|, exactly. The
    layer map sum_h W_O_h W_V_kv(h) is block diagonal with blocks a_kv sum_{h in group} diag(d_h)
    on the first n_kv_heads * hd dims, zero elsewhere: rank n_kv_heads * hd < d."""
    config = tiny_config()  # d 24, 6 heads, 2 key/value heads: hd 4, group 3
    a_kv = [2.0, -1.0]
    d_heads = [[4, 3, 2, 1], [1, 1, 1, 1], [1, 0, 0, 0], [5, 0.5, 0.5, 0.5], [1, 2, 3, 4], [0, 0, 0, 0]]
    W_V, W_O = _hand_built_attention(config, a_kv, d_heads)
    model = make_model(config, seed=0)
    with torch.no_grad():
        model.layers[1].attention.v_proj.weight.copy_(W_V)
        model.layers[1].attention.o_proj.weight.copy_(W_O)
    save_checkpoint(tmp_path / "s", model, step=3)
    rows = analyse_checkpoints({3: lambda: load_snapshot(tmp_path / "s")}, None, targets=("ov",), cka=False)
    got = {(r["module"], r["metric"]): r["value"] for r in rows if r["layer"] == 1}
    assert {r["target"] for r in rows} == {"ov"}
    assert {r["module"] for r in rows} == {f"head_{h}" for h in range(6)} | {"all_heads"}
    assert got[("head_0", "spectral_norm")] == pytest.approx(8.0, rel=1e-6)
    assert got[("head_0", "condition_number")] == pytest.approx(4.0, rel=1e-6)
    assert got[("head_1", "proportional_effective_rank")] == pytest.approx(1.0, rel=1e-6)  # 2 I: PER over hd
    assert got[("head_2", "numerical_rank")] == 1 and got[("head_2", "proportional_effective_rank")] == pytest.approx(0.25)
    assert got[("head_4", "spectral_norm")] == pytest.approx(4.0, rel=1e-6)  # kv 1: |-1| x 4
    assert got[("head_5", "numerical_rank")] == 0
    # layer map: kv 0 block 2 (d_0 + d_1 + d_2) = 2 diag(6, 4, 3, 2), kv 1 block -1 diag(6, 2.5, 3.5, 4.5)
    sigma = sorted([12.0, 8.0, 6.0, 4.0, 6.0, 2.5, 3.5, 4.5], reverse=True)
    assert got[("all_heads", "numerical_rank")] == 8 and got[("all_heads", "condition_number")] == math.inf
    assert got[("all_heads", "spectral_norm")] == pytest.approx(sigma[0], rel=1e-6)
    assert got[("all_heads", "frobenius_norm")] == pytest.approx(math.sqrt(sum(s * s for s in sigma)), rel=1e-6)


def test_ov_layer_map_is_what_the_attention_computes_for_one_token():
    """Orientation check against the model: with one token, attention weights are 1 on itself,
    so the attention output is x @ (sum_h W_O_h W_V_kv(h))^T for any weights."""
    from relora.dynamics import ov_circuits

    config = tiny_config()
    model = make_model(config, seed=3)
    attention = model.layers[0].attention
    maps = ov_circuits(attention.v_proj.weight.detach(), attention.o_proj.weight.detach(),
                       config.n_heads, config.n_kv_heads)
    x = torch.randn(5, 1, config.d_model)
    with torch.no_grad():
        y = attention(x, model.rope_cos[:1], model.rope_sin[:1])
    torch.testing.assert_close(y.double(), x.double() @ maps["all_heads"].T, rtol=1e-5, atol=1e-6)
    # and each head's hd x hd matrix is the paper's slice product
    hd = config.head_dim
    W_V, W_O = attention.v_proj.weight.double(), attention.o_proj.weight.double()
    torch.testing.assert_close(maps["head_4"], W_V[hd:2 * hd] @ W_O[:, 4 * hd:5 * hd])


def test_linear_cka_of_a_known_rescaling():
    """X with orthonormal centred columns and Y = X diag(s): CKA = sum s^2 / (sqrt(p) sqrt(sum s^4))."""
    n, p = 40, 3
    Q = _orthonormal_columns(n, p + 1, 9)
    ones = torch.ones(n, 1, dtype=torch.float64) / math.sqrt(n)
    X = Q - ones @ (ones.T @ Q)  # centred
    X, _ = torch.linalg.qr(X)
    X = X[:, :p]
    X = X - X.mean(0, keepdim=True)
    X, _ = torch.linalg.qr(X)
    s = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    expected = float((s ** 2).sum() / (math.sqrt(p) * (s ** 4).sum().sqrt()))
    assert abs(float(X.mean(0).abs().max())) < 1e-12
    assert linear_cka(X, X @ torch.diag(s)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("features", ["block_output", "w2_last_token", "ov_last_token"])
def test_cka_features_do_not_depend_on_padding_and_match_the_final_step(tmp_path, features):
    from relora.dynamics import activation_features

    config = tiny_config()
    model = make_model(config, seed=0)
    sequences = [torch.randint(0, config.vocab_size, (n,)) for n in (3, 16, 7, 1, 9)]
    batched = activation_features(model, sequences, features, micro_batch=5)
    alone = [activation_features(model, [s], features, micro_batch=1) for s in sorted(sequences, key=len)]
    expected_modules = {"block_output": {"block"}, "w2_last_token": {"w_2"},
                        "ov_last_token": {f"head_{h}" for h in range(config.n_heads)}}[features]
    assert {m for _, m in batched} == expected_modules and {layer for layer, _ in batched} == {0, 1}
    for key, X in batched.items():
        assert X.shape[0] == (sum(map(len, sequences)) if features == "block_output" else len(sequences))
        torch.testing.assert_close(X, torch.cat([a[key] for a in alone]), rtol=1e-5, atol=1e-5)
    if features == "ov_last_token":  # one-token sequence: the heads sum to the attention output
        x = model.layers[0].attention_norm(model.embedding_proj(sequences[3][None]))
        with torch.no_grad():
            y = model.layers[0].attention(x, model.rope_cos[:1], model.rope_sin[:1])[0, -1]
        first = 0  # sorted by length: the 1-token sequence is row 0
        heads = sum(batched[(0, f"head_{h}")][first] for h in range(config.n_heads))
        torch.testing.assert_close(heads, y, rtol=1e-5, atol=1e-6)
    # CKA of a checkpoint with itself is 1 for every layer and module
    save_checkpoint(tmp_path / "a", model, step=2)
    save_checkpoint(tmp_path / "b", model, step=4)
    rows = analyse_checkpoints({2: lambda: load_snapshot(tmp_path / "a"), 4: lambda: load_snapshot(tmp_path / "b")},
                               None, targets=("weight",), cka=True, cka_features=features, cka_rows=sequences)
    cka = [r for r in rows if r["metric"] == "cka_to_final"]
    assert len(cka) == 2 * len(batched) and {r["module"] for r in cka} == expected_modules
    assert [r["value"] for r in cka] == pytest.approx([1.0] * len(cka), abs=1e-9)


def _kaiming_uniform(rank, in_features, seed):
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * bound


@pytest.mark.parametrize("restarted", [True, False])
def test_adapter_restart_check_on_synthetic_snapshots(tmp_path, restarted):
    """A at step 2 trained away from its init (2x its bound); at step 4 either a fresh Kaiming
    draw (restarted: cosine ~ 0, rms at the init's) or the same A moved by 1% (not restarted:
    cosine ~ 1, rms twice the init's)."""
    config = tiny_config()
    model = make_model(config, seed=0)
    before = relora_adapters(config, rank=4, seed=1)
    after = dict(before)
    for i, (k, A) in enumerate(sorted(before.items())):
        if k.endswith("A_lora"):
            trained = 2 * _kaiming_uniform(*A.shape, seed=2 * i)
            before[k] = trained
            noise = torch.randn(A.shape, generator=torch.Generator().manual_seed(5)) * 0.01 * trained.abs().mean()
            after[k] = _kaiming_uniform(*A.shape, seed=2 * i + 1) if restarted else trained + noise
    save_checkpoint(tmp_path / "2", model, step=2, adapters=before, rank=4, alpha=8.0)
    save_checkpoint(tmp_path / "4", model, step=4, adapters=after, rank=4, alpha=8.0)
    rows = analyse_checkpoints({2: lambda: load_snapshot(tmp_path / "2"), 4: lambda: load_snapshot(tmp_path / "4")},
                               None, targets=("adapter_A",), cka=False)
    restart = [r for r in rows if r["metric"].startswith("adapter_A_")]
    assert {r["step"] for r in restart} == {4}  # the first analysed step has no previous one
    assert len(restart) == 3 * config.n_layers * 7
    by = defaultdict(list)
    for r in restart:
        by[r["metric"]].append(r["value"])
    if restarted:
        assert all(v == 1.0 for v in by["adapter_A_restarted"])
        # independent draws of 4 x 24 or 4 x 96 entries: |cosine| ~ 0.1-0.2, below the 0.5 verdict
        assert max(abs(v) for v in by["adapter_A_cosine_to_previous"]) < 0.5
        assert by["adapter_A_rms_over_init"] == pytest.approx([1.0] * len(by["adapter_A_rms_over_init"]), abs=0.2)
    else:
        assert all(v == 0.0 for v in by["adapter_A_restarted"])
        assert min(by["adapter_A_cosine_to_previous"]) > 0.99
        assert by["adapter_A_rms_over_init"] == pytest.approx([2.0] * len(by["adapter_A_rms_over_init"]), abs=0.4)


def test_adapter_restart_of_a_zeroed_factor_and_the_rms_of_an_exact_uniform_grid():
    """rms of entries evenly spaced over (-b, b) (midpoints of N cells) is b sqrt((1 - 1/N^2) / 3);
    a zeroed A (quirk 1) followed by a draw counts as restarted."""
    from relora.dynamics import adapter_restart_rows

    n = 96
    b = 1 / math.sqrt(n)
    grid = ((torch.arange(4 * n, dtype=torch.float64) + 0.5) / (4 * n) * 2 - 1) * b
    A = grid[torch.randperm(4 * n, generator=torch.Generator().manual_seed(0))].view(4, n)
    rows = adapter_restart_rows({(0, "w_2"): A}, {(0, "w_2"): torch.zeros(4, n, dtype=torch.float64)})
    got = {r["metric"]: r["value"] for r in rows}
    assert got["adapter_A_restarted"] == 1.0 and math.isnan(got["adapter_A_cosine_to_previous"])
    assert got["adapter_A_rms_over_init"] == pytest.approx(math.sqrt(1 - 1 / (4 * n) ** 2), rel=1e-12)
    same = {r["metric"]: r["value"] for r in adapter_restart_rows({(0, "w_2"): A}, {(0, "w_2"): A})}
    assert same["adapter_A_cosine_to_previous"] == pytest.approx(1.0) and same["adapter_A_restarted"] == 0.0
