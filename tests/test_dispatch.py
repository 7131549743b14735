"""Dispatch by measurement (modlora.dispatch): the choice is a measured one among torch and the C++
op at each ISA of this CPU, forced paths are obeyed, a bad cache is ignored with one warning and
rewritten, concurrent writers leave one valid cache, and the model gives the same logits and beams
whichever path (and ISA) each linear takes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ops import CONFIG, random_adapter

from modlora import cpu, dispatch, ops
from modlora.adapters import AdapterController
from modlora.generation import generate
from modlora.loading import random_model


# C++ vs torch path, fixed tolerances (moved from test_ops.py; not yet float64 bounds as there):
# fp32 sums in different orders; bf16 rounds to 8 bits once more in one path.
# Whole-model logits, either path. fp32: the paths differ only in summation order (measured
# 2.4e-7 here with logits up to 0.7). bf16: each path rounds every linear's output to bf16 once,
# from differently ordered fp32 sums, so the logits may differ by a few bf16 units (2^-8 relative)
# of the largest logit; measured 1 unit here, 4 allowed for other CPUs. A 5% error in the adapters'
# scale on the C path moves a logit by 0.023 (6 units at 0.7) and fails.
def _assert_logits_agree(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=4 * 2.0 ** -8 * float(ref.abs().max()))

# Each test: its own cache dir, calibration on, nothing forced (conftest.calibrating).
pytestmark = [pytest.mark.skipif(not cpu.HAVE_C, reason="modlora._C is not built: torch is the only path"),
              pytest.mark.usefixtures("calibrating")]
K, N = 64, 40


def _paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The measured candidates of a case with x and W in dtype."""
    return (*dispatch.c_paths(dtype, dtype), "torch") if cpu.HAVE_C else ("torch",)


PATHS, BF16_PATHS = _paths(torch.float32), _paths(torch.bfloat16)


@pytest.fixture
def c_calls(monkeypatch):
    """Calls of the C++ op through ops: (x's shape, the ISA, prefetch level and K chunk asked for)."""
    calls = []
    real = cpu.lora_bank_linear

    def spy(*args, **kwargs):
        calls.append((args[0].shape, kwargs.get("isa"), kwargs.get("prefetch"), kwargs.get("k_chunk")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops.cpu, "lora_bank_linear", spy)
    return calls


def _asked(path: str) -> tuple[str | None, str | None, int | None]:
    """The (isa, prefetch, k_chunk) a C path asks the op for: ``"c"`` the ISA set, ``"c:<isa>"`` L1
    and all of K, ``:l2`` L2, ``:k<n>`` chunks of n."""
    _, *fields = path.split(":")
    chunks = [int(f[1:]) for f in fields[1:] if f.startswith("k")]
    return (fields[0] if fields else None), ("l2" if "l2" in fields else None), (chunks[0] if chunks else None)


def _inputs(m: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(m)
    return torch.randn(m, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)


def assert_linear_exact(x: torch.Tensor, w: torch.Tensor) -> None:
    """``ops.linear(x, w)`` in fp32 within the bound of a K-term dot product: K * 2^-24 * sum|terms|,
    against float64 (whichever path ran and however it ordered the sum)."""
    y = ops.linear(x, w).double()
    ref = x.double() @ w.double().t()
    bound = x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() / bound).max())


def _cache() -> dict:
    return json.loads(dispatch.cache_file().read_text())


def _choices(dtype: torch.dtype) -> dict[str, dict]:
    """The cache's entries for x and W in dtype. On a CPU without bf16 arithmetic the torch path of
    a bf16 case runs the fp32 case (ops._emulated_bf16), which has its own entry: that one must be
    the only other, and only there."""
    name = str(dtype).removeprefix("torch.")
    choices = _cache()["choices"]
    dtypes = {n: dispatch._parse(n)[3] for n in choices}
    others = set(dtypes.values()) - {name}
    assert others <= ({"float32"} if dtype == torch.bfloat16 and not dispatch.NATIVE_BF16 else set()), others
    return {n: e for n, e in choices.items() if dtypes[n] == name}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidates_are_this_cpus_isas(dtype):
    """Every vector ISA of the CPU up to the one set (scalar only without one), each prefetching W
    into L1 and into L2; bf16-dot ISAs for bf16 x and W only."""
    ceiling = dispatch.ISAS.index(cpu._C.isa())
    vector = [i for i in cpu._C.supported_isas() if i != "scalar" and dispatch.ISAS.index(i) <= ceiling]
    isas = [i for i in vector if dtype == torch.bfloat16 or i not in dispatch.BF16_DOT_ISAS] or ["scalar"]
    assert _paths(dtype)[:-1] == tuple(path for i in isas for path in (f"c:{i}", f"c:{i}:l2"))
    with forced_isa("avx2" if "avx2" in vector else "scalar") as ceiling:  # MODLORA_CPU_ISA caps them
        assert dispatch.c_paths(dtype, dtype)[-2:] == (f"c:{ceiling}", f"c:{ceiling}:l2")


