"""Does synchronizing BatchNorm statistics pay off at small per-rank batches? (digits, real ranks)

usage: python -m benchmarks.accuracy [--quick | --smoke] [--out DIR] [--render] [--publish]

Writes results.json (every run), results.md (the tables) and accuracy_*.png under DIR
(default benchmarks/results/accuracy), then prints the findings, the scores of each arm at its
best learning rate and the targets. The full run trains every arm with 3 seeds and reports
mean ± std; --quick trains one seed, which is only indicative (the scores spread over seeds: see the
full run's ± std). --render redoes the tables and plots from
DIR/results.json without training. --publish also copies the PNGs to benchmarks/figures/ and
replaces the accuracy section of BENCHMARKS.md, from a run of at least 3 seeds only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import List, Optional

from ..machine import machine_stamp
from . import report, study

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION = re.compile(r"(<!-- section:accuracy[^\n]*-->\n).*?(<!-- end:accuracy -->)", re.S)


INTRO = """\
Does synchronizing the statistics pay off when each rank holds only a few samples? Three
experiments on scikit-learn's digits (1,797 real 8x8 images), with real ranks (separate
processes over gloo, repeats over MPI): (1) the error of the statistics a BatchNorm
normalizes with, against the population statistics of a real activation; (2) a small CNN
classifier and (3) a small fully convolutional segmenter (2-3 digits on a 32x32 canvas,
1-2 canvases per rank), each trained with local BN per rank, `syncbn.SyncBatchNorm`,
GroupNorm, and BN in one process on the whole global batch (the target). All arms share the
initial weights, the global batches (`syncbn.data.rank_batch_stream`), gradient averaging
(`syncbn.data.average_gradients`) and the shape of the AdamW LR schedule; each arm's peak
learning rate (and GroupNorm's group size) is tuned on a small grid against a validation split,
and each arm is reported at its best, with the grid. (Earlier runs trained every arm at one
learning rate chosen for BN and GroupNorm with 4 channels per group only, which predicted
background everywhere on the segmentation task, 0.072 mean IoU, at every batch size and seed;
the grid tells the learning rate's share from the group size's, see the GroupNorm lines under
the findings.) Training uses 4 ranks on this 2-core machine: 8 oversubscribed gloo ranks are
too slow here for the grid, so 8 ranks appear in experiment 1 only.
The numbers below are the full run's (`python -m benchmarks.accuracy`): each arm's scores are
the mean ± std over 3 seeds at its selected setting, and the targets are judged on those means.
`python -m benchmarks.accuracy --quick` is a one-seed version on fewer batch sizes, only
indicative (the scores spread over seeds, as the ± std below shows);
`--smoke` is the CI check (tests/test_accuracy_smoke.py).

"""


def publish(results: dict, out_dir: str) -> None:
    if report.seed_count(results) < report.PUBLISHED_MIN_SEEDS:
        raise SystemExit(f"--publish needs a run of at least {report.PUBLISHED_MIN_SEEDS} seeds "
                         f"(this {results['mode']} run has {report.seed_count(results)}): "
                         "one seed is only indicative")
    figures = os.path.join(REPO, "benchmarks", "figures")
    os.makedirs(figures, exist_ok=True)
    for name in report.FIGURES:
        shutil.copyfile(os.path.join(out_dir, name), os.path.join(figures, name))
    body = ("## The statistical payoff at small per-device batch\n\n" + INTRO
            + report.markdown(results, figure_dir="benchmarks/figures"))
    path = os.path.join(REPO, "BENCHMARKS.md")
    with open(path) as handle:
        text = handle.read()
    if not SECTION.search(text):
        raise SystemExit("BENCHMARKS.md has no accuracy section to replace")
    with open(path, "w") as handle:
        handle.write(SECTION.sub(lambda m: m.group(1) + body + m.group(2), text, count=1))


def measure(mode: str, out_dir: str) -> dict:
    """Run the study's plan for ``mode`` and write DIR/results.json."""
    plan = study.PLANS[mode]
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    rows = study.run(plan)
    flags = {"smoke": " --smoke", "quick": " --quick", "full": ""}[mode]
    results = {"mode": mode, "command": f"python -m benchmarks.accuracy{flags}",
               "machine": machine_stamp(), "plan": study.plan_dict(plan),
               "runtime_s": round(time.perf_counter() - start, 1), **rows}
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=argparse.SUPPRESS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="one seed (only indicative), fewer batch sizes and steps")
    size.add_argument("--smoke", action="store_true", help="tiny CI check (< 1 min)")
    parser.add_argument("--out", metavar="DIR",
                        default=os.path.join(REPO, "benchmarks", "results", "accuracy"),
                        help="results folder (default: benchmarks/results/accuracy)")
    parser.add_argument("--render", action="store_true",
                        help="redo the tables and plots from DIR/results.json, training nothing")
    parser.add_argument("--publish", action="store_true",
                        help="copy the plots to benchmarks/figures and update BENCHMARKS.md (a "
                             f"run of at least {report.PUBLISHED_MIN_SEEDS} seeds only)")
    args = parser.parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, "results.json")) as handle:
            results = json.load(handle)
    else:
        results = measure("smoke" if args.smoke else "quick" if args.quick else "full", args.out)
    report.write_plots(results, args.out)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(report.markdown(results, figure_dir="."))
    if args.publish:
        publish(results, args.out)
    print(report.summary_text(results))
    print(f"wrote {args.out}/{'results.json, ' if not args.render else ''}results.md, "
          f"{', '.join(report.FIGURES)} (the study ran {results['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
