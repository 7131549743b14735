"""One forward pass and one decode step of the Qwen2.5-0.5B shape: modlora vs transformers.

Both models hold the same random weights and must agree on the logits before anything is timed.
Timings alternate round by round (one modlora call, one transformers call, ...; on CUDA one
do_bench of each) and the speedup is the median of the rounds' ratios, so a slow spell of this
machine falls on both sides of a ratio. Writes benchmarks/results/forward-<device>.json.

    python benchmarks/forward.py [--quick] [--device cuda] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import add_out_dir, bench, environment, quantiles, write_json

from modlora.config import Qwen2Config
from modlora.loading import random_model
from modlora.model import Qwen2ForCausalLM


def hf_twin(model: Qwen2ForCausalLM):
    """A transformers Qwen2ForCausalLM holding exactly our weights."""
    import transformers

    cfg = model.config.to_dict()
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    hf.load_state_dict(model.state_dict(), assign=True)  # strict: every weight has its twin
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(model.lm_head.weight.device)
    return hf.eval()


def alternating(ours: Callable, hf: Callable, rounds: int, device: str, warmup: int = 2) -> dict:
    """Each side's median and quantiles over rounds of one timing of each in turn, and the median of
    the rounds' ratios (transformers / modlora): a ratio compares timings taken moments apart."""
    for _ in range(warmup):
        ours(), hf()
    times: dict[str, list[float]] = {"modlora": [], "transformers": []}
    for _ in range(rounds):
        for side, fn in (("modlora", ours), ("transformers", hf)):
            times[side].append(bench(fn, warmup=0, reps=1, device=device)["ms"])
    ratios = [h / o for o, h in zip(times["modlora"], times["transformers"], strict=True)]
    return {**{side: quantiles(t) for side, t in times.items()}, "rounds": rounds,
            "speedup_vs_transformers": statistics.median(ratios)}


def run(dtype: torch.dtype, device: str, prompt_len: int, batch: int, reps: int) -> dict:
    config = Qwen2Config.preset("qwen2.5-0.5b")
    ours = random_model(config, seed=0, dtype=dtype, device=device)
    hf = hf_twin(ours)
    ids = torch.randint(0, 150000, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    step_ids = ids[:, -1]
    with torch.no_grad():
        # Same model on both sides? A relative norm error, not per element: in bf16 single logits
        # differ by a few units in the last place of their magnitude; wrong weights give ~1.4.
        ref = hf(ids[:, :8]).logits.float()
        err = float((ours(ids[:, :8]).float() - ref).norm() / ref.norm())
        if err > (1e-5 if dtype == torch.float32 else 2e-2):
            raise AssertionError(f"modlora and transformers disagree in {dtype}: relative error {err:.2e}")
        cache = ours.new_cache(batch, prompt_len, max_new_tokens=1)
        ours.prefill(ids, None, cache)
        hf_cache = hf(ids, use_cache=True).past_key_values

        def ours_step():
            cache.step = 0
            return ours.decode_step(step_ids, cache)

        def hf_step():
            logits = hf(step_ids[:, None], past_key_values=hf_cache, use_cache=True).logits
            hf_cache.crop(-1)  # drop the step again, so every call decodes at the same position
            return logits

        timings = {"forward": alternating(lambda: ours(ids), lambda: hf(ids).logits, reps, device),
                   "decode_step": alternating(ours_step, hf_step, reps, device)}
    return {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "prompt_len": prompt_len, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke test)")
    add_out_dir(parser)
    args = parser.parse_args()
    reps = 3 if args.quick else 10
    dtypes = [torch.bfloat16] if args.device == "cuda" else [torch.float32, torch.bfloat16]
    results = [run(dt, args.device, prompt_len=64, batch=1, reps=reps) for dt in dtypes]
    for r in results:
        parts = [f"{what} {r[what]['modlora']['ms']:.1f} ms vs {r[what]['transformers']['ms']:.1f} ms"
                 f" ({r[what]['speedup_vs_transformers']:.2f}x)" for what in ("forward", "decode_step")]
        print(f"{r['dtype']:>9}: " + "; ".join(parts))
    payload = {"benchmark": "forward", "env": environment(args.device), "model": "qwen2.5-0.5b (random weights)",
               "results": results}
    path = write_json(f"forward-{args.device}", payload, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
