"""``sync_batch_norm``: torch.nn.functional.batch_norm with statistics synchronized over a group.

In a group of one it *is* torch's batch_norm (same op, same running-stat update), bitwise, and
communicates nothing. In a larger group: one all-reduce in the forward pass (count, sums and
squared sums about a shift every rank shares, an invalid-input flag, a count of fp64 ranks and
two values that check the ranks share the shift: 2C+5 fp64 values) and one in the backward pass
(sum dy, sum dy*xhat: 2C fp64 values), whatever the world size. Every rank issues them in the same order whatever its batch, an empty or invalid
one included, so no rank is left waiting alone. On CPU, a second forward all-reduce of 2C+1
values follows when the first shows the merge was ill-conditioned (see
batchnorm_math.ill_conditioned), decided on every rank from the same reduced payload.

Errors that depend on the whole group (a single value per channel, a rank's invalid input,
running means that differ across ranks, non-finite statistics with ``check_finite``) are read
from the reduced payload, so every rank raises together. On CPU that read is free; on GPU it
would be a host sync, so there it happens only with the debug guard on (``SYNCBN_DEBUG=1``) or
``check_finite``: without them a rank with invalid input raises alone and the others fail at
their next collective, a single value per channel normalizes with a variance of 0 instead of
raising, and running means that differ across ranks go unnoticed.
So a GPU training step reads nothing back from the device (CUDA graphs, torch.compile).

torch.compile: the collectives and the host reads live inside custom operators
(``syncbn::sync_moments``, ``syncbn::all_reduce``), which dynamo does not enter, so a model
compiles without a graph break. Double backward: under ``create_graph=True`` the backward is
rebuilt from differentiable ops and the differentiable all-reduce, so second-order gradients
are those of BatchNorm on the global batch.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import batchnorm_math as bnm
from .comm import Communicator, resolve_communicator
from .guard import (CollectiveError, all_reduce, all_reduce_copy, communicator_for, communicator_key,
                    debug_enabled)

__all__ = ["sync_batch_norm", "input_problem", "recomputing_checkpoint", "resolve_once", "group_of",
           "group_statistics", "update_running_stats_once", "backward_sums", "report_invalid_input",
           "eps_problem", "memory_format", "forward_payload_numel"]

Tensor = torch.Tensor

# The forward payload ends with four values every rank adds to: how many ranks had invalid input;
# how many had fp64 input (the precision the merge must keep, decided alike on every rank); the
# squared norm of the rank's shift, and its square (ranks agree on the shift when these two show
# no spread over ranks; see _shift_differs).
_INVALID, _FP64, _SHIFT_NORM, _SHIFT_NORM_SQ = -4, -3, -2, -1
_FLAGS = 4


class _GroupTotals(NamedTuple):
    """What the host reads of the reduced forward payload, in one read."""

    count: float
    invalid_ranks: float
    fp64_ranks: float
    shift_norm: float
    shift_norm_sq: float


_HOST_READ = [0, _INVALID, _FP64, _SHIFT_NORM, _SHIFT_NORM_SQ]


def forward_payload_numel(channels: int) -> int:
    """Values (fp64) in a layer's forward all-reduce: count, two sums per channel, the flags."""
    return 2 * channels + 1 + _FLAGS


def input_problem(x: Tensor, num_features: Optional[int], layer: str,
                  reference: Optional[Tensor] = None) -> Optional[Exception]:
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


# (id of the process_group argument, whether torch.distributed is initialized) -> communicator
_resolved: Dict[Tuple[int, bool], Communicator] = {}


def resolve_once(process_group: Any) -> Communicator:
    """resolve_communicator, once per group: later calls return the same communicator."""
    if isinstance(process_group, Communicator):
        return process_group
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    key = (id(process_group), initialized)
    comm = _resolved.get(key)
    if comm is None:
        comm = _resolved[key] = resolve_communicator(process_group)
    return comm


