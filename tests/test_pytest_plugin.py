"""syncbn.pytest_plugin, tested with pytest's own pytester: inner sessions run marked tests.

Each inner session starts its own rank pools, so the scenarios are grouped: one session for
results and formatting (a pytest subprocess, as a user runs it), one for hangs and exits, one
over MPI, one for selection options. Inner tests write "name rank pid" lines to pids.txt,
which tells which ranks ran each test.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest

from conftest import requires_mpi
from syncbn.pytest_plugin import SESSION_PLUGIN_NAME

pytest_plugins = "pytester"

PLUGIN = ("-p", "syncbn.pytest_plugin")
# Inner sessions in this process re-import (and assertion-rewrite) hypothesis's plugin package
# each time: seconds each, for nothing here (and in a subprocess, the import alone).
WITHOUT_HYPOTHESIS = ("-p", "no:hypothesispytest")
REPO = Path(__file__).resolve().parents[1]

# Shared by the inner test files: where each rank ran, and whether a process is still alive.
HELPERS = '''
import os, pathlib, time
import pytest, torch, torch.distributed as dist
import syncbn

PIDS = pathlib.Path(__file__).with_name("pids.txt")

def record(name, rank):
    with open(PIDS, "a") as out:
        out.write(f"{name} {rank} {os.getpid()}\\n")

def recorded(name):
    return [int(line.split()[2]) for line in PIDS.read_text().splitlines() if line.split()[0] == name]

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
'''


def _pids(folder: Path) -> Dict[str, Set[int]]:
    """name -> the pids of the ranks that recorded it (in the folder's pids.txt)."""
    pids: Dict[str, Set[int]] = {}
    for line in (folder / "pids.txt").read_text().splitlines():
        name, _, pid = line.split()
        pids.setdefault(name, set()).add(int(pid))
    return pids


def _failures(output: str) -> Dict[str, str]:
    """The failure report of each failed test in a terminal output, by test name."""
    failures = output.split("= FAILURES =", 1)[-1].split("short test summary info", 1)[0]
    parts = re.split(r"\n_{3,} (\S+) _{3,}\n", "\n" + failures)
    return dict(zip(parts[1::2], parts[2::2]))


def _call_reports(result: pytest.RunResult) -> Dict[str, pytest.TestReport]:
    return {report.nodeid.split("::")[-1]: report
            for report in result.reprec.getreports("pytest_runtest_logreport") if report.when == "call"}


# --- results: pass, fail on one rank, fail on all, skip, parametrize, pool reuse --------------

OUTCOMES = HELPERS + '''
@pytest.mark.ranks(2)                      # backend="gloo" (default) or "mpi"; timeout=120 s
def test_sum(rank, world_size):            # fixtures: this rank, the group size
    t = torch.full((1,), float(rank))
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))
    record("sum", rank)

@pytest.mark.ranks(2)
@pytest.mark.parametrize("value", [3, 5])
def test_parameters_and_tmp_path_reach_every_rank(rank, world_size, value, tmp_path):
    (tmp_path / f"rank{rank}").write_text(str(value))
    dist.barrier()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rank0", "rank1"]
    assert {path.read_text() for path in tmp_path.iterdir()} == {str(value)}
    assert isinstance(syncbn.resolve_communicator(), syncbn.TorchDistributedCommunicator)
    record(f"param{value}", rank)

class TestInAClass:
    @pytest.mark.ranks(3)
    def test_method(self, rank, world_size):
        assert world_size == 3 and dist.get_world_size() == 3 and rank == dist.get_rank()

@pytest.mark.ranks(2)
def test_fails_on_rank_one(rank):
    print(f"rank {rank} says hello")
    values = [rank, 1, 2]
    assert values == [0, 1, 2]

@pytest.mark.ranks(2)
def test_fails_on_every_rank(rank):
    assert rank + 10 == 7

@pytest.mark.ranks(2)
def test_keeps_the_ranks_after_a_failure_that_left_the_group_working(rank):
    record("after_failure", rank)
    dist.barrier()

@pytest.mark.ranks(2)
def test_skips_on_every_rank(rank):
    pytest.skip("not on these ranks")

@pytest.mark.ranks(2)
def test_skips_on_rank_zero_only(rank):
    if rank == 0:
        pytest.skip("only rank 0 skips")

@pytest.mark.ranks(2)
def test_breaks_its_group(rank):
    record("breaks", rank)
    if rank == 0:
        raise RuntimeError("rank 0 leaves before the collective")
    dist.barrier()

@pytest.mark.ranks(2)
def test_runs_on_fresh_ranks_after_a_broken_group(rank, world_size):
    record("after_broken", rank)
    assert not any(alive(pid) for pid in recorded("breaks"))
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world_size
'''


def _subprocess_env(**extra: str) -> Dict[str, str]:
    """This checkout's syncbn first on the path of a pytest run in a subprocess."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    """One pytest run, in a subprocess as a user runs it, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("outcomes")
    (folder / "test_outcomes.py").write_text(OUTCOMES)
    result = subprocess.run([sys.executable, "-m", "pytest", *PLUGIN, *WITHOUT_HYPOTHESIS, "-ra",
                             "-p", "no:cacheprovider", "--basetemp", str(folder / "tmp"), "test_outcomes.py"],
                            cwd=folder, env=_subprocess_env(COLUMNS="200"), capture_output=True, text=True,
                            timeout=600)
    return folder, result.stdout + result.stderr


def test_results_are_ordinary_pytest_results_naming_each_failing_rank(outcomes):
    folder, out = outcomes
    assert "== 4 failed, 6 passed, 1 skipped in " in out, out
    failures = _failures(out)

    one = failures["test_fails_on_rank_one"]
    assert one.startswith("on 2 gloo ranks: rank 1 failed, rank 0 passed")
    assert "rank 1: failed" in one and "rank 0: failed" not in one
    # pytest's rewritten assert: the source line, the values, and its comparison of the lists
    assert ">       assert values == [0, 1, 2]" in one
    assert "E       assert [1, 1, 2] == [0, 1, 2]" in one
    assert "At index 0 diff: 1 != 0" in one
    assert "test_outcomes.py:" in one and ": AssertionError" in one
    assert "Captured stdout+stderr (rank 1) call" in one and "rank 1 says hello" in one

    every = failures["test_fails_on_every_rank"]
    assert every.startswith("on 2 gloo ranks: ranks 0, 1 failed")
    assert "E       assert (0 + 10) == 7" in every and "E       assert (1 + 10) == 7" in every

    assert "FAILED test_outcomes.py::test_fails_on_rank_one - rank 1: assert [1, 1, 2] == [0, 1, 2]" in out
    assert "SKIPPED [1] test_outcomes.py:" in out and "not on these ranks" in out


def test_a_skip_on_some_ranks_only_fails_and_a_broken_group_gets_fresh_ranks(outcomes):
    folder, out = outcomes
    failures = _failures(out)
    mixed = failures["test_skips_on_rank_zero_only"]
    assert mixed.startswith("on 2 gloo ranks: rank 0 skipped, rank 1 passed")
    assert "only rank 0 skips" in mixed

    broken = failures["test_breaks_its_group"]
    assert broken.startswith("on 2 gloo ranks: rank 0 failed, rank 1 stalled")
    assert "RuntimeError: rank 0 leaves before the collective" in broken
    assert re.search(r"rank 1: still running after another rank failed, in barrier \(.*\); killed", broken)

    pids = _pids(folder)
    assert len(pids["sum"]) == 2
    # ranks reused across tests, and kept after a failure that left their group working ...
    assert pids["sum"] == pids["param3"] == pids["param5"] == pids["after_failure"] == pids["breaks"]
    # ... but replaced after a test that broke the group; the next test runs normally
    assert not pids["after_broken"] & pids["breaks"]


# --- hangs and early exits ---------------------------------------------------------------------

STALLS = HELPERS + '''
@pytest.mark.ranks(2, timeout=3)
def test_hangs_on_rank_one(rank):
    record("hang", rank)
    if rank == 1:
        time.sleep(600)
    dist.barrier()

@pytest.mark.ranks(2, timeout=3)
def test_rank_one_returns_early(rank):
    record("early", rank)
    if rank == 1:
        return
    dist.barrier()

@pytest.mark.ranks(2)
def test_rank_one_process_exits(rank):
    record("exit", rank)
    if rank == 1:
        print("rank 1 leaves now", flush=True)
        os._exit(3)
    dist.barrier()

@pytest.mark.ranks(2)
def test_next_test_runs_normally_on_fresh_ranks(rank, world_size):
    record("next", rank)
    earlier = recorded("hang") + recorded("early") + recorded("exit")
    assert earlier and not any(alive(pid) for pid in earlier)
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world_size
'''


def test_a_hang_or_early_exit_fails_within_the_timeout_naming_the_stalled_rank(pytester):
    pytester.makepyfile(test_stalls=STALLS)
    result = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "-ra")
    result.assert_outcomes(passed=1, failed=3)
    failures = _failures(result.stdout.str())
    reports = _call_reports(result)

    hang = failures["test_hangs_on_rank_one"]
    assert hang.startswith("on 2 gloo ranks: ranks 0, 1 stalled")
    assert re.search(r"rank 0: did not finish within 3 s, in barrier \(distributed_c10d\.py:\d+\); killed", hang)
    assert re.search(r"rank 1: did not finish within 3 s, in test_hangs_on_rank_one \(test_stalls\.py:\d+\)",
                     hang)
    assert reports["test_hangs_on_rank_one"].longrepr.reprcrash.message == "ranks 0, 1 did not finish within 3 s"

    early = failures["test_rank_one_returns_early"]
    assert early.startswith("on 2 gloo ranks: rank 0 stalled, rank 1 passed")
    assert re.search(r"rank 0: did not finish within 3 s, in barrier", early)

    exited = failures["test_rank_one_process_exits"]
    assert "rank 1 exited" in exited.splitlines()[0]
    assert "rank 1: its process exited with code 3" in exited and "rank 1 leaves now" in exited
    assert reports["test_rank_one_process_exits"].longrepr.reprcrash.message == \
        "rank 1: its process exited with code 3"

    for name in ("test_hangs_on_rank_one", "test_rank_one_returns_early"):
        assert 3 <= reports[name].duration < 3 + 10, (name, reports[name].duration)
    assert reports["test_rank_one_process_exits"].duration < 10
    pids = _pids(pytester.path)
    assert len(pids["hang"] | pids["early"] | pids["exit"] | pids["next"]) == 8  # fresh ranks each time


