"""The machine stamp every result file carries: CPU, cores, GPU, library versions, load."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Dict

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mpi_versions() -> Dict[str, str]:
    """mpi4py's and the MPI library's versions, read in a child: importing mpi4py.MPI here
    would initialize MPI in the benchmark's parent process."""
    probe = ("import mpi4py; from mpi4py import MPI; "
             "print(mpi4py.__version__); print(MPI.Get_library_version().splitlines()[0])")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
        return {"mpi4py": out[0].strip(), "mpi_library": " ".join(out[1].split())}
    except (subprocess.SubprocessError, OSError, IndexError):
        return {"mpi4py": "not available", "mpi_library": "not available"}


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (other work shares the machine)."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_stamp() -> Dict[str, str]:
    """Where and with what the numbers were measured, and how loaded the machine was."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "gpu": gpu,
        "torch": torch.__version__,
        **_mpi_versions(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_1_5_15_min": load_average(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def stamp_line(stamp: Dict[str, str]) -> str:
    """One line for plot footers and table captions."""
    return (f"{stamp['cpu']}, {stamp['cores']} cores, GPU: {stamp['gpu']}; torch {stamp['torch']}, "
            f"mpi4py {stamp['mpi4py']}, {stamp['mpi_library']}; load {stamp['load_1_5_15_min']}; "
            f"{stamp['date_utc']} UTC")
