#!/usr/bin/env bash
# Install fastres and its dependencies:  bash launch/install.sh [EXTRAS]   (e.g. "test", "test,dali")
#
# torch comes first and pinned to 2.13.*: on a machine without a GPU that is the local CPU wheel, where a
# loose spec ("torch", "torch>=2.13") would pull a CUDA build of several GB. The project's own range
# (torch>=2.4) is then already satisfied and pip leaves torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
extras=${1:-}
"$py" -m pip install -q "torch==2.13.*"
"$py" -m pip install -q -e ".${extras:+[$extras]}"
# Our machines keep CIFAR-10 beside the checkout: link it where fastres looks by default (data/cifar10).
if [ ! -e data/cifar10 ] && [ -d ../shared/data/cifar10/cifar-10-batches-py ]; then
  mkdir -p data && ln -s "$(cd ../shared/data/cifar10 && pwd)" data/cifar10
  echo "install: linked data/cifar10 -> ../shared/data/cifar10"
fi
"$py" -c "import fastres, torch; print(f'fastres installed (torch {torch.__version__}, CUDA: {torch.cuda.is_available()})')"
