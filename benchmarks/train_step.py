"""Training throughput of one adapter on the Qwen2.5-0.5B shape: modlora vs transformers + peft.

Both sides get the same random weights (one checkpoint written once), the same LoRA init (A
copied, B zero), the same batches of real FLORES fr->en training examples (real tokenizer and
chat prompt, right-padded, prompt masked), AdamW, clipping, the same dtype. Each side runs in its
own subprocess so that its peak memory (VmHWM, resident set) is its own. Variants:

- ``modlora``: the library's step (:func:`modlora.train.completion_loss`: no padding in the linears,
  the shared prompt prefix run once per batch, hidden states of the
  trained positions only, chunked fp32 cross-entropy);
- ``modlora-no-prefix-sharing``: the same, but the prompt prefix common to the batch runs per row;
- ``modlora-full-logits``: the same model with the plain loss (fp32 logits of every position, then
  ``F.cross_entropy``): isolates what the chunked loss saves;
- ``transformers+peft``: ``get_peft_model`` on ``transformers.Qwen2ForCausalLM``, loss from
  ``labels`` (the plain loop a user would write).

The reference (transformers + peft) runs first; before any timing, each other side's first-step
loss must match the reference's: fp32 to 1e-5, bf16 to one bf16 ulp; a mismatch is an error.
Reported: non-padding tokens/s (median step), peak RSS and its growth over the loaded model, the
loss of every step (equal across sides up to float noise). On a GPU (``--device cuda``, the default
when one is visible) the memory is torch's peak allocated CUDA memory instead of the RSS, and the
results go to ``train_step-cuda.json``.

    python benchmarks/train_step.py [--steps 4] [--batch-size 4] [--dtype float32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_dir, check_adapter_dtype, environment, import_peft, write_json  # noqa: E402

from modlora.adapters import TARGET_MODULES, AdapterController, LoraAdapter  # noqa: E402
from modlora.loading import load_pretrained, random_model, save_pretrained  # noqa: E402
from modlora.train import completion_loss  # noqa: E402

VARIANTS = ("modlora", "modlora-no-prefix-sharing", "modlora-full-logits", "transformers+peft")
RANK, ALPHA, LR = 8, 16, 1e-3


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _batches(batch_size: int, steps: int):
    from modlora.data import load_split
    from modlora.prompt import training_example
    from modlora.tokenizer import Tokenizer
    from modlora.train import collate

    tok = Tokenizer.default()
    data = load_split("dev", ["fr", "en"], limit=batch_size * steps)
    examples = [training_example(tok, "fr", "en", s, t) for s, t in zip(data["fr"], data["en"], strict=True)]
    return [collate(examples[i:i + batch_size], tok.pad_id) for i in range(0, len(examples), batch_size)]


def _memory_mib(device: str, peak: bool) -> float:
    """Peak or current memory: resident set on CPU, allocated CUDA memory on a GPU."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    return _rss_mib("VmHWM" if peak else "VmRSS")


def build(variant: str, ckpt: str, dt: torch.dtype, device: str):
    """``(model, trained parameters, loss_fn(ids, attn, mask))`` of one side, in training mode."""
    torch.manual_seed(0)
    ours = load_pretrained(ckpt, dtype=dt, device=device)
    adapter = LoraAdapter.init(ours, rank=RANK, alpha=ALPHA, seed=0, dtype=dt)
    if variant == "transformers+peft":
        import transformers

        peft = import_peft()
        init = {name: A.detach().clone() for name, (A, _) in adapter.tensors.items()}
        del ours, adapter
        hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dt).to(device)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES),
                                                        lora_dropout=0.0), autocast_adapter_dtype=False)
        check_adapter_dtype(model, dt)  # else its LoRA matmuls and AdamW state run in fp32
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, A in init.items():
                modules[f"base_model.model.{name}"].lora_A["default"].weight.copy_(A)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(ids, attn, mask):
            return model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(mask == 0, -100)).loss
    else:
        AdapterController(ours).set_adapters(lora_in=adapter, w_in=1.0)
        model, params = ours, adapter.parameters()
        if variant != "modlora-full-logits":
            def loss_fn(ids, attn, mask):
                total, n = completion_loss(ours, ids, attn, mask, share_prefix=variant == "modlora")
                return total / n
        else:
            def loss_fn(ids, attn, mask):
                logits = ours(ids, attn).float()
                labels = ids.masked_fill(mask == 0, -100)[:, 1:]
                return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
    model.train()
    return model, params, loss_fn


@torch.no_grad()
def first_loss(loss_fn, batch: tuple) -> float:
    """The first step's loss (B = 0: the base model's), computed before any timing."""
    return float(loss_fn(*batch))


def check_loss(variant: str, got: float, ref: float, dt: torch.dtype) -> None:
    """fp32: the same function up to summation order; bf16: one bf16 ulp of the loss, a mean of fp32
    cross-entropies over bf16 logits that differ by a few ulps each (seen: 7e-5 at the 0.5B shape)."""
    tol = 1e-5 if dt == torch.float32 else 2.0**-8
    if not abs(got - ref) <= tol * abs(ref):
        raise AssertionError(f"{variant}: first-step loss {got!r} vs transformers+peft's {ref!r}: relative "
                             f"difference {abs(got - ref) / abs(ref):.3g} > {tol:.3g} (checked before timing)")


