"""Whole-model conversion between BatchNorm and SyncBatchNorm, both ways.

Conversion moves the very parameter and buffer tensors into the new module, so weights,
running statistics, num_batches_tracked, requires_grad, device and dtype are kept, along
with the training flag; the class it replaced is recorded so that
:func:`revert_sync_batchnorm` can restore it exactly (for export or single-device use).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

import torch
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .module import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

_CLASS_BY_INPUT_DIM: Dict[int, Type[_BatchNorm]] = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


def _move_state(source: _BatchNorm, target: _BatchNorm) -> None:
    """Give ``target`` the tensors, flags and extra attributes of ``source``."""
    with torch.no_grad():
        if source.affine:
            target.weight = source.weight
            target.bias = source.bias
        if source.track_running_stats:
            target.running_mean = source.running_mean
            target.running_var = source.running_var
            target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


def _convert(module: torch.nn.Module, process_group: Any, path: str) -> torch.nn.Module:
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"convert_sync_batchnorm: '{path or type(module).__name__}' is a lazy BatchNorm whose "
            "channel count is not known yet; run one forward pass before converting"
        )
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        module.name = module.name or path or None
        converted: torch.nn.Module = module
    elif isinstance(module, _BatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group, name=path or None)
        _move_state(module, converted)
        converted.original_class = type(module)
    else:
        converted = module
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        setattr(converted, child_name, _convert(child, process_group, child_path))
    return converted


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """Replace every BatchNorm (1d/2d/3d, torch.nn.SyncBatchNorm, subclasses) in ``module``.

    Returns the converted module (``module`` itself unless it is a BatchNorm). Existing
    syncbn.SyncBatchNorm layers get ``process_group``. Each new layer's ``name`` is its path
    in the model, so errors name the layer.
    """
    return _convert(module, process_group, "")


def _revert_class(module: SyncBatchNorm, path: str) -> Type[_BatchNorm]:
    original: Optional[Type[_BatchNorm]] = getattr(module, "original_class", None)
    if original is not None:
        return original
    input_dim = getattr(module, "_last_input_dim", None)
    if input_dim in _CLASS_BY_INPUT_DIM:
        return _CLASS_BY_INPUT_DIM[input_dim]
    raise ValueError(
        f"revert_sync_batchnorm: '{path or module.layer_name}' was not made by "
        "convert_sync_batchnorm and has seen no input, so its BatchNorm class (1d, 2d or 3d) is "
        "unknown; run one forward pass first or convert it from a BatchNorm"
    )


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every syncbn.SyncBatchNorm by the BatchNorm class it was converted from.

    Layers created directly as SyncBatchNorm revert to BatchNorm1d/2d/3d by the
    dimensionality of the last input they saw.
    """
    return _revert(module, "")


def _revert(module: torch.nn.Module, path: str) -> torch.nn.Module:
    if isinstance(module, SyncBatchNorm):
        cls = _revert_class(module, path)
        reverted: torch.nn.Module = cls(module.num_features, module.eps, module.momentum,
                                        module.affine, module.track_running_stats)
        _move_state(module, reverted)
    else:
        reverted = module
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        setattr(reverted, child_name, _revert(child, child_path))
    return reverted
