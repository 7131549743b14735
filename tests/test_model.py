"""The Qwen2 decoder against transformers.Qwen2ForCausalLM on the same random checkpoints."""

import copy
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import SMALL, hf_model, save_hf

from modlora import loading
from modlora.config import Qwen2Config
from modlora.loading import load_pretrained, random_model, save_pretrained

# fp32 on CPU: both sides do the same math in a different op order; 1e-5 relative is the design's bar.
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    hf = hf_model(tie=request.param, seed=int(request.param))
    path = save_hf(hf, tmp_path_factory.mktemp("ckpt"), shard=not request.param)
    return hf, load_pretrained(path, dtype=torch.float32), path


def test_sharded_checkpoint_was_written(pair):
    hf, _, path = pair
    if not hf.config.tie_word_embeddings:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 1


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids), hf(ids).logits, **FP32)


@torch.no_grad()
def test_left_padded_batch_matches_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], **FP32)
    # And each padded row equals the same sentence run alone without padding.
    torch.testing.assert_close(got[2, 9:], ours(ids[2:3, 9:])[0], **FP32)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_matches_full_forward(pair, num_beams):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 1000, (2, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    new = torch.randint(0, 1000, (2 * num_beams, 5), generator=g)
    cache = ours.new_cache(2, prompt.shape[1], max_new_tokens=5, num_beams=num_beams)
    first = ours.prefill(prompt, mask, cache)
    torch.testing.assert_close(first, ours(prompt, mask)[:, -1], **FP32)
    steps = [ours.decode_step(new[:, t], cache) for t in range(new.shape[1])]
    full_ids = torch.cat((prompt.repeat_interleave(num_beams, 0), new), dim=1)
    full_mask = torch.cat((mask.repeat_interleave(num_beams, 0), torch.ones_like(new)), dim=1)
    full = ours(full_ids, full_mask)[:, prompt.shape[1]:]
    torch.testing.assert_close(torch.stack(steps, 1), full, **FP32)


@torch.no_grad()
@pytest.mark.parametrize("order", [[2, 2, 0], [0, 0, 2], [0, 1, 2]])
def test_cache_reorder_follows_beams(pair, order):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 1000, (1, 4), generator=g)
    new = torch.randint(0, 1000, (3, 3), generator=g)
    cache = ours.new_cache(1, 4, max_new_tokens=3, num_beams=3)
    ours.prefill(prompt, None, cache)
    ours.decode_step(new[:, 0], cache)
    ours.decode_step(new[:, 1], cache)
    order = torch.tensor(order)
    moved = int((order != torch.arange(3)).sum())
    per_row = 2 * 2 * ours.config.num_hidden_layers * ours.config.num_key_value_heads * 2 * ours.config.head_dim * 4
    assert cache.reorder(order) == moved * per_row  # k and v, read and written, 2 positions, fp32
    got = ours.decode_step(new[:, 2], cache)
    history = torch.cat((new[order, :2], new[:, 2:]), dim=1)
    full = ours(torch.cat((prompt.expand(3, -1), history), dim=1))[:, -1]
    torch.testing.assert_close(got, full, **FP32)


