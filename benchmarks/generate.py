"""Beam-5 translation: modlora.generate vs transformers generate + PEFT (two adapters), same weights.

Real FLORES devtest sentences (en -> de prompts, real Qwen2.5 tokenizer), the qwen2.5-0.5b shape
with random weights, two rank-16 LoRA adapters on every linear, both active on both sides (PEFT:
two active adapters, unfused; modlora: the `output` pair with w_in = w_out = 1, the same function).
Both sides decode exactly ``max_new_tokens`` steps (``min_new_tokens = max_new_tokens``: no eos
stops either early). Before anything is timed, both sides' first-step (prefill) logits must agree
(fp32: to 1e-4 of the largest logit; bf16: to 16 bf16 ulps of it); a mismatch is an error. Whether
the beams then pick the same tokens is recorded, not required: in bf16, near-ties legitimately
break either way. ms/step: the median gap between consecutive decode steps within a run;
prefill: the time to the first step.
On CPU, a decode step is also compared with the time to read the model's weights once (every
linear and the lm_head, at the median bandwidth of a memory-read probe run before and after each
side's timing, its buffer in the weights' kind of memory: modlora.memory), and the calls of the C++
op in one decode step are counted (torch profiler).

    python benchmarks/generate.py            # batch 1 and 32, fp32 and bf16, 16 new tokens
    python benchmarks/generate.py --quick    # batch 1 and 4, 6 new tokens
    python benchmarks/generate.py --dtypes bf16 --batches 1   # re-measure some cases only
    python benchmarks/generate.py --threads 1                 # both sides on one thread (a shared box)

The JSON is rewritten after every case (atomically), so an interrupted run keeps what it measured;
cases of an earlier file that this run does not measure are kept, each row with the environment
(versions, commit, time) of the run that measured it. Batch 1 is timed over 3 runs after a
full-length warm-up; larger batches, minutes per run on a CPU, in one run (its steps give the
median) after a 2-token warm-up (one-time setup at that batch: modlora's CPU dispatch calibration
at new row counts, Triton's compiles). Each dtype runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_out_dir,
    check_adapter_dtype,
    cpu_tag,
    environment,
    import_peft,
    in_weight_memory,
    memory_probe,
    write_json,
)

from modlora.adapters import AdapterController, LoraAdapter  # noqa: E402
from modlora.config import Qwen2Config  # noqa: E402
from modlora.generation import generate  # noqa: E402
from modlora.loading import random_model  # noqa: E402
from modlora.model import Qwen2ForCausalLM  # noqa: E402
from modlora.prompt import translation_prompt_ids  # noqa: E402
from modlora.tokenizer import Tokenizer  # noqa: E402

FLORES = Path(__file__).resolve().parents[1] / "modlora" / "assets" / "flores101" / "devtest" / "en.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def adapters(model: Qwen2ForCausalLM) -> list[LoraAdapter]:
    """Two rank-16 adapters on every linear, B made nonzero (at init it is zero: no work to skip)."""
    out = []
    for seed in (1, 2):
        a = LoraAdapter.init(model, rank=16, alpha=32, seed=seed)
        with torch.no_grad():
            for _, B in a.tensors.values():
                B.normal_(0, 0.02)
                B.requires_grad_(False)
            for A, _ in a.tensors.values():
                A.requires_grad_(False)
        out.append(a)
    return out


def hf_peft(model: Qwen2ForCausalLM, pair: list[LoraAdapter], dtype: torch.dtype):
    """transformers Qwen2 with our weights and PEFT holding the same two adapters, both active."""
    import transformers

    peft_lib = import_peft()
    cfg = model.config
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
    hf.load_state_dict(model.state_dict())  # strict: a missing or extra weight is an error
    hf.generation_config.update(pad_token_id=151643, eos_token_id=[151645, 151643], bos_token_id=151643,
                                use_cache=True)
    peft = None
    for name, a in zip(("in", "out"), pair, strict=True):
        lcfg = peft_lib.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0,
                                   target_modules=list(a.target_modules))
        if peft is None:
            peft = peft_lib.get_peft_model(hf, lcfg, adapter_name=name, autocast_adapter_dtype=False)
        else:
            peft.add_adapter(name, lcfg, autocast_adapter_dtype=False)
        with torch.no_grad():
            for module, (A, B) in a.tensors.items():
                layer = peft.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    peft.base_model.set_adapter(["in", "out"])
    check_adapter_dtype(peft, dtype)
    return peft.eval()


@torch.no_grad()
def check_prefill(ours: Qwen2ForCausalLM, peft, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Both sides' logits of the first step agree, or an error: fp32 to 1e-4 of the largest logit,
    bf16 to 16 bf16 ulps of it. tests/test_dispatch.py allows 4 over 2 layers; over this shape's 24,
    each side was 4-5 ulps from an fp32 evaluation of the same bf16 weights and they differed by 5-7
    (batch 1-16), while a dropped adapter moves them by ~180. Positions as generate counts them
    under left padding. Returns the largest difference over the largest logit."""
    got = ours.prefill(ids, mask, ours.new_cache(ids.shape[0], ids.shape[1], 1)).float()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    tol = 1e-4 if ours.lm_head.weight.dtype == torch.float32 else 16 * 2.0**-8
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= tol:
        raise AssertionError(f"first-step logits of modlora and transformers+PEFT differ by {err:.3g} of the "
                             f"largest logit > {tol:.3g} (batch {ids.shape[0]}): not the same model")
    return err


