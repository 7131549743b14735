"""Multi-way parallel text (FLORES layout) and the English-centric jobs built on it.

A corpus folder holds one file per split and language, `root/{split}/{lang}.txt`, UTF-8, one
sentence per line, line i of every language being the same sentence. The embedded default is
FLORES-101 dev (997 lines) and devtest (1012 lines) for en, fr, de, ja, zh, vendored in
`modlora/assets/flores101/` (CC BY-SA 4.0, see the LICENSE and SOURCE.md there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .fileio import read_utf8

DEFAULT_ROOT = Path(__file__).parent / "assets" / "flores101"
DEFAULT_LANGS = ("en", "fr", "de", "ja", "zh")
PIVOT = "en"


def read_lines(path: str | Path) -> list[str]:
    """The stripped lines of a UTF-8 file (a leading byte-order mark dropped).

    Splits on "\\n" only: `str.splitlines` would also split on U+2028 and friends inside a
    sentence. `str.strip` is Unicode-aware, so it also drops the no-break spaces that end 48
    lines of FLORES fr devtest.
    """
    lines = read_utf8(path).removeprefix("\ufeff").split("\n")  # a byte-order mark is not text
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def load_split(
    split: str,
    langs: Sequence[str] = DEFAULT_LANGS,
    root: str | Path | None = None,
    limit: int | slice | None = None,
) -> dict[str, list[str]]:
    """Load `root/split/{lang}.txt` for every language: {lang: lines}.

    `root` defaults to the vendored FLORES-101. `limit` keeps the first `limit` lines, or the
    lines a `slice` selects, of every language (after checking the whole files line up).
    """
    if not langs or len(set(langs)) != len(langs):
        raise ValueError(f"langs must be distinct and non-empty, got {list(langs)}")
    folder = Path(root if root is not None else DEFAULT_ROOT) / split
    if not folder.is_dir():
        parent = folder.parent
        have = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise FileNotFoundError(f"no split folder {str(folder)!r} (splits in {str(parent)!r}: {have})")
    data: dict[str, list[str]] = {}
    for lang in langs:
        path = folder / f"{lang}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in folder.glob("*.txt"))
            raise FileNotFoundError(f"no file for language {lang!r}: {str(path)!r} (languages here: {have})")
        data[lang] = read_lines(path)
    counts = {str(folder / f"{lang}.txt"): len(lines) for lang, lines in data.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{p}: {n}" for p, n in counts.items())
        raise ValueError(f"parallel files of split {split!r} differ in line count: {listing}")
    if limit is not None:
        keep = limit if isinstance(limit, slice) else slice(0, limit)
        data = {lang: lines[keep] for lang, lines in data.items()}
    return data


def pairs(corpus: Mapping[str, Sequence[str]], src: str, tgt: str) -> list[tuple[str, str]]:
    """(source sentence, target sentence) pairs of one direction from a loaded split."""
    for lang in (src, tgt):
        if lang not in corpus:
            raise KeyError(f"language {lang!r} not loaded (have {sorted(corpus)})")
    return list(zip(corpus[src], corpus[tgt], strict=True))


def directions(langs: Sequence[str] = DEFAULT_LANGS) -> list[tuple[str, str]]:
    """Every ordered pair (src, tgt) with src != tgt: n * (n - 1) directions, row-major."""
    if len(set(langs)) != len(langs):
        raise ValueError(f"langs must be distinct, got {list(langs)}")
    return [(s, t) for s in langs for t in langs if s != t]


@dataclass(frozen=True)
class AdapterJob:
    """One English-centric adapter and the direction of the pairs it is trained on."""

    side: Literal["in", "out"]
    lang: str
    src: str
    tgt: str

    def __str__(self) -> str:
        return f"{self.side}[{self.lang}]"


def adapter_jobs(langs: Sequence[str] = DEFAULT_LANGS, pivot: str = PIVOT) -> list[AdapterJob]:
    """`in[X]` on X->pivot and `out[X]` on pivot->X for every X; the pivot's own pair on pivot->pivot.

    2n jobs for n languages, ordered in[X], out[X] per language in the order given.
    """
    if len(set(langs)) != len(langs):
        raise ValueError(f"langs must be distinct, got {list(langs)}")
    jobs: list[AdapterJob] = []
    for lang in langs:
        jobs.append(AdapterJob("in", lang, lang, pivot))
        jobs.append(AdapterJob("out", lang, pivot, lang))
    return jobs
