"""The Triton kernels of :mod:`syncbn.kernels.triton` against float64 torch, on CPU.

Triton's interpreter runs them without a GPU, but TRITON_INTERPRET=1 has to be set before the
kernels are decorated, that is before syncbn is imported. So ``test_kernels_in_interpreter``
runs this file again in a subprocess with TRITON_INTERPRET=1 SYNCBN_TRITON=1, where the kernel
tests below run (CPU tensors then take the kernels); in any other process they skip.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import pytest
from triton_interpreter import run_in_interpreter
import torch

import syncbn
from benchmarks.adversarial import Case, global_batch
from syncbn import batchnorm_math as bnm, kernels
from scenarios import IdenticalPeers
from syncbn.kernels import triton as tk

in_interpreter = pytest.mark.skipif(
    not tk.INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_interpreter")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for values of order 1 stored in each dtype: a few units in the last place.
TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# (shape, channels_last): 2-5 dims, both layouts where they exist.
CASES = [((5, 3), False), ((2, 3, 7), False), ((2, 4, 5, 6), False), ((2, 4, 5, 6), True),
         ((2, 3, 2, 3, 4), False), ((2, 3, 2, 3, 4), True)]
EPS = 1e-5
# Local moments against float64, in units of U = 2^-24, fp32's unit roundoff: the kernels
# accumulate in fp32 whatever the input dtype. Rounding the exact mean and variance once to
# fp32 costs up to 1 U (what torch's CPU var_mean reaches: it accumulates in fp64); an fp32
# pass adds a few roundings of the same size (the tile's tree sum, the merges over tiles, the
# fp32 partials), random in sign. The mean is judged against mean |x|, the scale an fp32 sum
# rounds at; M2 against itself, so a channel's variance stays good to a few ulps however small
# it is next to its mean. Measured on the adversarial cases below: at most 1.9 U (mean) and
# 4 U (M2); a kernel shifting by the channel's first element and merging sum x^2 - sum x * mean
# in fp64: 26 to 575 U (mean, outlier first) and 1700 to 5800 U (M2, near-constant); one
# keeping each partial mean as a single fp32 value: 300 U and more (M2, |mean| / std 1e4).
MEAN_ULPS = 4.0
M2_ULPS = 8.0
U = 2.0 ** -24


def test_kernels_in_interpreter() -> None:
    run_in_interpreter(__file__)


def test_cpu_tensors_keep_the_torch_path_without_the_interpreter() -> None:
    assert kernels.uses_triton(torch.zeros(2, 3)) == (tk.INTERPRETED and os.environ.get("SYNCBN_TRITON") == "1")


def _input(shape: Tuple[int, ...], dtype: torch.dtype, channels_last: bool, mean: float = 0.5,
           std: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    return _layout(x, channels_last)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = bnm.reduction_dims(x.dim())
    return x.double().mean(dims), x.double().var(dims, unbiased=False)


def _xhat(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    ndim = x.dim()
    return (x.double() - bnm.channel_view(mean, ndim)) * bnm.channel_view(torch.rsqrt(var + EPS), ndim)


def _assert_local_moments_match_float64(x: torch.Tensor) -> None:
    expected_mean, expected_var = _moments(x)
    expected_m2 = expected_var * bnm.local_count(x)
    mean, m2 = tk.local_moments(x)
    assert mean.dtype == m2.dtype == torch.float64
    mean_error = (mean - expected_mean).abs()
    mean_scale = U * x.double().abs().mean(bnm.reduction_dims(x.dim()))
    m2_error, m2_scale = (m2 - expected_m2).abs(), U * expected_m2
    # Multiplied, not divided: a zero M2 (one value per channel) must come out exactly zero.
    assert torch.all(mean_error <= MEAN_ULPS * mean_scale), f"mean: {mean_error / mean_scale} U"
    assert torch.all(m2_error <= M2_ULPS * m2_scale), f"M2: {m2_error / m2_scale} U"


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_all(x: torch.Tensor, tol: Optional[Tuple[float, float]] = None) -> None:
    """The four kernels on ``x`` against their float64 definitions."""
    rtol, atol = tol or TOLERANCE[x.dtype]
    channels, ndim, dims = x.shape[1], x.dim(), bnm.reduction_dims(x.dim())
    generator = torch.Generator().manual_seed(1)
    view = lambda v: bnm.channel_view(v.double(), ndim)  # noqa: E731

    _assert_local_moments_match_float64(x)

    mean, var = _moments(x)
    weight = torch.linspace(0.5, 1.5, channels)
    bias = torch.linspace(-0.3, 0.3, channels)
    y = tk.normalize(x, mean, var, weight, bias, EPS)
    dense_strides = tk._dense(x)[0].stride()  # x's own, unless x had to be copied
    assert y.dtype == x.dtype and y.stride() == dense_strides
    _close(y, _xhat(x, mean, var) * view(weight) + view(bias), "normalize", rtol, atol)
    y = tk.normalize(x, mean, var, None, None, EPS)
    _close(y, _xhat(x, mean, var), "normalize, no affine", rtol, atol)

    dy = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)  # contiguous
    sums = tk.backward_payload(dy, x, mean, var, EPS)
    dyd = dy.double()
    expected_sums = torch.cat([dyd.sum(dims), (dyd * _xhat(x, mean, var)).sum(dims)])
    _close(sums, expected_sums, "backward payload", 1e-4, 1e-4)

    # The group's sums and count: made up, as other ranks would contribute to them.
    group_sums = torch.randn(2 * channels, generator=generator)
    group_count = torch.tensor(float(bnm.local_count(x) + 7), dtype=torch.float64)
    dx = tk.input_grad(dy, x, mean, var, weight, EPS, group_sums, group_count)
    assert dx.dtype == x.dtype and dx.stride() == dense_strides
    expected_dx = view(weight.double() * torch.rsqrt(var + EPS)) * (
        dyd - view(group_sums[:channels]) / group_count
        - _xhat(x, mean, var) * view(group_sums[channels:]) / group_count)
    _close(dx, expected_dx, "input grad", rtol, atol)


@in_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES)
def test_kernels_equal_float64(shape, channels_last, dtype) -> None:
    _check_all(_input(shape, dtype, channels_last))


@in_interpreter
@pytest.mark.parametrize("shape,channels_last,tile,target_programs",
                         [((3, 5, 7, 9), False, 16, 30), ((2, 70, 3, 5), True, 128, 8)])
def test_many_tiles_and_programs(monkeypatch, shape, channels_last, tile, target_programs) -> None:
    # Tiny tiles and few target programs: each program walks several tiles, several
    # programs share a sample's positions and its channels, the last tile is ragged.
    monkeypatch.setattr(tk, "_TILE", tile)
    monkeypatch.setattr(tk, "_TARGET_PROGRAMS", target_programs)
    x = _input(shape, torch.float32, channels_last)
    grid = tk._grid(x)
    assert grid.tiles > 1 and grid.chunks > 1 and grid.programs[0] > grid.partials > 1
    _check_all(x)


@in_interpreter
def test_strided_input_is_copied_not_misread() -> None:
    _check_all(_input((4, 3, 6, 5), torch.float32, False)[::2, :, 1:])


@in_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_input(dtype) -> None:
    x = _input((0, 3, 4, 4), dtype, True)
    zero = torch.zeros(3, dtype=torch.float64)
    mean, m2 = tk.local_moments(x)
    assert torch.equal(mean, zero) and torch.equal(m2, zero)
    y = tk.normalize(x, zero, zero, None, None, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(tk.backward_payload(x, x, zero, zero, EPS), torch.zeros(6))
    dx = tk.input_grad(x, x, zero, zero, None, EPS, torch.zeros(6), torch.zeros((), dtype=torch.float64))
    assert dx.shape == x.shape and dx.dtype == dtype


@in_interpreter
def test_one_sample() -> None:
    x = _input((1, 4), torch.float32, False)
    mean, m2 = tk.local_moments(x)
    assert torch.equal(mean, x[0].double()) and torch.all(m2 == 0)
    _check_all(x)


@in_interpreter
def test_large_mean_is_stable() -> None:
    # Mean 1e4, std 1: fp32 E[x^2] - E[x]^2 would lose every digit of the variance, and
    # x * invstd - mean * invstd most digits of xhat.
    _check_all(_input((4, 3, 16, 16), torch.float32, False, mean=1e4, std=1.0), tol=(1e-5, 1e-4))


# (distribution, parameter) of benchmarks.adversarial, fp32: what breaks statistics taken about
# an element or summed as E[x^2] - mean^2.
ADVERSARIAL = [pytest.param(name, parameter, id=f"{name}_{parameter:g}") for name, parameter in [
    ("outlier_first", 100.0), ("outlier_first", 1000.0), ("large_mean", 1e4),
    ("near_constant", 1.0), ("near_constant", 1e2), ("relu", 0.0)]]


@in_interpreter
@pytest.mark.parametrize("distribution,parameter", ADVERSARIAL)
@pytest.mark.parametrize("channels_last,tile,target_programs", [
    (False, None, None),  # 2304 positions: two chunks of one tile per sample
    (True, None, None),  # one sample of 4608 rows: nine chunks
    (False, 64, 16),  # tiles shrunk: twelve tiles per program, three chunks per sample
], ids=["chunks", "channels_last_chunks", "tiles_and_chunks"])
def test_local_moments_on_adversarial_data_are_within_a_few_fp32_ulps_of_float64(
        monkeypatch, distribution, parameter, channels_last, tile, target_programs) -> None:
    if tile is not None:
        monkeypatch.setattr(tk, "_TILE", tile)
        monkeypatch.setattr(tk, "_TARGET_PROGRAMS", target_programs)
    x, _ = global_batch(Case(distribution, torch.float32, (2,), parameter, spatial=(48, 48)), 0)
    x = _layout(x, channels_last)
    grid = tk._grid(x)
    assert grid.chunks > 1 and (tile is None or grid.tiles > 1)
    _assert_local_moments_match_float64(x)


@in_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_through_the_kernels_equals_float64_batchnorm(dtype, channels_last) -> None:
    # Two identical ranks: a group of one would delegate to torch's own batch_norm, not the
    # kernels. The oracle sees the batch twice.
    torch.manual_seed(0)
    x = _input((3, 4, 5, 6), dtype, channels_last).requires_grad_()
    assert kernels.uses_triton(x)
    layer = syncbn.SyncBatchNorm(4, momentum=None, process_group=IdenticalPeers(2))
    reference = torch.nn.BatchNorm2d(4, momentum=None).double()
    for module in (layer, reference):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 4))
            module.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    xd = torch.cat([x.detach(), x.detach()]).double().requires_grad_()
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y = layer(x)
    y.backward(dy)
    expected_y = reference(xd)
    expected_y.backward(torch.cat([dy, dy]).double())
    rtol, atol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), expected_y.detach()[:3], rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), xd.grad[:3], rtol=rtol, atol=atol)
    for name in ("weight", "bias"):  # this rank's share: half of the group's
        torch.testing.assert_close(2 * getattr(layer, name).grad.double(), getattr(reference, name).grad,
                                   rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name).double(), getattr(reference, name),
                                   rtol=1e-5, atol=1e-6)
