"""precise_bn sets running statistics to the population statistics of all batches of all ranks.

Oracle: a float64 model with torch BatchNorm2d in every place, run in one process on each
step's global batch (the ranks' batches concatenated), its BatchNorm inputs recorded by hooks
and their mean and unbiased variance taken over all of them with torch.mean / torch.var.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import syncbn
from conftest import BACKENDS
from syncbn.testing import RecordingCommunicator

# Batch sizes per step on each rank: uneven across ranks and steps.
RANK_BATCH_SIZES = ((3, 1, 2), (2, 4, 3))
_CHANNELS = 3


def _model(sync_first_norm: bool) -> torch.nn.Module:
    """conv -> norm -> relu -> conv -> BatchNorm2d. The first norm is syncbn's when
    ``sync_first_norm``; the last is always torch's, and nothing downstream depends on it,
    so with 2 ranks it sees exactly the values it sees in the one-process oracle."""
    torch.manual_seed(0)
    first = syncbn.SyncBatchNorm(_CHANNELS) if sync_first_norm else torch.nn.BatchNorm2d(_CHANNELS)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, _CHANNELS, 3), first, torch.nn.ReLU(),
        torch.nn.Conv2d(_CHANNELS, 4, 1), torch.nn.BatchNorm2d(4, momentum=None),
    ).double()


def _batch(step: int, rank: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + rank)
    # A different mean per step: the population variance exceeds the mean batch variance.
    return 5 + 3 * step + torch.randn(size, 2, 5, 5, dtype=torch.double, generator=generator)


def _rank_batches(rank: int, sizes=RANK_BATCH_SIZES) -> List[torch.Tensor]:
    return [_batch(step, rank, size) for step, size in enumerate(sizes[rank])]


def _oracle(world_size: int, sizes=RANK_BATCH_SIZES) -> Dict[str, torch.Tensor]:
    model = _model(sync_first_norm=False).train()
    norms = [model[1], model[4]]
    seen: List[List[torch.Tensor]] = [[], []]
    for index, norm in enumerate(norms):
        norm.register_forward_pre_hook(lambda module, args, index=index: seen[index].append(args[0]))
    with torch.no_grad():
        for step in range(len(sizes[0])):
            model(torch.cat([_batch(step, rank, sizes[rank][step]) for rank in range(world_size)]))
    statistics = {}
    for index, inputs in zip((1, 4), seen):
        values = torch.cat(inputs).transpose(0, 1).reshape(inputs[0].shape[1], -1)
        statistics[f"{index}.running_mean"] = values.mean(1)
        statistics[f"{index}.running_var"] = values.var(1, unbiased=True)
        statistics[f"{index}.batch_var_mean"] = torch.stack(
            [x.transpose(0, 1).reshape(x.shape[1], -1).var(1) for x in inputs]).mean(0)
    return statistics


def _running_stats(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def test_single_process_population_statistics_equal_the_oracle_not_the_mean_batch_variance():
    model = _model(sync_first_norm=False)
    model[1].eval()
    ran = syncbn.precise_bn(model, iter(_rank_batches(0)), num_batches=10, progress=False)
    assert ran == 3
    oracle = _oracle(1)
    for key, value in _running_stats(model).items():
        torch.testing.assert_close(value, oracle[key], rtol=1e-10, atol=1e-12)
    # The test can tell the population variance from the average of batch variances.
    assert (oracle["1.running_var"] > 2 * oracle["1.batch_var_mean"]).all()


def test_state_is_restored_and_hooks_removed():
    model = _model(sync_first_norm=True)
    model.eval()
    model[1].train()
    model[1].num_batches_tracked.fill_(7)
    syncbn.precise_bn(model, _rank_batches(0), num_batches=2, progress=False)
    assert [m.training for m in model] == [False, True, False, False, False]
    assert model[1].momentum == 0.1 and model[4].momentum is None
    assert model[1].num_batches_tracked.item() == 7 and model[4].num_batches_tracked.item() == 0
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_num_batches_limits_the_batches_used():
    limited, first_two, all_three = (_model(sync_first_norm=False) for _ in range(3))
    assert syncbn.precise_bn(limited, iter(_rank_batches(1)), num_batches=2, progress=False) == 2
    syncbn.precise_bn(first_two, _rank_batches(1)[:2], progress=False)
    syncbn.precise_bn(all_three, _rank_batches(1), progress=False)
    for key, value in _running_stats(limited).items():
        torch.testing.assert_close(value, _running_stats(first_two)[key], rtol=0, atol=0)
    assert not torch.allclose(limited[1].running_mean, all_three[1].running_mean)


def test_progress_bar_is_shown_on_request(capsys):
    syncbn.precise_bn(_model(sync_first_norm=False), _rank_batches(0), num_batches=3, progress=True)
    assert "precise_bn" in capsys.readouterr().err


def test_large_mean_in_fp32_keeps_the_variance():
    norm = torch.nn.BatchNorm1d(2)
    generator = torch.Generator().manual_seed(0)
    batches = [1e4 + torch.randn(64, 2, generator=generator) for _ in range(4)]
    syncbn.precise_bn(norm, batches, progress=False)
    values = torch.cat(batches).double()
    torch.testing.assert_close(norm.running_var.double(), values.var(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm.running_mean.double(), values.mean(0), rtol=1e-7, atol=0)


def _precise_bn_on_rank() -> Dict[str, object]:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    if rank is None:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    model = _model(sync_first_norm=True)
    recorder = RecordingCommunicator(syncbn.resolve_communicator())
    ran = syncbn.precise_bn(model, _rank_batches(rank), process_group=recorder, progress=False)
    return {"ran": ran, "stats": _running_stats(model), "collectives": len(recorder.calls)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_with_uneven_batches_equal_the_global_population(rank_pool, backend):
    results = rank_pool(2, backend).run(_precise_bn_on_rank)
    oracle = _oracle(2)
    for result in results:
        assert result["ran"] == 3
        # One all-reduce of the shifts, one of every layer's sums: none per batch or per layer.
        assert result["collectives"] == 2
        for key, value in result["stats"].items():
            torch.testing.assert_close(value, oracle[key], rtol=1e-10, atol=1e-12)
