"""``SyncBatchNorm``: a drop-in for torch.nn.SyncBatchNorm and BatchNorm1d/2d/3d."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import sync_batch_norm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) input whose training statistics cover every rank of a group.

    Same constructor, parameters, buffers and state_dict keys as torch.nn.SyncBatchNorm
    (``bias=False``: no bias parameter, as in torch).
    ``process_group`` may be None (the default group), a torch.distributed ProcessGroup, an
    mpi4py communicator or a :class:`syncbn.comm.Communicator`. In a single process it computes
    exactly what BatchNorm does. ``name`` labels the layer in error messages;
    :func:`syncbn.convert_sync_batchnorm` sets it to the module's path in the model. A layer
    without a name is known by its construction order (``#k``), which is the same on every
    rank that built the same model, so the debug guard tells unnamed layers apart.
    ``debug`` turns on the collective cross-check (default: SYNCBN_DEBUG, read once);
    ``check_finite`` refuses NaN/Inf batches on every rank before running statistics change.
    """

    # The dims of the last input seen: revert_sync_batchnorm picks BatchNorm1d/2d/3d by it.
    _last_input_dim: Optional[int] = None
    # (name, layer_name) of the last name the layer had
    _layer_name: Optional[Tuple[Optional[str], str]] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        name: Optional[str] = None,
        debug: Optional[bool] = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if affine and not bias:
            # What torch's own ``bias=False`` does, also on the older torch versions without it.
            self.register_parameter("bias", None)
        self.process_group = process_group
        self.name = name
        self.debug = debug
        self.check_finite = check_finite
        self.construction_index = next(_construction_order)

    @property
    def layer_name(self) -> str:
        # Built once per name: it is passed on every forward.
        cached = self._layer_name
        if cached is None or cached[0] != self.name:
            label = f"{type(self).__name__}({self.num_features})"
            text = f"{label} '{self.name}'" if self.name else f"{label} #{self.construction_index}"
            cached = self._layer_name = (self.name, text)
        return cached[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Input is validated in sync_batch_norm, which tells the other ranks when it is bad.
        if input.dim() != self._last_input_dim:  # for revert; nn.Module.__setattr__ is slow
            self._last_input_dim = input.dim()
        track = self.training and self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            process_group=self.process_group,
            num_batches_tracked=self.num_batches_tracked if track else None,
            layer=self.layer_name,
            debug=self.debug,
            check_finite=self.check_finite,
            num_features=self.num_features,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Any = None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm's spelling of :func:`syncbn.convert_sync_batchnorm`."""
        from .convert import convert_sync_batchnorm  # convert imports this module

        return convert_sync_batchnorm(module, process_group)


# Construction order of SyncBatchNorm layers in this process: the identity of unnamed layers.
_construction_order = itertools.count()
