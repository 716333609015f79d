#!/usr/bin/env bash
# The whole test suite on a fresh CPU machine: makes .venv (unless a virtualenv is active), installs the
# project with CPU torch and its test dependencies, then runs ruff and pytest. Triton kernels run under
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
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  rc=0
fi
exit "$rc"
