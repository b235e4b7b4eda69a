"""Every kernel backend of :mod:`syncbn.kernels` on CPU: against float64 BatchNorm, and the native
kernels against the reference.

A layer step runs through a backend's five kernels the way syncbn.functional chains them, in a
group emulated in one process: every rank's payload (and gradient sums) summed in place of the
all-reduce, the re-centring round where the reduced payload says the merge is ill-conditioned.
Its y, dx, dweight, dbias and running statistics must be within 2x torch BatchNorm's own error
in the same dtype plus a floor of a few ulps (benchmarks/adversarial.py: the bound of
tests/test_numerics.py), on the adversarial distributions of every dtype, uneven and empty ranks,
(N, C), 3-D, 4-D and 5-D input, channels_last, strided input, and channel counts that are not a
multiple of the vector width. The reference runs the same battery (its kernels are the oracle of
the others only where they meet it).

The native kernels are built once per session (the ``native_kernels`` fixture: a test fails, not
skips, when the build fails, unless SYNCBN_NATIVE=0 turns them off); their fallback, first-use
build and cache are tested in subprocesses with a stand-in compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest
import torch

from benchmarks.adversarial import (DISTRIBUTIONS, DISTRIBUTIONS_BY_DTYPE, EPS, FLOOR_ULPS, LD, Case, Record, batchnorm_class,
                                    channel_max, compare, errors, extended_precision_available, floors,
                                    global_batch, initial_affine, make_layer, merge_ranks, to_extended)
from syncbn import batchnorm_math as bnm
from syncbn.kernels import native, reference

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoff of fp32 and fp64
REPO = Path(__file__).resolve().parents[1]

requires_extended_precision = pytest.mark.skipif(
    not extended_precision_available(), reason="numpy longdouble is float64 here: no fp64 oracle")


@pytest.fixture(scope="session")
def native_kernels() -> ModuleType:
    """The native backend, built (or loaded from the cache) once per session."""
    if os.environ.get("SYNCBN_NATIVE") == "0":
        pytest.skip("SYNCBN_NATIVE=0 turns the native kernels off")
    assert native.available(), "the native kernels did not build or load (see the warning above)"
    return native


@pytest.fixture(params=["reference", "native"])
def backend(request) -> ModuleType:
    return reference if request.param == "reference" else request.getfixturevalue("native_kernels")


# --- layouts -------------------------------------------------------------------------------------

def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout``: contiguous, channels_last (4-D and 5-D), channels_first
    (the channels innermost, any dim: (N, L, C) transposed), or strided (every other element of
    a wider tensor, which no dense form has)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "channels_innermost":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    assert layout == "strided"
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


# --- a layer step through one backend's kernels, in an emulated group ----------------------------

def run_group(backend: ModuleType, case: Case, layout: str = "contiguous") -> List[Record]:
    """Each rank's Record of ``case`` (every step) with syncbn.functional's chain of kernels;
    the all-reduces are sums over the ranks, the backward's dy in x's memory format."""
    world = len(case.sizes)
    layers = [make_layer(batchnorm_class(case), case) for _ in range(world)]
    records = [Record() for _ in range(world)]
    channels = case.channels
    for step in range(case.steps):
        x_all, dy_all = global_batch(case, step)
        xs = [in_layout(x_all[case.rank_rows(r)], layout) for r in range(world)]
        dys = [dy_all[case.rank_rows(r)].contiguous(memory_format=_memory_format(x)) for r, x in enumerate(xs)]
        shift = layers[0].running_mean.clone()  # the same on every rank; rank 0's changes below
        payload = sum(backend.forward_payload(x, layer.running_mean) for x, layer in zip(xs, layers))
        moments = payload[:bnm.moments_numel(channels)]
        if bnm.group_totals(payload.numpy(), channels, world).ill_conditioned:
            _, shift, _ = backend.finalize(moments, shift, None, None, None, case.momentum)
            moments = sum(backend.moments_about(x, shift) for x in xs)
        local_sums = []
        for x, dy, layer, record in zip(xs, dys, layers, records):
            count, mean, var = backend.finalize(moments.clone(), shift, layer.running_mean, layer.running_var,
                                                layer.num_batches_tracked, case.momentum)
            weight, bias = layer.weight.detach(), layer.bias.detach()
            record.y.append(backend.normalize(x, mean, var, weight, bias, EPS))
            sums, own_bias, own_weight = backend.backward_sums(dy, x, mean, var, EPS, weight.dtype)
            local_sums.append(sums)
            record.dbias.append(own_bias.to(bias.dtype))
            record.dweight.append(own_weight)
            record.running_mean.append(layer.running_mean.clone())
            record.running_var.append(layer.running_var.clone())
            record.num_batches_tracked.append(int(layer.num_batches_tracked))
        group_sums = sum(local_sums)
        for x, dy, layer, record in zip(xs, dys, layers, records):
            record.dx.append(backend.input_grad(dy, x, mean, var, layer.weight.detach(), EPS, group_sums, count))
    return records


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if x.dim() == (4 if fmt is torch.channels_last else 5) and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


# (sizes, channels, spatial, layout): uneven and empty ranks, 2-D to 5-D, every layout, channel
# counts below, at and off the vector width (8 or 16 lanes).
GEOMETRIES = [
    ((6, 0, 3), 3, (4, 5), "contiguous"),
    ((5, 4), 17, (3, 3), "channels_last"),
    ((9, 7), 2, (), "contiguous"),
    ((2, 3), 3, (2, 3, 3), "channels_last"),
    ((3, 3), 5, (16,), "strided"),
    ((4, 0, 2), 16, (3, 4), "channels_innermost"),
]


def _battery() -> List:
    cases = []
    index = 0
    for dtype, distributions in DISTRIBUTIONS_BY_DTYPE.items():
        for distribution, parameter in distributions:
            sizes, channels, spatial, layout = GEOMETRIES[index % len(GEOMETRIES)]
            case = Case(distribution, dtype, sizes, parameter, channels=channels, spatial=spatial, steps=2,
                        seed=index, momentum=0.1 if index % 2 else None, grad_correlation=3.0 * (index % 3 == 0))
            marks = [requires_extended_precision] if dtype == F64 else []
            cases.append(pytest.param(case, layout, id=f"{case.label()} {layout}", marks=marks))
            index += 1
    return cases


# Where the reference misses the bound (reported; the native kernels meet it there).
REFERENCE_MISSES = {
    "large_mean(1e+06) float64 sizes=(6, 0, 3) steps=2 dy+3xhat contiguous":
        "each rank's mean is rounded to fp64 before the merge: a first-order variance error "
        "u |mean| std between ranks (the shift is within a std of the mean, so no re-centring)",
    "large_mean_small_std(1e+08) float64 sizes=(9, 7) steps=2 contiguous": "the same",
    "near_constant(1) bfloat16 sizes=(3, 3) steps=2 strided":
        "torch's native_batch_norm_backward sums dy in bf16 when x is strided and dy is not",
}


@pytest.mark.parametrize("case,layout", _battery())
def test_layer_step_through_the_kernels_is_within_twice_torch_error_plus_floor(request, backend, case, layout):
    miss = REFERENCE_MISSES.get(f"{case.label()} {layout}")
    if backend is reference and miss:
        request.applymarker(pytest.mark.xfail(strict=True, reason=miss))
    compare(case, run_group(backend, case, layout)).check()


# Sizes where the native kernels split the work: runs longer than a block (pieces), many blocks
# per channel and tasks per channel, many row blocks and tasks in the interleaved layout.
MULTI_BLOCK = [
    pytest.param(Case("large_mean", F32, (2, 1), 1e3, channels=3, spatial=(70, 70)), "contiguous", id="long runs"),
    pytest.param(Case("outlier_first", F32, (40, 24), 100.0, channels=2, spatial=(16, 16)), "contiguous",
                 id="many blocks"),
    pytest.param(Case("near_constant", BF16, (37, 30), 1.0, channels=33, spatial=(9, 9)), "channels_last",
                 id="many row blocks"),
    pytest.param(Case("relu", F16, (300, 211), channels=19, spatial=()), "contiguous", id="rows"),
    # Few rows of many channels: tasks own chunks of channels (300: whole vectors and a tail).
    pytest.param(Case("outlier_first", F32, (3, 2), 100.0, channels=300, spatial=(7, 7)), "channels_last",
                 id="channel chunks"),
]


@pytest.mark.parametrize("case,layout", MULTI_BLOCK)
def test_multi_block_layer_step_is_within_twice_torch_error_plus_floor(native_kernels, case, layout):
    compare(case, run_group(native_kernels, case, layout)).check()


@pytest.mark.parametrize("case,layout", MULTI_BLOCK[:3] + MULTI_BLOCK[4:])
def test_native_results_do_not_depend_on_the_thread_count(native_kernels, case, layout):
    """The work is split by the shape alone: 1 and 2 threads give the same bits."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_group(native_kernels, case, layout)
        torch.set_num_threads(2)
        two = run_group(native_kernels, case, layout)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert a.num_batches_tracked == b.num_batches_tracked
        for name in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            assert all(torch.equal(p, q) for p, q in zip(getattr(a, name), getattr(b, name))), name


