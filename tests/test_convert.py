"""convert_sync_batchnorm / revert_sync_batchnorm keep every piece of state, both ways."""
from __future__ import annotations

import copy

import pytest
import torch

import syncbn
from syncbn.comm import SingleProcessCommunicator


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3),
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=None)),
        torch.nn.BatchNorm3d(5, affine=False, eps=1e-3),
        torch.nn.SyncBatchNorm(6, track_running_stats=False),
        torch.nn.InstanceNorm2d(4),
    ).double()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.uniform_()
            module.running_var.uniform_(1, 2)
            module.num_batches_tracked.fill_(7)
    model[1].weight.requires_grad_(False)
    model[2].train(False)
    return model


def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_convert_replaces_every_batchnorm_and_keeps_state_flags_and_group():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group = SingleProcessCommunicator()
    converted = syncbn.convert_sync_batchnorm(model, process_group=group)
    layers = _norm_layers(converted)
    assert len(layers) == 4 and all(type(m) is syncbn.SyncBatchNorm for m in layers)
    assert all(m.process_group is group for m in layers)
    assert not isinstance(converted[5], syncbn.SyncBatchNorm)  # InstanceNorm is not BatchNorm
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert converted[1].weight.requires_grad is False and converted[1].bias.requires_grad is True
    assert converted[2][1].training is False and converted[1].training is True
    assert converted[2][1].momentum is None and converted[3].eps == 1e-3 and not converted[3].affine
    assert converted[1].name == "1" and converted[2][1].name == "2.1"


def test_revert_restores_the_original_classes_and_state():
    model = _model()
    classes = [type(m) for m in _norm_layers(model)]
    classes[3] = torch.nn.BatchNorm2d  # from torch.nn.SyncBatchNorm: by the dims it saw
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = syncbn.convert_sync_batchnorm(model)
    converted[4](torch.randn(2, 6, 3, 3, dtype=torch.double))  # no running stats: state unchanged
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert [type(m) for m in _norm_layers(reverted)] == classes
    after = reverted.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert reverted[1].weight.requires_grad is False and reverted[2][1].training is False


def test_converted_model_computes_what_the_original_computes():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).double()
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model))
    x = torch.randn(4, 2, 6, 6, dtype=torch.double)
    torch.testing.assert_close(converted(x), model(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(converted[1].running_var, model[1].running_var, atol=1e-12, rtol=1e-12)


def test_top_level_batchnorm_is_converted_and_returned():
    converted = syncbn.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(converted) is syncbn.SyncBatchNorm
    assert type(syncbn.revert_sync_batchnorm(converted)) is torch.nn.BatchNorm2d


@pytest.mark.parametrize("shape, cls", [((2, 3), torch.nn.BatchNorm1d), ((2, 3, 4, 4), torch.nn.BatchNorm2d),
                                        ((2, 3, 2, 2, 2), torch.nn.BatchNorm3d)])
def test_directly_built_layer_reverts_by_the_dims_it_saw(shape, cls):
    layer = syncbn.SyncBatchNorm(3)
    layer(torch.randn(*shape))
    assert type(syncbn.revert_sync_batchnorm(layer)) is cls


def test_revert_of_an_unused_directly_built_layer_explains_what_is_missing():
    with pytest.raises(ValueError, match="run one forward pass"):
        syncbn.revert_sync_batchnorm(syncbn.SyncBatchNorm(3))


def test_lazy_batchnorm_must_be_initialized_before_conversion():
    with pytest.raises(ValueError, match="lazy BatchNorm"):
        syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))


def test_classmethod_spelling_converts_like_the_function():
    group = SingleProcessCommunicator()
    converted = syncbn.SyncBatchNorm.convert_sync_batchnorm(_model(), process_group=group)
    layers = _norm_layers(converted)
    assert len(layers) == 4 and all(type(m) is syncbn.SyncBatchNorm for m in layers)
    assert all(m.process_group is group for m in layers)
    assert type(syncbn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(2))) is syncbn.SyncBatchNorm


@pytest.mark.parametrize("shape, cls", [((4, 3), torch.nn.BatchNorm1d), ((4, 3, 5), torch.nn.BatchNorm1d),
                                        ((4, 3, 2, 2), torch.nn.BatchNorm2d),
                                        ((4, 3, 2, 2, 2), torch.nn.BatchNorm3d)])
def test_layer_from_torch_syncbatchnorm_reverts_to_a_batchnorm_that_runs_on_cpu(shape, cls):
    torch_sync = torch.nn.SyncBatchNorm(3).double()
    reference = cls(3).double()
    reference.load_state_dict(torch_sync.state_dict())
    x = torch.randn(*shape, dtype=torch.double)
    converted = syncbn.convert_sync_batchnorm(torch_sync)
    converted(x)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted) is cls
    reference(x)
    torch.testing.assert_close(reverted.running_var, reference.running_var, rtol=1e-12, atol=1e-12)
    # The reverted layer trains on CPU without a group, which torch.nn.SyncBatchNorm refuses.
    torch.testing.assert_close(reverted(x), reference(x), rtol=1e-12, atol=1e-12)


def test_layer_from_torch_syncbatchnorm_that_saw_no_input_is_not_guessed():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match=r"'1' was converted from torch.nn.SyncBatchNorm .*run one forward"):
        syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model))


# --- state_dict interchange with torch's classes ---------------------------------------

