"""Merge math on whole adapters: per-layer weights, one pair as one adapter, and folding it into W.

The formulas are those of :mod:`modlora.kernels.reference` (eq. 3 and 4 of the paper, see
docs/design.md); this module applies them module by module, with per-layer weights (eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.reference import STRATEGIES, Weight, merge_pair
from .format import AdapterError, LoraAdapter, layer_of, order_targets

WeightFn = Callable[[int], tuple[Weight, Weight]]  # layer index -> (w_in, w_out)


def fixed_weights(w_in: Weight, w_out: Weight, num_layers: int, strategy: str) -> WeightFn:
    """Fixed weights: floats, or per-layer tensors [L] indexed by layer.

    Raises:
        AdapterError: a weight that is not a finite number or an [L] tensor, or a negative weight
            under ``ab`` (which scales A and B by its square root).
    """
    for nm, w in (("w_in", w_in), ("w_out", w_out)):
        if isinstance(w, bool) or not isinstance(w, (int, float, Tensor)):
            raise AdapterError(f"{nm} must be a number or a tensor of shape [{num_layers}], got {w!r}")
        if not bool(torch.isfinite(torch.as_tensor(w)).all()):
            raise AdapterError(f"{nm} must be finite, got {w}")
        if isinstance(w, Tensor) and w.shape != (num_layers,):
            raise AdapterError(f"{nm} must be a float or a tensor of shape [{num_layers}] (one per layer), "
                               f"got shape {tuple(w.shape)}")
        if strategy == "ab" and bool((torch.as_tensor(w) < 0).any()):
            raise AdapterError(f"strategy 'ab' scales A and B by sqrt(w * scale) and needs {nm} >= 0, got {w}")
    pick = lambda w, l: w[l] if isinstance(w, Tensor) else float(w)
    return lambda l: (pick(w_in, l), pick(w_out, l))


def check_strategy(strategy: str, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None) -> None:
    """Raise :class:`AdapterError` for an unknown strategy, or unequal ranks under ``ab``."""
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "ab" and lora_in is not None and lora_out is not None and lora_in.rank != lora_out.rank:
        raise AdapterError(f"strategy 'ab' merges A and B element-wise and needs equal ranks: "
                           f"{lora_in.label} has rank {lora_in.rank}, {lora_out.label} has rank {lora_out.rank}")


def check_roles(lora_in: LoraAdapter | None, lora_out: LoraAdapter | None) -> None:
    """Raise :class:`AdapterError` unless each slot holds a LoraAdapter (or None) of its role (or of none)."""
    for slot, a in (("in", lora_in), ("out", lora_out)):
        if a is None:
            continue
        if not isinstance(a, LoraAdapter):
            raise AdapterError(f"lora_{slot} must be a LoraAdapter or None, got {type(a).__name__}")
        if a.role not in (None, slot):
            raise AdapterError(f"lora_{slot} was given {a.label}, an {a.role!r} adapter (swapped in and out?)")


def export_pair(lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, *, w_in: Weight = 0.5,
                w_out: Weight = 0.5, strategy: str = "output") -> LoraAdapter:
    """The pair as ONE fp32 adapter of scale 1 that plain PEFT (or vLLM) serves.

    ``output``: rank r_in + r_out (PEFT's ``cat``); ``ab``: rank r (PEFT's ``linear``); see
    :func:`modlora.kernels.merge_pair`. Per-layer weights [L] are folded layer by layer. Adapters
    on different modules export the union, as :meth:`AdapterController.set_adapters` serves them:
    a module of one adapter alone gets its weighted adapter, zero-padded to the rank of the rest
    (PEFT's config has one rank).

    Raises:
        AdapterError: no adapter, an adapter in the other's role, adapters of different bases or of
            different module shapes, or a strategy/weight error.
    """
    parts = [a for a in (lora_in, lora_out) if a is not None]
    if not parts:
        raise AdapterError("export_pair needs at least one adapter")
    check_roles(lora_in, lora_out)
    check_strategy(strategy, lora_in, lora_out)
    if len(parts) == 2:
        _check_alike(*parts)
    base = next((a.base for a in parts if a.base is not None), None)
    names = sorted({name for a in parts for name in a.tensors}, key=lambda n: (layer_of(n), n))
    weights = fixed_weights(w_in, w_out, base.num_hidden_layers if base else 1 + max(map(layer_of, names)), strategy)
    fp32 = lambda a, name: None if a is None or name not in a.tensors else (
        a.tensors[name][0].detach().float(), a.tensors[name][1].detach().float(), a.scale)
    merged = {name: merge_pair(fp32(lora_in, name), fp32(lora_out, name), *weights(layer_of(name)), strategy)
              for name in names}
    rank = max(A.shape[0] for A, _ in merged.values())
    tensors = {name: (F.pad(A, (0, 0, 0, rank - A.shape[0])), F.pad(B, (0, rank - B.shape[1])))
               for name, (A, B) in merged.items()}
    fold = [w.tolist() if isinstance(w, Tensor) else float(w) for w in (w_in, w_out)]
    meta = {"pair": {"in": lora_in and lora_in.language, "out": lora_out and lora_out.language,
                     "strategy": strategy, "w_in": fold[0], "w_out": fold[1]}}
    targets = order_targets(t for a in parts for t in a.target_modules)
    return LoraAdapter(tensors, rank, float(rank), False, targets, base=base, metadata=meta)


def _check_alike(a: LoraAdapter, b: LoraAdapter) -> None:
    """Two adapters of one pair fit one base: each module both adapt of the same in/out shape."""
    if a.base is not None and b.base is not None and a.base != b.base:
        raise AdapterError(f"{a.label} was trained for {a.base}, {b.label} for {b.base}: not one base")
    for name in [n for n in a.tensors if n in b.tensors]:
        (A, B), (A2, B2) = a.tensors[name], b.tensors[name]
        if (A.shape[1], B.shape[0]) != (A2.shape[1], B2.shape[0]):
            raise AdapterError(f"{name} maps {A.shape[1]} -> {B.shape[0]} in {a.label} but {A2.shape[1]} -> "
                               f"{B2.shape[0]} in {b.label}: not one base")


@torch.no_grad()
def fold_into(weight: Tensor, A: Tensor, B: Tensor) -> None:
    """``W <- W + B A`` in place, computed in fp32 and rounded to W's dtype once."""
    weight.copy_((weight.float() + B.to(weight.device) @ A.to(weight.device)).to(weight.dtype))
