"""The Pico decoder: a LLaMA-style decoder-only transformer, as trained in the paper.

Follows the reference implementation of "Investigating ReLoRA" (Weiss et al. 2025, arXiv
2509.12960; the pico-lm `pico-decoder`), which follows LLaMA (Touvron et al. 2023):
pre-norm RMSNorm computed in fp32, rotary position embeddings rotating adjacent pairs of each
head's dimensions (Su et al. 2021), grouped-query attention (Ainslie et al. 2023), SwiGLU
feed-forward (Shazeer 2020), no biases, untied input embedding and LM head, PyTorch default
initialisation, logits in fp32.

Module names are the reference checkpoints' (`embedding_proj`, `layers.<i>.attention.q_proj`,
`layers.<i>.swiglu.w_0`, ..., `de_embedding_proj`), so the paper's released weights load by
name; relora/model_config.py lists them and holds the configuration, the linears' shapes and
the model FLOPs without torch. Shapes: B batch, T time, C d_model, nh query heads, nkv key/value
heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the autocast dtype, as the reference does; F.rms_norm is
        # x * rsqrt(mean(x^2) + eps) in one fused kernel (bitwise the same as the four ops)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None):
    """cos and sin of shape (T, hs/2): position t rotates pair i by t * theta^(-2i/hs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) of x (B, n, T, hs) in fp32 by the angles
    of the tables: (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos). Both forms compute the same
    rotation; which runs faster depends on the machine (KERNELS["rope"], relora.autotune)."""
    if torch.compiler.is_compiling() or KERNELS["rope"] == "real":  # inductor has no complex codegen
        return rope_real(x, cos, sin)
    return rope_complex(x, cos, sin)


def rope_complex(x, cos, sin):
    """The rotation as the complex product (x_2i + i x_2i+1)(cos + i sin), as LLaMA writes it: one
    pass over x forward and one backward in eager mode (the real form takes four)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, n, T, hs/2)
    rotation = torch.complex(cos.float(), sin.float())  # (T, hs/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rope_real(x, cos, sin):
    """The same rotation in real arithmetic: x * (cos, cos) + swap(x) * (-sin, sin), the tables
    interleaved to (T, hs)."""
    cos_hs = cos.float().repeat_interleave(2, dim=-1)  # (T, hs): cos_i, cos_i
    sin_hs = torch.stack((-sin.float(), sin.float()), dim=-1).flatten(-2)  # (T, hs): -sin_i, sin_i
    x_fp32 = x.float()
    swapped = x_fp32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, n, T, hs): x_2i+1, x_2i
    return (x_fp32 * cos_hs + swapped * sin_hs).type_as(x)


# The model's own kernels beside PyTorch's, by the decision they serve. Which runs faster depends
# on the CPU, the torch build, the shape and the dtype (a path measured 2x faster on one CPU was
# 0.5x on another), so none is decided by a constant: relora.autotune times the candidates on the
# machine at hand before training starts and sets these (training.kernels in the config fixes
# them instead). The values here serve whatever runs without a choice (evaluation, tests):
#   attention             "small_head" (SmallHeadCausalAttention, CPU) or "sdpa" (PyTorch's fused kernel)
#   rope                  "complex" (rope_complex) or "real" (rope_real)
#   lm_head_chunk_logits  fp32 logits per chunk of LMHeadCrossEntropy
KERNELS = {"attention": "sdpa", "rope": "complex", "lm_head_chunk_logits": 2**22}
KERNEL_CHOICES = {"attention": ("small_head", "sdpa"), "rope": ("complex", "real"),
                  "lm_head_chunk_logits": (2**20, 2**22, 2**24)}


def set_kernels(kernels: dict) -> dict:
    """Use these kernels from now on (unknown names or values raise); returns the previous ones."""
    for name, value in kernels.items():
        if name not in KERNEL_CHOICES or value not in KERNEL_CHOICES[name]:
            raise ValueError(f"kernel {name}: {value!r} is not one of {KERNEL_CHOICES.get(name, ())} "
                             f"(kernels: {sorted(KERNEL_CHOICES)})")
    previous = dict(KERNELS)
    KERNELS.update(kernels)
    return previous


# The probabilities SmallHeadCausalAttention keeps for the backward take B*nh*T^2 floats per layer
# (the fused kernel keeps none): beyond this sequence length it is not offered, whatever it measures.
SMALL_HEAD_MAX_SEQ = 512
# scores per chunk and thread: 1 MB, the per-core L2 cache of current x86 CPUs, so each chunk's
# scores, probabilities and their gradients stay in cache between the ops that use them (the
# fastest of the chunk sizes 2^16-2^20 tried on 1 and 2 threads)
SMALL_HEAD_CHUNK_SCORES = 2**18


