#!/usr/bin/env bash
# The plugin's config-level tests against vLLM 0.34 on a CPU machine, in a venv of their own (.venv-vllm034; the
# main .venv keeps vLLM 0.22): CPU torch 2.13 (0.34 pins 2.14; nothing here runs a model), the project without
# its dependencies plus the few it needs, and vLLM 0.34 with its pure-Python dependencies, all pinned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
venv=.venv-vllm034
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q --no-deps -e .
"$py" -m pip install -q "numpy<2.4" tqdm triton==3.6.0 pytest
echo "installing vLLM 0.34.0 (CPU, no GPU dependencies) for the plugin's config tests"
"$py" -m pip install -q --no-deps -r requirements/vllm-0.34-cpu.txt
"$py" -c 'import vllm; assert vllm.__version__.startswith("0.34."), vllm.__version__'
"$py" -m pytest -q tests/kvarn_vllm/test_plugin_v034.py "$@"
echo "test_vllm034.sh: $(( $(date +%s) - start )) s"
