"""What `modlora run configs/paper.toml` costs: token counts of the real data, hours from measured rates.

An estimate, not a measurement of the whole run. What is counted exactly: the tokens of every
training example (real FLORES-101 dev, real tokenizer, the chat prompt) per stage, and the
tokens to generate in evaluation (the devtest references' lengths as a stand-in for the
hypotheses'). What is measured: this project's CPU rates at the Qwen2.5-0.5B shape, read from
``benchmarks/results/train_step.json`` (adapter training tokens/s) and ``generate-cpu.json``
(beam-5 decode ms/step and prefill at batch 32, fp32). What is assumed (no GPU was available to
measure): full fine-tuning costs 6N FLOPs per token against 4N for an adapter or the merge weights
(both back-propagate through the frozen base; full adds the weight gradients), and a GPU sustains
``--gpu-tflops`` on training and ``--gpu-step-ms`` per beam-search step of 32 sentences x 5 beams.

Writes ``benchmarks/results/paper_cost.json`` and ``paper_cost.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

N_PARAMS = 494_032_768  # Qwen2.5-0.5B (tied embeddings counted once)


def training_tokens(langs: list[str], pivot: str = "en") -> dict[tuple[str, str], int]:
    """Tokens (prompt + completion) of every dev example per direction."""
    from modlora.data import directions, load_split
    from modlora.prompt import training_example
    from modlora.tokenizer import Tokenizer

    tok = Tokenizer.default()
    data = load_split("dev", langs)
    wanted = set(directions(langs)) | {(pivot, pivot)}
    return {(s, t): sum(len(training_example(tok, s, t, a, b)[0]) for a, b in zip(data[s], data[t], strict=True))
            for s, t in sorted(wanted)}


def eval_batches(langs: list[str], batch: int) -> tuple[int, int]:
    """(decode steps, prompt tokens) of one configuration over all directions: per batch of
    ``batch`` sentences, as many steps as its longest reference (+1 for <|im_end|>)."""
    from modlora.data import directions, load_split
    from modlora.prompt import translation_prompt_ids
    from modlora.tokenizer import Tokenizer

    tok = Tokenizer.default()
    data = load_split("devtest", langs)
    ref_len = {x: [len(ids) + 1 for ids in tok.encode_batch(data[x])] for x in langs}
    steps = prompt = 0
    for src, tgt in directions(langs):
        lengths = ref_len[tgt]
        steps += sum(max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
        prompt += sum(len(translation_prompt_ids(tok, src, tgt, text)) for text in data[src])
    return steps, prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="sustained training TFLOP/s assumed for the GPU (A100 bf16 peak 312; 100 is ~1/3)")
    ap.add_argument("--gpu-step-ms", type=float, default=25.0,
                    help="assumed GPU ms per beam-search step of 32 sentences x 5 beams (24 layers, eager)")
    args = ap.parse_args()
    langs = ["en", "fr", "de", "ja", "zh"]
    epochs, configs, batch = 2, 14, 32
    tokens = training_tokens(langs)
    adapter_tokens = epochs * sum(tokens[(lang, "en")] + tokens[("en", lang)] for lang in langs)  # 2n adapters
    full_tokens = epochs * sum(tokens[d] for d in {(x, "en") for x in langs} | {("en", x) for x in langs})
    weight_tokens = epochs * 2 * sum(v for (s, t), v in tokens.items() if s != t)  # 2 strategies x 20 directions
    steps, prompt_tokens = eval_batches(langs, batch)

    train = json.loads((RESULTS / "train_step.json").read_text())
    cpu_tok_s = next(r for r in train["runs"] if r["variant"] == "modlora")["tokens_per_s"]
    gen = next(r for r in json.loads((RESULTS / "generate-cpu.json").read_text())["results"]
               if r["dtype"] == "fp32" and r["batch"] == batch)
    cpu_step_s = gen["modlora"]["ms_per_step"] / 1e3
    cpu_prefill_tok_s = gen["prompt_tokens"] / (gen["modlora"]["prefill_ms"] / 1e3)

    flops = {"adapters": 4 * N_PARAMS * adapter_tokens, "full": 6 * N_PARAMS * full_tokens,
             "weights": 4 * N_PARAMS * weight_tokens}
    cpu_hours = {"adapters": adapter_tokens / cpu_tok_s / 3600, "full": 1.5 * full_tokens / cpu_tok_s / 3600,
                 "weights": weight_tokens / cpu_tok_s / 3600,
                 "eval": configs * (steps * cpu_step_s + prompt_tokens / cpu_prefill_tok_s) / 3600}
    gpu_hours = {k: v / (args.gpu_tflops * 1e12) / 3600 for k, v in flops.items()}
    gpu_hours["eval"] = configs * (steps * args.gpu_step_ms / 1e3 + 2 * N_PARAMS * prompt_tokens
                                   / (args.gpu_tflops * 1e12)) / 3600
    out = {"benchmark": "paper_cost", "kind": "estimate (token counts exact; rates measured on CPU; GPU assumed)",
           "counted": {"adapter_tokens": adapter_tokens, "full_tokens": full_tokens, "weight_tokens": weight_tokens,
                       "eval_configurations": configs, "eval_decode_steps_per_configuration": steps,
                       "eval_prompt_tokens_per_configuration": prompt_tokens},
           "measured_cpu": {"train_tokens_per_s": cpu_tok_s, "decode_s_per_step_batch32": cpu_step_s,
                            "prefill_tokens_per_s": cpu_prefill_tok_s, "sources": ["train_step.json",
                                                                                   "generate-cpu.json"]},
           "assumed_gpu": {"train_tflops": args.gpu_tflops, "decode_ms_per_step_batch32": args.gpu_step_ms},
           "cpu_hours": cpu_hours, "gpu_hours": gpu_hours,
           "total": {"cpu_hours": sum(cpu_hours.values()), "gpu_hours": sum(gpu_hours.values())}}
    write_json("paper_cost", {**out, "environment": environment()})
    for k in cpu_hours:
        print(f"{k:9s} CPU {cpu_hours[k]:9.1f} h   GPU {gpu_hours[k]:6.2f} h")
    print(f"total     CPU {sum(cpu_hours.values()):9.1f} h   GPU {sum(gpu_hours.values()):6.2f} h")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, (name, hours) in zip(axes, (("CPU hours (measured rates, 2 cores)", cpu_hours),
                                        ("GPU hours (assumed rates)", gpu_hours)), strict=True):
        ax.bar(list(hours), list(hours.values()))
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log" if max(hours.values()) > 100 * max(min(hours.values()), math.ulp(1)) else "linear")
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_cost.png", dpi=100)


if __name__ == "__main__":
    main()
