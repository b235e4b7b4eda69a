"""Run a test file's kernel tests inside Triton's interpreter, in a subprocess.

The interpreter is chosen when the kernels are decorated, at import: it cannot be switched on
in a process that has already imported syncbn, hence the subprocess (TRITON_INTERPRET=1, and
SYNCBN_TRITON=1 so that CPU tensors take the kernels).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from syncbn.kernels import triton as tk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_interpreter(test_file: str, *pytest_args: str) -> None:
    """Run ``test_file`` (with ``pytest_args``) in the interpreter; fail with its output if it fails."""
    if not tk.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    if tk.INTERPRETED:
        pytest.skip("already inside the interpreter subprocess")
    env = dict(os.environ, TRITON_INTERPRET="1", SYNCBN_TRITON="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file),
         *pytest_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert " passed" in done.stdout.strip().splitlines()[-1], done.stdout[-2000:]
