"""The one owner of a model's adapter state: which adapters are bound to which linears, with which
weights, learned weights, a merged pair, and which pair each batch row uses.

Binding gives every targeted :class:`~modlora.adapted.AdaptedLinear` a ``lora`` callable that calls
:mod:`modlora.ops`, the single place backends plug in. The model itself holds no adapter state:
its state dict stays the base checkpoint's.

Dtypes: a binding casts trainable tensors to the activation dtype on every call (a no-op in fp32,
differentiable otherwise) and casts frozen tensors once, to the base weight's dtype and device,
when they are bound.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..kernels.reference import Adapter, Weight
from ..model import Qwen2ForCausalLM
from ..ops import dual_lora_linear, pairwise_lora_linear
from .format import AdapterError, LearnedWeights, LoraAdapter, layer_of
from .merge import WeightFn, check_roles, check_strategy, export_pair, fixed_weights, fold_into

Pair = tuple[LoraAdapter | None, LoraAdapter | None, Weight, Weight]  # (lora_in, lora_out, w_in, w_out)


def _prepare(t: Tensor, like: Tensor) -> Tensor:
    """Frozen tensors move to the base weight's device/dtype once; trainable ones stay the caller's leaf."""
    if t.requires_grad:
        if t.device != like.device:
            raise AdapterError(f"trainable adapter tensor is on {t.device}, the model on {like.device}")
        return t
    return t.to(like.device, like.dtype)


def _bound(adapter: LoraAdapter | None, name: str, like: Tensor) -> Adapter | None:
    if adapter is None or name not in adapter.tensors:
        return None
    A, B = adapter.tensors[name]
    return _prepare(A, like), _prepare(B, like), adapter.scale


def _cast(adapter: Adapter | None, dtype: torch.dtype) -> Adapter | None:
    if adapter is None or adapter[0].dtype == dtype:
        return adapter
    return adapter[0].to(dtype), adapter[1].to(dtype), adapter[2]


class _PairBinding:
    """One linear, one (in, out) pair: ``ops.dual_lora_linear`` with this layer's weights."""

    def __init__(self, lora_in: Adapter | None, lora_out: Adapter | None, layer: int, weights: WeightFn,
                 strategy: str, dropout: tuple[float, float]) -> None:
        self.lora_in, self.lora_out, self.layer = lora_in, lora_out, layer
        self.weights, self.strategy, self.dropout = weights, strategy, dropout

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        w_in, w_out = self.weights(self.layer)
        return dual_lora_linear(x, weight, bias, _cast(self.lora_in, x.dtype), _cast(self.lora_out, x.dtype),
                                w_in, w_out, self.strategy, self.dropout if training else None)

    def bank_pairs(self, x: Tensor, training: bool) -> tuple[tuple, str, None] | None:
        """This binding as a part of a grouped op (:func:`modlora.adapted.grouped`); None under LoRA dropout."""
        if training and any(self.dropout):
            return None
        pair = (_cast(self.lora_in, x.dtype), _cast(self.lora_out, x.dtype), *self.weights(self.layer))
        return (pair,), self.strategy, None


class _RowsBinding:
    """One linear, one pair per batch row: ``ops.pairwise_lora_linear`` routed by the controller."""

    def __init__(self, pairs: list[tuple[Adapter | None, Adapter | None, WeightFn]], layer: int,
                 controller: AdapterController, strategy: str, dropout: float) -> None:
        self.pairs, self.layer, self.controller = pairs, layer, controller
        self.strategy, self.dropout = strategy, dropout

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        if training and self.dropout:
            raise AdapterError("per-row adapter pairs serve inference and apply no LoRA dropout: call model.eval() "
                               "first (or train with set_adapters)")
        rows = self.controller.row_pair
        if rows is None:
            raise AdapterError("set_adapter_pairs() needs route_rows(row_pair) before the forward")
        if rows.shape[0] != x.shape[0]:
            raise AdapterError(f"route_rows() was given {rows.shape[0]} rows but the batch has {x.shape[0]}; "
                               "before decoding beams call route_rows(row_pair.repeat_interleave(num_beams))")
        return pairwise_lora_linear(x, weight, bias, self._pairs(x), rows, self.strategy)

    def bank_pairs(self, x: Tensor, training: bool) -> tuple[tuple, str, Tensor] | None:
        """This binding as a part of a grouped op (:func:`modlora.adapted.grouped`); None where
        :meth:`__call__` would raise (it then runs alone, and raises)."""
        rows = self.controller.row_pair
        if (training and self.dropout) or rows is None or rows.shape[0] != x.shape[0]:
            return None
        return self._pairs(x), self.strategy, rows

    def _pairs(self, x: Tensor) -> tuple:
        return tuple((_cast(a, x.dtype), _cast(b, x.dtype), *fn(self.layer)) for a, b, fn in self.pairs)


