"""syncbn-launch and the launch/ recipes: ranks, output, exit codes, stopping, no orphans."""
from __future__ import annotations

import json
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
from typing import List, Tuple

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


def _rank_environments(output: str) -> dict:
    """Each rank's launcher variables, from tiny.py's "env" lines, by RANK (or PMI_RANK)."""
    found = [json.loads(text) for text in re.findall(r"^(?:\[rank\d\] )?env (\{.*\})$", output, re.M)]
    return {int(env["RANK"] if env["RANK"] is not None else env["PMI_RANK"]): env for env in found}


def test_gloo_ranks_get_the_variables_torchrun_gives_them():
    """LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK and the rest, rank by rank as torchrun
    --standalone sets them (the oracle); only the rendezvous address and the run id differ."""
    ours = run_launcher("--nprocs", "3", TINY, "env")
    assert ours.returncode == 0, ours
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "3", TINY, "env"], cwd=ROOT, env=launcher_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=LIMIT_S)
    assert torchrun.returncode == 0, torchrun.stdout + torchrun.stderr
    expected, got = _rank_environments(torchrun.stdout), _rank_environments(ours.stdout)
    assert sorted(got) == sorted(expected) == [0, 1, 2], ours
    differ = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    for rank in range(3):
        assert {k: v for k, v in got[rank].items() if k not in differ} == \
               {k: v for k, v in expected[rank].items() if k not in differ}, rank
        assert got[rank]["LOCAL_WORLD_SIZE"] == "3" and got[rank]["GROUP_RANK"] == "0"
        assert got[rank]["ROLE_RANK"] == str(rank) and got[rank]["MASTER_ADDR"] == "127.0.0.1"
    for name in differ[1:]:  # one store and one run for the whole job
        assert len({got[rank][name] for rank in range(3)}) == 1, name


@requires_mpi
@pytest.mark.mpi
def test_mpi_ranks_get_mpiexecs_variables_and_none_of_torchruns():
    result = run_launcher("--nprocs", "2", "--backend", "mpi", TINY, "env")
    assert result.returncode == 0, result
    got = _rank_environments(result.stdout)
    assert sorted(got) == [0, 1], result
    for rank, env in got.items():
        assert env.pop("PMI_RANK") == str(rank) and env.pop("PMI_SIZE") == "2"
        assert set(env.values()) == {None}, env


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


def test_the_summary_shows_each_error_once_grouping_ranks_that_differ_only_in_the_rank(tmp_path):
    """Ranks 0 and 1 raise the same chained error but for the rank number, rank 2 another: the
    summary has one exception line and one traceback per group, each traceback the last of
    its chain (the whole chain was shown live, once per rank)."""
    result = run_launcher("--nprocs", "3", TINY, "raise", str(tmp_path))
    assert result.returncode == 1, result
    summary = result.stderr[result.stderr.index("syncbn-launch: job failed"):]
    # On a loaded machine a rank can be stopped by the launcher before it ends on its own
    # (after its traceback): such ranks are not in the summary's groups.
    ended = [rank for rank in range(3) if f"rank {rank} was killed" not in summary]
    same = [rank for rank in (0, 1) if rank in ended]
    assert ended, summary
    shown = [int(rank) for rank in re.findall(
        r"^rank ([01]) raised RuntimeError: rank \1: the same error, chained$", summary, re.M)]
    if same:  # one line for the group, from whichever of its ranks the launcher saw end first
        assert len(shown) == 1 and shown[0] in same, summary
        assert summary.count(" raised RuntimeError") == 1, summary
    if len(same) == 2:
        assert f"\nrank(s) {1 - shown[0]} raised the same but for the rank number\n" in summary, summary
    if 2 in ended:
        assert summary.count("\nrank 2 raised KeyError: 'a different error'\n") == 1, summary
    assert summary.count("--- last lines of rank") == bool(same) + (2 in ended), summary
    assert summary.count("Traceback (most recent call last):") == bool(same) + (2 in ended)
    assert "its cause" not in summary and "direct cause" not in summary, summary  # the chain's start
    for rank in ended:  # each rank's own traceback, with its chain, was shown live
        assert result.stderr.count(f"[rank{rank}] Traceback (most recent call last):") == (
            2 if rank < 2 else 1), result


def test_a_negative_exit_grace_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        syncbn.launch.main(["--nprocs", "2", "--exit-grace", "-1", TINY, "lines"])
    assert info.value.code == 2
    assert "--exit-grace must be 0 or more seconds" in capsys.readouterr().err


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


class _Running:
    """A launcher started in the background whose ranks have all said "ready"."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            launcher_command(*args), cwd=ROOT, env=launcher_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stdout: List[str] = []
        ready = threading.Semaphore(0)

        def read() -> None:
            for line in self.process.stdout:
                self.stdout.append(line)
                if " ready " in line:
                    ready.release()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        nprocs = int(args[args.index("--nprocs") + 1])
        for _ in range(nprocs):
            if not ready.acquire(timeout=LIMIT_S):
                self.kill()
                raise AssertionError("a rank never started: " + "".join(self.stdout))

    def finish(self, sig: int) -> Tuple[int, str, str]:
        """Send ``sig``; the exit status, stdout and stderr once the launcher has ended."""
        self.process.send_signal(sig)
        try:
            status = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the launcher did not end within 30 s of {sig.name}")
        self.reader.join(10)
        return status, "".join(self.stdout), self.process.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="scans /proc for survivors")
@pytest.mark.parametrize("backend, sig", [
    ("gloo", signal.SIGTERM),
    pytest.param("mpi", signal.SIGINT, marks=[requires_mpi, pytest.mark.mpi]),
])
def test_a_signal_to_the_launcher_stops_every_rank_and_leaves_no_orphan(backend, sig):
    marker = f"syncbn-orphan-check-{uuid.uuid4().hex}"
    launcher = _Running("--nprocs", "2", "--backend", backend, TINY, "hang", marker)
    try:  # each rank and its grandchild are running
        status, _, stderr = launcher.finish(sig)
        assert status == 128 + sig
        assert f"received {sig.name}" in stderr
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()


@pytest.mark.parametrize("backend", LAUNCH_BACKENDS)
def test_after_ctrl_c_the_summary_states_the_signal_each_rank_really_got(backend):
    """Rank 0 dies by the SIGTERM the launcher sends; rank 1 ignores it and gets SIGKILL. Each
    rank prints what it got; the summary must say the same, under MPI too (where mpiexec's
    wrappers stand between the launcher and the ranks)."""
    launcher = _Running("--nprocs", "2", "--backend", backend, TINY, "signals")
    try:
        status, stdout, stderr = launcher.finish(signal.SIGINT)
    finally:
        launcher.kill()
    assert status == 130, stderr
    for rank in range(2):
        assert f"[rank{rank}] rank {rank} got SIGTERM" in stdout, stdout
    summary = stderr[stderr.index("syncbn-launch: job failed"):]
    assert summary.startswith("syncbn-launch: job failed (exit status 130): received SIGINT; sent "
                              "SIGTERM to rank(s) [0, 1] (SIGKILL to any left 3 s later); then "), summary
    assert "rank 0 was killed by SIGTERM" in summary and "rank 1 was killed by SIGKILL" in summary
    assert "signal 9" not in stderr.replace(summary, ""), stderr  # mpiexec: no wrapper was killed


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
