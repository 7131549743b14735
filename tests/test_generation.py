"""Beam search and greedy decoding against transformers' generate on the same random weights (fp32)."""

import dataclasses

import pytest
import torch
from hf_reference import hf_model, save_hf

from modlora.adapters import AdapterController, LoraAdapter
from modlora.generation import SearchParams, _log_probs, generate, translate
from modlora.loading import load_pretrained
from modlora.model import Qwen2ForCausalLM

# A small vocabulary and a sharpened lm_head (x8): peaked, tie-free distributions. On these weights the
# model likes tokens 283 and 147 a few steps in, so with them as eos some beams end early and others
# run on (asserted in test_eos_reached_early_by_some_beams); 298 and 299 are rarely ever on top.
VOCAB, PAD = 300, 1
EARLY_EOS, LATE_EOS = (283, 147), (298, 299)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_model(seed=0, vocab_size=VOCAB)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8)
    hf.generation_config.update(pad_token_id=PAD, eos_token_id=list(EARLY_EOS), bos_token_id=0, use_cache=True)
    path = save_hf(hf, tmp_path_factory.mktemp("ckpt"))
    return hf, load_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of 9, 6 and 3 tokens, left-padded."""
    ids = torch.randint(10, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def compare(models, prompts, **kw):
    """Run both sides; assert identical tokens (and beam scores); return our ids and scores."""
    hf, ours = models
    ids, mask = prompts
    kw = {"max_new_tokens": 12, "eos_token_id": EARLY_EOS, "pad_token_id": PAD, **kw}
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, repetition_penalty=1.0,
                      return_dict_in_generate=True, output_scores=True,
                      **{**kw, "eos_token_id": list(kw["eos_token_id"])})
    got, scores = generate(ours, ids, mask, return_scores=True, **kw)
    assert torch.equal(got, ref.sequences), f"\nours {got[:, ids.shape[1]:]}\nhf   {ref.sequences[:, ids.shape[1]:]}"
    if kw.get("num_beams", 5) > 1:
        torch.testing.assert_close(scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    return got, scores


@pytest.mark.parametrize("num_beams", [1, 2, 5])
def test_num_beams(models, prompts, num_beams):
    compare(models, prompts, num_beams=num_beams)


@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 2.0])
def test_length_penalty(models, prompts, length_penalty):
    compare(models, prompts, num_beams=5, length_penalty=length_penalty)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_early_stopping(models, prompts, early_stopping):
    compare(models, prompts, num_beams=5, early_stopping=early_stopping, max_new_tokens=20)


@pytest.mark.parametrize("eos", [EARLY_EOS, EARLY_EOS[:1], LATE_EOS], ids=["two", "one", "late"])
def test_eos_ids(models, prompts, eos):
    compare(models, prompts, num_beams=3, eos_token_id=eos)


def test_num_return_sequences(models, prompts):
    got, scores = compare(models, prompts, num_beams=5, num_return_sequences=2)
    assert got.shape[0] == 6
    assert (scores.view(3, 2)[:, 0] >= scores.view(3, 2)[:, 1]).all()


def test_min_new_tokens(models, prompts):
    got, _ = compare(models, prompts, num_beams=4, min_new_tokens=8)
    assert not torch.isin(got[:, 9:17], torch.tensor(EARLY_EOS)).any()


def test_eos_reached_early_by_some_beams(models, prompts):
    got, _ = compare(models, prompts, num_beams=5, num_return_sequences=5, max_new_tokens=12)
    new = got[:, 9:]
    ended = torch.isin(new, torch.tensor(EARLY_EOS))
    first_eos = torch.where(ended.any(1), ended.int().argmax(1), new.shape[1])
    # Some hypotheses ended before max length, some ran to it: the batch is ragged and padded.
    assert (first_eos < new.shape[1] - 1).any() and (first_eos == new.shape[1]).any()
    assert (new[first_eos < new.shape[1] - 1][:, -1] == PAD).all()


def test_single_prompt_without_mask_and_left_padding_is_neutral(models, prompts):
    """A padded row decodes as the same prompt alone (left padding changes no token)."""
    _, ours = models
    ids, mask = prompts
    batch = generate(ours, ids, mask, num_beams=5, max_new_tokens=10, eos_token_id=LATE_EOS, pad_token_id=PAD)
    alone = generate(ours, ids[2:, 6:], num_beams=5, max_new_tokens=10, eos_token_id=LATE_EOS, pad_token_id=PAD)
    assert torch.equal(batch[2, 9:], alone[0, 3:])


def test_without_a_mask_the_pad_id_marks_padding_as_in_transformers(models, prompts):
    """transformers infers the mask from the pad id when it occurs in the prompts and is no eos id."""
    ids, _ = prompts
    hf, ours = models
    kw = {"num_beams": 3, "max_new_tokens": 8, "eos_token_id": LATE_EOS, "pad_token_id": PAD}
    ref = hf.generate(ids, do_sample=False, repetition_penalty=1.0, **{**kw, "eos_token_id": list(LATE_EOS)})
    assert torch.equal(generate(ours, ids, None, **kw), ref)
    pad_is_eos = {**kw, "eos_token_id": (PAD, *LATE_EOS)}  # then every token counts, padding too
    ref = hf.generate(ids, do_sample=False, repetition_penalty=1.0, **{**pad_is_eos, "eos_token_id": [PAD, *LATE_EOS]})
    assert torch.equal(generate(ours, ids, None, **pad_is_eos), ref)


@pytest.mark.parametrize("where", ["right", "inner"])
def test_prompts_padded_elsewhere_than_on_the_left_are_refused(models, prompts, where):
    """Right or inner padding put a pad at a prompt's last position: its first token was predicted
    from there, silently wrong (transformers only warns)."""
    _, ours = models
    ids, mask = prompts
    mask = mask.clone()
    if where == "right":
        mask[1] = mask[1].flip(0)
    else:
        mask[2, 7] = 0
    with pytest.raises(ValueError, match=r"generate takes left-padded prompts: row [12] has padding after"):
        generate(ours, ids, mask, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    inner = ids.clone()
    inner[0, 4] = PAD  # the pad id inside a prompt, no mask: inferred as inner padding
    with pytest.raises(ValueError, match="row 0 has padding after its first token"):
        generate(ours, inner, None, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"attention_mask \(3, 8\) must have input_ids' shape \(3, 9\)"):
        generate(ours, ids, mask[:, 1:], eos_token_id=EARLY_EOS, pad_token_id=PAD)


def test_argument_errors(models, prompts):
    _, ours = models
    ids, mask = prompts
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(ours, ids, mask, num_beams=2, num_return_sequences=3, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(ours, ids, mask, early_stopping="sometimes", eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="num_beams must be a positive integer, got 0"):
        SearchParams(num_beams=0)
    with pytest.raises(ValueError, match="row_pair needs adapters="):
        generate(ours, ids, mask, row_pair=torch.tensor([0, 0, 0]), eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"row_pair must be a \[B\] integer tensor, got list"):
        generate(ours, ids, mask, row_pair=[0, 0, 0], eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, prompt length\], got shape \(9,\)"):
        generate(ours, ids[0], None, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="eos_token_id must be an id or a non-empty sequence"):
        generate(ours, ids, mask, eos_token_id=[], pad_token_id=PAD)


class CharTokenizer:
    """Stands in for the Qwen tokenizer on a 300-token model: one id per character (ids 32..126)."""

    im_end_id, eos_ids, pad_id = 283, (283, 147), PAD

    def encode(self, text):
        return [min(ord(c), 126) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) if 32 <= i <= 126 else "#" for i in ids)

    def pad(self, seqs):
        width = max(map(len, seqs))
        ids = torch.tensor([[PAD] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def char_prompts(monkeypatch):
    # The real prompt is ~40 Qwen tokens; a short stand-in keeps the test small.
    monkeypatch.setattr("modlora.generation.translation_prompt_ids",
                        lambda tok, src, tgt, text: tok.encode(f"{src}>{tgt}:{text}"))


def test_translate_restores_order_and_skips_empty_lines(models, char_prompts):
    _, ours = models
    texts = ["a short one", "", "a much longer sentence to translate", "   ", "mid length"]
    kw = dict(num_beams=3, max_new_tokens=6)
    batched = translate(ours, CharTokenizer(), texts, "fr", "de", batch_size=2, **kw)
    alone = [translate(ours, CharTokenizer(), [t], "fr", "de", batch_size=1, **kw)[0] for t in texts]
    assert batched == alone
    assert batched[1] == batched[3] == ""
    assert all(batched[i] for i in (0, 2, 4))
    mixed = translate(ours, CharTokenizer(), texts, ["fr", "en", "de", "en", "ja"], "zh", batch_size=3, **kw)
    assert mixed[4] == translate(ours, CharTokenizer(), texts[4:], "ja", "zh", **kw)[0]


def test_translate_pair_ids_pick_each_texts_pair(models, char_prompts):
    """pair_ids index the input texts, not the length-sorted batch rows."""
    _, ours = models
    pairs = [(_adapter(ours, 1), _adapter(ours, 2), 0.3, 0.7), (_adapter(ours, 3), _adapter(ours, 4), 0.6, 0.4)]
    texts = ["short", "a much longer sentence", "mid length one", "tiny"]
    pair_ids = [1, 0, 1, 0]
    kw = dict(num_beams=2, max_new_tokens=6, batch_size=4)
    ctl = AdapterController(ours)
    try:
        alone = []
        for a_in, a_out, w_in, w_out in pairs:
            ctl.set_adapters(a_in, a_out, w_in=w_in, w_out=w_out)
            alone.append(translate(ours, CharTokenizer(), texts, "fr", "de", **kw))
        ctl.set_adapter_pairs(pairs, "output")
        mixed = translate(ours, CharTokenizer(), texts, "fr", "de", pair_ids=pair_ids, adapters=ctl, **kw)
    finally:
        ctl.clear()
    assert sum(a != b for a, b in zip(*alone, strict=True)) >= 2  # the pairs translate differently
    assert mixed == [alone[p][i] for i, p in enumerate(pair_ids)]


@pytest.mark.parametrize("field,value,message", [
    ("num_beams", 2.5, "num_beams must be an integer, got 2.5"),
    ("num_beams", "5", "num_beams must be an integer, got '5' (str)"),
    ("num_beams", True, "num_beams must be an integer, got True"),
    ("max_new_tokens", 1.5, "max_new_tokens must be an integer, got 1.5"),
    ("min_new_tokens", -1, "min_new_tokens must be >= 0, got -1"),
    ("length_penalty", float("nan"), "length_penalty must be a finite number, got nan"),
    ("length_penalty", float("inf"), "length_penalty must be a finite number, got inf"),
])
def test_search_settings_are_checked_by_type_and_range(field, value, message):
    with pytest.raises(ValueError) as e:
        SearchParams(**{field: value})
    assert message in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
    ({"max_new_tokens": 512}, "max_new_tokens 512 leaves no room for a prompt in the model's context of 512"),
    ({"src": "xx"}, "unknown language code 'xx'"),
])
def test_translate_checks_its_arguments_before_any_text(models, kwargs, message):
    """Even where every text is empty (nothing would run), so a bad call never passes silently."""
    _, ours = models
    args = {"src": "fr", "tgt": "de", **kwargs}
    with pytest.raises(ValueError, match=message):
        translate(ours, CharTokenizer(), ["", " "], args.pop("src"), args.pop("tgt"), **args)


def test_translate_wants_a_list_of_texts(models):
    with pytest.raises(TypeError, match="a list of strings"):
        translate(models[1], CharTokenizer(), "Le chat dort.", "fr", "de")


def test_translate_truncates_overlong_text_with_a_warning(models, char_prompts):
    _, ours = models
    small = Qwen2ForCausalLM(dataclasses.replace(ours.config, max_position_embeddings=40))
    small.load_state_dict(ours.state_dict())
    with pytest.warns(UserWarning, match="text 1 has 46 prompt tokens.*truncated"):
        out = translate(small, CharTokenizer(), ["ok", "x" * 40], "fr", "de", num_beams=2, max_new_tokens=10)
    assert len(out) == 2
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        translate(small, CharTokenizer(), ["ok"], "fr", "de", max_new_tokens=39)


def _adapter(model, seed: int):
    """PEFT's init with B made random too, so the adapter changes the output."""
    a = LoraAdapter.init(model, rank=4, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, B in a.tensors.values():
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)
    return a


