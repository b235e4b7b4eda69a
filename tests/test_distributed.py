"""SyncBatchNorm on several ranks equals float64 BatchNorm on the concatenated global batch.

Every case runs over gloo and over MPI on real processes: the cases judged on all ranks'
records together through conftest.rank_pool, the others in the body of a test on ranks.
"""
from __future__ import annotations


import pytest
import torch

import syncbn
from conftest import BACKENDS, ranks_over_each_backend, sync_group
from scenarios import Scenario, assert_matches_oracle, run_sync_rank
from syncbn.testing import RecordingCommunicator

LAYOUTS = {
    "uneven_batches": Scenario(sizes=(3, 1, 4)),
    "one_rank_empty": Scenario(sizes=(4, 0, 2)),
    "one_sample_per_rank": Scenario(sizes=(1, 1, 1)),
    "one_sample_per_rank_N_C": Scenario(sizes=(1, 1, 1), spatial=()),
    "N_C_L": Scenario(sizes=(2, 3, 1), spatial=(6,)),
    "N_C_D_H_W": Scenario(sizes=(1, 2, 2), spatial=(2, 3, 3)),
    "channels_last": Scenario(sizes=(2, 1, 3), channels_last=True),
    "channels_last_3d": Scenario(sizes=(2, 0, 1), spatial=(2, 3, 3), channels_last=True),
    "cumulative_momentum": Scenario(sizes=(2, 3, 1), momentum=None, steps=3),
    "no_affine": Scenario(sizes=(2, 3, 1), affine=False),
    "no_running_stats": Scenario(sizes=(2, 3, 1), track_running_stats=False),
    "several_steps_large_mean": Scenario(sizes=(5, 2, 3), steps=4, mean=300.0, std=0.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_three_ranks_equal_float64_batchnorm_on_the_global_batch(rank_pool, backend, scenario):
    records = rank_pool(3, backend).run(run_sync_rank, scenario)
    assert_matches_oracle(records, scenario)


@ranks_over_each_backend(3)
def test_global_count_zero_gives_empty_output_zero_grads_and_untouched_stats(backend):
    layer = syncbn.SyncBatchNorm(3, process_group=sync_group(backend))
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.grad.shape == (0, 3, 4, 4)
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.bias.grad, torch.zeros(3))
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0


@ranks_over_each_backend(3, timeout=60)
def test_global_count_one_raises_on_every_rank(rank, backend):
    layer = syncbn.SyncBatchNorm(3, name="neck.bn", process_group=sync_group(backend))
    with pytest.raises(ValueError, match=r"neck\.bn.*more than 1 value per channel"):
        layer(torch.randn(1 if rank == 0 else 0, 3))


@ranks_over_each_backend(3, timeout=30)
def test_eval_on_one_rank_alone_returns_without_communicating(rank, backend):
    if rank == 0:  # the other ranks never call the layer: eval must not communicate
        layer = syncbn.SyncBatchNorm(3, process_group=sync_group(backend)).eval()
        assert torch.isfinite(layer(torch.randn(2, 3, 4))).all()


@ranks_over_each_backend(2)
def test_one_packed_collective_forward_one_backward_none_in_eval(backend):
    recording = RecordingCommunicator(syncbn.resolve_communicator(sync_group(backend)))
    layer = syncbn.SyncBatchNorm(8, process_group=recording)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    # forward: count, C sums, C squared sums, C shifts and C squared shifts (the ranks'
    # agreement per channel), invalid-input and fp64-input flags, in fp64; backward: 2C in fp64
    assert recording.calls == [(35, torch.float64), (16, torch.float64)]
    layer.eval()
    layer(x)
    assert len(recording.calls) == 2  # none in eval


def _small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).double()


def _ddp_batches(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(6, 1, 5, 5, generator=generator, dtype=torch.float64), \
        torch.randint(0, 3, (6,), generator=generator)


def _train(model: torch.nn.Module, rows: slice, loss_scale: float = 1.0, steps: int = 3) -> torch.nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, target = _ddp_batches(step)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), target[rows], reduction="sum") * loss_scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.ranks(2)
def test_ddp_training_equals_single_process_full_batch_training(rank, world_size):
    rows = 3  # per rank
    model = torch.nn.parallel.DistributedDataParallel(syncbn.convert_sync_batchnorm(_small_convnet()))
    # DDP averages gradients over ranks; scaling the summed loss by the world size makes the
    # step equal full-batch SGD on the summed loss.
    _train(model, slice(rank * rows, (rank + 1) * rows), loss_scale=world_size)
    state, reference = model.module.state_dict(), _train(_small_convnet(), slice(None)).state_dict()
    for name, expected in reference.items():
        torch.testing.assert_close(state[name], expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
