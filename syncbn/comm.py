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
import sys
import threading
import time
from typing import Any, Dict, Hashable, Optional

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
# Variables through which the other launchers announce the size of a job: a process that sees
# more than one rank here but has no group would silently normalize over its own batch alone.
# srun sets SLURM_STEP_NUM_TASKS for the tasks of one step only (SLURM_NTASKS is also set in
# a batch script itself, where a lone python process is legitimate).
_JOB_SIZE_VARIABLES = {"WORLD_SIZE": "torchrun or syncbn-launch", "SLURM_STEP_NUM_TASKS": "srun"}
# Abort tears down mpiexec's pipes: seconds for it to forward what a rank wrote just before.
_MPIEXEC_FORWARD_S = 1.0


class Communicator:
    """The collective SyncBatchNorm needs: an in-place sum of a 1-D tensor over the group.

    ``label`` says what the next collective is for (set by :mod:`syncbn.guard`), so that a
    timeout can name the layer that waits.
    """

    rank: int
    size: int
    label: str = "a SyncBatchNorm all-reduce"

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (1-D, contiguous) over the group in place and return it."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short name of the group for error messages."""
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def group_key(self) -> Hashable:
        """The same for every communicator over the same group (the debug guard counts calls per group)."""
        return id(self)


class SingleProcessCommunicator(Communicator):
    """A group of one: this process alone; the all-reduce leaves the tensor as it is.

    Pass ``process_group=syncbn.SingleProcessCommunicator()`` to normalize over this process's
    batch where that is what you mean although the environment announces several ranks
    (``WORLD_SIZE``, ``SLURM_STEP_NUM_TASKS``), which otherwise makes the first training step
    raise rather than silently skip the synchronization.
    """

    rank = 0
    size = 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistributedCommunicator(Communicator):
    """A torch.distributed process group (``None``: the default group): NCCL, gloo, any
    backend or sub-group. The all-reduce is ``torch.distributed.all_reduce``; its timeout is
    the group's own (``init_process_group(timeout=...)``)."""

    def __init__(self, group: Optional[Any] = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return tensor

    def describe(self) -> str:
        return f"torch.distributed group (backend={self.backend}, rank={self.rank}, size={self.size})"

    def group_key(self) -> Hashable:
        return "torch.distributed", id(self.group)


def collective_timeout() -> float:
    """Seconds a collective may wait before MPI's watchdog aborts (SYNCBN_TIMEOUT, default 1800)."""
    return float(os.environ.get("SYNCBN_TIMEOUT", "1800"))


class _MPIWatchdog:
    """One daemon thread that aborts the MPI job when an all-reduce outlives its deadline.

    MPI has no timeout of its own: a rank that never arrives leaves the others waiting
    forever. Aborting the communicator ends every rank, with a message naming what waited.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: Dict[int, tuple] = {}
        self._next_token = 0
        threading.Thread(target=self._watch, name="syncbn-mpi-watchdog", daemon=True).start()

    def begin(self, deadline: float, communicator: "MPICommunicator") -> int:
        with self._lock:
            self._next_token += 1
            self._waits[self._next_token] = (deadline, communicator)
            return self._next_token

    def end(self, token: int) -> None:
        with self._lock:
            del self._waits[token]

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                now = time.monotonic()
                expired = [(deadline, token, communicator)
                           for token, (deadline, communicator) in self._waits.items()
                           if deadline < now]
            if not expired:
                continue
            _, token, communicator = min(expired, key=lambda entry: entry[0])
            sys.stderr.write(
                f"syncbn: {communicator.label} over {communicator.describe()} waited longer "
                f"than {communicator.timeout:g} s (SYNCBN_TIMEOUT); a rank may have died, "
                "skipped a layer or stopped early; aborting the MPI job\n")
            _let_mpiexec_forward()
            with self._lock:  # held through Abort: the wait cannot end in between
                if token in self._waits:
                    communicator.comm.Abort(1)
                else:
                    sys.stderr.write(f"syncbn: {communicator.label} completed after all; "
                                     "not aborting\n")
                    sys.stderr.flush()


def _let_mpiexec_forward() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_MPIEXEC_FORWARD_S)


_watchdog: Optional[_MPIWatchdog] = None
_watchdog_lock = threading.Lock()


def _mpi_watchdog() -> _MPIWatchdog:
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _MPIWatchdog()
        return _watchdog


class MPICommunicator(Communicator):
    """An mpi4py communicator (``MPI.COMM_WORLD``, or one from ``Split``).

    CPU tensors are reduced in place through a numpy view, others through a copy on the host.
    MPI has no timeout of its own: a watchdog aborts the job when an all-reduce waits longer
    than ``timeout`` seconds (default: ``SYNCBN_TIMEOUT``, else 1800). In a job of more than
    one MPI rank, creating one also makes an uncaught exception abort the whole job.
    """

    def __init__(self, comm: Any, timeout: Optional[float] = None):
        from mpi4py import MPI

        self._in_place = MPI.IN_PLACE
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = collective_timeout() if timeout is None else timeout
        if MPI.COMM_WORLD.Get_size() > 1:
            _abort_job_on_uncaught_exception()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        watchdog = _mpi_watchdog()
        token = watchdog.begin(time.monotonic() + self.timeout, self)
        try:
            if tensor.device.type == "cpu" and tensor.is_contiguous():
                self.comm.Allreduce(self._in_place, tensor.numpy())  # a view, reduced in place
                return tensor
            host = tensor.to("cpu").contiguous()
            self.comm.Allreduce(self._in_place, host.numpy())
            tensor.copy_(host)
            return tensor
        finally:
            watchdog.end(token)

    def group_key(self) -> Hashable:
        return "mpi", self.comm.py2f()

    def describe(self) -> str:
        name = self.comm.Get_name() or "MPI communicator"
        return f"{name} (rank={self.rank}, size={self.size})"


_abort_hook_lock = threading.Lock()
_abort_hook_installed = False


def _abort_job_on_uncaught_exception() -> None:
    """Make an uncaught exception end the whole MPI job, as ``python -m mpi4py`` does.

    Without it, under a plain ``mpiexec -n N python train.py``, the other ranks wait in their
    collective until SYNCBN_TIMEOUT and this rank hangs in MPI_Finalize at exit. Installed
    once, in front of the hook already there (which still prints the traceback). Uncaught
    exceptions in other threads do not end the process, so they do not abort the job either.
    """
    global _abort_hook_installed
    with _abort_hook_lock:
        if _abort_hook_installed:
            return
        _abort_hook_installed = True
        previous = sys.excepthook

    def print_then_abort(exc_type: type, exc: BaseException, tb: Any) -> None:
        try:
            previous(exc_type, exc, tb)
        finally:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                # Said by syncbn, and flushed before the pause: MPI_Abort's own message can be
                # lost when mpiexec tears the job down.
                print(f"syncbn: uncaught {exc_type.__name__} on MPI rank "
                      f"{MPI.COMM_WORLD.Get_rank()}: aborting every rank of the job",
                      file=sys.stderr)
                _let_mpiexec_forward()
                MPI.COMM_WORLD.Abort(1)

    sys.excepthook = print_then_abort


def launched_by_mpi() -> int:
    """World size announced by an MPI launcher's environment, or 0 when not started by one."""
    for variable in _MPI_SIZE_VARIABLES:
        value = os.environ.get(variable)
        if value and value.isdigit():
            return int(value)
    return 0


def _refuse_silent_single_process() -> None:
    """Raise when the environment announces several ranks but no group is available.

    Normalizing over this process alone would train with per-rank statistics and exit 0.
    """
    announced = [f"{value} ranks ({variable}={value}, set by {launcher})"
                 for variable, launcher in _JOB_SIZE_VARIABLES.items()
                 for value in [os.environ.get(variable, "")] if value.isdigit() and int(value) > 1]
    rank = os.environ.get("RANK", "")
    if rank.isdigit() and int(rank) > 0:  # rank 1 of what? not of a job of one
        announced.append(f"more than one rank (RANK={rank}, set by torchrun or syncbn-launch)")
    if announced:
        raise RuntimeError(
            f"syncbn: the environment says this job has {announced[0]} but no process group is "
            "available: torch.distributed is not initialized and no MPI launcher started this "
            "process. Call torch.distributed.init_process_group(...) or syncbn.init_distributed() "
            "before the first training step, or pass process_group= explicitly (an mpi4py "
            "communicator, or syncbn.SingleProcessCommunicator() to normalize over this process "
            "alone)")


def _is_mpi_comm(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("mpi4py") and hasattr(obj, "Allreduce")


def resolve_communicator(process_group: Any = None) -> Communicator:
    """The communicator for ``process_group``.

    ``None`` means: the torch.distributed default group if one is initialized; else
    ``MPI.COMM_WORLD`` when an MPI launcher started more than one rank; else a single process,
    unless the environment announces more than one rank (WORLD_SIZE or a RANK above 0 from
    torchrun or syncbn-launch, SLURM_STEP_NUM_TASKS from srun): then it raises
    ``RuntimeError`` saying what to call, rather than silently normalizing over this process
    alone.
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
        _refuse_silent_single_process()
        return SingleProcessCommunicator()
    if _is_mpi_comm(process_group):
        return MPICommunicator(process_group)
    return TorchDistributedCommunicator(process_group)
