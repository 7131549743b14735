"""A catalogue of broken and hostile inputs: each ends in one line ``modlora: error: ...`` and exit
status 2 (or succeeds where the input is legal); nothing is unpickled, nothing outside the given
folders is read, no NaN gets through, no size is trusted before it is checked."""

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modlora import checkpoint, validate
from modlora.adapters import AdapterController, LoraAdapter
from modlora.cli import main
from modlora.config import Qwen2Config
from modlora.fileio import atomic_write
from modlora.loading import random_model, save_pretrained
from modlora.pipeline import Pipeline, PipelineConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# The real vocabulary (the real tokenizer's ids must fit), a body small enough to load in milliseconds.
SMALL = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=512,
                    tie_word_embeddings=True)


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def assert_error(result, *fragments: str) -> None:
    """Exit 2; the last stderr line, and the only error line, is ``modlora: error: ...`` naming the problem."""
    rc, _, err = result
    assert rc == 2, err
    assert not any("Traceback" in line for line in err), err
    assert [line for line in err if line.startswith("modlora: error: ")] == err[-1:], err
    for fragment in fragments:
        assert str(fragment) in err[-1], err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A saved small model and a pool with in[fr] and out[de] for it."""
    root = tmp_path_factory.mktemp("made")
    model = random_model(SMALL, seed=0)
    save_pretrained(model, root / "model")
    for lang, role, seed in (("fr", "in", 1), ("de", "out", 2)):
        adapter = LoraAdapter.init(model, rank=2, alpha=4, language=lang, role=role, seed=seed)
        with torch.no_grad():
            for _, B in adapter.tensors.values():
                B.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
        adapter.save(root / "pool" / lang / role)
    (root / "in.txt").write_text("Bonjour.\n")
    return root


@pytest.fixture
def copy(made, tmp_path):
    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    return tmp_path


def translate(root: Path, *extra) -> list:
    return ["translate", "--src", "fr", "--tgt", "de", "--model", root / "model", "--pool", root / "pool",
            "--input", root / "in.txt", "--num-beams", "1", "--max-new-tokens", "2", *extra]


def _edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    raw = edit(raw)
    path.write_text(json.dumps(raw))


def _set(key, value):
    return lambda raw: {**raw, key: value}


def _drop(key):
    return lambda raw: {k: v for k, v in raw.items() if k != key}


# --------------------------------------------------------------------------------------------
# Adapters


ADAPTER_CONFIGS = [
    (_set("lora_alpha", float("nan")), "lora_alpha must be a finite number, got nan"),
    (_set("lora_alpha", float("inf")), "lora_alpha must be a finite number"),
    (_set("lora_alpha", 1e300), "lora_alpha must be at most 3.403e+38"),
    (_set("lora_alpha", 0), "lora_alpha must be > 0"),
    (_set("lora_alpha", -4), "lora_alpha must be > 0, got -4.0"),
    (_set("lora_alpha", "4"), "lora_alpha must be a number, got '4' (str)"),
    (_set("lora_alpha", True), "lora_alpha must be a number, got True (bool)"),
    (_set("r", 4.7), "r must be an integer, got 4.7"),
    (_set("r", "2"), "r must be an integer, got '2' (str)"),
    (_set("r", 0), "r must be a positive integer, got 0"),
    (_set("r", 2**40), "r must be at most"),
    (_set("r", 3), "expected A [3, in]"),
    (_set("use_rslora", "false"), "use_rslora must be true or false, got 'false' (str)"),
    (_set("use_rslora", 1), "use_rslora must be true or false"),
    (_set("lora_dropout", 1.0), "lora_dropout must be in [0, 1), got 1.0"),
    (_set("lora_dropout", -0.1), "lora_dropout must be in [0, 1)"),
    (_set("use_dora", True), "use_dora=True is a PEFT feature modlora does not implement"),
    (_set("alora_invocation_tokens", [5, 6]), "alora_invocation_tokens=[5, 6] is a PEFT feature"),
    (_set("bias", "all"), "bias='all' is a PEFT feature"),
    (_set("some_new_peft_field", {"x": 1}), "some_new_peft_field={'x': 1} is a PEFT feature modlora does not"),
    (_set("init_lora_weights", "pissa"), "init_lora_weights='pissa' changes the base weights"),
    (_set("target_modules", ["q_proj"]), "has tensors for ['down_proj', 'gate_proj', 'k_proj'], which adapter_con"),
    (_set("target_modules", r".*\.q_proj"), "has tensors for ['model.layers.0.mlp.down_proj'"),
    (_set("target_modules", "(q_proj"), "target_modules '(q_proj' is not a regular expression"),
    (_set("peft_type", "IA3"), "peft_type 'IA3' is not LORA"),
    (_drop("r"), "adapter_config.json: missing key 'r'"),
    (_drop("lora_alpha"), "missing key 'lora_alpha'"),
    (lambda raw: [raw], "adapter_config.json: expected a JSON object, got list"),
    (lambda raw: None, "expected a JSON object, got NoneType"),
]
LEGAL_ADAPTER_CONFIGS = [_set("lora_alpha", 8), _set("use_rslora", True), _set("lora_dropout", 0.5),
                         _set("some_new_peft_field", None), _set("init_lora_weights", "gaussian"),
                         _set("target_modules", r".*\.(q|k|v|o|gate|up|down)_proj"),
                         _set("target_modules", "all-linear"),
                         _drop("use_rslora")]


@pytest.mark.parametrize("edit,message", ADAPTER_CONFIGS)
def test_adapter_config(copy, capsys, edit, message):
    _edit_json(copy / "pool" / "fr" / "in" / "adapter_config.json", edit)
    assert_error(run(translate(copy), capsys), message)


@pytest.mark.parametrize("edit", LEGAL_ADAPTER_CONFIGS)
def test_legal_adapter_config(copy, capsys, edit):
    _edit_json(copy / "pool" / "fr" / "in" / "adapter_config.json", edit)
    rc, out, err = run(translate(copy), capsys)
    assert rc == 0 and len(out.splitlines()) == 1, err


def test_adapter_config_that_is_not_json_names_the_file(copy, capsys):
    (copy / "pool" / "fr" / "in" / "adapter_config.json").write_text('{"r": 2, "lora_al')
    assert_error(run(translate(copy), capsys), "adapter_config.json is not valid JSON")


SIDECARS = [
    (lambda raw: [raw], "modlora.json: expected a JSON object"),
    (lambda raw: {**raw, "base": {**raw["base"], "extra": 1}}, "base must have exactly the keys"),
    (lambda raw: {**raw, "base": {**raw["base"], "hidden_size": "16"}}, "hidden_size must be an integer"),
    (lambda raw: {**raw, "base": 5}, "base must be a dict"),
    (_set("language", 5), "language must be a string"),
    (_set("metadata", []), "metadata must be a dict"),
]


@pytest.mark.parametrize("edit,message", SIDECARS)
def test_sidecar(copy, capsys, edit, message):
    _edit_json(copy / "pool" / "fr" / "in" / "modlora.json", edit)
    assert_error(run(translate(copy), capsys), message)


def _edit_tensors(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = A_KEY.replace("lora_A", "lora_B")
ADAPTER_TENSORS = [
    (lambda s: s[A_KEY].__setitem__((0, 0), float("nan")), f"tensor {A_KEY} holds NaN or infinite values"),
    (lambda s: s[B_KEY].__setitem__((0, 0), float("-inf")), "holds NaN or infinite values"),
    (lambda s: s.__setitem__(A_KEY, s[A_KEY].to(torch.int8)), "has dtype torch.int8; expected a floating-point"),
    (lambda s: s.__setitem__(B_KEY, s[B_KEY] > 0), "has dtype torch.bool"),
    (lambda s: s.pop(B_KEY), "missing tensor"),
    (lambda s: s.__setitem__(A_KEY, s[A_KEY][:1]), "expected A [2, in]"),
    (lambda s: s.__setitem__("base_model.model.evil", torch.ones(1)), "unexpected tensor"),
    (lambda s: s.clear(), "holds no LoRA tensors"),
]


@pytest.mark.parametrize("edit,message", ADAPTER_TENSORS)
def test_adapter_tensors(copy, capsys, edit, message):
    _edit_tensors(copy / "pool" / "fr" / "in" / "adapter_model.safetensors", edit)
    assert_error(run(translate(copy), capsys), message)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 8 + b"{}",
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_adapter_weights_file_that_is_not_safetensors(copy, capsys, content):
    (copy / "pool" / "fr" / "in" / "adapter_model.safetensors").write_bytes(content)
    assert_error(run(translate(copy), capsys), "is not a readable safetensors file")


def test_pool_link_out_of_the_pool_is_refused(copy, capsys, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    shutil.move(copy / "pool" / "fr" / "in", outside / "in")
    (copy / "pool" / "fr" / "in").symlink_to(outside / "in")
    assert_error(run(translate(copy), capsys), "outside the pool")


WEIGHTS = {"src": "fr", "tgt": "de", "strategy": "output", "w_in": [0.4], "w_out": [0.6], "theta": [[0.0, 0.4]]}


@pytest.mark.parametrize("edit,message", [
    (_set("w_in", [float("nan")]), "w_in must be a finite number, got nan"),
    (_set("w_in", [-3]), "w_in must be in [0, 1], got -3.0"),
    (_set("w_out", [7.5]), "w_out must be in [0, 1], got 7.5"),
    (_set("w_in", ["0.4"]), "w_in must be a number, got '0.4' (str)"),
    (_set("w_in", []), "w_in must not be empty"),
    (_set("w_out", [0.6, 0.4]), "w_in has 1 layers, w_out 2"),
    (_set("strategy", "cat"), "strategy must be one of output, ab, got 'cat'"),
    (_drop("w_out"), "missing key 'w_out'"),
    (_set("theta", {"0": 1}), "theta must be a list"),
    (_set("theta", [[0.0, 0.4], [0.0, 0.4]]), "theta must hold one pair per layer (1)"),
    (_set("theta", [[0.0]]), "theta must hold one pair per layer (1)"),
    (_set("theta", [[0.0, float("inf")]]), "theta must be a finite number, got inf"),
])
def test_learned_weights_file(copy, capsys, edit, message):
    (copy / "weights.json").write_text(json.dumps(WEIGHTS))
    rc, out, err = run(translate(copy, "--weights", copy / "weights.json"), capsys)
    assert rc == 0 and len(out.splitlines()) == 1, err  # the file as learn-weights writes it is accepted
    _edit_json(copy / "weights.json", edit)
    assert_error(run(translate(copy, "--weights", copy / "weights.json"), capsys), "weights.json", message)


@pytest.mark.parametrize("src", ["../../etc", ".", "fr/../de"])
def test_language_code_is_a_plain_name(copy, capsys, src):
    argv = translate(copy)
    argv[argv.index("fr")] = src
    assert_error(run(argv, capsys), "must be a plain name")


# --------------------------------------------------------------------------------------------
# Model checkpoints


MODEL_CONFIGS = [
    (lambda raw: [], "config.json: expected a JSON object, got list"),
    (_set("num_hidden_layers", 1000000), "num_hidden_layers=1000000, the checkpoint has tensors for 1 layer"),
    (_set("hidden_size", 1e9), "hidden_size must be an integer, got 1000000000.0"),
    (_set("hidden_size", None), "hidden_size must be an integer, got None"),
    (_set("max_position_embeddings", None), "max_position_embeddings must be an integer, got None"),
    (_set("hidden_size", 10**9), "the config implies"),
    (_set("vocab_size", 10**9), "the config implies"),
    (_set("intermediate_size", 2**40), "intermediate_size must be at most"),
    (_set("num_attention_heads", 0), "num_attention_heads must be a positive integer, got 0"),
    (_set("num_key_value_heads", 0), "num_key_value_heads must be a positive integer, got 0"),
    (_set("num_attention_heads", 3), "hidden_size 16 is not divisible by num_attention_heads 3"),
    (_set("num_attention_heads", 16), "head_dim 1 (hidden_size 16 / num_attention_heads 16) must be even"),
    (_set("vocab_size", "151936"), "vocab_size must be an integer, got '151936' (str)"),
    (_set("rope_theta", float("nan")), "rope_theta must be a finite number"),
    (_set("rope_theta", -1.0), "rope_theta must be > 0"),
    (_set("rms_norm_eps", float("inf")), "rms_norm_eps must be a finite number"),
    (_set("tie_word_embeddings", "false"), "tie_word_embeddings must be true or false"),
    (_set("torch_dtype", 5), "torch_dtype must be a string"),
    (_set("torch_dtype", "int8"), "unsupported dtype 'int8'"),
    (_set("rope_scaling", []), "rope_scaling must be an object"),
    (_drop("hidden_size"), "lacks required field(s): hidden_size"),
    (_set("model_type", "llama"), "unsupported model_type 'llama'"),
]


@pytest.mark.parametrize("edit,message", MODEL_CONFIGS)
def test_model_config(copy, capsys, edit, message):
    _edit_json(copy / "model" / "config.json", edit)
    started = time.perf_counter()
    assert_error(run(translate(copy), capsys), message)
    assert time.perf_counter() - started < 30  # sizes are checked against the headers, not allocated


def test_legal_model_config_extra_key(copy, capsys):
    _edit_json(copy / "model" / "config.json", _set("some_future_field", [1, 2]))
    rc, out, err = run(translate(copy), capsys)
    assert rc == 0 and len(out.splitlines()) == 1, err


EMBED = "model.embed_tokens.weight"
MODEL_TENSORS = [
    (lambda s: s[EMBED].__setitem__((0, 0), float("nan")), f"tensor {EMBED} holds NaN or infinite values"),
    (lambda s: s.__setitem__(EMBED, s[EMBED].to(torch.int8)), "has dtype I8; expected a floating-point dtype"),
    (lambda s: s.pop("model.norm.weight"), r"missing tensor(s): model.norm.weight"),
    (lambda s: s.__setitem__("model.norm.weight", torch.ones(17)), "has shape (17,), the config implies (16,)"),
    (lambda s: s.__setitem__("model.layers.7.mlp.up_proj.weight", torch.ones(1)), "tensors for 2 layer(s)"),
]


@pytest.mark.parametrize("edit,message", MODEL_TENSORS)
def test_model_tensors(copy, capsys, edit, message):
    _edit_tensors(copy / "model" / "model.safetensors", edit)
    assert_error(run(translate(copy), capsys), message)


def test_truncated_model_file(copy, capsys):
    path = copy / "model" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert_error(run(translate(copy), capsys), "is not a readable safetensors file")


def _index(root: Path, weight_map) -> None:
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shard,message", [
    ("../stolen.safetensors", "points outside"),
    ("{abs}", "points outside"),
    ("sub/../../stolen.safetensors", "points outside"),
    (".", "points outside"),
    (5, "must be a file name, got 5"),
    ("", "must be a file name"),
])
def test_shard_index_stays_inside_the_model_folder(copy, capsys, shard, message):
    # A complete, valid checkpoint outside the folder: loading it would succeed, so only the check stops it.
    shutil.copy(copy / "model" / "model.safetensors", copy / "stolen.safetensors")
    names = list(load_file(copy / "model" / "model.safetensors"))
    (copy / "model" / "model.safetensors").unlink()
    shard = str(copy / "stolen.safetensors") if shard == "{abs}" else shard
    _index(copy, {name: shard for name in names})
    assert_error(run(translate(copy), capsys), message)


@pytest.mark.parametrize("index,message", [([], "expected a JSON object, got list"),
                                           ({"weight_map": []}, "weight_map must be an object"),
                                           ({"weight_map": {"model.norm.weight": "absent.safetensors"}},
                                            "names shard(s) that do not exist")])
def test_malformed_shard_index(copy, capsys, index, message):
    # The index is read only where there is no model.safetensors (transformers' order).
    (copy / "model" / "model.safetensors").rename(copy / "model" / "model-00001-of-00001.safetensors")
    (copy / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_error(run(translate(copy), capsys), message)


def test_sharded_checkpoint_inside_the_folder_loads(copy, capsys):
    names = list(load_file(copy / "model" / "model.safetensors"))
    (copy / "model" / "model.safetensors").rename(copy / "model" / "model-00001-of-00001.safetensors")
    _index(copy, {name: "model-00001-of-00001.safetensors" for name in names})
    rc, out, err = run(translate(copy), capsys)
    assert rc == 0 and len(out.splitlines()) == 1, err


# --------------------------------------------------------------------------------------------
# Command line and TOML: one set of rules


TOML_CASES = [
    ("[train]\nbatch_size = 0", "[train] batch_size must be a positive integer, got 0"),
    ("[train]\ngrad_accum = 0", "[train] grad_accum must be a positive integer, got 0"),
    ("[train]\nepochs = 0", "[train] epochs must be a positive integer, got 0"),
    ('[train]\nepochs = "2"', "[train] epochs must be an integer, got '2' (str)"),
    ("[train]\nepochs = true", "[train] epochs must be an integer, got True (bool)"),
    ("[train]\nepochs = 2.0", "[train] epochs must be an integer, got 2.0"),
    ("[train]\nlr = nan", "[train] lr must be a finite number, got nan"),
    ("[train]\nlr = inf", "[train] lr must be a finite number"),
    ("[train]\nlr = 0.0", "[train] lr must be > 0"),
    ("[train]\nwarmup_ratio = 1.5", "[train] warmup_ratio must be in [0, 1]"),
    ("[train]\nmax_grad_norm = -1.0", "[train] max_grad_norm must be >= 0"),
    ("[train]\nbatch_size = 9223372036854775807", "[train] batch_size must be at most 2.147e+09"),
    ("[weights]\nepochs = -1", "[weights] epochs must be a positive integer"),
    ("[lora]\nalpha = 1e300", "[lora] alpha must be at most 3.403e+38"),
    ("[lora]\nrank = 0", "[lora] rank must be a positive integer, got 0"),
    ("[lora]\ndropout = 1.0", "[lora] dropout must be in [0, 1)"),
    ('[lora]\nuse_rslora = "false"', "[lora] use_rslora must be true or false, got 'false' (str)"),
    ('[lora]\ntarget_modules = ["q_proj", "evil"]', "[lora] target_modules has 'evil' (str), which must be one of"),
    ("[lora]\ntarget_modules = []", "[lora] target_modules must list at least one module"),
    ("[data]\ntrain_limit = -995", "[data] train_limit must be a positive integer, got -995"),
    ('[data]\nlangs = ["en", "../../etc"]', "[data] langs has '../../etc' (str), which must be a plain name"),
    ('[data]\nlangs = "en,fr"', "[data] langs must be a list, got 'en,fr' (str)"),
    ('[data]\neval_split = "../secret"', "[data] eval_split must be a plain name"),
    ("[eval]\nratios = [[0, 0]]", "[eval] ratios has [0, 0]: the two weights must not both be 0"),
    ("[eval]\nratios = [[1, -9]]", "[eval] ratios holds [1, -9], whose weights must be >= 0"),
    ("[eval]\nratios = [[1, 2, 3]]", "[eval] ratios must be a pair"),
    ('[eval]\nstrategies = ["output", "sum"]', "[eval] strategies has 'sum' (str), which must be one of output, ab"),
    ('[eval]\nlearned = "yes"', "[eval] learned must be true or false"),
    ("[eval]\nnum_beams = 0", "[eval] num_beams must be a positive integer"),
    ('[model]\npreset = "huge"', "[model] preset must be one of tiny, qwen2.5-0.5b, got 'huge'"),
    ('[model]\ndtype = "fp8"', "[model] dtype must be one of float32, float16, bfloat16"),
    ('[model]\ndevice = "nonsense"', "[model] device is not a torch device"),
    ("train = 3", "[train] must be a table of settings, got 3"),
    ("out_dir = 3", "out_dir must be a string, got 3"),
    ("[train]\nlr_typo = 1", "unknown key [train] lr_typo"),
    ("typo = 1", "unknown key typo"),
    ('[eval]\nfull = "yes"', "[eval] full must be true or false, got 'yes' (str)"),
    ("[train\nlr = 1", "is not valid TOML"),
    ("lr = 1\nlr = 2", "is not valid TOML"),
]


@pytest.mark.parametrize("text,message", TOML_CASES)
def test_toml(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert_error(run(["table", "--config", path, "--out", tmp_path / "run"], capsys), f"{path}", message)


@pytest.mark.parametrize("option,section,key,value", [
    ("--batch-size", "train", "batch_size", "0"), ("--epochs", "train", "epochs", "-3"),
    ("--lr", "train", "lr", "nan"), ("--lr", "train", "lr", "1e308"), ("--rank", "lora", "rank", "0"),
    ("--alpha", "lora", "alpha", "inf"), ("--dropout", "lora", "dropout", "1"),
    ("--train-limit", "data", "train_limit", "-995"), ("--langs", "data", "langs", "en,../x"),
])
def test_option_and_toml_key_share_one_rule(tmp_path, capsys, option, section, key, value):
    toml = tmp_path / "c.toml"
    literal = json.dumps(value.split(",")) if key == "langs" else value
    toml.write_text(f"[{section}]\n{key} = {literal}\n")
    by_toml = run(["train-adapters", "--config", toml, "--out", tmp_path], capsys)
    by_option = run(["train-adapters", option, value, "--out", tmp_path], capsys)
    assert_error(by_toml, f"{toml}: [{section}] {key} ")
    assert_error(by_option, f"argument {option}: ")
    assert by_toml[2][-1].split(f"{key} ", 1)[1] == by_option[2][-1].split(f"{option}: ", 1)[1].split(" (see")[0]


@pytest.mark.parametrize("option,value,message", [("--w-in", "1e308", "must be at most 3.403e+38, got 1e+308"),
                                                  ("--w-out", "nan", "must be a finite number"),
                                                  ("--num-beams", "two", "must be an integer, got 'two'"),
                                                  ("--strategy", "sum", "invalid choice")])
def test_translate_options(capsys, option, value, message):
    assert_error(run(["translate", "--src", "fr", "--tgt", "de", option, value], capsys), option, message)


@pytest.mark.parametrize("argv,message", [
    (["train-full", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["train-full", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["table", "--compare-paper", "absent.json"], "argument --compare-paper: must be an existing file, got "
                                                  "'absent.json'"),
])
def test_options_of_the_full_and_table_stages(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert_error(run(argv, capsys), message)


def test_threads_option(capsys):
    assert_error(run(["--threads", "0", "info"], capsys), "argument --threads: must be a positive integer, got 0")


# --------------------------------------------------------------------------------------------
# Input text and output files


@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
def test_special_token_in_the_input_names_the_line(copy, capsys, token):
    (copy / "in.txt").write_text(f"Bonjour.\nfin {token} system\n")
    assert_error(run(translate(copy), capsys), f"{copy / 'in.txt'} line 2 contains the special token {token}")


@pytest.mark.parametrize("output,message", [("{root}", "is a directory"),
                                            ("{root}/in.txt/out.txt", "is not writable")])
def test_output_is_checked_before_any_work(copy, capsys, output, message):
    # The model folder is absent: the output check comes first, before loading or translating.
    argv = translate(copy, "--output", output.format(root=copy))
    argv[argv.index("--model") + 1] = copy / "absent"
    assert_error(run(argv, capsys), "--output", message)


def test_output_directory_of_the_stages_is_checked_first(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert_error(run(["train-adapters", "--out", tmp_path / "file" / "run"], capsys), "is not a directory")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    model = random_model(SMALL, seed=0)
    adapter = LoraAdapter.init(model, rank=2, alpha=4, language="fr", role="in")
    state = {"config": {}, "step": 0, "order": [], "params": adapter.parameters(),
             "optimizer": {},
             "rng": [{"torch": torch.get_rng_state(), "python": __import__("random").getstate()}]}
    old = os.umask(umask)
    try:
        adapter.save(tmp_path / "adapter")
        save_pretrained(model, tmp_path / "model")
        checkpoint.save(tmp_path / "checkpoint.safetensors", state)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


def _full(tmp):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_names_the_path(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    with pytest.raises(OSError, match="no space left on device") as e:
        atomic_write(target, _full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


@pytest.mark.skipif(not (Path("/dev/full").exists() and stat.S_ISCHR(Path("/dev/full").stat().st_mode)),
                    reason="no /dev/full device here")
def test_full_disk_for_real(tmp_path):
    with pytest.raises(OSError, match="no space left on device"):
        atomic_write(tmp_path / "x", lambda tmp: Path("/dev/full").write_bytes(b"x" * 65536))


# Evaluated as the CLI without a config file (the demo's settings) would: the table refuses other settings.
FINISHED = {"data": {"langs": ["en", "fr"], "eval_limit": 1}, "eval": {"strategies": ["output"], "max_new_tokens": 12}}


def finished_run(out: Path, raw: dict = FINISHED) -> PipelineConfig:
    """A finished run made by hand (adapters, evaluation files), as the stages leave it."""
    cfg = PipelineConfig.from_dict({**raw, "out_dir": str(out)})
    pipe = Pipeline(cfg, log=lambda _: None)
    pipe.pool.save(LoraAdapter.init(pipe.model, rank=2, alpha=4, language="en", role="in"))
    for config in pipe.configurations():
        pipe.eval_path(config).parent.mkdir(parents=True, exist_ok=True)
        pipe.eval_path(config).write_text(json.dumps({"settings": pipe.eval_settings(), "directions": [
            {"src": s, "tgt": t, "score": 1.0, "signature": "chrF2++|nw:2"} for s, t in pipe.directions()]}))
    return cfg


@pytest.mark.parametrize("cell,message", [
    ({"score": "99"}, "score must be a number, got '99' (str)"),
    ({"score": 100.5}, "score must be in [0, 100], got 100.5"),
    ({"hypotheses": ["ok", 1]}, "hypotheses must hold strings only"),
    ({"src": None}, "missing key 'src'"),
    ([], "expected a JSON object, got list"),
])
def test_evaluation_cell_file_is_checked(tmp_path, cell, message):
    """A configuration left to evaluate reads its cells' files first (to skip finished cells): a
    damaged one is named, with what is wrong, and redone."""
    messages = []
    pipe = Pipeline(finished_run(tmp_path), log=messages.append)
    config = pipe.configurations()[0]
    path = pipe.cell_path(config, "en", "fr")
    path.parent.mkdir(parents=True)
    good = {"settings": pipe.eval_settings(), "src": "en", "tgt": "fr", "score": 1.0, "signature": "s",
            "hypotheses": ["a"]}
    assert pipe._stored(path, validate.eval_cell) is None  # none yet
    path.write_text(json.dumps(good))
    assert pipe._stored(path, validate.eval_cell) == (good["settings"], [("en", "fr")])
    path.write_text(json.dumps({k: v for k, v in {**good, **cell}.items() if v is not None}
                               if isinstance(cell, dict) else cell))
    assert pipe._stored(path, validate.eval_cell) is None and not messages[:-1]
    assert messages[-1].startswith(f"warning: {path} is damaged ({path}") and message in messages[-1]
    assert messages[-1].endswith("; it is redone")


def test_evaluate_redoes_a_file_that_lacks_a_direction_or_holds_another(tmp_path):
    """A file is reused only when it holds exactly the run's directions with the run's settings:
    else evaluate would skip it, and table would keep asking for the evaluate stage again."""
    raw = {**FINISHED, "eval": {"strategies": ["output"], "num_beams": 1, "max_new_tokens": 2}}
    pipe = Pipeline(finished_run(tmp_path, raw), log=lambda _: None)
    pretrained_base(tmp_path)
    base = pipe.configurations()[0]
    whole = json.loads(pipe.eval_path(base).read_text())
    pipe.eval_path(base).write_text(json.dumps({**whole, "directions": whole["directions"][:1]}))
    cell = pipe.cell_path(base, "en", "fr")
    cell.parent.mkdir(parents=True)
    cell.write_text(json.dumps({"settings": pipe.eval_settings(), "src": "fr", "tgt": "en", "score": 1.0,
                                "signature": "s", "hypotheses": ["a"]}))
    pipe.evaluate()
    redone = json.loads(pipe.eval_path(base).read_text())["directions"]
    assert sorted((d["src"], d["tgt"]) for d in redone) == sorted(pipe.directions())
    assert (json.loads(cell.read_text())["src"], json.loads(cell.read_text())["tgt"]) == ("en", "fr")
    pipe.table()


@pytest.mark.parametrize("weights,message", [
    ({"src": "fr", "tgt": "en"}, "holds weights learned for fr->en with strategy 'output', not en->fr"),
    ({"w_in": [0.5], "w_out": [0.5]}, "holds weights of 1 layers, the model has"),
])
def test_evaluate_refuses_learned_weights_of_another_direction_or_model(tmp_path, weights, message):
    """A weights.json at a direction's place that holds another direction's (or another model's)
    weights is named, not used."""
    from modlora.adapters import LearnedWeights

    pipe = Pipeline(finished_run(tmp_path), log=lambda _: None)
    config = next(c for c in pipe.configurations() if c.learned)
    pipe.eval_path(config).unlink()
    layers = pipe.model.config.num_hidden_layers
    raw = {"src": "en", "tgt": "fr", "w_in": [0.5] * layers, "w_out": [0.5] * layers, **weights}
    path = pipe.weights_path(config.strategy, "en", "fr")
    LearnedWeights(torch.tensor(raw["w_in"]), torch.tensor(raw["w_out"]), config.strategy, raw["src"],
                   raw["tgt"]).save(path)
    with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
        pipe.evaluate()


def test_table_prints_a_read_only_finished_run(tmp_path, capsys, monkeypatch):
    finished_run(tmp_path)
    pretrained_base(tmp_path)

    def denied(path, *_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("modlora.pipeline.atomic_write_json", denied)
    monkeypatch.setattr("modlora.pipeline.atomic_write_text", denied)
    rc, out, err = run(["table", "--out", tmp_path, "--langs", "en,fr", "--eval-limit", "1",
                        "--strategies", "output"], capsys)
    assert rc == 0 and "| Setting 1 (1:9) |" in out, err
    assert any("is not writable" in line for line in err)


# --------------------------------------------------------------------------------------------
# Training: checkpoints are data, divergence stops the run


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["MODLORA_PAYLOAD"]),))


TRAIN = ["train-adapters", "--langs", "en,fr", "--train-limit", "4", "--epochs", "1", "--batch-size", "2",
         "--rank", "2"]


def pretrained_base(out: Path) -> Path:
    """``out`` with its pre-training stage done: the built-in demo config (no --config) pre-trains its random
    base before any other stage, which is not what these tests are about (and costs ~30 s each)."""
    save_pretrained(random_model("tiny"), out / "pretrain" / "model")
    return out


def test_pickle_checkpoint_is_refused_never_loaded(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("MODLORA_PAYLOAD", str(marker))
    for job in ("en-in", "en-out", "fr-in", "fr-out"):
        (tmp_path / "run" / "train" / job).mkdir(parents=True)
        (tmp_path / "run" / "train" / job / "checkpoint.pt").write_bytes(pickle.dumps(_Payload()))
    assert_error(run([*TRAIN, "--out", pretrained_base(tmp_path / "run")], capsys),
                 "checkpoint.pt is an old pickle checkpoint",
                 "delete it")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 a zip"])
def test_unreadable_checkpoint(tmp_path, capsys, content):
    for job in ("en-in", "en-out", "fr-in", "fr-out"):
        (tmp_path / "train" / job).mkdir(parents=True)
        (tmp_path / "train" / job / checkpoint.FILE).write_bytes(content)
    assert_error(run([*TRAIN, "--out", pretrained_base(tmp_path)], capsys), "is not a readable modlora checkpoint",
                 "delete it")


def test_tokenizer_beyond_the_models_vocabulary_is_named_before_training(tmp_path, capsys):
    """Without a tokenizer of its own the folder is refused the vendored one; with one that is not
    its model's, the training data names the ids outside the vocabulary."""
    import gzip

    from modlora.tokenizer import DEFAULT_TOKENIZER

    model = tmp_path / "model"
    save_pretrained(random_model(dataclasses.replace(SMALL, vocab_size=1000), seed=0), model)
    assert_error(run([*TRAIN, "--model", model, "--out", tmp_path / "run"], capsys),
                 "ships no tokenizer", "its vocabulary (1000) is smaller than the vendored Qwen2.5 tokenizer's")
    (model / "tokenizer.json").write_bytes(gzip.decompress(DEFAULT_TOKENIZER.read_bytes()))
    assert_error(run([*TRAIN, "--model", model, "--out", tmp_path / "run2"], capsys),
                 "outside the model's vocabulary [0, 1000)", "the tokenizer does not belong to this model")


def test_diverging_training_stops_and_saves_nothing(tmp_path, capsys):
    """A huge (but finite) alpha: the loss or gradient overflows; the run stops, no adapter is finished."""
    toml = tmp_path / "c.toml"
    toml.write_text("[lora]\nalpha = 1e38\n[train]\nlr = 1.0\n")
    assert_error(run([*TRAIN, "--config", toml, "--out", pretrained_base(tmp_path / "run")], capsys),
                 "training diverged at step")
    assert not list((tmp_path / "run" / "pool").glob("*/*/adapter_model.safetensors"))


def test_a_failed_adapter_save_leaves_the_adapter_that_was_there(tmp_path, monkeypatch):
    from modlora.adapters import format as adapter_format

    model = random_model(SMALL, seed=0)
    LoraAdapter.init(model, rank=8, alpha=16, language="fr", role="in", seed=1).save(tmp_path / "in")
    real = adapter_format.atomic_write_json

    def full_disk_at_the_sidecar(path, payload):
        if path.name == adapter_format.SIDECAR_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, payload)

    monkeypatch.setattr(adapter_format, "atomic_write_json", full_disk_at_the_sidecar)
    with pytest.raises(OSError, match="No space left"):
        LoraAdapter.init(model, rank=4, alpha=8, language="fr", role="in", seed=2).save(tmp_path / "in")
    kept = LoraAdapter.load(tmp_path / "in")
    assert (kept.rank, kept.language, kept.role) == (8, "fr", "in")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_nan_adapter_is_never_saved(tmp_path):
    model = random_model(SMALL, seed=0)
    adapter = LoraAdapter.init(model, rank=2, alpha=4, language="fr", role="in")
    with torch.no_grad():
        next(iter(adapter.tensors.values()))[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        adapter.save(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_nan_logits_are_an_error_not_a_translation(copy, capsys):
    """Finite tensors, a finite alpha, yet the scale overflows fp32 activations: an error, not garbage."""
    _edit_json(copy / "pool" / "fr" / "in" / "adapter_config.json", _set("lora_alpha", 3e38))
    assert_error(run(translate(copy), capsys), "logits are NaN or infinite")


def test_torn_last_log_line_is_ignored_and_the_run_resumes(tmp_path):
    from test_train import PAD, _random_examples, _small_model, _train_once

    from modlora.train import TrainConfig, train

    _, full = _train_once(tmp_path / "a")
    _train_once(tmp_path / "b", stop_after=2)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')  # a full disk or a crash mid-line
    model, messages = _small_model(), []
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0, dropout=0.1)
    AdapterController(model).set_adapters(lora_in=adapter, w_in=1.0)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=3, grad_accum=2, warmup_ratio=0.2, checkpoint_every=2)
    rest = train(model, adapter.parameters(), _random_examples(17, seed=1), cfg, tmp_path / "b", pad_id=PAD,
                 log=messages.append)
    assert rest["done"] and rest["losses"] == full["losses"][2:]
    assert any("log.jsonl line 3 is torn or malformed" in m and "ignored" in m for m in messages), messages
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))


