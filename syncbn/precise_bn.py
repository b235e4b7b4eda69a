"""Precise BatchNorm statistics: the exact population mean and variance over many batches.

After training, each BatchNorm's running statistics are an exponential average of batch
statistics taken while the weights still moved. :func:`precise_bn` (detectron2/fvcore's
``update_bn_stats``, pycls/mmengine's PreciseBN) recomputes them with the weights fixed, as
the mean and variance over every value the layer sees in ``num_batches`` batches of every
rank: the variance of all samples, which is the mean of the batch variances plus the
variance of the batch means (averaging batch variances alone misses the second term).

Each layer's per-channel count, sum and sum of squares are accumulated in fp64 about a
shift that every rank shares (the group's average running mean before the run, close to the
mean being measured), so neither the batches nor the ranks cancel digits when merged.

Communication: one all-reduce for all the shifts before the first batch, and one for every
layer's sums after the last; none per batch or per layer. During the passes the model's
syncbn layers (SyncBatchNorm, SyncBatchNormAct) normalize with their rank's own batch
statistics, as torch's BatchNorm does, so their forward synchronizes nothing either; the
statistics each layer records are still pooled over every rank. So ranks may also run
different numbers of batches (a loader without padding): every value counts once.
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Iterable, List, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm_math import channel_view, local_count, reduction_dims
from .comm import Communicator, SingleProcessCommunicator, resolve_communicator
from .module import SyncBatchNorm

__all__ = ["precise_bn"]


class _PopulationSums:
    """Per-channel count, sum (x - shift) and sum (x - shift)^2 of one layer's inputs, in fp64."""

    def __init__(self, layer: _BatchNorm, shift: torch.Tensor) -> None:
        self.layer = layer
        self.shift = shift
        self.count = 0
        self.centred_sum = torch.zeros_like(shift)
        self.centred_square_sum = torch.zeros_like(shift)

    def add(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook: accumulate the layer's input."""
        x = args[0].detach()
        centred = x.to(torch.float64) - channel_view(self.shift, x.dim())
        dims = reduction_dims(x.dim())
        self.centred_sum += centred.sum(dims)
        self.centred_square_sum += centred.square().sum(dims)
        self.count += local_count(x)

    def payload(self) -> torch.Tensor:
        """[count, sum (x - shift) (C), sum (x - shift)^2 (C)] of this rank, fp64."""
        count = self.centred_sum.new_tensor([float(self.count)])
        return torch.cat([count, self.centred_sum, self.centred_square_sum])

    def write_population_statistics(self, payload: torch.Tensor) -> None:
        """Set running_mean and running_var from the payload summed over the group.

        running_var gets the unbiased variance, as BatchNorm stores it: what the layer would
        hold after one batch made of every value, with momentum None.
        """
        payload = payload.to(self.shift.device)
        total = payload[0].item()
        if total == 0:  # the layer saw no values on any rank: keep its statistics
            return
        channels = self.shift.numel()
        mean_offset = payload[1:1 + channels] / total
        biased_var = (payload[1 + channels:] / total - mean_offset.square()).clamp_min(0)
        unbiased_var = biased_var * (total / (total - 1)) if total > 1 else biased_var
        with torch.no_grad():
            self.layer.running_mean.copy_(self.shift + mean_offset)
            self.layer.running_var.copy_(unbiased_var)


def _shared_shifts(layers: List[_BatchNorm], comm: Communicator) -> List[torch.Tensor]:
    """Every layer's running mean averaged over the group, in fp64: one collective for all."""
    device = layers[0].running_mean.device
    means = [torch.nan_to_num(layer.running_mean.detach().to(device, torch.float64),
                              nan=0.0, posinf=0.0, neginf=0.0) for layer in layers]
    packed = torch.cat(means)
    comm.label = "precise_bn's all-reduce of the shifts"
    comm.all_reduce_sum_(packed)
    packed /= comm.size
    sizes = [mean.numel() for mean in means]
    return [shift.to(layer.running_mean.device)
            for shift, layer in zip(packed.split(sizes), layers)]


# The group syncbn's layers normalize over during precise_bn's passes: this rank alone.
_THIS_RANK_ALONE = SingleProcessCommunicator()


def precise_bn(model: torch.nn.Module, batches: Iterable[Any], num_batches: int = 200,
               process_group: Any = None, *, progress: Optional[bool] = None) -> int:
    """Set every BatchNorm's running statistics to its inputs' population mean and variance.

    Runs ``model(batch)`` in training mode, without gradients, for the first ``num_batches``
    items of ``batches`` on each rank (pass the inputs only, e.g. ``(x for x, _ in loader)``),
    and pools the values each layer sees over those batches and over every rank of
    ``process_group`` (same meaning as SyncBatchNorm's; default: the default group). Works
    for syncbn.SyncBatchNorm and torch's BatchNorm layers alike; layers without running
    statistics are skipped, and a layer that saw no values keeps its statistics.

    Two all-reduces in all, whatever the model: during the passes, syncbn's layers normalize
    with this rank's batch statistics (torch's BatchNorm does the same), so ranks may run
    different numbers of batches. The batches are never modified (a SyncBatchNormAct runs out
    of place under no_grad). The training flags, momentum, num_batches_tracked and the layers'
    process groups are restored afterwards. ``progress``: show a tqdm bar (default: on rank 0
    when stderr is a terminal; needs tqdm). Returns the number of batches this rank ran.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    comm = resolve_communicator(process_group)
    sums = [_PopulationSums(layer, shift) for layer, shift in zip(layers, _shared_shifts(layers, comm))]
    training = {module: module.training for module in model.modules()}
    saved = [(layer.momentum, layer.num_batches_tracked.clone()) for layer in layers]
    synchronized = {m: m.process_group for m in model.modules() if isinstance(m, SyncBatchNorm)}
    hooks = [layer.register_forward_pre_hook(accumulator.add)
             for layer, accumulator in zip(layers, sums)]
    if progress is None:
        progress = comm.rank == 0 and sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm  # only needed for the bar

        bar = tqdm(total=num_batches, desc="precise_bn", unit="batch")
    ran = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # the passes must not move the statistics being replaced
        for layer in synchronized:
            layer.process_group = _THIS_RANK_ALONE
        model.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                model(batch)
                ran += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for hook in hooks:
            hook.remove()
        for module, flag in training.items():
            module.training = flag
        for layer, (momentum, tracked) in zip(layers, saved):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)
        for layer, group in synchronized.items():
            layer.process_group = group
    payloads = [accumulator.payload() for accumulator in sums]
    packed = torch.cat([payload.to(payloads[0].device) for payload in payloads])
    comm.label = f"precise_bn's all-reduce of the population sums of {len(sums)} layers"
    comm.all_reduce_sum_(packed)
    for accumulator, reduced in zip(sums, packed.split([payload.numel() for payload in payloads])):
        accumulator.write_population_statistics(reduced)
    return ran
