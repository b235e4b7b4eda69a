"""One call that sets up torch.distributed however the job was started.

:func:`init_distributed` reads how this process was launched and initializes the
torch.distributed default group from it, so one training script runs unchanged under:

- ``torchrun`` and ``syncbn-launch --backend gloo|nccl``: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (torch's ``env://`` rendezvous);
- an MPI launcher (``mpiexec``/``mpirun`` of MPICH/Hydra or Intel MPI, Open MPI, MVAPICH, a
  PMIx launcher; ``syncbn-launch --backend mpi``): the ranks agree on rank 0's address and a
  free port through MPI itself, so no variable needs setting by hand (``MASTER_ADDR`` and
  ``MASTER_PORT`` override them: see :func:`mpi_rendezvous_address`);
- Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, with rank 0's host
  from ``MASTER_ADDR`` or the first host of the step's (else the job's) node list, and the port
  from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID`` (see :func:`slurm_rendezvous`);
- none of them: a single process; nothing is initialized.

The launchers are tried in that order: torchrun started under Slurm, or Hydra's proxies started
by ``srun``, leave Slurm's variables in the ranks' environment, and the outer launcher is not
the one that numbered the ranks.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ._processes import MPI_INSTALL_HINT
from .comm import launched_by_mpi

__all__ = ["DistInfo", "init_distributed", "detect_launcher", "local_rank_from_hosts",
           "mpi_rendezvous_address", "parse_slurm_hostlist", "slurm_rendezvous"]

# The local-rank variable of each MPI launcher: MPICH/Hydra and Intel MPI, Open MPI, MVAPICH.
# Without one, the local rank is counted from the host names the ranks exchange over MPI.
_MPI_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                             "MV2_COMM_WORLD_LOCAL_RANK")
# Without MASTER_PORT a Slurm job derives its rendezvous port from its job id, so that every
# task computes the same port without talking to the others. 10000-29999 stays below Linux's
# ephemeral range (32768-60999), where the OS hands out ports to outgoing connections.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    ``launcher``: how the job was started, one of "torchrun" (also syncbn-launch gloo/nccl),
    "mpi", "slurm" or "single" (no launcher: torch.distributed is left uninitialized).
    """

    rank: int
    world_size: int
    local_rank: int
    launcher: str


_initialized: Optional[DistInfo] = None  # what init_distributed set up last


def detect_launcher() -> str:
    """How this process was started, read from its environment: see :class:`DistInfo`."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if launched_by_mpi():
        return "mpi"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return "slurm"
    return "single"


def init_distributed(backend: Optional[str] = None, *,
                     timeout: Optional[Union[float, timedelta]] = None) -> DistInfo:
    """Initialize torch.distributed's default group from the launcher's environment.

    ``backend``: default "nccl" when CUDA is available, else "gloo". With NCCL the current CUDA
    device becomes ``cuda:local_rank`` (modulo the number of visible GPUs). ``timeout`` (seconds or a timedelta) is the group's
    collective timeout and bounds the rendezvous; default: torch's.

    Idempotent: when a default group already exists it returns this process's place in it and
    initializes nothing. A single process (no launcher) gets ``DistInfo(0, 1, 0, "single")`` and
    no group. Afterwards syncbn's default group (``process_group=None``) is this torch.distributed
    group whichever launcher started the job; an mpi4py communicator passed explicitly still
    syncs over MPI.
    """
    global _initialized
    launcher = detect_launcher()
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if _initialized is None or (_initialized.rank, _initialized.world_size) != (rank, world_size):
            # A group someone else initialized: only the launcher's variables tell the local rank.
            _initialized = DistInfo(rank, world_size, _local_rank_variable(launcher) or 0, launcher)
        return _initialized
    if launcher == "single":
        return DistInfo(rank=0, world_size=1, local_rank=0, launcher="single")

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    if launcher == "torchrun":
        info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        _local_rank_variable(launcher) or 0, launcher)
        store = None  # torch's env:// rendezvous reads the same variables
    elif launcher == "slurm":
        info = DistInfo(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                        _local_rank_variable(launcher) or 0, launcher)
        address, port = slurm_rendezvous()
        store = _tcp_store(address, port, info, timeout)
    else:
        info, store = _mpi_rendezvous(timeout)

    if backend == "nccl":
        # Modulo: a launcher that gives each rank its own CUDA_VISIBLE_DEVICES leaves it one GPU.
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    options = {} if timeout is None else {"timeout": timeout}
    if store is None:
        dist.init_process_group(backend, **options)
    else:
        dist.init_process_group(backend, store=store, rank=info.rank,
                                world_size=info.world_size, **options)
    _initialized = info
    return info


def _local_rank_variable(launcher: str) -> Optional[int]:
    """The local rank the launcher announced in the environment, if it did."""
    names = {"torchrun": ("LOCAL_RANK",), "slurm": ("SLURM_LOCALID",),
             "mpi": _MPI_LOCAL_RANK_VARIABLES}.get(launcher, ())
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def local_rank_from_hosts(hosts: List[str], rank: int) -> int:
    """This rank's place among the ranks on its host, from every rank's host name in rank order."""
    return hosts[:rank].count(hosts[rank])


def _tcp_store(address: str, port: int, info: DistInfo,
               timeout: Optional[timedelta]) -> dist.TCPStore:
    """The rendezvous store: rank 0 hosts it (port 0: the OS picks a free one), the others join."""
    options = {} if timeout is None else {"timeout": timeout}
    return dist.TCPStore(address, port, info.world_size, info.rank == 0,
                         wait_for_workers=False, **options)


def _mpi_rendezvous(timeout: Optional[timedelta]) -> Tuple[DistInfo, dist.TCPStore]:
    """Rank 0 hosts the store on a free port and tells the others where, over MPI."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(f"init_distributed: started by an MPI launcher, which needs mpi4py: "
                          f"{MPI_INSTALL_HINT}") from error

    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    hosts = world.allgather(socket.gethostname())
    local_rank = _local_rank_variable("mpi")
    if local_rank is None:
        local_rank = local_rank_from_hosts(hosts, rank)
    info = DistInfo(rank, world_size, local_rank, "mpi")
    store: Optional[dist.TCPStore] = None
    message: Tuple[str, object] = ("", 0)
    if rank == 0:
        address, port = mpi_rendezvous_address(hosts)
        try:
            store = _tcp_store(address, port, info, timeout)
            message = ("ok", (address, store.port))
        except Exception as error:  # tell the others, which would otherwise wait in bcast
            message = ("error", f"{type(error).__name__}: {error}")
    message = world.bcast(message, root=0)
    if message[0] == "error":
        raise RuntimeError(f"init_distributed: rank 0 could not host the rendezvous store: {message[1]}")
    if store is None:
        address, port = message[1]
        store = _tcp_store(address, port, info, timeout)
    return info, store