def _net(norm: type) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), norm(3), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 4, 1), norm(4)).double()


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    for step in range(3):
        model(torch.randn(5, 2, 6, 6, dtype=torch.double, generator=torch.Generator().manual_seed(step)))
    return model


@pytest.mark.parametrize("torch_class", [torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm])
def test_torch_checkpoint_loads_strictly_into_a_syncbn_model_and_computes_the_same(torch_class):
    source = _trained(_net(torch.nn.BatchNorm2d))  # trained on CPU, where torch's SyncBatchNorm cannot
    checkpoint = source.state_dict()
    if torch_class is torch.nn.SyncBatchNorm:
        holder = _net(torch.nn.SyncBatchNorm)
        holder.load_state_dict(checkpoint)  # a torch.nn.SyncBatchNorm model's own checkpoint
        checkpoint = holder.state_dict()
    target = _net(syncbn.SyncBatchNorm)
    target.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in checkpoint.items())
    x = torch.randn(3, 2, 6, 6, dtype=torch.double)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("torch_class", [torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm])
def test_syncbn_checkpoint_loads_strictly_into_a_torch_model_and_computes_the_same(torch_class):
    source = _trained(_net(syncbn.SyncBatchNorm))
    target = _net(torch_class)
    target.load_state_dict(source.state_dict(), strict=True)
    assert target.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    x = torch.randn(3, 2, 6, 6, dtype=torch.double)
    # torch.nn.SyncBatchNorm in eval mode runs on CPU: it is plain BatchNorm with running stats.
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=1e-12, atol=1e-12)


def test_checkpoint_without_num_batches_tracked_loads_as_into_torch_batchnorm():
    old = {k: v for k, v in _trained(_net(torch.nn.BatchNorm2d)).state_dict().items()
           if not k.endswith("num_batches_tracked")}
    torch_model, syncbn_model = _net(torch.nn.BatchNorm2d), _net(syncbn.SyncBatchNorm)
    torch_model.load_state_dict(old, strict=False)
    syncbn_model.load_state_dict(old, strict=False)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(syncbn_model.state_dict()[key], value)


# --- BatchNorm subclasses: conversion never changes what a model computes ------------------

class _BatchNormRelu(torch.nn.BatchNorm2d):
    """A BatchNorm subclass whose forward also applies an activation (like timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _QuietBatchNorm2d(torch.nn.BatchNorm2d):
    """A subclass that only relaxes the input check: the stock forward, safe to convert."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def test_batchnorm_subclass_with_its_own_forward_is_refused_naming_path_and_class():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Sequential(_BatchNormRelu(2)))
    with pytest.raises(ValueError, match=r"'1\.0' \(test_convert\._BatchNormRelu\) is a BatchNorm "
                                         r"subclass with its own forward.*register_converter"):
        syncbn.convert_sync_batchnorm(model)
    # Refused before anything was replaced: no half-converted model is left behind.
    assert type(model[0]) is torch.nn.BatchNorm2d and type(model[1][0]) is _BatchNormRelu


def test_batchnorm_subclass_with_the_stock_forward_is_converted_and_reverted_to_itself():
    model = torch.nn.Sequential(_QuietBatchNorm2d(3))
    converted = syncbn.convert_sync_batchnorm(model)
    assert type(converted[0]) is syncbn.SyncBatchNorm
    assert type(syncbn.revert_sync_batchnorm(converted)[0]) is _QuietBatchNorm2d


class _SyncBatchNormRelu(syncbn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


@pytest.fixture
def relu_conversions():
    """Registers _BatchNormRelu <-> _SyncBatchNormRelu and removes the registration afterwards."""
    from syncbn import convert

    def to_sync(layer, process_group, path):
        sync = _SyncBatchNormRelu(layer.num_features, layer.eps, layer.momentum, layer.affine,
                                  layer.track_running_stats, process_group, dtype=layer.weight.dtype,
                                  name=path or None)
        sync.load_state_dict(layer.state_dict())
        return sync

    def to_plain(layer, path):
        plain = _BatchNormRelu(layer.num_features, layer.eps, layer.momentum, layer.affine,
                               layer.track_running_stats, dtype=layer.weight.dtype)
        plain.load_state_dict(layer.state_dict())
        return plain

    # One by class, one by name (as for a class of a package syncbn must not import).
    convert.register_converter(_BatchNormRelu, to_sync)
    convert.register_reverter("test_convert._SyncBatchNormRelu", to_plain)
    yield
    del convert._CONVERTERS["test_convert._BatchNormRelu"]
    del convert._REVERTERS["test_convert._SyncBatchNormRelu"]


def test_registered_converter_and_reverter_keep_what_the_subclass_computes(relu_conversions):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), _BatchNormRelu(3)).double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.double)
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model), process_group=SingleProcessCommunicator())
    assert type(converted[1]) is _SyncBatchNormRelu and converted[1].name == "1"
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is _BatchNormRelu
    torch.testing.assert_close(reverted.eval()(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_syncbatchnorm_subclass_with_its_own_forward_is_not_reverted_to_plain_batchnorm():
    model = syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    model.append(_SyncBatchNormRelu(3))
    with pytest.raises(ValueError, match=r"'1' \(test_convert\._SyncBatchNormRelu\) is a BatchNorm "
                                         r"subclass.*register_reverter"):
        syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm  # nothing was reverted
