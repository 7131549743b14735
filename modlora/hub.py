"""``--model`` as a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``), resolved from the local cache.

modlora never downloads. A hub id names the snapshot that ``transformers`` / ``huggingface_hub``
left in the cache, laid out as ``<cache>/models--Org--Name/snapshots/<revision>/`` with the
revision of the ``main`` branch in ``<cache>/models--Org--Name/refs/main``. The caches are tried in
huggingface_hub's order: ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import validate
from .fileio import read_utf8

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def cache_dirs() -> list[Path]:
    """The hub caches to look in, in order, without duplicates."""
    env = os.environ
    candidates = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"),  # the latter: its older name
                  env.get("HF_HOME") and str(Path(env["HF_HOME"]) / "hub"),
                  env.get("XDG_CACHE_HOME") and str(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub"),
                  str(Path.home() / ".cache" / "huggingface" / "hub")]
    return list(dict.fromkeys(Path(c).expanduser() for c in candidates if c))


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A checkpoint directory as given when it exists (or when ``name`` is no hub id); else the cached
    snapshot of the hub id ``name``. A hub id that is not cached is an error that says where it looked."""
    path = Path(name)
    if path.exists() or not _HUB_ID.fullmatch(str(name)):
        return path
    repo = "models--" + str(name).replace("/", "--")
    looked = []
    for cache in cache_dirs():
        ref = cache / repo / "refs" / "main"
        looked.append(str(ref))
        if ref.is_file():
            snapshot = validate.inside(cache / repo / "snapshots", read_utf8(ref).strip(), f"{ref}: the revision")
            if snapshot.is_dir():
                return snapshot
            looked[-1] += f" (names {snapshot}, which does not exist)"
    raise FileNotFoundError(f"model {name} is not a directory and not in the local Hugging Face cache; looked "
                            f"for {'; '.join(looked)}. modlora never downloads: fetch it first (e.g. `hf download "
                            f"{name}`) or pass a checkpoint directory")
