"""The linear layers the model builds: :class:`FastLinear` everywhere, :class:`AdaptedLinear`
wherever adapters may attach. Both run through :mod:`modlora.ops` (the C++ op when decoding on a
CPU), and both are ``nn.Linear`` so parameter names stay HF's.

An adapted linear is an ``nn.Linear`` (the frozen base keeps its HF name, ``q_proj.weight``) plus an optional
``lora`` binding: a callable ``(x, weight, bias, training) -> y`` that computes the adapted output
(``training``: the module's mode, which switches LoRA dropout on). The
binding is not a submodule, so the state dict stays exactly the base checkpoint's. A binding may
also describe itself to :func:`grouped` by a method ``bank_pairs(x, training) -> (pairs, strategy,
row_pair) | None`` (None: run it alone).

Linears that read the same input (q/k/v, gate/up) can share one weight buffer (:func:`fuse`): their
parameters stay separate ``nn.Parameter``s with their HF names, as adjacent views of it, and
:func:`grouped` runs them as one op while they still are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import ops

LoraBinding = Callable[[Tensor, Tensor, Tensor | None, bool], Tensor]


class FastLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class AdaptedLinear(FastLinear):
    lora: LoraBinding | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.lora is None:
            return super().forward(x)
        return self.lora(x, self.weight, self.bias, self.training)

    def group_part(self, x: Tensor) -> ops.GroupPart | None:
        """This linear as a part of :func:`ops.grouped_linear`, or None when its binding cannot be one."""
        if self.lora is None:
            return self.weight, self.bias, (), "output", None
        describe = getattr(self.lora, "bank_pairs", None)
        spec = None if describe is None else describe(x, self.training)
        return None if spec is None else (self.weight, self.bias, *spec)


def fuse(linears: Sequence[nn.Linear]) -> None:
    """Move the weights (and biases) of ``linears`` into one buffer each, as consecutive row blocks;
    every parameter becomes a view of it. Names, shapes and values are unchanged; one group's copy
    exists only while it is made."""
    for name in ("weight", "bias"):
        tensors = [getattr(lin, name) for lin in linears]
        if any(t is None for t in tensors):
            continue
        buffer = torch.cat([t.detach() for t in tensors])
        for lin, t, view in zip(linears, tensors, buffer.split([t.shape[0] for t in tensors]), strict=True):
            setattr(lin, name, nn.Parameter(view, requires_grad=t.requires_grad))


def grouped(x: Tensor, linears: Sequence[AdaptedLinear]) -> list[Tensor]:
    """``[lin(x) for lin in linears]``, as one op while their parameters are still the adjacent
    views :func:`fuse` made (``model.to(dtype)`` or assigning a parameter undoes that: then, and
    for a binding that cannot be grouped, each runs alone)."""
    weight = _adjacent([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else _adjacent(biases)
    if weight is None or (bias is None and any(b is not None for b in biases)):
        return [lin(x) for lin in linears]
    parts = [lin.group_part(x) for lin in linears]
    if any(p is None for p in parts):
        return [lin(x) for lin in linears]
    return ops.grouped_linear(x, weight, bias, parts)


def _adjacent(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """The tensors as one [sum of dim 0, ...] view when they are contiguous row blocks, in order, of
    one storage; else None. Pointer arithmetic and one storage query: this runs on every call."""
    first = tensors[0]
    if first is None:
        return None
    ptr, rows = first.data_ptr(), 0
    for t in tensors:
        if (t is None or t.data_ptr() != ptr or t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:] or not t.is_contiguous()):
            return None
        ptr += t.numel() * t.element_size()
        rows += t.shape[0]
    if ptr - first.data_ptr() + first.storage_offset() * first.element_size() > first.untyped_storage().nbytes():
        return None  # adjacent in memory, but not one storage
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
