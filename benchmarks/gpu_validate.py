"""Validate and measure the GPU fast path in one command: ``python -m benchmarks.gpu_validate --out DIR``.

On a CUDA machine it
1. runs tests/test_gpu.py and tests/test_triton_kernels.py (parity, no host sync, CUDA graphs,
   torch.compile, the kernels in Triton's interpreter);
2. times forward+backward per layer on ResNet-50 BatchNorm shapes (N = 2, 8, 32 per rank; fp32
   and bf16; contiguous and channels_last) for syncbn over NCCL (world size 1), torch.nn.
   SyncBatchNorm's sync path (its autograd function called directly: at world size 1 the
   module itself falls back to plain batch_norm), cuDNN BatchNorm2d and the two all-reduces
   syncbn issues (what "cuDNN BN + collectives" adds up);
3. measures each syncbn kernel's achieved bandwidth (torch.profiler) against the measured
   device-to-device copy bandwidth, host syncs per step (set_sync_debug_mode("warn")),
   CUDA graph replay against eager, torch.compile graph breaks;
4. writes DIR/gpu_validate.json and DIR/gpu_validate.md and prints the targets.
Without CUDA it exits with a message and status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import syncbn

from .gpu import copy_bandwidth_gbps
from .plan import DTYPES, RESNET50_LAYERS, LayerCase
from .timing import Peer, median_ms, time_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (2, 8, 32)
MEDIAN_CASE = (8, 512, (28, 28))  # middle layer, middle batch
SPEEDUP_TARGET = 1.3  # vs torch.nn.SyncBatchNorm on the median shape, never below 1.0
COLLECTIVES_OVERHEAD_TARGET = 1.2  # syncbn / (cuDNN BN + its two all-reduces)
BANDWIDTH_TARGET = 0.7  # of peak, per kernel, tensors above BANDWIDTH_MIN_BYTES
BANDWIDTH_MIN_BYTES = 32 * 2**20
# Bytes each Triton kernel moves, in tensor sizes: stats reads x; normalize reads x, writes y;
# grad stats reads x and dy; input grad reads x and dy, writes dx.
KERNEL_PASSES = {"_stats_kernel": 1, "_normalize_kernel": 2, "_grad_stats_kernel": 2,
                 "_input_grad_kernel": 3}


def _run_tests(out: str) -> Dict:
    command = [sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "tests/test_triton_kernels.py",
               f"--junitxml={os.path.join(out, 'gpu_tests.xml')}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "summary": (done.stdout.strip().splitlines() or [""])[-1], "tail": done.stdout[-4000:]}


def _init_nccl(workdir: str) -> None:
    store = dist.FileStore(os.path.join(workdir, "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)


def _cases() -> List[LayerCase]:
    return [LayerCase(n, c, spatial, dtype, layout) for c, spatial in RESNET50_LAYERS for n in BATCHES
            for dtype in DTYPES for layout in ("contiguous", "channels_last")]


def _inputs(case: LayerCase) -> tuple:
    x = torch.randn(case.shape, device="cuda", dtype=DTYPES[case.dtype])
    dy = torch.randn_like(x)
    if case.layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.requires_grad_(), dy


def _layer_steps(case: LayerCase) -> Dict[str, Callable[[], None]]:
    """One forward+backward of each peer on the same input; the collectives alone too."""
    x, dy = _inputs(case)
    channels = case.channels
    ours = syncbn.SyncBatchNorm(channels).cuda()
    theirs = torch.nn.SyncBatchNorm(channels).cuda()
    cudnn = torch.nn.BatchNorm2d(channels).cuda()
    payloads = (torch.zeros(2 * channels + 2, dtype=torch.float64, device="cuda"),
                torch.zeros(2 * channels, device="cuda"))
    from torch.nn.modules._functions import SyncBatchNorm as torch_sync_function

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            forward(x).backward(dy)
        return run

    def collectives() -> None:
        for payload in payloads:
            dist.all_reduce(payload)

    return {
        "syncbn": step(ours),
        "torch_syncbn": step(lambda t: torch_sync_function.apply(
            t, theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var, theirs.eps,
            theirs.momentum, dist.group.WORLD, 1)),
        "cudnn_bn": step(cudnn),
        "collectives": collectives,
    }


def _kernel_bandwidth(case: LayerCase, run: Callable[[], None], peak_gbps: float) -> Dict[str, Dict]:
    """Each Triton kernel's mean time and achieved bandwidth over a few profiled steps."""
    nbytes = torch.Size(case.shape).numel() * DTYPES[case.dtype].itemsize
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    kernels = {}
    for event in profile.key_averages():
        name = next((k for k in KERNEL_PASSES if k in event.key), None)
        if name and event.device_time > 0:
            gbps = KERNEL_PASSES[name] * nbytes / (event.device_time * 1e-6) / 1e9
            kernels[name] = {"us": event.device_time, "gbps": gbps, "peak_fraction": gbps / peak_gbps}
    return kernels


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


