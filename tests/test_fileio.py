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
    assert not any(p.name.startswith(".modlora-stage-") for p in target.iterdir())
    fresh = atomic_write_dir(tmp_path / "new" / "adapter", lambda d: atomic_write_json(d / "config.json", 1))
    assert _contents(fresh) == {"config.json": "1\n"}


def test_safetensors_are_written_from_the_tensors_and_a_system_error_names_the_file(tmp_path, monkeypatch):
    """The file equals what ``safetensors.torch.save`` serialises; safetensors' own error for a full
    disk comes out as the OSError ENOSPC naming the target, and no temp file is left."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from modlora.fileio import atomic_write_safetensors

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    atomic_write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == safetensors.torch.save(tensors, {"format": "pt"})

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="no space left on device") as e:
        atomic_write_safetensors(tmp_path / "y.safetensors", tensors)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_folder_write_changes_nothing(tmp_path, error):
    target = _folder(tmp_path, {"weights": "old", "config.json": "old", "shard": "old"})

    def half_then_fail(folder) -> None:
        atomic_write_json(folder / "weights", "new")
        raise error

    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        atomic_write_dir(target, half_then_fail, drop=["shard"])
    assert _contents(target) == {"weights": "old", "config.json": "old", "shard": "old"}


def test_the_marker_lands_last_and_drop_removes_only_old_files(tmp_path, monkeypatch):
    target = _folder(tmp_path, {"weights": "old", "config.json": "old", "shard": "old", "README.md": "mine"})
    (target / "folder").mkdir()
    events, real_replace, real_unlink = [], os.replace, os.unlink

    def replace(src, dst):
        if Path(dst).parent == target:
            events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    def unlink(path, *args, **kwargs):
        if Path(path).parent == target:
            events.append(("unlink", Path(path).name))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    write = lambda d: [atomic_write_json(d / n, n) for n in ("config.json", "weights")]  # noqa: E731
    atomic_write_dir(target, write, drop=["shard", "weights", "folder"], last=["config.json"])
    # The marker last, whatever the order written; the old form's files only once the new one is whole.
    assert events == [("replace", "weights"), ("replace", "config.json"), ("unlink", "shard")]
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "folder", "weights"]  # a folder is not dropped
    assert (target / "weights").read_text() == '"weights"\n' and (target / "README.md").read_text() == "mine"


@pytest.mark.parametrize("where", ["symlink", "working directory", "relative dot", "through a symlinked parent"])
def test_any_folder_is_written_where_it_is(tmp_path, monkeypatch, where):
    """Nothing but files is renamed: a symlinked folder keeps its link, and the working directory
    (however the path names it) stays the process's."""
    real = _folder(tmp_path, {"weights": "old", "README.md": "mine"})
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "parent").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.chdir(real)
    target = {"symlink": tmp_path / "link", "working directory": real, "relative dot": ".",
              "through a symlinked parent": tmp_path / "parent" / "adapter"}[where]
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert _contents(real) == {"weights": '"new"\n', "README.md": "mine"}
    assert (tmp_path / "link").is_symlink() and Path.cwd() == real
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "link", "parent"]


def test_a_stale_stage_is_removed_and_a_users_look_alike_kept(tmp_path):
    target = _folder(tmp_path, {"weights": "old"})
    (target / ".modlora-stage-0123abcd").mkdir()  # what a killed write leaves
    (target / ".tmp-0123abcd").mkdir()  # the user's own
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert sorted(os.listdir(target)) == [".tmp-0123abcd", "weights"]


def test_a_folder_write_over_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("a file")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        atomic_write_dir(tmp_path / "adapter", lambda d: None)
    assert (tmp_path / "adapter").read_text() == "a file"


def test_a_string_for_a_list_of_names_is_refused(tmp_path):
    with pytest.raises(TypeError, match="last must be a collection of file names, not the string 'config.json'"):
        atomic_write_dir(tmp_path / "adapter", lambda d: None, last="config.json")
    with pytest.raises(TypeError, match="drop must be"):
        atomic_write_dir(tmp_path / "adapter", lambda d: None, drop="shard")


def test_a_folder_save_keeps_the_folders_permissions(tmp_path):
    target = _folder(tmp_path, {"weights": "old"})
    os.chmod(target, 0o2750)
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert os.stat(target).st_mode & 0o7777 == 0o2750


@pytest.mark.parametrize("where", ["in the folder", "in the write"])
def test_a_folder_in_a_files_place_is_refused_before_anything_lands(tmp_path, where):
    target = _folder(tmp_path, {"config.json": "old"})

    def write(folder):
        atomic_write_json(folder / "config.json", "new")
        (target if where == "in the folder" else folder).joinpath("weights").mkdir()
        if where == "in the folder":
            atomic_write_json(folder / "weights", "new")

    with pytest.raises(IsADirectoryError, match="a folder where a file of the write goes"):
        atomic_write_dir(target, write)
    assert (target / "config.json").read_text() == "old"


def test_a_folder_that_cannot_be_synced_does_not_fail_a_finished_write(tmp_path, monkeypatch):
    """A folder we may enter but not list (0711) cannot be opened to sync it."""
    import modlora.fileio as fileio

    real_fsync = fileio._fsync

    def fsync(path):
        if Path(path).is_dir():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_fsync(path)

    monkeypatch.setattr(fileio, "_fsync", fsync)
    target = _folder(tmp_path, {"weights": "old"})
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    atomic_write(tmp_path / "file", lambda p: Path(p).write_text("x"))
    assert _contents(target) == {"weights": '"new"\n'} and (tmp_path / "file").read_text() == "x"