def worker(variant: str, ckpt: str, batch_size: int, steps: int, dtype: str, device: str,
           ref_loss: float | None) -> dict:
    """One side of the comparison, run in its own process; prints its result as JSON. Its first-step
    loss is checked against ``ref_loss`` (None: this is the reference) before anything is timed."""
    dt = getattr(torch, dtype)
    batches = [tuple(t.to(device) for t in b) for b in _batches(batch_size, steps)]
    model, params, loss_fn = build(variant, ckpt, dt, device)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    with torch.no_grad():  # page the (possibly memory-mapped) weights in before taking the baseline
        for p in model.parameters():
            p.sum()
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    loaded = _memory_mib(device, peak=False)
    first = first_loss(loss_fn, batches[0])
    if ref_loss is not None:
        check_loss(variant, first, ref_loss, dt)
    losses, seconds, tokens = [], [], []
    for ids, attn, mask in batches:
        start = time.perf_counter()
        loss = loss_fn(ids, attn, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        tokens.append(int(attn.sum()))
    med = sorted(s / t for s, t in zip(seconds[1:], tokens[1:], strict=True))[(len(seconds) - 1) // 2]
    return {"variant": variant, "first_loss": first, "losses": losses, "step_seconds": seconds,
            "tokens_per_step": tokens, "tokens_per_s": 1.0 / med,
            "tokens_per_s_note": "non-padding tokens, median over steps after the first",
            "memory": "cuda_allocated" if device == "cuda" else "rss", "loaded_mib": loaded,
            "peak_mib": _memory_mib(device, peak=True), "peak_growth_mib": _memory_mib(device, peak=True) - loaded}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    names = [r["variant"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].bar(names, [r["tokens_per_s"] for r in runs], color="C0")
    axes[0].set(title="training tokens/s (higher is better)")
    axes[1].bar(names, [r["peak_growth_mib"] for r in runs], color="C1")
    axes[1].set(title=f"peak {runs[0]['memory']} memory over the loaded model, MiB")
    for r in runs:
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=r["variant"])
    axes[2].set(title="loss per step", xlabel="step")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7, labelrotation=15)
    s = payload["setup"]
    fig.suptitle(f"one LoRA adapter, qwen2.5-0.5b shape, {s['dtype']}, batch {s['batch_size']}, "
                 f"{payload['environment']['device_name']} x{payload['environment']['cpu_threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="at least 2: the first step is not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--ref-loss", type=float, help=argparse.SUPPRESS)
    add_out_dir(parser)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step (warm-up) is not timed")
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.batch_size, args.steps, args.dtype, args.device,
                                args.ref_loss)))
        return

    runs, ref_loss = [], None
    with tempfile.TemporaryDirectory() as ckpt:
        save_pretrained(random_model("qwen2.5-0.5b", seed=0, dtype=getattr(torch, args.dtype)), ckpt)
        for variant in sorted(VARIANTS, key=lambda v: v != "transformers+peft"):  # the reference first
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--ckpt", ckpt, "--steps",
                                  str(args.steps), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                                  "--device", args.device] + ["--ref-loss", repr(ref_loss)] * (ref_loss is not None),
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            ref_loss = runs[0]["first_loss"]
            print(f"{variant:22} {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_mib']:7.0f} MiB "
                  f"(+{r['peak_growth_mib']:.0f} over loaded)  losses {[round(x, 5) for x in r['losses']]}",
                  file=sys.stderr)
    runs.sort(key=lambda r: VARIANTS.index(r["variant"]))
    by = {r["variant"]: r for r in runs}
    ref = by["transformers+peft"]
    payload = {
        "benchmark": "train_step",
        "environment": environment(args.device),
        "setup": {"shape": "qwen2.5-0.5b", "dtype": args.dtype, "batch_size": args.batch_size, "steps": args.steps,
                  "rank": RANK, "alpha": ALPHA, "optimizer": f"AdamW lr {LR}, clip 1.0",
                  "data": "FLORES-101 dev fr->en, chat prompt, completion-only loss, right padding"},
        "runs": runs,
        "speedup_vs_transformers_peft": {v: by[v]["tokens_per_s"] / ref["tokens_per_s"] for v in by},
        "peak_growth_ratio_vs_transformers_peft": {v: by[v]["peak_growth_mib"] / ref["peak_growth_mib"] for v in by},
        "max_loss_rel_diff_vs_transformers_peft": {
            v: max(abs(a - b) / abs(b) for a, b in zip(by[v]["losses"], ref["losses"], strict=True)) for v in by},
    }
    name = "train_step" if args.device == "cpu" else f"train_step-{args.device}"
    path = write_json(name, payload, args.out_dir)
    plot(payload, path.with_suffix(".png"))
    print(json.dumps({k: payload[k] for k in ("speedup_vs_transformers_peft", "peak_growth_ratio_vs_transformers_peft",
                                              "max_loss_rel_diff_vs_transformers_peft")}, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
