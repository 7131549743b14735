"""The demo pipeline on 1 and 2 processes (torchrun, gloo on the CPU): wall time per stage.

Each stage is its own command (``python -m modlora STAGE`` or ``torchrun --standalone
--nproc-per-node N -m modlora STAGE``) on a fresh output directory per process count, so every
time includes the start-up of its processes (imports, tokenizer, model); the ``table`` stage,
which does almost no work, shows that fixed cost. Per-job times are the one-process stage times
less that fixed cost, divided by the stage's jobs: the inputs of the README's projection. The
run also checks that both process counts wrote the same adapters, weights and evaluations.

    python benchmarks/scale_out.py [--nproc 1 2] [--config configs/default.toml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train-adapters", "learn-weights", "evaluate", "table")


def _command(nproc: int, stage: str, config: str, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "modlora"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "modlora"]
    return [*launcher, stage, "--config", config, "--out", str(out)]


def _outputs(out: Path) -> dict[str, bytes]:
    """What must not depend on the process count: adapters, learned weights, evaluations, table."""
    keep = ("pool", "weights", "eval")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.relative_to(out).parts[0] in keep and p.suffix in (".json", ".safetensors")} | {
        "table.md": (out / "table.md").read_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    args = ap.parse_args()

    from modlora.pipeline import Pipeline, PipelineConfig

    jobs = {stage: n for stage, (n, _) in Pipeline(PipelineConfig.from_toml(args.config)).job_counts().items()}
    runs, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            out = Path(tmp) / f"x{nproc}"
            stages = {}
            for stage in STAGES:
                started = time.perf_counter()
                proc = subprocess.run(_command(nproc, stage, args.config, out), capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                seconds = time.perf_counter() - started
                if proc.returncode:
                    sys.exit(f"{stage} on {nproc} processes failed:\n{proc.stderr[-3000:]}")
                stages[stage] = round(seconds, 2)
                print(f"{nproc} process(es) {stage}: {seconds:.1f} s", flush=True)
            runs.append({"nproc": nproc, "stage_seconds": stages, "total_seconds": round(sum(stages.values()), 2)})
            outputs[nproc] = _outputs(out)
    identical = all(o == outputs[args.nproc[0]] for o in outputs.values())
    one = next((r for r in runs if r["nproc"] == 1), None)
    per_job = None
    if one:
        fixed = one["stage_seconds"]["table"]
        per_job = {stage: round(max(0.0, one["stage_seconds"][stage] - fixed) / n, 3) for stage, n in jobs.items()}
    payload = {"environment": environment("cpu"), "load_average": os.getloadavg(), "config": args.config,
               "jobs": jobs, "runs": runs, "fixed_seconds_per_command": one and one["stage_seconds"]["table"],
               "per_job_seconds": per_job, "outputs_identical": identical}
    path = write_json("scale_out", payload)
    print(f"outputs identical across process counts: {identical}\nwrote {path}")
    _plot(runs, path.with_suffix(".png"))


def _plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        xs = [i + k * width for i in range(len(STAGES))]
        ax.bar(xs, [run["stage_seconds"][s] for s in STAGES], width, label=f"{run['nproc']} process(es)")
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(STAGES))], STAGES)
    ax.set(ylabel="wall time per command (s)", title="demo pipeline, torchrun on CPU (gloo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
