"""Hand-written SFT loop for language adapters and per-layer merge weights (DESIGN.md section 6).

- Completion-only cross-entropy: the prompt is masked, the translation and its closing
  ``<|im_end|>`` are trained (masks from :func:`modlora.prompt.training_example`).
- The loss over the 151,936-token vocabulary never materialises the logits of the whole batch:
  :func:`linear_cross_entropy` takes the final hidden states of the trained positions only and
  walks them in chunks of ``ce_chunk_tokens``, computing the gradient w.r.t. the hidden states
  in the same pass, so at most one chunk of fp32 logits is alive at a time.
- AdamW, linear warmup then linear decay, gradient accumulation (the loss of a step is the mean
  over all its trained tokens, as one big batch would give), clipping, length-bucketed batches,
  bf16 autocast on CUDA, a JSONL log, and atomic checkpoints (trainable tensors, optimizer,
  scheduler, RNG states, step, data order) from which a run resumes bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint
from .fileio import atomic_write, atomic_write_text
from .progress import Progress

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 = trained target token)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
    checkpoint_every: int = 100
    max_steps: int | None = None  # cap on optimizer steps (smoke runs); None: the whole schedule


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


def base_parameters(model: torch.nn.Module) -> int:
    """Parameters of the base model (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def lora_parameters_per_rank(model: torch.nn.Module, target_modules: Sequence[str] = TARGET_MODULES) -> int:
    """LoRA parameters one unit of rank costs: ``in + out`` features summed over the adapted linears."""
    total = 0
    for name, linear in model.adapted_linears().items():
        if name.rsplit(".", 1)[-1] in target_modules:
            total += linear.in_features + linear.out_features
    if not total:
        raise ValueError(f"the model has none of the target modules {list(target_modules)}")
    return total


def paper_rank(model: torch.nn.Module, target_modules: Sequence[str] = TARGET_MODULES,
               fraction: float = PAPER_FRACTION) -> int:
    """The rank whose adapter has closest to ``fraction`` of the base model's parameters."""
    return max(1, round(fraction * base_parameters(model) / lora_parameters_per_rank(model, target_modules)))


def resolve_lora(model: torch.nn.Module, lora: LoraConfig) -> LoraConfig:
    """Fill in the rank and alpha defaults from the model's shape."""
    rank = lora.rank or paper_rank(model, lora.target_modules)
    return dataclasses.replace(lora, rank=rank, alpha=lora.alpha if lora.alpha is not None else 2.0 * rank)


# --------------------------------------------------------------------------------------------
# Loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softmax(h W^T)`` at ``targets``, chunk by chunk over the rows of h.

    Forward, per chunk c: ``z = h_c W^T`` (fp32), ``loss += sum(lse(z) - z[target])`` and, when h
    needs a gradient, ``dh_c = (softmax(z) - onehot(target)) W``. Backward returns ``grad * dh``.
    Only one chunk of logits [c, V] exists at a time; what is kept for backward is dh [N, C], the
    size of h. W is the frozen output embedding: no gradient flows to it.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if grad_h is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits are no longer needed
                probs[torch.arange(len(tc), device=h.device), tc] -= 1.0
                grad_h[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype)) if grad_h is not None else None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """Sum over rows of ``CE(h W^T, targets)``; h [N, C], weight [V, C] (frozen), targets [N]."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the output embedding; freeze it")
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)


def shared_prefix_length(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> int:
    """Leading tokens identical (and not padding) in every row and before every trained position:
    the chat system prompt and instruction, about a quarter of a FLORES example."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    common = int(same.long().cumprod(0).sum())
    first_trained = int(loss_mask.long().argmax(1).min())  # position first_trained - 1 predicts it
    return max(0, min(common, first_trained - 1))


