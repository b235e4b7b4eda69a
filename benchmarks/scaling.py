"""A MODEL, not a measurement: per-step BatchNorm communication time at W = 1 .. 1024.

    python -m benchmarks.scaling [--out DIR] [--publish] [--smoke]

Projects, with an alpha-beta model, how long the BatchNorm collectives of one training step
take for ResNet-50 and a detection backbone (ResNet-101-FPN), for three schemes:

- syncbn: per layer one all-reduce of 4C+3 fp64 values forward, one of 2C fp64 backward;
- torch.nn.SyncBatchNorm: per layer an all_gather of W x (2C+1) fp32 values forward, an
  all-reduce of 2C fp32 backward;
- naive: one collective per statistic, as Horovod's SyncBatchNorm issues them (there as
  allgathers; modelled here as all-reduces, which favours it): forward three all-reduces
  (count: 1, sum x: C, sum x^2: C fp32 values), backward two (sum dy, sum dy*xhat: C each).

Inputs: the alpha-beta fit of this machine's all-reduces (gloo and MPI, measured by this command
through syncbn's communicators) and published NCCL figures for NVLink and InfiniBand (the
``FABRICS`` table below, each with its source). The model is validated against this machine:
the per-step syncbn communication of ResNet-50 is measured at W = 1, 2, 4 and set beside the
projection from the fit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from syncbn.testing import RankPool, find_mpiexec

from .aggregate import combine_comm
from .comm_bench import (FP32_BYTES, FP64_BYTES, backward_payload_numel, forward_payload_numel,
                         time_all_reduce_sequence, time_all_reduces)
from .figure_style import PEER_COLORS, legend_outside, plt, save_figure
from .machine import machine_stamp, stamp_line
from .plan import Setting

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = "scaling_projection.png"
REPORT = "scaling.md"
WORLD_SIZES = tuple(2 ** k for k in range(11))  # 1 .. 1024
SCHEMES = ("syncbn", "torch.nn.SyncBatchNorm", "naive")
CALLS_PER_REP = 5  # back-to-back all-reduces per timed repetition of the latency fit


# --- The models' BatchNorm layers, from compact definitions of the architectures ---

def resnet_bn_channels(blocks_per_stage: Sequence[int]) -> List[int]:
    """BatchNorm channel counts of a bottleneck ResNet (He et al. 2016), in forward order:
    the stem's BN(64); per block BN(w), BN(w), BN(4w), and BN(4w) on the first block's
    projection shortcut, with w = 64, 128, 256, 512 in the four stages."""
    channels = [64]
    for stage, blocks in enumerate(blocks_per_stage):
        width = 64 * 2 ** stage
        for block in range(blocks):
            channels += [width, width, 4 * width] + ([4 * width] if block == 0 else [])
    return channels


RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET101_BLOCKS = (3, 4, 23, 3)
FPN_CHANNELS, FPN_LEVELS = 256, 4  # a lateral 1x1 and an output 3x3 conv per level, each normed


def model_bn_channels() -> Dict[str, List[int]]:
    return {
        "ResNet-50": resnet_bn_channels(RESNET50_BLOCKS),
        "ResNet-101-FPN (detection backbone, BN in the FPN)":
            resnet_bn_channels(RESNET101_BLOCKS) + [FPN_CHANNELS] * (2 * FPN_LEVELS),
    }


# --- The alpha-beta model of one collective ---

@dataclass(frozen=True)
class Fabric:
    """alpha: latency of one step between two ranks (s); bus_bandwidth: bytes/s in the sense of
    nccl-tests' busbw; floor: cost of one call even at W = 1 (s)."""

    name: str
    alpha: float
    bus_bandwidth: float
    floor: float = 0.0
    source: str = ""


def all_reduce_ring(fabric: Fabric, world: int, nbytes: int) -> float:
    """Reduce-scatter + all-gather around a ring: 2(W-1) steps, 2(W-1)/W of the bytes per rank."""
    if world == 1:
        return fabric.floor
    return (fabric.floor + 2 * (world - 1) * fabric.alpha
            + 2 * (world - 1) / world * nbytes / fabric.bus_bandwidth)


