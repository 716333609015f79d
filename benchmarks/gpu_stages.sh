#!/usr/bin/env bash
# Everything the GPU machine has to confirm, in device-run-sized stages (each under 10 minutes), from the repo root:
#
#   OUT=/path bash benchmarks/gpu_stages.sh check     # GPU tests: kernels vs reference at real shapes (run first)
#   OUT=/path bash benchmarks/gpu_stages.sh kernels   # decode grid + prefill quantize + chunk + launch-option sweep
#   OUT=/path bash benchmarks/gpu_stages.sh hf        # model.generate memory/speed (send benchmarks/hf/wheels along)
#
# Results land in $OUT; file them as benchmarks/*/results/<what>/<gpu>/<date>_<commit>.* and update docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a results folder}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
export PYTHONUNBUFFERED=1
case "${1:-check}" in
  check)
    # One process per file: an illegal memory access poisons the CUDA context, and every later test in the same
    # process would then fail too, hiding which one was first.
    rc=0
    for f in tests/kvarn_kernels/test_*.py tests/kvarn_hf/test_hf_gpu.py; do
      python3 -m pytest -q -rf "$f" 2>&1 | tee -a "$OUT/gpu_tests.log" || rc=1
    done
    exit "$rc" ;;
  kernels)
    python3 benchmarks/kernels/bench_decode.py --out "$OUT" --batches 1,8,32,64 \
      --contexts 1024,2048,4096,16384,65536,131072 2>&1 | tee "$OUT/decode.log"
    python3 benchmarks/kernels/bench_decode.py --out "$OUT" --tune 2>&1 | tee "$OUT/tune.log"
    python3 benchmarks/kernels/bench_decode.py --out "$OUT" --prefill-only --prefill-batches 1,8 \
      --quantize-warps 8,16 2>&1 | tee "$OUT/prefill.log" ;;
  hf)
    OUT="$OUT" bash benchmarks/hf/run_gpu.sh ;;
  *)
    echo "usage: OUT=dir bash benchmarks/gpu_stages.sh check|kernels|hf" >&2; exit 2 ;;
esac