@contextlib.contextmanager
def forced_isa(name: str):
    before = cpu._C.isa()
    cpu._C.set_isa(name)
    try:
        yield name
    finally:
        cpu._C.set_isa(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_chosen_path_is_the_fastest_measured_and_cached(dtype):
    x, w = _inputs(3, dtype)
    ops.linear(x, w)
    assert _cache()["fingerprint"] == dispatch.fingerprint()
    (name, entry), = _choices(dtype).items()
    assert name.startswith(f"linear|{N}|{K}|{str(dtype)[6:]}|3|")
    assert set(entry["ms"]) == set(_paths(dtype))
    assert entry["path"] == min(entry["ms"], key=entry["ms"].get)


@pytest.mark.parametrize("dtype,fastest", [(torch.float32, p) for p in PATHS]
                         + [(torch.bfloat16, p) for p in BF16_PATHS])
@torch.no_grad()
def test_the_measured_winner_runs(dtype, fastest, monkeypatch, c_calls):
    monkeypatch.setattr(dispatch, "_measure", lambda *a: {p: 1.0 if p == fastest else 2.0 for p in a[-1]})
    x, w = _inputs(5, dtype)
    for _ in range(2):
        ops.linear(x, w)
    assert c_calls == ([] if fastest == "torch" else [((5, K), *_asked(fastest))] * 2)
    assert [e["path"] for e in _choices(dtype).values()] == [fastest]


@torch.no_grad()
def test_a_case_is_measured_at_its_own_rows_up_to_8_and_at_its_buckets_top_above(monkeypatch):
    """Beam 5 is measured at 5 rows, not at 8: the kernel and the winner can differ. Above 8 rows a
    bucket is measured once, at its top, where the C++ op is furthest behind torch's GEMM."""
    rows = []
    monkeypatch.setattr(dispatch, "_measure", lambda x, w, run, m, paths: rows.append(m) or {p: 1.0 for p in paths})
    for m in (5, 6, 3, 5, 40, 64, 33, 9, 16, 100):
        ops.linear(*_inputs(m))
    assert rows == [5, 6, 3, 64, 16, 128]
    assert sorted(int(name.split("|")[4]) for name in _cache()["choices"]) == [3, 5, 6, 16, 64, 128]


@torch.no_grad()
def test_each_timed_call_meets_w_evicted(monkeypatch):
    """Calibration flushes W's lines (not every cache) before each timed call, as a decode step meets W."""
    events = []
    real_evict = cpu._C.evict
    monkeypatch.setattr(cpu._C, "evict", lambda t: events.append(("evict", t.data_ptr())) or real_evict(t))
    real = dispatch._measure
    monkeypatch.setattr(dispatch, "_measure", lambda x, w, run, m, paths: real(
        x, w, lambda p, xs: events.append(("run", p)) or run(p, xs), m, paths))
    x, w = _inputs(5)
    ops.linear(x, w)
    runs = [i for i, e in enumerate(events) if e[0] == "run"]
    assert len(runs) >= len(PATHS)
    assert all(events[i - 1] == ("evict", w.data_ptr()) for i in runs)


def test_without_a_flush_instruction_calibration_reads_a_buffer_and_nothing_for_a_huge_weight(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu._C, "evict", lambda t: calls.append(t) or False)
    cold = dispatch._cold(torch.randn(64, 40))
    assert len(calls) == 1  # asked once whether it can
    cold()
    assert len(calls) == 1 and cold.__self__.numel() * 4 == 2 * dispatch.llc_bytes()["bytes"]
    monkeypatch.setattr(dispatch, "llc_bytes", lambda: {"bytes": 1024})
    assert dispatch._cold(torch.randn(64, 40))() is None and len(calls) == 1  # W alone exceeds 2 LLCs


def test_evict_keeps_the_values():
    w = torch.randn(300, 77)
    before = w.clone()
    assert cpu._C.evict(w) is (platform.machine() in ("x86_64", "AMD64", "i386", "i686"))
    assert torch.equal(w, before)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu._C.evict(w.t())


def test_rows_bucket():
    assert [dispatch.rows_bucket(m) for m in (1, 5, 8, 9, 16, 17, 33, 64, 65, 160)] == [1, 5, 8, 16, 16, 32, 64, 64,
                                                                                       128, 256]


@torch.no_grad()
def test_a_call_longer_than_the_time_per_path_costs_one_call_per_path(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "PATH_SECONDS", 0.0)
    real = dispatch._measure
    monkeypatch.setattr(dispatch, "_measure",
                        lambda x, w, run, m, paths: real(x, w, lambda p, xs: calls.append(p) or run(p, xs), m, paths))
    ops.linear(*_inputs(5))
    assert sorted(calls) == sorted(PATHS)


@pytest.mark.parametrize("forced", ["c", *PATHS, *([f"{PATHS[-2]}:k32"] if cpu.HAVE_C else [])])
@torch.no_grad()
def test_forced_path_is_obeyed_without_measuring(forced, monkeypatch, c_calls):
    monkeypatch.setenv("MODLORA_DISPATCH", forced)
    dispatch.reset()
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured under a forced path"))
    for m in (1, 100, 1000):
        x, w = _inputs(m)
        assert_linear_exact(x, w)
    # "c": the ISA set (MODLORA_CPU_ISA), by default the best, prefetching into L1
    assert [c[1:] for c in c_calls] == ([] if forced == "torch" else [_asked(forced)] * 3)
    assert not dispatch.cache_file().exists()


@pytest.mark.parametrize("forced", ["c:sse9", "c:{isa}:k0", "c:{isa}:k", "c:{isa}:l2:kx", "c:{isa}:k32:l2",
                                    "c:{isa}:k\u00b2", "c:{isa}:k2147483648", "c:{isa}:k99999999999999999999"])
def test_unknown_forced_path_is_ignored_with_a_warning(forced, monkeypatch, caplog):
    """A name that is not a path of this CPU, or whose K chunk is not a decimal number in 1..2^31-1."""
    forced = forced.format(isa=cpu._C.supported_isas()[-1])
    monkeypatch.setenv("MODLORA_DISPATCH", forced)
    with caplog.at_level(logging.WARNING, logger="modlora"):
        dispatch.reset()
    assert f"MODLORA_DISPATCH={forced} ignored" in caplog.text and dispatch._forced is None


def test_k_chunk_fits_a_register_block_of_x_in_half_of_l1(monkeypatch):
    """The K chunk offered where a register block of x's rows (at most 8) does not fit in L1 at K:
    the most 64-element steps of them that fill half of L1; none where the rows fit or no step does;
    each ISA's for x as its kernel reads it (bf16 by the bf16-dot kernel, fp32 by the FMA ones)."""
    monkeypatch.setattr(dispatch, "l1d_bytes", lambda: {"bytes": 32 << 10})
    assert dispatch.k_chunk(5, 4864, 2) == 1600  # 16 KiB / (5 rows * 2 bytes) = 1638
    assert dispatch.k_chunk(8, 4864, 2) == dispatch.k_chunk(16, 4864, 2) == 1024
    assert dispatch.k_chunk(17, 4864, 2) == dispatch.k_chunk(40, 4864, 2) == 0  # 17 rows' chunks exceed L1
    assert dispatch.k_chunk(5, 4864, 4) == 768
    assert dispatch.k_chunk(1, 4864, 2) == 0  # 8192 elements fit
    assert dispatch.k_chunk(5, 896, 2) == dispatch.k_chunk(0, 4864, 2) == 0
    assert dispatch.k_chunk(5, 896, 4) == dispatch.k_chunk(3, 4864, 2) == 0  # 17.9 and 29.2 KB fit
    assert dispatch.k_chunk(4, 4864, 2) == 2048  # 38.9 KB
    whole = dispatch.c_paths(torch.bfloat16, torch.bfloat16)
    chunked = dispatch.c_paths(torch.bfloat16, torch.bfloat16, 5, 4864)
    assert chunked[:len(whole)] == whole
    assert chunked[len(whole):] == tuple(f"{path}:k{1600 if isa == 'avx512_bf16' else 768}"
                                         for path in whole if (isa := path.split(":")[1]) not in dispatch.TILE_ISAS)
    monkeypatch.setattr(dispatch, "l1d_bytes", lambda: {"bytes": 512})
    assert dispatch.k_chunk(8, 4864, 4) == 0  # not one step fits


def test_l1d_size_is_found():
    """The L1 data cache's size is plausible, and read from sysfs wherever sysfs lists one."""
    found = dispatch.l1d_bytes()
    assert 4 << 10 <= found["bytes"] <= 4 << 20, found
    listed = [index for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")
              if (index / "level").is_file() and (index / "level").read_text().strip() == "1"
              and (index / "type").is_file() and (index / "type").read_text().strip() == "Data"]
    assert found["source"] == ("sysfs" if listed else found["source"]), found


@torch.no_grad()
def test_a_case_beyond_l1_also_measures_k_chunks_and_runs_the_winner(monkeypatch, c_calls):
    """Where x's rows do not fit in L1 at K (an L1 of 4 KiB here: 5 fp32 rows of K = 300, 6 KB),
    every C path is measured over all of K and in chunks; the winner runs, as exact as any."""
    monkeypatch.setattr(dispatch, "l1d_bytes", lambda: {"bytes": 4 << 10})
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 300, generator=g), torch.randn(N, 300, generator=g)
    assert_linear_exact(x, w)
    (entry,) = _choices(torch.float32).values()
    assert set(entry["ms"]) == {*dispatch.c_paths(torch.float32, torch.float32, 5, 300), "torch"}
    assert any(path.endswith(":k64") for path in entry["ms"])
    c_calls.clear()
    assert_linear_exact(x, w)
    assert c_calls == ([] if entry["path"] == "torch" else [((5, 300), *_asked(entry["path"]))])