def all_reduce_tree(fabric: Fabric, world: int, nbytes: int) -> float:
    """Reduce up and broadcast down a binary tree: 2 log2(W) steps, pipelined, same bytes."""
    if world == 1:
        return fabric.floor
    return (fabric.floor + 2 * math.log2(world) * fabric.alpha
            + 2 * (world - 1) / world * nbytes / fabric.bus_bandwidth)


def all_reduce_best(fabric: Fabric, world: int, nbytes: int) -> float:
    """NCCL's tuner picks ring or tree per call; the model takes the faster of the two."""
    return min(all_reduce_ring(fabric, world, nbytes), all_reduce_tree(fabric, world, nbytes))


def all_gather_ring(fabric: Fabric, world: int, total_bytes: int) -> float:
    """W-1 ring steps; each rank receives (W-1)/W of the gathered bytes."""
    if world == 1:
        return fabric.floor
    return (fabric.floor + (world - 1) * fabric.alpha
            + (world - 1) / world * total_bytes / fabric.bus_bandwidth)


AllReduce = Callable[[Fabric, int, int], float]


@dataclass(frozen=True)
class Collective:
    """One collective of a layer's training step; ``numel`` is what each rank contributes."""

    kind: str       # "all_reduce" or "all_gather"
    direction: str  # "forward" or "backward"
    numel: int
    dtype: str      # "float64" or "float32"

    @property
    def nbytes(self) -> int:
        return self.numel * (FP64_BYTES if self.dtype == "float64" else FP32_BYTES)


def layer_collectives(scheme: str, channels: int) -> List[Collective]:
    """The collectives of one layer's training step under a scheme."""
    if scheme == "syncbn":
        return [Collective("all_reduce", "forward", forward_payload_numel(channels), "float64"),
                Collective("all_reduce", "backward", backward_payload_numel(channels), "float64")]
    backward = Collective("all_reduce", "backward", backward_payload_numel(channels), "float32")
    if scheme == "torch.nn.SyncBatchNorm":  # mean, invstd (C each) and count of every rank
        return [Collective("all_gather", "forward", 2 * channels + 1, "float32"), backward]
    if scheme == "naive":
        return ([Collective("all_reduce", "forward", n, "float32") for n in (1, channels, channels)]
                + [Collective("all_reduce", "backward", channels, "float32")] * 2)
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")


def collective_time(fabric: Fabric, call: Collective, world: int, gathered_from: int = 0,
                    all_reduce: AllReduce = all_reduce_best) -> float:
    """Seconds of one collective over ``world`` ranks; an all_gather delivers the shares of
    ``gathered_from`` ranks (default: the ``world`` ranks themselves)."""
    if call.kind == "all_gather":
        return all_gather_ring(fabric, world, (gathered_from or world) * call.nbytes)
    return all_reduce(fabric, world, call.nbytes)


def step_time(fabric: Fabric, scheme: str, channels: Sequence[int], world: int) -> float:
    """Seconds of BatchNorm communication in one training step: the layers' collectives run one
    after another (each layer waits for its statistics before it can normalize)."""
    if world == 1:
        return 0.0  # a group of one communicates nothing (syncbn, torch: plain batch_norm)
    return sum(collective_time(fabric, call, world)
               for c in channels for call in layer_collectives(scheme, c))


# --- Published NCCL inputs (documented; the projection's assumptions) ---