# --- MPI ---------------------------------------------------------------------------------------

OVER_MPI = HELPERS + '''
from mpi4py import MPI

@pytest.mark.ranks(2, backend="mpi")
def test_sum_over_mpi(rank, world_size):
    t = torch.full((1,), float(rank))
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))
    assert (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()) == (rank, world_size)
    assert MPI.COMM_WORLD.allreduce(rank) == sum(range(world_size))
    assert isinstance(syncbn.resolve_communicator(), syncbn.TorchDistributedCommunicator)

@pytest.mark.ranks(2, backend="mpi")
def test_fails_on_rank_one_over_mpi(rank):
    assert rank == 0

@pytest.mark.ranks(2, backend="mpi", timeout=3)
def test_hangs_over_mpi(rank):
    record("hang", rank)
    if rank == 1:
        time.sleep(600)
    dist.barrier()

@pytest.mark.ranks(2, backend="mpi")
def test_runs_normally_after_a_hang_over_mpi(rank, world_size):
    assert not any(alive(pid) for pid in recorded("hang"))
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world_size
'''


@requires_mpi
@pytest.mark.mpi
def test_mpi_ranks_have_a_torch_group_and_mpi_and_fail_hang_and_recover_like_gloo(pytester):
    pytester.makepyfile(test_over_mpi=OVER_MPI)
    result = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "-ra")
    result.assert_outcomes(passed=2, failed=2)
    failures = _failures(result.stdout.str())
    assert failures["test_fails_on_rank_one_over_mpi"].startswith("on 2 mpi ranks: rank 1 failed, rank 0 passed")
    assert "E       assert 1 == 0" in failures["test_fails_on_rank_one_over_mpi"]
    hang = failures["test_hangs_over_mpi"]
    assert re.search(r"rank 1: did not finish within 3 s, in test_hangs_over_mpi", hang)
    assert re.search(r"rank 0: did not finish within 3 s, in barrier", hang)


