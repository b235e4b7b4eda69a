"""Faults under syncbn-launch (gloo and MPI): a rank that dies, raises or skips a layer while
the others wait inside a SyncBatchNorm collective ends the job with a clear report, fast."""
from __future__ import annotations

import re

import pytest

from conftest import requires_mpi
from launch_scripts.harness import SCRIPTS, run_launcher

BACKENDS = ["gloo", pytest.param("mpi", marks=[requires_mpi, pytest.mark.mpi])]
REACTION_S = 30  # from the fault to the launcher's exit


def _launch(backend: str, nprocs: int, mode: str):
    result = run_launcher("--nprocs", str(nprocs), "--backend", backend,
                          str(SCRIPTS / "sbn_check.py"), mode)
    assert result.fault_time() is not None, result
    assert result.ended - result.fault_time() < REACTION_S, result
    assert "terminate called" not in result.stderr, result
    return result, result.stderr[result.stderr.index("syncbn-launch: job failed"):]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_killed_by_sigkill_mid_forward_ends_the_job(backend):
    result, report = _launch(backend, 2, "sigkill")
    assert result.returncode == 128 + 9, result
    assert report.startswith("syncbn-launch: job failed (exit status 137): "
                             "rank 1 was killed by SIGKILL"), result


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_raising_inside_forward_ends_the_job_with_its_exception(backend):
    result, report = _launch(backend, 2, "raise")
    assert result.returncode == 1, result
    assert "rank 1 exited with code 1" in report
    assert "ValueError: boom inside forward on rank 1" in report  # the rank's own tail


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_layer_raises_the_guard_error_on_every_rank(backend):
    result, report = _launch(backend, 2, "skip-layer")
    assert result.returncode == 1, result
    for rank in range(2):
        assert re.search(rf"^\[rank{rank}\] .*CollectiveMismatchError: SyncBatchNorm\(4\) "
                         rf"'bn[12]': rank {rank} is about to issue", result.stderr, re.M), result
    assert "CollectiveMismatchError" in report
