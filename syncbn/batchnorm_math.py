"""The semantics of synchronized BatchNorm, free of communication and of any one kernel.

Forward: local moments -> payload about a shared shift -> (all-reduce elsewhere) -> group
statistics -> running-stat update -> normalize. Backward: local gradient sums -> (all-reduce
elsewhere) -> input gradient. The kernels that compute these steps live in :mod:`syncbn.kernels`
(a plain-torch reference, native CPU code, Triton), one implementation per backend; this module
says what they compute: the payload's layout, how the group statistics follow from it, the
running-stat update, and the checks every rank reads from the reduced payload.

Precision: each rank's mean and M2 = sum (x - mean)^2 are centred on its own mean. The payload
carries [count, sum (x - K), sum (x - K)^2] in fp64 about a per-channel shift K that every rank
shares, so it adds up over ranks, and the merge cancels only to 2^-52 * (1 + (mean - K)^2 / var)
relative (see group_totals); counts stay exact. K is the running mean, which tracks the mean.
The payload also carries K and K^2 per channel, so every rank can see, per channel, whether the
ranks really shared K (a checkpoint loaded on one rank only would otherwise make every rank's
statistics silently wrong).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch

Tensor = torch.Tensor


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


# ----- the forward payload: 4C + 3 fp64 values, summed over the group --------------------------
#   [0]            n: values per channel
#   [1 : 1+C]      S1 = sum (x - K)          = n (mean - K)
#   [1+C : 1+2C]   S2 = sum (x - K)^2        = M2 + n (mean - K)^2
#   [1+2C : 1+3C]  K, the rank's shift       (summed: the ranks' agreement, per channel)
#   [1+3C : 1+4C]  K^2
#   [4C+1]         1 in the payload of a rank with invalid input (summed: how many)
#   [4C+2]         1 if the rank's input is fp64 (summed: whether the merge must keep fp64)

def forward_payload_numel(channels: int) -> int:
    """Values (fp64) in a layer's forward all-reduce."""
    return 4 * channels + 3


def moments_numel(channels: int) -> int:
    """The leading [n, S1, S2] part of the payload: what the group statistics follow from."""
    return 2 * channels + 1


INVALID_INPUT, FP64_INPUT = -2, -1


def moments_payload(count: int, mean: Tensor, m2: Tensor, shift: Tensor) -> Tensor:
    """[n, S1, S2] (2C+1, fp64) from local moments about ``shift``: the first part of the
    forward payload, written in differentiable ops (double backward rebuilds it)."""
    offset = mean - shift
    return torch.cat([offset.new_full((1,), count), count * offset, m2 + count * offset * offset])


def global_moments(moments: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased var) of the whole group from the reduced [n, S1, S2].

    var = S2/M - (S1/M)^2 about the shared shift: in fp64 its relative error is about
    2^-52 * (W + 1) * (1 + condition), condition = (mean - shift)^2 / var (see
    group_totals). The count stays a 0-dim device tensor so no host sync is needed; an
    empty group gives mean = shift and var 0 (callers keep running stats unchanged then).
    """
    count = moments[0]
    # Both sums divided in one op (a small layer's step is bound by the number of ops).
    offset, mean_square = (moments[1:].view(2, -1) / count.clamp(min=1.0)).unbind()
    var = (mean_square - offset * offset).clamp_(min=0.0)
    return count, shift + offset, var


# ----- the backward payload: 2C fp64 values, summed over the group ------------------------------
#   [0 : C]        sum dy                    (a rank's own: dbias)
#   [C : 2C]       sum dy * xhat             (a rank's own: dweight)

def parameter_sums(sums: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(dbias, dweight): this rank's own backward sums in the parameters' dtype, copied out of
    ``sums`` before the sums take the backward all-reduce in place."""
    copied = sums.to(dtype, copy=True)
    channels = copied.numel() // 2
    return copied[:channels], copied[channels:]


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


# ----- what every rank reads from the reduced payload (on the host) ---------------------------