# --- selection options, and many tests on one pool ----------------------------------------------

SELECTION = HELPERS + '''
@pytest.mark.ranks(2)
def test_a_fails_on_rank_one(rank):
    expected = 0
    assert rank == expected

@pytest.mark.ranks(2)
def test_b_passes(rank):
    print(f"hello from {rank}")
    dist.barrier()

@pytest.mark.ranks(2)
@pytest.mark.parametrize("i", range(50))
def test_many(rank, world_size, i):
    t = torch.full((1,), float(i))
    dist.all_reduce(t)
    assert t.item() == i * world_size
    record("many", rank)
'''


def test_options_select_stop_and_format_as_usual_and_fifty_tests_share_one_pool(pytester):
    pytester.makepyfile(test_selection=SELECTION)
    selected = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "-k", "b_passes or many", "-s")
    selected.assert_outcomes(passed=51, deselected=1)
    assert len(_pids(pytester.path)["many"]) == 2  # 50 tests, the same two ranks
    assert "[rank0] hello from 0" in selected.stdout.str() and "[rank1] hello from 1" in selected.stdout.str()

    stopped = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "-x", "-l")
    stopped.assert_outcomes(failed=1)
    assert "stopping after 1 failures" in stopped.stdout.str()
    assert re.search(r"^expected\s+= 0$", stopped.stdout.str(), re.MULTILINE)  # -l: the rank's locals

    last_failed = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "--lf", "--tb=short")
    last_failed.assert_outcomes(failed=1)
    out = last_failed.stdout.str()
    assert "run-last-failure: rerun previous 1 failure" in out
    assert "FAILED test_selection.py::test_a_fails_on_rank_one" in out
    assert re.search(r"^test_selection\.py:\d+: in test_a_fails_on_rank_one$", out, re.MULTILINE)  # short
    assert "E   assert 1 == 0" in out and "@pytest.mark.ranks(2)" not in out


