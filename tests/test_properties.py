"""Property tests: mutated adapter configs, model configs, TOML configs and safetensors headers
(types, signs, sizes, NaN/inf, missing and extra keys, truncation) end in success or in one line
``modlora: error: ...`` with exit status 2: never a traceback, never a hang, never a NaN translation."""

import json
import math
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import FINISHED, SMALL, finished_run

from modlora.adapters import LoraAdapter
from modlora.cli import main
from modlora.loading import random_model, save_pretrained
from modlora.pipeline import DEMO
from modlora.validate import SETTINGS

pytestmark = pytest.mark.usefixtures("one_thread")

# Deterministic (the same examples on every run and machine), bounded: about 1 s per 4 examples.
BOUNDED = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECONDS_PER_CASE = 60  # far above the slowest legal case: hitting it means a hang

NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 16, 2**31, 2**63 - 1, -(2**63), 10**30, 0.5, -0.5, 1e-300, 1e300,
                           4.7, math.nan, math.inf, -math.inf])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)  # lone surrogates: not even TOML
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.integers(), st.floats(),
                    st.sampled_from(["", "4", "false", "true", "NaN", "../x", "/etc/passwd", "qwen2", "float32"]),
                    TEXT)
VALUES = st.one_of(SCALARS, st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                                         | st.dictionaries(TEXT, inner, max_size=3), max_leaves=5))
CUT = st.one_of(st.none(), st.none(), st.none(), st.floats(0, 1))  # truncation, in about a quarter of the cases


def mutations(keys: list[str]):
    """Edits of a JSON object: set a key (known or new) to any value, or drop a key."""
    return st.lists(st.one_of(st.tuples(st.just("set"), st.sampled_from(keys), VALUES),
                              st.tuples(st.just("set"), TEXT, VALUES),
                              st.tuples(st.just("drop"), st.sampled_from(keys), st.none())), min_size=1, max_size=3)


def mutate(raw: dict, edits, cut: float | None) -> str:
    raw = dict(raw)
    for op, key, value in edits:
        if op == "set":
            raw[key] = value
        else:
            raw.pop(key, None)
    text = json.dumps(raw)
    return text if cut is None else text[:int(cut * len(text))]


