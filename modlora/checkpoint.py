"""Training checkpoints as data: one safetensors file (tensors) whose metadata holds the rest as JSON.

Nothing is unpickled: a checkpoint from a copied or shared run folder can hold wrong numbers, never
code. Tensors: ``param.{i}``, ``optimizer.{i}.{key}`` (per-parameter optimizer state), and per rank
``r`` (one without data parallelism, else one per process) ``rng.{r}.torch`` and ``rng.{r}.cuda.{j}``.
JSON (metadata key ``modlora``): run config (with the data-parallel world size), step, data order,
and per rank the Python RNG state and its count of CUDA states. Every field is checked on load.

The optimizer's hyperparameters and the learning-rate schedule are not stored: both follow from the
run's config and step, so a resumed run rebuilds them (:func:`modlora.train.resume`) and no file can
change them. Format 1 stored them too; its copies are ignored.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .fileio import atomic_write_safetensors, remove_stale_temps
from .validate import InputError, check_tensor

FILE = "checkpoint.safetensors"
LEGACY_FILE = "checkpoint.pt"
_FORMAT = 2
_READABLE = (1, 2)
ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")  # torch.optim.AdamW's per-parameter state (amsgrad off)


def refuse_legacy(work_dir: str | os.PathLike) -> None:
    """An old pickle checkpoint could run code when loaded: refuse it, never read it."""
    legacy = Path(work_dir) / LEGACY_FILE
    if legacy.exists():
        raise InputError(f"{legacy} is an old pickle checkpoint, which modlora no longer loads (loading a pickle can "
                         "run code): delete it to train this adapter from the start")


def save(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (config, step, order, params, optimizer: the per-parameter state of the
    optimizer's ``state_dict()``, and rng: a list of every rank's RNG state, as
    :func:`modlora.train.save_checkpoint` builds it) atomically."""
    tensors = {f"param.{i}": p.detach().contiguous().cpu() for i, p in enumerate(state["params"])}
    for i, entry in state["optimizer"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{i}.{key}"] = value.detach().contiguous().cpu()
    rngs = []
    for r, rng in enumerate(state["rng"]):
        tensors[f"rng.{r}.torch"] = rng["torch"]
        for j, s in enumerate(rng.get("cuda", [])):
            tensors[f"rng.{r}.cuda.{j}"] = s
        version, internal, gauss = rng["python"]
        rngs.append({"python": [version, list(internal), gauss], "cuda": len(rng.get("cuda", []))})
    meta = {"format": _FORMAT, "config": state["config"], "step": state["step"], "order": state["order"],
            "rng": rngs, "num_params": len(state["params"])}
    remove_stale_temps(path)  # a run killed amid a save left one; a run has one writer
    atomic_write_safetensors(path, tensors, metadata={"modlora": json.dumps(meta)})


def load(path: str | os.PathLike, device: torch.device) -> dict:
    """Read :func:`save`'s file back into the state dict it was given; any malformed field is an InputError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["modlora"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, KeyError, ValueError, TypeError, OSError) as e:
        raise InputError(f"{path} is not a readable modlora checkpoint ({e}): delete it to start over") from None
    try:
        return _state(meta, tensors, device)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"{path} is a malformed checkpoint ({type(e).__name__}: {e}): delete it to start over") \
            from None


def check_fits(state: dict, path: str | os.PathLike, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               total: int, ranks: int) -> None:
    """The loaded state has the structure of this run's (shapes, ``optimizer``'s per-parameter state,
    step range, one RNG state per process)."""
    problem = None
    if not 0 <= state["step"] <= total:
        problem = f"step {state['step']} is outside this run's 0..{total}"
    elif len(state["rng"]) != ranks:
        problem = f"it holds the RNG states of {len(state['rng'])} process(es), this run has {ranks}"
    elif [(tuple(p.shape), p.dtype) for p in state["params"]] != [(tuple(p.shape), p.dtype) for p in params]:
        problem = "its tensors do not match the trained parameters"
    else:  # the optimizer numbers its parameters group by group
        problem = _optimizer_problem(state["optimizer"], [p for g in optimizer.param_groups for p in g["params"]],
                                     state["step"])
    if problem:
        raise InputError(f"{path}: {problem}: delete it to start over")


def _optimizer_problem(opt_state: dict[int, dict[str, torch.Tensor]], params: list[torch.Tensor],
                       step: int) -> str | None:
    """What is wrong with AdamW's per-parameter state for this run, if anything: each parameter has
    none (never updated) or exactly :data:`ADAM_STATE`, moments of its shape and dtype, a second
    moment >= 0, and a whole count of updates up to ``step``."""
    for i, entry in sorted(opt_state.items()):
        if not 0 <= i < len(params):
            return f"it holds optimizer state for parameter {i}, this run trains {len(params)}"
        if sorted(entry) != sorted(ADAM_STATE):
            return f"parameter {i}'s optimizer state holds {sorted(entry)}, AdamW's is {list(ADAM_STATE)}"
        for key in ("exp_avg", "exp_avg_sq"):
            t, p = entry[key], params[i]
            if t.shape != p.shape or t.dtype != p.dtype:
                return (f"optimizer.{i}.{key} is {t.dtype} {tuple(t.shape)}, its parameter {p.dtype} "
                        f"{tuple(p.shape)}")
        if bool((entry["exp_avg_sq"] < 0).any()):
            return f"optimizer.{i}.exp_avg_sq has negative entries"
        count = entry["step"]
        if count.numel() != 1 or not (0 <= float(count) <= step and float(count).is_integer()):
            return f"optimizer.{i}.step must count the updates, a whole number in 0..{step}"
    return None


def _state(meta: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> dict:
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE:
        raise ValueError(f"unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta["config"], dict):
        raise ValueError("config must be a JSON object of the run's settings")
    step, n = meta["step"], meta["num_params"]
    if not (isinstance(step, int) and step >= 0 and isinstance(n, int) and n >= 0):
        raise ValueError("step and num_params must be non-negative integers")
    params = [check_tensor(f"param.{i}", tensors[f"param.{i}"], "checkpoint").to(device) for i in range(n)]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            opt_state.setdefault(int(i), {})[key] = check_tensor(name, t, "checkpoint")
    if not isinstance(meta["rng"], list) or not meta["rng"]:
        raise ValueError("rng must be a non-empty list of per-process RNG states")
    rng = [_rng(r, entry, tensors) for r, entry in enumerate(meta["rng"])]
    if not isinstance(meta["order"], list):
        raise ValueError("order must be a list")
    return {"config": meta["config"], "step": step, "order": meta["order"], "params": params,
            "optimizer": opt_state, "rng": rng}


def _rng(r: int, entry: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Process ``r``'s RNG state: torch's, Python's, and (when it had them) CUDA's."""
    rng = {"torch": tensors[f"rng.{r}.torch"], "python": _python_rng(entry["python"])}
    if rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape:
        raise ValueError(f"rng.{r}.torch is not a torch RNG state")
    try:  # torch's own check of the state (a Mersenne Twister's), on a generator of its own
        torch.Generator().set_state(rng["torch"])
    except RuntimeError as e:
        raise ValueError(f"rng.{r}.torch is not a valid torch RNG state ({e})") from None
    n_cuda = entry["cuda"]
    if isinstance(n_cuda, bool) or not isinstance(n_cuda, int) or n_cuda < 0:
        raise ValueError(f"rng[{r}].cuda must be a count of CUDA RNG states")
    if n_cuda:
        rng["cuda"] = [tensors[f"rng.{r}.cuda.{j}"] for j in range(n_cuda)]
        if any(s.dtype != torch.uint8 or s.dim() != 1 for s in rng["cuda"]):
            raise ValueError(f"rng.{r}.cuda.* must be CUDA RNG states (1-D uint8)")
    return rng


def _python_rng(raw: list) -> tuple:
    version, internal, gauss = raw
    if not (version == 3 and (gauss is None or isinstance(gauss, float) and math.isfinite(gauss))
            and isinstance(internal, list) and len(internal) == 625
            and all(isinstance(x, int) and 0 <= x < 2**32 for x in internal)):
        raise ValueError("the Python RNG state must hold the 625 integers of a Mersenne Twister state "
                         "and a finite or null gauss")
    state = version, tuple(internal), gauss
    try:  # Python's own check (the position, the last integer, must lie in 0..624)
        random.Random().setstate(state)
    except ValueError as e:
        raise ValueError(f"the Python RNG state is not valid ({e})") from None
    return state
