"""Shared fixtures: long-lived rank pools, one per (world size, backend), for the whole session."""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Tuple

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


@pytest.fixture(scope="session")
def rank_pool() -> Callable[[int, str], RankPool]:
    """``rank_pool(world_size, backend)``: a started pool, reused across tests.

    A pool that failed (a stalled or dead rank) closes itself and is replaced on next use.
    """
    pools: Dict[Tuple[int, str], RankPool] = {}

    def get(world_size: int, backend: str = "gloo") -> RankPool:
        key = (world_size, backend)
        if key not in pools or pools[key].closed:
            pools[key] = RankPool(world_size, backend, timeout=120.0)
        return pools[key]

    yield get
    for pool in pools.values():
        pool.close()
