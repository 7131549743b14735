"""Triton dual-LoRA linear vs the plain-torch reference: value and every gradient.

Without CUDA the kernels run in Triton's interpreter (fp32, fp16); with CUDA the same cases run on
the GPU, plus bf16. Tolerance, flash-attention style: the kernel's error against a float64
reference (same inputs) must be at most ``FACTOR`` times torch's own error in the same dtype, plus
a floor of a couple of units of the dtype's precision. It scales with K, rank and magnitudes by
construction, and a wrong coefficient fails it (``test_tolerance_catches_a_wrong_coefficient``).
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
FACTOR = 2.0
# Floor, relative to the tensor's largest value, for when torch happens to be exact on a tensor:
# one unit roundoff (2^-11, 2^-8) for fp16/bf16, whose output rounding dominates; four for fp32,
# where the w gradients are sums over M * r products that torch may round luckily.
FLOOR = {torch.float32: 2.5e-7, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


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
    return {"view": view, "W": W, "b": bvec, "adapters": adapters, "w": w, "leaves": leaves}


def run(case, op, cast=None, **kw):
    """y and the gradients of every leaf, optionally after casting all inputs (float64 oracle)."""
    leaves = case["leaves"]
    if cast is not None:
        leaves = {k: v.detach().to(cast).requires_grad_() for k, v in leaves.items()}
    get = lambda key, default: leaves.get(key, default if cast is None or default is None else default.to(cast))
    x = case["view"](leaves["x"])
    adapters = {name: (get(f"A_{name}", A), get(f"B_{name}", B), s) for name, (A, B, s) in case["adapters"].items()}
    w = {name: get(f"w_{name}", v) if isinstance(v, torch.Tensor) else v for name, v in case["w"].items()}
    y = op(x, get("W", case["W"]), get("b", case["b"]), adapters.get("in"), adapters.get("out"),
           w["in"], w["out"], **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
    return {"y": y, **dict(zip(leaves, grads, strict=True))}


def errors(case, dtype, **kw):
    """Per tensor: (kernel error, torch's error, floor), all against the float64 reference."""
    strategy = kw.get("strategy", "output")
    out = run(case, dual_lora_linear, **kw)
    lo = run(case, dual_lora_linear_ref, strategy=strategy)
    hi = run(case, dual_lora_linear_ref, cast=torch.float64, strategy=strategy)
    report = {}
    for key, ref in hi.items():
        assert out[key].shape == ref.shape and out[key].dtype == lo[key].dtype, key
        err_kernel, err_torch = ((t.double() - ref).abs().max().item() for t in (out[key], lo[key]))
        report[key] = (err_kernel, err_torch, FLOOR[dtype] * ref.abs().max().item())
    return report


def assert_matches(case, dtype, **kw):
    for key, (err, torch_err, floor) in errors(case, dtype, **kw).items():
        assert err <= FACTOR * torch_err + floor, (
            f"{key}: kernel error {err:.3g} > {FACTOR} x torch's {torch_err:.3g} + {floor:.3g}")


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


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-3), (torch.float16, 3e-2)], ids=str)
def test_tolerance_catches_a_wrong_coefficient(dtype, rel, monkeypatch):
    """The smaller adapter term's coefficient off by 0.1% (fp32) or 3% (fp16) fails the check on y.

    That term is a seventh of the other (coef 0.15 vs 1.05): 3% of it is about 0.3% of y, which is
    where fp16's own rounding (2^-11 relative) starts to hide an error.
    """
    case = make_case(dtype, 7, 130, 96, 4, 8, layout="3d")
    apply = dual_lora._DualLoRALinear.apply

    def wrong(x, W, b, A1, B1, c1, A2, B2, c2, variant):
        return apply(x, W, b, A1, B1, c1, A2, B2, c2 * (1 + rel), variant)

    monkeypatch.setattr(dual_lora._DualLoRALinear, "apply", wrong)
    err, torch_err, floor = errors(case, dtype, variant="fused")["y"]
    assert err > FACTOR * torch_err + floor


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
    dw_in, dw_out = torch.autograd.grad(y.sum(), [case["w"]["in"], case["w"]["out"]])
    assert calls == ["lora_gemm", "lora_shrink"]
    ref = dual_lora_linear_ref(x, case["W"], case["b"], (A1, B1, s1), (A2, B2, s2), case["w"]["in"],
                               case["w"]["out"])
    ref_in, ref_out = torch.autograd.grad(ref.sum(), [case["w"]["in"], case["w"]["out"]])
    torch.testing.assert_close((dw_in, dw_out), (ref_in, ref_out), rtol=1e-5, atol=1e-5)


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
def test_strided_bias(variant):
    case = make_case(torch.float32, 7, 64, 48, 4, 8)
    x, (A, B, s) = case["leaves"]["x"], case["adapters"]["in"]
    bias = torch.randn(96, generator=torch.Generator().manual_seed(5)).to(DEVICE)[::2]  # stride 2
    y = dual_lora_linear(x, case["W"], bias, (A, B, s), None, 0.7, variant=variant)
    ref = dual_lora_linear_ref(x, case["W"], bias, (A, B, s), None, 0.7)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_no_adapter_is_the_plain_linear():
    case = make_case(torch.float32, 3, 64, 48, None, None)
    x = case["leaves"]["x"]
    torch.testing.assert_close(dual_lora_linear(x, case["W"], case["b"], None, None),
                               torch.nn.functional.linear(x, case["W"], case["b"]))
