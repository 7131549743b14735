"""The pipeline on several processes (``torchrun``): stage jobs sharded across ranks, or one job
data parallel over all of them.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address), :func:`init` joins the process group (nccl with ``cuda:LOCAL_RANK`` where there is a GPU,
gloo on the CPU) and checks that every rank runs the same command on the same config. Without
those variables everything here is the single process: one rank owning every job.

- **Sharding** (the default): a stage's independent jobs, listed in the same order by every rank
  whether finished or not, belong to rank ``index % world_size``. A job is seeded by its own
  settings, never by rank or order, and its files are written by its owner only (atomically), so
  the outputs equal a one-process run's and a restarted rank finds its own checkpoints.
- **Data parallel** (``--data-parallel``): the training jobs run one after another on all ranks;
  each step's global micro-batches (``batch_size * world_size`` examples each, the same batches a
  single process with that batch size trains on) are cut into one slice per rank, the ranks'
  gradients are summed by one all-reduce per optimizer step, and rank 0 writes checkpoints.

Every collective has a timeout: ``STARTUP_TIMEOUT`` for the start-up checks, ``MODLORA_DIST_TIMEOUT``
seconds (default 6 hours: the stage barriers wait for the slowest rank's jobs) for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TextIO, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
STARTUP_TIMEOUT = timedelta(seconds=120)


MAX_STAGE_TIMEOUT = 10**7  # seconds (116 days): far past any stage, within what the backends take


def _stage_timeout() -> timedelta:
    raw = os.environ.get("MODLORA_DIST_TIMEOUT", str(6 * 3600))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_STAGE_TIMEOUT:
        raise ValueError(f"MODLORA_DIST_TIMEOUT must be a number of seconds in (0, {MAX_STAGE_TIMEOUT}], got {raw!r}")
    return timedelta(seconds=seconds)


def _env_int(name: str, default: str | None, low: int, high: int | None = None) -> int:
    """An integer launcher variable (torchrun's WORLD_SIZE, RANK, LOCAL_RANK) in [low, high]."""
    raw = os.environ.get(name, default)
    if raw is None:
        raise ValueError(f"{name} is not set: launch with torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK")
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {'...' if high is None else high}], got {raw!r}")
    return value


