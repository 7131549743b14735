"""The dispatch point: every backend it picks gives the reference's result, on the whole model too."""

import contextlib

import pytest
import torch

from modlora import cpu, dispatch, ops
from modlora.adapters import AdapterController, LoraAdapter
from modlora.config import Qwen2Config
from modlora.kernels import dual_lora_linear_ref, merge_pair, pairwise_lora_linear_ref
from modlora.kernels.reference import as_fp32, pair_parts
from modlora.loading import random_model

needs_c = pytest.mark.skipif(not cpu.HAVE_C, reason="modlora._C is not built (CI builds it)")
CONFIG = Qwen2Config(vocab_size=503, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, rope_theta=1e4, dtype="float32")


@contextlib.contextmanager
def torch_path():
    enabled = cpu.c_enabled()
    cpu.set_c_enabled(False)
    try:
        yield
    finally:
        cpu.set_c_enabled(enabled)


def random_adapter(model, rank, seed, role, std=0.05):
    adapter = LoraAdapter.init(model, rank=rank, alpha=2 * rank, seed=seed, role=role, language="fr")
    with torch.no_grad():  # PEFT's init has B = 0: make the adapter's term visible
        for _, B in adapter.tensors.values():
            B.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    for t in adapter.parameters():
        t.requires_grad_(False)
    return adapter


