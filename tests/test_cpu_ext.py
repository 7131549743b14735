"""The C++ CPU LoRA-bank linear (modlora._C) against the plain-torch reference.

Oracle: the same function evaluated in float64 from the very same (already rounded) inputs, so
the only differences left are the kernel's fp32 accumulation and the final cast to x's dtype.
Tolerance per element (`_tolerance`): 2 * (K + R) * 2^-24 * |terms| + u_out * |y|, where |terms|
is the sum of the absolute values of every product that enters y (x W^T, bias, and (A x) B) and
u_out is the output's unit roundoff (2^-24 fp32, 2^-8 bf16). The first part is a standard
worst-case bound of fp32 dot products (gamma_n), the second the last rounding. Adapters are
scaled so that their delta is of the same size as x W^T: a dropped bias or LoRA term, a wrong
pair, a wrong row, a skipped K tail or N tail, or a B coefficient off by 2x is off by O(|y|),
hundreds of times the bf16 tolerance and ~1e5 times the fp32 one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from modlora import cpu, dispatch, ops
from modlora.kernels import dual_lora_linear_ref, pairwise_lora_linear_ref

if not cpu.HAVE_C:
    reason = ("MODLORA_DISABLE_C is set" if os.environ.get("MODLORA_DISABLE_C", "") not in ("", "0")
              else "modlora._C is not built (pip install --no-build-isolation -e .)")
    pytest.skip(reason, allow_module_level=True)

from modlora import _C  # noqa: E402

_C._allow_amx_emulation(True)  # the AMX driver on emulated tiles: "amx_emulated", tests only
ISAS = _C.supported_isas()  # e.g. ['scalar', 'avx2'] or [..., 'avx512', 'avx512_bf16', 'amx']
ALL_ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
TILED = ("amx", "amx_emulated")  # the AMX driver (bf16 x and W); other dtypes run avx512 / scalar
FLUSHING = ("avx512_bf16", *TILED)  # bf16 products by instructions that read bf16 subnormals as 0
K, N = 130, 97  # not multiples of 8 or 16 lanes, of the 4-row blocks, nor of the 32 x 16 tiles


@contextlib.contextmanager
def forced_isa(name: str):
    """The kernel runs ``name``; afterwards the ISA set before (e.g. by MODLORA_CPU_ISA) holds again."""
    before = _C.isa()
    _C.set_isa(name)
    try:
        yield name
    finally:
        _C.set_isa(before)


@pytest.fixture(params=[*ALL_ISAS, "amx_emulated"])
def isa(request):
    """Each ISA in turn, the emulated AMX one on every CPU; one the CPU lacks skips, saying so
    (the hardware AMX kernel runs only where the CPU has AMX and Linux grants the tile state)."""
    if request.param not in [*ISAS, "amx_emulated"]:
        pytest.skip(f"the CPU lacks {request.param}")
    with forced_isa(request.param) as name:
        yield name


def test_forced_isa_restores_the_isa_set_before():
    with forced_isa("scalar"):
        with forced_isa(ISAS[-1]):
            assert _C.isa() == ISAS[-1]
        assert _C.isa() == "scalar"


def _adapter(r: int, scale: float, gen: torch.Generator, k: int = K, n: int = N):
    # PEFT-like sizes: A ~ 1/sqrt(K) so x A^T ~ |x|; B chosen so the delta is ~ |x W^T|.
    A = torch.randn(r, k, generator=gen) / k**0.5
    B = torch.randn(n, r, generator=gen) * (k / max(r, 1)) ** 0.5
    return A, B, scale


def _pairs(strategy: str, gen: torch.Generator):
    """Three pairs with unequal ranks 1, 8, 16 (and one single-adapter pair)."""
    if strategy == "output":
        return [(_adapter(1, 2.0, gen), _adapter(16, 0.5, gen), 0.3, 0.7),
                (_adapter(8, 1.0, gen), None, 1.0, 0.0),
                (_adapter(16, 0.25, gen), _adapter(8, 2.0, gen), 0.6, 0.4)]
    return [(_adapter(1, 2.0, gen), _adapter(1, 0.5, gen), 0.3, 0.7),  # "ab": equal ranks per pair
            (_adapter(8, 1.0, gen), _adapter(8, 1.0, gen), 0.5, 0.5),
            (_adapter(16, 0.25, gen), _adapter(16, 2.0, gen), 0.6, 0.4)]


def _in_nan(W: torch.Tensor) -> torch.Tensor:
    """W as a view with row stride K + 20 into a tensor of NaN: what lies around it must not be read."""
    full = torch.full((W.shape[0], W.shape[1] + 20), float("nan"), dtype=W.dtype)
    full[:, 7:7 + W.shape[1]] = W
    return full[:, 7:7 + W.shape[1]]


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """t's values as a view of every other element of a tensor whose gaps hold NaN (or -1)."""
    gap = torch.full_like(t, float("nan") if t.is_floating_point() else -1)
    return torch.stack([t, gap], dim=-1)[..., 0]


