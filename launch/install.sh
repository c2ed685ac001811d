#!/usr/bin/env bash
# Install fastres and its dependencies:  bash launch/install.sh [EXTRAS]   (e.g. "test", "test,dali,slurm")
#
# "slurm" is no Python package: it adds Debian's SLURM daemons and clients (apt, as root), with which
# tests/test_slurm.py runs launch/slurm.sbatch on a one-host cluster (launch/slurm-cluster.sh); without root
# or apt it says so and those tests skip.
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
slurm=
case ",$extras," in *,slurm,*) slurm=1; extras=$(echo ",$extras," | sed 's/,slurm,/,/; s/^,//; s/,$//') ;; esac
if [ -n "$slurm" ] && ! command -v slurmctld >/dev/null; then
  debs="slurmctld slurmd slurm-client munge"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # the package lists may be missing on a fresh machine: fetch them once, and only then
    apt-get install -y -qq --no-install-recommends $debs >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $debs >/dev/null; } \
      || echo "install.sh: SLURM not installed (apt-get install $debs failed): tests/test_slurm.py will skip" >&2
  else
    echo "install.sh: SLURM needs root and apt (apt-get install $debs): tests/test_slurm.py will skip" >&2
  fi
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.*"
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
"$py" -c "import fastres, torch; print(f'fastres installed (torch {torch.__version__}, CUDA: {torch.cuda.is_available()})')"
