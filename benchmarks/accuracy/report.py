"""Tables (Markdown) and plots (PNG) of one accuracy study, each stamped with the machine."""
from __future__ import annotations

import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

from ..figure_style import ARM_PEERS, PEER_COLORS, legend_outside, plt, save_figure
from ..machine import stamp_line
from ..targets import ACCURACY_SYNC_VS_FULL_MAX_GAP, STATS_MATCH_REL_TOL
from .study import PLANS

# Published numbers and targets come from a run of at least as many seeds as the full plan's (3).
PUBLISHED_MIN_SEEDS = len(PLANS["full"].seeds)

FIGURES = ("accuracy_stats_error.png", "accuracy_classification.png", "accuracy_segmentation.png")
ARM_LABELS = {"local": "local BN (per rank)", "sync": "syncbn.SyncBatchNorm",
              "group": "GroupNorm", "full": "BN, one process, global batch (target)"}


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


def _selected(training: List[Dict[str, Any]], task: str) -> List[Dict[str, Any]]:
    """The task's runs at each arm's selected configuration, MPI repeats left out."""
    return [r for r in training if r["task"] == task and r["selected"] and r["phase"] != "mpi"]


def _grouped(training: List[Dict[str, Any]], task: str) -> Dict[Tuple[str, int], List[float]]:
    """Test scores over seeds per (arm, per-rank batch), each arm at its selected setting."""
    groups: Dict[Tuple[str, int], List[float]] = {}
    for r in _selected(training, task):
        groups.setdefault((r["arm"], r["per_rank_batch"]), []).append(r["score"])
    return groups


def config_label(row: Dict[str, Any]) -> str:
    """The tuned setting of a run: its peak LR, and for GroupNorm the channels per group."""
    label = "lr %g" % row["lr"]
    if row["arm"] == "group":
        label += ", %d ch/group" % row["group_channels"]
    return label


def _score_cell(values: List[float]) -> str:
    if len(values) == 1:
        return "%.3f" % values[0]
    mean, std = _summary(values)
    return "%.3f ± %.3f (n=%d)" % (mean, std, len(values))