# --- the native kernels against the reference ----------------------------------------------------

BENIGN = ["normal", "relu", "heavy_tail"]


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
@pytest.mark.parametrize("distribution", BENIGN)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_layer_step_equals_the_reference(native_kernels, dtype, distribution, layout):
    """Every output within the floor of benchmarks/adversarial.py (a few ulps of the quantity's
    terms, and the rounding of the mean) of the reference's, in the same layout, on data where
    both are exact to their dtype (not at a large mean, where the reference's normalize folds the
    mean into its shift and loses digits the native kernels keep)."""
    case = Case(distribution, dtype, (5, 3), channels=17, spatial=(4, 5), steps=2, grad_correlation=3.0)
    ours, theirs = run_group(native_kernels, case, layout), run_group(reference, case, layout)
    for a, b in zip(ours, theirs):
        assert all(p.stride() == q.stride() for p, q in zip(a.y + a.dx, b.y + b.dx))
    (merged, buffers), (expected, expected_buffers) = merge_ranks(ours), merge_ranks(theirs)
    floor = floors(case, {**expected, **expected_buffers[0]})
    differences = errors(merged, expected)
    for rank_buffers, rank_expected in zip(buffers, expected_buffers):
        differences.update(errors(rank_buffers, rank_expected))
        for quantity, difference in differences.items():
            assert np.all(difference <= floor[quantity]), f"{quantity}: {difference / floor[quantity]} x floor"


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
def test_forward_payload_has_the_interface_layout(native_kernels, dtype):
    x = (torch.randn(4, 3, 5, dtype=F64) * 2 + 1).to(dtype)
    shift = torch.tensor([0.5, -1.0, 3.0])
    ours, theirs = native_kernels.forward_payload(x, shift), reference.forward_payload(x, shift)
    assert ours.dtype == F64 and ours.shape == (4 * 3 + 3,)
    assert torch.equal(ours[0], theirs[0]) and ours[0] == 20  # values per channel
    assert torch.equal(ours[7:], theirs[7:])  # K, K^2, no invalid input, the fp64 flag
    assert ours[-1] == (dtype == F64)
    torch.testing.assert_close(ours[1:7], theirs[1:7], rtol=1e-6, atol=1e-5)
    assert torch.equal(native_kernels.forward_payload(x, None)[7:13], torch.zeros(6, dtype=F64))


# --- the local moments to a few ulps of float64 ----------------------------------------------------

ADVERSARIAL = [("outlier_first", 1000.0), ("large_mean", 1e4), ("near_constant", 100.0), ("relu", 0.0),
               ("heavy_tail", 0.0), ("large_mean_small_std", 1e8)]
MOMENT_SHAPES = [((3, 2, 5000), "contiguous"), ((40, 3, 16, 16), "contiguous"), ((40, 35, 7, 7), "channels_last"),
                 ((3, 300, 7, 7), "channels_last"), ((700, 5), "contiguous"), ((2, 3, 3), "contiguous"),
                 ((5, 4, 3, 3), "strided")]


