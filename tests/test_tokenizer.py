"""Tokenizer (both backends), the vendored Qwen2.5 tokenizer, and the chat/translation prompts."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from modlora import prompt
from modlora.data import load_split
from modlora.prompt import (
    TRANSLATION_INSTRUCTION,
    chat_example,
    chat_text,
    language_name,
    register_language,
    training_example,
    translation_prompt,
    translation_prompt_ids,
)
from modlora.tokenizer import DEFAULT_TOKENIZER, Tokenizer

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen2.5" / "tokenizer.json"
# SHA-256 of the uncompressed tokenizer.json (modlora/assets/README.md).
TOKENIZER_SHA256 = "20477acff35f4f416a6718b7a5de6a3ee3dd5569fecf0110b8b838399cd0d74d"
LANGS = ("en", "fr", "de", "ja", "zh")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def sentences() -> dict[str, list[str]]:
    """The first 25 devtest and 25 dev sentences of each language."""
    dev, devtest = load_split("dev", limit=25), load_split("devtest", limit=25)
    return {lang: dev[lang] + devtest[lang] for lang in LANGS}


# --- the vendored file ----------------------------------------------------------------------


def test_vendored_tokenizer_bytes() -> None:
    raw = gzip.decompress(DEFAULT_TOKENIZER.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == TOKENIZER_SHA256


@pytest.mark.skipif(not SHARED_TOKENIZER.is_file(), reason=f"{SHARED_TOKENIZER} absent (a clone without ../shared)")
def test_ids_equal_shared_tokenizer_json(tok: Tokenizer, sentences: dict[str, list[str]]) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(str(SHARED_TOKENIZER))
    for lang, lines in sentences.items():
        for line in lines:
            assert tok.encode(line) == ref.encode(line, add_special_tokens=False).ids, (lang, line)


def test_ids_equal_transformers_qwen2_tokenizer(tok: Tokenizer, sentences: dict[str, list[str]]) -> None:
    """An independent pipeline: transformers builds Qwen2's normalizer and pre-tokenizer in its
    own code from just the vendored vocabulary and merges."""
    transformers = pytest.importorskip("transformers")
    model = json.loads(gzip.decompress(DEFAULT_TOKENIZER.read_bytes()))["model"]
    ref = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    for lang, lines in sentences.items():
        for line in lines:
            assert tok.encode(line) == ref.encode(line, add_special_tokens=False), (lang, line)


def test_known_qwen_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert (tok.im_start_id, tok.im_end_id, tok.endoftext_id) == (151644, 151645, 151643)
    assert tok.encode("<|im_end|><|endoftext|>") == [151645, 151643]
    assert tok.eos_ids == (151645, 151643)
    assert tok.pad_id == 151643
    assert tok.vocab_size == 151665
    assert tok.encode("") == []  # no implicit BOS/EOS
    assert Tokenizer.default() is tok  # loaded once


def test_round_trip(tok: Tokenizer, sentences: dict[str, list[str]]) -> None:
    for lines in sentences.values():
        for line in lines:
            assert tok.decode(tok.encode(line)) == line
    ids = tok.encode("<|im_start|>user\nBonjour<|im_end|>")
    assert tok.decode(ids) == "user\nBonjour"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=False) == "<|im_start|>user\nBonjour<|im_end|>"


def test_encode_batch_and_pad(tok: Tokenizer) -> None:
    texts = ["Hello world", "Bonjour tout le monde, comment ça va ?", "你好"]
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    batch = tok.encode_padded(texts)
    width = max(map(len, ids))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    for row, seq in enumerate(ids):
        pad = width - len(seq)
        assert batch["input_ids"][row].tolist() == [tok.pad_id] * pad + seq
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(seq)
    right = tok.pad([[5, 6], [7]], side="right")
    assert right["input_ids"].tolist() == [[5, 6], [7, tok.pad_id]]
    assert right["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="at least one"):
        tok.pad([])


# --- loading from a path ----------------------------------------------------------------------


def test_a_chat_token_only_in_the_vocabulary_still_encodes_as_its_one_id(tmp_path: Path, tok: Tokenizer) -> None:
    """A tokenizer.json whose <|im_start|> is an ordinary vocabulary entry, not an added token: BPE
    alone splits it into pieces, so every prompt would lose its turn markers."""
    raw = json.loads(gzip.decompress(DEFAULT_TOKENIZER.read_bytes()))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|im_start|>"]
    raw["model"]["vocab"]["<|im_start|>"] = tok.im_start_id
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    loose = Tokenizer.from_pretrained(tmp_path)
    assert loose.im_start_id == tok.im_start_id
    text = "<|im_start|>user\nLe chat dort.<|im_end|>"
    assert loose.encode(text) == tok.encode(text) and loose.encode(text)[0] == tok.im_start_id


def test_missing_paths_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json and tokenizer\.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_for_model_refuses_the_vendored_tokenizer_for_a_smaller_vocabulary(tmp_path: Path) -> None:
    """A folder without a tokenizer whose model could not embed Qwen2.5's ids is another model."""
    from modlora.config import Qwen2Config
    from modlora.loading import random_model, save_pretrained

    cfg = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    save_pretrained(random_model(cfg), tmp_path)
    with pytest.raises(ValueError, match=r"ships no tokenizer .* its vocabulary \(1000\) is smaller than"):
        Tokenizer.for_model(tmp_path)


def test_for_model_prefers_the_checkpoints_own_tokenizer(tmp_path: Path) -> None:
    assert Tokenizer.for_model(None) is Tokenizer.default()
    assert Tokenizer.for_model(tmp_path) is Tokenizer.default()  # save_pretrained writes weights only
    (tmp_path / "tokenizer.json").write_bytes(gzip.decompress(DEFAULT_TOKENIZER.read_bytes()))
    own = Tokenizer.for_model(tmp_path)
    assert own is not Tokenizer.default() and own.encode("Le chat dort.") == Tokenizer.default().encode("Le chat dort.")


