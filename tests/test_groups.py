"""syncbn.new_groups: consistent sub-groups; SyncBatchNorm then syncs inside each group only."""
from __future__ import annotations

import pytest

import syncbn
from conftest import BACKENDS
from scenarios import Scenario, assert_matches_oracle, make_layer, run_steps


def _train_in_pairs(scenario_by_group: dict) -> object:
    rank = syncbn.resolve_communicator().rank
    group = syncbn.new_groups(2)
    scenario = scenario_by_group[rank // 2]
    layer = make_layer(syncbn.SyncBatchNorm, scenario)
    layer.process_group = group
    return run_steps(layer, scenario, scenario.rank_slice(rank % 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_two_see_different_data_and_each_matches_its_own_full_batch(rank_pool, backend):
    scenarios = {0: Scenario(sizes=(2, 3), seed=1), 1: Scenario(sizes=(1, 4), seed=2)}
    records = rank_pool(4, backend).run(_train_in_pairs, scenarios)
    assert_matches_oracle(records[:2], scenarios[0])
    assert_matches_oracle(records[2:], scenarios[1])


def _group_sizes(group_size: int) -> int:
    return syncbn.resolve_communicator(syncbn.new_groups(group_size)).size


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_size_must_divide_the_world(rank_pool, backend):
    assert rank_pool(4, backend).run(_group_sizes, 4) == [4] * 4
    with pytest.raises(ValueError, match="must divide the world size 4, got 3"):
        rank_pool(4, backend).run(_group_sizes, 3)


def test_single_process_groups_of_one_are_the_process_itself(monkeypatch):
    monkeypatch.delenv("PMI_SIZE", raising=False)
    assert syncbn.resolve_communicator(syncbn.new_groups(1)).size == 1


def test_groups_in_a_job_of_several_ranks_without_a_group_name_the_missing_initialization(monkeypatch):
    monkeypatch.delenv("PMI_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's, with init_process_group forgotten
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=4.*init_process_group\("):
        syncbn.new_groups(2)
