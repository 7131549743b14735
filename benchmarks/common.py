"""Shared by every benchmark: the environment record, atomic JSON results, timing, plots."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from modlora import cpu, dispatch
from modlora.fileio import atomic_write_json
from modlora.memory import weight_buffer

RESULTS = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    """Device, library versions and commit: what a reader needs to trust or reproduce a number."""
    device = torch.device(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        # Untracked files count (a new source file changes what ran; ignored ones do not), results
        # files do not: the benchmarks rewrite them while they run.
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--",
                                     ":/", ":(exclude,top)benchmarks/results"],
                                    capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": device.type,
        "device_name": name,
        "cpu_model": dispatch.cpu_model(),
        "cpu_signature": dispatch.cpu_signature(),
        "cpu_isas": cpu._C.supported_isas() if cpu.HAVE_C else [],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "peft", "modlora")},
        "commit": commit,
        "dirty": dirty,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def import_peft():
    """peft, or an error that says why not: without it the reference column would be missing."""
    try:
        import peft
    except ImportError as e:
        raise RuntimeError(f"peft cannot be imported ({e}): it is the reference these benchmarks compare with. "
                           "If the error names this repository's kernels/__init__.py, the repository root is on "
                           "sys.path (PYTHONPATH, or python -m / -c run from it) and shadows Hugging Face's "
                           "`kernels` package: run the script by its path, `python benchmarks/NAME.py`.") from e
    return peft


def check_adapter_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """peft upcasts bf16/fp16 adapters to fp32 unless told not to: the two sides would not do the same work."""
    wrong = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n and p.dtype != dtype}
    if wrong:
        raise AssertionError(f"peft adapter parameters not in {dtype}: {wrong}")


def cpu_tag() -> str:
    """The CPU's model, family and model numbers and best ISA as a file-name part, e.g.
    ``amd-epyc-f25-m17-avx512-bf16``: each kind of machine keeps its results (VMs often report only
    the vendor's family name, the same for several generations)."""
    isa = cpu._C.best_isa() if cpu.HAVE_C else torch.backends.cpu.get_cpu_capability()
    ids = dispatch.cpu_ids()
    generation = f"f{ids[1]} m{ids[2]}" if ids else ""
    name = f"{dispatch.cpu_model()} {generation} {isa}".lower()
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name).split())


def add_out_dir(parser: argparse.ArgumentParser) -> None:
    """``--out-dir``: where a run writes its JSON and plot (a smoke test need not touch results/)."""
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="output folder (default: benchmarks/results)")


def write_json(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    """Write ``directory/name.json`` atomically (a reader never sees a half-written file)."""
    return atomic_write_json(directory / f"{name}.json", payload)


def in_weight_memory(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` where the model keeps its weights (:func:`modlora.memory.weight_buffer`: huge
    pages on a Linux CPU), so that every provider and the memory probe read the memory a model reads."""
    out = weight_buffer(t.numel(), t.dtype, t.device).view(t.shape)
    return out.copy_(t)


def memory_probe(buf_f32: torch.Tensor, reps: int = 5) -> dict:
    """Memory read bandwidth in GB/s: every byte of a buffer larger than the caches read once by all
    threads, by two of torch's vectorised, parallel reductions (``.sum()`` and ``.amax()``: a few
    flops per 64-byte line, so memory sets their pace); ``GBs`` is the better of the two."""
    nbytes = buf_f32.numel() * 4
    out = {f"torch_{name}_GBs": nbytes / bench(fn, reps=reps)["ms"] / 1e6
           for name, fn in (("sum", buf_f32.sum), ("amax", buf_f32.amax))}
    out["GBs"] = max(out.values())
    return out


def bench(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10, device: str = "cpu") -> dict:
    """Median and 20/80% quantiles of ``fn``'s wall time in ms (CUDA: triton's do_bench)."""
    if device == "cuda":
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "q20": q20, "q80": q80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def quantiles(times: list[float]) -> dict:
    """Median and 20/80% quantiles of a list of times in ms."""
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return {"ms": pick(0.5), "q20": pick(0.2), "q80": pick(0.8)}
