"""REFERENCE PEER, not part of syncbn: the "naive" SyncBatchNorm of detection codebases.

The design detectron2's NaiveSyncBatchNorm popularized, written here from its description:
each rank takes the per-channel mean and mean of squares of its batch, averages them over the
group with an autograd-aware all-reduce (``torch.distributed.nn.functional.all_reduce``,
whose backward is another all-reduce), and normalizes with plain tensor ops, so autograd
derives the backward pass. That makes one collective each way, like syncbn, but through
several unfused elementwise passes and reductions.

Deliberate traits of the design, kept so the peer is faithful:
- ranks are averaged with equal weight, so it is exact only when every rank has the same
  batch size (the benchmark's case);
- fp16/bf16 input is normalized in fp32 (statistics and output), then cast back;
- it needs torch.distributed: it cannot run over an mpi4py communicator.

Unlike detectron2's it has no single-process shortcut, so world size 1 shows the cost of
its arithmetic.
"""
from __future__ import annotations

import warnings
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.batchnorm_math import reduction_dims

# The issue names this autograd-aware all-reduce; newer torch points to an experimental
# successor, so its deprecation notice is silenced rather than the peer changed.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


class NaiveSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are averaged over torch.distributed's default group."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected (N, C, *) input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        channels = input.shape[1]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = reduction_dims(x.dim())
        local_moments = torch.cat([x.mean(dims), (x * x).mean(dims)])
        world_size = dist.get_world_size()
        moments = dist_autograd.all_reduce(local_moments) / world_size
        mean, mean_of_squares = moments.split(channels)
        var = mean_of_squares - mean * mean
        invstd = torch.rsqrt(var + self.eps)
        scale = invstd if self.weight is None else self.weight * invstd
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(),
                                       world_size * input.numel() // channels)
        view = [1, channels] + [1] * (x.dim() - 2)
        return (x * scale.reshape(view) + shift.reshape(view)).to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        unbiased_var = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)
