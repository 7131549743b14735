"""One tokenizer interface over `tokenizers` (`tokenizer.json`) and SentencePiece (`tokenizer.model`).

The Qwen2.5 chat format needs three special tokens, `<|endoftext|>`, `<|im_start|>` and `<|im_end|>`.
Written in text they always encode to their ids, never to the characters they are spelled with.
A vocabulary that lacks any of them gets it appended: its id is the next free id after the
vocabulary, in the order `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`. A model using such a
tokenizer needs embedding rows for those ids (`vocab_size` counts them).
"""

from __future__ import annotations

import functools
import gzip
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch

from .config import Qwen2Config
from .hub import resolve_model_path

DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "qwen2.5-tokenizer.json.gz"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


class _TokenizersBackend:
    """Byte-level BPE and friends through the `tokenizers` library (Qwen2.5's own format)."""

    def __init__(self, tok) -> None:
        from tokenizers import AddedToken

        # Padding and truncation are ours to do (Tokenizer.pad); a tokenizer.json may enable them.
        tok.no_padding()
        tok.no_truncation()
        # A chat token must encode as its one id. One that is missing, or only an ordinary vocabulary
        # entry (BPE would split it into pieces), becomes an added special token (keeping its id).
        loose = [t for t in CHAT_SPECIAL_TOKENS if tok.encode(t, add_special_tokens=False).ids != [tok.token_to_id(t)]]
        if loose:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in loose])
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A SentencePiece model with the chat special tokens handled outside it.

    SentencePiece does not know added tokens, so text is split on the chat special tokens and
    each piece in between is encoded on its own (SentencePiece adds its dummy-prefix space to
    each piece, and its normalizer may rewrite whitespace such as newlines). A special token
    that the model already has as a piece (e.g. a user-defined symbol) keeps that piece's id.
    """

    def __init__(self, sp) -> None:
        self.sp = sp
        n = sp.get_piece_size()
        self.special: dict[str, int] = {}
        for token in CHAT_SPECIAL_TOKENS:
            i = sp.piece_to_id(token)  # unknown pieces map to the unk id
            if sp.id_to_piece(i) != token:
                i = n + sum(1 for j in self.special.values() if j >= n)
            self.special[token] = i
        self.special_by_id = {i: t for t, i in self.special.items()}
        self.size = max(n, *(i + 1 for i in self.special.values()))
        self.split = re.compile("(" + "|".join(map(re.escape, CHAT_SPECIAL_TOKENS)) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self.split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_by_id:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.special_by_id[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        return self.special[token]

    @property
    def vocab_size(self) -> int:
        return self.size


def _backend(path: Path):
    if path.name.endswith(".json.gz"):
        from tokenizers import Tokenizer as HFTokenizer

        return _TokenizersBackend(HFTokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8")))
    if path.suffix == ".json":
        from tokenizers import Tokenizer as HFTokenizer

        return _TokenizersBackend(HFTokenizer.from_file(str(path)))
    import sentencepiece

    return _SentencePieceBackend(sentencepiece.SentencePieceProcessor(model_file=str(path)))


class Tokenizer:
    """Text <-> token ids, plus the chat special ids and left-padded batches.

    `encode` never adds special tokens on its own (no BOS/EOS): the chat format in
    `modlora.prompt` spells out every special token it needs.
    """

    def __init__(self, backend: _TokenizersBackend | _SentencePieceBackend, source: str) -> None:
        self._backend = backend
        self.source = source
        self.im_start_id: int = backend.token_to_id(IM_START)
        self.im_end_id: int = backend.token_to_id(IM_END)
        self.endoftext_id: int = backend.token_to_id(ENDOFTEXT)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (or `.json.gz`) or a SentencePiece `tokenizer.model`.

        `path` is a file, or a directory holding `tokenizer.json` (preferred, as Hugging Face
        checkpoints ship it) or `tokenizer.model`, or a hub id cached locally (:mod:`modlora.hub`).
        """
        path = resolve_model_path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.model"]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(f"no tokenizer in {str(path)!r}: looked for tokenizer.json and tokenizer.model")
            path = found[0]
        elif not path.is_file():
            raise FileNotFoundError(
                f"tokenizer path {str(path)!r} does not exist "
                "(expected a directory with tokenizer.json or tokenizer.model, or one of those files)"
            )
        try:
            return cls(_backend(path), str(path))
        except Exception as e:  # tokenizers and sentencepiece raise bare Exception/RuntimeError on a bad file
            raise ValueError(f"{path} is not a readable tokenizer: {' '.join(str(e).split())}") from e

    @staticmethod
    @functools.cache
    def default() -> Tokenizer:
        """The real Qwen2.5 tokenizer vendored in the package (loaded once, then shared)."""
        return Tokenizer.from_pretrained(DEFAULT_TOKENIZER)

    @staticmethod
    def for_model(path: str | Path | None) -> Tokenizer:
        """The tokenizer a checkpoint directory ships, else the vendored Qwen2.5 one (no model: the
        embedded preset; or a checkpoint written by ``save_pretrained``, which holds weights only).

        Raises:
            ValueError: the folder ships no tokenizer and its model's vocabulary is too small for
                Qwen2.5's ids (it is another model: its tokenizer must be in the folder).
        """
        path = path and resolve_model_path(path)
        if path and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return Tokenizer.from_pretrained(path)
        default = Tokenizer.default()
        if path and (path / "config.json").is_file():
            vocab = Qwen2Config.from_json(path).vocab_size
            if vocab < default.vocab_size:
                raise ValueError(f"{path} ships no tokenizer (tokenizer.json or tokenizer.model) and its vocabulary "
                                 f"({vocab}) is smaller than the vendored Qwen2.5 tokenizer's ({default.vocab_size}): "
                                 "put the model's own tokenizer in the folder")
        return default

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend.encode_batch(list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids (a list or a 1-D tensor) to text, dropping the special tokens unless told not to."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def pad(
        self, sequences: Sequence[Sequence[int]], side: Literal["left", "right"] = "left"
    ) -> dict[str, torch.Tensor]:
        """Pad id lists to one length with `pad_id`.

        Returns `input_ids` and `attention_mask` (1 on tokens, 0 on padding), LongTensors of
        shape [batch, longest]. Left padding (the default) is what generation needs: every row's
        last token sits in the last column.
        """
        if not sequences:
            raise ValueError("pad() needs at least one sequence")
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', not {side!r}")
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode_padded(self, texts: Sequence[str], side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
        """`encode_batch` then `pad`."""
        return self.pad(self.encode_batch(texts), side=side)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Generation stops at either: `<|im_end|>` (end of a chat turn) or `<|endoftext|>`."""
        return (self.im_end_id, self.endoftext_id)

    @property
    def pad_id(self) -> int:
        return self.endoftext_id

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (Qwen2.5: 151,665; its embedding has 151,936 rows)."""
        return self._backend.vocab_size
