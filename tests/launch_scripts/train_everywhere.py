"""One training script for every launcher: init_distributed, convert, DDP, 3 steps, destroy.

    train_everywhere.py OUT_DIR

Each rank trains on its shard of a fixed global batch per step (the same whatever the world
size, so a single process trains on all of it) and writes ``OUT_DIR/rank{R}.pt``: the DistInfo,
what a second init_distributed call returned, syncbn's default communicator, the model's
state_dict, and under MPI the running mean of a layer synced explicitly over MPI.COMM_WORLD.
"""
import dataclasses
import os
import sys
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import syncbn

GLOBAL_BATCH = 8  # divisible by every world size the tests use
STEPS = 3
CHANNELS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def global_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, CHANNELS, 8, 8, generator=generator) * 2 + 1
    labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator)
    return images, labels


def train(model: nn.Module, rank: int, world_size: int) -> None:
    """STEPS steps of SGD; rank R takes the R-th of world_size equal shards of each batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        images, labels = (t.chunk(world_size)[rank] for t in global_batch(step))
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def mpi_synced_running_mean(info: syncbn.DistInfo) -> torch.Tensor:
    """A layer given MPI.COMM_WORLD explicitly, on this rank's shard of the first batch."""
    from mpi4py import MPI

    layer = syncbn.SyncBatchNorm(CHANNELS, momentum=1.0, process_group=MPI.COMM_WORLD)
    images, _ = global_batch(0)
    layer(images.chunk(info.world_size)[info.rank])
    return layer.running_mean


def main(out_dir: str) -> None:
    info = syncbn.init_distributed()
    again = syncbn.init_distributed()  # idempotent: nothing new, the same answer
    model = syncbn.convert_sync_batchnorm(make_model())
    trained = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    train(trained, info.rank, info.world_size)
    result = {
        "info": dataclasses.asdict(info),
        "again": dataclasses.asdict(again),
        "communicator": type(syncbn.resolve_communicator()).__name__,
        "state": model.state_dict(),
    }
    if info.launcher == "mpi":
        result["mpi_running_mean"] = mpi_synced_running_mean(info)
    torch.save(result, os.path.join(out_dir, f"rank{info.rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # see the README: without it torch's gloo can hang freeing DDP's group
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same arithmetic whatever thread count a launcher sets
    main(sys.argv[1])
