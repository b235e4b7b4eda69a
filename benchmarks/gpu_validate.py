"""Validate and measure syncbn's GPU path in one command: ``python -m benchmarks.gpu_validate --out DIR``.

What is measured is syncbn's *group* path: its layer takes a communicator that reports two
ranks and reduces over a real torch.distributed group (:class:`TwoRankStandIn`: with one GPU,
NCCL at world size 1, each all-reduce the sum of two identical ranks). A layer in a group of
one would be cuDNN's BatchNorm, not syncbn's kernels. torch.nn.SyncBatchNorm stands on the same
footing: its autograd Function (torch.nn.modules._functions.SyncBatchNorm) called directly with
that NCCL group, so its synchronized kernels run, not its world-size-1 shortcut.

Sections (each with its CPU form, or what it would measure, under ``--dry-run``):

- tests: tests/test_gpu.py and tests/test_triton_kernels.py (parity, no host sync, CUDA graphs,
  torch.compile, the kernels compiled on CUDA and in Triton's interpreter);
- layers: forward+backward per layer on ResNet-50 BatchNorm shapes (N = 2, 8, 32 per rank; fp32
  and bf16; contiguous and channels_last), interleaved: syncbn, torch.nn.SyncBatchNorm's sync
  path, cuDNN BatchNorm2d, and the collectives syncbn sends (its forward payload,
  ``functional.forward_payload_numel(C)`` fp64, and the backward's 2C fp64, through the same
  communicator): "cuDNN BN + collectives" is what the 1.2x target divides by;
- kernels: each syncbn kernel's time (torch.profiler, names matched exactly) and achieved
  bandwidth against the measured device-to-device copy bandwidth;
- launches: kernels launched per layer step (profiler on GPU; on ``meta`` in the dry run, see
  benchmarks/launches.py), syncbn against torch.nn.SyncBatchNorm;
- host syncs per step (``set_sync_debug_mode("warn")``), CUDA-graph replay against eager,
  torch.compile graph breaks on the group path;
- tuning (``--tune``): the kernels' launch configuration (tile, num_warps, programs per SM)
  swept on the layer shapes; prints the best per shape for syncbn/kernels/triton.py's table.

Writes DIR/gpu_validate.json and DIR/gpu_validate.md and prints the targets. Without CUDA it
exits with status 2, unless ``--dry-run``: then it runs every section that has a CPU form on
tiny shapes (the Triton kernels in Triton's interpreter, gloo on CPU in place of NCCL) and
prints which syncbn kernels each one ran, so anyone can check that what the GPU run times is
syncbn's path; the sections with no CPU form (NCCL, CUDA graphs, copy bandwidth, host syncs)
print what they would measure and with which kernels. The dry run fails if a kernel it saw has
no entry in the bandwidth table, or if syncbn's step leaves the Triton kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

import syncbn
from syncbn.comm import Communicator
from syncbn.functional import forward_payload_numel
from syncbn.kernels import triton as triton_backend

from .gpu import copy_bandwidth_gbps
from .launches import (LAUNCH_BUDGET, Launches, kernel_name, syncbn_launches_on_meta,
                       torch_syncbn_launches_on_meta)
from .plan import DTYPES, RESNET50_LAYERS, LayerCase
from .timing import Peer, median_ms, time_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (2, 8, 32)
MEDIAN_CASE = (8, 512, (28, 28))  # middle layer, middle batch
SPEEDUP_TARGET = 1.3  # vs torch.nn.SyncBatchNorm on the median shape, never below 1.0
COLLECTIVES_OVERHEAD_TARGET = 1.2  # syncbn / (cuDNN BN + its two all-reduces)
BANDWIDTH_TARGET = 0.7  # of the copy peak, per kernel, tensors above BANDWIDTH_MIN_BYTES
BANDWIDTH_MIN_BYTES = 32 * 2**20
# The dry run's shapes: tiny, in both layouts and a half dtype, and a 3x3 image (small spatial
# sizes are tiled over samples too).
DRY_RUN_CASES = (LayerCase(2, 8, (4, 4)), LayerCase(2, 8, (4, 4), "bf16", "channels_last"),
                 LayerCase(3, 16, (3, 3)))


def kernel_traffic() -> Dict[str, int]:
    """Passes over the layer's tensor each syncbn kernel makes, by exact kernel name (0: the
    kernel touches per-channel values only; timed, but kept out of the bandwidth target)."""
    tk = triton_backend
    passes = {tk._stats_kernel: 1,  # reads x
              tk._payload_kernel: 0, tk._finalize_kernel: 0, tk._grad_fold_kernel: 0,
              tk._normalize_activate_kernel: 2,  # reads x, writes y
              tk._grad_stats_kernel: 2,  # reads x, dy
              tk._input_grad_kernel: 3,  # reads x, dy, writes dx
              tk._activated_grad_stats_kernel: 2, tk._activated_input_grad_kernel: 3}
    return {kernel_name(kernel): n for kernel, n in passes.items()}


class TwoRankStandIn(Communicator):
    """Reports two ranks; reduces over a real torch.distributed ``group`` as the sum of two
    identical ranks, so every check on the reduced payload sees a consistent group of two.

    NCCL does it in its one all-reduce (PREMUL_SUM by 2: no extra launch); other backends, or a
    torch without that op, add a ``mul_(2)`` after the all-reduce.
    """

    rank, size = 0, 2

    def __init__(self, group=None):
        self.group = group
        self.backend = str(dist.get_backend(group))
        self._premul = None
        if self.backend == "nccl" and hasattr(dist, "_make_nccl_premul_sum"):
            self._premul = dist._make_nccl_premul_sum(2.0)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._premul is not None:
            try:
                dist.all_reduce(tensor, op=self._premul, group=self.group)
                return tensor
            except (RuntimeError, ValueError):  # an NCCL without it: sum, then double
                self._premul = None
        dist.all_reduce(tensor, group=self.group)
        return tensor.mul_(2)

    def describe(self) -> str:
        return f"two-rank stand-in over {self.backend} (world size {dist.get_world_size(self.group)})"


def _run_tests(out: Optional[str]) -> Dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
               "tests/test_triton_kernels.py"]
    if out:
        command.append(f"--junitxml={os.path.join(out, 'gpu_tests.xml')}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "summary": (done.stdout.strip().splitlines() or [""])[-1], "tail": done.stdout[-4000:]}


def _init_group(backend: str, workdir: str) -> None:
    store = dist.FileStore(os.path.join(workdir, "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def _cases() -> List[LayerCase]:
    return [LayerCase(n, c, spatial, dtype, layout) for c, spatial in RESNET50_LAYERS for n in BATCHES
            for dtype in DTYPES for layout in ("contiguous", "channels_last")]


def _inputs(case: LayerCase, device: str) -> tuple:
    x = torch.randn(case.shape, device=device, dtype=DTYPES[case.dtype])
    dy = torch.randn_like(x)
    if case.layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.requires_grad_(), dy


def layer_steps(case: LayerCase, device: str, comm: Communicator) -> Dict[str, Callable[[], None]]:
    """One forward+backward of each peer on the same input; the collectives alone too.

    torch.nn.SyncBatchNorm's Function needs CUDA (its statistics ops have no CPU kernel).
    """
    x, dy = _inputs(case, device)
    channels = case.channels
    ours = syncbn.SyncBatchNorm(channels, process_group=comm).to(device)
    plain = torch.nn.BatchNorm2d(channels).to(device)
    # What syncbn sends, the same way: the forward payload and the backward's sums.
    payloads = (torch.zeros(forward_payload_numel(channels), dtype=torch.float64, device=device),
                torch.zeros(2 * channels, dtype=torch.float64, device=device))

    def step(forward: Callable[[torch.Tensor], torch.Tensor],
             module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:  # gradients cleared as a training loop does: no accumulation
            for tensor in [x, *module.parameters()]:
                tensor.grad = None
            forward(x).backward(dy)
        return run

    def collectives() -> None:
        for payload in payloads:
            comm.all_reduce_sum_(payload)

    steps = {"syncbn": step(ours, ours)}
    if device == "cuda":
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

        theirs = torch.nn.SyncBatchNorm(channels).to(device)
        steps["torch_syncbn"] = step(lambda t: TorchSyncFunction.apply(
            t, theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var, theirs.eps,
            theirs.momentum, dist.group.WORLD, dist.get_world_size()), theirs)
    steps["cudnn_bn"] = step(plain, plain)
    steps["collectives"] = collectives
    return steps


def profiled_kernels(run: Callable[[], None], steps: int = 5) -> Dict[str, Dict[str, float]]:
    """Per kernel name: launches and device µs per step (torch.profiler, CUDA activity)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    found = {}
    for event in profile.key_averages():
        if event.device_time_total > 0 and event.count > 0:
            found[event.key] = {"launches": event.count / steps,
                                "us": event.device_time_total / steps}
    return found