@torch.no_grad()
def test_no_calibration_uses_the_defaults_and_no_cache(monkeypatch, c_calls):
    monkeypatch.setenv("MODLORA_CALIBRATE", "0")
    dispatch.reset()
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured with MODLORA_CALIBRATE=0"))
    for m in (1, 4, 200):
        ops.linear(*_inputs(m))
    # the default: C at the ISA set for up to 4 rows
    assert c_calls == [((1, K), None, None, None), ((4, K), None, None, None)]
    assert not dispatch.cache_file().exists()


@pytest.mark.parametrize("content", ["{not json", "truncated", "foreign", "old format", "unknown path",
                                     "huge k chunk", "above its case's ISA", "bf16 dot for fp32", "nested"])
@torch.no_grad()
def test_bad_cache_is_ignored_with_one_warning_and_rewritten(content, caplog):
    path = dispatch.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"path": "torch", "ms": {"torch": 1.0}}
    good = {"fingerprint": dispatch.fingerprint(), "choices": {"linear|1|1|float32|1|1|x": entry}}
    text = {"{not json": "{not json",
            "truncated": json.dumps(good)[:40],
            "foreign": json.dumps({**good, "fingerprint": {**good["fingerprint"], "torch": "0.0.1"}}),
            # format 1 cached "c" (one ISA) where format 2 caches "c:<isa>"
            "old format": json.dumps({**good, "fingerprint": {**good["fingerprint"], "format": 1}}),
            "unknown path": json.dumps({**good, "choices": {"linear|1|1|float32|1|1|x": {**entry, "path": "c"}}}),
            "huge k chunk": json.dumps({**good, "choices": {"linear|1|1|float32|1|1|x": {
                **entry, "path": "c:scalar:k99999999999999999999"}}}),
            # measured under MODLORA_CPU_ISA=scalar: no other ISA was offered; a bf16-dot kernel for fp32 x
            "above its case's ISA": json.dumps({**good, "choices": {"linear|1|1|float32|1|1|scalar": {
                **entry, "path": "c:avx2"}}}),
            "bf16 dot for fp32": json.dumps({**good, "choices": {"linear|1|1|float32|1|1|amx": {
                **entry, "path": "c:avx512_bf16"}}}),
            "nested": "[" * 200_000,
            }[content]
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="modlora"):
        for m in (1, 2):  # two cases: two reads and a write each, one warning
            ops.linear(*_inputs(m))
    warnings = [r for r in caplog.records if "cache" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0].getMessage()
    data = _cache()
    assert data["fingerprint"] == dispatch.fingerprint()
    assert sorted(name.split("|")[4] for name in data["choices"]) == ["1", "2"]  # the old entry is gone


