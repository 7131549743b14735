"""Hand-written SFT loop for language adapters and per-layer merge weights (docs/design.md, "Training").

- Completion-only cross-entropy: the prompt is masked, the translation and its closing
  ``<|im_end|>`` are trained (masks from :func:`modlora.prompt.training_example`).
- Hidden states come from the model's packed forward (no padding in the linears, the prompt prefix
  common to a batch run once), and the loss over the 151,936-token vocabulary never materialises
  the logits of the whole batch (:func:`modlora.kernels.linear_cross_entropy`).
- AdamW, linear warmup then linear decay, gradient accumulation (the loss of a step is the mean
  over all its trained tokens, as one big batch would give), clipping, length-bucketed batches,
  bf16 autocast on CUDA, a JSONL log, and atomic checkpoints (trainable tensors, AdamW's moments,
  RNG states, step, data order) from which a run resumes bit for bit on CPU; the hyperparameters
  and the schedule follow from the config and the step.

:func:`train` is four parts, each replaceable on its own: :func:`setup` (optimizer, schedule, data
order), :func:`resume` (from a checkpoint, or a fresh start), :func:`train_step` (one optimizer
step) and :func:`save_checkpoint` (the checkpoint file, read back by :func:`modlora.checkpoint.load`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint, distributed, validate
from .adapters import AdapterController, LearnedWeights, LoraAdapter
from .adapters.format import TARGET_MODULES
from .console import Log, log_stderr, progress
from .fileio import atomic_write_text
from .kernels import linear_cross_entropy
from .model import Qwen2ForCausalLM
from .prompt import training_example
from .tokenizer import Tokenizer

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 = trained target token)

ROLE_SEED = {"in": 1, "out": 0}  # added to the training seed
PAPER_FRACTION = 0.005  # the paper's trainable parameters per adapter, relative to the base model


@dataclass
class TrainConfig:
    """Optimisation settings; defaults from the paper (2 epochs, lr 2e-5)."""

    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 2
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    ce_chunk_tokens: int = 256
    share_prefix: bool = True  # run the prompt prefix common to a batch once (same loss, less work)
    checkpoint_every: int = 100  # optimizer steps between checkpoints
    # ... or, sooner, minutes since the last one (a kill -9 or a lost machine loses at most that)
    checkpoint_minutes: float = 15.0
    max_steps: int | None = None  # cap on optimizer steps (smoke runs); None: the whole schedule
    # Recompute each decoder layer in the backward pass instead of keeping its activations: the same
    # gradients (so a checkpoint resumes with it on or off), less memory, about a third more compute.
    activation_checkpointing: bool = False


@dataclass
class LoraConfig:
    """Adapter shape; ``rank=None`` picks the rank giving the paper's ~0.5% trainable parameters."""

    rank: int | None = None
    alpha: float | None = None  # None: 2 * rank
    target_modules: tuple[str, ...] = TARGET_MODULES
    dropout: float = 0.0
    use_rslora: bool = False


# --------------------------------------------------------------------------------------------
# Parameter budget


def base_parameters(model: Qwen2ForCausalLM) -> int:
    """Parameters of the base model (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def lora_parameters_per_rank(model: Qwen2ForCausalLM, target_modules: Sequence[str] = TARGET_MODULES) -> int:
    """LoRA parameters one unit of rank costs: ``in + out`` features summed over the adapted linears."""
    total = 0
    for name, linear in model.adapted_linears().items():
        if name.rsplit(".", 1)[-1] in target_modules:
            total += linear.in_features + linear.out_features
    if not total:
        raise ValueError(f"the model has none of the target modules {list(target_modules)}")
    return total


def paper_rank(model: Qwen2ForCausalLM, target_modules: Sequence[str] = TARGET_MODULES,
               fraction: float = PAPER_FRACTION) -> int:
    """The rank whose adapter has closest to ``fraction`` of the base model's parameters."""
    return max(1, round(fraction * base_parameters(model) / lora_parameters_per_rank(model, target_modules)))


