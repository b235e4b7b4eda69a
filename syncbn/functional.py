"""``sync_batch_norm``: torch.nn.functional.batch_norm with statistics synchronized over a group.

In a group of one it *is* torch's batch_norm (same op, same running-stat update), bitwise, and
communicates nothing. In a larger group: one all-reduce in the forward pass (count, sums and
squared sums about a shift every rank shares, the shifts and their squares so every rank can
check per channel that the ranks shared it, an invalid-input flag and a count of fp64 ranks:
4C+3 fp64 values, laid out in batchnorm_math) and one in the backward pass (sum dy,
sum dy*xhat: 2C fp64 values), whatever the world size. The arithmetic runs in the kernels of
:mod:`syncbn.kernels`. Every rank issues the collectives in the same order whatever its batch,
an empty or invalid one included, so no rank is left waiting alone. On CPU, a second forward
all-reduce of 2C+1 values follows when the first shows the merge was ill-conditioned (see
batchnorm_math.group_totals), decided on every rank from the same reduced payload.

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

Where the native CPU kernels serve, in eager mode, the layer is one C++ autograd node
(``kernels.native.synchronized_normalize``) rather than the Python autograd.Function below: the
same kernels in the same order, without the host cost of a Python node, its backward calling back
here for the all-reduce and the differentiable backward.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import batchnorm_math as bnm
from . import kernels
from .batchnorm_math import forward_payload_numel
from .comm import Communicator, resolve_communicator
from .guard import (CollectiveError, all_reduce, all_reduce_copy, communicator_for, communicator_key,
                    debug_enabled)

__all__ = ["sync_batch_norm", "input_problem", "recomputing_checkpoint", "resolve_once", "group_of",
           "group_statistics", "backward_sums", "report_invalid_input", "eps_problem", "memory_format",
           "forward_payload_numel", "alone_running_stats"]

Tensor = torch.Tensor


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


def _nested_code(function: Any, name: str) -> Any:
    """The code object of the function ``name`` defined inside ``function``, or None."""
    return next((const for const in function.__code__.co_consts
                 if getattr(const, "co_name", None) == name), None)


# The frames in which torch.utils.checkpoint re-runs a segment's forward: reentrant checkpointing
# inside CheckpointFunction.backward, non-reentrant inside the recompute_fn its generator defines.
_RECOMPUTE_CODES = frozenset(code for code in (
    torch.utils.checkpoint.CheckpointFunction.backward.__code__,
    _nested_code(torch.utils.checkpoint._checkpoint_without_reentrant_generator, "recompute_fn"),
) if code is not None)


def recomputing_checkpoint() -> bool:
    """Whether this forward is torch.utils.checkpoint re-running a segment during backward.

    Non-reentrant checkpointing recomputes under its ``_recomputation_hook`` saved-tensor hook;
    but a checkpoint nested in the segment installs its own hook over it, so the frames are
    searched too, for either mode's recompute function. Any other forward run inside a
    backward pass (a backward hook, a double-backward rebuild) is a real forward.
    """
    if torch._C._current_graph_task_id() == -1:
        return False  # not inside a backward pass
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook."):
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _RECOMPUTE_CODES:
            return True
        frame = frame.f_back
    return False


def _host_reads_payload(on_cpu: bool, debug: bool, check_finite: bool) -> bool:
    """Whether every rank reads the reduced forward payload on the host: free on CPU, a sync on a
    GPU, taken there only under the debug guard or check_finite. A rank with invalid input follows
    the same rule, so that it joins the all-reduce naming the invalid ranks exactly when the
    others start it."""
    return on_cpu or debug or check_finite


def _group_moments(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], momentum: Optional[float], update: bool,
                   comm_key: int, layer: str, debug: bool, check_finite: bool
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) of the group from this rank's batch: the forward all-reduce(s); the
    running statistics updated when ``update``.

    The shift every rank shares, and that tracks the mean, is the running mean where there is
    one (syncbn keeps it identical on every rank), else 0. Raises on every rank together what
    the reduced payload shows (see _raise_group_errors).
    """
    comm = communicator_for(comm_key)
    backend = kernels.for_input(x)
    channels = x.shape[1]
    payload = backend.forward_payload(x, running_mean)
    finite_here = check_finite and bool(torch.isfinite(payload).all())  # check_finite syncs anyway
    all_reduce(comm, payload, layer, "forward", channels, debug)
    shift = running_mean
    if not update:
        running_mean = running_var = num_batches_tracked = None
    on_cpu = x.is_cpu  # the payload is on x's device
    if not _host_reads_payload(on_cpu, debug, check_finite):
        return backend.finalize(payload[:bnm.moments_numel(channels)], shift, running_mean,
                                running_var, num_batches_tracked, momentum)
    # The common case in one call: the checks pass and the statistics are final.
    checked = backend.checked_finalize(payload, shift, running_mean, running_var,
                                       num_batches_tracked, momentum, comm.size, check_finite)
    if not isinstance(checked, bnm.GroupTotals):
        return checked
    return _moments_after_checks(checked, payload, x, shift, running_mean, running_var,
                                 num_batches_tracked, momentum, comm, layer, debug, check_finite,
                                 finite_here)


