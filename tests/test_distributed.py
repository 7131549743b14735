"""Several processes as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT on 127.0.0.1, gloo):
sharded stages equal one process bit for bit, a killed rank resumes, data parallel equals one
process with the same global batch, and ranks that disagree stop at once with one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modlora import checkpoint, cli, distributed
from modlora.pipeline import RUN_RECORD, Pipeline, PipelineConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch built without gloo")]

TOML = """out_dir = "unused"
[data]
langs = ["en", "fr"]
train_limit = 8
weights_limit = 2
eval_limit = 2
[train]
epochs = 1
lr = 1e-3
batch_size = 1
grad_accum = 1
checkpoint_every = 1
[weights]
epochs = 1
batch_size = 2
[eval]
num_beams = 2
max_new_tokens = 4
batch_size = 40
"""
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], world: int = 2, extra: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """``python -m modlora ARGS`` once per rank, with the environment torchrun gives its workers."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        if sys.platform == "linux":
            env["GLOO_SOCKET_IFNAME"] = "lo"
        procs.append(subprocess.Popen([sys.executable, "-m", "modlora", *args, *(extra or {}).get(rank, [])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config file and the one-process run of the whole pipeline."""
    root = tmp_path_factory.mktemp("dist")
    (root / "c.toml").write_text(TOML)
    cfg = PipelineConfig.from_toml(root / "c.toml")
    cfg.out_dir = str(root / "one")
    Pipeline(cfg, log=lambda _: None).run()
    return root


def _kill_at(procs: list[subprocess.Popen], checkpoint_file: Path) -> None:
    """Once ``checkpoint_file`` exists (a job's first step saved), SIGKILL rank 1 mid-job and stop
    rank 0 as torchrun does (SIGTERM, then SIGKILL after a grace period)."""
    deadline = time.monotonic() + 120
    while not checkpoint_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    procs[0].terminate()
    try:
        procs[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
        procs[0].kill()
    _wait(procs)


def _tree(root: Path) -> dict[str, bytes]:
    """Every output but the timing logs, checkpoints, the run's own out_dir and the temp files a
    SIGKILLed process leaves (hidden names, never read)."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("log.jsonl", checkpoint.FILE) and not p.name.startswith("."):
            raw = p.read_bytes()
            if p.name in (RUN_RECORD, "results.json"):
                data = json.loads(raw)
                (data["config"] if "config" in data else data)["out_dir"] = None
                raw = json.dumps(data, sort_keys=True).encode()
            files[str(p.relative_to(root))] = raw
    return files


def test_two_ranks_killed_mid_stage_resume_and_equal_one_process(setup):
    """2 ranks; rank 1 killed inside its first adapter training (and rank 0 stopped, as torchrun
    does), the command rerun: every output equals the one-process run's, bit for bit."""
    out = setup / "two"
    args = ["run", str(setup / "c.toml"), "--out", str(out)]
    _kill_at(_launch(args), out / "train" / "en-out" / checkpoint.FILE)  # jobs in[en], out[en], in[fr], out[fr]
    assert not (out / "pool" / "en" / "out").exists()

    results = _wait(_launch(args))
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "[rank 1/2] out[en]: resumed at step" in results[1][2]
    assert "| Setting 1 (learned) |" in results[0][1] and results[1][1] == ""  # rank 0 prints the table
    one, two = _tree(setup / "one"), _tree(out)
    assert sorted(one) == sorted(two)
    assert len([f for f in one if f.startswith("eval/cells/")]) == 14 * 2  # Table 1 rows x directions
    assert "full/model/model.safetensors" in one  # the full fine-tuning, one more job of stage 1
    for name in one:
        assert one[name] == two[name], name  # adapters, weights, evaluations, table: bit-identical


def test_data_parallel_equals_one_process_with_the_global_batch(setup):
    """2 ranks x micro-batch 1 against one process with micro-batch 2: the same global batches."""
    cfg = PipelineConfig.from_toml(setup / "c.toml")
    cfg.out_dir, cfg.train.batch_size, cfg.data.train_limit = str(setup / "big-batch"), 2, 4
    Pipeline(cfg, log=lambda _: None).train_adapters()
    results = _wait(_launch(["train-adapters", "--config", str(setup / "c.toml"), "--out", str(setup / "dp"),
                             "--train-limit", "4", "--data-parallel"]))
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:]
    for job in ("en-in", "en-out", "fr-in", "fr-out"):
        logs = [[json.loads(line) for line in (setup / run / "train" / job / "log.jsonl").read_text().splitlines()]
                for run in ("big-batch", "dp")]
        assert len(logs[0]) == len(logs[1]) == 2
        for a, b in zip(*logs, strict=True):
            assert (a["tokens"], a["trained_tokens"]) == (b["tokens"], b["trained_tokens"])
            # fp32 sums in another order: a few ulps of relative error, far below any real bug
            # (a missing rank's gradient moves the norm by percents, a mis-scaled loss by 2x)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for lang in ("en", "fr"):
        for role in ("in", "out"):
            name = f"pool/{lang}/{role}/adapter_model.safetensors"
            a, b = load_file(setup / "big-batch" / name), load_file(setup / "dp" / name)
            assert a.keys() == b.keys()
            for k in a:
                # Adam divides by sqrt(v) + 1e-8: gradient rounding near that scale moves an update
                # by up to ~2% of lr; a wrong gradient moves it by the whole lr (2 steps here).
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.1 * LR)


def test_data_parallel_killed_mid_job_resumes_as_if_never_stopped(setup):
    """2 ranks, LoRA dropout (each rank its own masks, restored from the checkpoint's per-rank RNG
    states) and a last global batch rank 1 has no example of (5 examples, batch 1 x 2): killed in
    the first job and rerun, the adapters equal an uninterrupted data-parallel run's, bit for bit."""
    args = ["train-adapters", "--config", str(setup / "c.toml"), "--train-limit", "5", "--dropout", "0.1",
            "--data-parallel"]
    whole = _wait(_launch([*args, "--out", str(setup / "dp-whole")]))
    assert [rc for rc, _, _ in whole] == [0, 0], whole[0][2][-2000:]
    out = setup / "dp-killed"
    _kill_at(_launch([*args, "--out", str(out)]), out / "train" / "en-in" / checkpoint.FILE)
    assert not (out / "pool" / "en" / "in").exists()
    results = _wait(_launch([*args, "--out", str(out)]))
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "in[en]: resumed at step" in results[0][2]
    for lang in ("en", "fr"):
        for role in ("in", "out"):
            name = f"pool/{lang}/{role}/adapter_model.safetensors"
            a, b = load_file(setup / "dp-whole" / name), load_file(out / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_backend_serves_cpu_tensors_on_a_machine_with_gpus(monkeypatch):
    """A run may keep its model on the CPU where CUDA exists: NCCL alone cannot sum CPU gradients."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend() == "gloo"


def test_ranks_with_different_configs_stop_with_one_line(setup):
    started = time.monotonic()
    results = _wait(_launch(["train-adapters", "--config", str(setup / "c.toml"), "--out", str(setup / "mm")],
                            extra={1: ["--train-limit", "5"]}), timeout=100)
    assert time.monotonic() - started < 100  # well before any collective's timeout
    for rc, _, err in results:
        assert rc == 2
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert len(lines) == 1 and "the ranks see different configs" in lines[0], err
        assert "Traceback" not in err


def test_data_parallel_needs_several_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train-adapters", "--out", str(tmp_path), "--data-parallel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modlora: error: --data-parallel needs several processes") and "\n" not in err


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set: launch with torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer in [1, ...], got 'two'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be an integer in [1, ...], got '0'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK must be an integer in [0, 1], got '2'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be an integer in [0, 1], got '-1'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MODLORA_DIST_TIMEOUT": "inf"}, "MODLORA_DIST_TIMEOUT must be a number of "
     "seconds in (0, 10000000], got 'inf'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MODLORA_DIST_TIMEOUT": "1e20"}, "got '1e20'"),
])
def test_launcher_variables_are_checked_and_named(tmp_path, capsys, monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MODLORA_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["train-adapters", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modlora: error: ") and message in err and "\n" not in err, err


def test_resuming_with_another_world_size_is_refused(tmp_path, monkeypatch):
    """The world size is part of a data-parallel run's global batch: a checkpoint of one process
    does not resume on two (stopped with the setting named, before any collective)."""
    from test_train import _train_once

    _train_once(tmp_path, stop_after=2)
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=0, world_size=2, data_parallel=True))
    with pytest.raises(ValueError, match=r"different run configuration \(data_parallel_world_size None -> 2\)"):
        _train_once(tmp_path)


def test_more_processes_than_jobs_is_refused():
    ctx = distributed.Context(rank=0, world_size=5)
    with pytest.raises(ValueError, match="stage train-adapters has 4 jobs for 5 processes"):
        ctx.check_jobs("train-adapters", 4, training=True)
    ctx.check_jobs("evaluate", 26, training=False)
    dp = distributed.Context(rank=0, world_size=5, data_parallel=True)
    dp.check_jobs("train-adapters", 4, training=True)  # data parallel: every rank trains each job
    with pytest.raises(ValueError, match="stage evaluate has 4 jobs"):
        dp.check_jobs("evaluate", 4, training=False)


def test_jobs_are_dealt_by_index_not_by_what_is_done():
    jobs = list("abcdefg")
    shards = [distributed.Context(rank=r, world_size=3).shard(jobs) for r in range(3)]
    assert shards == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert distributed.Context(rank=1, world_size=3, data_parallel=True).training_jobs(jobs) == jobs
    parts = [distributed.DataParallel(distributed.Context(rank=r, world_size=2)).part([4, 5, 6]) for r in range(2)]
    assert parts == [[4, 5], [6]]