def resolve_lora(model: Qwen2ForCausalLM, lora: LoraConfig) -> LoraConfig:
    """Fill in the rank and alpha defaults from the model's shape."""
    rank = lora.rank or paper_rank(model, lora.target_modules)
    return dataclasses.replace(lora, rank=rank, alpha=lora.alpha if lora.alpha is not None else 2.0 * rank)


# --------------------------------------------------------------------------------------------
# Loss


def shared_prefix_length(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> int:
    """Leading tokens identical (and not padding) in every row and before every trained position:
    the chat system prompt and instruction, about a quarter of a FLORES example."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    common = int(same.long().cumprod(0).sum())
    first_trained = int(loss_mask.long().argmax(1).min())  # position first_trained - 1 predicts it
    return max(0, min(common, first_trained - 1))


def completion_loss(model: Qwen2ForCausalLM, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                    chunk: int = 256, share_prefix: bool = True,
                    checkpoint_layers: bool = False) -> tuple[Tensor, int]:
    """Summed next-token CE over the trained positions, and their count.

    Position t predicts token t+1; it is trained where ``loss_mask[t+1]`` is 1. Hidden states come
    from the model's packed forward (no padding in the linears; with ``share_prefix`` the prompt
    prefix common to all rows runs once; ``checkpoint_layers``: activation checkpointing) and only
    the trained ones reach the output layer.
    """
    p = shared_prefix_length(input_ids, attention_mask, loss_mask) if share_prefix else 0
    hidden = model.model.forward_packed(input_ids, attention_mask, p, checkpoint_layers=checkpoint_layers)  # [N, C]
    valid = attention_mask[:, p:].bool()
    trained = F.pad(loss_mask[:, p + 1:], (0, 1)).bool()[valid]  # over the packed tokens
    targets = F.pad(input_ids[:, p + 1:], (0, 1))[valid][trained]
    # the count from the shape: the boolean indexing above already synchronised, trained.sum() would again
    return linear_cross_entropy(hidden[trained], model.lm_head.weight, targets, chunk), targets.numel()


# --------------------------------------------------------------------------------------------
# Data


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` [B, T]."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, m) in enumerate(examples):
        ids[row, :len(x)] = torch.as_tensor(x)
        attn[row, :len(x)] = 1
        loss[row, :len(m)] = torch.as_tensor(m)
    return ids, attn, loss


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, window: int = 32) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort windows of ``window`` batches by length,
    cut, shuffle the batches. Little padding, yet every epoch sees a different order."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def linear_schedule(warmup: int, total: int):
    """LR factor: linear warmup from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


# --------------------------------------------------------------------------------------------
# The loop: setup, resume, step, checkpoint


@dataclass
class TrainRun:
    """One training run's state: built by :func:`setup`, restored by :func:`resume`, advanced by
    :func:`train_step`, written by :func:`save_checkpoint`."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    examples: Sequence[Example]
    cfg: TrainConfig
    pad_id: int
    work_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total: int  # optimizer steps of the whole schedule
    batch_size: int  # examples per (global) micro-batch
    config_record: dict  # what a checkpoint must match to be resumed
    step: int = 0  # optimizer steps done
    rng: dict = field(default_factory=dict)  # the RNG state after `step` steps: the next step starts from it
    updating: bool = False  # inside an optimizer update: weights, optimizer and `step` disagree
    checkpointed: int = 0  # the step of the last checkpoint written or resumed from
    orders: dict[int, list[list[int]]] = field(default_factory=dict)
    dp: distributed.DataParallel | None = None  # data parallel: every rank trains its slice of each batch

    @property
    def writer(self) -> bool:
        """Whether this process writes the checkpoint and log (data parallel: rank 0 only)."""
        return distributed.current().writes_job_files

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / checkpoint.FILE

    @property
    def log_path(self) -> Path:
        return self.work_dir / "log.jsonl"

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def order(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (lists of example indices), fixed by the seed."""
        if epoch not in self.orders:
            lengths = [len(ids) for ids, _ in self.examples]
            self.orders[epoch] = bucketed_batches(lengths, self.batch_size, self.cfg.seed * 1000 + epoch)
        return self.orders[epoch]


