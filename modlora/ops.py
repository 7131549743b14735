"""Where an adapted linear's math runs: one entry point, dispatching to the best available backend.

- CUDA: the fused Triton kernel (``modlora.kernels.dual_lora_linear``), forward and backward;
- anything else: the plain-torch reference (``modlora.kernels.reference``), which is also the
  oracle every backend is tested against.

Callers (the adapter bindings) never pick a backend themselves.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from .kernels.reference import Adapter, Weight, dual_lora_linear_ref, pairwise_lora_linear_ref

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[Adapter | None]):
    """Apply CUDA autocast by hand: the Triton op takes one dtype, as F.linear does under autocast."""
    if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
        return x, weight, bias, adapters
    dt = torch.get_autocast_dtype("cuda")
    cast = lambda a: None if a is None else (a[0].to(dt), a[1].to(dt), a[2])
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), [cast(a) for a in adapters]


def dual_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
                     lora_out: Adapter | None, w_in: Weight = 1.0, w_out: Weight = 1.0,
                     strategy: str = "output") -> Tensor:
    """``x W^T + b`` plus one or two adapters merged by ``strategy`` (DESIGN.md section 3)."""
    if x.is_cuda and _HAVE_TRITON and (lora_in is not None or lora_out is not None):
        from .kernels import dual_lora_linear as fused

        x, weight, bias, (lora_in, lora_out) = _autocast(x, weight, bias, (lora_in, lora_out))
        return fused(x, weight, bias, lora_in, lora_out, w_in, w_out, strategy)
    return dual_lora_linear_ref(x, weight, bias, lora_in, lora_out, w_in, w_out, strategy)


def pairwise_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                         pairs: Sequence[tuple[Adapter | None, Adapter | None, Weight, Weight]],
                         row_pair: Tensor, strategy: str = "output") -> Tensor:
    """Like :func:`dual_lora_linear`, but batch row b uses the pair ``pairs[row_pair[b]]``."""
    return pairwise_lora_linear_ref(x, weight, bias, pairs, row_pair, strategy)
