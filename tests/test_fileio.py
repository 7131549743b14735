"""Atomic writes: the old file (or folder) or the new one, never half of one, with normal permissions."""

import errno
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


def test_a_symlinked_folder_has_its_real_folder_replaced_and_keeps_the_link(tmp_path):
    real = _folder(tmp_path, {"weights": "old", "README.md": "mine"})
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    atomic_write_dir(tmp_path / "link", lambda d: atomic_write_json(d / "weights", "new"))
    assert (tmp_path / "link").is_symlink()
    assert _contents(tmp_path / "link") == {"weights": '"new"\n', "README.md": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "link"]


@pytest.mark.parametrize("where", ["working directory", "relative dot", "through a symlinked parent"])
def test_the_working_directory_is_written_in_place(tmp_path, monkeypatch, where):
    """Renaming the working directory (or a folder above it) would leave the process in a deleted one,
    however the path names it."""
    real = _folder(tmp_path, {"weights": "old", "README.md": "mine", "shard": "old"})
    monkeypatch.chdir(real)
    (tmp_path / "parent").symlink_to(tmp_path, target_is_directory=True)
    target = {"working directory": real, "relative dot": ".",
              "through a symlinked parent": tmp_path / "parent" / "adapter"}
    atomic_write_dir(target[where], lambda d: atomic_write_json(d / "weights", "new"), drop=["shard"])
    assert _contents(real) == {"weights": '"new"\n', "README.md": "mine"}
    assert Path.cwd() == real and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "parent"]


def test_a_failed_write_in_place_keeps_the_old_files(tmp_path, monkeypatch):
    real = _folder(tmp_path, {"weights": "old", "config.json": "old"})
    monkeypatch.chdir(real)

    def half_then_fail(folder) -> None:
        atomic_write_json(folder / "weights", "new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_dir(real, half_then_fail)
    assert _contents(real) == {"weights": "old", "config.json": "old"}


@pytest.mark.parametrize("refused", ["rename", "mkdir"])
def test_a_folder_that_cannot_be_moved_is_written_in_place(tmp_path, monkeypatch, refused):
    """overlayfs refuses to rename a folder of a lower layer (EXDEV); a read-only parent refuses the
    folder beside it (EACCES). The save goes through all the same, in write order."""
    target = _folder(tmp_path, {"weights": "old", "config.json": "old", "README.md": "mine", "shard": "old"})
    real_rename, real_mkdir = os.rename, Path.mkdir

    def rename(src, dst):
        if refused == "rename" and Path(src) == target:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    def mkdir(self, *args, **kwargs):
        if refused == "mkdir" and self.parent == tmp_path and ".tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_mkdir(self, *args, **kwargs)

    published = []
    real_replace = os.replace
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    def replace(src, dst):
        if Path(dst).parent == target:
            published.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write = lambda d: [atomic_write_json(d / n, n) for n in ("weights", "config.json")]  # noqa: E731
    atomic_write_dir(target, write, drop=["shard"])
    assert _contents(target) == {"weights": '"weights"\n', "config.json": '"config.json"\n', "README.md": "mine"}
    assert published == ["weights", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_new_folder_holds_the_old_ones_other_files_when_it_appears(tmp_path, monkeypatch):
    """A reader must never find the folder without its tokenizer, even between the renames."""
    target = _folder(tmp_path, {"weights": "old", "tokenizer.json": "mine", "shard": "old"})
    (target / "sub").mkdir()
    (target / "sub" / "notes").write_text("kept")
    (target / "link").symlink_to("tokenizer.json")
    seen, real_rename = [], os.rename

    def rename(src, dst):
        if Path(dst) == target:
            seen.append(sorted(os.listdir(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"), drop=["shard"])
    assert seen == [["link", "sub", "tokenizer.json", "weights"]]
    assert (target / "sub" / "notes").read_text() == "kept" and (target / "link").read_text() == "mine"
    assert (target / "link").is_symlink() and os.readlink(target / "link") == "tokenizer.json"