def setup(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], examples: Sequence[Example],
          cfg: TrainConfig, work_dir: str | Path, pad_id: int, record: Mapping[str, object] | None = None) -> TrainRun:
    """Make ``params`` trainable and build the optimizer, the schedule and the data order.

    ``record``: more of what a checkpoint must match to be resumed (JSON data), beyond the config,
    the examples, ``pad_id`` and the parameters' shapes: what else shapes the trained tensors
    (the adapter's LoRA settings, the frozen adapters whose merge weights are learned).

    Raises:
        ValueError: a setting of ``cfg`` out of its range, no examples, a malformed example (see
        :func:`_check_examples`), ``pad_id`` outside the model's vocabulary, or a parameter outside
        ``params`` that requires grad.
    """
    for f in dataclasses.fields(cfg):
        validate.checked_field(validate.SETTINGS["train"][f.name], getattr(cfg, f.name), f"TrainConfig.{f.name}")
    if not examples:
        raise ValueError("no training examples")
    _check_examples(examples, pad_id, model.config.vocab_size)
    params = list(params)
    trainable = {id(p) for p in params}
    if any(p.requires_grad for p in model.parameters() if id(p) not in trainable):
        raise ValueError("base model parameters must be frozen (requires_grad=False)")
    for p in params:
        p.requires_grad_(True)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dp = distributed.DataParallel(distributed.current()) if distributed.current().data_parallel else None
    batch_size = dp.global_batch_size(cfg.batch_size) if dp else cfg.batch_size
    steps_per_epoch = math.ceil(math.ceil(len(examples) / batch_size) / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(round(cfg.warmup_ratio * total), total))
    run_record = {**dataclasses.asdict(cfg), "num_examples": len(examples), "pad_id": pad_id,
                  "examples_sha256": _examples_digest(examples), "param_shapes": [list(p.shape) for p in params],
                  **(record or {})}
    for key in ("activation_checkpointing", "checkpoint_every", "checkpoint_minutes"):
        del run_record[key]  # the same training either way: a run resumes with other values
    if dp:  # another world size is another global batch: that checkpoint does not resume here
        run_record["data_parallel_world_size"] = dp.ctx.world_size
    run_record = json.loads(json.dumps(run_record))  # as the checkpoint gives it back (tuples as lists)
    return TrainRun(model, params, examples, cfg, pad_id, work_dir, optimizer, scheduler, steps_per_epoch, total,
                    batch_size, run_record, dp=dp)


def _check_examples(examples: Sequence[Example], pad_id: int, vocab: int) -> None:
    """Every example is (token ids, loss mask) of one length, the ids Python ints that name rows of
    the model's embedding (a tokenizer that is not the model's is named here, not met as an
    IndexError inside the embedding mid-step), the mask 0/1 with at least one trained token after
    the first (position t predicts token t + 1): an example that trains nothing would make a
    step's loss 0/0."""
    for i, example in enumerate(examples):
        ids, mask = example if isinstance(example, tuple | list) and len(example) == 2 else (None, None)
        if not (isinstance(ids, list | tuple) and isinstance(mask, list | tuple) and len(ids) == len(mask)):
            raise ValueError(f"training example {i} must be (token ids, loss mask), two lists of one length")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"training example {i}: token ids must be integers")
        if not all(m in (0, 1) and not isinstance(m, float) for m in mask):
            raise ValueError(f"training example {i}: the loss mask must hold 0 and 1 only")
        if not any(mask[1:]):
            raise ValueError(f"training example {i} trains no token (its loss mask is 0 after the first token)")
    lo, hi = min(min(ids) for ids, _ in examples), max(max(ids) for ids, _ in examples)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"the training data holds token ids {lo}..{hi}, outside the model's vocabulary [0, {vocab}): "
                         "the tokenizer does not belong to this model")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary [0, {vocab})")


