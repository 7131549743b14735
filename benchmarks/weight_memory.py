"""Decode step with the weights in huge pages (modlora.memory) vs the same layout in ordinary memory.

Two copies of one model in one process (Qwen2.5-0.5B shape, random weights, two rank-16 adapters
bound as in benchmarks/generate.py, beam 5, batch 1): ``huge_pages`` as the loaders lay it out
(``pack_weights()``: each layer's linears in one buffer from modlora.memory.weight_buffer), and
``ordinary`` with the same buffers, the same layout, from ``torch.empty``. Rounds alternate between
them (a prefill, then ``--steps`` timed decode steps each), so that whatever else the machine runs
falls on both; a row gives the median and 20/80% quantiles of all steps but the first two of each
round, the huge pages the process holds (AnonHugePages) and the memory-read probe in each kind.

    python benchmarks/weight_memory.py --threads 2      # and --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_tag, environment, in_weight_memory, memory_probe, write_json  # noqa: E402
from generate import adapters  # noqa: E402

from modlora.adapters import AdapterController  # noqa: E402
from modlora.config import Qwen2Config  # noqa: E402
from modlora.cpu import BoundSites  # noqa: E402
from modlora.loading import random_model  # noqa: E402
from modlora.memory import ordinary_buffer  # noqa: E402
from modlora.model import Qwen2ForCausalLM  # noqa: E402

PROMPT = 40


def model(dtype: torch.dtype, huge_pages: bool) -> Qwen2ForCausalLM:
    m = random_model(Qwen2Config.preset("qwen2.5-0.5b"), seed=0, dtype=dtype)
    if not huge_pages:
        m.pack_weights(ordinary_buffer)
    AdapterController(m).set_adapters(*adapters(m), w_in=1.0, w_out=1.0, strategy="output")
    return m


@torch.no_grad()
def step_times(m: Qwen2ForCausalLM, ids: torch.Tensor, steps: int) -> list[float]:
    """ms of each decode step after the first two, beam 5, after a prefill of ``ids``; the linears
    run as in ``generate`` (each site's op calls bound on its first run: modlora.cpu.BoundSites)."""
    cache = m.new_cache(1, ids.shape[1], steps + 2, num_beams=5)
    tokens = m.prefill(ids, torch.ones_like(ids), cache).argmax(-1).repeat_interleave(5)
    site, times = BoundSites(), []
    for _ in range(steps + 2):
        start = time.perf_counter()
        m.decode_step(tokens, cache, site)
        times.append((time.perf_counter() - start) * 1e3)
    return times[2:]


def anon_huge_kb() -> int | None:
    """Anonymous memory of this process in huge pages (kB), or None where /proc has no such line."""
    rollup = Path("/proc/self/smaps_rollup")
    lines = rollup.read_text().splitlines() if rollup.is_file() else []
    return next((int(line.split()[1]) for line in lines if line.startswith("AnonHugePages:")), None)


def thp_mode() -> str | None:
    """The system's transparent huge page mode (the bracketed word of the sysfs file), or None."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.is_file() else ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=24, help="rounds per kind of memory")
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env, dtype = environment("cpu"), torch.bfloat16
    kb = {"before": anon_huge_kb()}
    models = {"ordinary": model(dtype, False)}
    kb["ordinary"] = anon_huge_kb()
    models["huge_pages"] = model(dtype, True)
    kb["huge_pages"] = anon_huge_kb()
    ids = torch.randint(0, 150000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = {kind: [] for kind in models}
    for _ in range(args.rounds):
        for kind, m in models.items():
            times[kind] += step_times(m, ids, args.steps)
    buffer = torch.ones(128 << 20)  # 512 MiB of fp32, far beyond the caches
    probe = {"ordinary": memory_probe(buffer), "huge_pages": memory_probe(in_weight_memory(buffer))}
    rows = {}
    for kind, t in times.items():
        t.sort()
        rows[kind] = {"ms_per_step": statistics.median(t), "q20": t[len(t) // 5], "q80": t[4 * len(t) // 5],
                      "steps": len(t), "probe_GBs": probe[kind]["GBs"]}
    speedup = rows["ordinary"]["ms_per_step"] / rows["huge_pages"]["ms_per_step"]
    for kind, r in rows.items():
        print(f"{kind:10}: {r['ms_per_step']:.1f} ms/step (q20 {r['q20']:.1f}, q80 {r['q80']:.1f}), "
              f"probe {r['probe_GBs']:.1f} GB/s")
    print(f"huge pages: {speedup:.3f}x per step; AnonHugePages kB {kb}")
    name = f"weight_memory-{cpu_tag()}-{torch.get_num_threads()}t"
    payload = {"benchmark": "weight_memory", "environment": env, "dtype": "bf16", "num_beams": 5,
               "batch": 1, "prompt_tokens": PROMPT, "rounds": args.rounds, "anon_huge_pages_kB": kb,
               "thp_mode": thp_mode(), "results": rows, "speedup": speedup}
    write_json(name, payload)
    plot(rows, speedup, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json")


def plot(rows: dict, speedup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    kinds = list(rows)
    ax.bar(kinds, [rows[k]["ms_per_step"] for k in kinds], color=["tab:gray", "tab:blue"],
           yerr=[[rows[k]["ms_per_step"] - rows[k]["q20"] for k in kinds],
                 [rows[k]["q80"] - rows[k]["ms_per_step"] for k in kinds]], capsize=6)
    ax.set_ylabel("ms per decode step (median, q20-q80)")
    ax.set_title(f"bf16 beam-5 decode step, {torch.get_num_threads()} threads: {speedup:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
