"""Shared fixtures and marks for tests on several ranks.

- ``@pytest.mark.ranks(n)`` (syncbn.pytest_plugin) runs a test's body on n ranks;
  ``ranks_over_each_backend(n)`` runs it over gloo and over MPI, syncing over ``sync_group``.
- ``rank_pool(n, backend)`` runs a function on n ranks and returns their results, for tests
  that judge what all ranks returned together.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, Tuple

import pytest

# Before any test module imports torchvision, timm or lightning (see its docstring).
import torchvision_shim  # noqa: F401
from syncbn.testing import RankPool, find_mpiexec

# The @pytest.mark.ranks plugin, also where syncbn is not (re)installed with its entry point;
# where it is, the plugin sees to being registered once.
pytest_plugins = ("syncbn.pytest_plugin",)

MPI_AVAILABLE = importlib.util.find_spec("mpi4py") is not None and find_mpiexec() is not None
requires_mpi = pytest.mark.skipif(not MPI_AVAILABLE, reason="needs mpi4py and mpiexec")
# Distributed tests run over both CPU backends; MPI cases skip cleanly where MPI is missing.
BACKENDS = ["gloo", pytest.param("mpi", marks=[requires_mpi, pytest.mark.mpi])]


def ranks_over_each_backend(world_size: int, **options: Any) -> pytest.MarkDecorator:
    """Parametrize ``backend`` over gloo and mpi, each case a ``@pytest.mark.ranks(world_size)``
    test of that backend (``options``: the marker's timeout). Sync over ``sync_group(backend)``."""
    return pytest.mark.parametrize("backend", [
        pytest.param("gloo", marks=pytest.mark.ranks(world_size, **options)),
        pytest.param("mpi", marks=[pytest.mark.ranks(world_size, backend="mpi", **options),
                                   requires_mpi, pytest.mark.mpi]),
    ])


def sync_group(backend: str) -> Any:
    """The group a test on ranks syncs over: for "mpi", ``MPI.COMM_WORLD`` (an mpi4py
    communicator, as a plain mpiexec job uses; the marker's MPI ranks also have a
    torch.distributed group, which would otherwise be syncbn's default), else None:
    torch.distributed's default group."""
    if backend != "mpi":
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the native CPU kernels (or load them from the cache) once, before any test: else
    the first ranks to need them would build inside their own time limit."""
    import os

    if os.environ.get("SYNCBN_NATIVE") != "0":
        from syncbn.kernels import native

        native.available()  # a failed build warns once; the reference then serves


@pytest.fixture(scope="session")
def rank_pool(pytestconfig: pytest.Config) -> Callable[[int, str], RankPool]:
    """``rank_pool(world_size, backend)``: a started pool, reused across tests.

    gloo pools are the ones @pytest.mark.ranks tests run on. MPI pools are this fixture's own:
    their ranks leave torch.distributed uninitialized, so syncbn's default group there is
    ``MPI.COMM_WORLD``. A pool that failed (a stalled or dead rank) closes itself and is
    replaced on next use.
    """
    from syncbn.pytest_plugin import SESSION_PLUGIN_NAME  # here: imported first by pytest_plugins

    marked_tests = pytestconfig.pluginmanager.get_plugin(SESSION_PLUGIN_NAME)
    pools: Dict[Tuple[int, str], RankPool] = {}

    def get(world_size: int, backend: str = "gloo") -> RankPool:
        if backend == "gloo":
            return marked_tests.pool(world_size)
        key = (world_size, backend)
        if key not in pools or pools[key].closed:
            pools[key] = RankPool(world_size, backend, timeout=120.0)
        return pools[key]

    yield get
    for pool in pools.values():
        pool.close()
