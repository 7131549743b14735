"""Atomic file and folder writes: a reader (or a resumed run) never sees a half-written file, and a
failed folder write leaves the folder as it was."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Collection
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk where the system lets us: a folder we may enter but not list
    (mode 0711, common on shared scratch trees) cannot be opened, and some file systems refuse to
    sync a folder; the write itself has succeeded by then."""
    try:
        _fsync(path)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EINVAL):
            raise


_TEMP_BYTES = 4
"""Random bytes in :func:`atomic_write`'s temp names, ``.<target name>.<hex>``."""


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``target``, flush it to disk, then rename it
    into place (and flush the directory), so a crash leaves the old file or the new one. The file
    gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(target.parent / f".{target.name}.{secrets.token_hex(_TEMP_BYTES)}")
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
    _fsync_dir(target.parent)
    return target


def remove_stale_temps(target: str | os.PathLike) -> None:
    """Remove the temp files of :func:`atomic_write` (and of safetensors' ``save_file`` inside it)
    beside ``target``: a process killed mid-write (no cleanup runs) leaves one, as large as the file.
    Only for a file one process writes at a time in a folder of its own (a training checkpoint):
    another writer's temp file would go too."""
    target = Path(target)
    temp = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{{2 * _TEMP_BYTES}}}|{_SAFETENSORS_TEMP}")
    for entry in target.parent.glob(".*"):
        if temp.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


_SAFETENSORS_TEMP = r"\.tmp[A-Za-z0-9]{6}"
"""The temp file ``safetensors.torch.save_file`` writes beside its target (Rust's ``tempfile``)."""


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None], *, drop: Collection[str] = (),
                     last: Collection[str] = ()) -> Path:
    """Write a folder's files so that a failed write changes nothing and no reader finds a file half
    written: ``write(stage)`` puts them in a hidden ``.modlora-stage-<hex>`` folder inside ``target``
    (created if need be; its writers are the atomic ones here), then each is renamed into ``target``,
    the names in ``last`` (the file that marks a finished folder) after the rest, and then the files
    named in ``drop`` (what the new write replaces in another form, such as a previous save's
    shards) are removed. Other entries (a tokenizer, a README) stay as they are.

    Nothing is renamed but files, so the folder may be a symlink, a mount point, the working
    directory or under a read-only parent. The final renames take microseconds: a reader in that
    moment, or a crash or a failed rename (a file the process may not replace) amid them, finds old
    and new files side by side, the marker still the old one. A stage a killed write left behind is
    removed by the next write. One writer at a time per folder (the pipeline's jobs each have one):
    two at once can leave one's weights beside the other's config.

    Raises:
        IsADirectoryError: ``write`` made a subfolder, or a file's name is a folder in ``target``
            (nothing is published then).
    """
    for name, value in (("drop", drop), ("last", last)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a collection of file names, not the string {value!r}")
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob(f"{_STAGE}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    stage = target / f"{_STAGE}{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        write(stage)
        names = sorted(p.name for p in stage.iterdir())
        for where in [stage / n for n in names] + [target / n for n in names]:
            if where.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a folder where a file of the write goes", str(where))
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            os.replace(stage / name, target / name)
        for name in drop:
            path = target / name
            if name not in names and (path.is_symlink() or path.is_file()):
                path.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _fsync_dir(target)
    _fsync_dir(target.parent)
    return target


_STAGE = ".modlora-stage-"
"""The start of the name of the hidden folder :func:`atomic_write_dir` stages a write in."""


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents, line ends as they are (``read_text`` would turn a lone "\\r" into a
    line break: sacrebleu, which reads with ``newline="\\n"``, would count other lines); a file
    that is not UTF-8 is an error that names it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
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
    """safetensors' ``save_file`` writes straight from the tensors' memory (``save`` builds the whole
    file in memory first: 6 GB more at every checkpoint of a 0.5B model's full fine-tuning) into
    :func:`atomic_write`'s temp file, which then gets its usual mode back (``save_file`` leaves
    0600); an error of the system (a full disk) is an OSError, which names the file."""
    def write(tmp: str) -> None:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), tmp) from e
        os.chmod(tmp, mode)

    return atomic_write(target, write)
