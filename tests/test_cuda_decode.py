"""The CUDA decode op (csrc/cuda/lora_decode.cu): it compiles for sm_80 and sm_90 with nvcc, with
no register spills (wherever nvcc is installed, no GPU needed); on a GPU it matches the float64
reference within the error bound of tests/test_kernels_pairwise.py."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from modlora import cuda_decode

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "lora_decode.cu"
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


def _nvcc(arch: int, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", str(SOURCE),
                           "-o", str(out)], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """The kernel translation unit alone (it includes no torch header): every instantiation
    (3 dtypes x 5 row buckets x 2 kernels) per architecture, with ptxas's resource report."""
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip((80, 90), pool.map(lambda a: _nvcc(a, tmp_path / f"sm{a}.o"), (80, 90)), strict=True))
    for arch, run in runs.items():
        assert run.returncode == 0, f"sm_{arch}: {run.stderr[-2000:]}"
        assert (tmp_path / f"sm{arch}.o").stat().st_size > 0
        functions = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", run.stderr)
        assert len(functions) == 30 and {a for _, a in functions} == {str(arch)}, run.stderr[-2000:]
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", run.stderr)]
        assert len(spills) == 30 and not any(spills), f"sm_{arch} spills: {spills}"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_decode.available(), reason="needs CUDA and modlora._C built with the CUDA op")
@pytest.mark.parametrize("strategy", ["output", "ab"])
@pytest.mark.parametrize("m", [1, 3, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_on_gpu(dtype, m, strategy):
    """Against float64 with the bound of tests/test_kernels_pairwise.py (one pair for every row)."""
    from test_kernels_pairwise import make_pairs, pair_error_ratio

    g = torch.Generator().manual_seed(m)
    k, n = 896, 200
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    W = (torch.randn(n, k, generator=g) * k**-0.5).to("cuda", dtype)
    bias = torch.randn(n, generator=g).to("cuda", dtype)
    pairs = make_pairs(dtype, k, n, [(16, 16)])
    decode = lambda x, W, b, pairs, rows, strategy: cuda_decode.dual_lora_decode(x, W, b, *pairs[0], strategy)
    rows = torch.zeros(m, dtype=torch.int64, device="cuda")
    assert pair_error_ratio(dtype, x, W, bias, pairs, rows, strategy, op=decode) <= 1.0


def test_rejects_too_many_rows():
    x = torch.zeros(17, 8)
    with pytest.raises(ValueError, match="1..16 rows"):
        cuda_decode.dual_lora_decode(x, torch.zeros(4, 8), None, None, None)
