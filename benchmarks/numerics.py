"""syncbn's error on adversarial data, as a ratio to torch BatchNorm's own error.

    python -m benchmarks.numerics [--quick] [--out DIR]

Every distribution of :data:`benchmarks.adversarial.DISTRIBUTIONS_BY_DTYPE` runs at W = 1..4
ranks over gloo (uneven batches, an empty rank from W = 3), one or two training steps; each
is compared with the high-precision oracle exactly as tests/test_numerics.py does. Writes
``numerics.json`` and ``numerics.md`` (the table for BENCHMARKS.md) to DIR and prints the table.
Cell: max over channels, world sizes and seeds of syncbn error / torch error, and in brackets
the margin syncbn error / (2 x torch error + floor), which the tests require to be <= 1.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence

import torch
from tqdm import tqdm

from syncbn.testing import RankPool

from .adversarial import (
    DISTRIBUTIONS,
    DISTRIBUTIONS_BY_DTYPE,
    FLOOR_ULPS,
    MEAN_ROUNDING,
    QUANTITIES,
    TORCH_ERROR_FACTOR,
    Case,
    Comparison,
    compare,
    extended_precision_available,
    run_syncbn_rank,
)
from .machine import machine_stamp, stamp_line
from .report import table

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")
# Rank batch sizes per world size: uneven, and an empty rank from W = 3.
SIZES = {1: (12,), 2: (8, 4), 3: (5, 0, 7), 4: (4, 1, 0, 7)}
QUICK_SIZES = {1: (6,), 2: (4, 2)}
RANK_TIMEOUT_S = 300.0


def plan(quick: bool) -> List[Case]:
    """Every (dtype, distribution) at every world size; 2 seeds x {1, 2 steps} unless quick."""
    sizes = QUICK_SIZES if quick else SIZES
    variants = [(0, 1, 0.0)] if quick else [(0, 1, 0.0), (1, 2, 3.0)]  # seed, steps, grad_correlation
    dtypes = [d for d in DISTRIBUTIONS_BY_DTYPE if d != torch.float64 or extended_precision_available()]
    return [Case(name, dtype, layout, parameter, channels=4, spatial=(4, 4) if quick else (8, 8),
                 steps=steps, seed=seed, grad_correlation=correlation)
            for dtype in dtypes for name, parameter in DISTRIBUTIONS_BY_DTYPE[dtype]
            for layout in sizes.values() for seed, steps, correlation in variants]


def measure(cases: Sequence[Case]) -> List[Dict]:
    """One row per case: per quantity the ratio to torch and the margin to the bound."""
    rows = []
    by_world: Dict[int, List[Case]] = {}
    for case in cases:
        by_world.setdefault(len(case.sizes), []).append(case)
    with tqdm(total=len(cases), desc="numerics") as progress:
        for world_size, group in sorted(by_world.items()):
            with RankPool(world_size, "gloo", timeout=RANK_TIMEOUT_S) as pool:
                for case in group:
                    rows.append(result_row(compare(case, pool.run(run_syncbn_rank, case))))
                    progress.update()
    return rows


def result_row(comparison: Comparison) -> Dict:
    case = comparison.case
    return {
        "distribution": case.distribution, "parameter": case.parameter,
        "dtype": str(case.dtype).replace("torch.", ""), "sizes": list(case.sizes),
        "steps": case.steps, "seed": case.seed, "grad_correlation": case.grad_correlation,
        "ratio": {q: comparison.ratio(q) for q in QUANTITIES},
        "margin": {q: comparison.margin(q) for q in QUANTITIES},
        "max_floor": {q: float(comparison.floor[q].max()) for q in QUANTITIES},
        "failures": comparison.failures(),
    }


def _cell(ratio: float, margin: float) -> str:
    shown = "0" if ratio == 0 else ("inf" if ratio == float("inf") else f"{ratio:.3g}")
    return f"{shown} ({margin:.2g})"


def render_markdown(rows: Sequence[Dict], stamp: Dict[str, str], command: str) -> str:
    """The numerics section: one row per (dtype, distribution), worst case over the rest."""
    grouped: Dict[tuple, List[Dict]] = {}
    for row in rows:
        grouped.setdefault((row["dtype"], row["distribution"], row["parameter"]), []).append(row)
    body = []
    for (dtype, name, parameter), group in grouped.items():
        knob = DISTRIBUTIONS[name][1]
        # A "|" inside a cell would split it: escape it for Markdown tables.
        label = name if knob == "-" else f"{name} ({knob} {parameter:g})".replace("|", "\\|")
        cells = [_cell(max(r["ratio"][q] for r in group), max(r["margin"][q] for r in group)) for q in QUANTITIES]
        worlds = sorted({len(r["sizes"]) for r in group})
        passed = "yes" if not any(r["failures"] for r in group) else "**no**"
        body.append([dtype, label, f"{worlds[0]}-{worlds[-1]}", *cells, passed])
    lines = [
        f"Measured with `{command}` on {stamp_line(stamp)}.",
        "",
        "Cell: max over channels, world sizes (gloo, uneven batches, an empty rank from W = 3), "
        "seeds and steps of syncbn error / torch BatchNorm error (same dtype, one process, the "
        "concatenated batch); in brackets syncbn error / (2 x torch error + floor), which the "
        "tests require to be <= 1. Errors are against float64 BatchNorm, or numpy extended "
        "precision for float64 input. `inf`: torch exact, syncbn not (then the floor decides).",
        "",
    ]
    lines += table(["dtype", "distribution", "W", *QUANTITIES, "within bound"], body)
    lines += [
        f"Floor (benchmarks/adversarial.py `floors`): {FLOOR_ULPS:g} ulps of each quantity's "
        "magnitude (of its terms for sums and differences), plus the rounding of the batch mean "
        f"(in units of eps x |mean|: {MEAN_ROUNDING[torch.float32]:g} for fp32 statistics, "
        f"{MEAN_ROUNDING[torch.float64]:g} for fp64) carried into y, dx, dweight and running_mean, "
        f"and its square into running_var; bound = {TORCH_ERROR_FACTOR:g} x torch error + floor.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W = 1, 2, one seed, small batches")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for numerics.json and numerics.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.numerics" + (" --quick" if args.quick else "")
    rows = measure(plan(args.quick))
    stamp = machine_stamp()
    markdown = render_markdown(rows, stamp, command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "numerics.json"), "w") as handle:
        json.dump({"command": command, "machine": stamp, "rows": rows}, handle, indent=1)
    with open(os.path.join(args.out, "numerics.md"), "w") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