def _measure_case(case: LayerCase, peak_gbps: float, warmup: int, reps: int) -> Dict:
    steps = _layer_steps(case)
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
    if "torch_syncbn" in ms:
        row["speedup_vs_torch_syncbn"] = ms["torch_syncbn"] / ms["syncbn"]
    if "cudnn_bn" in ms:
        row["vs_cudnn_plus_collectives"] = ms["syncbn"] / (ms["cudnn_bn"] + ms["collectives"])
    row["kernels"] = _kernel_bandwidth(case, steps["syncbn"], peak_gbps)
    return row


def _compile_breaks() -> Dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gpu import compiled_vs_eager

    breaks, reasons = compiled_vs_eager("cuda")
    return {"graph_breaks": breaks, "reasons": reasons}


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
                 if r["megabytes"] * 2**20 > BANDWIDTH_MIN_BYTES for name, k in r["kernels"].items()]
    syncs = report["host_syncs_per_step"]["syncbn"]

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
        _target(f">= {BANDWIDTH_TARGET:.0%} of peak bandwidth per kernel above 32 MB",
                show(fractions, min) if fractions else "-",
                min(v for v, _ in fractions) >= BANDWIDTH_TARGET if fractions else None),
        _target("0 host syncs per training step", f"{syncs:g}", syncs == 0),
        _target("GPU tests pass (parity, no sync, CUDA graphs, torch.compile, interpreter)",
                report["tests"]["summary"], report["tests"]["returncode"] == 0),
    ]


def markdown(report: Dict) -> str:
    lines = [f"# GPU validation: {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, peak (device copy) "
             f"{report['peak_gbps']:.0f} GB/s. Times: median ms per forward+backward.", "",
             "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in report["targets"]]
    lines += ["", "| case | syncbn | torch SyncBN | cuDNN BN | all-reduces | speedup | / (BN + coll.) |"
              " min kernel peak fraction |", "|---|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        ms = r["ms"]
        cells = [f"{ms[p]:.3f}" if p in ms else "error"
                 for p in ("syncbn", "torch_syncbn", "cudnn_bn", "collectives")]
        fraction = min((k["peak_fraction"] for k in r["kernels"].values()), default=float("nan"))
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {r.get('speedup_vs_torch_syncbn', 0):.2f} "
                     f"| {r.get('vs_cudnn_plus_collectives', 0):.2f} | {fraction:.2f} |")
    graph, compiled = report["cuda_graph"], report["compile"]
    lines += ["", "Host syncs per step: " + ", ".join(f"{k} {v:g}" for k, v in report["host_syncs_per_step"].items()),
              "", "CUDA graph (syncbn layer step): " + "; ".join(
                  f"{case}: eager {g['eager_ms']:.3f} ms, replay {g['replay_ms']:.3f} ms" for case, g in graph.items()),
              "", f"torch.compile graph breaks (conv+SyncBatchNorm+ReLU): {compiled['graph_breaks']} "
              f"({'; '.join(compiled['reasons'])})", "", f"Tests: {report['tests']['summary']}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_validate.json and .md")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-tests", action="store_true", help="measure only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device here; run `python -m benchmarks.gpu_validate --out DIR` "
              "on a machine with an NVIDIA GPU (and triton installed).", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    import triton

    report: Dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__}
    report["tests"] = ({"summary": "skipped (--skip-tests)", "returncode": None} if args.skip_tests
                       else _run_tests(args.out))
    print(f"tests: {report['tests']['summary']}", flush=True)
    _init_nccl(tempfile.mkdtemp(prefix="gpu-validate-"))
    report["peak_gbps"] = copy_bandwidth_gbps()
    report["layers"] = []
    for case in _cases():
        report["layers"].append(_measure_case(case, report["peak_gbps"], args.warmup, args.reps))
        print(f"{case.label}: {report['layers'][-1]['ms']}", flush=True)
    batch, channels, spatial = MEDIAN_CASE
    median = {layout: _layer_steps(LayerCase(batch, channels, spatial, "fp32", layout))
              for layout in ("contiguous", "channels_last")}
    report["host_syncs_per_step"] = {name: host_syncs_per_step(run) for name, run in median["contiguous"].items()
                                     if name != "collectives"}
    report["cuda_graph"] = {layout: graph_vs_eager_ms(steps["syncbn"]) for layout, steps in median.items()}
    report["compile"] = _compile_breaks()
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
