"""The fault matrix of issue 12: every fault path, over gloo and MPI, ends in a clear error.

For each row of the issue, a real job in which every rank ends within 30 s, with an error that
names the layer and what was wrong, the bad rank reporting its own error, no running statistic
changed, and no process of the job left behind.

Rows 1-3 and 7 are raised inside the ranks, which stay usable: they run in a RankPool, and a
collective that every rank answers afterwards shows that none is left waiting. Rows 4-6 are
about how whole jobs end: they run under syncbn-launch, a bare mpiexec, or as plain processes
with srun's variables. Every process of a job carries a tag in its environment; the tests scan
/proc for it once the job is over.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import syncbn
from conftest import BACKENDS, requires_mpi
from launch_scripts.harness import (LIMIT_S, ROOT, SCRIPTS, Finished, launcher_command,
                                    launcher_env, run_command, run_launcher)
from syncbn.testing import RankFailure, RankPool, find_mpiexec

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="scans /proc for survivors")

REACTION_S = 30  # from the fault to the end of every rank
TAG = "SYNCBN_FAULT_MATRIX_TAG"
FAULT_JOB = str(SCRIPTS / "fault_job.py")


# --- the process table ---------------------------------------------------------------------

def _tagged(tag: str) -> List[int]:
    """Pids of live processes whose environment holds TAG=tag (a scan of /proc)."""
    entry = f"{TAG}={tag}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    if entry in handle.read().split(b"\0"):
                        found.append(int(pid))
            except OSError:  # gone, or not ours to read
                pass
    return found


def _assert_nothing_left(tag: str) -> None:
    deadline = time.monotonic() + 10
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _tagged(tag)
    for pid in survivors:  # leave the machine clean even when the check fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert survivors == [], f"processes of the job still alive: {survivors}"


# --- rows raised inside the ranks: a RankPool ----------------------------------------------

@pytest.fixture(scope="module")
def fault_pool() -> Callable[[str], Tuple[RankPool, str]]:
    """``fault_pool(backend)``: a 2-rank pool whose processes carry a tag; replaced when closed."""
    pools: Dict[str, Tuple[RankPool, str]] = {}

    def get(backend: str) -> Tuple[RankPool, str]:
        if backend not in pools or pools[backend][0].closed:
            tag = uuid.uuid4().hex
            os.environ[TAG] = tag  # RankPool passes its own environment on to the ranks
            try:
                pools[backend] = (RankPool(2, backend, timeout=REACTION_S), tag)
            finally:
                del os.environ[TAG]
        return pools[backend]

    yield get
    for pool, tag in pools.values():
        pool.close()
        _assert_nothing_left(tag)


def _group_size() -> float:
    return syncbn.resolve_communicator().all_reduce_sum_(torch.ones(1, dtype=torch.float64)).item()


def _run_row(fault_pool, backend: str, fn: Callable[..., Any], *args: Any) -> List[Any]:
    """Every rank's result of ``fn``, within REACTION_S; then every rank answers a collective."""
    pool, tag = fault_pool(backend)
    try:
        results = pool.run(fn, *args, timeout=REACTION_S)
        assert pool.run(_group_size, timeout=REACTION_S) == [2.0, 2.0]  # none left waiting
    except RankFailure:  # a rank stalled or died: the pool has killed every rank
        _assert_nothing_left(tag)
        raise
    return results


def _rank() -> int:
    return syncbn.resolve_communicator().rank


