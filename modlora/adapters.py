"""Per-language LoRA adapters and how the model applies them (DESIGN.md sections 1 and 3).

- :class:`LoraAdapter`: one adapter (``in[X]`` or ``out[X]``), read and written in PEFT's format
  (``adapter_config.json`` + ``adapter_model.safetensors``); our own metadata (language, role,
  base-model fingerprint, extras such as folded weights) lives in a sidecar ``modlora.json`` that
  PEFT ignores.
- Binding (the model's ``set_adapters`` / ``enable_weight_learning`` / ``set_adapter_pairs``
  delegate here): every targeted :class:`~modlora.adapted.AdaptedLinear` gets a ``lora`` callable
  that calls :mod:`modlora.ops`, the single place fused kernels plug in.
- Merging one fixed pair into the base weights, exporting a pair as one PEFT adapter, and saving
  learned per-layer weights.

Dtypes: adapters made by :meth:`LoraAdapter.init` are fp32 master weights (as PEFT keeps them
under autocast); a binding casts trainable tensors to the activation dtype on every call (a no-op
in fp32, differentiable otherwise) and casts frozen tensors once, to the base weight's dtype and
device, when they are bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from . import validate
from .fileio import atomic_write_json, atomic_write_safetensors, read_json
from .kernels.reference import STRATEGIES, merge_ab
from .ops import dual_lora_linear, pairwise_lora_linear

if TYPE_CHECKING:
    from .model import Qwen2ForCausalLM

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE = "adapter_config.json", "adapter_model.safetensors", "modlora.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the causal LM
ROLES = ("in", "out")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# PEFT config features that change the math or the tensor set: reject rather than silently ignore.
_UNSUPPORTED_CONFIG = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
                       "alpha_pattern": {}, "layers_to_transform": None, "bias": "none"}

Weight = float | Tensor


class AdapterError(ValueError):
    """An adapter, a pair or a pool that does not fit: the message names what and why."""


@dataclass(frozen=True)
class BaseFingerprint:
    """What an adapter needs of its base model to fit it."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int

    @classmethod
    def of(cls, model: Qwen2ForCausalLM) -> BaseFingerprint:
        return cls("qwen2", model.config.hidden_size, model.config.num_hidden_layers)

    def __str__(self) -> str:
        return f"{self.model_type} (hidden_size={self.hidden_size}, num_hidden_layers={self.num_hidden_layers})"


