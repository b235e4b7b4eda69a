"""One call that sets up torch.distributed however the job was started.

:func:`init_distributed` reads how this process was launched and initializes the
torch.distributed default group from it, so one training script runs unchanged under:

- ``torchrun`` and ``syncbn-launch --backend gloo|nccl``: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (torch's ``env://`` rendezvous);
- an MPI launcher (``mpiexec``/``mpirun`` of MPICH/Hydra or Intel MPI, Open MPI, MVAPICH, a
  PMIx launcher; ``syncbn-launch --backend mpi``): rank 0 hosts the rendezvous on a free port
  and offers its addresses through MPI itself; the others take the first they reach, so no
  variable needs setting by hand, on one host or several, whatever the host names
  (``MASTER_ADDR`` and ``MASTER_PORT`` override them: see :func:`rendezvous_addresses`);
- Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, with rank
  0's host from ``MASTER_ADDR`` or the first host of the step's (else the job's) node list, and
  the port from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID`` (see :func:`slurm_rendezvous`);
- none of them: a single process; nothing is initialized. A Slurm batch script (``SLURM_PROCID``
  and ``SLURM_NTASKS`` but no ``SLURM_STEP_NUM_TASKS``: no srun step) runs once, so a script
  started from it directly is a single process too (with a warning naming srun).

The launchers are tried in that order: torchrun started under Slurm, or Hydra's proxies started
by ``srun``, leave Slurm's variables in the ranks' environment, and the outer launcher is not
the one that numbered the ranks.

An environment that cannot make a group (a rank outside the world, ``RANK`` without
``WORLD_SIZE``, an empty or non-integer value, a world of 0) raises at once, naming the
variables and the fix. A rendezvous that cannot complete ends on every rank that waits within
the timeout (:func:`rendezvous_timeout`): rank 0 unreachable, with an error naming the address
tried; a rank that never comes, with an error naming the ranks that did (every rank checks in on
the rendezvous store before the group is built). With gloo, and ``GLOO_SOCKET_IFNAME`` unset, it
is set to the interface that holds this rank's address towards rank 0: gloo would otherwise
listen on the address of the host's name, often loopback or unknown to the other hosts.
"""
from __future__ import annotations

import os
import re
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _network
from ._processes import MPI_INSTALL_HINT
from .comm import _abort_job_on_uncaught_exception, launched_by_mpi

__all__ = ["DistInfo", "init_distributed", "detect_launcher", "local_rank_from_hosts",
           "rendezvous_addresses", "rendezvous_timeout", "parse_slurm_hostlist", "slurm_rendezvous"]