def _exact_moments(x: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, M2, mean |x|) per channel in numpy extended precision."""
    values = np.moveaxis(x.double().numpy().astype(np.longdouble), 1, 0).reshape(x.shape[1], -1)
    mean = values.mean(axis=1)
    return mean, ((values - mean[:, None]) ** 2).sum(axis=1), np.abs(values).mean(axis=1)


@requires_extended_precision
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("shape,layout", MOMENT_SHAPES)
@pytest.mark.parametrize("distribution,parameter", ADVERSARIAL)
def test_native_local_moments_are_within_a_few_ulps(native_kernels, dtype, shape, layout, distribution, parameter):
    """The mean to fp64 accuracy (an fp64 sum of every value), M2 to a few ulps of the
    accumulation dtype (fp32 for fp32 and half input), however large the mean or skewed the data.

    Read from the payload about the exact mean (rounded to fp64): S1 and S2 then hold the
    deviation of the mean and M2 without cancellation.
    """
    generate = DISTRIBUTIONS[distribution][0]
    x = torch.from_numpy(generate(np.random.default_rng(3), shape, parameter, [0])).to(dtype)
    x = in_layout(x, layout)
    mean, m2, mean_abs = _exact_moments(x)
    shift = torch.from_numpy(mean.astype(np.float64))
    payload = native_kernels.forward_payload(x, shift).numpy().astype(np.longdouble)
    count, channels = payload[0], x.shape[1]
    s1, s2 = payload[1:1 + channels], payload[1 + channels:1 + 2 * channels]
    mean_error = np.abs(s1 / count + shift.numpy() - mean)
    m2_error = np.abs(s2 - s1 * s1 / count - m2)
    u = U64 if dtype == F64 else U32
    # fp64 mean: the rounding of the shift and of the sum itself, a few fp64 ulps of mean |x|.
    assert np.all(mean_error <= 8 * U64 * mean_abs), f"mean error / (U64 mean|x|): {mean_error / (U64 * mean_abs)}"
    assert np.all(m2_error <= 6 * u * m2), f"M2 error / (u M2): {m2_error / (u * m2)}"


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_squares_beyond_the_fp32_range_fall_back_to_fp64_partials(native_kernels, dtype):
    """fp32 partial sums of squares overflow where (x - mean)^2 > 3e38: those blocks are redone
    with fp64 partials, so the statistics stay finite and exact."""
    x = (torch.randn(6, 3, 8, 8, dtype=F64) * 2.5e29 + 1e30).to(dtype)
    for layout in ("contiguous", "channels_last"):
        xl = in_layout(x, layout)
        mean, m2, _ = _exact_moments(xl)
        payload = native_kernels.forward_payload(xl, torch.from_numpy(mean.astype(np.float64))).numpy()
        assert np.isfinite(payload).all()
        m2_native = payload[4:7].astype(np.longdouble) - payload[1:4].astype(np.longdouble) ** 2 / payload[0]
        assert np.all(np.abs(m2_native - m2) <= 4 * U32 * m2)


def test_non_finite_input_gives_a_non_finite_payload(native_kernels):
    """syncbn's check_finite reads the payload: NaN and Inf must reach it."""
    for bad in (float("nan"), float("inf")):
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(4, 3, 5, 5)
            x[2, 1, 3, 3] = bad
            payload = native_kernels.forward_payload(in_layout(x, layout), None)
            assert not torch.isfinite(payload[[2, 5]]).any() and torch.isfinite(payload[[1, 3, 4, 6]]).all()


# --- shapes, layouts and empty batches ---------------------------------------------------------------

@pytest.mark.parametrize("shape,layout", [((2, 3, 4, 5), "channels_last"), ((2, 3, 2, 3, 4), "channels_last"),
                                          ((2, 3, 7), "channels_innermost"), ((2, 3, 4, 5), "strided"),
                                          ((2, 3, 4, 5), "permuted")])
def test_outputs_take_the_layout_of_empty_like(native_kernels, shape, layout):
    x = torch.randn(shape).permute(0, 1, 3, 2) if layout == "permuted" else in_layout(torch.randn(shape), layout)
    dy = torch.randn(x.shape).contiguous(memory_format=_memory_format(x))
    mean, var = x.double().mean(bnm.reduction_dims(x.dim())), x.double().var(bnm.reduction_dims(x.dim()))
    sums, _, _ = native_kernels.backward_sums(dy, x, mean, var, EPS, F32)
    count = torch.tensor(float(bnm.local_count(x)), dtype=F64)
    for ours, theirs in ((native_kernels.normalize(x, mean, var, None, None, EPS),
                          reference.normalize(x, mean, var, None, None, EPS)),
                         (native_kernels.input_grad(dy, x, mean, var, None, EPS, sums, count),
                          reference.input_grad(dy, x, mean, var, None, EPS, sums, count))):
        assert ours.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 5), (0, 2, 2, 3, 3)])
def test_empty_batch(native_kernels, dtype, shape):
    x = torch.empty(shape, dtype=dtype)
    if x.dim() >= 4:
        x = in_layout(x, "channels_last")
    channels = shape[1]
    payload = native_kernels.forward_payload(x, torch.ones(channels))
    assert torch.equal(payload, reference.forward_payload(x, torch.ones(channels)))
    mean, var = torch.zeros(channels, dtype=F64), torch.ones(channels, dtype=F64)
    assert native_kernels.normalize(x, mean, var, None, None, EPS).shape == shape
    sums, own_bias, own_weight = native_kernels.backward_sums(x, x, mean, var, EPS, dtype)
    assert torch.equal(sums, torch.zeros(2 * channels, dtype=F64))
    assert torch.equal(own_bias, torch.zeros(channels, dtype=dtype)) and torch.equal(own_weight, own_bias)
    grad = native_kernels.input_grad(x, x, mean, var, None, EPS, torch.zeros(2 * channels), torch.tensor(0.0))
    assert grad.shape == shape and grad.dtype == dtype


# --- finalize: the group statistics and BatchNorm's running-stat update ---------------------------

@pytest.mark.parametrize("buffers", [F32, F64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("count", [0.0, 1.0, 40.0])
def test_finalize_equals_the_reference(native_kernels, buffers, momentum, count):
    channels = 5
    generator = torch.Generator().manual_seed(int(count))
    shift = torch.randn(channels, generator=generator, dtype=F64).to(buffers)
    s1 = torch.randn(channels, generator=generator, dtype=F64) * count
    s2 = s1 * s1 / max(count, 1.0) + torch.rand(channels, generator=generator, dtype=F64) * count
    moments = torch.cat([torch.tensor([count], dtype=F64), s1, s2])
    results = []
    for backend in (native_kernels, reference):
        state = [torch.randn(channels, generator=torch.Generator().manual_seed(7)).to(buffers),
                 torch.rand(channels, generator=torch.Generator().manual_seed(8)).to(buffers) + 0.5,
                 torch.tensor(3)]
        # The shift is the running mean itself, as in syncbn (read before the update).
        state[0].copy_(shift)
        out = backend.finalize(moments.clone(), state[0], *state, momentum)
        results.append((out, state))
    (ours, our_state), (theirs, their_state) = results
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == F64 and a.shape == b.shape
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=2 * U64, atol=0.0)
    # var = S2 / M - (S1 / M)^2: a few ulps of its terms (fused or not, the rounding differs).
    assert torch.all((ours[2] - theirs[2]).abs() <= 4 * U64 * s2 / max(count, 1.0))
    assert int(our_state[2]) == int(their_state[2]) == 3 + (count > 0)
    for a, b in zip(our_state[:2], their_state[:2]):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(buffers).eps, atol=0.0)
    no_buffers = native_kernels.finalize(moments, None, None, None, None, momentum)
    torch.testing.assert_close(no_buffers[1], moments[1:1 + channels] / max(count, 1.0), rtol=2 * U64, atol=0.0)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
