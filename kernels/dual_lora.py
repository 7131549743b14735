"""The dual-LoRA linear on Triton: ``y = x W^T + b + sum_a coef_a (x A_a^T) B_a^T`` in one pass.

Strategy ``ab`` merges the pair into one adapter (``A_m``, ``B_m``, coef 1) with a few small torch
ops (autograd through ``c_a = sqrt(w_a s_a)`` included), then runs the same kernels: the base
GEMM runs once either way. Same function and gradients as ``reference.dual_lora_linear_ref``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .lora_gemm import Coef, RankStack, lora_gemm, lora_shrink
from .reference import Adapter, Weight, check_strategy, merge_ab

Variant = Literal["fused", "split"]
VARIANTS = ("fused", "split")

# A guess (docs/design.md, "Backends"), not a measurement (no GPU was available when this was written):
# small M is bound by reading W, so recomputing x A^T per column tile ("fused") is free; large M is
# bound by FLOPs, where that recomputation costs R / BP of the base GEMM and a separate shrink wins.
# Benchmark with variant= forced to move this threshold.
FUSED_MAX_M = 128


def pick_variant(m: int) -> Variant:
    """Kernel variant for ``m`` rows of x."""
    return "fused" if m <= FUSED_MAX_M else "split"


class _DualLoRALinear(torch.autograd.Function):
    """``y = x W^T + b + c1 (x A1^T) B1^T + c2 (x A2^T) B2^T``, x [M, K]; adapter 2 optional.

    With ``u_a = x A_a^T`` [M, r_a] (saved from the forward, fp32) and ``g_a = dy B_a`` [M, r_a]:

        dx    = dy W + sum_a c_a g_a A_a     one GEMM; g = dy [B1 | B2] in its loop, c g A its epilogue
        dA_a  = c_a g_a^T x                  since dL/du_a = c_a dy B_a
        dB_a  = c_a dy^T u_a
        dc_a  = sum(g_a * u_a)               = sum(dy * (u_a B_a^T))
        dW    = dy^T x,  db = sum_rows(dy)   (only if asked: W is frozen in LoRA training)

    Only what requires grad is computed; no [M, N] tensor besides dy, and never W + B A.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A1: Tensor, B1: Tensor, c1: Coef,
                A2: Tensor | None, B2: Tensor | None, c2: Coef, variant: Variant) -> Tensor:
        needs = ctx.needs_input_grad
        keep_u = needs[4] or needs[5] or needs[7] or needs[8]  # dB and dc read u
        coef = (c1, c2)
        shrink, expand = RankStack.of_a(A1, A2), RankStack.of_b(B1, B2)
        if variant == "fused":
            y, u = lora_gemm(x, weight.t(), bias, expand, coef, shrink=shrink, store_v=keep_u)
        else:
            u = lora_shrink(x, shrink)
            y, _ = lora_gemm(x, weight.t(), bias, expand, coef, v=u)
        ctx.variant, ctx.coef = variant, tuple(None if isinstance(c, Tensor) else c for c in coef)
        ctx.save_for_backward(x, weight, A1, B1, A2, B2, u if keep_u else None,
                              *(c if isinstance(c, Tensor) else None for c in coef))
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: refuse create_graph, don't lie
    def backward(ctx, dy: Tensor):
        x, weight, A1, B1, A2, B2, u, t1, t2 = ctx.saved_tensors
        n_x, n_w, n_bias, n_a1, n_b1, n_c1, n_a2, n_b2, n_c2, _ = ctx.needs_input_grad
        coef = (ctx.coef[0] if t1 is None else t1, ctx.coef[1] if t2 is None else t2)
        a_stack, b_stack = RankStack.of_a(A1, A2), RankStack.of_b(B1, B2)
        need_g = n_a1 or n_c1 or n_a2 or n_c2

        dx = g = None
        if n_x and ctx.variant == "fused":
            dx, g = lora_gemm(dy, weight, None, a_stack, coef, shrink=b_stack, store_v=need_g)
        elif n_x or need_g:
            g = lora_shrink(dy, b_stack)
            if n_x:
                dx, _ = lora_gemm(dy, weight, None, a_stack, coef, v=g)

        grads = []
        lo = 0
        for A, c, (n_a, n_b, n_c) in ((A1, coef[0], (n_a1, n_b1, n_c1)), (A2, coef[1], (n_a2, n_b2, n_c2))):
            if A is None:
                grads += [None] * 3
                continue
            span = slice(lo, lo + A.shape[0])
            lo = span.stop
            g_a = g[:, span] if g is not None else None
            u_a = u[:, span] if u is not None else None
            grads += [
                (g_a * c).t().to(x.dtype) @ x if n_a else None,
                dy.t() @ (u_a * c).to(dy.dtype) if n_b else None,
                (g_a * u_a).sum().to(c.dtype).reshape(c.shape) if n_c else None,
            ]
        dw = dy.t() @ x if n_w else None
        db = dy.sum(0) if n_bias else None
        return dx, dw, db, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], None


def dual_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
                     lora_out: Adapter | None, w_in: Weight = 1.0, w_out: Weight = 1.0, strategy: str = "output",
                     variant: Variant | None = None) -> Tensor:
    """``x [..., K] -> y [..., N]``: base linear plus one or two adapters merged by ``strategy``.

    Adapters are ``(A [r, K], B [N, r], scale)``; ``w_in``/``w_out`` are floats or 0-dim tensors
    (which may require grad, for weight learning). ``variant`` forces "fused" or "split"; by default
    :func:`pick_variant` chooses by the number of rows.
    """
    check_strategy(strategy, lora_in, lora_out)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    if lora_in is None and lora_out is None:
        return F.linear(x, weight, bias)
    if strategy == "ab" and lora_in is not None and lora_out is not None:
        a_m, b_m = merge_ab(lora_in, lora_out, w_in, w_out)
        adapters = [(a_m, b_m, 1.0)]
    else:  # "output", or "ab" with one adapter: (c A)^T (c B) with c^2 = w s is the "output" term
        adapters = [(a[0], a[1], w * a[2]) for a, w in ((lora_in, w_in), (lora_out, w_out)) if a is not None]
    (A1, B1, c1), (A2, B2, c2) = (adapters + [(None, None, 0.0)])[:2]

    x2d = x.reshape(-1, x.shape[-1])  # a view when the strides allow; the kernels take any strides
    variant = variant or pick_variant(x2d.shape[0])
    y = _DualLoRALinear.apply(x2d, weight, bias, A1, B1, c1, A2, B2, c2, variant)
    return y.reshape(*x.shape[:-1], weight.shape[0])
