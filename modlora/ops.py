"""Where a linear's math runs: the one place that picks a backend (docs/design.md, "Backends").

- CUDA with adapters: the fused Triton kernels (``modlora.kernels.dual_lora_linear``, forward and
  backward; ``modlora.kernels.pairwise_lora_linear`` for per-row pairs, forward), for a total rank
  up to ``modlora.kernels.configs.MAX_RANK`` a pair (:func:`_triton_takes`);
- CPU inference: the C++ op of :mod:`modlora.cpu` (one pass over W at memory bandwidth, adapters
  packed once per (pair, weights) into its bank layout) or torch, whichever :mod:`modlora.dispatch`
  measured faster for the case (op kind, shape, dtype, number of rows; :func:`_cpu_path`); linears
  that read the same x and whose weights are adjacent in memory (q/k/v, gate/up) as one C++ call
  (:func:`grouped_linear`);
- inference by torch (dispatch's ``"torch"``, CUDA without Triton): its GEMMs, with adapters on
  the bank the C++ op takes (:func:`_adapted`); in fp32 for bf16 on CPUs without bf16
  arithmetic (see :func:`_emulated_bf16`);
- autograd, or autocast on x's device: the plain-torch reference (``modlora.kernels.reference``),
  which is also the oracle every backend is tested against (autocast casts each of its GEMMs).

Adapter banks are cached per adapter tensors and their in-place version counters. A write that
bypasses the counter (through ``.data``, or a fused optimizer step) leaves a stale bank: call
:func:`clear_banks` after one.

Callers (the linear layers, the adapter bindings) never pick a backend themselves.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain

import torch
from torch import Tensor

from . import cpu, dispatch, kernels
from .kernels import configs
from .kernels.reference import (
    Adapter,
    Weight,
    check_strategy,
    check_weight,
    dual_lora_linear_ref,
    lora_delta_ref,
    pair_rank,
    pairwise_lora_linear_ref,
)

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[Adapter | None]):
    """Apply CUDA autocast by hand: the Triton op takes one dtype, as F.linear does under autocast."""
    if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
        return x, weight, bias, adapters
    dt = torch.get_autocast_dtype("cuda")
    cast = lambda a: None if a is None else (a[0].to(dt), a[1].to(dt), a[2])
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), [cast(a) for a in adapters]


def _triton_takes(pairs: Sequence[tuple], strategy: str) -> bool:
    """Whether the Triton kernels run these pairs: Triton is installed, a pair has adapters, and no
    pair's total rank is wider than the kernels are compiled and checked for (``configs.MAX_RANK``;
    wider pairs run torch's GEMMs)."""
    ranks = [pair_rank(p[0], p[1], strategy) for p in pairs]
    return _HAVE_TRITON and max(ranks, default=0) > 0 and max(ranks) <= configs.MAX_RANK


def _cpu_path(kind: str, x: Tensor, weight: Tensor, run: dispatch.Run,
              tensors: Iterable[Tensor | float | None] = ()) -> str:
    """``"torch"``, or the C++ op (``"c"``: at the ISA set; ``"c:<isa>[:l2]"``): C only on CPU, when
    built and enabled, with no autograd graph to build (it has no backward) and no autocast (which
    casts torch's GEMMs, not the op's), and where :func:`dispatch.choose` measured it faster.
    ``tensors``, the call's other inputs, are read only when autograd is on (a generator costs
    nothing in inference)."""
    if not (x.is_cpu and cpu.c_enabled()) or torch.is_autocast_enabled("cpu"):
        return "torch"
    if _builds_graph(chain((x, weight), tensors)):
        return "torch"
    return dispatch.choose(kind, x, weight, run)


def _builds_graph(tensors: Iterable[Tensor | float | None]) -> bool:
    """Whether autograd would record the op; ``tensors`` is iterated only when autograd is on."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _needs_reference(x: Tensor, tensors: Iterable[Tensor | float | None]) -> bool:
    """Whether torch's path runs the reference rather than the packed bank: autograd would record
    the op, or autocast is on for x's device (it casts each GEMM of the reference; the bank's
    in-place update would meet a GEMM it cast)."""
    return _builds_graph(chain((x,), tensors)) or torch.is_autocast_enabled(x.device.type)


def _emulated_bf16(x: Tensor, weight: Tensor, tensors: Iterable[Tensor | float | None] = ()) -> bool:
    """bf16 inference on a CPU without bf16 arithmetic (no AVX-512 BF16, no AMX). There oneDNN
    emulates the bf16 GEMM 3-9x slower than converting W to fp32 and running the fp32 GEMM (2 Zen 3
    cores, M from 129 to 800); both accumulate in fp32 and round the result to bf16 once.
    Only where no autograd graph is recorded (``tensors``: the call's other inputs, read only when
    autograd is on), as dispatch calibrates it: in training the fp32 copy of W would be kept for
    the backward pass."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and not dispatch.NATIVE_BF16
            and not _builds_graph(chain((x, weight), tensors)))