@torch.no_grad()
def test_calibration_stops_at_its_budget_and_the_rest_is_measured_later(monkeypatch):
    """Once a process has spent its calibration budget, a new case takes the default path and is not
    cached: a later process measures it."""
    monkeypatch.setattr(dispatch, "BUDGET_SECONDS", 1e-9)
    for m in (1, 2, 3):
        assert_linear_exact(*_inputs(m))
    assert [name.split("|")[4] for name in _cache()["choices"]] == ["1"]


@torch.no_grad()
def test_this_processs_measurement_wins_over_the_files_for_its_case(monkeypatch):
    """A case this process measured is written as measured, whatever the file held for it; the
    file's other cases are kept."""
    x, w = _inputs(3)
    name = f"linear|{N}|{K}|float32|3|{torch.get_num_threads()}|{cpu._C.isa()}"
    other = name.replace("|3|", "|2|")
    stale = {"path": "torch", "ms": {"torch": 9.0}}
    dispatch.cache_file().parent.mkdir(parents=True, exist_ok=True)
    dispatch.cache_file().write_text(json.dumps({"fingerprint": dispatch.fingerprint(), "choices": {other: stale}}))
    dispatch._load()  # the file was read before another process wrote this case into it
    dispatch.cache_file().write_text(json.dumps({"fingerprint": dispatch.fingerprint(),
                                                 "choices": {other: stale, name: stale}}))
    monkeypatch.setattr(dispatch, "_measure", lambda *a: {"c:scalar": 1.0, "torch": 2.0})
    assert_linear_exact(x, w)
    assert _cache()["choices"] == {other: stale, name: {"path": "c:scalar", "rows": 3,
                                                        "ms": {"c:scalar": 1.0, "torch": 2.0}}}