# --- misuse --------------------------------------------------------------------------------------

def test_misuse_is_reported_without_starting_ranks(pytester):
    pytester.makepyfile(test_misuse='''
        import threading, pytest

        def test_rank_without_the_marker(rank):
            pass

        @pytest.mark.ranks(0)
        def test_no_ranks():
            pass

        @pytest.mark.ranks(2, backend="tcp")
        def test_unknown_backend():
            pass

        @pytest.fixture
        def lock():
            return threading.Lock()

        @pytest.mark.ranks(2)
        def test_unpicklable_fixture(rank, lock):
            pass
    ''')
    class PoolsAtTheEnd:
        @pytest.hookimpl(tryfirst=True)  # before the plugin closes its pools
        def pytest_unconfigure(self, config):
            self.pools = dict(config.pluginmanager.get_plugin(SESSION_PLUGIN_NAME).pools)

    seen = PoolsAtTheEnd()
    result = pytester.runpytest(*PLUGIN, *WITHOUT_HYPOTHESIS, "-ra", plugins=[seen])
    result.assert_outcomes(errors=4)
    assert seen.pools == {}
    out = result.stdout.str()
    assert "the 'rank' fixture needs @pytest.mark.ranks(world_size) on the test" in out
    assert "@pytest.mark.ranks needs a world size >= 1, got 0" in out
    assert "@pytest.mark.ranks backend must be one of ('gloo', 'mpi'), got 'tcp'" in out
    assert "'lock' cannot be sent to the ranks of this @pytest.mark.ranks test" in out
    assert "Traceback" not in out


