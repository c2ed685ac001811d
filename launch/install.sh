#!/usr/bin/env bash
# Install fastres and its dependencies:  bash launch/install.sh [EXTRAS]   (e.g. "test", "test,dali,slurm")
#
# "slurm" is no Python package: it adds Debian's SLURM daemons and clients (apt, as root), with which
# tests/test_slurm.py runs launch/slurm.sbatch on a one-host cluster (launch/slurm-cluster.sh); without root
# or apt it says so and those tests skip.
#
# torch and torchvision come as a pair: each torchvision release is built against one torch release (torch 2.N
# pairs with torchvision 0.(N+15): 2.11 with 0.26, 2.14 with 0.29). A torch that is already importable is kept
# (a CUDA build, a nightly, your own): this never replaces it, and adds the torchvision that pairs with it when
# none imports. With no torch it installs the standard pair (torch==2.14.*, torchvision==0.29.*: what
# `pip install torch torchvision` gives on Linux, a CUDA build that also runs on CPUs). A torch without a
# torchvision from the package index (a +cpu build from PyTorch's own index) needs its torchvision from the same
# index: when none imports, this says so in one line and goes on (fastres runs without it; its torchvision
# decoders and tests say they need it).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
extras=${1:-}
slurm=
case ",$extras," in *,slurm,*) slurm=1; extras=$(echo ",$extras," | sed 's/,slurm,/,/; s/^,//; s/,$//') ;; esac
if [ -n "$slurm" ] && ! command -v slurmctld >/dev/null; then
  debs="slurmctld slurmd slurm-client munge"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing a one-host SLURM with apt-get ($debs) for tests/test_slurm.py;" \
         "leave 'slurm' out of the extras to skip it" >&2
    # the package lists may be missing on a fresh machine: fetch them once, and only then
    apt-get install -y -qq --no-install-recommends $debs >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $debs >/dev/null; } \
      || echo "install.sh: SLURM not installed (apt-get install $debs failed): tests/test_slurm.py will skip" >&2
  else
    echo "install.sh: SLURM needs root and apt (apt-get install $debs): tests/test_slurm.py will skip" >&2
  fi
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.14.*" "torchvision==0.29.*"
elif ! "$py" -c "import torchvision" 2>/dev/null; then
  torch_version=$("$py" -c "import torch; print(torch.__version__)")
  pair=$("$py" -c "import torch; major, minor = torch.__version__.split('+')[0].split('.')[:2]; \
print(f'0.{int(minor) + 15}.*' if major == '2' else '')")
  if [ -n "$pair" ] && "$py" -m pip install -q "torchvision==$pair" 2>/dev/null \
      && "$py" -c "import torchvision" 2>/dev/null; then
    :
  else  # PyPI's torchvision beside a +cpu torch fails at import ("operator torchvision::nms does not exist")
    "$py" -m pip uninstall -y -q torchvision 2>/dev/null || true
    echo "install.sh: no torchvision ${pair:-for it} imports beside torch $torch_version: install it from the" \
      "index this torch came from (pip install 'torchvision==${pair:-?}' --index-url" \
      "https://download.pytorch.org/whl/cpu for a +cpu build), or the standard pair (pip install torch==2.14.1" \
      "torchvision==0.29.1); fastres runs without it, but not its torchvision decoders" >&2
  fi
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
"$py" - <<'PY'
import fastres, torch  # noqa: F401
try:
    import torchvision
    vision = f"torchvision {torchvision.__version__}"
except Exception:  # absent, or built for another torch
    vision = "no torchvision"
print(f"fastres installed (torch {torch.__version__}, {vision}, CUDA: {torch.cuda.is_available()})")
PY
