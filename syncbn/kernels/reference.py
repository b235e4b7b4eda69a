"""The reference kernels: plain torch ops, on any device and dtype.

The fallback wherever no fast kernel serves (fp64 on CUDA, the meta device, a machine without a
compiler or Triton) and the oracle the fast kernels are tested against. Same functions and
semantics as every backend of :mod:`syncbn.kernels`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch

from .. import batchnorm_math as bnm
from ..batchnorm_math import accumulation_dtype, channel_view, local_count, reduction_dims

Tensor = torch.Tensor


def local_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, M2 = sum (x - mean)^2) per channel of the local batch, in fp64, zeros if empty.

    Both are centred on this rank's own mean (two-pass or Welford), never on an arbitrary
    element: an outlier anywhere in the channel costs no precision. Computed in fp32 (fp64 for
    fp64 input) and widened to fp64.
    """
    channels = x.shape[1]
    count = local_count(x)
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return zeros, zeros
    if x.device.type == "cpu":
        return _two_pass_moments(x)
    acc = accumulation_dtype(x.dtype)
    # For fp16/bf16 input, scratch running stats in fp32 make the fused Welford kernel accumulate
    # and return fp32 statistics without an fp32 copy of x (momentum 0 leaves the scratch alone).
    scratch = torch.zeros(2, channels, dtype=acc, device=x.device) if x.dtype != acc else None
    mean, var = torch.batch_norm_update_stats(
        x, None if scratch is None else scratch[0], None if scratch is None else scratch[1], 0.0)
    return mean.double(), var.double() * count


