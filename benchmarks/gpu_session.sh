#!/usr/bin/env bash
# What a session with a lent GPU runs, in one call: build the extension for the GPU,
# run every CUDA test, run the CUDA tests of the native ops under compute-sanitizer
# (memcheck, and racecheck on the kernels that share memory between threads), then
# the GPU benchmarks. Logs and JSON go to $OUT (default: benchmarks/results/gpu_run).
#
#   bash benchmarks/gpu_session.sh [stage ...]   # stages: build tests sanitize bench cpu
#
# The GPU machines lent so far have an Intel Xeon with AMX (family 6 model 207) beside
# the GPU: the `cpu` stage (not run by default) measures the CPU benchmarks there on two
# cores (taskset), the Intel figures the README's CPU tables lack.
#
# Each stage has its own time limit, so one that hangs cannot eat the others' time.
# Python packages missing on the GPU machine can be put in .whl/ (installed first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
LOG="$OUT/session.log"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitize bench)
for s in "${stages[@]}"; do
  case $s in build|tests|sanitize|bench|cpu) ;; *) echo "unknown stage: $s"; exit 2 ;; esac
done
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
say() { echo "### $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ddetr_site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/ddetr_site
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -2
  lscpu | grep -E "Model name|^CPU\(s\)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

if want build; then
  say "build (sm_90)"
  start=$(date +%s)
  cmake -S . -B build-gpu -G Ninja -DDDETR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
    >>"$LOG" 2>&1 && timeout 300 cmake --build build-gpu -j"$(nproc)" >>"$LOG" 2>&1 \
    || { say "BUILD FAILED"; tail -40 "$LOG"; exit 1; }
  cp build-gpu/_C*.so python/ddetr/
  say "built in $(( $(date +%s) - start )) s"
  $PY -c "import ddetr; print(ddetr.build_info())" 2>&1 | tee -a "$LOG"
fi

if want tests; then
  say "CUDA tests"
  xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 4"
  timeout "${TESTS_LIMIT:-150}" $PY -m pytest -q -m cuda -p no:cacheprovider -rfEs $xdist \
    --junitxml="$OUT/cuda_tests.xml" tests 2>&1 | tail -60 | tee -a "$LOG"
  say "tests exit ${PIPESTATUS[0]}"
  # a skipped CUDA test on a GPU machine means something is missing there (OpenBLAS for
  # the native-layer module, cuBLAS): the reasons are listed above (-rs)
fi

if want sanitize; then
  # memcheck: every CUDA test of the ops and the native layers, float64 gradcheck aside
  # (thousands of launches, and the same kernels as the float32 cases).
  say "compute-sanitizer memcheck"
  timeout "${SANITIZE_LIMIT:-120}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 20 $PY -m pytest -q -x -m cuda -p no:cacheprovider -k "not gradcheck" \
    tests/ops tests/models/test_native_layers.py 2>&1 | tail -40 | tee -a "$LOG"
  say "memcheck exit ${PIPESTATUS[0]}"
  say "compute-sanitizer racecheck (MSDA backward, layers)"
  timeout "${RACECHECK_LIMIT:-60}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    --print-limit 20 $PY -m pytest -q -x -m cuda -p no:cacheprovider \
    -k "deterministic or matches_cpu" tests/ops/test_msda.py tests/models/test_native_layers.py \
    2>&1 | tail -30 | tee -a "$LOG"
  say "racecheck exit ${PIPESTATUS[0]}"
fi

if want bench; then
  say "benchmarks"
  # --in-process: a worker process per measurement costs a CUDA start-up each (~8 s)
  timeout 100 $PY benchmarks/bench_msda.py --device cuda --shapes E1 E2 D1 --no-paired --repeats 20 \
    --warmup 3 --in-process --out "$OUT" 2>&1 | tail -25 | tee -a "$LOG"
  timeout 60 $PY benchmarks/bench_msda.py --device cuda --shapes E1 D1 --no-paired --dtype bfloat16 \
    --repeats 20 --warmup 3 --no-dense --in-process --out "$OUT" 2>&1 | tail -15 | tee -a "$LOG"
  timeout 60 $PY benchmarks/bench_layers.py --device cuda --repeats 20 --warmup 3 \
    --out "$OUT" 2>&1 | tail -20 | tee -a "$LOG"
  # parity at 1e-3: cuDNN convolutions run in TF32 by default (1e-4 is the CPU's)
  timeout 100 $PY benchmarks/bench_model.py --device cuda --repeats 10 --warmup 3 \
    --tolerance 1e-3 \
    --out "$OUT" 2>&1 | tail -30 | tee -a "$LOG"
fi
if want cpu; then
  say "CPU benchmarks on two cores of this machine's CPU"
  two="taskset -c 0,1"
  # the GEMM kernels this CPU runs (AMX tiles on a Xeon with AMX: their only hardware test)
  timeout 120 $two $PY -m pytest -q -p no:cacheprovider -rfEs tests/ops/test_gemm_bf16.py \
    tests/ops/test_gemm_int8.py 2>&1 | tail -8 | tee -a "$LOG"
  timeout 200 $two $PY benchmarks/bench_msda.py --shapes E1 --no-dense --repeats 7 --paired-rounds 3 \
    --out "$OUT" 2>&1 | tail -9 | tee -a "$LOG"
  timeout 150 $two $PY benchmarks/bench_layers.py --batches 1 --repeats 5 \
    --out "$OUT" 2>&1 | tail -9 | tee -a "$LOG"
  timeout 150 $two $PY benchmarks/bench_layers.py --batches 1 --repeats 5 --dtype bfloat16 \
    --out "$OUT" 2>&1 | tail -9 | tee -a "$LOG"
  timeout 100 $two $PY benchmarks/bench_gemm_bf16.py --out "$OUT" 2>&1 | tail -15 | tee -a "$LOG"
  # the int8 GEMM on AMX tiles against AVX512-VNNI (an error line where there is no AMX)
  for k in amx avx512_vnni; do
    timeout 60 $two $PY benchmarks/bench_int8.py --threads 2 --repeats 7 --kernel $k \
      --out "$OUT" 2>&1 | tail -12 | tee -a "$LOG"
  done
fi
say "done"
