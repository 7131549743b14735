"""CPU small-M linear: modlora._C (LoRA bank) vs torch F.linear and the unfused LoRA path.

    python benchmarks/cpu_linear.py              # Qwen2.5-0.5B shapes + lm_head, M in 1, 5, 10, 40
    python benchmarks/cpu_linear.py --quick      # fewer reps (smoke test)

Per shape and M, the weight is read from memory, not cache: each call uses the next of enough
copies of W to exceed three times the L3 cache (its size read from sysfs or sysconf, recorded in the
JSON as "llc"), as in a decode step, where the model's ~1 GB of weights
stream through once. "GB/s" is bytes of W / time (the adapters' bytes are not counted, so a
fused op that pays for them shows as lower GB/s). Next to it: a memory-read probe (every byte of a
buffer of 512 MiB or three L3s read once by all threads, torch's `.sum()` and `.amax()` over fp32),
re-measured before every shape because other processes may share the machine; the load average is
recorded. Times are medians (and 20% quantiles, less hit by preemption on a shared machine).
Also measures the crossover M at which torch's GEMM path beats the C++ kernel, and what the model
runs (`ops_*`: modlora.ops, the path picked by modlora.dispatch, calibrated afresh in a temporary
cache dir; its choices go into the JSON). The JSON names the CPU model and its ISAs.
Writes results/cpu_linear_<cpu>.json and .png, prints a table.

Providers (bias and adapters as in the model: two rank-16 adapters, strategy "output", R=32):
  c_bf16, c_fp32            modlora._C, no adapters (the lm_head case)
  c_lora_bf16               modlora._C with a bf16 bank (one pair for all rows)
  c_lora_rows_bf16          modlora._C with a bf16 bank, rows alternating between 2 pairs
  torch_bf16, torch_fp32    F.linear
  unfused_lora_bf16         F.linear + per adapter (x A^T) B^T * coef, as PEFT runs it
  ops_bf16, ops_lora_bf16   modlora.ops.linear (lm_head) / dual_lora_linear: the dispatched path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, cpu_tag, environment, memory_probe, write_json  # noqa: E402

from modlora import cpu, dispatch, ops  # noqa: E402

# (N, K) of Qwen2.5-0.5B's linears and its (tied) lm_head.
SHAPES = {"q/o": (896, 896), "k/v": (128, 896), "gate/up": (4864, 896), "down": (896, 4864),
          "lm_head": (151936, 896)}
MS = [1, 2, 5, 10, 16, 40, 64, 160]
RANK = 16
LLC_MULTIPLE = 3  # copies of W until they exceed this many times the last-level cache
CROSSOVER_MS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]


def llc_bytes() -> dict:
    """The last-level (L3) cache of the whole machine, in bytes, and where that number came from.

    sysfs gives the size of one L3 and the CPUs sharing it (one CCX on AMD: 32 MiB of a 384 MiB
    chip), so it is multiplied by the number of distinct L3s; glibc's sysconf (CPUID, via getconf)
    may report the chip's total. The larger wins: the rotation must outgrow every cache a copy could stay in.
    """
    found = {}
    instances = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
                instances[(index / "shared_cpu_list").read_text().strip()] = int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    if instances:
        found["sysfs"] = sum(instances.values())
    try:  # Python's os.sysconf does not know _SC_LEVEL3_CACHE_SIZE: ask getconf
        size = int(subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True,
                                  check=True).stdout.strip() or 0)
        if size > 0:
            found["sysconf"] = size
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    if not found:
        return {"bytes": 512 << 20, "source": "default (no L3 size found in sysfs or sysconf)"}
    source = max(found, key=found.get)
    return {"bytes": found[source], "source": source, "found": found}


LLC = llc_bytes()


def make(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    copies = max(1, math.ceil(LLC_MULTIPLE * LLC["bytes"] / (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(copies - 1)]


def cycling(fn, weights):
    """A callable that runs fn on the next copy of W at each call (cold weights)."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(weights[state["i"]])

    return run