def _check_args(x: Tensor, weight: Tensor, bias: Tensor | None, pairs: Sequence[tuple] = (),
                row_pair: Tensor | None = None, strategy: str = "output") -> None:
    """The shapes, weights and pair indices every path relies on, checked before one is chosen: the
    C++ op checks its own, but torch's GEMMs broadcast some mismatches (a bias [1], an adapter's
    B [1, r]) silently. Pair indices are checked here only on the CPU (elsewhere reading them would
    wait for the device; the Triton kernel checks them itself)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., {K}] for weight [{N}, {K}], got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}] for weight [{N}, {K}], got shape {tuple(bias.shape)}")
    for i, pair in enumerate(pairs):
        if len(pair) != 4:
            raise ValueError(f"pair {i} must be (lora_in, lora_out, w_in, w_out), got {len(pair)} entries")
        for name, a in zip(("lora_in", "lora_out"), pair[:2], strict=True):
            if a is None:
                continue
            A, B = a[:2] if len(a) == 3 else (None, None)
            if A is None or A.dim() != 2 or B.dim() != 2 or A.shape[1] != K or B.shape != (N, A.shape[0]):
                got = f"{len(a)} entries" if A is None else f"A {tuple(A.shape)}, B {tuple(B.shape)}"
                raise ValueError(f"pair {i} {name} must be (A [r, {K}], B [{N}, r], scale), got {got}")
        check_weight(pair[2], "w_in", strategy)
        check_weight(pair[3], "w_out", strategy)
    if row_pair is not None and (row_pair.dim() != 1 or row_pair.is_floating_point() or row_pair.dtype == torch.bool
                                 or row_pair.shape[0] != x.shape[0]):
        raise ValueError(f"row_pair must be a 1-D integer tensor with one entry per row of x ({x.shape[0]}), got "
                         f"{row_pair.dtype} {tuple(row_pair.shape)}")
    if row_pair is not None and row_pair.is_cpu and row_pair.numel():
        lo, hi = (int(v) for v in torch.aminmax(row_pair))
        if lo < 0 or hi >= len(pairs):
            raise IndexError(f"row_pair values must lie in [0, {len(pairs)}), got {lo}..{hi}")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W^T + b`` (the un-adapted linears and the ``lm_head``)."""
    _check_args(x, weight, bias)
    run = lambda path, x: _linear(path, x, weight, bias)
    return run(_cpu_path("linear", x, weight, run, (bias,)), x)


