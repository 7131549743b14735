"""Which CPU path runs a linear, chosen by measurement on the machine at hand.

For each case (op kind, weight shape, dtypes, rows, thread count, the C++ op's ISA ceiling) the
first call times every available path on a representative input (the real weight, its cache lines
flushed before each call as in a decode step, where the weights stream from memory) and keeps the
fastest.
Up to ``SMALL_ROWS`` rows a case is its own row count (a decode step's, which its later steps
repeat); above, a power-of-two bucket measured at its top, where the C++ op is mostly furthest
behind torch's GEMM (not always: torch's time is not monotone in the rows). The paths:
``"c:<isa>"`` (the C++ op, :mod:`modlora.cpu`, at one of this CPU's ISAs: :func:`c_paths`),
``"c:<isa>:l2"`` (the same, prefetching the next block of W into L2 instead of L1: which is faster
depends on the CPU, K and the rows), each also as ``...:k<n>`` where a register block of x's rows
does not fit in L1 (K taken ``n`` elements at a time, so that x's chunk stays there:
:func:`k_chunk`), or ``"torch"``. Calibration is short (a warm-up call, then
timed calls for about ``PATH_SECONDS``, at most ``MAX_REPS``, per path; the warm-up is timed too, so
a call longer than that costs one call per path) and bounded in total per
process (``BUDGET_SECONDS``); a case met after that gets the conservative default and is measured
by a later process.

Choices are cached on disk, one JSON file per CPU model, core count, torch/modlora version and
build of the C++ op (a digest of its file): ``$MODLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/modlora``,
else ``~/.cache/modlora``; written atomically and merged with what another process wrote
meanwhile. A file that cannot be read, is not this format or was written for another CPU or
version is ignored (one warning) and replaced at the next write.

Environment: ``MODLORA_DISPATCH`` forces a path: ``torch``, ``c`` (the C++ op at the ISA set by
``MODLORA_CPU_ISA``, by default the best), ``c:<isa>`` (one of ``_C.supported_isas()``),
``c:<isa>:l2``, either with ``:k<n>``, the C ones only where the C++ op is available and allowed;
``MODLORA_CALIBRATE=0`` skips calibration and the cache: every case gets the conservative default
(:func:`default_path`). Both are read at import and by :func:`reset`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from . import cpu
from .fileio import atomic_write_json
from .kernels.configs import m_bucket

log = logging.getLogger("modlora")

__all__ = ["c_options", "c_paths", "choose", "default_path", "cache_file", "cpu_ids", "cpu_model", "cpu_signature",
           "fingerprint", "k_chunk", "l1d_bytes", "llc_bytes", "parse_cpuinfo", "reset", "rows_bucket", "NATIVE_BF16"]

MAX_BUCKET = 256  # larger M is a GEMM: torch's (oneDNN/MKL) path, never the small-M kernel
SMALL_ROWS = 8  # up to this many rows a case is decided at its own rows, above at its bucket's top
PATH_SECONDS = 0.02  # time each path about this long per case (at least one call, the warm-up, which counts)
MAX_REPS = 10
BUDGET_SECONDS = 10.0  # calibration time per process, all cases together
FORMAT = 5  # 5: K-chunked paths; 4: exact rows up to SMALL_ROWS, else the bucket's top
ISAS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")  # the C++ op's ISAs, each wider than the last
BF16_DOT_ISAS = ("avx512_bf16", "amx")  # differ from avx512 only for bf16 x and W
TILE_ISAS = ("amx",)  # bf16 x and W run the tile kernel, which reads whole rows of W (ignores k_chunk)
BLOCK_ROWS = 8  # rows of x in one register block of the bf16-dot kernel (kernels_avx512bf16.cpp, kMaxMB)

NATIVE_BF16: bool = any(getattr(torch.cpu, probe, lambda: False)()
                        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
"""Whether the CPU has bf16 arithmetic (AVX-512 BF16 or AMX); without it oneDNN emulates bf16."""

Run = Callable[[str, Tensor], Tensor]
Key = tuple[str, int, int, str, int, int, str]

_choices: dict[Key, str] = {}
_exact: dict[tuple, str] = {}  # the same choices by exact rows, dtypes and shape: one dict lookup per call
_measured: dict[str, dict] = {}  # this process's measurements, as cache entries
_forced: str | None = None
_calibrate = True
_loaded = False
_warned = False
_spent = 0.0


def reset() -> None:
    """Forget every choice made in this process and re-read the environment variables."""
    global _forced, _calibrate, _loaded, _warned, _spent
    _choices.clear()
    _exact.clear()
    _measured.clear()
    forced = os.environ.get("MODLORA_DISPATCH", "").strip().lower()
    isas = cpu._C.supported_isas() if cpu.HAVE_C else ()
    known = forced in ("torch", "c") or _known_path(forced, isas)
    if forced not in ("", "auto") and not known:
        log.warning("MODLORA_DISPATCH=%s ignored: expected one of auto, torch, c, %s (each C path also with "
                    ":k<n>)", forced, ", ".join(_c_variants(isas)))
    _forced = forced if known else None
    _calibrate = os.environ.get("MODLORA_CALIBRATE", "1").strip() not in ("0", "false", "no", "off")
    _loaded = _warned = False
    _spent = 0.0


def c_paths(x_dtype: torch.dtype, w_dtype: torch.dtype, rows: int = 0, k: int = 0) -> tuple[str, ...]:
    """The C++ op's paths for a case: ``"c:<isa>"`` and ``"c:<isa>:l2"`` for each ISA of this CPU
    up to the one set (``MODLORA_CPU_ISA`` caps them; default: the best), the bf16-dot ones only
    for bf16 x and W, and scalar only where no vector ISA is left; given the case's ``rows`` and
    ``k``, each ISA's also with ``:k<n>`` where :func:`k_chunk` gives one for x as that ISA's kernel
    reads it (bf16 in the bf16-dot kernel, else an fp32 copy), except the tile kernel's."""
    ceiling = ISAS.index(cpu._C.isa())
    bf16 = x_dtype == w_dtype == torch.bfloat16
    isas = [isa for isa in cpu._C.supported_isas()
            if ISAS.index(isa) <= ceiling and (bf16 or isa not in BF16_DOT_ISAS)]
    isas = [isa for isa in isas if isa != "scalar"] or isas
    chunked = []
    for isa in isas:
        chunk = k_chunk(rows, k, 2 if bf16 and isa in BF16_DOT_ISAS else 4)
        if chunk and not (bf16 and isa in TILE_ISAS):
            chunked += [f"{path}:k{chunk}" for path in _c_variants([isa])]
    return (*_c_variants(isas), *chunked)


