"""The optional C++ extension ``modlora._C`` and the op it provides: the "LoRA bank" linear.

    y[m] = x[m] W^T + b + (x[m] A_bank[p]^T) B_bank[p]^T,     p = row_pair[m]  (all 0 if None)

    x        [M, K]     float32 or bfloat16; y has x's dtype, accumulation is fp32
    weight   [N, K]     float32 or bfloat16
    bias     [N] or None
    A_bank   [P, R, K]  one stacked, zero-padded pair per bank entry (or None)
    B_bank   [P, N, R]  the matching up-projections ([P, N, widest part's ranks] with rank_parts)
    row_pair [M] int64  which pair each row uses (or None)

Both merge strategies are this op after :func:`pack_bank` (each pair as one adapter of
coefficient 1, :func:`modlora.kernels.merge_pair`; see docs/design.md). Without adapters it is a
plain small-M linear (the ``lm_head``).

The op is registered as ``torch.ops.modlora.lora_bank_linear`` with a fake implementation, so
``torch.compile`` traces through it. Its CPU kernel is ``modlora._C`` when built (one pass over W,
vectorised, OpenMP over W's rows; csrc/lora_bank_cpu.cpp), else :func:`lora_bank_linear_torch`;
it has no autograd. This module runs the op; :mod:`modlora.ops` decides when to use it.
``MODLORA_DISABLE_C=1`` in the environment (read at import) leaves ``_C`` unloaded;
``MODLORA_CPU_ISA=avx2`` (or ``scalar``, ``avx512``, ``avx512_bf16``, ``amx``) sets the kernel's
ISA for calls that name none; ``isa=`` names one per call, ``prefetch=`` the cache level (``"l1"``,
the default, or ``"l2"``) the kernel prefetches the next block of W into while it reads one, and
``k_chunk=`` the elements of K it takes at a time (what :mod:`modlora.dispatch` chooses, all by
measurement).
``avx512_bf16`` and ``amx`` differ from ``avx512`` only for bf16 x and W: ``vdpbf16ps`` / AMX tiles
(``tdpbf16ps``, W read in place as the tiles' A operand, x repacked per call). Both treat bf16
subnormal inputs (|v| < 2^-126) as zero, as torch's own oneDNN/AMX bf16 GEMMs do; the other ISAs
widen them to fp32 exactly.
In bf16 the two kernels round differently (the C++ op once, at the end; the torch one also rounds
``x W^T + b`` and ``x A^T`` to bf16, as torch's GEMMs do); the tests bound each against a float64 oracle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modlora.kernels.reference import Adapter, Weight, as_fp32, merge_pair

log = logging.getLogger("modlora")

__all__ = ["HAVE_C", "c_enabled", "set_c_enabled", "pack_bank", "lora_bank_linear", "lora_bank_linear_torch",
           "c_serves", "decode_attention", "rms_norm", "topk", "BoundSites"]

_C = None
if os.environ.get("MODLORA_DISABLE_C", "") not in ("", "0"):
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

_use_c = HAVE_C


def c_enabled() -> bool:
    """Whether :mod:`modlora.ops` may send work to the C++ kernel (built, and not switched off)."""
    return _use_c


def set_c_enabled(enabled: bool) -> None:
    """Switch the C++ kernel on or off for this process (on only takes effect if it is built)."""
    global _use_c
    _use_c = bool(enabled) and HAVE_C


def lora_bank_linear_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, A_bank: Tensor | None = None,
                           B_bank: Tensor | None = None, row_pair: Tensor | None = None,
                           isa: str | None = None, rank_parts: Tensor | None = None,
                           prefetch: str | None = None, k_chunk: int | None = None) -> Tensor:
    """The op in plain torch (any device, any M, differentiable): the registered op's kernel where
    ``_C`` is absent, and :mod:`modlora.ops`' torch path for inference with adapters. ``x`` and
    ``row_pair`` as in :func:`lora_bank_linear`; result in x's dtype. ``isa``, ``prefetch`` and
    ``k_chunk`` (the C++ kernel's) are ignored; with ``rank_parts`` each part's B rows are placed at
    its ranks of a block-diagonal ``[P, N, R]`` B.

    ``x W^T + b`` runs in W's dtype when x has it, else in fp32; the LoRA part ``(x A^T) B^T``, added
    to it by one GEMM, runs in that dtype too when both banks have it, else in fp32. Torch's bf16
    GEMMs accumulate in fp32 and round each result to bf16 (``x W^T + b``, ``x A^T``, then the sum;
    with ``row_pair`` also ``(x A^T) B^T`` before it is added, by ``index_add_``).

    Raises:
        IndexError: a ``row_pair`` entry outside ``[0, P)``.
    """
    x2, rows = _as_rows(x), _rows_of(x, row_pair)
    if rows is not None and x2.shape[0] and A_bank is not None:
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= A_bank.shape[0]:
            raise IndexError(f"lora_bank_linear: row_pair values must lie in [0, {A_bank.shape[0]}), "
                             f"got [{lo}, {hi}]")
    base = x.dtype if x.dtype == weight.dtype else torch.float32
    y = torch.nn.functional.linear(x2.to(base), weight.to(base), None if bias is None else bias.to(base))
    if A_bank is None or A_bank.shape[1] == 0:
        return _shaped_as(y.to(x.dtype), x)
    dtype = base if A_bank.dtype == B_bank.dtype == base else torch.float32
    xs, y = x2.to(dtype), y.to(dtype)
    A, B = A_bank.to(dtype), _block_diagonal(B_bank.to(dtype), rank_parts, A_bank.shape[1])
    if rows is None:
        return _shaped_as(y.addmm_(xs @ A[0].t(), B[0].t()).to(x.dtype), x)
    for p in torch.unique(rows).tolist():
        at = (rows == p).nonzero().squeeze(1)
        y.index_add_(0, at, (xs[at] @ A[p].t()) @ B[p].t())
    return _shaped_as(y.to(x.dtype), x)


def _block_diagonal(B_bank: Tensor, rank_parts: Tensor | None, R: int) -> Tensor:
    """B_bank as [P, N, R]: as it is without ``rank_parts``; with them, each part's rows
    ``[previous n_end, n_end)`` hold their first ``r_hi - r_lo`` entries at ranks ``[r_lo, r_hi)``."""
    if rank_parts is None:
        return B_bank
    P, N, width = B_bank.shape
    _check_parts(rank_parts, N, R, width)
    full, n0 = B_bank.new_zeros(P, N, R), 0
    for n_end, r_lo, r_hi in rank_parts.tolist():
        full[:, n0:n_end, r_lo:r_hi] = B_bank[:, n0:n_end, :r_hi - r_lo]
        n0 = n_end
    return full


_FLOATS = (torch.float32, torch.bfloat16)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, A_bank: Tensor | None, B_bank: Tensor | None,
           row_pair: Tensor | None, rank_parts: Tensor | None = None) -> None:
    """Clear errors for malformed arguments (``x`` already 2-D, ``row_pair`` per row): run before the
    torch kernel, and after the C++ kernel (which checks every argument) refused them.

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
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"lora_bank_linear: bias must be a floating-point tensor, got {bias.dtype}")
    if (A_bank is None) != (B_bank is None):
        raise ValueError("lora_bank_linear: A_bank and B_bank must both be given or both be None")
    if A_bank is None:
        if row_pair is not None or rank_parts is not None:
            raise ValueError("lora_bank_linear: row_pair or rank_parts given without an adapter bank")
        return
    if A_bank.dim() != 3 or A_bank.shape[2] != K:
        raise ValueError(f"lora_bank_linear: A_bank must be [P, R, K={K}], got {tuple(A_bank.shape)}")
    P, R = A_bank.shape[:2]
    if B_bank.dim() != 3 or tuple(B_bank.shape[:2]) != (P, N) or (rank_parts is None and B_bank.shape[2] != R):
        raise ValueError(f"lora_bank_linear: B_bank must be [P, N, R]=[{P}, {N}, {R}] ([P, N, widest part's ranks] "
                         f"with rank_parts), got {tuple(B_bank.shape)}")
    if A_bank.dtype not in _FLOATS or B_bank.dtype not in _FLOATS:
        raise TypeError(f"lora_bank_linear: A_bank and B_bank must be float32 or bfloat16, got "
                        f"{A_bank.dtype} and {B_bank.dtype}")
    if row_pair is None and P < 1:
        raise ValueError("lora_bank_linear: an empty bank (P=0) needs A_bank = B_bank = None")
    if row_pair is not None and (row_pair.dtype != torch.int64 or tuple(row_pair.shape) != (M,)):
        raise ValueError(f"lora_bank_linear: row_pair must be int64 with one entry per row of x "
                         f"([{M}]), got {row_pair.dtype} {tuple(row_pair.shape)}")


