"""CPU small-M linear: modlora._C (LoRA bank) at each ISA vs torch F.linear and the unfused LoRA path.

    python benchmarks/cpu_linear.py              # Qwen2.5-0.5B shapes + lm_head, M in 1, 2, 5, ... 160
    python benchmarks/cpu_linear.py --quick      # fewer reps (smoke test)
    python benchmarks/cpu_linear.py --quick --out-dir /tmp/bench   # ... without touching results/

Per shape and M, the weight is read from memory, not cache: each call uses the next of enough
copies of W to exceed three times the L3 cache (modlora.dispatch.llc_bytes, recorded in the JSON
as "llc"), as in a decode step, where the model's ~1 GB of weights stream through once. W's
copies and the probe's buffer lie where the model keeps its weights (modlora.memory.weight_buffer:
huge pages on a Linux CPU), the same memory for every provider. "GB/s" is bytes of W / time (the
adapters' bytes are not counted, so a fused op that pays for them shows as lower GB/s). Next to
it: a memory-read probe (every byte of a buffer of 512 MiB or three L3s read once by all threads,
torch's `.sum()` and `.amax()` over fp32), re-measured before every shape because other processes
may share the machine; the load average is recorded. Times are medians (and 20% quantiles, less
hit by preemption on a shared machine).
Also measures what the model
runs (`ops_*`: modlora.ops, the path picked by modlora.dispatch, calibrated afresh in a temporary
cache dir; each row names the path, and the choices go into the JSON). The JSON names the CPU
model and its ISAs. Writes results/cpu_linear_<cpu>.json and .png, prints a table.

Every provider runs under torch.no_grad(), as inference does (generate): with grad mode on, ops
checks each input for requires_grad first (autograd must go through torch).

Before anything of an M is timed, each provider's output is checked against a float64 evaluation
of the same rounded inputs (tests/test_cpu_ext.py's bound: 2 (K + R) 2^-24 sum|terms| for the fp32
accumulation, 2^-8 |y| for the bf16 output, and 2^-8 sum|terms| more where torch's bf16 GEMMs
round partial results); an output outside it is an error.

Providers, all bf16 (bias and adapters as in the model: two rank-16 adapters, "output", R=32):
  c@<isa>                   modlora._C at each vector ISA of the CPU, no adapters (the lm_head case)
  c@<isa>:l2                the same, the next block of W prefetched into L2 instead of L1
  c_lora_bf16               modlora._C (best ISA) with a bf16 bank (one pair for all rows)
  c_lora_rows_bf16          modlora._C (best ISA) with a bf16 bank, rows alternating between 2 pairs
  torch_bf16                F.linear
  unfused_lora_bf16         F.linear + per adapter (x A^T) B^T * coef, as PEFT runs it
  ops_bf16                  modlora.ops.linear (no adapters): the dispatched path
  ops_lora_bf16             modlora.ops.dual_lora_linear (not lm_head): the dispatched path
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_dir, bench, cpu_tag, environment, in_weight_memory, memory_probe, write_json  # noqa: E402

from modlora import cpu, dispatch, ops  # noqa: E402

# (N, K) of Qwen2.5-0.5B's linears and its (tied) lm_head.
SHAPES = {"q/o": (896, 896), "k/v": (128, 896), "gate/up": (4864, 896), "down": (896, 4864),
          "lm_head": (151936, 896)}
MS = [1, 2, 5, 10, 16, 40, 64, 160]
RANK = 16
LLC_MULTIPLE = 3  # copies of W until they exceed this many times the last-level cache


# Providers that may run torch's bf16 GEMMs, which round partial results (x W^T before the bias,
# the LoRA terms) to bf16: one more 2^-8 sum|terms|, as tests/test_cpu_ext.py allows torch's path
# (the C++ op accumulates in fp32 and rounds once). Seen: within 0.17 of that bound; a dropped
# adapter 6x over it.
TORCH_PATHS = {"torch_bf16", "unfused_lora_bf16", "ops_bf16", "ops_lora_bf16"}

LLC = dispatch.llc_bytes()
ISAS = [isa for isa in cpu._C.supported_isas() if isa != "scalar"] if cpu.HAVE_C else []


def make(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    copies = max(1, math.ceil(LLC_MULTIPLE * LLC["bytes"] / (w.numel() * w.element_size())))
    return [in_weight_memory(w) for _ in range(copies)]


def cycling(fn, copies: Iterator[torch.Tensor]):
    """A callable that runs fn on the next copy of W at each call. Every provider of a shape draws
    from one cycle, so a copy comes back only after all the others (three L3s): W is read cold."""
    return lambda: fn(next(copies))


def adapters(n: int, k: int, gen: torch.Generator):
    def ad(scale):
        return (torch.randn(RANK, k, generator=gen) * k**-0.5, torch.randn(n, RANK, generator=gen) * 0.1, scale)

    lora_in, lora_out = ad(2.0), ad(2.0)
    return lora_in, lora_out, 0.6, 0.4


def oracle(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, bank: tuple = (None, None),
           row_pair: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 value of x W^T + b + (x A_p^T) B_p^T, row m by pair row_pair[m] (default 0), from the
    very inputs the providers get, and the sum of the absolute values of its terms."""
    x64, w64 = x.double(), w.double()
    y, mag = x64 @ w64.t(), x64.abs() @ w64.abs().t()
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    A, B = bank
    if A is not None:
        pairs = torch.zeros(len(x), dtype=torch.long) if row_pair is None else row_pair
        for p in pairs.unique().tolist():
            rows, a64, b64 = pairs == p, A[p].double(), B[p].double()
            y[rows] += (x64[rows] @ a64.t()) @ b64.t()
            mag[rows] += (x64[rows].abs() @ a64.abs().t()) @ b64.abs().t()
    return y, mag


