"""The linear layers the model builds: :class:`FastLinear` everywhere, :class:`AdaptedLinear`
wherever adapters may attach. Both run through :mod:`modlora.ops` (the C++ op when decoding on a
CPU), and both are ``nn.Linear`` so parameter names stay HF's.

An adapted linear is an ``nn.Linear`` (the frozen base keeps its HF name, ``q_proj.weight``) plus an optional
``lora`` binding: a callable ``(x, weight, bias, training) -> y`` that computes the adapted output
(``training``: the module's mode, which switches LoRA dropout on). The
binding is not a submodule, so the state dict stays exactly the base checkpoint's. A binding may
also describe itself to :func:`grouped` by a method ``bank_pairs(x, training) -> (pairs, strategy,
row_pair) | None`` (None: run it alone).

The model's weights live in buffers laid out by :func:`pack` (huge pages on a Linux CPU,
:mod:`modlora.memory`): parameters stay separate ``nn.Parameter``s with their HF names, as views of
them. Linears that read the same input (q/k/v, gate/up) are packed as adjacent row blocks, and
:func:`grouped` runs them as one op while they still are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import memory, ops

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


Allocate = Callable[[int, torch.dtype, torch.device], Tensor]
"""``(numel, dtype, device) -> 1-D tensor``: where :func:`pack` puts weights."""


def pack(groups: Sequence[Sequence[nn.Module]], allocate: Allocate = memory.weight_buffer) -> None:
    """Move the weights of ``groups`` (modules with a ``weight`` and perhaps a ``bias``) into one
    buffer from ``allocate`` (one per dtype and device should they differ), group after
    group, each group's weights as consecutive row blocks; a group whose modules all have a bias
    gets its biases likewise into one small buffer. Every parameter becomes a view of its buffer:
    names, shapes, values and ``requires_grad`` are unchanged, and each old tensor is freed as its
    view replaces it (one layer's copy at a time, not the model's). Meta tensors (a model built to be
    loaded into) have no memory to lay out: they stay as they are."""
    groups = [group for group in groups if not any(m.weight.is_meta for m in group)]
    modules = [m for group in groups for m in group]
    for key in dict.fromkeys((m.weight.dtype, m.weight.device) for m in modules):
        _into_buffer([m for m in modules if (m.weight.dtype, m.weight.device) == key], "weight", allocate)
    for group in groups:
        biases = [getattr(m, "bias", None) for m in group]
        if all(b is not None for b in biases) and len({(b.dtype, b.device) for b in biases}) == 1:
            _into_buffer(group, "bias", memory.ordinary_buffer)


def _into_buffer(modules: Sequence[nn.Module], name: str, allocate: Allocate) -> None:
    """Parameter ``name`` of every module (one dtype and device) as consecutive slices of one new buffer."""
    tensors = [getattr(m, name) for m in modules]
    buffer = allocate(sum(t.numel() for t in tensors), tensors[0].dtype, tensors[0].device)
    start = 0
    for module, t in zip(modules, tensors, strict=True):
        view = buffer[start:start + t.numel()].view(t.shape)
        with torch.no_grad():
            view.copy_(t)
        start += t.numel()
        setattr(module, name, nn.Parameter(view, requires_grad=t.requires_grad))


def grouped(x: Tensor, linears: Sequence[AdaptedLinear]) -> list[Tensor]:
    """``[lin(x) for lin in linears]``, as one op while their parameters are still the adjacent
    views :func:`pack` made (``model.to(dtype)`` or assigning a parameter undoes that: then, and
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
