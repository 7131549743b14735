"""Every Triton configuration the launchers can choose, compiled ahead of time for sm80 and sm90
with Triton's own compiler and ptxas (no GPU needed): shared memory within each architecture's
per-block limit, and no register spills in bf16/fp16, where ptxas reports them.

The compiles run in subprocesses (tests/kernels_aot.py), where Triton is not in interpreter mode.
By default a representative set (the extreme tiles of each kernel; see kernels_aot.jobs);
``MODLORA_AOT_ALL=1`` compiles the exhaustive set (several minutes). Skips only where this Triton
has no CUDA backend to compile with.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("kernels_aot.py")
# Largest dynamic shared memory one block may use: 163 KiB on A100 (sm80), 227 KiB on H100 (sm90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

try:
    from triton.backends import backends as _backends

    HAVE_CUDA_BACKEND = "nvidia" in _backends
except ImportError:
    HAVE_CUDA_BACKEND = False


def _compile(arch: int) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("TRITON_CACHE_DIR", None)  # the helper compiles into a fresh cache: ptxas runs, and reports
    run = subprocess.run([sys.executable, str(HELPER), str(arch)], capture_output=True, text=True, env=env,
                         timeout=3600)
    assert run.returncode == 0, f"sm{arch}: {run.stderr[-3000:]}"
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SHARED_LIMIT, pool.map(_compile, SHARED_LIMIT), strict=True))


def _describe(k: dict) -> str:
    return f"{k['kernel']} {k['dtype']} {k['const']} warps={k['warps']} stages={k['stages']}"


pytestmark = pytest.mark.skipif(not HAVE_CUDA_BACKEND, reason="this Triton has no CUDA backend")


def test_every_kernel_was_compiled(compiled):
    sys.path.insert(0, str(HELPER.parent))
    import kernels_aot

    expected = len(kernels_aot.jobs())
    for arch, kernels in compiled.items():
        assert len(kernels) == expected and {k["arch"] for k in kernels} == {arch}
        assert {k["kernel"] for k in kernels} == {"lora_gemm", "shrink", "pairwise"}


@pytest.mark.parametrize("arch", list(SHARED_LIMIT))
def test_shared_memory_within_the_architecture_limit(compiled, arch):
    over = [f"{_describe(k)}: {k['shared'] / 1024:.0f} KiB" for k in compiled[arch] if k["shared"] > SHARED_LIMIT[arch]]
    assert not over, f"sm{arch} limit {SHARED_LIMIT[arch] // 1024} KiB:\n" + "\n".join(over)


@pytest.mark.parametrize("arch", list(SHARED_LIMIT))
def test_no_register_spills_in_half_precision(compiled, arch):
    spilled = [f"{_describe(k)}: {k['spills']} bytes" for k in compiled[arch]
               if k["dtype"] in ("bf16", "fp16") and k["spills"]]
    assert not spilled, f"sm{arch} spills:\n" + "\n".join(spilled)
