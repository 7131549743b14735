"""The CUDA decode op (``csrc/cuda/lora_decode.cu``, built into ``modlora._C`` when nvcc and a CUDA
torch are present): the dual-LoRA linear for M <= 16 rows on sm80+, one warp per output column
reading W once with 16-byte loads.

Not routed by ``ops`` yet: it competes with the Triton kernel at decode shapes, and no GPU has
been available to measure which is faster (``benchmarks/lora_linear.py`` times both when it can).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu
from .kernels.pairwise import pair_parts
from .kernels.reference import Adapter, Weight

MAX_ROWS = 16


def available() -> bool:
    """True when ``modlora._C`` (loaded by :mod:`modlora.cpu`) has the CUDA op and a GPU is visible."""
    return cpu.HAVE_C and torch.cuda.is_available() and hasattr(torch.ops.modlora, "lora_decode")


def dual_lora_decode(x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
                     lora_out: Adapter | None, w_in: Weight = 1.0, w_out: Weight = 1.0,
                     strategy: str = "output") -> Tensor:
    """``modlora.kernels.dual_lora_linear``'s function (forward) for x [..., K] of at most 16 rows."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if not 1 <= x2d.shape[0] <= MAX_ROWS:
        raise ValueError(f"the CUDA decode op takes 1..{MAX_ROWS} rows, got {x2d.shape[0]}")
    parts = pair_parts((lora_in, lora_out, w_in, w_out), strategy)
    K, N = x2d.shape[1], weight.shape[0]
    if parts:
        a = torch.cat([A for A, _, _ in parts]).contiguous()
        b = torch.cat([B for _, B, _ in parts], dim=1).contiguous()
        coef = torch.cat([torch.as_tensor(c, dtype=torch.float32, device=x.device).expand(A.shape[0])
                          for A, _, c in parts]).contiguous()
    else:
        a, b = x2d.new_empty((0, K)), x2d.new_empty((N, 0))
        coef = torch.empty(0, dtype=torch.float32, device=x.device)
    y = torch.ops.modlora.lora_decode(x2d, weight.contiguous(), None if bias is None else bias.contiguous(),
                                      a, b, coef)
    return y.reshape(*x.shape[:-1], N)
