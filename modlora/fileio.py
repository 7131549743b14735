"""Atomic file and folder writes: a reader (or a resumed run) never sees a half-written file, nor a
folder that mixes an old write with a new one."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import safetensors.torch
import torch


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``target``, flush it to disk, then rename it
    into place (and flush the directory), so a crash leaves the old file or the new one. The file
    gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666, less the umask
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # say which file did not fit
            raise OSError(errno.ENOSPC, "no space left on device", str(target)) from e
        raise
    _fsync(target.parent)
    return target


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None], drop: Collection[str] = ()) -> Path:
    """Call ``write(tmp_dir)`` on a fresh folder beside ``target`` (its files written by the atomic
    writers here) and rename it into place, so that a reader finds the old folder or the new one,
    never a mix of both.

    - The old folder's files that the new one lacks (a tokenizer, a README), except those named in
      ``drop`` (what the new write replaces in another form, such as a previous save's shards), are
      linked into the new folder before it appears (hard links; copies where the file system has
      none), so it is whole from its first moment.
    - Replacing takes two renames, the old folder aside and the new one in; a crash between them
      leaves the old folder whole at ``<target>.old-<hex>``. The new folder takes the old one's
      permissions. A symlinked folder: its real folder is replaced, and the link kept.
    - One writer at a time per folder (the pipeline's jobs each have one).

    A folder that cannot be renamed (a mount point, the working directory or one above it, one whose
    parent is not writable, one a file system refuses to move, as overlayfs does its lower layers)
    is written through a hidden folder inside it instead: the new files are renamed into ``target``
    one by one, in the order ``write`` wrote them (its last file should mark the folder finished),
    then the files in ``drop`` are removed. A failed write leaves the old files as they were; only a
    crash amid those renames leaves a mix."""
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    cwd = Path(os.path.realpath(os.getcwd()))
    if os.path.ismount(target) or target == cwd or target in cwd.parents:
        return _write_inside(target, write, drop)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp, old = target.with_name(f"{target.name}.tmp-{tag}"), target.with_name(f"{target.name}.old-{tag}")
    try:
        tmp.mkdir()
    except OSError as e:
        if target.is_dir() and e.errno in _UNMOVABLE:
            return _write_inside(target, write, drop)
        raise
    try:
        write(tmp)
        if not target.exists():
            os.rename(tmp, target)
        else:
            written = _in_write_order(tmp)
            shutil.copymode(target, tmp)
            _link_missing(target, tmp, drop)
            try:
                os.rename(target, old)
            except OSError as e:
                if e.errno not in _UNMOVABLE:
                    raise
                _publish(tmp, target, written, drop)
                return target
            os.rename(tmp, target)
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(target.parent)
    return target


_UNMOVABLE = {errno.EXDEV, errno.EBUSY, errno.EPERM, errno.EACCES}
"""Errors of a folder's creation or rename that say it cannot be moved, not that the disk failed."""


def _write_inside(target: Path, write: Callable[[Path], None], drop: Collection[str]) -> Path:
    """:func:`atomic_write_dir` for a folder that cannot be renamed: written in a hidden folder
    inside it, then published file by file."""
    stage = target / f".tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        write(stage)
        _publish(stage, target, _in_write_order(stage), drop)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _in_write_order(folder: Path) -> list[str]:
    """The files in ``folder``, the first written first (by modification time)."""
    return [p.name for p in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


def _publish(source: Path, target: Path, names: list[str], drop: Collection[str]) -> None:
    """Rename ``names`` from ``source`` into ``target`` in that order, then remove ``drop`` there."""
    for name in names:
        os.replace(source / name, target / name)
    for name in drop:
        (target / name).unlink(missing_ok=True)
    _fsync(target)


def _link_missing(old: Path, new: Path, drop: Collection[str]) -> None:
    """Link each entry of ``old`` that ``new`` lacks and ``drop`` does not name into ``new``."""
    for entry in old.iterdir():
        if entry.name not in drop and not os.path.lexists(new / entry.name):
            _link(entry, new / entry.name)


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy where links fail), a symlink as a symlink with
    the same text (the folders are siblings, so a relative link still resolves), a folder entry by
    entry."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        shutil.copymode(source, target)
        for entry in source.iterdir():
            _link(entry, target / entry.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents; a file that is not UTF-8 is an error that names it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def read_json(path: str | os.PathLike) -> object:
    """Parse a JSON file; a file that is not JSON (or holds a number Python refuses to parse, such
    as an integer of over 4300 digits) is an error that names it."""
    text = read_utf8(path)
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(target: str | os.PathLike, payload: object) -> Path:
    return atomic_write_text(target, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def atomic_write_safetensors(target: str | os.PathLike, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    """safetensors' own ``save_file`` replaces the file with a mode 0600 one: serialise in memory and
    write the bytes into ours (0666 less the umask), with Python's errors (a full disk names the file)."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
