"""The Triton kernels of :mod:`syncbn.kernels.triton` against float64 torch and the reference
kernels: compiled on CUDA, and in Triton's interpreter on CPU.

Every kernel test takes ``device``: "interpreter" runs it on CPU tensors in Triton's
interpreter, "cuda" compiled on a GPU (skipped without one). TRITON_INTERPRET=1 has to be set
before the kernels are decorated, that is before syncbn is imported, so
``test_kernels_in_interpreter`` runs this file again in a subprocess with TRITON_INTERPRET=1
SYNCBN_TRITON=1, where the interpreter cases run (CPU tensors then take the kernels); in any
other process they skip, and the CUDA cases run where there is a GPU. The interpreter computes
fp32 division, rsqrt and exp exactly where a GPU approximates them: the CUDA cases hold the
kernels to the same bounds with the GPU's rounding.

The tests of the way out (self-test, fallback, SYNCBN_TRITON=0, a broken Triton install) run
here, without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from typing import Dict, Optional, Tuple

import pytest
from triton_interpreter import ROOT, run_in_interpreter
import torch

import syncbn
from benchmarks import launches
from benchmarks.adversarial import Case, global_batch
from syncbn import batchnorm_math as bnm, kernels
from syncbn.kernels import reference
from syncbn.kernels import triton as tk
from scenarios import IdenticalPeers

in_interpreter = pytest.mark.skipif(
    not tk.INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_interpreter")
on_cuda = pytest.mark.skipif(
    tk.INTERPRETED or not (tk.TRITON_AVAILABLE and torch.cuda.is_available()),
    reason="needs a CUDA device and triton (compiled kernels)")
DEVICES = [pytest.param("cpu", id="interpreter", marks=in_interpreter),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, on_cuda])]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for values of order 1 stored in each dtype: a few units in the last place.
TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# (shape, channels_last): 2-5 dims, both layouts where they exist; 3x3 images (a tile spans
# samples) and 24x24 ones (a chunk stays within a sample).
CASES = [((5, 3), False), ((2, 3, 7), False), ((2, 4, 5, 6), False), ((2, 4, 5, 6), True),
         ((2, 3, 2, 3, 4), False), ((2, 3, 2, 3, 4), True), ((6, 5, 3, 3), False),
         ((2, 3, 24, 24), False)]
EPS = 1e-5
# Local moments against float64, in units of U = 2^-24, fp32's unit roundoff: the kernels
# accumulate in fp32 whatever the input dtype. Rounding the exact mean and variance once to
# fp32 costs up to 1 U (what torch's CPU var_mean reaches: it accumulates in fp64); an fp32
# pass adds a few roundings of the same size (the tile's tree sum, the merges over tiles, the
# fp32 partials), random in sign. The mean is judged against mean |x|, the scale an fp32 sum
# rounds at; M2 against itself, so a channel's variance stays good to a few ulps however small
# it is next to its mean. Measured on the adversarial cases below (interpreter): at most 1.9 U
# (mean) and 4 U (M2); a kernel shifting by the channel's first element and merging
# sum x^2 - sum x * mean in fp64: 26 to 575 U (mean, outlier first) and 1700 to 5800 U (M2,
# near-constant); one keeping each partial mean as a single fp32 value: 300 U and more (M2,
# |mean| / std 1e4).
MEAN_ULPS = 4.0
M2_ULPS = 8.0
U = 2.0 ** -24


def test_kernels_in_interpreter() -> None:
    run_in_interpreter(__file__)


def test_cpu_tensors_keep_the_torch_path_without_the_interpreter() -> None:
    assert kernels.uses_triton(torch.zeros(2, 3)) == (tk.INTERPRETED and os.environ.get("SYNCBN_TRITON") == "1")


def _input(shape: Tuple[int, ...], dtype: torch.dtype, channels_last: bool, device: str,
           mean: float = 0.5, std: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    return _layout(x.to(device), channels_last)


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


def _kernel_moments(x: torch.Tensor, about: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2) the kernels found, read off their payload taken about ``about`` (fp64, close
    to the mean, so that S2 - S1^2 / n does not cancel)."""
    channels, count = x.shape[1], bnm.local_count(x)
    payload = tk.forward_payload(x, about)
    assert payload.dtype == torch.float64 and payload.shape == (4 * channels + 3,)
    sum1, sum2 = payload[1:1 + channels], payload[1 + channels:1 + 2 * channels]
    return about + sum1 / count, sum2 - sum1 * sum1 / count


