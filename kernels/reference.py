"""Plain-torch reference of the dual-LoRA linear: the test oracle and the fallback of every kernel.

    y = x W^T + b + sum_a coef_a (x A_a^T) B_a^T                       strategy "output"
    y = x W^T + b + (x A_m^T) B_m^T,  A_m = sum_a c_a A_a,  B_m = sum_a c_a B_a,  c_a = sqrt(w_a s_a)
                                                                         strategy "ab"

An adapter is ``(A [r, K], B [N, r], scale)``; ``coef_a = w_a * scale_a``. Autograd through these
few torch ops gives every gradient (x, A, B, w), so this file is also the gradient oracle.
:func:`pair_parts` is the one packing rule: the adapters a pair applies, coefficients kept apart (the
Triton and CUDA kernels' form); :func:`merge_pair` folds them in, giving either strategy as one
adapter of coefficient 1 (the form the C++ bank and a PEFT export store). See docs/design.md for
the derivation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

Adapter = tuple[Tensor, Tensor, float]
Weight = float | Tensor
Pair = tuple[Adapter | None, Adapter | None, Weight, Weight]  # (lora_in, lora_out, w_in, w_out)
STRATEGIES = ("output", "ab")


def check_strategy(strategy: str, lora_in: Adapter | None, lora_out: Adapter | None) -> None:
    """Raise a clear error for an unknown strategy or adapters that strategy ``ab`` cannot merge
    (unequal ranks, or A or B of unequal shapes, which the element-wise sum would broadcast)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "ab" and lora_in is not None and lora_out is not None:
        r_in, r_out = lora_in[0].shape[0], lora_out[0].shape[0]
        if r_in != r_out:
            raise ValueError(
                f"strategy 'ab' merges A and B element-wise and needs equal ranks, got r_in={r_in}, r_out={r_out}"
            )
        shapes = [tuple(t.shape) for t in (lora_in[0], lora_out[0], lora_in[1], lora_out[1])]
        if shapes[0] != shapes[1] or shapes[2] != shapes[3]:
            raise ValueError(f"strategy 'ab' merges A and B element-wise and needs equal shapes, got A {shapes[0]} "
                             f"and {shapes[1]}, B {shapes[2]} and {shapes[3]}")


def check_weight(w: Weight, name: str, strategy: str) -> None:
    """A pair's weight: a finite number (>= 0 under ``ab``, which takes its square root) or a 0-dim
    tensor (a learned weight; its value is not read here, which would wait for the device)."""
    if isinstance(w, Tensor):
        if w.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(w.shape)}")
    elif isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
        raise ValueError(f"{name} must be a finite number or a 0-dim tensor, got {w!r}")
    elif strategy == "ab" and w < 0:
        raise ValueError(f"strategy 'ab' scales A and B by sqrt(w * scale) and needs {name} >= 0, got {w}")


def as_fp32(adapter: Adapter | None) -> Adapter | None:
    """The adapter with fp32 tensors (same graph: a no-op in fp32, differentiable otherwise)."""
    return None if adapter is None else (adapter[0].float(), adapter[1].float(), adapter[2])


def merge_ab(lora_in: Adapter | None, lora_out: Adapter | None, w_in: Weight, w_out: Weight) -> tuple[Tensor, Tensor]:
    """``A_m = sum_a c_a A_a``, ``B_m = sum_a c_a B_a`` with ``c_a = sqrt(w_a s_a)`` (PEFT's "linear")."""
    parts = [(a, w) for a, w in ((lora_in, w_in), (lora_out, w_out)) if a is not None]
    a_m = b_m = None
    for (A, B, scale), w in parts:
        c = torch.sqrt(torch.as_tensor(w * scale, dtype=torch.float32, device=A.device)).to(A.dtype)
        a_m = c * A if a_m is None else a_m + c * A
        b_m = c * B if b_m is None else b_m + c * B
    return a_m, b_m


