"""syncbn: synchronized BatchNorm over torch.distributed (NCCL, gloo, any group) or MPI.

One all-reduce per layer in each direction, exact for uneven and empty ranks, on CPU and GPU.
"""

# The names are loaded on first use (PEP 562), so that importing a light submodule (the pytest
# plugin, the process helpers) does not import torch: pytest loads the plugin in every session.
from importlib import import_module
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:
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

# Public name -> the submodule that defines it ("" for the submodules themselves).
_SOURCES = {
    "init_distributed": "distributed", "DistInfo": "distributed",
    "SyncBatchNorm": "module",
    "SyncBatchNormAct": "activated",
    "sync_batch_norm": "functional",
    "convert_sync_batchnorm_act": "activated",
    "revert_sync_batchnorm_act": "activated",
    "convert_sync_batchnorm": "convert",
    "revert_sync_batchnorm": "convert",
    "new_groups": "groups",
    "precise_bn": "precise_bn",
    "CollectiveError": "guard",
    "CollectiveMismatchError": "guard",
    "Communicator": "comm",
    "SingleProcessCommunicator": "comm",
    "TorchDistributedCommunicator": "comm",
    "MPICommunicator": "comm",
    "resolve_communicator": "comm",
    "comm": "",
    "functional": "",
}

__all__ = list(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(f".{_SOURCES[name] or name}", __name__)
    value = module if not _SOURCES[name] else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