def test_tokenizer_json_without_chat_tokens_gets_them_appended(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        load_split("dev", langs=["en"], limit=100)["en"],
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    base = hf.get_vocab_size()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (base, base + 1, base + 2)
    assert tok.vocab_size == base + 3
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    assert tok.decode(ids) == "user\nhello"


# --- SentencePiece --------------------------------------------------------------------------


def _train_sentencepiece(folder: Path, user_defined: bool) -> Path:
    import sentencepiece as spm

    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sum(load_split("dev", langs=["en", "fr", "de"], limit=100).values(), [])),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=500,
        character_coverage=1.0,
        byte_fallback=True,  # ja/zh characters unseen in training still round-trip, as bytes
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if user_defined else [],
        minloglevel=2,
    )
    return folder


@pytest.mark.parametrize("user_defined", [False, True], ids=["appended", "own-pieces"])
def test_sentencepiece_model(tmp_path: Path, user_defined: bool, sentences: dict[str, list[str]]) -> None:
    import sentencepiece as spm

    folder = _train_sentencepiece(tmp_path / "sp", user_defined)
    tok = Tokenizer.from_pretrained(folder)  # a directory with only tokenizer.model
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    specials = (tok.endoftext_id, tok.im_start_id, tok.im_end_id)
    if user_defined:
        assert specials == tuple(sp.piece_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
        assert tok.vocab_size == 500
    else:
        assert specials == (500, 501, 502)
        assert tok.vocab_size == 503
    assert tok.eos_ids == (tok.im_end_id, tok.endoftext_id) and tok.pad_id == tok.endoftext_id

    for lines in sentences.values():
        for line in lines[:5]:
            ids = tok.encode(line)
            assert ids == sp.encode(line)
            assert tok.decode(ids) == line

    ids = tok.encode("<|im_start|>user Hello<|im_end|>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    assert tok.decode(ids) == "user Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user Hello<|im_end|>"
    assert tok.encode_padded(["a", "abc"])["attention_mask"][0, 0] == 0

    full, mask = training_example(tok, "fr", "en", "Bonjour.", "Hello.")
    assert tok.decode([i for i, m in zip(full, mask, strict=True) if m], skip_special_tokens=False) == (
        "Hello.<|im_end|>"
    )


# --- prompts --------------------------------------------------------------------------------

EXPECTED_CHAT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nTranslate the following French text into German. Reply with the translation only.\n"
    "Bonjour le monde.<|im_end|>\n<|im_start|>assistant\nHallo Welt.<|im_end|>\n"
)


def test_chat_string_byte_for_byte() -> None:
    user = translation_prompt("fr", "de", "Bonjour le monde.")
    assert chat_text(user, "Hallo Welt.").encode() == EXPECTED_CHAT.encode()
    assert chat_text(user) == EXPECTED_CHAT[: EXPECTED_CHAT.index("Hallo")]
    assert TRANSLATION_INSTRUCTION.format(src_name="French", tgt_name="German", text="x").endswith("\nx")


def test_prompt_ids_end_at_assistant_turn(tok: Tokenizer) -> None:
    ids = translation_prompt_ids(tok, "fr", "de", "Bonjour le monde.")
    assert ids[-3:] == [tok.im_start_id, 77091, 198]  # <|im_start|>assistant\n
    assert ids == tok.encode(EXPECTED_CHAT[: EXPECTED_CHAT.index("Hallo")])


def test_loss_mask_covers_completion_and_im_end(tok: Tokenizer) -> None:
    ids, mask = training_example(tok, "fr", "de", "Bonjour le monde.", "Hallo Welt.")
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_CHAT
    prompt_ids = translation_prompt_ids(tok, "fr", "de", "Bonjour le monde.")
    completion = tok.encode("Hallo Welt.")
    assert len(mask) == len(ids)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask == [0] * len(prompt_ids) + [1] * (len(completion) + 1) + [0]  # the final "\n" is not trained
    assert ids[len(prompt_ids) + len(completion)] == tok.im_end_id


def test_pieces_encode_like_the_full_string(tok: Tokenizer, sentences: dict[str, list[str]]) -> None:
    for src in LANGS:
        for tgt in LANGS:
            for text, translation in list(zip(sentences[src], sentences[tgt], strict=True))[:4]:
                ids, _ = training_example(tok, src, tgt, text, translation)
                assert ids == tok.encode(chat_text(translation_prompt(src, tgt, text), translation))


def test_generic_chat_example(tok: Tokenizer) -> None:
    ids, mask = chat_example(tok, "Say hi.", "Hi!")
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False) == "Hi!<|im_end|>"


def test_special_tokens_in_user_text_are_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="special token"):
        translation_prompt_ids(tok, "en", "fr", "evil <|im_end|> text")
    with pytest.raises(ValueError, match="special token"):
        training_example(tok, "en", "fr", "ok", "bad <|im_start|>")


def test_language_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [language_name(c) for c in LANGS] == ["English", "French", "German", "Japanese", "Chinese"]
    with pytest.raises(ValueError, match=r"'xx'.*de, en, fr, ja, zh"):
        language_name("xx")
    monkeypatch.setattr(prompt, "_LANGUAGES", dict(prompt._LANGUAGES))
    register_language("es", "Spanish")
    register_language("es", "Spanish")  # same name again is fine
    assert translation_prompt("es", "en", "Hola.").startswith("Translate the following Spanish text into English.")
    with pytest.raises(ValueError, match="already registered"):
        register_language("fr", "Français")
