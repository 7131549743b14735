"""Triton dual-LoRA linear vs the plain-torch reference: value and every gradient.

Without CUDA the kernels run in Triton's interpreter (fp32, fp16); with CUDA the same cases run on
the GPU, plus bf16. Tolerance, derived from the computation (not from torch's own luck on the
machine): every result is a sum of products, so per element

    |kernel - float64 reference| <= (n * 2^-24 + roundings * u(dtype)) * sum |terms|

where ``n`` is the length of the chain of reductions that produces it (fp32 accumulation, any
summation order), ``u`` the dtype's unit roundoff (for the few roundings of intermediates and of
the output to the dtype), and ``sum |terms|`` is the same reference evaluated in float64 on the
absolute values of every input (and of dy). The learned-weight gradients, sums over M N K r
products, get the same bound applied factor by factor (``weight_grad_bound``). A dropped rank
column, a wrong coefficient or a missing bias fails it (``test_tolerance_catches_injected_bugs``).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # also set in conftest.py, which runs before any test module can import triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if not CUDA and isinstance(tl.cdiv, triton.runtime.JITFunction):
    # Triton fixes its mode, its own library included, when first imported: too late to change.
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in the environment or "
                "in tests/conftest.py", pytrace=False)

import modlora.kernels.dual_lora as dual_lora  # noqa: E402
from modlora.kernels import dual_lora_linear, dual_lora_linear_ref  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Unit roundoff per dtype; accumulation is fp32 in every dtype (tl.dot, torch's CPU/GPU GEMMs).
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U_ACC = 2.0**-24


def roundings(key: str, merged: bool) -> int:
    """Roundings to the dtype along one term's chain, at most: the output, and c u (c g) before its
    dot with B (A) in the kernels; a merged "ab" pair adds c_a, c_a A and c_a A1 + c_a A2 for both A
    and B (and their gradients flow back through them). The fp32 w gradients of an unmerged pair
    are fp32 throughout (u and g are kept in fp32)."""
    return 8 if merged else 0 if key.startswith("w_") else 2


def make_case(dtype, m, k, n, r_in, r_out, bias=True, layout="2d", learned=False, train_base=False,
              device=DEVICE, seed=0):
    """Inputs with base and adapter terms of similar size (so an adapter bug is visible in y)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)
    if layout == "strided":  # [M, K] view with strides (2K, 2): no copy on reshape
        base = rand(m, 2 * k)
        view = lambda t: t[:, ::2]
    elif layout == "3d":  # [B, S, K] transposed from [S, B, K]: reshape copies
        b = 3 if m % 3 == 0 else 1
        base = rand(m // b, b, k)
        view = lambda t: t.transpose(0, 1)
    else:
        base = rand(m, k)
        view = lambda t: t
    leaves = {"x": base.requires_grad_()}
    W, bvec = rand(n, k, scale=k**-0.5), rand(n) if bias else None
    if train_base:
        leaves["W"] = W.requires_grad_()
        leaves["b"] = bvec.requires_grad_()
    adapters = {}
    for name, r, scale in (("in", r_in, 1.5), ("out", r_out, 0.5)):
        if r is not None:
            A, B = rand(r, k, scale=k**-0.5).requires_grad_(), rand(n, r, scale=r**-0.5).requires_grad_()
            leaves[f"A_{name}"], leaves[f"B_{name}"] = A, B
            adapters[name] = (A, B, scale)
    w = {"in": 0.7, "out": 0.3}
    if learned:
        for name in adapters:
            w[name] = torch.tensor(w[name], device=device, requires_grad=True)
            leaves[f"w_{name}"] = w[name]
    r = sum(rank for rank in (r_in, r_out) if rank is not None)
    return {"view": view, "W": W, "b": bvec, "adapters": adapters, "w": w, "leaves": leaves, "dims": (m, k, n, r)}


def run(case, op, cast=None, magnitude=False, **kw):
    """y and the gradients of every leaf, optionally after casting all inputs (float64 oracle).

    ``magnitude``: every input (and dy) replaced by its absolute value, so that each result is the
    sum of the absolute values of its terms (all coefficients are positive: w, scale, sqrt(w s)).
    """
    leaves = case["leaves"]
    fix = (lambda t: t.abs()) if magnitude else (lambda t: t)
    if cast is not None:
        leaves = {k: fix(v.detach().to(cast)).requires_grad_() for k, v in leaves.items()}
    get = lambda key, default: leaves.get(key, default if cast is None or default is None else fix(default.to(cast)))
    x = case["view"](leaves["x"])
    adapters = {name: (get(f"A_{name}", A), get(f"B_{name}", B), s) for name, (A, B, s) in case["adapters"].items()}
    w = {name: get(f"w_{name}", v) if isinstance(v, torch.Tensor) else v for name, v in case["w"].items()}
    y = op(x, get("W", case["W"]), get("b", case["b"]), adapters.get("in"), adapters.get("out"),
           w["in"], w["out"], **kw)
    grads = torch.autograd.grad(y, list(leaves.values()), fix(_dy(case, y.shape).to(y.dtype)))
    return {"y": y, **dict(zip(leaves, grads, strict=True))}


def _dy(case, shape) -> torch.Tensor:
    """The output gradient, in the case's dtype (the float64 oracle gets the same rounded values)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, case["leaves"]["x"].dtype)


def chain_lengths(case) -> dict[str, int]:
    """Per result, the summed lengths of the reductions behind it (y: x W^T over K, u B^T over R)."""
    m, k, n, r = case["dims"]
    a, b = k + m + 1, n + m + 1  # dB = dy^T u (u over K, then M); dA = g^T x (g = dy B over N, then M)
    return {"y": k + r + 2, "x": n + r + 2, "W": m, "b": m, "A_in": b, "A_out": b, "B_in": a, "B_out": a,
            # dw = sum(g * u) over M r; through a merged "ab" pair also dA_m . A over R K, dB_m . B over N R
            "w_in": k + n + m * r + r * k + n * r, "w_out": k + n + m * r + r * k + n * r}


def errors(case, dtype, **kw):
    """Per tensor: the largest ratio of the kernel's error (vs float64) to its bound, and that error."""
    strategy = kw.get("strategy", "output")
    out = run(case, dual_lora_linear, **kw)
    hi = run(case, dual_lora_linear_ref, cast=torch.float64, strategy=strategy)
    mag = run(case, dual_lora_linear_ref, cast=torch.float64, magnitude=True, strategy=strategy)
    merged = strategy == "ab" and len(case["adapters"]) == 2
    report = {}
    for key, ref in hi.items():
        expect = case["leaves"][key].dtype if key in case["leaves"] else dtype
        assert out[key].shape == ref.shape and out[key].dtype == expect, key
        err = (out[key].double() - ref).abs()
        if key.startswith("w_") and not merged:
            bound = weight_grad_bound(case, key[2:])
        else:
            bound = (chain_lengths(case)[key] * U_ACC + roundings(key, merged) * U[dtype]) * mag[key]
        report[key] = ((err / (bound + torch.finfo(torch.float64).tiny)).max().item(), err.max().item())
    return report


def weight_grad_bound(case, name: str) -> float:
    """Bound on the error of dL/dw = s sum(g * u), g = dy B, u = x A^T, from the error of each factor.

    The fully expanded sum of |terms| (over M N K r products of random sign) is hundreds of times
    the gradient; bounding g (N terms) and u (K terms) first keeps the bound within a few % of it.
    """
    m, k, n, _ = case["dims"]
    A, B, scale = (t.detach().double() if isinstance(t, torch.Tensor) else t for t in case["adapters"][name])
    x = case["view"](case["leaves"]["x"]).detach().double().reshape(m, k)
    dy = _dy(case, (m, n)).double()
    g, u, G, V = dy @ B, x @ A.t(), dy.abs() @ B.abs(), x.abs() @ A.abs().t()
    sums = (n + 2) * (G * u.abs()).sum() + (k + 2) * (g.abs() * V).sum() + (m * A.shape[0] + 2) * (g * u).abs().sum()
    return 1.01 * scale * U_ACC * sums.item()  # 1.01: the second-order terms (products of two errors)


def assert_matches(case, dtype, **kw):
    for key, (ratio, err) in errors(case, dtype, **kw).items():
        assert ratio <= 1.0, f"{key}: kernel error {err:.3g} exceeds its bound by {ratio:.2f}x"


# (M, K, N, ranks for "output" (unequal), ranks for "ab", bias, layout, learned weights)
SHAPES = [
    (1, 64, 48, (1, 4), (4, 4), True, "2d", False),
    (7, 130, 96, (8, 4), (1, 1), False, "3d", True),
    (33, 130, 48, (4, 8), (8, 8), True, "strided", True),
]
# bf16 on the GPU only: Triton 3.9's interpreter returns garbage for a bf16 tl.dot (checked on a bare
# 16x16 dot), so it cannot be the oracle's judge on CPU.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


@pytest.mark.parametrize("variant", ["fused", "split"])
@pytest.mark.parametrize("strategy", ["output", "ab"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-{s[6]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_adapters(dtype, shape, strategy, variant):
    m, k, n, ranks_out, ranks_ab, bias, layout, learned = shape
    ranks = ranks_out if strategy == "output" else ranks_ab
    case = make_case(dtype, m, k, n, *ranks, bias=bias, layout=layout, learned=learned)
    assert_matches(case, dtype, strategy=strategy, variant=variant)


@pytest.mark.parametrize("variant", ["fused", "split"])
@pytest.mark.parametrize(("dtype", "m", "k", "n", "r_in", "r_out", "strategy"), [
    (torch.float32, 7, 130, 96, 8, None, "output"),
    (torch.float16, 33, 64, 48, None, 4, "ab"),
])
def test_single_adapter(dtype, m, k, n, r_in, r_out, strategy, variant):
    case = make_case(dtype, m, k, n, r_in, r_out, learned=True)
    assert_matches(case, dtype, strategy=strategy, variant=variant)


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_large_ranks_and_trainable_base(variant):
    case = make_case(torch.float32, 5, 64, 48, 128, 64, learned=True, train_base=True)
    assert_matches(case, torch.float32, variant=variant)


def _drop_rank_column(x, W, b, A1, B1, c1, A2, B2, c2, variant):
    keep = torch.ones(B1.shape[1], dtype=B1.dtype, device=B1.device)
    keep[-1] = 0
    return x, W, b, A1, B1 * keep, c1, A2, B2, c2, variant


def _wrong_coefficient(x, W, b, A1, B1, c1, A2, B2, c2, variant):
    return x, W, b, A1, B1, c1 * 1.1, A2, B2, c2, variant


def _missing_bias(x, W, b, A1, B1, c1, A2, B2, c2, variant):
    return x, W, None if b is None else b * 0, A1, B1, c1, A2, B2, c2, variant  # b * 0: still in the graph


# One case per test family above: (dtype, make_case arguments, dual_lora_linear arguments).
FAMILIES = {
    "two_adapters": (torch.float16, (33, 130, 48, 4, 8), dict(layout="strided", learned=True), {}),
    "two_adapters_ab": (torch.float32, (7, 130, 96, 4, 4), dict(layout="3d", learned=True), {"strategy": "ab"}),
    "single_adapter": (torch.float16, (33, 64, 48, None, 4), dict(learned=True), {"strategy": "ab"}),
    "large_ranks": (torch.float32, (5, 64, 48, 128, 64), dict(learned=True, train_base=True), {}),
    "many_row_tiles": (torch.float32, (300, 64, 160, 4, 4), dict(learned=True, train_base=True), {}),
}


@pytest.mark.parametrize("bug", [_drop_rank_column, _wrong_coefficient, _missing_bias], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("family", FAMILIES)
def test_tolerance_catches_injected_bugs(family, bug, monkeypatch):
    """Each family's bound fails on a kernel that drops its last rank column, has its first
    adapter's coefficient 10% off, or forgets the bias (the bug is injected at the autograd
    Function, so the kernels' forward and backward both see it)."""
    dtype, dims, case_kw, kw = FAMILIES[family]
    case = make_case(dtype, *dims, **case_kw)
    apply = dual_lora._DualLoRALinear.apply
    monkeypatch.setattr(dual_lora._DualLoRALinear, "apply", lambda *args: apply(*bug(*args)))
    ratio, err = errors(case, dtype, variant="fused", **kw)["y"]
    assert ratio > 1.0, f"an injected bug stayed within the bound (error {err:.3g}, {ratio:.2f}x of it)"


@pytest.mark.parametrize("family", ["two_adapters", "many_row_tiles"])
def test_weight_gradient_bound_catches_a_wrong_gradient(family, monkeypatch):
    """The learned weights' gradient (dc = sum(g u), backward only) 5% off fails its bound."""
    dtype, dims, case_kw, kw = FAMILIES[family]
    case = make_case(dtype, *dims, **case_kw)
    backward = dual_lora._DualLoRALinear.backward

    def wrong(ctx, dy):
        grads = list(backward(ctx, dy))
        grads[5] = grads[5] * 1.05  # dc1: the first adapter's coefficient
        return tuple(grads)

    monkeypatch.setattr(dual_lora._DualLoRALinear, "backward", staticmethod(wrong))
    report = errors(case, dtype, variant="fused", **kw)
    assert report["y"][0] <= 1.0 and report["w_in"][0] > 1.0, report


def test_only_requested_gradients_are_computed(monkeypatch):
    """Weight learning with frozen adapters and x: no dx GEMM in the backward, only the g shrink."""
    calls = []
    for name in ("lora_gemm", "lora_shrink"):
        fn = getattr(dual_lora, name)
        monkeypatch.setattr(dual_lora, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    case = make_case(torch.float32, 7, 64, 48, 4, 8, learned=True)
    x = case["leaves"]["x"].detach()
    (A1, B1, s1), (A2, B2, s2) = case["adapters"]["in"], case["adapters"]["out"]
    y = dual_lora_linear(x, case["W"], case["b"], (A1.detach(), B1.detach(), s1), (A2.detach(), B2.detach(), s2),
                         case["w"]["in"], case["w"]["out"], variant="fused")
    assert calls == ["lora_gemm"]
    dw = torch.autograd.grad(y, [case["w"]["in"], case["w"]["out"]], _dy(case, y.shape))
    assert calls == ["lora_gemm", "lora_shrink"]
    ref = run(case, dual_lora_linear_ref, cast=torch.float64)
    for name, got in zip(("in", "out"), dw, strict=True):
        assert (got.double() - ref[f"w_{name}"]).abs() <= weight_grad_bound(case, name)


def test_clear_errors():
    case = make_case(torch.float32, 4, 64, 48, 4, 8)
    x, W = case["leaves"]["x"].detach(), case["W"]
    lin, lout = case["adapters"]["in"], case["adapters"]["out"]
    with pytest.raises(ValueError, match="equal ranks"):
        dual_lora_linear(x, W, None, lin, lout, strategy="ab")
    with pytest.raises(ValueError, match="unknown variant"):
        dual_lora_linear(x, W, None, lin, lout, variant="tiled")
    with pytest.raises(TypeError, match="dtype mismatch"):
        dual_lora_linear(x.half(), W, None, lin, lout)
    if not CUDA:
        with pytest.raises(TypeError, match="interpreter cannot compute bf16"):
            dual_lora_linear(x.bfloat16(), W.bfloat16(), None, None, (lout[0].bfloat16(), lout[1].bfloat16(), 1.0))
    with pytest.raises(ValueError, match="shape mismatch"):
        dual_lora_linear(x[:, :32], W, None, (lin[0][:, :32], lin[1], 1.0), None)


@pytest.mark.parametrize("variant", [None, "fused"])
@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_many_row_tiles(strategy, variant):
    """M = 300: several row tiles (grouped tile order), 128-wide column tiles, and the dispatcher's
    own pick (None: split above FUSED_MAX_M); every gradient, with the base trained too."""
    case = make_case(torch.float32, 300, 64, 160, 4, 4, learned=True, train_base=True)
    assert dual_lora.pick_variant(300) == "split"
    assert_matches(case, torch.float32, strategy=strategy, variant=variant)


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_more_row_tiles_than_one_group(variant, monkeypatch):
    """16-row tiles at M = 150: 10 row tiles, more than a group of GROUP_M = 8 in the grouped tile
    order, so programs of the second group must find their own rows and columns."""
    import modlora.kernels.lora_gemm as lora_gemm_module

    monkeypatch.setattr(lora_gemm_module, "gemm_config", lambda *a, **k: lora_gemm_module.GemmConfig(16, 32, 32))
    case = make_case(torch.float32, 150, 64, 96, 4, 8)
    assert_matches(case, torch.float32, variant=variant)


@pytest.mark.parametrize("variant", ["fused", "split"])
@pytest.mark.parametrize("trained", ["w_out", "A_out", "B_out"])
def test_only_the_second_adapter_trains(trained, variant):
    """The first adapter, its weight and x frozen: the backward computes only what the second needs."""
    case = make_case(torch.float32, 7, 64, 48, 4, 8, learned=True)
    (A1, B1, s1), (A2, B2, s2) = case["adapters"]["in"], case["adapters"]["out"]
    tensors = {"x": case["leaves"]["x"], "A_in": A1, "B_in": B1, "w_in": case["w"]["in"], "A_out": A2, "B_out": B2,
               "w_out": case["w"]["out"]}

    def grad(dtype, op, **kw):
        t = {k: v.detach().to(dtype).requires_grad_(k == trained) for k, v in tensors.items()}
        y = op(t["x"], case["W"].to(dtype), case["b"].to(dtype), (t["A_in"], t["B_in"], s1),
               (t["A_out"], t["B_out"], s2), t["w_in"], t["w_out"], **kw)
        return torch.autograd.grad(y, t[trained], _dy(case, y.shape).to(dtype))[0]

    got, ref = grad(torch.float32, dual_lora_linear, variant=variant), grad(torch.float64, dual_lora_linear_ref)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_strided_bias(variant):
    case = make_case(torch.float32, 7, 64, 48, 4, 8)
    case["b"] = torch.randn(96, generator=torch.Generator().manual_seed(5)).to(DEVICE)[::2]  # stride 2
    assert_matches(case, torch.float32, variant=variant)


def test_no_adapter_is_the_plain_linear():
    case = make_case(torch.float32, 3, 64, 48, None, None)
    x = case["leaves"]["x"]
    torch.testing.assert_close(dual_lora_linear(x, case["W"], case["b"], None, None),  # the same call
                               torch.nn.functional.linear(x, case["W"], case["b"]), rtol=0, atol=0)
