"""A rank of a launcher test: SyncBatchNorm statistics against the full batch, or a fault.

    sbn_check.py MODE [--rank R]

Runs under syncbn-launch (gloo, mpi), torchrun and mpiexec: torch.distributed is initialized
from the environment when RANK is set; otherwise syncbn's default group is MPI.COMM_WORLD.
MODE: ok | die-before-collective | sigkill | raise | skip-layer. The faults happen on rank R
(default 1) while the other ranks wait inside a SyncBatchNorm forward.
"""
import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import syncbn

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["ok", "die-before-collective", "sigkill", "raise", "skip-layer"])
parser.add_argument("--rank", type=int, default=1, help="the rank that misbehaves")
args = parser.parse_args()

if "RANK" in os.environ:
    dist.init_process_group("gloo")
comm = syncbn.resolve_communicator()
rank, world = comm.rank, comm.size
torch.manual_seed(0)  # every rank draws every rank's data: the full batch is known everywhere
sizes = [3 + 2 * r for r in range(world)]  # uneven batches
batches = [torch.randn(n, 4, 5, 5, dtype=torch.float64) * 3 + 1 for n in sizes]
guard = args.mode == "skip-layer"  # the debug guard turns the mismatch into an error everywhere
layer = syncbn.SyncBatchNorm(4, dtype=torch.float64, name="bn1", debug=guard)
second = syncbn.SyncBatchNorm(4, dtype=torch.float64, name="bn2", debug=guard)


def misbehave() -> None:
    print(f"FAULT_AT {time.time()}", flush=True)  # the test times the launcher's reaction from here
    if args.mode == "sigkill":
        time.sleep(1.0)  # "mid-run": the other ranks are waiting in the collective by now
        os.kill(os.getpid(), signal.SIGKILL)
    if args.mode == "raise":
        raise ValueError(f"boom inside forward on rank {rank}")


try:
    if rank == args.rank and args.mode == "die-before-collective":
        print(f"FAULT_AT {time.time()}: rank {rank} leaves before the collective", flush=True)
        os._exit(3)
    if rank == args.rank and args.mode in ("sigkill", "raise"):
        layer.register_forward_pre_hook(lambda *_: misbehave())
    if args.mode == "skip-layer":
        if rank == args.rank:
            print(f"FAULT_AT {time.time()}", flush=True)
        x = batches[rank].clone()
        y = second(x) if rank == args.rank else second(layer(x))  # one layer fewer on rank R
        raise AssertionError("the debug guard let mismatched collectives through")
    y = layer(batches[rank])
    reference = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    full = reference(torch.cat(batches))
    expected = full[sum(sizes[:rank]):sum(sizes[:rank + 1])]
    error = (y - expected).abs().max().item()
    assert error < 1e-9, error
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    print(f"rank {rank}/{world}: statistics match the full batch (max error {error:.1e})")
    print(f"rank {rank}: to stderr", file=sys.stderr)
finally:
    # Without this, gloo can abort at interpreter exit ("terminate called ...").
    if dist.is_initialized():
        dist.destroy_process_group()
