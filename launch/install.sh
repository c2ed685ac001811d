#!/usr/bin/env bash
# Install fastres and its dependencies:  bash launch/install.sh [EXTRAS]   (e.g. "test", "test,dali")
#
# A torch that is already importable is kept: this never replaces your build (CUDA or not). Only when none
# is installed does it install torch==2.13.* first, because a loose spec ("torch", "torch>=2.13") pulls a
# CUDA build of several GB on a machine without a GPU. For a CPU-only torch from PyTorch's own index:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
# The project's own range (torch>=2.4) is then satisfied and pip leaves torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
extras=${1:-}
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.*"
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
"$py" -c "import fastres, torch; print(f'fastres installed (torch {torch.__version__}, CUDA: {torch.cuda.is_available()})')"
