"""The part of syncbn's pytest plugin that runs on the ranks (see :mod:`syncbn.pytest_plugin`).

A :class:`RankTest` travels to every rank of a RankPool; :func:`run_test` imports the test
module there with pytest's assertion rewriting, calls the test function and reports back:
:class:`RankPassed`, or a :class:`RankTestOutcome` raised with pytest's own representation
of the failure, formatted as the pytest process's options ask.

Importing this module imports neither torch nor mpi4py; the functions that need them import
them on the rank.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest


@dataclass
class RankTest:
    """One test for the ranks: where its function is, its arguments, how to report a failure."""

    module_name: str
    module_path: str
    class_name: Optional[str]  # qualified name of the test's class, if any
    function_name: str
    arguments: bytes  # the pickled fixture values and parameters, loaded on the rank after the module
    rank_fixtures: Tuple[str, ...]  # which of rank, world_size the function takes
    world_size: int
    sys_path: List[str]
    cwd: str
    output_dir: str
    rewrite: bool  # pytest's assertion rewriting is on (not --assert=plain)
    python_files: List[str]  # the modules it rewrites, besides conftest.py
    settings: Dict[str, Any] = field(default_factory=dict)  # what _RankConfig reports


class RankTestOutcome(Exception):
    """Raised on a rank whose test did not pass; carries pytest's report of it back.

    ``kind``: "failed", "skipped" or "xfailed"; ``longrepr``: pytest's representation of the
    failure (a TerminalRepr, or text where it could not be pickled); ``crash``: its one-line
    ReprFileLocation; ``reason``: of a skip or xfail; ``output``: the rank's stdout and stderr.
    """

    def __init__(self, kind: str, longrepr: Any, crash: Any, reason: str, output: str):
        super().__init__(kind, longrepr, crash, reason, output)
        self.kind, self.longrepr, self.crash, self.reason, self.output = kind, longrepr, crash, reason, output

    def __str__(self) -> str:
        return f"{self.kind}: {self.crash.message if self.crash else self.reason}"


@dataclass
class RankPassed:
    output: str
    group_intact: bool  # torch.distributed is still initialized: the ranks can run the next test


def run_test(test: RankTest) -> RankPassed:
    """Run one test on this rank (called by the RankPool worker)."""
    import torch.distributed as dist

    this_rank = dist.get_rank()
    _adopt_paths(test.sys_path)
    os.chdir(test.cwd)
    config = _RankConfig(test.settings)
    function = None
    with _Capture(os.path.join(test.output_dir, f"rank{this_rank}.out")) as capture:
        try:
            function = _load_test_function(test)
            arguments = pickle.loads(test.arguments)
            given = {"rank": this_rank, "world_size": test.world_size}
            arguments.update((name, given[name]) for name in test.rank_fixtures)
            with _assertion_explanations(config):
                function(**arguments)
        except BaseException as error:  # every way a test can end but passing is reported
            outcome = _outcome_of(error, config, function)
        else:
            outcome = None
    if outcome is None:
        return RankPassed(capture.text, dist.is_initialized())
    kind, longrepr, crash, reason = outcome
    raise RankTestOutcome(kind, longrepr, crash, reason, capture.text)


def _outcome_of(error: BaseException, config: "_RankConfig", function: Any) -> tuple:
    from _pytest._code import ExceptionInfo

    if isinstance(error, pytest.skip.Exception):
        return "skipped", None, None, str(error.msg)
    if isinstance(error, pytest.xfail.Exception):
        return "xfailed", None, None, str(error.msg)
    excinfo = ExceptionInfo.from_exception(error)
    try:
        longrepr = _failure_formatter(config, function).repr_failure(excinfo)
    except Exception:  # pytest's internals differ from what this plugin knows: plain text
        longrepr = excinfo.getrepr(style="long", funcargs=True)
    crash = getattr(longrepr, "reprcrash", None)
    try:
        pickle.dumps((longrepr, crash))
    except Exception:
        longrepr, crash = str(longrepr), None
    return "failed", longrepr, crash, ""


def _failure_formatter(config: "_RankConfig", function: Any) -> Any:
    """An object that formats a failure exactly as pytest's Function item does, on this rank."""
    from _pytest.nodes import Node
    from _pytest.python import Function

    class RankItem:
        repr_failure = Function.repr_failure
        _repr_failure_py = Node._repr_failure_py
        _traceback_filter = Function._traceback_filter

        def __init__(self) -> None:
            self.config = config
            if function is not None:  # without it, the traceback stays whole
                self.obj = self._obj = function

    return RankItem()


class _RankConfig:
    """The parts of pytest's Config that failure formatting and assertion explanations read.

    The values are the pytest process's (sent with each test).
    """

    def __init__(self, settings: Dict[str, Any]):
        self._settings = settings
        self.invocation_params = SimpleNamespace(dir=Path(settings["invocation_dir"]))

    def getoption(self, name: str, default: Any = None, skip: bool = False) -> Any:
        return self._settings["options"].get(name, default)

    getvalue = getoption

    def get_verbosity(self, verbosity_type: Optional[str] = None) -> int:
        verbosity = self._settings["verbosity"]
        return verbosity.get(verbosity_type, verbosity[None])

    def getini(self, name: str) -> Any:
        try:
            return self._settings["ini"][name]
        except KeyError:
            raise ValueError(f"unknown ini option on the rank: {name}") from None

    def get_terminal_writer(self) -> Any:
        from _pytest._io import TerminalWriter

        return TerminalWriter(file=io.StringIO())  # plain text: the pytest process colours the report


