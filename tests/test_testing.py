"""syncbn.testing: results come back, errors are re-raised, stalled and dead ranks are named."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import syncbn
from conftest import BACKENDS
from syncbn.testing import RankFailure, RemoteTraceback, run_on_ranks


def _rank_and_sum() -> tuple:
    comm = syncbn.resolve_communicator()
    total = comm.all_reduce_sum_(torch.tensor([float(comm.rank + 1)]))
    return comm.rank, comm.size, total.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_come_back_in_rank_order(rank_pool, backend):
    assert rank_pool(3, backend).run(_rank_and_sum) == [(r, 3, 6.0) for r in range(3)]


def _raise_on_rank_one() -> int:
    if syncbn.resolve_communicator().rank == 1:
        raise KeyError("bad key on rank one")
    return 0


def test_a_rank_exception_is_reraised_with_its_rank_and_traceback(rank_pool):
    with pytest.raises(KeyError, match="bad key on rank one") as info:
        rank_pool(2, "gloo").run(_raise_on_rank_one)
    assert "raised on rank 1" in "".join(info.value.__notes__)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_raise_on_rank_one" in str(info.value.__cause__)
    assert rank_pool(2, "gloo").run(_rank_and_sum)[1] == (1, 2, 3.0)  # the pool still works


def _rank_zero_waits_alone() -> int:
    comm = syncbn.resolve_communicator()
    if comm.rank == 0:
        comm.all_reduce_sum_(torch.zeros(1))  # rank 1 never joins
    return comm.rank


def test_a_stalled_rank_fails_the_call_naming_it_and_all_ranks_are_killed():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[0\] did not finish within 5 s") as info:
        run_on_ranks(_rank_zero_waits_alone, 2, timeout=5)
    assert time.monotonic() - started < 60
    where = str(info.value).split("--- rank 0: where it was ---", 1)[1]
    assert re.search(r'test_testing\.py", line \d+ in _rank_zero_waits_alone', where)
    assert "in all_reduce" in where and "_rank_worker" not in where


def test_gather_says_how_each_rank_ended_without_raising(rank_pool):
    pool = rank_pool(2, "gloo")
    returned, raised = pool.gather(_raise_on_rank_one)
    assert (returned.rank, returned.status, returned.value) == (0, "returned", 0)
    assert (raised.rank, raised.status) == (1, "raised")
    assert isinstance(raised.value, KeyError) and "_raise_on_rank_one" in raised.detail
    assert not pool.closed


_ORPHANED_RANKS = """
import os, signal, sys, threading, time
from syncbn.testing import RankPool

pool = RankPool(2, "gloo")
print(*pool.run(os.getpid), flush=True)
threading.Thread(target=pool.run, args=(time.sleep, 600), daemon=True).start()
time.sleep(1)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the ranks are on their own
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_ranks_busy_in_a_call_end_when_the_pool_process_is_killed():
    done = subprocess.run([sys.executable, "-c", _ORPHANED_RANKS], capture_output=True, text=True, timeout=300)
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2, done.stdout + done.stderr
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # leave the machine clean even when the check fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def _rank_one_dies() -> int:
    comm = syncbn.resolve_communicator()
    if comm.rank == 1:
        os._exit(3)
    comm.all_reduce_sum_(torch.zeros(1))
    return comm.rank


def test_a_dead_rank_fails_the_call_fast_with_its_exit_code():
    started = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 exited with code 3"):
        run_on_ranks(_rank_one_dies, 2, timeout=60)
    assert time.monotonic() - started < 30


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        run_on_ranks(_rank_and_sum, 2, backend="tcp")
