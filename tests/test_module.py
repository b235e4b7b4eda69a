"""syncbn.SyncBatchNorm in a single process: exactly BatchNorm, plus clear errors."""
from __future__ import annotations

import pytest
import torch

import syncbn
from scenarios import (BATCHNORM_BY_DIM, IdenticalPeers, Scenario, assert_matches_oracle, layout,
                       run_sync_rank)

SPATIAL = {"N,C": (), "N,C,L": (7,), "N,C,H,W": (4, 5), "N,C,D,H,W": (2, 3, 4)}


@pytest.mark.parametrize("spatial", SPATIAL.values(), ids=SPATIAL.keys())
def test_single_process_equals_float64_batchnorm_for_every_input_rank(spatial):
    scenario = Scenario(sizes=(6,), spatial=spatial, steps=3)
    assert_matches_oracle([run_sync_rank(scenario)], scenario)


@pytest.mark.parametrize("spatial", [(4, 5), (2, 3, 4)], ids=["channels_last", "channels_last_3d"])
def test_channels_last_input_equals_batchnorm_and_keeps_its_layout(spatial):
    scenario = Scenario(sizes=(4,), spatial=spatial, channels_last=True)
    record = run_sync_rank(scenario)
    assert_matches_oracle([record], scenario)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    assert all(y.is_contiguous(memory_format=fmt) for y in record.y)
    assert all(dx.is_contiguous(memory_format=fmt) for dx in record.dx)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
     dict(momentum=None, affine=False), dict(momentum=0.3)],
    ids=["cumulative_average", "no_affine", "no_running_stats", "cumulative_no_affine", "momentum_0.3"],
)
def test_options_equal_batchnorm_over_several_steps(options):
    scenario = Scenario(sizes=(5,), steps=4, **options)
    assert_matches_oracle([run_sync_rank(scenario)], scenario)


def test_large_mean_fp32_running_var_is_accurate_where_naive_sums_fail():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, 16, dtype=torch.float64) + 1e4
    expected = x.var(dim=[0, 2, 3], unbiased=True)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        layer = syncbn.SyncBatchNorm(8, momentum=1.0)
        out = layer(x.float().contiguous(memory_format=memory_format))
        relative = ((layer.running_var.double() - expected) / expected).abs().max().item()
        assert relative < 1e-3, f"{memory_format}: running_var relative error {relative}"
        assert torch.isfinite(out).all()
    naive = ((x.float() ** 2).mean([0, 2, 3]) - x.float().mean([0, 2, 3]) ** 2).double()
    assert ((naive - expected) / expected).abs().max().item() > 1e-1  # the failure we avoid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_fp32_layer_returns_input_dtype_and_fp32_statistics(dtype):
    torch.manual_seed(0)
    layer = syncbn.SyncBatchNorm(4)
    reference = torch.nn.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    xh = x.to(dtype).requires_grad_()
    y = layer(xh)
    y.float().sum().backward()
    assert y.dtype == dtype and xh.grad.dtype == dtype
    assert layer.running_mean.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    expected = reference(xh.detach().double())
    torch.testing.assert_close(y.double(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.running_var.double(), reference.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fully_half_model_trains_without_dtype_errors(dtype):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), syncbn.SyncBatchNorm(4)).to(dtype)
    x = torch.randn(2, 2, 6, 6, dtype=dtype)
    y = model(x)
    y.float().square().sum().backward()
    assert y.dtype == dtype and model[1].weight.grad.dtype == dtype
    assert torch.isfinite(model[1].running_var).all() and torch.isfinite(model[0].weight.grad).all()


def test_eval_uses_running_statistics_like_batchnorm():
    scenario = Scenario(sizes=(6,))
    layer = syncbn.SyncBatchNorm(3).double()
    reference = BATCHNORM_BY_DIM[4](3).double()
    for module in (layer, reference):
        module(scenario.global_batch(0)[0])
        module.eval()
    x = scenario.global_batch(1)[0]
    torch.testing.assert_close(layer(x), reference(x), atol=1e-12, rtol=1e-12)


def test_eval_without_running_stats_uses_batch_statistics_like_batchnorm():
    layer = syncbn.SyncBatchNorm(3, track_running_stats=False).double().eval()
    reference = torch.nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    x = Scenario(sizes=(6,)).global_batch(0)[0]
    torch.testing.assert_close(layer(x), reference(x), atol=1e-12, rtol=1e-12)


def test_single_value_per_channel_raises_like_batchnorm():
    layer = syncbn.SyncBatchNorm(3, name="head.bn")
    with pytest.raises(ValueError, match=r"head\.bn.*more than 1 value per channel"):
        layer(torch.randn(1, 3))


def test_empty_batch_returns_empty_output_and_leaves_running_stats_untouched():
    layer = syncbn.SyncBatchNorm(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.bias.grad, torch.zeros(3))


@pytest.mark.parametrize(
    "x, match",
    [(torch.randn(5), r"expected input of shape \(N, C\)"),
     (torch.randn(2, 4, 3), r"expected 3 channels in dim 1"),
     (torch.ones(2, 3, 4, dtype=torch.long), r"floating-point")],
    ids=["one_dim", "wrong_channels", "integer_dtype"],
)
def test_bad_input_raises_clear_error_naming_the_layer(x, match):
    layer = syncbn.SyncBatchNorm(3, name="encoder.bn1")
    with pytest.raises((ValueError, TypeError), match=match) as info:
        layer(x)
    assert "encoder.bn1" in str(info.value)


def test_state_dict_keys_and_constructor_match_torch_syncbatchnorm():
    ours = syncbn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, dtype=torch.float64)
    theirs = torch.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None, dtype=torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert ours.running_mean.dtype == torch.float64


def test_bias_and_options_are_keyword_only_as_readme_prints_them():
    import inspect

    parameters = inspect.signature(syncbn.SyncBatchNorm).parameters
    kinds = {name: p.kind.name for name, p in parameters.items()}
    assert [n for n, k in kinds.items() if k == "POSITIONAL_OR_KEYWORD"] == [
        "num_features", "eps", "momentum", "affine", "track_running_stats", "process_group",
        "device", "dtype"]
    keyword_only = {n for n, k in kinds.items() if k == "KEYWORD_ONLY"}
    assert keyword_only == {"bias", "name", "debug", "check_finite"}
    with pytest.raises(TypeError):
        syncbn.SyncBatchNorm(5, 1e-5, 0.1, True, True, None, None, None, "name given by position")


def test_bias_false_has_torch_s_parameters_and_keys_and_trains_like_batchnorm():
    ours = syncbn.SyncBatchNorm(3, bias=False, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, bias=False, dtype=torch.float64)
    assert ours.bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for layer in (ours, theirs):
        layer(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    # The group path (two ranks holding the same batch): BatchNorm on the batch twice.
    grouped = syncbn.SyncBatchNorm(3, bias=False, dtype=torch.float64,
                                   process_group=IdenticalPeers(2))
    grouped.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(grouped(x), theirs(torch.cat([x, x]))[:4], rtol=1e-12, atol=1e-12)
