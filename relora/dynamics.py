"""Learning dynamics of a run: spectra of weights, gradients, updates and adapters, and CKA.

docs/design.md, Metrics. Singular values are computed in float64. Values at or below the tolerance
`k * eps(stored dtype) * s` count as zero, with k = min(m, n) and s the largest singular value of
the stored matrices the target is computed from (for `update`, of the weight at step t), so that
stored rounding noise never reads as rank:

    numerical_rank               number of sigma above the tolerance
    effective_rank               exp(-sum p_i ln p_i), p_i = sigma_i / sum(sigma)   (Roy & Vetterli 2007)
    proportional_effective_rank  effective_rank / k   (an adapter's is capped at r / k)
    condition_number             sigma_max / sigma_min over all k values; inf when numerical_rank < k
    frobenius_norm, spectral_norm

An all-zero matrix (an update at step 0, an adapter right after a reset) has numerical_rank 0
and NaN effective_rank, proportional_effective_rank and condition_number. Targets per linear (q, k, v, o, w_0, w_1, w_2 of every
layer): `weight` (effective: W + scale * B @ A for ReLoRA), `base` (the stored weight W alone:
for ReLoRA the frozen weight the merges accumulate, what the paper plotted after each merge; for
a plain linear it is the weight, and its rows are copies of the weight's), `gradient` (of the
effective weight, mean next-token loss on the fixed probe batch), `update` (W_t - W_0) and, for
ReLoRA, `adapter` (scale * B @ A). Spectra come from one batched `torch.linalg.svdvals` call per
matrix shape, never from a Python loop over matrices.

An adapter has rank at most r < k, so its condition_number is inf by construction; its rows add

    condition_number_top_r  sigma_1 / sigma_r over its r largest singular values (r the adapter
                            rank): how unevenly the update spreads over the directions it can
                            span; NaN when its numerical_rank is below r

and target `adapter_A` (no spectrum) watches the factor A for entries that an inconsistent
optimizer reset blows up (quirk 4: a first moment kept while the second was zeroed moves an
entry by about lr * m_hat / eps right after a merge), against the Kaiming-uniform bound
1 / sqrt(in_features) of its initialisation (used whatever the init):

    max_abs_over_init_bound  max |A| * sqrt(in_features)   (at most 1 right after initialisation)
    entries_over_3x_bound    number of entries with |A| > 3 / sqrt(in_features)

The same target's rows also compare A with A at the previous analysed step (a possible fifth
quirk: a reset that optimizer master copies undid would leave A a continuation of the old one):

    adapter_A_cosine_to_previous  cosine of vec(A_t) and vec(A_prev)
    adapter_A_rms_over_init       rms(A_t) * sqrt(3 * in_features): 1 for a fresh Kaiming-uniform
                                  draw (the rms of U(-b, b) is b / sqrt(3))
    adapter_A_restarted           1 when |cosine| < 0.5 (A was re-drawn in between), else 0;
                                  1 also when A_prev is all zero and A_t is not

`condition_number_raw` (adapters) is the paper's conditioning: sigma_max / sigma_min over all k
singular values of B @ A formed in the factors' stored dtype, with no tolerance. For a rank-r
product (r < k) sigma_min is the rounding noise of that product, so the value measures the
dtype, not the adapter (1e4-1e7 in the paper's bf16; float32 factors give about 1e8-1e11).

Target `ov` (the paper's OV circuit, from the stored W_V and W_O: for ReLoRA the frozen W without
the adapter, as the paper read its checkpoints) per layer: for head h with key/value head
kv(h) = h // (n_heads / n_kv_heads) and head size hd, module `head_<h>` is the hd x hd matrix
W_V[kv(h) hd:(kv(h)+1) hd, :] @ W_O[:, h hd:(h+1) hd], in PyTorch's orientation (weight = out x
in; W_V is (n_kv_heads hd) x d, W_O is d x (n_heads hd)). As a map that product reads a head's
output coordinates, writes them to the residual stream and reads them back as values; the head's
circuit x -> W_O_h W_V_kv(h) x is d x d of rank <= hd with the same nonzero eigenvalues but, in
general, other singular values. Module `all_heads` is the layer's d x d map
sum_h W_O_h W_V_kv(h) (rank <= n_kv_heads hd). PER divides by k = min(shape): hd per head.

Linear CKA (Kornblith et al. 2019, biased estimator, column-centred features) compares features
at step t with the final step's over the same rows: by default the residual stream after each
block over every probe token (module `block`); as an option the paper's last-token outputs of
SwiGLU w_2 (module `w_2`) or of each head's OV map, the value vector of the last token through
its head's slice of W_O (module `head_<h>`), over the probe windows or the evaluation documents
(each truncated to the context).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Snapshot
from .model import PicoDecoder
from .model_config import LINEAR_MODULES, LINEAR_PARENTS, linear_key
from .tables import (ADAPTER_A_METRICS, ADAPTER_A_RESTART_METRICS, CKA_TO_FINAL, EFFECTIVE_RANK,
                     PROPORTIONAL_EFFECTIVE_RANK, RAW_CONDITION_NUMBER, SPECTRUM_METRICS, TOP_R_CONDITION_NUMBER)

# the default targets; `ov` is asked for by name
TARGETS = ("weight", "base", "gradient", "update", "adapter", "adapter_A")
OV_TARGET = "ov"
CKA_FEATURES = ("block_output", "w2_last_token", "ov_last_token")
# |cosine| of A with A at the previous analysed step below which A counts as re-drawn: two
# independent draws of r x in entries have |cosine| ~ 1 / sqrt(r * in) (0.03 at 16 x 96), while
# 100 updates at lr <= 3e-4 move a trained A by a small fraction of its norm
RESTART_COSINE = 0.5


# ----------------------------------------------------------------------------------------------
# Spectra


def batched_singular_values(matrices: list[torch.Tensor], device=None) -> list[torch.Tensor]:
    """Singular values (descending, float64) of each matrix, one svdvals call per shape.

    A matrix and its transpose have the same singular values, so every matrix is stacked in
    its tall orientation (rows >= columns): w_2 (d x 4d) joins w_0 and w_1 (4d x d).
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, M in enumerate(matrices):
        m, n = M.shape
        groups[(max(m, n), min(m, n))].append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for indices in groups.values():
        stack = torch.stack([matrices[i].T if matrices[i].shape[0] < matrices[i].shape[1] else matrices[i]
                             for i in indices])  # (N, max, min)
        sigma = torch.linalg.svdvals(stack.to(device=device, dtype=torch.float64)).cpu()  # (N, k)
        for j, i in enumerate(indices):
            out[i] = sigma[j]
    return out


