"""Communication alone: all-reduce latency of syncbn's payloads, and payload sizes versus
torch.nn.SyncBatchNorm's as the world grows."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch

from syncbn.batchnorm_math import forward_payload_numel

from .plan import Setting
from .rank_setup import rank_tools
from .timing import median_ms

FP64_BYTES, FP32_BYTES = 8, 4


def backward_payload_numel(channels: int) -> int:
    """syncbn's backward all-reduce, fp64 whatever the input dtype: [sum dy (C), sum dy*xhat (C)]."""
    return 2 * channels


def train_payloads(channels: int, world_size: int) -> List[List[object]]:
    """The (numel, dtype) of the all-reduces one syncbn training step makes (none in a group of one)."""
    if world_size == 1:
        return []
    return [[forward_payload_numel(channels), "float64"], [backward_payload_numel(channels), "float64"]]


def forward_payload_bytes(channels: int) -> int:
    return forward_payload_numel(channels) * FP64_BYTES


def torch_forward_gather_bytes(channels: int, world_size: int) -> int:
    """torch.nn.SyncBatchNorm's forward all_gather: (mean C, invstd C, count) fp32 per rank."""
    return world_size * (2 * channels + 1) * FP32_BYTES


def payload_growth(channels: Sequence[int], world_sizes: Sequence[int]) -> List[Dict[str, int]]:
    """Forward bytes each rank receives, syncbn versus torch.nn.SyncBatchNorm (computed).

    The backward payloads are alike (2C values all-reduced in both, fp64 in syncbn, fp32 in
    torch's) and are left out.
    """
    return [
        {"channels": c, "world_size": w, "syncbn_bytes": forward_payload_bytes(c),
         "torch_syncbn_bytes": torch_forward_gather_bytes(c, w)}
        for c in channels for w in world_sizes
    ]


def time_all_reduces(setting: Setting, channels: Sequence[int], reps: int,
                     calls_per_rep: int) -> List[Dict[str, float]]:
    """Median microseconds of one all-reduce of each payload, through syncbn's communicator.

    Each repetition lines the ranks up, then times ``calls_per_rep`` back-to-back calls.
    """
    tools = rank_tools(setting)
    rows = []
    for c in channels:
        row: Dict[str, float] = {"channels": c}
        payloads = {
            "forward": torch.zeros(forward_payload_numel(c), dtype=torch.float64, device=tools.device),
            "backward": torch.zeros(backward_payload_numel(c), dtype=torch.float32, device=tools.device),
        }
        for direction, payload in payloads.items():
            samples = []
            for _ in range(reps + 1):  # the first repetition warms up
                tools.barrier()
                start = time.perf_counter()
                for _ in range(calls_per_rep):
                    tools.comm.all_reduce_sum_(payload)
                tools.sync()
                samples.append((time.perf_counter() - start) / calls_per_rep)
            row[f"{direction}_us"] = 1e3 * median_ms(samples[1:])
            row[f"{direction}_bytes"] = payload.numel() * payload.element_size()
        rows.append(row)
    return rows


def time_all_reduce_sequence(setting: Setting, payloads: Sequence[Tuple[int, str]],
                             reps: int) -> float:
    """Median seconds of all-reducing ``payloads`` ((numel, dtype name) each) one after another,
    as the BatchNorm layers of one training step do; ranks are lined up before each repetition."""
    tools = rank_tools(setting)
    tensors = [torch.zeros(numel, dtype=getattr(torch, dtype), device=tools.device)
               for numel, dtype in payloads]
    samples = []
    for _ in range(reps + 1):  # the first repetition warms up
        tools.barrier()
        start = time.perf_counter()
        for tensor in tensors:
            tools.comm.all_reduce_sum_(tensor)
        tools.sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])
