"""Property-based: any rank layout, shape, dtype and option set equals float64 BatchNorm.

Hypothesis draws the world size (1-4), each rank's batch size (0 included), the input rank
(2-5 dims), the dtype, the layout and the affine / momentum / running-stat options; every
case runs on real processes (gloo or MPI) and is checked against the oracle of scenarios.py.

Bounded for CI (``SYNCBN_HYPOTHESIS_PROFILE=ci``, the default); ``=long`` runs a longer
fuzz, e.g. ``SYNCBN_HYPOTHESIS_PROFILE=long python -m pytest tests/test_distributed_properties.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MPI_AVAILABLE
from scenarios import Scenario, assert_matches_oracle, run_sync_rank

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("SYNCBN_HYPOTHESIS_PROFILE", "ci")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}
BACKEND_CHOICES = ["gloo", "mpi"] if MPI_AVAILABLE else ["gloo"]


@st.composite
def scenarios(draw) -> tuple:
    world_size = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    values_per_sample = 1
    for extent in spatial:
        values_per_sample *= extent
    sizes = tuple(draw(st.lists(st.integers(0, 3), min_size=world_size, max_size=world_size)))
    # A global count of 0 or 1 per channel has no batch statistics to compare (both are
    # covered by dedicated tests); every other layout, empty ranks included, is fair game.
    if sum(sizes) * values_per_sample < 2:
        sizes = sizes[:-1] + (sizes[-1] + 2,)
    scenario = Scenario(
        sizes=sizes,
        spatial=spatial,
        channels=draw(st.integers(1, 4)),
        momentum=draw(st.sampled_from([0.1, 0.5, None])),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        channels_last=draw(st.booleans()) and len(spatial) >= 2,
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        mean=draw(st.sampled_from([0.0, 3.0, -50.0])),
        std=draw(st.sampled_from([0.1, 1.0, 4.0])),
    )
    return draw(st.sampled_from(BACKEND_CHOICES)), scenario


@given(case=scenarios())
@settings(settings.get_profile(PROFILE))
def test_any_rank_layout_shape_dtype_and_options_equal_float64_batchnorm(rank_pool, case):
    backend, scenario = case
    records = rank_pool(len(scenario.sizes), backend).run(run_sync_rank, scenario)
    assert_matches_oracle(records, scenario, tol=TOLERANCE[scenario.dtype])