def _moments_after_checks(totals: bnm.GroupTotals, payload: Tensor, x: Tensor, shift: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          comm: Communicator, layer: str, debug: bool, check_finite: bool,
                          finite_here: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """_group_moments' end where the reduced payload's checks are not all passed (``totals``):
    raise on every rank what they show, else merge again about the global mean."""
    _raise_group_errors(totals, comm, layer, x, check_finite, finite_here, debug)
    backend = kernels.for_input(x)
    channels = x.shape[1]
    moments = payload[:bnm.moments_numel(channels)]
    # Decided on the host, so only on CPU, and alike on every rank: the same reduced payload.
    if x.is_cpu and totals.ill_conditioned:
        # Merge again, from the data, about the global mean just found (the same on every rank,
        # fp64): each rank's moments about it are nearly exact, whatever its mean's distance.
        _, shift, _ = backend.finalize(moments, shift, None, None, None, momentum)
        moments = all_reduce(comm, backend.moments_about(x, shift), layer, "forward, re-centred",
                             channels, debug)
    return backend.finalize(moments, shift, running_mean, running_var, num_batches_tracked, momentum)


# As an operator torch.compile does not enter: the collectives and host reads stay out of its graph.
_sync_moments = torch.library.custom_op(
    "syncbn::sync_moments", mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)(_group_moments)


@_sync_moments.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, update, comm_key, layer, debug,
      check_finite):
    means = x.new_empty(x.shape[1], dtype=torch.float64)
    return means.new_empty(()), means, torch.empty_like(means)


# On real meta tensors run the real body, not the fake: the meta device stands in for CUDA in
# the tests that prove a training step reads nothing back from the device.
_sync_moments.register_kernel("meta")(_group_moments)


def _raise_group_errors(totals: bnm.GroupTotals, comm: Communicator, layer: str, x: Tensor,
                        check_finite: bool, finite_here: bool, debug: bool) -> None:
    """Errors every rank can see in the reduced payload, so all of them raise together (``x``:
    this rank's input, named in them)."""
    if totals.invalid_ranks:
        bad = _invalid_ranks(comm, x.device, layer, debug, invalid_here=False)
        raise CollectiveError(f"{layer}: {_ranks_text(bad, comm.size)} gave this layer invalid input "
                              "(see their error); no statistics were updated")
    if totals.differing_channels:
        raise ValueError(f"{layer}: running_mean differs across ranks ({comm.describe()}) in channel(s) "
                         f"{_list_text(totals.differing_channels)}; it is the shift every rank's sums "
                         "are taken about, so the statistics would be wrong. Load checkpoints on every "
                         "rank, or let DistributedDataParallel broadcast buffers (its default); no "
                         "statistics were updated")
    if totals.count == 1:
        raise _single_value_error(layer, comm.rank, list(x.shape))
    if check_finite and not totals.finite:
        raise _non_finite_error(layer, "not this rank's" if finite_here else "including this rank's")


def _non_finite_error(layer: str, where: str) -> FloatingPointError:
    return FloatingPointError(f"{layer}: the batch has NaN or Inf values ({where}); running "
                              "statistics were left untouched")


def _list_text(items: Sequence[int], shown: int = 8) -> str:
    listed = ", ".join(str(i) for i in items[:shown])
    return listed + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _ranks_text(ranks: List[int], world_size: int) -> str:
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {_list_text(ranks)} ({len(ranks)} of {world_size})"