def adapters(n: int, k: int, gen: torch.Generator):
    def ad(scale):
        return (torch.randn(RANK, k, generator=gen) * k**-0.5, torch.randn(n, RANK, generator=gen) * 0.1, scale)

    lora_in, lora_out = ad(2.0), ad(2.0)
    return lora_in, lora_out, 0.6, 0.4


def run_shape(name: str, n: int, k: int, reps: int, gen: torch.Generator) -> list[dict]:
    rows = []
    op = torch.ops.modlora.lora_bank_linear if cpu.HAVE_C else None
    w_bf16, w_f32 = make(n, k, torch.bfloat16, gen), make(n, k, torch.float32, gen)
    lm_head = name == "lm_head"
    b = None if lm_head or name != "q/o" else torch.randn(n, generator=gen).to(torch.bfloat16)
    pair = adapters(n, k, gen)
    pair2 = adapters(n, k, gen)
    A1, B1 = cpu.pack_bank([pair], "output", torch.bfloat16)
    A2, B2 = cpu.pack_bank([pair, pair2], "output", torch.bfloat16)
    lin, lout, wi, wo = pair
    pair_bf16 = tuple((a.to(torch.bfloat16), bb.to(torch.bfloat16), sc) for a, bb, sc in (lin, lout)) + (wi, wo)
    unf = [(a.to(torch.bfloat16), bb.to(torch.bfloat16), s * w) for (a, bb, s), w in ((lin, wi), (lout, wo))]
    for m in MS:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        xf = x.float()
        rp = torch.arange(m) % 2

        def unfused(w, x=x):
            y = F.linear(x, w, b)
            for a, bb, c in unf:
                y = y + F.linear(F.linear(x, a), bb) * c
            return y

        prov = {"torch_bf16": (cycling(lambda w, x=x: F.linear(x, w, b), w_bf16), 2),
                "torch_fp32": (cycling(lambda w, xf=xf: F.linear(xf, w), w_f32), 4)}
        if not lm_head:
            prov["unfused_lora_bf16"] = (cycling(unfused, w_bf16), 2)
        if cpu.HAVE_C:
            prov["c_bf16"] = (cycling(lambda w, x=x: op(x, w, b, None, None, None), w_bf16), 2)
            prov["c_fp32"] = (cycling(lambda w, xf=xf: op(xf, w, None, None, None, None), w_f32), 4)
            if not lm_head:
                prov["c_lora_bf16"] = (cycling(lambda w, x=x: op(x, w, b, A1, B1, None), w_bf16), 2)
                prov["c_lora_rows_bf16"] = (cycling(lambda w, x=x, rp=rp: op(x, w, b, A2, B2, rp), w_bf16), 2)
        # What the model runs: modlora.ops, its path chosen by modlora.dispatch (calibrated at the
        # first call, in the warm-up).
        if lm_head:
            prov["ops_bf16"] = (cycling(lambda w, x=x: ops.linear(x, w, b), w_bf16), 2)
        else:
            prov["ops_lora_bf16"] = (cycling(lambda w, x=x: ops.dual_lora_linear(x, w, b, *pair_bf16), w_bf16), 2)
        for pname, (fn, elt) in prov.items():
            t = bench(fn, warmup=3, reps=reps)
            rows.append({"shape": name, "N": n, "K": k, "M": m, "provider": pname, **t,
                         "W_GBs": n * k * elt / t["ms"] / 1e6, "W_GBs_q20": n * k * elt / t["q20"] / 1e6})
    return rows


