"""precise_bn sets running statistics to the population statistics of all batches of all ranks.

Oracle: a float64 model with torch BatchNorm2d in every place, run in one process on each
rank's batches in turn (precise_bn's passes normalize with each rank's own batch statistics,
as a per-rank BatchNorm model does), its BatchNorm inputs recorded by hooks and their mean and
unbiased variance taken over all of them with torch.mean / torch.var.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import pytest
import torch

import syncbn
from conftest import BACKENDS
from syncbn.testing import RecordingCommunicator

# Batch sizes per step on each rank: uneven across ranks and steps.
RANK_BATCH_SIZES = ((3, 1, 2), (2, 4, 3))
# A loader without padding: rank 1 runs one batch fewer.
UNEVEN_BATCH_COUNTS = ((3, 1, 2), (2, 4))
_CHANNELS = 3


def _model(sync_first_norm: bool) -> torch.nn.Module:
    """conv -> norm -> relu -> conv -> BatchNorm2d. The first norm is syncbn's when
    ``sync_first_norm``; the last is torch's."""
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


Sizes = Sequence[Sequence[int]]  # batch sizes per step, of each rank


def _rank_batches(rank: int, sizes: Sizes = RANK_BATCH_SIZES) -> List[torch.Tensor]:
    return [_batch(step, rank, size) for step, size in enumerate(sizes[rank])]


def _oracle(world_size: int, sizes: Sizes = RANK_BATCH_SIZES) -> Dict[str, torch.Tensor]:
    model = _model(sync_first_norm=False).train()
    norms = [model[1], model[4]]
    seen: List[List[torch.Tensor]] = [[], []]
    for index, norm in enumerate(norms):
        norm.register_forward_pre_hook(lambda module, args, index=index: seen[index].append(args[0]))
    with torch.no_grad():
        for rank in range(world_size):
            for batch in _rank_batches(rank, sizes):
                model(batch)
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


def _this_rank() -> int:
    return syncbn.resolve_communicator().rank


def _precise_bn_on_rank(sizes: Sizes, convert: bool) -> Dict[str, object]:
    """precise_bn on this rank's batches, every collective of the run recorded: precise_bn's
    own and, with ``convert``, those of the model's syncbn layers (convert_sync_batchnorm's)."""
    recorder = RecordingCommunicator(syncbn.resolve_communicator())
    model = _model(sync_first_norm=False)
    if convert:
        model = syncbn.convert_sync_batchnorm(model, process_group=recorder)
        assert type(model[1]) is syncbn.SyncBatchNorm and type(model[4]) is syncbn.SyncBatchNorm
    batches = _rank_batches(_this_rank(), sizes)
    ran = syncbn.precise_bn(model, batches, process_group=recorder, progress=False)
    groups_kept = all(m.process_group is recorder for m in model.modules()
                      if isinstance(m, syncbn.SyncBatchNorm))
    return {"ran": ran, "stats": _running_stats(model), "collectives": len(recorder.calls),
            "groups_kept": groups_kept}


@pytest.mark.parametrize("convert", [True, False], ids=["syncbn_layers", "torch_batchnorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_with_uneven_batches_equal_the_global_population_in_two_collectives(
        rank_pool, backend, convert):
    results = rank_pool(2, backend).run(_precise_bn_on_rank, RANK_BATCH_SIZES, convert)
    oracle = _oracle(2)
    for result in results:
        assert result["ran"] == 3 and result["groups_kept"]
        # One all-reduce of the shifts, one of every layer's sums: none per batch or per layer,
        # the model's own layers included (3 batches x 2 layers would make 6 more).
        assert result["collectives"] == 2
        for key, value in result["stats"].items():
            torch.testing.assert_close(value, oracle[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_with_different_batch_counts_pool_every_batch_without_a_mismatch(rank_pool, backend):
    # Rank 1's loader ends one batch early: gloo used to abort on a collective mismatch and MPI
    # to truncate a message. Every value of every rank counts once.
    ran, stats = zip(*[(r["ran"], r["stats"]) for r in
                       rank_pool(2, backend).run(_precise_bn_on_rank, UNEVEN_BATCH_COUNTS, True)])
    assert ran == (3, 2)
    oracle = _oracle(2, UNEVEN_BATCH_COUNTS)
    for rank_stats in stats:
        for key, value in rank_stats.items():
            torch.testing.assert_close(value, oracle[key], rtol=1e-10, atol=1e-12)


def test_batches_are_not_modified_with_an_activated_first_layer():
    model = torch.nn.Sequential(syncbn.SyncBatchNormAct(2), torch.nn.Conv2d(2, 3, 1),
                                syncbn.SyncBatchNormAct(3, activation="identity")).double()
    batches = _rank_batches(0)
    before = [batch.clone() for batch in batches]
    syncbn.precise_bn(model, batches, progress=False)
    assert all(torch.equal(batch, original) for batch, original in zip(batches, before))
