#!/usr/bin/env bash
# One prepared GPU check (issue 24, item 4): from the repository root on a CUDA machine,
#   bash bench/gpu_check.sh PATH/TO/efficientnet_lite0.onnx [MINUTES]
# installs the project without touching the machine's CUDA torch (no network needed beyond what the
# machine has), builds the photo crops there and runs bench/gpu_check.py; results go to $OUT if set.
set -euo pipefail
MODEL=${1:?usage: bash bench/gpu_check.sh efficientnet_lite0.onnx [minutes]}
MINUTES=${2:-8}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')"
pip install --no-deps -e . -q 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import onnx, onnxruntime, onnx2torch, pulp, skimage, sklearn, matplotlib" 2>/dev/null \
  || pip install -q onnx onnxruntime onnx2torch pulp scikit-image scikit-learn matplotlib
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/gpu_check.py --model "$MODEL" --minutes "$MINUTES" --out "${OUT:-/tmp/gpu_check}"
