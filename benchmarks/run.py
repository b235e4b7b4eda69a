"""Measure syncbn against its peers in one run; write JSON, a Markdown report and PNG plots.

    python -m benchmarks.run [--quick] [--out DIR] [--publish]
    python -m benchmarks.run --only overhead [--only compile] [--out DIR] [--publish]

Every CPU setting (one process without communication; gloo and MPI at each world size) runs
in its own pool of long-lived ranks, which the layer, communication, whole-model and
debug-guard measurements share. --publish copies the report and plots to
benchmarks/figures/ and rewrites the speed and guard sections of BENCHMARKS.md.

--only runs one section alone (a few minutes each) and writes its Markdown fragment to
DIR/<section>.md (--publish: into its section of BENCHMARKS.md): "overhead", the host overhead
of one layer against BatchNorm at W=1 and W=2 with the all-reduces timed apart; "compile",
torch.compile against eager for a small ResNet with syncbn.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from tqdm import tqdm

from syncbn.testing import RankPool, find_mpiexec

from . import aggregate, comm_bench, gpu, layer_bench, model_bench
from .machine import load_average, machine_stamp
from .plan import (LayerCase, Plan, Setting, compile_plan_for, overhead_plan_for, plan_for)
from .plots import write_plots
from .rank_setup import init_side_gloo
from .report import (FULL_REPORT, render_compile_markdown, render_guard_markdown, render_markdown,
                     render_overhead_markdown)
from .targets import evaluate_overhead_targets, evaluate_targets

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")
FIGURES_DIR = os.path.join(HERE, "figures")
BENCHMARKS_MD = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")
RANK_TIMEOUT_S = 300.0
GUARD_SETTING = Setting("gloo", 2)  # where the debug guard's cost is measured


def mpi_available() -> bool:
    return importlib.util.find_spec("mpi4py") is not None and find_mpiexec() is not None


def cpu_settings(plan: Plan, with_mpi: bool) -> List[Setting]:
    backends = ["gloo"] + (["mpi"] if with_mpi else [])
    return [Setting("none", 1)] + [Setting(b, w) for b in backends for w in plan.world_sizes]


@contextlib.contextmanager
def open_pool(backend: str, world_size: int, threads: int) -> Iterator[RankPool]:
    """A rank pool; MPI ranks also get a gloo group so torch.distributed peers can run."""
    with tempfile.TemporaryDirectory(prefix="syncbn-bench-") as scratch:
        with RankPool(world_size, backend, timeout=RANK_TIMEOUT_S,
                      threads_per_rank=threads) as pool:
            if backend == "mpi":
                pool.run(init_side_gloo, os.path.join(scratch, "gloo-store"))
            yield pool


def describe_setting(setting: Setting) -> Dict:
    return {**dataclasses.asdict(setting), "label": setting.label}


def describe_case(case: LayerCase) -> Dict:
    return {**dataclasses.asdict(case), "shape": list(case.shape), "layer": case.layer,
            "label": case.label, "is_resnet50": case.is_resnet50}


class Runner:
    """Runs the measurements of a plan, advancing one progress bar, collecting rows."""

    def __init__(self, plan: Plan, bar: tqdm):
        self.plan = plan
        self.bar = bar

    def _run(self, pool: RankPool, what: str, fn: Callable[..., Any], *args: Any) -> List[Any]:
        self.bar.set_postfix_str(what, refresh=True)
        per_rank = pool.run(fn, *args)
        self.bar.update()
        return per_rank

    def layers(self, pool: RankPool, setting: Setting, cases: Sequence[LayerCase]) -> List[Dict]:
        rows = []
        for case in cases:
            per_rank = self._run(pool, f"{setting.label} {case.label}", layer_bench.time_layer_case,
                                 setting, case, self.plan.warmup, self.plan.reps)
            rows.append({"setting": describe_setting(setting), "case": describe_case(case),
                         **aggregate.combine_layer(per_rank)})
        return rows

    def comm(self, pool: RankPool, setting: Setting) -> List[Dict]:
        per_rank = self._run(pool, f"{setting.label} all-reduce", comm_bench.time_all_reduces,
                             setting, self.plan.comm_channels, self.plan.comm_reps,
                             self.plan.comm_calls_per_rep)
        return [{"setting": describe_setting(setting), **row}
                for row in aggregate.combine_comm(per_rank)]

    def guard(self, pool: RankPool, setting: Setting) -> List[Dict]:
        rows = []
        for case in self.plan.guard_cases:
            per_rank = self._run(pool, f"{setting.label} guard {case.label}",
                                 layer_bench.time_guard_case, setting, case, self.plan.warmup,
                                 self.plan.reps)
            rows.append({"setting": describe_setting(setting), "case": describe_case(case),
                         **aggregate.combine_peers(per_rank)})
        return rows

    def model(self, pool: RankPool, setting: Setting) -> Dict:
        p = self.plan
        per_rank = self._run(pool, f"{setting.label} model", model_bench.time_model_step, setting,
                             p.model_batch, p.model_width, p.model_image, p.warmup, p.model_reps)
        return {"setting": describe_setting(setting),
                **aggregate.combine_model(per_rank, p.model_batch)}

    def profile(self, pool: RankPool, setting: Setting, rows: List[Dict], ratio: str,
                worst: Callable) -> Dict:
        """Profile the ResNet-50-shape case whose ``ratio`` is worst (``worst``: max or min)."""
        resnet = [r for r in rows if r["case"]["is_resnet50"] and ratio in r["ratios"]] or rows
        case_row = worst(resnet, key=lambda r: r["ratios"][ratio])
        case = LayerCase(**{k: case_row["case"][k] for k in
                            ("batch", "channels", "spatial", "dtype", "layout")})
        tables = self._run(pool, f"{setting.label} profile", layer_bench.profile_layer_case,
                           setting, case, self.plan.reps)[0]
        return {"setting": setting.label, "case": case.label, "ratio": ratio,
                "value": case_row["ratios"][ratio], "steps": self.plan.reps, "tables": tables}


def _task_count(plan: Plan, settings: List[Setting]) -> int:
    per_setting = len(plan.layer_cases) + 1  # cases + model
    communicating = sum(s.backend != "none" for s in settings)
    guard = len(plan.guard_cases) if GUARD_SETTING in settings else 0
    profiles = 1 + (GUARD_SETTING in settings)
    return per_setting * len(settings) + communicating + guard + profiles


def run_cpu(plan: Plan, settings: List[Setting], results: Dict) -> None:
    pools: Dict[tuple, List[Setting]] = {}
    for setting in settings:
        pools.setdefault((setting.pool_backend, setting.world_size), []).append(setting)
    with tqdm(total=_task_count(plan, settings), desc="syncbn benchmark", unit="task") as bar:
        runner = Runner(plan, bar)
        for (backend, world_size), hosted in pools.items():
            bar.set_postfix_str(f"starting {world_size} {backend} rank(s)", refresh=True)
            with open_pool(backend, world_size, plan.threads_per_rank) as pool:
                for setting in hosted:
                    rows = runner.layers(pool, setting, plan.layer_cases)
                    results["layers"] += rows
                    if setting.backend == "none":  # the worst overhead over BatchNorm
                        results["profiles"].append(
                            runner.profile(pool, setting, rows, "syncbn_vs_batchnorm", max))
                    else:
                        results["comm"] += runner.comm(pool, setting)
                    results["model"].append(runner.model(pool, setting))
                    if setting == GUARD_SETTING:  # also the smallest lead over the naive peer
                        results["guard"] = runner.guard(pool, setting)
                        results["profiles"].append(
                            runner.profile(pool, setting, rows, "naive_vs_syncbn", min))


def run_gpu(plan: Plan) -> Dict:
    def measure(setting: Setting, cases: List[LayerCase]) -> List[Dict]:
        with open_pool(setting.pool_backend, setting.world_size, plan.threads_per_rank) as pool, \
                tqdm(total=len(cases), desc=f"GPU {setting.label}", unit="case") as bar:
            return Runner(plan, bar).layers(pool, setting, cases)

    return gpu.run_gpu_section(plan, measure)


def rank_layout(results: Dict, rows_key: str = "layers") -> str:
    """E.g. "2 cores served 1 rank x 1 thread, 4 ranks x 1 thread (oversubscribed 2x)"."""
    threads = {r["setting"]["world_size"]: r["threads_per_rank"] for r in results[rows_key]}
    cores = int(results["machine"]["cores"])
    parts = [f"{w} rank{'s' if w > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
             + (f" (oversubscribed {w * t / cores:g}x)" if w * t > cores else "")
             for w, t in sorted(threads.items())]
    return f"{results['machine']['cores']} cores served " + ", ".join(parts)


def write_outputs(results: Dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=1)
    md_path = os.path.join(out_dir, FULL_REPORT)
    with open(md_path, "w") as handle:
        handle.write(render_markdown(results))
    return [json_path, md_path] + write_plots(results, out_dir)


def replace_section(path: str, name: str, body: str) -> None:
    """Replace what lies between the line opening ``<!-- section:NAME`` and ``<!-- end:NAME -->``
    (both kept) with ``body``; the rest of the file, which others edit, is left as it is."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- section:{name}"))
    end = next(i for i, line in enumerate(lines) if line.strip() == f"<!-- end:{name} -->")
    with open(path, "w") as handle:
        handle.write("\n".join(lines[: start + 1] + [body.rstrip("\n")] + lines[end:]))


