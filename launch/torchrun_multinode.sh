#!/usr/bin/env bash
# Multi-node training with torchrun: NNODES nodes x NPROC_PER_NODE ranks (one per GPU with NCCL;
# on CPU nodes, ranks over gloo).
#
# Run it on every node at about the same time (the first waits for the rest), with the node's
# rank: 0 on the node at MASTER_ADDR, 1 .. NNODES-1 on the others.
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash launch/torchrun_multinode.sh [script args]  # on 10.0.0.1
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash launch/torchrun_multinode.sh [script args]  # on another
# Node 0 hosts the rendezvous store at MASTER_ADDR:MASTER_PORT (torchrun's static rendezvous:
# no guessing from host names, which containers often share); node k runs ranks
# k*NPROC_PER_NODE .. (k+1)*NPROC_PER_NODE-1.
#
# Expects: the same Python environment and code path on every node; MASTER_ADDR:MASTER_PORT
# reachable from every node, and the nodes able to reach each other on any TCP port.
# Edit the defaults below, or override them in the environment.
set -euo pipefail
fail() { echo "torchrun_multinode.sh: $*" >&2; exit 2; }

NNODES=${NNODES:-2}
MASTER_ADDR=${MASTER_ADDR:-}
[[ -n $MASTER_ADDR ]] || fail "set MASTER_ADDR: an address of node 0 that every node can reach"
NODE_RANK=${NODE_RANK:-}
[[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] \
    || fail "set NODE_RANK to this node's rank, 0 .. $((NNODES - 1)): 0 on the node at MASTER_ADDR, which hosts the rendezvous (NODE_RANK='$NODE_RANK')"
MASTER_PORT=${MASTER_PORT:-29400}
# Ranks on this node: one per GPU that nvidia-smi lists.
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ $NPROC_PER_NODE -gt 0 ]] \
        || fail "no GPU listed by nvidia-smi: set NPROC_PER_NODE, the number of ranks to run on this node (e.g. NPROC_PER_NODE=2 on a CPU node, where the ranks use gloo)"
fi
# How long node 0 waits for the others to join, and they for node 0 (seconds).
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-launch/train_example.py}
# CPU threads per rank (torchrun's default is 1). Keep it equal on every node: results are
# bitwise the same on any layout of the ranks only at equal thread counts.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NCCL and gloo each pick a network interface themselves, gloo the one of the host's name (often
# loopback). syncbn.init_distributed() points gloo at the interface that reaches MASTER_ADDR;
# a script that calls init_process_group itself may need, on every node:
#   export GLOO_SOCKET_IFNAME=eth0   # and/or NCCL_SOCKET_IFNAME=eth0

# --max-restarts 0: a failed rank ends the job (SyncBatchNorm ranks cannot continue alone).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-conf "timeout=$RDZV_TIMEOUT" \
    --max-restarts 0 \
    "$SCRIPT" "$@"