def _examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' ids and masks: a checkpoint resumes on the data it was trained on."""
    return hashlib.sha256(json.dumps([[list(ids), list(mask)] for ids, mask in examples]).encode()).hexdigest()


def tensors_digest(tensors: Iterable[Tensor]) -> str:
    """sha256 of tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(run: TrainRun) -> None:
    """Write the run after ``run.step`` finished steps (with ``run.rng``), atomically, as data
    (:mod:`modlora.checkpoint`: safetensors and JSON, nothing pickled). Data parallel: with every
    rank's RNG state, written by rank 0 (a collective: every rank calls it)."""
    rng = run.dp.ctx.gather(run.rng) if run.dp else [run.rng]
    if run.writer:
        state = {"config": run.config_record, "step": run.step,
                 "order": run.order(min(run.step, run.total - 1) // run.steps_per_epoch),
                 "params": list(run.params), "optimizer": run.optimizer.state_dict()["state"], "rng": rng}
        checkpoint.save(run.checkpoint_path, state)
    run.checkpointed = run.step  # only once written: Ctrl-C amid the write saves again


def read_log(path: Path, log: Log) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a ``log.jsonl``; a torn last line (a crash or a full disk mid-write)
    is dropped with a warning, a malformed line elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                    and isinstance(record.get("loss"), float) and math.isfinite(record["loss"])):
                raise ValueError("not a step record with a finite loss")
        except ValueError as e:
            if number == len(lines):
                log(f"warning: {path} line {number} is torn or malformed ({e}); ignored")
                break
            raise ValueError(f"{path} line {number} is not a step record ({e}): delete the file to rewrite it") \
                from None
        out.append((line, record))
    return out