def _c_variants(isas: Iterable[str]) -> tuple[str, ...]:
    """Every C path of the ISAs ``isas`` over all of K: each with the next block of W prefetched
    into L1 or L2."""
    return tuple(f"c:{isa}{level}" for isa in isas for level in ("", ":l2"))


_C_PATH = re.compile(r"c:(\w+?)(:l2)?(?::k([0-9]+))?")


def _parse_path(path: str) -> tuple[str, str | None, int | None] | None:
    """``(isa, prefetch, k_chunk)`` of a C path ``"c:<isa>[:l2][:k<n>]"`` (0 < n < 2^31: a K chunk
    the op's int64 argument holds), else None."""
    match = _C_PATH.fullmatch(path)
    if match is None or match[3] is not None and not 0 < int(match[3]) < 2**31:
        return None
    return match[1], "l2" if match[2] else None, None if match[3] is None else int(match[3])


def _known_path(path: str, isas: Iterable[str]) -> bool:
    """Whether ``path`` is a C path (:func:`_parse_path`) at one of ``isas``."""
    parsed = _parse_path(path)
    return parsed is not None and parsed[0] in isas


def k_chunk(rows: int, K: int, x_bytes: int) -> int:
    """The elements of K the C++ op takes at a time for ``rows`` rows of x of ``x_bytes`` bytes an
    element, or 0 (all of K). Where a register block of x's rows (at most ``BLOCK_ROWS``) does not
    fit in L1 at K: the most whole 64-element steps of that block that fill half of L1 (the other
    half for W's lines), so that a block's chunk of x stays in L1 while W streams past it, where it
    came from L2; none where every row's chunk (each W block reads them all) would not fit in L1.
    down_proj, 896 x 4864, bf16, W cold, one Zen 4 core: 5 rows 549 -> 446 µs (with a rank-32 bank),
    8 rows 874 -> 614, two cores 318 -> 278, 443 -> 299; 10 rows 849 -> 575 (k1024; k768 628,
    k512 728), 16 rows 1141 -> 1022 (k1024; k768 982, k512 1091); at 40 rows every chunk was slower
    (2209 whole, 2348 at k1024, 2996 at k384), and where x fits it gained little (2 rows: 361 -> 341
    µs on one core, 302 -> 319 on two). The chunked op is measured beside the others, never assumed
    faster; these bounds keep calibration from timing where it lost."""
    block = min(rows, BLOCK_ROWS) * x_bytes
    l1 = l1d_bytes()["bytes"]
    if rows < 1 or block * K <= l1:
        return 0
    chunk = l1 // 2 // block // 64 * 64
    return chunk if rows * chunk * x_bytes <= l1 else 0


