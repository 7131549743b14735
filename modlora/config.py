"""Qwen2 configuration: read from an HF ``config.json`` (transformers 4.x and 5.x dialects) or a preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import validate
from .fileio import read_json

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        validate.model_config(dataclasses.asdict(self), "model config")  # types and ranges, before dividing
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:  # rotary embeddings turn pairs of a head's channels
            raise ValueError(f"head_dim {self.head_dim} (hidden_size {self.hidden_size} / num_attention_heads "
                             f"{self.num_attention_heads}) must be even")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}: expected one of {sorted(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, raw: dict) -> Qwen2Config:
        """Parse an HF config dict; unknown fields are ignored, unsupported features raise."""
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise ValueError(f"unsupported model_type {model_type!r}: modlora implements 'qwen2' only")
        if raw.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}: Qwen2 uses 'silu'")
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r}: only 'default' RoPE is implemented")
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is None:  # a defaulted theta gives plausible but wrong logits
            raise ValueError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "dtype"}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name in fields and f.default is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
        kwargs = {k: raw[k] for k in fields if k in raw}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        dtype = raw.get("dtype", raw.get("torch_dtype")) or "float32"
        return cls(rope_theta=float(theta), dtype=dtype, **kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> Qwen2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(validate.model_config(read_json(path), path))

    def to_dict(self) -> dict:
        """HF-compatible config dict (transformers 4.x dialect, which 5.x also reads)."""
        out = dataclasses.asdict(self)
        out["torch_dtype"] = out.pop("dtype")
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "attention_dropout": 0.0, "use_sliding_window": False, **out}

    @classmethod
    def preset(cls, name: str) -> Qwen2Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return PRESETS[name]


# The real Qwen2.5-0.5B-Instruct shape (config.json of the published checkpoint), and small test shapes.
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, dtype="bfloat16"),
    # Real vocabulary (so the real tokenizer works), tiny body: the CI and README default.
    "tiny": Qwen2Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=4096, tie_word_embeddings=True, dtype="float32"),
}
