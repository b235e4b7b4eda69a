"""Run a function on N ranks: the helper behind the project's distributed tests.

:func:`run_on_ranks` starts N processes with the group initialized, runs a picklable function
on each and returns the per-rank results. :class:`RankPool` keeps the ranks alive between
calls, so a test suite pays the start-up (importing torch, the rendezvous) once.

- backend "gloo": torch.distributed's default group over gloo (FileStore rendezvous: no port).
- backend "nccl": the same over NCCL, one GPU per rank.
- backend "mpi": the ranks run under mpiexec and torch.distributed stays uninitialized, so
  syncbn's default group is ``MPI.COMM_WORLD``.

A rank's exception is re-raised in the caller with the rank's traceback. A rank that does not
answer within the timeout, or dies, fails the call with the rank named (a stalled rank with its
Python stack); every rank is killed. :meth:`RankPool.gather` says how each rank ended instead
of raising (what the pytest plugin, :mod:`syncbn.pytest_plugin`, reports). Ranks whose pool
process dies end too.
"""
from __future__ import annotations

import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
# Messages are pickled by hand: multiprocessing's own pickler would pass tensors as shared
# file descriptors (torch registers such reducers), which breaks across these connections.
from multiprocessing.connection import Connection, Listener, wait
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

import torch

from ._processes import (BACKENDS, MPI_INSTALL_HINT, describe_exit, find_mpiexec,
                         kill_session as _kill_session, tail as _tail)
from .comm import Communicator

__all__ = [
    "RankPool",
    "RankOutcome",
    "run_on_ranks",
    "RankFailure",
    "RemoteTraceback",
    "RecordingCommunicator",
    "find_mpiexec",
]

# After one rank raises, how long the others get to finish before they count as stalled.
_GRACE_AFTER_ERROR_S = 5.0
# How long a rank's exit status may lag behind its closed connection.
_EXIT_STATUS_WAIT_S = 2.0
# How long stalled ranks get to write their stacks before they are killed.
_STACK_DUMP_WAIT_S = 0.5
# How long close() lets the ranks exit on their own before killing them.
_EXIT_WAIT_S = 10.0
_WORKER_FILE = os.sep + os.path.join("syncbn", "_rank_worker.py")


class RankFailure(RuntimeError):
    """A rank stalled past the timeout, died, or could not run the function."""


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback as the ``__cause__`` of a re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class RankOutcome:
    """How one rank ended one :meth:`RankPool.gather` call.

    ``status`` is one of:

    - "returned": ``value`` is what the function returned;
    - "raised": ``value`` is the exception (None when it could not be pickled), ``detail`` the
      rank's formatted traceback;
    - "exited": the rank's process ended during the call; ``detail`` says how;
    - "stalled": still running when the call ended (at the timeout, or a few seconds after
      another rank failed), then killed; ``detail`` is its Python stack at that moment.
    """

    rank: int
    status: str
    value: Any = None
    detail: str = ""


class RecordingCommunicator(Communicator):
    """Wraps a communicator and records (numel, dtype) of every all-reduce it forwards."""

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.calls: List[tuple] = []

    def group_key(self) -> Hashable:
        return self.inner.group_key()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append((tensor.numel(), tensor.dtype))
        self.inner.label = self.label
        return self.inner.all_reduce_sum_(tensor)


