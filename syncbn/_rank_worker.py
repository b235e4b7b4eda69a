"""One rank of a :class:`syncbn.testing.RankPool`: set up the group, then run what it is sent."""
from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch

# How often a rank checks that the process that started it is still there.
_PARENT_CHECK_S = 0.5


def _init_group(backend: str) -> int:
    """Initialize this rank's group and return its rank."""
    if backend == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.FileStore(os.environ["SYNCBN_POOL_STORE"], world_size)
    timeout = timedelta(seconds=float(os.environ["SYNCBN_POOL_GROUP_TIMEOUT"]))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return rank


def _outcome(task: bytes) -> tuple:
    try:
        fn, args, kwargs = pickle.loads(task)  # here, so an import error is reported, not fatal
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # reported to the caller, which re-raises it
        formatted = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = None
        return ("error", exc, formatted)


def _shut_down(backend: str) -> None:
    if backend == "mpi":
        from mpi4py import MPI

        MPI.Finalize()
    else:
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: gloo's threads can abort the process
    # ("terminate called without an active exception") when destructors run at exit.
    os._exit(0)


def _exit_when_orphaned() -> None:
    """End this rank when its parent goes: the pool, or the MPI proxy the pool's mpiexec started.

    A rank stuck in a collective never reads its connection again, so only this thread notices
    that a pool killed by SIGKILL (or an mpiexec torn down) left it behind.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="syncbn-orphan-watch", daemon=True).start()


def _dump_stack_on_request(rank: int) -> None:
    """SIGUSR1 writes every thread's Python stack to the pool's stack file of this rank.

    The pool sends it to a rank that did not finish in time, before killing it, to say where
    the rank was stuck. The file object stays referenced by faulthandler while registered.
    """
    path = os.path.join(os.environ["SYNCBN_POOL_WORKDIR"], f"stack-rank{rank}.txt")
    faulthandler.register(signal.SIGUSR1, file=open(path, "w"), all_threads=True)


def main() -> None:
    _exit_when_orphaned()
    backend = os.environ["SYNCBN_POOL_BACKEND"]
    torch.set_num_threads(int(os.environ["SYNCBN_POOL_THREADS"]))
    rank = _init_group(backend)
    _dump_stack_on_request(rank)
    host, port = os.environ["SYNCBN_POOL_ADDRESS"].rsplit(":", 1)
    connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ["SYNCBN_POOL_AUTHKEY"]))
    connection.send_bytes(pickle.dumps((rank, os.getpid())))
    while True:
        try:
            message = pickle.loads(connection.recv_bytes())
        except EOFError:  # the pool went away
            break
        if message[0] == "exit":
            break
        reply = _outcome(message[1])
        try:
            data = pickle.dumps(reply)
        except Exception as exc:  # an unpicklable result
            data = pickle.dumps(("error", None, f"rank {rank}: could not send the result back: {exc!r}"))
        connection.send_bytes(data)
    _shut_down(backend)


if __name__ == "__main__":
    main()