def _invalid_ranks(comm: Communicator, device: torch.device, layer: str, debug: bool,
                   invalid_here: bool) -> List[int]:
    """Which ranks had invalid input: one more all-reduce, on the error path only, that every rank
    joins once the forward payload has shown that some rank's input was invalid."""
    flags = torch.zeros(comm.size, dtype=torch.float64, device=device)
    if invalid_here:
        flags[comm.rank] = 1.0
    all_reduce(comm, flags, layer, "forward, invalid ranks", comm.size, debug)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _single_value_error(layer: str, rank: int, shape: List[int]) -> ValueError:
    return ValueError(f"{layer}: expected more than 1 value per channel when training, got 1 "
                      f"in the whole group (input shape on rank {rank}: {tuple(shape)})")


def report_invalid_input(comm: Communicator, channels: int, device: torch.device, layer: str,
                         problem: Exception, debug: bool, check_finite: bool) -> None:
    """Join the forward all-reduce with an invalid-input flag so the others raise too, then raise.

    Where the others read the payload on the host (CPU, the debug guard, check_finite) they then
    ask which ranks were invalid: this rank joins that all-reduce too.
    """
    payload = torch.zeros(forward_payload_numel(channels), dtype=torch.float64, device=device)
    payload[bnm.INVALID_INPUT] = 1.0
    all_reduce(comm, payload, layer, "forward", channels, debug)
    if _host_reads_payload(device.type == "cpu", debug, check_finite):
        _invalid_ranks(comm, device, layer, debug, invalid_here=True)
    raise problem


def memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _updates_running_stats(running_mean: Optional[Tensor], compiling: bool) -> bool:
    """Whether this training forward updates the running statistics: where there are some, except
    in a checkpoint's recompute of a step whose first run did (under torch.compile: always)."""
    return running_mean is not None and (compiling or not recomputing_checkpoint())


def group_statistics(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                     comm_key: int, layer: str, debug: bool, check_finite: bool
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased var) of the group; the running statistics updated, except in a
    checkpoint's recompute of this step."""
    compiling = torch.compiler.is_compiling()
    update = _updates_running_stats(running_mean, compiling)
    # Eager calls skip the operator's dispatch (tens of µs a call on CPU): the same body.
    merge = _sync_moments if compiling else _group_moments
    return merge(x, running_mean, running_var, num_batches_tracked, momentum, update, comm_key,
                 layer, debug, check_finite)


