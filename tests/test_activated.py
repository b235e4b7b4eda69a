"""syncbn.SyncBatchNormAct equals float64 BatchNorm + activation on the global batch, in place.

Oracle: float64 torch BatchNorm followed by the float64 activation on the concatenated global
batch (scenarios.Scenario). The layer under test sees its rank's slice, as a non-leaf tensor
so that the in-place path runs. Kernel tests run in a TRITON_INTERPRET=1 subprocess, like
tests/test_triton_kernels.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
from triton_interpreter import run_in_interpreter
import torch
from torch import nn

import syncbn
import syncbn.kernels
from conftest import BACKENDS
from scenarios import (BATCHNORM_BY_DIM, IdenticalPeers, Scenario, layout, take_parameter_grads,
                       training_step)
from test_gpu import meta_kernels  # noqa: F401  (a fixture)
from syncbn.kernels import triton as tk
from syncbn.activated import FusedActivation
from syncbn.comm import SingleProcessCommunicator
from syncbn.testing import RecordingCommunicator

SLOPE = 0.1
ACTIVATIONS = ("identity", "leaky_relu", "elu")
# (rtol, atol) against float64 for values of order 1 computed in each dtype.
TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}
in_interpreter = pytest.mark.skipif(
    not tk.INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_interpreter")


def _activation(name: str) -> nn.Module:
    return {"identity": nn.Identity(), "leaky_relu": nn.LeakyReLU(SLOPE), "elu": nn.ELU()}[name]


@dataclass
class Run:
    y: List[torch.Tensor]
    dx: List[torch.Tensor]
    dweight: List[torch.Tensor]
    dbias: List[torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    reused_input_storage: List[bool]


def _with_affine(layer: nn.Module, channels: int) -> nn.Module:
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, channels))
    return layer


def _train(forward, layer: nn.Module, scenario: Scenario, rows: slice, dtype: torch.dtype,
           channels_last: bool, rounded_to: torch.dtype = torch.float64) -> Run:
    """``rounded_to``: the oracle sees the same input values as the layer under test."""
    run = Run([], [], [], [], {}, [])
    layer.train()
    for step in range(scenario.steps):
        x, dy = scenario.global_batch(step)
        x, dy = x.to(rounded_to).double(), dy.to(rounded_to).double()
        leaf = layout(x[rows].to(dtype), channels_last).requires_grad_()
        x_in = leaf.clone()  # a non-leaf, as a conv's output would be: in place is allowed
        y = forward(x_in)
        run.reused_input_storage.append(y.data_ptr() == x_in.data_ptr())
        y.backward(dy[rows].to(y.dtype))
        run.y.append(y.detach().clone())
        run.dx.append(leaf.grad)
        take_parameter_grads(layer, run.dweight, run.dbias)
    run.buffers = {name: value.clone() for name, value in layer.named_buffers()}
    return run


def run_act_rank(scenario: Scenario, activation: str, dtype: torch.dtype, inplace: bool = True,
                 process_group=None) -> Run:
    """The rank function: SyncBatchNormAct on this rank's slice of the global batch."""
    comm = syncbn.resolve_communicator(process_group)
    layer = _with_affine(syncbn.SyncBatchNormAct(
        scenario.channels, momentum=scenario.momentum, affine=scenario.affine,
        track_running_stats=scenario.track_running_stats, process_group=process_group,
        activation=activation, negative_slope=SLOPE, inplace=inplace,
        dtype=torch.float64 if dtype == torch.float64 else None), scenario.channels)
    return _train(layer, layer, scenario, scenario.rank_slice(comm.rank), dtype, scenario.channels_last)


def run_oracle(scenario: Scenario, activation: str, rounded_to: torch.dtype) -> Run:
    """float64 BatchNorm then the float64 activation, on the concatenated global batch."""
    bn = _with_affine(BATCHNORM_BY_DIM[scenario.ndim](
        scenario.channels, momentum=scenario.momentum, affine=scenario.affine,
        track_running_stats=scenario.track_running_stats).double(), scenario.channels)
    act = _activation(activation)
    return _train(lambda x: act(bn(x)), bn, scenario, slice(None), torch.float64, False, rounded_to)


def assert_matches_oracle(runs: List[Run], scenario: Scenario, activation: str,
                          dtype: torch.dtype) -> None:
    oracle = run_oracle(scenario, activation, dtype)
    rtol, atol = TOLERANCE[dtype]

    def close(actual, expected, what, scale=1.0):
        torch.testing.assert_close(actual.double(), expected, rtol=rtol * scale, atol=atol * scale,
                                   msg=lambda m: f"{activation}, {what}: {m}")

    batch = sum(scenario.sizes) * torch.Size(scenario.spatial).numel()
    for step in range(scenario.steps):
        close(torch.cat([r.y[step] for r in runs]), oracle.y[step], f"output, step {step}")
        close(torch.cat([r.dx[step] for r in runs]), oracle.dx[step], f"input grad, step {step}")
        if scenario.affine:  # sums over the batch: errors grow with its size
            close(sum(r.dweight[step] for r in runs), oracle.dweight[step], "weight grad", batch ** 0.5)
            close(sum(r.dbias[step] for r in runs), oracle.dbias[step], "bias grad", batch ** 0.5)
    for rank, run in enumerate(runs):
        assert run.buffers.keys() == oracle.buffers.keys()
        for name, expected in oracle.buffers.items():
            close(run.buffers[name], expected.to(run.buffers[name].dtype).double(), f"rank {rank} {name}")


