"""Checkpoint I/O as free functions of the model: HF safetensors directories in (streamed, checked
tensor by tensor), seeded random weights, and out (atomic)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import validate
from .config import Qwen2Config, as_dtype
from .fileio import atomic_write_dir, atomic_write_safetensors, atomic_write_text, read_json
from .hub import resolve_model_path
from .model import Qwen2ForCausalLM

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it: ``model.safetensors`` where there
    is one, else the shards of ``model.safetensors.index.json`` (transformers' order)."""
    if (path / _SINGLE).is_file():
        with _open_safetensors(path / _SINGLE) as f:
            return {name: path / _SINGLE for name in f.keys()}
    if (path / _INDEX).is_file():
        files = _index_files(path)
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"{_INDEX} names shard(s) that do not exist: {', '.join(absent)}")
        return files
    raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}")


def _index_files(path: Path) -> dict[str, Path]:
    """The shard file of every tensor that ``path``'s sharded index names, each inside ``path``."""
    index = validate.json_object(read_json(path / _INDEX), path / _INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise validate.InputError(f"{path / _INDEX}: weight_map must be an object of tensor -> shard file")
    return {name: validate.inside(path, shard, f"{path / _INDEX}: shard of {name}")
            for name, shard in weight_map.items()}


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_headers(config: Qwen2Config, files: dict[str, Path], path: Path, tied_head: str | None) -> None:
    """Names, shapes and dtypes from the safetensors headers against the config, reading no tensor data."""
    layers = {int(m[1]) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if layers != set(range(config.num_hidden_layers)):
        raise validate.InputError(f"{path}: config.json says num_hidden_layers={config.num_hidden_layers}, the "
                                  f"checkpoint has tensors for {len(layers)} layer(s)")
    found: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            for name in f.keys():
                if files.get(name) == file:
                    info = f.get_slice(name)
                    if info.get_dtype() not in _FLOAT_DTYPES:
                        raise validate.InputError(f"{file}: tensor {name} has dtype {info.get_dtype()}; "
                                                  "expected a floating-point dtype")
                    found[name] = tuple(info.get_shape())
    missing_from_file = sorted(set(files) - set(found))
    if missing_from_file:
        raise validate.InputError(f"{path / _INDEX} names tensor(s) its shard files lack: "
                                  f"{', '.join(missing_from_file[:8])}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).named_parameters()}
    validate.check_shapes(expected, found, path, optional=frozenset({tied_head} - {None}))
    embedding = expected["model.embed_tokens.weight"]
    if tied_head in found and found[tied_head] != embedding:
        raise validate.InputError(f"checkpoint {path}: tensor {tied_head} has shape {found[tied_head]}, the tied "
                                  f"embedding {embedding}")


def _build_empty(config: Qwen2Config, dtype: torch.dtype, device: torch.device | str | None) -> Qwen2ForCausalLM:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    # Non-persistent buffers are computed, not loaded: rebuild them on the target device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config.head_dim, config.rope_theta).to(device)
    return model.to(dtype=dtype) if dtype else model


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> Qwen2ForCausalLM:
    """Load an unmodified HF Qwen2 checkpoint directory (single or sharded safetensors), or a hub id
    cached locally (:mod:`modlora.hub`), in eval mode.

    Tensors stream one by one from safetensors into place. Base weights are frozen
    (``requires_grad=False``): adapters and mixing weights are what modlora trains.

    Args:
        dtype: a torch dtype or its name (``"bfloat16"``); None keeps the checkpoint's
            (config ``torch_dtype``/``dtype``).

    Raises:
        FileNotFoundError: no such directory, or no (or a missing) safetensors file.
        KeyError: tensors missing from, or unexpected in, the checkpoint.
        ValueError: a tensor whose shape disagrees with the config, or an unreadable file.
    """
    path = resolve_model_path(path)
    if not path.is_dir():
        what = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model directory {path} {what}")
    config = Qwen2Config.from_json(path)
    dtype = as_dtype(dtype) or config.torch_dtype
    device = torch.device(device or "cpu")
    files = _tensor_files(path)
    tied_head = "lm_head.weight" if config.tie_word_embeddings else None
    _check_headers(config, files, path, tied_head)  # before anything of the config's size is allocated
    model = _build_empty(config, dtype, device)
    expected = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    handles: dict[Path, object] = {}

    def handle(file: Path) -> object:  # each file opened once
        if file not in handles:
            handles[file] = _open_safetensors(file)
        return handles[file]

    try:
        for name in expected:
            _set_parameter(model, name, _converted(name, handle(files[name]).get_tensor(name), files[name], device,
                                                   dtype))
        if tied_head in files:
            _check_tied_head(model, files[tied_head], handle(files[tied_head]), device, dtype)
    finally:
        handles.clear()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.pack_weights()
    return model.eval()


def _converted(name: str, tensor: torch.Tensor, file: Path, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor, finite, on ``device`` in ``dtype``, where it must stay finite (a bf16 or
    fp32 weight of 1e5 is infinite in fp16). Always a copy: a tensor of the file's own dtype is a
    view of its mapping, which would keep the whole file mapped and resident beside the model."""
    converted = validate.check_tensor(name, tensor, file).to(device=device, dtype=dtype, copy=True)
    if converted.dtype != tensor.dtype and not bool(torch.isfinite(converted).all()):
        raise validate.InputError(f"{file}: tensor {name} overflows {dtype}: load the model as {tensor.dtype} "
                                  "or float32")
    return converted


def _check_tied_head(model: Qwen2ForCausalLM, file: Path, handle: object, device: torch.device,
                     dtype: torch.dtype) -> None:
    """A tied checkpoint may also store ``lm_head.weight``, as a copy of the embeddings; one that
    differs contradicts its config (transformers then unties, with a warning): refused, naming both ways out."""
    head = handle.get_tensor("lm_head.weight").to(device=device, dtype=dtype)
    if not torch.equal(head, model.model.embed_tokens.weight):
        raise validate.InputError(f"{file}: lm_head.weight differs from model.embed_tokens.weight, but config.json "
                                  "ties them (tie_word_embeddings true): set it to false to use this output layer, "
                                  "or remove the tensor")


def _set_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def random_model(config: Qwen2Config | str, *, seed: int = 0, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> Qwen2ForCausalLM:
    """A model with seeded random weights (HF's init: N(0, 0.02), unit norms, zero biases), in eval mode.

    Args:
        config: a config, or a preset name (``"tiny"``, ``"qwen2.5-0.5b"``).
        dtype: a torch dtype or its name; None: the config's.

    Raises:
        ValueError: an unknown preset or dtype name.
    """
    if isinstance(config, str):
        config = Qwen2Config.preset(config)
    dtype = as_dtype(dtype)
    generator = torch.Generator().manual_seed(seed)
    model = _build_empty(config, torch.float32, device)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape)
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * 0.02
        _set_parameter(model, name, value.to(device=device, dtype=dtype or config.torch_dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.pack_weights()
    return model.eval()


def save_pretrained(model: Qwen2ForCausalLM, path: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` (HF layout): staged, then renamed into place
    with the config last (:func:`modlora.fileio.atomic_write_dir`), so a save that fails while
    writing leaves the checkpoint that was there.
    A sharded checkpoint there before loses its index and the shards it names: the new weights are
    the folder's only ones (modlora before this, and other tools, may read an index first); every
    other file (a tokenizer, a README) stays.

    Raises:
        NotADirectoryError: ``path`` is a file.
        OSError: the folder cannot be written (a full disk names the file that did not fit).
    """
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    def write(folder: Path) -> None:
        atomic_write_safetensors(folder / _SINGLE, state, metadata={"format": "pt"})
        atomic_write_text(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")

    atomic_write_dir(path, write, drop=_sharded_files(Path(path)), last=("config.json",))


def _sharded_files(path: Path) -> set[str]:
    """A sharded checkpoint's index in ``path`` and the ``.safetensors`` files directly in ``path``
    that it names as shards (none where the index is not one the loader reads: it alone is dropped).
    Only those: the index is data, and naming a tokenizer or a README there must not get them
    deleted; shards in a subfolder (which transformers never writes) stay."""
    if not (path / _INDEX).is_file():
        return set()
    try:
        files = _index_files(path)
    except ValueError:
        return {_INDEX}
    folder = Path(os.path.abspath(path))
    shards = {f.name for f in files.values() if f.parent == folder and f.suffix == ".safetensors" and f.is_file()}
    return {_INDEX, *shards} - {_SINGLE}

