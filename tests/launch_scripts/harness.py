"""Running syncbn-launch from the tests: a subprocess with the repository importable."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "launch_scripts"
# Generous: the test machine is small and shared; a hang still ends the test.
LIMIT_S = 240


def launcher_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("OMP_NUM_THREADS", None)  # the launcher's own default is under test
    env.update(extra)
    return env


def launcher_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "syncbn.launch", *args]


class Finished:
    """A finished launcher run: exit status, output, and when it ended."""

    def __init__(self, completed: subprocess.CompletedProcess, ended: float):
        self.returncode = completed.returncode
        self.stdout: str = completed.stdout
        self.stderr: str = completed.stderr
        self.ended = ended

    def fault_time(self) -> Optional[float]:
        """When the worker script announced its fault (FAULT_AT <time>), if it did."""
        found = re.search(r"FAULT_AT (\d+\.\d+)", self.stdout)
        return float(found.group(1)) if found else None

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return (f"<launcher exit {self.returncode}>\n--- stdout ---\n{self.stdout[-6000:]}"
                f"\n--- stderr ---\n{self.stderr[-6000:]}")


def run_command(command: List[str], **extra_env: str) -> Finished:
    completed = subprocess.run(command, cwd=ROOT, env=launcher_env(**extra_env),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=LIMIT_S)
    return Finished(completed, time.time())


def run_launcher(*args: str, **extra_env: str) -> Finished:
    return run_command(launcher_command(*args), **extra_env)
