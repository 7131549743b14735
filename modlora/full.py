"""Full-parameter fine-tuning: the paper's baseline (section 4, Table 1's "Full-parameter fine-tuning").

Every parameter of the base trains, with the same hand-written loop as the adapters
(:func:`modlora.train.train`: completion-only loss, AdamW, warmup and decay, checkpoints, exact
resume); the "full" mode is only the set of parameters handed to it. The data is the union of
the English-centric directions the adapters see (every X->en and en->X, en->en once): the paper
does not say which data its baseline uses, and this one sees exactly what the 2n adapters see
together.

Precision: the weights and the AdamW states are fp32 (master weights); on CUDA the trainer runs
the forward and backward under bf16 autocast. The result is a Hugging Face checkpoint folder
(``config.json`` + ``model.safetensors``) that ``transformers`` loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed
from .console import Log, log_stderr
from .loading import save_pretrained
from .model import Qwen2ForCausalLM
from .prompt import training_example
from .tokenizer import Tokenizer
from .train import Example, TrainConfig, train

Direction = tuple[str, str]


def union_directions(jobs: Sequence[Direction]) -> list[Direction]:
    """The distinct directions of the adapter jobs, in first-seen order (en->en once, not twice)."""
    return list(dict.fromkeys(jobs))


def train_full(model: Qwen2ForCausalLM, tokenizer: Tokenizer, data: dict[Direction, Sequence[tuple[str, str]]],
               cfg: TrainConfig, work_dir: str | Path, save_dir: str | Path, *, stop_after: int | None = None,
               log: Log = log_stderr) -> bool:
    """Train all of ``model`` (fp32) on the (source, target) pairs of every direction in ``data``;
    resumes from ``work_dir``; on completion writes the HF checkpoint to ``save_dir``.

    Returns whether the schedule finished (False when ``stop_after`` cut it short). The model's
    parameters are frozen again afterwards.
    """
    examples = [training_example(tokenizer, src, tgt, s, t)
                for (src, tgt), pairs in data.items() for s, t in pairs]
    return _train_all(model, examples, cfg, work_dir, save_dir, "full", tokenizer.pad_id,
                      f"full fine-tuning: {len(examples)} examples from {', '.join(f'{s}->{t}' for s, t in data)}",
                      stop_after, log)


def pretrain(model: Qwen2ForCausalLM, tokenizer: Tokenizer, texts: Sequence[str], cfg: TrainConfig,
             work_dir: str | Path, save_dir: str | Path, *, stop_after: int | None = None,
             log: Log = log_stderr) -> bool:
    """Plain language modelling of every parameter on ``texts`` (each sentence one example, every
    token after the first trained; blank lines, which train nothing, left out), as :func:`train_full`
    resumes and saves.

    The demo's random base learns its languages' tokens this way, not the translation format (no
    chat prompt): a random tied output layer is what keeps adapters from learning (README, demo).
    """
    examples = [lm_example(tokenizer, text) for text in texts if text.strip()]
    return _train_all(model, examples, cfg, work_dir, save_dir, "pretrain", tokenizer.pad_id,
                      f"pre-training: {len(examples)} sentences, plain language modelling", stop_after, log)


def lm_example(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``text`` as a training example: its tokens then ``<|endoftext|>``, all but the first trained."""
    ids = tokenizer.encode(text) + [tokenizer.endoftext_id]
    return ids, [0] + [1] * (len(ids) - 1)


def _train_all(model: Qwen2ForCausalLM, examples: Sequence[Example], cfg: TrainConfig, work_dir: str | Path,
               save_dir: str | Path, desc: str, pad_id: int, what: str, stop_after: int | None, log: Log) -> bool:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError(f"{desc}: full-parameter training keeps fp32 master weights: load the model with dtype "
                         "float32 (bf16 compute comes from autocast on CUDA)")
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    log(f"{what}; {n:,} trainable parameters (100%; weights, gradients and AdamW "
        f"{peak_memory_bytes(n) / 2**30:.2f} GiB)")
    try:
        result = train(model, params, examples, cfg, work_dir, pad_id=pad_id, desc=desc, stop_after=stop_after,
                       log=log)
    finally:
        for p in params:
            p.requires_grad_(False)
    if result["done"] and distributed.current().writes_job_files:  # data parallel: rank 0 writes
        model.config = dataclasses.replace(model.config, dtype="float32")  # the file holds the fp32 master weights
        save_pretrained(model, save_dir)
        log(f"{desc}: saved {save_dir}")
    return result["done"]


def peak_memory_bytes(num_parameters: int) -> int:
    """Weights, gradients and the two AdamW moments, all fp32: 16 bytes per parameter (activations
    and the chunked loss come on top and depend on the batch)."""
    return 16 * num_parameters