def _check_parts(rank_parts: Tensor, N: int, R: int, width: int) -> None:
    """The torch kernel's check of ``rank_parts`` against B_bank's last dim ``width`` (the C++
    kernel makes the same one)."""
    if rank_parts.dtype != torch.int64 or rank_parts.dim() != 2 or rank_parts.shape[1] != 3 or not len(rank_parts):
        raise ValueError(f"lora_bank_linear: rank_parts must be int64 [Q, 3] (n_end, r_lo, r_hi), got "
                         f"{rank_parts.dtype} {tuple(rank_parts.shape)}")
    prev, rows = 0, rank_parts.tolist()
    for n_end, r_lo, r_hi in rows:
        if not prev < n_end <= N or not 0 <= r_lo <= r_hi <= R:
            raise ValueError(f"lora_bank_linear: rank_parts row ({n_end}, {r_lo}, {r_hi}) must have n_end in "
                             f"({prev}, {N}] and 0 <= r_lo <= r_hi <= R = {R}")
        prev = n_end
    if prev != N:
        raise ValueError(f"lora_bank_linear: rank_parts must end at N = {N}, got {prev}")
    widest = max(r_hi - r_lo for _, r_lo, r_hi in rows)
    if width != widest:
        raise ValueError(f"lora_bank_linear: with rank_parts B_bank must be [P, N, {widest}] (the widest part's "
                         f"ranks), got last dim {width}")


