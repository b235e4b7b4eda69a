"""Issue 26: what one synchronized layer step costs against BatchNorm, in one run.

    python -m benchmarks.layer_cost [--quick] [--no-comm] [--out DIR] [--publish]

1. Compute, communication removed. Forward+backward of syncbn.SyncBatchNorm in a 2-rank group
   whose stand-in communicator sums two identical ranks (:class:`TwoIdenticalRanks`), against
   torch.nn.BatchNorm2d in the same process, interleaved (benchmarks/timing.py), per shape: the
   issue's five and ResNet-50's BatchNorm inputs at 2, 8 and 16 samples, NCHW and
   channels_last, fp32 and bf16, at 1 thread and at torch's default thread count. syncbn's
   compute is its step less the time spent in the stand-in's all-reduces. The CLI first keeps
   freed memory in glibc malloc's heap (:func:`keep_freed_memory`), so that page faults do not
   land on either peer at random.
2. Ops per layer step (:func:`ops_per_step`): every aten or custom op one step dispatches
   (TorchDispatchMode), views and the stand-in's own op not counted: syncbn's default path, its
   pure-torch fallback (the reference kernels), and BatchNorm2d.
3. With communication, W=2, over gloo and MPI: syncbn against the naive SyncBatchNorm
   (benchmarks/naive_syncbn.py) on ResNet-50's cases, in rank pools as ``benchmarks.run`` runs
   them (benchmarks/layer_bench.time_layer_case; over MPI the naive peer's all-reduces take a
   side gloo group, as it needs torch.distributed).

Each section is a Markdown table whose rows name the goal they are judged against (issue 26)
and whether it is met; the report and the raw results (JSON) go to --out. The machine's load is
stamped on the report: on a shared machine, figures are ratios of peers measured side by side.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn
from syncbn import kernels
from syncbn.comm import Communicator

from .aggregate import combine_layer, geometric_mean
from .layer_bench import make_layer_input, time_layer_case, training_step
from .machine import load_average, machine_stamp, stamp_line
from .plan import RESNET50_LAYERS, LayerCase, Setting
from .run import BENCHMARKS_MD, FIGURES_DIR, mpi_available, open_pool, replace_section
from .timing import Peer, TimingCommunicator, time_interleaved

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, read before any change
HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED_REPORT = "benchmarks/figures/layer_cost.md"  # from BENCHMARKS.md

# The issue's shapes and the compute goal of each (syncbn / BatchNorm2d at most): memory-bound
# shapes 1.15x; the small ones, where the host's work per op counts, 1.5x and 2.5x.
ISSUE_SHAPES: Dict[Tuple[int, ...], float] = {
    (16, 256, 56, 56): 1.15, (8, 64, 56, 56): 1.15, (4, 2048, 7, 7): 1.15,
    (2, 256, 14, 14): 1.5, (2, 64, 1, 1): 2.5,
}
MEMORY_BOUND_GOAL = 1.15
OPS_GOAL = 20  # torch ops per layer step at W >= 2 on CPU, default path
NAIVE_GOAL, NAIVE_MEMORY_BOUND_GOAL = 1.0, 1.3  # naive / syncbn at least, with communication
LAYOUTS = ("contiguous", "channels_last")
DTYPES = ("fp32", "bf16")


class TwoIdenticalRanks(Communicator):
    """A 2-rank group without communication: the reduced tensor is twice this rank's, the sum of
    two identical ranks. Its one op per call (``mul_``) is the stand-in's, not the layer's."""

    rank, size = 0, 2

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tensor.mul_(2)


# --- 1. compute, communication removed ------------------------------------------------------------

@dataclass(frozen=True)
class ComputePlan:
    shapes: Tuple[Tuple[int, ...], ...]
    threads: Tuple[int, ...]
    warmup: int
    reps: int


def compute_plan(mode: str) -> ComputePlan:
    if mode == "smoke":
        return ComputePlan(((2, 8, 4, 4), (2, 16, 1, 1)), (1,), warmup=1, reps=2)
    threads = tuple(sorted({1, DEFAULT_THREADS}))
    if mode == "quick":
        return ComputePlan(tuple(ISSUE_SHAPES), threads, warmup=1, reps=5)
    resnet50 = tuple((n, c) + spatial for c, spatial in RESNET50_LAYERS for n in (2, 8, 16))
    shapes = tuple(dict.fromkeys(tuple(ISSUE_SHAPES) + resnet50))  # the issue's first, no repeats
    # Medians of single steps on a shared machine: 25 keep a row steady between runs, 9 did not.
    return ComputePlan(shapes, threads, warmup=3, reps=25)


def compute_goal(shape: Tuple[int, ...]) -> float:
    return ISSUE_SHAPES.get(shape, MEMORY_BOUND_GOAL)


def time_compute_case(case: LayerCase, threads: int, warmup: int, reps: int) -> Dict[str, object]:
    """Median ms of BatchNorm2d's step and of syncbn's at W=2, interleaved, and the ratio of
    syncbn's compute to BatchNorm2d's step.

    syncbn's compute is its step less the stand-in's own time, timed around each all-reduce:
    that time stands in for the communication the goal leaves out, as section 3 counts a step's
    all-reduces apart from its compute (and section 2 leaves the stand-in's op out of the count).
    """
    torch.set_num_threads(threads)
    x, dy = make_layer_input(case, torch.device("cpu"))
    stand_in = TimingCommunicator(TwoIdenticalRanks())
    peers = [Peer("BatchNorm", training_step(torch.nn.BatchNorm2d(case.channels), x, dy)),
             Peer("syncbn", training_step(syncbn.SyncBatchNorm(case.channels, process_group=stand_in), x, dy),
                  stand_in)]
    samples = time_interleaved(peers, warmup, reps, barrier=lambda: None, sync=lambda: None)
    batchnorm, synced = samples["BatchNorm"].summary(), samples["syncbn"].summary()
    return {"shape": list(case.shape), "layout": case.layout, "dtype": case.dtype, "threads": threads,
            "batchnorm_ms": batchnorm["ms"], "syncbn_step_ms": synced["ms"],
            "stand_in_ms": synced["comm_ms"], "syncbn_ms": synced["compute_ms"],
            "ratio": synced["compute_ms"] / batchnorm["ms"], "goal": compute_goal(case.shape)}


def run_compute(plan: ComputePlan, progress: Callable[[str], None]) -> List[Dict[str, object]]:
    rows = []
    try:
        for threads in plan.threads:
            for shape in plan.shapes:
                for dtype in DTYPES:
                    for layout in LAYOUTS:
                        case = LayerCase(shape[0], shape[1], tuple(shape[2:]), dtype, layout)
                        progress(f"compute {case.label}, {threads} thread(s)")
                        rows.append(time_compute_case(case, threads, plan.warmup, plan.reps))
    finally:
        torch.set_num_threads(DEFAULT_THREADS)
    return rows


# --- 2. ops per layer step ---------------------------------------------------------------------

class OpCount(TorchDispatchMode):
    """Ops dispatched while active, by name; views (no new storage, no compute) not counted."""

    VIEWS = {"view", "_unsafe_view", "reshape", "expand", "as_strided", "detach", "alias", "t",
             "unsqueeze", "squeeze", "select", "slice", "permute", "split", "unbind"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor,
                 stand_in: Optional[TwoIdenticalRanks] = None) -> collections.Counter:
    """The ops of one forward+backward after one warm-up step (gradients then accumulate, as in
    training), the stand-in communicator's own ``mul_`` per call taken out."""
    module(x).backward(dy)
    calls_before = stand_in.calls if stand_in is not None else 0
    with OpCount() as counted:
        module(x).backward(dy)
    if stand_in is not None:
        counted.ops["aten::mul_"] -= stand_in.calls - calls_before
    return +counted.ops  # drops the zero counts


def reference_kernels() -> mock._patch:
    """syncbn's pure-torch fallback: every input takes the reference kernels while active."""
    return mock.patch.object(kernels, "for_input", lambda x: kernels.reference)


def run_ops(shape: Tuple[int, ...] = (2, 64, 4, 4)) -> List[Dict[str, object]]:
    """Ops per step of syncbn (default path, then the fallback) and BatchNorm2d on ``shape``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).requires_grad_()
    dy = torch.randn(shape, generator=generator)
    rows = []
    for name, kernels_used in (("syncbn (default path)", contextlib.nullcontext()),
                               ("syncbn (reference kernels)", reference_kernels())):
        stand_in = TwoIdenticalRanks()
        layer = syncbn.SyncBatchNorm(shape[1], process_group=stand_in)
        with kernels_used:
            ops = ops_per_step(layer, x, dy, stand_in)
            backend = kernels.for_input(x).__name__
        rows.append({"peer": name, "backend": backend, "ops": sum(ops.values()), "by_op": dict(ops)})
    ops = ops_per_step(torch.nn.BatchNorm2d(shape[1]), x, dy)
    rows.append({"peer": "BatchNorm2d", "backend": "torch", "ops": sum(ops.values()), "by_op": dict(ops)})
    return rows


# --- 3. with communication, W=2 -------------------------------------------------------------------

def comm_cases(mode: str) -> List[LayerCase]:
    if mode == "smoke":
        return [LayerCase(2, 8, (4, 4))]
    batches = (2, 8) if mode == "quick" else (2, 8, 16)
    return [LayerCase(n, c, spatial) for c, spatial in RESNET50_LAYERS for n in batches]


def run_comm(mode: str, backends: List[str], progress: Callable[[str], None],
             warmup: int, reps: int) -> List[Dict[str, object]]:
    rows = []
    for backend in backends:
        setting = Setting(backend, 2)
        progress(f"starting 2 {backend} ranks")
        with open_pool(backend, 2, threads=1) as pool:
            for case in comm_cases(mode):
                progress(f"{setting.label} {case.label}")
                combined = combine_layer(pool.run(time_layer_case, setting, case, warmup, reps))
                syncbn_peer = combined["peers"]["syncbn"]
                memory_bound = syncbn_peer["compute_ms"] > syncbn_peer["comm_ms"]
                rows.append({"setting": setting.label, "backend": backend, "case": case.label,
                             "shape": list(case.shape), "peers": combined["peers"],
                             "naive_vs_syncbn": combined["ratios"].get("naive_vs_syncbn"),
                             "memory_bound": memory_bound,
                             "goal": NAIVE_MEMORY_BOUND_GOAL if memory_bound else NAIVE_GOAL})
    return rows


# --- the report ------------------------------------------------------------------------------------

def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(results: Dict[str, object], brief: bool = False) -> str:
    """The report; ``brief`` (BENCHMARKS.md): the compute table of the issue's shapes only, with a
    summary of every row and a link to the whole report."""
    lines = [f"Measured on: {stamp_line(results['machine'])}.", ""]
    compute = results["compute"]
    if compute:
        shown = [r for r in compute if tuple(r["shape"]) in ISSUE_SHAPES] if brief else compute
        lines += ["### Compute of a layer step at W=2, communication removed",
                  "",
                  "syncbn.SyncBatchNorm in a 2-rank group whose stand-in communicator sums two identical "
                  "ranks, against torch.nn.BatchNorm2d in the same process; forward+backward, peers "
                  f"interleaved, medians of {results['plans']['compute']['reps']} steps. syncbn's compute is "
                  "its step less the stand-in's own time (its two all-reduces, each a `mul_` of the "
                  "payload, timed around the call): the communication the goal leaves out. Allocator: "
                  f"{results.get('allocator', 'not recorded')} (benchmarks/layer_cost.py: `keep_freed_memory`).",
                  "",
                  "| shape (N, C, H, W) | dtype | layout | threads | BatchNorm2d (ms) | syncbn step (ms) | "
                  "of which the stand-in (ms) | syncbn compute / BatchNorm2d | goal |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in shown:
            lines.append(f"| {'x'.join(map(str, row['shape']))} | {row['dtype']} | {row['layout']} | "
                         f"{row['threads']} | {row['batchnorm_ms']:.3f} | {row['syncbn_step_ms']:.3f} | "
                         f"{row['stand_in_ms']:.3f} | {row['ratio']:.2f}x | "
                         f"<= {row['goal']:g}x: {_met(row['ratio'] <= row['goal'])} |")
        missed = [r for r in compute if r["ratio"] > r["goal"]]
        lines += ["", f"{len(compute) - len(missed)} of {len(compute)} rows meet their goal; geo-mean "
                  f"{geometric_mean(r['ratio'] for r in compute):.2f}x."
                  + (f" Every row (ResNet-50's shapes too): [layer_cost.md]({PUBLISHED_REPORT})." if brief else ""),
                  ""]
    ops = results["ops"]
    if ops:
        lines += ["### Torch ops per layer step at W=2 (CPU)", "",
                  "Every op one forward+backward dispatches (TorchDispatchMode), views and the stand-in "
                  "communicator's own op not counted; an affine layer with running statistics.", "",
                  "| peer | kernels | ops | goal | which |", "|---|---|---|---|---|"]
        for row in ops:
            goal = f"<= {OPS_GOAL}: {_met(row['ops'] <= OPS_GOAL)}" if row["peer"] == "syncbn (default path)" else ""
            which = ", ".join(f"{name.split('::')[1]} x{n}" if n > 1 else name.split("::")[1]
                              for name, n in sorted(row["by_op"].items(), key=lambda item: -item[1]))
            lines.append(f"| {row['peer']} | {row['backend']} | {row['ops']} | {goal} | {which} |")
        lines.append("")
    comm = results["comm"]
    if comm:
        lines += ["### With communication, W=2: naive SyncBatchNorm against syncbn", "",
                  "ResNet-50 cases, 1 thread per rank, medians of the slowest rank; over MPI the naive "
                  "peer's all-reduces run over a side gloo group. A case is memory-bound when syncbn's "
                  "compute outweighs its all-reduces there.", "",
                  "| setting | case | syncbn (ms) | of which all-reduces (ms) | naive (ms) | "
                  "naive / syncbn | goal |", "|---|---|---|---|---|---|---|"]
        for row in comm:
            peers, ratio = row["peers"], row["naive_vs_syncbn"]
            lines.append(f"| {row['setting']} | {row['case']} | {peers['syncbn']['ms']:.3f} | "
                         f"{peers['syncbn']['comm_ms']:.3f} | {peers['naive']['ms']:.3f} | {ratio:.2f}x | "
                         f">= {row['goal']:g}x{' (memory-bound)' if row['memory_bound'] else ''}: "
                         f"{_met(ratio >= row['goal'])} |")
        lines.append("")
    return "\n".join(lines)


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory() -> str:
    """Tensors up to 32 MiB from glibc malloc's heap, and freed memory kept there: what this
    process's allocator does, as the report states it.

    By default glibc hands a freed block back to the system at times that depend on the
    allocation history, and whichever peer allocates next maps it again: thousands of page faults
    (8-10 ms at 16x256x56x56 bf16, a third of a step) that land on either peer at random. Kept,
    the steps mostly reuse mapped pages (the kernel may still reclaim some), as they do with the
    jemalloc or tcmalloc that PyTorch's CPU performance guide recommends. Tensors above 32 MiB
    (glibc's limit) are mapped afresh every step, by both peers alike. The command sets it; it
    stays set for the life of the process.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "the platform's default allocator"
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        return "glibc malloc's defaults (mallopt refused)"
    return "glibc malloc, tensors up to 32 MiB from its heap, freed memory kept (mallopt)"


def main(argv: Optional[List[str]] = None, allocator: str = "as the caller left it") -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the issue's shapes only, fewer repetitions")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, gloo only (tests)")
    parser.add_argument("--no-comm", action="store_true", help="skip section 3 (rank pools)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "layer_cost"))
    parser.add_argument("--publish", action="store_true",
                        help="copy the report to benchmarks/figures/ and rewrite BENCHMARKS.md's section")
    args = parser.parse_args(argv)
    run_mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    def progress(what: str) -> None:
        print(f"[layer_cost] {what}", file=sys.stderr, flush=True)

    plan = compute_plan(run_mode)
    results: Dict[str, object] = {"machine": machine_stamp(), "mode": run_mode,
                                  "plans": {"compute": plan.__dict__}, "allocator": allocator}
    results["compute"] = run_compute(plan, progress)
    results["ops"] = run_ops()
    backends = [] if args.no_comm else ["gloo"] + (["mpi"] if mpi_available() and run_mode != "smoke" else [])
    results["comm"] = run_comm(run_mode, backends, progress, warmup=plan.warmup, reps=plan.reps)
    results["machine"]["load_after"] = load_average()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_cost.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    report = render(results)
    with open(os.path.join(args.out, "layer_cost.md"), "w") as handle:
        handle.write(report)
    if args.publish:
        publish(results, report)
    print(report)
    return results


def publish(results: Dict[str, object], report: str) -> None:
    """The whole report to benchmarks/figures/; its brief form to BENCHMARKS.md's section."""
    os.makedirs(FIGURES_DIR, exist_ok=True)
    with open(os.path.join(FIGURES_DIR, "layer_cost.md"), "w") as handle:
        handle.write(report)
    command = "python -m benchmarks.layer_cost" + (" --quick" if results["mode"] == "quick" else "")
    replace_section(BENCHMARKS_MD, "layer_cost", "\n".join([
        "## Layer cost against BatchNorm (CPU)", "",
        f"`{command} --publish` (issue 26: what exact statistics cost).", "",
        render(results, brief=True)]))


if __name__ == "__main__":
    main(allocator=keep_freed_memory())  # the command alone: a test's process keeps its allocator
