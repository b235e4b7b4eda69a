"""Numerics on adversarial data (issue 11): syncbn is as accurate as torch's own BatchNorm.

Every case compares syncbn.SyncBatchNorm (train mode, one or two steps, on real ranks over
gloo or MPI) with a high-precision oracle: float64 BatchNorm on the concatenated batch, or for
float64 input an extended-precision numpy reference. For y, dx, dweight, dbias, running_mean
and running_var the error must be at most 2x torch BatchNorm's own error on the concatenated
batch in the same dtype, plus a floor of a few ulps and the rounding of the mean itself
(benchmarks/adversarial.py: the distributions, the oracle and the floor, shared with
``python -m benchmarks.numerics``).

The hypothesis battery is bounded for CI (``SYNCBN_HYPOTHESIS_PROFILE=ci``, the default:
30 examples); ``SYNCBN_HYPOTHESIS_PROFILE=long`` runs 1000 and is marked slow. Named cases
below pin each bug the issue reports, so a failure names it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.adversarial import (
    DISTRIBUTIONS_BY_DTYPE,
    EPS,
    FLOOR_ULPS,
    LD,
    QUANTITIES,
    Case,
    Record,
    as_arrays,
    compare,
    extended_precision_available,
    global_batch,
    initial_affine,
    longdouble_reference,
    make_layer,
    run_steps,
    run_syncbn_rank,
    run_torch_batchnorm,
    to_extended,
)
from conftest import MPI_AVAILABLE

import syncbn

LONG = os.environ.get("SYNCBN_HYPOTHESIS_PROFILE", "ci") == "long"
BATTERY_SETTINGS = settings(max_examples=1000 if LONG else 30, deadline=None, derandomize=not LONG,
                            suppress_health_check=[HealthCheck.too_slow])
BACKEND_CHOICES = ["gloo", "mpi"] if MPI_AVAILABLE else ["gloo"]

requires_extended_precision = pytest.mark.skipif(
    not extended_precision_available(), reason="numpy longdouble is float64 here: no fp64 oracle")

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


@st.composite
def battery_cases(draw) -> tuple:
    dtype = draw(st.sampled_from([F32, F64, F16, BF16]))
    distribution, parameter = draw(st.sampled_from(DISTRIBUTIONS_BY_DTYPE[dtype]))
    world_size = draw(st.integers(1, 4))
    sizes = tuple(draw(st.lists(st.integers(0, 4), min_size=world_size, max_size=world_size)))
    if sum(sizes) < 2:  # a global batch of 0 or 1 sample has dedicated tests elsewhere
        sizes = sizes[:-1] + (sizes[-1] + 2,)
    case = Case(distribution, dtype, sizes, parameter,
                channels=draw(st.integers(1, 3)),
                spatial=draw(st.sampled_from([(16,), (4, 5), (2, 3, 3)])),
                steps=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 2**16)),
                momentum=draw(st.sampled_from([0.1, None])),
                grad_correlation=draw(st.sampled_from([0.0, 3.0])))
    return draw(st.sampled_from(BACKEND_CHOICES)), case


def _long_profile_is_slow(test):
    return pytest.mark.slow(test) if LONG else test


# The hard case, always in the battery: fp64, |mean|/std 1e8, first step (running_mean 0).
@_long_profile_is_slow
@requires_extended_precision
@given(drawn=battery_cases())
@example(drawn=("gloo", Case("large_mean", F64, (3, 5), 1e8, spatial=(16,))))
@example(drawn=("gloo", Case("large_mean_small_std", F64, (2, 0, 4), 1e8, spatial=(16,))))
@BATTERY_SETTINGS
def test_adversarial_battery_is_within_twice_torch_error_plus_floor(rank_pool, drawn):
    backend, case = drawn
    records = rank_pool(len(case.sizes), backend).run(run_syncbn_rank, case)
    compare(case, records).check()


# --- named cases: each bug of the issue, so a failure names it ------------------------------

NAMED = {
    # _shifted_sums-style centring on the first element: fp32 sums about 100 / 1000 cancel.
    "fp32_outlier_first_value_100": Case("outlier_first", F32, (16, 8), 100.0, spatial=(8, 8)),
    "fp32_outlier_first_value_1000": Case("outlier_first", F32, (16, 8), 1000.0, spatial=(8, 8)),
    # E[x^2] - mean^2 in fp64 about 0: the issue's mean 1e6 / std 1e-2, first step.
    "fp64_mean_1e6_std_1e-2_first_step": Case("large_mean_small_std", F64, (16, 8), 1e8, spatial=(8, 8)),
    "fp64_mean_over_std_1e8_first_step": Case("large_mean", F64, (16, 8), 1e8, spatial=(8, 8)),
    "fp64_mean_over_std_1e8_two_steps": Case("large_mean", F64, (16, 8), 1e8, spatial=(8, 8), steps=2),
    # The b*x + c input gradient loses digits when |mean| >> std and mean(dy xhat) is O(1)
    # (sharper: test_input_gradient_is_exact_given_the_layers_own_statistics below).
    "fp32_input_grad_at_mean_1e3": Case("large_mean", F32, (16, 8), 1e3, channels=8, spatial=(8, 8),
                                        seed=1, grad_correlation=3.0),
    "fp32_input_grad_at_mean_1e4": Case("large_mean", F32, (16, 8), 1e4, channels=8, spatial=(8, 8),
                                        grad_correlation=3.0),
    "fp32_relu_half_zeros": Case("relu", F32, (16, 8), spatial=(8, 8)),
    "fp16_near_range": Case("wide_range", F16, (16, 8), 1e4, spatial=(8, 8)),
    "bf16_squares_beyond_fp32_range": Case("wide_range", BF16, (16, 8), 1e18, spatial=(8, 8)),
}


def _needs_fp64_oracle(case: Case) -> List:
    return [requires_extended_precision] if case.dtype == F64 else []


NAMED_PARAMS = [pytest.param(case, id=name, marks=_needs_fp64_oracle(case)) for name, case in NAMED.items()]


def _one_process_case(case: Case) -> Case:
    return dataclasses.replace(case, sizes=(sum(case.sizes),))


@pytest.mark.parametrize("case", NAMED_PARAMS)
def test_named_case_in_one_process_is_within_twice_torch_error_plus_floor(case):
    case = _one_process_case(case)
    compare(case, [run_steps(make_layer(syncbn.SyncBatchNorm, case), case, slice(None))]).check()


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
@pytest.mark.parametrize("case", NAMED_PARAMS)
def test_named_case_on_two_uneven_ranks_is_within_twice_torch_error_plus_floor(rank_pool, backend, case):
    compare(case, rank_pool(2, backend).run(run_syncbn_rank, case)).check()


# --- the input gradient in centred form ----------------------------------------------------

def _dx_error_given_own_statistics(case: Case, records: Sequence[Record]) -> np.ndarray:
    """Per channel: the input gradient's error against the exact BatchNorm gradient evaluated
    at the layer's OWN mean and variance, over FLOOR_ULPS ulps of its terms (<= 1 passes).

    With momentum 1 the running statistics after one step are the batch mean and the unbiased
    variance the layer used, so the rounding of the mean (the floor's largest term at large
    |mean|) drops out and what is left is the arithmetic of the gradient itself: the centred
    form loses nothing there, dx = a*dy + b*x + c loses u |b x| = u |w| invstd^2 |mean(dy xhat)| |mean|.
    """
    x, dy = (to_extended(t) for t in global_batch(case, 0))
    dx = np.concatenate([to_extended(r.dx[0]) for r in records])
    weight = to_extended(initial_affine(case)[0])
    count = x.size // case.channels
    mean = to_extended(records[0].running_mean[0])
    var = to_extended(records[0].running_var[0]) * (count - 1) / count
    invstd = 1 / np.sqrt(var + LD(EPS))
    view = (1, -1) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    xhat = (x - mean.reshape(view)) * invstd.reshape(view)
    mean_dy, mean_dy_xhat = dy.mean(axis=axes), (dy * xhat).mean(axis=axes)
    exact = (weight * invstd).reshape(view) * (dy - mean_dy.reshape(view) - xhat * mean_dy_xhat.reshape(view))
    terms = weight * invstd * (np.abs(dy).max(axis=axes) + np.abs(mean_dy)
                               + np.abs(xhat).max(axis=axes) * np.abs(mean_dy_xhat))
    # FLOOR_ULPS roundings of the terms before they cancel, and the output's own rounding.
    u = torch.finfo(case.dtype).eps
    allowed = FLOOR_ULPS * u * (terms + np.abs(exact).max(axis=axes))
    return np.abs(dx - exact).max(axis=axes) / allowed


CENTRED_CASES = {f"fp32_mean_over_std_{r:g}": Case("large_mean", F32, (16, 8), r, channels=8, spatial=(8, 8),
                                                   momentum=1.0, grad_correlation=3.0)
                 for r in (1e2, 1e3, 1e4)}


def test_harness_input_gradient_check_passes_torch_and_an_independent_centred_implementation():
    for case in CENTRED_CASES.values():
        assert _dx_error_given_own_statistics(case, [run_torch_batchnorm(case)]).max() <= 1
        split = dataclasses.replace(case, sizes=(case.sizes[0], 0, case.sizes[1]))
        assert _dx_error_given_own_statistics(split, _emulated_group(split, "two_reductions")).max() <= 1


@pytest.mark.parametrize("case", CENTRED_CASES.values(), ids=CENTRED_CASES.keys())
def test_input_gradient_is_exact_given_the_layers_own_statistics_in_one_process(case):
    case = _one_process_case(case)
    ratio = _dx_error_given_own_statistics(case, [run_steps(make_layer(syncbn.SyncBatchNorm, case), case, slice(None))])
    assert ratio.max() <= 1, f"dx error / allowed per channel: {ratio.astype(float).round(2)}"


@pytest.mark.parametrize("case", CENTRED_CASES.values(), ids=CENTRED_CASES.keys())
def test_input_gradient_is_exact_given_the_layers_own_statistics_on_two_ranks(rank_pool, case):
    ratio = _dx_error_given_own_statistics(case, rank_pool(2, "gloo").run(run_syncbn_rank, case))
    assert ratio.max() <= 1, f"dx error / allowed per channel: {ratio.astype(float).round(2)}"


# --- the Apex different-batch-size scenario --------------------------------------------------

APEX_SIZES = (16, 8)


def _apex_conv_output(rank: int) -> torch.Tensor:
    """A default-initialized 3->6 3x3 conv (padding 1) of rank 0's 16 images of N(0, 50^2) or
    rank 1's 8 of N(0, 1): the layer input of Apex's different-batch-size SyncBN test, its
    border outputs included."""
    with torch.random.fork_rng():
        torch.manual_seed(2809)
        conv = torch.nn.Conv2d(3, 6, 3, 1, 1)
        images = [torch.randn(APEX_SIZES[0], 3, 8, 8) * 50.0, torch.randn(APEX_SIZES[1], 3, 8, 8)]
    with torch.no_grad():
        return conv(images[rank])


def _apex_upstream_grad() -> torch.Tensor:
    """Apex's upstream gradient: k/10 for k in 0..9, weighted by 2 / global batch."""
    generator = torch.Generator().manual_seed(2810)
    total = sum(APEX_SIZES)
    return torch.randint(0, 10, (total, 6, 8, 8), generator=generator).float() / 10.0 * 2 / total


