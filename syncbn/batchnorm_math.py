"""The arithmetic of synchronized BatchNorm, free of communication.

Forward: local moments -> payload about a shared shift -> (all-reduce elsewhere) -> global
statistics -> running-stat update -> normalize. Backward: local gradient sums -> (all-reduce
elsewhere) -> input gradient.

Precision: each rank's mean and M2 = sum (x - mean)^2 are centred on its own mean (two-pass or
Welford, fp32; fp64 for fp64 input). The payload carries [count, sum (x - K), sum (x - K)^2] in
fp64 about a per-channel shift K that every rank shares, so it adds up over ranks, and the
merge cancels only to 2^-52 * (1 + (mean - K)^2 / var) relative (see ill_conditioned); counts
stay exact. The input gradient is formed in centred form, dx = a * dy + b * (x - mean) + c.

Dispatch: CUDA tensors in fp32/fp16/bf16 take the Triton kernels of :mod:`syncbn.triton_kernels`
(same semantics, no host sync) when Triton is installed; everything else takes the torch ops
below. For testing the kernels without a GPU, CPU tensors take them too when Triton's
interpreter is on (TRITON_INTERPRET=1 before syncbn is imported) and SYNCBN_TRITON=1.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from . import triton_kernels

Tensor = torch.Tensor

# Read once: this runs on every step of every layer.
_TRITON_ON_CPU = triton_kernels.INTERPRETED and os.environ.get("SYNCBN_TRITON") == "1"


def uses_triton(x: Tensor) -> bool:
    """Whether the functions below run the Triton kernels for input ``x``."""
    if not triton_kernels.TRITON_AVAILABLE or x.dtype not in triton_kernels.SUPPORTED_DTYPES:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _TRITON_ON_CPU


def reduction_dims(ndim: int) -> List[int]:
    """All dims but the channel dim 1."""
    return [0] + list(range(2, ndim))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in fp64 for fp64 input, else in fp32 (also for fp16/bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_view(values: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an ndim-dimensional input."""
    return values.reshape([1, -1] + [1] * (ndim - 2))


def local_count(x: Tensor) -> int:
    """Values per channel on this rank; known on the host from the shape alone."""
    return x.numel() // x.shape[1]


def local_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, M2 = sum (x - mean)^2) per channel of the local batch, in fp64, zeros if empty.

    Both are centred on this rank's own mean (two-pass or Welford), never on an arbitrary
    element: an outlier anywhere in the channel costs no precision. Computed in fp32 (fp64 for
    fp64 input) and widened to fp64 for the merge.
    """
    channels = x.shape[1]
    count = local_count(x)
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return zeros, zeros
    if uses_triton(x):
        return triton_kernels.local_moments(x)
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


def forward_payload(count: int, mean: Tensor, m2: Tensor, shift: Tensor) -> Tensor:
    """[count, sum (x - shift) (C), sum (x - shift)^2 (C)] in fp64 from local moments.

    ``shift`` (fp64, (C,)) must be the same on every rank: the sums then add up over ranks,
    and a shift near the global mean keeps the merge well conditioned (see global_moments).
    """
    offset = mean - shift
    return torch.cat([offset.new_full((1,), count), count * offset, m2 + count * offset * offset])


def payload_about(x: Tensor, shift: Tensor) -> Tensor:
    """forward_payload taken from the data: [count, sum (x - shift), sum (x - shift)^2] in fp64.

    One more pass over x, for a shift close to the mean: x - shift is then nearly exact in fp64,
    so no rank's mean enters the merge with its own rounding.
    """
    centered = x.double() - channel_view(shift, x.dim())
    dims = reduction_dims(x.dim())
    return torch.cat([shift.new_full((1,), local_count(x)), centered.sum(dims),
                      centered.square_().sum(dims)])


def global_moments(payload: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased var) of the whole group from the all-reduced forward payload.

    var = S2/M - (S1/M)^2 about the shared shift: in fp64 its relative error is about
    2^-52 * (W + 1) * (1 + condition), condition = (mean - shift)^2 / var (see
    ill_conditioned). The count stays a 0-dim device tensor so no host sync is needed; an
    empty group gives mean = shift and var 0 (callers keep running stats unchanged then).
    """
    count = payload[0]
    # Both sums divided in one op (a small layer's step is bound by the number of ops).
    offset, mean_square = (payload[1:].view(2, -1) / count.clamp(min=1.0)).unbind()
    var = (mean_square - offset * offset).clamp_(min=0.0)
    return count, shift + offset, var