# ----- parity, one process -------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_one_process_equals_float64_batchnorm_then_activation_in_place(activation, dtype):
    scenario = Scenario(sizes=(6,), steps=2)
    run = run_act_rank(scenario, activation, dtype)
    # An fp16/bf16 output does not keep enough of the value to invert: unfused, out of place.
    half = dtype in (torch.float16, torch.bfloat16)
    assert all(run.reused_input_storage) != half
    assert all(y.dtype == dtype for y in run.y)
    assert_matches_oracle([run], scenario, activation, dtype)


SHAPES = {
    "N,C": Scenario(sizes=(7,), spatial=()),
    "N,C,L": Scenario(sizes=(3,), spatial=(5,)),
    "channels_last": Scenario(sizes=(3,), channels_last=True),
    "channels_last_3d": Scenario(sizes=(2,), spatial=(2, 3, 3), channels_last=True),
    "no_affine": Scenario(sizes=(4,), affine=False),
    "no_running_stats": Scenario(sizes=(4,), track_running_stats=False),
    "cumulative_momentum": Scenario(sizes=(4,), momentum=None, steps=3),
}


@pytest.mark.parametrize("scenario", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_layouts_and_options_equal_the_oracle_and_keep_the_layout(scenario, activation):
    run = run_act_rank(scenario, activation, torch.float32)
    assert all(run.reused_input_storage)
    if scenario.channels_last:
        fmt = torch.channels_last if scenario.ndim == 4 else torch.channels_last_3d
        assert all(t.is_contiguous(memory_format=fmt) for t in run.y + run.dx)
    assert_matches_oracle([run], scenario, activation, torch.float32)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_large_mean_several_steps_equal_the_oracle(activation):
    # float64: in fp32, SyncBatchNorm's own torch-path normalize rounds a mean of 300 to fp32
    # (4e-5 error at std 0.5), which is not what this test is about.
    scenario = Scenario(sizes=(4,), steps=3, mean=300.0, std=0.5)
    assert_matches_oracle([run_act_rank(scenario, activation, torch.float64)], scenario,
                          activation, torch.float64)


@pytest.mark.parametrize("group", [None, SingleProcessCommunicator()], ids=["plain_process", "communicator"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_group_of_one_updates_running_statistics_as_syncbatchnorm_alone(group, momentum, dtype):
    """In a group of one the fused layer takes SyncBatchNorm's group-of-one route (its checks,
    num_batches_tracked and momentum factor, the kernels' update_stats): over three steps with a
    moving mean, num_batches_tracked equal and the running statistics, outputs and gradients
    equal to rounding to those of SyncBatchNorm + the activation."""
    torch.manual_seed(0)
    fused = _with_affine(syncbn.SyncBatchNormAct(5, momentum=momentum, process_group=group,
                                                 negative_slope=SLOPE, dtype=dtype), 5)
    norm = _with_affine(syncbn.SyncBatchNorm(5, momentum=momentum, process_group=group, dtype=dtype), 5)
    for step in range(3):
        x = (torch.randn(4, 5, 3, 3, dtype=dtype) * 2 + 30 * step).requires_grad_()
        x_fused = x.detach().clone().requires_grad_()
        y_fused = fused(x_fused * 1.0)
        y = nn.functional.leaky_relu(norm(x * 1.0), SLOPE)
        dy = torch.randn_like(y)
        y_fused.backward(dy)
        y.backward(dy)
        assert torch.equal(fused.num_batches_tracked, norm.num_batches_tracked)
        tolerance = TOLERANCE[dtype][0]
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(fused, name), getattr(norm, name), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(y_fused, y.detach(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(x_fused.grad, x.grad, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(fused.weight.grad, norm.weight.grad, rtol=10 * tolerance, atol=10 * tolerance)


def test_group_of_one_raises_as_syncbatchnorm_alone_and_leaves_the_statistics():
    """A single value per channel, and (check_finite) a NaN batch, raise before any running
    statistic changes; an empty batch changes none of them."""
    layer = syncbn.SyncBatchNormAct(3, check_finite=True)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        layer(torch.randn(1, 3) * 1.0)
    bad = torch.randn(4, 3, 2)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        layer(bad * 1.0)
    layer(torch.zeros(0, 3, 2, requires_grad=True) * 1.0).sum().backward()
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_inplace_false_keeps_the_input_and_gives_the_same_results():
    scenario = Scenario(sizes=(4,))
    run = run_act_rank(scenario, "leaky_relu", torch.float64, inplace=False)
    assert not any(run.reused_input_storage)
    assert_matches_oracle([run], scenario, "leaky_relu", torch.float64)


# ----- parity over ranks ---------------------------------------------------------------------

DISTRIBUTED = {  # world size, scenario, activation, dtype
    "2_ranks_one_empty_channels_last_elu": (2, Scenario(sizes=(3, 0), channels_last=True), "elu", torch.float64),
    "3_ranks_uneven_leaky_relu": (3, Scenario(sizes=(3, 1, 4), momentum=None, steps=3), "leaky_relu", torch.float64),
    "3_ranks_one_sample_each_identity": (3, Scenario(sizes=(1, 1, 1), spatial=()), "identity", torch.float64),
    "3_ranks_fp32_elu": (3, Scenario(sizes=(2, 2, 1)), "elu", torch.float32),
    "4_ranks_uneven_one_empty_leaky_relu": (4, Scenario(sizes=(2, 1, 0, 3)), "leaky_relu", torch.float64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,scenario,activation,dtype", DISTRIBUTED.values(), ids=DISTRIBUTED.keys())
def test_ranks_equal_float64_batchnorm_then_activation_on_the_global_batch(
        rank_pool, backend, world, scenario, activation, dtype):
    runs = rank_pool(world, backend).run(run_act_rank, scenario, activation, dtype)
    assert all(all(r.reused_input_storage) for r in runs)
    assert_matches_oracle(runs, scenario, activation, dtype)


def _collectives_of(layer_class) -> list:
    recording = RecordingCommunicator(syncbn.resolve_communicator())
    layer = layer_class(8, process_group=recording)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    layer(x * 1.0).sum().backward()
    layer.eval()
    layer(x)
    return recording.calls


def _collectives_of_both() -> tuple:
    return _collectives_of(syncbn.SyncBatchNorm), _collectives_of(syncbn.SyncBatchNormAct)


def test_same_collectives_and_payloads_as_syncbatchnorm_none_in_eval(rank_pool):
    for plain, activated in rank_pool(2, "gloo").run(_collectives_of_both):
        assert activated == plain and len(activated) == 2  # one forward, one backward


def _wrong_channels_on_rank_zero() -> str:
    rank = syncbn.resolve_communicator().rank
    layer = syncbn.SyncBatchNormAct(3, name="head.bn")
    try:
        layer(torch.randn(2, 4 if rank == 0 else 3, 5) * 1.0)
    except (ValueError, syncbn.CollectiveError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_invalid_input_on_one_rank_raises_on_every_rank(rank_pool):
    rank0, rank1 = rank_pool(2, "gloo").run(_wrong_channels_on_rank_zero, timeout=60)
    assert rank0.startswith("ValueError") and "head.bn" in rank0 and "channels" in rank0
    assert rank1.startswith("CollectiveError") and "invalid input" in rank1


def _layers_differ_across_ranks() -> str:
    rank = syncbn.resolve_communicator().rank
    layer = syncbn.SyncBatchNormAct(3, name=f"stage{rank}.bn", debug=True)
    try:
        layer(torch.randn(2, 3, 4) * 1.0)
    except syncbn.CollectiveMismatchError as error:
        return str(error)
    return "no error"


def test_debug_guard_turns_mismatched_layers_into_an_error_on_every_rank(rank_pool):
    messages = rank_pool(2, "gloo").run(_layers_differ_across_ranks, timeout=60)
    assert all("SyncBatchNormAct(3) 'stage" in m and "disagree" in m for m in messages), messages


# ----- memory: storage reuse and what the graph keeps ----------------------------------------

def _saved_bytes(model: nn.Module, x: torch.Tensor) -> Tuple[int, torch.Tensor]:
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(saved), y


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_graph_keeps_only_the_output_and_per_channel_vectors(activation):
    channels = 16
    leaf = torch.randn(4, channels, 8, 8, requires_grad=True)
    x = leaf * 1.0
    activation_bytes = x.numel() * x.element_size()
    layer = syncbn.SyncBatchNormAct(channels, activation=activation)
    assert layer(x).data_ptr() == x.data_ptr()  # in place without the counting hooks below
    # Saved-tensor hooks hide what autograd saves, so under them the layer fuses out of place:
    # the graph keeps the output all the same.
    saved, y = _saved_bytes(layer, leaf * 1.0)
    assert activation_bytes <= saved <= activation_bytes + 4 * channels * 8 + 8
    baseline = nn.Sequential(syncbn.SyncBatchNorm(channels), _activation(activation))
    baseline_saved, _ = _saved_bytes(baseline, leaf * 1.0)
    if activation != "identity":  # BatchNorm keeps x, the activation keeps its own input
        assert baseline_saved >= 2 * activation_bytes


# ----- unsafe in-place cases -----------------------------------------------------------------

def _oracle_grads(x: torch.Tensor, activation: str, weight=None, bias=None):
    xd = x.detach().double().requires_grad_()
    bn = nn.BatchNorm2d(x.shape[1]).double()
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    y = _activation(activation)(bn(xd))
    y.backward(torch.ones_like(y))
    return y.detach(), xd.grad, bn.weight.grad


def test_leaf_input_falls_back_to_a_new_output_and_stays_untouched():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    before = x.detach().clone()
    y = syncbn.SyncBatchNormAct(4, negative_slope=SLOPE)(x)
    y.sum().backward()
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    expected_y, expected_dx, _ = _oracle_grads(before, "leaky_relu")
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_dx, rtol=1e-5, atol=1e-5)


def test_view_input_falls_back_and_leaves_its_base_untouched():
    base = torch.randn(6, 4, 5, 5, requires_grad=True) * 1.0
    before = base.detach().clone()
    view = base[::2]
    y = syncbn.SyncBatchNormAct(4)(view)
    assert y.data_ptr() != view.data_ptr() and torch.equal(base.detach(), before)


# name -> (what makes the layer's input, whether a consumer that ran earlier saved it)
INPUTS_AUTOGRAD_STILL_NEEDS = {
    "exp": (torch.exp, False), "relu": (torch.relu, False), "sigmoid": (torch.sigmoid, False),
    "tanh": (torch.tanh, False), "relu_inplace": (lambda t: torch.relu_(t * 1.0), False),
    "saved_by_an_earlier_mul": (lambda t: t * 1.0, True),
}


@pytest.mark.parametrize("producer,consumer", INPUTS_AUTOGRAD_STILL_NEEDS.values(),
                         ids=INPUTS_AUTOGRAD_STILL_NEEDS.keys())
def test_input_autograd_still_needs_runs_out_of_place_with_the_gradients_of_the_original(
        producer, consumer):
    # exp, ReLU, Sigmoid, Tanh and in-place ops keep their output for backward, a mul keeps its
    # inputs: writing over the layer's input would break their backward.
    leaf = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    other = torch.rand(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    layer = syncbn.SyncBatchNormAct(4, negative_slope=SLOPE, dtype=torch.float64)
    reference = nn.Sequential(syncbn.SyncBatchNorm(4, dtype=torch.float64), nn.LeakyReLU(SLOPE))
    results = []
    for model in (layer, reference):
        x = producer(leaf)
        kept = (x * other).sum() if consumer else 0.0
        y = model(x)
        in_place = y.data_ptr() == x.data_ptr()
        (y.square().sum() + kept).backward()
        results.append((in_place, y.detach().clone(), leaf.grad.clone()))
        leaf.grad = None
    (fused_in_place, *fused), (_, *expected) = results
    assert not fused_in_place
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_same_input_from_a_producer_that_keeps_nothing_is_written_in_place():
    # The counterpart of the test above: the checks do not refuse every input.
    x = torch.randn(3, 4, 5, 5, requires_grad=True) * 2.0
    assert syncbn.SyncBatchNormAct(4)(x).data_ptr() == x.data_ptr()


def test_output_modified_in_place_afterwards_makes_backward_raise_naming_the_layer():
    x = torch.randn(3, 4, 5, 5, requires_grad=True) * 1.0
    y = syncbn.SyncBatchNormAct(4, name="head.bn")(x)
    y += 1.0
    with pytest.raises(RuntimeError, match="'head.bn': its output was modified by an inplace "
                                           "operation.*out = out \\+ shortcut"):
        y.sum().backward()


def _step_with_weights(activation: str, weight: torch.Tensor, bias: torch.Tensor):
    """One training step of a layer with these weights on a non-leaf input, and the oracle's."""
    layer = syncbn.SyncBatchNormAct(4, activation=activation, negative_slope=SLOPE)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    leaf = torch.randn(3, 4, 5, 5, requires_grad=True)
    x = leaf * 1.0
    y = layer(x)
    in_place = y.data_ptr() == x.data_ptr()
    y.sum().backward()
    expected_y, expected_dx, expected_dweight = _oracle_grads(leaf, activation, weight, bias)
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), expected_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), expected_dweight, rtol=1e-4, atol=1e-4)
    return in_place


@pytest.mark.parametrize("tiny", [0.0, 1e-5])
def test_weight_near_zero_falls_back_out_of_place_with_correct_grads(tiny):
    weight, bias = torch.tensor([1.0, tiny, -0.7, 1.3]), torch.tensor([0.2, 0.5, -0.1, 0.0])
    assert not _step_with_weights("elu", weight, bias)


def test_negative_weights_are_inverted_in_place_with_correct_grads():
    weight, bias = torch.tensor([-1.0, -0.5, 0.7, -2.0]), torch.tensor([0.2, 0.5, -0.1, 0.0])
    assert _step_with_weights("leaky_relu", weight, bias)


# Every path a training forward can take: the answer to create_graph=True must not depend on it.
TRAINING_PATHS = {
    "fused_in_place": dict(),
    "fused_out_of_place": dict(inplace=False),
    "weight_below_the_floor": dict(weight=1e-6),
    "activation_module": dict(activation=nn.SiLU()),
    "half_precision": dict(dtype=torch.bfloat16),
    "fuse_false": dict(fuse=False),
}


@pytest.mark.parametrize("options", TRAINING_PATHS.values(), ids=TRAINING_PATHS.keys())
def test_double_backward_raises_a_clear_error_on_every_training_path(options):
    options = dict(options)
    dtype, weight = options.pop("dtype", torch.float32), options.pop("weight", None)
    layer = syncbn.SyncBatchNormAct(4, name="bn", **options)
    if weight is not None:
        with torch.no_grad():
            layer.weight[1] = weight
    leaf = torch.randn(3, 4, 5, 5, dtype=dtype, requires_grad=True)
    y = layer(leaf * 1.0)
    with pytest.raises(RuntimeError, match="'bn'.*does not support double backward"):
        torch.autograd.grad(y.float().square().sum(), leaf, create_graph=True)


def test_double_backward_in_evaluation_is_batchnorm_and_the_activation():
    layer = syncbn.SyncBatchNormAct(4, negative_slope=SLOPE, dtype=torch.float64).eval()
    reference = nn.Sequential(nn.BatchNorm2d(4).double().eval(), nn.LeakyReLU(SLOPE))
    leaf = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    second = []
    for model in (layer, reference):
        (grad,) = torch.autograd.grad(model(leaf).square().sum(), leaf, create_graph=True)
        second.append(torch.autograd.grad(grad.square().sum(), leaf)[0])
    torch.testing.assert_close(second[0], second[1], rtol=1e-12, atol=1e-12)


# (weight, bias) of issue 22's table: fused in fp16/bf16, dweight was 10-900x the error of the
# unfused layer against fp64.
HALF_PRECISION_WEIGHTS = [(0.002, 1.0), (1.0, 20.0), (1.0, 0.0)]


@pytest.mark.parametrize("weight,bias", HALF_PRECISION_WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gradients_are_those_of_syncbatchnorm_then_the_activation(
        dtype, weight, bias):
    leaf = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    layer = syncbn.SyncBatchNormAct(3, negative_slope=SLOPE)
    unfused = nn.Sequential(syncbn.SyncBatchNorm(3), nn.LeakyReLU(SLOPE))
    results = []
    for model in (layer, unfused):
        norm = model if model is layer else model[0]
        with torch.no_grad():
            norm.weight.fill_(weight)
            norm.bias.fill_(bias)
        results.append(training_step(model, leaf.to(dtype)))
    # Within 4x of the unfused layer's error against fp64, for every weight and bias: equal.
    for got, want in zip(*results):
        assert torch.equal(got, want)


def _signature_kinds(cls) -> Dict[str, str]:
    import inspect

    return {name: p.kind.name for name, p in inspect.signature(cls).parameters.items()}


def test_constructor_takes_torch_s_positions_and_keyword_only_options():
    kinds = _signature_kinds(syncbn.SyncBatchNormAct)
    positional = ["num_features", "eps", "momentum", "affine", "track_running_stats",
                  "process_group", "activation", "negative_slope", "inplace", "device", "dtype"]
    assert [n for n, k in kinds.items() if k == "POSITIONAL_OR_KEYWORD"] == positional
    assert {n for n, k in kinds.items() if k == "KEYWORD_ONLY"} == {
        "bias", "alpha", "drop", "fuse", "name", "debug", "check_finite"}
    with pytest.raises(TypeError):
        syncbn.SyncBatchNormAct(4, 1e-5, 0.1, True, True, None, "leaky_relu", 0.01, True, None,
                                None, "name given by position")
    layer = syncbn.SyncBatchNormAct(4, bias=False)
    assert layer.bias is None
    assert layer.state_dict().keys() == nn.BatchNorm2d(4, bias=False).state_dict().keys()


def _assert_bias_false_trains_like_batchnorm(inplace: bool, dtype: torch.dtype) -> None:
    layer = syncbn.SyncBatchNormAct(3, bias=False, negative_slope=SLOPE, inplace=inplace,
                                    dtype=dtype)
    reference = nn.Sequential(nn.BatchNorm2d(3, bias=False).double(), nn.LeakyReLU(SLOPE))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
        reference[0].weight.copy_(layer.weight)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    tolerance = TOLERANCE[dtype][0]
    for got, want in zip(training_step(layer, x.to(dtype) * 1.0), training_step(reference, x)):
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("inplace", [True, False])
def test_bias_false_trains_fused_with_the_gradients_of_batchnorm_without_bias(inplace):
    _assert_bias_false_trains_like_batchnorm(inplace, torch.float64)


def _assert_device_floor_check(monkeypatch, debug: bool, dtype: torch.dtype) -> None:
    from syncbn import activated

    # As on CUDA: the host may not read the weights (unless the debug guard asks for it).
    monkeypatch.setattr(activated, "_host_may_read", lambda weight, debug: debug)
    layer = syncbn.SyncBatchNormAct(3, negative_slope=SLOPE, dtype=dtype, debug=debug)
    reference = nn.Sequential(nn.BatchNorm2d(3).double(), nn.LeakyReLU(SLOPE))
    with torch.no_grad():
        for weight in (layer.weight, reference[0].weight):
            weight.copy_(torch.tensor([1.0, 1e-5, -0.7]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    (y, dx, dweight, dbias) = [t.double() for t in training_step(layer, x.to(dtype) * 1.0)]
    (y0, dx0, dweight0, dbias0) = training_step(reference, x)
    tolerance = TOLERANCE[dtype][0] * 10  # sums over the batch

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)

    close(y, y0)
    close(dbias, dbias0)
    if debug:  # the guard reads the floor on the host and runs unfused: exact
        close(dweight, dweight0)
        close(dx, dx0)
        return
    fine = [0, 2]
    assert dweight[1].isnan() and dx[:, 1].isnan().all()
    close(dweight[fine], dweight0[fine])
    close(dx[:, fine], dx0[:, fine])


@pytest.mark.parametrize("debug", [False, True], ids=["no_read", "debug_guard_reads"])
def test_on_a_device_a_weight_below_the_floor_gives_nan_gradients_never_imprecise_ones(
        monkeypatch, debug):
    _assert_device_floor_check(monkeypatch, debug, torch.float64)


def test_training_step_on_the_device_path_reads_nothing_back_and_builds_no_tensor_from_host_data(
        meta_kernels, monkeypatch):
    # meta stands in for CUDA: any read of a value (bool(), .item()) raises there. A tensor
    # built from Python data is a host-to-device copy on CUDA, which meta does not catch: count.
    built = []
    real_tensor, real_new_tensor = torch.tensor, torch.Tensor.new_tensor

    def tensor(*args, **kwargs):
        built.append("torch.tensor")
        return real_tensor(*args, **kwargs)

    def new_tensor(self, *args, **kwargs):
        built.append("Tensor.new_tensor")
        return real_new_tensor(self, *args, **kwargs)

    def steps(norm_act) -> List[str]:
        model = nn.Sequential(nn.Conv2d(2, 3, 1), norm_act(3, "leaky_relu"), nn.Conv2d(3, 3, 1),
                              norm_act(3, "elu")).to("meta")
        x = torch.empty(4, 2, 5, 5, device="meta", requires_grad=True)
        built.clear()
        for _ in range(2):
            model(x).sum().backward()
        assert x.grad.shape == x.shape
        return list(built)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "new_tensor", new_tensor)
    fused = steps(lambda c, act: syncbn.SyncBatchNormAct(
        c, activation=act, bias=act == "elu", process_group=IdenticalPeers(2)))
    unfused = steps(lambda c, act: nn.Sequential(
        syncbn.SyncBatchNorm(c, process_group=IdenticalPeers(2)), _activation(act)))
    # The layer adds none of its own to those of SyncBatchNorm's statistics (the core's).
    assert fused == unfused


COMPILE_GROUPS = {"alone": None, "two_ranks": IdenticalPeers(2)}


@pytest.mark.parametrize("group", COMPILE_GROUPS.values(), ids=COMPILE_GROUPS.keys())
def test_compiles_whole_with_fullgraph_and_trains_like_eager(group):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), syncbn.SyncBatchNormAct(4, process_group=group),
            nn.Conv2d(4, 4, 1), syncbn.SyncBatchNormAct(4, activation="elu", process_group=group),
        ).double()

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch._dynamo.reset()
    eager, compiled = build(), build()
    # fullgraph=True raises at any graph break. aot_eager: dynamo and AOTAutograd, as with
    # inductor, without a C++ compiler.
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    results = training_step(step, x), training_step(eager, x)
    torch._dynamo.reset()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(compiled.buffers(), eager.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_relu_by_name_is_refused_with_the_reason_and_the_alternatives():
    with pytest.raises(ValueError) as info:
        syncbn.SyncBatchNormAct(4, activation="relu")
    message = str(info.value)
    assert "cannot be inverted" in message and "leaky_relu" in message and "nn.ReLU()" in message


def test_any_activation_module_runs_out_of_place_and_equals_the_oracle():
    layer = syncbn.SyncBatchNormAct(4, activation=nn.ReLU(), drop=nn.Dropout(0.0))
    leaf = torch.randn(3, 4, 5, 5, requires_grad=True)
    x = leaf * 1.0
    y = layer(x)
    y.sum().backward()
    assert y.data_ptr() != x.data_ptr()
    xd = leaf.detach().double().requires_grad_()
    expected = torch.relu(nn.BatchNorm2d(4).double()(xd))
    expected.sum().backward()
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    assert "(act): ReLU()" in repr(layer) and "(drop): Dropout" in repr(layer)


def test_eval_uses_running_statistics_and_the_activation():
    layer = syncbn.SyncBatchNormAct(4, activation="elu")
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    reference = nn.BatchNorm2d(4).eval()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(layer.eval()(x), nn.functional.elu(reference(x)))


def test_state_dict_keys_are_syncbatchnorm_s_and_a_batchnorm_checkpoint_loads():
    plain = nn.BatchNorm2d(4)
    plain.running_mean.fill_(0.5)
    layer = syncbn.SyncBatchNormAct(4)
    assert layer.state_dict().keys() == syncbn.SyncBatchNorm(4).state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    assert torch.equal(layer.running_mean, plain.running_mean)


def test_checkpoint_recompute_updates_running_stats_once():
    layer = syncbn.SyncBatchNormAct(4, momentum=None, negative_slope=SLOPE)
    leaf = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: layer(t * 1.0), leaf, use_reentrant=False)
    y.sum().backward()
    assert layer.num_batches_tracked.item() == 1
    expected_y, expected_dx, _ = _oracle_grads(leaf, "leaky_relu")
    torch.testing.assert_close(leaf.grad.double(), expected_dx, rtol=1e-5, atol=1e-5)


def _fused_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 1), syncbn.SyncBatchNormAct(4, negative_slope=SLOPE),
                         nn.Conv2d(4, 4, 1), syncbn.SyncBatchNormAct(4, activation="elu"),
                         nn.Conv2d(4, 3, 1)).double()


CHECKPOINTED = {
    "segment_starts_at_the_fused_layer": lambda m, x, reentrant: torch.utils.checkpoint.checkpoint(
        m[1:], m[0](x), use_reentrant=reentrant),
    "fused_layer_inside_the_segment": lambda m, x, reentrant: m[3:](
        torch.utils.checkpoint.checkpoint(m[:3], x, use_reentrant=reentrant)),
    "every_module_a_segment": lambda m, x, reentrant: torch.utils.checkpoint.checkpoint_sequential(
        m, 5, x, use_reentrant=reentrant),
}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("checkpointed", CHECKPOINTED.values(), ids=CHECKPOINTED.keys())
def test_checkpointing_gives_the_gradients_and_statistics_of_the_plain_model(checkpointed,
                                                                             reentrant):
    results = []
    for run in (lambda m, x: m(x), lambda m, x: checkpointed(m, x, reentrant)):
        model = _fused_stack()
        x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        y = run(model, x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in model.parameters()]
                       + list(model.buffers()))
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_forward_hook_of_the_producer_keeps_its_output_unchanged():
    model = syncbn.convert_sync_batchnorm_act(nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4),
                                                            nn.LeakyReLU(SLOPE)))
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    conv_output = model[0](x)
    assert model[1].inplace and model[1](conv_output).data_ptr() == conv_output.data_ptr()
    kept: list = []
    # A feature extractor's hook: it keeps the conv's output.
    model[0].register_forward_hook(
        lambda module, args, output: kept.append((output, output.detach().clone())))
    y = model(x)
    (conv_output, as_it_was), = kept
    assert y.data_ptr() != conv_output.data_ptr() and torch.equal(conv_output, as_it_was)


