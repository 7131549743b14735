"""Where an adapted linear's math runs: one entry point, dispatching to the best available backend.

The plain-torch reference (``modlora.kernels.reference``) is the oracle and the fallback; fused
backends plug in here without changing any caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .kernels.reference import Adapter, Weight, dual_lora_linear_ref, pairwise_lora_linear_ref


def dual_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
                     lora_out: Adapter | None, w_in: Weight = 1.0, w_out: Weight = 1.0,
                     strategy: str = "output") -> Tensor:
    """``x W^T + b`` plus one or two adapters merged by ``strategy`` (DESIGN.md section 3)."""
    return dual_lora_linear_ref(x, weight, bias, lora_in, lora_out, w_in, w_out, strategy)


def pairwise_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                         pairs: Sequence[tuple[Adapter | None, Adapter | None, Weight, Weight]],
                         row_pair: Tensor, strategy: str = "output") -> Tensor:
    """Like :func:`dual_lora_linear`, but batch row b uses the pair ``pairs[row_pair[b]]``."""
    return pairwise_lora_linear_ref(x, weight, bias, pairs, row_pair, strategy)