def _oracle(x, W, b, A_bank, B_bank, row_pair):
    """float64 value and the |terms| magnitude of the bank op, row by row."""
    x64, W64 = x.double(), W.double()
    y = x64 @ W64.t()
    mag = x64.abs() @ W64.abs().t()
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    if A_bank is not None:
        for m in range(x.shape[0]):
            p = 0 if row_pair is None else int(row_pair[m])
            A, B = A_bank[p].double(), B_bank[p].double()
            y[m] += (A @ x64[m]) @ B.t()
            mag[m] += (A.abs() @ x64[m].abs()) @ B.abs().t()
    return y, mag


def _tolerance(mag, y64, k_eff: int, out_dtype: torch.dtype, extra: float = 0.0):
    """``extra``: one more rounding of a partial result (relative to |terms|), e.g. torch's bf16 GEMM."""
    u_out = 2.0**-24 if out_dtype == torch.float32 else 2.0**-8
    return (2 * k_eff * 2.0**-24 + extra) * mag + u_out * y64.abs() + 1e-30


def _assert_close(y, y64, mag, k_eff, extra: float = 0.0):
    assert y.dtype in (torch.float32, torch.bfloat16)
    err = (y.double() - y64).abs()
    tol = _tolerance(mag, y64, k_eff, y.dtype, extra)
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3g} exceeds its tolerance by {worst:.2f}x"


@pytest.mark.parametrize("M", [1, 2, 5, 13])
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("strategy", ["output", "ab"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bank_matches_pairwise_reference(isa, M, w_dtype, x_dtype, strategy, with_bias):
    gen = torch.Generator().manual_seed(M * 7 + (strategy == "ab"))
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(w_dtype)
    b = torch.randn(N, generator=gen).to(w_dtype) if with_bias else None
    pairs = _pairs(strategy, gen)
    row_pair = torch.arange(M) % len(pairs)
    A_bank, B_bank = cpu.pack_bank(pairs, strategy, torch.float32)
    assert A_bank.shape == (3, 24 if strategy == "output" else 16, K) and B_bank.shape[:2] == (3, N)

    y = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair)
    assert y.dtype == x_dtype and y.shape == (M, N)

    # pack_bank + the op computes the paper's strategies: compare with the reference itself (fp64).
    d = lambda a: None if a is None else (a[0].double(), a[1].double(), a[2])
    ref = pairwise_lora_linear_ref(x.double(), W.double(), None if b is None else b.double(),
                                   [(d(i), d(o), wi, wo) for i, o, wi, wo in pairs], row_pair, strategy)
    y64, mag = _oracle(x, W, b, A_bank, B_bank, row_pair)
    # The fp32 bank is the strategy up to the fp32 rounding of its entries (a few ulps of |terms|).
    assert ((y64 - ref).abs() <= 8 * 2.0**-24 * mag).all()
    _assert_close(y, ref, mag, K + A_bank.shape[1])


@pytest.mark.parametrize("M", [1, 5, 13])
@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_single_pair_matches_dual_reference(isa, M, strategy):
    """row_pair=None: every row uses pair 0, as in dual_lora_linear_ref."""
    gen = torch.Generator().manual_seed(11 + M)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=gen).to(torch.bfloat16)
    lora_in, lora_out = _adapter(8, 2.0, gen), _adapter(8, 0.5, gen)
    A_bank, B_bank = cpu.pack_bank([(lora_in, lora_out, 0.25, 0.75)], strategy, torch.float32)
    y = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, None)
    d = lambda a: (a[0].double(), a[1].double(), a[2])
    ref = dual_lora_linear_ref(x.double(), W.double(), b.double(), d(lora_in), d(lora_out), 0.25, 0.75, strategy)
    _, mag = _oracle(x, W, b, A_bank, B_bank, None)
    _assert_close(y, ref, mag, K + A_bank.shape[1])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 5, 13])
