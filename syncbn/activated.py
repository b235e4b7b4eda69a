"""``SyncBatchNormAct``: synchronized BatchNorm fused with an invertible activation, in place.

In-place activated BatchNorm (Rota Bulo et al., CVPR 2018): the training forward writes
y = act(weight * xhat + bias) into the input's storage and the autograd graph keeps only y
and per-channel vectors, not the input. The backward recovers what it needs from y:

- z = act^-1(y): leaky_relu: z = y where y >= 0 else y / slope; elu: z = log(1 + y / alpha)
  where y < 0; identity: z = y;
- dz = dy * act'(z), with act' written in y: slope (leaky_relu), y + alpha (elu) where y < 0;
- xhat = (z - bias) / weight, then BatchNorm's usual backward from xhat: one all-reduce of
  [sum dz, sum dz * xhat] and dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).

ReLU is refused by name: it maps every negative z to 0, so xhat is lost exactly where dx
still needs it. Any other activation, ReLU included, can be passed as a module: it then runs
out of place after SyncBatchNorm, with the memory of SyncBatchNorm + activation.

Same statistics, collectives (one all-reduce per direction, same payloads), running-stat
conventions, error handling, debug guard and state_dict keys as :class:`SyncBatchNorm`.

When in place is unsafe, the layer falls back (same output, same gradients, same collectives):

- the input is a leaf that requires grad, or a view of another tensor: the output gets its own
  storage; the graph still keeps only the output;
- a channel's weight is too small for the inversion (|weight| < 1e-3 * max(1, |bias|)): the
  layer runs SyncBatchNorm and the activation out of place, keeping the input. Checking this
  reads C booleans on the host (a sync on GPU) in each training forward;
- ELU on fp16/bf16 input: SyncBatchNorm then ELU, out of place. ELU flattens towards -alpha:
  recovering z from y = alpha * (exp(z) - 1) turns y's rounding u (half its spacing near 1)
  into an error of about u * exp(-z) in z (alpha = 1): at z = -4, 0.01 in fp16 and 0.1 in
  bf16; in fp32 1e-4 at z = -8, and where exp(z) < 2**-23 (z < -15.9) z is lost and taken as
  -15.9 (finite). dx at such a position is then off by invstd * (z_true - z) * mean(dz * xhat).
  leaky_relu has no such limit.

Overwriting the input is the contract of ``inplace=True``, as with ``nn.ReLU(inplace=True)``:
code must not read the input after the layer. An earlier op that saved the input for its own
backward (``torch.exp``, say) makes autograd's version check raise in ``backward``: wrong
gradients are never returned. The same check raises if the output is modified in place
afterwards (``out += shortcut``; write ``out = out + shortcut``). Double backward raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .kernels import triton as triton_kernels
from .convert import _move_state, register_converter, register_reverter
from .module import SyncBatchNorm

Tensor = torch.Tensor

__all__ = ["SyncBatchNormAct", "convert_sync_batchnorm_act", "revert_sync_batchnorm_act",
           "INVERTIBLE_ACTIVATIONS"]

INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")
# Channels whose |weight| is below this times max(1, |bias|) take the out-of-place path: the
# inversion xhat = (z - bias) / weight amplifies the output's rounding by |bias| / |weight|.
MIN_INVERTIBLE_WEIGHT = 1e-3


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
    reduction_dims = staticmethod(_bnm.reduction_dims)
    channel_view = staticmethod(_bnm.channel_view)
    accumulation_dtype = staticmethod(_bnm.accumulation_dtype)
    uses_triton = staticmethod(_kernels.uses_triton)
    memory_format = staticmethod(_functional.memory_format)
    group_statistics = staticmethod(_functional.group_statistics)
    backward_sums = staticmethod(_functional.backward_sums)

    @staticmethod
    def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], eps: float) -> Tensor:
        return _kernels.for_input(x).normalize(x, mean, var, weight, bias, eps)

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


# ----- the math of the torch path (CUDA and the Triton interpreter take triton_kernels') -----

def _activate_(z: Tensor, inversion: Inversion) -> Tensor:
    if inversion.code == 1:
        return torch.nn.functional.leaky_relu_(z, inversion.parameter)
    if inversion.code == 2:
        return torch.nn.functional.elu_(z, inversion.parameter)
    return z


def normalize_activate(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, inversion: Inversion,
                       inplace: bool) -> Tensor:
    """act(weight * (x - mean) * invstd + bias), written into x's storage when ``inplace``."""
    if _Core.uses_triton(x):
        return triton_kernels.normalize_activate(x, mean, var, weight, bias, eps, inversion.code,
                                                 inversion.parameter, inplace)
    y = _activate_(_Core.normalize(x, mean, var, weight, bias, eps), inversion)
    return x.copy_(y) if inplace else y


