"""Triton building blocks of the dual-LoRA linear: a GEMM with a LoRA epilogue, and the rank shrink.

    lora_gemm:    out[M, P] = a[M, Q] @ b[Q, P] + bias[P] + (v[M, R] * coef[R]) @ e[P, R]^T
                  v = a @ s ([Q, R]) is accumulated in the same Q loop as the base GEMM ("fused":
                  each a tile is read once), or passed in, computed before by lora_shrink ("split").
    lora_shrink:  v[M, R] = a[M, Q] @ s[Q, R], fp32.

The forward is ``a = x, b = W^T, s = [A_in; A_out]^T, e = [B_in | B_out]``; the backward's dx is
``a = dy, b = W, s = [B_in | B_out], e = [A_in; A_out]^T``. The two adapters are never
concatenated in memory: a ``RankStack`` reads rank columns [0, r1) from the first adapter's tensor
and [r1, R) from the second's, in place. Accumulation is fp32; v * coef is rounded to the input
dtype before the expand, as in the unfused torch path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import GemmConfig, gemm_config, rank_block, shrink_config

Coef = float | Tensor


@triton.jit
def _load_tile(ptr, rows, cols, row_mask, col_mask, stride_row, stride_col):
    """[rows, cols] tile of a strided matrix, zeros outside the masks."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _load_rank_tile(p1, p2, rows, ranks, row_mask, r1, R, stride_row1, stride_row2, stride_rank,
                    TWO: tl.constexpr):
    """[rows, ranks] tile of two adapters stacked along rank: ranks [0, r1) from p1, [r1, R) from p2."""
    tile = tl.load(p1 + rows[:, None] * stride_row1 + ranks[None, :] * stride_rank,
                   mask=row_mask[:, None] & (ranks < r1)[None, :], other=0.0)
    if TWO:
        in2 = (ranks >= r1) & (ranks < R)
        tile += tl.load(p2 + rows[:, None] * stride_row2 + (ranks - r1)[None, :] * stride_rank,
                        mask=row_mask[:, None] & in2[None, :], other=0.0)
    return tile


