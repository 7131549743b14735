"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
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