@pytest.mark.parametrize("where", ["own_pre_hook", "own_hook", "global_hook"])
def test_hooks_that_see_the_input_make_the_layer_run_out_of_place(where):
    layer = syncbn.SyncBatchNormAct(4)
    kept: list = []
    if where == "own_pre_hook":
        handle = layer.register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    elif where == "own_hook":
        handle = layer.register_forward_hook(lambda module, args, output: kept.append(args[0]))
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, output: kept.append(args[0]))
    try:
        x = torch.randn(3, 4, 5, 5, requires_grad=True) * 1.0
        before = x.detach().clone()
        y = layer(x)
    finally:
        handle.remove()
    assert y.data_ptr() != x.data_ptr() and torch.equal(kept[0].detach(), before)


# ----- conversion ----------------------------------------------------------------------------

def _segmentation_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(SLOPE),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.ELU(0.5)),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # not invertible: left alone
        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3, affine=False), nn.Identity(),
    ).double()


def test_convert_fuses_invertible_pairs_keeps_state_names_and_outputs_and_reverts_exactly():
    model = _segmentation_head()
    model[1].weight.requires_grad_(False)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)  # one training step on the original: stats move
    model.load_state_dict(before)
    group = SingleProcessCommunicator()
    fused = syncbn.convert_sync_batchnorm_act(model, process_group=group)
    kinds = [type(m).__name__ for m in (fused[1], fused[2], fused[3][1], fused[3][2], fused[5],
                                        fused[6], fused[8], fused[9])]
    assert kinds == ["SyncBatchNormAct", "FusedActivation", "SyncBatchNormAct", "FusedActivation",
                     "BatchNorm2d", "ReLU", "SyncBatchNormAct", "FusedActivation"]
    assert fused[3][1].act.alpha == 0.5 and fused[3][1].momentum is None and fused[1].process_group is group
    assert fused[1].weight.requires_grad is False and fused[1].name == "1"
    # In place after a conv in the same Sequential, the first layer of a nested one included.
    assert fused[1].inplace and fused[3][1].inplace and fused[8].inplace
    assert fused.state_dict().keys() == before.keys()
    torch.testing.assert_close(fused(x), expected)
    reverted = syncbn.revert_sync_batchnorm_act(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in _segmentation_head().modules()]
    assert reverted[3][2].alpha == 0.5 and reverted[1].weight.requires_grad is False
    assert reverted.state_dict().keys() == before.keys()


