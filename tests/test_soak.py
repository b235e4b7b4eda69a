"""Soak: 2,000 steps on 3 ranks never let the running statistics drift.

Every step draws each rank's batch size (zeros included, now and then on every rank at once)
and whether the step trains or evaluates. Two SyncBatchNorm layers (momentum 0.1 and the
cumulative momentum=None) run fwd+bwd in fp32. At checkpoints every rank reports its
buffers: they must be bitwise identical across ranks, and equal a float64 replay of the
same global batches through torch BatchNorm.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

import syncbn
from conftest import BACKENDS

STEPS = 2000
CHECKPOINTS = (1, 500, 1000, 1500, 2000)
WORLD_SIZE = 3
CHANNELS = 4
SPATIAL = (3, 3)


def _step_plan(step: int) -> Tuple[List[int], bool]:
    """(batch size of each rank, whether the step trains), the same on every rank."""
    generator = torch.Generator().manual_seed(step)
    sizes = torch.randint(0, 4, (WORLD_SIZE,), generator=generator).tolist()
    if step % 97 == 0:
        sizes = [0] * WORLD_SIZE  # a global batch of zero samples: statistics untouched
    training = bool(torch.rand((), generator=generator) < 0.8)
    return sizes, training


def _global_batch(step: int, total: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + step)
    shift = torch.linspace(-2.0, 2.0, CHANNELS).reshape(1, -1, 1, 1)
    return torch.randn((total, CHANNELS) + SPATIAL, generator=generator, dtype=torch.float64) * 1.5 + shift


def _layers(bn_class) -> torch.nn.Sequential:
    return torch.nn.Sequential(bn_class(CHANNELS, momentum=0.1), torch.nn.ReLU(),
                               bn_class(CHANNELS, momentum=None))


def _buffers(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_buffers()}


def _soak_rank() -> Dict[int, Dict[str, torch.Tensor]]:
    rank = syncbn.resolve_communicator().rank
    model = _layers(syncbn.SyncBatchNorm)
    snapshots = {}
    for step in range(1, STEPS + 1):
        sizes, training = _step_plan(step)
        start = sum(sizes[:rank])
        x = _global_batch(step, sum(sizes))[start:start + sizes[rank]].float().requires_grad_()
        model.train(training)
        y = model(x)
        if training:
            y.square().sum().backward()
        if step in CHECKPOINTS:
            snapshots[step] = _buffers(model)
    return snapshots


def _float64_replay() -> Dict[int, Dict[str, torch.Tensor]]:
    model = _layers(torch.nn.BatchNorm2d).double()
    snapshots = {}
    for step in range(1, STEPS + 1):
        sizes, training = _step_plan(step)
        if training and sum(sizes) > 0:  # torch BatchNorm rejects an empty batch; syncbn skips it
            model.train()
            model(_global_batch(step, sum(sizes)))
        if step in CHECKPOINTS:
            snapshots[step] = _buffers(model)
    return snapshots


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_stay_bitwise_identical_across_ranks_and_match_float64_replay(rank_pool, backend):
    per_rank = rank_pool(WORLD_SIZE, backend).run(_soak_rank, timeout=600)
    replay = _float64_replay()
    for step in CHECKPOINTS:
        for rank in range(1, WORLD_SIZE):
            for name, value in per_rank[0][step].items():
                assert torch.equal(per_rank[rank][step][name], value), f"step {step}: rank {rank} {name} differs from rank 0"
        for name, expected in replay[step].items():
            torch.testing.assert_close(per_rank[0][step][name].double(), expected.double(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"step {step} {name}: {m}")