# The base weights a merge replaced, per model whose weights hold a merged pair: the model's state,
# not a controller's, so that no controller binds or merges on top of a merged pair (its unmerge
# would restore weights that already held the first pair) and any controller can unmerge it.
_MERGED: weakref.WeakKeyDictionary[Qwen2ForCausalLM, dict[str, Tensor]] = weakref.WeakKeyDictionary()


class AdapterController:
    """Binds adapters to one model's linears and owns everything that goes with it.

    One controller per model: create it once and use it for every adapter operation on that model
    (a second controller on a model with bound adapters is refused). A merged pair belongs to the
    model: any controller of it can :meth:`unmerge` it, none binds or merges until then.

    Example::

        adapters = AdapterController(model)
        adapters.set_adapters(pool.get("fr", "in"), pool.get("de", "out"), w_in=0.3, w_out=0.7)
    """

    def __init__(self, model: Qwen2ForCausalLM) -> None:
        if any(lin.lora is not None for lin in model.adapted_linears().values()):
            raise AdapterError("this model already has adapters bound by another AdapterController: use that one")
        self.model = model
        self.theta: Tensor | None = None  # [L, 2] while weights are learned
        self._learning: tuple[LoraAdapter, LoraAdapter, str] | None = None
        self.row_pair: Tensor | None = None  # [rows] pair index per batch row

    # -- binding ------------------------------------------------------------------------------

    def set_adapters(self, lora_in: LoraAdapter | None = None, lora_out: LoraAdapter | None = None, *,
                     w_in: Weight = 0.5, w_out: Weight = 0.5, strategy: str = "output") -> None:
        """Apply ``in`` and/or ``out`` merged by ``strategy`` (docs/design.md, eq. 3 and 4).

        One adapter alone costs one adapter. Freezes the base model; the adapters' tensors train if
        they require grad (``LoraAdapter.init`` makes them so).

        Args:
            w_in, w_out: floats, or per-layer tensors [L].

        Raises:
            AdapterError: an adapter that does not fit the model or its slot, a bad weight or
                strategy, or a pair still merged into the base weights.
        """
        self._check_pair(lora_in, lora_out, strategy)
        self._bind_pair(lora_in, lora_out, fixed_weights(w_in, w_out, self._layers, strategy), strategy)

    def clear(self) -> None:
        """Back to the plain base model (still frozen; a merged pair stays merged: see :meth:`unmerge`)."""
        for lin in self.model.adapted_linears().values():
            lin.lora = None
        self.theta = self._learning = self.row_pair = None

    def set_adapter_pairs(self, pairs: Sequence[Pair], strategy: str = "output") -> None:
        """One ``(lora_in, lora_out, w_in, w_out)`` per direction; :meth:`route_rows` then picks each row's pair.

        Generation: call ``route_rows(row_pair)`` (one entry per sentence) before prefill, and
        ``route_rows(row_pair.repeat_interleave(num_beams))`` before decoding beams
        (:func:`modlora.generation.generate` does both).
        """
        fns = []
        for lora_in, lora_out, w_in, w_out in pairs:
            self._check_pair(lora_in, lora_out, strategy)
            fns.append(fixed_weights(w_in, w_out, self._layers, strategy))
        self.clear()
        self.model.requires_grad_(False)
        dropout = max((a.dropout for p in pairs for a in p[:2] if a is not None), default=0.0)
        moved: dict[tuple[int, str], Adapter | None] = {}  # an adapter shared by pairs moves once

        def bound(a: LoraAdapter | None, name: str, like: Tensor) -> Adapter | None:
            if (id(a), name) not in moved:
                moved[id(a), name] = _bound(a, name, like)
            return moved[id(a), name]

        for name, lin in self.model.adapted_linears().items():
            bound_pairs = [(bound(a, name, lin.weight), bound(b, name, lin.weight), fn)
                           for (a, b, *_), fn in zip(pairs, fns, strict=True)]
            if any(a is not None or b is not None for a, b, _ in bound_pairs):
                lin.lora = _RowsBinding(bound_pairs, layer_of(name), self, strategy, dropout)

    def route_rows(self, row_pair: Tensor) -> None:
        """Batch row b uses ``pairs[row_pair[b]]`` of :meth:`set_adapter_pairs` until the next call.

        Raises:
            AdapterError: ``row_pair`` is not a 1-D integer tensor.
        """
        if row_pair.dim() != 1 or row_pair.dtype not in (torch.int32, torch.int64):
            raise AdapterError(f"row_pair must be a 1-D integer tensor, got {row_pair.dtype} {tuple(row_pair.shape)}")
        self.row_pair = row_pair.to(self.model.lm_head.weight.device)

    # -- learned weights (eq. 5) ----------------------------------------------------------------

    def enable_weight_learning(self, lora_in: LoraAdapter, lora_out: LoraAdapter,
                               strategy: str = "output") -> torch.nn.Parameter:
        """Bind the pair with ``(w_in, w_out) = softmax(theta_l)`` per layer.

        The adapters are bound detached (frozen, the caller's tensors untouched).

        Returns:
            theta [L, 2] (init 1.0), the only tensor that requires grad.
        """
        if lora_in is None or lora_out is None:
            raise AdapterError("weight learning needs both lora_in and lora_out")
        self._check_pair(lora_in, lora_out, strategy)
        frozen = [replace(a, tensors={n: (A.detach(), B.detach()) for n, (A, B) in a.tensors.items()})
                  for a in (lora_in, lora_out)]
        theta = torch.nn.Parameter(torch.ones(self._layers, 2, device=self.model.lm_head.weight.device))

        def weights(layer: int) -> tuple[Tensor, Tensor]:
            w = torch.softmax(theta[layer], dim=0)
            return w[0], w[1]

        self._bind_pair(*frozen, weights, strategy)
        self.theta, self._learning = theta, (lora_in, lora_out, strategy)
        return theta

    def learned_weights(self) -> LearnedWeights:
        """The current ``(w_in, w_out) = softmax(theta)`` per layer, with the direction and theta.

        Raises:
            AdapterError: weight learning is not enabled.
        """
        if self.theta is None:
            raise AdapterError("weight learning is not enabled: call enable_weight_learning() first")
        lora_in, lora_out, strategy = self._learning
        theta = self.theta.detach().float().cpu()
        w = torch.softmax(theta, dim=-1)
        return LearnedWeights(w[:, 0], w[:, 1], strategy, lora_in.language, lora_out.language, theta)

    # -- merging into the base weights ------------------------------------------------------------

    def merge(self, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, *, w_in: Weight = 0.5,
              w_out: Weight = 0.5, strategy: str = "output") -> None:
        """Fold the pair into the base weights (``W + B A`` in fp32, cast once); clears any binding.

        A copy of every touched base weight is kept, so :meth:`unmerge` restores it bit for bit.
        """
        self._check_pair(lora_in, lora_out, strategy)
        pair = export_pair(lora_in, lora_out, w_in=w_in, w_out=w_out, strategy=strategy)
        self.clear()
        linears, kept = self.model.adapted_linears(), {}
        for name, (A, B) in pair.tensors.items():
            kept[name] = linears[name].weight.detach().clone()
            fold_into(linears[name].weight, A, B)
        _MERGED[self.model] = kept

    def unmerge(self) -> None:
        """Restore the base weights kept by :meth:`merge` (of this or another controller), exactly."""
        kept = _MERGED.get(self.model)
        if kept is None:
            raise AdapterError("no pair is merged")
        linears = self.model.adapted_linears()
        with torch.no_grad():
            for name, W in kept.items():
                linears[name].weight.copy_(W)
        del _MERGED[self.model]

    # -- internals ----------------------------------------------------------------------------------

    @property
    def _layers(self) -> int:
        return self.model.config.num_hidden_layers

    def _check_pair(self, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, strategy: str) -> None:
        check_roles(lora_in, lora_out)
        check_strategy(strategy, lora_in, lora_out)
        for a in (lora_in, lora_out):
            if a is not None:
                a.check(self.model)
        if self.model in _MERGED:
            raise AdapterError("a pair is merged into the base weights: call unmerge() first")

    def _bind_pair(self, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, weights: WeightFn,
                   strategy: str) -> None:
        self.clear()
        self.model.requires_grad_(False)  # only adapter tensors (or theta) train
        dropout = tuple(a.dropout if a is not None else 0.0 for a in (lora_in, lora_out))
        for name, lin in self.model.adapted_linears().items():
            a, b = _bound(lora_in, name, lin.weight), _bound(lora_out, name, lin.weight)
            if a is not None or b is not None:
                lin.lora = _PairBinding(a, b, layer_of(name), weights, strategy, dropout)