def test_fusing_converted_syncbatchnorms_keeps_their_group_and_reverts_to_them():
    group = SingleProcessCommunicator()
    model = syncbn.convert_sync_batchnorm(_segmentation_head(), process_group=group)
    fused = syncbn.convert_sync_batchnorm_act(model)
    assert fused[1].process_group is group and fused[1].name == "1"
    reverted = syncbn.revert_sync_batchnorm_act(fused)
    assert type(reverted[1]) is syncbn.SyncBatchNorm and reverted[1].process_group is group
    assert reverted[1].original_class is nn.BatchNorm2d and type(reverted[2]) is nn.LeakyReLU
    assert type(syncbn.revert_sync_batchnorm(reverted)[1]) is nn.BatchNorm2d


def test_convert_leaves_unrelated_layers_and_existing_fused_layers_alone():
    model = nn.Sequential(syncbn.SyncBatchNormAct(3), nn.LeakyReLU(), nn.Linear(3, 3), nn.BatchNorm1d(3))
    fused = syncbn.convert_sync_batchnorm_act(model)
    assert [type(m) for m in fused] == [syncbn.SyncBatchNormAct, nn.LeakyReLU, nn.Linear, nn.BatchNorm1d]
    assert not any(isinstance(m, FusedActivation) for m in fused.modules())


