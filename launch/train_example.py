"""A small conv net trained with synchronized BatchNorm: the template the launch recipes run.

Works unchanged under every launcher, and as one plain process:

    syncbn-launch --nprocs 2 launch/train_example.py               # gloo (--backend nccl: GPUs)
    syncbn-launch --nprocs 2 --backend mpi launch/train_example.py
    torchrun --nproc-per-node 2 launch/train_example.py
    mpiexec -n 2 python -m mpi4py launch/train_example.py
    srun --ntasks-per-node 2 python launch/train_example.py
    python launch/train_example.py

syncbn.init_distributed() reads how the job was started and initializes torch.distributed
(NCCL with GPUs, else gloo); the model is wrapped in DistributedDataParallel whenever a group
exists. Edit the model, the data and the loop; keep the start and the end.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn

import syncbn


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--backend", default=None,
                        help="torch.distributed backend (default: nccl with GPUs, else gloo)")
    parser.add_argument("--save", metavar="PATH",
                        help="rank 0 saves the trained weights and running statistics there")
    args = parser.parse_args()

    info = syncbn.init_distributed(args.backend)
    rank, world = info.rank, info.world_size
    # With NCCL, init_distributed made this rank's GPU (cuda:local_rank) the current device.
    use_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    if rank == 0:
        print(f"started by {info.launcher}: {world} rank(s)", flush=True)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = syncbn.convert_sync_batchnorm(make_model()).to(device)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if use_gpu else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data

    for step in range(args.steps):
        images = torch.randn(args.batch_size, 3, 16, 16, generator=generator).to(device)
        labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    # Every rank must hold the same weights: check with one all-reduce of a checksum.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    table = torch.zeros(world, dtype=torch.float64)
    table[rank] = checksum
    table = syncbn.resolve_communicator().all_reduce_sum_(table.to(device)).cpu()
    assert torch.allclose(table, table[0].expand(world)), f"ranks diverged: {table.tolist()}"
    print(f"rank {rank}/{world}: done, weights agree across ranks", flush=True)
    if args.save and rank == 0:
        unwrapped = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        torch.save({key: value.cpu() for key, value in unwrapped.state_dict().items()}, args.save)

    if dist.is_initialized():
        # Always end like this (see the README). First drop DistributedDataParallel, which holds
        # the group: freed only when main() returns, after destroy_process_group, gloo's group
        # hung in its destructor in 15 of 84 runs here. Then the barrier and the destroy:
        # without them torch's gloo can abort or hang at interpreter exit, with or without syncbn.
        del model, optimizer
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
