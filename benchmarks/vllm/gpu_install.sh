#!/usr/bin/env bash
# GPU machine: after the wheelhouse parts are stashed (../shared/device/README.md), install vLLM 0.22 into /tmp/site
# and this checkout (editable, so vLLM finds the `vllm.general_plugins` entry point). Then: export PYTHONPATH=/tmp/site
set -euo pipefail
bash /tmp/wh/install.sh
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | grep -v "^$" | tail -2 || true
python3 -c "from importlib.metadata import entry_points; print([e.value for e in entry_points(group='vllm.general_plugins')])"
