"""examples/demo.py (the README's first command) runs and reports matching statistics."""
from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_prints_match_and_payoff():
    completed = subprocess.run(
        [sys.executable, os.path.join("examples", "demo.py"), "--steps", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    out = completed.stdout
    assert completed.returncode == 0, out[-2000:] + completed.stderr[-3000:]
    assert "match: yes" in out
    diffs = re.search(r"max \|mean diff\| = (\S+), max \|var diff\| = (\S+)", out)
    assert diffs and max(float(diffs.group(1)), float(diffs.group(2))) < 1e-4
    payoff = re.findall(
        r"(\d) image\(s\) per rank: local BN (\S+) / (\S+)\s+SyncBN (\S+) / (\S+)", out)
    assert [p[0] for p in payoff] == ["1", "2", "4"]
    for _, local_mean, local_var, sync_mean, sync_var in payoff:
        assert float(sync_var) < float(local_var) and float(sync_mean) < float(local_mean)
    accuracies = re.findall(r"(?:local BatchNorm2d|syncbn\.SyncBatchNorm)\s+([\d.]+)", out)
    assert len(accuracies) == 2 and all(0.0 <= float(a) <= 1.0 for a in accuracies)


def test_demo_under_a_launcher_says_it_starts_its_own_ranks():
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")  # what torchrun gives a rank
    completed = subprocess.run([sys.executable, os.path.join("examples", "demo.py")], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "demo.py starts its own ranks; it was started by torchrun" in completed.stderr
