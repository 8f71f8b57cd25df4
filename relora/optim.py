"""AdamW parameter groups, learning-rate schedules and ReLoRA's optimizer-state reset.

Schedules are pure functions of the step: `lr_factor(s, schedule)` is the multiplier of the peak
learning rate after s updates, and update k runs with `lr * lr_factor(k - 1)` (step semantics:
docs/design.md, What a step is). Each has a horizon T separate from the number of steps trained: the
paper trains 20k steps of a schedule that decays until 200k.
"""

from __future__ import annotations

import math

import torch


def _cosine(progress: float) -> float:
    """c(p) = (1 + cos(pi p)) / 2, with p clamped to [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_factor(step: int, schedule: dict) -> float:
    """Multiplier of the peak LR at step s (s updates done), for one of the schedules:

    constant       s / W during warmup, then 1
    linear         s / W, then linear from 1 at W to m at T (held at m after T)
    cosine         s / W, then m + (1 - m) c((s - W) / (T - W))
    jagged_cosine  ReLoRA's: cosine, and after every reset (s >= R, s mod R < w) a re-warmup
                   from 0 to the cosine's value at the end of the re-warmup:
                   (s mod R) / w * (m + (1 - m) c((kR + w - W) / (T - W))), k = s // R
    """
    name, W = schedule["name"], schedule["warmup"]
    T, m = schedule["horizon"], schedule["min_ratio"]
    if step < W:
        return step / W
    if name == "constant":
        return 1.0
    if name == "linear":
        return m + (1.0 - m) * max(0.0, (T - step) / max(T - W, 1))
    if name == "cosine":
        return m + (1.0 - m) * _cosine((step - W) / max(T - W, 1))
    if name == "jagged_cosine":
        R, w = schedule["reset_every"], schedule["restart_warmup"]
        if step >= R and step % R < w:
            k = step // R
            return (step % R) / w * (m + (1.0 - m) * _cosine((k * R + w - W) / max(T - W, 1)))
        return m + (1.0 - m) * _cosine((step - W) / max(T - W, 1))
    raise ValueError(f"unknown schedule '{name}'")


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_on: str = "all") -> list[dict]:
    """AdamW groups over the trainable parameters. `all`: decay everything (the reference);
    `matrices`: no decay on norms and embeddings (the common GPT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.startswith("embedding_proj")
        (no_decay if decay_on == "matrices" and exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, training: dict) -> torch.optim.AdamW:
    groups = parameter_groups(model, training["weight_decay"], training["decay_on"])
    # the fused kernel (one pass per tensor) on CPU as on CUDA: on CPU PyTorch's default is a
    # loop of 5-6 ops per tensor, a slower optimizer step (the fused-AdamW rows of
    # benchmarks/run.py; README, Benchmarks)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=training["lr"], betas=tuple(training["betas"]),
                             eps=training["eps"], fused=fused or None)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params, mode: str, ratio: float,
                          generator: torch.Generator | None = None, masks: str = "independent") -> None:
    """Reset the Adam moments of `params` (the adapters, at a merge). The step counter is kept.

    random     zero a random `ratio` of the entries (the reference: 0.999)
    magnitude  zero the `ratio` of entries of smallest magnitude, keep the largest
    zero       zero every entry
    none       keep the state

    masks      independent: exp_avg and exp_avg_sq each get their own mask (random: two draws;
               magnitude: each ranked by its own magnitude), as the reference and the original
               ReLoRA code do. About ratio * (1 - ratio) of the entries then keep a first moment
               m whose second moment v was zeroed; right after a merge B = 0, so A's gradient is
               zero and such an entry moves by lr * m_hat / (sqrt(v_hat) + eps) ~ lr * m_hat / eps
               on the next update (quirk 4).
               shared: one mask per parameter applied to both moments (random: one draw;
               magnitude: one ranking by exp_avg_sq), so no entry keeps m without v.

    Random masks come from `generator`, seeded identically on every rank, so replicas agree.
    """
    if mode == "none":
        return
    if mode not in ("random", "magnitude", "zero"):
        raise ValueError(f"unknown optimizer reset mode '{mode}'")
    if masks not in ("independent", "shared"):
        raise ValueError(f"unknown optimizer reset masks '{masks}' (use independent or shared)")
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        moments = (state["exp_avg"], state["exp_avg_sq"])
        if mode == "zero" or ratio >= 1.0:
            for moment in moments:
                moment.zero_()
            continue
        if masks == "shared":
            keep = _keep_mask(moments[1], mode, ratio, generator)
            for moment in moments:
                moment.mul_(keep)
        else:
            for moment in moments:
                moment.mul_(_keep_mask(moment, mode, ratio, generator))


def _keep_mask(moment: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bool mask of the entries of `moment` a reset keeps (random: drawn on the CPU from
    `generator`, so every device draws the same; magnitude: all but the `ratio` smallest)."""
    if mode == "random":
        keep = torch.rand(moment.shape, generator=generator, device="cpu") >= ratio
        return keep.to(moment.device)
    keep = torch.ones(moment.numel(), dtype=torch.bool, device=moment.device)
    n_zero = int(round(ratio * moment.numel()))
    if n_zero > 0:
        keep[torch.topk(moment.abs().flatten(), n_zero, largest=False).indices] = False
    return keep.view(moment.shape)