def test_backward_sums_give_the_parameter_sums_rounded_as_tensor_to_rounds(native_kernels, dtype):
    """(dbias, dweight) come out of the native call itself: the fp64 sums, rounded to the
    parameters' dtype bitwise as Tensor.to rounds them, in tensors of their own."""
    generator = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(4, 7, 5, 5, generator=generator, dtype=F64) * 1e3 for _ in range(2))
    mean, var = x.mean(bnm.reduction_dims(4)), x.var(bnm.reduction_dims(4))
    sums, own_bias, own_weight = native_kernels.backward_sums(dy, x, mean, var, EPS, dtype)
    assert torch.equal(own_bias, sums[:7].to(dtype)) and torch.equal(own_weight, sums[7:].to(dtype))
    assert own_bias.data_ptr() != own_weight.data_ptr() != sums.data_ptr()
    sums.mul_(2)  # the backward all-reduce, in place: the parameters' sums stay this rank's
    assert torch.equal(own_bias, (sums[:7] / 2).to(dtype))


# --- group_totals: what every rank reads from the reduced payload ------------------------------------

def _reduced_payload(channels: int, world: int, count: float, offset: np.ndarray, var: np.ndarray,
                     shifts: np.ndarray, invalid: int = 0, fp64_ranks: int = 0) -> torch.Tensor:
    """A reduced 4C+3 payload with the given group statistics and per-rank shifts (world, C)."""
    payload = np.zeros(bnm.forward_payload_numel(channels))
    payload[0] = count
    payload[1:1 + channels] = count * offset
    payload[1 + channels:1 + 2 * channels] = count * (var + offset * offset)
    payload[1 + 2 * channels:1 + 3 * channels] = shifts.sum(0)
    payload[1 + 3 * channels:1 + 4 * channels] = (shifts * shifts).sum(0)
    payload[bnm.INVALID_INPUT], payload[bnm.FP64_INPUT] = invalid, fp64_ranks
    return torch.from_numpy(payload)


def _adversarial_payloads() -> List[Tuple[str, torch.Tensor, int]]:
    rng = np.random.default_rng(5)
    channels, world = 37, 3
    shifts = np.tile(rng.normal(size=channels) * 1e3, (world, 1))
    offset, var = rng.normal(size=channels), rng.random(channels) + 0.1
    cases = [("agreeing", _reduced_payload(channels, world, 96.0, offset, var, shifts), world)]
    moved = shifts.copy()
    moved[1, 4] += 1.0  # one channel, one rank
    cases.append(("one channel differs", _reduced_payload(channels, world, 96.0, offset, var, moved), world))
    cases.append(("permuted on one rank", _reduced_payload(
        channels, world, 96.0, offset, var, np.stack([shifts[0], shifts[1][::-1], shifts[2]])), world))
    cases.append(("negated on one rank", _reduced_payload(
        channels, world, 96.0, offset, var, np.stack([shifts[0], -shifts[1], shifts[2]])), world))
    # A spread of 2^-15 of the scale: beyond one dtype's tolerance, within a mixed group's.
    nudged = shifts.copy()
    nudged[2] += 2.0 ** -15 * np.sqrt(shifts[0] ** 2 + var)
    for fp64_ranks in (0, 1, world):
        cases.append((f"nudged, {fp64_ranks} fp64 ranks", _reduced_payload(
            channels, world, 96.0, offset, var, nudged, fp64_ranks=fp64_ranks), world))
    cases.append(("invalid ranks", _reduced_payload(channels, world, 96.0, offset, var, shifts, invalid=2), world))
    for count in (0.0, 1.0):
        cases.append((f"count {count}", _reduced_payload(channels, world, count, offset, var, shifts), world))
    with_nan = _reduced_payload(channels, world, 96.0, offset, var, shifts)
    with_nan[3] = float("nan")
    cases.append(("NaN sum", with_nan, world))
    with_inf = _reduced_payload(channels, world, 96.0, offset, var, shifts)
    with_inf[1 + channels + 2] = float("inf")
    cases.append(("Inf squared sum", with_inf, world))
    # Conditioning within a few ulps of both limits: each decision must be the reference's.
    for fp64_ranks, limit in ((0, bnm.FP32_CONDITION_LIMIT / (world + 1)), (world, 1.0)):
        for ulps in range(-3, 4):
            ratio = limit * (1.0 + ulps * 2.0 ** -52)
            near = offset.copy()
            near[:] = np.sqrt(ratio * var)
            cases.append((f"condition {ulps:+d} ulps of the limit, {fp64_ranks} fp64 ranks",
                          _reduced_payload(channels, world, 96.0, near, var, shifts, fp64_ranks=fp64_ranks),
                          world))
    cases.append(("one rank", _reduced_payload(5, 1, 8.0, offset[:5], var[:5], shifts[:1, :5]), 1))
    return cases


