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
