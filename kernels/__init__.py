"""modlora.kernels: fused dual-LoRA linear ops (Triton) and their plain-torch reference.

Knows tensors only: no model, no config. Installed as ``modlora.kernels``.
"""

from .reference import dual_lora_linear_ref, lora_delta_ref, merge_ab, pairwise_lora_linear_ref

__all__ = ["dual_lora_linear_ref", "lora_delta_ref", "merge_ab", "pairwise_lora_linear_ref"]