# torch.library: the op, its fake (meta) implementation, and the torch kernel where _C is absent.
_SCHEMA = ("lora_bank_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? A_bank=None, "
           "Tensor? B_bank=None, Tensor? row_pair=None, str? isa=None, Tensor? rank_parts=None, "
           "str? prefetch=None, int? k_chunk=None) -> Tensor")
_lib = torch.library.Library("modlora", "FRAGMENT")  # noqa: TOR901 (kept alive for the registrations)
if not HAVE_C:  # _C defines the schema and the CPU kernel itself when it loads
    _lib.define(_SCHEMA)
    _lib.impl("lora_bank_linear", lora_bank_linear_torch, "CPU")
# lora_bank_linear has no CUDA kernel: CUDA tensors take the torch path (the CUDA decode op is a
# separate op, modlora::lora_decode; see modlora/cuda_decode.py).
_lib.impl("lora_bank_linear", lora_bank_linear_torch, "CUDA")
_OP = torch.ops.modlora.lora_bank_linear.default


def _one_device(op: str, *tensors: Tensor | None) -> None:
    """The fakes' device check. A call whose tensors mix the CPU and the meta device dispatches to
    the fake (meta outranks the CPU), which would return an uninitialised CPU tensor."""
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1,
                 lambda: f"{op}: every tensor must be on one device, got {sorted(map(str, devices))}")


@torch.library.register_fake("modlora::lora_bank_linear")
def _lora_bank_linear_fake(x, weight, bias=None, A_bank=None, B_bank=None, row_pair=None, isa=None, rank_parts=None,
                           prefetch=None, k_chunk=None):
    _one_device("lora_bank_linear", x, weight, bias, A_bank, B_bank, row_pair, rank_parts)
    return x.new_empty((x.shape[0], weight.shape[0]))