def _assert_fusion_keeps_the_step(model: nn.Module, x: torch.Tensor, fused: int,
                                  in_place: int) -> nn.Module:
    """convert_sync_batchnorm_act fuses ``fused`` layers, ``in_place`` of them in place, and the
    converted model's training step (output, gradients, running statistics) is the original's."""
    converted = syncbn.convert_sync_batchnorm_act(copy.deepcopy(model))
    layers = [m for m in converted.modules() if isinstance(m, syncbn.SyncBatchNormAct)]
    assert (len(layers), sum(m.inplace for m in layers)) == (fused, in_place)
    for got, want in zip(training_step(converted, x), training_step(model, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert converted.state_dict().keys() == model.state_dict().keys()
    for key, want in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], want, rtol=1e-10, atol=1e-12)
    return converted


class _PreActivationBlock(nn.Module):
    """ResNet v2's identity block: the body starts with the norm, the shortcut reads its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def test_a_pre_activation_block_fuses_out_of_place_and_keeps_its_shortcut():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), _PreActivationBlock(4),
                          _PreActivationBlock(4)).double()
    _assert_fusion_keeps_the_step(model, torch.randn(3, 2, 5, 5, dtype=torch.float64),
                                      fused=2, in_place=0)


PRODUCER_KEEPS_ITS_OUTPUT = {"relu_inplace": nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid(),
                             "tanh": nn.Tanh(), "relu": nn.ReLU()}


@pytest.mark.parametrize("producer", PRODUCER_KEEPS_ITS_OUTPUT.values(),
                         ids=PRODUCER_KEEPS_ITS_OUTPUT.keys())
def test_a_norm_after_a_module_other_than_a_conv_or_linear_fuses_out_of_place(producer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), producer, nn.BatchNorm2d(4), nn.LeakyReLU(SLOPE),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ELU()).double()
    _assert_fusion_keeps_the_step(model, torch.randn(3, 2, 5, 5, dtype=torch.float64),
                                      fused=2, in_place=1)


class _QuietBatchNorm2d(nn.BatchNorm2d):
    """A subclass the converter does not know (here it only relaxes the input check)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def test_pairs_fusing_would_change_are_left_alone():
    torch.manual_seed(0)
    zero_initialised = nn.BatchNorm2d(4)
    nn.init.zeros_(zero_initialised.weight)
    model = nn.Sequential(
        # changes the output in place
        nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 1), _QuietBatchNorm2d(4), nn.LeakyReLU(SLOPE),  # an unknown subclass
        nn.Conv2d(4, 4, 1), zero_initialised, nn.LeakyReLU(SLOPE),  # cannot be inverted
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(SLOPE),  # fused
    ).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    converted = _assert_fusion_keeps_the_step(model, x, fused=1, in_place=1)
    assert isinstance(converted[11], syncbn.SyncBatchNormAct)


