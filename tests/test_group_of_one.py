"""A group of one is BatchNorm, bitwise (issue 11).

In a single process, and in a torch.distributed group of size 1, SyncBatchNorm's output,
input/weight/bias gradients, second-order gradients, running statistics and
num_batches_tracked are torch.equal to torch.nn.BatchNorm{1,2,3}d's over three training
steps, for every dtype, layout, input rank and option; and no collective is issued.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import pytest
import torch

import syncbn
from benchmarks.adversarial import BATCHNORM_BY_DIM
from syncbn.testing import RecordingCommunicator
from test_double_backward import penalty_grads

CHANNELS = 3
SHAPES = {2: (5, CHANNELS), 3: (4, CHANNELS, 6), 4: (3, CHANNELS, 4, 5), 5: (2, CHANNELS, 3, 4, 2)}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (input dtype, parameter dtype): half inputs keep fp32 parameters and buffers (AMP).
DTYPES = {"fp32": (torch.float32, torch.float32), "fp64": (torch.float64, torch.float64),
          "fp16": (torch.float16, torch.float32), "bf16": (torch.bfloat16, torch.float32)}
OPTIONS = list(itertools.product([0.1, None], [True, False], [True, False]))  # momentum, affine, track
LAYOUTS = [(ndim, False) for ndim in SHAPES] + [(ndim, True) for ndim in CHANNELS_LAST]


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if channels_last else x


def _train(layer: torch.nn.Module, ndim: int, channels_last: bool, dtype: torch.dtype,
           steps: int = 3) -> List[Dict[str, Optional[torch.Tensor]]]:
    """Three training steps on seeded data; what each step produced and left behind."""
    generator = torch.Generator().manual_seed(ndim)
    out = []
    for _ in range(steps):
        x = _layout(torch.randn(SHAPES[ndim], generator=generator) * 3 + 1, channels_last).to(dtype)
        dy = _layout(torch.randn(SHAPES[ndim], generator=generator), channels_last).to(dtype)
        x.requires_grad_()
        y = layer(x)
        y.backward(dy)
        record = {"y": y.detach(), "dx": x.grad,
                  "channels_last": y.is_contiguous(memory_format=CHANNELS_LAST[ndim]) if channels_last else None}
        for name, param in layer.named_parameters():
            record["d" + name] = param.grad.clone()
            param.grad = None
        for name, buffer in layer.named_buffers():
            record[name] = buffer.clone()
        out.append(record)
    return out


def _make(cls, momentum: Optional[float], affine: bool, track: bool, param_dtype: torch.dtype, **kwargs):
    layer = cls(CHANNELS, momentum=momentum, affine=affine, track_running_stats=track, **kwargs).to(param_dtype)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
            layer.bias.copy_(torch.linspace(-0.2, 0.2, CHANNELS))
    return layer.train()


def _bitwise_differences(ndim: int, channels_last: bool, dtype: torch.dtype, param_dtype: torch.dtype,
                         candidate=syncbn.SyncBatchNorm) -> List[str]:
    """Every (option, step, quantity) where ``candidate`` is not torch.equal to BatchNorm."""
    problems = []
    for momentum, affine, track in OPTIONS:
        options = f"momentum={momentum} affine={affine} track_running_stats={track}"
        ours = _train(_make(candidate, momentum, affine, track, param_dtype), ndim, channels_last, dtype)
        theirs = _train(_make(BATCHNORM_BY_DIM[ndim], momentum, affine, track, param_dtype),
                        ndim, channels_last, dtype)
        for step, (a, b) in enumerate(zip(ours, theirs)):
            if a.keys() != b.keys():
                problems.append(f"{options} step {step}: recorded {sorted(a)} vs {sorted(b)}")
                continue
            for key in a:
                same = a[key] == b[key] if not isinstance(a[key], torch.Tensor) else (
                    a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]))
                if not same:
                    problems.append(f"{options} step {step}: {key} differs")
    return problems


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("ndim,channels_last", LAYOUTS,
                         ids=[f"{n}d{'_channels_last' if cl else ''}" for n, cl in LAYOUTS])
def test_single_process_is_bitwise_batchnorm_over_three_steps(ndim, channels_last, dtypes):
    problems = _bitwise_differences(ndim, channels_last, *dtypes)
    assert not problems, "\n".join(problems)


def test_harness_finds_batchnorm_bitwise_equal_to_itself():
    # BatchNorm is deterministic here, so a difference above is syncbn's, not noise.
    for (ndim, channels_last), dtypes in itertools.product([(2, False), (4, True)],
                                                           [DTYPES["fp32"], DTYPES["fp16"]]):
        assert not _bitwise_differences(ndim, channels_last, *dtypes, candidate=BATCHNORM_BY_DIM[ndim])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_process_double_backward_is_bitwise_batchnorm(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, CHANNELS, 5, generator=generator).to(dtype)
    g = torch.randn(4, CHANNELS, 5, generator=generator).to(dtype)
    ours = penalty_grads(_make(syncbn.SyncBatchNorm, 0.1, True, True, dtype), x, g)
    theirs = penalty_grads(_make(torch.nn.BatchNorm1d, 0.1, True, True, dtype), x, g)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), f"d/d{name} of ||dL/dx||^2"


def _collectives_in_a_training_step(process_group) -> List[tuple]:
    comm = RecordingCommunicator(syncbn.resolve_communicator(process_group))
    layer = syncbn.SyncBatchNorm(CHANNELS, process_group=comm).train()
    x = torch.randn(4, CHANNELS, 5, requires_grad=True)
    layer(x).sum().backward()
    return comm.calls


def test_single_process_issues_no_collective():
    assert _collectives_in_a_training_step(syncbn.SingleProcessCommunicator()) == []


def _one_rank_group_report() -> Dict[str, List]:
    """Inside a torch.distributed group of size 1: collectives issued, bitwise differences."""
    problems = []
    for ndim, channels_last in [(2, False), (4, True), (5, False)]:
        for dtype, param_dtype in DTYPES.values():
            problems += [f"{ndim}d cl={channels_last} {dtype}: {p}"
                         for p in _bitwise_differences(ndim, channels_last, dtype, param_dtype)]
    return {"calls": _collectives_in_a_training_step(None), "problems": problems}


def test_torch_distributed_group_of_one_is_bitwise_batchnorm_and_issues_no_collective(rank_pool):
    (report,) = rank_pool(1, "gloo").run(_one_rank_group_report)
    assert report["calls"] == [], f"collectives issued in a group of one: {report['calls']}"
    assert not report["problems"], "\n".join(report["problems"])