def _assert_local_moments_match_float64(x: torch.Tensor) -> None:
    expected_mean, expected_var = _moments(x)
    expected_m2 = expected_var * bnm.local_count(x)
    mean, m2 = _kernel_moments(x, expected_mean)
    mean_error = (mean - expected_mean).abs()
    mean_scale = U * x.double().abs().mean(bnm.reduction_dims(x.dim()))
    m2_error, m2_scale = (m2 - expected_m2).abs(), U * expected_m2
    # Multiplied, not divided: a zero M2 (one value per channel) must come out exactly zero.
    assert torch.all(mean_error <= MEAN_ULPS * mean_scale), f"mean: {mean_error / mean_scale} U"
    assert torch.all(m2_error <= M2_ULPS * m2_scale + 1e-300), f"M2: {m2_error / m2_scale} U"


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _check_all(x: torch.Tensor, tol: Optional[Tuple[float, float]] = None,
               weight: Optional[torch.Tensor] = None) -> None:
    """The kernels of the interface on ``x`` against their float64 definitions."""
    rtol, atol = tol or TOLERANCE[x.dtype]
    channels, ndim, dims, device = x.shape[1], x.dim(), bnm.reduction_dims(x.dim()), x.device
    generator = torch.Generator().manual_seed(1)
    view = lambda v: bnm.channel_view(v.double(), ndim)  # noqa: E731

    _assert_local_moments_match_float64(x)
    shift = torch.linspace(-1.0, 1.0, channels, device=device)  # any float dtype: fp32 here
    payload, expected = tk.forward_payload(x, shift), reference.forward_payload(x, shift)
    _close(payload, expected, "forward payload (layout, flags)", 1e-6, 1e-6 * bnm.local_count(x))

    mean, var = (m.to(device) for m in _moments(x))
    if weight is None:
        weight = torch.linspace(0.5, 1.5, channels, device=device)
    bias = torch.linspace(-0.3, 0.3, channels, device=device)
    y = tk.normalize(x, mean, var, weight, bias, EPS)
    dense_strides = tk._dense(x)[0].stride()  # x's own, unless x had to be copied
    assert y.dtype == x.dtype and y.stride() == dense_strides
    _close(y, _xhat(x, mean, var) * view(weight) + view(bias), "normalize", rtol, atol)
    y = tk.normalize(x, mean, var, None, None, EPS)
    _close(y, _xhat(x, mean, var), "normalize, no affine", rtol, atol)

    dy = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device, x.dtype)  # contiguous
    sums, own_bias, own_weight = tk.backward_sums(dy, x, mean, var, EPS, torch.float32)
    assert sums.dtype == torch.float64 and sums.shape == (2 * channels,)
    assert torch.equal(torch.cat([own_bias, own_weight]), sums.float())  # copies, in the given dtype
    dyd = dy.double()
    expected_sums = torch.cat([dyd.sum(dims), (dyd * _xhat(x, mean, var)).sum(dims)])
    _close(sums, expected_sums, "backward sums", 1e-4, 1e-4)

    # The group's sums and count: made up, as other ranks would contribute to them.
    group_sums = torch.randn(2 * channels, generator=generator, dtype=torch.float64).to(device)
    group_count = torch.tensor(float(bnm.local_count(x) + 7), dtype=torch.float64).to(device)
    dx = tk.input_grad(dy, x, mean, var, weight, EPS, group_sums, group_count)
    assert dx.dtype == x.dtype and dx.stride() == dense_strides
    expected_dx = view(weight.double() * torch.rsqrt(var + EPS)) * (
        dyd - view(group_sums[:channels]) / group_count
        - _xhat(x, mean, var) * view(group_sums[channels:]) / group_count)
    _close(dx, expected_dx, "input grad", rtol, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES)
