"""Compile every Triton configuration the launchers can choose for sm80 and sm90, ahead of time.

Run as a script (tests/test_kernels_compile.py does, in a process where Triton is not in
interpreter mode): prints one JSON line per compiled kernel with its shared memory and ptxas's
spill count. ``MODLORA_AOT_ALL=1`` compiles the exhaustive set (every M bucket, rank block and
dtype, fp32 in both precisions); by default a representative set: the extreme tiles of each
kernel (the largest rank block of each tile family, decode and throughput M) in fp32 and bf16.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="modlora-aot-"))  # real compiles
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modlora.kernels import configs, lora_gemm, pairwise  # noqa: E402

TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP32_OUT = {"v_ptr", "coef_ptr"}  # always fp32, whatever the activations' dtype
INT_PTRS = {"order_ptr": "*i32", "tile_pair_ptr": "*i32", "tile_lo_ptr": "*i32", "tile_hi_ptr": "*i32"}
EXHAUSTIVE = os.environ.get("MODLORA_AOT_ALL") == "1"
# (P, Q): Qwen2.5-0.5B forward and dx (split-K at decode), and a short reduction (decode, no split)
SHAPES = [(896, 896), (4864, 896), (896, 4864), (896, 64)] if EXHAUSTIVE else [(896, 896), (896, 64)]


def _signature(fn, dtype: torch.dtype, constexprs: dict, out_fp32: bool) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_PTRS:
            sig[name] = INT_PTRS[name]
        elif name.endswith("_ptr"):
            fp32 = name in FP32_OUT or (name == "out_ptr" and out_fp32)
            sig[name] = "*fp32" if fp32 else f"*{TY[dtype]}"
        elif name in ("c1", "c2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def jobs() -> list[dict]:
    """(kernel, dtype, constexprs, warps, stages) the launchers choose, deduplicated."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if EXHAUSTIVE else [torch.float32, torch.bfloat16]
    ms = [1, 2, 4, 8, 16, 17, 32, 64, 65, 128, 129, 256, 8192] if EXHAUSTIVE else [1, 128, 8192]
    # Total rank (a rank-128 pair is 256, configs.MAX_RANK). Rank blocks 16 and 32 share their tiles,
    # as do 128 and 256: the representative set takes the largest of each, the worst case for shared
    # memory and registers, and 64, whose fused tiles differ.
    ranks = [2, 16, 32, 64, 128, 256] if EXHAUSTIVE else [32, 64, 256]
    out, seen = [], set()

    def add(kernel: str, dtype: torch.dtype, const: dict, warps: int, stages: int, out_fp32: bool = False):
        key = (kernel, TY[dtype], tuple(sorted(const.items())), warps, stages, out_fp32)
        if key not in seen:
            seen.add(key)
            out.append({"kernel": kernel, "dtype": dtype, "const": const, "warps": warps, "stages": stages,
                        "out_fp32": out_fp32})

    for dtype in dtypes:
        # fp32 runs "ieee" under torch's default matmul precision, "tf32" when allowed
        precisions = ["ieee", "tf32"] if dtype == torch.float32 and EXHAUSTIVE else ["ieee"]
        for prec in precisions:
            for R in ranks:
                BR = configs.rank_block(R)
                BM, BQ, stages = configs.shrink_config(R, dtype)
                add("shrink", dtype, {"TWO": True, "PRECISION": prec, "BM": BM, "BQ": BQ, "BR": BR}, 4, stages)
                for M in ms:
                    for P, Q in SHAPES:
                        flags = {"TWO": True, "HAS_BIAS": True, "COEF_PTR": True, "PRECISION": prec}
                        for fused in (True, False):
                            cfg = configs.gemm_config(M, P, Q, R, dtype, "", 108, fused=fused)
                            shrink = fused and cfg.split_k == 1  # a split K runs the shrink first
                            tiles = {"BM": cfg.BM, "BP": cfg.BP, "BQ": cfg.BQ, "BR": BR, "GROUP_M": 8}
                            add("lora_gemm", dtype, {**tiles, **flags, "SHRINK": shrink, "STORE_V": shrink},
                                cfg.num_warps, cfg.num_stages, out_fp32=cfg.split_k > 1)
                    for pairs in (1, 4, 64) if EXHAUSTIVE else (1,):
                        cfg = configs.pairwise_config(M, pairs, BR, dtype)
                        add("pairwise", dtype, {"HAS_BIAS": True, "PRECISION": prec, "BM": cfg.BM, "BN": cfg.BP,
                                                "BK": cfg.BQ, "BR": BR}, cfg.num_warps, cfg.num_stages)
    return out


KERNELS = {"lora_gemm": lora_gemm._lora_gemm_kernel, "shrink": lora_gemm._shrink_kernel,
           "pairwise": pairwise._pairwise_kernel}


def compile_one(job: dict, arch: int) -> dict:
    fn = KERNELS[job["kernel"]]
    src = ASTSource(fn, _signature(fn, job["dtype"], job["const"], job["out_fp32"]), job["const"])
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job["warps"], "num_stages": job["stages"]})
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue()))
    return {"kernel": job["kernel"], "arch": arch, "dtype": TY[job["dtype"]], "const": job["const"],
            "warps": job["warps"], "stages": job["stages"], "shared": compiled.metadata.shared, "spills": spills}


def main() -> None:
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    for job in jobs():
        for arch in archs:
            print(json.dumps(compile_one(job, arch)), flush=True)


if __name__ == "__main__":
    main()