def _preactivation(y: Tensor, dy: Tensor, inversion: Inversion) -> Tuple[Tensor, Tensor]:
    """(z, dL/dz) from the output y and dL/dy, as new tensors (one fused op each where torch
    has one): the activation inverted, and its derivative written in y."""
    if inversion.code == 1:
        slope = inversion.parameter
        # leaky_relu with slope 1/s undoes leaky_relu with slope s.
        return (torch.nn.functional.leaky_relu(y, 1.0 / slope),
                torch.ops.aten.leaky_relu_backward(dy, y, slope, True))
    if inversion.code == 2:
        alpha = inversion.parameter
        # y > -alpha in exact arithmetic; the clamp keeps log finite where y rounded onto -alpha.
        z = y.clamp(max=0.0).div_(alpha).clamp_(min=-1.0 + torch.finfo(y.dtype).eps).log1p_()
        return z.add_(y.clamp(min=0.0)), torch.ops.aten.elu_backward(dy, alpha, 1.0, 1.0, True, y)
    return y.clone(), dy.clone()


class _FromOutput:
    """The backward's arithmetic from the output y: local sums, then the input gradient.

    The torch path inverts the activation once and keeps xhat and dz (two buffers) across the
    all-reduce; the Triton path recomputes them from y in each of its two passes.
    """

    def __init__(self, y: Tensor, dy: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 inversion: Inversion):
        self.y, self.dy, self.weight, self.bias, self.inversion = y, dy, weight, bias, inversion
        self.triton = _Core.uses_triton(y)
        if not self.triton:
            acc, ndim = _Core.accumulation_dtype(y.dtype), y.dim()
            z, self.dz = _preactivation(y.to(acc), dy.to(acc), inversion)
            if weight is not None:  # xhat = (z - bias) / weight, in place on the fresh z
                z.sub_(_Core.channel_view(bias.to(acc), ndim)).div_(_Core.channel_view(weight.to(acc), ndim))
            self.xhat = z

    def local_sums(self) -> Tensor:
        """[sum dz (C), sum dz * xhat (C)] of the local batch in the accumulation dtype."""
        if self.triton:
            return triton_kernels.activated_backward_payload(
                self.dy, self.y, self.weight, self.bias, self.inversion.code, self.inversion.parameter)
        dims = _Core.reduction_dims(self.y.dim())
        return torch.cat([self.dz.sum(dims), (self.dz * self.xhat).sum(dims)])

    def input_grad(self, var: Tensor, eps: float, global_sums: Tensor, count: Tensor) -> Tensor:
        """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), means over the group."""
        if self.triton:
            return triton_kernels.activated_input_grad(
                self.dy, self.y, var, self.weight, self.bias, eps, self.inversion.code,
                self.inversion.parameter, global_sums, count)
        xhat, dz = self.xhat, self.dz
        acc, ndim, channels = xhat.dtype, xhat.dim(), xhat.shape[1]
        invstd = torch.rsqrt(var.to(acc) + eps)
        scale = invstd if self.weight is None else self.weight.to(acc) * invstd
        safe_count = count.to(acc).clamp(min=1.0)
        mean_dz = _Core.channel_view(global_sums[:channels].to(acc) / safe_count, ndim)
        mean_dz_xhat = _Core.channel_view(global_sums[channels:].to(acc) / safe_count, ndim)
        # In place on the two buffers this object owns: no third activation-sized buffer.
        dx = dz.sub_(mean_dz).sub_(xhat.mul_(mean_dz_xhat)).mul_(_Core.channel_view(scale, ndim))
        return dx.to(self.y.dtype)