@torch.compiler.assume_constant_result
def group_of(process_group: Any) -> Tuple[int, int]:
    """(communicator key, group size) of ``process_group``: plain ints, which torch.compile
    bakes into its graph, calling this at trace time rather than tracing the resolution."""
    comm = resolve_once(process_group)
    return communicator_key(comm), comm.size


def eps_problem(eps: float, training: bool, layer: str) -> Optional[ValueError]:
    # torch 2.13's F.batch_norm: eps must be positive in training, non-negative in eval.
    if training and eps <= 0:
        return ValueError(f"{layer}: eps must be positive during training, got {eps}")
    if eps < 0:
        return ValueError(f"{layer}: eps must be non-negative, got {eps}")
    return None


_REENTRANT_RECOMPUTE = torch.utils.checkpoint.CheckpointFunction.backward.__code__


def recomputing_checkpoint() -> bool:
    """Whether this forward is torch.utils.checkpoint re-running a segment during backward.

    Non-reentrant checkpointing recomputes under its ``_recomputation_hook`` saved-tensor hook;
    reentrant checkpointing recomputes inside ``CheckpointFunction.backward``. Any other forward
    run inside a backward pass (a backward hook, a double-backward rebuild) is a real forward.
    """
    if torch._C._current_graph_task_id() == -1:
        return False  # not inside a backward pass
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook."):
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_RECOMPUTE:
            return True
        frame = frame.f_back
    return False