@dataclass
class LoraAdapter:
    """One LoRA adapter: ``tensors[module] = (A [r, in], B [out, r])`` keyed by HF module name."""

    tensors: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    language: str | None = None
    role: str | None = None
    base: BaseFingerprint | None = None
    dropout: float = 0.0  # LoRA dropout on the adapter's input, in training mode only (as PEFT)
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form, kept in modlora.json

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"{self.label}: rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise AdapterError(f"{self.label}: alpha must be a finite number > 0, got {self.alpha!r}")
        if self.role is not None and self.role not in ROLES:
            raise AdapterError(f"adapter role must be one of {ROLES}, got {self.role!r}")
        for name, (A, B) in self.tensors.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != self.rank or B.shape[1] != self.rank:
                raise AdapterError(f"{self.label}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                   f"expected A [{self.rank}, in] and B [out, {self.rank}]")

    @property
    def scale(self) -> float:
        """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def label(self) -> str:
        """How errors name this adapter, e.g. ``in[fr]``."""
        return f"{self.role or 'adapter'}[{self.language or '?'}]"

    def parameters(self) -> list[Tensor]:
        return [t for pair in self.tensors.values() for t in pair]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    @classmethod
    def init(cls, model: Qwen2ForCausalLM, *, rank: int, alpha: float,
             target_modules: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False, dropout: float = 0.0,
             language: str | None = None, role: str | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> LoraAdapter:
        """A new trainable adapter with PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; fp32 by default."""
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {dropout}")
        if rank < 1:
            raise AdapterError(f"rank must be >= 1, got {rank}")
        targets = _check_targets(model, target_modules)
        device = model.lm_head.weight.device
        gen = torch.Generator().manual_seed(seed)  # CPU generator: the same init on every device
        tensors = {}
        for name, lin in model.adapted_linears().items():
            if name.rsplit(".", 1)[-1] in targets:
                A = torch.empty(rank, lin.in_features, dtype=dtype)
                torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
                B = torch.zeros(lin.out_features, rank, dtype=dtype)
                tensors[name] = (A.to(device).requires_grad_(), B.to(device).requires_grad_())
        return cls(tensors, rank, float(alpha), use_rslora, targets, language, role, BaseFingerprint.of(model),
                   float(dropout))

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> LoraAdapter:
        """Read a PEFT LoRA directory (plus our ``modlora.json`` if present); tensors come back frozen."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise AdapterError(f"{path} is not a PEFT adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        cfg = validate.json_object(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
        checked = validate.adapter_config(cfg, path / CONFIG_FILE)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
        for key, default in _UNSUPPORTED_CONFIG.items():
            if cfg.get(key, default) not in (default, None, [], {}):
                raise AdapterError(f"{path}: {key}={cfg[key]!r} is not supported")
        try:
            raw = load_file(str(path / WEIGHTS_FILE), device=str(device))
        except SafetensorError as e:
            raise AdapterError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
        halves: dict[str, dict[str, Tensor]] = {}
        for key, t in raw.items():
            m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
            if m is None:
                raise AdapterError(f"{path / WEIGHTS_FILE}: unexpected tensor {key!r}: expected "
                                   f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
            halves.setdefault(m[1], {})[m[2]] = validate.check_tensor(key, t, path / WEIGHTS_FILE)
        for name, ab in halves.items():
            for half in "AB":
                if half not in ab:
                    raise AdapterError(f"{path / WEIGHTS_FILE}: missing tensor {PEFT_PREFIX}{name}.lora_{half}.weight")
        found = {name.rsplit(".", 1)[-1] for name in halves}
        listed = cfg.get("target_modules")
        if isinstance(listed, list):
            absent = [t for t in listed if t not in found]
            if absent:
                raise AdapterError(f"{path}: {CONFIG_FILE} targets {absent} but {WEIGHTS_FILE} has no tensor for them")
        side = validate.sidecar(read_json(path / SIDECAR_FILE) if (path / SIDECAR_FILE).is_file() else {},
                                path / SIDECAR_FILE)
        return cls({n: (ab["A"], ab["B"]) for n, ab in halves.items()}, checked["r"], checked["lora_alpha"],
                   checked["use_rslora"], _order_targets(found), side["language"], side["role"],
                   BaseFingerprint(**side["base"]) if side["base"] else None, checked["lora_dropout"],
                   side["metadata"])

    def save(self, path: str | Path) -> Path:
        """Write PEFT's format (each file atomically) that ``peft.PeftModel.from_pretrained`` loads."""
        path = Path(path)
        flat = {}
        for name, (A, B) in self.tensors.items():
            flat[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().contiguous().cpu()
            flat[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().contiguous().cpu()
        for key, t in flat.items():  # a NaN adapter is never saved (as finished)
            validate.check_tensor(key, t, self.label)
        atomic_write_safetensors(path / WEIGHTS_FILE, flat, metadata={"format": "pt"})
        atomic_write_json(path / CONFIG_FILE, {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora, "target_modules": list(self.target_modules),
            "lora_dropout": self.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
        })
        atomic_write_json(path / SIDECAR_FILE, {
            "language": self.language, "role": self.role,
            "base": None if self.base is None else vars(self.base), "metadata": self.metadata,
        })
        return path

    def check(self, model: Qwen2ForCausalLM) -> None:
        """Raise :class:`AdapterError` unless this adapter fits ``model`` tensor for tensor."""
        fp = BaseFingerprint.of(model)
        if self.base is not None and self.base != fp:
            raise AdapterError(f"{self.label} was trained for {self.base}, but this model is {fp}")
        linears = model.adapted_linears()
        unknown = sorted(n for n in self.tensors if n not in linears)
        if unknown:
            raise AdapterError(f"{self.label} targets module(s) this model does not have: {unknown[:3]}"
                               f"{' ...' if len(unknown) > 3 else ''}")
        missing = [n for n in linears if n.rsplit(".", 1)[-1] in self.target_modules and n not in self.tensors]
        if missing:
            raise AdapterError(f"{self.label} lacks tensors for {len(missing)} targeted module(s), e.g. {missing[0]}")
        for name, (A, B) in self.tensors.items():
            lin = linears[name]
            if A.shape[1] != lin.in_features or B.shape[0] != lin.out_features:
                raise AdapterError(f"{self.label}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; the model's "
                                   f"linear is [{lin.out_features}, {lin.in_features}]")


def _order_targets(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    return tuple(t for t in DEFAULT_TARGETS if t in names) + tuple(sorted(names - set(DEFAULT_TARGETS)))


def _check_targets(model: Qwen2ForCausalLM, target_modules: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(target_modules) if not isinstance(target_modules, str) else (target_modules,)
    available = _order_targets(n.rsplit(".", 1)[-1] for n in model.adapted_linears())
    unknown = [t for t in targets if t not in available]
    if unknown or not targets:
        raise AdapterError(f"unknown target module(s) {unknown}: this model's adaptable linears are {list(available)}")
    return _order_targets(targets)


def _layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise AdapterError(f"{name} is not inside a decoder layer")
    return int(m[1])


# --- binding ---------------------------------------------------------------------------------------

WeightFn = Callable[[int], tuple[Weight, Weight]]  # layer index -> (w_in, w_out)


@dataclass
class _State:
    """Adapter state kept on the model (a plain attribute: not a module, so the state dict stays HF's)."""

    theta: Tensor | None = None
    learning: tuple[LoraAdapter | None, LoraAdapter | None, str] | None = None
    merged: dict[str, Tensor] | None = None  # kept base weights while a pair is merged
    row_pair: Tensor | None = None


def _state(model: Qwen2ForCausalLM) -> _State:
    if getattr(model, "_adapter_state", None) is None:
        model._adapter_state = _State()
    return model._adapter_state


def _weight_fn(w_in: Weight, w_out: Weight, num_layers: int, strategy: str) -> WeightFn:
    """Fixed weights: floats, or per-layer tensors [L] indexed by layer."""
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


def _check_pair(model: Qwen2ForCausalLM, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None,
                strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    for slot, a in (("in", lora_in), ("out", lora_out)):
        if a is None:
            continue
        if not isinstance(a, LoraAdapter):
            raise AdapterError(f"lora_{slot} must be a LoraAdapter or None, got {type(a).__name__}")
        if a.role not in (None, slot):
            raise AdapterError(f"lora_{slot} was given {a.label}, an {a.role!r} adapter (swapped in and out?)")
        a.check(model)
    if strategy == "ab" and lora_in is not None and lora_out is not None and lora_in.rank != lora_out.rank:
        raise AdapterError(f"strategy 'ab' merges A and B element-wise and needs equal ranks: "
                           f"{lora_in.label} has rank {lora_in.rank}, {lora_out.label} has rank {lora_out.rank}")
    if _state(model).merged is not None:
        raise AdapterError("a pair is merged into the base weights: call unmerge_adapters() first")


def _prepare(t: Tensor, like: Tensor) -> Tensor:
    """Frozen tensors move to the base weight's device/dtype once; trainable ones stay the caller's leaf."""
    if t.requires_grad:
        if t.device != like.device:
            raise AdapterError(f"trainable adapter tensor is on {t.device}, the model on {like.device}")
        return t
    return t.to(like.device, like.dtype)


def _bound(adapter: LoraAdapter | None, name: str, like: Tensor) -> tuple[Tensor, Tensor, float] | None:
    if adapter is None or name not in adapter.tensors:
        return None
    A, B = adapter.tensors[name]
    return _prepare(A, like), _prepare(B, like), adapter.scale


def _cast(adapter: tuple[Tensor, Tensor, float] | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, float] | None:
    if adapter is None or adapter[0].dtype == dtype:
        return adapter
    return adapter[0].to(dtype), adapter[1].to(dtype), adapter[2]


class _PairBinding:
    """One linear, one (in, out) pair: ``ops.dual_lora_linear`` with this layer's weights."""

    def __init__(self, lora_in, lora_out, layer: int, weights: WeightFn, strategy: str,
                 dropout: tuple[float, float]) -> None:
        self.lora_in, self.lora_out, self.layer = lora_in, lora_out, layer
        self.weights, self.strategy, self.dropout = weights, strategy, dropout

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        w_in, w_out = self.weights(self.layer)
        return dual_lora_linear(x, weight, bias, _cast(self.lora_in, x.dtype), _cast(self.lora_out, x.dtype),
                                w_in, w_out, self.strategy, self.dropout if training else None)


class _RowsBinding:
    """One linear, one pair per batch row: ``ops.pairwise_lora_linear`` routed by ``model.route_rows``."""

    def __init__(self, pairs: list, layer: int, state: _State, strategy: str, dropout: float) -> None:
        self.pairs, self.layer, self.state, self.strategy, self.dropout = pairs, layer, state, strategy, dropout

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        if training and self.dropout:
            raise AdapterError("per-row adapter pairs serve inference and apply no LoRA dropout: call model.eval() "
                               "first (or train with set_adapters)")
        rows = self.state.row_pair
        if rows is None:
            raise AdapterError("set_adapter_pairs() needs model.route_rows(row_pair) before the forward")
        if rows.shape[0] != x.shape[0]:
            raise AdapterError(f"route_rows() was given {rows.shape[0]} rows but the batch has {x.shape[0]}; "
                               "before decoding beams call route_rows(row_pair.repeat_interleave(num_beams))")
        pairs = [(_cast(a, x.dtype), _cast(b, x.dtype), *fn(self.layer)) for a, b, fn in self.pairs]
        return pairwise_lora_linear(x, weight, bias, pairs, rows, self.strategy)


def _unbind(model: Qwen2ForCausalLM) -> None:
    for lin in model.adapted_linears().values():
        lin.lora = None
    st = _state(model)
    st.theta = st.learning = st.row_pair = None


def _bind_pair(model: Qwen2ForCausalLM, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None,
               weights: WeightFn, strategy: str) -> None:
    _unbind(model)
    model.requires_grad_(False)  # only adapter tensors (or theta) train
    for name, lin in model.adapted_linears().items():
        a, b = _bound(lora_in, name, lin.weight), _bound(lora_out, name, lin.weight)
        if a is not None or b is not None:
            dropout = tuple(ad.dropout if ad is not None else 0.0 for ad in (lora_in, lora_out))
            lin.lora = _PairBinding(a, b, _layer_of(name), weights, strategy, dropout)


def set_adapters(model: Qwen2ForCausalLM, lora_in: LoraAdapter | None = None, lora_out: LoraAdapter | None = None,
                 *, w_in: Weight = 0.5, w_out: Weight = 0.5, strategy: str = "output") -> None:
    """Apply ``in`` and/or ``out`` (DESIGN.md section 3); one adapter alone costs one adapter.

    ``w_in``/``w_out`` are floats or per-layer tensors [L]. Freezes the base model; the adapters'
    tensors train if they require grad (``LoraAdapter.init`` makes them so).
    """
    _check_pair(model, lora_in, lora_out, strategy)
    _bind_pair(model, lora_in, lora_out, _weight_fn(w_in, w_out, model.config.num_hidden_layers, strategy), strategy)


def clear_adapters(model: Qwen2ForCausalLM) -> None:
    """Back to the plain base model (still frozen; a merged pair stays merged: see :func:`unmerge_adapters`)."""
    _unbind(model)


def enable_weight_learning(model: Qwen2ForCausalLM, lora_in: LoraAdapter, lora_out: LoraAdapter,
                           strategy: str = "output") -> torch.nn.Parameter:
    """Bind the pair with ``(w_in, w_out) = softmax(theta_l)`` per layer; returns theta [L, 2] (init 1.0).

    The adapters are bound detached (frozen, the caller's tensors untouched): theta is the only
    tensor that requires grad.
    """
    if lora_in is None or lora_out is None:
        raise AdapterError("weight learning needs both lora_in and lora_out")
    _check_pair(model, lora_in, lora_out, strategy)
    frozen = [replace(a, tensors={n: (A.detach(), B.detach()) for n, (A, B) in a.tensors.items()})
              for a in (lora_in, lora_out)]
    theta = torch.nn.Parameter(torch.ones(model.config.num_hidden_layers, 2, device=model.lm_head.weight.device))

    def weights(layer: int) -> tuple[Tensor, Tensor]:
        w = torch.softmax(theta[layer], dim=0)
        return w[0], w[1]

    _bind_pair(model, *frozen, weights, strategy)
    st = _state(model)
    st.theta, st.learning = theta, (lora_in, lora_out, strategy)
    return theta


def learned_weights(model: Qwen2ForCausalLM) -> list[tuple[float, float]]:
    """``(w_in, w_out)`` per layer from the current theta."""
    theta = _state(model).theta
    if theta is None:
        raise AdapterError("weight learning is not enabled: call enable_weight_learning() first")
    return [tuple(w) for w in torch.softmax(theta.detach().float(), dim=-1).tolist()]


@dataclass(frozen=True)
class LearnedWeights:
    """Per-layer weights of one direction, as saved by :func:`save_learned_weights`."""

    w_in: Tensor  # [L]
    w_out: Tensor  # [L]
    strategy: str
    src: str | None = None
    tgt: str | None = None


def save_learned_weights(model: Qwen2ForCausalLM, path: str | Path) -> Path:
    """Write the direction's learned weights (and theta, to resume) as JSON."""
    weights = learned_weights(model)
    lora_in, lora_out, strategy = _state(model).learning
    return atomic_write_json(path, {
        "src": lora_in.language, "tgt": lora_out.language, "strategy": strategy,
        "w_in": [w[0] for w in weights], "w_out": [w[1] for w in weights],
        "theta": _state(model).theta.detach().float().tolist(),
    })


def load_learned_weights(path: str | Path) -> LearnedWeights:
    """Read :func:`save_learned_weights`' JSON; ``w_in``/``w_out`` plug into ``set_adapters`` or ``export_pair``."""
    raw = validate.learned_weights(read_json(path), path)
    return LearnedWeights(torch.tensor(raw["w_in"]), torch.tensor(raw["w_out"]), raw["strategy"],
                          raw["src"], raw["tgt"])


def set_adapter_pairs(model: Qwen2ForCausalLM,
                      pairs: Sequence[tuple[LoraAdapter | None, LoraAdapter | None, Weight, Weight]],
                      strategy: str = "output") -> None:
    """One (in, out, w_in, w_out) per direction; :func:`route_rows` then picks each batch row's pair.

    Generation: call ``route_rows(row_pair)`` (one entry per sentence) before prefill, and
    ``route_rows(row_pair.repeat_interleave(num_beams))`` before decoding beams.
    """
    num_layers = model.config.num_hidden_layers
    fns = []
    for lora_in, lora_out, w_in, w_out in pairs:
        _check_pair(model, lora_in, lora_out, strategy)
        fns.append(_weight_fn(w_in, w_out, num_layers, strategy))
    _unbind(model)
    model.requires_grad_(False)
    st = _state(model)
    dropout = max((a.dropout for p in pairs for a in p[:2] if a is not None), default=0.0)
    moved: dict[tuple[int, str], tuple[Tensor, Tensor, float] | None] = {}  # an adapter shared by pairs moves once

    def bound(a: LoraAdapter | None, name: str, like: Tensor) -> tuple[Tensor, Tensor, float] | None:
        if (id(a), name) not in moved:
            moved[id(a), name] = _bound(a, name, like)
        return moved[id(a), name]

    for name, lin in model.adapted_linears().items():
        bound_pairs = [(bound(a, name, lin.weight), bound(b, name, lin.weight), fn)
                       for (a, b, *_), fn in zip(pairs, fns, strict=True)]
        if any(a is not None or b is not None for a, b, _ in bound_pairs):
            lin.lora = _RowsBinding(bound_pairs, _layer_of(name), st, strategy, dropout)


def route_rows(model: Qwen2ForCausalLM, row_pair: Tensor) -> None:
    """Batch row b uses ``pairs[row_pair[b]]`` of :func:`set_adapter_pairs` until the next call."""
    if row_pair.dim() != 1 or row_pair.dtype not in (torch.int32, torch.int64):
        raise AdapterError(f"row_pair must be a 1-D integer tensor, got {row_pair.dtype} {tuple(row_pair.shape)}")
    _state(model).row_pair = row_pair.to(model.lm_head.weight.device)


# --- export and merge ------------------------------------------------------------------------------

def export_pair(lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, *, w_in: Weight = 0.5,
                w_out: Weight = 0.5, strategy: str = "output") -> LoraAdapter:
    """The pair as ONE fp32 adapter of scale 1 that plain PEFT (or vLLM) serves.

    ``output``: rank r_in + r_out, ``A = [w_in s_in A_in; w_out s_out A_out]``, ``B = [B_in | B_out]``
    (PEFT's ``cat``). ``ab``: rank r, ``(A_m, B_m)`` (PEFT's ``linear``). Per-layer weights [L]
    are folded layer by layer.
    """
    parts = [a for a in (lora_in, lora_out) if a is not None]
    if not parts:
        raise AdapterError("export_pair needs at least one adapter")
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "ab" and len(parts) == 2 and parts[0].rank != parts[1].rank:
        raise AdapterError(f"strategy 'ab' needs equal ranks: {parts[0].label} has rank {parts[0].rank}, "
                           f"{parts[1].label} has rank {parts[1].rank}")
    if len(parts) == 2 and set(parts[0].tensors) != set(parts[1].tensors):
        raise AdapterError(f"export_pair needs both adapters on the same modules: {parts[0].label} targets "
                           f"{parts[0].target_modules}, {parts[1].label} targets {parts[1].target_modules}")
    base = parts[0].base
    weights = _weight_fn(w_in, w_out, base.num_hidden_layers if base else 1 + max(map(_layer_of, parts[0].tensors)),
                         strategy)
    tensors = {}
    for name in parts[0].tensors:
        ws = weights(_layer_of(name))
        fp32 = [None if a is None else (a.tensors[name][0].detach().float(), a.tensors[name][1].detach().float(),
                                        a.scale) for a in (lora_in, lora_out)]
        if strategy == "ab":
            A, B = merge_ab(fp32[0], fp32[1], *ws)
        else:
            A = torch.cat([f[0] * (float(w) * f[2]) for f, w in zip(fp32, ws, strict=True) if f is not None])
            B = torch.cat([f[1] for f in fp32 if f is not None], dim=1)
        tensors[name] = (A, B)
    rank = next(iter(tensors.values()))[0].shape[0]
    fold = [w.tolist() if isinstance(w, Tensor) else float(w) for w in (w_in, w_out)]
    meta = {"pair": {"in": lora_in and lora_in.language, "out": lora_out and lora_out.language,
                     "strategy": strategy, "w_in": fold[0], "w_out": fold[1]}}
    return LoraAdapter(tensors, rank, float(rank), False, parts[0].target_modules, base=base, metadata=meta)


def merge_adapters(model: Qwen2ForCausalLM, lora_in: LoraAdapter | None, lora_out: LoraAdapter | None, *,
                   w_in: Weight = 0.5, w_out: Weight = 0.5, strategy: str = "output") -> None:
    """Fold the pair into the base weights (``W + B A`` in fp32, cast once); clears any binding.

    A copy of every touched base weight is kept, so :func:`unmerge_adapters` restores it bit for bit.
    """
    _check_pair(model, lora_in, lora_out, strategy)
    pair = export_pair(lora_in, lora_out, w_in=w_in, w_out=w_out, strategy=strategy)
    _unbind(model)
    linears, kept = model.adapted_linears(), {}
    with torch.no_grad():
        for name, (A, B) in pair.tensors.items():
            W = linears[name].weight
            kept[name] = W.detach().clone()
            W.copy_((W.float() + B.to(W.device) @ A.to(W.device)).to(W.dtype))
    _state(model).merged = kept


def unmerge_adapters(model: Qwen2ForCausalLM) -> None:
    """Restore the base weights kept by :func:`merge_adapters`, exactly."""
    st = _state(model)
    if st.merged is None:
        raise AdapterError("no pair is merged")
    linears = model.adapted_linears()
    with torch.no_grad():
        for name, W in st.merged.items():
            linears[name].weight.copy_(W)
    st.merged = None
