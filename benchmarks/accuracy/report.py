"""Tables (Markdown) and plots (PNG) of one accuracy study, each stamped with the machine."""
from __future__ import annotations

import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from ..machine import stamp_line  # noqa: E402

FIGURES = ("accuracy_stats_error.png", "accuracy_classification.png", "accuracy_segmentation.png")
ARM_LABELS = {"local": "local BN (per rank)", "sync": "syncbn.SyncBatchNorm",
              "group": "GroupNorm", "full": "BN, one process, global batch (target)"}
_DPI = 90


def _reference(stats: List[Dict[str, Any]]) -> Dict[int, Tuple[float, float]]:
    """Single-process error of batch statistics by batch size n: (mean error, var error)."""
    return {r["per_rank_batch"]: (r["local_mean_err"], r["local_var_err"])
            for r in stats if r["source"] == "single process"}


def _measured(stats: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in stats if r["source"] != "single process"]


def stats_table(stats: List[Dict[str, Any]], batches: List[int], worlds: List[int]) -> str:
    """Error of the normalizing mean (var) against the population, local BN vs SyncBN."""
    ref = _reference(stats)
    measured = {(r["world_size"], r["per_rank_batch"]): r for r in _measured(stats)
                if r["source"].endswith("gloo")}
    header = ["per-rank batch b", "local BN"] + [f"SyncBN W={w}" for w in worlds if w > 1]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in batches:
        cells = [str(b), "%.4f / %.4f" % ref[b]]
        for w in worlds:
            if w == 1:
                continue
            cell = "%.4f / %.4f" % ref[b * w]
            if (w, b) in measured:
                row = measured[(w, b)]
                cell = "**%.4f / %.4f**" % (row["sync_mean_err"], row["sync_var_err"])
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stats_check_table(stats: List[Dict[str, Any]]) -> str:
    """Every real-rank measurement next to the single-process error at batch b*W."""
    ref = _reference(stats)
    lines = ["| ranks | b | local BN (RMS over ranks) | SyncBN | one process at b*W |",
             "|---|---|---|---|---|"]
    for r in _measured(stats):
        b, w = r["per_rank_batch"], r["world_size"]
        lines.append("| %s | %d | %.4f / %.4f | %.4f / %.4f | %s |" % (
            r["source"], b, r["local_mean_err"], r["local_var_err"], r["sync_mean_err"],
            r["sync_var_err"], "%.4f / %.4f" % ref[b * w] if b * w in ref else "-"))
    return "\n".join(lines)


