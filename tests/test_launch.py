"""syncbn-launch and the launch/ recipes: ranks, output, exit codes, stopping, no orphans."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from typing import List

import pytest
import torch

import syncbn.launch
from conftest import MPI_AVAILABLE, requires_mpi
from launch_scripts.harness import (LIMIT_S, ROOT, SCRIPTS, launcher_command, launcher_env,
                                    run_launcher)

SBN_CHECK = str(SCRIPTS / "sbn_check.py")
TINY = str(SCRIPTS / "tiny.py")
LAUNCH_BACKENDS = ["gloo", pytest.param("mpi", marks=[requires_mpi, pytest.mark.mpi])]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_three_gloo_ranks_match_the_full_batch_with_each_line_prefixed():
    result = run_launcher("--nprocs", "3", SBN_CHECK, "ok")
    assert result.returncode == 0, result
    for rank in range(3):
        assert f"[rank{rank}] rank {rank}/3: statistics match the full batch" in result.stdout
        assert f"[rank{rank}] rank {rank}: to stderr" in result.stderr  # stderr stays stderr
    assert all(re.match(r"\[rank[0-2]\] ", line) for line in result.stdout.splitlines())
    assert "terminate called" not in result.stderr


@pytest.mark.parametrize("backend", LAUNCH_BACKENDS)
def test_lines_arrive_whole_on_their_own_stream_and_in_the_log_dir(backend, tmp_path):
    logs = tmp_path / "logs"
    result = run_launcher("--nprocs", "3", "--backend", backend, "--log-dir", str(logs), TINY, "lines")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for rank in range(3):
        mine = [line for line in lines if line.startswith(f"[rank{rank}] out ")]
        assert len(mine) == 200, result
        assert all(re.fullmatch(rf"\[rank{rank}\] out {rank} \d+ x* end", line) for line in mine)
        assert f"[rank{rank}] err {rank}" in result.stderr.splitlines()
        logged = (logs / f"rank{rank}.log").read_text().splitlines()  # both streams, no prefix
        assert len([line for line in logged if line.startswith(f"out {rank} ")]) == 200
        assert f"err {rank}" in logged
    assert not [line for line in lines if not line.startswith("[rank")], result
    assert {f"rank{rank}.log" for rank in range(3)} <= set(os.listdir(logs))
    if backend == "gloo":  # torchrun's environment, one store for all, a thread default
        threads = max(1, _cores() // 3)
        found = [re.search(rf"\[rank{rank}\] OMP_NUM_THREADS={threads} WORLD_SIZE=3 "
                           rf"LOCAL_RANK={rank} MASTER_PORT=(\d+)", result.stdout) for rank in range(3)]
        assert all(found), result
        assert len({match.group(1) for match in found}) == 1


def test_the_user_thread_setting_wins(monkeypatch):
    job = syncbn.launch._Job(["x.py"], 2, "gloo", None)
    assert job._base_env()["OMP_NUM_THREADS"] == str(max(1, _cores() // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job._base_env()["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("backend", LAUNCH_BACKENDS)
def test_the_failing_rank_exit_code_is_the_launcher_exit_code(backend):
    started = time.monotonic()
    result = run_launcher("--nprocs", "2", "--backend", backend, TINY, "exit", "7")
    assert result.returncode == 7, result
    assert "rank 1 exited with code 7" in result.stderr
    assert "rank 0 was killed by SIGTERM" in result.stderr  # it slept; the launcher ended it
    assert time.monotonic() - started < 60


def test_a_rank_dying_before_a_collective_fails_the_job_fast():
    result = run_launcher("--nprocs", "2", SBN_CHECK, "die-before-collective")
    assert result.returncode == 3, result
    assert result.ended - result.fault_time() < 30
    report = result.stderr[result.stderr.index("job failed"):]
    assert "rank 1 exited with code 3" in report
    assert "leaves before the collective" in report  # the tail of the failing rank
    assert "terminate called" not in result.stderr


def test_timeout_stops_the_job_and_names_the_ranks_still_running():
    # rank 1 exits 0 at once; rank 0 sleeps until the launcher gives up.
    result = run_launcher("--nprocs", "2", "--timeout", "2", TINY, "exit", "0")
    assert result.returncode == 124, result
    assert "timed out after 2 s (--timeout); rank(s) [0] still running" in result.stderr


def _processes_with(marker: str) -> List[int]:
    """Pids of live processes whose command line contains ``marker`` (a scan of /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="scans /proc for survivors")