def test_bank_dtypes_and_strided_weight(isa, bank_dtype, M):
    """bf16 banks (exact fp64 oracle of the rounded bank) and a weight with row stride > K, whose
    row gaps hold NaN: a kernel that reads past a row (a full tile at the K tail) poisons its sums."""
    gen = torch.Generator().manual_seed(3 + M)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    W = _in_nan((torch.randn(N, K, generator=gen) / K**0.5).to(torch.bfloat16))
    assert W.stride(0) == K + 20
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output", bank_dtype)
    row_pair = torch.randint(0, 3, (M,), generator=gen)
    y = cpu.lora_bank_linear(x, W, None, A_bank, B_bank, row_pair)
    y64, mag = _oracle(x, W, None, A_bank, B_bank, row_pair)
    _assert_close(y, y64, mag, K + A_bank.shape[1])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("beams", [5, 6])
def test_bank_sentences_of_beams(isa, bank_dtype, beams):
    """Rows in runs of one pair (the beams of a sentence): a block whose rows share a pair folds its
    expand with each B vector read once for all rows; the next block's rows read another pair."""
    gen = torch.Generator().manual_seed(beams)
    x = torch.randn(3 * beams, K, generator=gen).to(torch.bfloat16)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(torch.bfloat16)
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output", bank_dtype)
    row_pair = torch.tensor([2, 0, 1]).repeat_interleave(beams)
    y = cpu.lora_bank_linear(x, W, None, A_bank, B_bank, row_pair)
    y64, mag = _oracle(x, W, None, A_bank, B_bank, row_pair)
    _assert_close(y, y64, mag, K + A_bank.shape[1])


@pytest.mark.parametrize("M", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefetch_level_changes_no_bit(isa, M, dtype):
    """prefetch="l2" moves only where the next block of W is prefetched: the same bits as "l1" and
    the default, with adapters, per-row pairs, a bias, 4- and 2-row blocks and a last partial block
    (N = 97), and within the float64 bound."""
    gen = torch.Generator().manual_seed(17 + M)
    x = torch.randn(M, K, generator=gen).to(dtype)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output", dtype)
    row_pair = torch.arange(M) % 3
    y = {level: cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair, prefetch=level) for level in (None, "l1", "l2")}
    assert torch.equal(y["l2"], y["l1"]) and torch.equal(y[None], y["l1"])
    y64, mag = _oracle(x, W, b, A_bank, B_bank, row_pair)
    _assert_close(y["l2"], y64, mag, K + A_bank.shape[1])


@pytest.mark.parametrize("M", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [32, 40, 64, 129])
def test_k_chunk_keeps_each_outputs_sum(isa, M, dtype, chunk):
    """k_chunk: K = 130 in chunks of whole vector steps and not (40), five chunks to two (the last
    one element): within the float64 bound, with adapters, per-row pairs, a bias, 4- and 2-row
    blocks and a last partial block, both prefetch levels; a chunk of K or more is the whole-K op,
    bit for bit. A lost or doubled chunk is off by O(|y|). The tile kernel (bf16 at amx) reads
    whole rows: for it k_chunk changes no bit."""
    gen = torch.Generator().manual_seed(23 + M + chunk)
    x = torch.randn(M, K, generator=gen).to(dtype)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output", dtype)
    row_pair = torch.arange(M) % 3
    y64, mag = _oracle(x, W, b, A_bank, B_bank, row_pair)
    for level in ("l1", "l2"):
        y = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair, prefetch=level, k_chunk=chunk)
        _assert_close(y, y64, mag, K + A_bank.shape[1])
    whole = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair)
    for ignored in (0, K, 1000, *((chunk,) if isa in TILED and dtype == torch.bfloat16 else ())):
        assert torch.equal(cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair, k_chunk=ignored), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_k_chunk_on_two_threads_with_rank_parts(isa, dtype):
    """K in chunks where two threads share the work (50 blocks of 4 columns, the op splits them) and
    a grouped bank's compact B (two parts, 16 and 8 ranks, the second part's B entries past 8
    random): each thread keeps its own columns' sums; within the float64 bound."""
    gen = torch.Generator().manual_seed(31)
    k, n, parts = 300, 203, [(100, 0, 16), (203, 16, 24)]
    x = torch.randn(5, k, generator=gen).to(dtype)
    W = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    A_bank = (torch.randn(1, 24, k, generator=gen) / k**0.5).to(dtype)
    B_bank = torch.randn(1, n, 16, generator=gen).to(dtype)
    full = torch.zeros(1, n, 24, dtype=dtype)
    full[:, :100, :16], full[:, 100:, 16:] = B_bank[:, :100], B_bank[:, 100:, :8]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu.lora_bank_linear(x, W, None, A_bank, B_bank, rank_parts=torch.tensor(parts), k_chunk=64)
    finally:
        torch.set_num_threads(threads)
    y64, mag = _oracle(x, W, None, A_bank, full, None)
    _assert_close(y, y64, mag, k + 24)