def lora_bank_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, A_bank: Tensor | None = None,
                     B_bank: Tensor | None = None, row_pair: Tensor | None = None, isa: str | None = None,
                     rank_parts: Tensor | None = None, prefetch: str | None = None,
                     k_chunk: int | None = None) -> Tensor:
    """``y = x W^T + b + (x A_bank[p]^T) B_bank[p]^T`` by the registered op; see the module docstring.

    Args:
        x: ``[..., K]``; rows are its leading dimensions flattened.
        row_pair: one integer per flattened row, or one per entry of dim 0 of a >2-D ``x`` (as in
            :func:`modlora.kernels.pairwise_lora_linear_ref`).
        isa: the C++ kernel's ISA for this call (one of ``_C.supported_isas()``); None: the one set
            by ``_C.set_isa`` / ``MODLORA_CPU_ISA`` (default: the best).
        rank_parts: int64 ``[Q, 3]`` rows ``(n_end, r_lo, r_hi)``, or None: output columns
            ``[previous n_end, n_end)`` read only ranks ``[r_lo, r_hi)`` of ``x A_bank[p]^T``,
            against the first ``r_hi - r_lo`` entries of their ``B_bank`` rows; ``B_bank`` is then
            ``[P, N, widest part's ranks]`` (a grouped call's block-diagonal B without its zeros).
        prefetch: ``"l1"`` (None) or ``"l2"``: where the C++ kernel prefetches the next block of W
            (the same result either way; only the speed differs, by CPU, K and rows).
        k_chunk: the C++ kernel takes K this many elements at a time, keeping each output's sum
            between chunks, so that a chunk of x stays in L1 while W streams (None or 0: all of
            K; the sum's order changes, so the result may differ in the last bits). A speed hint,
            as ``prefetch`` is: the tile (AMX) kernel reads whole rows and ignores it.

    Returns:
        ``[..., N]`` in x's dtype. Not differentiable: autograd goes through the torch path of
        :mod:`modlora.ops`.

    Raises:
        ValueError, TypeError: malformed shapes or dtypes, named.
        RuntimeError (C++ kernel) or IndexError (torch kernel): a ``row_pair`` entry outside ``[0, P)``,
            or an ``isa`` unknown or not on this CPU; RuntimeError (C++) or ValueError (torch):
            ``rank_parts`` not rising to N, ranks outside ``[0, R]`` or ``B_bank`` not as wide as
            the widest part; ValueError: ``prefetch``
            neither ``"l1"`` nor ``"l2"``, or ``k_chunk`` negative.
    """
    if x.dim() < 1:
        raise ValueError("lora_bank_linear: x must have a feature dimension")
    x2 = _as_rows(x)
    rows = _rows_of(x, row_pair)
    if prefetch not in (None, "l1", "l2"):
        raise ValueError(f"lora_bank_linear: prefetch must be 'l1' or 'l2', got {prefetch!r}")
    if k_chunk is not None and k_chunk < 0:
        raise ValueError(f"lora_bank_linear: k_chunk must be >= 0 (0 or None: all of K), got {k_chunk}")
    checked = (x2, weight, bias, A_bank, B_bank, rows, rank_parts)
    if not (HAVE_C and x2.is_cpu):  # the torch kernel takes some malformed arguments (F.linear broadcasts a bias)
        _check(*checked)
    args = (weight, bias, A_bank, B_bank, rows, isa, rank_parts, prefetch, k_chunk)
    try:
        y = _OP(x2, *args)
    except RuntimeError:
        try:
            _check(*checked)  # the C++ kernel checks every argument: a malformed one is named here
        except (ValueError, TypeError) as named:
            raise named from None  # the name alone, no C++ trace behind it
        raise
    calls = _recording.calls
    if calls is not None:
        calls.append((x2, y, args))
    return _shaped_as(y, x)


def _as_rows(x: Tensor) -> Tensor:
    """x [..., K] as [rows, K]; the decode path's 2-D x as it is (a reshape costs a few us on a slow core)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 fails at K = 0


def _shaped_as(y: Tensor, x: Tensor) -> Tensor:
    """The op's output [rows, N] for x [..., K] as [..., N]."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


class _Recording(threading.local):
    """lora_bank_linear's calls (x, y, other arguments) in this thread while a BoundSites records;
    None otherwise (a class default: a missing thread-local attribute would raise and catch on every call)."""

    calls: list | None = None