def resume(run: TrainRun, log: Log, desc: str) -> None:
    """Continue from ``run``'s checkpoint if there is one (weights, optimizer, schedule, RNG, log);
    else start afresh (seeded RNG, empty log). Sets ``run.rng`` either way.

    Raises:
        ValueError: an old pickle ``checkpoint.pt`` (refused, never read), a malformed checkpoint, or
            one written by other settings (named), for other data or of another structure.
    """
    checkpoint.refuse_legacy(run.work_dir)
    if not run.checkpoint_path.is_file():
        torch.manual_seed(run.cfg.seed)
        random.seed(run.cfg.seed)
        if run.dp:
            run.dp.seed(run.cfg.seed)
        run.rng = _rng_state()
        if run.writer:
            run.log_path.unlink(missing_ok=True)
        return
    state = checkpoint.load(run.checkpoint_path, run.device)
    saved, now = state["config"], run.config_record
    if saved != now:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                            if saved.get(k) != now.get(k))
        raise ValueError(f"{run.checkpoint_path} was written by a different run configuration ({changed}); "
                         "rerun with the same settings to resume, or remove it to start over")
    run.step = run.checkpointed = state["step"]
    checkpoint.check_fits(state, run.checkpoint_path, run.params, run.optimizer, run.total,
                          ranks=run.dp.ctx.world_size if run.dp else 1)
    if run.step < run.total and state["order"] != run.order(run.step // run.steps_per_epoch):
        raise ValueError(f"{run.checkpoint_path}: the data order differs from the checkpoint's (examples changed?)")
    with torch.no_grad():
        for p, saved_p in zip(run.params, state["params"], strict=True):
            p.copy_(saved_p)
    # The hyperparameters and the schedule are this run's own (the config equals the checkpoint's):
    # only AdamW's moments come from the file, and the schedule is replayed to the step.
    run.optimizer.load_state_dict({"state": state["optimizer"],
                                   "param_groups": run.optimizer.state_dict()["param_groups"]})
    with warnings.catch_warnings():  # a replay steps the schedule without the optimizer, on purpose
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        for _ in range(run.step):
            run.scheduler.step()
    run.rng = state["rng"][run.dp.ctx.rank if run.dp else 0]
    _set_rng_state(run.rng)
    if run.writer and run.log_path.is_file():  # drop log lines of steps after the checkpoint (they will be redone)
        kept = [ln for ln, record in read_log(run.log_path, log) if record["step"] <= run.step]
        atomic_write_text(run.log_path, "".join(ln + "\n" for ln in kept))
    log(f"{desc}: resumed at step {run.step}/{run.total}")


def _micro_batches(run: TrainRun) -> tuple[list[tuple[Tensor, Tensor, Tensor]], int]:
    """The collated micro-batches of step ``run.step`` (data parallel: this rank's slices, none
    where a short batch leaves it nothing) and the trained tokens of the whole step."""
    epoch, k = divmod(run.step, run.steps_per_epoch)
    micro = run.order(epoch)[k * run.cfg.grad_accum:(k + 1) * run.cfg.grad_accum]
    n_trained = sum(sum(run.examples[i][1][1:]) for b in micro for i in b)
    if run.dp:
        micro = [run.dp.part(b) for b in micro]
    return [collate([run.examples[i] for i in b], run.pad_id) for b in micro if b], n_trained


class DivergedError(RuntimeError):
    """The loss or the gradient of a step is NaN or infinite: the run stops before the update."""


def check_finite_step(run: TrainRun, loss: float, grad_norm: float) -> None:
    """Stop before a non-finite step updates the weights: NaN spreads to every parameter and the
    adapter would be saved as finished. The last checkpoint (finite) is kept."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise DivergedError(f"{run.work_dir}: training diverged at step {run.step + 1} (loss {loss}, gradient norm "
                            f"{grad_norm}); nothing of this step was applied and the adapter is not saved "
                            f"(checkpoint at step {run.checkpointed} kept). Lower the learning rate or alpha, or "
                            "check the data")


def train_step(run: TrainRun) -> dict:
    """Forward and backward over one step's micro-batches, then one optimizer update.

    Returns:
        The step's log record (step, epoch, loss, lr, grad_norm, tokens, trained_tokens,
        tokens_per_s). ``run.step`` and ``run.rng`` move on only once the update is complete.

    Raises:
        DivergedError: the loss or the gradient is not finite (nothing is updated).
    """
    epoch = run.step // run.steps_per_epoch
    batches, n_trained = _micro_batches(run)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    started = time.perf_counter()
    step_loss = torch.zeros((), device=run.device)  # summed on the device: read once per step, not per batch
    for ids, attn, mask in batches:
        with autocast:
            loss_sum, _ = completion_loss(run.model, ids.to(run.device), attn.to(run.device), mask.to(run.device),
                                          run.cfg.ce_chunk_tokens, run.cfg.share_prefix,
                                          run.cfg.activation_checkpointing)
        loss = loss_sum / n_trained  # over the step's trained tokens: data-parallel ranks' grads add up
        loss.backward()
        step_loss += loss.detach()
    step_loss = float(step_loss)
    tokens = sum(int(a.sum()) for _, a, _ in batches)  # CPU tensors: no device sync
    if run.dp:
        run.dp.sum_gradients(run.params)
        step_loss, tokens = run.dp.ctx.all_sum([step_loss, tokens])
        tokens = int(tokens)
    params, clip = run.params, run.cfg.max_grad_norm
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
                 else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    check_finite_step(run, step_loss, float(grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.updating = True
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.rng = _rng_state()
    run.updating = False
    seconds = time.perf_counter() - started
    return {"step": run.step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": tokens, "trained_tokens": n_trained, "tokens_per_s": tokens / seconds}


def _checkpoint_due(run: TrainRun, saved_at: float) -> bool:
    """``cfg.checkpoint_minutes`` have passed since the last checkpoint (or the start). Data
    parallel: on any rank, so that all of them save (a collective)."""
    due = time.monotonic() - saved_at >= 60 * run.cfg.checkpoint_minutes
    return bool(run.dp.ctx.all_sum([int(due)])[0]) if run.dp else due


def _fingerprint(base: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Storage and version counter of every base parameter: any in-place write (an optimizer step
    included) bumps ``_version``, so equal fingerprints mean untouched weights, at no cost."""
    return [(p.data_ptr(), p._version) for p in base]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # the devices both runs see (the run trains on one)
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def train(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], examples: Sequence[Example],
          cfg: TrainConfig, work_dir: str | Path, *, pad_id: int, desc: str = "train",
          stop_after: int | None = None, record: Mapping[str, object] | None = None, log: Log = log_stderr) -> dict:
    """Train ``params`` (everything else frozen) on ``examples``; resumes from ``work_dir``.

    ``work_dir`` receives ``checkpoint.safetensors`` (atomic) and ``log.jsonl``. Ctrl-C between updates
    saves a checkpoint of the finished steps, so an interrupt loses at most the step in progress.

    Args:
        stop_after: end the run after that many optimizer steps with a checkpoint (as an
            interruption would).
        record: what else a checkpoint must match to resume (see :func:`setup`).

    Returns:
        A summary: ``step`` (steps done), ``total_steps``, ``done`` (the schedule is complete),
        ``losses`` (the loss per step of this call).

    Raises:
        ValueError: see :func:`setup` and :func:`resume`.
        DivergedError: a step's loss or gradient is not finite (see :func:`train_step`).
        RuntimeError: the base model's weights changed during training.
    """
    run = setup(model, params, examples, cfg, work_dir, pad_id, record)
    resume(run, log, desc)
    trainable = {id(p) for p in run.params}
    base = [p for p in model.parameters() if id(p) not in trainable]
    fingerprint = _fingerprint(base)
    was_training = model.training
    model.train()
    losses: list[float] = []
    saved_at = time.monotonic()
    bar = progress(run.total, desc, initial=run.step)
    try:
        with open(run.log_path if run.writer else os.devnull, "a", encoding="utf-8") as log_file:
            while run.step < run.total and (stop_after is None or len(losses) < stop_after):
                record = train_step(run)
                losses.append(record["loss"])
                try:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                except OSError as e:  # a full disk: say which file
                    raise OSError(e.errno, e.strerror, str(run.log_path)) from e
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}",
                                tok_s=round(record["tokens_per_s"]), refresh=False)
                bar.update(1)
                if (run.step % cfg.checkpoint_every == 0 or run.step == run.total or len(losses) == stop_after
                        or _checkpoint_due(run, saved_at)):
                    save_checkpoint(run)
                    saved_at = time.monotonic()
    except KeyboardInterrupt:
        # Outside an update the weights, optimizer and scheduler are those of `run.step` finished
        # steps: keep them (the interrupted step is redone from run.rng). Inside one, they are not.
        # (data parallel: other ranks may be gone, and saving is a collective)
        if run.step > run.checkpointed and not run.updating and run.dp is None:
            save_checkpoint(run)
            log(f"{desc}: interrupted; checkpoint at step {run.step}/{run.total}")
        raise
    finally:
        bar.close()
        model.train(was_training)
    if _fingerprint(base) != fingerprint:
        raise RuntimeError("the base model's weights changed during training")
    if losses and run.step >= run.total > 1:  # the whole run's first and last step (the log spans resumes)
        first = read_log(run.log_path, log)[0][1]
        log(f"{desc}: training loss {first['loss']:.2f} (step {first['step']}) -> {losses[-1]:.2f} (step {run.step})")
    return {"step": run.step, "total_steps": run.total, "done": run.step >= run.total, "losses": losses}