@pytest.mark.parametrize("M", [1, 2, 15, 16, 17, 33, 64, 65, 70])
@pytest.mark.parametrize("k,n", [(130, 97), (32, 16), (31, 5), (96, 48), (70, 23)])
def test_bf16_bank_across_tile_shapes(isa, M, k, n):
    """bf16 x and W (the AMX driver's case): M over 1, 2, 4 and 5 C tiles (64 rows per pass), K and
    N on and off the 32 x 16 tile sizes (n = 23: a last block of 3 W rows in the vector kernels,
    whose adapter rows must follow), ranks 1/8/16 unequal, bias, rows alternating between pairs."""
    gen = torch.Generator().manual_seed(M * 131 + k + n)
    x = torch.randn(M, k, generator=gen).to(torch.bfloat16)
    W = _in_nan((torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16))  # nothing past a row is read
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    pairs = [(_adapter(1, 2.0, gen, k, n), _adapter(16, 0.5, gen, k, n), 0.3, 0.7),
             (_adapter(8, 1.0, gen, k, n), None, 1.0, 0.0)]
    A_bank, B_bank = cpu.pack_bank(pairs, "output", torch.bfloat16)
    row_pair = torch.randint(0, 2, (M,), generator=gen)
    y = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair)
    y64, mag = _oracle(x, W, b, A_bank, B_bank, row_pair)
    _assert_close(y, y64, mag, k + A_bank.shape[1])


@pytest.mark.parametrize("M", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("parts", [
    [(32, 0, 16), (64, 16, 32), (97, 32, 48)],   # part boundaries on 4-row blocks and 16 lanes
    [(22, 0, 20), (61, 20, 41), (97, 41, 41)],   # off them (blocks span two parts), and a part with no ranks
    [(97, 3, 40)],                               # one part, a range inside R
], ids=["aligned", "unaligned", "one"])
def test_rank_parts_read_only_their_ranks(isa, M, dtype, parts):
    """rank_parts: columns of part q add only ranks [r_lo, r_hi) of u, against the first r_hi - r_lo
    entries of their B rows (B stored without the block-diagonal's zeros). The oracle places them in
    a [P, N, R] B; B's entries past a narrower part's width are random, not zeros, so a kernel that
    reads any other entry or rank, or shifts a range, misses by O(|delta|)."""
    gen = torch.Generator().manual_seed(M * 5 + len(parts))
    R = 48
    x = torch.randn(M, K, generator=gen).to(dtype)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A_bank = (torch.randn(2, R, K, generator=gen) / K**0.5).to(dtype)
    B_bank = torch.randn(2, N, max(hi - lo for _, lo, hi in parts), generator=gen).to(dtype)
    row_pair = torch.arange(M) % 2
    rank_parts = torch.tensor(parts)
    y = cpu.lora_bank_linear(x, W, b, A_bank, B_bank, row_pair, rank_parts=rank_parts)
    strided = [_noncontiguous(t) for t in (A_bank, B_bank, row_pair, rank_parts)]  # views with gaps of NaN / -1
    assert torch.equal(cpu.lora_bank_linear(x, W, b, *strided[:3], rank_parts=strided[3]), y)
    full = torch.zeros(2, N, R, dtype=dtype)
    n0 = 0
    for n_end, r_lo, r_hi in parts:
        full[:, n0:n_end, r_lo:r_hi] = B_bank[:, n0:n_end, :r_hi - r_lo]
        n0 = n_end
    y64, mag = _oracle(x, W, b, A_bank, full, row_pair)
    _assert_close(y, y64, mag, K + R)
    y_torch = cpu.lora_bank_linear_torch(x, W, b, A_bank, B_bank, row_pair, rank_parts=rank_parts)
    _assert_close(y_torch, y64, mag, K + R, extra=2.0**-8 if dtype == torch.bfloat16 else 0.0)


@pytest.mark.parametrize("parts,message", [
    ([(50, 0, 8), (40, 8, 16)], "rise|n_end"),
    ([(50, 0, 8)], "end at N"),
    ([(97, 8, 4)], "ranks|r_lo"),
    ([(97, 0, 49)], "ranks|R = 48"),
    ([(50, 0, 24), (97, 24, 48)], r"\[P, N, 24\] \(the widest part's ranks\), got last dim 48"),
], ids=["falling", "short", "reversed", "past-R", "B-with-zeros"])
def test_rank_parts_errors_are_named(parts, message):
    """Malformed parts, and a B as wide as R with two parts of 24 ranks (the block-diagonal with its
    zeros, which would be read at the wrong ranks), are named errors in both kernels."""
    x, W = torch.randn(2, K), torch.randn(N, K)
    A, B = torch.randn(1, 48, K), torch.randn(1, N, 48)
    with pytest.raises(RuntimeError, match=message):
        cpu.lora_bank_linear(x, W, None, A, B, rank_parts=torch.tensor(parts))
    with pytest.raises(ValueError, match=message):
        cpu.lora_bank_linear_torch(x, W, None, A, B, rank_parts=torch.tensor(parts))
    with pytest.raises(ValueError, match="without an adapter bank"):
        cpu.lora_bank_linear(x, W, rank_parts=torch.tensor([(N, 0, 0)]))


@pytest.mark.parametrize("name", TILED)
def test_tile_self_check(name):
    """The integer self-check that gates the hardware AMX path (it was written on CPUs without AMX) passes on
    the emulated tiles everywhere and on the hardware where the CPU has AMX; a mutated driver fails it (a K
    tail copy one element short returned False when tried by hand). Only tile kernels have one."""
    if name not in [*ISAS, "amx_emulated"]:
        pytest.skip(f"the CPU lacks {name}")
    assert _C._tiles_self_check(name) is True
    with pytest.raises(RuntimeError, match="has no tile kernel"):
        _C._tiles_self_check("scalar")


def test_isa_per_call_overrides_the_one_set():
    """isa= runs that ISA for one call (the subnormal flush tells avx512_bf16 from the others)."""
    x, W = torch.full((2, 64), 2.0**-130, dtype=torch.bfloat16), torch.full((8, 64), 2.0**100, dtype=torch.bfloat16)
    with forced_isa("scalar"):
        assert (cpu.lora_bank_linear(x, W, isa="amx_emulated") == 0).all()
        assert (cpu.lora_bank_linear(x, W) == 64 * 2.0**-30).all()
        assert _C.isa() == "scalar"


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 25])
def test_no_adapters_is_plain_linear(isa, w_dtype, M):
    """The lm_head case, and every register-block size (M up to 12 per block, then splits)."""
    gen = torch.Generator().manual_seed(M)
    k, n = 67, 203
    x = torch.randn(M, k, generator=gen).to(w_dtype)
    W = torch.randn(n, k, generator=gen).to(w_dtype)
    y = cpu.lora_bank_linear(x, W)
    y64, mag = _oracle(x, W, None, None, None, None)
    _assert_close(y, y64, mag, k)