def training_table(training: List[Dict[str, Any]], task: str, arms: List[str]) -> str:
    """Test score per (per-rank batch, arm) at the arm's selected setting (mean ± std over
    seeds where there are several), with that setting."""
    groups = _grouped(training, task)
    rows = _selected(training, task)
    if not rows:
        return "_no runs_"
    world = rows[0]["world_size"]
    setting = {(r["arm"], r["per_rank_batch"]): config_label(r) for r in rows}
    header = ["b per rank", "global batch"] + [ARM_LABELS[a] for a in arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in sorted({r["per_rank_batch"] for r in rows}):
        cells = [str(b), str(b * world)]
        for arm in arms:
            values = groups.get((arm, b))
            cells.append("%s (%s)" % (_score_cell(values), setting[(arm, b)]) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(training: List[Dict[str, Any]], task: str) -> str:
    """Every grid run (first seed): validation and test score; the selected one in bold."""
    rows = [r for r in training if r["task"] == task and r["phase"] == "grid"]
    lines = ["| b per rank | arm | setting | validation | test |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["per_rank_batch"], list(ARM_LABELS).index(r["arm"]),
                                          r["group_channels"], r["lr"])):
        mark = "**" if r["selected"] else ""
        lines.append("| %d | %s | %s%s%s | %s%.3f%s | %.3f |" % (
            r["per_rank_batch"], ARM_LABELS[r["arm"]], mark, config_label(r), mark, mark,
            r["val_score"], mark, r["score"]))
    return "\n".join(lines)


def grid_edges(training: List[Dict[str, Any]], lrs: List[float]) -> List[str]:
    """The arms whose selected learning rate is the smallest or largest of the grid (the best
    may lie beyond it)."""
    edges = (min(lrs), max(lrs)) if len(lrs) > 1 else ()
    return sorted({"%s %s b=%d (lr %g)" % (r["task"], ARM_LABELS[r["arm"]], r["per_rank_batch"],
                                           r["lr"])
                   for r in training if r["selected"] and r["phase"] == "grid" and r["lr"] in edges})


def backend_table(training: List[Dict[str, Any]]) -> str:
    """The MPI repeats next to the same run (task, arm, b, seed, setting) over gloo."""
    def key(r: Dict[str, Any]) -> Tuple:
        return (r["task"], r["arm"], r["per_rank_batch"], r["seed"], r["lr"], r["group_channels"])

    gloo = {key(r): r["score"] for r in training if r["backend"] == "gloo"}
    lines = ["| task | arm | b per rank | seed | setting | gloo | MPI |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in training if r["backend"] == "mpi"), key=key):
        other = gloo.get(key(r))
        lines.append("| %s | %s | %d | %d | %s | %s | %.3f |" % (
            r["task"], r["arm"], r["per_rank_batch"], r["seed"], config_label(r),
            "-" if other is None else "%.3f" % other, r["score"]))
    return "\n".join(lines)


def _save(fig: Any, out_dir: str, name: str, stamp: Dict[str, str]) -> str:
    return save_figure(fig, os.path.join(out_dir, name), stamp)


def plot_stats(stats: List[Dict[str, Any]], batches: List[int], worlds: List[int], out_dir: str,
               stamp: Dict[str, str]) -> str:
    ref = _reference(stats)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, index, name in ((axes[0], 0, "mean (units of population std)"),
                              (axes[1], 1, "variance (relative)")):
        axis.plot(batches, [ref[b][index] for b in batches], "-o",
                  color=PEER_COLORS["BatchNorm"], label="local BN (any W)")
        styles = iter(("--", "-.", ":", (0, (5, 1, 1, 1))))
        for w in worlds:
            if w == 1:
                continue
            line, = axis.plot(batches, [ref[b * w][index] for b in batches],
                              linestyle=next(styles), color=PEER_COLORS["syncbn"],
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
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_yscale("log")
        axis.set_xlabel("per-rank batch b")
        axis.set_ylabel(f"RMS error of batch {name}")
        axis.grid(True, which="both", alpha=0.3)
    fig.suptitle("Error of the statistics BatchNorm normalizes with, against the population: "
                 "first conv of the digits CNN", fontsize=10)
    legend_outside(axes[1], fontsize=7)
    return _save(fig, out_dir, FIGURES[0], stamp)


ARM_SPREAD = 0.3  # the arms of one batch size lie within this much of the gap between ticks


def training_figure(training: List[Dict[str, Any]], task: str, arms: List[str]) -> Any:
    """Each arm's score (mean ± std over seeds) at each per-rank batch, each arm at its best
    setting. The batch sizes are evenly spaced categories: the arms of one batch size sit side
    by side within ARM_SPREAD of its tick, however many batch sizes there are (one included)."""
    groups = _grouped(training, task)
    rows = _selected(training, task)
    ticks = sorted({b for _, b in groups})
    fig, axis = plt.subplots(figsize=(7.5, 4.2))
    for offset, arm in enumerate(arms):
        batches = sorted(b for a, b in groups if a == arm)
        if not batches:
            continue
        summaries = [_summary(groups[(arm, b)]) for b in batches]
        shift = ARM_SPREAD * (offset / max(1, len(arms) - 1) - 0.5)  # keep error bars apart
        axis.errorbar([ticks.index(b) + shift for b in batches], [m for m, _ in summaries],
                      yerr=[s for _, s in summaries], marker="o", capsize=3,
                      linestyle="-" if len(batches) > 1 else "none",
                      color=PEER_COLORS[ARM_PEERS[arm]], label=ARM_LABELS[arm])
    axis.set_xticks(range(len(ticks)), [str(b) for b in ticks])
    axis.set_xlim(-0.5, len(ticks) - 0.5)
    axis.set_xlabel(f"per-rank batch b ({rows[0]['world_size'] if rows else '?'} ranks, gloo)")
    metric = "test accuracy" if task == "classification" else "test mean IoU"
    axis.set_ylabel(metric)
    seeds = len({r["seed"] for r in rows})
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed: indicative only"
    model = "small CNN on 8x8 digits" if task == "classification" else \
        "FCN on 32x32 canvases of 2-3 digits"
    axis.set_title(f"{task.capitalize()}, {model}: {metric}, each arm at its best learning "
                   f"rate ({spread})", fontsize=9)
    axis.grid(True, axis="y", alpha=0.3)
    legend_outside(axis)
    return fig


def plot_training(training: List[Dict[str, Any]], task: str, arms: List[str], out_dir: str,
                  stamp: Dict[str, str], name: str) -> str:
    return _save(training_figure(training, task, arms), out_dir, name, stamp)


def write_plots(results: Dict[str, Any], out_dir: str) -> List[str]:
    plan, stamp = results["plan"], results["machine"]
    return [plot_stats(results["stats"], list(plan["stat_batches"]), list(plan["stat_worlds"]),
                       out_dir, stamp),
            plot_training(results["training"], "classification", list(plan["arms"]), out_dir,
                          stamp, FIGURES[1]),
            plot_training(results["training"], "segmentation", list(plan["arms"]), out_dir,
                          stamp, FIGURES[2])]


def stats_mismatch(stats: List[Dict[str, Any]]) -> float:
    """Largest relative difference between SyncBN's statistics error over real ranks and the
    one-process error at the global batch b*W."""
    ref = _reference(stats)
    return max((abs(r[k] - ref[r["per_rank_batch"] * r["world_size"]][i])
                / ref[r["per_rank_batch"] * r["world_size"]][i]
                for r in _measured(stats)
                for i, k in enumerate(("sync_mean_err", "sync_var_err"))), default=float("nan"))


def sync_full_gap(training: List[Dict[str, Any]], task: str) -> Tuple[float, str]:
    """Largest |SyncBN - full-batch BN| test score over grid runs of the same (b, lr, seed):
    the same global batches and initial weights, so the same model up to rounding, which an
    unstable (too high) learning rate amplifies. Returns the gap and where it occurs."""
    full = {(r["per_rank_batch"], r["lr"], r["seed"]): r["score"] for r in training
            if r["task"] == task and r["arm"] == "full" and r["phase"] == "grid"}
    gaps = [(abs(r["score"] - full[(r["per_rank_batch"], r["lr"], r["seed"])]),
             "b=%d, lr %g" % (r["per_rank_batch"], r["lr"]))
            for r in training if r["task"] == task and r["arm"] == "sync" and r["phase"] == "grid"]
    return max(gaps, default=(float("nan"), "-"))


def paired_differences(training: List[Dict[str, Any]], task: str
                       ) -> Dict[Tuple[int, float], List[float]]:
    """Per (per-rank batch, SyncBN's selected lr): SyncBN's test score minus full-batch BN's at
    the same learning rate, one difference per seed (the same global batches and initial
    weights: the same model up to rounding, which training amplifies)."""
    full = {(r["per_rank_batch"], r["lr"], r["seed"]): r["score"] for r in training
            if r["task"] == task and r["arm"] == "full" and r["phase"] != "mpi"}
    out: Dict[Tuple[int, float], List[float]] = {}
    for r in _selected(training, task):
        key = (r["per_rank_batch"], r["lr"], r["seed"])
        if r["arm"] == "sync" and key in full:
            out.setdefault(key[:2], []).append(r["score"] - full[key])
    return out


def seed_count(results: Dict[str, Any]) -> int:
    return len(results["plan"]["seeds"])


def indicative_note(results: Dict[str, Any]) -> str:
    """What a run of fewer seeds than a published one can say; "" for a published run."""
    if seed_count(results) >= PUBLISHED_MIN_SEEDS:
        return ""
    return (f"{seed_count(results)} seed(s): these numbers and targets are only indicative (the "
            "scores spread over seeds); the published ones come from the full run, mean ± std "
            f"over {PUBLISHED_MIN_SEEDS} seeds.")


def _mean_std(values: List[float]) -> str:
    mean, std = _summary(values)
    return "%.3f ± %.3f" % (mean, std) if len(values) > 1 else "%.3f" % mean


def targets(results: Dict[str, Any]) -> List[Dict[str, str]]:
    """What the study must show, checked against this run: one row per target. The training
    targets are judged on the mean over seeds."""
    rows = []
    off = stats_mismatch(results["stats"])
    rows.append({"target": "SyncBN's statistics over real ranks = one process at b*W "
                           f"(relative difference <= {STATS_MATCH_REL_TOL:g})",
                 "measured": "%.1e" % off, "status": "met" if off <= STATS_MATCH_REL_TOL else "missed"})
    seeds = seed_count(results)
    over = f"mean over {seeds} seeds" if seeds > 1 else "one seed"
    for task in ("classification", "segmentation"):
        differences = paired_differences(results["training"], task)
        if differences:
            (batch, lr), worst = max(differences.items(),
                                     key=lambda item: abs(statistics.mean(item[1])))
            gap = abs(statistics.mean(worst))
            rows.append({"target": f"{task}: SyncBN within {ACCURACY_SYNC_VS_FULL_MAX_GAP:g} of "
                                   "full-batch BN at SyncBN's selected setting (same lr, paired "
                                   f"by seed; {over})",
                         "measured": "%s (b=%d, lr %g; worst b)" % (_mean_std(worst), batch, lr),
                         "status": "met" if gap <= ACCURACY_SYNC_VS_FULL_MAX_GAP else "missed"})
        groups = _grouped(results["training"], task)
        small = min((b for _, b in groups), default=None)
        if small is None:
            continue
        synced, local = groups[("sync", small)], groups[("local", small)]
        rows.append({"target": f"{task}: SyncBN beats local BN at b={small} per rank, each at "
                               f"its best lr ({over})",
                     "measured": "%s vs %s" % (_mean_std(synced), _mean_std(local)),
                     "status": "met" if statistics.mean(synced) > statistics.mean(local)
                     else "missed"})
    return rows


def summary_text(results: Dict[str, Any]) -> str:
    """What the command prints at the end: the findings, the tables of each arm at its best
    setting, the targets."""
    arms = list(results["plan"]["arms"])
    lines = ["", *headline(results), ""]
    for task in ("classification", "segmentation"):
        lines += [f"{task} (test score, each arm at its selected setting):",
                  training_table(results["training"], task, arms), ""]
    note = indicative_note(results)
    lines += ["targets" + (" (indicative only: see below)" if note else "") + ":"]
    lines += ["  [%s] %s: %s" % (t["status"], t["target"], t["measured"]) for t in targets(results)]
    if note:
        lines += ["", "Note: " + note]
    return "\n".join(lines)


def headline(results: Dict[str, Any]) -> List[str]:
    """The findings in a few sentences, computed from the numbers (so a rerun rewrites them)."""
    plan, stats = results["plan"], results["stats"]
    ref = _reference(stats)
    worlds = [w for w in plan["stat_worlds"] if w > 1]
    b, w = min(plan["stat_batches"]), max(worlds)
    off = stats_mismatch(stats)
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
        gap, where = sync_full_gap(results["training"], task)
        small, large = batches[0], batches[-1]
        paired = _summary([synced - local for synced, local
                           in zip(groups[("sync", small)], groups[("local", small)])])
        at_large = "" if large == small else "; at b=%d: %.3f / %.3f / %.3f / %.3f" % (
            large, mean[("local", large)], mean[("sync", large)], mean[("full", large)],
            mean[("group", large)])
        seeds = len(groups[("sync", small)])
        lines.append(
            "- %s (%s, each arm at its best learning rate): at b=%d per rank local BN %.3f, "
            "SyncBN %.3f, full-batch BN %.3f, GroupNorm %.3f%s. SyncBN minus local BN at b=%d: "
            "%s. Largest SyncBN vs full-batch gap at the same learning rate and seed over the "
            "grid: %.3f (%s)." % (
                task.capitalize(), metric, small, mean[("local", small)], mean[("sync", small)],
                mean[("full", small)], mean[("group", small)], at_large, small,
                "%+.3f ± %.3f, paired by seed (%d seeds)" % (*paired, seeds) if seeds > 1
                else "%+.3f (one seed)" % paired[0], gap, where))
        lines.append(_group_size_finding(results["training"], task, metric))
    return lines


def _group_size_finding(training: List[Dict[str, Any]], task: str, metric: str) -> str:
    """GroupNorm by group size: its best score over the learning rates of the grid, per b."""
    runs = [r for r in training if r["task"] == task and r["arm"] == "group" and r["phase"] == "grid"]
    best: Dict[Tuple[int, int], float] = {}
    for r in runs:
        key = (r["group_channels"], r["per_rank_batch"])
        best[key] = max(best.get(key, 0.0), r["score"])
    parts = ["%d channel(s) per group at b=%d: %.3f" % (g, b, score)
             for (g, b), score in sorted(best.items(), reverse=True)]
    return ("  - GroupNorm's group size (%s, best over every learning rate of the grid): %s."
            % (metric, "; ".join(parts)))


def markdown(results: Dict[str, Any], figure_dir: Optional[str] = None) -> str:
    """The report: command, machine, settings, the three tables and (optionally) the plots."""
    plan, stamp = results["plan"], results["machine"]
    arms = list(plan["arms"])
    world = plan["train_world"]
    parts = [
        f"Command: `{results['command']}` ({results['mode']} mode, {results['runtime_s']:.0f} s).",
        f"Machine: {stamp_line(stamp)}.",
        *([f"**{indicative_note(results)}**", ""] if indicative_note(results) else []),
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
        "gloo ranks; full-batch BN and GroupNorm run in one process on the global batch. "
        "Each arm at the setting with its best validation score (in brackets; grid below)."
        % plan["class_steps"],
        "",
        training_table(results["training"], "classification", arms),
        "",
        "### 3. Segmentation: 2-3 digits on a 32x32 canvas, FCN, %d ranks" % world,
        "",
        "Test mean IoU (11 classes incl. background; predicting background everywhere scores "
        "about 0.07), %d steps, gloo ranks; each arm at its selected setting." % plan["seg_steps"],
        "",
        training_table(results["training"], "segmentation", arms),
        "",
        "### Tuning grid",
        "",
        "Every arm was trained at peak learning rates %s (AdamW, 5%% warm-up, cosine decay), "
        "GroupNorm also with %s channels per group (1 channel per group is InstanceNorm), with "
        "seed %d; the setting with the best validation score (a split of the training digits, "
        "never the test set) is the arm's setting above. Selected settings in bold."
        % (", ".join("%g" % lr for lr in plan["lrs"]),
           " and ".join(str(g) for g in plan["group_channels"]), plan["seeds"][0]),
        "",
        "Selected at an edge of the grid (the best may lie beyond it): "
        + ("; ".join(grid_edges(results["training"], list(plan["lrs"]))) or "none") + ".",
        "",
        "Classification (accuracy):",
        "",
        grid_table(results["training"], "classification"),
        "",
        "Segmentation (mean IoU):",
        "",
        grid_table(results["training"], "segmentation"),
        "",
        "### Targets",
        "",
        "| target | measured | status |",
        "|---|---|---|",
        *["| %s | %s | %s |" % (t["target"], t["measured"], t["status"]) for t in targets(results)],
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
