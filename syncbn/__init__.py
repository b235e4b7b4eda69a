"""syncbn: synchronized BatchNorm over torch.distributed (NCCL, gloo, any group) or MPI.

One all-reduce per layer in each direction, exact for uneven and empty ranks, on CPU and GPU.
README.md has the guide; this is the map of the public API (``help(name)`` for each).

Layers
    SyncBatchNorm            drop-in for torch.nn.SyncBatchNorm / BatchNorm{1,2,3}d: training
                             statistics over every rank of ``process_group``
    SyncBatchNormAct         SyncBatchNorm fused with its activation, in place (InPlace-ABN)
    sync_batch_norm          the functional form, like torch.nn.functional.batch_norm
    functional               the module holding it and the autograd function behind the layers

Models
    convert_sync_batchnorm       every BatchNorm of a model -> SyncBatchNorm (and back:
    revert_sync_batchnorm        the class each layer came from)
    convert_sync_batchnorm_act   fuse BatchNorm -> LeakyReLU/ELU/Identity pairs into
    revert_sync_batchnorm_act    SyncBatchNormAct (and back)
    precise_bn                   running statistics from the population of many batches,
                                 over every rank

Groups and launchers
    init_distributed         torch.distributed's default group from whatever started the
                             process (torchrun, syncbn-launch, an MPI launcher, srun, or none);
                             returns a DistInfo
    DistInfo                 (rank, world_size, local_rank, launcher)
    new_groups               consistent groups of k consecutive ranks; this rank's group
    resolve_communicator     the Communicator a ``process_group`` argument stands for
    comm                     the module of the communicators:
    Communicator             the one collective the layers need: an in-place all-reduce-sum
    TorchDistributedCommunicator, MPICommunicator, SingleProcessCommunicator
                             over a torch.distributed group, an mpi4py communicator, or this
                             process alone

Errors
    CollectiveError          a collective failed or timed out, or another rank's input was
                             invalid; names the layer and the group
    CollectiveMismatchError  ranks were about to issue different collectives (debug guard,
                             SYNCBN_DEBUG=1)

Elsewhere
    syncbn-launch            the command (syncbn.launch): N local ranks over gloo, NCCL or MPI
    syncbn.testing           RankPool and run_on_ranks: functions on N fresh ranks, for tests
    syncbn.data              a seeded sharded sampler and per-rank batches of global batches
    syncbn.lightning         SyncBatchNormPlugin for PyTorch Lightning
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