def _qkv(attn: torch.nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotated q, k and v [1, heads, N, D] of a Qwen2 attention block for h [1, N, C]."""
    from .model import apply_rope

    n = h.shape[1]
    q = attn.q_proj(h).view(1, n, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(1, n, attn.n_kv, attn.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def packed_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, p: int = 0) -> Tensor:
    """Final hidden states [N, C] of the N non-padding tokens after the first ``p`` columns, row-major.

    The same function as ``model.model(...)`` on those positions, with less work:

    - padding never enters a linear layer: tokens are packed to [1, N, C] for every projection and
      MLP, and scattered to the padded [B, T] layout only for attention;
    - the first ``p`` tokens, identical in every row (:func:`shared_prefix_length`), run once, as
      one row, and their keys and values are broadcast to all rows (causal attention never lets a
      prefix see what follows it).

    Gradients reach the adapters through every part.
    """
    m = model.model
    b, t = input_ids.shape
    s, dev = t - p, input_ids.device
    valid = attention_mask[:, p:].bool()
    where = valid.flatten().nonzero().squeeze(1)  # packed token -> flat [B * s] index
    positions = (attention_mask.long().cumsum(-1) - 1)[:, p:][valid][None]
    x = m.embed_tokens(input_ids[:, p:][valid][None])  # [1, N, C]
    cos, sin = m.rotary_emb(positions, x.dtype)
    own = torch.ones(s, s, dtype=torch.bool, device=dev).tril() & valid[:, None, :]
    own |= torch.eye(s, dtype=torch.bool, device=dev)  # a padding query sees itself: no all-masked row
    mask = torch.cat((torch.ones(b, s, p, dtype=torch.bool, device=dev), own), dim=-1)[:, None]
    if p:
        xp = m.embed_tokens(input_ids[:1, :p])
        cos_p, sin_p = m.rotary_emb(torch.arange(p, device=dev)[None], xp.dtype)
        mask_p = torch.ones(p, p, dtype=torch.bool, device=dev).tril()

    def padded(z: Tensor) -> Tensor:  # [1, H, N, D] -> [B, H, s, D], zeros on padding
        h, d = z.shape[1], z.shape[3]
        flat = z[0].transpose(0, 1).new_zeros(b * s, h, d).index_copy(0, where, z[0].transpose(0, 1))
        return flat.view(b, s, h, d).transpose(1, 2)

    for layer in m.layers:
        a = layer.self_attn
        gqa = a.n_kv != a.n_heads
        q, k, v = (padded(z) for z in _qkv(a, layer.input_layernorm(x), cos, sin))
        if p:
            qp, kp, vp = _qkv(a, layer.input_layernorm(xp), cos_p, sin_p)
            out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask_p, enable_gqa=gqa)
            xp = xp + a.o_proj(out_p.transpose(1, 2).reshape(1, p, -1))
            xp = xp + layer.mlp(layer.post_attention_layernorm(xp))
            k = torch.cat((kp.expand(b, -1, -1, -1), k), dim=2)
            v = torch.cat((vp.expand(b, -1, -1, -1), v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b * s, -1)[where][None]
        x = x + a.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)[0]


def completion_loss(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                    chunk: int = 256, share_prefix: bool = True) -> tuple[Tensor, int]:
    """Summed next-token CE over the trained positions, and their count.

    Position t predicts token t+1; it is trained where ``loss_mask[t+1]`` is 1. Hidden states come
    from :func:`packed_hidden` (no padding in the linears; with ``share_prefix`` the prompt prefix
    common to all rows runs once) and only the trained ones reach the output layer.
    """
    p = shared_prefix_length(input_ids, attention_mask, loss_mask) if share_prefix else 0
    hidden = packed_hidden(model, input_ids, attention_mask, p)
    valid = attention_mask[:, p:].bool()
    trained = F.pad(loss_mask[:, p + 1:], (0, 1)).bool()[valid]  # over the packed tokens
    targets = F.pad(input_ids[:, p + 1:], (0, 1))[valid][trained]
    return linear_cross_entropy(hidden[trained], model.lm_head.weight, targets, chunk), int(trained.sum())


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
# The loop


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DivergedError(RuntimeError):
    """The loss or the gradient of a step is NaN or infinite: the run stops before the update."""


def check_finite_step(desc: str, step: int, loss: float, grad_norm: float, checkpointed: int) -> None:
    """Stop before a non-finite step updates the weights: NaN spreads to every parameter and the
    adapter would be saved as finished. The last checkpoint (finite) is kept."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise DivergedError(f"{desc}: training diverged at step {step} (loss {loss}, gradient norm {grad_norm}); "
                            f"nothing of this step was applied and the adapter is not saved (checkpoint at step "
                            f"{checkpointed} kept). Lower the learning rate or alpha, or check the data")


def read_log(path: Path, log) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a ``log.jsonl``; a torn last line (a crash or a full disk mid-write)
    is dropped with a warning, a malformed line elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a step record")
        except ValueError as e:
            if number == len(lines):
                log(f"warning: {path} line {number} is torn or malformed ({e}); ignored")
                break
            raise ValueError(f"{path} line {number} is not a step record ({e}): delete the file to rewrite it") \
                from None
        out.append((line, record))
    return out


