"""One rank of a :class:`syncbn.testing.RankPool`: set up the group, then run what it is sent."""
from __future__ import annotations

import os
import pickle
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch


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


def main() -> None:
    backend = os.environ["SYNCBN_POOL_BACKEND"]
    torch.set_num_threads(int(os.environ["SYNCBN_POOL_THREADS"]))
    rank = _init_group(backend)
    host, port = os.environ["SYNCBN_POOL_ADDRESS"].rsplit(":", 1)
    connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ["SYNCBN_POOL_AUTHKEY"]))
    connection.send_bytes(pickle.dumps(rank))
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