@torch.no_grad()
def test_bf16_load_and_forward(pair):
    hf, _, path = pair
    ours = load_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = hf(ids).logits
    # The error bound is transformers' own bf16 error against its fp32 logits (flash-attention style):
    # at most twice it, plus one bf16 rounding of the largest logit.
    hf_err = (copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
    bound = 2 * hf_err + 2.0**-8 * ref.abs().max().item()
    err = (ours(ids).float() - ref).abs().max().item()
    assert err <= bound, (err, hf_err, bound)
    # Cached decoding in bf16 (attention math in fp32) against the fp32 reference, position by position.
    cache = ours.new_cache(2, 5, max_new_tokens=4, num_beams=1)
    steps = [ours.prefill(ids[:, :5], None, cache)] + [ours.decode_step(ids[:, t], cache) for t in range(5, 9)]
    err = (torch.stack(steps, 1).float() - ref[:, 4:]).abs().max().item()
    assert err <= bound, (err, hf_err, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_equal_transformers_at_long_positions(dtype):
    """cos/sin from fp32 angles, rounded once to the model's dtype, bit for bit as transformers makes
    them, to 32k positions. Compared directly: on random weights attention is near uniform, so an
    angle computed in bf16 (positions above 256 rounded) barely moves the logits."""
    import transformers
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from modlora.model import RotaryEmbedding

    cfg = transformers.Qwen2Config(**{**SMALL, "max_position_embeddings": 32768})
    positions = torch.arange(32768)[None]
    cos, sin = Qwen2RotaryEmbedding(cfg)(torch.zeros(1, dtype=dtype), positions)
    ours = RotaryEmbedding(SMALL["hidden_size"] // SMALL["num_attention_heads"], SMALL["rope_theta"])(positions, dtype)
    assert ours[0].dtype == dtype and torch.equal(ours[0], cos) and torch.equal(ours[1], sin)


def test_save_and_reload_round_trip(tmp_path):
    model = random_model(Qwen2Config(**{**_small(), "tie_word_embeddings": True}), seed=3)
    save_pretrained(model, tmp_path)
    again = load_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_tied_checkpoint_may_store_its_head_only_as_a_copy(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the file: a copy of the embeddings loads; another
    head or shape contradicts the config (transformers unties, warning) and is refused."""
    from safetensors.torch import load_file, save_file

    model = random_model(Qwen2Config(**{**_small(), "tie_word_embeddings": True}), seed=3)
    save_pretrained(model, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    embedding = tensors["model.embed_tokens.weight"]
    for head, error in ((embedding.clone(), None), (embedding + 1e-3, "lm_head.weight differs from"),
                        (embedding[:, :3].clone(), r"lm_head.weight has shape \(\d+, 3\), the tied embedding")):
        save_file({**tensors, "lm_head.weight": head}, file, metadata={"format": "pt"})
        if error is None:
            assert torch.equal(load_pretrained(tmp_path).lm_head.weight, embedding)
        else:
            with pytest.raises(ValueError, match=error):
                load_pretrained(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="no /proc/self/maps here")
def test_a_loaded_model_holds_no_mapping_of_its_files(tmp_path):
    """safetensors maps the file and a same-dtype ``.to`` would keep its pages as the parameter (an
    embedding, a norm): the whole file stayed mapped and resident beside the model's own copy
    (2.3 against 1.3 GB RSS for Qwen2.5-0.5B in bf16)."""
    save_pretrained(random_model(Qwen2Config(**{**_small(), "tie_word_embeddings": True}), seed=3), tmp_path)
    model = load_pretrained(tmp_path, dtype="float32")
    assert str(tmp_path) not in Path("/proc/self/maps").read_text()
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_a_weight_that_overflows_the_asked_dtype_is_refused(tmp_path):
    model = random_model(Qwen2Config(**_small()), seed=3)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5  # fp16's largest finite value: 65504
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path, dtype="bfloat16").model.layers[0].mlp.up_proj.weight[0, 0] == 99840.0
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight overflows torch.float16: load the"):
        load_pretrained(tmp_path, dtype="float16")


def _assert_same_weights(ours, path):
    again = load_pretrained(path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded transformers checkpoint and the same weights loaded by us."""
    path = save_hf(hf_model(seed=7), tmp_path_factory.mktemp("sharded"), shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    return path, load_pretrained(path)


@pytest.mark.parametrize("linked", [False, True], ids=["folder", "symlinked folder"])
def test_saving_over_a_sharded_checkpoint_replaces_its_weights(sharded, tmp_path, linked):
    """The save drops the old index and its shards, and keeps every other file: modlora once read an
    index before model.safetensors, and other tools may, so a save that left them could load as the
    old weights."""
    sharded, _ = sharded
    folder = tmp_path / "model"
    shutil.copytree(sharded, folder)
    (folder / "README.md").write_text("notes\n")
    target = folder
    if linked:  # written in place: a symlinked folder is not renamed
        target = tmp_path / "link"
        target.symlink_to(folder)
    before = {p.name for p in folder.iterdir()}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stale = {"model.safetensors.index.json", *index["weight_map"].values()}
    assert len(stale) > 2 and stale <= before
    ours = random_model(Qwen2Config(**_small()), seed=5)
    save_pretrained(ours, target)
    _assert_same_weights(ours, target)
    assert {p.name for p in folder.iterdir()} == (before - stale) | {"model.safetensors", "config.json"}
    assert (folder / "README.md").read_text() == "notes\n"


@torch.no_grad()
def test_a_folder_with_both_layouts_loads_what_transformers_loads(sharded, tmp_path):
    """model.safetensors beside a sharded index: transformers reads the single file; so must we."""
    import transformers

    sharded, _ = sharded
    folder = tmp_path / "both"
    shutil.copytree(sharded, folder)
    single = save_hf(hf_model(seed=8), tmp_path / "single")
    shutil.copy(single / "model.safetensors", folder / "model.safetensors")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(load_pretrained(folder)(ids), hf(ids).logits, **FP32)


@pytest.mark.parametrize("in_place", [False, True], ids=["renamed", "working directory"])
def test_an_index_naming_other_files_as_shards_does_not_get_them_deleted(tmp_path, monkeypatch, in_place):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("README.md", "tokenizer.json"):
        (folder / name).write_text("keep\n")
    index = {"weight_map": {"a": "README.md", "b": "tokenizer.json", "c": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_text("keep\n")
    if in_place:  # the folder's files are replaced one by one there, so a name with ../ could reach out
        monkeypatch.chdir(folder)
    save_pretrained(random_model(Qwen2Config(**_small()), seed=6), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "tokenizer.json"]
    assert (tmp_path / "outside.safetensors").read_text() == "keep\n"


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '{"weight_map": ["x"]}'])
def test_saving_over_an_unreadable_index_drops_it(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    ours = random_model(Qwen2Config(**_small()), seed=6)
    save_pretrained(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_weights(ours, tmp_path)


def test_a_failed_save_leaves_the_old_checkpoint(sharded, tmp_path, monkeypatch):
    sharded, old = sharded
    folder = tmp_path / "model"
    shutil.copytree(sharded, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "atomic_write_text", full_disk)  # the config, written after the weights
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(random_model(Qwen2Config(**_small()), seed=5), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    _assert_same_weights(old, folder)


def _small() -> dict:
    from hf_reference import SMALL

    return dict(SMALL, dtype="float32")


def test_transformers_v5_config_dialect(tmp_path, pair):
    _, ours, path = pair
    raw = json.loads((path / "config.json").read_text())
    theta = raw.pop("rope_theta", None) or raw["rope_parameters"]["rope_theta"]
    raw["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    raw["dtype"] = raw.pop("torch_dtype", "float32")
    assert Qwen2Config.from_dict(raw).rope_theta == theta
    v4 = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    assert Qwen2Config.from_dict({**v4, "rope_theta": theta, "torch_dtype": "bfloat16"}).dtype == "bfloat16"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE type 'yarn'"),
    ({"rope_theta": None, "rope_parameters": None}, "no rope_theta"),
])
def test_unsupported_config_is_rejected(change, message):
    raw = {**_small(), "model_type": "qwen2", **change}
    with pytest.raises(ValueError, match=message):
        Qwen2Config.from_dict(raw)


def test_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({**_small(), "model_type": "qwen2"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def _rewrite(path, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    tmp_path.mkdir()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    return tmp_path


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    hf = hf_model(tie=True)
    path = save_hf(hf, tmp_path / "src")
    bad = _rewrite(path, tmp_path / "missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_pretrained(bad)
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _rewrite(path, tmp_path / "shape", lambda s: s.__setitem__(key, s[key][:-1]))
    with pytest.raises(ValueError, match=f"tensor {key} .* shape"):
        load_pretrained(bad)
    bad = _rewrite(path, tmp_path / "extra", lambda s: s.__setitem__("model.extra.weight", torch.ones(1)))
    with pytest.raises(ValueError, match="unexpected tensor.*model.extra.weight"):
        load_pretrained(bad)


# config.json of the published Qwen2.5-0.5B-Instruct (../shared/models/qwen2.5-0.5b-instruct/).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "models" / "qwen2.5-0.5b-instruct" / "config.json"


def test_qwen25_preset_is_the_published_config():
    assert Qwen2Config.preset("qwen2.5-0.5b") == Qwen2Config.from_dict(QWEN25_05B)  # every field
    if SHARED_CONFIG.is_file():  # the copy above is the file, where the shared folder exists
        assert json.loads(SHARED_CONFIG.read_text()) == QWEN25_05B


@torch.no_grad()
def test_mismatched_cache_mask_and_tokens_are_named(pair):
    """Each would otherwise broadcast: one prompt into every row of the cache, one mask over the batch."""
    _, ours, _ = pair
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"input_ids \(1, 5\) must have the shape the cache was made for, "
                                         r"\[batch, prompt length\] = \(2, 5\)"):
        ours.prefill(ids[:1], None, ours.new_cache(2, 5, 2))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 5\), got \(1, 5\)"):
        ours(ids, torch.ones(1, 5, dtype=torch.long))
    cache = ours.new_cache(2, 5, 2, num_beams=2)
    ours.prefill(ids, None, cache)
    with pytest.raises(ValueError, match=r"tokens must be \[4\] \(one per sentence and beam of the cache\), "
                                         r"got \(2,\)"):
        ours.decode_step(ids[:, 0], cache)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1000\), got 0..1000"):
        ours.decode_step(torch.tensor([0, 1, 2, 1000]), cache)


def test_bad_input_ids_are_named():
    model = random_model(Qwen2Config(**_small()), seed=0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1000\), got 3..1000"):
        model(torch.tensor([[3, 1000]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\], got shape \(2,\)"):
        model(torch.tensor([3, 4]))


def test_dtype_by_name(tmp_path):
    model = random_model("tiny", seed=0, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path, dtype="float32").lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="unsupported dtype 'fp8'"):
        load_pretrained(tmp_path, dtype="fp8")


def test_presets_build():
    model = random_model("tiny", seed=0)
    again = random_model("tiny", seed=0)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="unknown preset"):
        Qwen2Config.preset("gpt5")
