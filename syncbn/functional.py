"""``sync_batch_norm``: torch.nn.functional.batch_norm with statistics synchronized over a group.

Exactly one all-reduce in the forward pass (count, sums, squared sums: 2C+1 fp64 values) and
one in the backward pass (sum dy, sum dy*xhat: 2C values), whatever the world size. Every rank
issues them in the same order whatever its batch, an empty one included, so none waits alone.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import batchnorm_math as bnm
from .comm import Communicator, resolve_communicator

__all__ = ["sync_batch_norm", "validate_input"]


def validate_input(x: torch.Tensor, num_features: Optional[int], layer: str) -> None:
    """Raise a clear error for input no BatchNorm accepts; called before any collective."""
    if x.dim() < 2:
        raise ValueError(
            f"{layer}: expected input of shape (N, C) or (N, C, *), got {x.dim()}-D input "
            f"of shape {tuple(x.shape)}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels in dim 1, got input of shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{layer}: expected a floating-point input, got {x.dtype}")


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, comm: Communicator, layer: str):
        payload = comm.all_reduce_sum_(bnm.forward_payload(x))
        count, mean, var = bnm.global_moments(payload)
        if payload.device.type == "cpu":
            # Every rank holds the same reduced count, so all raise together: no rank waits.
            global_count = int(count.item())
            if global_count == 1:
                raise ValueError(
                    f"{layer}: expected more than 1 value per channel when training, got 1 in "
                    f"the whole group (input shape on rank {comm.rank}: {tuple(x.shape)})"
                )
        if running_mean is not None:
            bnm.update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                     count, mean, var)
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        ctx.comm = comm
        return bnm.normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, count = ctx.saved_tensors
        dy = dy.contiguous(memory_format=_memory_format(x))
        local_sums = bnm.backward_payload(dy, x, mean, var, ctx.eps)
        channels = x.shape[1]
        grad_weight = grad_bias = grad_x = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sums[channels:].to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = local_sums[:channels].to(weight.dtype)
        if ctx.needs_input_grad[0]:
            global_sums = ctx.comm.all_reduce_sum_(local_sums.clone())
            grad_x = bnm.input_grad(dy, x, mean, var, weight, ctx.eps, global_sums, count)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    layer: str = "sync_batch_norm",
) -> torch.Tensor:
    """torch.nn.functional.batch_norm, with batch statistics taken over ``process_group``.

    ``process_group``: None (default group: torch.distributed if initialized, else MPI's world
    when launched by mpiexec, else this process alone), a torch.distributed ProcessGroup, an
    mpi4py communicator, or a :class:`syncbn.comm.Communicator`.

    Beyond F.batch_norm: ``num_batches_tracked`` (if given) is incremented when the group saw
    any value, and ``momentum=None`` means the cumulative average 1 / num_batches_tracked.
    A group that saw no value leaves the running statistics untouched. In evaluation
    (``training=False`` with running statistics) nothing is communicated.
    """
    validate_input(input, None, layer)
    if not training:
        if running_mean is None or running_var is None:
            # Batch statistics without running ones, like torch.nn.SyncBatchNorm in eval: local.
            return torch.batch_norm(input, weight, bias, None, None, True, 0.0, eps,
                                    torch.backends.cudnn.enabled)
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    comm = resolve_communicator(process_group)
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, comm, layer)
