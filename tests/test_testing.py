"""syncbn.testing: results come back, errors are re-raised, stalled and dead ranks are named."""
from __future__ import annotations

import os
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
    with pytest.raises(RankFailure, match=r"rank\(s\) \[0\] did not finish within 5 s"):
        run_on_ranks(_rank_zero_waits_alone, 2, timeout=5)
    assert time.monotonic() - started < 60


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
