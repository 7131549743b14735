"""One LoRA adapter in PEFT's file format, and the learned per-layer weights of a direction.

- :class:`LoraAdapter`: one adapter (``in[X]`` or ``out[X]``), read and written in PEFT's format
  (``adapter_config.json`` + ``adapter_model.safetensors``); our own metadata (language, role,
  base-model fingerprint, extras such as folded weights) lives in a sidecar ``modlora.json`` that
  PEFT ignores.
- :class:`LearnedWeights`: ``(w_in, w_out)`` per layer of one direction, as JSON.

Adapters made by :meth:`LoraAdapter.init` are fp32 master weights (as PEFT keeps them under autocast).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .. import validate
from ..fileio import atomic_write_dir, atomic_write_json, atomic_write_safetensors, read_json
from ..model import Qwen2ForCausalLM

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE = "adapter_config.json", "adapter_model.safetensors", "modlora.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the causal LM
ROLES = ("in", "out")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# The PEFT config keys that may hold any value: what modlora reads, bookkeeping, and the settings of
# features that are off unless another key turns them on. Any other key (DoRA, rank patterns, aLoRA,
# one a later PEFT adds) must be off: null, false, empty, or ``bias = "none"``; it is refused, not
# ignored, as it may change the math or the tensor set.
_FREE_CONFIG = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                          "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora",
                          "target_modules", "layers_pattern", "megatron_core", "qalora_group_size", "loftq_config",
                          "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying"})
# Inits that leave the base weights as they are (PiSSA, OLoRA, LoftQ, CorDA change them: their
# adapters fit only the changed base, unless PEFT converted them to a plain LoRA on save).
_PLAIN_INITS = (True, False, "gaussian")


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
    target_modules: tuple[str, ...] = TARGET_MODULES
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
        if not self.tensors:
            raise AdapterError(f"{self.label} has no LoRA tensors (an adapter of no module changes nothing)")
        for name, (A, B) in self.tensors.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != self.rank or B.shape[1] != self.rank:
                raise AdapterError(f"{self.label}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                   f"expected A [{self.rank}, in] and B [out, {self.rank}]")
            if self.base is not None and layer_of(name) >= self.base.num_hidden_layers:
                raise AdapterError(f"{self.label}: {name} lies past the {self.base.num_hidden_layers} layers of "
                                   f"its base, {self.base}")

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
             target_modules: Iterable[str] = TARGET_MODULES, use_rslora: bool = False, dropout: float = 0.0,
             language: str | None = None, role: str | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> LoraAdapter:
        """A new trainable adapter with PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; fp32 by default.

        Args:
            target_modules: short names of the linears to adapt (default: all seven of a decoder layer).
            seed: seeds a CPU generator, so the init is the same on every device.

        Raises:
            AdapterError: a dropout outside [0, 1), a rank below 1, or an unknown target module.
        """
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
        """Read a PEFT LoRA directory (plus our ``modlora.json`` if present); tensors come back frozen.

        Raises:
            AdapterError: not an adapter directory, a PEFT feature modlora does not implement (DoRA,
                rank patterns, ...), an unreadable weights file, or tensors missing or unexpected.
        """
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise AdapterError(f"{path} is not a PEFT adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        cfg = validate.json_object(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
        checked = validate.adapter_config(cfg, path / CONFIG_FILE)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
        _check_features(cfg, path)
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
        if not halves:
            raise AdapterError(f"{path / WEIGHTS_FILE} holds no LoRA tensors")
        for name, ab in halves.items():
            for half in "AB":
                if half not in ab:
                    raise AdapterError(f"{path / WEIGHTS_FILE}: missing tensor {PEFT_PREFIX}{name}.lora_{half}.weight")
        found = {name.rsplit(".", 1)[-1] for name in halves}
        _check_targeted(cfg.get("target_modules"), halves, found, path)
        side = validate.sidecar(read_json(path / SIDECAR_FILE) if (path / SIDECAR_FILE).is_file() else {},
                                path / SIDECAR_FILE)
        return cls({n: (ab["A"], ab["B"]) for n, ab in halves.items()}, checked["r"], checked["lora_alpha"],
                   checked["use_rslora"], order_targets(found), side["language"], side["role"],
                   BaseFingerprint(**side["base"]) if side["base"] else None, checked["lora_dropout"],
                   side["metadata"])

    def save(self, path: str | Path) -> Path:
        """Write PEFT's format that ``peft.PeftModel.from_pretrained`` loads, the folder atomically
        (:func:`modlora.fileio.atomic_write_dir`: staged, then renamed into place with the config
        last, so a save that fails while writing leaves the adapter that was there).

        Returns:
            ``path``.
        """
        flat = {}
        for name, (A, B) in self.tensors.items():
            flat[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().contiguous().cpu()
            flat[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().contiguous().cpu()
        for key, t in flat.items():  # a NaN adapter is never saved (as finished)
            validate.check_tensor(key, t, self.label)

        def write(folder: Path) -> None:  # the config last: a pool counts a folder with it as an adapter
            atomic_write_safetensors(folder / WEIGHTS_FILE, flat, metadata={"format": "pt"})
            atomic_write_json(folder / SIDECAR_FILE, {
                "language": self.language, "role": self.role,
                "base": None if self.base is None else vars(self.base), "metadata": self.metadata,
            })
            atomic_write_json(folder / CONFIG_FILE, {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "target_modules": list(self.target_modules),
                "lora_dropout": self.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
            })

        return atomic_write_dir(path, write, last=(CONFIG_FILE,))

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


def _check_features(cfg: dict, path: Path) -> None:
    """Refuse a PEFT feature modlora does not implement (see :data:`_FREE_CONFIG`)."""
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise AdapterError(f"{path}: init_lora_weights={cfg['init_lora_weights']!r} changes the base weights; "
                           f"modlora serves adapters of an unchanged base (PEFT converts such an adapter to a "
                           f"plain LoRA when saved with path_initial_model_for_weight_conversion)")
    for key, value in cfg.items():
        if key not in _FREE_CONFIG and key != "init_lora_weights" and value not in (None, False, [], {}) \
                and not (key == "bias" and value == "none"):
            raise AdapterError(f"{path}: {key}={value!r} is a PEFT feature modlora does not implement")


def _check_targeted(listed: object, halves: dict, found: set[str], path: Path) -> None:
    """The config's ``target_modules`` and the file's tensors name the same modules: PEFT loads only
    the targeted ones (a list of names, or a regex over the full module name)."""
    if isinstance(listed, list):
        untargeted = sorted(found - set(listed))
        absent = [t for t in listed if t not in found]
    elif isinstance(listed, str) and listed != "all-linear":
        try:
            pattern = re.compile(listed)
        except re.error as e:
            raise AdapterError(f"{path}: target_modules {listed!r} is not a regular expression: {e}") from None
        untargeted, absent = sorted(n for n in halves if pattern.fullmatch(n) is None), []
    else:
        return
    if absent:
        raise AdapterError(f"{path}: {CONFIG_FILE} targets {absent} but {WEIGHTS_FILE} has no tensor for them")
    if untargeted:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} has tensors for {untargeted[:3]}, which {CONFIG_FILE}'s "
                           f"target_modules {listed!r} does not target (PEFT would ignore them)")


def order_targets(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    return tuple(t for t in TARGET_MODULES if t in names) + tuple(sorted(names - set(TARGET_MODULES)))


def _check_targets(model: Qwen2ForCausalLM, target_modules: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(target_modules) if not isinstance(target_modules, str) else (target_modules,)
    available = order_targets(n.rsplit(".", 1)[-1] for n in model.adapted_linears())
    unknown = [t for t in targets if t not in available]
    if unknown or not targets:
        raise AdapterError(f"unknown target module(s) {unknown}: this model's adaptable linears are {list(available)}")
    return order_targets(targets)


def layer_of(name: str) -> int:
    """The decoder layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER.search(name)
    if m is None:
        raise AdapterError(f"{name} is not inside a decoder layer")
    return int(m[1])


