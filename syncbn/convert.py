"""Whole-model conversion between BatchNorm and SyncBatchNorm, both ways.

Conversion moves the very parameter and buffer tensors into the new module, so weights,
running statistics, num_batches_tracked, requires_grad, device and dtype are kept, along
with the training flag; the class it replaced is recorded so that
:func:`revert_sync_batchnorm` can restore it (for export or single-device use).

Conversion never changes what a model computes. A BatchNorm subclass whose ``forward`` is
not the stock one (timm's BatchNormAct2d also applies an activation and dropout) cannot be
replaced by a plain SyncBatchNorm: it is refused with an error naming it, unless a
converter for its exact class was registered with :func:`register_converter`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .module import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm", "register_converter",
           "register_reverter"]

_CLASS_BY_INPUT_DIM: Dict[int, Type[_BatchNorm]] = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}

# The forwards a plain SyncBatchNorm reproduces: BatchNorm1d/2d/3d and their Lazy forms
# inherit _BatchNorm.forward; torch.nn.SyncBatchNorm computes the same function.
_STOCK_FORWARDS = (_BatchNorm.forward, torch.nn.SyncBatchNorm.forward)

Converter = Callable[[_BatchNorm, Any, str], torch.nn.Module]
Reverter = Callable[[torch.nn.Module, str], torch.nn.Module]
RevertCheck = Callable[[torch.nn.Module, str], None]
# Keyed by the exact class's "module.QualName": a subclass of a registered class may change
# its forward again, and a name lets syncbn register a converter for a class of an optional
# package (timm's BatchNormAct2d) without importing that package.
_CONVERTERS: Dict[str, Converter] = {}
_REVERTERS: Dict[str, Reverter] = {}
_REVERT_CHECKS: Dict[str, RevertCheck] = {}


def _class_key(cls: Union[type, str]) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_converter(batchnorm_class: Union[type, str], converter: Converter) -> None:
    """Make :func:`convert_sync_batchnorm` turn ``batchnorm_class`` layers into ``converter(layer,
    process_group, path)``, a synchronized module computing the same function.

    ``batchnorm_class``: the class, or its ``"module.QualName"`` (e.g.
    ``"timm.layers.norm_act.BatchNormAct2d"``), matched exactly, not for subclasses. Needed for
    a BatchNorm subclass with its own forward (an activated BatchNorm, say), which conversion
    otherwise refuses. The converter's children are not converted further.
    """
    _CONVERTERS[_class_key(batchnorm_class)] = converter


def register_reverter(sync_class: Union[type, str], reverter: Reverter,
                      check: Optional[RevertCheck] = None) -> None:
    """Make :func:`revert_sync_batchnorm` turn ``sync_class`` layers (a SyncBatchNorm subclass with
    its own forward, or a module that stands in for one) into ``reverter(layer, path)``; such
    SyncBatchNorm subclasses are refused otherwise. ``check(layer, path)``, if given, raises
    for a layer that cannot be reverted, before anything is replaced."""
    _REVERTERS[_class_key(sync_class)] = reverter
    if check is not None:
        _REVERT_CHECKS[_class_key(sync_class)] = check


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


def _label(module: torch.nn.Module, path: str) -> str:
    return f"'{path}' ({type(module).__module__}.{type(module).__qualname__})" if path else \
        f"the top-level {type(module).__module__}.{type(module).__qualname__}"


def _refusal(function: str, module: torch.nn.Module, path: str, replacement: str,
             register: str) -> ValueError:
    return ValueError(
        f"{function}: {_label(module, path)} is a BatchNorm subclass with its own forward "
        f"(it may apply an activation or dropout too), which a plain {replacement} would "
        f"silently drop; register a layer that computes the same with syncbn.convert.{register}"
    )


def _check_convertible(model: torch.nn.Module) -> None:
    """Raise for the first layer conversion cannot keep, before anything is replaced."""
    for path, module in model.named_modules():
        if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
            raise ValueError(
                f"convert_sync_batchnorm: '{path or type(module).__name__}' is a lazy BatchNorm "
                "whose channel count is not known yet; run one forward pass before converting"
            )
        if (isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm)
                and _class_key(type(module)) not in _CONVERTERS
                and type(module).forward not in _STOCK_FORWARDS):
            raise _refusal("convert_sync_batchnorm", module, path, "SyncBatchNorm",
                           "register_converter")


def _convert(module: torch.nn.Module, process_group: Any, path: str) -> torch.nn.Module:
    converter = _CONVERTERS.get(_class_key(type(module)))
    if converter is not None:
        return converter(module, process_group, path)
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
    in the model, so errors name the layer. A BatchNorm subclass with its own forward raises
    ``ValueError`` naming its path and class, unless a converter is registered for it.
    Modules that are not BatchNorm subclasses (FrozenBatchNorm2d, say) are left alone.
    Nothing is replaced when a layer is refused.
    """
    # syncbn's package loads its modules on first use: activated registers the converter of
    # timm's BatchNormAct2d, which must be known before any layer is checked.
    from . import activated  # noqa: F401

    _check_convertible(module)
    return _convert(module, process_group, "")


def _revert_class(module: SyncBatchNorm, path: str) -> Type[_BatchNorm]:
    original: Optional[Type[_BatchNorm]] = getattr(module, "original_class", None)
    # torch.nn.SyncBatchNorm refuses CPU input and a group-less process, the two uses
    # reverting exists for, so a layer that came from it becomes BatchNorm1d/2d/3d.
    if original is not None and original is not torch.nn.SyncBatchNorm:
        return original
    input_dim = getattr(module, "_last_input_dim", None)
    if input_dim in _CLASS_BY_INPUT_DIM:
        return _CLASS_BY_INPUT_DIM[input_dim]
    origin = ("was converted from torch.nn.SyncBatchNorm" if original is not None
              else "was not made by convert_sync_batchnorm")
    raise ValueError(
        f"revert_sync_batchnorm: '{path or module.layer_name}' {origin} and has seen no input, "
        "so its BatchNorm class (1d, 2d or 3d) is unknown; run one forward pass first or "
        "convert it from a BatchNorm1d/2d/3d"
    )


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every syncbn.SyncBatchNorm by the BatchNorm class it was converted from.

    Layers converted from torch.nn.SyncBatchNorm, and layers created directly as
    SyncBatchNorm, revert to BatchNorm1d/2d/3d by the dimensionality of the last input they saw.
    SyncBatchNormAct layers fused by :func:`syncbn.convert_sync_batchnorm_act` become that
    plain BatchNorm again, and the activation goes back into its slot; those converted from
    timm's BatchNormAct2d become that module; those built directly are left as they are.
    Every layer is checked first: nothing is replaced when a layer cannot be reverted.
    """
    _check_revertible(module)
    return _revert(module, "")


def _check_revertible(model: torch.nn.Module) -> None:
    """Raise for the first layer reverting cannot keep, before anything is replaced."""
    for path, module in model.named_modules():
        key = _class_key(type(module))
        if key in _REVERT_CHECKS:
            _REVERT_CHECKS[key](module, path)
        if not isinstance(module, SyncBatchNorm) or key in _REVERTERS:
            continue
        if type(module).forward is not SyncBatchNorm.forward:
            raise _refusal("revert_sync_batchnorm", module, path, "BatchNorm", "register_reverter")
        _revert_class(module, path)


def _revert(module: torch.nn.Module, path: str) -> torch.nn.Module:
    reverter = _REVERTERS.get(_class_key(type(module)))
    if reverter is not None:
        return reverter(module, path)
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
