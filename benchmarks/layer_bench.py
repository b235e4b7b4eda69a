"""One BatchNorm layer, forward+backward, syncbn against its peers; run on every rank."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import syncbn

from .comm_bench import backward_payload_numel, forward_payload_numel
from .naive_syncbn import NaiveSyncBatchNorm
from .plan import DTYPES, LayerCase, Setting
from .rank_setup import rank_tools
from .timing import Peer, TimingCommunicator, time_interleaved

_BATCHNORM_BY_NDIM = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
_CHANNELS_LAST_BY_NDIM = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_layer_input(case: LayerCase, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the case's shape, dtype and layout; x requires grad."""
    generator = torch.Generator().manual_seed(case.channels * 1000 + case.batch)
    x = torch.randn(case.shape, generator=generator).to(device, DTYPES[case.dtype])
    dy = torch.randn(case.shape, generator=generator).to(device, DTYPES[case.dtype])
    if case.layout == "channels_last":
        layout = _CHANNELS_LAST_BY_NDIM[x.dim()]
        x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
    return x.requires_grad_(), dy


def training_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """Forward, then the gradients of input, weight and bias (nothing accumulates)."""
    wrt = [x] + list(module.parameters())

    def step() -> None:
        torch.autograd.grad(module(x), wrt, dy)

    return step


def _torch_syncbn_peer(channels: int, x: torch.Tensor, dy: torch.Tensor) -> Union[Peer, str]:
    """torch.nn.SyncBatchNorm as a peer where it runs; else why not (it raises on CPU)."""
    if not dist.is_initialized():
        return "n/a (needs torch.distributed)"
    module = torch.nn.SyncBatchNorm(channels).to(x.device)
    step = training_step(module, x, dy)
    try:
        step()
    except (ValueError, RuntimeError) as exc:
        return "n/a (CPU)" if x.device.type == "cpu" else f"n/a ({type(exc).__name__}: {exc})"
    return Peer("torch.nn.SyncBatchNorm", step)


def _peers(case: LayerCase, x: torch.Tensor, dy: torch.Tensor, timing_comm: TimingCommunicator,
           syncbn_layer: syncbn.SyncBatchNorm) -> Tuple[List[Peer], Optional[str]]:
    device = x.device
    plain = _BATCHNORM_BY_NDIM[x.dim()](case.channels).to(device)
    peers: List[Peer] = [
        Peer("BatchNorm", training_step(plain, x, dy)),
        Peer("syncbn", training_step(syncbn_layer, x, dy), timing_comm),
    ]
    if dist.is_initialized():  # the naive peer needs torch.distributed
        peers.append(Peer("naive", training_step(NaiveSyncBatchNorm(case.channels).to(device), x, dy)))
    torch_peer = _torch_syncbn_peer(case.channels, x, dy)
    if isinstance(torch_peer, Peer):
        peers.append(torch_peer)
        torch_peer = None
    return peers, torch_peer


def _collective_audit(layer: syncbn.SyncBatchNorm, comm: TimingCommunicator, x: torch.Tensor,
                      dy: torch.Tensor) -> Dict[str, object]:
    """The all-reduces of one training step (numel, dtype) and how many an eval forward makes."""
    comm.reset()
    training_step(layer, x, dy)()
    train_payloads = [[numel, str(dtype).replace("torch.", "")] for numel, dtype in comm.calls]
    comm.reset()
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    return {"train_payloads": train_payloads, "collectives_eval": len(comm.calls)}


def time_layer_case(setting: Setting, case: LayerCase, warmup: int, reps: int) -> Dict[str, object]:
    """This rank's medians for every peer on ``case``, with syncbn's comm/compute split."""
    tools = rank_tools(setting)
    x, dy = make_layer_input(case, tools.device)
    timing_comm = TimingCommunicator(tools.comm)
    layer = syncbn.SyncBatchNorm(case.channels, process_group=timing_comm, debug=False).to(tools.device)
    peers, torch_syncbn_note = _peers(case, x, dy, timing_comm, layer)
    samples = time_interleaved(peers, warmup, reps, tools.barrier, tools.sync)
    return {
        "threads_per_rank": tools.threads,
        "peers": {name: s.summary() for name, s in samples.items()},
        "torch_syncbn_note": torch_syncbn_note,
        **_collective_audit(layer, timing_comm, x, dy),
    }