def train(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], examples: Sequence[Example],
          cfg: TrainConfig, work_dir: str | Path, *, pad_id: int, desc: str = "train",
          stop_after: int | None = None, log=None) -> dict:
    """Train ``params`` (everything else frozen) on ``examples``; resumes from ``work_dir``.

    ``work_dir`` receives ``checkpoint.safetensors`` (atomic) and ``log.jsonl``. ``stop_after`` ends the run
    after that many optimizer steps with a checkpoint (as an interruption would). Returns a
    summary: steps done, whether the schedule is complete, the loss per step of this call.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = work_dir / checkpoint.FILE, work_dir / "log.jsonl"
    checkpoint.refuse_legacy(work_dir)
    if not examples:
        raise ValueError("no training examples")
    params = list(params)
    trainable = {id(p) for p in params}
    base = [p for p in model.parameters() if id(p) not in trainable]
    if any(p.requires_grad for p in base):
        raise ValueError("base model parameters must be frozen (requires_grad=False)")
    for p in params:
        p.requires_grad_(True)
    device = params[0].device

    lengths = [len(ids) for ids, _ in examples]
    n_batches = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(round(cfg.warmup_ratio * total), total))

    orders: dict[int, list[list[int]]] = {}
    order = lambda epoch: orders.setdefault(epoch, bucketed_batches(lengths, cfg.batch_size, cfg.seed * 1000 + epoch))
    config_record = {**dataclasses.asdict(cfg), "num_examples": len(examples),
                     "param_shapes": [list(p.shape) for p in params]}

    step = 0
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path, device)
        if state["config"] != config_record:
            changed = ", ".join(f"{k} {state['config'].get(k)!r} -> {config_record.get(k)!r}"
                                for k in sorted(set(state["config"]) | set(config_record))
                                if state["config"].get(k) != config_record.get(k))
            raise ValueError(f"{ckpt_path} was written by a different run configuration ({changed}); "
                             "rerun with the same settings to resume, or remove it to start over")
        step = state["step"]
        checkpoint.check_fits(state, ckpt_path, params, optimizer, scheduler, total)
        if step < total and state["order"] != order(step // steps_per_epoch):
            raise ValueError(f"{ckpt_path}: the data order differs from the checkpoint's (examples changed?)")
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if log_path.is_file():  # drop log lines of steps after the checkpoint (they will be redone)
            kept = [ln for ln, record in read_log(log_path, log) if record["step"] <= step]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
        log(f"{desc}: resumed at step {step}/{total}")
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        log_path.unlink(missing_ok=True)

    def save_checkpoint(rng: dict) -> None:
        state = {"config": config_record, "step": step, "order": order(min(step, total - 1) // steps_per_epoch),
                 "params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng}
        checkpoint.save(ckpt_path, state)

    fingerprint = _fingerprint(base)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = model.training
    model.train()
    losses: list[float] = []
    bar = Progress(total, desc, initial=step)
    # rng_of_step: the RNG state that goes with `step` finished steps (the next step starts from it).
    saved, updating, rng_of_step = step, False, _rng_state()
    try:
        with open(log_path, "a", encoding="utf-8") as log_file:
            while step < total and (stop_after is None or len(losses) < stop_after):
                epoch, k = divmod(step, steps_per_epoch)
                micro = order(epoch)[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
                batches = [collate([examples[i] for i in b], pad_id) for b in micro]
                n_trained = sum(int(m[:, 1:].sum()) for _, _, m in batches)
                started = time.perf_counter()
                step_loss = 0.0
                for ids, attn, mask in batches:
                    with autocast:
                        loss_sum, _ = completion_loss(model, ids.to(device), attn.to(device), mask.to(device),
                                                      cfg.ce_chunk_tokens, cfg.share_prefix)
                    loss = loss_sum / n_trained
                    loss.backward()
                    step_loss += float(loss.detach())
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                             else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                check_finite_step(desc, step + 1, step_loss, float(grad_norm), saved)
                lr = scheduler.get_last_lr()[0]
                updating = True
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                rng_of_step = _rng_state()
                updating = False
                losses.append(step_loss)
                tokens = sum(int(a.sum()) for _, a, _ in batches)
                seconds = time.perf_counter() - started
                record = {"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens": tokens, "trained_tokens": n_trained, "tokens_per_s": tokens / seconds}
                try:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                except OSError as e:  # a full disk: say which file
                    raise OSError(e.errno, e.strerror, str(log_path)) from e
                bar.update(1, loss=step_loss, lr=lr, tok_s=round(tokens / seconds))
                if step % cfg.checkpoint_every == 0 or step == total or len(losses) == stop_after:
                    save_checkpoint(rng_of_step)
                    saved = step
    except KeyboardInterrupt:
        # Outside an update the weights, optimizer and scheduler are those of `step` finished steps:
        # keep them (the interrupted step is redone from rng_of_step). Inside an update, they are not.
        if not updating and step > saved:
            save_checkpoint(rng_of_step)
            log(f"{desc}: interrupted; checkpoint at step {step}/{total}")
        raise
    finally:
        bar.close()
        model.train(was_training)
    if _fingerprint(base) != fingerprint:
        raise RuntimeError("the base model's weights changed during training")
    return {"step": step, "total_steps": total, "done": step >= total, "losses": losses}


# --------------------------------------------------------------------------------------------
# Adapters and merge weights


def train_adapter(model, tokenizer, lang: str, role: str, src: str, tgt: str,
                  pairs: Sequence[tuple[str, str]], lora: LoraConfig, cfg: TrainConfig, work_dir: str | Path,
                  *, stop_after: int | None = None, log=None):
    """Train one language adapter (``role`` "in" or "out") alone on (source, target) sentence pairs
    of the direction ``src -> tgt``; returns the adapter, or None if ``stop_after`` cut the run short."""
    from .adapters import LoraAdapter
    from .prompt import training_example

    log = log or (lambda msg: print(msg, file=sys.stderr))
    lora = resolve_lora(model, lora)
    adapter = LoraAdapter.init(model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                               use_rslora=lora.use_rslora, dropout=lora.dropout, language=lang, role=role,
                               seed=cfg.seed)
    ratio = adapter.num_parameters() / base_parameters(model)
    log(f"{role}[{lang}] on {src}->{tgt}: rank {lora.rank}, alpha {lora.alpha:g}, "
        f"{adapter.num_parameters():,} trainable parameters ({100 * ratio:.2f}% of the base; paper ~0.5%)")
    examples = [training_example(tokenizer, src, tgt, s, t) for s, t in pairs]
    model.set_adapters(**{f"lora_{role}": adapter, f"w_{role}": 1.0})
    try:
        result = train(model, list(adapter.parameters()), examples, cfg, work_dir, pad_id=tokenizer.pad_id,
                       desc=f"{role}[{lang}]", stop_after=stop_after, log=log)
    finally:
        model.clear_adapters()
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter if result["done"] else None


def learn_weights(model, tokenizer, lora_in, lora_out, src: str, tgt: str, pairs: Sequence[tuple[str, str]],
                  strategy: str, cfg: TrainConfig, work_dir: str | Path, *, stop_after: int | None = None,
                  log=None) -> list[tuple[float, float]] | None:
    """Learn the per-layer ``(w_in, w_out) = softmax(theta)`` of a direction with both adapters frozen.

    Writes ``weights.json`` (:func:`modlora.adapters.save_learned_weights`) and ``weights.png`` (w_out
    per layer, when matplotlib is installed) in ``work_dir``; returns the weights, or None if
    ``stop_after`` cut the run short.
    """
    from .adapters import save_learned_weights
    from .prompt import training_example

    theta = model.enable_weight_learning(lora_in, lora_out, strategy)  # binds frozen copies of the adapters
    examples = [training_example(tokenizer, src, tgt, s, t) for s, t in pairs]
    work_dir = Path(work_dir)
    try:
        result = train(model, [theta], examples, cfg, work_dir, pad_id=tokenizer.pad_id,
                       desc=f"weights {src}->{tgt} {strategy}", stop_after=stop_after, log=log)
        if result["done"]:
            weights = model.learned_weights()
            save_learned_weights(model, work_dir / "weights.json")
    finally:
        model.clear_adapters()
    if not result["done"]:
        return None
    plot_weights(weights, work_dir / "weights.png", f"{src}->{tgt} ({strategy})", log=log)
    return weights


def plot_weights(weights: Sequence[tuple[float, float]], path: str | Path, title: str, log=None) -> bool:
    """w_out per layer (the paper's Figure 2); skipped with a log line without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (log or print)(f"matplotlib is not installed: skipping the plot {path}")
        return False
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(weights)), [w_out for _, w_out in weights], marker="o")
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set(xlabel="layer", ylabel="w_out", title=title, ylim=(0, 1))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True
