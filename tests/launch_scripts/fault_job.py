"""A training script with one fault, for the fault matrix (tests/test_fault_matrix.py).

    fault_job.py MODE

Started by syncbn-launch (gloo: torch.distributed from the environment; mpi), by a bare
mpiexec, or as plain processes with srun's variables. Every rank draws every rank's batch
(one seed), so each can check its statistics against the concatenated global batch.

uncaught           one training step on every rank; then rank 1 raises an uncaught ValueError
                   while rank 0 starts the next step and waits inside the layer's collective.
forget-init        torch.distributed is never initialized; one training step. Prints whether
                   the running statistics changed if the step raised, else how far the output
                   is from BatchNorm on the global batch.
mismatch-then-abort  with the debug guard, rank 1 skips a layer; every rank raises
                   CollectiveMismatchError uncaught and then dies by SIGABRT, as gloo's
                   "terminate called without an active exception" does at exit.
uncaught-after-init  syncbn.init_distributed() (a gloo group, also under MPI); one step; then
                   rank 1 raises an uncaught ValueError while rank 0 works on without noticing
                   (a sleep: as a rank waiting in an NCCL collective would).
return-early       one training step on every rank; then rank 1 returns normally while rank 0
                   starts the next step and waits for it inside the layer's collective.
exit-before-group  rank 1 exits 0 before the group exists; rank 0 waits in the rendezvous.
finish-apart       one step and a last collective on every rank; then rank 1 exits while rank 0
                   works alone for 4 s more (saving, say) and exits 0 too.
"""
import argparse
import atexit
import os
import sys
import time

import torch
import torch.distributed as dist

import syncbn

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["uncaught", "forget-init", "mismatch-then-abort",
                                     "uncaught-after-init", "return-early", "exit-before-group",
                                     "finish-apart"])
mode = parser.parse_args().mode
rank = int(next(os.environ[v] for v in ("RANK", "PMI_RANK", "SLURM_PROCID") if v in os.environ))

if mode == "exit-before-group" and rank == 1:
    print(f"FAULT_AT {time.time()}", flush=True)
    sys.exit(0)
if mode == "uncaught-after-init":
    syncbn.init_distributed()
elif "RANK" in os.environ and mode != "forget-init":
    dist.init_process_group("gloo")
world = 2
torch.manual_seed(0)
batches = [torch.randn(3 + 2 * r, 4, 5, dtype=torch.float64) * 3 + 1 for r in range(world)]
layer = syncbn.SyncBatchNorm(4, dtype=torch.float64, name="fault.bn")


def running_stats() -> list:
    return [layer.running_mean.clone(), layer.running_var.clone()]


if mode in ("uncaught", "uncaught-after-init"):
    layer(batches[rank])
    print(f"rank {rank}: step 1 done", flush=True)
    if rank == 1:
        print(f"FAULT_AT {time.time()}", flush=True)
        raise ValueError("rank 1: a broken batch, uncaught")
    if mode == "uncaught":
        layer(batches[rank])  # waits for rank 1, which will never arrive
    else:
        time.sleep(600)  # only the job's end can stop this rank
    print(f"rank {rank}: step 2 done", flush=True)

elif mode in ("return-early", "finish-apart"):
    layer(batches[rank])
    if mode == "finish-apart":
        layer(batches[rank])  # the last collective
        if rank == 0:
            time.sleep(4.0)
    elif rank == 1:
        print(f"FAULT_AT {time.time()}", flush=True)
    else:
        layer(batches[rank])  # waits for rank 1, which has returned
    print(f"rank {rank}: done", flush=True)

elif mode == "forget-init":
    print(f"FAULT_AT {time.time()}", flush=True)
    before = running_stats()
    try:
        output = layer(batches[rank])
    except Exception:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, running_stats()))
        print(f"rank {rank}: running statistics unchanged: {unchanged}", flush=True)
        raise
    expected = torch.nn.BatchNorm1d(4, dtype=torch.float64)(torch.cat(batches))
    start = sum(b.shape[0] for b in batches[:rank])
    error = (output - expected[start:start + batches[rank].shape[0]]).abs().max().item()
    print(f"rank {rank}: max error against the global batch {error:.1e}", flush=True)

elif mode == "mismatch-then-abort":
    atexit.register(os.abort)  # after the traceback is printed, like gloo's terminate
    layer.debug = True
    second = syncbn.SyncBatchNorm(4, dtype=torch.float64, name="fault.second", debug=True)
    if rank == 1:
        print(f"FAULT_AT {time.time()}", flush=True)
    x = batches[rank]
    second(x) if rank == 1 else second(layer(x))  # rank 1 skips fault.bn

if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
