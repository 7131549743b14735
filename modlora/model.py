"""A minimal Qwen2 decoder in plain PyTorch, parameter for parameter the Hugging Face layout.

Four ways to run it:

- ``model(input_ids, attention_mask)``: full causal forward (scoring), logits [B, T, V];
- ``model.model.forward_packed(input_ids, attention_mask, prefix)``: the same decoder on the
  non-padding tokens only, packed [N, C] (training; no padding enters a linear layer, and a prefix
  shared by every row runs once);
- ``model.prefill(input_ids, attention_mask, cache)`` then ``model.decode_step(tokens, cache)``:
  generation on a static :class:`KVCache`. The prompt is stored once per sentence and shared by
  its beams; only the generated positions are per beam, so reordering beams copies
  ``t`` positions per layer, not the whole cache. On the CPU, where ``modlora._C`` is built, a
  decode step's attention and every RMSNorm without autograd are one C++ call each
  (:func:`modlora.cpu.decode_attention`, :func:`modlora.cpu.rms_norm`). A decode step runs each
  linear (or fused group) through a ``site`` (:data:`Site`); ``generate`` passes a
  :class:`modlora.cpu.BoundSites`, which replays each one's C++ call from the second step on.

Left padding works everywhere: position ids come from the attention mask, as transformers'
``generate`` computes them. This module is a leaf: it knows its linear layers
(:mod:`modlora.adapted`) and the CPU ops (:mod:`modlora.cpu`), not adapters
(:mod:`modlora.adapters`) nor files (:mod:`modlora.loading`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import cpu
from .adapted import AdaptedLinear, Allocate, FastLinear, grouped, pack
from .config import Qwen2Config
from .memory import weight_buffer

Site = Callable[[Callable[[Tensor], Any], Tensor], Any]
"""How a decode step runs its linear sites: ``site(fn, x)`` returns ``fn(x)``, ``fn`` one linear or
a group of them (:class:`modlora.cpu.BoundSites` binds each to its one C++ call)."""


def run_site(fn: Callable[[Tensor], Any], x: Tensor) -> Any:
    """The plain :data:`Site`: ``fn(x)``."""
    return fn(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if cpu.c_serves(x, self.weight):
            return cpu.rms_norm(x, self.weight, self.eps)
        # fp32 statistics, as HF: bf16 variance loses the small-norm tokens.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (HF convention): cos/sin computed in fp32 from integer positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D], cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass
class KVCache:
    """Static cache for generation: a shared prompt segment and a per-beam generated segment.

    prompt_k/v: [L, B, Hkv, P, D] one row per sentence; gen_k/v: [L, B*beams, Hkv, T, D].
    Allocated once per batch by :meth:`Qwen2ForCausalLM.new_cache`; never part of the state dict.
    """

    prompt_k: Tensor
    prompt_v: Tensor
    gen_k: Tensor
    gen_v: Tensor
    prompt_mask: Tensor  # [B, P] bool, False on left padding
    prompt_lengths: Tensor  # [B] non-padding prompt tokens per sentence
    num_beams: int
    step: int = 0  # generated positions written so far

    @property
    def capacity(self) -> int:
        return self.gen_k.shape[3]

    @functools.cached_property
    def layers(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Each layer's (prompt_k, prompt_v, gen_k, gen_v), views made once: indexing the [L, ...]
        tensors is a torch call each, four per layer in every decode step (0.1-0.7 ms of a 40-58 ms
        beam-5 step, paired steps on one and two Zen 4 threads). The tensors are only ever written
        in place (:meth:`reorder` too), so the views stay valid."""
        return list(zip(self.prompt_k, self.prompt_v, self.gen_k, self.gen_v, strict=True))

    def reorder(self, beam_idx: Tensor) -> int:
        """Make row i continue beam ``beam_idx[i]``; returns the bytes moved (read + written).

        Copies only the ``step`` generated positions, and only of rows whose parent is another row:
        a beam that extends itself stays in place.
        """
        t = self.step
        moved = (beam_idx != torch.arange(beam_idx.shape[0], device=beam_idx.device)).nonzero().squeeze(1)
        if t == 0 or moved.numel() == 0:
            return 0
        parents = beam_idx[moved]
        self.gen_k[:, moved, :, :t] = self.gen_k[:, parents, :, :t]
        self.gen_v[:, moved, :, :t] = self.gen_v[:, parents, :, :t]
        per_row = self.gen_k[:, :1, :, :t].numel() * self.gen_k.element_size()
        return 2 * 2 * per_row * moved.numel()


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = AdaptedLinear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = AdaptedLinear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = AdaptedLinear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = AdaptedLinear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    @property
    def gqa(self) -> bool:
        return self.n_kv != self.n_heads

    def project(self, x: Tensor) -> list[Tensor]:
        """q [..., H*D], k and v [..., Hkv*D] of x [..., C], as one op while they are fused."""
        return grouped(x, (self.q_proj, self.k_proj, self.v_proj))

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B, H, T, D], k and v [B, Hkv, T, D] of x [B, T, C]."""
        return self.heads(*self.project(x), cos, sin)

    def heads(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projections [B, T, H*D] (k, v: Hkv*D) split into heads, q and k rotated."""
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        """Full causal attention over x [B, T, C]; mask [B, 1, T, T] bool. Fills the prompt cache if given."""
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            cache.prompt_k[self.layer_idx] = k
            cache.prompt_v[self.layer_idx] = v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, site: Site = run_site) -> Tensor:
        """One new token per row, x [B*beams, C], cos/sin [B*beams, D]: attends to its sentence's
        prompt and its own beam."""
        q, k, v = site(self.project, x)
        if cpu.c_serves(q, cache.gen_k):
            prompt_k, prompt_v, gen_k, gen_v = cache.layers[self.layer_idx]
            out = cpu.decode_attention(q, k, v, cos, sin, prompt_k, prompt_v, cache.prompt_mask, gen_k, gen_v,
                                       cache.step, cache.num_beams)
        else:
            out = self.decode_torch(*self.heads(q[:, None], k[:, None], v[:, None], cos[:, None], sin[:, None]),
                                    cache)
        return site(self.o_proj, out)

    def decode_torch(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        """:meth:`decode`'s attention in torch ops, from rotated heads; [B*beams, H*D]."""
        rows = q.shape[0]
        beams, groups, t = cache.num_beams, self.n_heads // self.n_kv, cache.step
        prompt_k, prompt_v, gen_k, gen_v = cache.layers[self.layer_idx]
        gen_k[:, :, t] = k[:, :, 0]
        gen_v[:, :, t] = v[:, :, 0]
        # q as [B, beams, Hkv, G, D]: the prompt keys [B, Hkv, P, D] broadcast over beams, uncopied.
        # fp32 math: a few KB per layer to convert, and CPUs without bf16 dot products run these
        # small batched matmuls 3x faster in fp32 than in bf16.
        q = q.float().view(rows // beams, beams, self.n_kv, groups, self.head_dim) * (1.0 / math.sqrt(self.head_dim))
        p_k, p_v = prompt_k[:, None].float(), prompt_v[:, None].float()
        s_prompt = q @ p_k.transpose(-1, -2)
        s_prompt = s_prompt.masked_fill(~cache.prompt_mask[:, None, None, None, :], float("-inf"))
        g_k = gen_k[:, :, : t + 1].float().view(rows // beams, beams, self.n_kv, t + 1, self.head_dim)
        g_v = gen_v[:, :, : t + 1].float().view(rows // beams, beams, self.n_kv, t + 1, self.head_dim)
        probs = torch.softmax(torch.cat((s_prompt, q @ g_k.transpose(-1, -2)), dim=-1), dim=-1)
        n_prompt = s_prompt.shape[-1]
        out = probs[..., :n_prompt] @ p_v + probs[..., n_prompt:] @ g_v  # [B, beams, Hkv, G, D]
        return out.to(k.dtype).reshape(rows, -1)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = AdaptedLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = AdaptedLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = AdaptedLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def gate_up(self, x: Tensor) -> list[Tensor]:
        """gate and up of x, as one op while they are fused."""
        return grouped(x, (self.gate_proj, self.up_proj))

    def forward(self, x: Tensor, site: Site = run_site) -> Tensor:
        gate, up = site(self.gate_up, x)
        return site(self.down_proj, F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, site: Site = run_site) -> Tensor:
        """:meth:`forward` for one new token per row, x [B*beams, C] (:meth:`Qwen2Attention.decode`)."""
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, site)
        return x + self.mlp(self.post_attention_layernorm(x), site)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Hidden states [B, T, C] after the final norm."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            self._check_ids(input_ids)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:  # a [1, T] mask would broadcast over the batch
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        # Padding queries attend to themselves only, so no row is all -inf (SDPA would give NaN).
        mask = (causal & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask[:, None], cache)
        return self.norm(x)

    def forward_packed(self, input_ids: Tensor, attention_mask: Tensor, prefix: int = 0, *,
                       checkpoint_layers: bool = False) -> Tensor:
        """Final hidden states [N, C] of the N non-padding tokens after the first ``prefix`` columns, row-major.

        The same function as :meth:`forward` on those positions, with less work:

        - padding never enters a linear layer: tokens are packed to [1, N, C] for every projection and
          MLP, and scattered to the padded [B, T] layout only for attention;
        - the first ``prefix`` tokens, identical in every row (the caller guarantees it), run once, as
          one row, and their keys and values are broadcast to all rows (causal attention never lets a
          prefix see what follows it).

        Gradients reach the adapters through every part. With ``checkpoint_layers`` (under autograd)
        each decoder layer keeps only its input for the backward pass and recomputes the rest there
        (activation checkpointing: the same gradients, less memory, one more forward).
        """
        p = prefix
        b, t = input_ids.shape
        s, dev = t - p, input_ids.device
        valid = attention_mask[:, p:].bool()  # [B, s]
        where = valid.flatten().nonzero().squeeze(1)  # packed token -> flat [B * s] index
        positions = (attention_mask.long().cumsum(-1) - 1)[:, p:][valid][None]  # [1, N]
        x = self.embed_tokens(input_ids[:, p:][valid][None])  # [1, N, C]
        cos, sin = self.rotary_emb(positions, x.dtype)
        own = torch.ones(s, s, dtype=torch.bool, device=dev).tril() & valid[:, None, :]
        own |= torch.eye(s, dtype=torch.bool, device=dev)  # a padding query sees itself: no all-masked row
        mask = torch.cat((torch.ones(b, s, p, dtype=torch.bool, device=dev), own), dim=-1)[:, None]  # [B, 1, s, p+s]
        xp = None
        if p:
            xp = self.embed_tokens(input_ids[:1, :p])  # [1, p, C]
            cos_p, sin_p = self.rotary_emb(torch.arange(p, device=dev)[None], xp.dtype)
            mask_p = torch.ones(p, p, dtype=torch.bool, device=dev).tril()

        def padded(z: Tensor) -> Tensor:  # [1, H, N, D] -> [B, H, s, D], zeros on padding
            h, d = z.shape[1], z.shape[3]
            flat = z[0].transpose(0, 1).new_zeros(b * s, h, d).index_copy(0, where, z[0].transpose(0, 1))
            return flat.view(b, s, h, d).transpose(1, 2)

        def block(layer: Qwen2DecoderLayer, x: Tensor, xp: Tensor | None) -> tuple[Tensor, Tensor | None]:
            a = layer.self_attn
            q, k, v = (padded(z) for z in a.qkv(layer.input_layernorm(x), cos, sin))
            if p:
                qp, kp, vp = a.qkv(layer.input_layernorm(xp), cos_p, sin_p)
                out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask_p, enable_gqa=a.gqa)
                xp = xp + a.o_proj(out_p.transpose(1, 2).reshape(1, p, -1))
                xp = xp + layer.mlp(layer.post_attention_layernorm(xp))
                k = torch.cat((kp.expand(b, -1, -1, -1), k), dim=2)
                v = torch.cat((vp.expand(b, -1, -1, -1), v), dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.gqa)  # [B, H, s, D]
            out = out.transpose(1, 2).reshape(b * s, -1)[where][None]  # [1, N, H * D]
            x = x + a.o_proj(out)
            return x + layer.mlp(layer.post_attention_layernorm(x)), xp

        recompute = checkpoint_layers and torch.is_grad_enabled()
        for layer in self.layers:
            x, xp = (checkpoint(block, layer, x, xp, use_reentrant=False) if recompute  # restores the RNG too
                     else block(layer, x, xp))
        return self.norm(x)[0]

    def _check_ids(self, ids: Tensor) -> None:
        """Every id a row of the embedding: one reduction, one read of its result."""
        vocab = self.embed_tokens.num_embeddings
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got {lo}..{hi}")

    def decode(self, tokens: Tensor, cache: KVCache, site: Site = run_site) -> Tensor:
        """Hidden state [B*beams, C] of one new token per row; advances the cache by one position."""
        if cache.step >= cache.capacity:
            raise RuntimeError(f"KV cache is full: {cache.capacity} generated positions were allocated")
        rows = cache.gen_k.shape[1]
        if tokens.shape != (rows,):
            raise ValueError(f"tokens must be [{rows}] (one per sentence and beam of the cache), got "
                             f"{tuple(tokens.shape)}")
        if tokens.is_cpu and rows:  # elsewhere reading them would wait for the device each step
            self._check_ids(tokens)
        positions = cache.prompt_lengths.repeat_interleave(cache.num_beams) + cache.step
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer.decode(x, cos, sin, cache, site)
        cache.step += 1
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 causal LM; parameter names are those of ``transformers.Qwen2ForCausalLM``.

    Built empty from a config; :func:`modlora.loading.load_pretrained` and
    :func:`modlora.loading.random_model` fill it, :func:`modlora.loading.save_pretrained` writes it.
    """

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = FastLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pack_weights()

    def pack_weights(self, allocate: Allocate = weight_buffer) -> None:
        """Lay the weights out for decoding (:func:`modlora.adapted.pack`): each layer's linears in
        one buffer from ``allocate`` (by default huge pages on a Linux CPU, :mod:`modlora.memory`),
        q/k/v and gate/up as adjacent blocks so that each group runs as one op; the embedding (with
        it a tied lm_head) and an untied lm_head in buffers of their own. The loaders call it again
        once the weights are in place; after ``model.to(...)`` call it to lay them out again. The
        parameters become new ``nn.Parameter`` objects: call it before an optimizer takes them."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            pack([(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                  (mlp.down_proj,)], allocate)
        pack([(self.model.embed_tokens,)], allocate)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            pack([(self.lm_head,)], allocate)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] of input_ids [B, T] (attention_mask [B, T], 0 on padding).

        Raises:
            ValueError: input_ids not 2-D, or ids outside the vocabulary.
        """
        return self.lm_head(self.model(input_ids, attention_mask))

    def new_cache(self, batch_size: int, prompt_len: int, max_new_tokens: int, num_beams: int = 1) -> KVCache:
        """An empty cache for ``batch_size`` prompts of ``prompt_len`` tokens and their beams."""
        cfg, p = self.config, self.lm_head.weight
        prompt_shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, prompt_len, cfg.head_dim)
        gen_shape = (cfg.num_hidden_layers, batch_size * num_beams, cfg.num_key_value_heads, max_new_tokens,
                     cfg.head_dim)
        new = lambda shape: torch.zeros(shape, dtype=p.dtype, device=p.device)
        return KVCache(new(prompt_shape), new(prompt_shape), new(gen_shape), new(gen_shape),
                       prompt_mask=torch.ones(batch_size, prompt_len, dtype=torch.bool, device=p.device),
                       prompt_lengths=torch.full((batch_size,), prompt_len, device=p.device), num_beams=num_beams)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache) -> Tensor:
        """Run the prompts [B, P] once, fill the cache's prompt segment; logits [B, V] of the last position."""
        if input_ids.shape != cache.prompt_mask.shape:  # copy_ would broadcast one prompt into every row
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must have the shape the cache was made for, "
                             f"[batch, prompt length] = {tuple(cache.prompt_mask.shape)} (new_cache)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache.prompt_mask.copy_(attention_mask.bool())
        cache.prompt_lengths.copy_(attention_mask.sum(-1))
        cache.step = 0
        h = self.model(input_ids, attention_mask, cache)
        return self.lm_head(h[:, -1])

    def decode_step(self, tokens: Tensor, cache: KVCache, site: Site = run_site) -> Tensor:
        """Logits [B*beams, V] for one new token per row; ``site`` runs each linear (or fused group)."""
        return site(self.lm_head, self.model.decode(tokens, cache, site))

    def adapted_linears(self) -> dict[str, AdaptedLinear]:
        """Every adapted linear by its HF module name (e.g. ``model.layers.0.self_attn.q_proj``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, AdaptedLinear)}
