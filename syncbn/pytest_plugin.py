"""pytest plugin: ``@pytest.mark.ranks(n)`` runs a test on n rank processes.

::

    @pytest.mark.ranks(2)                      # backend="gloo" (default) or "mpi"; timeout=120 s
    def test_sum(rank, world_size):            # fixtures: this rank, the group size
        t = torch.full((1,), float(rank))
        dist.all_reduce(t)
        assert t.item() == sum(range(world_size))

Registered when syncbn is installed (entry point ``pytest11``, name ``syncbn``); elsewhere,
``-p syncbn.pytest_plugin``. The test function runs on every rank of a
:class:`syncbn.testing.RankPool`, kept per (world size, backend) across tests, with
torch.distributed initialized: over gloo, or for ``backend="mpi"`` a gloo group whose
rendezvous goes over MPI (the ranks run under mpiexec, and ``MPI.COMM_WORLD`` is ready).
syncbn's default group is that group.

- Fixtures are set up here, in the pytest process, as for any test; their values (and the
  parameters of ``@pytest.mark.parametrize``) are pickled to every rank, so ``tmp_path`` is
  the same folder on every rank. ``rank`` and ``world_size`` are filled in on each rank.
- The ranks import the test module with pytest's assertion rewriting; a failing rank's
  traceback comes back formatted by pytest (``--tb``, ``-l``, ``-v`` apply) and the test fails
  naming every rank that failed, stalled or exited, each with its own traceback, stack or
  output. ``pytest.skip`` on every rank skips the test.
- A rank still running at the timeout, or a few seconds after another rank failed, is
  reported with its Python stack, and every rank of the pool is killed: the next test gets
  fresh ranks. After a failure on ranks that all answered, they are kept if their group still
  completes a collective.
- Ranks are reused: a test should leave global state (seeds, default dtype, environment) as
  it found it. Fixtures and ``monkeypatch`` act in the pytest process, not on the ranks.

Loading this module imports neither torch nor mpi4py: a session without the marker starts
nothing.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import pytest
from _pytest._code.code import ReprFileLocation, TerminalRepr

from ._pytest_rank import (RankPassed, RankTest, RankTestOutcome, group_answers,
                           join_torch_group_over_mpi, read_text, run_test, settings_of)

if TYPE_CHECKING:
    from .testing import RankOutcome, RankPool

MARKER = "ranks"
BACKENDS = ("gloo", "mpi")
DEFAULT_TIMEOUT_S = 120.0
# The names this module can be registered under: the entry point's, and its own (-p, pytest_plugins).
_PLUGIN_NAMES = ("syncbn", __name__)
# The name of this session's _RanksSession (config.pluginmanager.get_plugin(SESSION_PLUGIN_NAME)).
SESSION_PLUGIN_NAME = "syncbn-ranks"
# Fixtures whose values are set on each rank rather than sent from here.
_RANK_FIXTURES = ("rank", "world_size")
# What a marked item's ranks get, built at its setup.
_RANK_TEST = pytest.StashKey[RankTest]()
# How long the group of a pool gets to answer a probe after a failed test before it is replaced.
_PROBE_TIMEOUT_S = 10.0


# --- the marker --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RanksSpec:
    """What ``@pytest.mark.ranks(world_size, backend="gloo", timeout=120)`` asks for."""

    world_size: int
    backend: str = "gloo"
    timeout: float = DEFAULT_TIMEOUT_S

    @classmethod
    def of(cls, item: pytest.Item) -> Optional["RanksSpec"]:
        """The item's marker, validated; None when it has none."""
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            return None
        try:
            spec = cls(*marker.args, **marker.kwargs)
        except TypeError as error:
            pytest.fail(f"@pytest.mark.ranks(world_size, backend='gloo', timeout=120): {error}", pytrace=False)
        if isinstance(spec.world_size, bool) or not isinstance(spec.world_size, int) or spec.world_size < 1:
            pytest.fail(f"@pytest.mark.ranks needs a world size >= 1, got {spec.world_size!r}", pytrace=False)
        if spec.backend not in BACKENDS:
            pytest.fail(f"@pytest.mark.ranks backend must be one of {BACKENDS}, got {spec.backend!r}",
                        pytrace=False)
        if isinstance(spec.timeout, bool) or not isinstance(spec.timeout, (int, float)) or spec.timeout <= 0:
            pytest.fail(f"@pytest.mark.ranks timeout must be a positive number of seconds, "
                        f"got {spec.timeout!r}", pytrace=False)
        return spec


# --- registration --------------------------------------------------------------------------------