@triton.jit
def _lora_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, v_ptr, coef_ptr,
    s1_ptr, s2_ptr, e1_ptr, e2_ptr,
    c1, c2, M, P, Q, r1, R,
    stride_am, stride_aq, stride_bq, stride_bp, stride_om, stride_op,
    stride_s1, stride_s2, stride_sr, stride_e1, stride_e2, stride_er,
    stride_ok, k_chunk,
    SHRINK: tl.constexpr, STORE_V: tl.constexpr, TWO: tl.constexpr, HAS_BIAS: tl.constexpr,
    COEF_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Split-K (grid axis 1 > 1, never with SHRINK): program (tile, k) sums q in [k * k_chunk,
    # (k + 1) * k_chunk) into its own fp32 slice out[k] (stride_ok); slice 0 adds the LoRA term and
    # bias; the launcher sums the slices in a fixed order, so results do not depend on scheduling.
    # Grouped program order: GROUP_M row tiles share each b column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_p = tl.cdiv(M, BM), tl.cdiv(P, BP)
    first_m = (pid // (GROUP_M * tiles_p)) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_p)) % group_m
    pid_p = (pid % (GROUP_M * tiles_p)) // group_m
    pid_k = tl.program_id(1)

    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # rm * stride passes 2^31 at ~440k tokens (K 4864)
    rp = pid_p * BP + tl.arange(0, BP)
    rr = tl.arange(0, BR)
    m_mask, p_mask = rm < M, rp < P

    acc = tl.zeros((BM, BP), dtype=tl.float32)
    v = tl.zeros((BM, BR), dtype=tl.float32)
    q_end = tl.minimum(Q, (pid_k + 1) * k_chunk)
    for q0 in range(pid_k * k_chunk, q_end, BQ):
        rq = q0 + tl.arange(0, BQ)
        q_mask = rq < q_end
        a = _load_tile(a_ptr, rm, rq, m_mask, q_mask, stride_am, stride_aq)
        b = _load_tile(b_ptr, rq, rp, q_mask, p_mask, stride_bq, stride_bp)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SHRINK:
            s = _load_rank_tile(s1_ptr, s2_ptr, rq, rr, q_mask, r1, R, stride_s1, stride_s2, stride_sr, TWO)
            v = tl.dot(a, s, v, input_precision=PRECISION)

    v_mask = m_mask[:, None] & (rr < R)[None, :]
    if SHRINK:
        if STORE_V:
            if pid_p == 0:  # every column tile computed the same v: one of them saves it
                tl.store(v_ptr + rm[:, None] * R + rr[None, :], v, mask=v_mask)
    else:
        v = tl.load(v_ptr + rm[:, None] * R + rr[None, :], mask=v_mask, other=0.0)

    if pid_k == 0:
        if COEF_PTR:  # learned weights: read on device, no host sync
            coef = tl.where(rr < r1, tl.load(coef_ptr), tl.load(coef_ptr + 1))
        else:
            coef = tl.where(rr < r1, c1, c2)
        e = _load_rank_tile(e1_ptr, e2_ptr, rp, rr, p_mask, r1, R, stride_e1, stride_e2, stride_er, TWO)
        acc = tl.dot((v * coef[None, :]).to(e.dtype), tl.trans(e), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rp, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pid_k * stride_ok + rm[:, None] * stride_om + rp[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])


@triton.jit
def _shrink_kernel(
    a_ptr, s1_ptr, s2_ptr, v_ptr,
    M, Q, r1, R, stride_am, stride_aq, stride_s1, stride_s2, stride_sr,
    TWO: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
):
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rr = tl.arange(0, BR)
    m_mask = rm < M
    v = tl.zeros((BM, BR), dtype=tl.float32)
    for q0 in range(0, Q, BQ):
        rq = q0 + tl.arange(0, BQ)
        q_mask = rq < Q
        a = _load_tile(a_ptr, rm, rq, m_mask, q_mask, stride_am, stride_aq)
        s = _load_rank_tile(s1_ptr, s2_ptr, rq, rr, q_mask, r1, R, stride_s1, stride_s2, stride_sr, TWO)
        v = tl.dot(a, s, v, input_precision=PRECISION)
    tl.store(v_ptr + rm[:, None] * R + rr[None, :], v, mask=m_mask[:, None] & (rr < R)[None, :])


def _contiguous_sharing(mats: tuple[Tensor | None, ...], dim: int, what: str) -> tuple[tuple[Tensor, ...], int]:
    """The given matrices made contiguous, and the size along ``dim`` they must share."""
    mats = tuple(m.contiguous() for m in mats if m is not None)
    D = mats[0].shape[dim]
    if any(m.shape[dim] != D for m in mats):
        raise ValueError(f"adapters disagree on {what}: {[tuple(m.shape) for m in mats]}")
    return mats, D


@dataclass(frozen=True)
class RankStack:
    """One or two adapters' A or B matrices stacked along rank, read in place as a [rows, R] operand."""

    mats: tuple[Tensor, ...]
    ranks: tuple[int, ...]
    rows: int
    row_strides: tuple[int, int]  # step along rows, per adapter
    rank_stride: int  # step along rank, shared

    @classmethod
    def of_a(cls, *mats: Tensor | None) -> RankStack:
        """A_a [r_a, D], made contiguous: element (d, r) at r * D + d."""
        mats, D = _contiguous_sharing(mats, 1, "in_features")
        return cls(mats, tuple(m.shape[0] for m in mats), D, (1, 1), D)

    @classmethod
    def of_b(cls, *mats: Tensor | None) -> RankStack:
        """B_a [D, r_a], made contiguous: element (d, r) at d * r_a + r."""
        mats, D = _contiguous_sharing(mats, 0, "out_features")
        ranks = tuple(m.shape[1] for m in mats)
        return cls(mats, ranks, D, (ranks[0], ranks[-1]), 1)

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def ptrs(self) -> tuple[Tensor, Tensor]:
        return self.mats[0], self.mats[-1]  # a single adapter passes itself twice (never read: TWO=False)

    def strides(self) -> tuple[int, int, int]:
        return (*self.row_strides, self.rank_stride)


def _check(a: Tensor, *stacks: RankStack, others: tuple[Tensor | None, ...] = ()) -> None:
    tensors = [a, *others, *(m for st in stacks for m in st.mats)]
    for t in tensors:
        if t is None:
            continue
        if t.dtype != a.dtype:
            raise TypeError(f"dtype mismatch: {a.dtype} activations with a {t.dtype} operand")
        if t.device != a.device:
            raise ValueError(f"device mismatch: activations on {a.device}, an operand on {t.device}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {a.dtype}: expected float32, float16 or bfloat16")
    interpreted = not isinstance(_lora_gemm_kernel, triton.runtime.JITFunction)
    if a.device.type != "cuda" and not interpreted:
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {a.device}); for CPU, use the "
                           "torch reference or set TRITON_INTERPRET=1 before importing triton")
    if interpreted and a.dtype == torch.bfloat16:  # it returns garbage rather than failing
        raise TypeError("Triton's interpreter cannot compute bf16 dots: use float16/float32 or the torch reference")


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so kernel and reference agree on TF32 use.
    return "ieee" if dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _coef_args(coef: tuple[Coef, Coef], device: torch.device) -> tuple[Tensor | None, float, float]:
    """Plain floats go as kernel scalars; 0-dim tensors (learned weights) are read on device."""
    if not any(isinstance(c, Tensor) for c in coef):
        return None, float(coef[0]), float(coef[1])
    stacked = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=device).reshape(()) for c in coef])
    return stacked.detach(), 0.0, 0.0