def batched_spectral_norms(matrices: list[torch.Tensor], device=None) -> list[float]:
    """Largest singular value of each matrix in float64, from the top eigenvalue of its small
    Gram matrix (one eigvalsh call per shape; the top eigenvalue is accurate to float64 relative
    precision, and it costs about half an svdvals). Used where only s is needed."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, M in enumerate(matrices):
        m, n = M.shape
        groups[(max(m, n), min(m, n))].append(i)
    out = [0.0] * len(matrices)
    for indices in groups.values():
        stack = torch.stack([matrices[i].T if matrices[i].shape[0] < matrices[i].shape[1] else matrices[i]
                             for i in indices]).to(device=device, dtype=torch.float64)  # (N, max, min)
        top = torch.linalg.eigvalsh(stack.mT @ stack)[:, -1].clamp(min=0).sqrt().cpu()  # (N,)
        for j, i in enumerate(indices):
            out[i] = float(top[j])
    return out


def spectrum_metrics(sigma: torch.Tensor, tol: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rank metrics (docs/design.md, Metrics) from singular values sigma (..., k) and
    tolerances (...)."""
    sigma = sigma.double()
    tol = torch.as_tensor(tol, dtype=torch.float64).unsqueeze(-1)
    k = sigma.shape[-1]
    nonzero = sigma > tol
    rank = nonzero.sum(-1)
    kept = torch.where(nonzero, sigma, torch.zeros_like(sigma))
    p = kept / kept.sum(-1, keepdim=True)  # NaN rows for all-zero spectra, masked below
    entropy = -torch.where(nonzero, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    empty = rank == 0
    nan = torch.full_like(entropy, math.nan)
    effective_rank = torch.where(empty, nan, torch.exp(entropy))
    sigma_max, sigma_min = sigma[..., 0], sigma[..., -1]
    condition = torch.where(rank < k, torch.full_like(entropy, math.inf), sigma_max / sigma_min)
    condition = torch.where(empty, nan, condition)
    return {EFFECTIVE_RANK: effective_rank, PROPORTIONAL_EFFECTIVE_RANK: effective_rank / k,
            "condition_number": condition,
            "numerical_rank": rank.double(), "frobenius_norm": sigma.pow(2).sum(-1).sqrt(),
            "spectral_norm": sigma_max}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(k: int, dtype: torch.dtype, s: float) -> float:
    """k * eps(stored dtype) * s: singular values at or below count as zero."""
    return k * eps(dtype) * s


def matrix_metrics(M: torch.Tensor, stored_dtype: torch.dtype | None = None, s: float | None = None) -> dict:
    """Metrics of one matrix (the per-matrix path; `spectra_rows` batches many)."""
    sigma = torch.linalg.svdvals(M.double())
    s = float(sigma[0]) if s is None else s
    tol = tolerance(min(M.shape), stored_dtype or M.dtype, s)
    return {k: float(v) for k, v in spectrum_metrics(sigma, torch.tensor(tol, dtype=torch.float64)).items()}


@dataclass
class Target:
    """One matrix to analyse, with what its tolerance is made of."""

    layer: int
    module: str
    target: str
    matrix: torch.Tensor  # float64
    stored_dtype: torch.dtype
    scale_from: tuple | None = None  # key of the matrix whose sigma_max is s; None: itself
    scale_extra: tuple = ()  # further keys whose sigma_max enter s as a maximum
    rank: int | None = None  # an adapter's rank r: adds condition_number_top_r


def spectra_rows(targets: list[Target], extra: dict | None = None, device=None) -> list[dict]:
    """Rows (layer, module, target, metric, value) for every target, via batched SVD.

    `extra`: {key: float64 matrix} of stored matrices that only supply an s (e.g. the frozen W
    of a ReLoRA linear); only their spectral norms are computed, batched as well.
    """
    extra = extra or {}
    sigmas = batched_singular_values([t.matrix for t in targets], device)
    sigma_max = {(t.layer, t.module, t.target): float(s[0]) for t, s in zip(targets, sigmas)}
    sigma_max.update(zip(extra, batched_spectral_norms(list(extra.values()), device)))
    by_k: dict[int, list[int]] = defaultdict(list)
    tols = []
    for i, t in enumerate(targets):
        key = t.scale_from or (t.layer, t.module, t.target)
        s = max([sigma_max[key]] + [sigma_max[k] for k in t.scale_extra])
        tols.append(tolerance(min(t.matrix.shape), t.stored_dtype, s))
        by_k[min(t.matrix.shape)].append(i)
    rows = []
    for indices in by_k.values():
        metrics = spectrum_metrics(torch.stack([sigmas[i] for i in indices]),
                                   torch.tensor([tols[i] for i in indices], dtype=torch.float64))
        for j, i in enumerate(indices):
            t = targets[i]
            for name in SPECTRUM_METRICS:
                rows.append({"layer": t.layer, "module": t.module, "target": t.target,
                             "metric": name, "value": float(metrics[name][j])})
            if t.rank is not None:
                rows.append({"layer": t.layer, "module": t.module, "target": t.target,
                             "metric": TOP_R_CONDITION_NUMBER,
                             "value": top_r_condition_number(sigmas[i], int(metrics["numerical_rank"][j]), t.rank)})
    return rows


def top_r_condition_number(sigma: torch.Tensor, numerical_rank: int, r: int) -> float:
    """sigma_1 / sigma_r of descending singular values; NaN when fewer than r are nonzero."""
    if numerical_rank < r or r < 1:
        return math.nan
    return float(sigma[0] / sigma[r - 1])


def raw_condition_number(sigma: torch.Tensor) -> float:
    """sigma_max / sigma_min over all singular values, no tolerance: inf when the smallest is
    exactly 0, NaN for a zero matrix."""
    top, bottom = float(sigma[0]), float(sigma[-1])
    if top == 0:
        return math.nan
    return math.inf if bottom == 0 else top / bottom


def raw_condition_rows(snapshot: Snapshot, device=None) -> list[dict]:
    """`condition_number_raw` rows (target `adapter`) of every adapter: B @ A formed in the
    factors' stored dtype (as the paper did; the scale alpha / r = 2 would only shift the
    exponent), its singular values in float64, no tolerance."""
    keys, products = [], []
    for layer in range(snapshot.config.n_layers):
        for module in LINEAR_MODULES:
            if snapshot.has_adapter(layer, module):
                key = linear_key(layer, module)
                A, B = snapshot.tensors[f"{key}.A_lora"], snapshot.tensors[f"{key}.B_lora"]
                dtype = torch.promote_types(A.dtype, B.dtype)
                keys.append((layer, module))
                products.append((B.to(dtype) @ A.to(dtype)).double())  # (out, r) @ (r, in), rounded to dtype
    sigmas = batched_singular_values(products, device)
    return [{"layer": layer, "module": module, "target": "adapter", "metric": RAW_CONDITION_NUMBER,
             "value": raw_condition_number(sigma)} for (layer, module), sigma in zip(keys, sigmas)]


def ov_circuits(W_V: torch.Tensor, W_O: torch.Tensor, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """{`head_<h>`: W_V[kv(h) rows] @ W_O[:, h columns] (hd x hd), `all_heads`: the layer's map
    sum_h W_O_h W_V_kv(h) (d x d)} in float64. W_V (n_kv_heads * hd, d) and W_O (d, n_heads * hd)
    are PyTorch weights (out x in); query head h reads key/value head h // (n_heads / n_kv_heads)."""
    V, O = W_V.double(), W_O.double()
    hd, group = O.shape[1] // n_heads, n_heads // n_kv_heads
    out = {}
    for h in range(n_heads):
        kv = h // group
        out[f"head_{h}"] = V[kv * hd:(kv + 1) * hd] @ O[:, h * hd:(h + 1) * hd]  # (hd, d) @ (d, hd)
    V_per_head = V.view(n_kv_heads, hd, -1).repeat_interleave(group, dim=0).reshape(n_heads * hd, -1)
    out["all_heads"] = O @ V_per_head  # (d, n_heads hd) @ (n_heads hd, d)
    return out


def ov_targets(snapshot: Snapshot) -> list[Target]:
    """Target `ov` of every layer, from the stored W_V and W_O (tolerance from each product's own
    largest singular value and the factors' stored dtype)."""
    config, items = snapshot.config, []
    for layer in range(config.n_layers):
        W_V, W_O = snapshot.weight(layer, "v_proj"), snapshot.weight(layer, "o_proj")
        dtype = torch.promote_types(W_V.dtype, W_O.dtype)
        for module, M in ov_circuits(W_V, W_O, config.n_heads, config.n_kv_heads).items():
            items.append(Target(layer, module, OV_TARGET, M, dtype))
    return items


def adapter_factors(snapshot: Snapshot) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, module): A (r x in) in float64} of every adapter."""
    return {(layer, module): snapshot.tensors[f"{linear_key(layer, module)}.A_lora"].double()
            for layer in range(snapshot.config.n_layers) for module in LINEAR_MODULES
            if snapshot.has_adapter(layer, module)}


def adapter_restart_rows(factors: dict, previous: dict) -> list[dict]:
    """Rows (target `adapter_A`) comparing each adapter's A with A at the previous analysed step:
    cosine, rms over the Kaiming-uniform init's, and whether A was re-drawn in between."""
    rows = []
    for (layer, module), A in factors.items():
        P = previous.get((layer, module))
        if P is None or P.shape != A.shape:
            continue
        a_norm, p_norm = float(A.norm()), float(P.norm())
        cosine = float(A.flatten() @ P.flatten()) / (a_norm * p_norm) if a_norm > 0 and p_norm > 0 else math.nan
        if p_norm == 0 and a_norm > 0:
            restarted = 1.0  # a zeroed A (quirk 1) that now holds a draw
        else:
            restarted = math.nan if math.isnan(cosine) else float(abs(cosine) < RESTART_COSINE)
        rms = float(A.pow(2).mean().sqrt()) if A.numel() else math.nan
        values = dict(zip(ADAPTER_A_RESTART_METRICS, (cosine, rms * math.sqrt(3 * A.shape[1]), restarted)))
        rows += [{"layer": layer, "module": module, "target": "adapter_A", "metric": name, "value": value}
                 for name, value in values.items()]
    return rows


