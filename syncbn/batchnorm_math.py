"""The arithmetic of synchronized BatchNorm, free of communication.

Forward: local statistics -> packed payload -> (all-reduce elsewhere) -> global statistics
-> running-stat update -> normalize. Backward: local gradient sums -> packed payload ->
(all-reduce elsewhere) -> input gradient.

Precision: local mean and variance come from a stable fused kernel in fp32 (fp64 for fp64
input); the forward payload carries [count, sum x, sum x^2] in fp64, so merging ranks
cancels only at fp64 precision (relative error ~1e-16 * (mean/std)^2), and counts stay exact.

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


def forward_payload(x: Tensor) -> Tensor:
    """[count, sum x (C), sum x^2 (C)] of the local batch, in fp64, zeros for an empty batch."""
    if uses_triton(x):
        return triton_kernels.forward_payload(x)
    channels = x.shape[1]
    count = local_count(x)
    if count == 0:
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
    if x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu":
        center, centered_sum, centered_sq = _shifted_sums(x)
    else:
        acc = accumulation_dtype(x.dtype)
        # For fp16/bf16 input, scratch running stats in fp32 make the fused kernel accumulate and
        # return fp32 statistics without an fp32 copy of x (momentum 0 leaves the scratch alone).
        scratch = torch.zeros(2, channels, dtype=acc, device=x.device) if x.dtype != acc else None
        center, var = torch.batch_norm_update_stats(
            x, None if scratch is None else scratch[0], None if scratch is None else scratch[1], 0.0)
        centered_sum, centered_sq = torch.zeros_like(center), var * count
    # Sums about a per-channel center, moved to sums about 0 in fp64, where nothing cancels.
    center, centered_sum, centered_sq = center.double(), centered_sum.double(), centered_sq.double()
    return torch.cat([center.new_full((1,), count), centered_sum + count * center,
                      centered_sq + center * (2 * centered_sum + count * center)])


def _shifted_sums(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(shift, sum (x - shift), sum (x - shift)^2) per channel, for a non-empty x.

    The shift is one value of each channel's own data, so the squares stay small whatever the
    mean and plain fp32 sums stay accurate. On CPU this is about 3x faster for contiguous fp32
    input than batch_norm_update_stats, whose NCHW fp32 kernel is slow (channels_last and
    fp16/bf16 input are fast there and keep it).
    """
    shift = x[0].reshape(x.shape[1], -1)[:, 0]
    centered = x - channel_view(shift, x.dim())
    dims = reduction_dims(x.dim())
    return shift, centered.sum(dims), centered.square_().sum(dims)


def global_moments(payload: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased var) of the whole group from the all-reduced forward payload.

    The count stays a 0-dim device tensor so no host sync is needed; an empty group gives
    mean 0 and var 0 (callers keep running stats unchanged then).
    """
    channels = (payload.numel() - 1) // 2
    count = payload[0]
    safe_count = count.clamp(min=1.0)
    mean = payload[1 : channels + 1] / safe_count
    var = (payload[channels + 1 :] / safe_count - mean * mean).clamp_(min=0.0)
    return count, mean, var


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
        num_batches_tracked.add_(has_values.to(num_batches_tracked.dtype))
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

    Written per channel as dx = a * dy + b * x + c, two fused passes in x's dtype and layout.
    """
    if uses_triton(x):
        return triton_kernels.input_grad(dy, x, mean, var, weight, eps, global_payload, count)
    channels = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    mean = mean.to(acc)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    safe_count = count.to(acc).clamp(min=1.0)
    mean_dy = global_payload[:channels].to(acc) / safe_count
    mean_dy_xhat = global_payload[channels:].to(acc) / safe_count
    a = scale
    b = -scale * invstd * mean_dy_xhat
    c = scale * (mean * invstd * mean_dy_xhat - mean_dy)
    # b * x + c is eval-mode BatchNorm with mean 0 and var + eps == 1: torch's fused kernel,
    # much faster than a broadcast addcmul.
    dx = torch.batch_norm(x, b, c, torch.zeros_like(b), torch.full_like(b, 1.0 - eps),
                          False, 0.0, eps, False)
    # In x's dtype: an fp32 factor would promote dy to an fp32 copy first (5x slower for bf16).
    return dx.addcmul_(dy, channel_view(a, x.dim()).to(x.dtype))