def _merge_moments(x: Tensor, mean: Tensor, m2: Tensor, count: int, shift: Tensor, fp64_input: bool,
                   comm_key: int, layer: str, debug: bool, check_finite: bool,
                   shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) of the group from this rank's moments: the forward all-reduce(s).

    Raises on every rank together what the reduced payload shows (see _raise_group_errors).
    """
    comm = communicator_for(comm_key)
    channels = mean.numel()
    shift_norm = shift.dot(shift).reshape(1)
    payload = torch.cat([bnm.forward_payload(count, mean, m2, shift),
                         mean.new_tensor([0.0, float(fp64_input)]), shift_norm, shift_norm * shift_norm])
    finite_here = check_finite and bool(torch.isfinite(payload).all())  # check_finite syncs anyway
    all_reduce(comm, payload, layer, "forward", channels, debug)
    moments = payload[:-_FLAGS]
    on_host = payload.device.type == "cpu"
    if on_host or debug or check_finite:  # free on CPU, a sync on GPU
        totals = _GroupTotals(*payload[_HOST_READ].tolist())
        _raise_group_errors(totals, payload, comm, layer, shape, check_finite, finite_here)
    group_count, group_mean, group_var = bnm.global_moments(moments, shift)
    # Decided on the host, so only on CPU, and alike on every rank: the same reduced payload.
    if on_host and bnm.ill_conditioned(group_mean, group_var, shift,
                                       torch.float64 if totals.fp64_ranks else torch.float32,
                                       comm.size):
        # Merge again, from the data, about the global mean just found (the same on every rank).
        shift = group_mean
        moments = all_reduce(comm, bnm.payload_about(x, shift), layer, "forward, re-centred",
                             channels, debug)
        group_count, group_mean, group_var = bnm.global_moments(moments, shift)
    return group_count.clone(), group_mean, group_var


# As an operator torch.compile does not enter: the collectives and host reads stay out of its graph.
_sync_moments = torch.library.custom_op("syncbn::sync_moments", mutates_args=())(_merge_moments)


@_sync_moments.register_fake
def _(x, mean, m2, count, shift, fp64_input, comm_key, layer, debug, check_finite, shape):
    return mean.new_empty(()), torch.empty_like(mean), torch.empty_like(mean)


# On real meta tensors run the real body, not the fake: the meta device stands in for CUDA in
# the tests that prove a training step reads nothing back from the device.
_sync_moments.register_kernel("meta")(_merge_moments)


def _raise_group_errors(totals: _GroupTotals, payload: Tensor, comm: Communicator, layer: str,
                        shape: List[int], check_finite: bool, finite_here: bool) -> None:
    """Errors every rank can see in the reduced payload, so all of them raise together."""
    if totals.invalid_ranks:
        raise CollectiveError(f"{layer}: {int(totals.invalid_ranks)} other rank(s) gave this layer "
                              "invalid input (see their error); no statistics were updated")
    if _shift_differs(totals, comm.size):
        raise ValueError(f"{layer}: running_mean differs across ranks ({comm.describe()}); it is the "
                         "shift every rank's sums are taken about, so the statistics would be wrong. "
                         "Load checkpoints on every rank, or let DistributedDataParallel broadcast "
                         "buffers (its default); no statistics were updated")
    if totals.count == 1:
        raise _single_value_error(layer, comm.rank, shape)
    if check_finite and not bool(torch.isfinite(payload).all()):
        where = "not this rank's" if finite_here else "including this rank's"
        raise FloatingPointError(f"{layer}: the batch has NaN or Inf values ({where}); running "
                                 "statistics were left untouched")


# Spread of the ranks' shift norms, relative to their size, that still counts as agreement:
# ranks whose running statistics differ in dtype (fp64 on one, fp32 on another) round the same
# running mean differently, by about 2^-24 of it, which moves the merge by as little.
_SHIFT_TOLERANCE = 2.0 ** -20


def _shift_differs(totals: _GroupTotals, world_size: int) -> bool:
    """Whether the ranks' shifts (running means) disagree, read alike on every rank.

    The spread over ranks of |shift|^2: a norm, so no cancellation hides a difference behind a
    small total (it misses only differences of sign or order, which no diverged or reloaded
    running mean shows). Its own fp64 rounding, about 2^-50 of the square, is far below the
    tolerance.
    """
    mean_norm = totals.shift_norm / world_size
    mean_square = totals.shift_norm_sq / world_size
    return mean_square - mean_norm * mean_norm > _SHIFT_TOLERANCE ** 2 * mean_square


def _single_value_error(layer: str, rank: int, shape: List[int]) -> ValueError:
    return ValueError(f"{layer}: expected more than 1 value per channel when training, got 1 "
                      f"in the whole group (input shape on rank {rank}: {tuple(shape)})")


def report_invalid_input(comm: Communicator, channels: int, device: torch.device, layer: str,
                          problem: Exception, debug: bool) -> None:
    """Join the forward all-reduce with an invalid-input flag so the others raise too, then raise."""
    payload = torch.zeros(forward_payload_numel(channels), dtype=torch.float64, device=device)
    payload[_INVALID] = 1.0
    all_reduce(comm, payload, layer, "forward", channels, debug)
    raise problem


def memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def group_statistics(x: Tensor, running_mean: Optional[Tensor], comm_key: int, layer: str,
                     debug: bool, check_finite: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased var) of the group: local moments, then the forward all-reduce(s).

    The shift every rank shares, and that tracks the mean, is the running mean where there is
    one (syncbn keeps it identical on every rank), else 0.
    """
    if running_mean is not None:
        shift = running_mean.detach().double()
    else:
        shift = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    mean, m2 = bnm.local_moments(x)
    # Eager calls skip the operator's dispatch (tens of µs a call on CPU): the same body.
    merge = _sync_moments if torch.compiler.is_compiling() else _merge_moments
    return merge(x, mean, m2, bnm.local_count(x), shift, x.dtype == torch.float64,
                 comm_key, layer, debug, check_finite, list(x.shape))


def update_running_stats_once(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                              count: Tensor, mean: Tensor, var: Tensor) -> None:
    """batchnorm_math.update_running_stats, except in a checkpoint's recompute of this step."""
    if running_mean is not None and (torch.compiler.is_compiling() or not recomputing_checkpoint()):
        bnm.update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                 count, mean, var)