@contextmanager
def bounded_time(seconds: int):
    def hang(*_):
        raise TimeoutError(f"a case ran over {seconds} s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(argv: list, capsys) -> None:
    """Success (one translated line, or a table) or exit 2 with one error line; nothing else."""
    with bounded_time(SECONDS_PER_CASE):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc in (0, 2), cap.err
    assert "Traceback" not in cap.err
    if rc == 2:
        assert [line for line in err if line.startswith("modlora: error: ")] == err[-1:], err
    elif argv[0] == "translate":
        assert len(cap.out.splitlines()) == 1 and "nan" not in cap.out.lower(), cap.out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    model = random_model(SMALL, seed=0)
    save_pretrained(model, root / "model")
    adapter = LoraAdapter.init(model, rank=2, alpha=4, language="fr", role="in", seed=1)
    with torch.no_grad():
        for _, B in adapter.tensors.values():
            B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    adapter.save(root / "pool" / "fr" / "in")
    (root / "in.txt").write_text("Bonjour.\n")
    finished_run(root / "run", TOML_BASE)
    return root


@pytest.fixture
def work(base, tmp_path):
    """A fresh copy per test; each example rewrites the files it mutates, so examples do not interact."""
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    return tmp_path


def translate(root: Path) -> list:
    return ["translate", "--src", "fr", "--tgt", "de", "--use", "in", "--model", root / "model", "--pool",
            root / "pool", "--input", root / "in.txt", "--num-beams", "1", "--max-new-tokens", "2"]


ADAPTER_KEYS = ["r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "peft_type", "bias",
                "use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "layers_to_transform"]


@BOUNDED
@given(edits=mutations(ADAPTER_KEYS), cut=CUT)
def test_mutated_adapter_config(base, work, capsys, edits, cut):
    path = work / "pool" / "fr" / "in" / "adapter_config.json"
    path.write_text(mutate(json.loads((base / "pool" / "fr" / "in" / "adapter_config.json").read_text()), edits,
                           cut))
    outcome(translate(work), capsys)


MODEL_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
              "torch_dtype", "model_type", "rope_scaling", "hidden_act", "use_sliding_window"]


@BOUNDED
@given(edits=mutations(MODEL_KEYS), cut=CUT)
def test_mutated_model_config(base, work, capsys, edits, cut):
    raw = json.loads((base / "model" / "config.json").read_text())
    (work / "model" / "config.json").write_text(mutate(raw, edits, cut))
    outcome(translate(work), capsys)


def _toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped, the rest as is."""
    body = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in text)
    return f'"{body}"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    return _toml_string(value)


def to_toml(raw: dict) -> str:
    """A TOML document of ``raw`` (None is left out, at any depth: TOML has no null)."""
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    lines = [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in raw.items() if k not in tables and v is not None]
    for name, table in tables.items():
        lines.append(f"[{_toml_string(name)}]")
        lines += [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


SECTIONS = [s for s in SETTINGS if s]
TOML_EDITS = st.lists(st.one_of(
    st.sampled_from(SECTIONS).flatmap(lambda s: st.tuples(st.just(s), st.sampled_from(sorted(SETTINGS[s])), VALUES)),
    st.tuples(st.sampled_from(SECTIONS), TEXT, VALUES),
    st.tuples(st.just(""), st.sampled_from(SECTIONS + ["out_dir"]) | TEXT, VALUES),
), min_size=1, max_size=3)


TOML_BASE = {**DEMO, **FINISHED}  # the demo, on a finished run: legal edits print its table


@BOUNDED
@given(edits=TOML_EDITS, cut=CUT)
def test_mutated_toml(work, capsys, edits, cut):
    raw = json.loads(json.dumps(TOML_BASE))
    for section, key, value in edits:
        if section and isinstance(raw.get(section), dict):
            raw[section][key] = value
        else:
            raw[key] = value
    text = to_toml(raw)
    (work / "c.toml").write_text(text if cut is None else text[:int(cut * len(text))])
    outcome(["table", "--config", work / "c.toml", "--out", work / "run"], capsys)


# Header edits: same-size dtypes and numel-preserving shapes keep the file readable, so they reach
# modlora's own checks; other values exercise safetensors' header validation.
HEADER_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["I32", "U32", "F32", "F16", "BF16", "F64", "I8", "BOOL", "X"])),
    st.tuples(st.just("shape"), st.sampled_from(["reverse", "flatten", "scale"])),
    st.tuples(st.sampled_from(["shape", "data_offsets", "dtype"]) | TEXT, VALUES | st.lists(st.integers(-2, 2**40),
                                                                                          max_size=4)))


def _edit_entry(entry: dict, field: str, value) -> None:
    shape = entry["shape"]
    if field == "shape" and value == "reverse":
        entry["shape"] = shape[::-1]
    elif field == "shape" and value == "flatten":
        entry["shape"] = [math.prod(shape)]
    elif field == "shape" and value == "scale":
        entry["shape"] = [shape[0] * 2, *shape[1:]]
    else:
        entry[field] = value


@BOUNDED
@given(target=st.sampled_from(["pool/fr/in/adapter_model.safetensors", "model/model.safetensors"]),
       edits=st.lists(st.tuples(st.integers(0, 1000), HEADER_EDITS), min_size=1, max_size=2),
       length=st.one_of(st.none(), st.none(), st.none(), st.integers(-8, 2**64 - 1)), cut=CUT)
def test_mutated_safetensors_header(base, work, capsys, target, edits, length, cut):
    data = (base / target).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    for index, (field, value) in edits:
        _edit_entry(header[names[index % len(names)]], field, value)
    raw = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(raw) if length is None else length % 2**64)
    out = prefix + raw + body
    (work / target).write_bytes(out if cut is None else out[:int(cut * len(out))])
    outcome(translate(work), capsys)
