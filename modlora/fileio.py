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
    writers here), then rename it into place, so a reader finds the old folder or the new one, never
    a mix of both. Replacing a folder takes two renames, the old one aside and the new one in; a
    crash between them leaves the old folder whole at ``<target>.old-<hex>``. The new folder takes
    the old one's permissions, and files of the old one that the new one lacks (a README, say) move
    into it, except those named in ``drop`` (what the new write replaces in another form, such as
    a previous save's shards). One writer at a time per folder (the pipeline's jobs each have one).

    A folder that cannot be renamed without harm (a symlink, a mount point, the working directory
    or one above it) is written in place instead by ``write(target)``: each file atomically, in
    ``write``'s order, whose last file should mark the folder finished; then the files in ``drop``
    are removed."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    cwd = Path.cwd()
    if target.is_symlink() or os.path.ismount(target) or target == cwd or target in cwd.parents:
        write(target)
        for name in drop:
            (target / name).unlink(missing_ok=True)
        _fsync(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp, old = target.with_name(f"{target.name}.tmp-{tag}"), target.with_name(f"{target.name}.old-{tag}")
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            shutil.copymode(target, tmp)
            os.rename(target, old)
            os.rename(tmp, target)
            for extra in old.iterdir():
                if extra.name not in drop and not (target / extra.name).exists():
                    os.rename(extra, target / extra.name)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(target.parent)
    return target


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