class _SyncBatchNorm(torch.autograd.Function):
    """y = BatchNorm(x) with group statistics; also returns (count, mean, var), not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, eps, comm_key, layer, debug, check_finite):
        # local moments -> group moments (one all-reduce, errors raised on every rank)
        count, mean, var = group_statistics(x, running_mean, comm_key, layer, debug, check_finite)
        ctx.save_for_backward(x, weight, bias, mean, var, count)
        ctx.eps, ctx.comm_key, ctx.layer, ctx.debug = eps, comm_key, layer, debug
        ctx.mark_non_differentiable(count, mean, var)
        return bnm.normalize(x, mean, var, weight, bias, eps), count, mean, var

    @staticmethod
    def backward(ctx, dy, *_statistics):
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            grads = _differentiable_backward(ctx, dy)
        else:
            grads = _fused_backward(ctx, dy)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def _fused_backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    x, weight, bias, mean, var, count = ctx.saved_tensors
    dy = dy.contiguous(memory_format=memory_format(x))
    local_sums = bnm.backward_payload(dy, x, mean, var, ctx.eps)
    grad_weight, grad_bias, global_sums = backward_sums(ctx, local_sums, weight, bias)
    grad_x = None
    if global_sums is not None:
        grad_x = bnm.input_grad(dy, x, mean, var, weight, ctx.eps, global_sums, count)
    return grad_x, grad_weight, grad_bias


def backward_sums(ctx, local_sums: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
                  ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dweight, dbias, group sums) from this rank's [sum dy, sum dy * xhat] (C each).

    dweight and dbias are this rank's own sums (DDP averages them; reducing them here too would
    count them twice). The group sums, None when x needs no gradient, take the backward
    all-reduce, in fp64 so that ranks with different input dtypes still agree.
    """
    local_sums = local_sums.double()
    channels = local_sums.numel() // 2
    grad_weight = grad_bias = global_sums = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = local_sums[channels:].to(weight.dtype)
    if bias is not None and ctx.needs_input_grad[2]:
        grad_bias = local_sums[:channels].to(bias.dtype)
    if ctx.needs_input_grad[0]:
        # The operator reduces a copy: the gradients above may be views of local_sums.
        global_sums = all_reduce_copy(local_sums, ctx.comm_key, ctx.layer, "backward", channels,
                                      ctx.debug)
    return grad_weight, grad_bias, global_sums


def _differentiable_backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    """The backward as autograd of a differentiable rebuild of the forward (create_graph=True).

    The rebuild centres on the forward's group mean (the same on every rank), so it is well
    conditioned; its all-reduce is differentiable, so every order of derivative is exact.
    """
    x, weight, bias, mean, _, _ = ctx.saved_tensors
    wanted = [(i, t) for i, t in enumerate((x, weight, bias))
              if t is not None and ctx.needs_input_grad[i]]
    y = _differentiable_forward(x, weight, bias, mean, ctx.eps, ctx.comm_key, ctx.layer, ctx.debug)
    found = torch.autograd.grad(y, [t for _, t in wanted], dy, create_graph=True, allow_unused=True)
    grads: List[Optional[Tensor]] = [None, None, None]
    for (index, tensor), grad in zip(wanted, found):
        grads[index] = torch.zeros_like(tensor) if grad is None else grad
    return tuple(grads)


def _differentiable_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            shift: Tensor, eps: float, comm_key: int, layer: str,
                            debug: bool) -> Tensor:
    acc = bnm.accumulation_dtype(x.dtype)
    dims, count, ndim = bnm.reduction_dims(x.dim()), bnm.local_count(x), x.dim()
    values = x.to(acc)
    local_mean = values.sum(dims) / max(count, 1)
    m2 = (values - bnm.channel_view(local_mean, ndim)).square().sum(dims)
    payload = bnm.forward_payload(count, local_mean.double(), m2.double(), shift)
    reduced = all_reduce_copy(payload, comm_key, layer, "forward, rebuilt for double backward",
                              x.shape[1], debug)
    _, mean, var = bnm.global_moments(reduced, shift)
    invstd = torch.rsqrt(var.to(acc) + eps)
    y = (values - bnm.channel_view(mean.to(acc), ndim)) * bnm.channel_view(invstd, ndim)
    if weight is not None:
        y = y * bnm.channel_view(weight.to(acc), ndim)
    if bias is not None:
        y = y + bnm.channel_view(bias.to(acc), ndim)
    return y.to(x.dtype)