# --------------------------------------------------------------------------------------------
# Adapters and merge weights


def train_adapter(adapters: AdapterController, tokenizer: Tokenizer, lang: str, role: str, src: str, tgt: str,
                  pairs: Sequence[tuple[str, str]], lora: LoraConfig, cfg: TrainConfig, work_dir: str | Path,
                  *, stop_after: int | None = None, log: Log = log_stderr) -> LoraAdapter | None:
    """Train one language adapter (``role`` "in" or "out") alone on (source, target) sentence pairs
    of the direction ``src -> tgt``, bound through ``adapters`` (cleared afterwards).

    Returns:
        The adapter (frozen), or None if ``stop_after`` cut the run short.
    """
    model = adapters.model
    lora = resolve_lora(model, lora)
    # Each role its own seed (init and data order): in[en] and out[en] see the same en->en pairs and
    # would otherwise come out byte-identical, where the paper trains two adapters.
    cfg = dataclasses.replace(cfg, seed=cfg.seed + ROLE_SEED[role])
    adapter = LoraAdapter.init(model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                               use_rslora=lora.use_rslora, dropout=lora.dropout, language=lang, role=role,
                               seed=cfg.seed)
    ratio = adapter.num_parameters() / base_parameters(model)
    log(f"{role}[{lang}] on {src}->{tgt}: rank {lora.rank}, alpha {lora.alpha:g}, "
        f"{adapter.num_parameters():,} trainable parameters ({100 * ratio:.2f}% of the base; paper ~0.5%)")
    examples = [training_example(tokenizer, src, tgt, s, t) for s, t in pairs]
    adapters.set_adapters(**{f"lora_{role}": adapter, f"w_{role}": 1.0})
    try:
        result = train(model, list(adapter.parameters()), examples, cfg, work_dir, pad_id=tokenizer.pad_id,
                       desc=f"{role}[{lang}]", stop_after=stop_after, record={"lora": dataclasses.asdict(lora)},
                       log=log)
    finally:
        adapters.clear()
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter if result["done"] else None


