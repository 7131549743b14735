"""Build small random ``transformers`` Qwen2 checkpoints: the independent reference of the tests."""

from __future__ import annotations

from pathlib import Path

import torch

# Odd sizes on purpose: head_dim 16, GQA 6:2, intermediate not a power of two. rope_theta and
# rms_norm_eps are neither the usual defaults nor Qwen2.5's, so a model that ignores them fails.
SMALL = dict(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
             num_attention_heads=6, num_key_value_heads=2, rope_theta=12345.0, rms_norm_eps=1e-5,
             max_position_embeddings=512)


def hf_model(tie: bool = False, seed: int = 0, **overrides):
    """A random transformers Qwen2ForCausalLM in fp32 with nonzero biases (so bias bugs show)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**SMALL, **overrides}, tie_word_embeddings=tie,
                                   attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, path: Path, shard: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="200KB" if shard else "5GB")
    return path