def pytest_plugin_registered(plugin: object, plugin_name: str, manager: Any) -> None:
    """Registered under one of its names, block the other, so it is never registered twice.

    pytest loads the installed entry point (name "syncbn") after ``-p`` options and before
    conftest ``pytest_plugins``; the same module under a second name would make it raise
    "Plugin already registered under a different name".
    """
    if plugin is sys.modules[__name__]:
        for name in _PLUGIN_NAMES:
            if name != plugin_name and manager.get_plugin(name) is None:
                manager.set_blocked(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(world_size, backend='gloo', timeout={DEFAULT_TIMEOUT_S:g}): run the test "
        "on world_size rank processes with torch.distributed initialized (backend 'gloo', or "
        "'mpi': under mpiexec); fixtures 'rank' and 'world_size' (syncbn.pytest_plugin)")
    if not config.pluginmanager.has_plugin(SESSION_PLUGIN_NAME):
        config.pluginmanager.register(_RanksSession(config), SESSION_PLUGIN_NAME)


class _RankOnlyOnTheRanks:
    """The value of the ``rank`` fixture in the pytest process: each rank gets its own number."""

    def _refuse(self, *_: Any) -> Any:
        raise TypeError("the 'rank' fixture is only known on the ranks: use it in the body of the "
                        "@pytest.mark.ranks test, not in a fixture (fixtures run in the pytest process)")

    __index__ = __int__ = __float__ = __bool__ = _refuse

    def __repr__(self) -> str:
        return "<rank: set on each rank>"


def _spec_for_fixture(request: pytest.FixtureRequest, name: str) -> RanksSpec:
    spec = RanksSpec.of(request.node)
    if spec is None:
        pytest.fail(f"the {name!r} fixture needs @pytest.mark.ranks(world_size) on the test", pytrace=False)
    return spec


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> Any:
    """This rank's number, 0 .. world_size-1 (a @pytest.mark.ranks test only)."""
    _spec_for_fixture(request, "rank")
    return _RankOnlyOnTheRanks()


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """The number of ranks of a @pytest.mark.ranks test."""
    return _spec_for_fixture(request, "world_size").world_size


# --- in the pytest process -------------------------------------------------------------------

class RanksFailed(Exception):
    """A @pytest.mark.ranks test failed; ``longrepr`` is its report, one section per rank."""

    def __init__(self, longrepr: "RanksFailureRepr"):
        super().__init__(str(longrepr))
        self.longrepr = longrepr


class RanksFailureRepr(TerminalRepr):
    """The failure of a test on ranks: a summary line, then what each rank did."""

    def __init__(self, summary: str, sections: List[Tuple[str, Any]], reprcrash: ReprFileLocation):
        self.summary = summary
        self.sections = sections
        self.reprcrash = reprcrash

    def toterminal(self, tw: Any) -> None:
        tw.line(self.summary, red=True, bold=True)
        for title, body in self.sections:
            tw.sep("-", title)
            if isinstance(body, str):
                for line in body.rstrip("\n").splitlines():
                    tw.line(line)
            else:
                body.toterminal(tw)


def _keep_if_group_answers(pool: "RankPool") -> None:
    """After a test failed on ranks that all answered: keep them if their group still works.

    A rank that raised mid-way may have left the group out of step; then the probe fails or
    stalls, and the pool is closed (gather closes it on a stall): the next test gets fresh ranks.
    """
    outcomes = pool.gather(group_answers, timeout=_PROBE_TIMEOUT_S)
    if not pool.closed and any(o.status != "returned" or o.value != pool.world_size for o in outcomes):
        pool.close()