def check(name: str, y: torch.Tensor, y64: torch.Tensor, mag: torch.Tensor, k_eff: int) -> None:
    """``y`` (bf16) within its float64 bound, or an error: a dropped bias or LoRA term, a wrong pair
    or row, a skipped tail is off by O(|y|), far beyond it."""
    extra = 2.0**-8 if name in TORCH_PATHS else 0.0
    tol = (2 * k_eff * 2.0**-24 + extra) * mag + 2.0**-8 * y64.abs() + 1e-30
    worst = float(((y.double() - y64).abs() / tol).max())
    if not worst <= 1.0:
        raise AssertionError(f"{name}: output off its float64 value by {worst:.2f}x the bound (before timing)")


def run_shape(name: str, n: int, k: int, reps: int, gen: torch.Generator) -> list[dict]:
    rows = []
    op = torch.ops.modlora.lora_bank_linear if cpu.HAVE_C else None
    w_bf16 = make(n, k, torch.bfloat16, gen)
    rotation = itertools.cycle(w_bf16)
    lm_head = name == "lm_head"
    b = None if lm_head or name != "q/o" else torch.randn(n, generator=gen).to(torch.bfloat16)
    pair = adapters(n, k, gen)
    pair2 = adapters(n, k, gen)
    A1, B1 = cpu.pack_bank([pair], "output", torch.bfloat16)
    A2, B2 = cpu.pack_bank([pair, pair2], "output", torch.bfloat16)
    lin, lout, wi, wo = pair
    pair_bf16 = tuple((a.to(torch.bfloat16), bb.to(torch.bfloat16), sc) for a, bb, sc in (lin, lout)) + (wi, wo)
    unf = [(a.to(torch.bfloat16), bb.to(torch.bfloat16), s * w) for (a, bb, s), w in ((lin, wi), (lout, wo))]
    # Every M takes the first rows of one x, so each oracle is computed once per shape.
    x_all = torch.randn(max(MS), k, generator=gen).to(torch.bfloat16)
    rp_all = torch.arange(max(MS)) % 2
    expected = {"plain": oracle(x_all, w_bf16[0], b)}
    if not lm_head:
        expected.update(bank=oracle(x_all, w_bf16[0], b, (A1, B1)), rows=oracle(x_all, w_bf16[0], b, (A2, B2), rp_all),
                        pair=oracle(x_all, w_bf16[0], b, cpu.pack_bank([pair_bf16], "output", torch.float64)))
    kind = {"c_lora_bf16": "bank", "c_lora_rows_bf16": "rows", "unfused_lora_bf16": "pair", "ops_lora_bf16": "pair"}
    for m in MS:
        x, rp = x_all[:m], rp_all[:m]

        def unfused(w, x=x):
            y = F.linear(x, w, b)
            for a, bb, c in unf:
                y = y + F.linear(F.linear(x, a), bb) * c
            return y

        prov = {"torch_bf16": cycling(lambda w, x=x: F.linear(x, w, b), rotation)}
        if not lm_head:
            prov["unfused_lora_bf16"] = cycling(unfused, rotation)
        for isa, level in itertools.product(ISAS, ("l1", "l2")):
            prov[f"c@{isa}" + (":l2" if level == "l2" else "")] = cycling(
                lambda w, x=x, isa=isa, level=level: op(x, w, b, None, None, None, isa, None, level), rotation)
        if cpu.HAVE_C and not lm_head:
            prov["c_lora_bf16"] = cycling(lambda w, x=x: op(x, w, b, A1, B1, None), rotation)
            prov["c_lora_rows_bf16"] = cycling(lambda w, x=x, rp=rp: op(x, w, b, A2, B2, rp), rotation)
        # What the model runs: modlora.ops, its path chosen by modlora.dispatch (calibrated at the
        # first call, in the check).
        prov["ops_bf16"] = cycling(lambda w, x=x: ops.linear(x, w, b), rotation)
        if not lm_head:
            prov["ops_lora_bf16"] = cycling(lambda w, x=x: ops.dual_lora_linear(x, w, b, *pair_bf16), rotation)
        for pname, fn in prov.items():
            y64, mag = (t[:m] for t in expected[kind.get(pname, "plain")])
            check(pname, fn(), y64, mag, k + A1.shape[1])
        for pname, fn in prov.items():
            t = bench(fn, warmup=3, reps=reps)
            row = {"shape": name, "N": n, "K": k, "M": m, "provider": pname, **t,
                   "W_GBs": n * k * 2 / t["ms"] / 1e6, "W_GBs_q20": n * k * 2 / t["q20"] / 1e6}
            if pname.startswith("ops_") and cpu.HAVE_C:  # the path calibrated in the check (cached now)
                row["path"] = dispatch.choose("linear" if pname == "ops_bf16" else "lora", x, w_bf16[0], None)
            rows.append(row)
    return rows