def crossover(reps: int, gen: torch.Generator) -> dict:
    """gate/up shape with two adapters: C++ kernel vs the torch path (what the wrapper falls back to)."""
    n, k = SHAPES["gate/up"]
    out = {}
    pair = adapters(n, k, gen)
    for dtype in (torch.bfloat16, torch.float32):
        ws = make(n, k, dtype, gen)
        A, B = cpu.pack_bank([pair], "output", dtype)
        pts = []
        for m in CROSSOVER_MS:
            x = torch.randn(m, k, generator=gen).to(dtype)
            tc, tt = (bench(cycling(lambda w, x=x, fn=fn, A=A, B=B: fn(x, w, None, A, B), ws), reps=reps)
                      for fn in (cpu.lora_bank_linear, cpu.lora_bank_linear_torch))
            pts.append({"M": m, "c_ms": tc["ms"], "torch_ms": tt["ms"]})
        faster = [p["M"] for p in pts if p["c_ms"] <= p["torch_ms"]]
        first_slower = next((p["M"] for p in pts if p["c_ms"] > p["torch_ms"]), None)
        out[str(dtype).replace("torch.", "")] = {"points": pts, "c_faster_at": faster,
                                                 "first_M_where_torch_wins": first_slower}
    return out


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
                    linestyle="-" if pname.startswith("c_") else "--")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
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
    buf = torch.rand(max(128 << 20, LLC_MULTIPLE * LLC["bytes"] // 4), generator=gen)  # fp32, >= 512 MiB
    rows, probes = [], {}
    for name, (n, k) in SHAPES.items():
        probes[name] = memory_probe(buf, reps)
        probes[name]["loadavg"] = os.getloadavg()[0]
        rows += run_shape(name, n, k, reps, gen)
        print(f"{name}: probe {probes[name]['GBs']:.1f} GB/s (load {probes[name]['loadavg']:.1f})", flush=True)
    del buf
    cross = None if args.no_crossover else crossover(reps, gen)

    # Table and goals: at M <= 10, c_bf16 reads W at >= 80% of the probe and is >= 1.5x torch_bf16;
    # ops_* (what the model runs) >= torch_bf16 at every M and >= 1.5x at M <= 5.
    print(f"\n{'shape':8} {'M':>3} {'provider':18} {'ms':>8} {'W GB/s':>7} {'q20 GB/s':>8} {'%probe':>6} "
          f"{'vs torch_bf16':>13}")
    summary = []
    for r in rows:
        base = next(q for q in rows if q["shape"] == r["shape"] and q["M"] == r["M"] and q["provider"] == "torch_bf16")
        r["pct_probe"] = 100 * r["W_GBs"] / probes[r["shape"]]["GBs"]
        r["speedup_vs_torch_bf16"] = base["ms"] / r["ms"]
        print(f"{r['shape']:8} {r['M']:>3} {r['provider']:18} {r['ms']:8.3f} {r['W_GBs']:7.1f} {r['W_GBs_q20']:8.1f} "
              f"{r['pct_probe']:6.0f} {r['speedup_vs_torch_bf16']:12.2f}x")
        if (r["provider"] == "c_bf16" and r["M"] <= 10) or r["provider"].startswith("ops_"):
            summary.append({k: r[k] for k in ("shape", "M", "provider", "W_GBs", "W_GBs_q20", "pct_probe",
                                              "speedup_vs_torch_bf16")})
    if cross:
        for dt, c in cross.items():
            print(f"crossover {dt}: C++ faster at M in {c['c_faster_at']}; torch wins first at M="
                  f"{c['first_M_where_torch_wins']}")
    tag = cpu_tag()
    payload = {"env": environment("cpu"), "cpu": dispatch.cpu_model(), "have_c": cpu.HAVE_C,
               "isa": cpu._C.isa() if cpu.HAVE_C else None, "rank": RANK, "probes": probes,
               "llc": LLC, "weight_rotation_bytes": LLC_MULTIPLE * LLC["bytes"],
               "goal_rows": summary, "crossover": cross, "results": rows,
               "dispatch_cache": json.loads(cache.read_text()) if (cache := dispatch.cache_file()).exists() else None}
    path = write_json(f"cpu_linear_{tag}_{torch.get_num_threads()}t", payload)
    plot(rows, probes, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
