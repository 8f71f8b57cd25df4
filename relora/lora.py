"""ReLoRA adapters: low-rank updates merged into frozen weights and restarted periodically.

Lialin et al. 2023 (arXiv 2307.05695), as used by "Investigating ReLoRA" (arXiv 2509.12960).
A targeted linear keeps its weight W (out x in, frozen) and trains A (r x in) and B (out x r):

    y = x W^T + scale * dropout(x) A^T B^T,   scale = alpha / r

`merge_and_reinit` folds the adapter into W (W += scale * B A), re-initialises A (Kaiming
uniform, a = sqrt(5), as nn.Linear) and zeroes B, so the model's function is unchanged and the
next adapter starts from zero. Parameter names (`weight`, `A_lora`, `B_lora`) are the reference
checkpoints'. Two quirks of the reference are options, off by default (DESIGN 1.1):
`lora_init: paper` zeroes A as well as B when the adapters are first attached (neither factor
then receives a gradient until the first reset), and `merge_scale: paper` merges B A without
the scale (throwing away (scale - 1) / scale of the adapter's update at every reset).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedDropout(nn.Module):
    """Dropout that returns the same mask for the same input tensor object, so that adapters
    reading one input (q/k/v; w_0/w_1) share a mask (`dropout_mask: shared`)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last_input = None
        self._last_output = None

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x is not self._last_input:
            self._last_input, self._last_output = x, F.dropout(x, self.p, True)
        return self._last_output

    def clear(self):
        self._last_input = self._last_output = None


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r adapter (no bias, as the Pico decoder)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, shared_dropout: SharedDropout | None = None):
        super().__init__()
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.A_lora = nn.Parameter(torch.empty(rank, in_features))
        self.B_lora = nn.Parameter(torch.zeros(out_features, rank))
        # a shared module is not registered as a child: it belongs to the block, not to this linear
        self._shared_dropout = [shared_dropout] if shared_dropout is not None else []
        self.dropout = dropout
        self.reset_adapter()

    def forward(self, x):
        if self._shared_dropout:
            x_adapter = self._shared_dropout[0](x)
        else:
            x_adapter = F.dropout(x, self.dropout, self.training)
        # the adapter as two thin matmuls: never materialise B A (out x in)
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x_adapter, self.A_lora), self.B_lora)

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


# adapters reading the same input share a dropout mask under `dropout_mask: shared`
SHARED_INPUT_GROUPS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                       "w_0": "swiglu", "w_1": "swiglu"}


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
    shared: dict[tuple[int, str], SharedDropout] = {}
    for name, parent, attr in target_linears(model, targets):
        linear = getattr(parent, attr)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already carries an adapter")
        shared_dropout = None
        if dropout_mask == "shared" and attr in SHARED_INPUT_GROUPS:
            key = (id(parent), SHARED_INPUT_GROUPS[attr])
            shared_dropout = shared.setdefault(key, SharedDropout(dropout))
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


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model) for p in (m.A_lora, m.B_lora)]