@pytest.mark.parametrize("M", [1, 5, 7])
def test_bf16_output_is_the_fp32_result_rounded_to_nearest_even(isa, M):
    """With fp32 W every ISA sums a bf16 x exactly as its fp32 copy, so the bf16 output must be the
    fp32 output rounded as torch rounds: ties to even, NaN stays NaN, overflow to inf. Row 0 (x = 0)
    is the bias alone, whose entries are ties, NaNs, +-inf and the largest float, in the first
    columns (vector stores) and the last (the scalar tail, N = 97)."""
    gen = torch.Generator().manual_seed(M)
    high = torch.randint(0x3F00, 0x4300, (N,), generator=gen, dtype=torch.int32)
    bias = ((high << 16) | 0x8000).view(torch.float32).clone()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), torch.finfo(torch.float32).max,
                            torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)])  # a NaN that wraps to -0
    bias[:5], bias[-5:] = special, special.flip(0)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    x[0] = 0
    W = torch.randn(N, K, generator=gen)
    got = cpu.lora_bank_linear(x, W, bias).float()
    want = cpu.lora_bank_linear(x.float(), W, bias).to(torch.bfloat16).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[0, 5:-5], bias[5:-5].to(torch.bfloat16).float())
    assert got[0, [0, 4, -1, -5]].isnan().all()


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64, torch.bfloat16, torch.float32])
def test_bias_of_any_float_dtype_and_stride(bias_dtype):
    """The C++ op reads fp32 and bf16 biases in place and converts others, strided ones too: each
    output is x W^T plus the bias's fp32 value (a dropped or misread bias is off by O(1))."""
    gen = torch.Generator().manual_seed(1)
    x, W = torch.randn(5, K, generator=gen).to(torch.bfloat16), torch.randn(N, K, generator=gen).to(torch.bfloat16)
    bias = torch.randn(N, 2, generator=gen).to(bias_dtype)[:, 1]  # every other element
    y64, mag = _oracle(x, W, bias.float(), None, None, None)
    _assert_close(cpu.lora_bank_linear(x, W, bias), y64, mag, K)


