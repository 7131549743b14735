"""The CUDA decode op (csrc/cuda/lora_decode.cu): it compiles for sm_80 and sm_90 with nvcc, with
no register spills (wherever nvcc is installed, no GPU needed); on a GPU it matches the torch
reference within the error bound of tests/test_kernels.py."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from modlora import cuda_decode
from modlora.kernels import dual_lora_linear_ref

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
    from test_kernels import FACTOR, FLOOR

    g = torch.Generator().manual_seed(m)
    k, n, r = 896, 200, 16
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)
    x, W, bias = rand(m, k), rand(n, k, scale=k**-0.5), rand(n)
    lin = (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), 2.0)
    lout = (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), 0.5)
    y = cuda_decode.dual_lora_decode(x, W, bias, lin, lout, 0.3, 0.7, strategy)
    lo = dual_lora_linear_ref(x, W, bias, lin, lout, 0.3, 0.7, strategy)
    d = lambda a: (a[0].double(), a[1].double(), a[2])
    hi = dual_lora_linear_ref(x.double(), W.double(), bias.double(), d(lin), d(lout), 0.3, 0.7, strategy)
    err, torch_err = ((t.double() - hi).abs().max().item() for t in (y, lo))
    assert err <= FACTOR * torch_err + FLOOR[dtype] * hi.abs().max().item()


def test_rejects_too_many_rows():
    x = torch.zeros(17, 8)
    with pytest.raises(ValueError, match="1..16 rows"):
        cuda_decode.dual_lora_decode(x, torch.zeros(4, 8), None, None, None)