@pytest.mark.parametrize("strategy,combination", [("output", "cat"), ("ab", "linear")])
def test_adapter_pair_matches_peft(models, prompts, strategy, combination):
    """A pair against PEFT's weighted adapter: `output` is `cat`, `ab` is `linear` (docs/design.md, eq. 3 and 4)."""
    import copy

    from peft import LoraConfig, get_peft_model

    hf, ours = models
    a_in, a_out = _adapter(ours, 1), _adapter(ours, 2)
    cfg = lambda a: LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=list(a.target_modules))
    peft = get_peft_model(copy.deepcopy(hf), cfg(a_in), adapter_name="in")  # peft wraps in place
    peft.add_adapter("out", cfg(a_out))
    with torch.no_grad():
        for name, a in (("in", a_in), ("out", a_out)):
            for module, (A, B) in a.tensors.items():
                layer = peft.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    peft.add_weighted_adapter(["in", "out"], [0.3, 0.7], "pair", combination_type=combination)
    peft.set_adapter("pair")
    ctl = AdapterController(ours)
    ctl.set_adapters(a_in, a_out, w_in=0.3, w_out=0.7, strategy=strategy)
    try:
        got = compare((peft.eval(), ours), prompts, num_beams=5)[0]
    finally:
        ctl.clear()
    base = generate(ours, *prompts, num_beams=5, max_new_tokens=12, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    assert not torch.equal(got, base)  # the adapters did change the translation


@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_mixed_directions_equal_each_direction_alone(models, prompts, strategy):
    _, ours = models
    pairs = [(_adapter(ours, 1), _adapter(ours, 2), 0.3, 0.7), (_adapter(ours, 3), _adapter(ours, 4), 0.6, 0.4)]
    ids, mask = prompts
    kw = dict(num_beams=5, max_new_tokens=12, eos_token_id=EARLY_EOS, pad_token_id=PAD)
    ctl = AdapterController(ours)
    try:
        alone = []
        for a_in, a_out, w_in, w_out in pairs:
            ctl.set_adapters(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
            alone.append(generate(ours, ids, mask, **kw))
        ctl.set_adapter_pairs(pairs, strategy)
        row_pair = torch.tensor([1, 0, 1])
        mixed = generate(ours, ids, mask, row_pair=row_pair, adapters=ctl, **kw)
    finally:
        ctl.clear()
    assert not torch.equal(alone[0], alone[1])
    for row, pair in enumerate(row_pair.tolist()):
        assert torch.equal(mixed[row], alone[pair][row])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_log_probs_are_transformers_fp32_log_softmax_bit_for_bit(dtype):
    """Computed without an fp32 copy of the logits, yet equal to log_softmax(logits.float()), as
    transformers scores beams (Qwen2.5's vocabulary, logits at several scales)."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 3.0, 40.0):
        logits = (torch.randn(5, 151936, generator=g) * scale).to(dtype)
        assert torch.equal(_log_probs(logits, 3, 0, torch.tensor([7])), torch.log_softmax(logits.float(), -1))
    masked = _log_probs(logits, 0, 1, torch.tensor([7, 9]))
    assert masked[:, [7, 9]].eq(float("-inf")).all() and torch.isfinite(masked[:, :7]).all()
