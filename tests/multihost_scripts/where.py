"""syncbn.init_distributed() and one all-reduce; prints where this rank met the others.

    python where.py

Prints ``WHERE rank=R world=W host=NAME store=ADDRESS:PORT gloo=INTERFACE sum=S`` (S: the sum
of every rank's rank + 1), or, when init_distributed raises, ``FAILED rank=R after T s: ERROR``
and exits 3 (R from the launcher's variables).
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

import syncbn


def main() -> None:
    started = time.monotonic()
    try:
        info = syncbn.init_distributed()
    except Exception as error:  # what every rank reports is under test
        rank = os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("RANK")
        # One write: under python -u, print writes the text and the newline apart, and another
        # rank's line can land between them in mpiexec's merged output.
        sys.stdout.write(f"FAILED rank={rank} after {time.monotonic() - started:.1f} s: "
                         f"{type(error).__name__}: {error}\n")
        sys.stdout.flush()
        sys.exit(3)
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore around the TCPStore
        store = store.underlying_store
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    sys.stdout.write(f"WHERE rank={info.rank} world={info.world_size} host={socket.gethostname()} "
                     f"store={store.host}:{store.port} gloo={os.environ.get('GLOO_SOCKET_IFNAME')} "
                     f"sum={total.item():g}\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
