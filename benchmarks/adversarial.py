"""Adversarial BatchNorm inputs and the error comparison shared by tests/test_numerics.py and
``python -m benchmarks.numerics``.

A :class:`Case` names a distribution, a dtype and a rank layout; :func:`global_batch` draws
the whole group's (x, dy) for one step from the case alone, so every rank, the oracles and
torch's BatchNorm see the same values without communicating.

Three runs of a case are compared:

- the candidate (syncbn on each rank's slice, see :func:`run_syncbn_rank`);
- torch's own BatchNorm in the same dtype on the concatenated batch, one process;
- a high-precision oracle: float64 torch BatchNorm on the concatenated batch, or for float64
  input :func:`longdouble_reference` (numpy extended precision), where torch's float64
  BatchNorm would otherwise read as error 0.

Per quantity (y, dx, dweight, dbias, running_mean, running_var) and channel, the candidate
passes if its error is at most ``2 x torch's error + floor``; :func:`floors` writes the floor
down and says why each term is there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import syncbn

QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
BATCHNORM_BY_DIM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                    4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
EPS = 1e-5  # BatchNorm's default; every run of a case uses it
# Allowed factor over torch BatchNorm's own error (issue 11).
TORCH_ERROR_FACTOR = 2.0
# "A few ulps": output rounding (1/2 ulp) plus the handful of roundings of a fused
# normalize / lerp / centred sum, each at most one ulp of the quantity's magnitude.
FLOOR_ULPS = 4.0
# How far the batch mean may be off, in units of u_a |mean| (see floors()): half of it when
# it is rounded once from a wider (fp64) reduction, a few when summed in its own precision.
MEAN_ROUNDING = {torch.float32: 0.5, torch.float64: FLOOR_ULPS}

Generator = Callable[[np.random.Generator, Tuple[int, ...], float, Sequence[int]], np.ndarray]


def _normal(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    return rng.standard_normal(shape)


def _outlier_first(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """N(0, 1) whose first value of every channel on every rank is ``parameter`` (a ReLU
    output, a padded border): the value a rank-local centre would naively be taken from."""
    x = rng.standard_normal(shape)
    first = (slice(None),) + (0,) * (len(shape) - 2)
    for start in rank_starts:
        x[(start,) + first] = parameter
    return x


def _channel_sign(shape) -> np.ndarray:
    channels = shape[1]
    signs = np.array([1.0 if c % 2 == 0 else -1.0 for c in range(channels)])
    return (signs * (1.0 + np.arange(channels) / channels)).reshape([1, -1] + [1] * (len(shape) - 2))


def _large_mean(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """std 1, |mean| = ``parameter`` x (1 .. 2) per channel, alternating sign."""
    return rng.standard_normal(shape) + parameter * _channel_sign(shape)


def _large_mean_small_std(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """|mean| 1e6 (x 1 .. 2 per channel), std 1e6 / ``parameter`` (the issue's 1e6 / 1e-2)."""
    return rng.standard_normal(shape) * (1e6 / parameter) + 1e6 * _channel_sign(shape)


def _near_constant(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """|mean| = ``parameter``, std = 1e-6 x |mean|: the variance sits far below eps."""
    mean = parameter * _channel_sign(shape)
    return mean + 1e-6 * np.abs(mean) * rng.standard_normal(shape)


def _relu(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """max(N(0, 1), 0): half the values exactly zero, first values often zero."""
    return np.maximum(rng.standard_normal(shape), 0.0)


def _heavy_tail(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """Student-t with 2 degrees of freedom (infinite variance), clipped to +-1e4 so that it
    fits float16."""
    return np.clip(rng.standard_t(2.0, size=shape), -1e4, 1e4)


def _wide_range(rng: np.random.Generator, shape, parameter, rank_starts) -> np.ndarray:
    """mean ``parameter``, std ``parameter`` / 4: near float16's range at 1e4 (values up to the
    6e4 clip), squares beyond float32's range at 1e18 for bfloat16 (a sum of x^2 overflows)."""
    x = parameter + 0.25 * parameter * rng.standard_normal(shape)
    return np.clip(x, -6e4, 6e4) if parameter < 6e4 else x


# name -> (generator, what its parameter means)
DISTRIBUTIONS: Dict[str, Tuple[Generator, str]] = {
    "normal": (_normal, "-"),
    "outlier_first": (_outlier_first, "first value of each rank"),
    "large_mean": (_large_mean, "|mean| / std"),
    "large_mean_small_std": (_large_mean_small_std, "|mean| / std"),
    "near_constant": (_near_constant, "|mean|"),
    "relu": (_relu, "-"),
    "heavy_tail": (_heavy_tail, "-"),
    "wide_range": (_wide_range, "mean"),
}

_COMMON = [("normal", 0.0), ("outlier_first", 100.0), ("outlier_first", 1000.0), ("relu", 0.0),
           ("heavy_tail", 0.0), ("near_constant", 1.0)]
# (distribution, parameter) per input dtype: |mean|/std up to 1e4 in fp32 and 1e8 in fp64
# (issue 11's ranges; one fp32 all-reduce about a shift of 0 cannot promise more), and data
# near the half dtypes' ranges.
DISTRIBUTIONS_BY_DTYPE: Dict[torch.dtype, List[Tuple[str, float]]] = {
    torch.float32: _COMMON + [("large_mean", 1e2), ("large_mean", 1e3), ("large_mean", 1e4),
                              ("near_constant", 1e2)],
    torch.float64: _COMMON + [("large_mean", 1e2), ("large_mean", 1e4), ("large_mean", 1e6),
                              ("large_mean", 1e8), ("large_mean_small_std", 1e8), ("near_constant", 1e6)],
    torch.float16: _COMMON + [("wide_range", 1e4)],
    torch.bfloat16: _COMMON + [("wide_range", 1e18)],
}


@dataclass(frozen=True)
class Case:
    distribution: str
    dtype: torch.dtype
    sizes: Tuple[int, ...]  # batch size of each rank
    parameter: float = 0.0  # the distribution's knob, see DISTRIBUTIONS
    channels: int = 3
    spatial: Tuple[int, ...] = (5,)
    steps: int = 1
    seed: int = 0
    momentum: Optional[float] = 0.1
    # dy = N(0, 1) + grad_correlation x (x standardized per channel): a loss that pushes along
    # xhat, so mean(dy xhat) is O(1) and the input gradient's cancellation is exercised.
    grad_correlation: float = 0.0

    @property
    def param_dtype(self) -> torch.dtype:
        """fp16/bf16 input keeps fp32 parameters and buffers (AMP)."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    @property
    def accumulation_dtype(self) -> torch.dtype:
        """The narrowest precision any BatchNorm may hold statistics in for this input."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def rank_rows(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])

    def label(self) -> str:
        parameter = "" if DISTRIBUTIONS[self.distribution][1] == "-" else f"({self.parameter:g})"
        grad = f" dy+{self.grad_correlation:g}xhat" if self.grad_correlation else ""
        return (f"{self.distribution}{parameter} {str(self.dtype).replace('torch.', '')} "
                f"sizes={self.sizes} steps={self.steps}{grad}")


def global_batch(case: Case, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the whole group for ``step``, already rounded to the case's dtype."""
    rng = np.random.default_rng([case.seed, step, 11])
    shape = (sum(case.sizes), case.channels) + tuple(case.spatial)
    rank_starts = [r.start for r in map(case.rank_rows, range(len(case.sizes))) if r.stop > r.start]
    generator = DISTRIBUTIONS[case.distribution][0]
    x = generator(rng, shape, case.parameter, rank_starts)
    dy = rng.standard_normal(shape)
    if case.grad_correlation:
        axes = (0,) + tuple(range(2, len(shape)))
        spread = x.std(axis=axes, keepdims=True)
        dy += case.grad_correlation * (x - x.mean(axis=axes, keepdims=True)) / np.where(spread > 0, spread, 1.0)
    return torch.from_numpy(x).to(case.dtype), torch.from_numpy(dy).to(case.dtype)


def initial_affine(case: Case) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in the parameter dtype, values exact in every dtype used."""
    weight = torch.linspace(0.5, 1.5, case.channels, dtype=torch.float64).to(case.param_dtype)
    bias = torch.linspace(-0.25, 0.25, case.channels, dtype=torch.float64).to(case.param_dtype)
    return weight, bias


@dataclass
class Record:
    """Per step: y, dx (rows of this run), dweight, dbias (this run's share), and the
    buffers after the step."""
    y: List[torch.Tensor] = field(default_factory=list)
    dx: List[torch.Tensor] = field(default_factory=list)
    dweight: List[torch.Tensor] = field(default_factory=list)
    dbias: List[torch.Tensor] = field(default_factory=list)
    running_mean: List[torch.Tensor] = field(default_factory=list)
    running_var: List[torch.Tensor] = field(default_factory=list)
    num_batches_tracked: List[int] = field(default_factory=list)


def make_layer(cls: Callable[..., torch.nn.Module], case: Case,
               dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    layer = cls(case.channels, eps=EPS, momentum=case.momentum).to(dtype or case.param_dtype)
    weight, bias = initial_affine(case)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.train()


def run_steps(layer: torch.nn.Module, case: Case, rows: slice,
              dtype: Optional[torch.dtype] = None) -> Record:
    """Train ``layer`` on ``rows`` of every step's global batch, input in ``dtype``
    (default: the case's)."""
    record = Record()
    for step in range(case.steps):
        x, dy = global_batch(case, step)
        x = x[rows].to(dtype or case.dtype).requires_grad_()
        y = layer(x)
        y.backward(dy[rows].to(y.dtype))
        record.y.append(y.detach().clone())
        record.dx.append(x.grad.clone())
        record.dweight.append(layer.weight.grad.clone())
        record.dbias.append(layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None
        record.running_mean.append(layer.running_mean.clone())
        record.running_var.append(layer.running_var.clone())
        record.num_batches_tracked.append(int(layer.num_batches_tracked))
    return record


def run_syncbn_rank(case: Case) -> Record:
    """The rank function: syncbn.SyncBatchNorm (default group) on this rank's rows."""
    rank = syncbn.resolve_communicator().rank
    return run_steps(make_layer(syncbn.SyncBatchNorm, case), case, case.rank_rows(rank))


def batchnorm_class(case: Case) -> Callable[..., torch.nn.Module]:
    return BATCHNORM_BY_DIM[2 + len(case.spatial)]


def run_torch_batchnorm(case: Case) -> Record:
    """torch's BatchNorm in the case's dtype on the concatenated batch, one process."""
    return run_steps(make_layer(batchnorm_class(case), case), case, slice(None))


# --- the high-precision oracle -------------------------------------------------------------

LD = np.longdouble


def to_extended(t: torch.Tensor) -> np.ndarray:
    """A tensor's values in numpy extended precision (exact for every torch float dtype)."""
    return t.detach().double().numpy().astype(LD)


def _per_channel(a: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (C, N * prod(*))."""
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


@dataclass
class StepStats:
    """Exact (extended-precision) per-channel statistics of one step of the global batch."""
    mean: np.ndarray
    var: np.ndarray  # biased
    invstd: np.ndarray
    mean_dy: np.ndarray
    mean_dy_xhat: np.ndarray
    sum_abs_dy: np.ndarray
    sum_abs_dy_xhat: np.ndarray
    max_abs_xhat: np.ndarray
    max_abs_dy: np.ndarray
    mean_abs_dev: np.ndarray  # mean |x - mean|
    count: int


def step_stats(x: torch.Tensor, dy: torch.Tensor) -> StepStats:
    xs, dys = _per_channel(to_extended(x)), _per_channel(to_extended(dy))
    count = xs.shape[1]
    mean = xs.mean(axis=1)
    centred = xs - mean[:, None]
    var = (centred * centred).mean(axis=1)  # two passes in extended precision
    invstd = 1 / np.sqrt(var + LD(EPS))
    xhat = centred * invstd[:, None]
    return StepStats(mean=mean, var=var, invstd=invstd, mean_dy=dys.mean(axis=1),
                     mean_dy_xhat=(dys * xhat).mean(axis=1), sum_abs_dy=np.abs(dys).sum(axis=1),
                     sum_abs_dy_xhat=np.abs(dys * xhat).sum(axis=1),
                     max_abs_xhat=np.abs(xhat).max(axis=1), max_abs_dy=np.abs(dys).max(axis=1),
                     mean_abs_dev=np.abs(centred).mean(axis=1),
                     count=count)


def longdouble_reference(case: Case) -> Dict[str, List[np.ndarray]]:
    """BatchNorm's training steps written out in numpy extended precision, from the math
    (two-pass mean and biased variance, centred input gradient, unbiased running variance)."""
    weight, bias = (to_extended(t) for t in initial_affine(case))
    running_mean = np.zeros(case.channels, dtype=LD)
    running_var = np.ones(case.channels, dtype=LD)
    out: Dict[str, List[np.ndarray]] = {q: [] for q in QUANTITIES}
    for step in range(case.steps):
        x, dy = global_batch(case, step)
        s = step_stats(x, dy)
        xs, dys = _per_channel(to_extended(x)), _per_channel(to_extended(dy))
        xhat = (xs - s.mean[:, None]) * s.invstd[:, None]
        y = weight[:, None] * xhat + bias[:, None]
        dx = (weight * s.invstd)[:, None] * (dys - s.mean_dy[:, None] - xhat * s.mean_dy_xhat[:, None])
        factor = LD(1) / (step + 1) if case.momentum is None else LD(case.momentum)
        running_mean = (1 - factor) * running_mean + factor * s.mean
        running_var = (1 - factor) * running_var + factor * s.var * s.count / (s.count - 1)
        shape = (x.shape[1], x.shape[0]) + tuple(x.shape[2:])
        out["y"].append(np.moveaxis(y.reshape(shape), 0, 1))
        out["dx"].append(np.moveaxis(dx.reshape(shape), 0, 1))
        out["dweight"].append((dys * xhat).sum(axis=1))
        out["dbias"].append(dys.sum(axis=1))
        out["running_mean"].append(running_mean.copy())
        out["running_var"].append(running_var.copy())
    return out


def oracle(case: Case) -> Dict[str, List[np.ndarray]]:
    """float64 torch BatchNorm on the concatenated batch; numpy extended precision for float64
    input (where torch's float64 BatchNorm is the run being measured)."""
    if case.dtype == torch.float64:
        return longdouble_reference(case)
    layer = make_layer(batchnorm_class(case), case, torch.float64)
    return as_arrays(run_steps(layer, case, slice(None), torch.float64))


def as_arrays(record: Record) -> Dict[str, List[np.ndarray]]:
    return {q: [to_extended(t) for t in getattr(record, q)] for q in QUANTITIES}


def merge_ranks(records: Sequence[Record]) -> Tuple[Dict[str, List[np.ndarray]], List[Dict[str, List[np.ndarray]]]]:
    """The group's result seen as one run: y and dx concatenated in rank order, parameter
    gradients summed over ranks (what DDP's reduction makes of the local shares); and each
    rank's buffers apart (every rank must hold the right ones)."""
    steps = len(records[0].y)
    merged: Dict[str, List[np.ndarray]] = {q: [] for q in ("y", "dx", "dweight", "dbias")}
    for step in range(steps):
        merged["y"].append(np.concatenate([to_extended(r.y[step]) for r in records]))
        merged["dx"].append(np.concatenate([to_extended(r.dx[step]) for r in records]))
        merged["dweight"].append(sum(to_extended(r.dweight[step]) for r in records))
        merged["dbias"].append(sum(to_extended(r.dbias[step]) for r in records))
    buffers = [{q: [to_extended(t) for t in getattr(r, q)] for q in ("running_mean", "running_var")}
               for r in records]
    return merged, buffers


def channel_max(a: np.ndarray) -> np.ndarray:
    """Per-channel max of |a| for (N, C, *) or (C,) arrays."""
    a = np.abs(a)
    return a if a.ndim == 1 else _per_channel(a).max(axis=1, initial=LD(0))


# --- the floor -----------------------------------------------------------------------------

def floors(case: Case, reference: Dict[str, List[np.ndarray]]) -> Dict[str, np.ndarray]:
    """Per quantity and channel, the error no BatchNorm in these dtypes can be asked to beat
    (max over steps). u_o, u_a, u_p: machine epsilon of the output, accumulation and parameter
    dtypes; |w|, |b| the affine parameters; the statistics are the exact ones of the batch.

    - Rounding: FLOOR_ULPS ulps of the quantity's magnitude. For a result that is a difference
      or a sum (dx, dweight, dbias, running stats) the magnitude is that of its terms, not of
      the (possibly cancelled) result: each term is rounded once before they meet.
    - The mean itself: any implementation holds the batch mean in its accumulation dtype. In
      fp32 (fp32 and half input) it can be the correctly rounded value of an fp64 reduction,
      off by u_a |mean| / 2 (torch's is); in fp64 it is a sum of many fp64 terms, off by a few
      ulps. Across ranks it is also built from per-rank sums of values centred on their local
      mean, each sum in the accumulation dtype: one ulp of those terms' magnitude, the mean
      absolute deviation (MAD), on top. So the mean may be off by
      d = k u_a |mean| + u_a MAD, k = MEAN_ROUNDING[accumulation dtype]. Every xhat moves by
      e = d invstd, and with it y by |w| e, dx by
      |w| invstd e (|mean(dy xhat)| + max|xhat| |mean(dy)|), dweight by e |sum dy| and
      running_mean by d. The variance moves only to second order: computed about a mean off
      by d it is var + d^2, so it gets (FLOOR_ULPS d)^2.
      A first-order variance error (u |mean| std, e.g. Chan's merge of separately rounded
      local means) is not unavoidable and gets no allowance.
    """
    u_o = torch.finfo(case.dtype).eps
    u_a = torch.finfo(case.accumulation_dtype).eps
    u_p = torch.finfo(case.param_dtype).eps
    weight, bias = (np.abs(to_extended(t)) for t in initial_affine(case))
    out = {q: np.zeros(case.channels, dtype=LD) for q in QUANTITIES}
    prev_mean = np.zeros(case.channels, dtype=LD)
    prev_var = np.ones(case.channels, dtype=LD)
    carried = {q: np.zeros(case.channels, dtype=LD) for q in ("running_mean", "running_var")}
    for step in range(case.steps):
        s = step_stats(*global_batch(case, step))
        factor = LD(1) / (step + 1) if case.momentum is None else LD(case.momentum)
        mean_error = MEAN_ROUNDING[case.accumulation_dtype] * u_a * np.abs(s.mean) + u_a * s.mean_abs_dev
        e = mean_error * s.invstd
        unbiased = s.var * s.count / (s.count - 1)
        dx_terms = weight * s.invstd * (s.max_abs_dy + np.abs(s.mean_dy) + s.max_abs_xhat * np.abs(s.mean_dy_xhat))
        this_step = {
            "y": FLOOR_ULPS * (u_o * channel_max(reference["y"][step]) + u_a * (weight * s.max_abs_xhat + bias))
                 + weight * e,
            "dx": FLOOR_ULPS * (u_o * channel_max(reference["dx"][step]) + u_a * dx_terms)
                  + weight * s.invstd * e * (np.abs(s.mean_dy_xhat) + s.max_abs_xhat * np.abs(s.mean_dy)),
            "dweight": FLOOR_ULPS * u_a * s.sum_abs_dy_xhat + e * np.abs(s.mean_dy) * s.count,
            "dbias": FLOOR_ULPS * u_a * s.sum_abs_dy,
            # Scaled by the momentum factor f, plus what the previous step left: (1 - f) of it.
            "running_mean": FLOOR_ULPS * u_p * (np.abs(prev_mean) + np.abs(s.mean)) + factor * mean_error
                            + (1 - factor) * carried["running_mean"],
            "running_var": FLOOR_ULPS * u_p * (prev_var + unbiased) + factor * (FLOOR_ULPS * mean_error) ** 2
                           + (1 - factor) * carried["running_var"],
        }
        carried = {q: this_step[q] for q in ("running_mean", "running_var")}
        for q in QUANTITIES:
            out[q] = np.maximum(out[q], this_step[q])
        prev_mean, prev_var = reference["running_mean"][step], reference["running_var"][step]
    return out


# --- the comparison ------------------------------------------------------------------------

def errors(result: Dict[str, List[np.ndarray]], reference: Dict[str, List[np.ndarray]]) -> Dict[str, np.ndarray]:
    """Per quantity, per channel: max |result - reference| over elements and steps."""
    return {q: np.max([channel_max(a - b) for a, b in zip(result[q], reference[q])], axis=0)
            for q in result}


@dataclass
class Comparison:
    case: Case
    candidate: Dict[str, np.ndarray]  # per quantity, per channel error
    torch: Dict[str, np.ndarray]
    floor: Dict[str, np.ndarray]
    counter_problems: List[str] = field(default_factory=list)  # num_batches_tracked per rank

    def bound(self, quantity: str) -> np.ndarray:
        return TORCH_ERROR_FACTOR * self.torch[quantity] + self.floor[quantity]

    def failures(self) -> List[str]:
        lines = list(self.counter_problems)
        for q in QUANTITIES:
            for c in np.flatnonzero(~(self.candidate[q] <= self.bound(q))):
                lines.append(f"{q}[channel {c}]: error {float(self.candidate[q][c]):.3g} > "
                             f"{TORCH_ERROR_FACTOR:g} x torch {float(self.torch[q][c]):.3g} + floor "
                             f"{float(self.floor[q][c]):.3g}")
        return lines

    def ratio(self, quantity: str) -> float:
        """max over channels of candidate error / torch error (inf where only torch is exact)."""
        candidate, torch_error = self.candidate[quantity], self.torch[quantity]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(candidate == 0, 0.0, candidate / torch_error)
        return float(np.max(ratios))

    def margin(self, quantity: str) -> float:
        """max over channels of candidate error / (2 x torch error + floor): <= 1 passes."""
        return float(np.max(self.candidate[quantity] / self.bound(quantity)))

    def check(self) -> None:
        problems = self.failures()
        assert not problems, f"{self.case.label()}:\n  " + "\n  ".join(problems)


def compare(case: Case, records: Sequence[Record]) -> Comparison:
    """The candidate's per-rank records against the oracle, next to torch's BatchNorm."""
    reference = oracle(case)
    merged, buffers = merge_ranks(records)
    candidate = errors(merged, reference)
    for q in ("running_mean", "running_var"):
        # Every rank must hold the group's statistics: the worst rank counts.
        candidate[q] = np.max([errors(b, reference)[q] for b in buffers], axis=0)
    torch_error = errors(as_arrays(run_torch_batchnorm(case)), reference)
    expected_counts = list(range(1, case.steps + 1))  # every step sees a non-empty global batch
    counter_problems = [f"num_batches_tracked on rank {rank}: {r.num_batches_tracked}, expected {expected_counts}"
                        for rank, r in enumerate(records) if r.num_batches_tracked != expected_counts]
    return Comparison(case, candidate, torch_error, floors(case, reference), counter_problems)


def extended_precision_available() -> bool:
    """numpy's longdouble is wider than float64 (x86-64: 80-bit; aarch64 Linux: 128-bit)."""
    return np.finfo(np.longdouble).eps < 1e-18
