"""Running a benchmark command in its CI-sized ``--smoke`` mode, shared by the smoke tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_LIMIT_BYTES = 300 * 1024


def run_smoke(module: str, out: Path, report: str, timeout: float) -> Dict:
    """Run ``python -m module --smoke --out out``; its JSON results, report text and folder."""
    completed = subprocess.run([sys.executable, "-m", module, "--smoke", "--out", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(out / "results.json") as handle:
        results = json.load(handle)
    return {"out": out, "results": results, "markdown": (out / report).read_text(),
            "stdout": completed.stdout}