class _SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps, comm_key, layer, debug, check_finite, inversion, inplace):
        # Global statistics: the same payload and all-reduce as SyncBatchNorm.
        count, mean, var = _Core.group_statistics(x, running_mean, running_var, num_batches_tracked,
                                                  momentum, comm_key, layer, debug, check_finite)
        # Normalize and activate, into x's storage when in place: the graph keeps y alone.
        y = normalize_activate(x, mean, var, weight, bias, eps, inversion, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, weight, bias, var, count)
        ctx.eps, ctx.comm_key, ctx.layer, ctx.debug, ctx.inversion = eps, comm_key, layer, debug, inversion
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{ctx.layer}: SyncBatchNormAct does not support double backward (create_graph="
                "True): its backward recovers the input from the output and is not itself "
                "differentiable; use SyncBatchNorm followed by the activation instead")
        y, weight, bias, var, count = ctx.saved_tensors
        dy = dy.contiguous(memory_format=_Core.memory_format(y))
        # Local sums from the output, one all-reduce, then the input gradient.
        from_output = _FromOutput(y, dy, weight, bias, ctx.inversion)
        grad_weight, grad_bias, global_sums = _Core.backward_sums(ctx, from_output.local_sums(),
                                                                  weight, bias)
        grad_x = None
        if global_sums is not None:
            grad_x = from_output.input_grad(var, ctx.eps, global_sums, count)
        return (grad_x, grad_weight, grad_bias) + (None,) * (len(ctx.needs_input_grad) - 3)


def _inplace_is_safe(x: Tensor) -> bool:
    """Whether x's storage may take the output: not a leaf autograd needs, not a view."""
    leaf_needing_grad = x.requires_grad and x.grad_fn is None
    return not leaf_needing_grad and not x._is_view()


def _output_keeps_enough_precision(inversion: Inversion, dtype: torch.dtype) -> bool:
    return inversion.code != 2 or dtype not in (torch.float16, torch.bfloat16)