def publish(paths: List[str], results: Dict) -> None:
    """Copy the report and plots (not the JSON) to the tracked figures folder and write the
    speed and guard sections of BENCHMARKS.md."""
    os.makedirs(FIGURES_DIR, exist_ok=True)
    for path in paths:
        if path.endswith((".md", ".png")):
            shutil.copy(path, FIGURES_DIR)
    folder = os.path.relpath(FIGURES_DIR, os.path.dirname(BENCHMARKS_MD)) + "/"
    replace_section(BENCHMARKS_MD, "speed",
                    render_markdown(results, "Speed and scaling (CPU)", 2, folder, brief=True))
    replace_section(BENCHMARKS_MD, "guard",
                    render_guard_markdown(results, "Cost of the debug guard", 2))


SECTIONS = ("overhead", "compile")
SECTION_KEYS = ("overhead", "overhead_plan", "overhead_targets", "compile", "compile_plan")


def run_overhead(mode: str, with_mpi: bool, results: Dict) -> None:
    """Issue 16's host-overhead benchmark: one process, then 2 ranks per backend."""
    plan = overhead_plan_for(mode)
    settings = [Setting("none", 1)] + [Setting(b, w) for b in ["gloo"] + (["mpi"] * with_mpi)
                                       for w in plan.world_sizes]
    rows = []
    with tqdm(total=len(settings) * len(plan.cases), desc="overhead", unit="case") as bar:
        for setting in settings:
            with open_pool(setting.pool_backend, setting.world_size, 1) as pool:
                for case in plan.cases:
                    inner = plan.inner if case.is_resnet50 else plan.inner_tiny
                    bar.set_postfix_str(f"{setting.label} {case.label}", refresh=True)
                    per_rank = pool.run(layer_bench.time_overhead_case, setting, case,
                                        plan.warmup, plan.reps, inner)
                    rows.append({"setting": describe_setting(setting), "case": describe_case(case),
                                 **aggregate.combine_peers(per_rank)})
                    bar.update()
    results.update(overhead=rows, overhead_plan=dataclasses.asdict(plan),
                   overhead_targets=evaluate_overhead_targets(rows))