class RankPool:
    """N long-lived ranks that run functions on demand; use as a context manager.

    ``timeout`` bounds each :meth:`run`; ``start_timeout`` bounds start-up (importing torch
    and the rendezvous), which is slow on a loaded machine.
    """

    def __init__(self, world_size: int, backend: str = "gloo", timeout: float = 120.0,
                 threads_per_rank: Optional[int] = None, start_timeout: float = 300.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.closed = False
        # The tail of the ranks' output, kept by close() (a failed run closes the pool).
        self.last_output = ""
        self._mpiexec_exit = ""
        self._pids: Dict[int, int] = {}
        self._workdir = tempfile.mkdtemp(prefix="syncbn-ranks-")
        self._processes: List[subprocess.Popen] = []
        self._logs: List[str] = []
        self._connections: Dict[int, Connection] = {}
        authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        env = dict(os.environ)
        env.update(
            SYNCBN_POOL_ADDRESS="%s:%d" % self._listener.address,
            SYNCBN_POOL_AUTHKEY=authkey.hex(),
            SYNCBN_POOL_BACKEND=backend,
            SYNCBN_POOL_STORE=os.path.join(self._workdir, "store"),
            SYNCBN_POOL_WORKDIR=self._workdir,
            SYNCBN_POOL_THREADS=str(threads),
            SYNCBN_POOL_GROUP_TIMEOUT=str(max(timeout, 30.0)),
            PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
            WORLD_SIZE=str(world_size),
        )
        try:
            self._start(env)
            self._accept_all()
        except BaseException:
            self.close()
            raise

    def _start(self, env: Dict[str, str]) -> None:
        worker = [sys.executable, "-m", "syncbn._rank_worker"]
        if self.backend == "mpi":
            mpiexec = find_mpiexec()
            if mpiexec is None:
                raise RankFailure(f"no mpiexec found; install it with: {MPI_INSTALL_HINT}")
            self._launch([mpiexec, "-n", str(self.world_size)] + worker, env, "mpiexec")
            return
        for rank in range(self.world_size):
            self._launch(worker, dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), f"rank{rank}")

    def _launch(self, command: List[str], env: Dict[str, str], label: str) -> None:
        log = os.path.join(self._workdir, f"{label}.log")
        with open(log, "wb") as out:
            self._processes.append(subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
        self._logs.append(log)

    def _accept_all(self) -> None:
        accepted: List[Connection] = []

        def accept() -> None:
            try:
                for _ in range(self.world_size):
                    accepted.append(self._listener.accept())
            except OSError:  # the listener was closed because start-up failed
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.start_timeout
        while thread.is_alive():
            thread.join(0.1)
            self._raise_if_exited("while starting")
            if time.monotonic() > deadline:
                raise RankFailure(f"{len(accepted)} of {self.world_size} ranks started within "
                                  f"{self.start_timeout:.0f} s{self._log_tails()}")
        for connection in accepted:
            rank, pid = pickle.loads(connection.recv_bytes())
            self._connections[rank] = connection
            self._pids[rank] = pid

    def _raise_if_exited(self, when: str) -> None:
        for label_index, process in enumerate(self._processes):
            code = process.poll()
            if code is not None:
                who = "mpiexec" if self.backend == "mpi" else f"rank {label_index}"
                raise RankFailure(f"{who} exited with code {code} {when}"
                                  f"{self._log_tails()}")

    def _log_tails(self) -> str:
        return "".join(f"\n--- {os.path.basename(log)} (tail) ---\n{_tail(log)}"
                       for log in self._logs if _tail(log))

    def run(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None,
            **kwargs: Any) -> List[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        A rank's exception is re-raised here; a rank that stalled or exited raises
        :class:`RankFailure` naming it, and the pool is closed.
        """
        timeout = self.timeout if timeout is None else timeout
        outcomes = self.gather(fn, *args, timeout=timeout, **kwargs)
        ranks = {status: [o.rank for o in outcomes if o.status == status]
                 for status in ("raised", "exited", "stalled")}
        if ranks["exited"]:
            first = outcomes[ranks["exited"][0]]
            who = self._mpiexec_exit or f"rank {first.rank} {first.detail}"
            raise RankFailure(f"{who} while running {_name(fn)}{_killed(ranks['stalled'])}"
                              f"{self.last_output}")
        if ranks["raised"]:
            _reraise(fn, ranks["raised"], outcomes, ranks["stalled"])
        if ranks["stalled"]:
            finished = [o.rank for o in outcomes if o.status == "returned"]
            raise RankFailure(
                f"{_name(fn)}: rank(s) {ranks['stalled']} did not finish within {timeout:.0f} s "
                f"(ranks {finished} did); all ranks were killed{_stacks(outcomes)}{self.last_output}")
        return [outcome.value for outcome in outcomes]

    def gather(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None,
               **kwargs: Any) -> List[RankOutcome]:
        """Run ``fn(*args, **kwargs)`` on every rank; return how each rank ended, in rank order.

        Unlike :meth:`run` it raises nothing for a rank's failure: each :class:`RankOutcome`
        says whether its rank returned, raised, exited or stalled. It waits up to ``timeout``
        seconds; once a rank has raised or exited, the others get a few seconds more (they may
        be waiting for it in a collective). Ranks still running then are "stalled": their
        Python stacks are taken, and the pool is closed (every rank killed), as it is when a
        rank exited. :attr:`last_output` then holds the tail of the ranks' output.
        """
        if self.closed:
            raise RankFailure("this RankPool is closed (an earlier call failed or close() ran)")
        timeout = self.timeout if timeout is None else timeout
        task = pickle.dumps(("run", pickle.dumps((fn, tuple(args), kwargs))))
        outcomes: Dict[int, RankOutcome] = {}
        for rank, connection in self._connections.items():
            try:
                connection.send_bytes(task)
            except OSError:  # the rank is gone
                outcomes[rank] = RankOutcome(rank, "exited", detail=self._how_rank_ended(rank))
        rank_of = {id(c): r for r, c in self._connections.items()}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            pending = [c for r, c in self._connections.items() if r not in outcomes]
            for connection in wait(pending, timeout=0.1):
                rank = rank_of[id(connection)]
                try:
                    reply = pickle.loads(connection.recv_bytes())
                except EOFError:  # the rank's process ended
                    outcomes[rank] = RankOutcome(rank, "exited", detail=self._how_rank_ended(rank))
                    continue
                if reply[0] == "ok":
                    outcomes[rank] = RankOutcome(rank, "returned", reply[1])
                else:
                    outcomes[rank] = RankOutcome(rank, "raised", reply[1], reply[2])
            self._note_exited_processes(outcomes)
            failed = any(o.status in ("raised", "exited") for o in outcomes.values())
            if failed and deadline - time.monotonic() > _GRACE_AFTER_ERROR_S:
                deadline = time.monotonic() + _GRACE_AFTER_ERROR_S
            if time.monotonic() > deadline:
                break
        if self.backend == "mpi" and any(o.status == "exited" for o in outcomes.values()):
            try:  # a rank that ended makes mpiexec end the job: say how, when it does soon
                code = self._processes[0].wait(_EXIT_STATUS_WAIT_S)
                self._mpiexec_exit = f"mpiexec {describe_exit(code)}"
            except subprocess.TimeoutExpired:
                pass
        stalled = sorted(set(range(self.world_size)) - set(outcomes))
        stacks = self._take_stacks(stalled)
        for rank in stalled:
            outcomes[rank] = RankOutcome(rank, "stalled", detail=stacks.get(rank, ""))
        if any(o.status in ("exited", "stalled") for o in outcomes.values()):
            self._stop(0.0)  # ranks may wait for a dead or stuck one in a collective: unusable
        return [outcomes[rank] for rank in range(self.world_size)]

    def _how_rank_ended(self, rank: int) -> str:
        """Words for a rank whose connection closed: its exit status when this pool knows it."""
        if self.backend == "mpi":
            return "exited (its connection closed)"
        try:
            return describe_exit(self._processes[rank].wait(_EXIT_STATUS_WAIT_S))
        except subprocess.TimeoutExpired:
            return "closed its connection"

    def _note_exited_processes(self, outcomes: Dict[int, RankOutcome]) -> None:
        """Mark the ranks whose process ended without their connection saying so yet."""
        for index, process in enumerate(self._processes):
            code = process.poll()
            if code is None:
                continue
            if self.backend == "mpi":
                self._mpiexec_exit = f"mpiexec {describe_exit(code)}"
                for rank in set(range(self.world_size)) - set(outcomes):
                    outcomes[rank] = RankOutcome(rank, "exited", detail=self._mpiexec_exit)
            elif index not in outcomes:
                outcomes[index] = RankOutcome(index, "exited", detail=describe_exit(code))

    def _take_stacks(self, ranks: List[int]) -> Dict[int, str]:
        """Ask each rank to write its Python stack (SIGUSR1, see _rank_worker), then read them."""
        for rank in ranks:
            try:
                os.kill(self._pids[rank], signal.SIGUSR1)
            except OSError:
                pass
        if ranks:
            time.sleep(_STACK_DUMP_WAIT_S)
        stacks = {}
        for rank in ranks:
            stack = _trim_stack(_tail(os.path.join(self._workdir, f"stack-rank{rank}.txt"), lines=200))
            if stack:
                stacks[rank] = stack
        return stacks

    def close(self) -> None:
        """Stop every rank (asking first, then killing) and remove the working folder."""
        self._stop(_EXIT_WAIT_S)

    def _stop(self, exit_wait_s: float) -> None:
        """Ask the ranks to exit, give them ``exit_wait_s`` seconds, then kill what is left."""
        if self.closed:
            return
        self.closed = True
        for connection in self._connections.values():
            try:
                connection.send_bytes(pickle.dumps(("exit",)))
            except OSError:
                pass
        deadline = time.monotonic() + exit_wait_s
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_session(process)
        self.last_output = self._log_tails()
        for connection in self._connections.values():
            connection.close()
        self._listener.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _trim_stack(dump: str) -> str:
    """A faulthandler dump of a rank without the worker's own frames and its watch thread."""
    threads = []
    for block in dump.strip().split("\n\n"):
        lines = block.splitlines()
        worker = [i for i, line in enumerate(lines) if _WORKER_FILE in line]
        if worker and worker[0] == 1:  # the worker's own thread (its orphan watch)
            continue
        threads.append("\n".join(lines[:worker[0]] if worker else lines))
    return "\n\n".join(threads) + "\n" if threads else ""


def _killed(stalled: List[int]) -> str:
    return f"; rank(s) {stalled} were still waiting and were killed" if stalled else ""


def _stacks(outcomes: List[RankOutcome]) -> str:
    return "".join(f"\n--- rank {o.rank}: where it was ---\n{o.detail}"
                   for o in outcomes if o.status == "stalled" and o.detail)


def _reraise(fn: Callable[..., Any], errors: List[int], outcomes: List[RankOutcome],
             stalled: List[int]) -> None:
    first = outcomes[errors[0]]
    exception, formatted = first.value, first.detail
    note = f"raised on rank {first.rank} in {_name(fn)}"
    if len(errors) > 1:
        note += f" (ranks {errors} raised)"
    note += _killed(stalled)
    if exception is None:
        raise RankFailure(f"{note}:\n{formatted}")
    exception.add_note(note)
    raise exception from RemoteTraceback(formatted)


def run_on_ranks(fn: Callable[..., Any], world_size: int, backend: str = "gloo", *,
                 args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                 timeout: float = 120.0) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh ranks; return per-rank results.

    ``fn`` must be picklable (a module-level function). Inside it, the group is initialized:
    ``syncbn.resolve_communicator()`` gives this rank's communicator.
    """
    with RankPool(world_size, backend, timeout) as pool:
        return pool.run(fn, *args, **(kwargs or {}))