def _outcome(step: Callable[[], Any], layers: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    """What a training step did on this rank: its error, and whether running stats changed."""
    def buffers() -> List[torch.Tensor]:
        return [buffer.clone() for layer in layers for buffer in layer.buffers()]

    before = buffers()
    try:
        step()
        error = None
    except Exception as exc:  # reported to the test, which checks every rank's error
        error = exc
    return {"type": type(error).__name__ if error else None,
            "collective_error": isinstance(error, syncbn.CollectiveError),
            "message": str(error) if error else "",
            "stats_unchanged": all(torch.equal(a, b) for a, b in zip(before, buffers()))}


def _stat_free_layer_gets_bad_input(kind: str) -> Dict[str, Any]:
    free = syncbn.SyncBatchNorm(4, affine=False, track_running_stats=False, name="free")
    tracked = syncbn.SyncBatchNorm(4, name="tracked")  # runs after: must not run at all
    x = torch.randn(3, 4, 2)
    if _rank() == 1:
        x = torch.randn(3, 5, 2) if kind == "channels" else torch.randn(4)
    return _outcome(lambda: tracked(free(x)), [tracked])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, problem", [("channels", "4 channels"), ("1-D", "1-D")])
def test_row1_bad_input_to_a_layer_without_parameters_or_buffers_raises_on_every_rank(
        fault_pool, backend, kind, problem):
    good, bad = _run_row(fault_pool, backend, _stat_free_layer_gets_bad_input, kind)
    assert bad["type"] == "ValueError", bad  # the bad rank's own error, not a collective one
    assert "free" in bad["message"] and problem in bad["message"], bad
    assert good["collective_error"] and "free" in good["message"], good
    assert "invalid input" in good["message"], good
    assert good["stats_unchanged"] and bad["stats_unchanged"]


def _guarded_layer_gets_bad_input(dtype: str) -> Dict[str, Any]:
    layer = syncbn.SyncBatchNorm(4, name="guarded", debug=True)  # fp32 parameters, as with AMP
    x = torch.randn(3, 5 if _rank() == 1 else 4, 2).to(getattr(torch, dtype))
    return _outcome(lambda: layer(x), [layer])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_row2_debug_guard_lets_the_bad_ranks_own_error_through_for_every_input_dtype(
        fault_pool, backend, dtype):
    good, bad = _run_row(fault_pool, backend, _guarded_layer_gets_bad_input, dtype)
    assert bad["type"] == "ValueError", bad  # not CollectiveMismatchError
    assert "guarded" in bad["message"] and "4 channels" in bad["message"], bad
    assert good["collective_error"] and good["type"] != "CollectiveMismatchError", good
    assert "guarded" in good["message"] and "invalid input" in good["message"], good
    assert good["stats_unchanged"] and bad["stats_unchanged"]


def _rank_1_skips_an_unnamed_layer() -> Dict[str, Any]:
    first = syncbn.SyncBatchNorm(4, debug=True)  # built directly: no name
    second = syncbn.SyncBatchNorm(4, debug=True)
    x = torch.randn(3, 4, 2)
    step = (lambda: second(second(x))) if _rank() == 1 else (lambda: second(first(x)))
    return _outcome(step, [first, second])


@pytest.mark.parametrize("backend", BACKENDS)
def test_row3_debug_guard_tells_unnamed_layers_of_the_same_width_apart(fault_pool, backend):
    for outcome in _run_row(fault_pool, backend, _rank_1_skips_an_unnamed_layer):
        assert outcome["type"] == "CollectiveMismatchError", outcome
        assert "SyncBatchNorm(4)" in outcome["message"], outcome
        assert outcome["stats_unchanged"], outcome


def _forward_inside_backward(how: str) -> Dict[str, float]:
    rank = _rank()
    torch.manual_seed(0)  # every rank draws every rank's batch
    batches = [torch.randn(3 + 2 * r, 4, 5, dtype=torch.float64) * 2 + 1 for r in range(2)]
    layer = syncbn.SyncBatchNorm(4, dtype=torch.float64, name="inner")
    if how == "backward-hook":  # a real training forward that happens to run inside backward
        trigger = torch.zeros(1, requires_grad=True)
        doubled = trigger * 2

        def run_layer(grad: torch.Tensor) -> None:
            layer(batches[rank])

        doubled.register_hook(run_layer)
        doubled.sum().backward()
    else:  # the forward runs twice: once, then recomputed inside backward
        x = batches[rank].clone().requires_grad_()
        checkpoint(layer, x, use_reentrant=how == "reentrant-checkpoint").sum().backward()
    reference = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    reference(torch.cat(batches))
    return {"mean_error": (layer.running_mean - reference.running_mean).abs().max().item(),
            "var_error": (layer.running_var - reference.running_var).abs().max().item(),
            "updates": int(layer.num_batches_tracked)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["backward-hook", "checkpoint", "reentrant-checkpoint"])
def test_row7_running_stats_update_once_per_step_also_when_the_forward_runs_in_backward(
        fault_pool, backend, how):
    for result in _run_row(fault_pool, backend, _forward_inside_backward, how):
        assert result["updates"] == 1, result
        assert result["mean_error"] < 1e-12 and result["var_error"] < 1e-12, result


# --- rows about whole jobs: syncbn-launch, bare mpiexec, srun's environment -----------------

def _job(run: Callable[..., Finished], *args: Any, **env: str) -> Finished:
    """Run a job whose processes carry a fresh tag; check the reaction time and the survivors."""
    tag = uuid.uuid4().hex
    result = run(*args, **{TAG: tag}, **env)
    _assert_nothing_left(tag)
    assert result.fault_time() is not None, result
    assert result.ended - result.fault_time() < REACTION_S, result
    return result


def _mpiexec(*args: str) -> List[str]:
    return [find_mpiexec(), "-n", "2", sys.executable, *args]


def _summary(result: Finished) -> str:
    return result.stderr[result.stderr.index("syncbn-launch: job failed"):]


def _ranks_that_ended_on_their_own(summary: str) -> List[int]:
    """The ranks the launcher did not stop: on a loaded machine a slow rank can still be
    starting when the first one fails, and is then stopped before reaching the fault."""
    ended = [rank for rank in range(2)
             if not re.search(rf"rank {rank} was killed by SIG(TERM|KILL)", summary)]
    assert ended, summary  # the first rank to fail always did
    return ended


def test_row4_gloo_an_uncaught_exception_on_one_rank_ends_the_job():
    result = _job(run_launcher, "--nprocs", "2", FAULT_JOB, "uncaught")
    assert result.returncode == 1, result
    assert "rank 1 raised ValueError: rank 1: a broken batch, uncaught" in _summary(result)
    assert "step 2 done" not in result.stdout, result  # no rank went on without rank 1


@requires_mpi
@pytest.mark.mpi
def test_row4_mpi_an_uncaught_exception_under_a_bare_mpiexec_aborts_the_job():
    # SYNCBN_TIMEOUT stays at its default (1800 s): only the abort can end the job in time.
    result = _job(run_command, _mpiexec(FAULT_JOB, "uncaught"))
    assert result.returncode != 0, result
    assert "ValueError: rank 1: a broken batch, uncaught" in result.stderr, result
    # syncbn's own line (MPICH's "MPI_Abort(...)" line can be lost in mpiexec's teardown).
    assert "syncbn: uncaught ValueError on MPI rank 1: aborting every rank of the job" in result.stderr, result
    assert "step 2 done" not in result.stdout, result


@requires_mpi
@pytest.mark.mpi
def test_row4_mpi_after_init_distributed_an_uncaught_exception_under_a_bare_mpiexec_aborts_the_job():
    """init_distributed builds a gloo group under MPI, so syncbn never creates its MPI
    communicator; init_distributed itself makes an uncaught exception abort the MPI job. Rank 0
    works on without noticing (a sleep, as a rank in an NCCL collective would): only the abort
    can end the job in time."""
    result = _job(run_command, _mpiexec(FAULT_JOB, "uncaught-after-init"))
    assert result.returncode != 0, result
    assert "ValueError: rank 1: a broken batch, uncaught" in result.stderr, result
    assert "syncbn: uncaught ValueError on MPI rank 1: aborting every rank of the job" in result.stderr, result
    assert "step 2 done" not in result.stdout, result


def test_row5_gloo_a_launched_script_that_never_initializes_a_group_raises_on_every_rank():
    result = _job(run_launcher, "--nprocs", "2", FAULT_JOB, "forget-init")
    assert result.returncode == 1, result
    summary = _summary(result)
    ended = _ranks_that_ended_on_their_own(summary)
    for rank in ended:
        assert f"[rank{rank}] rank {rank}: running statistics unchanged: True" in result.stdout
    # the same error on both ranks: shown once, from the first rank that ended
    raised = re.findall(r"^rank (\d) raised RuntimeError: (.*)$", summary, re.M)
    assert len(raised) == 1 and int(raised[0][0]) in ended, summary
    error = raised[0][1]
    assert error.startswith("SyncBatchNorm(4) 'fault.bn': "), summary
    assert "WORLD_SIZE=2" in error, summary
    assert "torch.distributed.init_process_group(" in error, summary
    assert "syncbn.init_distributed()" in error, summary
    if len(ended) == 2:
        assert f"rank(s) {1 - int(raised[0][0])} raised the same\n" in summary, summary
    assert summary.count(error) == 2, summary  # the exception line and its traceback's last line


@requires_mpi
@pytest.mark.mpi
def test_row5_mpi_the_mpi_world_is_found_from_the_environment_even_with_world_size_set():
    result = _job(run_command, _mpiexec(FAULT_JOB, "forget-init"), WORLD_SIZE="2")
    assert result.returncode == 0, result
    # mpiexec does not keep the ranks' lines whole: find the numbers, not the lines
    errors = [float(found) for found in
              re.findall(r"against the global batch (\d\.\de[-+]\d\d)", result.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-12, result


def test_row5_srun_tasks_that_never_initialize_a_group_raise_on_every_rank():
    tag = uuid.uuid4().hex
    tasks = [subprocess.Popen([sys.executable, FAULT_JOB, "forget-init"], cwd=ROOT,
                              env=launcher_env(**{TAG: tag}, SLURM_STEP_NUM_TASKS="2",
                                               SLURM_PROCID=str(rank)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [task.communicate(timeout=LIMIT_S) for task in tasks]
    _assert_nothing_left(tag)
    for rank, (task, (out, err)) in enumerate(zip(tasks, outputs)):
        assert task.returncode == 1, out + err
        assert f"rank {rank}: running statistics unchanged: True" in out
        assert "RuntimeError: SyncBatchNorm(4) 'fault.bn': " in err, err
        assert "SLURM_STEP_NUM_TASKS=2, set by srun" in err and "init_process_group(" in err, err


@pytest.mark.parametrize("backend", ["gloo", pytest.param("mpi", marks=[requires_mpi, pytest.mark.mpi])])
def test_row6_sigkill_of_the_launcher_leaves_no_rank_or_child_of_a_rank_behind(backend):
    tag = uuid.uuid4().hex
    launcher = subprocess.Popen(
        launcher_command("--nprocs", "2", "--backend", backend, str(SCRIPTS / "tiny.py"), "hang",
                         tag),
        cwd=ROOT, env=launcher_env(**{TAG: tag}), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    ready = threading.Semaphore(0)

    def read() -> None:
        for line in launcher.stdout:
            if " ready " in line:  # the rank and its grandchild (a DataLoader worker) run
                ready.release()

    threading.Thread(target=read, daemon=True).start()
    try:
        for _ in range(2):
            assert ready.acquire(timeout=LIMIT_S), "a rank never started"
        launcher.kill()
        assert launcher.wait(10) == -signal.SIGKILL
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        _assert_nothing_left(tag)


# --- a rank that finishes normally while another still needs it: --exit-grace ----------------

EXIT_GRACE = "2"
STALLED = ("rank 1 finished normally but rank(s) [0] still ran 2 s later (--exit-grace), taken "
           "to be waiting for it")


@requires_mpi
@pytest.mark.mpi
def test_mpi_a_rank_that_returns_while_another_waits_for_it_ends_the_job_after_the_exit_grace():
    # Without the grace: rank 1 waits in MPI_Finalize, rank 0 in the collective, until
    # SYNCBN_TIMEOUT (1800 s).
    result = _job(run_launcher, "--nprocs", "2", "--backend", "mpi", "--exit-grace", EXIT_GRACE,
                  FAULT_JOB, "return-early")
    assert result.returncode == 124, result
    assert _summary(result).startswith(f"syncbn-launch: job failed (exit status 124): {STALLED}"), result
    assert "rank 1: done" in result.stdout and "rank 0: done" not in result.stdout, result


def test_gloo_a_rank_that_exits_0_before_the_group_exists_ends_the_job_after_the_exit_grace():
    # Without the grace: rank 0 waits in the rendezvous for the store's timeout (30 min).
    result = _job(run_launcher, "--nprocs", "2", "--exit-grace", EXIT_GRACE, FAULT_JOB,
                  "exit-before-group")
    assert result.returncode == 124, result
    assert _summary(result).startswith(f"syncbn-launch: job failed (exit status 124): {STALLED}"), result


@pytest.mark.parametrize("backend", ["gloo", pytest.param("mpi", marks=[requires_mpi, pytest.mark.mpi])])
def test_ranks_that_finish_apart_after_their_last_collective_succeed_within_the_default_grace(backend):
    tag = uuid.uuid4().hex
    result = run_launcher("--nprocs", "2", "--backend", backend, FAULT_JOB, "finish-apart", **{TAG: tag})
    _assert_nothing_left(tag)
    assert result.returncode == 0, result
    assert "[rank0] rank 0: done" in result.stdout and "[rank1] rank 1: done" in result.stdout


@pytest.mark.parametrize("backend, status", [
    ("gloo", 1),  # raised, then SIGABRT: the exception's status, not the abort's
    pytest.param("mpi", 1, marks=[requires_mpi, pytest.mark.mpi]),
])
def test_row6_the_summary_shows_each_ranks_own_exception_and_prefixes_are_not_doubled(
        backend, status):
    result = _job(run_launcher, "--nprocs", "2", "--backend", backend, FAULT_JOB,
                  "mismatch-then-abort")
    assert result.returncode == status, result
    summary = _summary(result)
    if backend == "gloo":  # both raised, then died by SIGABRT as gloo's terminate does
        assert "was killed by SIGABRT" in summary.splitlines()[0], summary
    layers = {0: "fault.bn", 1: "fault.second"}  # each rank names the layer it was calling
    for rank in _ranks_that_ended_on_their_own(summary):
        layer = layers[rank]
        assert (f"rank {rank} raised syncbn.guard.CollectiveMismatchError: SyncBatchNorm(4) "
                f"'{layer}': rank {rank} is about to issue") in summary, summary
        assert f"[rank{rank}] Traceback (most recent call last):" in result.stderr, result
    assert not re.search(r"\[rank\d\] \[rank\d\]", result.stderr), result
