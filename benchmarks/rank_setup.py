"""Inside a rank: the communicator of a setting, its device, a barrier and a device sync."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import syncbn
from syncbn.comm import Communicator

from .plan import Setting


def init_side_gloo(store_path: str) -> None:
    """Give an MPI-launched rank a gloo group too, so the peers that need torch.distributed
    (the naive SyncBN) run side by side with syncbn-over-MPI in the same processes."""
    if dist.is_initialized():
        return
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    store = dist.FileStore(store_path, world.Get_size())
    dist.init_process_group("gloo", store=store, rank=world.Get_rank(),
                            world_size=world.Get_size())


def rank_communicator(backend: str) -> Communicator:
    """syncbn's communicator for a backend, named explicitly (at world size 1 the default
    would skip MPI and torch.distributed)."""
    if backend == "none":
        return syncbn.SingleProcessCommunicator()
    if backend == "mpi":
        from mpi4py import MPI

        return syncbn.MPICommunicator(MPI.COMM_WORLD)
    return syncbn.TorchDistributedCommunicator(None)


@dataclass
class RankTools:
    comm: Communicator
    device: torch.device
    barrier: Callable[[], None]
    sync: Callable[[], None]
    threads: int


def rank_tools(setting: Setting) -> RankTools:
    comm = rank_communicator(setting.backend)
    if setting.device == "cuda":
        device = torch.device("cuda", comm.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        device = torch.device("cpu")

        def sync() -> None:
            pass
    token = torch.zeros(1, device=device)

    def barrier() -> None:
        comm.all_reduce_sum_(token)
        sync()

    return RankTools(comm, device, barrier, sync, torch.get_num_threads())

