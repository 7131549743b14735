"""Package build; adds the optional C++/CUDA extension ``modlora._C`` (sources in csrc/).

The extension is compiled against the torch that is importable *at build time*, so it must be the
torch you run with. pip's default build isolation hides it (and putting ``torch`` in the build
requirements would download a multi-GB CUDA build of a possibly different version), so:

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

builds ``modlora._C``; a plain ``pip install .`` still succeeds and installs modlora without it
(modlora then uses its torch path and logs one line saying so). No C++ compiler, or a failed
compile, also just leaves the extension out. ``MODLORA_BUILD_EXT=0`` skips it on purpose.

CPU sources are built whenever a C++ compiler is found. Vector code is selected at run time
(scalar / AVX2+FMA / AVX-512 / AVX-512 BF16 via ``__builtin_cpu_supports``), never with
``-march=native``, so a wheel built on one x86 machine runs on another. CUDA sources
(``csrc/cuda/``: the decode op, ``.cu`` and its torch binding) are added only when nvcc and a CUDA
build of torch are both present, compiled for sm80 and sm90 (``TORCH_CUDA_ARCH_LIST`` overrides).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _note(msg: str) -> None:
    print(f"modlora setup: {msg}", file=sys.stderr)


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None or shutil.which("c++") is not None


def _extension_kwargs() -> dict:
    if os.environ.get("MODLORA_BUILD_EXT", "1") == "0":
        _note("MODLORA_BUILD_EXT=0: building without modlora._C")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not importable in the build environment: building without modlora._C "
              "(use `pip install --no-build-isolation .` to build it against your torch)")
        return {}
    if not _have_cxx():
        _note("no C++ compiler found: building without modlora._C")
        return {}

    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    cuda_sources = sorted(os.path.relpath(p, HERE) for pattern in ("*.cu", "*.cpp")
                          for p in glob.glob(os.path.join(HERE, "csrc", "cuda", pattern)))
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    # OpenMP symbols resolve to torch's own libgomp (same soname), so one OpenMP runtime is loaded.
    link_flags = ["-fopenmp"]
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # the decode op is for sm80+ (bf16 arithmetic)
        ext = cpp_extension.CUDAExtension(
            "modlora._C", sources + cuda_sources, optional=True,
            extra_compile_args={"cxx": cxx_flags + ["-DMODLORA_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        if cuda_sources:
            _note("nvcc or a CUDA build of torch is missing: building modlora._C without its CUDA sources")
        ext = cpp_extension.CppExtension(
            "modlora._C", sources, optional=True, extra_compile_args=cxx_flags, extra_link_args=link_flags,
        )
    # optional=True: a failed compile warns and installs modlora without the extension.
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}}


setup(**_extension_kwargs())
