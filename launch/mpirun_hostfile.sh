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
# local host names are started directly), or LAUNCHER_EXEC below; the same Python environment
# and code path on every host; the hosts able to reach each other on any TCP port.
set -euo pipefail

HOSTFILE=${HOSTFILE:-hosts.txt}
# Total ranks: the sum of the ":N" counts (1 for a host without one).
NP=${NP:-$(awk -F: '!/^[[:space:]]*(#|$)/ {n += ($2 == "" ? 1 : $2)} END {print n}' "$HOSTFILE")}
PYTHON=${PYTHON:-python}
# The mpiexec that belongs to this Python's mpi4py (the mpich wheel puts it next to python).
MPIEXEC=${MPIEXEC:-$("$PYTHON" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "mpiexec"))')}
SCRIPT=${SCRIPT:-launch/train_example.py}
# CPU threads per rank: cores per host / ranks per host. Keep it equal on every host: results
# are bitwise the same on any layout of the ranks only at equal thread counts.
THREADS=${OMP_NUM_THREADS:-1}
# No ssh between the hosts (containers, a cluster with its own remote execution): a command
# that Hydra runs instead of ssh, as `$LAUNCHER_EXEC -x HOST COMMAND...`, and that runs COMMAND
# (one shell command line, as ssh does) on HOST; e.g. a script around `kubectl exec` or
# `docker exec`. The tests use one around `ip netns exec`.
LAUNCHER_EXEC=${LAUNCHER_EXEC:-}
# Where a host's name does not resolve, on the others, to an address they can reach (hosts
# sharing a name, names resolving to loopback): the network interface, named the same on every
# host, over which Hydra's proxies reach mpiexec and the ranks each other, e.g. IFACE=eth0.
# (syncbn.init_distributed() finds rank 0's address itself, and points gloo at the interface
# that reaches it; set GLOO_SOCKET_IFNAME yourself only to override that.)
IFACE=${IFACE:-}
options=()
if [[ -n $LAUNCHER_EXEC ]]; then options+=(-launcher ssh -launcher-exec "$LAUNCHER_EXEC"); fi
if [[ -n $IFACE ]]; then options+=(-iface "$IFACE"); fi

# Each rank runs under a few lines of bash that name it when it fails (mpiexec's own banner
# names only a PID and a host); its exit status or signal is passed on unchanged.
NAME_A_FAILED_RANK='"$@"; status=$?
if [ $status -gt 128 ]; then
    echo "mpirun_hostfile.sh: rank ${PMI_RANK:-?} on $(hostname) was killed by SIG$(kill -l $status)" >&2
    kill -s $((status - 128)) $$
elif [ $status -ne 0 ]; then
    echo "mpirun_hostfile.sh: rank ${PMI_RANK:-?} on $(hostname) exited with status $status" >&2
fi
exit $status'

# "python -m mpi4py": an uncaught exception on one rank aborts the whole job (MPI_Abort);
# without it the other ranks wait in their collective until SYNCBN_TIMEOUT (default 1800 s).
exec "$MPIEXEC" -f "$HOSTFILE" -n "$NP" ${options[@]+"${options[@]}"} -genv OMP_NUM_THREADS "$THREADS" \
    bash -c "$NAME_A_FAILED_RANK" rank "$PYTHON" -m mpi4py "$SCRIPT" "$@"
