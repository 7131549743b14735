"""Atomic writes: the old file or the new one, never half of one, with normal permissions."""

import os

import pytest

from modlora.fileio import atomic_write, atomic_write_json, read_json


def test_atomic_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"score": 1.5, "text": "日本語"})
    assert read_json(target) == {"score": 1.5, "text": "日本語"}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("new but incomp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


@pytest.mark.parametrize("content,message", [
    (b'{"a": ', "is not valid JSON"),
    (b'{"a": ' + b"9" * 5000 + b"}", "is not valid JSON: Exceeds the limit"),  # Python's int-parsing limit
    (b'{"a": "caf\xe9"}', "is not UTF-8 text"),
])
def test_read_json_names_a_broken_file(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"config.json {message}"):
        read_json(tmp_path / "config.json")