def weight_bytes(model: Qwen2ForCausalLM) -> int:
    """Bytes a decode step must read: every linear's weight and the lm_head (norms and biases are noise)."""
    weights = [lin.weight for lin in model.adapted_linears().values()] + [model.lm_head.weight]
    return sum(w.numel() * w.element_size() for w in weights)


def c_calls_per_step(model: Qwen2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor, num_beams: int = 5) -> int:
    """Calls of the C++ op (``modlora::lora_bank_linear``) in one decode step after a prefill."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], 2, num_beams)
    with torch.no_grad():
        logits = model.prefill(ids, mask, cache)
        tokens = logits.argmax(-1).repeat_interleave(num_beams)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.decode_step(tokens, cache)
    return sum(e.count for e in prof.key_averages() if e.key == "modlora::lora_bank_linear")


class StepClock:
    """Timestamps of the decode steps of one run. ms/step is the median gap between consecutive
    steps inside a run: subtracting a 1-step run from an N-step run drowns the steps in the
    prefill's noise at batch 32 (minutes of prefill on a CPU)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self, *_args) -> None:
        if torch.cuda.is_available():  # a step's kernels are queued asynchronously: wait for them
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def runners(ours, peft, ids, mask, tok: Tokenizer, clock: StepClock):
    """run(n): beam-5 decoding of exactly n new tokens, on each side, ticking `clock` once per step
    (modlora: at each ``decode_step``; transformers: at each logits-processor call)."""
    import transformers

    kw = dict(num_beams=5, pad_token_id=tok.pad_id)
    decode_step = type(ours).decode_step.__get__(ours)

    def ticking_decode_step(*args, **kwargs):
        clock.tick()
        return decode_step(*args, **kwargs)

    ours.decode_step = ticking_decode_step  # on this instance only: the benchmark's probe

    class Tick(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            clock.tick()
            return scores

    processors = transformers.LogitsProcessorList([Tick()])

    def ours_run(n: int):
        return generate(ours, ids, mask, max_new_tokens=n, min_new_tokens=n, eos_token_id=tok.eos_ids, **kw)

    def hf_run(n: int):
        with torch.no_grad():
            return peft.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, eos_token_id=list(tok.eos_ids), logits_processor=processors,
                                 **kw)

    return ours_run, hf_run