def _two_pass_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Two-pass moments: the mean summed in fp64, then M2 = sum of squares of x - mean.

    The mean takes a full fp64 sum, as torch's own CPU BatchNorm accumulates in double: every
    fp32 value is exact in fp64, so it is exact but for the final rounding, whether the mean is
    large against the spread or small (a correction from x - rough mean would round
    systematically there: a small mean vanishes from most of x - m). The squares are taken
    about the mean rounded to x's accumulation dtype (fp32 for half input), and M2 is corrected
    for that rounding by the sum of x - mean (near-constant channels depend on it); both sums
    only move M2 at second order, so they take the cheaper partial sums of _channel_sums_fp64.
    """
    values = x.to(accumulation_dtype(x.dtype))
    count = local_count(x)
    mean = values.sum(reduction_dims(x.dim()), dtype=torch.float64) / count
    centered = values - channel_view(mean.to(values.dtype), x.dim())
    residual = _channel_sums_fp64(centered)
    squares = _channel_sums_fp64(centered.square_())
    return mean, (squares - residual * residual / count).clamp_(min=0.0)


def _channel_sums_fp64(values: Tensor) -> Tensor:
    """Per-channel sums, as accurate as an fp64 accumulation at about the cost of an fp32 one.

    The positions of each (sample, channel) are summed in their own dtype, where torch's cascade
    summation is accurate to about an ulp of each partial sum; the N x C partials are summed in
    fp64. A full fp64 reduction of fp32 data costs about 6x.
    """
    if values.dim() > 2:
        values = values.sum(list(range(2, values.dim())))
    return values.sum(0, dtype=torch.float64)


def shift_fp64(shift: Optional[Tensor], channels: int, device: torch.device) -> Tensor:
    """The shift as the payload carries it: fp64, zeros where there is none."""
    if shift is None:
        return torch.zeros(channels, dtype=torch.float64, device=device)
    return shift.detach().to(torch.float64)


def forward_payload(x: Tensor, shift: Optional[Tensor]) -> Tensor:
    """The forward payload (batchnorm_math's layout, 4C+3 fp64) of the local batch about ``shift``."""
    mean, m2 = local_moments(x)
    return payload_from_moments(x, mean, m2, shift)


def payload_from_moments(x: Tensor, mean: Tensor, m2: Tensor, shift: Optional[Tensor]) -> Tensor:
    """The forward payload of input ``x`` from its local (mean, M2), in fp64."""
    shift = shift_fp64(shift, x.shape[1], x.device)
    flags = shift.new_zeros(2)
    if x.dtype == torch.float64:
        flags[1] = 1.0  # a scalar fill: no tensor from host data, so no copy to the device
    return torch.cat([bnm.moments_payload(local_count(x), mean, m2, shift), shift, shift * shift, flags])


def moments_about(x: Tensor, shift: Tensor) -> Tensor:
    """[n, sum (x - shift), sum (x - shift)^2] (2C+1, fp64) taken from the data.

    One more pass over x, for a shift close to the mean: x - shift is then nearly exact in fp64,
    so no rank's mean enters the merge with its own rounding.
    """
    centered = x.double() - channel_view(shift, x.dim())
    dims = reduction_dims(x.dim())
    return torch.cat([shift.new_full((1,), local_count(x)), centered.sum(dims),
                      centered.square_().sum(dims)])


def finalize(moments: Tensor, shift: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
             momentum: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) of the group from the reduced [n, S1, S2]; the running statistics
    updated in place when ``running_mean`` is given."""
    channels = (moments.numel() - 1) // 2
    count, mean, var = bnm.global_moments(moments, shift_fp64(shift, channels, moments.device))
    if running_mean is not None:
        bnm.update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                 count, mean, var)
    return count, mean, var


def group_totals(payload: Tensor, channels: int, world_size: int) -> bnm.GroupTotals:
    """What the reduced forward payload says about the group (batchnorm_math.group_totals, on a
    host copy: on a GPU, a sync)."""
    return bnm.group_totals(payload.cpu().numpy(), channels, world_size)


def checked_finalize_from(group_totals: Callable[[Tensor, int, int], bnm.GroupTotals],
                          finalize: Callable[..., Tuple[Tensor, Tensor, Tensor]]) -> Callable[..., Any]:
    """A backend's ``checked_finalize`` made of its own ``group_totals`` and ``finalize``."""

    def checked_finalize(payload: Tensor, shift: Optional[Tensor], running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                         momentum: Optional[float], world_size: int, check_finite: bool
                         ) -> Union[Tuple[Tensor, Tensor, Tensor], bnm.GroupTotals]:
        channels = (payload.numel() - 3) // 4
        totals = group_totals(payload, channels, world_size)
        if not bnm.statistics_ready(totals, check_finite):
            return totals
        return finalize(payload[:bnm.moments_numel(channels)], shift, running_mean, running_var,
                        num_batches_tracked, momentum)

    return checked_finalize


checked_finalize = checked_finalize_from(group_totals, finalize)


def _affine_in(param: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if param is None else param.to(dtype)


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias in one fused pass; keeps dtype and layout."""
    acc = accumulation_dtype(x.dtype)
    return torch.batch_norm(
        x, _affine_in(weight, acc), _affine_in(bias, acc), mean.to(acc), var.to(acc),
        False, 0.0, eps, torch.backends.cudnn.enabled,
    )


def gradient_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """[sum dy (C), sum dy * xhat (C)] of the local batch, in fp64."""
    channels = x.shape[1]
    if local_count(x) == 0:  # the fused kernel below faults on empty input
        return torch.zeros(2 * channels, dtype=torch.float64, device=x.device)
    acc = accumulation_dtype(x.dtype)
    ones = torch.ones(channels, dtype=acc, device=x.device)
    # Eval-mode BatchNorm backward computes exactly these two per-channel sums in one pass:
    # grad_weight = sum dy * (x - mean) * invstd, grad_bias = sum dy.
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, ones, mean.to(acc), var.to(acc), None, None, False, eps, [False, True, True]
    )
    return torch.cat([sum_dy, sum_dy_xhat]).double()


def backward_sums_from(gradient_sums: Callable[..., Tensor]) -> Callable[..., Tuple[Tensor, Tensor, Tensor]]:
    """A backend's ``backward_sums`` made of its own ``gradient_sums`` (the 2C fp64 sums)."""

    def backward_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float,
                      parameter_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        sums = gradient_sums(dy, x, mean, var, eps)
        return (sums, *bnm.parameter_sums(sums, parameter_dtype))

    return backward_sums


backward_sums = backward_sums_from(gradient_sums)


def input_grad(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
    group_sums: Tensor, count: Tensor,
) -> Tensor:
    """dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the group.

    Written per channel in centred form, dx = a * dy + b * (x - mean) + c: x - mean is taken
    before any scaling, so a large mean costs no more than the rounding of the mean itself.
    Computed in the accumulation dtype (fp32 for half input) in x's layout.
    """
    acc = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    mean_dy, mean_dy_xhat = (group_sums.view(2, -1).to(acc) / count.to(acc).clamp(min=1.0)).unbind()
    b = -scale * invstd * mean_dy_xhat
    c = -scale * mean_dy
    ndim = x.dim()
    # Subtract the mean first, explicitly: torch's eval batch_norm would fold it into alpha * x + beta,
    # which is the cancelling form again. In the accumulation dtype, rounded to x's dtype once.
    centered = x.to(acc) - channel_view(mean.to(acc), ndim)
    dx = torch.addcmul(channel_view(c, ndim), centered, channel_view(b, ndim))
    return dx.addcmul_(dy.to(acc), channel_view(scale, ndim)).to(x.dtype)


# ----- in-place activated BatchNorm (syncbn.activated) -------------------------------------------

def below_floor(weight: Tensor, bias: Optional[Tensor], floor: float) -> Tensor:
    """Per channel, on the weights' device: whether |weight| < floor * max(1, |bias|), where the
    inversion xhat = (z - bias) / weight would amplify the output's rounding too much."""
    with torch.no_grad():
        limit = floor if bias is None else bias.abs().clamp(min=1.0).mul_(floor)
        return weight.abs() < limit


def any_below_floor(weight: Tensor, bias: Optional[Tensor], floor: float) -> bool:
    """Whether any channel is below the floor (a host read)."""
    return bool(below_floor(weight, bias, floor).any())


def update_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 momentum: float) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) of a non-empty local batch; the running statistics (when given) moved
    by ``momentum`` toward the mean and the unbiased variance: torch.batch_norm_update_stats.
    The statistics of a group of one."""
    return torch.batch_norm_update_stats(x, running_mean, running_var, momentum)


# ``activation``: 0 identity, 1 leaky_relu (``parameter``: its slope), 2 elu (``parameter``: alpha).
# The backward reads the output y, not x: z = act^-1(y), dz = dy * act'(z), xhat = (z - bias) /
# weight (z without a weight; the caller passes a bias of 0 for bias=False).

def _activate_(z: Tensor, activation: int, parameter: float) -> Tensor:
    if activation == 1:
        return torch.nn.functional.leaky_relu_(z, parameter)
    if activation == 2:
        return torch.nn.functional.elu_(z, parameter)
    return z


def normalize_activate(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, activation: int, parameter: float,
                       inplace: bool) -> Tensor:
    """act(weight * (x - mean) * invstd + bias), written into x's storage when ``inplace``."""
    y = _activate_(normalize(x, mean, var, weight, bias, eps), activation, parameter)
    return x.copy_(y) if inplace else y