def lora_gemm(a: Tensor, b: Tensor, bias: Tensor | None, expand: RankStack, coef: tuple[Coef, Coef], *,
              shrink: RankStack | None = None, v: Tensor | None = None,
              store_v: bool = False, config: GemmConfig | None = None) -> tuple[Tensor, Tensor | None]:
    """``out = a @ b + bias + (v * coef) @ expand^T``; ``v = a @ shrink`` in the same loop, or given.

    a [M, Q] and b [Q, P] may have any strides (b is ``W.t()`` in the forward, ``W`` for dx).
    coef is per adapter (first, second). Returns ``(out, v)``: v [M, R] fp32 when ``store_v``
    (fused) or given (split), else None. ``config`` overrides :func:`configs.gemm_config`; a split
    K needs the whole v before any slice's epilogue, so then a given shrink runs first.
    """
    (M, Q), P = a.shape, b.shape[1]
    R = expand.rank
    if (shrink is None) == (v is None):
        raise ValueError("pass exactly one of shrink (fused) and v (split)")
    if b.shape[0] != Q or expand.rows != P or (bias is not None and bias.shape != (P,)):
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, expand rows {expand.rows}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if shrink is not None and (shrink.rows != Q or shrink.ranks != expand.ranks):
        raise ValueError(f"shrink operand [{shrink.rows}, {shrink.ranks}] does not match a [{M}, {Q}], "
                         f"expand ranks {expand.ranks}")
    if v is not None and (v.shape != (M, R) or v.dtype != torch.float32 or not v.is_contiguous()):
        raise ValueError(f"v must be a contiguous float32 [{M}, {R}] tensor, got {v.dtype} {tuple(v.shape)}")
    _check(a, expand, *(() if shrink is None else (shrink,)), others=(b, bias))

    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[p] at bias_ptr + p
    if M == 0:
        if store_v and shrink is not None:
            v = torch.empty((0, R), dtype=torch.float32, device=a.device)
        return torch.empty((0, P), dtype=a.dtype, device=a.device), v
    cfg = config or gemm_config(M, P, Q, R, a.dtype, *gpu_info(a.device), fused=shrink is not None)
    if cfg.split_k > 1 and shrink is not None:
        v, shrink = lora_shrink(a, shrink), None
    elif store_v and shrink is not None:
        v = torch.empty((M, R), dtype=torch.float32, device=a.device)
    k_chunk = triton.cdiv(triton.cdiv(Q, cfg.split_k), cfg.BQ) * cfg.BQ
    split = triton.cdiv(Q, k_chunk)
    out = torch.empty((split, M, P), dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
    coef_ptr, c1, c2 = _coef_args(coef, a.device)
    s_ptrs, s_strides = ((None, None), (0, 0, 0)) if shrink is None else (shrink.ptrs(), shrink.strides())
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(P, cfg.BP), split)
    _lora_gemm_kernel[grid](
        a, b, bias, out, v, coef_ptr, *s_ptrs, *expand.ptrs(),
        c1, c2, M, P, Q, expand.ranks[0], R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(1), out.stride(2),
        *s_strides, *expand.strides(), out.stride(0), k_chunk,
        SHRINK=shrink is not None, STORE_V=store_v and shrink is not None, TWO=len(expand.ranks) == 2,
        HAS_BIAS=bias is not None, COEF_PTR=coef_ptr is not None, PRECISION=_precision(a.dtype),
        BM=cfg.BM, BP=cfg.BP, BQ=cfg.BQ, BR=rank_block(R), GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_slices(out, a.dtype), v


def _sum_slices(out: Tensor, dtype: torch.dtype) -> Tensor:
    """The split-K partial sums [split, M, P] (fp32) summed and rounded once; one slice as is."""
    return out.sum(0).to(dtype) if out.shape[0] > 1 else out[0]


@functools.cache
def _gpu_info(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def gpu_info(device: torch.device) -> tuple[str, int]:
    """(name, SM count) of a CUDA device; under the interpreter, no name (no tuned table) and an
    A100's 108 SMs, so the decode split-K heuristic is exercised on CPU too."""
    if device.type != "cuda":
        return "", 108
    return _gpu_info(device.index if device.index is not None else torch.cuda.current_device())


def lora_shrink(a: Tensor, shrink: RankStack) -> Tensor:
    """``v[M, R] = a[M, Q] @ shrink[Q, R]`` in fp32; a may have any strides."""
    M, Q = a.shape
    if shrink.rows != Q:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, shrink rows {shrink.rows}")
    _check(a, shrink)
    R = shrink.rank
    v = torch.empty((M, R), dtype=torch.float32, device=a.device)
    if M == 0:
        return v
    BM, BQ, stages = shrink_config(R, a.dtype)
    _shrink_kernel[(triton.cdiv(M, BM),)](
        a, *shrink.ptrs(), v, M, Q, shrink.ranks[0], R, a.stride(0), a.stride(1), *shrink.strides(),
        TWO=len(shrink.ranks) == 2, PRECISION=_precision(a.dtype), BM=BM, BQ=BQ, BR=rank_block(R),
        num_stages=stages,
    )
    return v