def _summary(values: List[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _grouped(training: List[Dict[str, Any]], task: str, backend_of_arm: Optional[str] = "gloo"
             ) -> Dict[Tuple[str, int], List[float]]:
    groups: Dict[Tuple[str, int], List[float]] = {}
    for r in training:
        if r["task"] != task:
            continue
        if backend_of_arm and r["arm"] != "full" and r["backend"] != backend_of_arm:
            continue
        groups.setdefault((r["arm"], r["per_rank_batch"]), []).append(r["score"])
    return groups


def training_table(training: List[Dict[str, Any]], task: str, arms: List[str]) -> str:
    """Mean +- std over seeds of the test score per (per-rank batch, arm), gloo ranks."""
    groups = _grouped(training, task)
    rows = [r for r in training if r["task"] == task]
    if not rows:
        return "_no runs_"
    world = rows[0]["world_size"]
    header = ["b per rank", "global batch"] + [ARM_LABELS[a] for a in arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in sorted({r["per_rank_batch"] for r in rows}):
        cells = [str(b), str(b * world)]
        for arm in arms:
            values = groups.get((arm, b))
            if values:
                mean, std = _summary(values)
                cells.append("%.3f ± %.3f (n=%d)" % (mean, std, len(values)))
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backend_table(training: List[Dict[str, Any]]) -> str:
    """The MPI repeats next to the same (task, arm, b, seed) over gloo."""
    by_key = {(r["task"], r["arm"], r["per_rank_batch"], r["seed"], r["backend"]): r["score"]
              for r in training}
    lines = ["| task | arm | b per rank | seed | gloo | MPI |", "|---|---|---|---|---|---|"]
    for (task, arm, b, seed, backend), score in sorted(by_key.items()):
        if backend == "mpi":
            gloo = by_key.get((task, arm, b, seed, "gloo"))
            lines.append("| %s | %s | %d | %d | %s | %.3f |" % (
                task, arm, b, seed, "-" if gloo is None else "%.3f" % gloo, score))
    return "\n".join(lines)


def _save(fig: Any, out_dir: str, name: str, stamp: Dict[str, str]) -> str:
    """Stamp the machine under the plot and write it to ``out_dir/name``."""
    path = os.path.join(out_dir, name)
    fig.text(0.01, 0.005, stamp_line(stamp), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_stats(stats: List[Dict[str, Any]], batches: List[int], worlds: List[int], out_dir: str,
               stamp: Dict[str, str]) -> str:
    ref = _reference(stats)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, index, name in ((axes[0], 0, "mean (units of population std)"),
                              (axes[1], 1, "variance (relative)")):
        axis.plot(batches, [ref[b][index] for b in batches], "k-o", label="local BN (any W)")
        for w in worlds:
            if w == 1:
                continue
            line, = axis.plot(batches, [ref[b * w][index] for b in batches], "--",
                              label=f"SyncBN W={w} (one process at b*W)")
            points = [r for r in _measured(stats) if r["world_size"] == w]
            for marker, backend in (("s", "gloo"), ("^", "mpi")):
                chosen = [r for r in points if r["source"].endswith(backend)]
                if chosen:
                    key = "sync_mean_err" if index == 0 else "sync_var_err"
                    axis.plot([r["per_rank_batch"] for r in chosen], [r[key] for r in chosen],
                              marker, color=line.get_color(), fillstyle="none",
                              label=f"SyncBN W={w}, {backend} ranks")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("per-rank batch b")
        axis.set_ylabel(f"RMS error of batch {name}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_title("Batch statistics vs population: first conv of the digits CNN", fontsize=9)
    axes[1].legend(fontsize=6, loc="lower left")
    return _save(fig, out_dir, FIGURES[0], stamp)


def plot_training(training: List[Dict[str, Any]], task: str, arms: List[str], out_dir: str,
                  stamp: Dict[str, str], name: str) -> str:
    groups = _grouped(training, task)
    rows = [r for r in training if r["task"] == task]
    fig, axis = plt.subplots(figsize=(7.5, 4.2))
    for offset, arm in enumerate(arms):
        batches = sorted(b for a, b in groups if a == arm)
        if not batches:
            continue
        summaries = [_summary(groups[(arm, b)]) for b in batches]
        shifted = [b * 2 ** (0.04 * (offset - 1.5)) for b in batches]  # keep error bars apart
        axis.errorbar(shifted, [m for m, _ in summaries], yerr=[s for _, s in summaries],
                      marker="o", capsize=3, label=ARM_LABELS[arm])
    axis.set_xscale("log", base=2)
    axis.set_xlabel(f"per-rank batch b ({rows[0]['world_size'] if rows else '?'} ranks, gloo)")
    axis.set_ylabel("test accuracy" if task == "classification" else "test mean IoU")
    seeds = len({r["seed"] for r in rows})
    axis.set_title(f"{task} on digits: mean ± std over {seeds} seed(s)", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    return _save(fig, out_dir, name, stamp)


def write_plots(results: Dict[str, Any], out_dir: str) -> List[str]:
    plan, stamp = results["plan"], results["machine"]
    return [plot_stats(results["stats"], list(plan["stat_batches"]), list(plan["stat_worlds"]),
                       out_dir, stamp),
            plot_training(results["training"], "classification", list(plan["arms"]), out_dir,
                          stamp, FIGURES[1]),
            plot_training(results["training"], "segmentation", list(plan["arms"]), out_dir,
                          stamp, FIGURES[2])]


def headline(results: Dict[str, Any]) -> List[str]:
    """The findings in a few sentences, computed from the numbers (so a rerun rewrites them)."""
    plan, stats = results["plan"], results["stats"]
    ref = _reference(stats)
    worlds = [w for w in plan["stat_worlds"] if w > 1]
    b, w = min(plan["stat_batches"]), max(worlds)
    off = max((abs(r[k] - ref[r["per_rank_batch"] * r["world_size"]][i])
               / ref[r["per_rank_batch"] * r["world_size"]][i]
               for r in _measured(stats) for i, k in enumerate(("sync_mean_err", "sync_var_err"))),
              default=float("nan"))
    lines = ["- Statistics: at %d sample(s) per rank the variance used to normalize is off by "
             "%.1f%% (RMS) with local BN and by %.1f%% with SyncBN over %d ranks, the error of "
             "one process at the global batch of %d. SyncBN's error measured over real ranks "
             "equals the one-process error at b*W (largest relative difference %.1e)."
             % (b, 100 * ref[b][1], 100 * ref[b * w][1], w, b * w, off)]
    for task, metric in (("classification", "accuracy"), ("segmentation", "mean IoU")):
        groups = _grouped(results["training"], task)
        batches = sorted({k[1] for k in groups})
        if not batches:
            continue
        mean = {k: statistics.mean(v) for k, v in groups.items()}
        gap = max(abs(mean[("sync", x)] - mean[("full", x)]) for x in batches)
        small, large = batches[0], batches[-1]
        paired = _summary([synced - local for synced, local
                           in zip(groups[("sync", small)], groups[("local", small)])])
        lines.append(
            "- %s (%s): at b=%d per rank local BN %.3f, SyncBN %.3f, full-batch BN %.3f, "
            "GroupNorm %.3f; at b=%d: %.3f / %.3f / %.3f / %.3f. SyncBN minus local BN at b=%d, "
            "paired by seed: %+.3f ± %.3f. Largest SyncBN vs full-batch gap over all b: %.3f." % (
                task.capitalize(), metric, small, mean[("local", small)], mean[("sync", small)],
                mean[("full", small)], mean[("group", small)], large, mean[("local", large)],
                mean[("sync", large)], mean[("full", large)], mean[("group", large)], small,
                *paired, gap))
    return lines


def markdown(results: Dict[str, Any], figure_dir: Optional[str] = None) -> str:
    """The report: command, machine, settings, the three tables and (optionally) the plots."""
    plan, stamp = results["plan"], results["machine"]
    arms = list(plan["arms"])
    world = plan["train_world"]
    parts = [
        f"Command: `{results['command']}` ({results['mode']} mode, {results['runtime_s']:.0f} s).",
        f"Machine: {stamp_line(stamp)}.",
        "",
        *headline(results),
        "",
        "### 1. Error of the normalizing statistics against the population",
        "",
        "Activation: the first conv layer (seeded init) of the digits CNN on all 1,797 images. "
        "Cells: RMS over channels and %d batches of (mean - mu)/sigma / (var/sigma^2 - 1). "
        "**Bold**: SyncBatchNorm measured over real gloo ranks; plain: one process on the "
        "concatenated batch of b*W (what SyncBN computes)." % plan["stat_trials"],
        "",
        stats_table(results["stats"], list(plan["stat_batches"]), list(plan["stat_worlds"])),
        "",
        "Every real-rank measurement (gloo and MPI) next to one process at b*W:",
        "",
        stats_check_table(results["stats"]),
        "",
        "### 2. Classification: digits CNN, %d ranks" % world,
        "",
        "Test accuracy of rank 0's model in eval mode (running statistics), %d steps, "
        "gloo ranks; full-batch BN runs in one process on the global batch." % plan["class_steps"],
        "",
        training_table(results["training"], "classification", arms),
        "",
        "### 3. Segmentation: 2-3 digits on a 32x32 canvas, FCN, %d ranks" % world,
        "",
        "Test mean IoU (11 classes incl. background; predicting background everywhere scores "
        "about 0.07), %d steps, gloo ranks." % plan["seg_steps"],
        "",
        training_table(results["training"], "segmentation", arms),
        "",
        "### Over MPI",
        "",
        backend_table(results["training"]),
    ]
    if plan.get("notes"):
        parts += ["", "Notes: " + "; ".join(plan["notes"])]
    if figure_dir is not None:
        parts += [""] + [f"![{name}]({figure_dir}/{name})" for name in FIGURES]
    return "\n".join(parts) + "\n"
