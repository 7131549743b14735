"""modlora: modular LoRA fine-tuning of LLM translators.

The names a user needs, importable from here::

    from modlora import AdapterController, AdapterPool, Tokenizer, load_pretrained, translate

Each is imported from its module on first access, so ``import modlora.model`` (or any one module)
loads only what that module needs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Qwen2Config": "config",
    "Qwen2ForCausalLM": "model",
    "KVCache": "model",
    "load_pretrained": "loading",
    "random_model": "loading",
    "save_pretrained": "loading",
    "Tokenizer": "tokenizer",
    "LoraAdapter": "adapters",
    "AdapterController": "adapters",
    "AdapterError": "adapters",
    "LearnedWeights": "adapters",
    "export_pair": "adapters",
    "AdapterPool": "pool",
    "SearchParams": "generation",
    "generate": "generation",
    "translate": "generation",
    "chrf_pp": "evaluate",
    "TrainConfig": "train",
    "LoraConfig": "train",
    "train_adapter": "train",
    "learn_weights": "train",
}
__all__ = ["__version__", *_EXPORTS]

def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
