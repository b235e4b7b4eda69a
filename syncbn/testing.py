"""Run a function on N ranks: the helper behind the project's distributed tests.

:func:`run_on_ranks` starts N processes with the group initialized, runs a picklable function
on each and returns the per-rank results. :class:`RankPool` keeps the ranks alive between
calls, so a test suite pays the start-up (importing torch, the rendezvous) once.

- backend "gloo": torch.distributed's default group over gloo (FileStore rendezvous: no port).
- backend "nccl": the same over NCCL, one GPU per rank.
- backend "mpi": the ranks run under mpiexec and torch.distributed stays uninitialized, so
  syncbn's default group is ``MPI.COMM_WORLD``.

A rank's exception is re-raised in the caller with the rank's traceback. A rank that does not
answer within the timeout, or dies, fails the call with the rank named; every rank is killed.
"""
from __future__ import annotations

import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
# Messages are pickled by hand: multiprocessing's own pickler would pass tensors as shared
# file descriptors (torch registers such reducers), which breaks across these connections.
from multiprocessing.connection import Connection, Listener, wait
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

import torch

from ._processes import (BACKENDS, MPI_INSTALL_HINT, find_mpiexec, kill_session as _kill_session,
                         tail as _tail)
from .comm import Communicator

__all__ = [
    "RankPool",
    "run_on_ranks",
    "RankFailure",
    "RemoteTraceback",
    "RecordingCommunicator",
    "find_mpiexec",
]

# After one rank raises, how long the others get to finish before they count as stalled.
_GRACE_AFTER_ERROR_S = 5.0


class RankFailure(RuntimeError):
    """A rank stalled past the timeout, died, or could not run the function."""


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback as the ``__cause__`` of a re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


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
            self._connections[pickle.loads(connection.recv_bytes())] = connection

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
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if self.closed:
            raise RankFailure("this RankPool is closed (an earlier call failed or close() ran)")
        try:
            return self._run(fn, args, kwargs, self.timeout if timeout is None else timeout)
        except RankFailure:
            self.close()
            raise

    def _run(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any],
             timeout: float) -> List[Any]:
        task = pickle.dumps(("run", pickle.dumps((fn, tuple(args), kwargs))))
        for connection in self._connections.values():
            connection.send_bytes(task)
        replies: Dict[int, tuple] = {}
        rank_of = {id(c): r for r, c in self._connections.items()}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            pending = [c for r, c in self._connections.items() if r not in replies]
            for connection in wait(pending, timeout=0.1):
                try:
                    replies[rank_of[id(connection)]] = pickle.loads(connection.recv_bytes())
                except EOFError:
                    pass  # the rank died; reported below from its exit code
            errors = [r for r, reply in replies.items() if reply[0] == "error"]
            if errors and time.monotonic() > deadline:
                break
            if errors and deadline - time.monotonic() > _GRACE_AFTER_ERROR_S:
                deadline = time.monotonic() + _GRACE_AFTER_ERROR_S
            if len(replies) < self.world_size:
                self._raise_if_exited(f"while running {_name(fn)}")
                if time.monotonic() > deadline and not errors:
                    stalled = sorted(set(range(self.world_size)) - set(replies))
                    raise RankFailure(
                        f"{_name(fn)}: rank(s) {stalled} did not finish within {timeout:.0f} s "
                        f"(ranks {sorted(replies)} did); all ranks were killed{self._log_tails()}")
        errors = sorted(r for r, reply in replies.items() if reply[0] == "error")
        if errors:
            stalled = sorted(set(range(self.world_size)) - set(replies))
            if stalled:
                self.close()  # the stalled ranks wait in a collective; the pool is unusable
            _reraise(fn, errors, replies, stalled)
        return [replies[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop every rank (asking first, then killing) and remove the working folder."""
        if self.closed:
            return
        self.closed = True
        for connection in self._connections.values():
            try:
                connection.send_bytes(pickle.dumps(("exit",)))
            except OSError:
                pass
        deadline = time.monotonic() + 10.0
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_session(process)
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


def _reraise(fn: Callable[..., Any], errors: List[int], replies: Dict[int, tuple],
             stalled: List[int]) -> None:
    first = errors[0]
    _, exception, formatted = replies[first]
    note = f"raised on rank {first} in {_name(fn)}"
    if len(errors) > 1:
        note += f" (ranks {errors} raised)"
    if stalled:
        note += f"; rank(s) {stalled} were still waiting and were killed"
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