def _map(obj, fn):
    """fn applied to every floating tensor in nested tuples/lists (row indices and floats kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_map(o, fn) for o in obj)
    return obj


def oracle(op, *args, dy: torch.Tensor | None = None):
    """float64 ``op(*args)`` (or, given ``dy``, the gradients of every float input, in order) and the
    sum of the |terms| of each: every op here is a sum of products with positive coefficients, so
    the same op on the absolute values of its inputs (and of dy) gives it."""
    results = []
    for fix in (lambda t: t, torch.abs):
        leaves = []
        leaf = lambda t, fix=fix, leaves=leaves: leaves.append(fix(t.detach().double()).requires_grad_()) or leaves[-1]
        inputs = _map(args, leaf)
        out = op(*inputs)
        results.append(out if dy is None else torch.autograd.grad(out, leaves, fix(dy.double())))
    return results


def assert_bounded(got: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, n: int, u_out: float = 0.0):
    """|got - exact| <= n 2^-24 sum|terms| (fp32 sums of up to n terms, any order) + u_out |exact|
    (a final rounding to a narrower dtype)."""
    err = (got.double() - exact).abs()
    tol = 1.01 * n * 2.0**-24 * mag + u_out * exact.abs() + torch.finfo(torch.float64).tiny
    assert (err <= tol).all(), f"error {err.max().item():.3g} exceeds its bound by {(err / tol).max().item():.2f}x"


def _recording(calls: list, kind: str, real):
    def run(path, *args):
        y = real(path, *args)
        calls.append((path, kind, args, y))
        return y
    return run


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_model_linears_on_the_c_path_match_float64(dtype, strategy, monkeypatch):
    """A whole-model prefill and decode step with the C++ op forced on every linear: each call lies
    within its float64 bound. The oracle takes the bank the op is documented to get, the pair merged
    in fp32 by the reference (merge_pair) and stored in the op's dtype; the op then sums K + R terms
    in fp32 and, in bf16, rounds the output once."""
    model = random_model(CONFIG, seed=1, dtype=dtype)
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # random_model's are 0: make a dropped bias visible
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    r = 4
    # adapter terms as large as the base's, so that a 5% error in one is visible through bf16 rounding
    lora_in, lora_out = random_adapter(model, r, 1, "in", std=0.5), random_adapter(model, r, 2, "out", std=0.5)
    ctl = AdapterController(model)
    ctl.set_adapters(lora_in, lora_out, w_in=0.3, w_out=0.7, strategy=strategy)
    ids = torch.randint(0, 503, (2, 5), generator=torch.Generator().manual_seed(0))
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(dispatch, "choose", lambda kind, x, weight, run: "c")
        patch.setattr(ops, "_dual", _recording(calls, "dual", ops._dual))
        patch.setattr(ops, "_linear", _recording(calls, "linear", ops._linear))
        cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
        adapted = model.prefill(ids, None, cache)
        model.decode_step(ids[:, 0], cache)
    assert {path for path, *_ in calls} == {"c"} and {kind for _, kind, *_ in calls} == {"dual", "linear"}
    u = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    for _, kind, args, y in calls:
        x = args[0]
        if kind == "linear":
            assert_bounded(y, *oracle(torch.nn.functional.linear, *args), n=x.shape[-1] + 2, u_out=u)
            continue
        weight, bias, a_in, a_out, w_in, w_out, strat = args[1:]
        A, B = (t.to(dtype) for t in merge_pair(as_fp32(a_in), as_fp32(a_out), float(w_in), float(w_out), strat))
        exact, mag = oracle(dual_lora_linear_ref, x, weight, bias, (A, B, 1.0), None)
        assert_bounded(y, exact, mag, n=x.shape[-1] + 2 * r + 2, u_out=u)
    ctl.clear()
    plain = model(ids)[:, -1]
    assert (adapted.float() - plain.float()).abs().max() > 0.05  # the adapters did change the logits


@needs_c
@torch.no_grad()
def test_packed_bank_follows_in_place_updates():
    x, weight = torch.randn(3, 96), torch.randn(40, 96)
    A, B = torch.randn(4, 96), torch.randn(40, 4)
    before = ops.dual_lora_linear(x, weight, None, (A, B, 0.5), None, 1.0, 1.0)
    B.mul_(2)
    after = ops.dual_lora_linear(x, weight, None, (A, B, 0.5), None, 1.0, 1.0)
    assert_bounded(after, *oracle(dual_lora_linear_ref, x, weight, None, (A, B, 0.5), None), n=96 + 4 + 2)
    assert not torch.allclose(before, after)


def test_training_takes_the_differentiable_path():
    weight, dy = torch.randn(40, 96), torch.randn(3, 40)
    leaves = [torch.randn(3, 96), torch.randn(4, 96), torch.randn(40, 4)]
    x, A, B = (t.clone().requires_grad_() for t in leaves)
    ops.dual_lora_linear(x, weight, None, (A, B, 0.5), None).backward(dy)
    (dx, _, dA, dB), (mx, _, mA, mB) = oracle(dual_lora_linear_ref, leaves[0], weight, None,
                                              (leaves[1], leaves[2], 0.5), None, dy=dy)
    for got, exact, mag in ((x.grad, dx, mx), (A.grad, dA, mA), (B.grad, dB, mB)):
        assert_bounded(got, exact, mag, n=96 + 40 + 3 + 4)  # dx: N + r; dA: N then M; dB: K then M


def _as_banked(pairs, strategy, dtype):
    """Each pair as the one adapter of coefficient 1 the packed bank stores (merged in fp32 by the
    reference, stored in ``dtype``): what the inference paths, C++ and torch, take."""
    merged = lambda p: tuple(t.to(dtype) for t in merge_pair(as_fp32(p[0]), as_fp32(p[1]), *p[2:], strategy))
    return [((*merged(p), 1.0), None, 1.0, 0.0) for p in pairs]


def _random_case(M, K, N, r, dtype, seed):
    """x, weight, bias and two pairs whose adapters' terms are as large as the base's."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype)
    ad = lambda scale: (rand(r, K, s=K**-0.5), rand(N, r, s=(K / r) ** 0.5), scale)
    pairs = [(ad(0.5), ad(2.0), 0.3, 0.7) for _ in range(2)]
    return rand(M, K), rand(N, K, s=K**-0.5), rand(N), pairs


