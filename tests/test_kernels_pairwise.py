"""Triton per-row pairs (``kernels.pairwise_lora_linear``) and the decode split-K of ``lora_gemm``
against the float64 reference, with the error bound of tests/test_kernels.py derived from the
computation: per element ``(n 2^-24 + roundings u(dtype)) * sum |terms|``, n = K + R + 2 (the
reductions behind y; a split K only reorders them), 2 roundings to the dtype (v * coef, the
output), 8 through a merged "ab" pair. Without CUDA the kernels run in Triton's interpreter."""

import json

import pytest
import torch
from test_kernels import DEVICE, DTYPES, U_ACC, U, assert_matches, errors, make_case, roundings

import modlora.kernels.lora_gemm as lora_gemm
import modlora.kernels.pairwise as pairwise
from modlora.kernels import pairwise_lora_linear, pairwise_lora_linear_ref
from modlora.kernels.configs import gemm_config


def make_pairs(dtype, k, n, ranks, learned=False, seed=0):
    """Adapters of several ranks (and missing ones) with base and adapter terms of similar size."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale: (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)
    adapter = lambda r, s: None if r is None else (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), s)
    pairs = []
    for i, (r_in, r_out) in enumerate(ranks):
        w_in, w_out = 0.2 + 0.15 * i, 0.9 - 0.1 * i
        if learned:
            w_in, w_out = torch.tensor(w_in, device=DEVICE), torch.tensor(w_out, device=DEVICE)
        pairs.append((adapter(r_in, 1.5), adapter(r_out, 0.5), w_in, w_out))
    return pairs


def to64(pairs, fix=lambda t: t):
    cast = lambda a: None if a is None else (fix(a[0].double()), fix(a[1].double()), a[2])
    w64 = lambda w: w.double() if isinstance(w, torch.Tensor) else w
    return [(cast(a), cast(b), w64(w_in), w64(w_out)) for a, b, w_in, w_out in pairs]


def pair_error_ratio(dtype, x, W, bias, pairs, row_pair, strategy, op=pairwise_lora_linear) -> float:
    """Largest ratio of ``op``'s error (vs float64) to its bound; at most 1 when correct."""
    with torch.no_grad():
        y = op(x, W, bias, pairs, row_pair, strategy)
        args = lambda fix: (fix(x.double()), fix(W.double()), None if bias is None else fix(bias.double()),
                            to64(pairs, fix), row_pair, strategy)
        hi = pairwise_lora_linear_ref(*args(lambda t: t))
        mag = pairwise_lora_linear_ref(*args(torch.abs))  # sum |terms| (weights and scales are positive)
    assert y.shape == hi.shape and y.dtype == dtype
    merged = strategy == "ab" and any(a is not None and b is not None for a, b, _, _ in pairs)
    rank = max(sum(a[0].shape[0] for a in p[:2] if a is not None) for p in pairs)
    bound = ((x.shape[-1] + rank + 2) * U_ACC + roundings("y", merged) * U[dtype]) * mag
    return ((y.double() - hi).abs() / (bound + torch.finfo(torch.float64).tiny)).max().item()


# (rows shape, K, N, per-pair ranks for "output", for "ab", row -> pair)
CASES = [
    ((1, 64), 64, 48, [(4, 8)], [(4, 4)], [0]),  # one decode row
    ((6, 64), 130, 96, [(4, 8), (8, None), (None, 1), (16, 16)], [(8, 8), (8, None), (None, 1), (16, 16)],
     [3, 0, 0, 2, 3, 1]),  # rows out of order, missing adapters, unequal ranks
    ((5, 7, 64), 64, 80, [(4, 4), (8, 8), (2, 2)], [(4, 4), (8, 8), (2, 2)], [2, 2, 0, 2, 1]),  # [B, S, K]
    ((70, 48), 48, 160, [(4, 8), (8, 4)], [(8, 8), (4, 4)], [1] * 37 + [0] * 33),  # several row tiles
]