def timed(run, steps: int, clock: StepClock, warmup_steps: int, reps: int) -> tuple[torch.Tensor, dict]:
    """Output of the last run; median total and prefill ms, median ms per step over all runs' steps,
    after one warm-up run of ``warmup_steps`` new tokens."""
    run(warmup_steps)
    totals, prefills, gaps = [], [], []
    for _ in range(reps):
        clock.stamps.clear()
        start = time.perf_counter()
        out = run(steps)
        clock.tick()  # waits for the GPU; its stamp is the end of the last step
        totals.append((clock.stamps[-1] - start) * 1e3)
        clock.stamps.pop()
        prefills.append((clock.stamps[0] - start) * 1e3)
        gaps += [(b - a) * 1e3 for a, b in pairwise(clock.stamps)]
    return out, {"ms": statistics.median(totals), "prefill_ms": statistics.median(prefills),
                 "ms_per_step": statistics.median(gaps), "steps_timed": len(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, 6 new tokens, fewer repeats")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 32; quick 1 4)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--max-new-tokens", type=int, help="decode steps (default 16; quick 6)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's)")
    add_out_dir(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 4] if args.quick else [1, 32])
    steps = args.max_new_tokens or (6 if args.quick else 16)
    if len(args.dtypes) > 1:
        # One process per dtype: run after the fp32 models, the bf16 decode steps measured twice as
        # slow as in a fresh process on the 2-core CPU box.
        same = ["--batches", *map(str, batches), "--max-new-tokens", str(steps), "--device", args.device,
                "--out-dir", str(args.out_dir)]
        same += ["--threads", str(args.threads)] if args.threads else []
        for dname in args.dtypes:
            subprocess.run([sys.executable, __file__, *same, "--dtypes", dname] + ["--quick"] * args.quick,
                           check=True)
        return
    reps = 2 if args.quick else 3

    tok = Tokenizer.default()
    sentences = FLORES.read_text(encoding="utf-8").splitlines()
    prompts = [translation_prompt_ids(tok, "en", "de", s) for s in sentences]
    # CPU results per CPU model: each machine keeps its rows.
    name = f"generate-{args.device}" + (f"-{cpu_tag()}" if args.device == "cpu" else "")
    name += "-quick" if args.quick else ""
    env = environment(args.device)
    path = args.out_dir / f"{name}.json"
    rows = earlier_rows(path)
    # 512 MiB in the weights' kind of memory, probed around every timed run: a shared VM's bandwidth
    # can jump (here from ~35 to ~60 GB/s for seconds at a time), so one probe may miss the runs'.
    probe_buffer = in_weight_memory(torch.ones(128 << 20)) if args.device == "cpu" else None
    probe = lambda: [memory_probe(probe_buffer)["GBs"]] if probe_buffer is not None else []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        ours = random_model(Qwen2Config.preset("qwen2.5-0.5b"), seed=0, dtype=dtype, device=args.device)
        pair = adapters(ours)
        AdapterController(ours).set_adapters(*pair, w_in=1.0, w_out=1.0, strategy="output")
        peft = hf_peft(ours, pair, dtype).to(args.device)
        for batch in batches:
            enc = tok.pad(prompts[:batch])
            ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
            clock = StepClock()
            ours_run, hf_run = runners(ours, peft, ids, mask, tok, clock)

            row = {"dtype": dname, "batch": batch, "num_beams": 5, "new_tokens": steps,
                   "prompt_tokens": int(mask.sum()), "padded_prompt_len": ids.shape[1],
                   "prefill_logits_max_diff_rel": check_prefill(ours, peft, ids, mask)}
            tokens, probes = {}, probe()
            for side, run in (("modlora", ours_run), ("transformers_peft", hf_run)):
                r, warmup_steps = (reps, steps) if batch == 1 else (1, 2)
                tokens[side], t = timed(run, steps, clock, warmup_steps, r)
                row[side] = {**t, "sentences_per_s": batch / (t["ms"] / 1e3), "repetitions": r}
                probes += probe()
            read_ms = None
            if probes:
                row["probe_GBs"], row["probe_GBs_each"] = statistics.median(probes), probes
                row["weight_read_ms"] = read_ms = weight_bytes(ours) / row["probe_GBs"] / 1e6
                row["step_over_weight_read"] = row["modlora"]["ms_per_step"] / read_ms
                row["modlora"]["c_calls_per_step"] = c_calls_per_step(ours, ids, mask)
            row["threads"] = torch.get_num_threads()
            row["load_average_1min"] = os.getloadavg()[0]  # other jobs on the box skew CPU timings
            # Information, not a check: in bf16 beams may part after a near-tie of two scores.
            row["tokens_match"] = bool(torch.equal(tokens["modlora"], tokens["transformers_peft"]))
            row["speedup"] = row["modlora"]["sentences_per_s"] / row["transformers_peft"]["sentences_per_s"]
            row["step_speedup"] = row["transformers_peft"]["ms_per_step"] / row["modlora"]["ms_per_step"]
            m, h = row["modlora"], row["transformers_peft"]
            print(f"{dname} batch {batch:3d}: modlora {m['sentences_per_s']:.3f} sent/s {m['ms_per_step']:.1f} ms/step"
                  f" | transformers+PEFT {h['sentences_per_s']:.3f} sent/s {h['ms_per_step']:.1f} ms/step"
                  f" | {row['speedup']:.2f}x sentences/s, {row['step_speedup']:.2f}x per step,"
                  f" tokens match: {row['tokens_match']}"
                  + (f" | step = {row['step_over_weight_read']:.2f}x weight read ({read_ms:.1f} ms),"
                     f" {m['c_calls_per_step']} C++ calls per step" if read_ms else ""), flush=True)
            rows = save(path, env, row, rows)
    print(f"wrote {path}")


