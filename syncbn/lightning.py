"""PyTorch Lightning plugin: ``Trainer(strategy="ddp", plugins=[SyncBatchNormPlugin()])``.

Lightning's ``sync_batchnorm=True`` converts with torch.nn.SyncBatchNorm, which refuses CPU
tensors. This :class:`~lightning.pytorch.plugins.LayerSync` converts with syncbn instead, so
the same flag works on CPU (gloo) and GPU (NCCL); Lightning applies it when fitting starts
and reverts it at teardown, restoring the model's own BatchNorm classes. Needs the
``lightning`` package (``pip install "syncbn[lightning]"``).
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.layer_sync import LayerSync

from .convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Swaps every BatchNorm for syncbn.SyncBatchNorm while Lightning trains.

    ``process_group``: as for :class:`syncbn.SyncBatchNorm` (default: the default group
    Lightning's strategy initializes).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        return revert_sync_batchnorm(model)