@functools.cache  # a handful of paths, parsed once each instead of on every op call
def c_options(path: str) -> dict[str, str | int | None]:
    """The C++ op's keyword arguments for a C path (``"c"``, ``"c:<isa>"``, ``"c:<isa>:l2"``, each
    with ``:k<n>`` or not): ``isa`` (None: the ISA set), ``prefetch`` (None: L1) and ``k_chunk``
    (None: all of K). The dict is shared: do not modify it."""
    isa, prefetch, chunk = (None, None, None) if path == "c" else _parse_path(path)
    return {"isa": isa, "prefetch": prefetch, "k_chunk": chunk}


def default_path(dtype: torch.dtype, bucket: int) -> str:
    """The path used without a measurement, from the CPU's features alone: ``"c"`` (the C++ op at
    the ISA set, by default the CPU's best) or ``"torch"``.

    The C++ op for up to 4 rows (it reads W once where torch's GEMM kernels are tuned for larger
    M), and for bf16 up to 64 rows on CPUs without bf16 arithmetic, where torch's bf16 path
    (:func:`modlora.ops._emulated_bf16`) converts W to fp32 on every call, three more passes over
    W's bytes.
    """
    if bucket <= 4 or (dtype == torch.bfloat16 and not NATIVE_BF16 and bucket <= 64):
        return "c"
    return "torch"


def choose(kind: str, x: Tensor, weight: Tensor, run: Run) -> str:
    """The path (``"torch"``, ``"c"``, ``"c:<isa>"`` or ``"c:<isa>:l2"``, either with ``:k<n>``) for
    ``x`` against ``weight``; ``run(path, x2d)`` computes the op by that path on a 2-D input and is
    called only to calibrate a case seen for the first time. The caller has checked that the C++
    op is allowed (CPU tensors, no autograd, C available)."""
    if _forced is not None:
        return _forced
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    exact = (kind, weight.shape, x.dtype, weight.dtype, rows, torch.get_num_threads(), cpu._C.isa())
    path = _exact.get(exact)
    if path is None:
        path = _exact[exact] = _choose_bucket(exact, x, weight, run)
    return path


def _choose_bucket(exact: tuple, x: Tensor, weight: Tensor, run: Run) -> str:
    """The choice for ``choose``'s exact case: that of its rows' bucket (:func:`rows_bucket`)."""
    kind, shape, x_dtype, w_dtype, rows, threads, isa = exact
    bucket = rows_bucket(rows)
    if bucket > MAX_BUCKET:
        return "torch"
    dtypes = str(x_dtype).removeprefix("torch.")
    if w_dtype != x_dtype:
        dtypes += "+" + str(w_dtype).removeprefix("torch.")
    key = (kind, shape[0], shape[1], dtypes, bucket, threads, isa)
    path = _choices.get(key)
    if path is None:
        path = _decide(key, x, weight, run)
    return path


def rows_bucket(rows: int) -> int:
    """The rows a case of ``rows`` rows is decided and measured at: its own up to ``SMALL_ROWS`` (at
    beam 5 one grouped gate/up call beats two, 0.40 vs 0.48 ms on 2 Zen 5 cores, where at 8 rows it
    does not, 0.63 vs 0.59), else the power of two at or above them: one choice, measured where the
    C++ op is mostly furthest behind torch (at 64 rows choices made at 40 ran 0.80-0.95x torch)."""
    return rows if rows <= SMALL_ROWS else m_bucket(rows)


def _decide(key: Key, x: Tensor, weight: Tensor, run: Run) -> str:
    global _spent
    bucket = key[4]
    if not _calibrate:
        return _choices.setdefault(key, default_path(x.dtype, bucket))
    _load()
    if key in _choices:
        return _choices[key]
    if _spent >= BUDGET_SECONDS:  # not stored on disk: a later process measures it
        return _choices.setdefault(key, default_path(x.dtype, bucket))
    spent, start = _spent, time.perf_counter()
    times = _measure(x, weight, run, bucket, (*c_paths(x.dtype, weight.dtype, bucket, weight.shape[1]), "torch"))
    _spent = spent + time.perf_counter() - start  # a group's parts calibrated inside counted once
    _choices[key] = min(times, key=times.get)
    _measured[_name(key)] = {"path": _choices[key], "rows": bucket, "ms": times}
    _save()
    return _choices[key]


