"""torch.compile: no graph break, and compiled training equals eager on two gloo ranks.

The collectives, and the host checks of the reduced payload, are custom operators
(``syncbn::sync_moments``, ``syncbn::all_reduce``) that dynamo does not enter, and the
communicator is resolved outside the trace, so a model with SyncBatchNorm compiles whole.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

import syncbn
from scenarios import IdenticalPeers

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile (inductor) needs a C++ compiler on CPU")


def _conv_bn_relu(process_group=None) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), syncbn.SyncBatchNorm(8, process_group=process_group),
                               torch.nn.ReLU())


class _Block(torch.nn.Module):
    """A residual block: two conv/SyncBatchNorm pairs and a shortcut."""

    def __init__(self, channels: int, process_group=None):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = syncbn.SyncBatchNorm(channels, process_group=process_group)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = syncbn.SyncBatchNorm(channels, process_group=process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _small_resnet(process_group=None) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), syncbn.SyncBatchNorm(8, process_group=process_group),
        torch.nn.ReLU(), _Block(8, process_group), _Block(8, process_group),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("build", [_conv_bn_relu, _small_resnet], ids=["conv_bn_relu", "small_resnet"])
@pytest.mark.parametrize("group", ["alone", "two_ranks"])
def test_dynamo_finds_no_graph_break(build, group):
    process_group = IdenticalPeers(2) if group == "two_ranks" else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(build(process_group))(torch.randn(2, 3, 8, 8))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _compiled_and_eager_steps(steps: int) -> dict:
    """Three training steps of the small ResNet, compiled with fullgraph=True and eager."""
    rank = syncbn.resolve_communicator().rank
    eager = _small_resnet()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    results = {}
    for label, model, module in (("compiled", compiled, compiled_model), ("eager", eager, eager)):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        outputs = []
        for step in range(steps):
            generator = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(2 + rank, 3, 8, 8, generator=generator)  # uneven ranks
            y = model(x)
            y.square().mean().backward()
            outputs.append(y.detach())
            grads = [p.grad.clone() for p in module.parameters()]
            optimizer.step()
            optimizer.zero_grad()
        results[label] = dict(outputs=outputs, grads=grads,
                              buffers={k: v.clone() for k, v in module.named_buffers()})
    torch._dynamo.reset()
    return results


def test_compiled_training_equals_eager_on_two_gloo_ranks(rank_pool):
    for result in rank_pool(2, "gloo").run(_compiled_and_eager_steps, 3, timeout=600):
        compiled, eager = result["compiled"], result["eager"]
        # fp32 tolerance: inductor fuses and reorders the conv and elementwise arithmetic.
        for got, want in zip(compiled["outputs"], eager["outputs"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got, want in zip(compiled["grads"], eager["grads"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for name, want in eager["buffers"].items():
            torch.testing.assert_close(compiled["buffers"][name], want, rtol=1e-5, atol=1e-6)