def test_a_batchnorm_without_bias_fuses_and_keeps_torch_s_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, bias=False),
                          nn.LeakyReLU(SLOPE)).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    converted = _assert_fusion_keeps_the_step(model, x, fused=1, in_place=1)
    assert converted[1].bias is None


def test_an_uninitialised_lazy_batchnorm_is_refused_before_anything_is_replaced():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(),
                          nn.Sequential(nn.LazyBatchNorm2d(), nn.LeakyReLU()))
    with pytest.raises(ValueError, match=r"'3\.0' is a lazy BatchNorm.*forward pass"):
        syncbn.convert_sync_batchnorm_act(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_revert_sync_batchnorm_turns_fused_layers_into_batchnorm_and_the_activation():
    fused = syncbn.convert_sync_batchnorm_act(_segmentation_head())
    native = syncbn.SyncBatchNormAct(3)
    fused.append(native)
    reverted = syncbn.revert_sync_batchnorm(fused)
    expected = [type(m) for m in _segmentation_head().modules()]
    assert [type(m) for m in reverted[:-1].modules()] == expected
    assert reverted[-1] is native  # built directly: left as it is
    assert not any(isinstance(m, FusedActivation) for m in reverted.modules())


def test_revert_sync_batchnorm_checks_every_layer_before_replacing_any():
    fused = syncbn.convert_sync_batchnorm_act(syncbn.convert_sync_batchnorm(_segmentation_head()))
    # A layer that saw no input: its BatchNorm class (1d, 2d, 3d) is unknown.
    fused.append(nn.Sequential(syncbn.SyncBatchNorm(3), nn.LeakyReLU()))
    syncbn.convert_sync_batchnorm_act(fused)
    with pytest.raises(ValueError, match="has seen no input"):
        syncbn.revert_sync_batchnorm(fused)
    assert isinstance(fused[1], syncbn.SyncBatchNormAct) and isinstance(fused[2], FusedActivation)


# ----- Triton kernels, through the interpreter -----------------------------------------------

def test_kernels_in_interpreter() -> None:
    run_in_interpreter(__file__, "-k", "through_the_kernels")


@in_interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_through_the_kernels_equals_the_oracle(activation, dtype, channels_last):
    scenario = Scenario(sizes=(3,), spatial=(3, 4), channels_last=channels_last)
    assert syncbn.kernels.uses_triton(torch.zeros(1, 3, dtype=dtype))
    run = run_act_rank(scenario, activation, dtype)
    assert all(run.reused_input_storage) == (dtype == torch.float32)  # fp16/bf16: unfused
    assert_matches_oracle([run], scenario, activation, dtype)


@in_interpreter
@pytest.mark.parametrize("channels_last", [False, True])
def test_many_tiles_and_programs_through_the_kernels(monkeypatch, channels_last):
    # Tiny tiles, few target programs: programs walk several tiles and share a sample's
    # positions, so the backward sums merge many partials and the last tile is ragged.
    monkeypatch.setattr(tk, "_TILE", 16)
    monkeypatch.setattr(tk, "_TARGET_PROGRAMS", 8)
    scenario = Scenario(sizes=(3,), spatial=(7, 9), channels=5, channels_last=channels_last)
    x = layout(torch.zeros((3, 5, 7, 9)), channels_last)
    assert tk._grid(x).tiles > 1 and tk._grid(x).partials > 1
    run = run_act_rank(scenario, "leaky_relu", torch.float32)
    assert all(run.reused_input_storage)
    assert_matches_oracle([run], scenario, "leaky_relu", torch.float32)


@in_interpreter
def test_bias_false_and_a_weight_below_the_floor_through_the_kernels(monkeypatch):
    assert syncbn.kernels.uses_triton(torch.zeros(1, 3))
    _assert_bias_false_trains_like_batchnorm(True, torch.float32)
    _assert_device_floor_check(monkeypatch, False, torch.float32)


@in_interpreter
@pytest.mark.parametrize("affine", [True, False])
def test_strided_and_empty_input_through_the_kernels(affine):
    layer = _with_affine(syncbn.SyncBatchNormAct(3, affine=affine, negative_slope=SLOPE), 3)
    leaf = torch.randn(4, 3, 4, 6, requires_grad=True)
    base = leaf * 1.0
    y = layer(base[:, :, :, ::2])  # a strided view: falls back, the kernel reads a copy
    y.backward(torch.ones_like(y))
    expected_y, expected_dx, _ = _oracle_grads(leaf.detach()[:, :, :, ::2], "leaky_relu",
                                               layer.weight if affine else None, layer.bias)
    torch.testing.assert_close(y.double(), expected_y, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad[:, :, :, ::2].double(), expected_dx, rtol=2e-5, atol=2e-5)
    empty = torch.zeros(0, 3, 2, 2)
    assert tk.normalize_activate(empty, torch.zeros(3), torch.ones(3), None, None, 1e-5, 1, 0.1,
                                 True).shape == empty.shape
    assert torch.equal(tk.activated_backward_payload(empty, empty, None, None, 2, 1.0), torch.zeros(6))


# ----- the memory claim, as benchmarks/memory.py counts it -----------------------------------

@pytest.mark.parametrize("model_name", ["ResNet-50 v2-style", "segmentation-style"])
def test_norm_act_layers_keep_at_least_40_percent_fewer_bytes_in_whole_networks(model_name):
    from benchmarks import memory

    x, _ = memory.batch_and_loss(model_name, 1)
    kept = {arm: memory.kept_bytes(memory.build(model_name, arm), x) for arm in memory.ARMS}
    for baseline in ("torch BN + act", "SyncBN + act"):
        ratio = kept["SyncBNAct"]["norm_act_bytes"] / kept[baseline]["norm_act_bytes"]
        assert ratio <= 0.6, f"{model_name}: SyncBNAct keeps {ratio:.2f}x the bytes of {baseline}"


def test_step_peak_grows_more_slowly_with_the_batch_than_syncbn_plus_activation():
    from benchmarks import memory

    # A child process with glibc's mmap threshold fixed, as the benchmark measures it.
    peaks = memory.run_child({"model": "segmentation-style", "batches": [2, 4], "time": False})["peaks"]
    per_sample = {arm: (peaks[arm]["4"] - peaks[arm]["2"]) / 2 for arm in memory.ARMS}
    assert per_sample["SyncBNAct"] <= 0.75 * per_sample["SyncBN + act"], per_sample
    assert per_sample["SyncBNAct"] <= 0.75 * per_sample["torch BN + act"], per_sample