def ill_conditioned(mean: Tensor, var: Tensor, shift: Tensor, dtype: torch.dtype,
                    world_size: int) -> bool:
    """Whether global_moments' (mean, var), merged about ``shift``, may have lost precision that
    ``dtype`` would show.

    The fp64 merge error of var, relative, is about 2^-52 * (W + 1) * (1 + condition), where
    condition = (mean - shift)^2 / var. fp32 statistics (fp32/fp16/bf16 input) carry 2^-24 of
    their own: the merge may cost up to a quarter of that, condition up to 2^26 / (W + 1)
    (|mean - shift| up to about 4700 std at W = 2, 250 std at W = 1024). fp64 statistics carry
    2^-53: any condition above 1 may already cost them a few ulps. A host read: on CPU, where
    the payload lives on the host, it is free.
    """
    limit = 1.0 if dtype == torch.float64 else float(1 << 26) / (world_size + 1)
    offset = mean - shift
    return bool((offset * offset > limit * var).any())


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    count: Tensor,
    mean: Tensor,
    var: Tensor,
) -> None:
    """BatchNorm's running-stat update, skipped (device-side) when the group saw no values.

    running_var takes the unbiased variance; momentum=None is the cumulative average
    1 / num_batches_tracked, read on the device.
    """
    has_values = count > 0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(has_values)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = num_batches_tracked.clamp(min=1).to(running_mean.dtype).reciprocal()
    else:
        factor = torch.full((), float(momentum), dtype=running_mean.dtype, device=running_mean.device)
    factor = factor * has_values  # 0: an empty group leaves the statistics as they are
    unbiased_var = var * (count / (count - 1).clamp(min=1.0))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased_var.to(running_var.dtype), factor)


def _affine_in(param: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if param is None else param.to(dtype)


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias in one fused pass; keeps dtype and layout."""
    if uses_triton(x):
        return triton_kernels.normalize(x, mean, var, weight, bias, eps)
    acc = accumulation_dtype(x.dtype)
    return torch.batch_norm(
        x, _affine_in(weight, acc), _affine_in(bias, acc), mean.to(acc), var.to(acc),
        False, 0.0, eps, torch.backends.cudnn.enabled,
    )


def backward_payload(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """[sum dy (C), sum dy * xhat (C)] of the local batch in the accumulation dtype."""
    if uses_triton(x):
        return triton_kernels.backward_payload(dy, x, mean, var, eps)
    channels = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    if local_count(x) == 0:  # the fused kernel below faults on empty input
        return torch.zeros(2 * channels, dtype=acc, device=x.device)
    ones = torch.ones(channels, dtype=acc, device=x.device)
    # Eval-mode BatchNorm backward computes exactly these two per-channel sums in one pass:
    # grad_weight = sum dy * (x - mean) * invstd, grad_bias = sum dy.
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, ones, mean.to(acc), var.to(acc), None, None, False, eps, [False, True, True]
    )
    return torch.cat([sum_dy, sum_dy_xhat])


def input_grad(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
    global_payload: Tensor, count: Tensor,
) -> Tensor:
    """dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the group.

    Written per channel in centred form, dx = a * dy + b * (x - mean) + c: x - mean is taken
    before any scaling, so a large mean costs no more than the rounding of the mean itself.
    Computed in the accumulation dtype (fp32 for half input) in x's layout.
    """
    if uses_triton(x):
        return triton_kernels.input_grad(dy, x, mean, var, weight, eps, global_payload, count)
    acc = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    mean_dy, mean_dy_xhat = (global_payload.view(2, -1).to(acc) / count.to(acc).clamp(min=1.0)).unbind()
    b = -scale * invstd * mean_dy_xhat
    c = -scale * mean_dy
    ndim = x.dim()
    # Subtract the mean first, explicitly: torch's eval batch_norm would fold it into alpha * x + beta,
    # which is the cancelling form again. In the accumulation dtype, rounded to x's dtype once.
    centered = x.to(acc) - channel_view(mean.to(acc), ndim)
    dx = torch.addcmul(channel_view(c, ndim), centered, channel_view(b, ndim))
    return dx.addcmul_(dy.to(acc), channel_view(scale, ndim)).to(x.dtype)
