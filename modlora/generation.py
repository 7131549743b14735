"""Beam search and greedy decoding on the model's static KV cache, and batched translation.

:func:`generate` reproduces ``transformers``' ``generate(do_sample=False)`` token for token
(transformers 5.x ``_beam_search``, vectorised over the batch): ``max(2, 1 + n_eos) * num_beams``
candidates per sentence and step, finished hypotheses kept per sentence, scores divided by
``generated_length ** length_penalty`` (the eos token counts), the ``early_stopping`` heuristic for
False / True / ``"never"``, ``min_new_tokens`` masking every eos id.

What a beam reorder copies. The prompt segment of the cache is shared by a sentence's beams and
never moves; :meth:`KVCache.reorder` copies only the per-beam generated positions written so far,
and only for rows whose parent is another row (a beam extending itself stays put). At generated
position ``t``, when every row moves (the worst case), it reads and writes, for k and v of every layer::

    bytes = 2 (k, v) * 2 (read + write) * L * (B * beams) * Hkv * D * t * element_size

For 64 sentences x 5 beams at t = 256 on the qwen2.5-0.5b shape (L=24, Hkv=2, D=64) in bf16 that
is 2 * 2 * 24 * 320 * 2 * 64 * 256 * 2 = 2,013,265,920 bytes (2.0 GB) for that one step, twice the
0.99 GB of bf16 weights a decode step reads; summed over a 256-step decode (t = 0..255) it is
257 GB in the worst case. At batch 1 the same step moves 31 MB, 3% of the weights. ``generate`` skips the reorder
on the last step (the cache is not read again).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters import AdapterController
from .cpu import BoundSites, topk
from .model import KVCache, Qwen2ForCausalLM
from .prompt import language_name, translation_prompt_ids
from .tokenizer import Tokenizer
from .validate import POSITIVE, Rule, checked_field

DecodeStep = Callable[[Tensor, KVCache], Tensor]  # tokens [rows], cache -> logits [rows, V]

_NEG = -1.0e9  # transformers' "impossible" score; the same constant keeps ties and orderings identical


_SEARCH_RULES = {"num_beams": POSITIVE, "max_new_tokens": POSITIVE, "min_new_tokens": Rule(int, low=0),
                 "length_penalty": Rule(float), "num_return_sequences": POSITIVE}


@dataclass(frozen=True)
class SearchParams:
    """How :func:`generate` searches; the fields and their meaning are transformers' ``generate``'s.

    ``num_beams=1`` is greedy decoding. ``early_stopping``: False, True or ``"never"``.

    Raises:
        ValueError: a value outside its range, named.
    """

    num_beams: int = 5
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        for name, rule in _SEARCH_RULES.items():
            checked_field(rule, getattr(self, name), name)
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be in "
                             f"[1, num_beams={self.num_beams}]")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@torch.no_grad()
def generate(model: Qwen2ForCausalLM, input_ids: Tensor, attention_mask: Tensor | None = None,
             search: SearchParams | None = None, *, eos_token_id: int | Sequence[int], pad_token_id: int,
             return_scores: bool = False, row_pair: Tensor | None = None, adapters: AdapterController | None = None,
             **overrides) -> Tensor | tuple[Tensor, Tensor]:
    """Decode left-padded prompts [B, P].

    Args:
        search: the search settings; ``overrides`` (e.g. ``num_beams=2``) replace some of its fields.
        eos_token_id, pad_token_id: the tokenizer's (``tokenizer.eos_ids``, ``tokenizer.pad_id``).
        row_pair: [B] the adapter pair of each sentence, among those set with
            ``adapters.set_adapter_pairs`` (``adapters`` is then required).

    Returns:
        ids [B * num_return_sequences, P + generated] in transformers' layout: the prompts as given,
        then the generated tokens (eos included), padded to the longest returned hypothesis. With
        ``return_scores`` also the scores [B * num_return_sequences]: the length-penalised sum of
        token log-probs (for greedy computed the same way; transformers reports none there).

    Raises:
        ValueError: bad search settings, ``input_ids`` not [B, P], a prompt that is not left-padded
            (:func:`_left_padding`; without ``attention_mask`` transformers' rule infers one), no
            eos id, or ``row_pair`` not a tensor or without ``adapters``.
    """
    params = dataclasses.replace(search or SearchParams(), **overrides)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt length], got shape {tuple(input_ids.shape)}")
    if not isinstance(eos_token_id, int) and not list(eos_token_id):
        raise ValueError("eos_token_id must be an id or a non-empty sequence of ids")
    if row_pair is not None and not isinstance(row_pair, Tensor):
        raise ValueError(f"row_pair must be a [B] integer tensor, got {type(row_pair).__name__}")
    if row_pair is not None and adapters is None:
        raise ValueError("row_pair needs adapters=, the AdapterController that set the pairs")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    attention_mask = _left_padding(input_ids, attention_mask, pad_token_id, eos)
    batch, prompt_len = input_ids.shape
    cache = model.new_cache(batch, prompt_len, params.max_new_tokens, params.num_beams)
    if row_pair is not None:
        adapters.route_rows(row_pair.to(device))
    logits = model.prefill(input_ids, attention_mask, cache)  # [B, V]
    if not bool(torch.isfinite(logits).all()):  # argmax over NaN would print garbage as a translation
        raise ValueError("the model's logits are NaN or infinite: check the model's weights and the adapters' "
                         "scale (alpha / rank) and merge weights")
    if row_pair is not None:
        adapters.route_rows(row_pair.to(device).repeat_interleave(params.num_beams))
    search_fn = _greedy if params.num_beams == 1 else _beam_search
    # Each linear's op call is bound at the first decode step and reused for the rest of this call.
    step = functools.partial(model.decode_step, site=BoundSites())
    tokens, scores, lengths = search_fn(step, cache, logits, eos, pad_token_id, params)
    generated = tokens[:, : int(lengths.max())]
    out = torch.cat((input_ids.repeat_interleave(params.num_return_sequences, 0), generated), dim=1)
    return (out, scores) if return_scores else out


def _left_padding(input_ids: Tensor, attention_mask: Tensor | None, pad_token_id: int, eos: Tensor) -> Tensor:
    """The prompts' mask, checked left-padded. Without one, transformers' rule: the pad id marks
    padding where it occurs in the prompts and is no eos id; else every token counts.

    Raises:
        ValueError: a mask of another shape, or one with padding after a row's first token (right or
            inner padding: a prompt's last position would be a pad, so its first token would be
            predicted from the wrong place; transformers also decodes such rows wrongly, with a warning).
    """
    if attention_mask is None:
        pads = input_ids == pad_token_id
        infer = bool(pads.any()) and not bool(torch.isin(eos, pad_token_id).any())
        attention_mask = ~pads if infer else torch.ones_like(pads)
    attention_mask = attention_mask.to(input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")
    inner = (attention_mask[:, 1:].bool() < attention_mask[:, :-1].bool()).any(1)
    if bool(inner.any()):
        raise ValueError(f"generate takes left-padded prompts: row {int(inner.nonzero()[0])} has padding after "
                         "its first token (pad on the left, as Tokenizer.pad does, or pass attention_mask)")
    return attention_mask


def _log_probs(logits: Tensor, step: int, min_new_tokens: int, eos: Tensor) -> Tensor:
    # fp32 as transformers' log_softmax(logits.float()), with no fp32 copy of the logits: at 5 x
    # 151,936 a second live 3 MB buffer made glibc map fresh pages every step (2.6 vs 0.4 ms).
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    if step < min_new_tokens:
        log_probs[:, eos] = float("-inf")
    return log_probs


def _greedy(decode_step: DecodeStep, cache: KVCache, logits: Tensor, eos: Tensor, pad_id: int,
            params: SearchParams) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens [B, max_new], scores [B] and lengths [B] of greedy decoding from the prefill's logits [B, V]."""
    max_new_tokens, min_new_tokens = params.max_new_tokens, params.min_new_tokens
    batch = logits.shape[0]
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    total = torch.zeros(batch, device=logits.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=logits.device)
    running = torch.ones(batch, dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        scores = logits.float()
        if step < min_new_tokens:
            scores[:, eos] = float("-inf")
        token = scores.argmax(-1)  # on the logits, as transformers: log_softmax could round two into a tie
        log_probs = F.log_softmax(scores, dim=-1).gather(1, token[:, None])[:, 0]
        total += torch.where(running, log_probs, 0.0)
        lengths += running
        token = torch.where(running, token, pad_id)
        tokens[:, step] = token
        running &= ~torch.isin(token, eos)
        if step + 1 == max_new_tokens or not running.any():  # the one host sync per step
            break
        logits = decode_step(token, cache)
    return tokens, total / lengths.float() ** params.length_penalty, lengths


def _beam_search(decode_step: DecodeStep, cache: KVCache, logits: Tensor, eos: Tensor, pad_id: int,
                 params: SearchParams) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens [B * n, max_new], scores [B * n] and lengths [B, n] of the n = num_return_sequences best
    hypotheses per sentence, from the prefill's logits [B, V]."""
    beams, max_new_tokens, min_new_tokens = params.num_beams, params.max_new_tokens, params.min_new_tokens
    length_penalty, early_stopping = params.length_penalty, params.early_stopping
    batch, vocab = logits.shape
    device = logits.device
    keep = max(2, 1 + eos.numel()) * beams  # enough candidates that `beams` of them do not end
    is_top = torch.arange(keep, device=device) < beams  # only these candidates may become finished hypotheses
    rows = torch.arange(batch, device=device)[:, None] * beams
    # transformers fills with pad, or eos[0] when pad is 0 (its `pad or eos` test): kept for identical output.
    fill = pad_id if pad_id else int(eos[0])
    run_tokens = torch.full((batch, beams, max_new_tokens), fill, dtype=torch.long, device=device)
    run_scores = torch.zeros(batch, beams, device=device)
    run_scores[:, 1:] = _NEG  # the beams start identical: only beam 0's candidates count at step 0
    fin_tokens = run_tokens.clone()
    fin_scores = torch.full((batch, beams), _NEG, device=device)
    fin_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        # Step 0 has one row of logits per sentence; broadcasting against the beam scores expands it.
        log_probs = _log_probs(logits, step, min_new_tokens, eos).view(batch, -1, vocab)
        if log_probs.shape[1] == beams:
            log_probs += run_scores[:, :, None]  # in place, for the same reason
        else:
            log_probs = log_probs + run_scores[:, :, None]
        cand_scores, cand_idx = topk(log_probs.view(batch, -1), keep)
        parent = torch.div(cand_idx, vocab, rounding_mode="floor")
        cand_tokens = run_tokens.gather(1, parent[:, :, None].expand(-1, -1, max_new_tokens))
        cand_tokens[:, :, step] = cand_idx % vocab
        ends = torch.isin(cand_tokens[:, :, step], eos)
        if step + 1 == max_new_tokens:
            ends[:] = True  # max length: every candidate is complete
        # Running beams: the best `beams` candidates that did not end.
        live_scores = cand_scores + ends.float() * _NEG
        pick = torch.topk(live_scores, beams).indices
        run_tokens = cand_tokens.gather(1, pick[:, :, None].expand(-1, -1, max_new_tokens))
        run_scores = live_scores.gather(1, pick)
        beam_idx = (parent.gather(1, pick) + rows).flatten()
        # Finished hypotheses: merge the candidates that just ended with the kept ones, keep the best `beams`.
        just_ended = ends & is_top
        scored = cand_scores / ((step + 1) ** length_penalty)
        scored += (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * _NEG
        scored += (~improvable).float() * _NEG
        scored += (~just_ended) * _NEG
        best = torch.topk(torch.cat((fin_scores, scored), 1), beams).indices
        fin_scores = torch.cat((fin_scores, scored), 1).gather(1, best)
        fin_tokens = torch.cat((fin_tokens, cand_tokens), 1).gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        fin_lengths = torch.cat((fin_lengths, torch.full_like(cand_idx, step + 1)), 1).gather(1, best)
        finished = torch.cat((finished, just_ended), 1).gather(1, best)
        # Can a running beam still beat the worst finished one? ("never" with a positive penalty
        # assumes it may grow to max length.)
        hypothetical = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else step + 1
        best_running = run_scores[:, :1] / (hypothetical**length_penalty)
        worst_finished = torch.where(finished, fin_scores.min(1, keepdim=True).values, _NEG)
        improvable &= (best_running > worst_finished).any(-1, keepdim=True)
        go_on = improvable.any() & ~(finished.all() & (early_stopping is True)) & ~ends.all()
        if not go_on:  # the one host sync per step
            break
        cache.reorder(beam_idx)
        logits = decode_step(run_tokens[:, :, step].flatten(), cache)
    n = params.num_return_sequences
    return fin_tokens[:, :n].flatten(0, 1), fin_scores[:, :n].flatten(), fin_lengths[:, :n]


def translate(model: Qwen2ForCausalLM, tokenizer: Tokenizer, texts: Sequence[str], src: str | Sequence[str],
              tgt: str | Sequence[str], search: SearchParams | None = None, *, batch_size: int = 16,
              pair_ids: Sequence[int] | None = None, adapters: AdapterController | None = None,
              progress: Callable[[int], object] | None = None, **overrides) -> list[str]:
    """Translate ``texts``; returns one string per input, in input order.

    Args:
        src, tgt: language codes, one for all texts or one per text (mixed directions).
        search: beam search settings (default: beam 5, 256 new tokens); ``overrides`` (e.g.
            ``num_beams=1``) replace some of its fields. The tokenizer gives eos and padding.
        pair_ids: one per text, each text's adapter pair among those set with
            ``adapters.set_adapter_pairs``, so a batch of mixed directions runs in one pass; without
            it the model's current adapters serve every text.
        progress: called with the number of texts done after each batch (``tqdm.update`` fits).

    - Prompts are sorted by length (longest first) and batched ``batch_size`` at a time, then the
      results are put back in input order.
    - Empty or whitespace-only texts return "" without running the model.
    - A text whose prompt plus ``max_new_tokens`` exceeds the model's context
      (``max_position_embeddings``) is truncated to fit, with a ``UserWarning`` naming its index.
    - Outputs are cut at the first eos id, special tokens dropped, surrounding whitespace stripped.

    Raises:
        TypeError: ``texts`` is a single str.
        ValueError: n-best settings, per-text lists of the wrong length, a ``batch_size`` below 1, an
            unknown language (checked even where every text is empty), or a ``max_new_tokens`` (or
            a prompt template) that leaves no room in the model's context.
    """
    if isinstance(texts, str):
        raise TypeError("translate: texts must be a list of strings, one per sentence, not a single str")
    params = dataclasses.replace(search or SearchParams(), **overrides)
    if params.num_return_sequences != 1:
        raise ValueError("translate returns one translation per text; use generate for n-best lists")
    checked_field(POSITIVE, batch_size, "batch_size")
    context = model.config.max_position_embeddings
    if params.max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} positions")
    n = len(texts)
    srcs = [src] * n if isinstance(src, str) else list(src)
    tgts = [tgt] * n if isinstance(tgt, str) else list(tgt)
    if len(srcs) != n or len(tgts) != n or (pair_ids is not None and len(pair_ids) != n):
        raise ValueError("src, tgt and pair_ids must be one value or one per text")
    for code in dict.fromkeys(srcs + tgts):  # every language named, even where every text is empty
        language_name(code)
    limit = context - params.max_new_tokens
    prompts: dict[int, list[int]] = {}
    for i, text in enumerate(texts):
        if text.strip():
            prompts[i] = _fitted_prompt(tokenizer, srcs[i], tgts[i], text, limit, i)
    order = sorted(prompts, key=lambda i: len(prompts[i]), reverse=True)
    out = [""] * n
    device = model.lm_head.weight.device
    eos = frozenset(tokenizer.eos_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        batch = tokenizer.pad([prompts[i] for i in chunk])
        row_pair = None if pair_ids is None else torch.tensor([pair_ids[i] for i in chunk], device=device)
        ids = generate(model, batch["input_ids"], batch["attention_mask"], params, eos_token_id=tokenizer.eos_ids,
                       pad_token_id=tokenizer.pad_id, row_pair=row_pair, adapters=adapters)
        for i, row in zip(chunk, ids[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
            end = next((k for k, t in enumerate(row) if t in eos), len(row))
            out[i] = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(chunk))
    return out


def _fitted_prompt(tokenizer: Tokenizer, src: str, tgt: str, text: str, limit: int, index: int) -> list[int]:
    """The prompt ids, the text cut (by tokens) so that they fit in ``limit`` positions."""
    ids = translation_prompt_ids(tokenizer, src, tgt, text)
    if len(ids) <= limit:
        return ids
    overhead = len(ids) - len(tokenizer.encode(text))
    if overhead >= limit:
        raise ValueError(f"the prompt template alone ({overhead} tokens) leaves no room for max_new_tokens "
                         f"within the model's context; lower max_new_tokens")
    warnings.warn(f"text {index} has {len(ids)} prompt tokens, more than the {limit} that fit with "
                  f"max_new_tokens in the model's context: truncated", UserWarning, stacklevel=3)
    text_ids = tokenizer.encode(text)
    budget = limit - overhead
    while len(ids) > limit and budget > 0:
        # Re-encoding a decoded cut may merge differently: shrink until the whole prompt fits.
        ids = translation_prompt_ids(tokenizer, src, tgt, tokenizer.decode(text_ids[:budget]))
        budget -= max(1, len(ids) - limit)
    return ids
