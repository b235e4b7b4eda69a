"""PNG plots of one run (matplotlib, Agg backend), each stamped with the machine.

Colours come from benchmarks/figure_style.py: a peer has one colour in every figure; the
backend it runs over is the bar's hatching or the line's style.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from matplotlib.ticker import NullFormatter

from .figure_style import (BACKEND_COLORS, BACKEND_HATCHES, BACKEND_LINESTYLES,
                           COMMUNICATION_COLOR, COMPUTE_COLOR, PEER_COLORS, legend_outside, plt,
                           save_figure)

FIGURES = {
    "layers": "layer_overhead.png",
    "split": "comm_compute.png",
    "comm": "allreduce_latency.png",
    "payload": "payload_growth.png",
    "model": "model_throughput.png",
}


def _save(fig, out_dir: str, key: str, stamp: Dict[str, str]) -> str:
    return save_figure(fig, os.path.join(out_dir, FIGURES[key]), stamp)


def _headline_rows(layer_rows: List[Dict]) -> List[Dict]:
    """fp32 contiguous CPU rows at the largest per-rank batch: one row per layer shape."""
    plain = [r for r in layer_rows if r["case"]["dtype"] == "fp32"
             and r["case"]["layout"] == "contiguous" and r["setting"]["device"] == "cpu"]
    batch = max(r["case"]["batch"] for r in plain)
    return [r for r in plain if r["case"]["batch"] == batch]


Series = Dict[Tuple[str, str], List[float]]  # (peer, backend) -> one value per category


def _grouped_bars(ax, categories: List[str], series: Series) -> None:
    """One bar per (peer, backend) in each category: the peer's colour, the backend's hatch."""
    width = 0.8 / max(1, len(series))
    for index, ((peer, backend), values) in enumerate(series.items()):
        ax.bar([i + index * width for i in range(len(categories))], values, width,
               color=PEER_COLORS[peer], hatch=BACKEND_HATCHES[backend], edgecolor="white",
               label=f"{peer} ({backend})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))])
    ax.set_xticklabels(categories, fontsize=7, rotation=15)


def _legend_entries(axes) -> Dict[str, list]:
    """Every series of every panel once, for one legend beside the last panel."""
    entries: Dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return {"handles": list(entries.values()), "labels": list(entries)}


def plot_layer_overhead(layer_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    rows = _headline_rows(layer_rows)
    world_sizes = sorted({r["setting"]["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(4.2 * len(world_sizes), 3.6),
                             squeeze=False, sharey=True)
    for ax, world_size in zip(axes[0], world_sizes):
        at_w = [r for r in rows if r["setting"]["world_size"] == world_size]
        layers = list(dict.fromkeys(r["case"]["layer"] for r in at_w))
        series: Series = {}
        for r in at_w:
            backend, peers = r["setting"]["backend"], r["peers"]
            for peer in ("syncbn", "naive"):
                if peer == "naive" and backend != "gloo":
                    continue  # one naive series per world size is enough
                series.setdefault((peer, backend), []).append(
                    peers[peer]["ms"] / peers["BatchNorm"]["ms"])
        _grouped_bars(ax, layers, series)
        ax.axhline(1.0, color=PEER_COLORS["BatchNorm"], linewidth=0.8)
        ax.set_title(f"W={world_size}", fontsize=9)
        ax.set_xlabel("BatchNorm input per sample (C x H x W)", fontsize=8)
    axes[0][0].set_ylabel("fwd+bwd time / torch BatchNorm", fontsize=8)
    legend_outside(axes[0][-1], **_legend_entries(axes[0]))
    fig.suptitle(f"One layer's forward+backward against torch BatchNorm (line at 1): "
                 f"N={rows[0]['case']['batch']} per rank, fp32, contiguous, CPU", fontsize=10)
    return _save(fig, out_dir, "layers", stamp)


def plot_comm_compute(layer_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    rows = [r for r in _headline_rows(layer_rows) if r["setting"]["backend"] != "none"]
    labels = list(dict.fromkeys(r["setting"]["label"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels), 3.4), squeeze=False,
                             sharey=True)
    for ax, label in zip(axes[0], labels):
        at = [r for r in rows if r["setting"]["label"] == label]
        layers = [r["case"]["layer"] for r in at]
        comm = [r["peers"]["syncbn"]["comm_ms"] / r["peers"]["syncbn"]["ms"] * 100 for r in at]
        ax.bar(layers, [100 - c for c in comm], color=COMPUTE_COLOR, label="compute")
        ax.bar(layers, comm, bottom=[100 - c for c in comm], color=COMMUNICATION_COLOR,
               label="communication (all-reduces, incl. waiting)")
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=6, rotation=60)
    axes[0][0].set_ylabel("% of syncbn fwd+bwd time", fontsize=8)
    legend_outside(axes[0][-1])
    fig.suptitle(f"Where syncbn's layer time goes: N={rows[0]['case']['batch']} per rank, "
                 "fp32, contiguous, CPU", fontsize=10)
    return _save(fig, out_dir, "split", stamp)


def plot_allreduce_latency(comm_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for label in dict.fromkeys(r["setting"]["label"] for r in comm_rows):
        at = [r for r in comm_rows if r["setting"]["label"] == label]
        backend, world = at[0]["setting"]["backend"], at[0]["setting"]["world_size"]
        points = sorted([(r["forward_bytes"], r["forward_us"]) for r in at]
                        + [(r["backward_bytes"], r["backward_us"]) for r in at])
        ax.plot([p[0] for p in points], [p[1] for p in points], color=BACKEND_COLORS[backend],
                linestyle=BACKEND_LINESTYLES[backend], marker=markers.get(world, "x"),
                label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("payload (bytes): 2C fp64 backward and 4C+3 fp64 forward, C = 64 .. 2048")
    ax.set_ylabel("one all-reduce (µs, slowest rank)")
    ax.set_title("syncbn's all-reduce latency on this machine, by backend and world size W",
                 fontsize=9)
    legend_outside(ax)
    return _save(fig, out_dir, "comm", stamp)


def plot_payload_growth(growth: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(9, 4))
    markers = ("o", "s", "^", "D")
    for index, channels in enumerate(sorted({g["channels"] for g in growth})):
        at = [g for g in growth if g["channels"] == channels]
        worlds = [g["world_size"] for g in at]
        marker = markers[index % len(markers)]
        ax.plot(worlds, [g["syncbn_bytes"] for g in at], marker=marker,
                color=PEER_COLORS["syncbn"], label=f"syncbn all-reduce, C={channels}")
        ax.plot(worlds, [g["torch_syncbn_bytes"] for g in at], marker=marker, linestyle="--",
                color=PEER_COLORS["torch.nn.SyncBatchNorm"],
                label=f"torch.nn.SyncBatchNorm all_gather, C={channels}")
    ax.set_xscale("log", base=2)
    worlds = sorted({g["world_size"] for g in growth})
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.set_yscale("log")
    ax.set_xlabel("world size W")
    ax.set_ylabel("forward bytes per rank per layer")
    ax.set_title("Forward payload of one layer: O(C) versus O(W x C) (computed, not measured)",
                 fontsize=9)
    legend_outside(ax)
    return _save(fig, out_dir, "payload", stamp)


def plot_model_throughput(model_rows: List[Dict], plan: Dict, out_dir: str,
                          stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = [r["setting"]["label"] for r in model_rows]
    peers = list(dict.fromkeys(p for r in model_rows for p in r["peers"]))
    width = 0.8 / max(1, len(peers))
    for index, peer in enumerate(peers):
        ax.bar([i + index * width for i in range(len(labels))],
               [r["peers"][peer]["images_per_s"] if peer in r["peers"] else 0.0
                for r in model_rows], width, color=PEER_COLORS[peer], label=peer)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7, rotation=15)
    ax.set_ylabel("training images / s (all ranks)")
    ax.set_title(f"Whole-model training throughput: SmallResNet (width {plan['model_width']}), "
                 f"{plan['model_batch']} images of {plan['model_image']}x{plan['model_image']} "
                 "per rank, CPU", fontsize=9)
    legend_outside(ax)
    return _save(fig, out_dir, "model", stamp)


def write_plots(results: Dict, out_dir: str) -> List[str]:
    stamp = results["machine"]
    return [
        plot_layer_overhead(results["layers"], out_dir, stamp),
        plot_comm_compute(results["layers"], out_dir, stamp),
        plot_allreduce_latency(results["comm"], out_dir, stamp),
        plot_payload_growth(results["payload_growth"], out_dir, stamp),
        plot_model_throughput(results["model"], results["plan"], out_dir, stamp),
    ]