def run_compile(mode: str, results: Dict) -> None:
    """torch.compile against eager, in one process and on 2 gloo ranks (each rank compiles)."""
    plan = compile_plan_for(mode)
    rows = []
    for setting in (Setting("none", 1), Setting("gloo", 2)):
        with open_pool(setting.pool_backend, setting.world_size, 1) as pool:
            per_rank = pool.run(model_bench.time_compiled_step, setting, plan.batch, plan.width,
                                plan.image, plan.warmup, plan.reps, timeout=900.0)
        slowest = max(per_rank, key=lambda r: r["peers"]["compiled"]["ms"])
        rows.append({"setting": describe_setting(setting), **slowest,
                     "peers": aggregate.slowest_rank_peers(per_rank)})
    results.update(compile=rows, compile_plan=dataclasses.asdict(plan))


def run_sections(args: argparse.Namespace, mode: str) -> Dict:
    """Run the sections named by --only; write each one's JSON and Markdown fragment."""
    results: Dict = {
        "mode": mode,
        "command": " ".join(["python -m benchmarks.run"] + sys.argv[1:]),
        "machine": machine_stamp(),
        "load_average": {"start": load_average()},
    }
    renderers = {"overhead": (render_overhead_markdown, "Host overhead of one layer (CPU)"),
                 "compile": (render_compile_markdown, "torch.compile against eager (CPU)")}
    os.makedirs(args.out, exist_ok=True)
    for section in dict.fromkeys(args.only):
        if section == "overhead":
            run_overhead(mode, mpi_available(), results)
        else:
            run_compile(mode, results)
        results["load_average"]["end"] = load_average()
        results["rank_layout"] = rank_layout(results, section)
        render, title = renderers[section]
        markdown = render(results, title, 2)
        with open(os.path.join(args.out, f"{section}.json"), "w") as handle:
            json.dump({k: v for k, v in results.items()
                       if k.startswith(section) or k not in SECTION_KEYS}, handle, indent=1)
        with open(os.path.join(args.out, f"{section}.md"), "w") as handle:
            handle.write(markdown + "\n")
        if args.publish:
            replace_section(BENCHMARKS_MD, section, markdown)
        print(markdown)
    return results


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced set (under 3 minutes on 2 cores)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    parser.add_argument("--publish", action="store_true",
                        help="copy speed_results.md and the plots to benchmarks/figures/ and rewrite "
                             "the speed and guard sections of BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: 1; see benchmarks/plan.py)")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run this section alone (repeatable); see above")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, for tests
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.only:
        return run_sections(args, mode)
    plan = plan_for(mode)
    if args.threads:
        plan = dataclasses.replace(plan, threads_per_rank=args.threads)
    with_mpi = mpi_available()
    results: Dict = {
        "mode": mode,
        "command": " ".join(["python -m benchmarks.run"] + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine_stamp(),
        "load_average": {"start": load_average()},
        "plan": dataclasses.asdict(plan),
        "mpi": "measured" if with_mpi else "skipped: mpi4py or mpiexec not found",
        "layers": [], "comm": [], "model": [], "guard": [], "profiles": [],
        "payload_growth": comm_bench.payload_growth(plan.payload_channels, plan.payload_world_sizes),
    }
    run_cpu(plan, cpu_settings(plan, with_mpi), results)
    results["gpu"] = run_gpu(plan)
    results["load_average"]["end"] = load_average()
    results["rank_layout"] = rank_layout(results)
    results["targets"] = evaluate_targets(results["layers"], results["model"])
    paths = write_outputs(results, args.out)
    if args.publish:
        publish(paths, results)
    print("\n".join(["targets:"] + [f"  [{t['status']}] {t['target']} - {t['setting']}: "
                                     f"{t['measured']}" for t in results["targets"]]
                     + ["wrote:"] + paths))
    return results


if __name__ == "__main__":
    main()
