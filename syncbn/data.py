"""Splitting a dataset over ranks: the sampler and batch helpers data-parallel training needs.

Every helper here is deterministic in (seed, epoch) and takes rank and world size explicitly
(or from the default group), so N processes agree on the split without talking to each other.

The split is strided like torch's DistributedSampler: rank ``r`` takes positions
``r, r + W, r + 2W, ...`` of one seeded permutation. Two properties follow:

- Shares differ by at most one sample; nothing is duplicated unless ``pad=True`` asks for it.
- Batch ``k`` of every rank taken together is exactly slice ``k`` of the permutation cut into
  global batches of ``batch_size * world_size``. So W ranks with batch b see the very same
  global batches, in the same order, as one process with batch b * W and the same seed.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Sized, Tuple, Union

import torch
from torch.utils.data import Sampler

from .comm import resolve_communicator

__all__ = ["shard_indices", "ShardedSampler", "rank_batches", "rank_batch_stream",
           "average_gradients"]


def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def shard_indices(num_samples: int, rank: int, world_size: int, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, drop_last: bool = False, pad: bool = False) -> torch.Tensor:
    """The sample indices of ``rank``'s share of one epoch, as a 1-D int64 tensor.

    By default the shares are uneven: the first ``num_samples % world_size`` ranks get one
    sample more, and with ``world_size > num_samples`` the last ranks get none.
    ``drop_last`` drops the tail of the permutation so every share has
    ``num_samples // world_size`` samples; ``pad`` instead repeats its head so every share has
    ``ceil(num_samples / world_size)`` (DistributedSampler's default; the repeats count twice).
    """
    _check_rank(rank, world_size)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if drop_last and pad:
        raise ValueError("drop_last and pad are exclusive: one shortens the epoch, one lengthens it")
    order = _permutation(num_samples, seed, epoch, shuffle)
    if drop_last:
        order = order[: num_samples - num_samples % world_size]
    elif pad and num_samples % world_size:
        if num_samples == 0:
            raise ValueError("pad=True needs at least one sample to repeat")
        missing = world_size - num_samples % world_size
        order = torch.cat([order, order.repeat(missing // num_samples + 1)[:missing]])
    return order[rank::world_size]


def _default_rank_and_size(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    comm = resolve_communicator()
    return (comm.rank if rank is None else rank), (comm.size if world_size is None else world_size)


class ShardedSampler(Sampler[int]):
    """A seeded DistributedSampler-style sampler over ``shard_indices``; call ``set_epoch`` each epoch.

    ``data`` is a dataset (anything with ``len``) or the number of samples. ``rank`` and
    ``world_size`` default to those of syncbn's default group (torch.distributed, else MPI
    under mpiexec, else a single process).
    """

    def __init__(self, data: Union[Sized, int], rank: Optional[int] = None,
                 world_size: Optional[int] = None, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, pad: bool = False) -> None:
        self.num_samples = data if isinstance(data, int) else len(data)
        self.rank, self.world_size = _default_rank_and_size(rank, world_size)
        _check_rank(self.rank, self.world_size)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        return shard_indices(self.num_samples, self.rank, self.world_size, self.seed, self.epoch,
                             self.shuffle, self.drop_last, self.pad)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(self.indices())


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 epoch: int = 0, drop_last: bool = True, shuffle: bool = True,
                 pad: bool = False) -> List[torch.Tensor]:
    """``rank``'s batches of one epoch: its share of ``shard_indices`` cut into ``batch_size``.

    Every rank gets the same number of batches, so collectives inside a training step line up:
    with ``drop_last`` only full global batches (``batch_size`` on every rank) are kept; without
    it the epoch ends with the longest share's last batch, and ranks whose share ran out
    get smaller or empty batches there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    share = shard_indices(num_samples, rank, world_size, seed, epoch, shuffle, drop_last, pad)
    if drop_last:
        num_batches = (num_samples // world_size) // batch_size
    else:
        longest_share = -(-num_samples // world_size)
        num_batches = -(-longest_share // batch_size)
    return [share[k * batch_size:(k + 1) * batch_size] for k in range(num_batches)]


def rank_batch_stream(num_samples: int, batch_size: int, rank: int, world_size: int,
                      num_steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``num_steps`` full batches for ``rank``, running through as many epochs as it takes.

    Epoch ``e`` is shuffled with ``seed + e``; batches are ``rank_batches`` with ``drop_last``.
    """
    if (num_samples // world_size) // batch_size == 0:
        raise ValueError(f"{num_samples} samples make no full global batch of "
                         f"{batch_size} x {world_size}")
    steps_done = 0
    epoch = 0
    while steps_done < num_steps:
        for batch in rank_batches(num_samples, batch_size, rank, world_size, seed, epoch):
            if steps_done == num_steps:
                return
            yield batch
            steps_done += 1
        epoch += 1


def average_gradients(parameters: Iterable[torch.nn.Parameter], process_group: Any = None) -> None:
    """Average the gradients of ``parameters`` over the group in one all-reduce (DDP's job).

    The manual equivalent of DistributedDataParallel for any syncbn group, MPI included:
    with each rank's loss a mean over its own equal-sized batch, the result is the gradient of
    the mean loss over the global batch. Parameters without a gradient are skipped (the same on
    every rank, or the collectives would not line up).
    """
    comm = resolve_communicator(process_group)
    grads = [p.grad for p in parameters if p.grad is not None]
    if comm.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
    comm.all_reduce_sum_(flat).div_(comm.size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
