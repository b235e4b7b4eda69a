"""syncbn.data: the split over ranks, the batches, the step stream and gradient averaging."""
from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ranks_over_each_backend, sync_group
from syncbn.data import (ShardedSampler, average_gradients, rank_batch_stream, rank_batches,
                         shard_indices)

BOUNDED = settings(max_examples=60, deadline=None)
sizes = st.integers(0, 200)
worlds = st.integers(1, 9)
seeds = st.integers(0, 2 ** 16)
epochs = st.integers(0, 5)


def shares(n: int, world: int, **options) -> List[torch.Tensor]:
    return [shard_indices(n, rank, world, **options) for rank in range(world)]


@BOUNDED
@given(n=sizes, world=worlds, seed=seeds, epoch=epochs)
def test_shares_differ_by_at_most_one_and_partition_the_permutation(n, world, seed, epoch):
    parts = shares(n, world, seed=seed, epoch=epoch)
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the first n % W ranks get the extra one
    assert sorted(torch.cat(parts).tolist()) == list(range(n))


@BOUNDED
@given(n=st.integers(1, 200), world=worlds, seed=seeds)
def test_drop_last_and_pad_make_shares_equal(n, world, seed):
    dropped = shares(n, world, seed=seed, drop_last=True)
    assert {len(p) for p in dropped} == {n // world}
    assert len(set(torch.cat(dropped).tolist())) == n - n % world
    padded = shares(n, world, seed=seed, pad=True)
    assert {len(p) for p in padded} == {-(-n // world)}
    flat = torch.cat(padded).tolist()
    assert set(flat) == set(range(n))
    assert len(flat) - n == (-n) % world  # the repeats are exactly the padding


def test_pad_with_more_ranks_than_samples_repeats_cyclically():
    padded = shares(2, 5, pad=True, shuffle=False)
    assert [p.tolist() for p in padded] == [[0], [1], [0], [1], [0]]


@BOUNDED
@given(n=sizes, world=worlds, batch=st.integers(1, 12), seed=seeds, epoch=epochs,
       drop_last=st.booleans())
def test_ranks_see_the_global_batches_of_one_process(n, world, batch, seed, epoch, drop_last):
    """Batch k of every rank together is batch k of one process with batch b * W."""
    per_rank = [rank_batches(n, batch, r, world, seed, epoch, drop_last=drop_last)
                for r in range(world)]
    single = rank_batches(n, batch * world, 0, 1, seed, epoch, drop_last=drop_last)
    assert {len(b) for b in per_rank} <= {len(single)}  # same step count on every rank
    for k, expected in enumerate(single):
        together = torch.cat([batches[k] for batches in per_rank])
        assert sorted(together.tolist()) == sorted(expected.tolist())
    if drop_last:
        assert all(len(b) == batch for batches in per_rank for b in batches)


def test_uneven_last_batch_without_drop_last():
    # 10 samples, 3 ranks, batch 2: shares 4/3/3 -> 2 steps; the last global batch has 4.
    per_rank = [rank_batches(10, 2, r, 3, drop_last=False) for r in range(3)]
    assert [[len(b) for b in batches] for batches in per_rank] == [[2, 2], [2, 1], [2, 1]]
    # More ranks than samples: the empty ranks still take part in every step.
    sparse = [rank_batches(2, 4, r, 3, drop_last=False) for r in range(3)]
    assert [[len(b) for b in batches] for batches in sparse] == [[1], [1], [0]]
    assert [len(rank_batches(10, 2, r, 3, drop_last=True)) for r in range(3)] == [1, 1, 1]


@BOUNDED
@given(n=st.integers(2, 200), world=worlds, seed=seeds, epoch=epochs)
def test_deterministic_in_seed_and_epoch(n, world, seed, epoch):
    first = shares(n, world, seed=seed, epoch=epoch)
    again = shares(n, world, seed=seed, epoch=epoch)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    unshuffled = shares(n, world, seed=seed, epoch=epoch, shuffle=False)
    assert torch.cat(unshuffled).sort().values.tolist() == list(range(n))
    assert unshuffled[0].tolist() == list(range(0, n, world))


def test_epochs_and_seeds_reshuffle():
    base = shard_indices(100, 0, 2, seed=3, epoch=0)
    assert not torch.equal(base, shard_indices(100, 0, 2, seed=3, epoch=1))
    assert not torch.equal(base, shard_indices(100, 0, 2, seed=4, epoch=0))


def test_sampler_follows_shard_indices_and_set_epoch():
    sampler = ShardedSampler(list(range(23)), rank=1, world_size=4, seed=7)
    assert list(sampler) == shard_indices(23, 1, 4, seed=7).tolist()
    assert len(sampler) == 6
    sampler.set_epoch(2)
    assert list(sampler) == shard_indices(23, 1, 4, seed=7, epoch=2).tolist()
    assert len(ShardedSampler(23, rank=3, world_size=4, drop_last=True)) == 5
    single = ShardedSampler(5)  # no group: one process takes everything
    assert (single.rank, single.world_size, sorted(single)) == (0, 1, [0, 1, 2, 3, 4])


@BOUNDED
@given(n=st.integers(1, 60), world=st.integers(1, 4), batch=st.integers(1, 4),
       steps=st.integers(0, 40), seed=seeds)
def test_stream_crosses_epochs_like_one_process(n, world, batch, steps, seed):
    if n // world // batch == 0:
        with pytest.raises(ValueError, match="no full global batch"):
            next(rank_batch_stream(n, batch, 0, world, steps, seed))
        return
    streams = [list(rank_batch_stream(n, batch, r, world, steps, seed)) for r in range(world)]
    single = list(rank_batch_stream(n, batch * world, 0, 1, steps, seed))
    assert len(single) == steps and all(len(s) == steps for s in streams)
    for k in range(steps):
        together = torch.cat([s[k] for s in streams]).tolist()
        assert len(together) == batch * world
        assert sorted(together) == sorted(single[k].tolist())


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 2, "world_size": 2}, "rank must be"),
    ({"rank": 0, "world_size": 0}, "world_size must be"),
    ({"rank": 0, "world_size": 1, "drop_last": True, "pad": True}, "exclusive"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shard_indices(10, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        rank_batches(10, 0, 0, 1)
    with pytest.raises(ValueError, match="num_samples"):
        shard_indices(-1, 0, 1)


def test_average_gradients_alone_is_a_no_op():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    average_gradients(layer.parameters())
    assert all(torch.equal(b, p.grad) for b, p in zip(before, layer.parameters()))


@ranks_over_each_backend(3)
def test_average_gradients_over_ranks(rank, backend):
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
              torch.nn.Parameter(torch.zeros(1))]  # the last has no gradient
    params[0].grad = torch.full((2, 3), float(rank))
    params[1].grad = torch.arange(4.0) * (rank + 1)
    average_gradients(params, sync_group(backend))
    assert torch.allclose(params[0].grad, torch.full((2, 3), 1.0))  # mean of 0, 1, 2
    assert torch.allclose(params[1].grad, torch.arange(4.0) * 2)    # mean of 1, 2, 3
    assert params[2].grad is None