# The local-rank variable of each MPI launcher: MPICH/Hydra and Intel MPI, Open MPI, MVAPICH.
# Without one, the local rank is counted from the host names the ranks exchange over MPI.
_MPI_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                             "MV2_COMM_WORLD_LOCAL_RANK")
# Without MASTER_PORT a Slurm job derives its rendezvous port from its job id, so that every
# task computes the same port without talking to the others. 10000-29999 stays below Linux's
# ephemeral range (32768-60999), where the OS hands out ports to outgoing connections.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000
# What each launcher announces, and how to get it right: shown with every error about them.
_LAUNCH_VARIABLES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID",
              "MASTER_ADDR", "MASTER_PORT"),
    "mpi": ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
            "PMIX_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
}
_LAUNCH_FIXES = {
    "torchrun": "start every rank with torchrun or syncbn-launch, which set RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT; setting them by hand, give every process the same "
                "WORLD_SIZE, MASTER_ADDR and MASTER_PORT and its own RANK from 0 to WORLD_SIZE-1; "
                "or unset RANK and WORLD_SIZE to run a single process",
    "slurm": "start the tasks with srun, which sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and "
             "SLURM_LOCALID on each",
    "mpi": "start the ranks with mpiexec (or srun --mpi=...); check that every rank reaches "
           "init_distributed",
}
# Rank 0 of an MPI job puts a fresh token under this key of its store; the others check that the
# store they reached holds it (and is not some other job's on the same port of another address).
_TOKEN_KEY = "syncbn/rendezvous-token"
# What to do when the ranks cannot reach rank 0's rendezvous.
_ADDRESS_FIX = ("set MASTER_ADDR to an address of rank 0's host that every host can reach, and "
                "MASTER_PORT to a port open between the hosts")


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
    """How this process was started, read from its environment: see :class:`DistInfo`.

    ``RANK`` or ``WORLD_SIZE`` alone (torchrun always sets both) gives "torchrun" unless an MPI
    launcher or an srun step numbered the ranks; :func:`init_distributed` then says what is
    missing. A Slurm batch script (no ``SLURM_STEP_NUM_TASKS``) gives "single".
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if launched_by_mpi():
        return "mpi"
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        return "slurm"
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return "torchrun"  # a broken launch, not a single process
    return "single"


def init_distributed(backend: Optional[str] = None, *,
                     timeout: Optional[Union[float, timedelta]] = None) -> DistInfo:
    """Initialize torch.distributed's default group from the launcher's environment.

    ``backend``: default "nccl" when CUDA is available, else "gloo". With NCCL the current CUDA
    device becomes ``cuda:local_rank`` (modulo the number of visible GPUs). ``timeout`` (seconds
    or a timedelta; default ``SYNCBN_TIMEOUT`` seconds, else torch's: 30 min, NCCL's collectives
    10 min) is the group's collective timeout and bounds the rendezvous: a rendezvous that
    cannot complete raises on every rank that waits, naming the address it tried.

    Idempotent: when a default group already exists it returns this process's place in it and
    initializes nothing. A single process (no launcher) gets ``DistInfo(0, 1, 0, "single")`` and
    no group. Raises ``RuntimeError`` at once, naming the variables and the fix, for an
    environment that cannot make a group; and at the rendezvous timeout on every rank that
    arrived, naming the ranks that did, when one never comes. Under an MPI launcher an uncaught
    exception then aborts the whole MPI job, as ``python -m mpi4py`` does.

    Afterwards syncbn's default group (``process_group=None``) is this torch.distributed group
    whichever launcher started the job; an mpi4py communicator passed explicitly still syncs
    over MPI.
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
        _warn_if_batch_script()
        return DistInfo(rank=0, world_size=1, local_rank=0, launcher="single")

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = rendezvous_timeout(timeout)
    if launcher == "torchrun":
        info = _checked_info(launcher, "RANK", "WORLD_SIZE", "LOCAL_RANK")
        address, port = _checked_master_address()
        store = _reach_store(lambda: _env_store(info, address, port, timeout), info, address,
                             port)
        where = f"the store at {address}:{port} (MASTER_ADDR:MASTER_PORT)"
        local_address = _network.local_address_towards(address)
    elif launcher == "slurm":
        info = _checked_info(launcher, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
        address, port = slurm_rendezvous()
        store, local_address = _slurm_store(address, port, info, timeout)
        where = f"the store at {address}:{port}"
    else:
        info, store, address, local_address = _mpi_rendezvous(timeout)
        where = f"the store at {address}:{store.port}"
        if info.world_size > 1:
            _abort_job_on_uncaught_exception()
    _wait_for_every_rank(store, info, where)
    if backend == "gloo":
        _bind_gloo_to(local_address)

    if backend == "nccl":
        # Modulo: a launcher that gives each rank its own CUDA_VISIBLE_DEVICES leaves it one GPU.
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    options = {} if timeout is None else {"timeout": timeout}
    try:
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                **options)
    except RuntimeError as error:  # torch's DistError and gloo's connection errors alike
        raise RuntimeError(
            f"init_distributed: rank {info.rank} of {info.world_size} ({info.launcher}): the "
            f"rendezvous through {where} failed (it waits up to "
            f"{_store_timeout(timeout).total_seconds():g} s: {_TIMEOUT_SETTING}): {error}") from error
    _initialized = info
    return info