def _measure(x: Tensor, weight: Tensor, run: Run, m: int, paths: tuple[str, ...]) -> dict[str, float]:
    """Best time in ms of each path on a random [m, K] input in x's dtype. The paths take turns
    (one call each per round), so a burst of load from other processes hits all alike. The first
    round warms up (first-touch allocations, lazy packing) and counts: a slow warm-up is never the
    best, and a case whose calls outlast ``PATH_SECONDS`` (a GEMM's rows on lm_head) costs one round."""
    xs = torch.randn(m, x.shape[-1], generator=torch.Generator().manual_seed(0)).to(x.dtype)
    cold = _cold(weight)
    samples: dict[str, list[float]] = {path: [] for path in paths}
    deadline = time.perf_counter() + PATH_SECONDS * len(paths)
    with torch.no_grad(), cpu.unrecorded():
        for _ in range(MAX_REPS + 1):
            for path in paths:
                cold()
                t0 = time.perf_counter()
                run(path, xs)
                samples[path].append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline:
                break
    return {path: min(ts) for path, ts in samples.items()}


def _cold(weight: Tensor) -> Callable[[], object]:
    """What to run before each timed call so that W comes from memory, as in a decode step, where
    the other layers' weights have streamed through since: W's lines flushed (``_C.evict``), all
    else left cached. Flushing every cache instead (reading a buffer of twice the L3) also evicted x
    and torch's own buffers: at 64 rows of q/o torch timed 0.44-0.47 ms flushed, 0.38 with only W
    cold, against 0.47 for the C++ op either way (2 Zen 4 threads). Where the CPU has no flush
    instruction, that buffer; nothing where W alone exceeds it."""
    size = 2 * llc_bytes()["bytes"]
    if weight.numel() * weight.element_size() >= size:
        return lambda: None
    if weight.is_contiguous() and cpu._C.evict(weight):
        return lambda: cpu._C.evict(weight)
    buffer = torch.ones(size // 4)
    return buffer.sum


@functools.cache
def llc_bytes() -> dict:
    """The last-level (L3) cache of the CPUs this system sees, in bytes, and where that came from.

    sysfs gives the size of one L3 and the CPUs sharing it, so distinct L3s are summed. glibc's
    sysconf (CPUID, via getconf) is the fallback only: in a VM it may report the host chip's total
    (384 MiB on this project's 2-vCPU EPYC guest, whose sysfs shows one 32 MiB L3), which would
    make every flush read 12x more than it needs. 512 MiB where neither says.
    """
    return _cache_bytes(3, sum, 512 << 20)


@functools.cache
def l1d_bytes() -> dict:
    """One core's L1 data cache in bytes (the smallest, where cores differ) and where that came
    from, as :func:`llc_bytes`; 32 KiB where neither sysfs nor sysconf says."""
    return _cache_bytes(1, min, 32 << 10)


def _cache_bytes(level: int, combine: Callable[[Iterable[int]], int], default: int) -> dict:
    """The data caches of ``level``: sysfs's distinct instances combined (``sum``, ``min``), else
    sysconf's figure, else ``default``."""
    found = {}
    instances = _sysfs_caches(level)
    if instances:
        found["sysfs"] = combine(instances.values())
    try:  # Python's os.sysconf does not know the cache sizes: ask getconf
        name = "LEVEL1_DCACHE_SIZE" if level == 1 else f"LEVEL{level}_CACHE_SIZE"
        size = int(subprocess.run(["getconf", name], capture_output=True, text=True, check=True).stdout.strip() or 0)
        if size > 0:
            found["sysconf"] = size
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    if not found:
        return {"bytes": default, "source": f"default (no L{level} size found in sysfs or sysconf)"}
    source = "sysfs" if "sysfs" in found else "sysconf"
    return {"bytes": found[source], "source": source, "found": found}


def _sysfs_caches(level: int) -> dict[str, int]:
    """Bytes of each data or unified cache of ``level`` in sysfs, keyed by the CPUs that share it."""
    instances = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            kind = (index / "type").read_text().strip() if (index / "type").exists() else "Unified"
            if (index / "level").read_text().strip() == str(level) and kind != "Instruction":
                size = (index / "size").read_text().strip()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
                instances[(index / "shared_cpu_list").read_text().strip()] = int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return instances


def _name(key: Key) -> str:
    return "|".join(map(str, key))


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text (``key<tabs>: value`` lines)."""
    first = text.split("\n\n", 1)[0]
    return {key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in first.splitlines())
            if sep}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """This machine's /proc/cpuinfo fields ({} where there is none)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_ids() -> tuple[str, str, str, str] | None:
    """Vendor, family, model and stepping from /proc/cpuinfo, or None where it has no such fields.
    VMs often name CPUs of different generations alike ("AMD EPYC" for Zen 3, 4 and 5): these tell
    them apart."""
    info = _cpuinfo()
    fields = [info.get(key) for key in ("cpu family", "model", "stepping")]
    if None in fields:
        return None
    return (info.get("vendor_id") or "?", *fields)


def cpu_signature() -> str | None:
    """:func:`cpu_ids` as one string, e.g. ``AuthenticAMD 25/17/1``."""
    ids = cpu_ids()
    return None if ids is None else f"{ids[0]} {'/'.join(ids[1:])}"


@functools.cache
def fingerprint() -> dict:
    """What a cached choice depends on besides its key: CPU model and signature, cores, library
    versions and the build of the C++ op (computed once per process; do not modify the dict)."""
    return {"format": FORMAT, "cpu": cpu_model(), "cpu_signature": cpu_signature(), "cores": os.cpu_count(),
            "torch": torch.__version__, "modlora": _version(), "isas": cpu._C.supported_isas() if cpu.HAVE_C else [],
            "c_build": _c_build()}


def _c_build() -> str | None:
    """A digest of the built C++ extension: a rebuilt op (other code, so other speeds) is measured
    afresh, not judged by what an older build measured under the same version number."""
    if not cpu.HAVE_C:
        return None
    try:
        return hashlib.sha256(Path(cpu._C.__file__).read_bytes()).hexdigest()[:16]
    except (OSError, AttributeError, TypeError):  # no file behind the module: versions decide alone
        return None


def _version() -> str | None:
    try:
        return importlib.metadata.version("modlora")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return None


def cache_file() -> Path:
    """This machine's cache file (its name carries a digest of :func:`fingerprint`)."""
    root = os.environ.get("MODLORA_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modlora"
    digest = hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"dispatch-{digest}.json"


def _read() -> dict[str, dict]:
    """The cached choices, or {} (with one warning per process) when the file is unusable."""
    global _warned
    path = cache_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint():
            raise ValueError("written for another CPU, version or format")
        choices = data.get("choices")
        if not isinstance(choices, dict) or not all(_valid(v) and _fits(k, v["path"]) for k, v in choices.items()):
            raise ValueError("malformed choices")
        return choices
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        if not _warned:
            log.warning("modlora dispatch cache %s ignored (%s); it will be rewritten", path, e)
            _warned = True
        return {}


def _valid(entry: object) -> bool:
    path = entry.get("path") if isinstance(entry, dict) else None
    return (isinstance(path, str) and (path == "torch" or _known_path(path, fingerprint()["isas"]))
            and isinstance(entry.get("ms"), dict)
            and all(isinstance(v, float) and math.isfinite(v) for v in entry["ms"].values()))


def _fits(name: str, path: str) -> bool:
    """Whether ``path`` is one :func:`c_paths` could have offered the case ``name``: torch, or the C++
    op at an ISA up to the one the case was measured under (``MODLORA_CPU_ISA`` caps it), a bf16-dot
    one only for bf16 x and W. A name that is no case is skipped by :func:`_load`."""
    key, parsed = _parse(name), _parse_path(path)
    if key is None or path == "torch":
        return True
    return (parsed is not None and parsed[0] in ISAS and key[6] in ISAS and ISAS.index(parsed[0]) <= ISAS.index(key[6])
            and (key[3] == "bfloat16" or parsed[0] not in BF16_DOT_ISAS))


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, entry in _read().items():
        key = _parse(name)
        if key is not None:
            _choices.setdefault(key, entry["path"])


def _parse(name: str) -> Key | None:
    parts = name.split("|")
    try:
        kind, n, k, dtype, bucket, threads, isa = parts
        return kind, int(n), int(k), dtype, int(bucket), int(threads), isa
    except ValueError:
        return None


def _save() -> None:
    """Write the file's choices and this process's measurements (ours win) atomically: what another
    process wrote meanwhile is kept, unless it wrote between our read and our rename."""
    try:
        atomic_write_json(cache_file(), {"fingerprint": fingerprint(), "choices": {**_read(), **_measured}})
    except OSError as e:  # a read-only home must not stop inference
        log.warning("modlora dispatch cache not written: %s", e)


reset()
