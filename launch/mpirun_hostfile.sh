#!/usr/bin/env bash
# A CPU cluster over MPI: NP ranks spread over the hosts of a hostfile, started from one node
# with the mpiexec of the mpich wheel (pip install "syncbn[mpi]").
#
#   HOSTFILE=hosts.txt bash launch/mpirun_hostfile.sh [script args]
#
# hosts.txt (MPICH/Hydra format): one host per line, ":N" = N ranks on that host:
#   node1:16
#   node2:16
#
# Expects: password-less ssh from this node to every host (Hydra starts its proxies over ssh;
# local host names are started directly); the same Python environment and code path on every
# host; the hosts able to reach each other on any TCP port.
set -euo pipefail

HOSTFILE=${HOSTFILE:-hosts.txt}
# Total ranks: the sum of the ":N" counts (1 for a host without one).
NP=${NP:-$(awk -F: '!/^[[:space:]]*(#|$)/ {n += ($2 == "" ? 1 : $2)} END {print n}' "$HOSTFILE")}
PYTHON=${PYTHON:-python}
# The mpiexec that belongs to this Python's mpi4py (the mpich wheel puts it next to python).
MPIEXEC=${MPIEXEC:-$("$PYTHON" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "mpiexec"))')}
SCRIPT=${SCRIPT:-launch/train_example.py}
# CPU threads per rank: cores per host / ranks per host.
THREADS=${OMP_NUM_THREADS:-1}

# "python -m mpi4py": an uncaught exception on one rank aborts the whole job (MPI_Abort);
# without it the other ranks wait in their collective until SYNCBN_TIMEOUT (default 1800 s).
exec "$MPIEXEC" -f "$HOSTFILE" -n "$NP" -genv OMP_NUM_THREADS "$THREADS" \
    "$PYTHON" -m mpi4py "$SCRIPT" "$@"