class _RanksSession:
    """This session's rank pools, and the hooks that run marked tests on them."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.pools: Dict[Tuple[int, str], "RankPool"] = {}
        self._output_dir: Optional[str] = None

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Once the fixtures are set up: what the ranks get (its values must pickle), then the
        ranks themselves, so that their start-up is not counted as the test's."""
        spec = RanksSpec.of(item)
        if spec is not None:
            item.stash[_RANK_TEST] = self._rank_test(item, spec)
            self.pool(spec.world_size, spec.backend, spec.timeout)

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> Optional[bool]:
        spec = RanksSpec.of(pyfuncitem)
        if spec is None:
            return None
        self._run(pyfuncitem, spec)
        return True

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if call.excinfo is not None and isinstance(call.excinfo.value, RanksFailed) and report.failed:
            report.longrepr = call.excinfo.value.longrepr

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        if self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)

    # -- running one test

    def _run(self, item: pytest.Function, spec: RanksSpec) -> None:
        pool = self.pool(spec.world_size, spec.backend, spec.timeout)
        outcomes = pool.gather(run_test, item.stash[_RANK_TEST], timeout=spec.timeout)
        self._report_output(item, outcomes)
        statuses = {self._status(o) for o in outcomes}
        if statuses == {"passed"}:
            if not all(o.value.group_intact for o in outcomes):
                pool.close()  # the test took the group down: fresh ranks for the next one
            return
        if not pool.closed and statuses != {"skipped"}:
            _keep_if_group_answers(pool)
        if statuses == {"skipped"}:
            raise _skip(outcomes[0].value.reason)
        if statuses == {"xfailed"}:
            pytest.xfail(outcomes[0].value.reason)
        raise RanksFailed(self._failure_repr(item, spec, outcomes))

    def _rank_test(self, item: pytest.Function, spec: RanksSpec) -> RankTest:
        names = [name for name in item._fixtureinfo.argnames if name not in _RANK_FIXTURES]
        arguments = {name: item.funcargs[name] for name in names}
        try:
            blob = pickle.dumps(arguments)
        except Exception:
            for name, value in arguments.items():
                try:
                    pickle.dumps(value)
                except Exception as error:
                    pytest.fail(f"{name!r} cannot be sent to the ranks of this @pytest.mark.ranks test: "
                                f"{type(error).__name__}: {error} (fixture values and parameters must "
                                "pickle)", pytrace=False)
            raise
        config = item.config
        return RankTest(
            module_name=item.module.__name__,
            module_path=str(item.path),
            class_name=item.cls.__qualname__ if item.cls is not None else None,
            function_name=item.originalname,
            arguments=blob,
            rank_fixtures=tuple(name for name in _RANK_FIXTURES if name in item._fixtureinfo.argnames),
            world_size=spec.world_size,
            sys_path=list(sys.path),
            cwd=os.getcwd(),
            output_dir=self._outputs(),
            rewrite=config.getoption("assertmode", "rewrite") == "rewrite",
            python_files=list(config.getini("python_files")),
            settings=settings_of(config),
        )

    def _outputs(self) -> str:
        if self._output_dir is None:
            self._output_dir = tempfile.mkdtemp(prefix="syncbn-ranks-output-")
        return self._output_dir

    def pool(self, world_size: int, backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT_S) -> "RankPool":
        """This session's started pool for (world_size, backend), as marked tests get it.

        Its group's own collective timeout outlasts ``timeout`` (a pool started for a shorter
        one is replaced), so that a stall is reported here, with every rank's state, rather
        than by gloo on one rank. Usable by a suite's own fixtures (the ranks of a gloo pool
        are those of ``run_on_ranks``; an "mpi" pool also has a torch.distributed group).
        """
        from .testing import RankFailure, RankPool, find_mpiexec

        pool = self.pools.get((world_size, backend))
        if pool is not None and not pool.closed and pool.timeout >= timeout:
            return pool
        if pool is not None:
            pool.close()
        if backend == "mpi" and (importlib.util.find_spec("mpi4py") is None or find_mpiexec() is None):
            from ._processes import MPI_INSTALL_HINT

            raise _skip(f"backend='mpi' needs mpi4py and an mpiexec: {MPI_INSTALL_HINT}")
        try:
            pool = RankPool(world_size, backend, timeout=timeout)
        except RankFailure as error:
            pytest.fail(f"could not start {world_size} {backend} ranks: {error}", pytrace=False)
        if backend == "mpi":
            try:
                pool.run(join_torch_group_over_mpi)
            except Exception as error:
                pool.close()
                pytest.fail(f"could not build the torch.distributed group of {world_size} mpi ranks: "
                            f"{type(error).__name__}: {error}", pytrace=False)
        self.pools[(world_size, backend)] = pool
        return pool

    # -- reporting

    @staticmethod
    def _status(outcome: "RankOutcome") -> str:
        if outcome.status == "returned":
            return "passed"
        if outcome.status == "raised" and isinstance(outcome.value, RankTestOutcome):
            return outcome.value.kind
        return {"raised": "failed"}.get(outcome.status, outcome.status)

    def _report_output(self, item: pytest.Function, outcomes: List["RankOutcome"]) -> None:
        """Each rank's stdout and stderr: a report section, or printed here under ``-s``."""
        for outcome in outcomes:
            output = self._output_of(outcome)
            if not output:
                continue
            if self.config.getoption("capture", "fd") == "no":
                sys.stdout.write("".join(f"[rank{outcome.rank}] {line}\n" for line in output.splitlines()))
            else:
                item.add_report_section("call", f"stdout+stderr (rank {outcome.rank})", output)

    def _output_of(self, outcome: "RankOutcome") -> str:
        if isinstance(outcome.value, (RankPassed, RankTestOutcome)):
            return outcome.value.output
        return read_text(os.path.join(self._outputs(), f"rank{outcome.rank}.out"))

    def _failure_repr(self, item: pytest.Function, spec: RanksSpec,
                      outcomes: List["RankOutcome"]) -> RanksFailureRepr:
        by_status: Dict[str, List[int]] = {}
        for outcome in outcomes:
            by_status.setdefault(self._status(outcome), []).append(outcome.rank)
        someone_failed = bool(set(by_status) & {"failed", "exited"})
        sections: List[Tuple[str, Any]] = []
        words: List[str] = []
        for outcome in outcomes:
            status = self._status(outcome)
            if status == "failed":
                body = outcome.value.longrepr if isinstance(outcome.value, RankTestOutcome) else outcome.detail
                sections.append((f"rank {outcome.rank}: failed", body))
            elif status == "exited":  # its output, up to then, is in its captured section
                sections.append((f"rank {outcome.rank}: its process {outcome.detail}", ""))
            elif status == "stalled":
                why = ("still running after another rank failed" if someone_failed
                       else f"did not finish within {spec.timeout:g} s")
                sections.append((f"rank {outcome.rank}: {why}{_innermost_call(outcome.detail)}; killed",
                                 _without_plugin_frames(outcome.detail) or "(its stack could not be taken)"))
            elif status in ("skipped", "xfailed"):
                sections.append((f"rank {outcome.rank}: {status}", outcome.value.reason))
        for status in ("failed", "exited", "stalled", "skipped", "xfailed", "passed"):
            if status in by_status:
                words.append(f"{_ranks(by_status[status])} {status}")
        summary = f"on {spec.world_size} {spec.backend} ranks: " + ", ".join(words)
        return RanksFailureRepr(summary, sections, self._crash(item, spec, outcomes, by_status))

    def _crash(self, item: pytest.Function, spec: RanksSpec, outcomes: List["RankOutcome"],
               by_status: Dict[str, List[int]]) -> ReprFileLocation:
        """The one line of the short summary: a rank's exit (the likely cause of the others'
        errors), else the first failing rank's error, else the stall."""
        path, lineno = str(item.path), (item.location[1] or 0) + 1
        if "exited" in by_status:
            first = outcomes[by_status["exited"][0]]
            return ReprFileLocation(path, lineno, f"rank {first.rank}: its process {first.detail}")
        failed = by_status.get("failed", [])
        if failed:
            first = outcomes[failed[0]]
            crash = getattr(first.value, "crash", None)
            which = f"{_ranks(failed)} failed; rank {first.rank}" if len(failed) > 1 else f"rank {first.rank}"
            if crash is not None:
                return ReprFileLocation(crash.path, crash.lineno, f"{which}: {crash.message}")
            last_line = (first.detail.strip().splitlines() or ["failed"])[-1]
            return ReprFileLocation(path, lineno, f"{which}: {last_line}")
        if "stalled" in by_status:
            return ReprFileLocation(path, lineno, f"{_ranks(by_status['stalled'])} did not finish "
                                                  f"within {spec.timeout:g} s")
        mixed = ", ".join(f"{_ranks(ranks)} {status}" for status, ranks in by_status.items())
        return ReprFileLocation(path, lineno, f"the ranks disagree: {mixed}")


def _without_plugin_frames(stack: str) -> str:
    """A rank's stack without the frame of this plugin that called the test."""
    rank_side = os.path.splitext(run_test.__code__.co_filename)[0]
    return "\n".join(line for line in stack.splitlines() if not (
        line.lstrip().startswith(f'File "{rank_side}.py"') and line.endswith(" in run_test")))


def _innermost_call(stack: str) -> str:
    """", in barrier (distributed_c10d.py:5356)": where a stalled rank's main thread was."""
    current = stack.split("Current thread", 1)[-1]
    match = re.search(r'File "([^"]*)", line (\d+) in (\S+)', current)
    if match is None:
        return ""
    path, line, function = match.groups()
    return f", in {function} ({os.path.basename(path)}:{line})"


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _skip(reason: str) -> BaseException:
    """A skip reported at the test's own location (as a skip raised in the test is)."""
    try:
        return pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # an older pytest
        return pytest.skip.Exception(reason)
