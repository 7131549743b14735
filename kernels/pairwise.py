"""Per-row adapter pairs on Triton: one launch for a batch whose rows use different (in, out) pairs.

    y[m] = x[m] W^T + b + (v[m] * coef[p]) B_p^T,   v[m] = x[m] A_p^T,   p = row_pair[m]

As Punica's SGMV and vLLM's LoRA kernels do for one adapter, rows are grouped by pair (a stable
sort on the device) and every row tile holds rows of one pair only, so the shrink and expand are
tile-level dots against that pair's slice of a bank; the base GEMM is the same for every row.
The bank stacks each pair's parts (``reference.pair_parts``) along rank, padded to one rank block:
strategy "output" holds ``[A_in; A_out]``, ``[B_in | B_out]`` and per-rank coefficients
``w * scale``; strategy "ab" holds the merged ``A_m``, ``B_m`` with coefficient 1. The tile table is
built on the device with an upper bound on the tile count, so nothing waits for the GPU.
Forward only (inference): the training paths use one pair per batch (``dual_lora_linear``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import pairwise_config, rank_block
from .lora_gemm import check_operands, dot_precision
from .reference import Pair, pair_parts


@triton.jit
def _pairwise_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, order_ptr, tile_pair_ptr, tile_lo_ptr, tile_hi_ptr,
    a_bank_ptr, b_bank_ptr, coef_ptr,
    N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # Bank layout: a_bank [pairs, BR, K], b_bank [pairs, N, BR], coef [pairs, BR] (fp32), contiguous.
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    pair = tl.load(tile_pair_ptr + tile)
    if pair < 0:  # past the last real tile (the grid is an upper bound)
        return
    lo, hi = tl.load(tile_lo_ptr + tile), tl.load(tile_hi_ptr + tile)
    slot = lo + tl.arange(0, BM)
    m_mask = slot < hi
    rm = tl.load(order_ptr + slot, mask=m_mask, other=0).to(tl.int64)  # x rows of this pair
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    n_mask = rn < N
    a_bank = a_bank_ptr + pair.to(tl.int64) * BR * K
    b_bank = b_bank_ptr + pair.to(tl.int64) * N * BR

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    v = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        a = tl.load(a_bank + rr[None, :] * K + rk[:, None], mask=k_mask[:, None], other=0.0)
        v = tl.dot(x, a, v, input_precision=PRECISION)

    coef = tl.load(coef_ptr + pair * BR + rr)
    b = tl.load(b_bank + rn[:, None] * BR + rr[None, :], mask=n_mask[:, None], other=0.0)
    acc = tl.dot((v * coef[None, :]).to(b.dtype), tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def pack_coef_bank(pairs: Sequence[Pair], strategy: str, K: int, N: int, dtype: torch.dtype,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """(a_bank [P, BR, K], b_bank [P, N, BR], coef [P, BR] fp32, BR); a pair without adapters is zeros."""
    parts = [pair_parts(*p, strategy) for p in pairs]
    ranks = [sum(A.shape[0] for A, _, _ in pp) for pp in parts]
    BR = rank_block(max(ranks, default=0))
    a_bank = torch.zeros((len(pairs), BR, K), dtype=dtype, device=device)
    b_bank = torch.zeros((len(pairs), N, BR), dtype=dtype, device=device)
    coef = torch.zeros((len(pairs), BR), dtype=torch.float32, device=device)
    for i, pp in enumerate(parts):
        lo = 0
        for A, B, c in pp:
            if A.dtype != dtype or B.dtype != dtype:
                raise TypeError(f"dtype mismatch: {dtype} activations with a {A.dtype}/{B.dtype} adapter (pair {i})")
            if A.shape[1] != K or B.shape[0] != N or B.shape[1] != A.shape[0]:
                raise ValueError(f"pair {i}: adapter A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                                 f"linear of in_features {K}, out_features {N}")
            r = A.shape[0]
            a_bank[i, lo:lo + r] = A.detach()
            b_bank[i, :, lo:lo + r] = B.detach()
            coef[i, lo:lo + r] = c.detach() if isinstance(c, torch.Tensor) else c  # a float fills: no host copy
            lo += r
    return a_bank, b_bank, coef, BR


def _tiles(row_pair: Tensor, n_pairs: int, BM: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Rows sorted by pair, and per row tile (pair, first slot, end slot) into that order; the grid
    is the bound ceil(M / BM) + pairs, tiles past the real count have pair -1. No host sync."""
    M = row_pair.numel()
    order = torch.sort(row_pair, stable=True).indices.to(torch.int32)
    counts = torch.bincount(row_pair, minlength=n_pairs)
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(M, BM) + n_pairs
    t = torch.arange(n_tiles, device=row_pair.device)
    pair = torch.searchsorted(tile_end, t, right=True)
    real = pair < n_pairs
    pair = pair.clamp(max=n_pairs - 1)
    row_start = torch.cumsum(counts, 0) - counts
    lo = row_start[pair] + (t - (tile_end[pair] - tiles[pair])) * BM
    hi = torch.minimum(lo + BM, row_start[pair] + counts[pair])
    as32 = lambda z: z.to(torch.int32)
    return order, as32(torch.where(real, pair, -1)), as32(lo), as32(hi), n_tiles


def pairwise_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pairs: Sequence[Pair],
                         row_pair: Tensor, strategy: str = "output") -> Tensor:
    """``x [B, ..., K] -> y [B, ..., N]``; batch row b uses ``pairs[row_pair[b]]`` (forward only).

    Same function as :func:`reference.pairwise_lora_linear_ref`, in one kernel launch.
    """
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (
            x, weight, bias, *(a_t for p in pairs for a in p[:2] if a is not None for a_t in a[:2]),
            *(w for p in pairs for w in p[2:]))):
        raise RuntimeError("pairwise_lora_linear (Triton) is forward-only: run it under torch.no_grad(), "
                           "or train with one pair per batch (dual_lora_linear)")
    if not pairs:
        raise ValueError("pairs is empty: pass at least one (lora_in, lora_out, w_in, w_out)")
    if row_pair.dim() != 1 or row_pair.shape[0] != x.shape[0] or row_pair.dtype.is_floating_point:
        raise ValueError(f"row_pair must be an integer tensor [{x.shape[0]}] (one pair per batch row), "
                         f"got {row_pair.dtype} {tuple(row_pair.shape)}")
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    check_operands(x, others=(weight, bias))
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    rows = row_pair.to(device=x.device, dtype=torch.int64)
    # Checked on the device (no host sync on a GPU): a pair id out of range would leave rows unwritten.
    torch._assert_async(((rows >= 0) & (rows < len(pairs))).all(),
                        f"row_pair holds a pair id outside [0, {len(pairs)})")
    rows = rows.repeat_interleave(M // x.shape[0])
    a_bank, b_bank, coef, BR = pack_coef_bank(pairs, strategy, K, N, x.dtype, x.device)
    cfg = pairwise_config(M, len(pairs), BR, x.dtype)
    order, tile_pair, lo, hi, n_tiles = _tiles(rows, len(pairs), cfg.BM)
    bias = None if bias is None else bias.contiguous()
    _pairwise_kernel[(n_tiles, triton.cdiv(N, cfg.BP))](
        x2d, weight, bias, out, order, tile_pair, lo, hi, a_bank, b_bank, coef,
        N, K, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        BM=cfg.BM, BN=cfg.BP, BK=cfg.BQ, BR=BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.reshape(*x.shape[:-1], N)