@pytest.mark.parametrize("strategy", ["output", "ab"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairwise_matches_reference(dtype, case, strategy):
    shape, _, n, ranks_out, ranks_ab, rows = case
    k = shape[-1]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    W = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if len(rows) % 2 == 0 else None
    pairs = make_pairs(dtype, k, n, ranks_out if strategy == "output" else ranks_ab, learned=len(rows) == 5)
    ratio = pair_error_ratio(dtype, x, W, bias, pairs, torch.tensor(rows, device=DEVICE), strategy)
    assert ratio <= 1.0, f"kernel error exceeds its bound by {ratio:.2f}x"


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-3), (torch.float16, 3e-2)], ids=str)
def test_pairwise_bound_catches_a_wrong_coefficient(dtype, rel, monkeypatch):
    """One pair's smaller adapter term off by 0.1% (fp32) or 3% (fp16) fails the bound."""
    pack = pairwise.pack_coef_bank

    def wrong(*args, **kw):
        a_bank, b_bank, coef, BR = pack(*args, **kw)
        coef[1, 8:] *= 1 + rel  # pair 1: its out adapter (ranks 8..15)
        return a_bank, b_bank, coef, BR

    monkeypatch.setattr(pairwise, "pack_coef_bank", wrong)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    W = (torch.randn(96, 64, generator=torch.Generator().manual_seed(4)) * 0.125).to(DEVICE, dtype)
    pairs = make_pairs(dtype, 64, 96, [(4, 8), (8, 8)])
    rows = torch.tensor([0, 1, 1, 0, 1, 0], device=DEVICE)
    assert pair_error_ratio(dtype, x, W, None, pairs, rows, "output") > 1.0


def test_pairwise_clear_errors():
    x = torch.randn(3, 64, device=DEVICE)
    W = torch.randn(48, 64, device=DEVICE)
    pairs = make_pairs(torch.float32, 64, 48, [(4, 8)])
    with torch.no_grad():
        with pytest.raises(ValueError, match="row_pair must be"):
            pairwise_lora_linear(x, W, None, pairs, torch.tensor([0, 0]), "output")
        with pytest.raises(RuntimeError, match="outside"):
            pairwise_lora_linear(x, W, None, pairs, torch.tensor([0, 1, 0]), "output")
        with pytest.raises(ValueError, match="equal ranks"):
            pairwise_lora_linear(x, W, None, pairs, torch.tensor([0, 0, 0]), "ab")
        with pytest.raises(TypeError, match="dtype mismatch"):
            pairwise_lora_linear(x.half(), W.half(), None, pairs, torch.tensor([0, 0, 0]), "output")
    with pytest.raises(RuntimeError, match="forward-only"):
        pairwise_lora_linear(x.requires_grad_(), W, None, pairs, torch.tensor([0, 0, 0]), "output")


def test_decode_shapes_split_k():
    """The decode heuristic splits K when the column tiles alone would leave SMs idle."""
    cfg = gemm_config(1, 896, 896, 32, torch.bfloat16, "", 108)
    assert cfg.BP <= 32 and cfg.split_k > 1
    assert gemm_config(1, 896, 64, 32, torch.bfloat16, "", 108).split_k == 1  # too short to split
    assert gemm_config(512, 896, 896, 32, torch.bfloat16, "", 108).split_k == 1


