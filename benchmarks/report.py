"""The Markdown report of one run: targets, summary and detail tables, links to the plots."""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

from .aggregate import geometric_mean
from .machine import stamp_line
from .plots import FIGURES
from .targets import overhead_ratios

PEER_COLUMNS = ("BatchNorm", "syncbn", "naive")
FULL_REPORT = "speed_results.md"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _ms(peers: Dict, name: str) -> str:
    return f"{peers[name]['ms']:.3f}" if name in peers else "—"


def _ratio(ratios: Dict, key: str) -> str:
    return f"{ratios[key]:.2f}x" if key in ratios else "—"


def _counts(counts: List[int]) -> str:
    return "/".join(str(c) for c in counts)


def _by_setting(rows: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for row in rows:
        groups.setdefault(row["setting"]["label"], []).append(row)
    return groups


def _spread(values: List[float], worst) -> str:
    if not values:
        return "—"
    return f"{geometric_mean(values):.2f}x ({worst(values):.2f}x)"


def _layer_summary(layer_rows: List[Dict]) -> List[str]:
    rows = []
    for label, group in _by_setting(layer_rows).items():
        overhead = [r["ratios"]["syncbn_vs_batchnorm"] for r in group]
        speedup = [r["ratios"]["naive_vs_syncbn"] for r in group if "naive_vs_syncbn" in r["ratios"]]
        comm_share = [r["peers"]["syncbn"]["comm_ms"] / r["peers"]["syncbn"]["ms"] for r in group]
        counts = sorted({c for r in group for c in r["peers"]["syncbn"]["collectives_per_step"]})
        evals = sorted({r["collectives_eval"] for r in group})
        torch_notes = {r["torch_syncbn_note"] or "measured" for r in group}
        rows.append((label, group[0]["threads_per_rank"], _spread(overhead, max),
                     _spread(speedup, min), f"{100 * sum(comm_share) / len(comm_share):.0f}%",
                     f"{_counts(counts)} / {_counts(evals)}", ", ".join(sorted(torch_notes))))
    return table(("setting", "threads/rank", "syncbn / BatchNorm: geo-mean (worst)",
                  "naive / syncbn: geo-mean (lowest)", "comm share of syncbn (mean)",
                  "collectives per step: train / eval", "torch.nn.SyncBatchNorm"), rows)


def _layer_details(layer_rows: List[Dict]) -> List[str]:
    lines = []
    for label, group in _by_setting(layer_rows).items():
        lines += [f"<details><summary>{label}: every case</summary>", ""]
        rows = []
        for r in group:
            case, peers, syncbn_peer = r["case"], r["peers"], r["peers"]["syncbn"]
            rows.append((case["layer"], case["batch"], case["dtype"], case["layout"],
                         *(_ms(peers, p) for p in PEER_COLUMNS),
                         _ratio(r["ratios"], "syncbn_vs_batchnorm"),
                         _ratio(r["ratios"], "naive_vs_syncbn"),
                         f"{syncbn_peer['comm_ms']:.3f}", f"{syncbn_peer['compute_ms']:.3f}",
                         _counts(syncbn_peer["collectives_per_step"])))
        lines += table(("layer", "N/rank", "dtype", "layout", "BatchNorm ms", "syncbn ms",
                        "naive ms", "syncbn / BN", "naive / syncbn", "syncbn comm ms",
                        "syncbn compute ms", "collectives/step"), rows)
        lines += ["</details>", ""]
    return lines


def _figure(key: str, alt: str, folder: str) -> List[str]:
    return [f"![{alt}]({folder}{FIGURES[key]})", ""]


def _comm_section(comm_rows: List[Dict], growth: List[Dict], folder: str) -> List[str]:
    rows = [(r["setting"]["label"], r["channels"], r["forward_bytes"], f"{r['forward_us']:.1f}",
             r["backward_bytes"], f"{r['backward_us']:.1f}") for r in comm_rows]
    lines = table(("setting", "C", "forward payload (bytes)", "forward all-reduce (µs)",
                   "backward payload (bytes)", "backward all-reduce (µs)"), rows)
    lines += _figure("comm", "all-reduce latency", folder) + [
              "Forward bytes per rank as the world grows (computed): syncbn all-reduces "
              "4C+3 fp64 values whatever W (count, sums and sums of squares about a shared shift, the ranks' shifts and their squares per channel, invalid-input and fp64-input flags); "
              "torch.nn.SyncBatchNorm all-gathers mean, invstd and count of every rank, "
              "W x (2C+1) fp32 values. Both all-reduce 2C values backward (syncbn fp64, torch fp32).",
              ""]
    channels = sorted({g["channels"] for g in growth})
    by_world: Dict[int, Dict[int, Dict]] = {}
    for g in growth:
        by_world.setdefault(g["world_size"], {})[g["channels"]] = g
    header = ["W"] + [f"{who} C={c}" for c in channels for who in ("syncbn", "torch")]
    rows = [[w] + [by_world[w][c][key] for c in channels
                   for key in ("syncbn_bytes", "torch_syncbn_bytes")] for w in sorted(by_world)]
    return lines + table(header, rows) + _figure("payload", "payload growth", folder)


def _model_section(model_rows: List[Dict]) -> List[str]:
    rows = []
    for r in model_rows:
        peers = r["peers"]
        images = [f"{peers[p]['images_per_s']:.1f}" if p in peers else "—" for p in PEER_COLUMNS]
        rows.append((r["setting"]["label"], r["threads_per_rank"], *images,
                     _ratio(r["ratios"], "syncbn_vs_batchnorm"), _ratio(r["ratios"], "naive_vs_syncbn"),
                     _counts(peers["syncbn"]["collectives_per_step"])))
    return table(("setting", "threads/rank", "BatchNorm img/s", "syncbn img/s", "naive img/s",
                  "syncbn / BN step time", "naive / syncbn step time", "collectives/step"), rows)


def _gpu_section(gpu: Dict) -> List[str]:
    if "skipped" in gpu:
        return [f"Skipped: {gpu['skipped']}", ""]
    rows = []
    for r in gpu["layers"]:
        peers = r["peers"]
        cells = [f"{_ms(peers, p)} ({100 * peers[p]['peak_fraction']:.0f}%)" if p in peers else "—"
                 for p in PEER_COLUMNS + ("torch.nn.SyncBatchNorm",)]
        rows.append((r["setting"]["label"], r["case"]["label"], *cells,
                     r["torch_syncbn_note"] or ""))
    return [f"Peak: {gpu['peak_gbps']:.0f} GB/s ({gpu['peak_source']}). Cells: ms "
            "(achieved bandwidth as a share of the peak, counting 8 passes over the tensor).", ""
            ] + table(("setting", "case", "BatchNorm", "syncbn", "naive", "torch.nn.SyncBatchNorm",
                       "note"), rows)


def _profile_section(profiles: List[Dict]) -> List[str]:
    if not profiles:
        return ["No profile was taken.", ""]
    lines = []
    for p in profiles:
        lines += [f"torch.profiler, {p['setting']}, {p['case']} ({p['ratio']} = {p['value']:.2f}x; "
                  f"{p['steps']} steps on rank 0; ops by self CPU time):", ""]
        for name, text in p["tables"].items():
            lines += [f"<details><summary>{name}</summary>", "", "```", text.rstrip(), "```", "",
                      "</details>", ""]
    return lines


def guard_section(results: Dict) -> List[str]:
    """The debug guard's cost: syncbn(debug=True) / syncbn(debug=False), side by side."""
    if not results["guard"]:
        return ["Not measured: the run had no world size 2.", ""]
    rows = []
    for r in results["guard"]:
        on, off = r["peers"]["syncbn debug=True"], r["peers"]["syncbn"]
        rows.append((r["setting"]["label"], r["case"]["label"], f"{off['ms']:.3f}",
                     f"{on['ms']:.3f}", _ratio(r["ratios"], "guard_on_vs_off"),
                     f"{_counts(off['collectives_per_step'])} / {_counts(on['collectives_per_step'])}"))
    return ["syncbn.SyncBatchNorm(C, debug=True) against debug=False, forward+backward of one "
            "layer, interleaved in the same ranks. The guard adds one all-reduce of a "
            "W x 5 fp64 fingerprint table before each of the layer's two all-reduces, and reads "
            "it on the host.", "",
            *table(("setting", "case", "debug=False ms", "debug=True ms", "debug=True / debug=False",
                    "collectives/step: off / on"), rows)]


def _missed_note(targets: List[Dict]) -> List[str]:
    missed = sorted({t["target"] for t in targets if t["status"] != "met"})
    if not missed:
        return []
    return [f"Missed: {'; '.join(missed)}. Where the time goes: the comm/compute split of every "
            "case below and the torch.profiler tables of the worst cases at the end.", ""]


def _stamp_lines(results: Dict) -> List[str]:
    return [
        f"- Command: `{results['command']}`",
        f"- Machine: {stamp_line(results['machine'])}",
        f"- Ranks on cores: {results['rank_layout']}",
        f"- Load (1/5/15-min averages): {results['load_average']['start']} at the start, "
        f"{results['load_average']['end']} at the end. Other work shares the machine; ratios "
        "come from peers interleaved in the same processes, so they are steadier than times.",
    ]


def render_markdown(results: Dict, title: str = "", level: int = 1, folder: str = "",
                    brief: bool = False) -> str:
    """The whole report. ``level``: the title's heading level (sections go one deeper);
    ``folder``: where the plots lie relative to the Markdown file; ``brief``: link the
    every-case tables (speed_results.md beside the plots) instead of including them."""
    plan = results["plan"]
    every_case = ([f"Every case, with its comm/compute split: [{FULL_REPORT}]({folder}{FULL_REPORT}).", ""]
                  if brief else _layer_details(results["layers"]))
    h1, h2 = "#" * level, "#" * (level + 1)
    lines = [
        f"{h1} {title or 'syncbn speed benchmark'} ({results['mode']} run)", "",
        *_stamp_lines(results),
        f"- Method: forward+backward of one layer (gradients of input, weight, bias); median of "
        f"{plan['reps']} runs after {plan['warmup']} warm-up runs; peers interleaved "
        "(A B C A B C ...) in the same processes; ranks lined up by a barrier before each step; "
        "a time is the slowest rank's median. syncbn's comm time is measured by a timing "
        "communicator around its all-reduces (it includes waiting for other ranks).",
        "- Peers: BatchNorm = torch.nn.BatchNorm1d/2d/3d, no sync (the floor); syncbn over the "
        "setting's backend (\"none\" = one process, no communication); naive = "
        "benchmarks/naive_syncbn.py, a REFERENCE PEER written for this benchmark in the style of "
        "detectron2's NaiveSyncBatchNorm (mean and mean of squares through "
        "torch.distributed.nn.functional.all_reduce), always over torch.distributed gloo: in MPI "
        "runs over a gloo group set up beside MPI in the same ranks; torch.nn.SyncBatchNorm "
        "refuses CPU tensors, so it appears in the GPU section only.",
        "",
        f"{h2} Targets", "",
        *table(("target", "setting", "measured", "status"),
               [(t["target"], t["setting"], t["measured"], t["status"]) for t in results["targets"]]),
        *_missed_note(results["targets"]),
        f"{h2} Layers: summary", "",
        "Ratios are times of the same step measured side by side (> 1: the first is slower).", "",
        *_layer_summary(results["layers"]),
        *_figure("layers", "layer overhead", folder),
        *_figure("split", "comm vs compute", folder),
        f"{h2} Layers: every case", "",
        *every_case,
        f"{h2} Communication alone", "",
        *_comm_section(results["comm"], results["payload_growth"], folder),
        f"{h2} Whole model (SmallResNet, {plan['model_batch']} images of {plan['model_image']}x"
        f"{plan['model_image']} per rank, width {plan['model_width']})", "",
        *_model_section(results["model"]),
        *_figure("model", "model throughput", folder),
        f"{h2} Debug guard", "",
        *guard_section(results),
        f"{h2} GPU", "",
        *_gpu_section(results["gpu"]),
        f"{h2} Profiles of the worst cases (W=1: syncbn / BatchNorm; gloo W=2: naive / syncbn)", "",
        *_profile_section(results["profiles"]),
    ]
    return "\n".join(lines)


def render_guard_markdown(results: Dict, title: str, level: int) -> str:
    """The guard's cost on its own, for BENCHMARKS.md."""
    return "\n".join([f"{'#' * level} {title}", "", *_stamp_lines(results), "",
                      *guard_section(results)])


def render_overhead_markdown(results: Dict, title: str, level: int) -> str:
    """The host-overhead section: per case, BatchNorm, syncbn and syncbn's two all-reduces
    alone, measured side by side; the goals of issue 16."""
    plan = results["overhead_plan"]
    rows = []
    for r in results["overhead"]:
        peers, ratios = r["peers"], overhead_ratios(r)
        rows.append((r["setting"]["label"], r["case"]["label"],
                     *(f"{1e3 * peers[p]['ms']:.1f}" for p in ("BatchNorm", "syncbn", "all-reduces")),
                     f"{ratios['syncbn_vs_batchnorm']:.2f}x",
                     f"{ratios['beyond_all_reduces_vs_batchnorm']:.2f}x"))
    targets = results["overhead_targets"]
    return _section(
        title, level, results,
        f"- Method: forward+backward of one layer (gradients of input, weight, bias), 1 thread per "
        f"rank; peers interleaved in the same processes, median of {plan['reps']} samples after "
        f"{plan['warmup']} warm-up samples, each sample {plan['inner_tiny']} steps back to back "
        f"on the tiny layers and {plan['inner']} on ResNet-50's; a time is the slowest rank's. "
        "\"all-reduces\" is syncbn's two payloads (4C+3 fp64, 2C fp64) all-reduced alone through "
        "the same communicator in the same run; \"beyond\" = (syncbn - all-reduces) / BatchNorm: "
        "the host and compute work syncbn adds besides its communication.",
        table(("target", "setting", "measured", "status"),
              [(t["target"], t["setting"], t["measured"], t["status"]) for t in targets])
        + table(("setting", "case", "BatchNorm µs", "syncbn µs", "all-reduces µs", "syncbn / BN",
                 "beyond all-reduces / BN"), rows))


def render_compile_markdown(results: Dict, title: str, level: int) -> str:
    """The compile section: eager vs torch.compile step time of a small ResNet with syncbn."""
    plan = results["compile_plan"]
    rows = []
    for r in results["compile"]:
        eager, compiled = r["peers"]["eager"]["ms"], r["peers"]["compiled"]["ms"]
        rows.append((r["setting"]["label"], r["norm_layers"], f"{eager:.2f}", f"{compiled:.2f}",
                     f"{compiled / eager:.2f}x", f"{r['first_compiled_step_s']:.1f}",
                     f"{r['graphs']} / {r['graph_breaks']}"))
    return _section(
        title, level, results,
        f"- Model: SmallResNet (benchmarks/model_bench.py) with syncbn.SyncBatchNorm, width "
        f"{plan['width']}, {plan['batch']} images of {plan['image']}x{plan['image']} per rank, "
        f"CPU, 1 thread per rank; one training step (forward, loss, backward); eager and "
        f"torch.compile (default options) from the same weights, interleaved, median of "
        f"{plan['reps']} steps after {plan['warmup']} warm-up steps, slowest rank; graphs and "
        "breaks from torch._dynamo.explain on one forward; the first compiled step (compilation "
        "included) of the slowest rank.",
        table(("setting", "norm layers", "eager ms", "compiled ms", "compiled / eager",
               "first compiled step s (compiles)", "graphs / graph breaks"), rows))


def _section(title: str, level: int, results: Dict, method: str, body: List[str]) -> str:
    """A section run alone: heading, the run's stamp, how it was measured, its tables."""
    return "\n".join([f"{'#' * level} {title}", "", *_stamp_lines(results), method, "", *body])