@dataclass
class Context:
    """This process's place: rank, world size, and whether jobs run data parallel."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    data_parallel: bool = False
    _quick: object = field(default=None, repr=False)  # gloo group, STARTUP_TIMEOUT
    _stage: object = field(default=None, repr=False)  # gloo group, MODLORA_DIST_TIMEOUT

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes what is shared: the table, config.json, data-parallel checkpoints."""
        return self.rank == 0

    @property
    def writes_job_files(self) -> bool:
        """A job's owner writes its files; in data parallel all ranks own it and rank 0 writes."""
        return not self.data_parallel or self.is_writer

    def shard(self, jobs: Sequence[T]) -> list[T]:
        """This rank's jobs: every world_size-th of the full list (finished ones included, so a job's
        owner does not change when a restarted run finds some done)."""
        return list(jobs[self.rank::self.world_size])

    def training_jobs(self, jobs: Sequence[T]) -> list[T]:
        """The training jobs this rank takes part in: all of them when data parallel, else its shard."""
        return list(jobs) if self.data_parallel else self.shard(jobs)

    def check_jobs(self, stage: str, n_jobs: int, *, training: bool) -> None:
        """A sharded stage with fewer jobs than ranks would leave ranks idle: refuse it."""
        if self.active and not (training and self.data_parallel) and n_jobs < self.world_size:
            raise ValueError(f"stage {stage} has {n_jobs} jobs for {self.world_size} processes: run it on at most "
                             f"{n_jobs} processes" + (" (or with --data-parallel)" if training else ""))

    def barrier(self) -> None:
        """Wait for every rank to finish the stage (their files are then visible to all)."""
        if self.active:
            dist.barrier(group=self._stage)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Each of ``values`` summed over the ranks (float64, on the CPU group)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._stage)
        return t.tolist()

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order (JSON-able objects and tensors)."""
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._stage)
        return out


_CONTEXT = Context()


def current() -> Context:
    """The context :func:`init` set up (the single process before that)."""
    return _CONTEXT


def config_hash(command: str, config: dict, data_parallel: bool) -> str:
    """What every rank must agree on: the command, the resolved config and the mode."""
    text = json.dumps({"command": command, "config": config, "data_parallel": data_parallel}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backend() -> str:
    """The process group's backend for the tensors of each device: gloo for CPU tensors (also on a
    machine with GPUs, where a run may keep its model on the CPU), NCCL for CUDA ones."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init(command: str, config: dict, *, data_parallel: bool = False) -> Context:
    """Join the process group torchrun describes (if any) and check the ranks agree.

    Raises ValueError (one line) for ``--data-parallel`` on one process and for ranks that see
    different configs; every rank raises the same, so none waits for the others.
    """
    global _CONTEXT
    world = _env_int("WORLD_SIZE", "1", 1)
    if world == 1:
        if data_parallel:
            raise ValueError("--data-parallel needs several processes: launch with torchrun --nproc-per-node N "
                             "(N >= 2); one process trains the same without it")
        _CONTEXT = Context()
        return _CONTEXT
    rank, local = _env_int("RANK", None, 0, world - 1), _env_int("LOCAL_RANK", "0", 0, world - 1)
    stage_timeout = _stage_timeout()
    if local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # "cuda" is cuda:LOCAL_RANK from here on
    dist.init_process_group(backend(), timeout=stage_timeout)
    ctx = Context(rank, world, local, data_parallel, dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT),
                  dist.new_group(backend="gloo", timeout=stage_timeout))
    _CONTEXT = ctx
    hashes = [None] * world
    dist.all_gather_object(hashes, config_hash(command, config, data_parallel), group=ctx._quick)
    if len(set(hashes)) > 1:
        odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
        # Leave the group before raising: a process exiting inside it (rank 0 hosts the store)
        # aborts in torch's thread teardown instead of exiting with the one-line error.
        dist.barrier(group=ctx._quick)
        shutdown()
        raise ValueError(f"the ranks see different configs (config hash {hashes[0]} on rank 0, "
                         f"{hashes[odd[0]]} on rank {odd[0]}): start every rank with the same command, options and "
                         "config file")
    _label_stderr(ctx)
    # torchrun stops the other workers with SIGTERM when one fails: exit through Python, so
    # atomic writes in progress remove their temp files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return ctx


def shutdown() -> None:
    """Leave the process group (the single process has none)."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = Context()


class _RankStream:
    """stderr of one rank: each line starts with ``[rank r/N]``, and the stream says it is not a
    terminal, so progress bars print a line now and then instead of redrawing one line that N
    ranks would overwrite in turn."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label, self.at_line_start = stream, label, True

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").splitlines(keepends=True):
            if self.at_line_start and part == "\n":  # a redraw's carriage return after a finished line
                continue
            if self.at_line_start:
                self.stream.write(self.label)
            self.stream.write(part)
            self.at_line_start = part.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _label_stderr(ctx: Context) -> None:
    if not isinstance(sys.stderr, _RankStream):
        sys.stderr = _RankStream(sys.stderr, f"[rank {ctx.rank}/{ctx.world_size}] ")


# ------------------------------------------------------------------------------------------
# Data parallel inside one training job


class DataParallel:
    """One training job on every rank; used by :func:`modlora.train.train` when the context says so.

    Each rank backpropagates its slice of the step's batches with the loss normalised by the
    step's global trained-token count, then :meth:`sum_gradients` adds the ranks' gradients: the
    gradient of the whole global batch, as one process computes it. (DDP's module wrapper cannot
    be used: adapter tensors are plain leaf tensors, not ``nn.Parameter`` of a module.)
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def global_batch_size(self, batch_size: int) -> int:
        """Examples per global micro-batch: ``batch_size`` per rank."""
        return batch_size * self.ctx.world_size

    def part(self, batch: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of a global micro-batch (empty when it is short)."""
        per = -(-len(batch) // self.ctx.world_size)
        return list(batch[self.ctx.rank * per:(self.ctx.rank + 1) * per])

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every ``p.grad`` by its sum over the ranks: one all-reduce of the flattened grads."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p)  # views of one buffer: no second copy

    def seed(self, seed: int) -> None:
        """Rank r draws its own LoRA-dropout masks (rank 0 those of a single process)."""
        torch.manual_seed(seed + 1_000_003 * self.ctx.rank)