def _batch_norm_alone(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor], bias: Optional[Tensor], momentum: Optional[float],
                      eps: float, num_batches_tracked: Optional[Tensor]) -> Tensor:
    """Training-mode BatchNorm of a group of one: what torch.nn.BatchNorm's forward does, bitwise.

    Two deliberate differences: an empty batch leaves num_batches_tracked as it is (torch counts
    it), as in a larger group that saw no value; a checkpoint recompute updates nothing.
    """
    if running_mean is not None and not torch.compiler.is_compiling() and recomputing_checkpoint():
        # The first run of this step already updated the running statistics: update copies, so
        # the recompute saves the same tensors as the first run (checkpoint checks that).
        running_mean, running_var, num_batches_tracked = running_mean.clone(), running_var.clone(), None
    if input.numel() == 0:
        num_batches_tracked = None
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return F.batch_norm(input, running_mean, running_var, weight, bias, True, factor, eps)


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
    num_batches_tracked: Optional[Tensor] = None,
    layer: str = "sync_batch_norm",
    debug: Optional[bool] = None,
    check_finite: bool = False,
    num_features: Optional[int] = None,
) -> Tensor:
    """torch.nn.functional.batch_norm, with batch statistics taken over ``process_group``.

    ``process_group``: None (default group: torch.distributed if initialized, else MPI's world
    when launched by mpiexec, else this process alone), a torch.distributed ProcessGroup, an
    mpi4py communicator, or a :class:`syncbn.comm.Communicator`.

    Beyond F.batch_norm: ``num_batches_tracked`` (if given) is incremented, as BatchNorm does,
    and ``momentum=None`` means the cumulative average 1 / num_batches_tracked. In a group of
    more than one, a group that saw no value leaves running statistics and num_batches_tracked
    untouched. In evaluation (``training=False`` with running statistics) nothing is
    communicated. ``layer`` names the layer in errors; ``debug`` turns the collective
    cross-check on (default: SYNCBN_DEBUG); ``check_finite`` refuses NaN/Inf batches, on every
    rank, before running stats change (on GPU at the cost of one host sync per layer).
    ``num_features``: the channel count (default: the length of ``weight`` or ``running_mean``,
    else the input's dim 1); a rank whose input disagrees with it raises on every rank.
    """
    reference = weight if weight is not None else running_mean
    channels = num_features if num_features is not None else (
        reference.shape[0] if reference is not None else (input.shape[1] if input.dim() >= 2 else None))
    problem = eps_problem(eps, training, layer) or input_problem(input, channels, layer, reference)
    if not training:
        if problem is not None:
            raise problem
        # Without running statistics, batch statistics of this rank alone, like
        # torch.nn.SyncBatchNorm in eval: no collective.
        use_batch = running_mean is None or running_var is None
        return F.batch_norm(input, running_mean, running_var, weight, bias, use_batch, 0.0, eps)
    try:
        comm_key, group_size = group_of(process_group)
    except RuntimeError as error:  # no group where the launcher says there is one: name the layer
        raise RuntimeError(f"{layer}: {error}") from error
    if group_size == 1:
        if problem is not None:
            raise problem
        if bnm.local_count(input) == 1:
            raise _single_value_error(layer, 0, list(input.shape))
        return _batch_norm_alone(input, running_mean, running_var, weight, bias, momentum, eps,
                                 num_batches_tracked)
    debug = debug_enabled(debug)
    if problem is not None:
        if channels is None:
            raise problem  # no channel count to size the shared payload by
        device = reference.device if reference is not None else input.device
        report_invalid_input(communicator_for(comm_key), channels, device, layer, problem, debug)
    y, count, mean, var = _SyncBatchNorm.apply(input, weight, bias, running_mean, eps, comm_key,
                                               layer, debug, check_finite)
    update_running_stats_once(running_mean, running_var, num_batches_tracked, momentum,
                              count, mean, var)
    return y