class _SyncBatchNorm(torch.autograd.Function):
    """y = BatchNorm(x) with group statistics; the running statistics updated in the forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                comm_key, layer, debug, check_finite):
        # local moments -> group moments (one all-reduce, errors raised on every rank)
        count, mean, var = group_statistics(x, running_mean, running_var, num_batches_tracked,
                                            momentum, comm_key, layer, debug, check_finite)
        ctx.save_for_backward(x, weight, bias, mean, var, count)
        ctx.eps, ctx.comm_key, ctx.layer, ctx.debug = eps, comm_key, layer, debug
        return kernels.for_input(x).normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            grads = _differentiable_backward(ctx, dy)
        else:
            grads = _fused_backward(ctx, dy)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


# Function.apply is a Python wrapper around torch's C++ apply: it binds default arguments for a
# setup_context (this Function has none), serves functorch's transforms and unwraps tensors that
# escaped one, and it costs about 12 µs of a small layer's step. Outside torch.compile (which
# traces Function.apply itself) and functorch transforms, the layer calls the C++ apply directly.
_apply_without_wrapper = super(torch.autograd.Function, _SyncBatchNorm).apply
_functorch_transforms_active = torch._C._are_functorch_transforms_active


def _native_layer(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                  comm_key: int, layer: str, debug: bool, check_finite: bool) -> Tensor:
    """_SyncBatchNorm's forward for the native backend in eager mode, without a Python
    autograd.Function's cost on the host (tens of µs a step): _group_moments' common case and
    normalize in one operator call, whose output's autograd node is a C++ one with
    _fused_backward's steps; _group_moments' other cases here, then the same node."""
    comm = communicator_for(comm_key)
    update = _updates_running_stats(running_mean, compiling=False)
    y, payload, finite_here = kernels.native.synchronized_batch_norm(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, update, eps, comm_key,
        layer, debug, comm.size, check_finite)
    if y is not None:
        return y
    shift = running_mean
    if not update:
        running_mean = running_var = num_batches_tracked = None
    totals = kernels.native.group_totals(payload, x.shape[1], comm.size)
    count, mean, var = _moments_after_checks(totals, payload, x.detach(), shift, running_mean, running_var,
                                             num_batches_tracked, momentum, comm, layer, debug, check_finite,
                                             finite_here)
    return kernels.native.synchronized_normalize(x, weight, bias, mean, var, count, eps, comm_key,
                                                 layer, debug)


def _fused_backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    x, weight, bias, mean, var, count = ctx.saved_tensors
    backend = kernels.for_input(x)
    if dy.stride() != x.stride():  # the kernels take dy in x's layout
        dy = dy.contiguous(memory_format=memory_format(x))
    parameter = weight if weight is not None else bias
    local_sums, own_bias, own_weight = backend.backward_sums(
        dy, x, mean, var, ctx.eps, torch.float64 if parameter is None else parameter.dtype)
    grad_weight, grad_bias = _parameter_grads(ctx, weight, bias, own_weight, own_bias)
    group_sums = _group_gradient_sums(ctx, local_sums)
    grad_x = None
    if group_sums is not None:
        grad_x = backend.input_grad(dy, x, mean, var, weight, ctx.eps, group_sums, count)
    return grad_x, grad_weight, grad_bias


def _parameter_grads(ctx, weight: Optional[Tensor], bias: Optional[Tensor], own_weight: Optional[Tensor],
                    own_bias: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dweight, dbias) of the parameters that want one: this rank's own sums, ``own_weight`` and
    ``own_bias`` (DDP averages them; reducing them here too would count them twice), converted
    from the fp64 sums, so that ranks with different input dtypes still agree."""
    grad_weight = own_weight if weight is not None and ctx.needs_input_grad[1] else None
    grad_bias = own_bias if bias is not None and ctx.needs_input_grad[2] else None
    if grad_bias is not None and grad_bias.dtype != bias.dtype:  # a bias in another dtype
        grad_bias = grad_bias.to(bias.dtype)
    return grad_weight, grad_bias


def _group_gradient_sums(ctx, local_sums: Tensor) -> Optional[Tensor]:
    """The group's [sum dy, sum dy * xhat]: the backward all-reduce of this rank's (in place);
    None when x needs no gradient."""
    if not ctx.needs_input_grad[0]:
        return None
    if torch.compiler.is_compiling():  # the operator, opaque to the compiler: on a copy
        return all_reduce_copy(local_sums, ctx.comm_key, ctx.layer, "backward",
                               local_sums.numel() // 2, ctx.debug)
    return _all_reduce_by_key(local_sums, ctx.comm_key, ctx.layer, "backward", local_sums.numel() // 2,
                              ctx.debug)


def _all_reduce_by_key(payload: Tensor, comm_key: int, layer: str, direction: str, channels: int,
                       debug: bool) -> Tensor:
    """all_reduce, in place, over the communicator registered under ``comm_key``."""
    return all_reduce(communicator_for(comm_key), payload, layer, direction, channels, debug)


def backward_sums(ctx, local_sums: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
                  ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dweight, dbias, group sums) from this rank's [sum dy, sum dy * xhat] (C each), for a
    backward whose kernel gives the sums alone: the parameters' own copied out first."""
    parameter = weight if weight is not None else bias
    own_bias = own_weight = None
    if parameter is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        own_bias, own_weight = bnm.parameter_sums(local_sums, parameter.dtype)
    return (*_parameter_grads(ctx, weight, bias, own_weight, own_bias),
            _group_gradient_sums(ctx, local_sums))


def _differentiable_backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    """The backward as autograd of a differentiable rebuild of the forward (create_graph=True).

    The rebuild centres on the forward's group mean (the same on every rank), so it is well
    conditioned; its all-reduce is differentiable, so every order of derivative is exact.
    """
    x, weight, bias, mean, _, _ = ctx.saved_tensors
    wanted = [t is not None and ctx.needs_input_grad[i] for i, t in enumerate((x, weight, bias))]
    found = iter(_differentiable_grads(dy, x, weight, bias, mean, ctx.eps, ctx.comm_key, ctx.layer,
                                       ctx.debug, *wanted))
    return tuple(next(found) if want else None for want in wanted)


def _differentiable_grads(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, eps: float, comm_key: int, layer: str, debug: bool,
                          x_wanted: bool, weight_wanted: bool, bias_wanted: bool) -> List[Tensor]:
    """The gradients, differentiable, of the wanted ones of x, weight and bias (in that order)."""
    inputs = [t for t, want in zip((x, weight, bias), (x_wanted, weight_wanted, bias_wanted)) if want]
    y = _differentiable_forward(x, weight, bias, mean, eps, comm_key, layer, debug)
    found = torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if grad is None else grad for t, grad in zip(inputs, found)]


