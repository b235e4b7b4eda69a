"""sync_batch_norm's contract where it must match F.batch_norm (issue 11): a bias-only
gradient, eps validation as in torch 2.13, and a dtype that differs across ranks."""
from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import syncbn
from benchmarks.layer_cost import TwoIdenticalRanks
from conftest import BACKENDS
from syncbn.functional import sync_batch_norm

CHANNELS = 3


def _x(batch: int = 6, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, CHANNELS, 4, generator=generator, dtype=torch.float64) * 2 + 1).to(dtype)


def _bias_grad(fn, x: torch.Tensor, dy: torch.Tensor) -> Optional[torch.Tensor]:
    bias = torch.linspace(-0.5, 0.5, CHANNELS, dtype=x.dtype).requires_grad_()
    fn(x, None, None, None, bias, training=True).backward(dy)
    return bias.grad


def test_bias_without_weight_gets_the_gradient_f_batch_norm_gives():
    x, dy = _x(), _x(seed=1)
    expected = _bias_grad(F.batch_norm, x, dy)
    actual = _bias_grad(sync_batch_norm, x, dy)
    assert actual is not None, "sync_batch_norm(weight=None, bias=b) left b.grad None"
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_a_functorch_transform_takes_function_apply_and_meets_torchs_own_error():
    """In eager mode the layer calls torch's C++ apply without Function.apply's Python wrapper;
    under a functorch transform it must not: the wrapper is where torch refuses (or serves) the
    transform, so the user sees torch's error, not a silently untransformed layer."""
    layer = syncbn.SyncBatchNorm(CHANNELS, process_group=TwoIdenticalRanks())
    x = _x(dtype=torch.float32)
    layer(x).sum().backward()  # eager, at W=2: the direct path works
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda values: layer(values).sum())(x)


def _rank_bias_grad(sizes) -> Optional[torch.Tensor]:
    rank = syncbn.resolve_communicator().rank
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    return _bias_grad(sync_batch_norm, _x(sum(sizes))[rows], _x(sum(sizes), seed=1)[rows])


def test_bias_without_weight_on_two_ranks_sums_to_f_batch_norm_on_the_global_batch(rank_pool):
    sizes = (2, 4)
    grads = rank_pool(2, "gloo").run(_rank_bias_grad, sizes)
    assert all(g is not None for g in grads), "a rank's bias gradient is None"
    torch.testing.assert_close(sum(grads), _bias_grad(F.batch_norm, _x(6), _x(6, seed=1)), rtol=1e-12, atol=1e-12)


def _torch_raises_value_error(training: bool, eps: float) -> bool:
    try:
        F.batch_norm(_x(), torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64),
                     training=training, eps=eps)
    except ValueError:
        return True
    return False


EPS_CASES = [(True, 0.0), (True, -1e-5), (True, 1e-5), (False, -1e-5), (False, 0.0), (False, 1e-5)]


def test_torch_2_13_rejects_eps_le_0_in_training_and_eps_lt_0_in_eval():
    # The behaviour matched below, read from torch itself (if torch changes, so must syncbn).
    assert [_torch_raises_value_error(t, e) for t, e in EPS_CASES] == [True, True, False, True, False, False]


@pytest.mark.parametrize("training,eps", EPS_CASES, ids=[f"{'train' if t else 'eval'}_eps_{e:g}" for t, e in EPS_CASES])
def test_eps_validation_matches_f_batch_norm(training, eps):
    running = (torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64))
    if _torch_raises_value_error(training, eps):
        with pytest.raises(ValueError, match="eps"):
            sync_batch_norm(_x(), *running, training=training, eps=eps)
        assert torch.equal(running[0], torch.zeros(CHANNELS, dtype=torch.float64)), "running_mean changed"
    else:
        sync_batch_norm(_x(), *running, training=training, eps=eps)


def test_module_with_eps_0_raises_in_training_like_batchnorm():
    layer = syncbn.SyncBatchNorm(CHANNELS, eps=0.0, dtype=torch.float64).train()
    with pytest.raises(ValueError, match="eps"):
        layer(_x())
    assert int(layer.num_batches_tracked) == 0