@pytest.mark.parametrize("strategy", ["output", "ab"])
@pytest.mark.parametrize(("m", "k", "n"), [(4, 1024, 64), (3, 64, 1024)], ids=["fwd-split", "bwd-split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_value_and_gradients(dtype, m, k, n, strategy, monkeypatch):
    """K = 1024 splits the forward's reduction (the fused shrink then runs first), N = 1024 the
    backward's dx; every gradient and the value against float64, as in test_kernels.py."""
    picked = []
    choose = lora_gemm.gemm_config
    monkeypatch.setattr(lora_gemm, "gemm_config", lambda *a, **k: picked.append(choose(*a, **k)) or picked[-1])
    case = make_case(dtype, m, k, n, 8, 8, learned=True)
    assert_matches(case, dtype, strategy=strategy, variant="fused")
    assert any(c.split_k > 1 for c in picked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_bound_catches_a_lost_slice(dtype, monkeypatch):
    """Dropping the last K slice from the sum fails the bound (the check can see a split bug)."""
    summed = lora_gemm._sum_slices
    monkeypatch.setattr(lora_gemm, "_sum_slices", lambda out, dt: summed(out[:-1] if len(out) > 2 else out, dt))
    case = make_case(dtype, 4, 1024, 64, 8, 8)
    ratio, _ = errors(case, dtype, variant="split")["y"]
    assert ratio > 1.0


def test_tiles_cover_every_row_once():
    rows = torch.tensor([2, 0, 2, 2, 1, 2, 0, 2, 2, 2], device=DEVICE)
    order, tile_pair, lo, hi, n_tiles = pairwise._tiles(rows, 4, 2)
    seen = []
    for t in range(n_tiles):
        if tile_pair[t] >= 0:
            idx = order[lo[t]:hi[t]].long()
            assert (rows[idx] == tile_pair[t]).all() and 0 < hi[t] - lo[t] <= 2
            seen += idx.tolist()
    assert sorted(seen) == list(range(len(rows)))



@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_ops_routes_cuda_rows_to_the_kernel(monkeypatch):
    """ops.pairwise_lora_linear on CUDA, inference: one call of the Triton kernel (bf16 autocast
    included), not the reference loop; with autograd on, the reference (the kernel is forward-only)."""
    from test_ops import assert_kernel_bounded

    from modlora import ops

    calls = []
    real = pairwise.pairwise_lora_linear
    monkeypatch.setattr(pairwise, "pairwise_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 3, 64, device=DEVICE)
    W = torch.randn(48, 64, device=DEVICE) / 8
    pairs = make_pairs(torch.float32, 64, 48, [(4, 8), (8, 8)])
    rows = torch.tensor([1, 0, 1, 1], device=DEVICE)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = ops.pairwise_lora_linear(x, W, None, pairs, rows, "output")
    assert calls == [1] and y.dtype == torch.bfloat16
    cast = lambda a: (a[0].bfloat16(), a[1].bfloat16(), a[2])  # the bf16 copies autocast makes
    pairs16 = [(cast(a_in), cast(a_out), w_in, w_out) for a_in, a_out, w_in, w_out in pairs]
    assert_kernel_bounded(y, x.bfloat16(), W.bfloat16(), None, pairs16, rows, "output")
    ops.pairwise_lora_linear(x.requires_grad_(), W, None, pairs, rows, "output")
    assert calls == [1]


def test_tuned_table_overrides_the_heuristic_for_its_gpu(tmp_path, monkeypatch):
    from modlora.kernels import configs

    entry = {"m": 4, "n": 896, "k": 896, "rank": 16, "fused": True,
             "config": {"BM": 16, "BP": 64, "BQ": 32, "split_k": 2, "num_warps": 2, "num_stages": 4}}
    table = tmp_path / "nvidia-a100-sxm4-80gb.json"
    table.write_text(json.dumps({"gpu": "NVIDIA A100-SXM4-80GB", "dtype": "bfloat16", "entries": [entry]}))
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    configs._table.cache_clear()
    a100 = "NVIDIA A100-SXM4-80GB"
    try:
        tuned = configs.gemm_config(3, 896, 896, 16, torch.bfloat16, a100, 108)
        assert tuned == configs.GemmConfig(**entry["config"])  # M = 3 uses the bucket of 4
        assert configs.gemm_config(3, 896, 896, 16, torch.bfloat16, "NVIDIA H100", 132) != tuned
        assert configs.gemm_config(3, 896, 896, 32, torch.bfloat16, a100, 108) != tuned
        # another dtype or variant has other shared-memory and register budgets: not this entry
        assert configs.gemm_config(3, 896, 896, 16, torch.float32, a100, 108) != tuned
        assert configs.gemm_config(3, 896, 896, 16, torch.bfloat16, a100, 108, fused=False) != tuned
        for bad in ({"num_warps": 3}, {"BQ": 8}, {"split_k": 0}, {"num_stages": 1e9}):
            table.write_text(json.dumps({"gpu": a100, "dtype": "bfloat16",
                                         "entries": [{**entry, "config": {**entry["config"], **bad}}]}))
            configs._table.cache_clear()
            with pytest.raises(ValueError, match=f"{table.name} is not a tuned table"):
                configs.gemm_config(3, 896, 896, 16, torch.bfloat16, a100, 108)
    finally:
        configs._table.cache_clear()