@pytest.mark.parametrize("name,payload,world", _adversarial_payloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_native_group_totals_equal_the_reference(native_kernels, name, payload, world):
    """Every decision (differing channels, invalid ranks, count, finiteness, conditioning) is
    batchnorm_math's own, bitwise, including payloads at the conditioning limits' edges."""
    channels = (payload.numel() - 3) // 4
    ours = native_kernels.group_totals(payload, channels, world)
    theirs = reference.group_totals(payload, channels, world)
    assert ours == theirs


def test_group_totals_cases_reach_every_decision():
    """The payloads above make every check fire somewhere and stay quiet somewhere (so the
    equality test cannot pass on a path that never decides)."""
    totals = [reference.group_totals(payload, (payload.numel() - 3) // 4, world)
              for _, payload, world in _adversarial_payloads()]
    for field in ("differing_channels", "invalid_ranks", "ill_conditioned"):
        values = [bool(getattr(t, field)) for t in totals]
        assert any(values) and not all(values), field
    assert not all(t.finite for t in totals) and any(t.finite for t in totals)
    assert {0.0, 1.0, 96.0} <= {t.count for t in totals}


@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("name,payload,world", _adversarial_payloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_native_checked_finalize_decides_and_updates_as_the_reference(native_kernels, name, payload, world,
                                                                      check_finite):
    """checked_finalize, one native call, against the reference's group_totals and finalize: the
    same readiness on every payload, the same statistics and running-stat update where ready,
    the same totals and buffers left untouched where not."""
    channels = (payload.numel() - 3) // 4
    results = []
    for backend in (native_kernels, reference):
        shift = torch.linspace(-1.0, 1.0, channels)
        buffers = [shift.clone(), torch.linspace(0.5, 2.0, channels), torch.tensor(3)]
        checked = backend.checked_finalize(payload.clone(), shift, *buffers, 0.1, world, check_finite)
        results.append((checked, buffers))
    (ours, our_buffers), (theirs, their_buffers) = results
    totals = reference.group_totals(payload, channels, world)
    assert isinstance(theirs, bnm.GroupTotals) == (not bnm.statistics_ready(totals, check_finite))
    assert type(ours) is type(theirs)
    if isinstance(theirs, bnm.GroupTotals):
        assert ours == theirs == totals
        assert int(our_buffers[2]) == int(their_buffers[2]) == 3  # nothing updated
        torch.testing.assert_close(our_buffers[0], torch.linspace(-1.0, 1.0, channels), rtol=0, atol=0)
    else:
        # NaN where the payload has one (check_finite off lets it through, as torch does)
        torch.testing.assert_close(ours[:2], theirs[:2], rtol=2 * U64, atol=0.0, equal_nan=True)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-12, atol=1e-300, equal_nan=True)
        assert int(our_buffers[2]) == int(their_buffers[2]) == 3 + (totals.count > 0)
        for a, b in zip(our_buffers[:2], their_buffers[:2]):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(F32).eps, atol=0.0, equal_nan=True)


def test_checked_finalize_cases_are_ready_and_not():
    """The payloads reach both outcomes of checked_finalize (the comparison above cannot pass on
    one path alone)."""
    ready = [bnm.statistics_ready(reference.group_totals(payload, (payload.numel() - 3) // 4, world), False)
             for _, payload, world in _adversarial_payloads()]
    assert any(ready) and not all(ready)


# --- torch.compile: fake implementations and mutation annotations -------------------------------------

def test_operators_pass_opcheck(native_kernels):
    """Schemas (mutated arguments declared), fake implementations, and tracing by AOT autograd."""
    x, dy = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    shift, weight, bias = torch.randn(3), torch.rand(3), torch.rand(3)
    payload = native_kernels.forward_payload(x, shift)
    count, mean, var = native_kernels.finalize(payload[:7], shift, None, None, None, 0.1)
    sums, _, _ = native_kernels.backward_sums(dy, x, mean, var, EPS, F32)
    ops = torch.ops.syncbn_native
    for op, args in [(ops.forward_payload, (x.contiguous(memory_format=torch.channels_last), shift)),
                     (ops.finalize, (payload[:7], shift, torch.zeros(3), torch.ones(3), torch.tensor(0), None)),
                     (ops.normalize, (x.contiguous(memory_format=torch.channels_last), mean, var, weight, bias, EPS)),
                     (ops.backward_sums, (dy, x, mean, var, EPS, F32)),
                     (ops.input_grad, (dy, x, mean, var, weight, EPS, sums, count)),
                     (ops.group_checks, (native_kernels.forward_payload(x, shift), 2, bnm.SHIFT_TOLERANCE,
                                         bnm.MIXED_DTYPE_SHIFT_TOLERANCE, bnm.FP32_CONDITION_LIMIT))]:
        torch.library.opcheck(op, args)


# --- first use: the build, its cache, and the fallback -------------------------------------------------

def _python(script: str, env: dict, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **env},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


FALLBACK_SCRIPT = """
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import syncbn, torch
        from syncbn import kernels
        before = kernels.native._available  # import alone builds nothing
        first, second = kernels.native.available(), kernels.native.available()
        chosen = kernels.for_input(torch.zeros(2, 3)).__name__
    print(json.dumps({"before": before, "first": first, "second": second, "chosen": chosen,
                      "warnings": [str(w.message) for w in caught if "syncbn" in str(w.message)]}))
"""


@pytest.mark.parametrize("compiler,reason", [("/nonexistent/c++", "not found"), ("false", "exit status 1")])
def test_without_a_working_compiler_the_reference_serves_after_one_warning(tmp_path, compiler, reason):
    result = _python(FALLBACK_SCRIPT, {"SYNCBN_CXX": compiler, "SYNCBN_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] is None and report["first"] is False and report["second"] is False
    assert report["chosen"] == "syncbn.kernels.reference"
    assert len(report["warnings"]) == 1 and reason in report["warnings"][0], report["warnings"]
    assert "\n" not in report["warnings"][0]


def test_the_compiler_and_the_cache_come_from_the_environment(monkeypatch, tmp_path):
    """$SYNCBN_CXX, else $CXX, else c++; $SYNCBN_CACHE, else ~/.cache/syncbn; one library per
    compiler (and per source, torch version and CPU: the same key)."""
    for name in ("SYNCBN_CXX", "CXX", "SYNCBN_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert native.compiler() == "c++"
    assert native.cache_dir() == tmp_path / ".cache" / "syncbn"
    default_library = native.library_path()
    monkeypatch.setenv("CXX", "g++-13")
    assert native.compiler() == "g++-13"
    monkeypatch.setenv("SYNCBN_CXX", "ccache c++")
    assert native.compiler() == "ccache c++"
    assert native.library_path() != default_library
    assert native.library_path().parent.parent == default_library.parent.parent
    monkeypatch.setenv("SYNCBN_CACHE", str(tmp_path / "elsewhere"))
    assert native.library_path().parent.parent == tmp_path / "elsewhere"


SWITCH_SCRIPT = """
    import json, torch
    from syncbn import kernels
    print(json.dumps({str(dtype): kernels.for_input(torch.zeros(2, 3, dtype=dtype)).__name__
                      for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}))
"""


@pytest.mark.parametrize("switch,chosen", [({}, "native"), ({"SYNCBN_NATIVE": "0"}, "reference"),
                                           ({"SYNCBN_KERNELS": "reference"}, "reference")])
def test_the_switches_choose_the_cpu_backend(native_kernels, switch, chosen):
    """By default every CPU dtype takes the native kernels; SYNCBN_NATIVE=0 and
    SYNCBN_KERNELS=reference give the reference."""
    result = _python(SWITCH_SCRIPT, {"SYNCBN_NATIVE": "1", "SYNCBN_KERNELS": "", **switch})
    assert result.returncode == 0, result.stderr
    backends = json.loads(result.stdout.splitlines()[-1])
    assert set(backends.values()) == {f"syncbn.kernels.{chosen}"}, backends


def test_ranks_starting_together_build_once_and_load_the_same_library(native_kernels, tmp_path):
    """A stand-in compiler (slow, counting its runs) copies the session's library: two processes
    on an empty cache both load it, and it was built once (the lock; written under a temporary
    name and renamed, so the waiting process never sees half a file)."""
    built = native_kernels.library_path()
    log = tmp_path / "compiler-runs"
    fake = tmp_path / "fake-c++"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys, time
        with open({str(log)!r}, "a") as log:
            log.write("link\\n" if "-shared" in sys.argv else "compile\\n")
        time.sleep(1)
        shutil.copyfile({str(built)!r}, sys.argv[sys.argv.index("-o") + 1])
    """))
    fake.chmod(0o755)
    env = {**os.environ, "SYNCBN_CXX": str(fake), "SYNCBN_CACHE": str(tmp_path / "cache")}
    script = "from syncbn.kernels import native; print(native.available(), native.library_path())"
    ranks = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err for _, err in outputs]
    lines = [out.split() for out, _ in outputs]
    assert lines[0] == lines[1] and lines[0][0] == "True"
    runs = log.read_text().split()
    assert runs.count("link") == 1 and runs.count("compile") == 2, runs  # two parts, one library
    assert [p.name for p in (tmp_path / "cache").glob("*/*")] and not list((tmp_path / "cache").glob("*/*.tmp.so"))
    assert not list((tmp_path / "cache").glob("*/*.o"))


# --- in-place activated BatchNorm: normalize_activate, activated_backward_payload, activated_input_grad

ACTIVATED = {"identity": (0, 0.0), "leaky_relu": (1, 0.01), "elu": (2, 1.0)}
FLOOR_XHAT = 6.0  # |xhat| of every value in these small batches is below this (n < 36)
MEAN_ROUNDING_ULPS = 1.0
# (sizes, channels, spatial, layout): short runs (2x2, walked as rows of C*S by the native
# kernels), long runs with an empty rank, (N, C), channels_last with a channel count off the
# vector width.
ACTIVATED_GEOMETRIES = [((4, 3), 5, (2, 2), "contiguous"), ((3, 0), 17, (5, 6), "contiguous"),
                        ((6, 5), 3, (), "contiguous"), ((2, 3), 17, (4, 5), "channels_last")]
ACTIVATED_DATA = {F32: [("outlier_first", 1000.0), ("large_mean", 1e4), ("near_constant", 1.0), ("normal", 0.0)],
                  F64: [("outlier_first", 1000.0), ("large_mean", 1e8), ("near_constant", 1e6)]}
# Where the reference misses the bound (the native kernels meet it there): its normalize is
# torch's eval batch_norm, which folds the mean into the shift, x * scale + (bias - mean * scale),
# cancelling where |mean| >> std.
ACTIVATED_REFERENCE_MISSES = {"leaky_relu near_constant(1) torch.float32 (2, 3)x17x(4, 5) channels_last"}


def _activated_oracle(x: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], activation: str) -> dict:
    """Training BatchNorm then the activation on the global batch, forward and backward, in numpy
    extended precision: y, dx, dweight, dbias."""
    x, dy = to_extended(x), to_extended(dy)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + LD(EPS))
    xhat = (x - mean) * invstd
    w = to_extended(weight).reshape(shape) if weight is not None else LD(1)
    z = w * xhat + (to_extended(bias).reshape(shape) if weight is not None else LD(0))
    code, parameter = ACTIVATED[activation]
    if code == 1:
        y, slope = np.where(z > 0, z, z * LD(parameter)), np.where(z > 0, LD(1), LD(parameter))
    elif code == 2:
        y, slope = np.where(z > 0, z, LD(parameter) * np.expm1(z)), np.where(z > 0, LD(1), LD(parameter) * np.exp(z))
    else:
        y, slope = z, LD(1)
    dz = dy * slope
    g = dz * w  # dL/dxhat
    dx = invstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    out = {"y": y, "dx": dx}
    if weight is not None:
        out.update(dweight=(dz * xhat).sum(axis=axes), dbias=dz.sum(axis=axes))
    return out


def _torch_activated_step(x: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], activation: str) -> dict:
    """torch's training BatchNorm then the activation module, on the global batch in x's dtype."""
    xd = x.clone().requires_grad_()
    params = [None if p is None else p.clone().requires_grad_() for p in (weight, bias)]
    act = {"identity": torch.nn.Identity(), "leaky_relu": torch.nn.LeakyReLU(0.01), "elu": torch.nn.ELU(1.0)}
    y = act[activation](torch.nn.functional.batch_norm(xd, None, None, *params, True, 0.0, EPS))
    y.backward(dy)
    out = {"y": y.detach(), "dx": xd.grad}
    if weight is not None:
        out.update(dweight=params[0].grad, dbias=params[1].grad)
    return out


def _activated_step(backend: ModuleType, x: torch.Tensor, dy: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], activation: str, sizes: Tuple[int, ...], layout: str,
                    inplace: bool) -> dict:
    """The three activated kernels on each rank's rows (``layout``), the sums added in place of
    the all-reduce, about the statistics of the global batch correctly rounded to fp64 (the
    statistics are not under test here)."""
    code, parameter = ACTIVATED[activation]
    values = to_extended(x)
    axes = (0,) + tuple(range(2, x.dim()))
    mean = torch.from_numpy(values.mean(axis=axes).astype(np.float64))
    var = torch.from_numpy(((values - values.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes).astype(np.float64))
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=F64)
    starts = np.cumsum((0,) + tuple(sizes))
    xs = [in_layout(x[a:b], layout) for a, b in zip(starts[:-1], starts[1:])]
    dys = [in_layout(dy[a:b], layout) for a, b in zip(starts[:-1], starts[1:])]
    ys = []
    for xr in xs:
        given = xr.clone()
        yr = backend.normalize_activate(given, mean, var, weight, bias, EPS, code, parameter, inplace)
        assert yr.stride() == xr.stride()
        if inplace:  # written over the input: the same storage, holding the output
            assert yr.data_ptr() == given.data_ptr() and torch.equal(given, yr)
        else:
            assert torch.equal(given, xr)
        ys.append(yr)
    sums = sum(backend.activated_backward_payload(dyr, yr, weight, bias, code, parameter)
               for dyr, yr in zip(dys, ys))
    assert sums.dtype == F64 and sums.shape == (2 * x.shape[1],)
    dxs = [backend.activated_input_grad(dyr, yr, var, weight, bias, EPS, code, parameter, sums, count)
           for dyr, yr in zip(dys, ys)]
    assert all(dxr.stride() == yr.stride() and dxr.dtype == x.dtype for dxr, yr in zip(dxs, ys))
    out = {"y": torch.cat(ys), "dx": torch.cat(dxs)}
    if weight is not None:
        out.update(dweight=sums[x.shape[1]:], dbias=sums[:x.shape[1]])
    return out


def _activated_floor(case: Case, expected: dict, dy: torch.Tensor) -> dict:
    """benchmarks/adversarial.py's floor of each quantity (one step; no running statistics here).

    The activation's derivative is read at y (ELU's: y + alpha), so the sums carry y's floor
    times sum |dy| (times |xhat| for dweight) on top of BatchNorm's.
    """
    zeros = np.zeros(case.channels, dtype=LD)
    floor = floors(case, {"running_mean": [zeros], "running_var": [zeros + 1],
                          **{name: [value] for name, value in expected.items()}})
    axes = (0,) + tuple(range(2, dy.dim()))
    sum_abs_dy = np.abs(to_extended(dy)).sum(axis=axes)
    floor["dbias"] = floor["dbias"] + floor["y"] * sum_abs_dy
    floor["dweight"] = floor["dweight"] + floor["y"] * sum_abs_dy * FLOOR_XHAT
    return floor


def _channel_errors(got: dict, expected: dict) -> dict:
    return {name: channel_max(to_extended(got[name]) - want) for name, want in expected.items()}


def _activated_cases() -> List:
    cases = []
    for dtype, data in ACTIVATED_DATA.items():
        for distribution, parameter in data:
            for activation in ACTIVATED:
                geometry = ACTIVATED_GEOMETRIES[len(cases) % len(ACTIVATED_GEOMETRIES)]
                marks = [requires_extended_precision]
                cases.append(pytest.param(dtype, distribution, parameter, activation, geometry, marks=marks,
                                          id=f"{activation} {distribution}({parameter:g}) {dtype} "
                                             f"{geometry[0]}x{geometry[1]}x{geometry[2]} {geometry[3]}"))
    return cases


@pytest.mark.parametrize("inplace", [True, False], ids=["in_place", "out_of_place"])
@pytest.mark.parametrize("dtype,distribution,parameter,activation,geometry", _activated_cases())
def test_activated_kernels_are_within_twice_torch_error_plus_floor(request, backend, dtype, distribution,
                                                                   parameter, activation, geometry, inplace):
    """y, dx, dweight and dbias of the activated kernels, per channel, against BatchNorm + the
    activation on the global batch in extended precision: within 2x the error of torch's
    BatchNorm + activation module in the same dtype plus benchmarks/adversarial.py's floor.
    Adversarial data (an outlier first, |mean| >> std, near-constant channels), uneven and empty
    ranks, short and long runs, (N, C), channels_last, in place and out of place."""
    sizes, channels, spatial, layout = geometry
    label = f"{activation} {distribution}({parameter:g}) {dtype} {sizes}x{channels}x{spatial} {layout}"
    if backend is reference and label in ACTIVATED_REFERENCE_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="the reference's normalize folds the mean"))
    case = Case(distribution, dtype, sizes, parameter, channels=channels, spatial=spatial, grad_correlation=3.0)
    x, dy = global_batch(case, 0)
    weight, bias = initial_affine(case)
    expected = _activated_oracle(x, dy, weight, bias, activation)
    torch_errors = _channel_errors(_torch_activated_step(x, dy, weight, bias, activation), expected)
    floor = _activated_floor(case, expected, dy)
    errors_here = _channel_errors(_activated_step(backend, x, dy, weight, bias, activation, sizes, layout,
                                                  inplace), expected)
    for name, error in errors_here.items():
        bound = 2 * torch_errors[name] + floor[name]
        assert np.all(error <= bound), f"{name}: {error / bound} x the bound"


@pytest.mark.parametrize("activation", list(ACTIVATED))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_activated_kernels_without_affine_equal_the_oracle(backend, activation, layout):
    """No weight: xhat is z itself. y and dx as above, against the extended-precision oracle."""
    case = Case("outlier_first", F32, (3, 2), 100.0, channels=4, spatial=(3, 5), grad_correlation=3.0)
    x, dy = global_batch(case, 0)
    expected = _activated_oracle(x, dy, None, None, activation)
    torch_errors = _channel_errors(_torch_activated_step(x, dy, None, None, activation), expected)
    floor = _activated_floor(case, expected, dy)
    got = _channel_errors(_activated_step(backend, x, dy, None, None, activation, case.sizes, layout, True),
                          expected)
    for name in ("y", "dx"):
        # floors() assumes the affine of initial_affine (|weight| <= 1.5): 2x covers a weight of 1
        assert np.all(got[name] <= 2 * torch_errors[name] + 2 * floor[name]), name


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 5), (0, 3, 2, 2)])
def test_activated_kernels_on_an_empty_batch(backend, dtype, shape):
    empty = torch.zeros(shape, dtype=dtype)
    stats = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    weight, bias = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    for code, parameter in ACTIVATED.values():
        assert backend.normalize_activate(empty, *stats, weight, bias, EPS, code, parameter, True).shape == shape
        assert backend.normalize_activate(empty, *stats, weight, bias, EPS, code, parameter, False).shape == shape
        sums = backend.activated_backward_payload(empty, empty, weight, bias, code, parameter)
        assert torch.equal(sums, torch.zeros(6, dtype=F64))
        dx = backend.activated_input_grad(empty, empty, stats[1], weight, bias, EPS, code, parameter, sums,
                                          torch.zeros((), dtype=F64))
        assert dx.shape == shape and dx.dtype == dtype


@pytest.mark.parametrize("activation", list(ACTIVATED))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [(2, 2), (6, 7)], ids=["short_runs", "long_runs"])
def test_native_activated_kernels_equal_the_reference(native_kernels, activation, layout, spatial):
    """On benign fp32 data (where the reference is exact to its dtype), every output within the
    floor of benchmarks/adversarial.py of the reference's."""
    case = Case("normal", F32, (3, 4), channels=9, spatial=spatial, grad_correlation=3.0)
    x, dy = global_batch(case, 0)
    weight, bias = initial_affine(case)
    ours = _activated_step(native_kernels, x, dy, weight, bias, activation, case.sizes, layout, True)
    theirs = _activated_step(reference, x, dy, weight, bias, activation, case.sizes, layout, True)
    expected = {name: to_extended(value) for name, value in theirs.items()}
    floor = _activated_floor(case, expected, dy)
    for name, difference in _channel_errors(ours, expected).items():
        assert np.all(difference <= floor[name]), f"{name}: {difference / floor[name]} x floor"


def test_native_activated_kernels_give_nan_on_a_nan_weight_channel(native_kernels):
    """The device path's floor check: a NaN weight (a channel below the floor) makes that
    channel's dx and dweight NaN, and only that channel's."""
    x, dy = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    weight = torch.tensor([1.0, float("nan"), 0.7])
    bias = torch.zeros(3)
    var, mean = torch.var_mean(x.double(), (0, 2), correction=0)
    y = native_kernels.normalize_activate(x, mean, var, torch.ones(3), bias, EPS, 1, 0.01, False)
    sums = native_kernels.activated_backward_payload(dy, y, weight, bias, 1, 0.01)
    dx = native_kernels.activated_input_grad(dy, y, var, weight, bias, EPS, 1, 0.01, sums,
                                             torch.tensor(20.0, dtype=F64))
    assert torch.isnan(sums[4]) and not torch.isnan(sums[[0, 1, 2, 3, 5]]).any()
    assert torch.isnan(dx[:, 1]).all() and not torch.isnan(dx[:, [0, 2]]).any()


@pytest.mark.parametrize("momentum", [0.1, 1.0])
@pytest.mark.parametrize("case,layout", [
    pytest.param(Case("outlier_first", F32, (6,), 1000.0, channels=5, spatial=(4, 4)), "contiguous", id="outlier"),
    pytest.param(Case("large_mean", F32, (4,), 1e4, channels=17, spatial=(2, 3)), "channels_last", id="large_mean"),
    pytest.param(Case("near_constant", F32, (7,), 1.0, channels=3, spatial=()), "contiguous", id="near_constant"),
    pytest.param(Case("large_mean", F64, (5,), 1e8, channels=4, spatial=(3, 3)), "contiguous", id="large_mean_f64",
                 marks=requires_extended_precision),
])
def test_update_stats_is_within_twice_torch_error_plus_floor(backend, case, layout, momentum):
    """A group of one's statistics (torch.batch_norm_update_stats's semantics): the batch's mean
    and biased variance, and the running statistics moved toward the mean and unbiased variance,
    per channel within 2x torch's own error plus the floor, against the extended-precision ones."""
    x, _ = global_batch(case, 0)
    x = in_layout(x, layout)
    values = to_extended(x)
    axes = (0,) + tuple(range(2, x.dim()))
    n = values.size // case.channels
    exact_mean = values.mean(axis=axes)
    exact_var = ((values - values.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes)
    start_mean, start_var = torch.full((case.channels,), 0.5, dtype=case.dtype), torch.full((case.channels,), 2.0, dtype=case.dtype)
    expected = {"mean": exact_mean, "var": exact_var,
                "running_mean": (1 - LD(momentum)) * LD(0.5) + LD(momentum) * exact_mean,
                "running_var": (1 - LD(momentum)) * LD(2) + LD(momentum) * exact_var * n / (n - 1)}

    def run(update_stats) -> dict:
        running_mean, running_var = start_mean.clone(), start_var.clone()
        mean, var = update_stats(x, running_mean, running_var, momentum)
        return {"mean": mean, "var": var, "running_mean": running_mean, "running_var": running_var}

    torch_errors = _channel_errors(run(torch.batch_norm_update_stats), expected)
    ulp = torch.finfo(case.dtype).eps
    for name, error in _channel_errors(run(backend.update_stats), expected).items():
        floor = FLOOR_ULPS * ulp * (np.abs(expected[name]) + np.abs(exact_mean) * (name == "var") + 1e-30)
        if name in ("mean", "running_mean"):  # the mean rounded once to the dtype, then the lerp
            floor = floor + MEAN_ROUNDING_ULPS * ulp * np.abs(exact_mean)
        assert np.all(error <= 2 * torch_errors[name] + floor), f"{name}: {error} > {2 * torch_errors[name] + floor}"


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_any_below_floor_agrees_with_the_reference(backend, dtype):
    """The inversion floor |weight| < 1e-3 max(1, |bias|), per channel, with and without a bias:
    each channel alone below it or not, just either side of it, as the reference's torch ops say."""
    weights = [1.0, -0.5, 2e-3, -5e-4, 0.999e-3, 1.001e-3, 0.0]
    biases = [0.0, 1.0, 3.0, -0.1, 0.0, 0.5, -7.0]
    for w, b in zip(weights, biases):
        weight, bias = torch.tensor([1.0, w], dtype=dtype), torch.tensor([0.2, b], dtype=dtype)
        for with_bias in (bias, None):
            expected = reference.any_below_floor(weight, with_bias, 1e-3)
            assert backend.any_below_floor(weight, with_bias, 1e-3) == expected, (w, b, with_bias)
    assert reference.any_below_floor(torch.tensor([2e-3], dtype=dtype), torch.tensor([3.0], dtype=dtype), 1e-3)
    assert not reference.any_below_floor(torch.tensor([2e-3], dtype=dtype), None, 1e-3)


def test_activated_operators_pass_opcheck(native_kernels):
    """The activated operators' schemas (the in-place one declares x mutated), fake
    implementations and tracing by AOT autograd."""
    x, dy = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    weight, bias = torch.rand(3) + 0.5, torch.rand(3)
    mean, var = native_kernels.update_stats(x, None, None, 0.0)
    y = native_kernels.normalize_activate(x, mean, var, weight, bias, EPS, 1, 0.01, False)
    sums = native_kernels.activated_backward_payload(dy, y, weight, bias, 1, 0.01)
    count = torch.tensor(100.0, dtype=F64)
    ops = torch.ops.syncbn_native
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for op, args in [(ops.update_stats, (channels_last, torch.zeros(3), torch.ones(3), 0.1)),
                     (ops.normalize_activate, (channels_last, mean, var, weight, bias, EPS, 2, 1.0)),
                     (ops.normalize_activate_, (x.clone(), mean, var, weight, bias, EPS, 1, 0.01)),
                     (ops.activated_backward_payload, (dy, y, weight, bias, 1, 0.01)),
                     (ops.activated_input_grad, (dy, y, var, weight, bias, EPS, 1, 0.01, sums, count))]:
        torch.library.opcheck(op, args)
