"""modlora.kernels: fused ops (the dual-LoRA linear on Triton, the chunked linear cross-entropy) and
the plain-torch reference of the dual-LoRA linear.

Knows tensors only: no model, no config. Installed as ``modlora.kernels``. The Triton op is
imported on first use, so the reference works without Triton and importing this package does not
fix Triton's mode (``TRITON_INTERPRET`` is read when the kernels are defined).
"""

from .cross_entropy import linear_cross_entropy
from .reference import dual_lora_linear_ref, lora_delta_ref, merge_ab, merge_pair, pairwise_lora_linear_ref

__all__ = ["dual_lora_linear", "dual_lora_linear_ref", "linear_cross_entropy", "lora_delta_ref", "merge_ab",
           "merge_pair", "pairwise_lora_linear", "pairwise_lora_linear_ref"]


def __getattr__(name: str):
    if name == "dual_lora_linear":
        from .dual_lora import dual_lora_linear

        return dual_lora_linear
    if name == "pairwise_lora_linear":
        from .pairwise import pairwise_lora_linear

        return pairwise_lora_linear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