def mpi_rendezvous_address(hosts: List[str]) -> Tuple[str, int]:
    """Where rank 0 of an MPI job hosts the rendezvous, given every rank's host name.

    Address: ``MASTER_ADDR``; else loopback when every rank runs on rank 0's host (no name
    resolution needed); else rank 0's host name, which each rank resolves itself. Port:
    ``MASTER_PORT``, else 0: the OS picks a free one, which rank 0 then broadcasts.
    """
    address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
    return address, int(os.environ.get("MASTER_PORT") or 0)


def slurm_rendezvous() -> Tuple[str, int]:
    """Rank 0's address and the rendezvous port of an ``srun`` step, the same on every task.

    Address: ``MASTER_ADDR``, else the first host of ``SLURM_STEP_NODELIST`` (else
    ``SLURM_JOB_NODELIST``), where srun starts task 0. Port: ``MASTER_PORT``, else
    ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN`` (10000-29999); two steps of one job
    running at the same time need their own ``MASTER_PORT``.
    """
    address = os.environ.get("MASTER_ADDR")
    if not address:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise RuntimeError("init_distributed under Slurm: set MASTER_ADDR, or run under srun "
                               "(SLURM_JOB_NODELIST names the host of rank 0)")
        address = parse_slurm_hostlist(nodelist)[0]
    port = os.environ.get("MASTER_PORT")
    if port:
        return address, int(port)
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise RuntimeError("init_distributed under Slurm: set MASTER_PORT, or run inside a Slurm "
                           "job (SLURM_JOB_ID gives the port)")
    return address, SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN


def parse_slurm_hostlist(hostlist: str) -> List[str]:
    """Expand Slurm's compressed host list: ``node[01-03,07],gpu3`` -> node01 node02 node03 node07 gpu3.

    Ranges keep their zero padding; several bracket groups in one name multiply out
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: List[str] = []
    for name in _split_outside_brackets(hostlist):
        hosts.extend(_expand_name(name, hostlist))
    if not hosts:
        raise ValueError(f"empty Slurm host list {hostlist!r}")
    return hosts


def _split_outside_brackets(text: str) -> List[str]:
    """Split on the commas between names, not on those inside a bracket group."""
    names, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in Slurm host list {text!r}")
        if char == "," and depth == 0:
            names.append(text[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm host list {text!r}")
    names.append(text[start:])
    return [name.strip() for name in names if name.strip()]


def _expand_name(name: str, hostlist: str) -> List[str]:
    group = re.search(r"\[([^\]]*)\]", name)
    if group is None:
        return [name]
    head, tails = name[:group.start()], _expand_name(name[group.end():], hostlist)
    return [head + item + tail for item in _range_items(group.group(1), hostlist) for tail in tails]


def _range_items(ranges: str, hostlist: str) -> Iterator[str]:
    """``01-03,07`` -> 01 02 03 07."""
    for part in ranges.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None:
            raise ValueError(f"bad range {part!r} in Slurm host list {hostlist!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            yield low
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in Slurm host list {hostlist!r}")
        for number in range(int(low), int(high) + 1):
            yield str(number).zfill(len(low))