@dataclass(frozen=True)
class LearnedWeights:
    """Per-layer weights of one direction: ``(w_in, w_out) = softmax(theta)`` per layer."""

    w_in: Tensor  # [L]
    w_out: Tensor  # [L]
    strategy: str
    src: str | None = None
    tgt: str | None = None
    theta: Tensor | None = None  # [L, 2], kept to resume

    def pairs(self) -> list[tuple[float, float]]:
        """``[(w_in, w_out)]`` per layer as floats."""
        return list(zip(self.w_in.tolist(), self.w_out.tolist(), strict=True))

    def save(self, path: str | Path) -> Path:
        """Write the weights as JSON (atomically); :meth:`load` reads them back."""
        return atomic_write_json(path, {
            "src": self.src, "tgt": self.tgt, "strategy": self.strategy,
            "w_in": self.w_in.tolist(), "w_out": self.w_out.tolist(),
            "theta": None if self.theta is None else self.theta.tolist(),
        })

    @classmethod
    def load(cls, path: str | Path, src: str | None = None, tgt: str | None = None,
             strategy: str | None = None, num_layers: int | None = None) -> LearnedWeights:
        """Read :meth:`save`'s JSON; ``w_in``/``w_out`` plug into ``set_adapters`` or ``export_pair``.
        Weights learned for another direction or strategy, or of another number of layers, than
        those given are an error that names the file."""
        raw = validate.learned_weights(read_json(path), path)
        theta = raw["theta"]
        w = cls(torch.tensor(raw["w_in"]), torch.tensor(raw["w_out"]), raw["strategy"], raw["src"], raw["tgt"],
                None if theta is None else torch.tensor(theta))
        asked = {"src": src, "tgt": tgt, "strategy": strategy}  # None: not asked (or not stored): any
        if any(value is not None and getattr(w, key) not in (None, value) for key, value in asked.items()):
            raise validate.InputError(f"{path} holds weights learned for {w.src}->{w.tgt} with strategy "
                                      f"{w.strategy!r}, not {src}->{tgt} with {strategy!r}")
        if num_layers is not None and len(w.w_in) != num_layers:
            raise validate.InputError(f"{path} holds weights of {len(w.w_in)} layers, the model has {num_layers}")
        return w
