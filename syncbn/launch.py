"""syncbn-launch: run N local ranks of a Python script over gloo, NCCL or MPI.

    syncbn-launch --nprocs N [--backend gloo|nccl|mpi] [--timeout S] [--exit-grace S]
                  [--log-dir DIR] script.py [args]
    python -m syncbn.launch ...   (the same)

gloo / nccl: each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, ...), so ``torch.distributed.init_process_group(backend)`` needs no arguments. The
rendezvous store lives in the launcher, as under torchrun, so ranks ending at different times
do not break each other. nccl: one GPU per rank, ``cuda:LOCAL_RANK``.
mpi: the ranks run under the mpiexec that belongs to mpi4py, with its PMI_RANK/PMI_SIZE/MPI_LOCALRANKID
and no torchrun variables: ``syncbn.init_distributed()`` agrees on a rendezvous over MPI and
initializes torch.distributed (gloo/NCCL); a script that does not call it syncs syncbn's layers
over ``MPI.COMM_WORLD``.

Every line a rank prints arrives whole on the launcher's stdout or stderr (the same stream),
prefixed ``[rankK] `` (torch's own ``[rankK]:`` label dropped); with ``--log-dir`` also in
``DIR/rankK.log``.

Fail fast: when a rank exits non-zero or dies by a signal (the others get a second to report
their own errors), or ``--timeout`` passes, or the launcher gets SIGINT/SIGTERM/SIGHUP, every
rank's process group gets SIGTERM, then SIGKILL after a grace period, and the launcher reports
the first failing rank, its exit code or signal, the first Python exception in its output and
its last lines (once for ranks whose errors differ only in the rank number).

Never hang on a rank that finished: a rank that ends normally while another still waits for it
(in a collective or the rendezvous) would leave that one waiting until its own timeout. Once a
rank has finished normally, the ranks still running ``--exit-grace`` seconds later (default
30) are stopped the same way, naming them. Ranks that end at different times after their last
collective are fine within that time; a script that works on alone for longer (evaluation or
saving on rank 0) ends every rank with ``torch.distributed.barrier()`` after that work, or
raises ``--exit-grace``. Under MPI a rank counts as finished when its script returns, before
MPI_Finalize, which in MPICH waits for the other ranks.

A launcher killed by SIGKILL leaves no rank behind either: gloo/nccl ranks are ended by a
reaper process, MPI ranks by their wrappers (see :mod:`syncbn._processes`).

Exit status: 0 when every rank exited 0; the first failing rank's exit code; 128+N when it died
by signal N, or when the launcher itself got signal N (1, not 134, for a rank that raised an
uncaught exception and was then aborted by gloo at exit); 124 on ``--timeout`` or
``--exit-grace``; 2 on a usage error (bad arguments, too few GPUs, no mpiexec).

End your script with ``torch.distributed.barrier()`` and ``destroy_process_group()``: without
them gloo can abort ("terminate called without an active exception") or hang at interpreter
exit (README: "Launching jobs").
"""
from __future__ import annotations

import argparse
import collections
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Deque, Dict, List, Optional, Sequence, Set, Tuple

from . import _processes
from ._processes import (BACKENDS, MPI_INSTALL_HINT, describe_exit, exit_status, find_mpiexec,
                         signal_group, signal_name)

__all__ = ["main", "launch", "UsageError"]

GRACE_S = 3.0  # SIGTERM to SIGKILL
SETTLE_S = 1.0  # after the first failure, time for the other ranks' own errors to get out
TAIL_LINES = 20
MAX_GROUPS_SHOWN = 4  # of ranks with different errors, in the report
# A rank still running this long after another finished normally is taken to be waiting for it.
EXIT_GRACE_S = 30.0
EXIT_TIMEOUT = 124
EXIT_USAGE = 2
# torchrun's variables, dropped for MPI ranks so that scripts do not take the torch.distributed path.
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
                       "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
                       "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                       "TORCHELASTIC_RUN_ID")

_write_lock = threading.Lock()  # one line at a time on the launcher's streams


class UsageError(Exception):
    """A launch that cannot start (bad arguments, too few GPUs, no mpiexec)."""


_TRACEBACK = "Traceback (most recent call last):"


