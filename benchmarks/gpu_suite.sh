#!/usr/bin/env bash
# Everything GPU in one command, on a CUDA machine with a fresh checkout (nothing but pip reachable):
#
#   bash benchmarks/gpu_suite.sh            # at most 13.3 minutes (the steps' limits); results in benchmarks/results/
#   TUNE=1 bash benchmarks/gpu_suite.sh     # first tune the decode tiles (kernels/tuned/<gpu>.json): 4 minutes more
#
# 1. installs what is missing (a CUDA torch, modlora with its CUDA decode op when nvcc is present,
#    test and benchmark dependencies); 2. runs the CUDA tests (Triton kernels on the GPU, the decode
#    op, CUDA dispatch); 3. benchmarks/lora_linear.py (bf16, Qwen2.5-0.5B shapes + lm_head, M 1..8192,
#    ranks 8 and 16: fused vs split vs F.linear vs PEFT vs the decode op), benchmarks/generate.py
#    (beam 5, batch 1 and 32) and benchmarks/train_step.py on the GPU. Each step has its own time
#    limit (together 800 s) and a failed step does not stop the others; the last lines say which
#    failed. lora_linear.py rewrites its JSON after every case, so a run stopped at its limit (its
#    ~1100 timed calls may outlast 200 s) keeps the cases it measured. The tokenizer and FLORES are vendored in
#    modlora/assets: no /work/shared, no model or dataset download.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=benchmarks/results/gpu_suite.log
mkdir -p benchmarks/results
: > "$LOG"
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

pip_install() { $PY -m pip install --quiet --disable-pip-version-check "$@"; }

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    pip_install torch  # PyPI's Linux wheel is the CUDA build
fi
pip_install setuptools wheel "pytest>=8" "transformers>=4.45" "peft>=0.13" "matplotlib>=3.7"
export PATH="$PATH:/usr/local/cuda/bin"
# --no-build-isolation: modlora._C (CPU op, and the CUDA decode op when nvcc is found) is built
# against the torch above. Optional: a failed build leaves the torch/Triton paths.
step install 300 $PY -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
$PY - <<'PY' | tee -a "$LOG"
import torch, triton
from modlora import cuda_decode
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}, CUDA decode op built: {cuda_decode.available()}")
PY

step tests 150 $PY -m pytest -q --no-header -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_pairwise.py tests/test_cuda_decode.py tests/test_ops.py
if [ "${TUNE:-0}" = 1 ]; then  # decode tiles for this GPU into kernels/tuned/, read by the runs below
    step tune 240 $PY benchmarks/tune_lora_gemm.py
fi
# ~1120 timed calls (80 cases x ~14 providers and modes) of ~0.15 s each (triton's do_bench: 25 ms of
# warm-up, 100 ms of repetitions, and setup), plus the checks and Triton's compiles.
step lora_linear 200 $PY benchmarks/lora_linear.py --dtype bfloat16 --ranks 8 16 --strategies output \
    --m 1 4 16 64 160 640 2048 8192
step generate 90 $PY benchmarks/generate.py --device cuda --batches 1 32 --dtypes bf16
step train_step 60 $PY benchmarks/train_step.py --device cuda --dtype bfloat16 --steps 6 --batch-size 8

echo "results: $(ls benchmarks/results/*cuda* benchmarks/results/lora_linear_* 2>/dev/null | tr '\n' ' ')" | tee -a "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "all steps passed" | tee -a "$LOG"
