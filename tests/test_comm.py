"""Communicators: default-group resolution, zero-copy MPI, sub-groups on both backends."""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time

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


@requires_mpi
@pytest.mark.ranks(2, backend="mpi")
def test_mpi_all_reduce_works_in_place_on_the_tensor_memory_without_copies():
    from mpi4py import MPI

    spy = _BufferSpy(MPI.COMM_WORLD)
    tensor = torch.arange(5, dtype=torch.float64)
    assert MPICommunicator(spy).all_reduce_sum_(tensor) is tensor
    assert spy.addresses == [tensor.data_ptr()] and tensor.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def _without_any_group(monkeypatch) -> None:
    for variable in MPI_VARIABLES + ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("variable, value, says", [
    ("WORLD_SIZE", "2", "2 ranks (WORLD_SIZE=2, set by torchrun or syncbn-launch)"),
    ("SLURM_STEP_NUM_TASKS", "2", "2 ranks (SLURM_STEP_NUM_TASKS=2, set by srun)"),
    ("RANK", "1", "more than one rank (RANK=1, set by torchrun or syncbn-launch)"),  # rank 1 of what?
])
def test_several_ranks_announced_without_a_group_raise_instead_of_normalizing_alone(
        monkeypatch, variable, value, says):
    _without_any_group(monkeypatch)
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError) as info:
        resolve_communicator(None)
    message = str(info.value)
    assert f"the environment says this job has {says} but no process group" in message
    assert "torch.distributed.init_process_group(" in message and "syncbn.init_distributed()" in message
    own = SingleProcessCommunicator()  # the way out the message names
    assert resolve_communicator(own) is own


def test_one_rank_announced_or_a_slurm_batch_script_is_a_single_process(monkeypatch):
    _without_any_group(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the batch script of a 4-task allocation, not srun
    assert isinstance(resolve_communicator(None), SingleProcessCommunicator)


class _WatchedComm:
    """An mpi4py-like communicator of one rank whose Allreduce returns once the watchdog has
    named it in its notice (``completes=True``), or waits for the watchdog's Abort."""

    def __init__(self, completes: bool):
        self.completes = completes
        self.noticed = threading.Event()
        self.aborted = threading.Event()

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Get_name(self):  # called when the watchdog writes its notice
        self.noticed.set()
        return "watched test communicator"

    def Allreduce(self, send, receive):
        (self.noticed if self.completes else self.aborted).wait(20)

    def Abort(self, code):
        self.aborted.set()


def _watchdog_outcome(completes: bool) -> tuple:
    comm = _WatchedComm(completes)
    captured, real_stderr = io.StringIO(), sys.stderr
    sys.stderr = captured  # where the watchdog thread writes its notice
    try:
        MPICommunicator(comm, timeout=0.1).all_reduce_sum_(torch.zeros(2, dtype=torch.float64))
        time.sleep(2.0)  # past the second the watchdog leaves mpiexec before it aborts
    finally:
        sys.stderr = real_stderr
    return comm.noticed.is_set(), comm.aborted.is_set(), captured.getvalue()


@requires_mpi
@pytest.mark.ranks(2, backend="mpi")
@pytest.mark.parametrize("completes", [True, False])
def test_mpi_watchdog_aborts_only_a_collective_still_waiting_after_its_notice(completes):
    noticed, aborted, err = _watchdog_outcome(completes)
    assert noticed and aborted != completes
    assert "watched test communicator (rank=0, size=1) waited longer than 0.1 s" in err
    assert ("completed after all; not aborting" in err) == completes
