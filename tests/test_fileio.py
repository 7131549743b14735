"""Atomic writes: the old file (or folder) or the new one, never half of one, with normal permissions."""

import errno
import os
import shutil
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


def test_other_entries_move_over_and_a_stale_stage_does_not(tmp_path):
    target = _folder(tmp_path, {"weights": "old", "tokenizer.json": "mine", "shard": "old"})
    (target / "sub").mkdir()
    (target / "sub" / "notes").write_text("kept")
    (target / "link").symlink_to("tokenizer.json")
    (target / ".tmp-0123abcd").mkdir()  # what a killed in-place write leaves
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"), drop=["shard"])
    assert sorted(os.listdir(target)) == ["link", "sub", "tokenizer.json", "weights"]
    assert (target / "sub" / "notes").read_text() == "kept" and (target / "link").read_text() == "mine"


@pytest.mark.parametrize("where", ["working directory", "relative dot", "through a symlinked parent", "mount point",
                                   "holding a mount point"])
def test_a_folder_that_cannot_be_renamed_is_written_in_place(tmp_path, monkeypatch, where):
    """Renaming the working directory (or a folder above it) would leave the process in a deleted one,
    however the path names it; a mount point, or one inside the folder, cannot move."""
    real = _folder(tmp_path, {"weights": "old", "README.md": "mine", "shard": "old", "config.json": "old"})
    (real / ".tmp-0123abcd").mkdir()  # a stage a killed write left: swept
    (tmp_path / "parent").symlink_to(tmp_path, target_is_directory=True)
    target = real
    if where in ("mount point", "holding a mount point"):
        mounted = real if where == "mount point" else real / "README.md"
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mounted or real_ismount(p))
    else:
        monkeypatch.chdir(real)
        names = {"working directory": real, "relative dot": ".",
                 "through a symlinked parent": tmp_path / "parent" / "adapter"}
        target = names[where]
    published = _record_replaces(monkeypatch, real)
    write = lambda d: [atomic_write_json(d / n, n) for n in ("config.json", "weights")]  # noqa: E731
    atomic_write_dir(target, write, drop=["shard", "weights"], last=["config.json"])
    assert _contents(real) == {"weights": '"weights"\n', "config.json": '"config.json"\n', "README.md": "mine"}
    assert published == ["weights", "config.json"]  # the marker last, whatever the order written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "parent"]


def _record_replaces(monkeypatch, folder: Path) -> list[str]:
    """The names os.replace puts into ``folder``, in order."""
    published, real_replace = [], os.replace

    def replace(src, dst):
        if Path(dst).parent == folder:
            published.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return published


@pytest.mark.parametrize("refused", [("rename", errno.EXDEV), ("rename", errno.EBUSY), ("rename", errno.EPERM),
                                     ("rename", errno.EACCES), ("mkdir", errno.EACCES)])
@pytest.mark.parametrize("fails", [False, True], ids=["written", "failed write"])
def test_a_folder_the_system_will_not_move_is_written_in_place(tmp_path, monkeypatch, refused, fails):
    """overlayfs refuses to rename a folder of a lower layer (EXDEV); a read-only parent refuses the
    folder beside it (EACCES). The save goes through all the same, and a failed one changes nothing."""
    call, code = refused
    target = _folder(tmp_path, {"weights": "old", "config.json": "old", "README.md": "mine", "shard": "old"})
    real_rename, real_mkdir = os.rename, Path.mkdir

    def rename(src, dst):
        if call == "rename" and Path(src) == target:
            raise OSError(code, os.strerror(code))
        real_rename(src, dst)

    def mkdir(self, *args, **kwargs):
        if call == "mkdir" and self.parent == tmp_path and ".tmp-" in self.name:
            raise OSError(code, os.strerror(code))
        real_mkdir(self, *args, **kwargs)

    def write(folder):
        for name in ("config.json", "weights"):
            atomic_write_json(folder / name, name)
            if fails:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    published = _record_replaces(monkeypatch, target)
    if fails:
        with pytest.raises(OSError, match="No space left"):
            atomic_write_dir(target, write, drop=["shard"], last=["config.json"])
        assert _contents(target) == {"weights": "old", "config.json": "old", "README.md": "mine", "shard": "old"}
    else:
        atomic_write_dir(target, write, drop=["shard"], last=["config.json"])
        assert _contents(target) == {"weights": '"weights"\n', "config.json": '"config.json"\n', "README.md": "mine"}
        assert published == ["weights", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_old_folder_that_cannot_be_removed_does_not_fail_the_save(tmp_path, monkeypatch, caplog):
    target = _folder(tmp_path, {"weights": "old"})
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: None if ".old-" in str(p) else real_rmtree(p, **kw))
    atomic_write_dir(target, lambda d: atomic_write_json(d / "weights", "new"))
    assert _contents(target) == {"weights": '"new"\n'}
    (aside,) = (p for p in tmp_path.iterdir() if p.name != "adapter")
    assert "could not remove the previous version" in caplog.text and str(aside) in caplog.text
