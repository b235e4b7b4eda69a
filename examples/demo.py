"""syncbn in one minute: 4 CPU ranks over gloo, a small conv net, the real digits images.

    python examples/demo.py [--ranks 4] [--batch 2] [--steps 150]

It starts its own ranks (a syncbn.testing.RankPool): run it as one plain process, not under
syncbn-launch, torchrun, mpiexec or srun (it says so and exits 2 if it finds itself under one).
For a script of your own under a launcher, see launch/train_example.py.
Prints (a) that SyncBatchNorm's statistics equal float64 BatchNorm's on the whole global batch
('match: yes'), (b) how far each rank's own statistics and the synchronized ones are from the
population statistics, and (c) test accuracy after a short training with per-rank BatchNorm vs
SyncBatchNorm. Exits 1 if the statistics do not match. Needs scikit-learn (for the digits).
The data, model and training loop are those of the accuracy study (benchmarks/accuracy).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the study's helpers live in benchmarks/accuracy

from benchmarks.accuracy import tasks  # noqa: E402
from syncbn.distributed import detect_launcher  # noqa: E402
from syncbn.testing import RankPool  # noqa: E402

TOLERANCE = 1e-5  # relative to the largest channel std


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="images per rank and step")
    parser.add_argument("--steps", type=int, default=150, help="training steps (0: skip training)")
    args = parser.parse_args(argv)
    launcher = detect_launcher()
    if launcher != "single":
        print(f"demo.py starts its own ranks; it was started by {launcher} instead: run it as "
              "plain `python examples/demo.py` (launch/train_example.py runs under launchers)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"starting {args.ranks} ranks of its own (gloo, CPU) ...", flush=True)
    with RankPool(args.ranks, "gloo", timeout=300) as pool:
        diffs = pool.run(tasks.full_batch_parity, args.batch)
        worst = max(max(d["mean"], d["var"]) / d["scale"] for d in diffs)
        match = worst <= TOLERANCE
        print(f"\n(a) SyncBatchNorm on {args.ranks} ranks x {args.batch} images vs float64 "
              f"BatchNorm on the concatenated {args.ranks * args.batch} images "
              "(first conv layer, 16 channels):")
        print("    max |mean diff| = %.2e, max |var diff| = %.2e  ->  match: %s" % (
            max(d["mean"] for d in diffs), max(d["var"] for d in diffs), "yes" if match else "NO"))

        errors = pool.run(tasks.rank_stats_errors, (1, 2, 4), 50)
        print("\n(b) RMS error of the normalizing statistics vs the population (mean in population "
              "stds, var relative), 50 batches:")
        for batch in (1, 2, 4):
            local = errors[0][batch]["local"]
            synced = errors[0][batch]["sync"]
            print(f"    {batch} image(s) per rank: local BN {local[0]:.3f} / {local[1]:.3f}   "
                  f"SyncBN {synced[0]:.3f} / {synced[1]:.3f}   "
                  f"({local[1] / synced[1]:.1f}x smaller variance error)")

        if args.steps:
            print(f"\n(c) {args.steps} training steps, {args.batch} images per rank, gradients "
                  "averaged over ranks; test accuracy (eval mode, running stats):")
            for arm, label in (("local", "local BatchNorm2d"), ("sync", "syncbn.SyncBatchNorm")):
                score = pool.run(tasks.train_and_score, "classification", arm, args.batch,
                                 args.steps, 0)[0]["score"]
                print(f"    {label:22s} {score:.3f}", flush=True)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
