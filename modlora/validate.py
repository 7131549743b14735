"""Checks on everything that enters from outside: settings (CLI options and TOML keys alike), JSON
files (adapter configs, sidecars, model configs, learned weights), tensors, and paths read from
files. Each check raises :class:`InputError` with a message naming the file, key or option, so the
CLI prints it as one line; nothing is coerced silently (``"4"`` is not 4, ``"false"`` is not False).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # settings become fp32 tensors: beyond this they are inf
INT_MAX = 2**31 - 1  # sizes and counts index tensors (int32 in the kernels)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a language code or split name: one path component
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


class InputError(ValueError):
    """Bad input from a user or a file: the message says where and what."""


def _show(value: object) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str | bool) else repr(value)


@dataclass(frozen=True)
class Rule:
    """What one setting may hold. ``kind`` int, float, bool, str or list; a float accepts ints."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    check: Callable[[Any], str | None] | None = None  # extra check: an error message or None

    def __call__(self, value: object) -> Any:
        """The value, checked (ints given for a float become floats); raises InputError saying why."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InputError(f"must be true or false, got {_show(value)}")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"must be an integer, got {_show(value)}")
            self._range(value, INT_MAX)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(f"must be a number, got {_show(value)}")
            try:
                value = float(value)
            except OverflowError:  # an int beyond float's range
                raise InputError(f"must be at most {FLOAT32_MAX:.4g}, got a {len(str(value))}-digit integer") from None
            if not math.isfinite(value):
                raise InputError(f"must be a finite number, got {value}")
            self._range(value, FLOAT32_MAX)
        elif not isinstance(value, self.kind):
            raise InputError(f"must be a {'string' if self.kind is str else self.kind.__name__}, got {_show(value)}")
        problem = self.check(value) if self.check else None
        if problem:
            raise InputError(problem)
        return value

    def _range(self, value: float, limit: float) -> None:
        low, high = self.low if self.low is not None else -limit, self.high if self.high is not None else limit
        if low <= value <= high and not (self.high_open and value == high) and not (self.low_open and value == low):
            return
        if self.low_open and value <= low:
            raise InputError(f"must be > {low:g}, got {value}")
        if self.high is not None:
            raise InputError(f"must be in [{low:g}, {high:g}{')' if self.high_open else ']'}, got {value}")
        if value > high:
            raise InputError(f"must be at most {limit:.4g}, got {value:.4g}")
        raise InputError(f"must be a positive integer, got {value}" if self.kind is int and low == 1
                         else f"must be >= {low:g}, got {value}")

    def parse(self, text: str) -> Any:
        """A command-line value: parsed as the rule's kind (a list: comma-separated), then checked."""
        if self.kind is list:
            return self([x.strip() for x in text.split(",") if x.strip()])
        if self.kind is bool:
            if text.lower() not in ("true", "false"):
                raise InputError(f"must be true or false, got {text[:40]!r}")
            return text.lower() == "true"
        if self.kind in (int, float):
            try:
                value = self.kind(text)
            except ValueError:
                raise InputError(f"must be {'an integer' if self.kind is int else 'a number'}, got {text[:40]!r}") \
                    from None
            return self(value)
        return self(text)


def _each(rule: Rule, what: str, nonempty: bool = True) -> Callable[[list], str | None]:
    def check(values: list) -> str | None:
        if nonempty and not values:
            return f"must list at least one {what}"
        for v in values:
            try:
                rule(v)
            except InputError as e:
                return f"has {_show(v)}, which {e}"
        if len(set(map(repr, values))) != len(values):
            return f"must not repeat a {what}, got {values}"
        return None
    return check


def _plain(value: str) -> str | None:
    return None if _PLAIN.fullmatch(value) else (f"must be a plain name (letters, digits, '_' and '-'), got "
                                                 f"{value!r}")


