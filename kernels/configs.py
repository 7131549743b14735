"""Tile configurations of the Triton launchers: a tuned table per GPU name, else a heuristic.

Every choice is a pure function of the problem (rows, columns, reduction length, total rank, dtype)
and of the GPU (name, SM count), so ``tests/test_kernels_compile.py`` can enumerate and compile for
sm80/sm90 everything a launcher may launch, without a GPU.

Tuned tables live in ``kernels/tuned/<gpu-slug>.json`` (written by ``benchmarks/tune_lora_gemm.py``
on that GPU): ``{"gpu": name, "entries": [{"m": bucket, "n": N, "k": K, "rank": R, "config": {...}}]}``.
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


@functools.cache
def _table(gpu: str) -> dict[tuple[int, int, int, int], GemmConfig]:
    path = TUNED_DIR / f"{slug(gpu)}.json"
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())["entries"]
    return {(e["m"], e["n"], e["k"], e["rank"]): GemmConfig(**e["config"]) for e in entries}


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
    fp32 = dtype == torch.float32
    BM = min(64 if fp32 else 128, max(16, m_bucket(M)))
    BP = 64 if M <= 128 else 128
    if fused and BR == 64:
        BM, BP = min(32, BM), 64
    wide = BM * BP >= 128 * 128
    warps = 8 if BM * BP >= 128 * 64 else 4
    return GemmConfig(BM, BP, 32 if wide else 64, 1, warps, 2 if fp32 else 3)


def gemm_config(M: int, P: int, Q: int, R: int, dtype: torch.dtype, gpu: str = "", sms: int = 108,
                fused: bool = True) -> GemmConfig:
    """The tuned entry for (M bucket, P, Q, R) on ``gpu`` if there is one, else the heuristic
    (``fused``: the shrink runs in the same loop, its v tile in registers too)."""
    tuned = _table(gpu).get((m_bucket(M), P, Q, R)) if gpu else None
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
    return GemmConfig(BM, 32 if M <= DECODE_MAX_M else 64, 64 if BM == 16 else 32, 1, 4, 3)