def test_kernels_equal_float64(shape, channels_last, dtype, device) -> None:
    _check_all(_input(shape, dtype, channels_last, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last,layout", [
    ((4, 3, 6, 5), False, tk._SPANNING), ((2, 3, 24, 24), False, tk._PER_SAMPLE),
    ((2, 70, 3, 5), True, tk._UNIFORM_ROWS)])
def test_many_tiles_and_chunks(monkeypatch, device, shape, channels_last, layout) -> None:
    # Tiny tiles and few target programs: each program walks several tiles, several programs
    # share the rows of a channel block, the last tile is ragged.
    monkeypatch.setattr(tk, "_TILE", 32)
    monkeypatch.setattr(tk, "_target_programs", lambda device: 6)
    x = _input(shape, torch.float32, channels_last, device)
    grid = tk._grid(x)
    assert grid.layout == layout
    assert grid.tiles > 1 and grid.partials > 1 and grid.programs[0] > grid.partials
    _check_all(x)


@pytest.mark.parametrize("device", DEVICES)
def test_small_images_share_tiles_across_samples(device) -> None:
    # 7x7 positions per sample: one tile holds several samples, so no lane idles at the end
    # of each sample, and one program covers them all.
    x = _input((8, 4, 7, 7), torch.float32, False, device)
    grid = tk._grid(x)
    assert grid.layout == tk._SPANNING and grid.block_s >= 2 * 49
    _check_all(x)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_and_weight_are_copied_not_misread(device) -> None:
    x = _input((4, 3, 6, 5), torch.float32, False, device)[::2, :, 1:]
    weight = torch.linspace(0.5, 1.5, 6, device=device)[::2]  # a strided per-channel input
    _check_all(x, weight=weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_input(device, dtype) -> None:
    x = _input((0, 3, 4, 4), dtype, True, device)
    shift = torch.tensor([1.0, 2.0, 3.0]).to(device)
    payload = tk.forward_payload(x, shift)
    expected = torch.cat([torch.zeros(7, dtype=torch.float64), shift.double().cpu(),
                          shift.double().square().cpu(), torch.zeros(2, dtype=torch.float64)])
    assert torch.equal(payload.cpu(), expected)
    zero = torch.zeros(3, dtype=torch.float64, device=device)
    y = tk.normalize(x, zero, zero, None, None, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(tk.backward_sums(x, x, zero, zero, EPS, dtype)[0].cpu(), torch.zeros(6, dtype=torch.float64))
    dx = tk.input_grad(x, x, zero, zero, None, EPS, torch.zeros(6, dtype=torch.float64, device=device),
                       torch.zeros((), dtype=torch.float64, device=device))
    assert dx.shape == x.shape and dx.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_one_sample(device) -> None:
    x = _input((1, 4), torch.float32, False, device)
    mean, m2 = _kernel_moments(x, torch.zeros(4, dtype=torch.float64, device=device))
    assert torch.equal(mean, x[0].double()) and torch.all(m2 == 0)
    _check_all(x)


@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_is_stable(device) -> None:
    # Mean 1e4, std 1: fp32 E[x^2] - E[x]^2 would lose every digit of the variance, and
    # x * invstd - mean * invstd most digits of xhat.
    _check_all(_input((4, 3, 16, 16), torch.float32, False, device, mean=1e4, std=1.0), tol=(1e-5, 1e-4))


# (distribution, parameter) of benchmarks.adversarial, fp32: what breaks statistics taken about
# an element or summed as E[x^2] - mean^2.
ADVERSARIAL = [pytest.param(name, parameter, id=f"{name}_{parameter:g}") for name, parameter in [
    ("outlier_first", 100.0), ("outlier_first", 1000.0), ("large_mean", 1e4),
    ("near_constant", 1.0), ("near_constant", 1e2), ("relu", 0.0)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution,parameter", ADVERSARIAL)
@pytest.mark.parametrize("channels_last,tile,target_programs", [
    (False, None, 256),  # 2304 positions: two chunks of one tile per sample
    (True, None, 256),  # one sample of 4608 rows: several chunks
    (False, 64, 16),  # tiles shrunk: twelve tiles per program, three chunks per sample
], ids=["chunks", "channels_last_chunks", "tiles_and_chunks"])
def test_local_moments_on_adversarial_data_are_within_a_few_fp32_ulps_of_float64(
        monkeypatch, device, distribution, parameter, channels_last, tile, target_programs) -> None:
    if tile is not None:
        monkeypatch.setattr(tk, "_TILE", tile)
    monkeypatch.setattr(tk, "_target_programs", lambda device: target_programs)
    x, _ = global_batch(Case(distribution, torch.float32, (2,), parameter, spatial=(48, 48)), 0)
    x = _layout(x.to(device), channels_last)
    grid = tk._grid(x)
    assert grid.chunks > 1 and (tile is None or grid.tiles > 1)
    _assert_local_moments_match_float64(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buffers", [torch.float32, torch.float16, None], ids=str)
@pytest.mark.parametrize("group_count", [12.0, 0.0])
def test_finalize_equals_the_reference(device, momentum, buffers, group_count) -> None:
    # One kernel: the group's mean and variance, the running statistics, num_batches_tracked.
    channels = 5
    generator = torch.Generator().manual_seed(2)
    offsets = torch.randn(channels, generator=generator, dtype=torch.float64)
    squares = offsets.square() + torch.rand(channels, generator=generator, dtype=torch.float64)
    moments = torch.cat([torch.tensor([group_count], dtype=torch.float64),
                         group_count * offsets, group_count * squares]).to(device)
    shift = torch.linspace(1.0, 2.0, channels).to(device)
    states = []
    for _ in range(2):
        if buffers is None:
            states.append([None, None, None])
        else:
            states.append([torch.linspace(0.0, 1.0, channels, dtype=buffers).to(device),
                           torch.linspace(1.0, 2.0, channels, dtype=buffers).to(device),
                           torch.tensor(3).to(device)])
    found = tk.finalize(moments, shift, *states[0], momentum)
    expected = reference.finalize(moments, shift, *states[1], momentum)
    for name, a, e in zip(("count", "mean", "var"), found, expected):
        assert a.dtype == torch.float64 and a.shape == e.shape, name
        _close(a, e, name, 1e-12, 1e-12)
    for name, a, e in zip(("running_mean", "running_var", "num_batches_tracked"), states[0], states[1]):
        if e is not None:
            assert a.dtype == e.dtype, name
            _close(a, e, name, *TOLERANCE.get(a.dtype, (0.0, 0.0)))
    if buffers is not None and group_count == 0:  # a group that saw nothing changes nothing
        assert int(states[0][2]) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_through_the_kernels_equals_float64_batchnorm(device, dtype, channels_last) -> None:
    # Two identical ranks: a group of one would delegate to torch's own batch_norm, not the
    # kernels. The oracle sees the batch twice.
    torch.manual_seed(0)
    x = _input((3, 4, 5, 6), dtype, channels_last, device).requires_grad_()
    assert kernels.uses_triton(x)
    layer = syncbn.SyncBatchNorm(4, momentum=None, process_group=IdenticalPeers(2)).to(device)
    reference_layer = torch.nn.BatchNorm2d(4, momentum=None).double()
    for module in (layer, reference_layer):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 4))
            module.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    xd = torch.cat([x.detach(), x.detach()]).double().cpu().requires_grad_()
    dy = torch.randn(x.shape, dtype=torch.float64).to(device, dtype)
    y = layer(x)
    y.backward(dy)
    expected_y = reference_layer(xd)
    expected_y.backward(torch.cat([dy, dy]).double().cpu())
    rtol, atol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double().cpu(), expected_y.detach()[:3], rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double().cpu(), xd.grad[:3], rtol=rtol, atol=atol)
    for name in ("weight", "bias"):  # this rank's share: half of the group's
        torch.testing.assert_close(2 * getattr(layer, name).grad.double().cpu(),
                                   getattr(reference_layer, name).grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name).double().cpu(), getattr(reference_layer, name),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_elu_uses_expm1_and_log1p(device) -> None:
    # Pre-activations just below 0: exp(z) - 1 and log(1 + y) lose most digits there (fp32:
    # 1e-6 keeps about one), expm1 and log1p none.
    # One pre-activation per channel (two samples of it), so each is checked on its own.
    channels = 64
    z = -torch.logspace(-7, 1, channels, dtype=torch.float64)
    x = z.to(torch.float32).reshape(1, channels).repeat(2, 1).to(device)
    zeros, ones = (torch.full((channels,), v, dtype=torch.float64, device=device) for v in (0.0, 1.0 - EPS))
    y = tk.normalize_activate(x, zeros, ones, None, None, EPS, 2, 1.0, inplace=False)
    expected = torch.expm1(x.double().cpu())
    relative = ((y.double().cpu() - expected) / expected).abs().max().item()
    assert relative < 4 * U, f"ELU: relative error {relative / U:.1f} U"
    # The inversion, through the backward's sums with dy = 1: per channel, sum of dz =
    # sum(y + alpha), sum of dz * xhat = sum((y + 1) * log1p(y)) (alpha 1, no affine).
    sums = tk.activated_backward_payload(torch.ones_like(y), y, None, None, 2, 1.0).cpu()
    yd = y.double().cpu()
    expected_sums = torch.cat([(yd + 1).sum(0), ((yd + 1) * torch.log1p(yd)).sum(0)])
    torch.testing.assert_close(sums, expected_sums, rtol=8 * U, atol=0.0)


@pytest.mark.gpu
@on_cuda
def test_a_tensor_above_2_31_elements() -> None:
    # 64-bit offsets where the tensor needs them: the last channel lies past 2^31 elements.
    channels, positions = 4, 2**29 + 3
    x = torch.empty((1, channels, positions), dtype=torch.float16, device="cuda")
    x.normal_(0.0, 1.0)
    x[:, -1, -1000:] = 8.0  # a mark at the very end, seen only through 64-bit offsets
    assert x.numel() > 2**31 and tk._grid(x).index_64
    payload = tk.forward_payload(x, None)
    mean = payload[1:1 + channels] / positions
    expected = torch.stack([x[0, c].float().mean(dtype=torch.float64) for c in range(channels)])
    torch.testing.assert_close(mean, expected, rtol=0.0, atol=1e-6)
    var = torch.ones(channels, dtype=torch.float64, device="cuda")
    y = tk.normalize(x, torch.zeros_like(var), var, None, None, 0.0)
    assert torch.all(y[0, -1, -1000:] == 8.0)
    del y
    sums, _, _ = tk.backward_sums(x, x, torch.zeros_like(var), var, 0.0, torch.float32)
    torch.testing.assert_close(sums[channels - 1], x[0, -1].float().sum(dtype=torch.float64),
                               rtol=1e-6, atol=1e-3)


# ----- compiled for the GPU, without one -------------------------------------------------------

def _every_kernel_launch() -> list:
    """(kernel, grid, args, kwargs) of the launches a layer step makes on the CUDA path, for the
    specializations that matter (fp32/bf16/fp16, both layouts, spanning and per-sample tiles,
    one value per channel, momentum None), of the activated kernels (leaky_relu, elu), and of
    a tensor above 2^31 elements (64-bit offsets): recorded on meta, nothing run."""
    recorded = []
    for shape, dtype, channels_last in [((1, 8), torch.float32, False),
                                        ((4, 8, 5, 5), torch.bfloat16, True),
                                        ((3, 8, 3, 3), torch.float32, False),
                                        ((2, 8, 30, 30), torch.float16, False)]:
        recorded += launches.syncbn_launches_on_meta(shape, dtype, channels_last, momentum=None).calls
    channels = 8
    stats = [torch.empty(channels, dtype=torch.float64, device="meta") for _ in range(2)]
    affine = [torch.empty(channels, device="meta") for _ in range(2)]
    sums, count = torch.empty(2 * channels, dtype=torch.float64, device="meta"), stats[0][0]
    with launches.Launches(run_kernels=False) as counted:
        x = torch.empty(4, channels, 5, 5, device="meta")
        for code, parameter in [(1, 0.01), (2, 1.0)]:
            y = tk.normalize_activate(x, *stats, *affine, EPS, code, parameter, True)
            tk.activated_backward_payload(x, y, *affine, code, parameter)
            tk.activated_input_grad(x, y, stats[1], *affine, EPS, code, parameter, sums, count)
        big = torch.empty(1, 2, 2**30 + 8, dtype=torch.float16, device="meta")
        tk.forward_payload(big, None)
        tk.normalize(big, *stats, None, None, EPS)
        tk.backward_sums(big, big, *stats, EPS, torch.float32)
        tk.input_grad(big, big, *stats, None, EPS, sums, count)
    return recorded + counted.calls


@pytest.mark.skipif(tk.INTERPRETED or not tk.TRITON_AVAILABLE,
                    reason="compiles the JIT kernels (not the interpreter's), with triton installed")
@pytest.mark.parametrize("capability", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_kernels_compile_for_nvidia_gpus_without_one(capability) -> None:
    # Triton's interpreter runs any Python; the GPU compiler does not (a name reused with two
    # types, a tensor method on an argument Triton made a constant): every kernel, in every
    # specialization a layer step launches, compiled down to the GPU's binary.
    calls = _every_kernel_launch()
    compiled = {}
    for kernel, grid, args, kwargs in calls:
        binary = launches.compile_for_gpu(kernel, args, kwargs, capability)
        compiled[binary.metadata.name] = binary
    names = {launches.kernel_name(kernel) for kernel, *_ in calls}
    assert set(compiled) == names and len(names) == 9, sorted(names)


# ----- the way out: Triton never takes the job down ---------------------------------------------

@in_interpreter
def test_self_test_passes_on_healthy_kernels() -> None:
    assert tk.self_test(torch.device("cpu")) is None


class _KernelThatFailsToCompile:
    """Stands in for a Triton kernel whose compile fails (a ptxas or driver mismatch, say)."""

    def __getitem__(self, grid):
        raise RuntimeError("ptxas fatal: Value 'sm_200' is not defined for option 'gpu-name'")


@in_interpreter
def test_self_test_catches_a_failing_and_a_wrong_kernel(monkeypatch) -> None:
    monkeypatch.setattr(tk, "_finalize_kernel", _KernelThatFailsToCompile())
    assert "ptxas fatal" in tk.self_test(torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setattr(tk, "_backward_sums", lambda *args: reference.gradient_sums(*args) * 1.01)
    assert "backward_sums" in tk.self_test(torch.device("cpu"))


@in_interpreter
def test_a_failing_kernel_hands_the_call_to_the_reference_and_warns_once(monkeypatch) -> None:
    monkeypatch.setattr(tk, "_recovers_on", lambda device: True)  # as on CUDA
    monkeypatch.setattr(tk, "_usable", {})
    monkeypatch.setattr(tk, "_stats_kernel", _KernelThatFailsToCompile())
    x = _input((2, 3, 4), torch.float32, False, "cpu")
    assert kernels.uses_triton(x)
    with pytest.warns(RuntimeWarning, match="syncbn: the Triton kernels are off.*SYNCBN_TRITON=0") as caught:
        payload = tk.forward_payload(x, None)
        tk.forward_payload(x, None)
    assert len(caught) == 1
    torch.testing.assert_close(payload, reference.forward_payload(x, None))
    assert not kernels.uses_triton(x)  # for good, on this device


def _python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_syncbn_triton_0_turns_triton_off_on_cuda() -> None:
    code = """
        from syncbn import kernels
        print(kernels._TRITON_ON_CUDA, kernels.triton.TRITON_AVAILABLE)
    """
    assert _python(code, SYNCBN_TRITON="0").startswith("False")


def test_a_triton_that_fails_at_import_leaves_syncbn_on_its_torch_kernels() -> None:
    # Any exception while importing Triton or decorating the kernels (not only ImportError):
    # syncbn imports and serves every input from its torch kernels. (A top-level `import triton`
    # that raises breaks torch's own import of torch._dynamo first, beyond syncbn's reach.)
    # SYNCBN_NATIVE=0: on CPU the native kernels would otherwise take the input Triton lost.
    code = """
        import triton

        def broken(*args, **kwargs):
            raise RuntimeError("this triton cannot compile for the installed driver")

        triton.jit = broken
        import torch, syncbn
        from syncbn import kernels
        x = torch.zeros(2, 3)
        print(kernels.triton.TRITON_AVAILABLE, kernels.for_input(x) is kernels.reference)
    """
    assert _python(code, SYNCBN_TRITON="1", TRITON_INTERPRET="1", SYNCBN_NATIVE="0") == "False True"
