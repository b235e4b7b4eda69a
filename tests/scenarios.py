"""Seeded training scenarios, run identically by syncbn on each rank and by the oracle.

The oracle is float64 torch.nn.BatchNorm on the concatenated global batch; the layer under
test sees only its rank's slice. Data depends only on (seed, step), so every rank and the
oracle agree on the global batch without communicating.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

import torch

import syncbn

class IdenticalPeers(syncbn.Communicator):
    """A group of ``size`` ranks that all hold this rank's batch: the sum over the group is
    ``size`` times this rank's values.

    Stands in for real peers where processes cannot (the meta device, a CUDA graph, Triton's
    interpreter); the oracle is BatchNorm on this batch repeated ``size`` times.
    """

    rank = 0

    def __init__(self, size: int = 2):
        self.size = size

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.mul_(self.size)


BATCHNORM_BY_DIM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                    4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


@dataclass(frozen=True)
class Scenario:
    sizes: Tuple[int, ...]  # batch size of each rank
    spatial: Tuple[int, ...] = (4, 5)
    channels: int = 3
    momentum: Optional[float] = 0.1
    affine: bool = True
    track_running_stats: bool = True
    channels_last: bool = False
    steps: int = 2
    seed: int = 0
    dtype: torch.dtype = torch.float64
    mean: float = 0.5
    std: float = 2.0

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)

    def global_batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, dy) of the whole group for one step, in float64."""
        generator = torch.Generator().manual_seed(1000 * self.seed + step)
        shape = (sum(self.sizes), self.channels) + self.spatial
        channel_shift = torch.linspace(-1.0, 1.0, self.channels).reshape([1, -1] + [1] * len(self.spatial))
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * self.std + self.mean + channel_shift
        dy = torch.randn(shape, generator=generator, dtype=torch.float64)
        return x, dy

    def rank_slice(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


@dataclass
class StepRecord:
    y: List[torch.Tensor] = field(default_factory=list)
    dx: List[torch.Tensor] = field(default_factory=list)
    dweight: List[torch.Tensor] = field(default_factory=list)
    dbias: List[torch.Tensor] = field(default_factory=list)
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)


def make_layer(cls: Type[torch.nn.Module], scenario: Scenario) -> torch.nn.Module:
    layer = cls(scenario.channels, momentum=scenario.momentum, affine=scenario.affine,
                track_running_stats=scenario.track_running_stats).to(scenario.dtype)
    if scenario.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, scenario.channels))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, scenario.channels))
    return layer


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def take_parameter_grads(layer: torch.nn.Module, dweight: List[torch.Tensor],
                         dbias: List[torch.Tensor]) -> None:
    """Append the gradients of an affine layer's weight and bias, then clear them for the next step."""
    if layer.affine:
        dweight.append(layer.weight.grad.clone())
        dbias.append(layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None


def training_step(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Output, input gradient and parameter gradients of one step on the loss sum(y^2), from a
    copy of ``x`` (which stays intact); the model's gradients are cleared afterwards."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [y.detach(), x.grad] + grads


def run_steps(layer: torch.nn.Module, scenario: Scenario, rows: slice) -> StepRecord:
    """Train ``layer`` for the scenario's steps on ``rows`` of each global batch."""
    record = StepRecord()
    layer.train()
    for step in range(scenario.steps):
        x, dy = scenario.global_batch(step)
        x = layout(x[rows].to(scenario.dtype), scenario.channels_last).requires_grad_()
        y = layer(x)
        y.backward(dy[rows].to(y.dtype))
        record.y.append(y.detach())
        record.dx.append(x.grad)
        take_parameter_grads(layer, record.dweight, record.dbias)
    record.buffers = {name: value.clone() for name, value in layer.named_buffers()}
    return record


def run_sync_rank(scenario: Scenario) -> StepRecord:
    """The rank function: syncbn.SyncBatchNorm on this rank's slice."""
    rank = syncbn.resolve_communicator().rank
    return run_steps(make_layer(syncbn.SyncBatchNorm, scenario), scenario, scenario.rank_slice(rank))


def run_oracle(scenario: Scenario) -> StepRecord:
    """float64 torch BatchNorm on the concatenated global batch."""
    cls = BATCHNORM_BY_DIM[scenario.ndim]
    double = dataclasses.replace(scenario, dtype=torch.float64, channels_last=False)  # keeps its type
    return run_steps(make_layer(cls, double), double, slice(None))


def assert_matches_oracle(records: List[StepRecord], scenario: Scenario, tol: float = 1e-9) -> None:
    """Rank outputs concatenated, parameter grads summed, buffers on every rank == oracle."""
    oracle = run_oracle(scenario)

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")

    for step in range(scenario.steps):
        close(torch.cat([r.y[step] for r in records]), oracle.y[step], f"output, step {step}")
        close(torch.cat([r.dx[step] for r in records]), oracle.dx[step], f"input grad, step {step}")
        if scenario.affine:
            close(sum(r.dweight[step] for r in records), oracle.dweight[step], f"weight grad, step {step}")
            close(sum(r.dbias[step] for r in records), oracle.dbias[step], f"bias grad, step {step}")
    for rank, record in enumerate(records):
        assert record.buffers.keys() == oracle.buffers.keys()
        for name, expected in oracle.buffers.items():
            if name == "num_batches_tracked":
                assert record.buffers[name].item() == expected.item(), f"rank {rank} {name}"
            else:
                close(record.buffers[name], expected, f"rank {rank} {name}")
