"""The vendored FLORES-101 files, the parallel-folder loader, directions and adapter jobs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modlora.data import DEFAULT_LANGS, DEFAULT_ROOT, AdapterJob, adapter_jobs, directions, load_split, pairs


def test_vendored_flores_matches_sha256sums() -> None:
    listed = {}
    for line in (DEFAULT_ROOT / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    vendored = {p.relative_to(DEFAULT_ROOT).as_posix() for p in DEFAULT_ROOT.glob("*/*.txt")}
    assert vendored == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((DEFAULT_ROOT / name).read_bytes()).hexdigest() == digest, name
    assert "Attribution-ShareAlike 4.0 International" in (DEFAULT_ROOT / "LICENSE").read_text()
    assert (DEFAULT_ROOT / "SOURCE.md").is_file()


@pytest.mark.parametrize(("split", "count"), [("dev", 997), ("devtest", 1012)])
def test_default_counts(split: str, count: int) -> None:
    data = load_split(split)
    assert list(data) == list(DEFAULT_LANGS)
    assert {lang: len(lines) for lang, lines in data.items()} == dict.fromkeys(DEFAULT_LANGS, count)
    assert all(line and line == line.strip() for lines in data.values() for line in lines)


def test_lines_are_stripped() -> None:
    raw = (DEFAULT_ROOT / "dev" / "zh.txt").read_text(encoding="utf-8").split("\n")[:-1]
    padded = [i for i, line in enumerate(raw) if line != line.strip()]
    assert len(padded) == 5  # SOURCE.md: 5 zh dev lines carry extra spaces
    zh = load_split("dev", langs=["zh"])["zh"]
    assert all(zh[i] == raw[i].strip() for i in padded)


def _corpus(root: Path, split: str, files: dict[str, str]) -> Path:
    (root / split).mkdir(parents=True)
    for lang, text in files.items():
        (root / split / f"{lang}.txt").write_text(text, encoding="utf-8")
    return root


def test_custom_folder(tmp_path: Path) -> None:
    # U+2028 is inside a sentence, not a line break; \r\n endings and blanks are stripped.
    root = _corpus(tmp_path, "train", {"xx": "  a b \r\nc\u2028d\n", "yy": "A B\nCD"})
    assert load_split("train", ["xx", "yy"], root=root) == {"xx": ["a b", "c\u2028d"], "yy": ["A B", "CD"]}


def test_a_lone_carriage_return_is_no_line_break(tmp_path: Path) -> None:
    """Lines as sacrebleu reads them (``newline="\\n"``): a stray "\\r" in each of two files kept
    their line counts equal but shifted every later pair when read as a break."""
    root = _corpus(tmp_path, "train", {"xx": "A1\rA1b\nA2\nA3\n", "yy": "B1\nB2\rB2b\nB3\n"})
    got = load_split("train", ["xx", "yy"], root=root)
    for lang in ("xx", "yy"):
        with open(root / "train" / f"{lang}.txt", encoding="utf-8", newline="\n") as f:
            assert got[lang] == [line.strip() for line in f]
    assert got == {"xx": ["A1\rA1b", "A2", "A3"], "yy": ["B1", "B2\rB2b", "B3"]}


def test_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    root = _corpus(tmp_path, "train", {"xx": "\ufeffHello\n\ufeffagain\n", "yy": "a\nb\n"})
    assert load_split("train", ["xx", "yy"], root=root)["xx"] == ["Hello", "\ufeffagain"]


def test_limit_and_slice() -> None:
    full = load_split("devtest", ["en", "fr"])
    assert load_split("devtest", ["en", "fr"], limit=3) == {k: v[:3] for k, v in full.items()}
    assert load_split("devtest", ["en", "fr"], limit=slice(10, 20, 5)) == {k: v[10:20:5] for k, v in full.items()}


def test_mismatched_counts_name_files_and_counts(tmp_path: Path) -> None:
    root = _corpus(tmp_path, "dev", {"aa": "1\n2\n3\n", "bb": "1\n2\n"})
    with pytest.raises(ValueError, match=r"aa\.txt: 3, .*bb\.txt: 2"):
        load_split("dev", ["aa", "bb"], root=root)


def test_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    root = _corpus(tmp_path, "dev", {"aa": "1\n", "bb": "1\n"})
    (root / "dev" / "bb.txt").write_bytes(b"caf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match=r"bb\.txt is not UTF-8 text"):
        load_split("dev", ["aa", "bb"], root=root)


def test_missing_language_and_split() -> None:
    with pytest.raises(FileNotFoundError, match=r"'xx'.*xx\.txt.*\['de', 'en', 'fr', 'ja', 'zh'\]"):
        load_split("dev", ["en", "xx"])
    with pytest.raises(FileNotFoundError, match=r"train.*\['dev', 'devtest'\]"):
        load_split("train")
    with pytest.raises(ValueError, match="distinct"):
        load_split("dev", ["en", "en"])


def test_pairs() -> None:
    data = load_split("dev", ["en", "de"], limit=4)
    assert pairs(data, "de", "en") == list(zip(data["de"], data["en"], strict=True))
    with pytest.raises(KeyError, match="'ja' not loaded"):
        pairs(data, "ja", "en")


def test_directions() -> None:
    dirs = directions()
    assert len(dirs) == 20 == len(set(dirs))
    assert all(s != t for s, t in dirs)
    assert dirs[:4] == [("en", "fr"), ("en", "de"), ("en", "ja"), ("en", "zh")]
    assert directions(["en", "fr"]) == [("en", "fr"), ("fr", "en")]


def test_adapter_jobs() -> None:
    jobs = adapter_jobs()
    assert len(jobs) == 10
    assert [str(j) for j in jobs[:4]] == ["in[en]", "out[en]", "in[fr]", "out[fr]"]
    by_name = {str(j): j for j in jobs}
    assert by_name["in[en]"] == AdapterJob("in", "en", "en", "en")
    assert by_name["out[en]"] == AdapterJob("out", "en", "en", "en")
    for lang in ("fr", "de", "ja", "zh"):
        assert (by_name[f"in[{lang}]"].src, by_name[f"in[{lang}]"].tgt) == (lang, "en")
        assert (by_name[f"out[{lang}]"].src, by_name[f"out[{lang}]"].tgt) == ("en", lang)