def _shown(launcher: str) -> str:
    """The launcher's variables as this process sees them, for error messages."""
    values = {name: os.environ[name] for name in _LAUNCH_VARIABLES[launcher] if name in os.environ}
    return ", ".join(f"{name}={value}" if value and value.strip() == value else f"{name}={value!r}"
                     for name, value in values.items()) or "none of them set"


def _environment_error(launcher: str, problem: str) -> RuntimeError:
    return RuntimeError(f"init_distributed: this environment cannot make a process group: "
                        f"{problem}; the launcher's variables: {_shown(launcher)}. Fix: "
                        f"{_LAUNCH_FIXES[launcher]}")


def _whole_number(launcher: str, name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise _environment_error(launcher, f"{name} is not set")
    if not value.strip():
        raise _environment_error(launcher, f"{name} is set but empty")
    if not value.strip().isdigit():
        raise _environment_error(launcher, f"{name}={value!r} is not a whole number")
    return int(value)


def _checked_info(launcher: str, rank_name: str, size_name: str, local_name: str) -> DistInfo:
    """This rank's place as the launcher's variables announce it, checked before any waiting."""
    rank = _whole_number(launcher, rank_name)
    size = _whole_number(launcher, size_name)
    if size < 1:
        raise _environment_error(launcher, f"{size_name}={size}: a job has at least one rank")
    if rank >= size:
        raise _environment_error(launcher, f"{rank_name}={rank} is outside a job of "
                                           f"{size_name}={size} ranks (0 to {size - 1})")
    local_rank = _whole_number(launcher, local_name) if local_name in os.environ else 0
    return DistInfo(rank, size, local_rank, launcher)


def _checked_master_address() -> Tuple[str, int]:
    """torchrun's MASTER_ADDR and MASTER_PORT: where the rendezvous store listens."""
    address = os.environ.get("MASTER_ADDR", "").strip()
    if not address:
        raise _environment_error("torchrun", "MASTER_ADDR (the rendezvous host) is "
                                 + ("empty" if "MASTER_ADDR" in os.environ else "not set"))
    port = _whole_number("torchrun", "MASTER_PORT")
    if not 0 < port < 2 ** 16:
        raise _environment_error("torchrun", f"MASTER_PORT={port} is not a port (1 to 65535)")
    return address, port


def _warn_if_batch_script() -> None:
    """Slurm sets SLURM_NTASKS in a batch script too, which runs once: not a job of N ranks."""
    tasks = os.environ.get("SLURM_NTASKS", "")
    if "SLURM_PROCID" in os.environ and tasks.isdigit() and int(tasks) > 1:
        warnings.warn(f"init_distributed: SLURM_NTASKS={tasks} but no SLURM_STEP_NUM_TASKS: this "
                      "process runs in a Slurm batch script, not in an srun step, so it is a "
                      f"single process; start the {tasks} ranks with srun (srun python "
                      "train.py)", RuntimeWarning, stacklevel=3)


def _store_host() -> str:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "the launcher (torchrun's agent, or syncbn-launch)"
    return "rank 0"


def _env_store(info: DistInfo, address: str, port: int,
               timeout: Optional[timedelta]) -> dist.Store:
    """The store of torch's env:// rendezvous, as init_process_group would make it, except that
    rank 0 does not wait in its constructor for the others (:func:`_wait_for_every_rank` does,
    and says who came). torchrun's agent (and syncbn-launch) host it themselves."""
    hosts = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(address, port, info.world_size, hosts, wait_for_workers=False,
                          multi_tenant=True, timeout=_store_timeout(timeout))
    return dist.PrefixStore("default_pg", store)  # init_process_group's prefix for env://


def _reach_store(connect, info: DistInfo, address: str, port: int) -> dist.Store:
    """``connect()``; a store that cannot be reached is reported with where it was looked for."""
    try:
        return connect()
    except dist.DistError as error:
        raise RuntimeError(
            f"init_distributed: rank {info.rank} found no rendezvous store at {address}:{port} "
            f"({_shown(info.launcher)}): it is hosted by {_store_host()}, which never started "
            f"there or listens elsewhere. Fix: {_LAUNCH_FIXES[info.launcher]}") from error


# The rendezvous host waits this long for the ranks that came to read its verdict on a timeout.
_VERDICT_LINGER_S = 2.0
_ALL_ARRIVED = "all arrived"


def _wait_for_every_rank(store: dist.Store, info: DistInfo, where: str) -> None:
    """Check in on the store and wait for every rank to do the same, at most the store's timeout.

    Without it a rank that never comes leaves the others in torch's own rendezvous, which ends
    (if ever) with an error that names neither the launcher nor the ranks. Each rank's counter
    numbers its rounds, so a second group in the same job (after destroy_process_group) waits
    afresh. The first rank to time out publishes the verdict, so every rank that waits raises
    the same error even when the store's host leaves first.
    """
    arrivals = dist.PrefixStore("syncbn/arrival", store)
    round_number = arrivals.add(f"rank{info.rank}", 1)
    round_key = f"round{round_number}"
    if arrivals.add(f"{round_key}/count", 1) == info.world_size:
        arrivals.set(f"{round_key}/verdict", _ALL_ARRIVED)
    try:
        arrivals.wait([f"{round_key}/verdict"])
        verdict = arrivals.get(f"{round_key}/verdict").decode()
        timed_out = False
    except dist.DistStoreError:  # the store's timeout passed
        arrived = [rank for rank in range(info.world_size)
                   if arrivals.add(f"rank{rank}", 0) >= round_number]
        missing = sorted(set(range(info.world_size)) - set(arrived))
        verdict = (f"waited {store.timeout.total_seconds():g} s (the rendezvous timeout: "
                   f"{_TIMEOUT_SETTING}) at {where} for all {info.world_size} ranks; arrived: "
                   f"rank(s) {_ranks(arrived)}; never arrived: rank(s) {_ranks(missing)}")
        # Unless a verdict came meanwhile (the last rank, just in time: then all go on).
        verdict = arrivals.compare_set(f"{round_key}/verdict", "", verdict).decode()
        timed_out = True
    except dist.DistError as error:
        raise RuntimeError(
            f"init_distributed: rank {info.rank} lost the rendezvous store, hosted by "
            f"{_store_host()}, while waiting for every rank ({_shown(info.launcher)}): its host "
            "gave up or failed; its own error names the ranks that arrived") from error
    if verdict == _ALL_ARRIVED:
        return
    arrivals.add(f"{round_key}/read", 1)
    if timed_out:  # the store may live in this process: let the others read the verdict first
        _linger_until_read(arrivals, f"{round_key}/read", arrivals.add(f"{round_key}/count", 0))
    raise RuntimeError(
        f"init_distributed: rank {info.rank} {verdict} ({_shown(info.launcher)}). A rank that "
        "failed or exited before init_distributed, or more ranks announced than started: see "
        f"the launcher's output for the missing ones. Fix: {_LAUNCH_FIXES[info.launcher]}")


def _linger_until_read(arrivals: dist.Store, read_key: str, readers: int) -> None:
    deadline = time.monotonic() + _VERDICT_LINGER_S
    while arrivals.add(read_key, 0) < readers and time.monotonic() < deadline:
        time.sleep(0.05)


def _ranks(ranks: List[int], shown: int = 16) -> str:
    """``0, 1, 2`` or, for many, the first ones and how many more."""
    if not ranks:
        return "none"
    text = ", ".join(str(rank) for rank in ranks[:shown])
    return text + (f" and {len(ranks) - shown} more" if len(ranks) > shown else "")


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


def rendezvous_timeout(timeout: Optional[Union[float, timedelta]] = None) -> Optional[timedelta]:
    """How long init_distributed's rendezvous, and the collectives of the group it creates, may
    wait for another rank: ``timeout`` (seconds or a timedelta), else ``SYNCBN_TIMEOUT``
    seconds, else None: torch's defaults (30 min; NCCL's collectives 10 min)."""
    if timeout is None:
        setting = os.environ.get("SYNCBN_TIMEOUT", "").strip()
        if not setting:
            return None
        try:
            timeout = float(setting)
        except ValueError:
            raise ValueError(f"SYNCBN_TIMEOUT={setting!r}: expected seconds, e.g. SYNCBN_TIMEOUT=60") from None
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    if timeout.total_seconds() <= 0:
        raise ValueError(f"init_distributed: the timeout must be positive, got {timeout}")
    return timeout


_TIMEOUT_SETTING = "init_distributed(timeout=...), else SYNCBN_TIMEOUT seconds"


def _store_timeout(timeout: Optional[timedelta]) -> timedelta:
    """The rendezvous store's timeout: the group's, else torch's default process-group timeout."""
    return timeout if timeout is not None else dist.constants.default_pg_timeout


def _host_store(port: int, info: DistInfo, timeout: Optional[timedelta]) -> dist.TCPStore:
    """Rank 0's rendezvous store. It listens on every interface (port 0: the OS picks a free
    one); rank 0 itself reaches it over loopback."""
    try:
        return dist.TCPStore("127.0.0.1", port, info.world_size, True, wait_for_workers=False,
                             timeout=_store_timeout(timeout))
    except RuntimeError as error:  # DistNetworkError: the port is taken
        raise RuntimeError(f"init_distributed: rank 0 could not host the rendezvous store on "
                           f"port {port}: {error}") from error


def _join_store(addresses: Sequence[str], port: int, info: DistInfo, timeout: Optional[timedelta],
                *, retry: bool) -> Tuple[Optional[dist.TCPStore], str, str, List[str]]:
    """Join rank 0's store at the first of ``addresses`` that answers within the timeout
    (``retry``: also while rank 0 may not listen yet). Returns the store (None if no address
    answered), that address, this rank's own address on the connection, and what each attempt
    gave."""
    wait = _store_timeout(timeout)
    started = time.monotonic()
    reached, tried = _network.first_reachable(addresses, port, wait.total_seconds(), retry=retry)
    if reached is None:
        return None, "", "", tried
    address, local_address = reached
    left = timedelta(seconds=max(wait.total_seconds() - (time.monotonic() - started), 1.0))
    try:
        store = dist.TCPStore(address, port, info.world_size, False, wait_for_workers=False, timeout=left)
    except RuntimeError as error:
        return None, "", "", [f"{address}: {error}"]
    store.set_timeout(wait)
    return store, address, local_address, tried


def _unreachable(ranks: str, store: str, timeout: Optional[timedelta], tried: str) -> RuntimeError:
    return RuntimeError(
        f"init_distributed: rank(s) {ranks} could not reach rank 0's rendezvous store {store} "
        f"within {_store_timeout(timeout).total_seconds():g} s ({_TIMEOUT_SETTING}): {tried}; "
        f"{_ADDRESS_FIX}")


def _slurm_store(address: str, port: int, info: DistInfo,
                 timeout: Optional[timedelta]) -> Tuple[dist.TCPStore, Optional[str]]:
    """Rank 0 hosts the store; the others join it at ``address``. Also returns this rank's own
    address towards ``address``."""
    if info.rank == 0:
        return _host_store(port, info, timeout), _network.local_address_towards(address)
    store, _, local_address, tried = _join_store([address], port, info, timeout, retry=True)
    if store is None:
        raise _unreachable(str(info.rank), f"at {address}:{port}", timeout, "; ".join(tried))
    return store, local_address


def _mpi_rendezvous(timeout: Optional[timedelta]) -> Tuple[DistInfo, dist.TCPStore, str, Optional[str]]:
    """Rank 0 hosts the store on a free port and offers its addresses over MPI; every other rank
    joins at the first it reaches, and the ranks agree over MPI that all of them did.

    Hosts are told apart by their network stack, not their name (see :mod:`syncbn._network`).
    Returns this rank's place, its store, the store's address as this rank reached it, and this
    rank's own address on the rendezvous's network (for gloo).
    """
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(f"init_distributed: started by an MPI launcher, which needs mpi4py: "
                          f"{MPI_INSTALL_HINT}") from error

    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    hosts = world.allgather((socket.gethostname(), _network.network_stack()))
    local_rank = _local_rank_variable("mpi")
    if local_rank is None:
        local_rank = local_rank_from_hosts([f"{name} {stack}" for name, stack in hosts], rank)
    info = DistInfo(rank, world_size, local_rank, "mpi")
    on_rank0_stack = hosts[rank][1] == hosts[0][1]
    one_stack = all(stack == hosts[0][1] for _, stack in hosts)

    store: Optional[dist.TCPStore] = None
    offer: Tuple[str, object] = ("", None)
    if rank == 0:
        try:
            store = _host_store(int(os.environ.get("MASTER_PORT") or 0), info, timeout)
            token = uuid.uuid4().hex
            store.set(_TOKEN_KEY, token)
            offer = ("ok", {"port": store.port, "token": token, "near": rendezvous_addresses(True),
                            "far": [] if one_stack else rendezvous_addresses(False)})
        except Exception as error:  # tell the others, which would otherwise wait in bcast
            offer = ("error", str(error) if str(error).startswith("init_distributed:") else
                     f"init_distributed: rank 0 could not host the rendezvous store: "
                     f"{type(error).__name__}: {error}")
    offer = world.bcast(offer, root=0)
    if offer[0] == "error":
        raise RuntimeError(offer[1])
    details = offer[1]
    port, candidates = details["port"], details["near" if on_rank0_stack else "far"]

    address, local_address, tried = "", "", []
    if rank != 0:
        store, address, local_address, tried = _join_store(candidates, port, info, timeout, retry=False)
        if store is not None and not (store.check([_TOKEN_KEY])
                                      and store.get(_TOKEN_KEY).decode() == details["token"]):
            address, tried = "", [f"{address}: another job's store answered on port {port}"]
    outcomes = world.allgather((address, on_rank0_stack, tried))
    unreached = [r for r, (reached_at, _, _) in enumerate(outcomes) if r != 0 and not reached_at]
    if unreached:  # every rank raises the same error
        raise _unreachable(", ".join(map(str, unreached)), f"(port {port} on host {hosts[0][0]})", timeout, "; ".join(
            f"rank {r} on {hosts[r][0]} tried {', '.join(outcomes[r][2]) or 'no address'}" for r in unreached))
    if on_rank0_stack:
        # Rank 0's own stack: the address the ranks on other hosts reached, if any, so that gloo
        # listens where they can connect; else the one offered on this stack.
        far = [reached_at for reached_at, near, _ in outcomes if not near]
        address = address or (far[0] if far else candidates[0])
        local_address = _network.local_address_towards(far[0] if far else candidates[0])
    return info, store, address, local_address


def rendezvous_addresses(on_rank0_stack: bool) -> List[str]:
    """Where a rank of an MPI job may reach rank 0's rendezvous store, in the order it tries
    them; evaluated on rank 0's host.

    ``MASTER_ADDR`` alone, when set. Else, for a rank on rank 0's network stack (same machine,
    same network namespace), loopback; for any other, rank 0's non-loopback IPv4 addresses,
    those its host name resolves to first, then every other interface's. Never loopback for a
    rank on another host, whatever the host names say.
    """
    if os.environ.get("MASTER_ADDR"):
        return [os.environ["MASTER_ADDR"]]
    if on_rank0_stack:
        return ["127.0.0.1"]
    return _network.offered_addresses(socket.gethostname())


def _bind_gloo_to(local_address: Optional[str]) -> None:
    """gloo listens on the address of the host's name unless told otherwise, and that address
    may be loopback or unknown to the other hosts: unless GLOO_SOCKET_IFNAME is set, point it
    at the interface that holds this rank's address on the rendezvous's network."""
    if "GLOO_SOCKET_IFNAME" in os.environ or not local_address:
        return
    interface = _network.interface_of(local_address)
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


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
