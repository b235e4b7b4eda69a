"""Sub-groups of k consecutive ranks, created consistently on every rank.

torch.distributed requires every rank to create every group, in the same order, even the
groups it does not belong to; a rank that creates only its own hangs the job. MPI splits
with one collective call. Either way each rank gets back the group it belongs to, ready to
pass as ``process_group``.
"""
from __future__ import annotations

from typing import Any

from .comm import SingleProcessCommunicator, _refuse_silent_single_process, launched_by_mpi

__all__ = ["new_groups"]


def _check_size(group_size: int, world_size: int) -> None:
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"new_groups: group_size must divide the world size {world_size}, "
                         f"got {group_size}")


def new_groups(group_size: int, parent: Any = None) -> Any:
    """Split the ranks into consecutive groups of ``group_size``; return this rank's group.

    ``parent``: None (torch.distributed's default group if initialized, else MPI's world when
    launched by mpiexec, else this single process) or an mpi4py communicator to split.
    Ranks r with the same r // group_size share a group. Call it on every rank.
    """
    if parent is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
            _check_size(group_size, world_size)
            groups = [dist.new_group(list(range(start, start + group_size)))
                      for start in range(0, world_size, group_size)]
            return groups[rank // group_size]
        if launched_by_mpi() <= 1:
            _refuse_silent_single_process()
            _check_size(group_size, 1)
            return SingleProcessCommunicator()
        from mpi4py import MPI

        parent = MPI.COMM_WORLD
    _check_size(group_size, parent.Get_size())
    rank = parent.Get_rank()
    return parent.Split(color=rank // group_size, key=rank)
