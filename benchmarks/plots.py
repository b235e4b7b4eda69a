"""PNG plots of one run (matplotlib, Agg backend), each stamped with the machine."""
from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .machine import stamp_line  # noqa: E402

FIGURES = {
    "layers": "layer_overhead.png",
    "split": "comm_compute.png",
    "comm": "allreduce_latency.png",
    "payload": "payload_growth.png",
    "model": "model_throughput.png",
}
_DPI = 90


def _save(fig, out_dir: str, key: str, stamp: Dict[str, str]) -> str:
    fig.text(0.005, 0.005, stamp_line(stamp), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = os.path.join(out_dir, FIGURES[key])
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _headline_rows(layer_rows: List[Dict]) -> List[Dict]:
    """fp32 contiguous CPU rows at the largest per-rank batch: one row per layer shape."""
    plain = [r for r in layer_rows if r["case"]["dtype"] == "fp32"
             and r["case"]["layout"] == "contiguous" and r["setting"]["device"] == "cpu"]
    batch = max(r["case"]["batch"] for r in plain)
    return [r for r in plain if r["case"]["batch"] == batch]


def _grouped_bars(ax, categories: List[str], series: Dict[str, List[float]]) -> None:
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        ax.bar([i + index * width for i in range(len(categories))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))])
    ax.set_xticklabels(categories, fontsize=7, rotation=15)


def plot_layer_overhead(layer_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    rows = _headline_rows(layer_rows)
    world_sizes = sorted({r["setting"]["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(4.2 * len(world_sizes), 3.6),
                             squeeze=False)
    for ax, world_size in zip(axes[0], world_sizes):
        at_w = [r for r in rows if r["setting"]["world_size"] == world_size]
        layers = list(dict.fromkeys(r["case"]["layer"] for r in at_w))
        series: Dict[str, List[float]] = {}
        for r in at_w:
            backend, peers = r["setting"]["backend"], r["peers"]
            for peer in ("syncbn", "naive"):
                if peer == "naive" and backend != "gloo":
                    continue  # one naive series per world size is enough
                series.setdefault(f"{peer} ({backend})", []).append(
                    peers[peer]["ms"] / peers["BatchNorm"]["ms"])
        _grouped_bars(ax, layers, series)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title(f"W={world_size}, N={rows[0]['case']['batch']}/rank, fp32", fontsize=9)
        ax.set_ylabel("time / BatchNorm (fwd+bwd)", fontsize=8)
        ax.legend(fontsize=6)
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
        ax.bar(layers, [100 - c for c in comm], label="compute")
        ax.bar(layers, comm, bottom=[100 - c for c in comm], label="communication")
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=6, rotation=60)
    axes[0][0].set_ylabel("% of syncbn fwd+bwd time", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return _save(fig, out_dir, "split", stamp)


def plot_allreduce_latency(comm_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in dict.fromkeys(r["setting"]["label"] for r in comm_rows):
        at = [r for r in comm_rows if r["setting"]["label"] == label]
        line = ax.plot([r["forward_bytes"] for r in at], [r["forward_us"] for r in at], "o-",
                       label=f"{label} forward (fp64)")[0]
        ax.plot([r["backward_bytes"] for r in at], [r["backward_us"] for r in at], "s--",
                color=line.get_color(), label=f"{label} backward (fp32)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes)")
    ax.set_ylabel("one all-reduce (µs, slowest rank)")
    ax.legend(fontsize=5, ncol=2)
    return _save(fig, out_dir, "comm", stamp)


def plot_payload_growth(growth: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for channels in sorted({g["channels"] for g in growth}):
        at = [g for g in growth if g["channels"] == channels]
        worlds = [g["world_size"] for g in at]
        line = ax.plot(worlds, [g["syncbn_bytes"] for g in at], "o-",
                       label=f"syncbn all-reduce, C={channels}")[0]
        ax.plot(worlds, [g["torch_syncbn_bytes"] for g in at], "s--", color=line.get_color(),
                label=f"torch.nn.SyncBatchNorm all_gather, C={channels}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size W")
    ax.set_ylabel("forward bytes per rank per layer")
    ax.set_title("O(C) versus O(W x C) (computed)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "payload", stamp)


def plot_model_throughput(model_rows: List[Dict], out_dir: str, stamp: Dict[str, str]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [r["setting"]["label"] for r in model_rows]
    peers = list(dict.fromkeys(p for r in model_rows for p in r["peers"]))
    series = {p: [r["peers"][p]["images_per_s"] if p in r["peers"] else 0.0 for r in model_rows]
              for p in peers}
    _grouped_bars(ax, labels, series)
    ax.set_ylabel("images / s (all ranks)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "model", stamp)


def write_plots(results: Dict, out_dir: str) -> List[str]:
    stamp = results["machine"]
    return [
        plot_layer_overhead(results["layers"], out_dir, stamp),
        plot_comm_compute(results["layers"], out_dir, stamp),
        plot_allreduce_latency(results["comm"], out_dir, stamp),
        plot_payload_growth(results["payload_growth"], out_dir, stamp),
        plot_model_throughput(results["model"], out_dir, stamp),
    ]