FABRICS: Tuple[Fabric, ...] = (
    Fabric("NVLink (one 8-GPU node; W <= 8)", alpha=10.1e-6 / 2, bus_bandwidth=370e9,
           source="alpha: a 32-byte all_reduce between 2 NVLink A100-SXM4 GPUs takes 10.1 us "
                  "(nccl-tests output in https://github.com/NVIDIA/nccl/issues/583), read as "
                  "2 alpha; bus bandwidth: NCCL's effective NVLink bandwidth on H100, ~370 GB/s "
                  "busbw with the ring (maintainer, https://github.com/NVIDIA/nccl-tests/issues/212)"),
    Fabric("InfiniBand (one GPU per node)", alpha=19.9e-6 / 2, bus_bandwidth=25e9,
           source="alpha: an 8-byte all_reduce between 2 A100 nodes over HDR InfiniBand takes "
                  "19.9 us (nccl-tests output in https://github.com/NVIDIA/nccl-tests/issues/150), "
                  "read as 2 alpha; bus bandwidth: ASSUMPTION, the 25 GB/s line rate of one "
                  "200 Gb/s HDR NIC per GPU (no measured source found; measured busbw is often "
                  "lower, e.g. https://github.com/NVIDIA/nccl-tests/issues/232)"),
)
GPUS_PER_NODE = 8