def adapter_a_rows(snapshot: Snapshot) -> list[dict]:
    """Rows (layer, module, `adapter_A`, metric, value) of every adapter's factor A (r x in):
    the largest |A| over the Kaiming-uniform bound 1 / sqrt(in_features), and the number of
    entries above 3x that bound."""
    rows = []
    for layer in range(snapshot.config.n_layers):
        for module in LINEAR_MODULES:
            if not snapshot.has_adapter(layer, module):
                continue
            A = snapshot.tensors[f"{linear_key(layer, module)}.A_lora"].double().abs()
            bound = 1.0 / math.sqrt(A.shape[1])
            values = {"max_abs_over_init_bound": float(A.max()) / bound if A.numel() else math.nan,
                      "entries_over_3x_bound": float((A > 3.0 * bound).sum())}
            rows += [{"layer": layer, "module": module, "target": "adapter_A", "metric": name,
                      "value": values[name]} for name in ADAPTER_A_METRICS]
    return rows


def base_rows_of_plain_linears(rows: list[dict], snapshot: Snapshot) -> list[dict]:
    """`base` rows of the linears without an adapter: their stored weight is the weight, so the
    rows are the weight's (same matrix, same tolerance), copied rather than recomputed."""
    return [{**r, "target": "base"} for r in rows
            if r["target"] == "weight" and not snapshot.has_adapter(r["layer"], r["module"])]