def test_tiny_and_degenerate_shapes(isa):
    gen = torch.Generator().manual_seed(0)
    for m, k, n, r in [(1, 1, 1, 1), (3, 5, 2, 3), (2, 17, 5, 1), (1, 33, 4, 40)]:
        x, W = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        A, B = torch.randn(2, r, k, generator=gen), torch.randn(2, n, r, generator=gen)
        rp = torch.tensor([1] * m)
        y = cpu.lora_bank_linear(x, W, None, A, B, rp)
        y64, mag = _oracle(x, W, None, A, B, rp)
        _assert_close(y, y64, mag, k + r)
    assert cpu.lora_bank_linear(torch.randn(0, 8), torch.randn(4, 8)).shape == (0, 4)
    bias = torch.randn(4, generator=gen)  # K = 0: y is the bias, whole K or in chunks
    for chunk in (None, 8):
        assert torch.equal(cpu.lora_bank_linear(torch.randn(3, 0), torch.randn(4, 0), bias, k_chunk=chunk),
                           bias.expand(3, 4))
    for op in (cpu.lora_bank_linear, cpu.lora_bank_linear_torch):  # K = 0 under leading dims too
        assert torch.equal(op(torch.randn(2, 3, 0), torch.randn(4, 0), bias), bias.expand(2, 3, 4))
    A0, B0 = torch.zeros(1, 0, 8), torch.zeros(1, 4, 0)  # rank 0 bank: no adapter at all
    x, W = torch.randn(2, 8), torch.randn(4, 8)
    y64, mag = _oracle(x, W, None, None, None, None)
    _assert_close(cpu.lora_bank_linear(x, W, None, A0, B0), y64, mag, 8)


def test_c_and_torch_paths_agree_with_leading_dims():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, K, generator=gen).to(torch.bfloat16)  # 2 sentences x 3 positions
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(torch.bfloat16)
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output", torch.bfloat16)
    row_pair = torch.tensor([2, 0])  # one pair per sentence (dim 0), as in pairwise_lora_linear_ref
    y_c = cpu.lora_bank_linear(x, W, None, A_bank, B_bank, row_pair)
    y_t = cpu.lora_bank_linear_torch(x.reshape(6, K), W, None, A_bank, B_bank, row_pair.repeat_interleave(3))
    assert y_c.shape == (2, 3, N)
    y64, mag = _oracle(x.reshape(6, K), W, None, A_bank, B_bank, row_pair.repeat_interleave(3))
    _assert_close(y_c.reshape(6, N), y64, mag, K + A_bank.shape[1])
    # torch path: its bf16 GEMM also rounds x W^T + b to bf16 before the delta is added.
    _assert_close(y_t.reshape(6, N), y64, mag, K + A_bank.shape[1], extra=2.0**-8)


