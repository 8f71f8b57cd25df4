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

Linear CKA (Kornblith et al. 2019, biased estimator, column-centred features) compares the
residual stream after each block on the probe tokens at step t with the final step's.
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
from .tables import (ADAPTER_A_METRICS, CKA_TO_FINAL, EFFECTIVE_RANK, PROPORTIONAL_EFFECTIVE_RANK,
                     SPECTRUM_METRICS, TOP_R_CONDITION_NUMBER)

TARGETS = ("weight", "base", "gradient", "update", "adapter", "adapter_A")


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
    return items, extra


def analyse_checkpoints(snapshots: dict, probe: torch.Tensor | None, targets=TARGETS, cka: bool = True,
                        micro_batch: int | None = None, device="cpu", progress=None) -> list[dict]:
    """Dynamics rows (step, layer, module, target, metric, value) of a run's checkpoints.

    `snapshots`: {step: callable returning that step's Snapshot} (loaded one at a time, so a
    long run never holds every checkpoint in memory). Step 0 supplies W_0 for `update`; the
    last step supplies the reference activations for `cka_to_final`.
    """
    steps = sorted(snapshots)
    need_probe = "gradient" in targets or cka
    if need_probe and probe is None:
        raise ValueError("the gradient target and CKA need the probe batch")
    initial = snapshots[0]() if "update" in targets and 0 in snapshots else None
    if "update" in targets and initial is None:
        raise ValueError("the update target needs the step-0 checkpoint")
    final_activations = None
    if cka:
        _, final_activations = probe_gradients_and_activations(
            snapshots[steps[-1]]().model(device), probe, micro_batch)
    rows = []
    for step in steps:
        snapshot = initial if step == 0 and initial is not None else snapshots[step]()
        gradients, activations = None, None
        if need_probe:
            gradients, activations = probe_gradients_and_activations(
                snapshot.model(device), probe, micro_batch, want_activations=cka)
        items, extra = snapshot_targets(snapshot, initial, gradients, targets)
        spectra = spectra_rows(items, extra, device)
        if "base" in targets and "weight" in targets:
            spectra += base_rows_of_plain_linears(spectra, snapshot)
        if "adapter_A" in targets:
            spectra += adapter_a_rows(snapshot)
        for row in spectra:
            rows.append({"step": step, **row})
        if cka:
            for layer, (X, Y) in enumerate(zip(activations, final_activations)):
                rows.append({"step": step, "layer": layer, "module": "block", "target": "activation",
                             "metric": CKA_TO_FINAL, "value": linear_cka(X, Y)})
        if progress:
            progress(step)
    return rows
