"""Activation memory of full fine-tuning, with and without activation checkpointing: a count, not a timing.

The bytes autograd keeps from the forward pass for the backward (``saved_tensors_hooks``; storages
counted once, the parameters themselves excluded), for one training micro-batch of real data (the
first FLORES-101 dev pairs fr->en, real tokenizer and chat prompt, fp32). At the Qwen2.5-0.5B width
it counts 1- and 2-layer models and extrapolates linearly to the 24 layers (per layer = the
difference); the tiny preset (the demo's base) is counted whole.

Writes ``benchmarks/results/activation_memory.json`` (``--out-dir`` elsewhere).

    python benchmarks/activation_memory.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import add_out_dir, environment, write_json

from modlora import Tokenizer
from modlora.config import PRESETS
from modlora.data import load_split
from modlora.loading import random_model
from modlora.prompt import training_example
from modlora.train import collate, completion_loss

MiB = 2**20


def kept_bytes(model, batch, checkpoint_layers: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, n = completion_loss(model, *batch, checkpoint_layers=checkpoint_layers)
    (loss_sum / n).backward()
    return sum(kept.values())


def count(config, batch) -> dict[bool, int]:
    model = random_model(config, seed=0, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    return {flag: kept_bytes(model, batch, flag) for flag in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_dir(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.default()
    data = load_split("dev", ["fr", "en"], None, 8)
    paper_batch = collate([training_example(tok, "fr", "en", s, t) for s, t in zip(data["fr"], data["en"],
                                                                                      strict=True)], tok.pad_id)
    demo_batch = collate([training_example(tok, "fr", "en", s, t) for s, t in zip(data["fr"][:4], data["en"][:4],
                                                                                     strict=True)], tok.pad_id)
    base = PRESETS["qwen2.5-0.5b"]
    one, two = (count(dataclasses.replace(base, num_hidden_layers=n), paper_batch) for n in (1, 2))
    out = {"environment": environment(), "dtype": "float32",
           "qwen2.5-0.5b": {"batch": list(paper_batch[0].shape), "tokens": int(paper_batch[1].sum())},
           "tiny": {"batch": list(demo_batch[0].shape), "tokens": int(demo_batch[1].sum())}}
    for flag in (False, True):
        per_layer, rest = two[flag] - one[flag], 2 * one[flag] - two[flag]
        key = "checkpointing" if flag else "no_checkpointing"
        out["qwen2.5-0.5b"][key] = {"per_layer_mib": per_layer / MiB, "rest_mib": rest / MiB,
                                    "total_24_layers_gib": (rest + base.num_hidden_layers * per_layer) / 2**30}
    tiny = count(PRESETS["tiny"], demo_batch)
    out["tiny"].update({"no_checkpointing_mib": tiny[False] / MiB, "checkpointing_mib": tiny[True] / MiB})
    print(write_json("activation_memory", out, args.out_dir))
    print({k: v for k, v in out.items() if k != "environment"})


if __name__ == "__main__":
    main()
