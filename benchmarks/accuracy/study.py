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
    """What one mode runs. ``train_world`` ranks train every distributed arm.

    Every arm is trained at every learning rate of ``lrs`` (GroupNorm also at every group size
    of ``group_channels``) with the first seed; the configuration with the best validation
    score is the arm's setting, which the other seeds and the MPI repeats then use.
    """

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
    lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    group_channels: Tuple[int, ...] = (1, 4)      # GroupNorm channels per group (1: InstanceNorm)
    arms: Tuple[str, ...] = tasks.ARMS
    stat_batches: Tuple[int, ...] = STAT_BATCHES
    stat_worlds: Tuple[int, ...] = STAT_WORLDS
    notes: List[str] = field(default_factory=list, compare=False)


PLANS: Dict[str, Plan] = {
    "smoke": Plan(stat_trials=10, stat_ranks=(("gloo", 2),), train_world=2, class_batches=(2,),
                  class_steps=10, seg_batches=(1,), seg_steps=4, seeds=(0,), mpi_arms=(),
                  mpi_batches=(), stat_batches=(1, 4), stat_worlds=(1, 2), lrs=(3e-3, 1e-2),
                  group_channels=(1, 4)),
    "quick": Plan(stat_trials=50, stat_ranks=(("gloo", 4), ("mpi", 4)), train_world=4,
                  class_batches=(1, 8), class_steps=120, seg_batches=(1,), seg_steps=200,
                  seeds=(0,), mpi_arms=("sync",), mpi_batches=(1,)),
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


Config = Tuple[float, int]  # (peak learning rate, GroupNorm channels per group)


def arm_configs(plan: Plan, arm: str) -> List[Config]:
    """The grid an arm is tuned on; the group size only varies for GroupNorm."""
    sizes = plan.group_channels if arm == "group" else (tasks.DEFAULT_GROUP_CHANNELS,)
    return [(lr, g) for g in sizes for lr in plan.lrs]


def _work(plan: Plan) -> List[Tuple[str, int, int]]:
    return ([("classification", b, plan.class_steps) for b in plan.class_batches]
            + [("segmentation", b, plan.seg_steps) for b in plan.seg_batches])


def _train_job(plan: Plan, task: str, arm: str, batch: int, steps: int, seed: int,
               config: Config, backend: str = "gloo", phase: str = "grid") -> Job:
    world = plan.train_world
    one_process = arm in tasks.ONE_PROCESS_ARMS
    backend = "none" if one_process else backend
    lr, group_channels = config
    row = {"task": task, "arm": arm, "backend": backend, "world_size": world,
           "per_rank_batch": batch, "global_batch": batch * world, "seed": seed, "steps": steps,
           "lr": lr, "group_channels": group_channels, "phase": phase}
    return Job("train", backend, 1 if one_process else world, tasks.train_and_score,
               (task, arm, batch * world if one_process else batch, steps, seed, lr,
                group_channels), row)


def _grouped_by_pool(out: List[Job]) -> List[Job]:
    order = {("none", 1): 0}
    return sorted(out, key=lambda j: order.setdefault((j.backend, j.world), len(order)))


def jobs(plan: Plan) -> List[Job]:
    """The statistics runs and the grid (first seed), grouped by (backend, world size) so each
    pool starts once."""
    out: List[Job] = []
    products = sorted({b * w for b in plan.stat_batches for w in plan.stat_worlds})
    out.append(Job("stats", "none", 1, tasks.rank_stats_errors, (tuple(products), plan.stat_trials),
                   {"source": "single process"}))
    for backend, world in plan.stat_ranks:
        out.append(Job("stats", backend, world, tasks.rank_stats_errors,
                       (plan.stat_batches, plan.stat_trials),
                       {"source": f"{world} ranks, {backend}"}))
    for task, batch, steps in _work(plan):
        for arm in plan.arms:
            for config in arm_configs(plan, arm):
                out.append(_train_job(plan, task, arm, batch, steps, plan.seeds[0], config))
    return _grouped_by_pool(out)


def best_configs(training: List[Dict[str, Any]]) -> Dict[Tuple[str, int, str], Config]:
    """Per (task, per-rank batch, arm): the grid configuration with the best validation score
    (the first of equals, in grid order)."""
    best: Dict[Tuple[str, int, str], Tuple[float, Config]] = {}
    for r in training:
        if r["phase"] != "grid":
            continue
        key = (r["task"], r["per_rank_batch"], r["arm"])
        if key not in best or r["val_score"] > best[key][0]:
            best[key] = (r["val_score"], (r["lr"], r["group_channels"]))
    return {key: config for key, (_, config) in best.items()}


def repeat_jobs(plan: Plan, best: Dict[Tuple[str, int, str], Config]) -> List[Job]:
    """The other seeds and the MPI repeats, each at its arm's selected configuration; and
    full-batch BN at SyncBN's selected configuration for the other seeds where that is not
    full-batch BN's own (phase "paired"), so SyncBN's gap to it is measured per seed at the same
    learning rate (the grid has every configuration for the first seed)."""
    out: List[Job] = []
    for task, batch, steps in _work(plan):
        for arm in plan.arms:
            config = best[(task, batch, arm)]
            for seed in plan.seeds[1:]:
                out.append(_train_job(plan, task, arm, batch, steps, seed, config,
                                      phase="repeat"))
            if batch in plan.mpi_batches and arm in plan.mpi_arms:
                out.append(_train_job(plan, task, arm, batch, steps, plan.seeds[0], config,
                                      backend="mpi", phase="mpi"))
        synced = best.get((task, batch, "sync"))
        if synced is not None and "full" in plan.arms and synced != best[(task, batch, "full")]:
            for seed in plan.seeds[1:]:
                out.append(_train_job(plan, task, "full", batch, steps, seed, synced,
                                      phase="paired"))
    return _grouped_by_pool(out)


def repeat_count(plan: Plan) -> int:
    """The repeats known before the grid has run (the paired runs depend on its outcome)."""
    per_pair = len(plan.arms) * (len(plan.seeds) - 1)
    mpi = sum(b in plan.mpi_batches for _, b, _ in _work(plan)) * len(plan.mpi_arms)
    return len(_work(plan)) * per_pair + mpi


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
    """Run every job with a progress bar: statistics, the grid, then the repeats at each arm's
    selected configuration; return the stats and training rows."""
    torch.set_num_threads(1)  # like each rank: tiny ops only lose from threads on a busy machine
    with_mpi = find_mpiexec() is not None
    if not with_mpi:
        plan.notes.append("MPI runs skipped: no mpiexec")
    stats: List[Dict[str, Any]] = []
    training: List[Dict[str, Any]] = []
    todo = [j for j in jobs(plan) if with_mpi or j.backend != "mpi"]
    with _pools() as pool_for, tqdm(total=len(todo) + repeat_count(plan), desc="accuracy study",
                                    unit="run") as bar:
        for phase in ("grid", "repeats"):
            if phase == "repeats":
                todo = [j for j in repeat_jobs(plan, best_configs(training))
                        if with_mpi or j.backend != "mpi"]
                bar.total = bar.n + len(todo)
                bar.refresh()
            for job in todo:
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
                                     "val_score": results[0]["val_score"],
                                     "final_loss_per_rank": [r["final_loss"] for r in results],
                                     "seconds": round(seconds, 2)})
                bar.update()
    best = best_configs(training)
    for row in training:
        row["selected"] = best[(row["task"], row["per_rank_batch"], row["arm"])] == (
            row["lr"], row["group_channels"])
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
