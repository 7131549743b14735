"""Tune lora_gemm's decode tiles on this GPU and write kernels/tuned/<gpu>.json, the table that
``modlora.kernels.configs.gemm_config`` reads before its heuristic.

For each M bucket up to 16 rows, Qwen2.5-0.5B shape (forward: P = N, Q = K) and total rank, every
candidate (column tile, K split) is checked against the torch reference and timed with
``triton.testing.do_bench`` as the forward runs it (the fused call: the shrink in the loop, or
first where K is split); the fastest is kept. The table holds one dtype, and its entries are for
the fused variant only. Buckets are powers of two (a call with M rows
uses the entry of the next power of two).

    python benchmarks/tune_lora_gemm.py [--ranks 16 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from lora_linear import SHAPES  # noqa: E402

from modlora.kernels import configs  # noqa: E402
from modlora.kernels.lora_gemm import RankStack, lora_gemm  # noqa: E402

M_BUCKETS = [1, 2, 4, 8, 16]


def candidates(Q: int, R: int) -> list[configs.GemmConfig]:
    BQ = 64 if configs.rank_block(R) <= 64 else 32
    return [configs.GemmConfig(16, bp, BQ, split, warps, 3) for bp in (16, 32, 64) for warps in (2, 4)
            for split in (1, 2, 4, 8, 16) if split == 1 or Q // split >= 2 * BQ]


def tune_one(m: int, k: int, n: int, r: int, dtype: torch.dtype) -> tuple[configs.GemmConfig, float, float]:
    import triton.testing

    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype) / s[-1] ** 0.5
    x, W, b = rand(m, k), rand(n, k), rand(n)
    A, B = rand(r, k), rand(n, r)
    shrink, expand = RankStack.of_a(A), RankStack.of_b(B)
    ref = torch.nn.functional.linear(x.float(), W.float(), b.float()) + (x.float() @ A.float().t()) @ B.float().t()
    best = None
    for cfg in candidates(k, r):
        run = lambda c=cfg: lora_gemm(x, W.t(), b, expand, (1.0, 0.0), shrink=shrink, config=c)
        y = run()[0].float()
        if (y - ref).abs().max() > 3e-2 * ref.abs().max():
            raise AssertionError(f"{cfg}: wrong result at M={m} K={k} N={n} r={r}")
        ms = triton.testing.do_bench(run, warmup=5, rep=20)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heuristic = configs.gemm_config(m, n, k, r, dtype, "", sms, fused=True)
    base_ms = triton.testing.do_bench(lambda: lora_gemm(x, W.t(), b, expand, (1.0, 0.0), shrink=shrink,
                                                        config=heuristic), warmup=5, rep=20)
    return best[0], best[1], base_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32], help="total ranks (a rank-8 pair is 16)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    entries = []
    for shape, (k, n) in SHAPES.items():
        for m in M_BUCKETS:
            for r in args.ranks:
                cfg, ms, base_ms = tune_one(m, k, n, r, dtype)
                entries.append({"m": m, "n": n, "k": k, "rank": r, "fused": True, "config": cfg.__dict__,
                                "ms": ms, "heuristic_ms": base_ms})
                print(f"{shape:8s} M={m:<3d} r={r:<3d} {cfg} {ms * 1e3:.1f} us (heuristic {base_ms * 1e3:.1f} us)")
    path = write_json(configs.slug(name), {"gpu": name, "dtype": args.dtype, "environment": environment("cuda"),
                                           "entries": entries}, configs.TUNED_DIR)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