@pytest.mark.parametrize("backend, sig", [
    ("gloo", signal.SIGTERM),
    pytest.param("mpi", signal.SIGINT, marks=[requires_mpi, pytest.mark.mpi]),
])
def test_a_signal_to_the_launcher_stops_every_rank_and_leaves_no_orphan(backend, sig):
    marker = f"syncbn-orphan-check-{uuid.uuid4().hex}"
    launcher = subprocess.Popen(
        launcher_command("--nprocs", "2", "--backend", backend, TINY, "hang", marker), cwd=ROOT,
        env=launcher_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    ready = threading.Semaphore(0)
    stdout: List[str] = []

    def read() -> None:
        for line in launcher.stdout:
            stdout.append(line)
            if " ready " in line:
                ready.release()

    threading.Thread(target=read, daemon=True).start()
    try:
        for _ in range(2):  # each rank and its grandchild are running
            assert ready.acquire(timeout=LIMIT_S), "".join(stdout)
        launcher.send_signal(sig)
        assert launcher.wait(30) == 128 + sig
        assert f"received {sig.name}" in launcher.stderr.read()
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


@requires_mpi
@pytest.mark.mpi
def test_mpi_backend_two_ranks_match_the_full_batch():
    result = run_launcher("--nprocs", "2", "--backend", "mpi", SBN_CHECK, "ok")
    assert result.returncode == 0, result
    for rank in range(2):
        assert f"[rank{rank}] rank {rank}/2: statistics match the full batch" in result.stdout
        assert f"[rank{rank}] rank {rank}: to stderr" in result.stderr


def test_nccl_refuses_more_ranks_than_gpus(capsys):
    ranks = torch.cuda.device_count() + 1
    with pytest.raises(SystemExit) as info:
        syncbn.launch.main(["--nprocs", str(ranks), "--backend", "nccl", TINY, "lines"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert f"--nprocs {ranks} needs {ranks} GPUs" in message
    assert f"torch.cuda.device_count() is {ranks - 1}" in message


def test_mpi_backend_without_mpiexec_names_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(syncbn.launch, "find_mpiexec", lambda: None)
    with pytest.raises(SystemExit) as info:
        syncbn.launch.main(["--nprocs", "2", "--backend", "mpi", TINY, "lines"])
    assert info.value.code == 2
    assert 'pip install "syncbn[mpi]"' in capsys.readouterr().err


def test_train_example_under_the_launcher():
    result = run_launcher("--nprocs", "2", str(ROOT / "launch" / "train_example.py"), "--steps", "1")
    assert result.returncode == 0, result
    for rank in range(2):
        assert f"[rank{rank}] rank {rank}/2: done, weights agree across ranks" in result.stdout
    assert "terminate called" not in result.stderr


# --- launch/ recipes --------------------------------------------------------------------

RECIPES = ["torchrun_multinode.sh", "mpirun_hostfile.sh", "slurm_torchrun.sbatch", "slurm_mpi.sbatch"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_valid_bash(recipe):
    path = ROOT / "launch" / recipe
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "launch/train_example.py" in text
    if recipe.endswith(".sbatch"):
        assert "#SBATCH --nodes=" in text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_recipe_on_two_nodes_over_loopback():
    """Two torchrun agents ("nodes"), one gloo rank each, rendezvous on a free loopback port."""
    env = launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NNODES="2",
                       NPROC_PER_NODE="1", PYTHON=sys.executable, SCRIPT=SBN_CHECK)
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun_multinode.sh"), "ok"],
                              cwd=ROOT, env=dict(env, NODE_RANK=str(node)), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for node in range(2)]
    try:
        outputs = [node.communicate(timeout=LIMIT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    combined = "".join(out + err for out, err in outputs)
    assert [node.returncode for node in nodes] == [0, 0], combined
    for rank in range(2):
        assert f"rank {rank}/2: statistics match the full batch" in combined
    assert "terminate called" not in combined


@pytest.mark.skipif(not MPI_AVAILABLE, reason="needs mpi4py and mpiexec")
@pytest.mark.mpi
def test_mpirun_recipe_with_a_localhost_hostfile(tmp_path: Path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# one host, two ranks\nlocalhost:2\n")
    completed = subprocess.run(
        ["bash", str(ROOT / "launch" / "mpirun_hostfile.sh"), "--steps", "2"], cwd=ROOT,
        env=launcher_env(HOSTFILE=str(hostfile), PYTHON=sys.executable), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=LIMIT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for rank in range(2):
        assert f"rank {rank}/2: done, weights agree across ranks" in completed.stdout


def test_the_syncbn_launch_console_script_is_installed_and_runs():
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "syncbn-launch"]
    if not scripts:
        pytest.skip("syncbn is importable but not pip-installed here")
    assert scripts[0].load() is syncbn.launch.main
    executable = shutil.which("syncbn-launch")
    if executable is None:
        pytest.skip("the console script is not on PATH")
    completed = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "--nprocs" in completed.stdout, completed.stderr
