"""Double backward (issue 11): gradient penalties through SyncBatchNorm are exact.

In one process, torch.autograd.gradgradcheck (fp64, numerical second derivatives) passes for
the module and for the functional form with and without affine parameters. On 2 and 3 ranks,
over gloo and MPI, with uneven (and empty) rank batches, the second-order gradients of
L' = ||dL/dx||^2 with L = sum(y * g) for a fixed random g, with respect to x and to the weight,
equal those of float64 torch BatchNorm on the concatenated batch in one process, to 1e-8.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

import syncbn
from conftest import BACKENDS
from syncbn.functional import sync_batch_norm

CHANNELS = 3
SPATIAL = (4,)


def _gradgradcheck_input(batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, CHANNELS) + SPATIAL, generator=generator, dtype=torch.float64).requires_grad_()


def _affine(seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(CHANNELS, generator=generator, dtype=torch.float64).requires_grad_()
    return weight, bias


def test_gradgradcheck_setup_passes_for_torch_batch_norm():
    # The same inputs through F.batch_norm: a failure below is syncbn's, not the check's.
    weight, bias = _affine()

    def f(x, w, b):
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradgradcheck(f, (_gradgradcheck_input(), weight, bias))


def test_gradgradcheck_functional_with_weight_and_bias_in_one_process():
    weight, bias = _affine()

    def f(x, w, b):
        return sync_batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradgradcheck(f, (_gradgradcheck_input(), weight, bias))


def test_gradgradcheck_functional_without_affine_in_one_process():
    def f(x):
        return sync_batch_norm(x, None, None, None, None, training=True)

    assert torch.autograd.gradgradcheck(f, (_gradgradcheck_input(),))


def test_gradgradcheck_module_in_train_mode_with_running_stats_in_one_process():
    layer = syncbn.SyncBatchNorm(CHANNELS, dtype=torch.float64).train()
    weight, bias = _affine()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(f, (_gradgradcheck_input(), weight, bias))


# --- across ranks ---------------------------------------------------------------------------

def _global_batch(sizes: Tuple[int, ...], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, g) of the whole group in float64: every rank and the oracle draw the same values."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), CHANNELS) + SPATIAL
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2.0 + 0.5
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x, g


def penalty_grads(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
    """d/dx and d/dweight of ||dL/dx||^2, L = sum(layer(x) * g) (this run's share)."""
    x = x.clone().requires_grad_()
    loss = (layer(x) * g).sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    dx.square().sum().backward()
    return {"x": x.grad.detach(), "weight": layer.weight.grad.detach().clone()}


def _layer(cls, seed: int) -> torch.nn.Module:
    layer = cls(CHANNELS, dtype=torch.float64).train()
    weight, bias = _affine(seed)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _rank_penalty_grads(sizes: Tuple[int, ...], seed: int) -> Dict[str, torch.Tensor]:
    rank = syncbn.resolve_communicator().rank
    x, g = _global_batch(sizes, seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    return penalty_grads(_layer(syncbn.SyncBatchNorm, seed), x[rows], g[rows])


LAYOUTS = {"two_ranks_2_5": (2, 5), "three_ranks_3_1_4": (3, 1, 4), "three_ranks_2_0_3": (2, 0, 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_second_order_grads_on_uneven_ranks_equal_float64_batchnorm(rank_pool, backend, sizes):
    seed = 7
    results = rank_pool(len(sizes), backend).run(_rank_penalty_grads, sizes, seed)
    x, g = _global_batch(sizes, seed)
    expected = penalty_grads(_layer(torch.nn.BatchNorm1d, seed), x, g)
    # Same fp64 arithmetic up to summation order: 1e-8 leaves ~7 digits of slack at O(1) values.
    torch.testing.assert_close(torch.cat([r["x"] for r in results]), expected["x"], rtol=1e-8, atol=1e-8,
                               msg=lambda m: f"d/dx of ||dL/dx||^2: {m}")
    torch.testing.assert_close(sum(r["weight"] for r in results), expected["weight"], rtol=1e-8, atol=1e-8,
                               msg=lambda m: f"d/dweight of ||dL/dx||^2: {m}")
