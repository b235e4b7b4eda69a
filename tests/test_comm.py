"""Communicators: default-group resolution, zero-copy MPI, sub-groups on both backends."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import syncbn
from conftest import requires_mpi
from syncbn.comm import (MPICommunicator, SingleProcessCommunicator, TorchDistributedCommunicator,
                         launched_by_mpi, resolve_communicator)

MPI_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def test_default_group_without_distributed_or_mpi_is_a_single_process(monkeypatch):
    for variable in MPI_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert isinstance(resolve_communicator(None), SingleProcessCommunicator)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1: still a single process
    assert isinstance(resolve_communicator(None), SingleProcessCommunicator)


@pytest.mark.parametrize("variable", MPI_VARIABLES)
def test_mpi_launch_is_detected_from_the_environment(monkeypatch, variable):
    for other in MPI_VARIABLES:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(variable, "4")
    assert launched_by_mpi() == 4


def test_a_communicator_object_is_used_as_given():
    own = SingleProcessCommunicator()
    assert resolve_communicator(own) is own


def test_importing_syncbn_does_not_initialize_mpi():
    code = "import sys, syncbn, syncbn.testing; sys.exit('mpi4py' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _default_communicator_kind() -> str:
    return type(resolve_communicator(None)).__name__


@pytest.mark.parametrize("backend, expected", [
    ("gloo", TorchDistributedCommunicator.__name__),
    pytest.param("mpi", MPICommunicator.__name__, marks=requires_mpi),
])
def test_default_group_is_torch_distributed_if_initialized_else_mpi_world(rank_pool, backend, expected):
    assert rank_pool(2, backend).run(_default_communicator_kind) == [expected] * 2


class _BufferSpy:
    """Forwards Allreduce to a real communicator and records the buffer addresses it got."""

    def __init__(self, comm):
        self.comm = comm
        self.addresses = []

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allreduce(self, send, receive):
        self.addresses.append(receive.__array_interface__["data"][0])
        return self.comm.Allreduce(send, receive)


def _mpi_reduces_cpu_tensors_in_place() -> tuple:
    from mpi4py import MPI

    spy = _BufferSpy(MPI.COMM_WORLD)
    tensor = torch.arange(5, dtype=torch.float64)
    result = MPICommunicator(spy).all_reduce_sum_(tensor)
    return result is tensor, spy.addresses == [tensor.data_ptr()], tensor.tolist()


@requires_mpi
def test_mpi_all_reduce_works_in_place_on_the_tensor_memory_without_copies(rank_pool):
    for same_object, same_memory, values in rank_pool(2, "mpi").run(_mpi_reduces_cpu_tensors_in_place):
        assert same_object and same_memory and values == [0.0, 2.0, 4.0, 6.0, 8.0]
