#!/usr/bin/env bash
# The whole test suite on a fresh CPU machine: makes .venv (unless a virtualenv is active), installs the
# project with CPU torch, its test dependencies and vLLM 0.22 without GPU dependencies, then runs ruff, the vLLM 0.34
# config tests (scripts/test_vllm034.sh, own venv) and pytest. Triton kernels run under
# TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU).
set -euo pipefail
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh"
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,eval]"
# vLLM 0.22 without its GPU dependencies: the plugin's config-level tests (tests/kvarn_vllm/test_plugin.py).
echo "installing vLLM 0.22.0 (CPU, no GPU dependencies) for the plugin's config tests"
python -m pip install -q --no-deps -r requirements/vllm-0.22-cpu.txt
ruff check .
# vLLM 0.34 lives in a venv of its own (.venv-vllm034): its config-level plugin tests run first, the main suite last.
set +e
bash "$(dirname "$0")/test_vllm034.sh"
rc034=$?
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc034" -ne 0 ]; then
  echo "scripts/test_vllm034.sh failed (exit $rc034)"
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]; then rc=$rc034; fi
fi
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  rc=0
fi
exit "$rc"