def pair_rank(lora_in: Adapter | None, lora_out: Adapter | None, strategy: str) -> int:
    """The total rank a pair applies: ``output`` stacks its adapters, ``ab`` merges them into one of
    their (equal) rank."""
    ranks = [a[0].shape[0] for a in (lora_in, lora_out) if a is not None]
    return max(ranks, default=0) if strategy == "ab" else sum(ranks)


def pair_parts(lora_in: Adapter | None, lora_out: Adapter | None, w_in: Weight, w_out: Weight,
               strategy: str) -> list[tuple[Tensor, Tensor, Weight]]:
    """The adapters ``(A, B, coef)`` the pair applies: its delta is ``sum ((x A^T) coef) B^T``.

    ``output``: each present adapter with ``coef = w s``; ``ab``: ``(A_m, B_m, 1.0)`` of
    :func:`merge_ab`. Empty without adapters. The weights are floats or 0-dim tensors.
    """
    check_strategy(strategy, lora_in, lora_out)
    check_weight(w_in, "w_in", strategy)
    check_weight(w_out, "w_out", strategy)
    if lora_in is None and lora_out is None:
        return []
    if strategy == "ab":
        return [(*merge_ab(lora_in, lora_out, w_in, w_out), 1.0)]
    return [(a[0], a[1], w * a[2]) for a, w in ((lora_in, w_in), (lora_out, w_out)) if a is not None]


def merge_pair(lora_in: Adapter | None, lora_out: Adapter | None, w_in: Weight, w_out: Weight,
               strategy: str) -> tuple[Tensor, Tensor]:
    """The pair as ONE adapter ``(A [R, K], B [N, R])`` of coefficient 1: ``x A^T B^T`` is its delta.

    :func:`pair_parts` with each coefficient folded into its A and the parts stacked along rank:
    ``output``: ``A = [w_in s_in A_in; w_out s_out A_out]``, ``B = [B_in | B_out]``, R = r_in + r_out
    (PEFT's ``cat``); ``ab``: ``(A_m, B_m)`` of :func:`merge_ab`, R = r (PEFT's ``linear``).
    Needs at least one adapter.
    """
    parts = pair_parts(lora_in, lora_out, w_in, w_out, strategy)
    if not parts:
        raise ValueError("merge_pair needs at least one adapter, got lora_in = lora_out = None")
    return torch.cat([A * c for A, _, c in parts]), torch.cat([B for _, B, _ in parts], dim=1)


def lora_delta_ref(
    x: Tensor,
    lora_in: Adapter | None,
    lora_out: Adapter | None,
    w_in: Weight = 1.0,
    w_out: Weight = 1.0,
    strategy: str = "output",
) -> Tensor | None:
    """The adapters' part of ``y`` alone (None without adapters)."""
    delta = None
    for A, B, c in pair_parts(lora_in, lora_out, w_in, w_out, strategy):
        term = ((x @ A.t()) * c) @ B.t()
        delta = term if delta is None else delta + term
    return delta


def dual_lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_in: Adapter | None,
    lora_out: Adapter | None,
    w_in: Weight = 1.0,
    w_out: Weight = 1.0,
    strategy: str = "output",
) -> Tensor:
    """``x [..., K] -> y [..., N]``; see the module docstring for the math."""
    y = torch.nn.functional.linear(x, weight, bias)
    delta = lora_delta_ref(x, lora_in, lora_out, w_in, w_out, strategy)
    return y if delta is None else y + delta


def pairwise_lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pairs: Sequence[Pair],
    row_pair: Tensor,
    strategy: str = "output",
) -> Tensor:
    """Row b of ``x [B, ..., K]`` uses the pair ``pairs[row_pair[b]]``: rows are grouped by pair."""
    y = torch.nn.functional.linear(x, weight, bias)
    for p in torch.unique(row_pair).tolist():
        if not 0 <= p < len(pairs):
            raise IndexError(f"row_pair values must lie in [0, {len(pairs)}), got {p}")
        rows = (row_pair == p).nonzero().squeeze(1)
        delta = lora_delta_ref(x[rows], *pairs[p], strategy=strategy)
        if delta is not None:
            y = y.index_add(0, rows, delta)
    return y
