"""The kernels of synchronized BatchNorm, one implementation per backend, chosen in one place.

Every backend module has the same functions with the same semantics (those of
:mod:`syncbn.batchnorm_math`):

- ``forward_payload(x, shift)``: the local batch's forward payload (4C+3 fp64: count, sums and
  squared sums about the shift, the shift and its square, two flags);
- ``finalize(moments, shift, running_mean, running_var, num_batches_tracked, momentum)``: the
  group's (count, mean, var) from the reduced payload, and the running-stat update;
- ``normalize(x, mean, var, weight, bias, eps)``: the output;
- ``backward_sums(dy, x, mean, var, eps, parameter_dtype)``: [sum dy, sum dy * xhat] (2C fp64),
  and this rank's own (dbias, dweight): the same sums in ``parameter_dtype`` (copies);
- ``input_grad(dy, x, mean, var, weight, eps, group_sums, count)``: the input gradient;
- ``group_totals(payload, channels, world_size)``: what the reduced payload says about the group
  (a host read: batchnorm_math.group_totals);
- ``checked_finalize(payload, shift, running_mean, running_var, num_batches_tracked, momentum,
  world_size, check_finite)``: ``finalize`` of the reduced payload where
  batchnorm_math.statistics_ready holds, else its group totals and nothing updated (a host read);
- ``moments_about(x, shift)``: [n, sum (x - shift), sum (x - shift)^2] (2C+1 fp64), nearly exact
  for a shift close to the mean (the CPU's re-centring round).

and, for SyncBatchNormAct (:mod:`syncbn.activated`), whose backward works from its output y:

- ``normalize_activate(x, mean, var, weight, bias, eps, activation, parameter, inplace)``:
  act(normalize(x)), written over x when ``inplace``;
- ``activated_backward_payload(dy, y, weight, bias, activation, parameter)``: [sum dz,
  sum dz * xhat] (2C fp64), z the activation's input recovered from y;
- ``activated_input_grad(dy, y, var, weight, bias, eps, activation, parameter, group_sums,
  count)``: the input gradient;
- ``update_stats(x, running_mean, running_var, momentum)``: a group of one's statistics
  (torch.batch_norm_update_stats' semantics);
- ``any_below_floor(weight, bias, floor)``: whether a channel's weight is too small to invert
  (a host read).

Backends: :mod:`.reference` (plain torch: any device and dtype; the fallback, and the oracle
the others are tested against), :mod:`.native` (CPU, C++ built on first use) and :mod:`.triton`
(CUDA, fp32/fp16/bf16). :func:`for_input` picks one for an input. Switches, read once at import:
``SYNCBN_KERNELS=reference`` forces the reference everywhere; ``SYNCBN_NATIVE=0`` turns the
native CPU kernels off; ``SYNCBN_TRITON=0`` turns Triton off on CUDA; ``SYNCBN_TRITON=1`` with
``TRITON_INTERPRET=1`` runs the Triton kernels on CPU through Triton's interpreter (tests).
A CUDA device takes the Triton kernels once their one-time self-test there has passed
(:func:`triton.usable`); a device where a kernel fails keeps the reference for good.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Dict

import torch

from . import native, reference, triton

__all__ = ["for_input", "uses_triton", "reference", "native", "triton"]

_FORCED_REFERENCE = os.environ.get("SYNCBN_KERNELS", "").lower() == "reference"
_TRITON_ON_CUDA = triton.TRITON_AVAILABLE and os.environ.get("SYNCBN_TRITON") != "0"
_TRITON_ON_CPU = triton.INTERPRETED and os.environ.get("SYNCBN_TRITON") == "1"
_NATIVE_ON = os.environ.get("SYNCBN_NATIVE") != "0"


# CPU inputs' native or reference backend by dtype: fixed once chosen (the switches are read at
# import, the build is tried once), and a small layer's step pays for every lookup. (Triton, in
# the interpreter, is not kept: a failing kernel switches it off.)
_cpu_backends: Dict[torch.dtype, ModuleType] = {}


def for_input(x: torch.Tensor) -> ModuleType:
    """The backend whose kernels serve input ``x`` (by its device and dtype)."""
    backend = _cpu_backends.get(x.dtype) if x.is_cpu else None
    if backend is None:
        backend = _choose(x)
        if x.is_cpu and backend is not triton:
            _cpu_backends[x.dtype] = backend
    return backend


def _choose(x: torch.Tensor) -> ModuleType:
    if _FORCED_REFERENCE:
        return reference
    device = x.device.type
    if x.dtype in triton.SUPPORTED_DTYPES and (
            (device == "cuda" and _TRITON_ON_CUDA) or (device == "cpu" and _TRITON_ON_CPU)) \
            and triton.usable(x.device):  # a device whose self-test failed keeps the reference
        return triton
    # native.available() builds the extension on its first call (once per process).
    if device == "cpu" and _NATIVE_ON and x.dtype in native.SUPPORTED_DTYPES and native.available():
        return native
    return reference


def uses_triton(x: torch.Tensor) -> bool:
    """Whether input ``x`` takes the Triton kernels."""
    return for_input(x) is triton