class _ExceptionFinder:
    """Reads one stream's lines and keeps the exception of the first Python traceback in it.

    A rank that raised can still die by a signal afterwards (gloo's "terminate called without
    an active exception" at exit is a SIGABRT): the exception says what went wrong. Chained
    exceptions belong to the same traceback; the last one printed is the one raised.
    """

    _CHAIN = ("The above exception was the direct cause of the following exception:",
              "During handling of the above exception, another exception occurred:")

    def __init__(self) -> None:
        self.found: Optional[str] = None
        self.started_at = float("inf")  # when its traceback began: the earliest one wins
        self._state = "before"  # before | frames | after | chained | done

    def feed(self, line: str) -> None:
        text = line.rstrip("\n")
        if self._state in ("before", "chained") and text.startswith(_TRACEBACK):
            self.started_at = min(self.started_at, time.monotonic())
            self._state = "frames"
        elif self._state == "frames" and text and not text[0].isspace():
            self.found, self._state = text, "after"  # frames are indented; this is the exception
        elif self._state == "after" and text.strip():
            self._state = "chained" if text in self._CHAIN else "done"
        elif self._state == "chained" and text.strip():
            self._state = "done"


class _Output:
    """One source of lines (a rank, or mpiexec): prefix, optional log file, last lines."""

    def __init__(self, label: str, log_path: Optional[str]):
        self.prefix = f"[{label}] ".encode()
        # torch.distributed labels a rank's tracebacks and log lines "[rankK]:" itself; the
        # launcher's prefix already says so.
        self.torch_prefix = f"[{label}]:".encode()
        self.tail: Deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.finders: List[_ExceptionFinder] = []
        self.log = open(log_path, "wb") if log_path else None
        self.lock = threading.Lock()

    def pump(self, pipe: IO[bytes], stream: IO[bytes]) -> threading.Thread:
        finder = _ExceptionFinder()  # one per stream: their lines interleave
        self.finders.append(finder)
        thread = threading.Thread(target=self._copy, args=(pipe, stream, finder), daemon=True)
        thread.start()
        return thread

    def first_exception(self) -> Optional[str]:
        with self.lock:
            found = [finder for finder in self.finders if finder.found]
            return min(found, key=lambda finder: finder.started_at).found if found else None

    def _copy(self, pipe: IO[bytes], stream: IO[bytes], finder: _ExceptionFinder) -> None:
        with pipe:
            for line in iter(pipe.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                if line.startswith(self.torch_prefix):
                    line = line[len(self.torch_prefix):]
                    line = line[1:] if line.startswith(b" ") else line
                text = line.decode(errors="replace")
                with self.lock:
                    self.tail.append(text)
                    finder.feed(text)
                    if self.log:
                        self.log.write(line)
                        self.log.flush()
                with _write_lock:
                    try:
                        stream.write(self.prefix + line)
                        stream.flush()
                    except (OSError, ValueError):  # the launcher's reader went away
                        pass

    def close(self) -> None:
        with self.lock:
            if self.log:
                self.log.close()
                self.log = None


class _ReaperLink:
    """The launcher's end of the reaper process (see _processes): told each gloo/nccl rank's
    process group, it SIGKILLs them all if the launcher dies without dismissing it."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, _processes.__file__, "reap"],
                                         stdin=subprocess.PIPE, start_new_session=True)
        assert self._process.stdin is not None  # stdin=PIPE
        self._pipe: IO[bytes] = self._process.stdin

    def watch_group(self, pid: int) -> None:
        self._tell(f"group {pid}")

    def dismiss(self) -> None:
        """The job is over: the reaper has nothing left to end."""
        self._tell("done")
        try:
            self._pipe.close()
        except OSError:  # it died, with our last words still buffered
            pass
        self._process.wait()

    def _tell(self, message: str) -> None:
        try:
            self._pipe.write(f"{message}\n".encode())
            self._pipe.flush()
        except OSError:  # the reaper died: the ranks are still stopped by this launcher
            pass


class _WrapperServer:
    """The socket that each MPI rank's wrapper (see _processes) connects back to: the rank's
    stdout and stderr, pumped into its output, and a status channel that reports its process
    group and exit status, and holds the wrapper until the launcher releases it."""

    def __init__(self, outputs: Dict[int, _Output], events: "queue.Queue[tuple]",
                 groups: Dict[int, int], pumps: List[threading.Thread]):
        # The job's own containers: what arrives here is the job's to watch, stop and join.
        self._outputs, self._events, self._groups, self._pumps = outputs, events, groups, pumps
        self._server = socket.create_server(("127.0.0.1", 0))
        self.token = secrets.token_hex(16)  # only this job's wrappers know it
        self._channels: Dict[int, socket.socket] = {}  # rank -> its wrapper's status channel
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self._server.getsockname()[1]

    def release(self) -> None:
        """Let the wrappers exit; one still holding a rank kills it on this EOF."""
        self._server.close()
        for channel in list(self._channels.values()):
            channel.close()

    def kill(self, ranks: List[int]) -> None:
        """Have the wrappers SIGKILL these ranks, and report that as each rank's exit status."""
        for rank in ranks:
            try:
                self._channels[rank].sendall(b"kill\n")
            except (KeyError, OSError):  # not connected yet, or gone: the group kill ends it
                pass

    def _accept(self) -> None:
        while True:
            try:
                channel, _ = self._server.accept()
            except OSError:  # closed: the job is over
                return
            threading.Thread(target=self._serve, args=(channel,), daemon=True).start()

    def _serve(self, channel: socket.socket) -> None:
        reader = channel.makefile("rb")
        fields = reader.readline().decode(errors="replace").split()
        if len(fields) != 3 or fields[0] != self.token or not fields[1].isdigit():
            channel.close()
            return
        rank, kind = int(fields[1]), fields[2]
        if rank not in self._outputs:
            channel.close()
            return
        if kind in ("out", "err"):
            stream = sys.stdout.buffer if kind == "out" else sys.stderr.buffer
            self._pumps.append(self._outputs[rank].pump(reader, stream))
            return
        if kind == "finished":  # the script returned; the rank now waits in MPI_Finalize
            channel.close()
            self._events.put(("finished", rank))
            return
        self._channels[rank] = channel  # closed at the end: a wrapper still running then ends its rank
        with reader:
            for line in iter(reader.readline, b""):
                word, _, value = line.decode().partition(" ")
                if word == "pid":
                    self._groups[rank] = int(value)
                elif word == "exit":
                    self._events.put(("exit", rank, int(value)))
                    return
        self._events.put(("lost", rank))


class _FailureReport:
    """What the launcher says about a failed job once it is over: how each rank failed, the
    first exception each raised, and the last lines of those that failed on their own.

    Ranks whose exceptions differ only in the rank number are one group: the exception and
    the last lines are shown once for it, from its first rank (all of them were shown live).
    """

    def __init__(self, outputs: Dict[int, _Output], codes: Dict[int, Optional[int]],
                 signaled: Set[int]):
        self._outputs = outputs
        self._codes = codes  # Popen-style; None: lost (no status)
        self._signaled = signaled  # ranks the launcher stopped

    def text(self, status: int, reason: str, failed_rank: Optional[int]) -> str:
        # The first rank to exit is not always the culprit (its peers' errors can end it
        # first), so every rank that failed on its own is shown.
        own = [rank for rank, code in self._codes.items()
               if code != 0 and rank not in self._signaled and rank != failed_rank]
        groups = self._groups([failed_rank] + own)[:MAX_GROUPS_SHOWN]
        return (f"job failed (exit status {status}): {reason}{self._others(failed_rank)}"
                + "".join(self._exceptions(group) for group in groups)
                + "".join(self._tail(group) for group in groups))

    def exception(self, rank: Optional[int]) -> str:
        if rank is None or rank == -1 or rank not in self._outputs:
            return ""
        return self._outputs[rank].first_exception() or ""

    def _groups(self, ranks: List[Optional[int]]) -> List[List[int]]:
        """Ranks with the same exception but for the rank number, in order of first appearance;
        ranks without an exception each alone."""
        groups: Dict[object, List[int]] = {}
        for rank in ranks:
            if rank is None:  # the launcher stopped the job: no rank failed first
                continue
            exception = self.exception(rank)
            key = _without_rank(exception, rank) if exception else ("alone", rank)
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def _exceptions(self, group: List[int]) -> str:
        first, others = group[0], group[1:]
        exception = self.exception(first)
        if not exception:
            return ""
        text = f"\nrank {first} raised {exception}"
        if others:
            differ = any(self.exception(rank) != exception for rank in others)
            text += (f"\nrank(s) {', '.join(map(str, others))} raised the same"
                     + (" but for the rank number" if differ else ""))
        return text

    def _others(self, failed_rank: Optional[int]) -> str:
        others = [f"rank {rank} {_describe(code)}" for rank, code in self._codes.items()
                  if code != 0 and rank != failed_rank]
        return "; then " + ", ".join(others) if others else ""

    def _tail(self, group: List[int]) -> str:
        rank = group[0]
        if rank not in self._outputs or not self._outputs[rank].tail:
            return ""
        lines = list(self._outputs[rank].tail)
        if self.exception(rank):  # its last traceback only, not the chain that led to it again
            starts = [index for index, line in enumerate(lines) if line.startswith(_TRACEBACK)]
            lines = lines[starts[-1]:] if starts else lines
        name = "mpiexec" if rank == -1 else f"rank {rank}"
        also = f" (the same error as rank(s) {', '.join(map(str, group[1:]))})" if group[1:] else ""
        return f"\n--- last lines of {name}{also} ---\n" + "".join(lines).rstrip("\n")


def _without_rank(text: str, rank: int) -> str:
    """``text`` with this rank's number taken out where it names the rank ("rank 1", "RANK=1",
    "LOCAL_RANK=1", "[rank1]"), so that the same error on two ranks compares equal."""
    return re.sub(rf"(?i)((?:\b|_)rank\s*[=:]?\s*){rank}(?!\d)", r"\1#", text)


class _Job:
    """The ranks of one launch: start them, watch them, stop them, report."""

    def __init__(self, script_argv: List[str], nprocs: int, backend: str, log_dir: Optional[str],
                 exit_grace: float = EXIT_GRACE_S):
        self.script_argv = script_argv  # the script and its arguments
        self.nprocs = nprocs
        self.backend = backend
        self.log_dir = log_dir
        self.exit_grace = exit_grace
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        self.outputs = {rank: _Output(f"rank{rank}", self._log(f"rank{rank}.log"))
                        for rank in range(nprocs)}
        # ("exit", rank, Popen-style code) | ("lost", rank) | ("mpiexec", code)
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.groups: Dict[int, int] = {}  # rank -> the process group that holds it
        self.codes: Dict[int, Optional[int]] = {}  # Popen-style; None: lost (no status)
        # rank -> when its script ended normally (its exit 0; under MPI, its return, reported
        # before MPI_Finalize keeps the process waiting for the others)
        self.finished: Dict[int, float] = {}
        self.signaled: Set[int] = set()  # ranks the launcher stopped
        self.processes: List[subprocess.Popen] = []
        self.threads: List[threading.Thread] = []
        self.mpiexec: Optional[subprocess.Popen] = None
        self.wrappers: Optional[_WrapperServer] = None  # MPI ranks report through it
        self.store = None  # the rendezvous TCPStore, alive as long as the job
        self.reaper: Optional[_ReaperLink] = None  # ends gloo/nccl ranks if we are killed
        self.received_signal: Optional[int] = None

    def _log(self, name: str) -> Optional[str]:
        return os.path.join(self.log_dir, name) if self.log_dir else None

    def _base_env(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "OMP_NUM_THREADS" not in env:  # torch would start one thread per core in every rank
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            env["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // self.nprocs))
        return env

    def _spawn(self, command: List[str], env: Dict[str, str], output: _Output) -> subprocess.Popen:
        # Own session: a Ctrl-C in the terminal reaches the launcher only, which stops the group.
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        self.processes.append(process)
        self.threads.append(output.pump(process.stdout, sys.stdout.buffer))
        self.threads.append(output.pump(process.stderr, sys.stderr.buffer))
        return process

    def _watch(self, process: subprocess.Popen, event: tuple) -> None:
        def wait() -> None:
            self.events.put(event + (process.wait(),))

        threading.Thread(target=wait, daemon=True).start()

    # --- torch.distributed (gloo, nccl) -----------------------------------------------------

    def start_torch(self) -> None:
        # The launcher hosts the store (torchrun's agent does too): a rank that exits early
        # cannot take the rendezvous down with it. Its socket is bound first, so the ranks start
        # (and import torch) while the launcher imports torch; they wait in the listen backlog.
        listener = socket.create_server(("127.0.0.1", 0), backlog=max(128, self.nprocs))
        port = listener.getsockname()[1]
        env = self._base_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE=str(self.nprocs), LOCAL_WORLD_SIZE=str(self.nprocs),
                   ROLE_WORLD_SIZE=str(self.nprocs), GROUP_WORLD_SIZE="1", GROUP_RANK="0",
                   ROLE_NAME="default", TORCHELASTIC_USE_AGENT_STORE="True",
                   TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                   TORCHELASTIC_RUN_ID=f"syncbn-launch-{secrets.token_hex(4)}")
        # MPI ranks end themselves when the launcher dies (their wrappers watch it); these
        # need the reaper, started first so that every rank is known to it.
        self.reaper = _ReaperLink()
        for rank in range(self.nprocs):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
            process = self._spawn([sys.executable, "-u"] + self.script_argv, rank_env,
                                  self.outputs[rank])
            self.groups[rank] = process.pid
            self.reaper.watch_group(process.pid)
            self._watch(process, ("exit", rank))
        from torch.distributed import TCPStore

        # The store takes the socket over (and closes it).
        self.store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.detach())

    # --- MPI --------------------------------------------------------------------------------

    def start_mpi(self, mpiexec: str) -> None:
        # Each rank runs through a wrapper that connects its stdout/stderr and exit status
        # back here (see _processes): hydra neither keeps lines whole nor reports per rank.
        self.wrappers = _WrapperServer(self.outputs, self.events, self.groups, self.threads)
        env = {k: v for k, v in self._base_env().items() if k not in _TORCHRUN_VARIABLES}
        env.update(SYNCBN_LAUNCH_ADDRESS=self.wrappers.address,
                   SYNCBN_LAUNCH_TOKEN=self.wrappers.token)
        helper = [sys.executable, "-u", _processes.__file__]
        rank_command = helper + ["mpi-rank"] + helper + ["run-script"] + self.script_argv
        self.outputs[-1] = _Output("mpiexec", self._log("mpiexec.log"))
        self.mpiexec = self._spawn([mpiexec, "-n", str(self.nprocs)] + rank_command, env,
                                   self.outputs[-1])
        self._watch(self.mpiexec, ("mpiexec",))

    # --- watching and stopping --------------------------------------------------------------

    def wait(self, timeout: Optional[float]) -> int:
        """Wait for every rank; on the first failure stop them all. Returns the exit status."""
        status, reason, failed_rank = self._first_failure(timeout)
        if status != 0:
            self._stop(settle=failed_rank is not None)
        self._release_wrappers()
        self._finish_mpiexec(status == 0)
        if status == 0 and self.mpiexec is not None and self.mpiexec.returncode:
            status, failed_rank = _exit_status(self.mpiexec.returncode), -1
            reason = f"every rank exited 0 but mpiexec {describe_exit(self.mpiexec.returncode)}"
        self._close()
        report = _FailureReport(self.outputs, self.codes, self.signaled)
        if (failed_rank is not None and self.codes.get(failed_rank) == -signal.SIGABRT
                and report.exception(failed_rank)):
            # It raised, then gloo's teardown aborted it at exit (a race in torch, README):
            # it failed with its exception, whichever way the race went.
            status = 1
            reason += " after raising an uncaught exception"
        if status != 0:
            self._say(report.text(status, reason, failed_rank))
        return status

    def _first_failure(self, timeout: Optional[float]) -> Tuple[int, str, Optional[int]]:
        """Record exits until every rank has one or the job must stop: a rank failed, a signal
        came, ``timeout`` passed or mpiexec ended without the ranks' statuses. Returns the exit
        status, why, and the failing rank (-1: mpiexec; None: none)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        mpiexec_code: Optional[int] = None
        mpiexec_gone_at = 0.0
        while len(self.codes) < self.nprocs:
            if self.received_signal is not None:
                return (128 + self.received_signal,
                        f"received {signal_name(self.received_signal)}; sent SIGTERM to "
                        f"rank(s) {self._running()} (SIGKILL to any left {GRACE_S:g} s later)",
                        None)
            if deadline is not None and time.monotonic() > deadline:
                return (EXIT_TIMEOUT, f"timed out after {timeout:g} s (--timeout); rank(s) "
                        f"{self._running()} still running were stopped", None)
            stalled = self._stalled()
            if stalled:
                return EXIT_TIMEOUT, stalled, None
            if mpiexec_code is not None and time.monotonic() - mpiexec_gone_at > 5.0:
                return (_exit_status(mpiexec_code) or 1,
                        f"mpiexec {describe_exit(mpiexec_code)} but rank(s) {self._running()} "
                        "never reported an exit status (did they start?)", -1)
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event[0] == "mpiexec":
                mpiexec_code, mpiexec_gone_at = event[1], time.monotonic()
                continue
            rank = event[1]
            if event[0] == "finished":
                self.finished.setdefault(rank, time.monotonic())
                continue
            code = event[2] if event[0] == "exit" else None
            self.codes[rank] = code
            if code == 0:
                self.finished.setdefault(rank, time.monotonic())
            if code != 0:
                reason = f"rank {rank} {_describe(code)}"
                self._say(f"{reason}; stopping rank(s) {self._running()}")
                return _exit_status(code), reason, rank
        return 0, "", None

    def _running(self) -> List[int]:
        return [rank for rank in range(self.nprocs) if rank not in self.codes]

    def _stalled(self) -> str:
        """Why the job must stop when ranks still work ``exit_grace`` seconds after the first
        rank finished normally: they are taken to wait for it (in a collective, or in the
        rendezvous), which they would do until their own timeout. "" while that is not so."""
        working = [rank for rank in self._running() if rank not in self.finished]
        if not self.finished or not working:
            return ""
        first = min(self.finished, key=self.finished.__getitem__)
        if time.monotonic() - self.finished[first] <= self.exit_grace:
            return ""
        return (f"rank {first} finished normally but rank(s) {working} still ran "
                f"{self.exit_grace:g} s later (--exit-grace), taken to be waiting for it (in a "
                "collective or the rendezvous it left, or hung at exit) and stopped. If a rank "
                "works alone after the others finish (evaluation, saving), end every rank with "
                "torch.distributed.barrier() after that work, or raise --exit-grace")

    def _drain(self, until: float) -> None:
        """Record exits until every rank has one or ``until`` passes."""
        while len(self.codes) < self.nprocs and time.monotonic() < until:
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event[0] in ("exit", "lost"):
                self.codes.setdefault(event[1], event[2] if event[0] == "exit" else None)

    def _stop(self, settle: bool) -> None:
        if settle:  # the others usually fail on their own a moment later, with their own error
            self._drain(time.monotonic() + SETTLE_S)
        self.signaled = set(self._running())
        for rank in self.signaled:
            if rank in self.groups:
                signal_group(self.groups[rank], signal.SIGTERM)
        self._drain(time.monotonic() + GRACE_S)
        if self.wrappers is not None:
            # MPI ranks: their wrappers SIGKILL those left and report it, then exit on their
            # own, so that neither this report nor mpiexec's shows a signal no rank got.
            self.wrappers.kill(self._running())
            self._drain(time.monotonic() + GRACE_S)
            if len(self.codes) == self.nprocs:
                self._release_wrappers()
                self._finish_mpiexec(orderly=False)
        # Every group, the finished ranks' too: their own children must not outlive the job.
        for pid in self.groups.values():
            signal_group(pid, signal.SIGKILL)
        self._drain(time.monotonic() + 1.0)

    def _finish_mpiexec(self, orderly: bool) -> None:
        if self.mpiexec is None:
            return
        try:
            self.mpiexec.wait(10.0 if orderly else GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(self.mpiexec.pid, signal.SIGKILL)
            self.mpiexec.wait()

    def _release_wrappers(self) -> None:
        if self.wrappers is not None:
            self.wrappers.release()

    def _close(self) -> None:
        for process in self.processes:  # a rank that outlived SIGKILL (uninterruptible I/O)
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        self._release_wrappers()
        deadline = time.monotonic() + 5.0
        for thread in self.threads:  # the last lines, before the report
            thread.join(max(0.0, deadline - time.monotonic()))
        for output in self.outputs.values():
            output.close()
        if self.reaper is not None:
            self.reaper.dismiss()
            self.reaper = None

    @staticmethod
    def _say(message: str) -> None:
        with _write_lock:
            sys.stderr.write(f"syncbn-launch: {message}\n")
            sys.stderr.flush()


def _exit_status(code: Optional[int]) -> int:
    """The launcher's exit status for a rank's Popen-style return code (None: lost)."""
    return 1 if code is None else exit_status(code)


def _describe(code: Optional[int]) -> str:
    if code is None:
        return "ended without reporting an exit status (its MPI wrapper was killed)"
    return describe_exit(code)


def launch(script: str, script_args: Sequence[str], nprocs: int, backend: str = "gloo",
           timeout: Optional[float] = None, log_dir: Optional[str] = None,
           exit_grace: float = EXIT_GRACE_S) -> int:
    """Run ``python script *script_args`` on ``nprocs`` local ranks; return the exit status.

    ``exit_grace``: seconds the other ranks may still run after one finished normally
    (``--exit-grace``); then they are taken to wait for it and stopped (exit status 124).

    Raises :class:`UsageError` when the job cannot start (too few GPUs, no mpiexec).
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if nprocs < 1:
        raise UsageError(f"--nprocs must be at least 1, got {nprocs}")
    if not exit_grace >= 0:
        raise UsageError(f"--exit-grace must be 0 or more seconds (inf: wait forever), got "
                         f"{exit_grace}")
    mpiexec = None
    if backend == "nccl":
        import torch

        gpus = torch.cuda.device_count()
        if nprocs > gpus:
            raise UsageError(f"--backend nccl runs one GPU per rank: --nprocs {nprocs} needs "
                             f"{nprocs} GPUs but torch.cuda.device_count() is {gpus}; use "
                             "fewer ranks, or --backend gloo on CPU")
    if backend == "mpi":
        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise UsageError("--backend mpi: no mpiexec found next to this Python or on PATH; "
                             f"install one with: {MPI_INSTALL_HINT}")
    job = _Job([script] + list(script_args), nprocs, backend, log_dir, exit_grace)
    handlers = _trap_signals(job)
    try:
        try:
            if mpiexec is not None:
                job.start_mpi(mpiexec)
            else:
                job.start_torch()
        except BaseException:
            job._stop(settle=False)
            job._close()
            raise
        return job.wait(timeout)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _trap_signals(job: _Job) -> Dict[int, object]:
    """Turn SIGINT/SIGTERM/SIGHUP into an orderly stop of every rank (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def note(sig: int, _frame: object) -> None:
        if job.received_signal is None:
            job.received_signal = sig

    return {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncbn-launch",
        description="Run N local ranks of a Python script over gloo, NCCL or MPI; stop them all "
                    "as soon as one fails.",
        epilog="Exit status: 0 if every rank exited 0; else the failing rank's exit code, 128+N "
               "for signal N, 124 on --timeout or --exit-grace, 2 on a usage error.")
    parser.add_argument("--nprocs", "--nproc-per-node", type=int, required=True,
                        help="number of ranks to start on this machine")
    parser.add_argument("--backend", choices=BACKENDS, default="gloo",
                        help="gloo (CPU), nccl (one GPU per rank) or mpi (mpiexec); default gloo")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every rank and exit 124 after this many seconds")
    parser.add_argument("--log-dir", default=None,
                        help="also write each rank's output to DIR/rankK.log")
    parser.add_argument("--exit-grace", type=float, default=EXIT_GRACE_S, metavar="S",
                        help="once a rank has finished normally, stop the ranks still running "
                             "S seconds later and exit 124: they are taken to wait for it "
                             f"(default {EXIT_GRACE_S:g}; inf: wait forever)")
    parser.add_argument("script", help="the Python script every rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``syncbn-launch`` and ``python -m syncbn.launch``."""
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        status = launch(options.script, options.args, options.nprocs, options.backend,
                        options.timeout, options.log_dir, options.exit_grace)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"syncbn-launch: error: {error}\n")
    sys.exit(status)


if __name__ == "__main__":
    main()
