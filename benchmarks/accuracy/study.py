"""The study's plan per mode and the loop that runs it over real ranks (RankPool)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from tqdm import tqdm

from syncbn.testing import RankPool, find_mpiexec

from . import tasks

STAT_BATCHES = (1, 2, 4, 8, 16)
STAT_WORLDS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Plan:
    """What one mode runs. ``train_world`` ranks train every distributed arm."""

    stat_trials: int
    stat_ranks: Tuple[Tuple[str, int], ...]      # (backend, W) measured over real ranks
    train_world: int
    class_batches: Tuple[int, ...]
    class_steps: int
    seg_batches: Tuple[int, ...]
    seg_steps: int
    seeds: Tuple[int, ...]
    mpi_arms: Tuple[str, ...]                     # arms repeated over MPI (seed 0 only)
    mpi_batches: Tuple[int, ...]
    class_lr: float = 3e-3
    seg_lr: float = 3e-3
    arms: Tuple[str, ...] = tasks.ARMS
    stat_batches: Tuple[int, ...] = STAT_BATCHES
    stat_worlds: Tuple[int, ...] = STAT_WORLDS
    notes: List[str] = field(default_factory=list, compare=False)


PLANS: Dict[str, Plan] = {
    "smoke": Plan(stat_trials=10, stat_ranks=(("gloo", 2),), train_world=2, class_batches=(2,),
                  class_steps=10, seg_batches=(1,), seg_steps=4, seeds=(0,), mpi_arms=(),
                  mpi_batches=(), stat_batches=(1, 4), stat_worlds=(1, 2)),
    "quick": Plan(stat_trials=50, stat_ranks=(("gloo", 4), ("mpi", 4)), train_world=4,
                  class_batches=(1, 2, 4, 8), class_steps=120, seg_batches=(1, 2), seg_steps=120,
                  seeds=(0,), mpi_arms=("sync",), mpi_batches=(2,)),
    "full": Plan(stat_trials=200, stat_ranks=(("gloo", 2), ("gloo", 4), ("gloo", 8), ("mpi", 2),
                                              ("mpi", 4)),
                 train_world=4, class_batches=(1, 2, 4, 8), class_steps=200, seg_batches=(1, 2),
                 seg_steps=400, seeds=(0, 1, 2), mpi_arms=("local", "sync"), mpi_batches=(1,)),
}


@dataclass(frozen=True)
class Job:
    """One call: ``fn(*args)`` on ``world`` ranks over ``backend`` (``none``: in this process)."""

    kind: str
    backend: str
    world: int
    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    row: Dict[str, Any]


def jobs(plan: Plan) -> List[Job]:
    """Every run of the plan, grouped by (backend, world size) so each pool starts once."""
    out: List[Job] = []
    products = sorted({b * w for b in plan.stat_batches for w in plan.stat_worlds})
    out.append(Job("stats", "none", 1, tasks.rank_stats_errors, (tuple(products), plan.stat_trials),
                   {"source": "single process"}))
    for backend, world in plan.stat_ranks:
        out.append(Job("stats", backend, world, tasks.rank_stats_errors,
                       (plan.stat_batches, plan.stat_trials),
                       {"source": f"{world} ranks, {backend}"}))
    work = [("classification", b, plan.class_steps, plan.class_lr) for b in plan.class_batches]
    work += [("segmentation", b, plan.seg_steps, plan.seg_lr) for b in plan.seg_batches]
    world = plan.train_world
    for task, batch, steps, lr in work:
        for seed in plan.seeds:
            for arm in plan.arms:
                full = arm == "full"
                row = {"task": task, "arm": arm, "backend": "none" if full else "gloo",
                       "world_size": world, "per_rank_batch": batch, "global_batch": batch * world,
                       "seed": seed, "steps": steps, "lr": lr}
                out.append(Job("train", row["backend"], 1 if full else world, tasks.train_and_score,
                               (task, arm, batch * world if full else batch, steps, seed, lr), row))
            if seed == plan.seeds[0] and batch in plan.mpi_batches:
                for arm in plan.mpi_arms:
                    row = {"task": task, "arm": arm, "backend": "mpi", "world_size": world,
                           "per_rank_batch": batch, "global_batch": batch * world, "seed": seed,
                           "steps": steps, "lr": lr}
                    out.append(Job("train", "mpi", world, tasks.train_and_score,
                                   (task, arm, batch, steps, seed, lr), row))
    order = {("none", 1): 0}
    return sorted(out, key=lambda j: order.setdefault((j.backend, j.world), len(order)))


@contextlib.contextmanager
def _pools() -> Iterator[Callable[[str, int], RankPool]]:
    """One live pool at a time: a job for another (backend, W) closes the previous pool."""
    current: Dict[Tuple[str, int], RankPool] = {}

    def get(backend: str, world: int) -> RankPool:
        key = (backend, world)
        if key not in current:
            for pool in current.values():
                pool.close()
            current.clear()
            current[key] = RankPool(world, backend, timeout=900.0)
        return current[key]

    try:
        yield get
    finally:
        for pool in current.values():
            pool.close()


def run(plan: Plan) -> Dict[str, List[Dict[str, Any]]]:
    """Run every job with a progress bar; return the stats and training rows."""
    torch.set_num_threads(1)  # like each rank: tiny ops only lose from threads on a busy machine
    todo = jobs(plan)
    if find_mpiexec() is None:
        plan.notes.append("MPI runs skipped: no mpiexec")
        todo = [j for j in todo if j.backend != "mpi"]
    stats: List[Dict[str, Any]] = []
    training: List[Dict[str, Any]] = []
    with _pools() as pool_for, tqdm(todo, desc="accuracy study", unit="run") as bar:
        for job in bar:
            bar.set_postfix_str(f"{job.kind} {job.backend} W={job.world} "
                                f"{job.row.get('arm', '')} {job.row.get('per_rank_batch', '')}")
            start = time.perf_counter()
            if job.backend == "none":
                results = [job.fn(*job.args)]
            else:
                results = pool_for(job.backend, job.world).run(job.fn, *job.args)
            seconds = time.perf_counter() - start
            if job.kind == "stats":
                stats.extend(_stats_rows(job, results))
            else:
                training.append({**job.row, "score": results[0]["score"],
                                 "final_loss_per_rank": [r["final_loss"] for r in results],
                                 "seconds": round(seconds, 2)})
    return {"stats": stats, "training": training}


def _stats_rows(job: Job, results: List[Dict[int, Dict]]) -> List[Dict[str, Any]]:
    """Per batch: local error as the RMS over ranks, SyncBN's from rank 0 (the same everywhere)."""
    rows = []
    for batch in results[0]:
        local = [sum(r[batch]["local"][i] ** 2 for r in results) / len(results) for i in (0, 1)]
        rows.append({**job.row, "world_size": job.world, "per_rank_batch": batch,
                     "local_mean_err": local[0] ** 0.5, "local_var_err": local[1] ** 0.5,
                     "sync_mean_err": results[0][batch]["sync"][0],
                     "sync_var_err": results[0][batch]["sync"][1]})
    return rows


def plan_dict(plan: Plan) -> Dict[str, Any]:
    return asdict(plan)
