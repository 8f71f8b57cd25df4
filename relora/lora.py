"""ReLoRA adapters: low-rank updates merged into frozen weights and restarted periodically.

Lialin et al. 2023 (arXiv 2307.05695), as used by "Investigating ReLoRA" (arXiv 2509.12960).
A targeted linear keeps its weight W (out x in, frozen) and trains A (r x in) and B (out x r):

    y = x W^T + scale * dropout(x) A^T B^T,   scale = alpha / r

`merge_and_reinit` folds the adapter into W (W += scale * B A), re-initialises A (Kaiming uniform,
a = sqrt(5), as nn.Linear) and zeroes B, so the model's function is unchanged and the next adapter
starts from zero. Parameter names (`weight`, `A_lora`, `B_lora`) are the reference checkpoints'. Two
quirks of the reference are options, off by default (docs/design.md, The quirks of the paper's
implementation): `lora_init: paper` zeroes A as well as B when the adapters are first attached
(neither factor then receives a gradient until the first reset), and `merge_scale: paper` merges B A
without the scale (throwing away (scale - 1) / scale of the adapter's update at every reset).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .model_config import READS_SUBMODULE_INPUT, adapter_scale


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask of x's shape, each entry kept (True) with probability 1 - p.

    On CUDA: torch.rand. On CPU, PyTorch's generator is slow enough that a dropout mask per
    adapter took a large share of a ReLoRA step (README, Benchmarks: the dropout overhead with
    PyTorch's bernoulli_ mask); here the bits come from numpy's much faster SFC64, seeded by one
    draw from torch's generator, so torch.manual_seed and a saved torch RNG state still determine
    every mask. Kept when the 32-bit integer is at or above the threshold: P(keep) = 1 - p to
    within 2^-32 (torch.rand's floats: 2^-24).
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # numpy cannot be traced
        return torch.rand(x.shape, device=x.device) >= p
    seed = int(torch.randint(0, 2**62, (1,)))
    n = x.numel()
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]
    threshold = -2**31 + round(p * 2**32)
    return torch.from_numpy(bits >= threshold).view(x.shape)


class SharedDropout(nn.Module):
    """One dropout mask per input tensor: adapters reading one input (q/k/v; w_0/w_1) share it
    (`dropout_mask: shared`). Returns the masked input x * keep, without the 1 / (1 - p)
    rescaling, which LoRALinear applies to its rank-r activation."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last_input = None
        self._last_output = None

    def forward(self, x):
        if x is not self._last_input:
            self._last_input, self._last_output = x, x * dropout_keep_mask(x, self.p)
        return self._last_output

    def clear(self):
        self._last_input = self._last_output = None


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + scale * (x_a A^T) B^T for a frozen W, x_a the adapter's (dropped-out) input.

    Why a Function: autograd would materialise (x_a A^T) B^T, scale it and add it to x W^T (three
    passes over the (tokens, out) output), and add the adapter's input gradient to the base's
    (one more over (tokens, in)). Here both go into the base GEMM's output (addmm_ with beta = 1),
    the scale is applied to the rank-r tensors, and W gets no gradient. x (..., in), W (out, in),
    A (r, in), B (out, r); computed in the autocast dtype when autocast is on.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, A, B, scale: float):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
        xa2 = x2 if x_adapter is x else x_adapter.reshape(-1, shape[-1]).to(dtype)
        weight, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
        with torch.autocast(device, enabled=False):
            h = xa2 @ A.t()  # (N, r)
            y = torch.mm(x2, weight.t()).addmm_(h, B.t(), alpha=scale)  # (N, out)
        ctx.save_for_backward(xa2, weight, A, B, h)
        ctx.scale, ctx.same_input, ctx.shape = scale, x_adapter is x, shape
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        xa2, weight, A, B, h = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(weight.dtype)  # (N, out)
        grad_h = torch.mm(g, B).mul_(ctx.scale)  # (N, r)
        grad_A = grad_h.t() @ xa2 if ctx.needs_input_grad[3] else None  # (r, in)
        grad_B = torch.mm(g.t(), h).mul_(ctx.scale) if ctx.needs_input_grad[4] else None  # (out, r)
        grad_x = torch.mm(g, weight)  # (N, in)
        grad_xa = None
        if ctx.same_input:  # no dropout: both paths read x, accumulate into one gradient
            grad_x.addmm_(grad_h, A)
        else:
            grad_xa = torch.mm(grad_h, A).view(ctx.shape)
        return grad_x.view(ctx.shape), grad_xa, None, grad_A, grad_B, None


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r adapter (no bias, as the Pico decoder)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, shared_dropout: SharedDropout | None = None):
        super().__init__()
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = adapter_scale(alpha, rank)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.A_lora = nn.Parameter(torch.empty(rank, in_features))
        self.B_lora = nn.Parameter(torch.zeros(out_features, rank))
        # a shared module is not registered as a child: it belongs to the block, not to this linear
        self._shared_dropout = [shared_dropout] if shared_dropout is not None else []
        self.dropout = dropout
        self._weight_cast = None  # (key, W in the autocast dtype): see weight_as
        self.reset_adapter()

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight in `dtype`, cast once per merge rather than at every step (under
        autocast, PyTorch re-casts a weight that needs no gradient at every use). W changes only
        in place (a merge, loading a state), which bumps its version counter, and a move gives it
        new storage: either re-makes the copy, so it always equals W.to(dtype)."""
        weight = self.weight
        if weight.dtype == dtype:
            return weight
        key = (dtype, weight._version, weight.data_ptr(), weight.device)
        if self._weight_cast is None or self._weight_cast[0] != key:
            self._weight_cast = (key, weight.detach().to(dtype))
        return self._weight_cast[1]

    def forward(self, x):
        x_adapter, scale = x, self.scale
        if self.training and self.dropout > 0:
            # inverted dropout on the adapter's input: x_a = x * keep / (1 - p); the 1 / (1 - p)
            # is applied with the scale to the rank-r activation (the same product, r columns
            # instead of in)
            x_adapter = (self._shared_dropout[0](x) if self._shared_dropout
                         else x * dropout_keep_mask(x, self.dropout))
            scale = self.scale / (1 - self.dropout)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # the adapter as two thin matmuls: never materialise B A (out x in)
        return LoRAFunction.apply(x, x_adapter, self.weight_as(dtype), self.A_lora, self.B_lora, scale)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None, zero_a: bool = False):
        """A ~ Kaiming uniform (a = sqrt(5), the nn.Linear default), or zero (the paper's wrap); B = 0."""
        if zero_a:
            self.A_lora.zero_()
        else:
            nn.init.kaiming_uniform_(self.A_lora, a=math.sqrt(5), generator=generator)
        self.B_lora.zero_()

    @torch.no_grad()
    def adapter_delta(self) -> torch.Tensor:
        """scale * B A, the adapter's contribution to the effective weight (out x in)."""
        return self.scale * (self.B_lora @ self.A_lora)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.adapter_delta()

    @torch.no_grad()
    def merge_and_reinit(self, merge_scale: float, generator: torch.Generator | None = None):
        """W += merge_scale * B A, then a fresh adapter (A re-initialised, B zeroed)."""
        self.weight.add_(merge_scale * (self.B_lora.float() @ self.A_lora.float()).to(self.weight.dtype))
        self.reset_adapter(generator)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every targeted linear, in layer order."""
    found = []
    for name, module in model.named_modules():
        for target in targets:
            child = getattr(module, target, None)
            if isinstance(child, (nn.Linear, LoRALinear)):
                found.append((f"{name}.{target}" if name else target, module, target))
    return found


def wrap_with_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets,
                   dropout_mask: str = "per_adapter", lora_init: str = "standard",
                   generator: torch.Generator | None = None) -> nn.Module:
    """Replace each targeted nn.Linear by a LoRALinear holding its weight (frozen)."""
    # `dropout_mask: shared`: one mask per sub-module input (q, k, v read one tensor; w_0, w_1 another)
    shared: dict[int, SharedDropout] = {}
    for name, parent, attr in target_linears(model, targets):
        linear = getattr(parent, attr)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already carries an adapter")
        shared_dropout = None
        if dropout_mask == "shared" and attr in READS_SUBMODULE_INPUT:
            shared_dropout = shared.setdefault(id(parent), SharedDropout(dropout))
        lora = LoRALinear(linear.in_features, linear.out_features, rank, alpha, dropout, shared_dropout)
        lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            lora.weight.copy_(linear.weight)
        lora.reset_adapter(generator, zero_a=(lora_init == "paper"))
        setattr(parent, attr, lora)
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_and_reinit(model: nn.Module, merge_scale: str = "correct",
                     generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Merge every adapter into its weight and restart it; returns the adapter parameters
    (whose optimizer state the caller resets). `merge_scale: paper` omits the scale."""
    params = []
    for module in lora_modules(model):
        module.merge_and_reinit(module.scale if merge_scale == "correct" else 1.0, generator)
        params += [module.A_lora, module.B_lora]
    return params