def _is_collective(name: str) -> bool:
    return name.lower().startswith("nccl")


def kernel_bandwidth(case: LayerCase, kernels: Dict[str, Dict[str, float]],
                     peak_gbps: float) -> Dict[str, Dict]:
    """Each syncbn kernel's time per step and achieved bandwidth (exact names only)."""
    nbytes = torch.Size(case.shape).numel() * DTYPES[case.dtype].itemsize
    traffic = kernel_traffic()
    out = {}
    for name, seen in kernels.items():
        if name not in traffic:
            continue
        row = {"us": seen["us"], "launches": seen["launches"]}
        if traffic[name]:
            gbps = traffic[name] * nbytes * seen["launches"] / (seen["us"] * 1e-6) / 1e9
            row.update(gbps=gbps, peak_fraction=gbps / peak_gbps)
        out[name] = row
    return out


def launches_per_step(kernels: Dict[str, Dict[str, float]]) -> float:
    """Kernels a step launched (profiler), NCCL's own kernels excluded."""
    return sum(seen["launches"] for name, seen in kernels.items() if not _is_collective(name))


def host_syncs_per_step(run: Callable[[], None], steps: int = 3) -> float:
    """Synchronizing CUDA calls per step, counted from set_sync_debug_mode("warn") warnings."""
    run()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def _event_ms(run: Callable[[], None], reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_vs_eager_ms(run: Callable[[], None], reps: int = 50) -> Dict[str, float]:
    """One layer step captured in a CUDA graph: replay time against eager time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    eager_ms, replay_ms = _event_ms(run, reps), _event_ms(graph.replay, reps)
    return {"eager_ms": eager_ms, "replay_ms": replay_ms, "speedup": eager_ms / replay_ms}


def _measure_case(case: LayerCase, comm: Communicator, peak_gbps: float, warmup: int,
                  reps: int) -> Dict:
    steps = layer_steps(case, "cuda", comm)
    row: Dict = {"case": case.label, "shape": list(case.shape), "dtype": case.dtype,
                 "layout": case.layout,
                 "megabytes": torch.Size(case.shape).numel() * DTYPES[case.dtype].itemsize / 2**20}
    peers = []
    for name, run in steps.items():
        try:
            run()
            peers.append(Peer(name, run))
        except Exception as error:  # a peer that cannot run this case is reported, not fatal
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"
    samples = time_interleaved(peers, warmup, reps, barrier=lambda: None, sync=torch.cuda.synchronize)
    row["ms"] = {name: median_ms(s.seconds) for name, s in samples.items()}
    ms = row["ms"]
    if "torch_syncbn" in ms and "syncbn" in ms:
        row["speedup_vs_torch_syncbn"] = ms["torch_syncbn"] / ms["syncbn"]
    if "cudnn_bn" in ms and "syncbn" in ms:
        row["vs_cudnn_plus_collectives"] = ms["syncbn"] / (ms["cudnn_bn"] + ms["collectives"])
    ours = profiled_kernels(steps["syncbn"])
    row["kernels"] = kernel_bandwidth(case, ours, peak_gbps)
    # Whatever else the step ran (torch ops; a syncbn kernel whose device name differs from its
    # Python name would show here, and be missing above).
    row["other_kernels"] = sorted(set(ours) - set(kernel_traffic()))
    row["launches"] = {"syncbn": launches_per_step(ours)}
    if "torch_syncbn" in ms:
        row["launches"]["torch_syncbn"] = launches_per_step(profiled_kernels(steps["torch_syncbn"]))
    return row


def _compile_breaks(device: str, comm: Communicator) -> Dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gpu import compiled_vs_eager

    breaks, reasons = compiled_vs_eager(device, process_group=comm)
    return {"graph_breaks": breaks, "reasons": reasons}


# ----- tuning ----------------------------------------------------------------------------------

def tuning_configs() -> List[Dict[str, object]]:
    """Launch configurations the sweep tries: tile elements, warps, programs per SM."""
    return [{"tile": tile, "num_warps": warps, "programs_per_sm": per_sm}
            for tile in (1024, 2048, 4096) for warps in (2, 4, 8) for per_sm in (4, 8, 16)]


@contextlib.contextmanager
def configured(config: Dict[str, object]) -> Iterator[None]:
    """The Triton backend launches with ``config`` for the length of a with-block."""
    tk = triton_backend
    saved = (tk._TILE, tk._NUM_WARPS, tk._PROGRAMS_PER_SM)
    tk._TILE = config["tile"]
    tk._NUM_WARPS = {size: config["num_warps"] for size in saved[1]}
    tk._PROGRAMS_PER_SM = config["programs_per_sm"]
    try:
        yield
    finally:
        tk._TILE, tk._NUM_WARPS, tk._PROGRAMS_PER_SM = saved


def tune(cases: List[LayerCase], comm: Communicator, device: str, warmup: int, reps: int,
         configs: List[Dict[str, object]]) -> List[Dict]:
    """Per case, every configuration's syncbn step time; the best one first."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for case in cases:
        timed = []
        for config in configs:
            with configured(config):
                run = layer_steps(case, device, comm)["syncbn"]
                samples = time_interleaved([Peer("syncbn", run)], warmup, reps, lambda: None, sync)
                timed.append({**config, "ms": median_ms(samples["syncbn"].seconds)})
        timed.sort(key=lambda t: t["ms"])
        results.append({"case": case.label, "configs": timed})
    return results


# ----- targets and report -------------------------------------------------------------------------

def _target(name: str, measured: str, met: Optional[bool]) -> Dict:
    return {"target": name, "measured": measured,
            "status": "not measured" if met is None else ("met" if met else "missed")}


def evaluate_targets(report: Dict) -> List[Dict]:
    rows = report["layers"]
    speedups = [(r["speedup_vs_torch_syncbn"], r["case"]) for r in rows if "speedup_vs_torch_syncbn" in r]
    batch, channels, spatial = MEDIAN_CASE
    median_label = f"{channels}x{'x'.join(map(str, spatial))} N={batch}"
    at_median = [(v, c) for v, c in speedups if c.startswith(median_label)]
    overheads = [(r["vs_cudnn_plus_collectives"], r["case"]) for r in rows if "vs_cudnn_plus_collectives" in r]
    fractions = [(k["peak_fraction"], f"{r['case']} {name}") for r in rows
                 if r["megabytes"] * 2**20 > BANDWIDTH_MIN_BYTES
                 for name, k in r["kernels"].items() if "peak_fraction" in k]
    launches = [(r["launches"]["syncbn"], r["case"]) for r in rows]
    syncs = report["host_syncs_per_step"]["syncbn"]
    breaks = report["compile"].get("graph_breaks")

    def show(pairs, worst) -> str:
        value, case = worst(pairs)
        return f"worst {value:.2f} ({case}); median {statistics.median(v for v, _ in pairs):.2f}"

    return [
        _target(f">= {SPEEDUP_TARGET}x faster than torch.nn.SyncBatchNorm on the median shape "
                f"({median_label}, each dtype and layout)",
                show(at_median, min) if at_median else "-",
                min(v for v, _ in at_median) >= SPEEDUP_TARGET if at_median else None),
        _target("never slower than torch.nn.SyncBatchNorm (every case)",
                show(speedups, min) if speedups else "-",
                min(v for v, _ in speedups) >= 1.0 if speedups else None),
        _target(f"within {COLLECTIVES_OVERHEAD_TARGET}x of cuDNN BN + the two all-reduces",
                show(overheads, max) if overheads else "-",
                max(v for v, _ in overheads) <= COLLECTIVES_OVERHEAD_TARGET if overheads else None),
        _target(f">= {BANDWIDTH_TARGET:.0%} of copy bandwidth per kernel above 32 MB",
                show(fractions, min) if fractions else "-",
                min(v for v, _ in fractions) >= BANDWIDTH_TARGET if fractions else None),
        _target(f"<= {LAUNCH_BUDGET} launches per layer step (all-reduces excluded)",
                show(launches, max) if launches else "-",
                max(v for v, _ in launches) <= LAUNCH_BUDGET if launches else None),
        _target("0 host syncs per training step", f"{syncs:g}", syncs == 0),
        _target("0 torch.compile graph breaks (group path)", f"{breaks}",
                None if breaks is None else breaks == 0),
        _target("GPU tests pass (parity, no sync, CUDA graphs = eager, torch.compile, kernels)",
                report["tests"]["summary"], report["tests"]["returncode"] in (0, None)
                if report["tests"]["returncode"] is not None else None),
    ]


def markdown(report: Dict) -> str:
    lines = [f"# GPU validation: {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, copy bandwidth "
             f"{report['peak_gbps']:.0f} GB/s. syncbn's group path: {report['communicator']}. "
             "Times: median ms per forward+backward.", "",
             "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in report["targets"]]
    lines += ["", "| case | syncbn | torch SyncBN | cuDNN BN | all-reduces | speedup | / (BN + coll.) |"
              " launches (syncbn / torch) | min kernel copy fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        ms = r["ms"]
        cells = [f"{ms[p]:.3f}" if p in ms else "error"
                 for p in ("syncbn", "torch_syncbn", "cudnn_bn", "collectives")]
        fraction = min((k["peak_fraction"] for k in r["kernels"].values() if "peak_fraction" in k),
                       default=float("nan"))
        launches = r["launches"]
        lines.append(f"| {r['case']} | " + " | ".join(cells)
                     + f" | {r.get('speedup_vs_torch_syncbn', 0):.2f} "
                     f"| {r.get('vs_cudnn_plus_collectives', 0):.2f} "
                     f"| {launches['syncbn']:g} / {launches.get('torch_syncbn', float('nan')):g} "
                     f"| {fraction:.2f} |")
    graph, compiled = report["cuda_graph"], report["compile"]
    lines += ["", "Host syncs per step: " + ", ".join(f"{k} {v:g}" for k, v in report["host_syncs_per_step"].items()),
              "", "CUDA graph (syncbn layer step): " + "; ".join(
                  f"{case}: eager {g['eager_ms']:.3f} ms, replay {g['replay_ms']:.3f} ms"
                  if "eager_ms" in g else f"{case}: {g.get('error')}" for case, g in graph.items()),
              "", f"torch.compile graph breaks (conv+SyncBatchNorm+ReLU, group path): "
              f"{compiled.get('graph_breaks')} ({'; '.join(compiled.get('reasons', [compiled.get('error', '')]))})",
              "", f"Tests: {report['tests']['summary']}"]
    for tuned in report.get("tuning", []):
        best = tuned["configs"][0]
        lines.append(f"Tuning {tuned['case']}: best tile {best['tile']}, num_warps {best['num_warps']}, "
                     f"{best['programs_per_sm']} programs/SM ({best['ms']:.3f} ms)")
    return "\n".join(lines) + "\n"


# ----- dry run ------------------------------------------------------------------------------------

def _kernels_ran(run: Callable[[], None]) -> Launches:
    with Launches(run_kernels=True) as launches:
        run()
    return launches


def dry_run(args: argparse.Namespace) -> int:
    """Every section with a CPU form on tiny shapes, in Triton's interpreter; the rest described."""
    problems: List[str] = []
    report: Dict = {"mode": "dry run (Triton interpreter on CPU, gloo in place of NCCL)"}
    print(f"gpu_validate --dry-run: {report['mode']}; torch {torch.__version__}")
    if args.skip_tests:
        print("[tests] skipped (--skip-tests)")
    else:
        report["tests"] = _run_tests(args.out)
        print(f"[tests] {report['tests']['command']}: {report['tests']['summary']}")
    _init_group("gloo", tempfile.mkdtemp(prefix="gpu-validate-"))
    comm = TwoRankStandIn(dist.group.WORLD)
    traffic = kernel_traffic()
    step_kernels: Dict[str, List[str]] = {}
    for case in DRY_RUN_CASES:
        steps = layer_steps(case, "cpu", comm)
        for name, run in steps.items():
            ran = _kernels_ran(run)
            names = ran.kernels()
            if name == "syncbn":
                step_kernels[case.label] = names
                if not names:
                    problems.append(f"syncbn's step ran no Triton kernel on {case.label}")
                problems += [f"kernel {k} has no entry in kernel_traffic()" for k in names
                             if k not in traffic]
            print(f"[layers] {case.label} {name}: ran {', '.join(names) or 'no syncbn kernel'}")
        print(f"[layers] {case.label} torch_syncbn: no CPU form (its statistics ops are CUDA-only); "
              "on GPU its autograd Function over the NCCL group")
    every_kernel = sorted({k for names in step_kernels.values() for k in names})
    print(f"[kernels] no CPU form: on GPU, profiles {', '.join(every_kernel)} by exact name; "
          f"bandwidth from passes {({k: traffic[k] for k in every_kernel if k in traffic})}")
    for shape, dtype, channels_last in [((4, 8, 5, 5), torch.float32, False),
                                        ((4, 8, 5, 5), torch.bfloat16, True)]:
        ours = syncbn_launches_on_meta(shape, dtype, channels_last)
        theirs = torch_syncbn_launches_on_meta(shape, dtype, channels_last)
        print(f"[launches] {shape} {dtype} channels_last={channels_last} on meta: syncbn "
              f"{ours.count()} (<= {LAUNCH_BUDGET}: {ours.describe()}), torch.nn.SyncBatchNorm "
              f"{theirs.count()}")
        if ours.count() > LAUNCH_BUDGET:
            problems.append(f"syncbn launches {ours.count()} > {LAUNCH_BUDGET} per step on meta")
        if ours.host_reads or ours.host_to_device:
            problems.append(f"syncbn's device step: host reads {ours.host_reads}, "
                            f"host-to-device {ours.host_to_device}")
    median = LayerCase(*MEDIAN_CASE).label
    for section, what in [
            ("host syncs", f"set_sync_debug_mode('warn') warnings over 3 steps of syncbn ({median})"),
            ("cuda graph", f"replay vs eager of one syncbn step ({median}, both layouts)"),
            ("copy bandwidth", "a 1 GiB device-to-device copy (the bandwidth peak)")]:
        print(f"[{section}] no CPU form: would measure {what}; syncbn's step runs "
              f"{', '.join(every_kernel)}")
    try:
        report["compile"] = _compile_breaks("cpu", comm)
        print(f"[compile] group path on CPU: {report['compile']['graph_breaks']} graph breaks")
    except Exception as error:  # the interpreter is not a compile target; report, go on
        print(f"[compile] group path on CPU could not run here: {type(error).__name__}: "
              f"{str(error)[:200]}")
    configs = tuning_configs()
    sample = [configs[0], configs[-1]]
    tuned = tune([DRY_RUN_CASES[0]], comm, "cpu", warmup=0, reps=1, configs=sample)
    print(f"[tuning] ran {len(sample)} of the {len(configs)} configurations once each on "
          f"{DRY_RUN_CASES[0].label} (timing nothing); on GPU: all of them on every layer shape")
    report["tuning"] = tuned
    dist.destroy_process_group()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def _rerun_in_interpreter(argv: List[str]) -> int:
    """TRITON_INTERPRET must be set before syncbn decorates its kernels: a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1", SYNCBN_TRITON="1")
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_validate", *argv], cwd=ROOT,
                          env=env).returncode


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpu_validate.json and .md (required on GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-tests", action="store_true", help="measure only")
    parser.add_argument("--tune", action="store_true", help="sweep the kernels' launch configuration")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run the CPU form of every section (Triton's interpreter)")
    args = parser.parse_args(argv)
    if args.dry_run:
        if not triton_backend.TRITON_AVAILABLE:
            print("gpu_validate --dry-run: triton is not installed", file=sys.stderr)
            return 2
        if not triton_backend.INTERPRETED:
            return _rerun_in_interpreter(argv)
        return dry_run(args)
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device here; run `python -m benchmarks.gpu_validate --out DIR` "
              "on a machine with an NVIDIA GPU (and triton installed), or --dry-run here.",
              file=sys.stderr)
        return 2
    if not args.out:
        parser.error("--out is required on a GPU")
    os.makedirs(args.out, exist_ok=True)
    import triton

    report: Dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__}
    report["tests"] = ({"summary": "skipped (--skip-tests)", "returncode": None} if args.skip_tests
                       else _run_tests(args.out))
    print(f"tests: {report['tests']['summary']}", flush=True)
    _init_group("nccl", tempfile.mkdtemp(prefix="gpu-validate-"))
    comm = TwoRankStandIn(dist.group.WORLD)
    report["communicator"] = comm.describe()
    report["peak_gbps"] = copy_bandwidth_gbps()
    report["layers"] = []
    for case in _cases():
        report["layers"].append(_measure_case(case, comm, report["peak_gbps"], args.warmup, args.reps))
        print(f"{case.label}: {report['layers'][-1]['ms']}", flush=True)
    median = {layout: layer_steps(LayerCase(*MEDIAN_CASE, "fp32", layout), "cuda", comm)
              for layout in ("contiguous", "channels_last")}
    report["host_syncs_per_step"] = {name: host_syncs_per_step(run) for name, run in median["contiguous"].items()
                                     if name != "collectives"}
    report["cuda_graph"] = {}
    for layout, steps in median.items():
        try:
            report["cuda_graph"][layout] = graph_vs_eager_ms(steps["syncbn"])
        except Exception as error:  # NCCL capture unsupported here: say so, go on
            report["cuda_graph"][layout] = {"error": f"{type(error).__name__}: {error}"}
    try:
        report["compile"] = _compile_breaks("cuda", comm)
    except Exception as error:
        report["compile"] = {"error": f"{type(error).__name__}: {error}"}
    if args.tune:
        report["tuning"] = tune([LayerCase(8, c, s) for c, s in RESNET50_LAYERS], comm, "cuda",
                                args.warmup, max(args.reps // 3, 5), tuning_configs())
    report["targets"] = evaluate_targets(report)
    with open(os.path.join(args.out, "gpu_validate.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(args.out, "gpu_validate.md"), "w") as handle:
        handle.write(markdown(report))
    for target in report["targets"]:
        print(f"[{target['status']}] {target['target']}: {target['measured']}")
    dist.destroy_process_group()
    return 0 if report["tests"]["returncode"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