@torch.no_grad()
def test_a_cached_l2_choice_is_read_and_obeyed(monkeypatch, c_calls):
    """A choice of the C++ op prefetching into L2, as another process cached it, runs as cached."""
    path = f"c:{[isa for isa in cpu._C.supported_isas() if isa not in dispatch.BF16_DOT_ISAS][-1]}:l2"  # fp32 x
    x, w = _inputs(3)
    name = f"linear|{N}|{K}|float32|3|{torch.get_num_threads()}|{cpu._C.isa()}"
    dispatch.cache_file().parent.mkdir(parents=True, exist_ok=True)
    dispatch.cache_file().write_text(json.dumps({"fingerprint": dispatch.fingerprint(),
                                                 "choices": {name: {"path": path, "ms": {path: 1.0}}}}))
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured a cached case"))
    assert_linear_exact(x, w)
    assert c_calls == [((3, K), *_asked(path))]


@pytest.mark.skipif(not cpu.HAVE_C, reason="needs the C++ extension built")
def test_a_rebuilt_extension_calibrates_afresh(tmp_path, monkeypatch):
    """Choices measured with one build of the C++ op are not reused by another build of the same
    version: its speed may differ (this project's own kernel changes did)."""
    before = dispatch.cache_file()
    rebuilt = tmp_path / "_C.so"
    rebuilt.write_bytes(b"another build")
    monkeypatch.setattr(cpu._C, "__file__", str(rebuilt))
    dispatch.fingerprint.cache_clear()
    try:
        assert dispatch.fingerprint()["c_build"] is not None
        assert dispatch.cache_file() != before
    finally:
        dispatch.fingerprint.cache_clear()


def test_cpus_of_one_name_but_another_generation_keep_their_own_caches(monkeypatch):
    """VMs name Zen 3, 4 and 5 alike ("AMD EPYC"): the family and model numbers tell them apart."""
    def cache_for(family: str, model: str) -> Path:
        info = {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC", "cpu family": family,
                "model": model, "stepping": "1"}
        monkeypatch.setattr(dispatch, "_cpuinfo", lambda: info)
        dispatch.fingerprint.cache_clear()
        return dispatch.cache_file()

    try:
        zen3, zen4, zen4_again = cache_for("25", "1"), cache_for("25", "17"), cache_for("25", "17")
        assert dispatch.cpu_signature() == "AuthenticAMD 25/17/1"
        assert zen3 != zen4 and zen4 == zen4_again
    finally:
        dispatch.fingerprint.cache_clear()