def _weights_invertible(weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    if weight is None:
        return True
    with torch.no_grad():
        floor = MIN_INVERTIBLE_WEIGHT * bias.abs().clamp(min=1.0)
        return bool((weight.abs() >= floor).all())


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm followed by an activation (and optional dropout), in place when it can be.

    ``activation``: "identity", "leaky_relu" (slope ``negative_slope``) or "elu" (``alpha``)
    run fused and, with ``inplace=True``, overwrite the input with the output, so the autograd
    graph keeps the output only (about half the memory of SyncBatchNorm + activation). Any
    nn.Module (nn.ReLU(), nn.SiLU(), ...) runs after SyncBatchNorm, out of place, without
    saving. ``drop``: a module applied last (timm's BatchNormAct2d has one). Children ``act``
    and ``drop`` show in the model's printout; parameters, buffers and state_dict keys are
    SyncBatchNorm's, so a BatchNorm checkpoint loads unchanged. Evaluation and the fallbacks
    described in :mod:`syncbn.activated` compute the same values out of place.
    """

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
        alpha: float = 1.0,
        drop: Optional[nn.Module] = None,
        name: Optional[str] = None,
        debug: Optional[bool] = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype, name=name, debug=debug, check_finite=check_finite)
        self.act = _activation_module(activation, negative_slope, alpha)
        self.drop = drop if drop is not None else nn.Identity()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inplace={self.inplace}"

    def forward(self, input: Tensor) -> Tensor:
        self._last_input_dim = input.dim()
        inversion = inversion_of(self.act)
        if (not self.training or inversion is None
                or not _output_keeps_enough_precision(inversion, input.dtype)
                or not _weights_invertible(self.weight, self.bias)):
            return self.drop(self.act(super().forward(input)))
        comm_key, _ = _Core.group_of(self.process_group)
        debug = _Core.debug_enabled(self.debug)
        reference = self.weight if self.weight is not None else self.running_mean
        if reference is None:  # affine=False without running stats: nothing names the device
            reference = input
        _Core.check_input(input, self.num_features, self.eps, reference, comm_key,
                          self.layer_name, debug, self.check_finite)
        track = self.track_running_stats
        y = _SyncBatchNormActFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked if track else None, self.momentum, self.eps, comm_key,
            self.layer_name, debug, self.check_finite, inversion,
            self.inplace and _inplace_is_safe(input))
        return self.drop(y)


# ----- conversion: BatchNorm -> activation pairs in nn.Sequential, and back -----------------

class FusedActivation(nn.Identity):
    """Holds the place of an activation fused into the SyncBatchNormAct before it.

    Keeping the slot keeps the indices, hence the state_dict keys, of the later modules.
    """


_FUSABLE: Tuple[Type[nn.Module], ...] = (nn.LeakyReLU, nn.ELU, nn.Identity)


def convert_sync_batchnorm_act(module: nn.Module, process_group: Any = None,
                               inplace: bool = True) -> nn.Module:
    """Fuse every ``BatchNorm -> LeakyReLU/ELU/Identity`` pair of an nn.Sequential in ``module``.

    The BatchNorm (any torch BatchNorm or syncbn.SyncBatchNorm) becomes a SyncBatchNormAct that
    owns the very activation module and the BatchNorm's parameters and buffers (weights,
    running statistics, requires_grad, training flag, device, dtype), on ``process_group``
    (None: a SyncBatchNorm's own group, else the default group); the activation's slot
    holds a FusedActivation, so later modules keep their names. Returns ``module`` (changed in
    place). :func:`revert_sync_batchnorm_act` undoes it exactly.
    """
    for path, sequential in _sequentials(module):
        children = list(sequential.named_children())
        for (bn_name, bn), (act_name, act) in zip(children, children[1:]):
            if not (isinstance(bn, _BatchNorm) and not isinstance(bn, SyncBatchNormAct)
                    and type(act) in _FUSABLE and inversion_of(act) is not None):
                continue
            group = process_group if process_group is not None else getattr(bn, "process_group", None)
            fused = SyncBatchNormAct(
                bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                group, activation=act, inplace=inplace,
                name=getattr(bn, "name", None) or (f"{path}.{bn_name}" if path else bn_name))
            _move_state(bn, fused)
            fused.fused_from = type(bn)
            if hasattr(bn, "original_class"):  # a converted SyncBatchNorm remembers its BatchNorm
                fused.original_class = bn.original_class
            setattr(sequential, bn_name, fused)
            setattr(sequential, act_name, FusedActivation())
    return module


def revert_sync_batchnorm_act(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm_act`: the BatchNorm class and activation come back.

    Layers not made by the conversion are left as they are. Returns ``module``.
    """
    for _, sequential in _sequentials(module):
        children = list(sequential.named_children())
        for (bn_name, fused), (act_name, slot) in zip(children, children[1:]):
            if not (isinstance(fused, SyncBatchNormAct) and isinstance(slot, FusedActivation)):
                continue
            cls = fused.fused_from
            extra = dict(process_group=fused.process_group, name=fused.name) \
                if issubclass(cls, SyncBatchNorm) else {}
            reverted = cls(fused.num_features, fused.eps, fused.momentum, fused.affine,
                           fused.track_running_stats, **extra)
            _move_state(fused, reverted)
            if hasattr(fused, "original_class"):
                reverted.original_class = fused.original_class
            setattr(sequential, bn_name, reverted)
            setattr(sequential, act_name, fused.act)
    return module


def _sequentials(module: nn.Module):
    return [(path, m) for path, m in module.named_modules() if isinstance(m, nn.Sequential)]


# ----- timm's BatchNormAct2d (efficientnet, regnet, mobilenetv3...): BatchNorm, act, drop ------
# Registered by name: importing timm here would load torchvision's compiled operators.
_TIMM_BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"


def _from_timm_batchnorm_act(layer: _BatchNorm, process_group: Any, path: str) -> SyncBatchNormAct:
    """The same function synchronized: its drop and act modules kept, run out of place.

    BatchNormAct2d applies drop, then act: the pair becomes this layer's activation module.
    """
    synced = SyncBatchNormAct(layer.num_features, layer.eps, layer.momentum, layer.affine,
                              layer.track_running_stats, process_group,
                              activation=nn.Sequential(layer.drop, layer.act), inplace=False,
                              name=path or None)
    _move_state(layer, synced)
    # Kept for revert, in a tuple so that it is not registered as a child module.
    synced.original_module = (layer,)
    return synced


def _to_original_module(layer: SyncBatchNormAct, path: str) -> nn.Module:
    original = getattr(layer, "original_module", None)
    if original is None:
        raise ValueError(
            f"revert_sync_batchnorm: '{path or layer.layer_name}' is a SyncBatchNormAct that was not "
            "converted from another layer; revert_sync_batchnorm_act reverts fused Sequential pairs")
    _move_state(layer, original[0])
    return original[0]


register_converter(_TIMM_BATCHNORM_ACT, _from_timm_batchnorm_act)
register_reverter(SyncBatchNormAct, _to_original_module)