def plot(rows: list[dict], probes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(SHAPES)
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True)
    for ax, s in zip(axes, shapes, strict=True):
        for pname in sorted({r["provider"] for r in rows if r["shape"] == s}):
            pts = [(r["M"], r["W_GBs"]) for r in rows if r["shape"] == s and r["provider"] == pname]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pname,
                    linestyle="-" if pname.startswith("c") else "--")
        ax.axhline(probes[s]["GBs"], color="k", lw=1, label="read probe")
        ax.axhline(0.8 * probes[s]["GBs"], color="k", lw=0.5, ls=":", label="80% probe")
        ax.set_xscale("log")
        ax.set_title(f"{s} {SHAPES[s][0]}x{SHAPES[s][1]}")
        ax.set_xlabel("M (rows of x)")
    axes[0].set_ylabel("GB/s of W read")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"modlora._C vs torch, {dispatch.cpu_model()}, {torch.get_num_threads()} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add_out_dir(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Calibrate every case afresh, with no time budget: the ops rows show what the dispatcher picks.
    os.environ.update(MODLORA_CACHE_DIR=tempfile.mkdtemp(prefix="modlora-dispatch-"), MODLORA_CALIBRATE="1")
    os.environ.pop("MODLORA_DISPATCH", None)
    dispatch.reset()
    dispatch.BUDGET_SECONDS = math.inf
    reps = 5 if args.quick else 12
    gen = torch.Generator().manual_seed(0)
    buf = in_weight_memory(torch.rand(max(128 << 20, LLC_MULTIPLE * LLC["bytes"] // 4), generator=gen))  # >= 512 MiB
    rows, probes = [], {}
    for name, (n, k) in SHAPES.items():
        probes[name] = memory_probe(buf, reps)
        probes[name]["loadavg"] = os.getloadavg()[0]
        rows += run_shape(name, n, k, reps, gen)
        print(f"{name}: probe {probes[name]['GBs']:.1f} GB/s (load {probes[name]['loadavg']:.1f})", flush=True)
    del buf

    # Table, then the goals: ops_* (what the model runs) >= torch_bf16 at every M, >= 1.5x at M <= 5.
    print(f"\n{'shape':8} {'M':>3} {'provider':18} {'ms':>8} {'W GB/s':>7} {'q20 GB/s':>8} {'%probe':>6} "
          f"{'vs torch_bf16':>13}  path")
    summary = []
    for r in rows:
        base = next(q for q in rows if q["shape"] == r["shape"] and q["M"] == r["M"] and q["provider"] == "torch_bf16")
        r["pct_probe"] = 100 * r["W_GBs"] / probes[r["shape"]]["GBs"]
        r["speedup_vs_torch_bf16"] = base["ms"] / r["ms"]
        print(f"{r['shape']:8} {r['M']:>3} {r['provider']:18} {r['ms']:8.3f} {r['W_GBs']:7.1f} {r['W_GBs_q20']:8.1f} "
              f"{r['pct_probe']:6.0f} {r['speedup_vs_torch_bf16']:12.2f}x  {r.get('path', '')}")
        if r["provider"].startswith("ops_"):
            summary.append({k: r[k] for k in ("shape", "M", "provider", "path", "ms", "speedup_vs_torch_bf16")
                            if k in r})
    goals = {"ge_1x_at_every_M": all(r["speedup_vs_torch_bf16"] >= 1 for r in summary),
             "ge_1.5x_at_M_le_5": all(r["speedup_vs_torch_bf16"] >= 1.5 for r in summary if r["M"] <= 5)}
    misses = [f"{r['shape']} M={r['M']} {r['provider']} {r['speedup_vs_torch_bf16']:.2f}x" for r in summary
              if r["speedup_vs_torch_bf16"] < (1.5 if r["M"] <= 5 else 1)]
    print(f"goals (ops_* vs torch_bf16): {goals}; below goal: {', '.join(misses) or 'none'}")
    tag = cpu_tag()
    payload = {"env": environment("cpu"), "cpu": dispatch.cpu_model(), "have_c": cpu.HAVE_C,
               "isas": cpu._C.supported_isas() if cpu.HAVE_C else [], "rank": RANK, "probes": probes,
               "llc": LLC, "weight_rotation_bytes": LLC_MULTIPLE * LLC["bytes"], "quick": args.quick,
               "goals": goals, "goal_rows": summary, "results": rows,
               "dispatch_cache": json.loads(cache.read_text()) if (cache := dispatch.cache_file()).exists() else None}
    path = write_json(f"cpu_linear_{tag}_{torch.get_num_threads()}t", payload, args.out_dir)
    plot(rows, probes, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
