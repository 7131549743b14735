"""Tile configurations of the Triton launchers: a tuned table per GPU name, else a heuristic.

Every choice is a pure function of the problem (rows, columns, reduction length, total rank, dtype)
and of the GPU (name, SM count), so ``tests/test_kernels_compile.py`` can enumerate and compile for
sm80/sm90 everything a launcher may launch, without a GPU.

Tuned tables live in ``kernels/tuned/<gpu-slug>.json`` (written by ``benchmarks/tune_lora_gemm.py``
on that GPU): ``{"gpu": name, "dtype": "bfloat16", "entries": [{"m": bucket, "n": N, "k": K,
"rank": R, "fused": true, "config": {...}}]}``; an entry serves only its dtype and variant.
No table ships yet: no GPU has been available to measure one, so the heuristic below decides.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
DECODE_MAX_M = 16  # rows at or below which W's read dominates: narrow tiles, split-K
# Split-K aims for this many programs per SM, so the W read is spread over the whole chip.
PROGRAMS_PER_SM = 2
MIN_K_STEPS = 4  # a K split keeps at least this many BQ steps, so its partial sum amortises the epilogue
# The widest total rank the kernels take: the widest rank tile tests/test_kernels_compile.py compiles
# and checks. At 512, fp32 needs 194-202 KiB of shared memory (sm80: 163); at 1024 bf16 spills.
# Wider pairs run torch's GEMMs (modlora.ops).
MAX_RANK = 256


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of ``lora_gemm``: BM rows x BP columns per program, BQ-long reduction steps, the
    reduction split over ``split_k`` programs (fp32 partial sums, then one reduction)."""

    BM: int
    BP: int
    BQ: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def rank_block(R: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum) holding the total rank."""
    return max(16, 1 << max(0, R - 1).bit_length())


def m_bucket(M: int) -> int:
    return max(1, 1 << max(0, M - 1).bit_length())


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


TableKey = tuple[str, bool, int, int, int, int]  # dtype, fused, M bucket, P, Q, total rank


@functools.cache
def _table(gpu: str) -> dict[TableKey, GemmConfig]:
    """``gpu``'s tuned table (benchmarks/tune_lora_gemm.py: one dtype, measured per variant), its
    numbers checked; a malformed table is an error that names the file."""
    path = TUNED_DIR / f"{slug(gpu)}.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        dtype, table = raw["dtype"], {}
        for e in raw["entries"]:
            key = (dtype, e["fused"], e["m"], e["n"], e["k"], e["rank"])
            if not (dtype in ("float16", "bfloat16", "float32") and isinstance(e["fused"], bool)
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in key[2:])):
                raise ValueError(f"entry {key} is not (dtype, fused, m, n, k, rank)")
            table[key] = _checked(GemmConfig(**e["config"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tuned table ({type(e).__name__}: {e})") from None
    return table


def _checked(cfg: GemmConfig) -> GemmConfig:
    tiles = (cfg.BM, cfg.BP, cfg.BQ, cfg.num_warps)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0 for v in tiles) \
            or min(cfg.BM, cfg.BP, cfg.BQ) < 16 or cfg.num_warps > 16 \
            or not all(isinstance(v, int) and 1 <= v <= 1024 for v in (cfg.split_k, cfg.num_stages)):
        raise ValueError(f"{cfg}: tiles must be powers of two >= 16, num_warps a power of two <= 16, "
                         "split_k and num_stages in 1..1024")
    return cfg


def _heuristic(M: int, P: int, Q: int, R: int, dtype: torch.dtype, sms: int, fused: bool) -> GemmConfig:
    BR = rank_block(R)
    if M <= DECODE_MAX_M:
        # Decode: bound by reading W once. 64-wide column tiles gave a 896-wide projection 14
        # programs for 108-132 SMs; 32-wide tiles and a K split spread the read over the chip.
        BP, BQ = (32, 64) if BR <= 64 else (16, 32)
        tiles = -(-P // BP)
        split = max(1, min(PROGRAMS_PER_SM * sms // tiles, Q // (MIN_K_STEPS * BQ)))
        # fp32 with a wide rank block: three stages of the fused shrink tile take 168 KiB (sm80: 163)
        return GemmConfig(16, BP, BQ, split, 4, 2 if dtype == torch.float32 and BR > 64 else 3)
    # Throughput shapes (untuned: no GPU measurements yet). Tile sizes keep the compile checks of
    # tests/test_kernels_compile.py green: shared memory within sm80's 163 KiB and no register
    # spills in bf16. A wide rank block holds v [BM, BR] in fp32 registers, so its rows shrink;
    # the fused variant (M <= 128) also holds the shrink tile, so it keeps 64-wide columns.
    if BR > 64:
        BM = 16 if BR > 128 else min(32, m_bucket(M))
        return GemmConfig(BM, 64, 32, 1, 8 if BR > 128 else 4, 2 if dtype == torch.float32 else 3)
    # fp32 tiles take twice the bytes: 128 x 64 with a 64-rank block at three stages needs 176 KiB
    # (sm80: 163), so fp32 rows stop at 64 and pipelines at two stages. With the fused shrink,
    # v [BM, 64] spilled 120-572 bytes in bf16 on sm80 at 64 or 128 rows; 32 x 64 tiles do not.
    # At rank blocks 16 and 32 the fused tiles keep their rows, with 32-long steps: 64-long ones
    # spilled 64-344 bytes in bf16 and fp16 on sm80, 32-long ones none.
    fp32 = dtype == torch.float32
    BM = min(64 if fp32 else 128, max(16, m_bucket(M)))
    BP = 64 if M <= 128 or fused else 128
    if fused and BR == 64:
        BM = min(32, BM)
    wide = BM * BP >= 128 * 128
    warps = 8 if BM * BP >= 128 * 64 else 4
    return GemmConfig(BM, BP, 32 if wide or (fused and BR < 64) else 64, 1, warps, 2 if fp32 else 3)


def gemm_config(M: int, P: int, Q: int, R: int, dtype: torch.dtype, gpu: str = "", sms: int = 108,
                fused: bool = True) -> GemmConfig:
    """The tuned entry for (dtype, variant, M bucket, P, Q, R) on ``gpu`` if there is one, else the
    heuristic (``fused``: the shrink runs in the same loop, its v tile in registers too)."""
    key = (str(dtype).removeprefix("torch."), fused, m_bucket(M), P, Q, R)
    tuned = _table(gpu).get(key) if gpu else None
    return tuned or _heuristic(M, P, Q, R, dtype, sms, fused)


def shrink_config(R: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BQ, stages) of ``lora_shrink``: v [BM, BR] is an fp32 register tile."""
    return (64, 64, 3) if rank_block(R) <= 64 else (16, 32, 2 if dtype == torch.float32 else 3)


def pairwise_config(M: int, n_pairs: int, R: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles of the per-row kernel. Rows are grouped by pair, so a row tile holds about M / pairs
    rows: tiles no taller than that waste no rows on padding."""
    BR = rank_block(R)
    if BR > 64:  # v [BM, BR] fp32 and the B tile [BN, BR] in registers: short tiles, 8 warps
        return GemmConfig(16, 16, 32, 1, 8, 2 if dtype == torch.float32 else 3)
    BM = min(32, max(16, m_bucket(-(-M // max(1, n_pairs)))))
    BN = 32 if M <= DECODE_MAX_M else 64
    # 64-long steps only on the narrowest tile: 16 x 64 with them spilled 8 bytes in bf16 on sm80;
    # 32 x 64 spilled 4 bytes in bf16 and fp16 on sm90 at rank block 32 with 4 warps, none with 8.
    return GemmConfig(BM, BN, 64 if BM * BN <= 16 * 32 else 32, 1, 8 if BM * BN >= 32 * 64 else 4, 3)