def learn_weights(adapters: AdapterController, tokenizer: Tokenizer, lora_in: LoraAdapter, lora_out: LoraAdapter,
                  src: str, tgt: str, pairs: Sequence[tuple[str, str]], strategy: str, cfg: TrainConfig,
                  work_dir: str | Path, *, stop_after: int | None = None,
                  log: Log = log_stderr) -> LearnedWeights | None:
    """Learn the per-layer ``(w_in, w_out) = softmax(theta)`` of a direction with both adapters frozen (eq. 5).

    Writes ``weights.json`` (:meth:`LearnedWeights.save`) in ``work_dir`` (Figure 2 draws all
    directions at once: :mod:`modlora.figures`).

    Returns:
        The weights, or None if ``stop_after`` cut the run short.
    """
    theta = adapters.enable_weight_learning(lora_in, lora_out, strategy)  # binds frozen copies of the adapters
    examples = [training_example(tokenizer, src, tgt, s, t) for s, t in pairs]
    work_dir = Path(work_dir)
    try:
        result = train(adapters.model, [theta], examples, cfg, work_dir, pad_id=tokenizer.pad_id,
                       desc=f"weights {src}->{tgt} {strategy}", stop_after=stop_after,
                       record={"strategy": strategy, "lora_in": _adapter_digest(lora_in),
                               "lora_out": _adapter_digest(lora_out)}, log=log)
        weights = adapters.learned_weights() if result["done"] else None
    finally:
        adapters.clear()
    if weights is None:
        return None
    if distributed.current().writes_job_files:  # data parallel: rank 0 writes
        weights.save(work_dir / "weights.json")
    return weights


def _adapter_digest(adapter: LoraAdapter) -> list:
    """An adapter's scale and the digest of its tensors: what merge weights learned on it depend on."""
    return [adapter.scale, tensors_digest(t for name in sorted(adapter.tensors) for t in adapter.tensors[name])]