def test_dispatch_large_m_and_autograd():
    """ops sends M beyond the C++ kernel's reach, and anything needing gradients, to the torch path."""
    gen = torch.Generator().manual_seed(9)
    W = torch.randn(N, K, generator=gen)
    pairs = _pairs("output", gen)
    A_bank, B_bank = cpu.pack_bank(pairs, "output")
    big = torch.randn(dispatch.MAX_BUCKET + 7, K, generator=gen)
    rp = torch.randint(0, 3, (big.shape[0],), generator=gen)
    y64, mag = _oracle(big, W, None, A_bank, B_bank, rp)
    _assert_close(ops.pairwise_lora_linear(big, W, None, pairs, rp), y64, mag, K + 24)
    x = torch.randn(2, K, generator=gen, requires_grad=True)  # autograd: torch path, gradients flow
    ops.pairwise_lora_linear(x, W, None, pairs, torch.tensor([0, 1])).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_clear_errors():
    x, W = torch.randn(2, 8), torch.randn(4, 8)
    A, B = torch.randn(3, 2, 8), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="K=8 features"):
        cpu.lora_bank_linear(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu.lora_bank_linear(x.half(), W.half())
    with pytest.raises(ValueError, match="B_bank must be"):
        cpu.lora_bank_linear(x, W, None, A, torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match="both be given"):
        cpu.lora_bank_linear(x, W, None, A, None)
    with pytest.raises(ValueError, match="one entry per row"):
        cpu.lora_bank_linear(x, W, None, A, B, torch.tensor([0, 1, 2]))
    for op, err in ((cpu.lora_bank_linear, RuntimeError), (cpu.lora_bank_linear_torch, IndexError)):
        for bad in ([0, 3], [-1, 0]):  # torch would index -1 from the end
            with pytest.raises(err, match="out of range|must lie in"):
                op(x, W, None, A, B, torch.tensor(bad))
        y = op(x, W, None, A, B, torch.tensor([2, 0], dtype=torch.int32))  # int32 pairs are pairs too
        assert torch.equal(y, op(x, W, None, A, B, torch.tensor([2, 0])))
    with pytest.raises(RuntimeError, match=r"but weight is \[4, 9\]"):  # the op itself checks too
        torch.ops.modlora.lora_bank_linear(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9', expected one of auto, scalar, avx2, avx512, "
                       "avx512_bf16, amx"):
        _C.set_isa("sse9")
    with pytest.raises(RuntimeError, match="lora_bank_linear: unknown ISA 'sse9'"):  # per call too
        cpu.lora_bank_linear(x, W, isa="sse9")
    with pytest.raises(ValueError, match="prefetch must be 'l1' or 'l2', got 'l3'"):
        cpu.lora_bank_linear(x, W, prefetch="l3")
    with pytest.raises(RuntimeError, match="lora_bank_linear: unknown prefetch 'L2', expected 'l1' or 'l2'"):
        torch.ops.modlora.lora_bank_linear(x, W, prefetch="L2")
    with pytest.raises(ValueError, match=r"k_chunk must be >= 0 \(0 or None: all of K\), got -1"):
        cpu.lora_bank_linear(x, W, k_chunk=-1)
    with pytest.raises(RuntimeError, match=r"k_chunk must be >= 0 \(0 or None: all of K\), got -1"):
        torch.ops.modlora.lora_bank_linear(x, W, k_chunk=-1)
    for name in set(ALL_ISAS) - set(ISAS):  # known, but beyond this CPU (amx on an AVX-512 BF16 machine)
        with pytest.raises(RuntimeError, match=f"'{name}' is not supported on this CPU"):
            _C.set_isa(name)
        with pytest.raises(RuntimeError, match=f"'{name}' is not supported on this CPU"):
            cpu.lora_bank_linear(x, W, isa=name)


_MALFORMED = {  # name: (changes to a good call with M rows, the wrapper's error, the message both give)
    "K": (lambda M: dict(weight=torch.randn(4, 9)), ValueError, "but weight is"),
    "dtype": (lambda M: dict(x=torch.randn(M, 8).half(), weight=torch.randn(4, 8).half()), TypeError,
              "x must be float32 or bfloat16"),
    "bias": (lambda M: dict(bias=torch.randn(5)), ValueError, r"bias must be \[N\]"),
    "A-K": (lambda M: dict(A_bank=torch.randn(3, 2, 9)), ValueError, r"A_bank must be \[P, R, K"),
    "B-shape": (lambda M: dict(B_bank=torch.randn(3, 4, 3)), ValueError, "B_bank must be"),
    "A-alone": (lambda M: dict(B_bank=None), ValueError, "both be given"),
    "bank-dtype": (lambda M: dict(B_bank=torch.ones(3, 4, 2, dtype=torch.int32)), TypeError,
                   "must be float32 or bfloat16, got"),
    "empty-bank": (lambda M: dict(A_bank=torch.randn(0, 2, 8), B_bank=torch.randn(0, 4, 2)), ValueError,
                   "an empty bank"),
    "rows": (lambda M: dict(row_pair=torch.tensor([0, 1, 2])), ValueError, "row_pair must be int64"),
    "rows-alone": (lambda M: dict(A_bank=None, B_bank=None, row_pair=torch.zeros(M, dtype=torch.int64)), ValueError,
                   "without an adapter bank"),
    "bias-dtype": (lambda M: dict(bias=torch.ones(4, dtype=torch.int64)), TypeError, "bias must be a floating-point"),
    # The wrapper names these through the op's own message (no Python check repeats them).
    "isa": (lambda M: dict(isa="bogus"), RuntimeError, "unknown ISA .bogus."),
    "rank-parts": (lambda M: dict(rank_parts=torch.tensor([[9, 0, 7]])), RuntimeError, "rank_parts n_end must rise"),
}


@pytest.mark.parametrize("M", [2, 0])
@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_arguments_are_named_by_the_op_and_by_the_wrapper(case, M):
    """The C++ op checks every argument itself, with no rows too (an empty output is no excuse); the
    wrapper, which calls it unchecked, then names the same problem as ValueError or TypeError."""
    changes, wrapper_error, message = _MALFORMED[case]
    args = dict(x=torch.randn(M, 8), weight=torch.randn(4, 8), bias=torch.randn(4), A_bank=torch.randn(3, 2, 8),
                B_bank=torch.randn(3, 4, 2), row_pair=None, isa=None, rank_parts=None) | changes(M)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.modlora.lora_bank_linear(*args.values())
    with pytest.raises(wrapper_error, match=message):
        cpu.lora_bank_linear(*args.values())


@pytest.mark.parametrize("M", [1, 16])
def test_bf16_dot_products_flush_subnormal_inputs(isa, M):
    """vdpbf16ps and tdpbf16ps treat bf16 subnormals as zero: x = 2^-130 (subnormal), W = 2^100
    gives 0 where the exact result is K 2^-30 (a normal number), which the fp32 paths compute exactly."""
    k, n = 64, 64
    x, W = torch.full((M, k), 2.0**-130, dtype=torch.bfloat16), torch.full((n, k), 2.0**100, dtype=torch.bfloat16)
    assert x[0, 0].item() == 2.0**-130  # the input really is this subnormal
    y = cpu.lora_bank_linear(x, W)
    assert (y == (0.0 if isa in FLUSHING else k * 2.0**-30)).all()


@pytest.mark.skipif("avx512_bf16" not in ISAS, reason="the CPU lacks AVX-512 BF16")
def test_torch_bf16_gemm_flushes_subnormals_too():
    """torch's own oneDNN bf16 GEMM (used from M = 16 on) flushes the same input to 0 here."""
    x, W = torch.full((16, 64), 2.0**-130, dtype=torch.bfloat16), torch.full((64, 64), 2.0**100, dtype=torch.bfloat16)
    assert (torch.nn.functional.linear(x, W) == 0).all()


def test_opcheck_and_compile():
    """Schema, fake (meta) implementation and torch.compile tracing of the registered op."""
    gen = torch.Generator().manual_seed(1)
    x, W, b = torch.randn(3, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    A_bank, B_bank = cpu.pack_bank(_pairs("output", gen), "output")
    rp = torch.tensor([2, 0, 1])
    torch.library.opcheck(torch.ops.modlora.lora_bank_linear.default, (x, W, b, A_bank, B_bank, rp))
    fn = torch.compile(lambda x: torch.ops.modlora.lora_bank_linear(x, W, b, A_bank, B_bank, rp) + 1,
                       fullgraph=True, backend="eager")
    y64, mag = _oracle(x, W, b, A_bank, B_bank, rp)
    _assert_close(fn(x) - 1, y64, mag, K + 24 + 2)


@pytest.mark.parametrize("env,expect", [({"MODLORA_DISABLE_C": "1"}, "False torch"),
                                        ({"MODLORA_CPU_ISA": "scalar"}, "True scalar"),
                                        ({"MODLORA_CPU_ISA": "sse9"}, f"True {_C.best_isa()}")])
def test_environment_switches(env, expect):
    code = ("import torch; from modlora import cpu; "
            "print(cpu.HAVE_C, cpu._C.isa() if cpu.HAVE_C else 'torch'); "
            "x, W = torch.randn(2, 8), torch.randn(3, 8); "
            "err = (cpu.lora_bank_linear(x, W).double() - x.double() @ W.double().t()).abs(); "
            "assert (err <= 16 * 2.0**-24 * (x.abs() @ W.abs().t()).double()).all()")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == expect


@pytest.mark.parametrize("where", ["weight", "bias", "A_bank", "B_bank"])
def test_a_tensor_off_the_cpu_is_refused_not_read(where):
    """A call mixing CPU and meta tensors dispatches to the fake (meta outranks the CPU), which
    returned an uninitialised CPU tensor."""
    args = dict(x=torch.randn(2, 8), weight=torch.randn(4, 8), bias=torch.randn(4), A_bank=torch.randn(3, 2, 8),
                B_bank=torch.randn(3, 4, 2))
    args[where] = args[where].to("meta")
    with pytest.raises(RuntimeError, match=r"lora_bank_linear: every tensor must be on one device, got \['cpu', "
                                           r"'meta'\]"):
        cpu.lora_bank_linear(**args)
    with pytest.raises(RuntimeError, match="rms_norm: every tensor must be on one device"):
        torch.ops.modlora.rms_norm(torch.randn(2, 8), torch.ones(8, device="meta"), 1e-6)
