#!/usr/bin/env bash
# Multi-node training with torchrun: NNODES nodes x NPROC_PER_NODE GPUs, NCCL.
#
# Run this same command on every node, at about the same time (the first waits for the rest):
#   MASTER_ADDR=node0.example.com bash launch/torchrun_multinode.sh [script args]
# The c10d rendezvous numbers the nodes itself; the node whose address is MASTER_ADDR hosts it.
#
# Expects: the same Python environment and code path on every node; MASTER_ADDR:MASTER_PORT
# reachable from every node (node 0 hosts the rendezvous store there); one GPU per rank.
# Edit the defaults below, or override them in the environment.
set -euo pipefail

NNODES=${NNODES:-2}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR: host name or IP of node 0, reachable from every node}
MASTER_PORT=${MASTER_PORT:-29400}
# One rank per GPU on this node.
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
RDZV_ID=${RDZV_ID:-syncbn-job}           # the same on every node, new for every job
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-launch/train_example.py}
# NCCL picks a network interface itself; if it picks the wrong one:
#   export NCCL_SOCKET_IFNAME=eth0
# CPU threads per rank (torchrun's default is 1):
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# --max-restarts 0: a failed rank ends the job (SyncBatchNorm ranks cannot continue alone).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts 0 \
    "$SCRIPT" "$@"
