"""``SyncBatchNorm``: a drop-in for torch.nn.SyncBatchNorm and BatchNorm1d/2d/3d."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import sync_batch_norm, validate_input

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) input whose training statistics cover every rank of a group.

    Same constructor, parameters, buffers and state_dict keys as torch.nn.SyncBatchNorm.
    ``process_group`` may be None (the default group), a torch.distributed ProcessGroup, an
    mpi4py communicator or a :class:`syncbn.comm.Communicator`. In a single process it computes
    exactly what BatchNorm does. ``name`` labels the layer in error messages;
    :func:`syncbn.convert_sync_batchnorm` sets it to the module's path in the model.
    """

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
        name: Optional[str] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        self.name = name

    @property
    def layer_name(self) -> str:
        label = f"SyncBatchNorm({self.num_features})"
        return f"{label} '{self.name}'" if self.name else label

    def _check_input_dim(self, input: torch.Tensor) -> None:
        validate_input(input, self.num_features, self.layer_name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
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
        )