def save(path: Path, env: dict, row: dict, rows: list[dict]) -> list[dict]:
    """Rows with `row` added or replacing the same (dtype, batch, threads) case; writes the JSON and
    the plot. Each row holds the environment of the run that measured it: rows of earlier runs
    (other commits, versions) are kept, none is attributed to this run's."""
    row["environment"] = env
    case = lambda r: (r["dtype"], r["batch"], r.get("threads"))
    rows = sorted([r for r in rows if case(r) != case(row)] + [row],
                  key=lambda r: (list(DTYPES).index(r["dtype"]), r["batch"], r.get("threads") or 0))
    write_json(path.stem, {"benchmark": "generate", "results": rows}, path.parent)
    plot(rows, path.with_suffix(".png"))
    return rows


def earlier_rows(path: Path) -> list[dict]:
    """An earlier file's rows, each with its own environment. Files written before rows held theirs
    had one top-level environment, the last run's: it goes to the rows of that run (same time), the
    others keep only their commit, dirty flag and time."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    env = data.get("environment")
    for r in data["results"]:
        if "environment" not in r and env and r.get("time") == env["time"]:
            r["environment"] = env
    return data["results"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dtype']}\nbatch {r['batch']}\n{r.get('threads', '?')} thr\n{r['new_tokens']} tokens"
              for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    for k, (side, color) in enumerate((("modlora", "tab:blue"), ("transformers_peft", "tab:gray"))):
        ax.bar([i + 0.38 * (k - 0.5) for i in x], [r[side]["sentences_per_s"] for r in rows], 0.38,
               label=side.replace("_", " + "), color=color)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x", (i, max(r["modlora"]["sentences_per_s"],
                                                    r["transformers_peft"]["sentences_per_s"])),
                    ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("sentences / s")
    ax.set_title("beam-5 decoding (new tokens per bar), qwen2.5-0.5b shape, two LoRA adapters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