@pytest.mark.parametrize("bad", ["not json", '{"step": 2, "loss": "x"}', '{"step": 2, "loss": NaN}',
                                 '{"step": 2}'])
def test_malformed_log_line_before_the_end_is_named(tmp_path, bad):
    from test_train import _train_once

    _train_once(tmp_path, stop_after=2)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    (tmp_path / "log.jsonl").write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl line 2 is not a step record"):
        _train_once(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda t, m: t.__setitem__("param.0", t["param.0"] * float("nan")), "param.0 holds NaN"),
    (lambda t, m: t.__setitem__("param.0", t["param.0"][:1]), "do not match the trained parameters"),
    (lambda t, m: t.pop("rng.0.torch"), "malformed checkpoint"),
    (lambda t, m: m.__setitem__("step", 10**6), "step 1000000 is outside this run's 0..6"),
    (lambda t, m: m.__setitem__("step", "2"), "step and num_params must be non-negative integers"),
    (lambda t, m: m["rng"][0].__setitem__("python", [3, [0] * 3, None]), "Mersenne Twister"),
    (lambda t, m: m["rng"][0].__setitem__("cuda", True), "count of CUDA RNG states"),
    (lambda t, m: (m.__setitem__("rng", m["rng"] * 2), t.__setitem__("rng.1.torch", t["rng.0.torch"].clone())),
     "RNG states of 2 process"),
    (lambda t, m: m.__setitem__("format", 99), "unknown checkpoint format 99"),
    (lambda t, m: m.__setitem__("config", [1]), "config must be a JSON object"),
    (lambda t, m: (m["rng"][0].__setitem__("cuda", 1), t.__setitem__("rng.0.cuda.0", torch.zeros(16))),
     r"rng.0.cuda.\* must be CUDA RNG states"),
    (lambda t, m: t.__setitem__("optimizer.0.exp_avg", t["optimizer.0.exp_avg"][:1]),
     r"optimizer.0.exp_avg is torch.float32 \(1, 32\), its parameter torch.float32 \(4, 32\)"),
    (lambda t, m: t.__setitem__("optimizer.0.exp_avg", t["optimizer.0.exp_avg"].half()), "exp_avg is torch.float16"),
    (lambda t, m: t.pop("optimizer.0.exp_avg_sq"), r"parameter 0's optimizer state holds \['exp_avg', 'step'\]"),
    (lambda t, m: t.__setitem__("optimizer.99.exp_avg", t["optimizer.0.exp_avg"].clone()),
     "optimizer state for parameter 99"),
    (lambda t, m: t.__setitem__("optimizer.0.exp_avg_sq", -t["optimizer.0.exp_avg_sq"] - 1), "negative entries"),
    (lambda t, m: t.__setitem__("optimizer.0.step", torch.tensor(3e38)), "a whole number in 0..2"),
    (lambda t, m: t.__setitem__("optimizer.0.step", torch.tensor(1.5)), "a whole number in 0..2"),
    (lambda t, m: t.__setitem__("rng.0.torch", torch.full_like(t["rng.0.torch"], 255)),
     "rng.0.torch is not a valid torch RNG state"),
    (lambda t, m: m["rng"][0]["python"][1].__setitem__(624, 1000), "the Python RNG state is not valid"),
    (lambda t, m: m["rng"][0]["python"].__setitem__(2, float("nan")), "a finite or null gauss"),
])
def test_malformed_checkpoint_is_refused(tmp_path, edit, message):
    from safetensors import safe_open
    from test_train import _train_once

    _train_once(tmp_path, stop_after=2)
    path = tmp_path / checkpoint.FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["modlora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, path, metadata={"modlora": json.dumps(meta)})
    with pytest.raises(ValueError, match=message):
        _train_once(tmp_path)


def test_optimizer_state_is_matched_to_parameters_in_the_optimizers_order(tmp_path):
    """torch numbers an optimizer's parameters group by group (the trainer: matrices, then vectors),
    not in the model's order, where full fine-tuning alternates weights and biases."""
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([{"params": [w]}, {"params": [b]}])
    (w.sum() + b.sum()).backward()
    optimizer.step()
    state = {"step": 1, "rng": [{}], "params": [b, w], "optimizer": optimizer.state_dict()["state"]}
    checkpoint.check_fits(state, tmp_path, [b, w], optimizer, total=1, ranks=1)
    swapped = {0: state["optimizer"][1], 1: state["optimizer"][0]}
    with pytest.raises(ValueError, match=r"optimizer.0.exp_avg is torch.float32 \(4,\), its parameter torch.float32 "
                                         r"\(3, 4\)"):
        checkpoint.check_fits({**state, "optimizer": swapped}, tmp_path, [b, w], optimizer, total=1, ranks=1)


def test_format_1_checkpoint_resumes_with_the_runs_own_schedule(tmp_path):
    """Format 1 also stored the optimizer's hyperparameters and the schedule; they follow from the
    config and the step, so the resumed run ignores the file's copies (here a NaN learning rate and
    a schedule moved back 50 steps) and ends as the run never interrupted."""
    from safetensors import safe_open
    from test_train import _train_once

    straight, full = _train_once(tmp_path / "straight")
    _train_once(tmp_path / "b", stop_after=2)
    path = tmp_path / "b" / checkpoint.FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["modlora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(format=1, param_groups=[{"lr": float("nan"), "params": [0]}], scheduler={"last_epoch": -50})
    save_file(tensors, path, metadata={"modlora": json.dumps(meta)})
    resumed, rest = _train_once(tmp_path / "b")
    assert rest["done"] and rest["losses"] == full["losses"][2:]
    for name, (A, B) in straight.tensors.items():
        assert torch.equal(A, resumed.tensors[name][0]) and torch.equal(B, resumed.tensors[name][1]), name


_SLOW_TRAINING = """
import sys, time
import torch
torch.set_num_threads(1)  # as this module's tests: the same reductions, the same bits
sys.path.insert(0, "tests")
from pathlib import Path
from modlora import train as train_module
from test_train import _train_once
real = train_module.completion_loss
def slow(*args, **kwargs):  # a step long enough to be killed in the middle of one
    time.sleep(0.2)
    return real(*args, **kwargs)
train_module.completion_loss = slow
_train_once(Path(sys.argv[1]))
"""


def test_kill_9_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL (no handler runs) in a step after a checkpoint: the rerun resumes from the last
    checkpoint and ends with the adapter of a run never interrupted, bit for bit."""
    import signal
    import subprocess
    import sys

    from test_train import _train_once

    straight, full = _train_once(tmp_path / "straight")
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_TRAINING, str(killed)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 120
        while not (killed / checkpoint.FILE).exists() and child.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    step = checkpoint.load(killed / checkpoint.FILE, torch.device("cpu"))["step"]
    assert 0 < step < full["step"], "killed too late: nothing to resume"
    resumed, rest = _train_once(killed)
    assert rest["done"] and rest["losses"] == full["losses"][step:]
    for name, (A, B) in straight.tensors.items():
        assert torch.equal(A, resumed.tensors[name][0]) and torch.equal(B, resumed.tensors[name][1]), name


def test_hub_ref_that_is_not_utf8_is_named(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "hub" / "models--Org--Name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_bytes(b"\xff\xfe")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert_error(run(["info", "--model", "Org/Name"], capsys), "refs/main is not UTF-8 text")


def test_hub_ref_that_climbs_out_of_the_snapshots_is_refused(tmp_path, monkeypatch, capsys):
    """A cache's refs/main names a snapshot folder; a revision such as ../../../x would load another tree."""
    repo = tmp_path / "hub" / "models--Org--Name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("../../../elsewhere\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert_error(run(["info", "--model", "Org/Name"], capsys), "refs/main: the revision '../../../elsewhere' points "
                 "outside")

