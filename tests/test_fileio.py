"""Atomic writes: the old file (or folder) or the new one, never half of one, with normal permissions."""

import os
from pathlib import Path

import pytest

from modlora.fileio import atomic_write, atomic_write_dir, atomic_write_json, read_json


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


def _folder(tmp_path, files: dict[str, str]):
    target = tmp_path / "adapter"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    return target


def _contents(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_atomic_folder_write_replaces_ours_and_keeps_other_files(tmp_path):
    target = _folder(tmp_path, {"weights": "old", "config.json": "old", "README.md": "mine"})
    atomic_write_dir(target, lambda d: [atomic_write_json(d / n, n) for n in ("weights", "config.json")])
    assert _contents(target) == {"weights": '"weights"\n', "config.json": '"config.json"\n', "README.md": "mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp or old folder left
    fresh = atomic_write_dir(tmp_path / "new" / "adapter", lambda d: atomic_write_json(d / "config.json", 1))
    assert _contents(fresh) == {"config.json": "1\n"}


def test_a_failed_folder_write_keeps_the_old_folder_whole(tmp_path):
    target = _folder(tmp_path, {"weights": "old", "config.json": "old"})

    def half_then_fail(folder) -> None:
        atomic_write_json(folder / "weights", "new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(target, half_then_fail)
    assert _contents(target) == {"weights": "old", "config.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_crash_between_the_renames_leaves_the_old_folder_aside(tmp_path, monkeypatch):
    target = _folder(tmp_path, {"weights": "old"})
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="power cut"):
        atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    (aside,) = tmp_path.iterdir()
    assert aside.name.startswith("adapter.old-") and _contents(aside) == {"weights": "old"}


def test_a_folder_write_over_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("a file")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        atomic_write_dir(tmp_path / "adapter", lambda d: None)
    assert (tmp_path / "adapter").read_text() == "a file"


def test_a_folder_save_keeps_the_folders_permissions(tmp_path):
    target = _folder(tmp_path, {"weights": "old"})
    os.chmod(target, 0o2750)
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert os.stat(target).st_mode & 0o7777 == 0o2750


@pytest.mark.parametrize("where", ["symlink", "working directory", "relative dot"])
def test_a_folder_that_cannot_be_renamed_is_written_in_place(tmp_path, monkeypatch, where):
    """Renaming a symlink would replace the link, not its folder; renaming the working directory
    (or a folder above it) would leave the process in a deleted one."""
    real = _folder(tmp_path, {"weights": "old", "README.md": "mine"})
    target = real
    if where == "symlink":
        target = tmp_path / "link"
        target.symlink_to(real, target_is_directory=True)
    else:
        monkeypatch.chdir(real)
        target = real if where == "working directory" else "."
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert _contents(real) == {"weights": '"new"\n', "README.md": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adapter", "link"] if where == "symlink" else ["adapter"])
    assert Path.cwd() == real or where == "symlink"