def _linear(path: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if path != "torch":
        return cpu.lora_bank_linear(x, weight, bias, **dispatch.c_options(path))
    if _emulated_bf16(x, weight, (bias,)):
        return linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


@functools.lru_cache(maxsize=1024)  # one entry per adapted linear and pair set: ~170 per pair
def _bank(pairs: tuple, strategy: str, dtype: torch.dtype, versions: tuple) -> tuple[Tensor, Tensor]:
    """Packed bank of frozen adapters; tensors hash by identity and ``versions`` (their in-place
    version counters) invalidates an entry if one was modified in place."""
    return cpu.pack_bank(pairs, strategy, dtype)


def _pairs_key(pairs: Sequence[tuple]) -> tuple[tuple, tuple]:
    """The pairs as a cache key (weights as floats) and their adapter tensors' in-place version counters."""
    key, versions = [], []
    for a_in, a_out, w_in, w_out in pairs:  # plain loops: this runs on every adapted call
        key.append((a_in, a_out, float(w_in), float(w_out)))
        for a in (a_in, a_out):
            if a is not None:
                versions += (_version(a[0]), _version(a[1]))
    return tuple(key), tuple(versions)


def _version(t: Tensor) -> int:
    """t's in-place version counter; -1 for an inference tensor, which has none (it can be written
    in place only inside ``torch.inference_mode``)."""
    return -1 if t.is_inference() else t._version


def clear_banks() -> None:
    """Forget every cached adapter bank: needed only after an in-place write to an adapter that its
    version counter does not see (through ``.data``, a fused optimizer step, an inference tensor
    written inside ``torch.inference_mode``)."""
    _bank.cache_clear()
    _group_bank.cache_clear()


def _packed(pairs: Sequence[tuple], strategy: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    key, versions = _pairs_key(pairs)
    return _bank(key, strategy, dtype, versions)


def _adapter_tensors(*adapters: Adapter | None) -> Iterator[Tensor]:
    return (t for a in adapters if a is not None for t in a[:2])


def _pair_inputs(pairs: Iterable[tuple]) -> Iterator[Tensor | float]:
    """The adapter tensors and weights of ``(lora_in, lora_out, w_in, w_out)`` pairs."""
    return (t for p in pairs for t in (*_adapter_tensors(*p[:2]), *p[2:]))


def dual_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
                     lora_out: Adapter | None, w_in: Weight = 1.0, w_out: Weight = 1.0,
                     strategy: str = "output", dropout: tuple[float, float] | None = None) -> Tensor:
    """``x W^T + b`` plus one or two adapters merged by ``strategy`` (docs/design.md, eq. 3 and 4).

    Args:
        x: [..., K]; weight [N, K]; bias [N] or None.
        lora_in, lora_out: ``(A [r, K], B [N, r], scale)`` or None.
        w_in, w_out: floats or 0-dim tensors (which may require grad: learned weights).
        dropout: LoRA dropout probabilities ``(p_in, p_out)`` to apply (training), as PEFT does.

    Returns:
        y [..., N] in x's dtype.

    Raises:
        ValueError: shapes that do not fit (x, weight, bias, each adapter's A and B), a weight that
            is not a finite number (>= 0 under ``ab``) or a 0-dim tensor, an unknown strategy, or
            adapters ``ab`` cannot merge (unequal ranks or shapes).
    """
    _check_args(x, weight, bias, [(lora_in, lora_out, w_in, w_out)], strategy=strategy)
    if dropout is not None and any(dropout):
        return linear(x, weight, bias) + _dropped_lora_delta(x, lora_in, lora_out, w_in, w_out, strategy, dropout)
    if x.is_cuda and _triton_takes([(lora_in, lora_out)], strategy):
        x, weight, bias, (lora_in, lora_out) = _autocast(x, weight, bias, (lora_in, lora_out))
        return kernels.dual_lora_linear(x, weight, bias, lora_in, lora_out, w_in, w_out, strategy)
    run = lambda path, x: _dual(path, x, weight, bias, lora_in, lora_out, w_in, w_out, strategy)
    return run(_cpu_path("lora", x, weight, run, chain((bias,), _pair_inputs([(lora_in, lora_out, w_in, w_out)]))), x)


def _dual(path: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_in: Adapter | None,
          lora_out: Adapter | None, w_in: Weight, w_out: Weight, strategy: str) -> Tensor:
    return _adapted(path, x, weight, bias, [(lora_in, lora_out, w_in, w_out)], strategy, None)


def _adapted(path: str, x: Tensor, weight: Tensor, bias: Tensor | None, pairs: Sequence[tuple], strategy: str,
             row_pair: Tensor | None) -> Tensor:
    """The linear with ``pairs`` (one for every row where ``row_pair`` is None) by ``path``: the C++
    op on the packed bank (:func:`_packed`: one adapter a pair); the reference where autograd or
    autocast needs it; else torch's GEMMs on that bank, so the LoRA part is two GEMMs, not two an
    adapter: ``y = x W^T + b``, then ``y += (x A^T) B^T`` in place, x and W in fp32 for bf16 on
    CPUs without bf16 arithmetic (:func:`_emulated_bf16`), rounded to bf16 once."""
    if path == "torch" and _needs_reference(x, chain((weight, bias), _pair_inputs(pairs))):
        if row_pair is None:
            return dual_lora_linear_ref(x, weight, bias, *pairs[0], strategy)
        return pairwise_lora_linear_ref(x, weight, bias, pairs, row_pair, strategy)
    A_bank, B_bank = _packed(pairs, strategy, x.dtype)
    if path != "torch":
        return cpu.lora_bank_linear(x, weight, bias, A_bank, B_bank, None if A_bank is None else row_pair,
                                    **dispatch.c_options(path))
    if _emulated_bf16(x, weight):
        return cpu.lora_bank_linear_torch(x.float(), weight.float(), None if bias is None else bias.float(),
                                          A_bank, B_bank, row_pair).to(x.dtype)
    return cpu.lora_bank_linear_torch(x, weight, bias, A_bank, B_bank, row_pair)


def _dropped_lora_delta(x: Tensor, lora_in: Adapter | None, lora_out: Adapter | None, w_in: Weight,
                        w_out: Weight, strategy: str, dropout: tuple[float, float]) -> Tensor:
    """PEFT's LoRA dropout: each adapter reads its own dropped copy of x (``ab``: the merged adapter
    reads one, dropped with the larger p). Adapters and base read different x, so nothing fuses."""
    drop = lambda p: x if p == 0 else torch.nn.functional.dropout(x, p, training=True)
    if strategy == "ab":
        return lora_delta_ref(drop(max(dropout)), lora_in, lora_out, w_in, w_out, strategy)
    check_strategy(strategy, lora_in, lora_out)
    parts = zip((lora_in, lora_out), (w_in, w_out), dropout, strict=True)
    return sum(lora_delta_ref(drop(p), a, None, w) for a, w, p in parts if a is not None)


def pairwise_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                         pairs: Sequence[tuple[Adapter | None, Adapter | None, Weight, Weight]],
                         row_pair: Tensor, strategy: str = "output") -> Tensor:
    """Like :func:`dual_lora_linear`, but batch row b uses the pair ``pairs[row_pair[b]]``.

    Args:
        pairs: ``(lora_in, lora_out, w_in, w_out)`` per pair.
        row_pair: [B] integer pair index per entry of dim 0 of x.

    Raises:
        ValueError: as :func:`dual_lora_linear`, for every pair; a ``row_pair`` that is not a 1-D
            integer tensor of B entries.
        IndexError: a ``row_pair`` value outside ``[0, len(pairs))`` (the Triton kernel's device
            assert on CUDA).
    """
    _check_args(x, weight, bias, pairs, row_pair, strategy)
    if x.is_cuda and _triton_takes(pairs, strategy) and not _builds_graph(chain((x, weight, bias),
                                                                               _pair_inputs(pairs))):
        x, weight, bias, flat = _autocast(x, weight, bias, [a for p in pairs for a in p[:2]])
        pairs = [(flat[2 * i], flat[2 * i + 1], *p[2:]) for i, p in enumerate(pairs)]
        return kernels.pairwise_lora_linear(x, weight, bias, pairs, row_pair, strategy)  # forward only
    # Calibration inputs are [m, K]: their rows cycle through the pairs.
    run = lambda path, xs: _adapted(path, xs, weight, bias, pairs, strategy, torch.arange(xs.shape[0]) % len(pairs))
    return _adapted(_cpu_path("pairs", x, weight, run, chain((bias,), _pair_inputs(pairs))), x, weight, bias, pairs,
                    strategy, row_pair)


