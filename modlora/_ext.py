"""The optional C++ extension ``modlora._C`` and the op it provides: the "LoRA bank" linear.

    y[m] = x[m] W^T + b + (x[m] A_bank[p]^T) B_bank[p]^T,     p = row_pair[m]  (all 0 if None)

    x        [M, K]     float32 or bfloat16; y has x's dtype, accumulation is fp32
    weight   [N, K]     float32 or bfloat16
    bias     [N] or None
    A_bank   [P, R, K]  one stacked, zero-padded down-projection per adapter pair (or None)
    B_bank   [P, N, R]  the matching up-projections with every coefficient folded in
    row_pair [M] int64  which pair each row uses (or None)

Both merge strategies of DESIGN.md section 3 are this op after :func:`pack_bank`:

- ``output``: ``A_p = [A_in; A_out]``, ``B_p = [w_in s_in B_in | w_out s_out B_out]`` (rank r_in + r_out);
- ``ab``: ``A_p = A_m``, ``B_p = B_m`` from :func:`modlora.kernels.merge_ab` (rank r).

Without adapters (``A_bank = B_bank = None``) it is a plain small-M linear (the ``lm_head``).

The op is registered as ``torch.ops.modlora.lora_bank_linear`` with a fake implementation, so
``torch.compile`` can trace through it. Its CPU kernel is ``modlora._C`` when built (one pass over
W, vectorised, OpenMP over W's rows; see csrc/lora_bank_cpu.cpp), else a plain-torch version.
:func:`lora_bank_linear` is the public entry: it checks arguments and sends large M, autograd, and
non-CPU tensors to the torch path. ``MODLORA_DISABLE_C=1`` in the environment (read at import),
:func:`set_c_enabled` or ``impl="torch"`` force the torch path; ``MODLORA_CPU_ISA=avx2`` (or
``scalar``, ``avx512``, ``avx512_bf16``) picks the kernel's vector ISA for testing. With bf16 x and W,
``avx512_bf16`` (``vdpbf16ps``) treats bf16 subnormal inputs (|v| < 2^-126) as zero, as torch's own
oneDNN/AMX bf16 GEMMs do; the other ISAs widen them to fp32 exactly.
Both paths compute the same function; in bf16 they round differently (the C++ op once, at the end;
the torch path also rounds ``x W^T + b`` to bf16 before adding the LoRA part), and the tests bound
each against a float64 oracle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from modlora.kernels.reference import Adapter, Weight, check_strategy, merge_ab

log = logging.getLogger("modlora")

__all__ = ["HAVE_C", "C_MAX_ROWS", "c_enabled", "set_c_enabled", "pack_bank", "lora_bank_linear",
           "lora_bank_linear_torch"]

_DISABLED_BY_ENV = os.environ.get("MODLORA_DISABLE_C", "") not in ("", "0")
_C = None
if _DISABLED_BY_ENV:
    log.info("modlora._C disabled by MODLORA_DISABLE_C: lora_bank_linear uses the torch path")
else:
    try:
        from modlora import _C  # noqa: F811  (registers torch.ops.modlora.lora_bank_linear for CPU)
    except ImportError as exc:
        log.warning("modlora._C is not built (%s): lora_bank_linear uses the torch path; build it with "
                    "`pip install --no-build-isolation -e .`", exc)
HAVE_C: bool = _C is not None
"""Whether the C++ extension loaded (False when not built or disabled by MODLORA_DISABLE_C)."""

if HAVE_C and os.environ.get("MODLORA_CPU_ISA"):
    try:
        _C.set_isa(os.environ["MODLORA_CPU_ISA"])
    except RuntimeError as exc:  # a wrong value must not break `import modlora`
        log.warning("MODLORA_CPU_ISA ignored: %s", exc)

# Largest M (rows of x) for which the C++ kernel beats torch's F.linear + LoRA path, by W dtype;
# above it the wrapper uses torch (oneDNN/MKL GEMMs win once the op is compute-bound).
# Measured with benchmarks/cpu_linear.py on 2 AMD EPYC (Zen 3, AVX2) cores (gate/up, two adapters):
# _C was faster at every M up to 256 in bf16 (oneDNN's bf16 GEMM is slow without AVX-512 BF16) and
# up to 128 in fp32 (tie at 256). Kept below those crossovers, since CPUs with AVX-512 BF16 or AMX
# make torch's large-M GEMMs much faster; re-measure there.
C_MAX_ROWS: dict[torch.dtype, int] = {torch.bfloat16: 128, torch.float32: 64}

_use_c = HAVE_C


def c_enabled() -> bool:
    """Whether :func:`lora_bank_linear` may use the C++ kernel (built, and not switched off)."""
    return _use_c


def set_c_enabled(enabled: bool) -> None:
    """Switch the C++ kernel on or off for this process (on only takes effect if it is built)."""
    global _use_c
    _use_c = bool(enabled) and HAVE_C


# --------------------------------------------------------------------------------------------
# The torch path: the same function in plain torch ops (any device, any M, differentiable).
# --------------------------------------------------------------------------------------------
def lora_bank_linear_torch(x: Tensor, weight: Tensor, bias: Tensor | None, A_bank: Tensor | None,
                           B_bank: Tensor | None, row_pair: Tensor | None) -> Tensor:
    """Plain-torch ``lora_bank_linear`` on 2-D ``x``; result in x's dtype.

    ``x W^T + b`` runs in W's dtype when x has it (torch's GEMMs accumulate bf16 in fp32 and round
    the result to bf16), else in fp32; the LoRA part is computed in fp32, added to it in fp32, and
    the sum is cast to x's dtype.
    """
    if row_pair is not None and x.shape[0] and A_bank is not None:
        lo, hi = int(row_pair.min()), int(row_pair.max())
        if lo < 0 or hi >= A_bank.shape[0]:
            raise IndexError(f"lora_bank_linear: row_pair values must lie in [0, {A_bank.shape[0]}), "
                             f"got [{lo}, {hi}]")
    if x.dtype == weight.dtype:
        y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    else:
        y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if A_bank is None or A_bank.shape[1] == 0:
        return y.to(x.dtype)
    xf, y = x.float(), y.float()
    A, B = A_bank.float(), B_bank.float()
    if row_pair is None:
        return y.addmm_(xf @ A[0].t(), B[0].t()).to(x.dtype)
    for p in torch.unique(row_pair).tolist():
        rows = (row_pair == p).nonzero().squeeze(1)
        y.index_add_(0, rows, (xf[rows] @ A[p].t()) @ B[p].t())
    return y.to(x.dtype)


_FLOATS = (torch.float32, torch.bfloat16)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, A_bank: Tensor | None, B_bank: Tensor | None,
           row_pair: Tensor | None) -> None:
    """Clear errors for malformed arguments (``x`` already 2-D, ``row_pair`` per row).

    The range of ``row_pair`` is checked where it is read (C++ kernel, torch path): no sync here.
    """
    M, K = x.shape
    if x.dtype not in _FLOATS:
        raise TypeError(f"lora_bank_linear: x must be float32 or bfloat16, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_bank_linear: x has K={K} features but weight is {tuple(weight.shape)} "
                         f"(expected [N, {K}])")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"lora_bank_linear: weight must be float32 or bfloat16, got {weight.dtype}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_bank_linear: bias must be [N]=[{N}], got {tuple(bias.shape)}")
    if (A_bank is None) != (B_bank is None):
        raise ValueError("lora_bank_linear: A_bank and B_bank must both be given or both be None")
    if A_bank is not None:
        if A_bank.dim() != 3 or A_bank.shape[2] != K:
            raise ValueError(f"lora_bank_linear: A_bank must be [P, R, K={K}], got {tuple(A_bank.shape)}")
        P, R = A_bank.shape[:2]
        if tuple(B_bank.shape) != (P, N, R):
            raise ValueError(f"lora_bank_linear: B_bank must be [P, N, R]=[{P}, {N}, {R}], got "
                             f"{tuple(B_bank.shape)}")
        if A_bank.dtype not in _FLOATS or B_bank.dtype not in _FLOATS:
            raise TypeError(f"lora_bank_linear: A_bank and B_bank must be float32 or bfloat16, got "
                            f"{A_bank.dtype} and {B_bank.dtype}")
        if row_pair is None and P < 1:
            raise ValueError("lora_bank_linear: an empty bank (P=0) needs A_bank = B_bank = None")
        if row_pair is not None:
            if row_pair.dtype != torch.int64 or tuple(row_pair.shape) != (M,):
                raise ValueError(f"lora_bank_linear: row_pair must be int64 with one entry per row of x "
                                 f"([{M}]), got {row_pair.dtype} {tuple(row_pair.shape)}")
    elif row_pair is not None:
        raise ValueError("lora_bank_linear: row_pair given without an adapter bank")


# --------------------------------------------------------------------------------------------
# torch.library: the op, its fake (meta) implementation, and the torch path where _C is absent.
# --------------------------------------------------------------------------------------------
_SCHEMA = ("lora_bank_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? A_bank=None, "
           "Tensor? B_bank=None, Tensor? row_pair=None) -> Tensor")
_lib = torch.library.Library("modlora", "FRAGMENT")  # noqa: TOR901 (kept alive for the registrations)
if not HAVE_C:  # _C defines the schema and the CPU kernel itself when it loads
    _lib.define(_SCHEMA)
    _lib.impl("lora_bank_linear", lora_bank_linear_torch, "CPU")
_lib.impl("lora_bank_linear", lora_bank_linear_torch, "CUDA")  # no CUDA kernel yet: torch path


_OP = torch.ops.modlora.lora_bank_linear.default


@torch.library.register_fake("modlora::lora_bank_linear")
def _lora_bank_linear_fake(x, weight, bias=None, A_bank=None, B_bank=None, row_pair=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def lora_bank_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, A_bank: Tensor | None = None,
                     B_bank: Tensor | None = None, row_pair: Tensor | None = None, *,
                     impl: str = "auto") -> Tensor:
    """``y = x W^T + b + (x A_bank[p]^T) B_bank[p]^T``; see the module docstring.

    ``x`` may be ``[..., K]``; ``row_pair`` then has one entry per row of dim 0 (as in
    :func:`modlora.kernels.pairwise_lora_linear_ref`) or one per flattened row. ``impl``: ``"auto"``
    (C++ kernel for small M on CPU when built and enabled, else torch), ``"c"`` (C++ kernel, error
    if unavailable) or ``"torch"``.
    """
    if x.dim() != 2 or (row_pair is not None and row_pair.dtype != torch.int64):
        if x.dim() < 1:
            raise ValueError("lora_bank_linear: x must have a feature dimension")
        y = _lora_bank_linear_2d(x.reshape(-1, x.shape[-1]), weight, bias, A_bank, B_bank,
                                 _rows_of(x, row_pair), impl)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return _lora_bank_linear_2d(x, weight, bias, A_bank, B_bank, row_pair, impl)


def _rows_of(x: Tensor, row_pair: Tensor | None) -> Tensor | None:
    """row_pair per flattened row: int64, and expanded when it indexes dim 0 of a >2-D x."""
    if row_pair is None:
        return None
    if row_pair.dtype in (torch.int32, torch.int16, torch.uint8):
        row_pair = row_pair.long()
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dim() > 2 and row_pair.dim() == 1 and row_pair.shape[0] == x.shape[0] != M:
        row_pair = row_pair.repeat_interleave(M // x.shape[0])
    return row_pair


def _lora_bank_linear_2d(x, weight, bias, A_bank, B_bank, row_pair, impl):
    if impl == "auto":
        use_c = (_use_c and x.shape[0] <= C_MAX_ROWS.get(weight.dtype, 0) and x.device.type == "cpu"
                 and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or any(
                     t is not None and t.requires_grad for t in (bias, A_bank, B_bank)))))
    elif impl == "c":
        if not HAVE_C:
            raise RuntimeError("lora_bank_linear: impl='c' but modlora._C is not built or disabled")
        use_c = True
    elif impl == "torch":
        use_c = False
    else:
        raise ValueError(f"lora_bank_linear: impl must be 'auto', 'c' or 'torch', got {impl!r}")
    if use_c:
        try:  # the C++ op checks its arguments itself: no Python checks on the hot path
            return _OP(x, weight, bias, A_bank, B_bank, row_pair)
        except RuntimeError:
            _check(x, weight, bias, A_bank, B_bank, row_pair)  # the same problem as a Python error
            raise
    _check(x, weight, bias, A_bank, B_bank, row_pair)
    return lora_bank_linear_torch(x, weight, bias, A_bank, B_bank, row_pair)


def pack_bank(pairs: Sequence[tuple[Adapter | None, Adapter | None, Weight, Weight]],
              strategy: str = "output", dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor | None]:
    """Stack adapter pairs ``(lora_in, lora_out, w_in, w_out)`` into ``(A_bank [P,R,K], B_bank [P,N,R])``.

    Each adapter is ``(A [r, K], B [N, r], scale)`` or None. ``output``: ``A_p = [A_in; A_out]``,
    ``B_p = [w_in s_in B_in | w_out s_out B_out]``; ``ab``: ``(A_m, B_m) = merge_ab(...)``. Ranks
    are zero-padded to the largest R (zero rows/columns add exactly 0). Built in fp32, then cast to
    ``dtype``. Weights may be tensors (learned theta); the bank is a detached snapshot: rebuild it
    when weights change. Returns ``(None, None)`` when no pair has an adapter.
    """
    if not pairs:
        return None, None
    blocks: list[tuple[Tensor, Tensor] | None] = []
    shape = device = None
    for lora_in, lora_out, w_in, w_out in pairs:
        check_strategy(strategy, lora_in, lora_out)
        ads = [(_f32(a), float(w)) for a, w in ((lora_in, w_in), (lora_out, w_out)) if a is not None]
        if not ads:
            blocks.append(None)
            continue
        K, N = ads[0][0][0].shape[1], ads[0][0][1].shape[0]
        if shape is not None and shape != (K, N):
            raise ValueError(f"pack_bank: all adapters must share K and N, got {shape} and {(K, N)}")
        shape, device = (K, N), ads[0][0][0].device
        with torch.no_grad():
            if strategy == "ab":
                a_m, b_m = merge_ab(lora_in and _f32(lora_in), lora_out and _f32(lora_out), float(w_in),
                                    float(w_out))
                blocks.append((a_m, b_m))
            else:
                blocks.append((torch.cat([A for (A, _, _), _ in ads]),
                               torch.cat([B * (w * s) for (_, B, s), w in ads], dim=1)))
    if shape is None:
        return None, None
    K, N = shape
    R = max(a.shape[0] for blk in blocks if blk is not None for a in blk[:1])
    A_bank = torch.zeros(len(pairs), R, K, device=device)
    B_bank = torch.zeros(len(pairs), N, R, device=device)
    for p, blk in enumerate(blocks):
        if blk is not None:
            r = blk[0].shape[0]
            A_bank[p, :r] = blk[0]
            B_bank[p, :, :r] = blk[1]
    return A_bank.to(dtype), B_bank.to(dtype)


def _f32(adapter: Adapter) -> Adapter:
    A, B, scale = adapter
    return A.detach().float(), B.detach().float(), float(scale)
