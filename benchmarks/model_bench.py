"""A whole-model training step: a small ResNet with BatchNorm after every convolution."""
from __future__ import annotations

import functools
import time
from typing import Callable, Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn

from .naive_syncbn import NaiveSyncBatchNorm
from .plan import Setting
from .rank_setup import rank_tools
from .timing import Peer, TimingCommunicator, time_interleaved

NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by a norm; a 1x1 conv + norm shortcut on a shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + three stages (width, 2x, 4x channels; 9 norm layers), for 3-channel images."""

    def __init__(self, norm: NormFactory, width: int, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1, norm),
            BasicBlock(width, 2 * width, 2, norm),
            BasicBlock(2 * width, 4 * width, 2, norm),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


def norm_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _model_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    return step


def time_model_step(setting: Setting, batch: int, width: int, image: int, warmup: int,
                    reps: int) -> Dict[str, object]:
    """This rank's median step time per norm flavour, from identical initial weights."""
    tools = rank_tools(setting)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=generator).to(tools.device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(tools.device)
    timing_comm = TimingCommunicator(tools.comm)
    norms: Dict[str, NormFactory] = {
        "BatchNorm": nn.BatchNorm2d,
        "syncbn": functools.partial(syncbn.SyncBatchNorm, process_group=timing_comm, debug=False),
    }
    if dist.is_initialized():
        norms["naive"] = NaiveSyncBatchNorm
    peers = []
    for name, norm in norms.items():
        torch.manual_seed(0)
        model = SmallResNet(norm, width).to(tools.device)
        peers.append(Peer(name, _model_step(model, images, labels),
                          timing_comm if name == "syncbn" else None))
    samples = time_interleaved(peers, warmup, reps, tools.barrier, tools.sync)
    return {
        "threads_per_rank": tools.threads,
        "norm_layers": norm_layer_count(model),
        "peers": {name: s.summary() for name, s in samples.items()},
    }


def time_compiled_step(setting: Setting, batch: int, width: int, image: int, warmup: int,
                       reps: int) -> Dict[str, object]:
    """This rank's median training-step time of SmallResNet with syncbn.SyncBatchNorm, eager
    against ``torch.compile`` (same initial weights, interleaved), the first compiled step's
    time (compilation included) and the graphs and graph breaks ``torch._dynamo.explain`` finds
    in the forward."""
    tools = rank_tools(setting)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=generator).to(tools.device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(tools.device)
    norm = functools.partial(syncbn.SyncBatchNorm, process_group=tools.comm, debug=False)
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = SmallResNet(norm, width).to(tools.device)
    explanation = torch._dynamo.explain(models["compiled"])(images)
    torch._dynamo.reset()
    compiled = torch.compile(models["compiled"])
    tools.barrier()
    start = time.perf_counter()
    _model_step(compiled, images, labels)()
    tools.sync()
    first_step_s = time.perf_counter() - start
    peers = [Peer("eager", _model_step(models["eager"], images, labels)),
             Peer("compiled", _model_step(compiled, images, labels))]
    samples = time_interleaved(peers, warmup, reps, tools.barrier, tools.sync)
    return {"threads_per_rank": tools.threads, "norm_layers": norm_layer_count(models["eager"]),
            "first_compiled_step_s": first_step_s, "graphs": explanation.graph_count,
            "graph_breaks": explanation.graph_break_count,
            "peers": {name: s.summary() for name, s in samples.items()}}