def _apex_rank() -> Dict[str, torch.Tensor]:
    rank = syncbn.resolve_communicator().rank
    x = _apex_conv_output(rank).requires_grad_()
    layer = syncbn.SyncBatchNorm(6)
    rows = slice(0, APEX_SIZES[0]) if rank == 0 else slice(APEX_SIZES[0], None)
    layer(x).backward(_apex_upstream_grad()[rows])
    return {"x": x.detach(), "weight_grad": layer.weight.grad}


def _batchnorm_weight_grad(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    layer = torch.nn.BatchNorm2d(6).to(dtype)
    layer(x.to(dtype)).backward(_apex_upstream_grad().to(dtype))
    return layer.weight.grad.double()


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_apex_different_batch_size_weight_grad_within_1e6_of_float64_batchnorm(rank_pool, backend):
    results = rank_pool(2, backend).run(_apex_rank)
    x = torch.cat([r["x"] for r in results])
    expected = _batchnorm_weight_grad(x, F64)
    syncbn_error = (sum(r["weight_grad"].double() for r in results) - expected).abs().max().item()
    torch_error = (_batchnorm_weight_grad(x, F32) - expected).abs().max().item()
    # Apex's own tolerance (absolute 1e-6); torch's fp32 BatchNorm is printed for scale.
    assert syncbn_error <= 1e-6, f"syncbn weight-grad error {syncbn_error:.3g} (torch fp32: {torch_error:.3g})"


# --- the harness itself: it passes correct implementations and fails a wrong one ------------

def _group_moments(parts: List[torch.Tensor], method: str) -> tuple:
    """(mean, biased var) in fp64 of the concatenation of ``parts`` (rank batches, already in
    the accumulation dtype), computed the way ``method`` says."""
    dims = [0] + list(range(2, parts[0].dim()))
    view = [1, -1] + [1] * (parts[0].dim() - 2)
    total = sum(p.numel() // p.shape[1] for p in parts)
    if method == "two_reductions":
        # As the issue allows: fp64 sums give the mean, then fp64 sums of squares about that
        # very mean give the variance (its error is second order in the mean's).
        mean = sum(p.double().sum(dims) for p in parts) / total
        return mean, sum(((p.double() - mean.reshape(view)) ** 2).sum(dims) for p in parts) / total
    if method == "one_reduction":
        # The issue's single all-reduce: per rank, moments about the local mean in the
        # accumulation dtype (plus the centred sum, which carries that mean's rounding), then
        # fp64 sums about 0. Exact enough for fp32 and half input up to |mean|/std 1e4.
        s0 = s1 = s2 = 0.0
        for p in parts:
            count = p.numel() // p.shape[1]
            if count:
                local_mean = p.mean(dims)
                centred = p - local_mean.reshape(view)
                m, c, m2 = local_mean.double(), centred.sum(dims).double(), centred.square().sum(dims).double()
                s0, s1, s2 = s0 + count, s1 + count * m + c, s2 + m2 + 2 * m * c + count * m * m
        mean = s1 / s0
        return mean, (s2 / s0 - mean * mean).clamp(min=0)
    assert method == "uncentred"  # E[x^2] - E[x]^2 in plain sums: the cancellation to reject
    mean = sum(p.sum(dims) for p in parts) / total
    return mean.double(), (sum((p * p).sum(dims) for p in parts) / total - mean * mean).clamp(min=0).double()


def _emulated_group(case: Case, method: str) -> List[Record]:
    """A second implementation of synchronized BatchNorm, written from the math for these
    tests only: statistics merged over simulated ranks (see _group_moments), the rest in the
    accumulation dtype, the input gradient in centred form."""
    acc = case.accumulation_dtype
    weight, bias = initial_affine(case)
    running_mean = torch.zeros(case.channels, dtype=case.param_dtype)
    running_var = torch.ones(case.channels, dtype=case.param_dtype)
    records = [Record() for _ in case.sizes]
    for step in range(case.steps):
        x_all, dy_all = global_batch(case, step)
        dims = [0] + list(range(2, x_all.dim()))
        view = [1, -1] + [1] * (x_all.dim() - 2)
        parts = [x_all[case.rank_rows(r)].to(acc) for r in range(len(case.sizes))]
        total = sum(p.numel() // case.channels for p in parts)
        mean, var = _group_moments(parts, method)
        mean_acc, var_acc = mean.to(acc), var.to(acc)
        invstd = torch.rsqrt(var_acc + EPS)
        factor = 1.0 / (step + 1) if case.momentum is None else case.momentum
        running_mean = torch.lerp(running_mean, mean.to(case.param_dtype), factor)
        running_var = torch.lerp(running_var, (var * total / (total - 1)).to(case.param_dtype), factor)
        local_sums = []
        for r, p in enumerate(parts):
            xhat = (p - mean_acc.reshape(view)) * invstd.reshape(view)
            dy = dy_all[case.rank_rows(r)].to(acc)
            local_sums.append((dy.sum(dims), (dy * xhat).sum(dims), xhat, dy))
        mean_dy = sum(s[0].double() for s in local_sums) / total
        mean_dy_xhat = sum(s[1].double() for s in local_sums) / total
        for record, (sum_dy, sum_dy_xhat, xhat, dy) in zip(records, local_sums):
            w, b = weight.to(acc).reshape(view), bias.to(acc).reshape(view)
            record.y.append((xhat * w + b).to(case.dtype))
            dx = w * invstd.reshape(view) * (dy - mean_dy.to(acc).reshape(view)
                                             - xhat * mean_dy_xhat.to(acc).reshape(view))
            record.dx.append(dx.to(case.dtype))
            record.dweight.append(sum_dy_xhat.to(case.param_dtype))
            record.dbias.append(sum_dy.to(case.param_dtype))
            record.running_mean.append(running_mean.clone())
            record.running_var.append(running_var.clone())
            record.num_batches_tracked.append(step + 1)
    return records


def test_harness_scores_torch_batchnorm_at_ratio_one():
    case = Case("outlier_first", F32, (16,), 1000.0, spatial=(8, 8), steps=2)
    comparison = compare(case, [run_torch_batchnorm(case)])
    comparison.check()
    assert all(comparison.ratio(q) in (0.0, 1.0) for q in QUANTITIES), \
        {q: comparison.ratio(q) for q in QUANTITIES}


@pytest.mark.parametrize("case", NAMED_PARAMS + [
    pytest.param(Case("heavy_tail", F32, (3, 0, 5, 2), spatial=(4, 5), steps=2, momentum=None), id="heavy_tail_4_ranks"),
    pytest.param(Case("near_constant", F16, (3, 1, 4), 1.0, spatial=(16,)), id="fp16_near_constant"),
    pytest.param(Case("relu", BF16, (2, 5), spatial=(2, 3, 3), steps=2), id="bf16_relu"),
])
def test_harness_accepts_an_independent_correct_implementation_on_uneven_ranks(case):
    # Four-way uneven split of the same global batch: a different summation order from
    # torch's, so this proves the floors are reachable by any correct method, not just torch's.
    if len(case.sizes) == 2:
        total = sum(case.sizes)
        case = dataclasses.replace(case, sizes=(total // 2, 0, total // 3, total - total // 2 - total // 3))
    compare(case, _emulated_group(case, "two_reductions")).check()


@pytest.mark.parametrize("case", [p for p in NAMED_PARAMS if p.values[0].dtype != F64])
def test_harness_accepts_the_issues_one_reduction_design_for_fp32_and_half_input(case):
    # Moments about each rank's local mean, one fp64 reduction about 0: what the floors must
    # admit below fp64 (fp64 at large |mean|/std needs the second reduction, see above).
    case = dataclasses.replace(case, sizes=(7, 0, 11, 6))
    compare(case, _emulated_group(case, "one_reduction")).check()


@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_harness_rejects_uncentred_fp32_moments_at_large_mean(ratio):
    case = Case("large_mean", F32, (8, 8), ratio, spatial=(8, 8))
    failures = compare(case, _emulated_group(case, "uncentred")).failures()
    assert any(line.startswith("running_var") for line in failures), failures


@requires_extended_precision
def test_longdouble_reference_agrees_with_float64_batchnorm_on_benign_data():
    # Two independent oracles of the same fp64 input: they must agree to fp64 rounding.
    case = Case("normal", F64, (9,), spatial=(4, 5), steps=2, momentum=None)
    extended = longdouble_reference(case)
    double = as_arrays(run_torch_batchnorm(case))
    for q in QUANTITIES:
        for got, want in zip(extended[q], double[q]):
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                       rtol=1e-12, atol=1e-12, err_msg=q)