def _differentiable_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            shift: Tensor, eps: float, comm_key: int, layer: str,
                            debug: bool) -> Tensor:
    acc = bnm.accumulation_dtype(x.dtype)
    dims, count, ndim = bnm.reduction_dims(x.dim()), bnm.local_count(x), x.dim()
    values = x.to(acc)
    local_mean = values.sum(dims) / max(count, 1)
    m2 = (values - bnm.channel_view(local_mean, ndim)).square().sum(dims)
    payload = bnm.moments_payload(count, local_mean.double(), m2.double(), shift)
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


# What the native forward and node (syncbn_native::synchronized_batch_norm, ::synchronized_normalize)
# call back into Python for, as operators they find by name: the all-reduce, in place, and under
# create_graph=True the differentiable backward (above autograd, so its results keep their graph).
_native_node_callbacks = torch.library.Library("syncbn", "FRAGMENT")
_native_node_callbacks.define("all_reduce_(Tensor(a!) payload, int comm_key, str layer, str direction, "
                              "int channels, bool debug) -> Tensor(a!)")
_native_node_callbacks.impl("all_reduce_", _all_reduce_by_key, "CPU")
_native_node_callbacks.define("differentiable_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, "
                              "Tensor mean, float eps, int comm_key, str layer, bool debug, "
                              "bool x_wanted, bool weight_wanted, bool bias_wanted) -> Tensor[]")
_native_node_callbacks.impl("differentiable_backward", _differentiable_grads,
                            "CompositeImplicitAutograd")


def alone_running_stats(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        momentum: Optional[float], num_batches_tracked: Optional[Tensor], layer: str,
                        check_finite: bool) -> Tuple[Optional[Tensor], Optional[Tensor], float]:
    """(running_mean, running_var, momentum factor) for torch's training batch-norm kernel in a
    group of one, num_batches_tracked counted; raises what a group of one raises.

    The running statistics are copies in a checkpoint's recompute (it updates nothing).
    """
    if bnm.local_count(input) == 1:
        raise _single_value_error(layer, 0, list(input.shape))
    if check_finite and not bool(torch.isfinite(input).all()):
        raise _non_finite_error(layer, "the only rank's")
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
    return running_mean, running_var, factor


def _batch_norm_alone(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor], bias: Optional[Tensor], momentum: Optional[float],
                      eps: float, num_batches_tracked: Optional[Tensor], layer: str,
                      check_finite: bool) -> Tensor:
    """Training-mode BatchNorm of a group of one: what torch.nn.BatchNorm's forward does, bitwise.

    Two deliberate differences: an empty batch leaves num_batches_tracked as it is (torch counts
    it), as in a larger group that saw no value; a checkpoint recompute updates nothing. And
    with ``check_finite``, a batch with NaN or Inf raises before the statistics change.
    """
    running_mean, running_var, factor = alone_running_stats(
        input, running_mean, running_var, momentum, num_batches_tracked, layer, check_finite)
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
        raise RuntimeError(f"{layer}: {error}") from None  # the message has the cause
    if group_size == 1:
        if problem is not None:
            raise problem
        return _batch_norm_alone(input, running_mean, running_var, weight, bias, momentum, eps,
                                 num_batches_tracked, layer, check_finite)
    debug = debug_enabled(debug)
    if problem is not None:
        if channels is None:
            raise problem  # no channel count to size the shared payload by
        device = reference.device if reference is not None else input.device
        report_invalid_input(communicator_for(comm_key), channels, device, layer, problem, debug,
                             check_finite)
    if torch.compiler.is_compiling() or _functorch_transforms_active():
        apply = _SyncBatchNorm.apply
    elif kernels.for_input(input) is kernels.native:
        apply = _native_layer
    else:
        apply = _apply_without_wrapper
    return apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                 comm_key, layer, debug, check_finite)
