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
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reverted = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model))
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
