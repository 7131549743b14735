"""The dispatch point: every backend it picks gives the reference's result, on the whole model too."""

import contextlib

import pytest
import torch

from modlora import cpu, dispatch, ops
from modlora.adapters import AdapterController, LoraAdapter
from modlora.config import Qwen2Config
from modlora.kernels import dual_lora_linear_ref, pairwise_lora_linear_ref
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


def random_adapter(model, rank, seed, role):
    adapter = LoraAdapter.init(model, rank=rank, alpha=2 * rank, seed=seed, role=role, language="fr")
    with torch.no_grad():  # PEFT's init has B = 0: make the adapter's term visible
        for _, B in adapter.tensors.values():
            B.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    for t in adapter.parameters():
        t.requires_grad_(False)
    return adapter


# Whole-model logits, C++ vs torch path: fp32 sums in different orders (~1e-6 relative); bf16 rounds
# to 8 bits once more in one path, on logits of O(0.1): 2e-2 catches a dropped adapter (its term is O(1)).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


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


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_model_logits_with_c_equal_torch_path(dtype, strategy):
    model = random_model(CONFIG, seed=1, dtype=dtype)
    lora_in, lora_out = random_adapter(model, 4, 1, "in"), random_adapter(model, 4, 2, "out")
    ctl = AdapterController(model)
    ctl.set_adapters(lora_in, lora_out, w_in=0.3, w_out=0.7, strategy=strategy)
    ids = torch.randint(0, 503, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
    fast = torch.stack((model.prefill(ids, None, cache), model.decode_step(ids[:, 0], cache)))
    with torch_path():
        cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
        slow = torch.stack((model.prefill(ids, None, cache), model.decode_step(ids[:, 0], cache)))
        ctl.clear()
        plain = model(ids)[:, -1]
    torch.testing.assert_close(fast.float(), slow.float(), **TOL[dtype])
    assert (slow[0].float() - plain.float()).abs().max() > 0.05  # the adapters did change the logits


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


@pytest.mark.parametrize("strategy", ["output", "ab"])
@torch.no_grad()
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_the_fp32_result_rounded_once(strategy, monkeypatch):
    """Rows beyond the C++ kernel's reach, bf16: the torch path runs in fp32 (ops._emulated_bf16), so
    each output is the fp32 result rounded to bf16 once (relative error <= 2^-8, bf16's unit
    roundoff, plus the fp32 sums' error); a dropped bias, adapter or pair is off by O(1)."""
    monkeypatch.setattr(ops, "_NATIVE_BF16", False)
    g = torch.Generator().manual_seed(0)
    M, K, N, r = dispatch.MAX_BUCKET + 3, 64, 48, 4
    bf16 = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)
    x, weight, bias = bf16(M, K), bf16(N, K), bf16(N)
    pairs = [((bf16(r, K), bf16(N, r), 0.5), (bf16(r, K), bf16(N, r), 2.0), 0.3, 0.7) for _ in range(2)]
    row_pair = torch.arange(M) % 2
    cases = [
        (ops.linear(x, weight, bias), oracle(torch.nn.functional.linear, x, weight, bias)),
        (ops.dual_lora_linear(x, weight, bias, *pairs[0], strategy),
         oracle(dual_lora_linear_ref, x, weight, bias, *pairs[0], strategy)),
        (ops.pairwise_lora_linear(x, weight, bias, pairs, row_pair, strategy),
         oracle(pairwise_lora_linear_ref, x, weight, bias, pairs, row_pair, strategy)),
    ]
    for got, (exact, mag) in cases:
        assert got.dtype == torch.bfloat16
        # fp32 sums (K + R terms, a merged "ab" pair's few roundings), then one rounding to bf16.
        assert_bounded(got, exact, mag, n=K + 2 * r + 10, u_out=2.0**-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_cuda_dispatch_under_bf16_autocast_matches_reference(strategy):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 256, device="cuda", generator=g)
    weight = torch.randn(192, 256, device="cuda", generator=g) / 16
    adapters = [(torch.randn(8, 256, device="cuda", generator=g) / 16,
                 torch.randn(192, 8, device="cuda", generator=g) / 8, 2.0) for _ in range(2)]
    expected = dual_lora_linear_ref(x.double(), weight.double(), None,
                                    *[(a.double(), b.double(), s) for a, b, s in adapters], 0.3, 0.7, strategy)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ops.dual_lora_linear(x, weight, None, *adapters, 0.3, 0.7, strategy)
        torch_bf16 = dual_lora_linear_ref(x, weight, None, *adapters, 0.3, 0.7, strategy)
    assert got.dtype == torch.bfloat16
    # Flash-attention style bound: at most twice torch's own bf16 error against the fp64 result.
    ours_err = (got.double() - expected).abs().max()
    torch_err = (torch_bf16.double() - expected).abs().max()
    assert ours_err <= 2 * torch_err + 1e-3
