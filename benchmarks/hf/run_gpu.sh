#!/usr/bin/env bash
# The transformers generate benchmark on the GPU machine (no package index there), from the repository root:
#
#   OUT=/path/to/results bash benchmarks/hf/run_gpu.sh [extra bench_generate.py arguments]
#
# Needs benchmarks/hf/wheels/ sent along (git-ignored; fill it on a machine with PyPI access with
#   python3 -m pip download --no-deps -d benchmarks/hf/wheels optimum-quanto==0.2.7 gguf==0.19.0
# optimum-quanto for the quanto methods; gguf only for --weights gguf). The image already has torch, transformers,
# accelerate, numpy, safetensors, huggingface_hub, ninja, matplotlib and tqdm, which are quanto's other needs.
#
# Default grid: qwen2.5-coder-0.5b (random weights, bf16) x {dynamic, kvarn k4v2_g128, quanto4, quanto2} x contexts
# 4096/16384/32768 x batches 1/8, 64 timed decode steps. Expected on an H100: a few minutes; no new case starts
# after TIME_BUDGET seconds (default 390) and generate.json is rewritten after every case, so a cut run still
# leaves every finished case. QUANTO_UNPACK (default auto: quanto's own CUDA unpack kernel compiled alone, about
# a minute with nvcc, else quanto's PyTorch unpack) picks quanto's unpack path; see bench_generate.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that receives generate.json, generate.md, generate.png and generate.log}"
mkdir -p "$OUT"
shopt -s nullglob
wheels=(benchmarks/hf/wheels/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
  python3 -m pip install -q --no-deps --no-index "${wheels[@]}"
else
  echo "benchmarks/hf/wheels/ holds no wheels: the quanto methods will report optimum-quanto as missing" >&2
fi
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/hf/bench_generate.py --out "$OUT" --time-budget "${TIME_BUDGET:-390}" \
  --quanto-unpack "${QUANTO_UNPACK:-auto}" "$@" 2>&1 | tee "$OUT/generate.log"
