"""Atomic file and folder writes: a reader (or a resumed run) never sees a half-written file, nor a
folder that mixes an old write with a new one."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import safetensors.torch
import torch

log = logging.getLogger("modlora")


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


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None], drop: Collection[str] = (),
                     last: Collection[str] = ()) -> Path:
    """Call ``write(tmp_dir)`` on a fresh folder beside ``target`` (its files written by the atomic
    writers here), then rename it into place, so that a reader finds the old folder or the new one.

    - Replacing takes two renames, the old folder aside and the new one in; a crash between them
      leaves the old folder whole at ``<target>.old-<hex>``. The new folder takes the old one's
      permissions. A symlinked folder: its real folder is replaced, and the link kept.
    - Then the old folder's entries that the new one lacks (a tokenizer, a README) move into it,
      except the files named in ``drop`` (what the new write replaces in another form, such as a
      previous save's shards), which go with the old folder.
    - One writer at a time per folder (the pipeline's jobs each have one).

    A folder that cannot be renamed (a mount point, one holding a mount point, the working directory
    or one above it, one whose parent is not writable, one a file system refuses to move, as
    overlayfs does its lower layers) is written through a hidden ``.tmp-<hex>`` folder inside it
    instead: the new files are renamed into ``target`` one by one, the names in ``last`` (the file
    that marks a finished folder) after the rest, then the files in ``drop`` are removed. A failed
    write leaves the old files as they were; only a crash amid those renames leaves a mix."""
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    if _unmovable(target):
        return _write_inside(target, write, drop, last)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp, old = target.with_name(f"{target.name}.tmp-{tag}"), target.with_name(f"{target.name}.old-{tag}")
    try:
        tmp.mkdir()
    except OSError as e:
        if target.is_dir() and e.errno in _CANNOT_MOVE:
            return _write_inside(target, write, drop, last)
        raise
    try:
        write(tmp)
        if not target.exists():
            os.rename(tmp, target)
        else:
            shutil.copymode(target, tmp)
            try:
                os.rename(target, old)
            except OSError as e:
                if e.errno not in _CANNOT_MOVE:
                    raise
                _publish(tmp, target, drop, last)
                return target
            os.rename(tmp, target)
            for entry in old.iterdir():
                if entry.name not in drop and not _STAGE.fullmatch(entry.name) and not os.path.lexists(
                        target / entry.name):
                    os.rename(entry, target / entry.name)
            _fsync(target.parent)
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                log.warning("saved %s; could not remove the previous version at %s", target, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(target.parent)
    return target


_CANNOT_MOVE = {errno.EXDEV, errno.EBUSY, errno.EPERM, errno.EACCES}
"""Errors of a folder's creation or rename that say it cannot be moved there, not that a disk failed."""

_STAGE = re.compile(r"\.tmp-[0-9a-f]{8}")
"""The hidden folder a write that cannot rename its folder stages its files in."""


def _unmovable(target: Path) -> bool:
    """Whether renaming ``target`` would do harm: a mount point (or a folder holding one: its mount
    cannot move), the working directory or a folder above it (the process would be left in a
    deleted folder)."""
    cwd = Path.cwd()
    if os.path.ismount(target) or target == cwd or target in cwd.parents:
        return True
    return target.is_dir() and any(os.path.ismount(entry) for entry in target.iterdir())


def _write_inside(target: Path, write: Callable[[Path], None], drop: Collection[str],
                  last: Collection[str]) -> Path:
    """:func:`atomic_write_dir` for a folder that cannot be renamed: staged in a hidden folder inside
    it (a stage a killed write left behind is removed first), then published file by file."""
    for stale in target.iterdir():
        if _STAGE.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    stage = target / f".tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        write(stage)
        _publish(stage, target, drop, last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _publish(source: Path, target: Path, drop: Collection[str], last: Collection[str]) -> None:
    """Rename the files of ``source`` into ``target``, those named in ``last`` after the rest, then
    remove the files named in ``drop`` (but not one just published) from ``target``."""
    names = sorted(p.name for p in source.iterdir())
    for name in [n for n in names if n not in last] + [n for n in last if n in names]:
        os.replace(source / name, target / name)
    for name in drop:
        path = target / name
        if name not in names and (path.is_symlink() or path.is_file()):
            path.unlink()
    _fsync(target)


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