def _preactivation(y: Tensor, dy: Tensor, activation: int, parameter: float) -> Tuple[Tensor, Tensor]:
    """(z, dL/dz) from the output y and dL/dy (one fused op each where torch has one): the
    activation inverted, and its derivative written in y."""
    if activation == 1:
        # leaky_relu with slope 1/s undoes leaky_relu with slope s.
        return (torch.nn.functional.leaky_relu(y, 1.0 / parameter),
                torch.ops.aten.leaky_relu_backward(dy, y, parameter, True))
    if activation == 2:
        # y > -alpha in exact arithmetic; the clamp keeps log finite where y rounded onto -alpha.
        z = y.clamp(max=0.0).div_(parameter).clamp_(min=-1.0 + torch.finfo(y.dtype).eps).log1p_()
        return z.add_(y.clamp(min=0.0)), torch.ops.aten.elu_backward(dy, parameter, 1.0, 1.0, True, y)
    return y, dy


def _activated_terms(dy: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     activation: int, parameter: float) -> Tuple[Tensor, Tensor]:
    """(xhat, dz) in the accumulation dtype, from y and dy."""
    acc = accumulation_dtype(y.dtype)
    z, dz = _preactivation(y.to(acc), dy.to(acc), activation, parameter)
    if weight is None:
        return z, dz
    ndim = y.dim()
    return (z - channel_view(bias.to(acc), ndim)) / channel_view(weight.to(acc), ndim), dz


def activated_backward_payload(dy: Tensor, y: Tensor, weight: Optional[Tensor],
                               bias: Optional[Tensor], activation: int, parameter: float) -> Tensor:
    """[sum dz (C), sum dz * xhat (C)] of the local batch, in fp64."""
    xhat, dz = _activated_terms(dy, y, weight, bias, activation, parameter)
    return torch.cat([_channel_sums_fp64(dz), _channel_sums_fp64(dz * xhat)])


def activated_input_grad(dy: Tensor, y: Tensor, var: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], eps: float, activation: int, parameter: float,
                         group_sums: Tensor, count: Tensor) -> Tensor:
    """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), means over the group;
    scaled by the weight it inverts with (a NaN channel stays NaN). In y's dtype and layout."""
    xhat, dz = _activated_terms(dy, y, weight, bias, activation, parameter)
    acc, ndim = xhat.dtype, y.dim()
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    mean_dz, mean_dz_xhat = (group_sums.view(2, -1).to(acc) / count.to(acc).clamp(min=1.0)).unbind()
    dx = torch.addcmul(dz - channel_view(mean_dz, ndim), xhat, channel_view(-mean_dz_xhat, ndim))
    return dx.mul_(channel_view(scale, ndim)).to(y.dtype)
