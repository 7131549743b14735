"""modlora: modular LoRA fine-tuning of LLM translators."""

__version__ = "0.1.0"