def test_cpuinfo_is_parsed_from_its_first_processor():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC 9004\nstepping\t: 1\nflags\t\t: fpu avx512f\nempty\t:\nno colon\n\n"
            "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n")
    info = dispatch.parse_cpuinfo(text)
    assert info["model name"] == "AMD EPYC 9004" and info["model"] == "17" and info["cpu family"] == "25"
    assert info["vendor_id"] == "AuthenticAMD" and info["empty"] == "" and "no colon" not in info


def test_cpu_signature_without_cpuinfo_fields_is_none(monkeypatch):
    monkeypatch.setattr(dispatch, "_cpuinfo", lambda: {"model name": "Some ARM"})
    assert dispatch.cpu_signature() is None and dispatch.cpu_model() == "Some ARM"


_WORKER = """
import torch
from modlora import ops
for n in range(8, 48, 4):
    ops.linear(torch.randn(3, 64), torch.randn(n, 64))
"""


def test_two_processes_calibrating_at_once_leave_one_valid_cache(tmp_path):
    env = {**os.environ, "MODLORA_CACHE_DIR": str(tmp_path), "MODLORA_CALIBRATE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MODLORA_DISPATCH", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [dispatch.cache_file().name]  # no temp file left behind
    data = json.loads(files[0].read_text())
    assert data["fingerprint"] == dispatch.fingerprint()
    assert len(data["choices"]) >= 10  # each process writes all it measured, merged with the file
    assert all(dispatch._valid(e) for e in data["choices"].values())


def _model(dtype):
    """A small model with an `output` pair bound (the controller is returned to keep it alive)."""
    model = random_model(CONFIG, seed=1, dtype=dtype)
    ctl = AdapterController(model)
    ctl.set_adapters(random_adapter(model, 4, 1, "in"), random_adapter(model, 4, 2, "out"), w_in=0.3,
                     w_out=0.7, strategy="output")
    return model, ctl


def _with_paths(monkeypatch, pick):
    monkeypatch.setattr(dispatch, "choose", lambda kind, x, weight, run: pick())


def _forced_paths(dtype: torch.dtype) -> list[str]:
    """Each C path of the case, also with K in chunks of 32 (the model's K: 96 and 200), then torch
    (and, for bf16, the AMX driver on emulated tiles)."""
    cpu._C._allow_amx_emulation(True)
    whole = dispatch.c_paths(dtype, dtype)
    tiles = [f"c:{isa}" for isa in dispatch.TILE_ISAS] if dtype == torch.bfloat16 else []
    chunked = [f"{path}:k32" for path in whole if not any(path.startswith(t) for t in tiles)]
    return [*whole, *chunked, "torch", *(["c:amx_emulated"] if dtype == torch.bfloat16 else [])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_model_logits_agree_whichever_path_each_linear_takes(dtype, monkeypatch):
    model, _ctl = _model(dtype)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    paths = _forced_paths(dtype)
    logits = {}
    for name, pick in [(p, lambda p=p: p) for p in paths] + [("mixed", lambda: rng.choice(paths))]:
        _with_paths(monkeypatch, pick)
        cache = model.new_cache(2, 7, max_new_tokens=2, num_beams=1)
        logits[name] = torch.stack((model.prefill(ids, None, cache), model.decode_step(ids[:, 0], cache))).float()
    for got in logits.values():
        _assert_logits_agree(got, logits["torch"], dtype)


@torch.no_grad()
def test_beam_search_is_the_same_whichever_path_each_linear_takes(monkeypatch):
    model, _ctl = _model(torch.float32)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    rng = random.Random(1)
    paths = _forced_paths(torch.float32)
    outs = []
    for pick in [lambda p=p: p for p in paths] + [lambda: rng.choice(paths)]:
        _with_paths(monkeypatch, pick)
        outs.append(generate(model, ids, num_beams=3, max_new_tokens=8, eos_token_id=[CONFIG.vocab_size - 1],
                             pad_token_id=0))
    assert all(torch.equal(out, outs[-2]) for out in outs)  # outs[-2]: torch