_recording = _Recording()


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Op calls made inside stay out of a BoundSites record (dispatch's calibration runs the op on
    inputs of its own while a site records)."""
    calls, _recording.calls = _recording.calls, None
    try:
        yield
    finally:
        _recording.calls = calls


class BoundSites:
    """Runs the linear sites of decode steps (``site(fn, x)``: ``fn(x)``, ``fn`` a linear or a group
    of them; :meth:`modlora.model.Qwen2ForCausalLM.decode_step`), each, from its second run on, as
    the op calls its first run made, the arguments bound: the Python between a layer and the op
    (adapter bindings, dispatch, bank lookup, checks) runs once per site, not once per step.

    For one generation only: what the first run decided (the path, the ISA, the adapter bank, the
    rows' pairs, a group run as one call or as one per part) holds while the model, its adapters and
    the dispatch choices do not change. A site whose first run was not op calls on its own input
    whose outputs, or their column blocks, it returned in call order (the torch path, CUDA, an output
    computed from them), keeps running ``fn``.
    """

    def __init__(self) -> None:
        self._bound: dict[object, object] = {}

    @property
    def bound(self) -> int:
        """How many sites run as bound op calls."""
        return sum(1 for run in self._bound.values() if isinstance(run, _BoundCalls))

    def __call__(self, fn, x: Tensor):
        run = self._bound.get(fn)
        if run is not None:
            return run(x)
        _recording.calls = calls = []
        try:
            out = fn(x)
        finally:
            _recording.calls = None
        self._bound[fn] = _BoundCalls.of(calls, x, out) or fn
        return out


class _BoundCalls:
    """The lora_bank_linear calls of a site's first run, replayed on a new x of the same shape."""

    def __init__(self, args: list[tuple], widths: list[list[int] | None], single: bool) -> None:
        self.args, self.widths, self.single = args, widths, single

    @classmethod
    def of(cls, calls: list, x: Tensor, out) -> _BoundCalls | None:
        """The calls ``calls`` hold if each was on ``x`` and ``out`` is their one output (a tensor)
        or all their outputs' column blocks in call order (a list); else None."""
        if not calls or any(x2.data_ptr() != x.data_ptr() or x2.numel() != x.numel() for x2, _, _ in calls):
            return None
        blocks = iter([out] if isinstance(out, Tensor) else list(out))
        widths = []
        for _, y, _ in calls:
            call_widths = _column_blocks(y, blocks)
            if call_widths is None:
                return None
            widths.append(None if len(call_widths) == 1 else call_widths)
        if next(blocks, None) is not None:
            return None
        return cls([args for _, _, args in calls], widths, isinstance(out, Tensor))

    def __call__(self, x: Tensor):
        x2 = _as_rows(x)
        out = []
        for args, widths in zip(self.args, self.widths, strict=True):
            y = _shaped_as(_OP(x2, *args), x)
            out += [y] if widths is None else y.split(widths, dim=-1)
        return out[0] if self.single else out


def _column_blocks(y: Tensor, blocks) -> list[int] | None:
    """The widths of the next blocks (taken from the iterator ``blocks``) if they are views of ``y``'s
    columns, left to right, that cover it; else None."""
    widths, offset = [], 0
    while offset < y.shape[1]:
        b = next(blocks, None)
        if not isinstance(b, Tensor) or not 0 < b.shape[-1] <= y.shape[1] - offset:
            return None
        view = y[:, offset:offset + b.shape[-1]]
        if b.numel() != view.numel():
            return None
        view = view.reshape(b.shape)
        if b.data_ptr() != view.data_ptr() or b.stride() != view.stride():
            return None
        widths.append(b.shape[-1])
        offset += b.shape[-1]
    return widths


if HAVE_C:  # fake (meta) implementations of _C's inference ops: shapes only, for torch.compile and opcheck
    @torch.library.register_fake("modlora::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        _one_device("rms_norm", x, weight)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("modlora::decode_attention")
    def _decode_attention_fake(q, k, v, cos, sin, prompt_k, prompt_v, prompt_mask, gen_k, gen_v, step, num_beams):
        _one_device("decode_attention", q, k, v, cos, sin, prompt_k, prompt_v, prompt_mask, gen_k, gen_v)
        return q.new_empty(q.shape)

    @torch.library.register_fake("modlora::topk")
    def _topk_fake(values, k):
        torch._check(0 <= k <= values.shape[-1], lambda: f"topk: k must be in [0, {values.shape[-1]}], got {k}")
        shape = (*values.shape[:-1], k)
        return values.new_empty(shape), values.new_empty(shape, dtype=torch.long)


def c_serves(x: Tensor, other: Tensor) -> bool:
    """Whether the C++ inference ops (:func:`decode_attention`, :func:`rms_norm`) serve ``x`` with
    ``other`` (the cache, the weight): ``_C`` built and enabled, CPU, both float32 or both bfloat16,
    and no autograd graph to record (these ops have none)."""
    return (_use_c and x.device.type == "cpu" and x.dtype in _FLOATS and x.dtype == other.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or other.requires_grad)))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype)`` in one C++ call (csrc/rms_norm_cpu.cpp):
    HF's Qwen2 RMSNorm, fp32 statistics, rounded where it rounds. Only where :func:`c_serves` holds."""
    return torch.ops.modlora.rms_norm(x, weight, eps)


def topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(values, k)`` along the last dim (largest, sorted): the same values and indices,
    ties in the same order. For a dense float32 CPU tensor without autograd, with ``_C`` built and
    enabled, one C++ call (csrc/topk_cpu.cpp) that runs torch's own heap selection without its copy
    of every element (docs/design.md, "The beam search's top-k"); elsewhere ``torch.topk``."""
    if (_use_c and values.is_cpu and values.dtype == torch.float32 and values.dim() > 0
            and values.layout == torch.strided and not (values.requires_grad and torch.is_grad_enabled())):
        return torch.ops.modlora.topk(values, k)
    found = torch.topk(values, k)
    return found.values, found.indices


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, prompt_k: Tensor,
                     prompt_v: Tensor, prompt_mask: Tensor, gen_k: Tensor, gen_v: Tensor, step: int,
                     num_beams: int) -> Tensor:
    """One decode step of one layer's attention in one C++ call (csrc/decode_attention.h).

    Rows are ``B * num_beams`` (sentence-major), one new token each. q ``[rows, H*D]`` and k, v
    ``[rows, Hkv*D]`` are the projections before RoPE; cos, sin ``[rows, D]``; prompt_k/v
    ``[B, Hkv, P, D]`` and prompt_mask ``[B, P]`` (False on padding) are shared by a sentence's
    beams; gen_k/v ``[rows, Hkv, T, D]`` receive the rotated k and v at ``step``, and each row attends
    to its positions ``0..step``. Math in fp32; the cache and the result ``[rows, H*D]`` in q's dtype.
    Only where :func:`c_serves` holds.

    Raises:
        RuntimeError: shapes, dtypes or layouts that do not fit together, named.
    """
    return torch.ops.modlora.decode_attention(q, k, v, cos, sin, prompt_k, prompt_v, prompt_mask, gen_k, gen_v,
                                              step, num_beams)


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


def pack_bank(pairs: Sequence[tuple[Adapter | None, Adapter | None, Weight, Weight]],
              strategy: str = "output", dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor | None]:
    """Stack adapter pairs ``(lora_in, lora_out, w_in, w_out)`` into ``(A_bank [P,R,K], B_bank [P,N,R])``.

    Each adapter is ``(A [r, K], B [N, r], scale)`` or None; pair p becomes
    :func:`~modlora.kernels.merge_pair` of it, in fp32. Ranks are zero-padded to the largest R
    (zero rows/columns add exactly 0), then the bank is cast to ``dtype``. Weights may be tensors
    (learned theta); the bank is a detached snapshot: rebuild it when weights change.

    Returns:
        The two banks, or ``(None, None)`` when no pair has an adapter.

    Raises:
        ValueError: an unknown strategy, unequal ranks under ``ab``, or adapters of different K or N.
    """
    blocks: list[tuple[Tensor, Tensor] | None] = []
    with torch.no_grad():
        for lora_in, lora_out, w_in, w_out in pairs:
            a_in, a_out = (None if a is None else as_fp32((a[0].detach(), a[1].detach(), a[2]))
                           for a in (lora_in, lora_out))
            blocks.append(None if a_in is None and a_out is None
                          else merge_pair(a_in, a_out, float(w_in), float(w_out), strategy))
    present = [blk for blk in blocks if blk is not None]
    if not present:
        return None, None
    shapes = {(A.shape[1], B.shape[0]) for A, B in present}
    if len(shapes) > 1:
        raise ValueError(f"pack_bank: all adapters must share K and N, got {sorted(shapes)}")
    (K, N), R, device = shapes.pop(), max(A.shape[0] for A, _ in present), present[0][0].device
    A_bank = torch.zeros(len(pairs), R, K, device=device)
    B_bank = torch.zeros(len(pairs), N, R, device=device)
    for p, blk in enumerate(blocks):
        if blk is not None:
            r = blk[0].shape[0]
            A_bank[p, :r], B_bank[p, :, :r] = blk
    return A_bank.to(dtype), B_bank.to(dtype)