# Spread of the ranks' shifts in a channel, relative to that channel's scale, that still counts
# as agreement. Ranks of one dtype keep bitwise equal running means (the same reduced payload,
# the same arithmetic): any difference is real. Ranks whose dtypes differ (fp64 on some, fp32 on
# others) round the same running mean differently, by about 2^-24 of the channel's scale a step,
# and those roundings can add up over steps (momentum=None): up to 2^-10 passes then.
SHIFT_TOLERANCE = 2.0 ** -20
MIXED_DTYPE_SHIFT_TOLERANCE = 2.0 ** -10
# The condition, times (W + 1), above which a merge of fp32 statistics counts as ill-conditioned
# (see group_totals): a quarter of fp32's own 2^-24.
FP32_CONDITION_LIMIT = float(1 << 26)


class GroupTotals(NamedTuple):
    """What the reduced forward payload says about the group, read alike on every rank."""

    count: float
    invalid_ranks: int
    fp64_ranks: int
    differing_channels: Tuple[int, ...]  # whose shift differs across ranks by more than rounding
    finite: bool
    ill_conditioned: bool  # the merge may have lost precision the statistics' dtype would show


def group_totals(payload: np.ndarray, channels: int, world_size: int) -> GroupTotals:
    """Read the reduced forward payload (a host copy).

    Shifts: a channel's shifts disagree when their spread over ranks, sum K^2 / W - (sum K / W)^2,
    exceeds the tolerance squared times the channel's scale, mean K^2 + var: per channel, so
    neither a permutation or a sign flip of the running means, nor one channel among large ones,
    hides. Its fp64 rounding, about 2^-50 of the scale, is far below the tolerance.

    Conditioning: the fp64 merge error of var, relative, is about 2^-52 * (W + 1) *
    (1 + condition), where condition = (mean - shift)^2 / var. fp32 statistics (fp32/fp16/bf16
    input) carry 2^-24 of their own: the merge may cost up to a quarter of that, condition up to
    2^26 / (W + 1) (|mean - shift| up to about 4700 std at W = 2, 250 std at W = 1024). fp64
    statistics carry 2^-53: any condition above 1 may already cost them a few ulps.
    """
    finite = bool(np.isfinite(payload).all())
    if not finite:  # NaN and Inf compare False below: no channel is flagged by them
        with np.errstate(invalid="ignore", over="ignore"):
            return _group_totals(payload, channels, world_size, finite)
    return _group_totals(payload, channels, world_size, finite)


def statistics_ready(totals: GroupTotals, check_finite: bool) -> bool:
    """Whether the group's statistics follow from the reduced payload as it is: no rank's input
    invalid, no shift differing, more than one value, finite where ``check_finite`` asks, and a
    well-conditioned merge. Otherwise there is an error to raise or (on CPU) a merge to redo."""
    return not (totals.invalid_ranks or totals.differing_channels or totals.count == 1
                or (check_finite and not totals.finite) or totals.ill_conditioned)


def _group_totals(payload: np.ndarray, channels: int, world_size: int, finite: bool) -> GroupTotals:
    c = channels
    count = float(payload[0])
    fp64_ranks = int(payload[FP64_INPUT])
    offset = payload[1:1 + c] / max(count, 1.0)
    var = np.maximum(payload[1 + c:1 + 2 * c] / max(count, 1.0) - offset * offset, 0.0)
    k_mean = payload[1 + 2 * c:1 + 3 * c] / world_size
    k2_mean = payload[1 + 3 * c:1 + 4 * c] / world_size
    tolerance = SHIFT_TOLERANCE if fp64_ranks in (0, world_size) else MIXED_DTYPE_SHIFT_TOLERANCE
    differing = np.flatnonzero(k2_mean - k_mean * k_mean > tolerance ** 2 * (k2_mean + var))
    limit = 1.0 if fp64_ranks else FP32_CONDITION_LIMIT / (world_size + 1)
    ill_conditioned = bool((offset * offset > limit * var).any())
    return GroupTotals(count, int(payload[INVALID_INPUT]), fp64_ranks,
                       tuple(int(channel) for channel in differing), finite, ill_conditioned)