def _mixed_dtype_step(layer_follows_input: bool) -> Dict:
    """Rank 0 feeds float64, rank 1 float32: one training step, forward and backward."""
    rank = syncbn.resolve_communicator().rank
    dtype = torch.float64 if rank == 0 else torch.float32
    layer = syncbn.SyncBatchNorm(CHANNELS, dtype=dtype if layer_follows_input else torch.float32).train()
    x = _x(4, seed=rank, dtype=dtype).requires_grad_()
    y = layer(x)
    (y.double() * _x(4, seed=10 + rank, dtype=torch.float64)).sum().backward()
    return {"y": y.detach().double(), "dx": x.grad.double(), "weight_grad": layer.weight.grad.double(),
            "running_mean": layer.running_mean.double(), "running_var": layer.running_var.double()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_follows_input", [True, False], ids=["layers_match_input", "float32_layers"])
def test_float64_on_one_rank_float32_on_another_is_harmless(rank_pool, backend, layer_follows_input):
    # Both payloads are fp64 whatever the input dtype, so the ranks' statistics merge exactly and
    # each rank normalizes in its own dtype: every rank equals float64 BatchNorm on the global
    # batch to its own dtype's precision (fp32: 1e-5 for values of order 1).
    results = rank_pool(2, backend).run(_mixed_dtype_step, layer_follows_input)
    x = torch.cat([_x(4, seed=r, dtype=torch.float64) for r in range(2)]).requires_grad_()
    reference = torch.nn.BatchNorm1d(CHANNELS).double()
    y = reference(x)
    (y * torch.cat([_x(4, seed=10 + r, dtype=torch.float64) for r in range(2)])).sum().backward()
    for rank, result in enumerate(results):
        rows = slice(4 * rank, 4 * rank + 4)
        for name, actual, expected in (("y", result["y"], y.detach()[rows]), ("dx", result["dx"], x.grad[rows]),
                                       ("running_mean", result["running_mean"], reference.running_mean),
                                       ("running_var", result["running_var"], reference.running_var)):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
    total_weight_grad = results[0]["weight_grad"] + results[1]["weight_grad"]
    torch.testing.assert_close(total_weight_grad, reference.weight.grad, rtol=1e-5, atol=1e-5)


# How rank 1's running_mean departs from rank 0's (a checkpoint loaded on one rank only, buffers
# not broadcast): (channels, running_mean on both ranks, the change on rank 1, data offset).
DISAGREEMENTS = {
    "offset": (CHANNELS, lambda mean: mean, lambda mean: mean + 0.5, 1.0),
    # The same values in another order, or negated: |running_mean|^2 is the same on both ranks.
    "reversed": (CHANNELS, lambda mean: mean + torch.arange(1.0, 1.0 + CHANNELS, dtype=mean.dtype),
                 lambda mean: mean.flip(0), 2.0),
    "negated": (CHANNELS, lambda mean: mean + torch.arange(1.0, 1.0 + CHANNELS, dtype=mean.dtype),
                lambda mean: -mean, 2.0),
    # One channel among 63 near 30: 0 on rank 0, 0.3 on rank 1.
    "one_channel": (64, lambda mean: mean.fill_(30.0).index_fill_(0, torch.tensor([0]), 0.0),
                    lambda mean: mean.index_fill(0, torch.tensor([0]), 0.3), 30.0),
}


def _step_with_rank_running_mean(case: str) -> Dict:
    """One training step of a layer whose running_mean differs on rank 1 (DISAGREEMENTS[case]);
    what the rank raised and whether its statistics changed."""
    channels, shared, on_rank_1, data_offset = DISAGREEMENTS[case]
    rank = syncbn.resolve_communicator().rank
    layer = syncbn.SyncBatchNorm(channels, dtype=torch.float64).train()
    with torch.no_grad():
        layer.running_mean.copy_(shared(layer.running_mean.clone()))
        if rank == 1:
            layer.running_mean.copy_(on_rank_1(layer.running_mean.clone()))
    before = layer.running_mean.clone(), layer.running_var.clone()
    generator = torch.Generator().manual_seed(rank)
    error = None
    try:
        layer(torch.randn(4, channels, 3, generator=generator, dtype=torch.float64) + data_offset)
    except ValueError as raised:
        error = str(raised)
    return {"error": error, "unchanged": torch.equal(layer.running_mean, before[0])
            and torch.equal(layer.running_var, before[1])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_running_means_that_differ_across_ranks_raise_on_every_rank_before_stats_change(rank_pool, backend,
                                                                                       case):
    # The running mean is the shift every rank's sums are taken about: merged about different
    # shifts, the statistics would be silently wrong. Checked per channel, so a permutation, a
    # sign flip or one channel among large ones is caught as surely as an offset.
    results = rank_pool(2, backend).run(_step_with_rank_running_mean, case)
    for rank, result in enumerate(results):
        assert result["error"] is not None and "running_mean differs across ranks" in result["error"], (
            f"rank {rank}: {result['error']}")
        assert "SyncBatchNorm" in result["error"], f"rank {rank}: the error does not name the layer"
        if case == "one_channel":
            assert "in channel(s) 0;" in result["error"], f"rank {rank}: {result['error']}"
        assert result["unchanged"], f"rank {rank}: running statistics changed"


def _mixed_dtype_steps(steps: int) -> Dict:
    rank = syncbn.resolve_communicator().rank
    dtype = torch.float64 if rank == 0 else torch.float32
    layer = syncbn.SyncBatchNorm(CHANNELS, dtype=dtype).train()
    for step in range(steps):
        layer(_x(4, seed=10 * step + rank, dtype=dtype) * 3 + 100)
    return {"running_mean": layer.running_mean.double()}


def test_running_means_that_differ_only_by_their_dtype_rounding_train_on(rank_pool):
    # fp64 running stats on one rank, fp32 on the other: after a step they differ by fp32
    # rounding (about 2^-24 of the mean), which the shift check must accept.
    results = rank_pool(2, "gloo").run(_mixed_dtype_steps, 4)
    assert not torch.equal(results[0]["running_mean"], results[1]["running_mean"]), (
        "the ranks' running means are bitwise equal: this case checks nothing")
    torch.testing.assert_close(results[0]["running_mean"], results[1]["running_mean"], rtol=1e-6, atol=0)


# --- the native backend's C++ autograd node (issue 26) -------------------------------------------

# name: (shape, x's layout, dtype, parameters, dy in another layout than x, x wants a gradient,
# the data's mean: 1e5 from a running mean of 0 takes the forward's second merge, about the mean,
# as fp64 does wherever the mean is further from the running mean than a standard deviation)
NODE_CASES = {
    "channels_last fp32, weight and bias": ((2, 64, 7, 7), torch.channels_last, torch.float32, "both", False, True,
                                            40.0),
    "channels_last fp32, dy contiguous": ((2, 16, 5, 5), torch.channels_last, torch.float32, "both", True, True, 40.0),
    "contiguous fp64, no parameters": ((4, 8, 3, 3), torch.contiguous_format, torch.float64, "none", False, True,
                                       40.0),
    "2-D fp32, bias only": ((5, 6), torch.contiguous_format, torch.float32, "bias", False, True, 40.0),
    "channels_last_3d bf16, weight only": ((2, 4, 3, 2, 2), torch.channels_last_3d, torch.bfloat16, "weight",
                                           False, True, 40.0),
    "fp16 1x1": ((2, 64, 1, 1), torch.contiguous_format, torch.float16, "both", False, True, 40.0),
    "x without a gradient": ((3, 8, 4, 4), torch.contiguous_format, torch.float32, "both", False, False, 40.0),
    "fp32 far from the running mean": ((4, 8, 3, 3), torch.contiguous_format, torch.float32, "both", False, True,
                                       1e5),
}


def _node_case(case: str):
    """(x, dy, weight, bias, wanted inputs) of NODE_CASES[case]: values far from 0 with an outlier
    first, parameters in fp32 (fp64 for fp64 input), as a model's."""
    shape, layout, dtype, parameters, dy_elsewhere, x_wanted, mean = NODE_CASES[case]
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * 3 + mean
    values.view(-1)[0] = 10 * mean
    x = values.to(dtype).contiguous(memory_format=layout).requires_grad_(x_wanted)
    dy = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    dy = dy.contiguous() if dy_elsewhere else dy.contiguous(memory_format=layout)
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    weight = torch.linspace(0.5, 2.0, channels, dtype=parameter_dtype).requires_grad_()
    bias = torch.linspace(-1.0, 1.0, channels, dtype=parameter_dtype).requires_grad_()
    weight = weight if parameters in ("both", "weight") else None
    bias = bias if parameters in ("both", "bias") else None
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    return x, dy, weight, bias, wanted


def _step_through(apply, case: str, stand_in, create_graph: bool = False) -> Dict:
    """One training step of NODE_CASES[case] through ``apply`` (sync_batch_norm's last call)."""
    x, dy, weight, bias, wanted = _node_case(case)
    channels = x.shape[1]
    running_mean = torch.zeros(channels, dtype=weight.dtype if weight is not None else torch.float32)
    running_var, tracked = torch.ones_like(running_mean), torch.zeros((), dtype=torch.long)
    comm_key, _ = syncbn.functional.group_of(stand_in)
    calls = stand_in.calls
    y = apply(x, weight, bias, running_mean, running_var, tracked, 0.1, 1e-5, comm_key, "node case", False, False)
    grads = torch.autograd.grad(y, wanted, dy, create_graph=create_graph)
    result = {"node": y.grad_fn.name(), "y": y.detach(), "running_mean": running_mean,
              "running_var": running_var, "tracked": tracked, "grads": [g.detach() for g in grads],
              "all-reduces": stand_in.calls - calls}
    if create_graph:  # second order: of the gradients' squares, to every input that wanted a gradient
        total = sum((g.double() ** 2).sum() for g in grads)
        # None: the gradients are no function of that input (the parameters' alone, without x's)
        second = torch.autograd.grad(total, wanted, allow_unused=True) if total.requires_grad else ()
        result["second"] = [torch.zeros(()) if g is None else g for g in second]
    return result


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double_backward"])
@pytest.mark.parametrize("case", list(NODE_CASES))
def test_the_native_node_computes_bitwise_what_the_python_function_computes(case, create_graph):
    """Eager CPU input on the native kernels takes the C++ node (syncbn_native::synchronized_normalize);
    its output, gradients (second order too) and running statistics are the Python Function's,
    which the other backends take and which the oracle tests check against float64 BatchNorm."""
    if syncbn.kernels.for_input(_node_case(case)[0]) is not syncbn.kernels.native:
        pytest.skip("the native kernels are off or failed to build")
    stand_in = TwoIdenticalRanks()
    via_node = _step_through(syncbn.functional._native_layer, case, stand_in, create_graph)
    via_function = _step_through(syncbn.functional._SyncBatchNorm.apply, case, stand_in, create_graph)
    assert "SynchronizedNormalize" in via_node["node"], via_node["node"]
    x, _, _, _, wanted = _node_case(case)
    assert len(via_node["grads"]) == len(wanted)
    assert via_node["all-reduces"] == via_function["all-reduces"], (via_node["all-reduces"], via_function["all-reduces"])
    if NODE_CASES[case][-1] > 1e4 and not create_graph:  # two merges, then the backward's all-reduce
        assert via_node["all-reduces"] == 3, via_node["all-reduces"]
    for name in ("y", "running_mean", "running_var", "tracked", "grads") + (("second",) if create_graph else ()):
        expected, actual = via_function[name], via_node[name]
        for a, e in zip(actual, expected) if isinstance(expected, (list, tuple)) else [(actual, expected)]:
            assert a.dtype == e.dtype and a.stride() == e.stride(), name
            assert torch.equal(a, e), f"{case}: {name} differs between the node and the Python Function"


def test_sync_batch_norm_on_native_cpu_input_takes_the_node_and_w_1_takes_batchnorm():
    layer = syncbn.SyncBatchNorm(CHANNELS, process_group=TwoIdenticalRanks())
    x = _x(dtype=torch.float32).requires_grad_()
    expected = "SynchronizedNormalize" if syncbn.kernels.for_input(x) is syncbn.kernels.native else "_SyncBatchNorm"
    assert expected in layer(x).grad_fn.name()
    assert "NativeBatchNorm" in syncbn.SyncBatchNorm(CHANNELS, process_group=None)(x).grad_fn.name()


class _FailsOnCall(TwoIdenticalRanks):
    """A stand-in whose all-reduce number ``failing`` (0: the forward's, 1: the backward's) fails,
    as a dead peer's would."""

    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = failing

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.calls == self.failing:
            raise RuntimeError("peer rank 1 closed the connection")
        return super().all_reduce_sum_(tensor)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_failed_all_reduce_reaches_the_caller_as_collective_error_naming_the_layer(direction):
    # Raised in Python inside the native operator or node, it must come out as itself.
    layer = syncbn.SyncBatchNorm(CHANNELS, process_group=_FailsOnCall(["forward", "backward"].index(direction)),
                                 name="stem.bn")
    x = _x(dtype=torch.float32).requires_grad_()
    with pytest.raises(syncbn.CollectiveError, match=f"{direction} all-reduce of SyncBatchNorm.*'stem.bn'.*closed"):
        layer(x).sum().backward()
    assert layer.num_batches_tracked.item() == (0 if direction == "forward" else 1)