def _choice(*allowed: str) -> Callable[[str], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"


def _ratio(pair: object) -> str | None:
    weight = Rule(float, low=0)
    if not isinstance(pair, list) or len(pair) != 2:
        return f"must be a pair [w_in, w_out], got {pair!r}"
    try:
        a, b = weight(pair[0]), weight(pair[1])
    except InputError as e:
        return f"holds {pair!r}, whose weights {e}"
    return None if a + b > 0 else f"has {pair!r}: the two weights must not both be 0"


def _ratios(pairs: list) -> str | None:
    return next((p for p in map(_ratio, pairs) if p), None) if pairs else "must list at least one pair"


def _device(value: str) -> str | None:
    try:
        device = torch.device(value)
    except RuntimeError:
        return f"is not a torch device (cpu, cuda, cuda:1...), got {value!r}"
    if device.type not in ("cpu", "cuda"):
        return f"must be cpu or cuda, got {value!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"is {value!r}, but CUDA is not available here"
    return None


_LANGUAGE_NAME = re.compile(r"[^\W\d_][\w '()-]{0,39}")  # what the prompt says: "Swahili", "Chinese (Simplified)"


def _language_names(names: dict) -> str | None:
    for code, name in names.items():
        if not (isinstance(code, str) and _PLAIN.fullmatch(code)):
            return f"has the code {code!r}: a language code is a plain name (letters, digits, '_' and '-')"
        if not (isinstance(name, str) and _LANGUAGE_NAME.fullmatch(name)):
            return (f"gives {code!r} the name {name!r}: a language's English name, letters, spaces and "
                    "'()- (at most 40)")
    return None


def _non_empty(value: str | list) -> str | None:
    return None if value else "must not be empty"


def _file(value: str) -> str | None:
    return None if os.path.isfile(value) else f"must be an existing file, got {value!r}"


POSITIVE = Rule(int, low=1)
POSITIVE_OPT = Rule(int, low=1, optional=True)
POSITIVE_FLOAT = Rule(float, low=0, low_open=True)
NAME = Rule(str, check=_plain)
NON_EMPTY_LIST = Rule(list, check=_non_empty)
FILE = Rule(str, check=_file)
STRATEGIES = ("output", "ab")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TRAIN = {
    "epochs": POSITIVE, "lr": Rule(float, low=0, low_open=True),
    "batch_size": POSITIVE, "grad_accum": POSITIVE, "warmup_ratio": Rule(float, low=0, high=1),
    "weight_decay": Rule(float, low=0), "max_grad_norm": Rule(float, low=0), "seed": Rule(int, low=0),
    "ce_chunk_tokens": POSITIVE, "share_prefix": Rule(bool), "checkpoint_every": POSITIVE,
    "checkpoint_minutes": POSITIVE_FLOAT, "max_steps": POSITIVE_OPT,
    "activation_checkpointing": Rule(bool),
}
# Every pipeline setting, by TOML section ("" for the top level). The CLI options use the same rules.
SETTINGS: dict[str, dict[str, Rule]] = {
    "": {"out_dir": Rule(str, check=_non_empty)},
    "model": {"path": Rule(str, optional=True), "preset": Rule(str, check=_choice("tiny", "qwen2.5-0.5b")),
              "seed": Rule(int, low=0), "dtype": Rule(str, optional=True,
                                                      check=_choice("float32", "float16", "bfloat16")),
              "device": Rule(str, optional=True, check=_device)},
    "data": {"root": Rule(str, optional=True), "langs": Rule(list, check=_each(NAME, "language")),
             "pivot": NAME, "train_split": NAME, "eval_split": NAME, "train_limit": POSITIVE_OPT,
             "weights_limit": POSITIVE_OPT, "eval_limit": POSITIVE_OPT, "pretrain_limit": POSITIVE_OPT,
             "language_names": Rule(dict, check=_language_names)},
    "lora": {"rank": POSITIVE_OPT,
             "alpha": Rule(float, low=0, low_open=True, optional=True),
             "target_modules": Rule(list, check=_each(Rule(str, check=_choice(*TARGETS)), "module")),
             "dropout": Rule(float, low=0, high=1, high_open=True), "use_rslora": Rule(bool)},
    "pretrain": _TRAIN,
    "train": _TRAIN,
    "weights": _TRAIN,
    "eval": {"num_beams": POSITIVE, "max_new_tokens": POSITIVE, "batch_size": POSITIVE,
             "strategies": Rule(list, check=_each(Rule(str, check=_choice(*STRATEGIES)), "strategy")),
             "ratios": Rule(list, check=_ratios), "learned": Rule(bool), "full": Rule(bool)},
}


def _key(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def check_settings(raw: object, where: str) -> dict:
    """A parsed TOML (or dict) config, every key checked by :data:`SETTINGS`; returns it normalised."""
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: a config must be a table of settings, got {_show(raw)}")
    out: dict = {}
    for name, value in raw.items():
        if name in SETTINGS and name:
            if not isinstance(value, Mapping):
                raise InputError(f"{where}: [{name}] must be a table of settings, got {_show(value)}")
            out[name] = {k: check_setting(name, k, v, where) for k, v in value.items()}
        else:
            out[name] = check_setting("", name, value, where)
    return out


def check_setting(section: str, key: str, value: object, where: str) -> Any:
    rules = SETTINGS[section]
    if key not in rules:
        known = ", ".join(sorted(rules) + ([f"[{s}]" for s in SETTINGS if s] if not section else []))
        raise InputError(f"{where}: unknown key {_key(section, key)} (known: {known})")
    try:
        return rules[key](value)
    except InputError as e:
        raise InputError(f"{where}: {_key(section, key)} {e}") from None


def cli_type(section: str, key: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that checks a command-line value by the rule of TOML key ``[section] key``."""
    import argparse

    def parse(text: str) -> Any:
        try:
            return SETTINGS[section][key].parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def cli_rule(rule: Rule) -> Callable[[str], Any]:
    """An argparse ``type=`` for an option with no TOML key (``--w-in``, ``--threads``)."""
    import argparse

    def parse(text: str) -> Any:
        try:
            return rule.parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


# --------------------------------------------------------------------------------------------
# JSON files


def json_object(raw: object, path: str | os.PathLike) -> dict:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def checked_field(rule: Rule, value: object, name: str) -> Any:
    """``rule(value)``, its error led by ``name`` (an argument, or a key's place in a file)."""
    try:
        return rule(value)
    except InputError as e:
        raise InputError(f"{name} {e}") from None


def _field(raw: dict, key: str, rule: Rule, path: str | os.PathLike, default: object = ...) -> Any:
    if key not in raw or (raw[key] is None and default is not ...):
        if default is ...:
            raise InputError(f"{path}: missing key {key!r}")
        return default
    return checked_field(rule, raw[key], f"{path}: {key}")


def adapter_config(raw: object, path: str | os.PathLike) -> dict:
    """The fields modlora reads from a PEFT ``adapter_config.json``, checked."""
    raw = json_object(raw, path)
    return {"r": _field(raw, "r", POSITIVE, path), "lora_alpha": _field(raw, "lora_alpha", POSITIVE_FLOAT, path),
            "use_rslora": _field(raw, "use_rslora", Rule(bool), path, False),
            "lora_dropout": _field(raw, "lora_dropout", Rule(float, low=0, high=1, high_open=True), path, 0.0)}


def sidecar(raw: object, path: str | os.PathLike) -> dict:
    """modlora's ``modlora.json`` beside an adapter: language, role, base fingerprint, metadata."""
    raw = json_object(raw, path)
    text = Rule(str, optional=True)
    base = _field(raw, "base", Rule(dict, optional=True), path, None)
    if base is not None:
        keys = {"model_type", "hidden_size", "num_hidden_layers"}
        if set(base) != keys:
            raise InputError(f"{path}: base must have exactly the keys {sorted(keys)}, got {sorted(base)}")
        base = {"model_type": _field(base, "model_type", Rule(str), path),
                "hidden_size": _field(base, "hidden_size", POSITIVE, path),
                "num_hidden_layers": _field(base, "num_hidden_layers", POSITIVE, path)}
    return {"language": _field(raw, "language", text, path, None), "role": _field(raw, "role", text, path, None),
            "base": base, "metadata": _field(raw, "metadata", Rule(dict), path, {})}


_MODEL_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings")


def model_config(raw: object, path: str | os.PathLike) -> dict:
    """Type and range checks of the ``config.json`` fields :class:`~modlora.config.Qwen2Config` reads
    (null is no number); the fields absent stay absent (from_dict names the required ones)."""
    raw = json_object(raw, path)
    rules = {**{k: POSITIVE for k in _MODEL_INTS}, "rope_theta": POSITIVE_FLOAT, "rms_norm_eps": POSITIVE_FLOAT,
             "tie_word_embeddings": Rule(bool)}
    for section in ("rope_parameters", "rope_scaling"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise InputError(f"{path}: {section} must be an object, got {_show(raw[section])}")
    if isinstance(raw.get("rope_parameters"), dict) and "rope_theta" in raw["rope_parameters"]:
        _field(raw["rope_parameters"], "rope_theta", POSITIVE_FLOAT, f"{path}: rope_parameters")
    for key in ("dtype", "torch_dtype"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise InputError(f"{path}: {key} must be a string, got {_show(raw[key])}")
    present = [k for k in rules if k in raw and not (k == "rope_theta" and raw[k] is None)]  # from_dict names it
    return {**raw, **{k: _field(raw, k, rules[k], path) for k in present}}


def learned_weights(raw: object, path: str | os.PathLike) -> dict:
    """A ``weights.json`` from learn-weights: equal-length lists of weights in [0, 1] (a softmax's; and
    theta, a finite pair per layer, or null), a known strategy."""
    raw = json_object(raw, path)
    weight, logit = Rule(float, low=0, high=1), Rule(float)
    out = {"strategy": _field(raw, "strategy", Rule(str, check=_choice(*STRATEGIES)), path),
           "src": _field(raw, "src", Rule(str, optional=True), path, None),
           "tgt": _field(raw, "tgt", Rule(str, optional=True), path, None)}
    for key in ("w_in", "w_out"):
        values = _field(raw, key, NON_EMPTY_LIST, path)
        out[key] = [_field({key: v}, key, weight, path) for v in values]
    if len(out["w_in"]) != len(out["w_out"]):
        raise InputError(f"{path}: w_in has {len(out['w_in'])} layers, w_out {len(out['w_out'])}")
    theta = _field(raw, "theta", Rule(list, optional=True), path, None)
    if theta is not None:  # [L, 2], kept to resume
        if len(theta) != len(out["w_in"]) or not all(isinstance(t, list) and len(t) == 2 for t in theta):
            raise InputError(f"{path}: theta must hold one pair per layer ({len(out['w_in'])}), got {theta!r:.80}")
        theta = [[_field({"theta": v}, "theta", logit, path) for v in t] for t in theta]
    return {**out, "theta": theta}


def _direction(d: object, path: str | os.PathLike) -> dict:
    d = json_object(d, path)
    return {"src": _field(d, "src", Rule(str), path), "tgt": _field(d, "tgt", Rule(str), path),
            "score": _field(d, "score", Rule(float, low=0, high=100), path),  # chrF++: a percentage
            "signature": _field(d, "signature", Rule(str), path)}


def _settings(raw: dict, path: str | os.PathLike) -> dict | None:
    return _field(raw, "settings", Rule(dict, optional=True), path, None)


def eval_file(raw: object, path: str | os.PathLike) -> dict:
    """An evaluation file of the pipeline: settings, and per direction src, tgt, a finite score, a signature."""
    raw = json_object(raw, path)
    directions = _field(raw, "directions", NON_EMPTY_LIST, path)
    return {"settings": _settings(raw, path), "directions": [_direction(d, f"{path}: directions") for d in directions]}


def eval_cell(raw: object, path: str | os.PathLike) -> dict:
    """One evaluation cell (a configuration in one direction): settings, src, tgt, score, signature and
    the hypotheses (strings)."""
    raw = json_object(raw, path)
    strings = Rule(list, check=lambda v: None if all(isinstance(h, str) for h in v) else "must hold strings only")
    return {"settings": _settings(raw, path), **_direction(raw, path),
            "hypotheses": _field(raw, "hypotheses", strings, path)}


# --------------------------------------------------------------------------------------------
# Tensors and paths


def check_tensor(name: str, tensor: torch.Tensor, where: str | os.PathLike) -> torch.Tensor:
    """A floating-point tensor with finite values only."""
    if not tensor.is_floating_point():
        raise InputError(f"{where}: tensor {name} has dtype {tensor.dtype}; expected a floating-point dtype")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{where}: tensor {name} holds NaN or infinite values")
    return tensor


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 where: str | os.PathLike, optional: frozenset[str] = frozenset()) -> None:
    """Tensor names and shapes (from safetensors headers) against what the config implies."""
    unexpected = sorted(set(found) - set(expected) - optional)
    if unexpected:
        raise InputError(f"checkpoint {where} has unexpected tensor(s): {', '.join(unexpected[:8])}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise InputError(f"checkpoint {where} is missing tensor(s): {', '.join(missing[:8])}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise InputError(f"checkpoint {where}: tensor {name} has shape {tuple(found[name])}, the config "
                             f"implies {tuple(shape)}")


def inside(folder: str | os.PathLike, name: object, what: str) -> Path:
    """``folder / name`` for a relative ``name`` read from a file, refused unless it stays in ``folder``.

    Compared after normalising ``..`` but without following symlinks: a link placed in the folder by
    its owner (the HF cache links snapshot files to ``../../blobs``) is the owner's choice; a name
    that climbs out of the folder is not.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"{what} must be a file name, got {_show(name)}")
    root = os.path.abspath(folder)
    target = os.path.abspath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, target]) != root or target == root:
        raise InputError(f"{what} {name!r} points outside {folder}")
    return Path(target)


def is_plain_name(value: object) -> bool:
    """Whether ``value`` is a language code or split name (:func:`plain_name` would take it)."""
    return isinstance(value, str) and _PLAIN.fullmatch(value) is not None


def plain_name(value: object, what: str) -> str:
    """A language code or split name used as one path component."""
    try:
        return NAME(value)
    except InputError as e:
        raise InputError(f"{what} {e}") from None


def check_input_lines(lines: list[str], where: str) -> None:
    """Text to translate: a chat special token would end the prompt's turn early (prompt injection)."""
    for number, line in enumerate(lines, 1):
        for token in CHAT_SPECIAL_TOKENS:
            if token in line:
                raise InputError(f"{where} line {number} contains the special token {token}: {line[:80]!r}")


def writable_output(path: str | os.PathLike, what: str) -> Path:
    """Fail before any work if ``path`` (a file to write) cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (path.exists()
                                                                         and not os.access(path, os.W_OK)):
        raise InputError(f"{what} {path} is not writable (permission denied in {parent})")
    return path


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail before any work if files cannot be created in the directory ``path`` (or its first existing parent)."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} is not writable (permission denied in {existing})")
    return path