def settings_of(config: pytest.Config) -> Dict[str, Any]:
    """What _RankConfig needs of this session's configuration."""
    def verbosity(kind: Optional[str]) -> int:
        try:
            return config.get_verbosity(kind)
        except (AttributeError, TypeError, KeyError, ValueError):  # an older pytest
            return config.getoption("verbose", 0)

    def ini(name: str) -> Any:
        try:
            return config.getini(name)
        except ValueError:
            return None

    return {
        "invocation_dir": str(config.invocation_params.dir),
        "options": {name: config.getoption(name, None)
                    for name in ("tbstyle", "fulltrace", "showlocals", "assertmode", "verbose")},
        "verbosity": {None: verbosity(None), "assertions": verbosity("assertions")},
        "ini": {name: ini(name) for name in ("truncation_limit_lines", "truncation_limit_chars")},
    }


class _assertion_explanations:
    """Set pytest's hooks that rewritten asserts call, as pytest does around each test."""

    def __init__(self, config: _RankConfig):
        self.config = config

    def __enter__(self) -> None:
        from _pytest.assertion import util

        self.saved = util._reprcompare, util._config
        util._reprcompare, util._config = self._explain, self.config

    def __exit__(self, *_: Any) -> None:
        from _pytest.assertion import util

        util._reprcompare, util._config = self.saved

    def _explain(self, op: str, left: Any, right: Any) -> Optional[str]:
        """pytest's own explanation of ``left op right`` (its callbinrepr, without plugins' hooks)."""
        from _pytest.assertion import truncate, util

        try:
            explanation = util.assertrepr_compare(self.config, op, left, right)
            if not explanation:
                return None
            explanation = truncate.truncate_if_required(explanation, SimpleNamespace(config=self.config))
        except Exception:  # an explanation must never hide the assertion itself
            return None
        text = "\n~".join(line.replace("\n", "\\n") for line in explanation)
        return text.replace("%", "%%") if self.config.getoption("assertmode") == "rewrite" else text


def _adopt_paths(paths: Sequence[str]) -> None:
    """Put the pytest process's sys.path first, in its order (test folders pytest inserted)."""
    mine = [path for path in sys.path if path not in paths]
    sys.path[:] = list(paths) + mine


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Compiles a module with pytest's assertion rewriting (never from or to a .pyc cache)."""

    def get_code(self, fullname: str) -> Any:
        from _pytest.assertion.rewrite import rewrite_asserts

        path = self.get_filename(fullname)
        source = self.get_data(path)
        tree = ast.parse(source, filename=path)
        rewrite_asserts(tree, source, path, None)
        return compile(tree, path, "exec", dont_inherit=True)


class _RewritingFinder(importlib.abc.MetaPathFinder):
    """Imports test modules and conftest.py files with assertion rewriting, as pytest does."""

    def __init__(self) -> None:
        self.patterns: List[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None
        if not _is_rewritten(spec.origin, self.patterns):
            return None
        spec.loader = _RewritingLoader(name, spec.origin)
        return spec


def _is_rewritten(path: str, patterns: Sequence[str]) -> bool:
    base = os.path.basename(path)
    return base == "conftest.py" or any(fnmatch.fnmatch(base, pattern) for pattern in patterns)


_finder: Optional[_RewritingFinder] = None


def _load_test_function(test: RankTest) -> Any:
    global _finder
    if test.rewrite:
        if _finder is None:
            _finder = _RewritingFinder()
            sys.meta_path.insert(0, _finder)
        _finder.patterns = test.python_files
    module = _import_module(test)
    holder = module
    if test.class_name:
        for part in test.class_name.split("."):
            holder = getattr(holder, part)
        holder = holder()  # a fresh instance, as pytest makes for each test
    return getattr(holder, test.function_name)


def _import_module(test: RankTest) -> Any:
    """The test module, imported as in the pytest process (by name, else from its file)."""
    def is_it(module: Any) -> bool:
        return module is not None and os.path.realpath(getattr(module, "__file__", "") or "") == \
            os.path.realpath(test.module_path)

    module = sys.modules.get(test.module_name)
    if is_it(module):
        return module
    try:
        module = importlib.import_module(test.module_name)
    except ImportError:
        module = None
    if is_it(module):
        return module
    # --import-mode=importlib, or a name that leads elsewhere on this rank: load the file itself.
    loader = (_RewritingLoader if test.rewrite else importlib.machinery.SourceFileLoader)(
        test.module_name, test.module_path)
    spec = importlib.util.spec_from_file_location(test.module_name, test.module_path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[test.module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[test.module_name]
        raise
    return module


class _Capture:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to a file for a while."""

    def __init__(self, path: str):
        self.path = path
        self.text = ""

    def __enter__(self) -> "_Capture":
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            try:  # lines reach the file as printed, in case the rank is killed mid-test
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
            except AttributeError:
                pass
        self.file = open(self.path, "wb")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *_: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.close()
        self.text = read_text(self.path)


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def group_answers() -> float:
    """On a rank after a failed test: does the group still complete a collective?"""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0.0
    probe = torch.ones(1, dtype=torch.float64)
    dist.all_reduce(probe)
    return probe.item()


def join_torch_group_over_mpi() -> None:
    """On an MPI pool's ranks: build the torch.distributed group, its rendezvous over MPI."""
    import syncbn

    syncbn.init_distributed("gloo", timeout=float(os.environ["SYNCBN_POOL_GROUP_TIMEOUT"]))
