"""``SyncBatchNormAct``: synchronized BatchNorm fused with an invertible activation.

In-place activated BatchNorm (Rota Bulo et al., CVPR 2018): the training forward computes
y = act(weight * xhat + bias) in one pass, and the autograd graph keeps only y and
per-channel vectors, not the input; in place, y is also written into the input's storage.
The backward recovers what it needs from y:

- z = act^-1(y): leaky_relu: z = y where y >= 0 else y / slope; elu: z = log(1 + y / alpha)
  where y < 0; identity: z = y;
- dz = dy * act'(z), with act' written in y: slope (leaky_relu), y + alpha (elu) where y < 0;
- xhat = (z - bias) / weight, then BatchNorm's usual backward from xhat: one all-reduce of
  [sum dz, sum dz * xhat] and dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).

An in-place layer is a memory optimisation: it never changes what a model computes. Each
training forward takes one of three paths, all with the same statistics, collectives (one
all-reduce per direction, the same payloads), running statistics, errors and state_dict keys:

- **fused, in place**: only when ``inplace=True`` and nothing can still need the input. Read
  from metadata, no device value: grad mode is on and the input was made by an op of this
  graph (not the caller's data: a leaf, or anything under ``torch.no_grad``); it is not a view;
  no autograd node saved it (an op that keeps its output for backward, such as ReLU, Sigmoid,
  Tanh, exp or any in-place op, or an earlier consumer) and no other tensor shares its memory;
  no saved-tensor hooks are active (``torch.utils.checkpoint``, offloading); no forward hook on
  this layer, no global module hook, and no forward hook on the module that produced the input
  (known when :func:`convert_sync_batchnorm_act` fused the layer). What the graph cannot show
  is a read of the input *later* in Python (``body(x) + x``): for a layer built directly that
  is the contract of ``inplace=True``, as with ``nn.ReLU(inplace=True)``; the converter only
  asks for it where the structure rules it out.
- **fused, out of place**: y in a new tensor, the input untouched; the graph still keeps y alone.
- **SyncBatchNorm, drop, then the activation** (unfused, keeps the input like the original
  modules): in evaluation, under ``torch.compile``, for an activation that is not invertible
  (ReLU, SiLU, any module), with a ``drop`` module, for fp16/bf16 input (the output's rounding,
  amplified by |bias| / |weight| in the inversion, would cost far more precision than the
  input's own rounding), with ``fuse=False``, and when a channel's |weight| is below
  1e-3 * max(1, |bias|), where the inversion loses too much (checked when the weights are on
  the host, where the read is free, or with the debug guard on).

On a device (CUDA, whose stand-in in the tests is ``meta``) without the debug guard, the layer
reads no weight back to the host: it takes the fused path, and the backward checks the same
floor per channel on the device, giving NaN gradients (dx, dweight) for a channel below it
rather than imprecise ones: loud, never silently wrong. Weights that may approach 0 (zero
initialization, strong decay) call for ``SYNCBN_DEBUG=1`` or ``fuse=False`` there.

The fused layer keeps its output for backward: changing that output in place afterwards
(``out += shortcut``) makes backward raise an error naming the layer (write
``out = out + shortcut``). Double backward (``create_graph=True``) raises in training on every
path, so whether it works never depends on the weights or the dtype; in evaluation the layer is
BatchNorm and the activation, differentiable to any order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .convert import _class_key, _move_state, register_converter, register_reverter
from .convert import _revert_class as _syncbatchnorm_revert_class
from .module import SyncBatchNorm

Tensor = torch.Tensor

__all__ = ["SyncBatchNormAct", "convert_sync_batchnorm_act", "revert_sync_batchnorm_act",
           "INVERTIBLE_ACTIVATIONS"]

INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")
# Channels whose |weight| is below this times max(1, |bias|) cannot take the fused path: the
# inversion xhat = (z - bias) / weight amplifies the output's rounding by |bias| / |weight|.
MIN_INVERTIBLE_WEIGHT = 1e-3
# Input dtypes of the fused path. In fp16/bf16 the output's rounding (2^-11, 2^-8), amplified
# by the inversion, costs dweight up to 500x the error of the unfused layer (issue 22's table).
_FUSED_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Every call into the core (functional, batchnorm_math, guard, comm) is in this block, so a
# change of the core's internals is re-pointed here alone.
from . import batchnorm_math as _bnm  # noqa: E402
from . import functional as _functional  # noqa: E402
from . import kernels as _kernels  # noqa: E402
from .guard import communicator_for, debug_enabled  # noqa: E402


class _Core:
    """The statistics, collectives and error handling of SyncBatchNorm, as this layer uses them."""

    group_of = staticmethod(_functional.group_of)
    debug_enabled = staticmethod(debug_enabled)
    kernels_for = staticmethod(_kernels.for_input)
    below_floor = staticmethod(_kernels.reference.below_floor)  # torch ops, on the weights' device
    backward_sums = staticmethod(_functional.backward_sums)

    @staticmethod
    def statistics(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], momentum: Optional[float], comm_key: int,
                   alone: bool, layer: str, debug: bool, check_finite: bool
                   ) -> Tuple[Tensor, Tensor, Tensor]:
        """(count, mean, biased var) of the group, the running statistics updated.

        A non-empty CPU batch in a group of one takes SyncBatchNorm's group-of-one route (its
        checks, num_batches_tracked and momentum factor) with the kernels' update_stats: the
        batch's statistics, the running statistics updated as torch's BatchNorm updates them, no
        collective. Otherwise the synchronized payload, as SyncBatchNorm in a group: on a device
        (update_stats is a host route: torch's kernel has no meta kernel), and for an empty
        batch, which update_stats refuses and which leaves the statistics as they are.
        """
        if alone and x.device.type == "cpu" and x.numel() != 0:
            running_mean, running_var, factor = _functional.alone_running_stats(
                x, running_mean, running_var, momentum, num_batches_tracked, layer, check_finite)
            mean, var = _Core.kernels_for(x).update_stats(x, running_mean, running_var, factor)
            return x.new_full((), _bnm.local_count(x), dtype=torch.float64), mean, var
        return _functional.group_statistics(x, running_mean, running_var, num_batches_tracked,
                                            momentum, comm_key, layer, debug, check_finite)

    @staticmethod
    def check_input(x: Tensor, channels: int, eps: float, reference: Tensor, comm_key: int,
                    layer: str, debug: bool, check_finite: bool) -> None:
        """Raise on every rank if ``x`` is invalid here (the others learn it from the payload)."""
        problem = (_functional.eps_problem(eps, True, layer)
                   or _functional.input_problem(x, channels, layer, reference))
        if problem is not None:
            _functional.report_invalid_input(communicator_for(comm_key), channels,
                                             reference.device, layer, problem, debug, check_finite)

# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inversion:
    """An invertible activation: its kernel code and parameter (slope, or ELU's alpha)."""

    code: int  # 0 identity, 1 leaky_relu, 2 elu: the kernels' ACTIVATION argument
    parameter: float = 0.0


def inversion_of(act: nn.Module) -> Optional[Inversion]:
    """How to invert ``act`` from its output, or None if it is not one this layer inverts."""
    if type(act) is nn.Identity:
        return Inversion(0)
    if type(act) is nn.LeakyReLU and act.negative_slope > 0:
        return Inversion(1, float(act.negative_slope))
    if type(act) is nn.ELU and act.alpha > 0:
        return Inversion(2, float(act.alpha))
    return None


def _activation_module(activation: Any, negative_slope: float, alpha: float) -> nn.Module:
    if isinstance(activation, nn.Module):
        return activation
    if activation == "relu":
        raise ValueError(
            "SyncBatchNormAct: activation='relu' cannot be inverted: ReLU maps every negative "
            "pre-activation to 0, yet the backward needs the normalized input at every position "
            "to compute the input gradient. Use activation='leaky_relu' with a small "
            "negative_slope (0.01, as InPlace-ABN does), or pass activation=nn.ReLU() to run "
            "ReLU out of place (no memory saving)")
    if activation == "identity":
        return nn.Identity()
    if activation == "leaky_relu":
        if not negative_slope > 0:
            raise ValueError(f"SyncBatchNormAct: leaky_relu needs negative_slope > 0 to be "
                             f"invertible, got {negative_slope}")
        return nn.LeakyReLU(negative_slope)
    if activation == "elu":
        if not alpha > 0:
            raise ValueError(f"SyncBatchNormAct: elu needs alpha > 0 to be invertible, got {alpha}")
        return nn.ELU(alpha)
    raise ValueError(f"SyncBatchNormAct: activation must be one of {INVERTIBLE_ACTIVATIONS} or an "
                     f"nn.Module, got {activation!r}")


def _any_below_floor(weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether any channel's |weight| is below the floor (read on the host)."""
    return _Core.kernels_for(weight).any_below_floor(weight, bias, MIN_INVERTIBLE_WEIGHT)


def _host_may_read(weight: Tensor, debug: bool) -> bool:
    """Whether the forward may read the weights to check the floor: where that is free (host
    weights) or asked for (the debug guard). Elsewhere the backward checks it on the device."""
    return weight.device.type == "cpu" or debug


def _nan_where_not_invertible(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The weight the inversion divides by: NaN on channels below the floor (no host read)."""
    return weight.masked_fill(_Core.below_floor(weight, bias, MIN_INVERTIBLE_WEIGHT), float("nan"))


def _double_backward_error(layer: str) -> RuntimeError:
    return RuntimeError(
        f"{layer}: SyncBatchNormAct does not support double backward (create_graph=True) in "
        "training: its fused backward recovers the input from the output and is not itself "
        "differentiable, and every path raises alike so that it never depends on the weights; "
        "use SyncBatchNorm followed by the activation instead")


class _SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps, comm_key, alone, layer, debug, check_finite, inversion, inplace,
                check_on_device):
        # Global statistics: SyncBatchNorm's (the same payload and all-reduce in a group).
        count, mean, var = _Core.statistics(x, running_mean, running_var, num_batches_tracked,
                                            momentum, comm_key, alone, layer, debug, check_finite)
        # Normalize and activate in one pass, into x's storage when in place: the graph keeps y alone.
        y = _Core.kernels_for(x).normalize_activate(x, mean, var, weight, bias, eps, inversion.code,
                                                    inversion.parameter, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, weight, bias, var, count)
        ctx.eps, ctx.comm_key, ctx.layer, ctx.debug, ctx.inversion = eps, comm_key, layer, debug, inversion
        ctx.check_on_device = check_on_device
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise _double_backward_error(ctx.layer)
        try:
            y, weight, bias, var, count = ctx.saved_tensors
        except RuntimeError as error:  # autograd's version check: name the layer and the fix
            raise RuntimeError(
                f"{ctx.layer}: its output was modified by an inplace operation after the layer "
                "(such as `out += shortcut`), but SyncBatchNormAct recovers its input from that "
                "output in backward; write `out = out + shortcut`, or use SyncBatchNorm followed "
                "by the activation") from error
        # What xhat = (z - bias) / weight divides by (NaN on the channels the backward must not
        # invert), and scales dx by. The kernels read a bias wherever there is a weight.
        inverse_weight, inverse_bias = weight, bias
        if weight is not None and ctx.check_on_device:
            inverse_weight = _nan_where_not_invertible(weight, bias)
        if weight is not None and bias is None:
            inverse_bias = torch.zeros_like(weight)
        # Local sums from the output, one all-reduce, then the input gradient, each in one pass.
        kernels, code, parameter = _Core.kernels_for(y), ctx.inversion.code, ctx.inversion.parameter
        local_sums = kernels.activated_backward_payload(dy, y, inverse_weight, inverse_bias, code,
                                                        parameter)
        grad_weight, grad_bias, global_sums = _Core.backward_sums(ctx, local_sums, weight, bias)
        grad_x = None
        if global_sums is not None:
            grad_x = kernels.activated_input_grad(dy, y, var, inverse_weight, inverse_bias, ctx.eps,
                                                  code, parameter, global_sums, count)
        return (grad_x, grad_weight, grad_bias) + (None,) * (len(ctx.needs_input_grad) - 3)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the input of the unfused path; its backward refuses create_graph=True."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise _double_backward_error(ctx.layer)
        return grad, None


# ----- when the input may take the output --------------------------------------------------

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _nothing_else_holds(x: Tensor) -> bool:
    """Whether no autograd node saved x and no other tensor shares its memory (metadata only).

    A node that saved x as its input holds x's TensorImpl (its use count); one that saved x as
    its output (ReLU, Sigmoid, Tanh, exp, in-place ops), or a view, shares x's storage.
    """
    if _storage_use_count is None or not hasattr(x, "_use_count"):
        return False  # a torch without these counters: assume something does
    # untyped_storage() itself holds one more reference to the storage while it is counted.
    return x._use_count() == 1 and _storage_use_count(x.untyped_storage()._cdata) == 2


def _hooks_see(layer: nn.Module) -> bool:
    """Whether a module hook may read the layer's input after the layer has run."""
    producer = layer.producer[0] if layer.producer is not None else None
    return bool(layer._forward_hooks or layer._forward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or (producer is not None and producer._forward_hooks))


def _inplace_is_safe(x: Tensor) -> bool:
    """Whether nothing autograd or memory shows can still need x (see the module docstring)."""
    return (torch.is_grad_enabled() and x.grad_fn is not None and not x._is_view()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            and _nothing_else_holds(x))


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm, an optional drop module, then an activation; fused when it can be.

    ``activation``: "identity", "leaky_relu" (slope ``negative_slope``) or "elu" (``alpha``), or
    the module itself: nn.Identity, nn.LeakyReLU and nn.ELU run fused, any other module
    (nn.ReLU(), nn.SiLU(), ...) after SyncBatchNorm, out of place. Fused, the autograd graph
    keeps the output only (about half the memory of SyncBatchNorm + activation); with
    ``inplace=True`` the output is also written into the input's storage where nothing can
    still need the input. ``drop``: a module between the norm and the activation, as in timm's
    BatchNormAct2d (it makes the layer unfused in training). ``fuse=False``: always SyncBatchNorm,
    drop, then the activation. Children ``act`` and ``drop`` show in the model's printout;
    parameters, buffers and state_dict keys are SyncBatchNorm's plus those of ``act`` and
    ``drop``, so a BatchNorm (or BatchNormAct2d) checkpoint loads unchanged. When the layer runs
    in place, out of place or unfused is described in :mod:`syncbn.activated`: the same values
    and gradients every way.
    """

    # The module whose output feeds this layer, when a conversion knows it (in a tuple, so that
    # it is not registered as a child): its forward hooks see the input, so they block in place.
    producer: Optional[Tuple[nn.Module]] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        activation: Any = "leaky_relu",
        negative_slope: float = 0.01,
        inplace: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        alpha: float = 1.0,
        drop: Optional[nn.Module] = None,
        fuse: bool = True,
        name: Optional[str] = None,
        debug: Optional[bool] = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype, bias=bias, name=name, debug=debug,
                         check_finite=check_finite)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = _activation_module(activation, negative_slope, alpha)
        self.inplace = inplace
        self.fuse = fuse

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inplace={self.inplace}, fuse={self.fuse}"

    def _unfused(self, input: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            input = _NoDoubleBackward.apply(input, self.layer_name)
        return self.act(self.drop(super().forward(input)))

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or torch.compiler.is_compiling():
            return self._unfused(input)
        inversion = inversion_of(self.act)
        if (not self.fuse or inversion is None or type(self.drop) is not nn.Identity
                or input.dtype not in _FUSED_DTYPES):
            return self._unfused(input)
        debug = _Core.debug_enabled(self.debug)
        weight = self.weight
        check_on_host = weight is not None and _host_may_read(weight, debug)
        if check_on_host and _any_below_floor(weight, self.bias):
            return self._unfused(input)
        if input.dim() != self._last_input_dim:  # for revert; nn.Module.__setattr__ is slow
            self._last_input_dim = input.dim()
        comm_key, group_size = _Core.group_of(self.process_group)
        reference = weight if weight is not None else self.running_mean
        if reference is None:  # affine=False without running stats: nothing names the device
            reference = input
        _Core.check_input(input, self.num_features, self.eps, reference, comm_key,
                          self.layer_name, debug, self.check_finite)
        track = self.track_running_stats
        return _SyncBatchNormActFunction.apply(
            input, weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked if track else None, self.momentum, self.eps, comm_key,
            group_size == 1, self.layer_name, debug, self.check_finite, inversion,
            self.inplace and _inplace_is_safe(input) and not _hooks_see(self),
            weight is not None and not check_on_host)


# ----- conversion: BatchNorm -> activation pairs in nn.Sequential, and back -----------------

class FusedActivation(nn.Identity):
    """Holds the place of an activation fused into the SyncBatchNormAct before it.

    Keeping the slot keeps the indices, hence the state_dict keys, of the later modules; the
    activation itself (a child of the fused layer) is remembered for revert.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = (activation,)  # not a child: the fused layer owns it

    def extra_repr(self) -> str:
        return f"fused: {self.activation[0]}"


_FUSABLE_ACTIVATIONS: Tuple[Type[nn.Module], ...] = (nn.LeakyReLU, nn.ELU, nn.Identity)
# BatchNorms with the stock forward, exactly these classes: a subclass may compute more.
_FUSABLE_NORMS: Tuple[Type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                               nn.SyncBatchNorm, SyncBatchNorm)
# Producers whose output, inside a Sequential, goes to the next module alone, and whose
# backward keeps their input, not their output: the fused layer may write over that output.
_FRESH_OUTPUT_PRODUCERS: Tuple[Type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d)
# timm's BatchNormAct2d (efficientnet, mobilenetv3, regnet, cspdarknet...): BatchNorm, drop,
# act. Known by name: importing timm here would load torchvision's compiled operators.
_TIMM_BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"


def _fusable_activation(act: nn.Module) -> bool:
    return type(act) in _FUSABLE_ACTIVATIONS and inversion_of(act) is not None


def _invertible_now(layer: _BatchNorm) -> bool:
    """Whether the layer's weights pass the floor (zero-initialised ones do not)."""
    return layer.weight is None or not _any_below_floor(layer.weight, layer.bias)


def _fusable_pair(bn: nn.Module, act: nn.Module, after: Optional[nn.Module]) -> bool:
    """A BatchNorm -> activation pair of a Sequential that a SyncBatchNormAct computes exactly,
    and whose output (which the fused layer keeps) the next module does not change in place."""
    return (type(bn) in _FUSABLE_NORMS and _fusable_activation(act)
            and getattr(after, "inplace", False) is not True and _invertible_now(bn))


def _stock_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fused_layer(norm: _BatchNorm, act: nn.Module, drop: Optional[nn.Module], group: Any,
                 inplace: bool, name: Optional[str]) -> SyncBatchNormAct:
    fused = SyncBatchNormAct(norm.num_features, norm.eps, norm.momentum, norm.affine,
                             norm.track_running_stats, group, activation=act, inplace=inplace,
                             drop=drop, name=name)
    _move_state(norm, fused)
    return fused


def _check_fusable(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
            raise ValueError(
                f"convert_sync_batchnorm_act: '{path or type(module).__name__}' is a lazy "
                "BatchNorm whose channel count is not known yet; run one forward pass before "
                "converting")


def convert_sync_batchnorm_act(module: nn.Module, process_group: Any = None,
                               inplace: bool = True) -> nn.Module:
    """Fuse BatchNorm + invertible activation into SyncBatchNormAct where that keeps the function.

    Fused: every pair ``BatchNorm -> LeakyReLU/ELU/Identity`` of consecutive children of an
    nn.Sequential (stock forward), where the BatchNorm is BatchNorm1d/2d/3d,
    torch.nn.SyncBatchNorm or syncbn.SyncBatchNorm (exactly: other subclasses are left alone),
    the module after the pair does not work in place (it would change the output the fused layer
    keeps), and the weights pass the inversion floor (zero-initialised ones do not); and every
    timm BatchNormAct2d whose act is one of those and whose drop is Identity.

    In place (with ``inplace=True``) only where the BatchNorm's input is the output of the
    Sequential's previous child, a Linear, Conv or ConvTranspose: then nothing else reads it,
    and its producer keeps its own input, not that output, for backward. The first child of a
    Sequential (its input comes from the caller: a residual shortcut may read it), anything
    after another module, and BatchNormAct2d (a custom forward may read its input) fuse out of
    place: the graph still keeps the output only. The layer also checks at run time what the
    autograd graph shows (see :mod:`syncbn.activated`).

    The SyncBatchNormAct owns the very activation module and the BatchNorm's parameters and
    buffers (weights, running statistics, requires_grad, training flag, device, dtype), on
    ``process_group`` (None: a SyncBatchNorm's own group, else the default group); the
    activation's slot holds a FusedActivation, so later modules keep their names, and every
    state_dict key is kept. Lazy BatchNorms not yet initialized are refused before anything is
    replaced. Returns ``module`` (changed in place). :func:`revert_sync_batchnorm_act` undoes it.
    Fuse before :func:`syncbn.convert_sync_batchnorm`, or instead of it for these layers.
    """
    _check_fusable(module)
    replacements: List[Tuple[nn.Module, str, nn.Module]] = []
    for path, parent in module.named_modules():
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            child_path = f"{path}.{child_name}" if path else child_name
            if _class_key(type(child)) == _TIMM_BATCHNORM_ACT:
                if (_fusable_activation(child.act) and type(child.drop) is nn.Identity
                        and _invertible_now(child)):
                    fused = _fused_layer(child, child.act, None, process_group, False, child_path)
                    fused.original_module = (child,)
                    replacements.append((parent, child_name, fused))
                continue
            if not _stock_sequential(parent) or index + 1 == len(children):
                continue
            act_name, act = children[index + 1]
            after = children[index + 2][1] if index + 2 < len(children) else None
            if not _fusable_pair(child, act, after):
                continue
            producer = children[index - 1][1] if index > 0 else None
            group = (process_group if process_group is not None
                     else getattr(child, "process_group", None))
            fused = _fused_layer(child, act, None, group,
                                 inplace and type(producer) in _FRESH_OUTPUT_PRODUCERS,
                                 getattr(child, "name", None) or child_path)
            fused.fused_from = type(child)
            if producer is not None:
                fused.producer = (producer,)
            if hasattr(child, "original_class"):  # a converted SyncBatchNorm's BatchNorm
                fused.original_class = child.original_class
            replacements.append((parent, child_name, fused))
            replacements.append((parent, act_name, FusedActivation(act)))
    for parent, child_name, replacement in replacements:
        setattr(parent, child_name, replacement)
    return module


def _unfused_norm(layer: SyncBatchNormAct, cls: Type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` with the fused layer's state (and, for a SyncBatchNorm, its group and name)."""
    synchronized = issubclass(cls, SyncBatchNorm)
    extra = dict(process_group=layer.process_group, name=layer.name) if synchronized else {}
    norm = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
               layer.track_running_stats, **extra)
    _move_state(layer, norm)
    if synchronized and hasattr(layer, "original_class"):
        norm.original_class = layer.original_class
    if synchronized and layer._last_input_dim is not None:
        norm._last_input_dim = layer._last_input_dim
    return norm


def _to_original_module(layer: SyncBatchNormAct) -> nn.Module:
    original = layer.original_module[0]
    _move_state(layer, original)
    return original


def revert_sync_batchnorm_act(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm_act`: the BatchNorm class it fused and the activation
    come back (a fused syncbn.SyncBatchNorm stays a SyncBatchNorm), and a fused timm
    BatchNormAct2d is that very module again, with the current state. SyncBatchNormAct layers
    not made by the fusion (built directly, or by convert_sync_batchnorm) are left as they are.
    Returns ``module``.
    """
    def revert(layer: nn.Module) -> Optional[nn.Module]:
        if isinstance(layer, FusedActivation):
            return layer.activation[0]
        if isinstance(layer, SyncBatchNormAct) and hasattr(layer, "fused_from"):
            return _unfused_norm(layer, layer.fused_from)
        if isinstance(layer, SyncBatchNormAct) and layer.fuse and hasattr(layer, "original_module"):
            return _to_original_module(layer)
        return None

    replacements = [(parent, name, revert(child)) for _, parent in module.named_modules()
                    for name, child in parent.named_children()]
    for parent, name, replacement in replacements:
        if replacement is not None:
            setattr(parent, name, replacement)
    return module


# ----- convert_sync_batchnorm / revert_sync_batchnorm --------------------------------------

def _from_timm_batchnorm_act(layer: _BatchNorm, process_group: Any, path: str) -> SyncBatchNormAct:
    """The same function synchronized, and the same autograd: unfused, its drop and act kept
    as the children of the same names (so their state_dict keys, a PReLU's included, stay)."""
    synced = SyncBatchNormAct(layer.num_features, layer.eps, layer.momentum, layer.affine,
                              layer.track_running_stats, process_group, activation=layer.act,
                              inplace=False, drop=layer.drop, fuse=False, name=path or None)
    _move_state(layer, synced)
    # Kept for revert, in a tuple so that it is not registered as a child module.
    synced.original_module = (layer,)
    return synced


def _plain_class(layer: SyncBatchNormAct, path: str) -> Type[_BatchNorm]:
    """The plain BatchNorm class a fused layer goes back to in revert_sync_batchnorm."""
    if issubclass(layer.fused_from, (SyncBatchNorm, nn.SyncBatchNorm)):
        # As for that SyncBatchNorm: the class it came from, else by the dims it saw.
        return _syncbatchnorm_revert_class(layer, path)
    return layer.fused_from


def _check_revert(layer: SyncBatchNormAct, path: str) -> None:
    if hasattr(layer, "fused_from"):
        _plain_class(layer, path)


def _revert_to_batchnorm(layer: nn.Module, path: str) -> nn.Module:
    """revert_sync_batchnorm of a SyncBatchNormAct or of a fused activation's slot.

    Fused by convert_sync_batchnorm_act: the plain BatchNorm, and the slot gets the activation
    back. Converted from timm's BatchNormAct2d: that module. Built directly: left as it is (it
    computes BatchNorm and its activation in a single process).
    """
    if isinstance(layer, FusedActivation):
        return layer.activation[0]
    if hasattr(layer, "fused_from"):
        return _unfused_norm(layer, _plain_class(layer, path))
    if hasattr(layer, "original_module"):
        return _to_original_module(layer)
    return layer


register_converter(_TIMM_BATCHNORM_ACT, _from_timm_batchnorm_act)
register_reverter(SyncBatchNormAct, _revert_to_batchnorm, check=_check_revert)
register_reverter(FusedActivation, _revert_to_batchnorm)