# ----------------------------------------------------------------------------------------------
# Probe batch: gradients and activations


def load_probe(path) -> torch.Tensor:
    """probe.npy [B, T+1] token windows as int64, with errors naming the file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: probe batch not found")
    try:
        probe = np.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy file: {e}") from None
    if probe.ndim != 2 or probe.shape[1] < 2:
        raise ValueError(f"{path}: expected a [batch, seq_len + 1] array, got shape {probe.shape}")
    return torch.from_numpy(probe.astype(np.int64))


def probe_gradients_and_activations(model: PicoDecoder, probe: torch.Tensor, micro_batch: int | None = None,
                                    want_activations: bool = True):
    """Gradients of the mean next-token loss on the probe w.r.t. every linear weight, and the
    residual stream after every block on all probe tokens.

    probe (B, T+1): inputs probe[:, :-1], targets probe[:, 1:]. The model is a plain decoder
    with effective weights (no dropout exists in it), so d loss / d weight is the gradient of
    the effective weight. Returns ({(layer, module): grad (out, in) fp32}, [n_layers x (B*T, C)]).
    """
    device = next(model.parameters()).device
    if probe.shape[1] - 1 > model.config.max_seq_len:
        raise ValueError(f"probe windows of {probe.shape[1] - 1} tokens exceed the context {model.config.max_seq_len}")
    if int(probe.max()) >= model.config.vocab_size:
        raise ValueError(f"probe token id {int(probe.max())} is outside the vocabulary of {model.config.vocab_size}")
    model.eval()
    weights = {(i, m): getattr(getattr(block, LINEAR_PARENTS[m]), m).weight
               for i, block in enumerate(model.layers) for m in LINEAR_MODULES}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    grads = {key: torch.zeros_like(w) for key, w in weights.items()}
    activations: list[list[torch.Tensor]] = [[] for _ in model.layers]
    total = probe.shape[0] * (probe.shape[1] - 1)
    # default: as many sequences as keep the fp32 logits near 1 GiB (the paper's probe of
    # 16 x 2048 tokens with a 50304 vocabulary would otherwise need 6.6 GB of logits at once)
    micro_batch = micro_batch or max(1, 2**28 // ((probe.shape[1] - 1) * model.config.vocab_size))
    for start in range(0, probe.shape[0], micro_batch):
        chunk = probe[start:start + micro_batch].to(device)
        if want_activations:
            logits, hidden = model(chunk[:, :-1], return_hidden=True)  # (b, T, V), n_layers x (b, T, C)
        else:
            logits, hidden = model(chunk[:, :-1]), []
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum") / total
        for key, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            grads[key] += g
        for layer, h in enumerate(hidden):
            activations[layer].append(h.detach().flatten(0, 1).cpu())
    for w in weights.values():
        w.requires_grad_(False)
    return grads, [torch.cat(a) if a else None for a in activations]


@torch.no_grad()
def activation_features(model: PicoDecoder, sequences: list[torch.Tensor], features: str,
                        micro_batch: int = 16) -> dict[tuple[int, str], torch.Tensor]:
    """CKA features {(layer, module): (rows, p) float32 on the CPU} over token sequences of any
    length (each at most the context):

    block_output   the residual stream after each block, one row per token (module `block`)
    w2_last_token  SwiGLU w_2's output at each sequence's last token (module `w_2`)
    ov_last_token  per head h, the last token's value vector of key/value head kv(h) through
                   W_O's columns of h: v[kv(h)] @ W_O[:, h]^T (module `head_<h>`)

    Sequences are batched by length and right-padded: the decoder is causal, so padding after a
    token never changes what that token's features are."""
    if features not in CKA_FEATURES:
        raise ValueError(f"CKA features '{features}' are not one of {', '.join(CKA_FEATURES)}")
    config = model.config
    device = next(model.parameters()).device
    hd, group = config.head_dim, config.n_heads // config.n_kv_heads
    model.eval()
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if features != "block_output":
        for layer, block in enumerate(model.layers):
            module = block.swiglu.w_2 if features == "w2_last_token" else block.attention.v_proj
            hooks.append(module.register_forward_hook(
                lambda _m, _inputs, output, layer=layer: captured.__setitem__(layer, output)))
    out: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        for start in range(0, len(order), micro_batch):
            batch = [sequences[i] for i in order[start:start + micro_batch]]
            lengths = torch.tensor([len(s) for s in batch], device=device)
            idx = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device=device)
            for j, s in enumerate(batch):
                idx[j, :len(s)] = torch.as_tensor(s, device=device)
            hidden = []
            model.residual_stream(idx, hidden if features == "block_output" else None)
            if features == "block_output":
                real = torch.arange(idx.shape[1], device=device) < lengths[:, None]  # (b, T)
                for layer, h in enumerate(hidden):
                    out[(layer, "block")].append(h[real].float().cpu())
                continue
            last = (torch.arange(len(batch), device=device), lengths - 1)
            for layer in range(config.n_layers):
                a = captured[layer][last]  # (b, d) for w_2, (b, n_kv_heads hd) for v_proj
                if features == "w2_last_token":
                    out[(layer, "w_2")].append(a.float().cpu())
                    continue
                W_O = model.layers[layer].attention.o_proj.weight  # (d, n_heads hd)
                for h in range(config.n_heads):
                    kv = h // group
                    head = a[:, kv * hd:(kv + 1) * hd] @ W_O[:, h * hd:(h + 1) * hd].T  # (b, d)
                    out[(layer, f"head_{h}")].append(head.float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(parts) for key, parts in out.items()}


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019, biased HSIC), features column-centred, in float64:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). X (n, p), Y (n, q) share rows."""
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same rows: {X.shape[0]} vs {Y.shape[0]}")
    X = X.double() - X.double().mean(0, keepdim=True)
    Y = Y.double() - Y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
    denom = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    return float(cross / denom) if denom > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# One checkpoint


def snapshot_targets(snapshot: Snapshot, initial: Snapshot | None, gradients: dict | None,
                     targets=TARGETS) -> tuple[list[Target], dict]:
    """The Targets of one checkpoint, and the extra stored matrices that only supply an s."""
    items, extra = [], {}
    for layer in range(snapshot.config.n_layers):
        for module in LINEAR_MODULES:
            W = snapshot.weight(layer, module)
            adapter = snapshot.adapter(layer, module)  # float64 or None
            effective = snapshot.effective_weight(layer, module)
            weight_key, adapter_key = (layer, module, "weight"), (layer, module, "adapter")
            # s of the effective weight: the largest of its stored summands, W and scale * B @ A
            summands = ()
            if adapter is not None:
                if "base" in targets:  # the frozen W: its own spectrum, and its s for the weight
                    items.append(Target(layer, module, "base", W.double(), W.dtype))
                    summands = ((layer, module, "base"), adapter_key)
                else:
                    extra[(layer, module, "stored")] = W.double()
                    summands = ((layer, module, "stored"), adapter_key)
                if "adapter" in targets:
                    A = snapshot.tensors[f"{linear_key(layer, module)}.A_lora"]
                    items.append(Target(layer, module, "adapter", adapter, A.dtype, rank=A.shape[0]))
                else:
                    extra[adapter_key] = adapter
            elif "base" in targets and "weight" not in targets:  # else copied from the weight's rows
                items.append(Target(layer, module, "base", W.double(), W.dtype))
            if "weight" in targets:
                items.append(Target(layer, module, "weight", effective, W.dtype, None, summands))
            elif "update" in targets:
                extra[weight_key] = effective
            if "update" in targets and initial is not None:
                # tolerance from the weight at step t: W_0's rounding noise is below it
                update = effective - initial.effective_weight(layer, module)
                items.append(Target(layer, module, "update", update, W.dtype, weight_key, summands))
            if "gradient" in targets and gradients is not None:
                g = gradients[(layer, module)]
                items.append(Target(layer, module, "gradient", g.double(), g.dtype))
    if OV_TARGET in targets:
        items += ov_targets(snapshot)
    return items, extra


def analyse_checkpoints(snapshots: dict, probe: torch.Tensor | None, targets=TARGETS, cka: bool = True,
                        micro_batch: int | None = None, device="cpu", progress=None,
                        cka_features=("block_output",), cka_rows: list | None = None) -> list[dict]:
    """Dynamics rows (step, layer, module, target, metric, value) of a run's checkpoints.

    `snapshots`: {step: callable returning that step's Snapshot} (loaded one at a time, so a
    long run never holds every checkpoint in memory). Step 0 supplies W_0 for `update`; the
    last step supplies the reference features for `cka_to_final`: each of `cka_features`
    (names in CKA_FEATURES) over `cka_rows` (token sequences; None: the probe windows).
    """
    steps = sorted(snapshots)
    cka_features = (cka_features,) if isinstance(cka_features, str) else tuple(cka_features)
    # the default CKA (block outputs on the probe) comes out of the gradients' forward pass
    cka_on_probe_pass = cka and cka_features == ("block_output",) and cka_rows is None
    need_probe = "gradient" in targets or (cka and cka_rows is None)
    if need_probe and probe is None:
        raise ValueError("the gradient target and CKA on the probe rows need the probe batch")
    if cka and cka_rows is None:
        cka_rows = list(probe[:, :-1])
    if cka and not cka_rows:
        raise ValueError("CKA needs at least one row (a non-empty sequence)")
    initial = snapshots[0]() if "update" in targets and 0 in snapshots else None
    if "update" in targets and initial is None:
        raise ValueError("the update target needs the step-0 checkpoint")

    def features_of(model):
        if cka_on_probe_pass:
            _, activations = probe_gradients_and_activations(model, probe, micro_batch)
            return {(layer, "block"): a for layer, a in enumerate(activations)}
        return {key: X for name in cka_features
                for key, X in activation_features(model, cka_rows, name, micro_batch or 16).items()}

    final_features = features_of(snapshots[steps[-1]]().model(device)) if cka else None
    rows, previous_factors = [], None
    for step in steps:
        snapshot = initial if step == 0 and initial is not None else snapshots[step]()
        gradients, features = None, None
        model = snapshot.model(device) if (need_probe or cka) else None
        if need_probe:
            gradients, activations = probe_gradients_and_activations(
                model, probe, micro_batch, want_activations=cka_on_probe_pass)
            if cka_on_probe_pass:
                features = {(layer, "block"): a for layer, a in enumerate(activations)}
        if cka and features is None:
            features = features_of(model)
        items, extra = snapshot_targets(snapshot, initial, gradients, targets)
        spectra = spectra_rows(items, extra, device)
        if "base" in targets and "weight" in targets:
            spectra += base_rows_of_plain_linears(spectra, snapshot)
        if "adapter" in targets:
            spectra += raw_condition_rows(snapshot, device)
        if "adapter_A" in targets:
            spectra += adapter_a_rows(snapshot)
            factors = adapter_factors(snapshot)
            if previous_factors is not None:
                spectra += adapter_restart_rows(factors, previous_factors)
            previous_factors = factors
        for row in spectra:
            rows.append({"step": step, **row})
        if cka:
            for (layer, module), X in features.items():
                rows.append({"step": step, "layer": layer, "module": module, "target": "activation",
                             "metric": CKA_TO_FINAL, "value": linear_cka(X, final_features[(layer, module)])})
        if progress:
            progress(step)
    return rows