class SmallHeadCausalAttention(torch.autograd.Function):
    """Causal grouped-query attention softmax(q k^T / sqrt(hs) + causal) v with the probabilities P
    kept for the backward, for small heads on CPU. q (B, nh, T, hs), k and v (B, nkv, T, hs) ->
    y (B, T, nh * hs), the layout o_proj reads.

    The nh / nkv query heads that share a key/value head are stacked along the rows, so one
    batched matmul over G = B * nkv groups of R = (nh / nkv) * T rows serves them all (no kv
    repeat). The groups go in chunks whose (rows, T) scores fit in cache. Every product whose
    result has head-size columns is computed transposed (y^T = v^T P^T, and likewise dv, dq, dk):
    a GEMM with hs rows and T columns runs faster than one with T rows and hs columns.
    bf16 inputs (autocast) are computed in fp32: q, k and v are small, and P stays accurate."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, nh, T, hs = q.shape
        nkv = k.shape[1]
        group = nh // nkv
        G, R = B * nkv, group * T
        dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
        chunk = max(1, SMALL_HEAD_CHUNK_SCORES * torch.get_num_threads() // (R * T))
        keep_probs = any(ctx.needs_input_grad)  # evaluation reuses one chunk's buffer instead
        with torch.autocast(q.device.type, enabled=False):
            # rows: (query head within the group, position); the scale goes on q
            q_scaled = q.reshape(G, R, hs).to(compute) * (1.0 / math.sqrt(hs))
            k2, v2 = k.reshape(G, T, hs).to(compute), v.reshape(G, T, hs).to(compute)
            causal = torch.full((T, T), float("-inf"), dtype=compute, device=q.device).triu_(1).repeat(group, 1)
            probs = q.new_empty((G if keep_probs else min(chunk, G), R, T), dtype=compute)
            y_t = q.new_empty((G, hs, R), dtype=compute)
            for start in range(0, G, chunk):
                c = slice(start, start + chunk)
                p = probs[c] if keep_probs else probs[:min(chunk, G - start)]
                torch.softmax(torch.baddbmm(causal, q_scaled[c], k2[c].transpose(1, 2)), dim=-1, out=p)
                torch.bmm(v2[c].transpose(1, 2), p.transpose(1, 2), out=y_t[c])  # (P v)^T
        if keep_probs:
            ctx.save_for_backward(q_scaled, k2, v2, probs, y_t)
        ctx.dtype, ctx.chunk = dtype, chunk
        # (B, nkv, hs, group, T) -> (B, T, nkv, group, hs) = (B, T, nh * hs)
        return y_t.view(B, nkv, hs, group, T).permute(0, 4, 1, 3, 2).reshape(B, T, nh * hs).to(dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_y):
        q_scaled, k2, v2, probs, y_t = ctx.saved_tensors
        G, R, hs = q_scaled.shape
        T = k2.shape[1]
        B = grad_y.shape[0]
        nkv, group = G // B, R // T
        grad_y_t = grad_y.to(y_t.dtype).reshape(B, T, nkv, group, hs).permute(0, 2, 4, 3, 1).reshape(G, hs, R)
        row_dot = (grad_y_t * y_t).sum(1)  # (G, R): rowsum(dy * y) of the softmax backward
        k_scaled = k2 * (1.0 / math.sqrt(hs))
        grad_q_t, grad_k_t, grad_v_t = torch.empty_like(y_t), k2.new_empty((G, hs, T)), k2.new_empty((G, hs, T))
        for start in range(0, G, ctx.chunk):
            c = slice(start, start + ctx.chunk)
            p, dy_t = probs[c], grad_y_t[c]
            torch.bmm(dy_t, p, out=grad_v_t[c])  # (P^T dy)^T
            # dS = P * (dP - rowsum(dy * y)) with dP = dy v^T
            grad_scores = torch.bmm(dy_t.transpose(1, 2), v2[c].transpose(1, 2)).sub_(row_dot[c, :, None]).mul_(p)
            # S = q k^T * scale: dq = dS (k * scale), dk = dS^T (q * scale)
            torch.bmm(k_scaled[c].transpose(1, 2), grad_scores.transpose(1, 2), out=grad_q_t[c])
            torch.bmm(q_scaled[c].transpose(1, 2), grad_scores, out=grad_k_t[c])
        grad_q = grad_q_t.view(B, nkv, hs, group, T).permute(0, 1, 3, 4, 2).reshape(B, nkv * group, T, hs)
        return (grad_q.to(ctx.dtype), grad_k_t.view(B, nkv, hs, T).transpose(2, 3).to(ctx.dtype),
                grad_v_t.view(B, nkv, hs, T).transpose(2, 3).to(ctx.dtype))


def causal_attention(q, k, v, kernel: str):
    """Causal grouped-query attention of q (B, nh, T, hs), k and v (B, nkv, T, hs) -> (B, T, nh * hs)
    by the kernel named: "small_head" (CPU, T <= SMALL_HEAD_MAX_SEQ; else PyTorch's) or "sdpa"."""
    B, nh, T, hs = q.shape
    if kernel == "small_head" and q.device.type == "cpu" and T <= SMALL_HEAD_MAX_SEQ:
        return SmallHeadCausalAttention.apply(q, k, v)
    # query head h reads key/value head h // (nh / nkv), as LLaMA's repeat_kv
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != nh)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v, KERNELS["attention"])  # (B, T, C)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.ffn_hidden, bias=False)  # gate
        self.w_1 = nn.Linear(config.d_model, config.ffn_hidden, bias=False)  # up
        self.w_2 = nn.Linear(config.ffn_hidden, config.d_model, bias=False)  # down

    def forward(self, x):
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu = SwiGLU(config)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.swiglu(self.swiglu_norm(x))


class LMHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the fp32 logits h W^T over the targets that are not -100, without
    the (tokens, vocab) logits ever existing whole (67 MB at the default study's batch, 3.3 GB
    at the paper's micro-batch of 8 x 2048): rows go in chunks, and each chunk's logit gradient,
    softmax - one_hot, becomes its share of dL/dh and dL/dW at once (the fused linear
    cross-entropy of Liger-Kernel, Hsu et al. 2024). h (N, C), W (V, C), targets (N,)."""

    @staticmethod
    def forward(ctx, h, weight, targets, with_grad: bool):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        h_mm, w_mm = h.to(dtype), weight.to(dtype)
        predicted = targets != -100
        n = predicted.sum().clamp(min=1)
        rows = max(1, KERNELS["lm_head_chunk_logits"] // weight.shape[0])
        loss = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h_mm) if with_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        row_weight = predicted / n  # each predicted row's share of the mean; 0 for -100
        with torch.autocast(device, enabled=False):
            for start in range(0, h.shape[0], rows):
                h_c, w_c, keep = h_mm[start:start + rows], row_weight[start:start + rows], predicted[start:start + rows]
                t = targets[start:start + rows].clamp(min=0)
                logits = (h_c @ w_mm.t()).float()  # (rows, V)
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                # one exp serves the loss and its gradient: e = exp(logits - max), lse = max + log sum e,
                # softmax = e / sum e (torch.logsumexp and a second exp would pass over the logits twice more)
                row_max = logits.amax(dim=-1)
                exp = logits.sub_(row_max[:, None]).exp_()
                exp_sum = exp.sum(dim=-1)
                loss += torch.where(keep, row_max + exp_sum.log() - target_logit, 0.0).sum()
                if with_grad:  # d loss / d logits = (softmax - one_hot) / n on predicted rows
                    grad = exp.mul_((w_c / exp_sum)[:, None])
                    grad[torch.arange(len(t), device=t.device), t] -= w_c
                    if grad_w.dtype == dtype:  # fp32: write and accumulate in place
                        torch.mm(grad, w_mm, out=grad_h[start:start + rows])  # (rows, C)
                        grad_w.addmm_(grad.t(), h_c)  # (V, C)
                    else:  # autocast: the matmuls in its dtype, dW summed in fp32
                        grad = grad.to(dtype)
                        grad_h[start:start + rows] = grad @ w_mm
                        grad_w += (grad.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


class PicoDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # keep only each block's input for the backward and recompute the block from it there
        # (training.activation_checkpointing; the trainer sets it): less memory, more compute
        self.activation_checkpointing = False

    def residual_stream(self, idx, every_block: list | None = None):
        """idx (B, T) token ids -> the residual stream after the last block (B, T, C), before the
        output norm; each block's output is also appended to `every_block` when one is given."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embedding_proj(idx)  # (B, T, C)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointing:  # the recomputation restores the RNG state, so dropout masks repeat
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
            if every_block is not None:
                every_block.append(x)
        return x

    def forward(self, idx, return_hidden: bool = False, targets=None):
        """idx (B, T) token ids -> fp32 logits (B, T, vocab); with return_hidden also the
        residual stream after every block, a list of n_layers tensors (B, T, C). With targets
        (B, T) (-100: not predicted) the mean next-token cross-entropy instead of the logits,
        computed without materialising them (LMHeadCrossEntropy)."""
        hidden = [] if return_hidden else None
        x = self.output_norm(self.residual_stream(idx, hidden))
        if targets is not None:
            with_grad = torch.is_grad_enabled() and (x.requires_grad or self.de_embedding_proj.weight.requires_grad)
            return LMHeadCrossEntropy.apply(x.flatten(0, 1), self.de_embedding_proj.weight, targets.flatten(), with_grad)
        logits = self.de_embedding_proj(x).float()  # (B, T, vocab)
        return (logits, hidden) if return_hidden else logits


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
