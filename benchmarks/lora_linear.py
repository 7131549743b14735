"""Dual-LoRA linear: modlora's Triton kernels vs cuBLAS, the torch reference, PEFT and a merged weight.

    python benchmarks/lora_linear.py            # GPU: the full grid of issue 4 (bf16)
    python benchmarks/lora_linear.py --quick    # CPU smoke test: torch providers, a few cases

Every provider runs on the same tensors; each is checked against an fp32 reference before it is
timed; PEFT's adapters are kept in the run's dtype (peft upcasts bf16 ones to fp32 by default).
Writes ``results/lora_linear_<device>_<dtype>.json`` (``--out-dir`` elsewhere), rewritten after
every case ("complete": false until the last) so a run stopped at a time limit keeps what it
measured, then a plot of time relative to ``F.linear`` over M, per shape, and prints the ratios.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_dir, bench, check_adapter_dtype, environment, import_peft, write_json  # noqa: E402

from modlora.kernels import dual_lora_linear_ref, merge_ab  # noqa: E402

# Qwen2.5-0.5B linears, (K, N): q/o 896x896, k/v 896x128, gate/up 896x4864, down 4864x896, and the
# lm_head 896x151936 (not adapted in the paper's setup: timed here as the largest W read of a step)
SHAPES = {"q/o": (896, 896), "k/v": (896, 128), "gate/up": (896, 4864), "down": (4864, 896),
          "lm_head": (896, 151936)}
MS = [1, 5, 40, 160, 640, 2048, 8192]
RANKS = [8, 16, 64]
W_IN, W_OUT, ALPHA_PER_RANK = 0.6, 0.4, 2.0  # scale = alpha / r = 2 for every adapter
Provider = Callable[[Tensor], Tensor]


def make_tensors(k: int, n: int, m: int, r: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, scale: (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
    return {
        "x": rand(m, k, scale=1.0), "W": rand(n, k, scale=k**-0.5), "b": rand(n, scale=0.1),
        "in": (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), ALPHA_PER_RANK),
        "out": (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), ALPHA_PER_RANK),
    }


def peft_layer(t: dict, strategy: str) -> nn.Module:
    """A real ``peft.tuners.lora.Linear`` with adapters "in" and "out" both active ("output"), or
    their ``add_weighted_adapter(..., "linear")`` merge active ("ab"); adapters in W's dtype."""
    peft = import_peft()
    W, b = t["W"], t["b"]
    base = nn.Sequential()
    base.lin = nn.Linear(W.shape[1], W.shape[0], device=W.device, dtype=W.dtype)
    with torch.no_grad():
        base.lin.weight.copy_(W)
        base.lin.bias.copy_(b)
    r = t["in"][0].shape[0]
    cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA_PER_RANK * r, target_modules=["lin"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg, adapter_name="in", autocast_adapter_dtype=False)
    model.add_adapter("out", cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.lin
    with torch.no_grad():
        for name in ("in", "out"):
            layer.lora_A[name].weight.copy_(t[name][0])
            layer.lora_B[name].weight.copy_(t[name][1])
    if strategy == "ab":
        model.add_weighted_adapter(["in", "out"], [W_IN, W_OUT], "merged", combination_type="linear")
        model.base_model.set_adapter("merged")
    else:
        model.base_model.set_adapter(["in", "out"])
        layer.scaling["in"] *= W_IN
        layer.scaling["out"] *= W_OUT
    check_adapter_dtype(layer, W.dtype)
    return layer


def providers(t: dict, strategy: str, triton_ok: bool) -> dict[str, Provider]:
    W, b, lin, lout = t["W"], t["b"], t["in"], t["out"]
    if strategy == "ab":
        a_m, b_m = merge_ab(lin, lout, W_IN, W_OUT)  # formed once: a new trainable adapter, as in PEFT
        unfused = [(a_m.detach().requires_grad_(), b_m.detach().requires_grad_(), 1.0)]
    else:
        unfused = [(A, B, w * s) for (A, B, s), w in ((lin, W_IN), (lout, W_OUT))]
    with torch.no_grad():
        merged = W + sum(c * (B.float() @ A.float()) for A, B, c in unfused).to(W.dtype)

    def peft_style(x: Tensor) -> Tensor:  # base, then per adapter: A, B, scale, add
        y = F.linear(x, W, b)
        for A, B, c in unfused:
            y = y + F.linear(F.linear(x, A), B) * c
        return y

    out = {
        "F.linear": lambda x: F.linear(x, W, b),
        "reference": lambda x: dual_lora_linear_ref(x, W, b, lin, lout, W_IN, W_OUT, strategy),
        "peft-style": peft_style,
        "merged": lambda x: F.linear(x, merged, b),
        "peft": peft_layer(t, strategy),
    }
    if triton_ok:
        from modlora.kernels import dual_lora_linear

        for variant in ("fused", "split"):
            out[f"modlora-{variant}"] = lambda x, v=variant: dual_lora_linear(
                x, W, b, lin, lout, W_IN, W_OUT, strategy, variant=v)
        from modlora import cuda_decode

        if cuda_decode.available() and t["x"].shape[0] <= cuda_decode.MAX_ROWS:
            out["modlora-cuda-decode"] = lambda x: cuda_decode.dual_lora_decode(x, W, b, lin, lout, W_IN, W_OUT,
                                                                                strategy)
    return out


def check(name: str, y: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    """A sanity bound (the tests hold the tight one): fp32-relative error of a correct op."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol} before timing")


def run_case(shape: str, m: int, r: int, strategy: str, modes: list[str], dtype: torch.dtype, device: str,
             triton_ok: bool) -> list[dict]:
    """Every provider on one case; F.linear is timed again with each case, next to the others, so a
    ratio compares timings taken under the same machine load."""
    k, n = SHAPES[shape]
    t = make_tensors(k, n, m, r, dtype, device)
    provs = providers(t, strategy, triton_ok)
    with torch.no_grad():
        f32 = lambda a: tuple(v.float() if isinstance(v, Tensor) else v for v in a)
        ref = dual_lora_linear_ref(t["x"].float(), t["W"].float(), t["b"].float(), f32(t["in"]), f32(t["out"]),
                                   W_IN, W_OUT, strategy)
        for name, fn in provs.items():
            if name != "F.linear":
                check(name, fn(t["x"]), ref, dtype)

    rows = []
    for mode in modes:
        x = t["x"].detach().requires_grad_(mode == "fwd+bwd")
        dy = torch.randn(m, n, device=device, dtype=dtype)
        trainable = [p for a in (t["in"], t["out"]) for p in a[:2]]
        for p in trainable:
            p.requires_grad_(mode == "fwd+bwd")
        for name, fn in provs.items():
            if mode == "fwd+bwd" and name in ("merged", "modlora-cuda-decode"):
                continue  # no adapter gradients through a merged weight; the decode op is forward-only
            if mode == "fwd":
                run = lambda fn=fn, x=x: fn(x)
            else:
                run = lambda fn=fn, x=x, dy=dy: fn(x).backward(dy)
            with torch.inference_mode(mode == "fwd"):
                timing = bench(run, device=device)
            rows.append({"shape": shape, "K": k, "N": n, "M": m, "rank": r, "strategy": strategy, "mode": mode,
                         "provider": name, **timing})
        for p in trainable:
            p.requires_grad_(False)
    return rows


def summarize(rows: list[dict], fused_max_m: int | None) -> dict:
    """Per mode, strategy and provider: the geometric mean of time / F.linear over shapes x M at
    rank <= 16, and the smallest speedup over the PEFT layer at M >= 160 (the issue's two goals).
    "modlora-dispatch" is whichever variant the dispatcher would run at that M."""
    case = lambda r: (r["shape"], r["M"], r["rank"], r["strategy"], r["mode"])
    timed = {(*case(r), r["provider"]): r["ms"] for r in rows}
    for r in rows:
        r["vs_linear"] = r["ms"] / timed[(*case(r), "F.linear")]
        if (*case(r), "peft") in timed:
            r["peft_speedup"] = timed[(*case(r), "peft")] / r["ms"]
    if fused_max_m is not None:
        rows = rows + [{**r, "provider": "modlora-dispatch"} for r in rows
                       if r["provider"] == ("modlora-fused" if r["M"] <= fused_max_m else "modlora-split")]
    summary: dict = {}
    for r in rows:
        summary.setdefault(r["mode"], {}).setdefault(r["strategy"], {}).setdefault(r["provider"], [])
    for mode, by_strategy in summary.items():
        for strategy, by_prov in by_strategy.items():
            for prov in by_prov:
                sel = [r for r in rows if (r["mode"], r["strategy"], r["provider"]) == (mode, strategy, prov)]
                low_rank = [math.log(r["vs_linear"]) for r in sel if r["rank"] <= 16]
                speedups = [r["peft_speedup"] for r in sel if r["M"] >= 160 and "peft_speedup" in r]
                by_prov[prov] = {"geomean_vs_linear": math.exp(sum(low_rank) / len(low_rank)) if low_rank else None,
                                 "min_speedup_vs_peft_m160": min(speedups) if speedups else None}
    return summary


def plot(rows: list[dict], rank: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, key=["fwd", "fwd+bwd"].index)
    shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(4 * len(shapes), 3.2 * len(modes)),
                             squeeze=False, sharex=True)
    provs = sorted({r["provider"] for r in rows} - {"F.linear"})
    colors = dict(zip(provs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for prov in provs:
                for strategy, style in (("output", "-"), ("ab", "--")):
                    pts = sorted((r["M"], r["vs_linear"]) for r in rows if (r["mode"], r["shape"], r["provider"],
                                 r["strategy"], r["rank"]) == (mode, shape, prov, strategy, rank))
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker=".", color=colors[prov],
                                label=f"{prov} ({strategy})")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape} {SHAPES[shape][0]}x{SHAPES[shape][1]}, {mode}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            if j == 0:
                ax.set_ylabel(f"time / F.linear (rank {rank})")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases, for a CPU smoke test")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int)
    ap.add_argument("--ranks", nargs="+", type=int)
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    ap.add_argument("--strategies", nargs="+", choices=["output", "ab"], default=["output", "ab"])
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: multi-threaded GEMMs time erratically on a shared machine)")
    add_out_dir(ap)
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    triton_ok = device == "cuda"  # the interpreter checks correctness, it does not time anything
    shapes = args.shapes or (["q/o", "k/v"] if args.quick else list(SHAPES))
    ms = args.m or ([1, 40] if args.quick else MS)
    ranks = args.ranks or ([8] if args.quick else RANKS)
    fused_max_m = None
    if triton_ok:
        from modlora.kernels.dual_lora import FUSED_MAX_M as fused_max_m

    env = environment(device)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    name = f"lora_linear_{slug}_{str(dtype).removeprefix('torch.')}{'_quick' if args.quick else ''}"
    payload = {"env": env, "dtype": str(dtype), "quick": args.quick, "fused_max_m": fused_max_m,
               "dispatch": {m: ("fused" if m <= fused_max_m else "split") for m in ms} if triton_ok else None}
    rows = []
    for shape in shapes:
        for m in ms:
            for r in ranks:
                for strategy in args.strategies:
                    rows += run_case(shape, m, r, strategy, args.modes, dtype, device, triton_ok)
                    print(f"{shape:8s} M={m:<5d} r={r:<3d} {strategy:6s}", end="\r", flush=True)
                    # After every case: a run stopped at its time limit keeps what it measured.
                    write_json(name, {**payload, "complete": False, "summary": summarize(rows, fused_max_m),
                                      "rows": rows}, args.out_dir)
    summary = summarize(rows, fused_max_m)
    path = write_json(name, {**payload, "complete": True, "summary": summary, "rows": rows}, args.out_dir)
    plot(rows, min(ranks, key=lambda r: abs(r - 16)), path.with_suffix(".png"))

    print(f"{'':60s}\n{env['device_name']} {dtype}: time / F.linear (median), rank {ranks}")
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "F.linear"]
    print(f"{'shape':8s} {'M':>5s} {'r':>3s} {'strat':6s} {'mode':7s} {'F.linear ms':>11s} "
          + " ".join(f"{p:>14s}" for p in provs))
    index = {(r["shape"], r["M"], r["rank"], r["strategy"], r["mode"], r["provider"]): r for r in rows}
    for (shape, m, r, strategy, mode, prov), row in index.items():
        if prov != "F.linear":
            continue
        cells = [index.get((shape, m, r, strategy, mode, p)) for p in provs]
        print(f"{shape:8s} {m:5d} {r:3d} {strategy:6s} {mode:7s} {row['ms']:11.4f} "
              + " ".join(f"{c['vs_linear']:14.2f}" if c else f"{'-':>14s}" for c in cells))
    print("geometric mean of time / F.linear over shapes x M at rank <= 16; least speedup over peft at M >= 160")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for mode, by_strategy in summary.items():
        for strategy, by_prov in by_strategy.items():
            for prov, stats in by_prov.items():
                print(f"  {mode:7s} {strategy:6s} {prov:17s} {fmt(stats['geomean_vs_linear']):>7s} "
                      f"{fmt(stats['min_speedup_vs_peft_m160']):>7s}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
