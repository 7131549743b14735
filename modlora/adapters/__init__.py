"""Per-language LoRA adapters, split by job:

- :mod:`.format`: one adapter in PEFT's file format (:class:`LoraAdapter`), learned weights as JSON;
- :mod:`.merge`: merge math on whole adapters (per-layer weights, :func:`export_pair`, folding);
- :mod:`.controller`: :class:`AdapterController`, the one owner of a model's adapter state.
"""

from .controller import AdapterController
from .format import ROLES, TARGET_MODULES, AdapterError, BaseFingerprint, LearnedWeights, LoraAdapter
from .merge import export_pair

__all__ = ["ROLES", "TARGET_MODULES", "AdapterController", "AdapterError", "BaseFingerprint", "LearnedWeights",
           "LoraAdapter", "export_pair"]