@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_the_fp32_result_rounded_once(strategy, monkeypatch):
    """Rows beyond the C++ kernel's reach, bf16: the torch path runs in fp32 (ops._emulated_bf16) on
    the packed bank, so each output is the fp32 result rounded to bf16 once (relative error <= 2^-8,
    bf16's unit roundoff, plus the fp32 sums' error); a dropped bias, adapter or pair is off by O(1)."""
    monkeypatch.setattr(dispatch, "NATIVE_BF16", False)
    M, K, N, r = dispatch.MAX_BUCKET + 3, 64, 48, 4
    x, weight, bias, pairs = _random_case(M, K, N, r, torch.bfloat16, 0)
    row_pair = torch.arange(M) % 2
    banked = _as_banked(pairs, strategy, torch.bfloat16)
    cases = [
        (ops.linear(x, weight, bias), oracle(torch.nn.functional.linear, x, weight, bias)),
        (ops.dual_lora_linear(x, weight, bias, *pairs[0], strategy),
         oracle(dual_lora_linear_ref, x, weight, bias, *banked[0])),
        (ops.pairwise_lora_linear(x, weight, bias, pairs, row_pair, strategy),
         oracle(pairwise_lora_linear_ref, x, weight, bias, banked, row_pair)),
    ]
    for got, (exact, mag) in cases:
        assert got.dtype == torch.bfloat16
        assert_bounded(got, exact, mag, n=K + 2 * r + 2, u_out=2.0**-8)  # fp32 sums, one rounding to bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_torch_path_in_inference_runs_the_packed_bank(dtype, strategy, monkeypatch):
    """Rows beyond the C++ kernel's reach: inference runs the packed bank by torch's GEMMs, x W^T +
    b (x W^T may be rounded before the bias is added) and x A^T each rounded to the dtype, then their
    sum with (x A^T) B^T rounded once, for one pair ([M, K] x) and for a pair per entry of dim 0
    ([B, T, K] x). Each output lies within that float64 bound; a dropped bias, adapter or pair, or a
    pair on the wrong rows, is off by O(1)."""
    monkeypatch.setattr(dispatch, "NATIVE_BF16", True)
    kernel, banks = cpu.lora_bank_linear_torch, []
    monkeypatch.setattr(cpu, "lora_bank_linear_torch", lambda *args: banks.append(args[3]) or kernel(*args))
    B, T, K, N, r = 3, dispatch.MAX_BUCKET // 3 + 2, 64, 48, 4
    x, weight, bias, pairs = _random_case(B * T, K, N, r, dtype, 1)
    row_pair = torch.tensor([1, 0, 1])
    banked = _as_banked(pairs, strategy, dtype)
    cases = [(ops.dual_lora_linear(x, weight, bias, *pairs[0], strategy), x, [banked[0]], torch.zeros(B * T)),
             (ops.pairwise_lora_linear(x.view(B, T, K), weight, bias, pairs, row_pair, strategy).view(B * T, N), x,
              banked, row_pair.repeat_interleave(T))]
    assert [A.shape[0] for A in banks] == [1, 2]  # both ran the bank, not the reference
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    d = lambda t: t.double()
    for got, x, bank, rows in cases:
        assert got.dtype == dtype
        base = torch.nn.functional.linear(d(x), d(weight), d(bias))
        base_mag = torch.nn.functional.linear(d(x).abs(), d(weight).abs(), d(bias).abs())
        y, mag, v_mag = base.clone(), base_mag.clone(), torch.zeros_like(base)
        for m, p in enumerate(rows.long().tolist()):
            (A, B_, _), *_ = bank[p]
            v = d(A) @ d(x[m])
            y[m] += d(B_) @ v
            mag[m] += d(B_).abs() @ (d(A).abs() @ d(x[m]).abs())
            v_mag[m] += d(B_).abs() @ v.abs()
        err = (got.double() - y).abs()
        tol = 1.01 * ((K + 2 * r + 2) * 2.0**-24 * mag + u * (base_mag + base.abs() + v_mag + y.abs()))
        assert (err <= tol).all(), f"error {err.max().item():.3g} exceeds its bound by {(err / tol).max().item():.2f}x"