# --- registration and cost -------------------------------------------------------------------

def test_pyproject_declares_the_pytest11_entry_point_and_the_installed_metadata_agrees():
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as handle:
        declared = tomllib.load(handle)["project"]["entry-points"]["pytest11"]
    assert declared == {"syncbn": "syncbn.pytest_plugin"}
    entry_point = importlib.metadata.EntryPoint(name="syncbn", value=declared["syncbn"], group="pytest11")
    assert entry_point.load() is importlib.import_module("syncbn.pytest_plugin")
    # An install made before the entry point existed has none; once reinstalled, the same one.
    installed = {ep.name: ep.value for ep in importlib.metadata.distribution("syncbn").entry_points
                 if ep.group == "pytest11"}
    assert installed in ({}, declared)


REGISTRATION = '''
import sys

def test_registered_once(request):
    manager = request.config.pluginmanager
    module = sys.modules.get("syncbn.pytest_plugin")
    names = [name for name, plugin in manager.list_name_plugin() if plugin is module and module is not None]
    markers = [line for line in request.config.getini("markers") if line.startswith("ranks(")]
    print("REGISTERED", names, len(markers))
'''


@pytest.mark.parametrize("how, expected", [
    ((), "['syncbn'] 1"),
    (("-p", "syncbn.pytest_plugin"), "['syncbn.pytest_plugin'] 1"),
    (("conftest",), "['syncbn'] 1"),
    (("-p", "no:syncbn"), "[] 0"),
], ids=["entry-point", "entry-point-and-p", "entry-point-and-conftest", "disabled"])
def test_the_entry_point_and_an_explicit_load_register_the_plugin_once(pytester, monkeypatch, how, expected):
    # An installed distribution declaring the entry point, as pip writes it (importlib.metadata
    # finds it on sys.path), whether or not this machine's syncbn was installed with it.
    site = pytester.mkdir("site")
    info = site / "syncbn_entry_point_probe-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: syncbn-entry-point-probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nsyncbn = syncbn.pytest_plugin\n")
    monkeypatch.syspath_prepend(site)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    if how == ("conftest",):
        pytester.makeconftest('pytest_plugins = ["syncbn.pytest_plugin"]')
        how = ()
    pytester.makepyfile(test_registration=REGISTRATION)
    result = pytester.runpytest(*how, *WITHOUT_HYPOTHESIS, "-s")
    result.assert_outcomes(passed=1)
    assert f"REGISTERED {expected}" in result.stdout.str()


def test_loading_the_plugin_imports_neither_torch_nor_mpi4py_and_starts_nothing(pytester):
    pytester.makepyfile(test_cost='''
        import os, sys

        def parent_of(pid):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # ended meanwhile
                return None

        def test_nothing_heavy(request):
            assert request.config.pluginmanager.has_plugin("syncbn.pytest_plugin")
            assert "torch" not in sys.modules and "mpi4py" not in sys.modules
            assert [pid for pid in os.listdir("/proc") if pid.isdigit() and parent_of(pid) == os.getpid()] == []
    ''')
    result = subprocess.run([sys.executable, "-m", "pytest", *PLUGIN, "-q", "-p", "no:cacheprovider",
                             str(pytester.path)], env=_subprocess_env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"),
                            cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
