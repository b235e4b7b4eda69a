"""Process helpers shared by :mod:`syncbn.testing` and :mod:`syncbn.launch`; stdlib only.

Run by path (``python .../_processes.py mpi-rank|run-script|reap ...``) this file is also what
``syncbn-launch --backend mpi`` puts between mpiexec and each rank's script, and the watcher
that ends gloo/nccl ranks when the launcher dies; run so, it imports nothing from the
``syncbn`` package, whose import loads torch (seconds per process, for nothing).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run by path: syncbn's folder must not shadow any module imported below

import shutil
import signal
import socket
import subprocess
import threading
from typing import List, Optional

__all__ = ["BACKENDS", "find_mpiexec", "signal_group", "kill_session", "tail", "signal_name",
           "describe_exit", "exit_status", "MPI_INSTALL_HINT"]

# What the ranks of a job can synchronize over: torch.distributed's gloo or NCCL, or MPI.
BACKENDS = ("gloo", "nccl", "mpi")
# How to get mpi4py and the mpich wheel's mpiexec, for a syncbn installed from an index or a clone.
MPI_INSTALL_HINT = 'pip install "syncbn[mpi]" (in a clone of syncbn: pip install -e ".[mpi]")'


def find_mpiexec() -> Optional[str]:
    """The mpiexec next to this interpreter (the mpich wheel puts it there), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid``; a group that is gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session (it was started as a session leader)."""
    signal_group(process.pid, signal.SIGKILL)
    process.wait()


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file, or "" when it cannot be read."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_status(returncode: int) -> int:
    """The shell's exit status for a Popen-style return code: 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """Words for a Popen-style return code (negative: killed by that signal)."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    return f"exited with code {returncode}"


# --- the MPI rank wrapper ------------------------------------------------------------------
# Why a wrapper: mpich's hydra labels output per write(), not per line, and puts every rank in
# its own session, out of the launcher's reach. The wrapper runs the rank's command with its
# stdout and stderr connected straight to the launcher (sockets, so lines arrive whole through
# the launcher's own line reader), reports its process group and exit status, SIGKILLs the
# rank when the launcher asks (so that the status it reports is the signal the rank got), and
# ends the rank when the launcher goes away.

def _mpi_rank() -> int:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    raise SystemExit("syncbn-launch: the MPI rank wrapper found no PMI_RANK/OMPI_COMM_WORLD_RANK")


def _die_with_parent() -> None:
    # In the child, before exec: if the wrapper is killed (mpiexec aborting), so is the rank.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _connect_to_launcher(kind: str) -> socket.socket:
    """A channel to syncbn-launch, introduced by the job's token, this rank and its kind."""
    host, port = os.environ["SYNCBN_LAUNCH_ADDRESS"].rsplit(":", 1)
    channel = socket.create_connection((host, int(port)))
    channel.sendall(f"{os.environ['SYNCBN_LAUNCH_TOKEN']} {_mpi_rank()} {kind}\n".encode())
    return channel


def _run_mpi_rank(command: List[str]) -> int:
    out, err = _connect_to_launcher("out"), _connect_to_launcher("err")
    status = _connect_to_launcher("status")
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # lead a group, so one killpg from the launcher reaches the rank too
    # The launcher signals the whole group; the rank handles it, the wrapper only reports.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    # close_fds=False: the rank needs what mpiexec handed us (PMI_FD); our sockets are
    # non-inheritable, apart from the two made its stdout and stderr.
    child = subprocess.Popen(command, stdout=out.fileno(), stderr=err.fileno(), close_fds=False,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    out.close()
    err.close()
    status.sendall(f"pid {os.getpid()}\n".encode())

    finished, released = threading.Event(), threading.Event()

    def obey_launcher() -> None:
        # "kill": SIGKILL the rank alone, whose status then reaches the launcher as it would
        # for a gloo rank. End of file (released, or the launcher died): end the whole group.
        try:
            for line in status.makefile("rb"):
                if line.strip() == b"kill" and not finished.is_set():
                    child.kill()
        except OSError:
            pass
        released.set()
        if not finished.is_set():
            signal_group(os.getpid(), signal.SIGKILL)

    threading.Thread(target=obey_launcher, daemon=True).start()
    returncode = child.wait()
    finished.set()
    try:
        status.sendall(f"exit {returncode}\n".encode())
    except OSError:  # no launcher to tell: let mpiexec see the failure
        return exit_status(returncode)
    # Told. Stay until the launcher has stopped the job its own way: on our exit without
    # MPI_Finalize, mpiexec would SIGKILL every rank at once, cutting their last words.
    released.wait()
    return 0


def _run_script(argv: List[str]) -> None:
    """Run a script as ``python script args`` does, but leave at once on an uncaught error.

    A normal exit would call MPI_Finalize, which in MPICH waits for the ranks still blocked in
    a collective with this one: the job would hang instead of failing.
    """
    import runpy
    import traceback

    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or exit_.code == 0:
            _announce_finished()
            raise
        if not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    else:
        _announce_finished()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _announce_finished() -> None:
    """Tell the launcher that the script returned normally, before MPI_Finalize, which in MPICH
    waits for every other rank: a rank that returns while another still needs it then shows as
    finished, and the launcher's --exit-grace applies (the process itself is still alive)."""
    try:
        _connect_to_launcher("finished").close()
    except (OSError, KeyError):  # no launcher to tell (gone, or none): nothing to wait for
        pass


# --- the reaper of gloo/nccl ranks ------------------------------------------------------------
# Why a separate process: a launcher killed by SIGKILL runs no code, and its ranks (each in its
# own session, so that a Ctrl-C reaches the launcher only) would go on training, with their
# DataLoader workers. PR_SET_PDEATHSIG would reach the rank alone, not its children, and needs a
# preexec_fn, unsafe in the launcher's threads. The reaper runs in a session of its own, reads
# "group PID" lines from a pipe whose only writer is the launcher, and on end-of-file without
# "done" (the launcher died) SIGKILLs every process group it was told of: the rank and its
# children together.

def _reap_when_launcher_gone() -> None:
    groups = []
    for line in sys.stdin:
        word, _, value = line.partition(" ")
        if word == "done":
            return
        if word == "group" and value.strip().isdigit():
            groups.append(int(value))
    for pid in groups:
        signal_group(pid, signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mpi-rank"] and len(sys.argv) > 2:
        sys.exit(_run_mpi_rank(sys.argv[2:]))
    if sys.argv[1:2] == ["run-script"] and len(sys.argv) > 2:
        _run_script(sys.argv[2:])
    elif sys.argv[1:] == ["reap"]:
        _reap_when_launcher_gone()
    else:
        raise SystemExit("usage: _processes.py mpi-rank|run-script ARGS...|reap (run by syncbn-launch)")
