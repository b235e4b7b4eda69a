"""syncbn: synchronized BatchNorm over torch.distributed (NCCL, gloo, any group) or MPI.

One all-reduce per layer in each direction, exact for uneven and empty ranks, on CPU and GPU.
"""
from . import comm, functional
from .comm import (
    Communicator,
    MPICommunicator,
    SingleProcessCommunicator,
    TorchDistributedCommunicator,
    resolve_communicator,
)
from .activated import SyncBatchNormAct, convert_sync_batchnorm_act, revert_sync_batchnorm_act
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .distributed import DistInfo, init_distributed
from .functional import sync_batch_norm
from .groups import new_groups
from .guard import CollectiveError, CollectiveMismatchError
from .module import SyncBatchNorm
from .precise_bn import precise_bn

__version__ = "0.1.0"

__all__ = [
    "init_distributed", "DistInfo",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "sync_batch_norm",
    "convert_sync_batchnorm_act",
    "revert_sync_batchnorm_act",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "new_groups",
    "precise_bn",
    "CollectiveError",
    "CollectiveMismatchError",
    "Communicator",
    "SingleProcessCommunicator",
    "TorchDistributedCommunicator",
    "MPICommunicator",
    "resolve_communicator",
    "comm",
    "functional",
]
