"""What each benchmark mode measures: layer shapes, world sizes, repetitions, model size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

# BatchNorm inputs of ResNet-50 (per sample: channels x height x width), one per stage.
RESNET50_LAYERS: Tuple[Tuple[int, Tuple[int, ...]], ...] = (
    (64, (56, 56)),
    (256, (56, 56)),
    (512, (28, 28)),
    (1024, (14, 14)),
    (2048, (7, 7)),
)
# A 3-D BatchNorm input (channels x frames x height x width) of a video ResNet's third stage.
VIDEO_LAYER: Tuple[int, Tuple[int, ...]] = (128, (8, 28, 28))

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerCase:
    """One BatchNorm input: per-rank batch, channels, spatial size, dtype and memory layout."""

    batch: int
    channels: int
    spatial: Tuple[int, ...]
    dtype: str = "fp32"
    layout: str = "contiguous"  # or "channels_last"

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch, self.channels) + self.spatial

    @property
    def layer(self) -> str:
        """The per-sample shape, e.g. ``256x56x56``."""
        return "x".join(str(d) for d in (self.channels,) + self.spatial)

    @property
    def is_resnet50(self) -> bool:
        return (self.channels, self.spatial) in RESNET50_LAYERS

    @property
    def label(self) -> str:
        return f"{self.layer} N={self.batch} {self.dtype} {self.layout}"


@dataclass(frozen=True)
class Setting:
    """Where syncbn runs: a backend ("none" = one process, no communication), ranks, device."""

    backend: str
    world_size: int
    device: str = "cpu"

    @property
    def pool_backend(self) -> str:
        """The RankPool backend that hosts it; "none" runs in a one-rank gloo pool."""
        return "gloo" if self.backend == "none" else self.backend

    @property
    def label(self) -> str:
        backend = "none (1 process)" if self.backend == "none" else self.backend
        suffix = "" if self.device == "cpu" else f" on {self.device}"
        return f"{backend}{suffix}, W={self.world_size}"


@dataclass(frozen=True)
class Plan:
    """``threads_per_rank``: torch threads in each rank. One by default: on a shared, loaded
    machine a rank with more threads than it has idle cores waits at every parallel region
    for a descheduled thread, which made 2-thread timings 10x slower and step-quantized here.
    ``guard_cases``: layer cases timed with syncbn's debug guard on and off (gloo, W=2)."""

    mode: str
    layer_cases: List[LayerCase]
    world_sizes: Tuple[int, ...]
    warmup: int
    reps: int
    comm_channels: Tuple[int, ...]
    comm_reps: int
    comm_calls_per_rep: int
    model_batch: int
    model_width: int
    model_image: int
    model_reps: int
    guard_cases: List[LayerCase]
    threads_per_rank: int = 1
    payload_world_sizes: Tuple[int, ...] = tuple(2**k for k in range(11))  # 1 .. 1024
    payload_channels: Tuple[int, ...] = (64, 2048)
    gpu_batches: Tuple[int, ...] = (16,)


def _cases(layers, batches, dtype: str = "fp32", layout: str = "contiguous") -> List[LayerCase]:
    return [LayerCase(n, c, spatial, dtype, layout) for (c, spatial) in layers for n in batches]


def _all_layers() -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    return RESNET50_LAYERS + (VIDEO_LAYER,)


def plan_for(mode: str) -> Plan:
    """The plan of a mode: "full", "quick" (under 3 minutes on 2 cores) or "smoke" (tests)."""
    if mode == "full":
        return Plan(
            mode,
            _cases(_all_layers(), (2, 8, 16))
            + _cases(_all_layers(), (8,), dtype="bf16")
            + _cases(_all_layers(), (8,), layout="channels_last"),
            world_sizes=(1, 2, 4), warmup=3, reps=9,
            comm_channels=(64, 256, 512, 1024, 2048), comm_reps=9, comm_calls_per_rep=20,
            model_batch=16, model_width=32, model_image=32, model_reps=9,
            guard_cases=_cases((RESNET50_LAYERS[1], RESNET50_LAYERS[-1]), (8,)),
        )
    if mode == "quick":
        small_layers = (RESNET50_LAYERS[0], RESNET50_LAYERS[-1])
        return Plan(
            mode,
            _cases(_all_layers(), (4,))
            + _cases(small_layers[:1], (4,), dtype="bf16")
            + _cases(small_layers[1:], (4,), layout="channels_last"),
            world_sizes=(2, 4), warmup=1, reps=5,  # W=1 without communication only
            comm_channels=(64, 512, 2048), comm_reps=5, comm_calls_per_rep=10,
            model_batch=8, model_width=16, model_image=32, model_reps=4,
            guard_cases=_cases((RESNET50_LAYERS[0], RESNET50_LAYERS[-1]), (4,)),
            gpu_batches=(8,),
        )
    if mode == "smoke":
        tiny = ((8, (6, 6)), (2048, (1, 1)), (4, (2, 3, 3)))
        return Plan(
            mode,
            _cases(tiny[:2], (2,)) + _cases(tiny[2:], (2,), layout="channels_last")
            + _cases(tiny[:1], (2,), dtype="bf16"),
            world_sizes=(2,), warmup=1, reps=2,
            comm_channels=(8,), comm_reps=2, comm_calls_per_rep=2,
            model_batch=2, model_width=4, model_image=8, model_reps=2,
            guard_cases=_cases(tiny[:1], (2,)),
            payload_world_sizes=(1, 2, 4), gpu_batches=(2,),
        )
    raise ValueError(f"unknown mode {mode!r}: expected full, quick or smoke")


@dataclass(frozen=True)
class OverheadPlan:
    """The host-overhead section (issue 16): tiny layers, where the host dominates, and
    ResNet-50's layers at 2 samples per rank; a sample times ``inner`` steps (``inner_tiny``
    for the tiny layers); settings: one process and 2 ranks per backend."""

    cases: List[LayerCase]
    warmup: int
    reps: int
    inner_tiny: int
    inner: int
    world_sizes: Tuple[int, ...] = (2,)


@dataclass(frozen=True)
class CompilePlan:
    """The compile section: SmallResNet with syncbn.SyncBatchNorm, eager vs torch.compile."""

    batch: int
    width: int
    image: int
    warmup: int
    reps: int


TINY_LAYERS: Tuple[Tuple[int, Tuple[int, ...]], ...] = ((64, (1, 1)), (256, (7, 7)), (2048, (1, 1)))


def overhead_plan_for(mode: str) -> OverheadPlan:
    if mode == "smoke":
        return OverheadPlan(_cases(TINY_LAYERS[:1], (2,)) + _cases(RESNET50_LAYERS[-1:], (2,)),
                            warmup=1, reps=2, inner_tiny=2, inner=1)
    return OverheadPlan(_cases(TINY_LAYERS + RESNET50_LAYERS, (2,)), warmup=3, reps=9,
                        inner_tiny=20, inner=2)


def compile_plan_for(mode: str) -> CompilePlan:
    if mode == "smoke":
        return CompilePlan(batch=2, width=4, image=8, warmup=1, reps=2)
    return CompilePlan(batch=8, width=16, image=32, warmup=3, reps=9)