@pytest.mark.parametrize("M", [2, dispatch.MAX_BUCKET + 44])
@torch.no_grad()
def test_inference_under_cpu_autocast_is_the_reference_under_autocast(M):
    """Autocast casts torch's GEMMs, not the C++ op's nor the bank's in-place update: under it every
    inference path is the reference, whose GEMMs it casts (bf16 out of fp32 inputs), at any rows."""
    x, weight, bias, pairs = _random_case(M, 32, 24, 4, torch.float32, 2)
    row_pair = torch.arange(M) % 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [ops.linear(x, weight, bias), ops.dual_lora_linear(x, weight, bias, *pairs[0]),
               ops.pairwise_lora_linear(x, weight, bias, pairs, row_pair)]
        expected = [torch.nn.functional.linear(x, weight, bias), dual_lora_linear_ref(x, weight, bias, *pairs[0]),
                    pairwise_lora_linear_ref(x, weight, bias, pairs, row_pair)]
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16 and torch.equal(g, e)


@pytest.mark.parametrize("M", [2, dispatch.MAX_BUCKET + 44])
def test_adapters_made_in_inference_mode_and_banks_cleared_after_unseen_writes(M):
    """Inference tensors have no version counter (their banks are cached as never written); a write
    through ``.data`` bumps none, and ``ops.clear_banks`` drops the stale bank. Each call equals the
    reference on the adapters as they are."""
    with torch.inference_mode():
        x, weight, bias, pairs = _random_case(M, 32, 24, 4, torch.float32, 3)
        got = ops.dual_lora_linear(x, weight, bias, *pairs[0])
    torch.testing.assert_close(got, dual_lora_linear_ref(x, weight, bias, *pairs[0]), rtol=1e-5, atol=1e-5)
    _, _, _, pairs = _random_case(M, 32, 24, 4, torch.float32, 4)
    with torch.no_grad():
        ops.dual_lora_linear(x, weight, bias, *pairs[0])
        version = pairs[0][0][0]._version
        pairs[0][0][0].data.mul_(3.0)
        assert pairs[0][0][0]._version == version  # the write the cache cannot see
        ops.clear_banks()
        got = ops.dual_lora_linear(x, weight, bias, *pairs[0])
    torch.testing.assert_close(got, dual_lora_linear_ref(x, weight, bias, *pairs[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [2, dispatch.MAX_BUCKET + 44])
@torch.no_grad()
def test_pairs_without_adapters_are_the_plain_linear(M):
    x, weight, bias, _ = _random_case(M, 32, 24, 4, torch.float32, 5)
    pairs = [(None, None, 1.0, 1.0)] * 2
    got = ops.pairwise_lora_linear(x, weight, bias, pairs, torch.arange(M) % 2)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_bf16_emulation_follows_the_autograd_graph_not_the_grad_mode(monkeypatch):
    """The fp32 detour serves every call that records no graph, as dispatch calibrates it (with
    grad mode on and nothing requiring grad it is the same call); a graph keeps bf16 (an fp32 copy
    of W would be saved for the backward pass)."""
    monkeypatch.setattr(dispatch, "NATIVE_BF16", False)
    x, weight = torch.ones(3, 8, dtype=torch.bfloat16), torch.ones(4, 8, dtype=torch.bfloat16)
    A = torch.ones(2, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.enable_grad():
        assert ops._emulated_bf16(x, weight, (None,))
        assert not ops._emulated_bf16(x.requires_grad_(), weight)
        assert not ops._emulated_bf16(x.detach(), weight, (None, 0.5, A))
    with torch.no_grad():
        assert ops._emulated_bf16(x, weight, (A,))
    monkeypatch.setattr(dispatch, "NATIVE_BF16", True)
    assert not ops._emulated_bf16(x.detach(), weight)


def assert_kernel_bounded(got, x, weight, bias, pairs, row_pair, strategy):
    """A Triton kernel's output (dtype of ``x``) against float64 of its inputs: each row's pair as
    ``pair_parts`` applies it (an "ab" pair merged in the dtype, as the kernels do), fp32 sums of
    K + R + 2 terms, ``v = (x A^T) c`` rounded once to the dtype before its dot with B, and the
    output's one rounding: ``|err| <= (K+R+2) 2^-24 sum|terms| + u |v| |B|^T + u |y|``."""
    u = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[x.dtype]
    d = lambda t: None if t is None else t.double()
    y = torch.nn.functional.linear(d(x), d(weight), d(bias))
    mag = torch.nn.functional.linear(d(x).abs(), d(weight).abs(), None if bias is None else d(bias).abs())
    v_mag, rank = torch.zeros_like(y), 0
    for p in torch.unique(row_pair).tolist():
        rows = (row_pair == p).nonzero().squeeze(1)
        parts = pair_parts(*pairs[p], strategy)
        rank = max(rank, sum(A.shape[0] for A, _, _ in parts))
        for A, B, c in parts:
            v, v_abs = (d(x[rows]) @ d(A).t()) * float(c), (d(x[rows]).abs() @ d(A).abs().t()) * abs(float(c))
            y[rows] += v @ d(B).t()
            mag[rows] += v_abs @ d(B).abs().t()
            v_mag[rows] += v.abs() @ d(B).abs().t()
    assert got.shape == y.shape and got.dtype == x.dtype
    err = (got.double() - y).abs()
    tol = 1.01 * ((x.shape[-1] + rank + 2) * 2.0**-24 * mag + u * (v_mag + y.abs())) + torch.finfo(torch.float64).tiny
    assert (err <= tol).all(), f"error {err.max().item():.3g} exceeds its bound by {(err / tol).max().item():.2f}x"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_cuda_dispatch_under_bf16_autocast_matches_reference(strategy):
    """Under bf16 autocast the op runs the Triton kernel on bf16 copies of its inputs
    (ops._autocast): bounded against float64 of those copies."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 256, device="cuda", generator=g)
    weight = torch.randn(192, 256, device="cuda", generator=g) / 16
    adapters = [(torch.randn(8, 256, device="cuda", generator=g) / 16,
                 torch.randn(192, 8, device="cuda", generator=g) / 8, 2.0) for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ops.dual_lora_linear(x, weight, None, *adapters, 0.3, 0.7, strategy)
    bf16 = lambda a: (a[0].bfloat16(), a[1].bfloat16(), a[2])
    pairs = [(bf16(adapters[0]), bf16(adapters[1]), 0.3, 0.7)]
    assert_kernel_bounded(got, x.bfloat16(), weight.bfloat16(), None, pairs, torch.zeros(37, dtype=torch.long,
                                                                                           device="cuda"), strategy)


@pytest.mark.parametrize("ranks,strategy,takes", [
    ((128, 128), "output", True), ((129, 128), "output", False), ((256, None), "output", True),
    ((257, None), "output", False), ((256, 256), "ab", True), ((None, None), "output", False),
])
def test_triton_takes_total_ranks_up_to_the_compiled_widest(ranks, strategy, takes, monkeypatch):
    """A pair wider than kernels.configs.MAX_RANK runs torch's GEMMs on CUDA: at 512 fp32 tiles need
    more shared memory than sm80 has (tests/test_kernels_compile.py compiles up to 256)."""
    from modlora.kernels import configs

    monkeypatch.setattr(ops, "_HAVE_TRITON", True)
    adapter = lambda r: None if r is None else (torch.zeros(r, 8), torch.zeros(4, r), 1.0)
    pair = (adapter(ranks[0]), adapter(ranks[1]), 0.5, 0.5)
    assert configs.MAX_RANK == 256
    assert ops._triton_takes([pair], strategy) is takes
    assert ops._triton_takes([(None, None, 1.0, 1.0), pair], strategy) is takes
    monkeypatch.setattr(ops, "_HAVE_TRITON", False)
    assert not ops._triton_takes([pair], strategy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pair_wider_than_the_kernels_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, weight = torch.randn(5, 64, device="cuda", generator=g), torch.randn(48, 64, device="cuda", generator=g)
    adapters = [(torch.randn(r, 64, device="cuda", generator=g) / 8, torch.randn(48, r, device="cuda", generator=g),
                 0.5) for r in (200, 100)]
    got = ops.dual_lora_linear(x, weight, None, *adapters, 0.3, 0.7)
    torch.testing.assert_close(got, dual_lora_linear_ref(x, weight, None, *adapters, 0.3, 0.7), rtol=1e-5, atol=1e-4)


def _malformed_case(rows: int, edit: str):
    g = torch.Generator().manual_seed(0)
    K, N, r = 24, 16, 4
    x, W, b = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    a_in = (torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 0.5)
    a_out = (torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 0.5)
    pairs = [(a_in, a_out, 0.3, 0.7), (a_in, None, 1.0, 1.0)]
    row_pair = torch.arange(rows) % 2
    strategy = "output"
    if edit == "bias [1]":
        b = b[:1]
    elif edit == "B [1, r]":
        pairs[0] = (a_in, (a_out[0], a_out[1][:1], 0.5), 0.3, 0.7)
    elif edit == "ab, A [r, 1]":
        strategy, pairs[0] = "ab", (a_in, (a_out[0][:, :1], a_out[1], 0.5), 0.3, 0.7)
    elif edit == "short row_pair":
        row_pair = row_pair[:2]
    elif edit == "row_pair out of range":
        row_pair = row_pair.clone().fill_(5)
    elif edit == "weight [2]":
        pairs[0] = (a_in, a_out, torch.tensor([0.3, 0.7]), 0.7)
    elif edit == "NaN weight":
        pairs[0] = (a_in, a_out, float("nan"), 0.7)
    elif edit == "ab, negative weight":
        strategy, pairs[0] = "ab", (a_in, a_out, -0.3, 0.7)
    return x, W, b, pairs, row_pair, strategy


@pytest.mark.parametrize("edit,message", [
    ("bias [1]", r"bias must be \[16\] for weight \[16, 24\], got shape \(1,\)"),
    ("B [1, r]", r"pair 0 lora_out must be \(A \[r, 24\], B \[16, r\], scale\), got A \(4, 24\), B \(1, 4\)"),
    ("ab, A [r, 1]", r"pair 0 lora_out must be \(A \[r, 24\]"),
    ("short row_pair", r"row_pair must be a 1-D integer tensor with one entry per row of x"),
    ("row_pair out of range", r"row_pair values must lie in \[0, 2\)"),
    ("weight [2]", r"w_in must be a number or a 0-dim tensor, got shape \(2,\)"),
    ("NaN weight", r"w_in must be a finite number or a 0-dim tensor, got nan"),
    ("ab, negative weight", r"needs w_in >= 0, got -0.3"),
])
@pytest.mark.parametrize("path", ["c or dispatch", "autograd", "rows above the buckets"])
def test_malformed_arguments_are_named_on_every_path(edit, message, path):
    """The torch paths (autograd's reference, more rows than dispatch buckets) broadcast some
    mismatches silently where the C++ op names them: every path checks before it runs."""
    x, W, b, pairs, row_pair, strategy = _malformed_case(300 if path == "rows above the buckets" else 4, edit)
    if path == "autograd":
        x.requires_grad_(True)
    with pytest.raises((ValueError, IndexError), match=message):
        ops.pairwise_lora_linear(x, W, b, pairs, row_pair, strategy)
    if "row_pair" not in edit:
        with pytest.raises((ValueError, IndexError), match=message.replace("pair 0 ", "pair 0 ")):
            ops.dual_lora_linear(x, W, b, *pairs[0], strategy)


def test_a_grouped_call_checks_its_parts():
    x, W, b, pairs, _, _ = _malformed_case(4, "")
    halves = [(W[:8], b[:8], [], "output", None), (W[8:], b[8:], [], "output", None)]
    with pytest.raises(ValueError, match=r"the parts' weights must tile weight's 16 rows, got \[8\]"):
        ops.grouped_linear(x, W, b, halves[:1])
    with pytest.raises(ValueError, match="a part has a bias but the group's bias is None"):
        ops.grouped_linear(x, W, None, halves)
    short_b = ((pairs[0][0][0], pairs[0][0][1][:6], 0.5), None, 1.0, 1.0)  # B of 6 rows for a block of 8
    with pytest.raises(ValueError, match=r"pair 0 lora_in must be \(A \[r, 24\], B \[8, r\], scale\)"):
        ops.grouped_linear(x, W, b, [(W[:8], b[:8], [short_b], "output", None), halves[1]])