GroupPart = tuple[Tensor, Tensor | None, tuple, str, Tensor | None]
"""One linear of a group: ``(weight, bias, pairs, strategy, row_pair)``; ``pairs`` holds
``(lora_in, lora_out, w_in, w_out)`` tuples (empty: no adapters), ``row_pair`` is None (pair 0 for
every row) or the [B] pair index per entry of dim 0 of x."""


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, parts: Sequence[GroupPart]) -> list[Tensor]:
    """The outputs [..., N_s] of linears that read the same ``x``, whose weights (and biases) are the
    consecutive row blocks of ``weight`` [N, K] (and ``bias`` [N], or None when no part has one).

    On the CPU with no autograd graph, one C++ call over ``weight`` whose bank stacks every part's
    pairs along the rank, each packed as if alone, B block-diagonal (its rank block feeds only its
    own rows) and stored without the zeros (``rank_parts``), at the ISA :mod:`modlora.dispatch`
    measured fastest, when it measured that faster than separate calls (its ``"torch"`` means
    separate here). Otherwise each part is the ungrouped op (:func:`linear`,
    :func:`dual_lora_linear`, :func:`pairwise_lora_linear`), exactly as called alone.
    """
    _check_group(x, weight, bias, parts)
    rows = _group_rows(parts)
    if rows is False:
        return [_part(x, p, p[4]) for p in parts]
    kind = "group-" + ("pairs" if rows is not None else "lora" if any(p[2] for p in parts) else "linear")
    pairs = max(len(p[2]) for p in parts)
    # Calibration inputs are [m, K]: their rows cycle through the pairs.
    calib_rows = lambda xs: None if rows is None else torch.arange(xs.shape[0]) % pairs
    run = lambda path, xs: _grouped(path, xs, weight, bias, parts, calib_rows(xs))
    tensors = chain((bias,), *(_pair_inputs(p[2]) for p in parts))
    return _grouped(_cpu_path(kind, x, weight, run, tensors), x, weight, bias, parts, rows)


