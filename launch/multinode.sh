#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous: run the same command on every node.
#
#   NNODES=2 MASTER=node0.example:29500 bash launch/multinode.sh --config configs/baseline.toml
#
# Under SLURM (one task per node):
#   srun --nodes=2 --ntasks-per-node=1 env NNODES=$SLURM_NNODES \
#     MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):29500 bash launch/multinode.sh ...
# The rendezvous assigns ranks; torchrun sets RANK / LOCAL_RANK / WORLD_SIZE and fastres.distributed reads
# them. optim.batch_size is the global batch, split over all NNODES x GPUS_PER_NODE ranks. The run and data
# directories must be on storage every node sees (rank 0 writes; every rank reads the checkpoint on
# resume, which is what MAX_RESTARTS > 0 relies on).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER:?set MASTER=host:port of the first node}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec torchrun --nnodes="$NNODES" --nproc_per_node="${GPUS_PER_NODE:-1}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER" --rdzv_id="${RDZV_ID:-fastres}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m fastres.train "$@"
