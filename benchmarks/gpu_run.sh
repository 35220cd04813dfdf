#!/usr/bin/env bash
# Everything a GPU machine should run, in one command (build, GPU tests, encoder A/B, W1-W4 benchmark, memory
# at 1M latents):
#   bash benchmarks/gpu_run.sh [OUT]          # OUT defaults to benchmarks/results
#   QUICK=1 bash benchmarks/gpu_run.sh OUT     # one command for a short GPU lease (meant to take < 8 min with
#                                              # the build): GPU tests, the encoder A/B at W2, the W2 bench with
#                                              # the trainer-step rows and sparsify, a profile of the fused step
#                                              # (tests/test_gpu_quick.py dry-runs these steps on the interpreter)
#   TUNE=1 bash benchmarks/gpu_run.sh          # also time the Triton launch configs (benchmarks/triton_tune.py)
#   AB=0 bash benchmarks/gpu_run.sh            # skip the encoder / master-weight A/B (benchmarks/encoder_ab.py)
# Offline machines: peers travel as wheels in .whl/ (see README "Benchmarks"); they are installed to /tmp/site.
set -uo pipefail
OUT=${1:-benchmarks/results}
die() { echo "gpu_run.sh: $*" >&2; exit 1; }

# Stop at once, saying why, on a machine without a working NVIDIA GPU (otherwise every step below fails in turn).
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
GPUS=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1) \
  || die "nvidia-smi failed (no usable GPU or driver): $GPUS"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The Triton fused step is opt-in on GPUs until its GPU test (run below) has passed on one.
export SAE_FAST_TRITON_FUSED_STEP=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
fi
# ... and before the build, when what `pip install --no-build-isolation -e .` builds the C++ core with is missing
# (setup.py runs cmake with pybind11's CMake files; pyproject.toml asks for ninja).
missing=""
python3 -c "import pybind11" >/dev/null 2>&1 || missing="$missing pybind11"
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
command -v ninja >/dev/null 2>&1 || python3 -c "import ninja" >/dev/null 2>&1 || missing="$missing ninja"
[ -z "$missing" ] || die "building sae-fast (pip install --no-build-isolation -e .) needs:$missing; install them \
first: python3 -m pip install pybind11 cmake ninja (offline: put their wheels in .whl/)"
echo "$GPUS"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python3 -c "import sae_fast, sae_fast._C; print('backends', sae_fast.available_backends())"

# The GPU tests (realistic sizes, bf16 and fp32, against reference.py in float64).
python3 -m pytest -q -p no:logging -m gpu tests/test_triton_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"

# Choices built without a GPU, timed side by side: GEMM + scan vs fused encoder, master weights vs copies
# (a few minutes; AB=0 skips it, e.g. when it ran as its own call: python3 benchmarks/encoder_ab.py --out OUT).
if [ "${AB:-1}" = 1 ]; then
  if [ "${QUICK:-0}" = 1 ]; then
    python3 benchmarks/encoder_ab.py --workloads w2 --chunks 4096 --out "$OUT"
  else
    python3 benchmarks/encoder_ab.py --out "$OUT"
  fi
fi

if [ "${QUICK:-0}" = 1 ]; then
  sae-fast bench --device cuda --quiet --workload w2 --repeats 5 --warmup 2 --backends triton --peers sparsify \
    --out "$OUT"
  python3 benchmarks/profile_step.py --workload w2 --steps 3 --fused-step --trace "$OUT/profile-w2-fused-step.json" \
    > "$OUT/profile-w2-fused-step.txt" 2>&1
else
  sae-fast bench --device cuda --quiet --out "$OUT"
  # Memory must stay flat in n: W2 at n = 1,048,576 (the dense reference would need B x n x 4 bytes per tensor).
  sae-fast bench --device cuda --quiet --workload w2 --n 1048576 --backends triton --peers sparsify --out "$OUT"
fi
if [ "${TUNE:-0}" = 1 ]; then
  python3 benchmarks/triton_tune.py --budget-s 420 --out "$OUT/triton-tune.json" > "$OUT/triton-tune.txt" 2>&1
fi