def time_guard_case(setting: Setting, case: LayerCase, warmup: int, reps: int) -> Dict[str, object]:
    """This rank's medians of syncbn with the debug guard off and on (syncbn/guard.py), with
    each one's collective count per step (the guard adds a fingerprint all-reduce before each)."""
    tools = rank_tools(setting)
    x, dy = make_layer_input(case, tools.device)
    peers = []
    for name, debug in (("syncbn", False), ("syncbn debug=True", True)):
        comm = TimingCommunicator(tools.comm)
        layer = syncbn.SyncBatchNorm(case.channels, process_group=comm, debug=debug).to(tools.device)
        peers.append(Peer(name, training_step(layer, x, dy), comm))
    samples = time_interleaved(peers, warmup, reps, tools.barrier, tools.sync)
    return {"threads_per_rank": tools.threads, "peers": {n: s.summary() for n, s in samples.items()}}


def profile_layer_case(setting: Setting, case: LayerCase, steps: int,
                       rows: int = 12) -> Dict[str, str]:
    """torch.profiler tables (ops by self CPU time) of BatchNorm, syncbn and, where
    torch.distributed is up, the naive peer on ``case``."""
    tools = rank_tools(setting)
    x, dy = make_layer_input(case, tools.device)
    modules: Dict[str, torch.nn.Module] = {
        "BatchNorm": _BATCHNORM_BY_NDIM[x.dim()](case.channels),
        "syncbn": syncbn.SyncBatchNorm(case.channels, process_group=tools.comm, debug=False),
    }
    if dist.is_initialized():
        modules["naive"] = NaiveSyncBatchNorm(case.channels)
    tables = {}
    for name, module in modules.items():
        step = training_step(module.to(tools.device), x, dy)
        for _ in range(2):  # warm-up
            step()
        tools.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return tables


def _repeated(step: Callable[[], None], times: int) -> Callable[[], None]:
    """``times`` steps back to back: one timed sample of a step too short for the timer alone."""
    def run() -> None:
        for _ in range(times):
            step()

    return run


def time_overhead_case(setting: Setting, case: LayerCase, warmup: int, reps: int,
                       inner: int) -> Dict[str, object]:
    """Host overhead of one layer: forward+backward of torch BatchNorm and of syncbn, and
    syncbn's two all-reduces alone (its forward and backward payloads, through the same
    communicator), interleaved in the same rank; each sample runs ``inner`` steps."""
    tools = rank_tools(setting)
    x, dy = make_layer_input(case, tools.device)
    plain = _BATCHNORM_BY_NDIM[x.dim()](case.channels).to(tools.device)
    layer = syncbn.SyncBatchNorm(case.channels, process_group=tools.comm, debug=False).to(tools.device)
    payloads = [torch.zeros(forward_payload_numel(case.channels), dtype=torch.float64,
                            device=tools.device),
                torch.zeros(backward_payload_numel(case.channels), dtype=torch.float32,
                            device=tools.device)]

    def all_reduces() -> None:
        for payload in payloads:
            tools.comm.all_reduce_sum_(payload)

    peers = [Peer("BatchNorm", _repeated(training_step(plain, x, dy), inner)),
             Peer("syncbn", _repeated(training_step(layer, x, dy), inner)),
             Peer("all-reduces", _repeated(all_reduces, inner))]
    samples = time_interleaved(peers, warmup, reps, tools.barrier, tools.sync)
    return {"threads_per_rank": tools.threads,
            "peers": {name: {"ms": s.summary()["ms"] / inner} for name, s in samples.items()}}
