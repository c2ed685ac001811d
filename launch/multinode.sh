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
# GPUS_PER_NODE: processes on this node (default: the GPUs nvidia-smi lists; one CPU process where there are none).
# JOIN_TIMEOUT_S: how long the agents wait for all NNODES nodes (torchrun's join_timeout, default 900).
# A failure ends with one line of the launcher's (a rendezvous that did not fill) or fastres's own line repeated
# after torchrun's summary of the failed processes.
set -uo pipefail
cd "$(dirname "$0")/.."
say() { echo "multinode.sh: $*" >&2; }
: "${NNODES:?set NNODES}" "${MASTER:?set MASTER=host:port of the first node}"
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-900}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=0
  if command -v nvidia-smi >/dev/null 2>&1; then GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "$GPUS_PER_NODE" -eq 0 ]; then
    say "no GPU on $(hostname) (nvidia-smi absent or listing none): one CPU process here; GPUS_PER_NODE=N sets it"
    GPUS_PER_NODE=1
  fi
fi
# On the node that hosts the rendezvous, its port must be free: held by another program, every agent would wait
# for it past the join timeout without a word. Binding tells: free, held, or not this node's address.
python3 - "${MASTER%:*}" "${MASTER##*:}" <<'PY' || exit 2
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing socket of an earlier run does not count
try:
    s.bind((host, port))
except socket.gaierror:
    sys.exit(f"multinode.sh: MASTER={host}:{port}: {host} does not resolve here: set MASTER to the first node's address")
except OSError as e:
    if e.errno == errno.EADDRINUSE:
        sys.exit(f"multinode.sh: port {port} on {host} (this node) is held by another program: stop it, or choose "
                 "another port in MASTER on every node")
finally:
    s.close()
PY
log=$(mktemp "${TMPDIR:-/tmp}/multinode.XXXXXX")
trap 'rm -f "$log"' EXIT
torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER" --rdzv_id="${RDZV_ID:-fastres}" \
  --rdzv_conf="join_timeout=$JOIN_TIMEOUT_S" \
  --max-restarts="${MAX_RESTARTS:-0}" -m fastres.train "$@" 2> >(tee "$log" >&2) &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT  # SLURM's and Ctrl-C's stop reach torchrun, which stops its workers
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done  # a trapped signal ends the first wait early
sleep 0.2  # tee's last lines
if [ "$rc" -ne 0 ]; then
  if grep -q "RendezvousTimeoutError" "$log"; then
    say "not all NNODES=$NNODES nodes joined the rendezvous at $MASTER within $JOIN_TIMEOUT_S s: start this launcher on" \
        "every node with the same NNODES, MASTER and RDZV_ID, and check that each node reaches $MASTER"
  elif line=$(grep -a '^fastres: ' "$log" | grep -v '^fastres: warning' | tail -n 1) && [ -n "$line" ]; then
    echo "$line" >&2  # fastres's own line, last, below torchrun's summary of the failed processes
  fi
fi
exit "$rc"