def cluster_step_time(scheme: str, channels: Sequence[int], world: int) -> float:
    """8-GPU NVLink nodes joined by InfiniBand: each collective costs its intra-node part on
    NVLink (up to 8 ranks) plus an inter-node part over InfiniBand among W/8 nodes (a
    hierarchical schedule, as NCCL builds its trees); an all_gather's inter-node part carries
    the shares of all W ranks."""
    if world == 1:
        return 0.0
    nvlink, infiniband = FABRICS
    inside, nodes = min(world, GPUS_PER_NODE), max(1, world // GPUS_PER_NODE)
    total = 0.0
    for c in channels:
        for call in layer_collectives(scheme, c):
            total += collective_time(nvlink, call, inside) if inside > 1 else 0.0
            if nodes > 1:
                total += collective_time(infiniband, call, nodes, gathered_from=world)
    return total


# --- This machine: measured all-reduces, the fit, the per-step validation ---

def step_payloads(scheme: str, channels: Sequence[int]) -> List[Tuple[int, str]]:
    """(numel, dtype) of one step's all-reduces in the order a training step issues them:
    forward payloads in layer order, then backward payloads in reverse layer order."""
    calls = [call for c in channels for call in layer_collectives(scheme, c)]
    if any(call.kind != "all_reduce" for call in calls):
        raise ValueError(f"{scheme} needs an all_gather, which syncbn's communicators lack")
    return ([(c.numel, c.dtype) for c in calls if c.direction == "forward"]
            + [(c.numel, c.dtype) for c in calls[::-1] if c.direction == "backward"])


def fit_line(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares (intercept, slope) of t = a + b * bytes; slope clamped at 0."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x) if var_x else 0.0
    return mean_y - slope * mean_x, slope


def machine_fabric(backend: str, fits: Dict[int, Tuple[float, float]]) -> Fabric:
    """The model's inputs from the per-W fits: the W = 1 intercept is the per-call floor; a
    2-rank all-reduce is floor + 2 alpha + bytes / bandwidth."""
    floor = fits[1][0]
    intercept, slope = fits[2]
    return Fabric(f"this machine, {backend}", alpha=max(0.0, (intercept - floor) / 2),
                  bus_bandwidth=1 / slope if slope > 0 else math.inf, floor=floor,
                  source="fitted to the all-reduce latencies measured by this command")


@dataclass(frozen=True)
class MachinePlan:
    worlds: Tuple[int, ...]
    channels: Tuple[int, ...]
    reps: int
    step_reps: int


PLANS = {
    "full": MachinePlan(worlds=(1, 2, 4), channels=(64, 256, 1024, 2048), reps=7, step_reps=3),
    "smoke": MachinePlan(worlds=(1, 2), channels=(64, 2048), reps=2, step_reps=1),
}


def measure_machine(plan: MachinePlan, backends: Sequence[str]) -> Dict:
    """Per backend and W: the payload latencies (slowest rank) and ResNet-50's per-step syncbn
    and naive all-reduce time on this machine."""
    resnet50 = resnet_bn_channels(RESNET50_BLOCKS)
    rows = []
    for backend in backends:
        for world in plan.worlds:
            setting = Setting(backend, world)
            with RankPool(world, backend, timeout=300.0) as pool:
                latencies = combine_comm(pool.run(time_all_reduces, setting, plan.channels,
                                                  plan.reps, CALLS_PER_REP))
                steps = {scheme: max(pool.run(time_all_reduce_sequence, setting,
                                              step_payloads(scheme, resnet50), plan.step_reps))
                         for scheme in ("syncbn", "naive")}
            rows.append({"backend": backend, "world_size": world,
                         "payloads": [{"bytes": r[f"{d}_bytes"], "seconds": 1e-6 * r[f"{d}_us"]}
                                      for r in latencies for d in ("forward", "backward")],
                         "resnet50_step_seconds": steps})
    return {"plan": asdict(plan), "rows": rows}


def fit_machine(measured: Dict) -> Dict[str, Dict]:
    """Per backend: the line fitted at each W and the Fabric the projection uses."""
    out = {}
    for backend in dict.fromkeys(r["backend"] for r in measured["rows"]):
        fits = {r["world_size"]: fit_line([(p["bytes"], p["seconds"]) for p in r["payloads"]])
                for r in measured["rows"] if r["backend"] == backend}
        out[backend] = {"fits": fits, "fabric": machine_fabric(backend, fits)}
    return out


def validation_rows(measured: Dict, fitted: Dict[str, Dict]) -> List[Dict]:
    """Projected vs measured ResNet-50 per-step all-reduce time on this machine. Unlike the
    NCCL projection, W = 1 keeps the per-call floor: the communicator is still called."""
    resnet50 = resnet_bn_channels(RESNET50_BLOCKS)
    rows = []
    for r in measured["rows"]:
        fabric = fitted[r["backend"]]["fabric"]
        for scheme in ("syncbn", "naive"):
            calls = [call for c in resnet50 for call in layer_collectives(scheme, c)]
            projected = {name: sum(collective_time(fabric, call, r["world_size"], all_reduce=law)
                                   for call in calls)
                         for name, law in (("ring", all_reduce_ring), ("tree", all_reduce_tree))}
            rows.append({"backend": r["backend"], "world_size": r["world_size"], "scheme": scheme,
                         "collectives": len(calls), "measured_s": r["resnet50_step_seconds"][scheme],
                         "projected_ring_s": projected["ring"],
                         "projected_tree_s": projected["tree"],
                         "in_fit": r["world_size"] <= 2})
    return rows


def projection_rows() -> List[Dict]:
    rows = []
    for model, channels in model_bn_channels().items():
        for world in WORLD_SIZES:
            for scheme in SCHEMES:
                rows.append({"model": model, "layers": len(channels), "world_size": world,
                             "scheme": scheme,
                             "cluster_s": cluster_step_time(scheme, channels, world),
                             "infiniband_s": step_time(FABRICS[1], scheme, channels, world)})
    return rows


# --- Report ---

def _us(seconds: float) -> str:
    return f"{1e6 * seconds:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def validation_summary(rows: List[Dict]) -> str:
    """How far the projection from this machine's fit lies from its measured steps."""
    def spread(chosen: List[Dict]) -> str:
        ratios = [r["projected_tree_s"] / r["measured_s"] for r in chosen]
        return f"{min(ratios):.2g}x to {max(ratios):.2g}x" if ratios else "-"

    return ("Outcome: the projection is " + spread([r for r in rows if r["in_fit"]])
            + " of the measured step at the fitted world sizes and "
            + spread([r for r in rows if not r["in_fit"]]) + " at the predicted ones. Below 1x, "
            "a long sequence of collectives cost more per call than the microbenchmark's short "
            "bursts of one payload on this shared machine, and at W = 4 four ranks share two "
            "cores; the model knows neither. The GPU projection rests on the published NCCL "
            "inputs, not on this fit.")


def render_markdown(results: Dict, folder: str = "") -> str:
    fitted, stamp = results["fitted"], results["machine"]
    lines = [
        "**This is a model, not a measurement.** It projects the time of the BatchNorm "
        "collectives of one training step (the layers run one after another; compute is "
        "left out) from an alpha-beta model of each collective: an all-reduce over W ranks "
        "costs 2(W-1) alpha + 2(W-1)/W x bytes / B around a ring, 2 log2(W) alpha + the same "
        "bytes term down a tree (NCCL picks per call; the model takes the faster), an all_gather "
        "(W-1) alpha + (W-1)/W x gathered bytes / B. The cluster column joins 8-GPU NVLink nodes "
        "with InfiniBand: each collective pays its intra-node part on NVLink and an inter-node "
        "part among W/8 nodes. W = 1 costs nothing (syncbn and torch call plain batch_norm in a "
        "group of one).",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine (for the fit and the validation): {stamp_line(stamp)}",
        "- Schemes per layer with C channels: syncbn all-reduces 4C+3 fp64 forward and 2C fp64 "
        "backward; torch.nn.SyncBatchNorm all_gathers W x (2C+1) fp32 forward and all-reduces "
        "2C fp32 backward; naive issues one all-reduce per statistic, forward count (1), sum x "
        "(C), sum x^2 (C) and backward sum dy (C), sum dy*xhat (C), fp32 (Horovod's design, "
        "which uses allgathers forward; all-reduces favour it).",
        "- Models: " + "; ".join(f"{name}: {len(ch)} BatchNorm layers, {sum(ch):,} channels"
                                 for name, ch in model_bn_channels().items())
        + " (benchmarks/scaling.py derives the lists from the architectures).",
        "",
        "### Inputs",
        "",
        *_table(("fabric", "alpha (µs per step)", "bus bandwidth (GB/s)", "per-call floor (µs)",
                 "source"),
                [(f.name, f"{1e6 * f.alpha:.2f}", f"{f.bus_bandwidth / 1e9:.1f}",
                  f"{1e6 * f.floor:.1f}", f.source) for f in FABRICS]
                + [(fit["fabric"]["name"], f"{1e6 * fit['fabric']['alpha']:.2f}",
                    "inf" if math.isinf(fit["fabric"]["bus_bandwidth"])
                    else f"{fit['fabric']['bus_bandwidth'] / 1e9:.2f}",
                    f"{1e6 * fit['fabric']['floor']:.1f}", fit["fabric"]["source"])
                   for fit in fitted.values()]),
        "Fits on this machine (one all-reduce, slowest rank, t = a + b x bytes over syncbn's two "
        "payloads "
        "of C = " + ", ".join(str(c) for c in results["measured"]["plan"]["channels"]) + "):",
        "",
        *_table(("backend", "W", "a (µs)", "b (ns per byte)"),
                [(backend, w, f"{1e6 * a:.1f}", f"{1e9 * b:.3f}")
                 for backend, fit in fitted.items() for w, (a, b) in sorted(fit["fits"].items(),
                                                                            key=lambda kv: int(kv[0]))]),
        "### Validation on this machine (ResNet-50, one step's all-reduces)",
        "",
        "Measured: the step's payloads all-reduced in training order through syncbn's "
        "communicator (median, slowest rank). Projected: the fit above with the ring and the tree "
        "law. W = 1 and 2 are the points the fit was made from; W = 4 is a prediction, and on this "
        "2-core machine 4 ranks share 2 cores, which the model does not know about.",
        "",
        *_table(("backend", "W", "scheme", "collectives", "measured (µs)", "projected, ring (µs)",
                 "projected, tree (µs)", "tree / measured"),
                [(r["backend"], r["world_size"], r["scheme"], r["collectives"], _us(r["measured_s"]),
                  _us(r["projected_ring_s"]), _us(r["projected_tree_s"]),
                  f"{r['projected_tree_s'] / r['measured_s']:.2g}"
                  + ("" if r["in_fit"] else " (predicted)")) for r in results["validation"]]),
        validation_summary(results["validation"]),
        "",
        "### Projection (µs of BatchNorm communication per training step)",
        "",
        "Cluster: 8-GPU NVLink nodes on InfiniBand (W <= 8: one node). 1 GPU per node: every "
        "rank on its own InfiniBand port. Ratios > 1: the other scheme spends longer.",
        "",
    ]
    for model in model_bn_channels():
        rows = [r for r in results["projection"] if r["model"] == model]
        by_world: Dict[int, Dict[str, Dict]] = {}
        for r in rows:
            by_world.setdefault(r["world_size"], {})[r["scheme"]] = r
        lines += [f"{model}:", ""]
        lines += _table(["W"] + [f"{s}, cluster" for s in SCHEMES]
                        + [f"{s}, 1 GPU per node" for s in SCHEMES]
                        + ["torch / syncbn, cluster", "naive / syncbn, cluster"],
                        [[w] + [_us(cells[s][key]) for key in ("cluster_s", "infiniband_s")
                                for s in SCHEMES]
                         + (["-", "-"] if w == 1 else
                            [f"{cells[s]['cluster_s'] / cells['syncbn']['cluster_s']:.1f}x"
                             for s in ("torch.nn.SyncBatchNorm", "naive")])
                         for w, cells in sorted(by_world.items())])
    lines += [f"![scaling projection]({folder}{FIGURE})", ""]
    return "\n".join(lines)


def plot(results: Dict, out_dir: str) -> str:
    models = list(model_bn_channels())
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes[0], models):
        for scheme in SCHEMES:
            for key, style, where in (("cluster_s", "-", "8-GPU NVLink nodes on InfiniBand"),
                                      ("infiniband_s", "--", "1 GPU per node, InfiniBand")):
                points = [(r["world_size"], r[key]) for r in results["projection"]
                          if r["model"] == model and r["scheme"] == scheme and r["world_size"] > 1]
                ax.plot([p[0] for p in points], [1e3 * p[1] for p in points], linestyle=style,
                        marker="o", markersize=3, color=PEER_COLORS[scheme],
                        label=f"{scheme}, {where}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("world size W (GPUs)")
        ax.set_title(model, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("BatchNorm communication per step (ms)")
    legend_outside(axes[0][-1], fontsize=7)
    fig.suptitle("MODEL: projected per-step BatchNorm communication time (alpha-beta, published "
                 "NCCL figures)", fontsize=10)
    return save_figure(fig, os.path.join(out_dir, FIGURE), results["machine"])


def _fitted_json(fitted: Dict[str, Dict]) -> Dict:
    return {b: {"fits": {str(w): list(line) for w, line in f["fits"].items()},
                "fabric": asdict(f["fabric"])} for b, f in fitted.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"), metavar="DIR",
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--publish", action="store_true",
                        help="copy the plot to benchmarks/figures and rewrite the scaling "
                             "section of BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "full"]
    backends = ["gloo"] + (["mpi"] if find_mpiexec() is not None and not args.smoke else [])
    measured = measure_machine(plan, backends)
    fitted = fit_machine(measured)
    results = {"command": " ".join(["python -m benchmarks.scaling"]
                                   + list(sys.argv[1:] if argv is None else argv)),
               "machine": machine_stamp(), "measured": measured,
               "fitted": _fitted_json(fitted), "validation": validation_rows(measured, fitted),
               "projection": projection_rows(),
               "fabrics": [asdict(f) for f in FABRICS]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    figure = plot(results, args.out)
    with open(os.path.join(args.out, REPORT), "w") as handle:
        handle.write("# Scaling projection\n\n" + render_markdown(results))
    if args.publish:
        from .run import BENCHMARKS_MD, FIGURES_DIR, replace_section

        shutil.copy(figure, FIGURES_DIR)
        folder = os.path.relpath(FIGURES_DIR, os.path.dirname(BENCHMARKS_MD)) + "/"
        replace_section(BENCHMARKS_MD, "scaling", "## Scaling beyond this machine (a model)\n\n"
                        + render_markdown(results, folder))
    print("\n".join(f"{r['backend']} W={r['world_size']} {r['scheme']}: measured "
                    f"{_us(r['measured_s'])} µs, projected (tree) {_us(r['projected_tree_s'])} µs"
                    for r in results["validation"]))
    print(f"wrote {args.out}/scaling.json, {REPORT}, {FIGURE}")
    return results


if __name__ == "__main__":
    main()
