"""Communication behind one small interface: an in-place all-reduce-sum of a 1-D tensor.

SyncBatchNorm needs nothing else: each direction packs its per-channel values into one
tensor and sums it over the group. One implementation per backend:

- :class:`TorchDistributedCommunicator`: any torch.distributed process group (NCCL, gloo, sub-groups).
- :class:`MPICommunicator`: an mpi4py communicator; CPU tensors are reduced in place through
  numpy views (no copy), other devices through one host round trip.
- :class:`SingleProcessCommunicator`: a group of one; the reduction is the identity.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

__all__ = [
    "Communicator",
    "SingleProcessCommunicator",
    "TorchDistributedCommunicator",
    "MPICommunicator",
    "resolve_communicator",
    "launched_by_mpi",
]

# Variables that MPI launchers (MPICH/Hydra, Intel MPI, Open MPI, MVAPICH, PMIx/Slurm) set
# for each process: the world size can be read from them without importing mpi4py, whose
# import initializes MPI.
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class Communicator:
    """The collective SyncBatchNorm needs: an in-place sum of a 1-D tensor over the group."""

    rank: int
    size: int

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (1-D, contiguous) over the group in place and return it."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short name of the group for error messages."""
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcessCommunicator(Communicator):
    rank = 0
    size = 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistributedCommunicator(Communicator):
    def __init__(self, group: Optional[Any] = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return tensor

    def describe(self) -> str:
        backend = self._dist.get_backend(self.group)
        return f"torch.distributed group (backend={backend}, rank={self.rank}, size={self.size})"


class MPICommunicator(Communicator):
    def __init__(self, comm: Any):
        from mpi4py import MPI

        self._in_place = MPI.IN_PLACE
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            self.comm.Allreduce(self._in_place, tensor.numpy())  # a view, reduced in place
            return tensor
        host = tensor.to("cpu").contiguous()
        self.comm.Allreduce(self._in_place, host.numpy())
        tensor.copy_(host)
        return tensor

    def describe(self) -> str:
        name = self.comm.Get_name() or "MPI communicator"
        return f"{name} (rank={self.rank}, size={self.size})"


def launched_by_mpi() -> int:
    """World size announced by an MPI launcher's environment, or 0 when not started by one."""
    for variable in _MPI_SIZE_VARIABLES:
        value = os.environ.get(variable)
        if value and value.isdigit():
            return int(value)
    return 0


def _is_mpi_comm(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("mpi4py") and hasattr(obj, "Allreduce")


def resolve_communicator(process_group: Any = None) -> Communicator:
    """The communicator for ``process_group``.

    ``None`` means: the torch.distributed default group if one is initialized; else
    ``MPI.COMM_WORLD`` when an MPI launcher started more than one rank; else a single process.
    A torch.distributed ProcessGroup, an mpi4py communicator or a :class:`Communicator` is used
    as given.
    """
    if isinstance(process_group, Communicator):
        return process_group
    if process_group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return TorchDistributedCommunicator(None)
        if launched_by_mpi() > 1:
            from mpi4py import MPI

            return MPICommunicator(MPI.COMM_WORLD)
        return SingleProcessCommunicator()
    if _is_mpi_comm(process_group):
        return MPICommunicator(process_group)
    return TorchDistributedCommunicator(process_group)