def _check_group(x: Tensor, weight: Tensor, bias: Tensor | None, parts: Sequence[GroupPart]) -> None:
    """The group and each part as the ungrouped op checks it (:func:`_check_args`): the parts' row
    blocks tile ``weight``, and a bias of a part is in ``bias``."""
    _check_args(x, weight, bias)
    if not parts or sum(p[0].shape[0] for p in parts) != weight.shape[0]:
        raise ValueError(f"the parts' weights must tile weight's {weight.shape[0]} rows, got "
                         f"{[p[0].shape[0] for p in parts]}")
    if bias is None and any(p[1] is not None for p in parts):
        raise ValueError("a part has a bias but the group's bias is None: pass the parts' biases concatenated")
    for w, b, pairs, strategy, row_pair in parts:
        _check_args(x, w, b, pairs, row_pair, strategy)


def _group_rows(parts: Sequence[GroupPart]) -> Tensor | None | bool:
    """The row_pair shared by every part with adapters (None: one pair for all rows), or False when
    the parts cannot share one bank (different row routings or numbers of pairs)."""
    routed = {(id(p[4]), len(p[2])) for p in parts if p[2]}
    if len(routed) > 1:
        return False
    rows = next((p[4] for p in parts if p[2]), None)
    return rows if rows is not None or all(len(p[2]) <= 1 for p in parts) else False


def _part(x: Tensor, part: GroupPart, rows: Tensor | None) -> Tensor:
    weight, bias, pairs, strategy, row_pair = part
    if not pairs:
        return linear(x, weight, bias)
    if row_pair is None:
        return dual_lora_linear(x, weight, bias, *pairs[0], strategy)
    return pairwise_lora_linear(x, weight, bias, pairs, rows, strategy)


def _grouped(path: str, x: Tensor, weight: Tensor, bias: Tensor | None, parts: Sequence[GroupPart],
             rows: Tensor | None) -> list[Tensor]:
    if path == "torch":
        return [_part(x, p, rows) for p in parts]
    keys = [_pairs_key(p[2]) for p in parts]
    key = tuple((pairs, p[3], p[0].shape[0]) for (pairs, _), p in zip(keys, parts, strict=True))
    A_bank, B_bank, rank_parts = _group_bank(key, x.dtype, tuple(v for _, versions in keys for v in versions))
    y = cpu.lora_bank_linear(x, weight, bias, A_bank, B_bank, None if A_bank is None else rows,
                             rank_parts=rank_parts, **dispatch.c_options(path))
    return list(y.split([p[0].shape[0] for p in parts], dim=-1))


@functools.lru_cache(maxsize=256)  # one entry per group and pair set: 48 per pair on Qwen2.5-0.5B
def _group_bank(key: tuple, dtype: torch.dtype, versions: tuple) -> tuple[Tensor | None, Tensor | None,
                                                                            Tensor | None]:
    """One bank for a group: each part's :func:`cpu.pack_bank`, A stacked along the rank, and the
    rank range each part's rows read (``rank_parts``). B is block-diagonal, stored without its zeros:
    part q's rows hold its own ranks from entry 0 (``[P, N, widest part's ranks]``)."""
    banks = [cpu.pack_bank(pairs, strategy, dtype) if pairs else (None, None) for pairs, strategy, _ in key]
    present = [(A, B) for A, B in banks if A is not None]
    if not present:
        return None, None, None
    n, r = [n for *_, n in key], [0 if A is None else A.shape[1] for A, _ in banks]
    n_at, r_at = list(accumulate([0, *n])), list(accumulate([0, *r]))  # each part's first row and rank
    A_bank = torch.cat([A for A, _ in present], dim=1)  # [P, R, K]
    B_bank = A_bank.new_zeros(A_bank.shape[0], n_at[-1], max(r))
    for (_, B), n0 in zip(banks, n_at, strict=False):
        if B is not None:
            B_bank[:, n0:n0 + B.shape[1], :B.shape[2]] = B
    rank_parts = torch.tensor([[n_at[q + 1], r_at[q], r_at[q + 1]] for q in range(len(key))])
    return A_bank, B_bank, rank_parts
