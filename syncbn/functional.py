"""``sync_batch_norm``: torch.nn.functional.batch_norm with statistics synchronized over a group.

Exactly one all-reduce in the forward pass (count, sums, squared sums and an invalid-input
flag: 2C+2 fp64 values) and one in the backward pass (sum dy, sum dy*xhat: 2C values),
whatever the world size. Every rank issues them in the same order whatever its batch, an
empty or invalid one included, so no rank is left waiting alone.

Errors that depend on the whole group (a single value per channel, a rank's invalid input,
non-finite statistics with ``check_finite``) are read from the reduced payload, so every
rank raises together. On CPU that read is free; on GPU it would be a host sync, so there it
happens only with the debug guard on (``SYNCBN_DEBUG=1``) or ``check_finite``: without them a
rank with invalid input raises alone and the others fail at their next collective, and a
single value per channel raises only where the host knows it from shapes (a group of one,
like torch's BatchNorm); in a larger group it normalizes with a variance of 0 instead.
So a GPU training step reads nothing back from the device (CUDA graphs, torch.compile).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import batchnorm_math as bnm
from .comm import Communicator, resolve_communicator
from .guard import CollectiveError, all_reduce, debug_enabled

__all__ = ["sync_batch_norm", "input_problem"]


def input_problem(x: torch.Tensor, num_features: Optional[int], layer: str,
                  reference: Optional[torch.Tensor] = None) -> Optional[Exception]:
    """The error input ``x`` deserves (not raised), or None if BatchNorm accepts it.

    ``reference``: a parameter or buffer of the layer; ``x`` must be on its device.
    """
    if x.dim() < 2:
        return ValueError(f"{layer}: expected input of shape (N, C) or (N, C, *), got "
                          f"{x.dim()}-D input of shape {tuple(x.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        return ValueError(f"{layer}: expected {num_features} channels in dim 1, got input of "
                          f"shape {tuple(x.shape)}")
    if not x.is_floating_point():
        return TypeError(f"{layer}: expected a floating-point input, got {x.dtype}")
    if reference is not None and x.device != reference.device:
        return ValueError(f"{layer}: input is on {x.device} but the layer's parameters and "
                          f"buffers are on {reference.device}")
    return None


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, comm: Communicator, layer: str, debug: bool, check_finite: bool):
        channels = x.shape[1]
        local = bnm.forward_payload(x)
        payload = torch.cat([local, local.new_zeros(1)])  # last slot: ranks with invalid input
        all_reduce(comm, payload, layer, "forward", channels, x.dtype, debug)
        count, mean, var = bnm.global_moments(payload[:-1])
        if payload.device.type == "cpu" or debug or check_finite:  # free on CPU, a sync on GPU
            _raise_group_errors(payload, local, comm, layer, x, check_finite)
        elif comm.size == 1 and bnm.local_count(x) == 1:  # known from the shape: no sync
            raise _single_value_error(layer, comm, x)
        # Activation checkpointing re-runs this forward inside backward: the running
        # statistics were already updated by the first run of this step.
        recomputing = torch._C._current_graph_task_id() != -1
        if running_mean is not None and not recomputing:
            bnm.update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                     count, mean, var)
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps, ctx.comm, ctx.layer, ctx.debug = eps, comm, layer, debug
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
            global_sums = all_reduce(ctx.comm, local_sums.clone(), ctx.layer, "backward",
                                     channels, x.dtype, ctx.debug)
            grad_x = bnm.input_grad(dy, x, mean, var, weight, ctx.eps, global_sums, count)
        return (grad_x, grad_weight, grad_bias) + (None,) * 9


def _raise_group_errors(payload: torch.Tensor, local: torch.Tensor, comm: Communicator,
                        layer: str, x: torch.Tensor, check_finite: bool) -> None:
    """Errors every rank can see in the reduced payload, so all of them raise together."""
    invalid_ranks = int(payload[-1].item())
    if invalid_ranks:
        raise CollectiveError(f"{layer}: {invalid_ranks} other rank(s) gave this layer invalid "
                              "input (see their error); no statistics were updated")
    global_count = int(payload[0].item())
    if global_count == 1:
        raise _single_value_error(layer, comm, x)
    if check_finite and not bool(torch.isfinite(payload).all()):
        where = "including this rank's" if not bool(torch.isfinite(local).all()) else "not this rank's"
        raise FloatingPointError(f"{layer}: the batch has NaN or Inf values ({where}); running "
                                 "statistics were left untouched")


def _single_value_error(layer: str, comm: Communicator, x: torch.Tensor) -> ValueError:
    return ValueError(f"{layer}: expected more than 1 value per channel when training, got 1 "
                      f"in the whole group (input shape on rank {comm.rank}: {tuple(x.shape)})")


def _report_invalid_input(comm: Communicator, channels: int, device: torch.device, layer: str,
                          problem: Exception, debug: bool) -> None:
    """Join the forward all-reduce with an invalid-input flag so the others raise too, then raise."""
    if comm.size > 1:
        payload = torch.zeros(2 * channels + 2, dtype=torch.float64, device=device)
        payload[-1] = 1.0
        all_reduce(comm, payload, layer, "forward", channels, torch.float32, debug)
    raise problem


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
    debug: Optional[bool] = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm, with batch statistics taken over ``process_group``.

    ``process_group``: None (default group: torch.distributed if initialized, else MPI's world
    when launched by mpiexec, else this process alone), a torch.distributed ProcessGroup, an
    mpi4py communicator, or a :class:`syncbn.comm.Communicator`.

    Beyond F.batch_norm: ``num_batches_tracked`` (if given) is incremented when the group saw
    any value, and ``momentum=None`` means the cumulative average 1 / num_batches_tracked.
    A group that saw no value leaves the running statistics untouched. In evaluation
    (``training=False`` with running statistics) nothing is communicated. ``layer`` names the
    layer in errors; ``debug`` turns the collective cross-check on (default: SYNCBN_DEBUG);
    ``check_finite`` refuses NaN/Inf batches, on every rank, before running stats change
    (on GPU at the cost of one host sync per layer).
    """
    reference = next((t for t in (weight, running_mean) if t is not None), None)
    channels = reference.shape[0] if reference is not None else (input.shape[1] if input.dim() >= 2 else None)
    problem = input_problem(input, channels, layer, reference)
    if not training:
        if problem is not None:
            raise problem
        if running_mean is None or running_var is None:
            # Batch statistics without running ones, like torch.nn.SyncBatchNorm in eval: local.
            return torch.batch_norm(input, weight, bias, None, None, True, 0.0, eps,
                                    torch.backends.cudnn.enabled)
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    comm = resolve_communicator(process_group)
    debug = debug_enabled(debug)
    if problem is not None:
        if channels is None:
            raise problem  # no channel count to size the shared payload by
        device = reference.device if reference is not None else input.device
        _report_invalid_input(comm, channels, device, layer, problem, debug)
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, comm, layer, debug,
                                        check_finite)
