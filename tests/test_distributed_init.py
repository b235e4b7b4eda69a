"""syncbn.distributed: launcher detection, Slurm host lists and ports, and one training script
giving bitwise-identical results under syncbn-launch (gloo, mpi), torchrun, bare mpiexec and srun."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

import syncbn
import syncbn.distributed as distributed
import syncbn.launch
from conftest import MPI_AVAILABLE
from launch_scripts import train_everywhere
from launch_scripts.harness import (LIMIT_S, ROOT, SCRIPTS, launcher_command, launcher_env,
                                    run_launcher)
from syncbn.testing import find_mpiexec

TRAIN = str(SCRIPTS / "train_everywhere.py")
WORLD = 2
# Every variable any launcher sets that detection reads: cleared before each unit test.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_RANK", "PMIX_SIZE",
                    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                    "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
                    "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher variables, and no memory of an earlier init_distributed."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_initialized", None)
    return monkeypatch


# --- detection ------------------------------------------------------------------------------

@pytest.mark.parametrize("variables, launcher", [
    ({}, "single"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "torchrun"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "mpi"),  # MPICH/Hydra, Intel MPI
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),  # Open MPI
    ({"PMIX_RANK": "1", "PMIX_SIZE": "4"}, "mpi"),
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "4"}, "mpi"),  # MVAPICH
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, "slurm"),
    # torchrun under srun, and Hydra's proxies started by srun: the inner launcher numbered the ranks
    ({"RANK": "5", "WORLD_SIZE": "16", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "torchrun"),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "mpi"),
    ({"SLURM_JOB_ID": "12"}, "single"),  # inside an allocation, but not started by srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "single"),  # a batch script: it runs once
    # half of torchrun's pair: a broken launch (init_distributed says so), unless another
    # launcher numbered the ranks
    ({"RANK": "1"}, "torchrun"),
    ({"WORLD_SIZE": ""}, "torchrun"),
    ({"WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "2"}, "mpi"),
    ({"RANK": "1", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, "slurm"),
])
def test_the_launcher_is_read_from_the_environment(bare_env, variables, launcher):
    for name, value in variables.items():
        bare_env.setenv(name, value)
    assert distributed.detect_launcher() == launcher


@pytest.mark.parametrize("variables, local_rank", [
    ({"MPI_LOCALRANKID": "3"}, 3),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2),
    ({"MV2_COMM_WORLD_LOCAL_RANK": "1"}, 1),
    ({}, None),  # counted from the ranks' host names instead
])
def test_the_mpi_local_rank_comes_from_the_launchers_variable(bare_env, variables, local_rank):
    for name, value in variables.items():
        bare_env.setenv(name, value)
    assert distributed._local_rank_variable("mpi") == local_rank


def test_without_a_variable_the_mpi_local_rank_is_counted_from_host_names():
    hosts = ["a", "b", "a", "a", "b"]
    assert [distributed.local_rank_from_hosts(hosts, rank) for rank in range(5)] == [0, 0, 1, 2, 1]


def test_a_single_process_initializes_nothing_and_says_so(bare_env):
    assert syncbn.init_distributed() == syncbn.DistInfo(rank=0, world_size=1, local_rank=0,
                                                        launcher="single")
    assert not torch.distributed.is_initialized()
    assert isinstance(syncbn.resolve_communicator(), syncbn.SingleProcessCommunicator)


STORE = "the rendezvous store"  # what the recording _env_store hands on


def _record_init(env, calls: List[tuple]) -> None:
    """Record instead of starting a group (no GPU, no peers here): the wiring only."""
    env.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    env.setattr(torch.cuda, "device_count", lambda: 8)
    env.setattr(distributed, "_env_store",
                lambda info, address, port, timeout: calls.append(("store", address, port, timeout))
                or STORE)
    env.setattr(distributed, "_wait_for_every_rank",
                lambda store, info, where: calls.append(("arrival", store, info.rank)))
    env.setattr(torch.distributed, "init_process_group",
                lambda backend, **options: calls.append(("init", backend, options)))
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        env.setenv(name, value)


def test_nccl_puts_each_rank_on_the_gpu_of_its_local_rank_before_the_group_starts(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    info = syncbn.init_distributed("nccl", timeout=5)
    assert info == syncbn.DistInfo(rank=5, world_size=8, local_rank=1, launcher="torchrun")
    five = timedelta(seconds=5)
    assert calls == [("store", "127.0.0.1", 29511, five), ("arrival", STORE, 5), ("set_device", 1),
                     ("init", "nccl", {"store": STORE, "rank": 5, "world_size": 8, "timeout": five})]


def test_a_rank_that_sees_one_gpu_uses_it(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per rank
    assert syncbn.init_distributed("nccl").local_rank == 1
    assert ("set_device", 0) in calls


def test_the_default_backend_is_gloo_without_cuda(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.cuda, "is_available", lambda: False)
    syncbn.init_distributed(timeout=timedelta(minutes=2))
    assert calls[-1] == ("init", "gloo", {"store": STORE, "rank": 5, "world_size": 8,
                                          "timeout": timedelta(minutes=2)})


def test_an_existing_group_is_reported_not_initialized_again(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.distributed, "is_initialized", lambda: True)
    bare_env.setattr(torch.distributed, "get_rank", lambda group=None: 5)
    bare_env.setattr(torch.distributed, "get_world_size", lambda group=None: 8)
    info = syncbn.init_distributed()
    assert info == syncbn.DistInfo(rank=5, world_size=8, local_rank=1, launcher="torchrun")
    assert calls == []


# --- an environment that cannot make a group: at once, or at the timeout --------------------

INIT_CASES = str(SCRIPTS / "init_cases.py")
TORCHRUN_FIX = "Fix: start every rank with torchrun or syncbn-launch, which set RANK, WORLD_SIZE"
SRUN_FIX = "Fix: start the tasks with srun, which sets SLURM_PROCID, SLURM_STEP_NUM_TASKS"
MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
BROKEN = {  # case -> (the environment, what the error must say, the fix it must name)
    "a rank outside the world": ({"RANK": "3", "WORLD_SIZE": "2", **MASTER},
                                 ["RANK=3 is outside a job of WORLD_SIZE=2 ranks (0 to 1)"], TORCHRUN_FIX),
    "RANK without WORLD_SIZE": ({"RANK": "1"}, ["WORLD_SIZE is not set", "RANK=1"], TORCHRUN_FIX),
    "WORLD_SIZE without RANK": ({"WORLD_SIZE": "2", **MASTER}, ["RANK is not set", "WORLD_SIZE=2"],
                                TORCHRUN_FIX),
    "an empty RANK": ({"RANK": "", "WORLD_SIZE": "2", **MASTER},
                      ["RANK is set but empty", "RANK=''"], TORCHRUN_FIX),
    "an empty RANK alone": ({"RANK": ""}, ["RANK is set but empty"], TORCHRUN_FIX),
    "an empty WORLD_SIZE": ({"RANK": "0", "WORLD_SIZE": " "}, ["WORLD_SIZE is set but empty"],
                            TORCHRUN_FIX),
    "a non-integer WORLD_SIZE": ({"RANK": "0", "WORLD_SIZE": "2.0", **MASTER},
                                 ["WORLD_SIZE='2.0' is not a whole number"], TORCHRUN_FIX),
    "a negative RANK": ({"RANK": "-1", "WORLD_SIZE": "2", **MASTER},
                        ["RANK='-1' is not a whole number"], TORCHRUN_FIX),
    "a world of 0": ({"RANK": "0", "WORLD_SIZE": "0", **MASTER},
                     ["WORLD_SIZE=0: a job has at least one rank"], TORCHRUN_FIX),
    "no MASTER_PORT": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
                       ["MASTER_PORT is not set"], TORCHRUN_FIX),
    "an srun task outside its step": ({"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4"},
                                      ["SLURM_PROCID=4 is outside a job of SLURM_STEP_NUM_TASKS=4"],
                                      SRUN_FIX),
    "an empty srun variable": ({"SLURM_PROCID": "", "SLURM_STEP_NUM_TASKS": "2"},
                               ["SLURM_PROCID is set but empty"], SRUN_FIX),
}
BATCH_SCRIPT = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77",
                "SLURM_JOB_NODELIST": "cn[1-4]"}  # python train.py run by sbatch, without srun
NO_STORE_TIMEOUT_S = 1.0


def _run_processes(commands: List[List[str]], envs: List[Dict[str, str]]) -> List[Tuple[int, str, str]]:
    """Run processes side by side; past LIMIT_S kill them all and name the ones that stalled."""
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
                 for command, env in zip(commands, envs)]
    results, stalled = [], []
    try:
        deadline = time.monotonic() + LIMIT_S
        for index, process in enumerate(processes):
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stalled.append(index)
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert not stalled, f"process(es) {stalled} stalled past {LIMIT_S} s: {results}"
    return results


def _cases(output: str) -> Dict[str, dict]:
    found = re.findall(r"^case (.+?) (\{.*\})$", output, re.M)
    return {name: json.loads(outcome) for name, outcome in found}


@pytest.fixture(scope="module")
def init_outcomes() -> Dict[str, dict]:
    """What init_distributed did under every broken environment, the batch script's and one
    whose store nobody hosts: one process for them all, in order."""
    cases = {name: {"env": env} for name, (env, _, _) in BROKEN.items()}
    cases["batch script"] = {"env": BATCH_SCRIPT}
    cases["no store"] = {"env": {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(_free_port())}, "timeout": NO_STORE_TIMEOUT_S}
    spec = {"clear": list(LAUNCH_VARIABLES), "cases": cases}
    code, out, err = _run_processes([[sys.executable, INIT_CASES, "cases", json.dumps(spec)]],
                                    [launcher_env()])[0]
    outcomes = _cases(out)
    missing = [name for name in cases if name not in outcomes]
    assert code == 0 and not missing, f"no outcome for {missing} (exit {code})\n{out}\n{err[-3000:]}"
    return outcomes


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_environment_that_cannot_make_a_group_raises_at_once_naming_the_variables_and_the_fix(
        init_outcomes, case):
    _, says, fix = BROKEN[case]
    outcome = init_outcomes[case]
    assert outcome.get("error", "").startswith(
        "RuntimeError: init_distributed: this environment cannot make a process group: "), outcome
    for words in says + [fix]:
        assert words in outcome["error"], (words, outcome)
    assert outcome["elapsed"] < 1.0 and not outcome["group"], outcome


def test_a_slurm_batch_script_without_srun_is_one_process_at_once_and_the_warning_names_srun(
        init_outcomes):
    outcome = init_outcomes["batch script"]
    assert outcome.get("info") == {"rank": 0, "world_size": 1, "local_rank": 0,
                                   "launcher": "single"}, outcome
    assert outcome["elapsed"] < 1.0 and not outcome["group"], outcome
    assert any("SLURM_NTASKS=4" in warning and "srun" in warning
               for warning in outcome["warnings"]), outcome


def test_a_rank_that_finds_no_store_says_where_it_looked_at_the_timeout(init_outcomes):
    outcome = init_outcomes["no store"]
    error = outcome.get("error", "")
    assert re.search(r"init_distributed: rank 1 found no rendezvous store at 127\.0\.0\.1:\d+ "
                     r"\(RANK=1, WORLD_SIZE=2, MASTER_ADDR=127\.0\.0\.1, MASTER_PORT=\d+\): it is "
                     r"hosted by rank 0", error), outcome
    # torch's client tries twice, each for the timeout
    assert NO_STORE_TIMEOUT_S * 0.9 < outcome["elapsed"] < NO_STORE_TIMEOUT_S * 2 + 10, outcome


def test_a_rank_that_never_comes_ends_the_wait_at_the_timeout_on_every_rank_naming_those_that_came():
    timeout = 3.0
    env = launcher_env(WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    spec = {"clear": [], "cases": {"wait": {"env": {}, "timeout": timeout}}}
    command = [sys.executable, INIT_CASES, "cases", json.dumps(spec)]
    results = _run_processes([command] * 2, [dict(env, RANK=str(rank)) for rank in range(2)])
    for rank, (code, out, err) in enumerate(results):  # rank 2 never started
        outcome = _cases(out).get("wait", {})
        error = outcome.get("error", "")
        assert re.match(rf"RuntimeError: init_distributed: rank {rank} waited 3 s \(the rendezvous "
                        r"timeout: init_distributed\(timeout=\.\.\.\), else SYNCBN_TIMEOUT seconds\) at "
                        r"the store at 127\.0\.0\.1:\d+ \(MASTER_ADDR:MASTER_PORT\) for all 3 ranks; "
                        r"arrived: rank\(s\) 0, 1; never arrived: rank\(s\) 2 \(", error), (out, err[-3000:])
        assert f"RANK={rank}, WORLD_SIZE=3, MASTER_ADDR=127.0.0.1, MASTER_PORT=" in error, error
        assert TORCHRUN_FIX in error, error
        # rank 0 hosts the store and waited longest; rank 1 read rank 0's verdict
        assert outcome["elapsed"] < timeout + 10, outcome
    assert _cases(results[0][1])["wait"]["elapsed"] > timeout * 0.95


def test_under_syncbn_launch_a_rank_that_never_comes_is_named_by_every_rank_that_came():
    """The launcher hosts the store (torchrun's agent store): the ranks that came raise the same
    error at the timeout, and the launcher's summary shows it once."""
    result = run_launcher("--nprocs", "3", INIT_CASES, "absent", "2", "3")
    assert result.returncode == 1, result
    summary = result.stderr[result.stderr.index("syncbn-launch: job failed"):]
    waited = {int(rank): float(seconds) for rank, seconds in
              re.findall(r"^\[rank\d\] rank (\d) waited (\d+\.\d+) s$", result.stdout, re.M)}
    assert set(waited) == {0, 1} and all(seconds < 3 + 10 for seconds in waited.values()), result
    first = re.search(r"^rank (\d) raised RuntimeError: init_distributed: rank \1 waited 3 s \(the "
                      r"rendezvous timeout: .*? seconds\) at the store at [\d.]+:\d+ \(MASTER_ADDR:MASTER_PORT\) "
                      r"for all 3 ranks; arrived: rank\(s\) 0, 1; never arrived: "
                      r"rank\(s\) 2 \(RANK=\1, WORLD_SIZE=3", summary, re.M)
    assert first, summary
    assert "rank 2 was killed by SIGTERM" in summary, summary  # the one that never came
    other = 1 - int(first.group(1))
    if f"rank {other} exited with code 1" in summary:  # it ended on its own before being stopped
        assert f"rank(s) {other} raised the same but for the rank number" in summary, summary
        assert summary.count(" raised RuntimeError") == 1, summary


# --- Slurm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
    ("n1", ["n1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the padding of the low end
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[5]y,z", ["x5y", "z"]),
])
def test_slurm_host_lists_expand(hostlist, hosts):
    assert distributed.parse_slurm_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-04", "node]1[", "node[a-b]", "node[4-1]", "", "n[1-]"])
def test_malformed_slurm_host_lists_are_refused(hostlist):
    with pytest.raises(ValueError):
        distributed.parse_slurm_hostlist(hostlist)


def test_slurm_rank_zero_is_the_first_host_of_the_step_else_of_the_job(bare_env):
    bare_env.setenv("SLURM_JOB_ID", "77")
    bare_env.setenv("SLURM_JOB_NODELIST", "cn[003-010]")
    assert distributed.slurm_rendezvous()[0] == "cn003"
    bare_env.setenv("SLURM_STEP_NODELIST", "cn[005-006]")
    assert distributed.slurm_rendezvous()[0] == "cn005"
    bare_env.setenv("MASTER_ADDR", "10.0.0.9")
    assert distributed.slurm_rendezvous()[0] == "10.0.0.9"


def test_the_slurm_port_is_master_port_or_a_function_of_the_job_id(bare_env):
    bare_env.setenv("SLURM_JOB_NODELIST", "cn1")
    ports = {}
    for job in ("1", "19999", "20000", "123456789"):
        bare_env.setenv("SLURM_JOB_ID", job)
        ports[job] = distributed.slurm_rendezvous()[1]
    assert ports == {"1": 10001, "19999": 29999, "20000": 10000, "123456789": 10000 + 123456789 % 20000}
    assert all(distributed.SLURM_PORT_BASE <= port < 32768 for port in ports.values())  # below ephemeral
    bare_env.setenv("MASTER_PORT", "4567")
    assert distributed.slurm_rendezvous() == ("cn1", 4567)


def test_slurm_without_a_host_or_a_port_says_what_to_set(bare_env):
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.slurm_rendezvous()
    bare_env.setenv("SLURM_JOB_NODELIST", "cn1")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        distributed.slurm_rendezvous()


# --- one script under every launcher ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _commands(launcher: str, out: str) -> List[tuple]:
    """(command, extra environment) for every process the test starts itself."""
    if launcher == "syncbn-launch gloo":
        return [(launcher_command("--nprocs", str(WORLD), "--timeout", str(LIMIT_S), TRAIN, out), {})]
    if launcher == "syncbn-launch mpi":
        return [(launcher_command("--nprocs", str(WORLD), "--backend", "mpi", "--timeout", str(LIMIT_S),
                                  TRAIN, out), {})]
    if launcher == "torchrun":
        # --standalone: a c10d rendezvous on localhost port 0, i.e. a port the OS assigns.
        return [([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(WORLD), TRAIN, out], {})]
    if launcher == "mpiexec":
        return [([find_mpiexec(), "-n", str(WORLD), sys.executable, TRAIN, out], {})]
    assert launcher == "srun (simulated)"
    # The Slurm recipe, its srun replaced by tests/launch_scripts/fake_slurm/srun (2 local tasks
    # with SLURM_PROCID/SLURM_LOCALID); rank 0's host comes from the node list; the port was free
    # a moment ago (a collision fails loudly, it cannot pass silently).
    slurm = {"SLURM_NTASKS": str(WORLD), "SLURM_JOB_ID": "4242", "MASTER_PORT": str(_free_port()),
             "SLURM_JOB_NODELIST": "localhost,node[02-03]", "PYTHON": sys.executable, "SCRIPT": TRAIN,
             "PATH": os.pathsep.join([str(SCRIPTS / "fake_slurm"), os.environ["PATH"]])}
    return [(["bash", str(ROOT / "launch" / "slurm_srun.sbatch"), out], slurm)]


def _stop(processes: List[subprocess.Popen]) -> None:
    """SIGTERM first: syncbn-launch, torchrun and mpiexec then stop their ranks, which live in
    sessions of their own; SIGKILL whatever is left after a grace period."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


_launched: Dict[str, object] = {}  # launcher -> its results, or the error it ended with


def _launch(launcher: str) -> Dict[int, dict]:
    """Every rank's result of the training script under ``launcher``, by rank (run once)."""
    if launcher not in _launched:
        try:
            _launched[launcher] = _run_under(launcher)
        except AssertionError as error:  # not run again by the next test that needs it
            _launched[launcher] = error
    if isinstance(_launched[launcher], AssertionError):
        raise _launched[launcher]
    return _launched[launcher]


def _run_under(launcher: str) -> Dict[int, dict]:
    out = Path(tempfile.mkdtemp(prefix="syncbn-launch-"))
    try:
        (out / "logs").mkdir()
        processes = []
        try:
            for index, (command, extra) in enumerate(_commands(launcher, str(out))):
                with open(out / "logs" / f"{index}.out", "wb") as log:
                    processes.append(subprocess.Popen(
                        command, cwd=ROOT, env=launcher_env(**extra), stdin=subprocess.DEVNULL,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + LIMIT_S
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                time.sleep(0.2)
            timed_out = any(p.poll() is None for p in processes)
        finally:
            _stop(processes)
        missing = [rank for rank in range(WORLD) if not (out / f"rank{rank}.pt").exists()]
        if timed_out or missing or any(p.returncode != 0 for p in processes):
            output = "".join(log.read_text(errors="replace")[-3000:]
                             for log in sorted((out / "logs").iterdir()))
            raise AssertionError(
                f"{launcher} {'timed out after %d s' % LIMIT_S if timed_out else 'failed'} "
                f"(exit {[p.returncode for p in processes]}); rank(s) {missing} wrote no result\n{output}")
        return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


needs_mpi = pytest.mark.skipif(not MPI_AVAILABLE, reason="needs mpi4py and mpiexec")
LAUNCHERS = {  # how the job is started -> what init_distributed must report
    "syncbn-launch gloo": "torchrun",
    "torchrun": "torchrun",
    "srun (simulated)": "slurm",
    "syncbn-launch mpi": "mpi",
    "mpiexec": "mpi",
}
LAUNCHER_PARAMS = [pytest.param(name, marks=[needs_mpi, pytest.mark.mpi] if "mpi" in name else [])
                   for name in LAUNCHERS]


def _assert_same_state(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    unequal = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not unequal, f"{what}: {unequal} differ"


@pytest.mark.parametrize("launcher", LAUNCHER_PARAMS)
def test_every_launcher_gives_every_rank_its_place_and_the_same_weights(launcher):
    results = _launch(launcher)
    for rank, result in results.items():
        assert result["info"] == {"rank": rank, "world_size": WORLD, "local_rank": rank,
                                  "launcher": LAUNCHERS[launcher]}
        assert result["again"] == result["info"]  # a second call changes nothing
        # syncbn's default group is the torch.distributed group, whichever launcher started it
        assert result["communicator"] == "TorchDistributedCommunicator"
        _assert_same_state(result["state"], results[0]["state"], f"{launcher}: rank {rank} vs rank 0")


@pytest.mark.parametrize("launcher", [p for p in LAUNCHER_PARAMS if p.values[0] != "syncbn-launch gloo"])
def test_the_trained_weights_and_running_stats_are_bitwise_identical_across_launchers(launcher):
    _assert_same_state(_launch(launcher)[0]["state"], _launch("syncbn-launch gloo")[0]["state"],
                       f"{launcher} vs syncbn-launch gloo")


def _reference_state() -> dict:
    """torch's own BatchNorm, one process, the whole global batch, float64."""
    model = train_everywhere.make_model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(train_everywhere.STEPS):
        images, labels = train_everywhere.global_batch(step)
        loss = torch.nn.functional.cross_entropy(model(images.double()), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def test_two_ranks_train_as_one_process_on_the_global_batch():
    reference = _reference_state()
    for key, value in _launch("syncbn-launch gloo")[0]["state"].items():
        torch.testing.assert_close(value.to(reference[key].dtype), reference[key], rtol=1e-4, atol=1e-5,
                                   msg=key)


@needs_mpi
@pytest.mark.mpi
def test_an_mpi_communicator_passed_explicitly_still_syncs_over_mpi():
    images, _ = train_everywhere.global_batch(0)
    full_batch_mean = images.double().mean(dim=(0, 2, 3))
    for result in _launch("mpiexec").values():
        torch.testing.assert_close(result["mpi_running_mean"].double(), full_batch_mean,
                                   rtol=1e-5, atol=1e-6)


def test_the_srun_recipe_is_valid_bash_and_asks_slurm_for_its_tasks():
    path = ROOT / "launch" / "slurm_srun.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "#SBATCH --ntasks-per-node=" in text and "launch/train_example.py" in text


def test_the_mpi_install_hint_works_from_an_index_and_from_a_clone(capsys, monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"mpi4py", "mpich"} <= {requirement.split(">")[0].split("=")[0] for requirement in extras["mpi"]}
    monkeypatch.setattr(syncbn.launch, "find_mpiexec", lambda: None)
    with pytest.raises(SystemExit):
        syncbn.launch.main(["--nprocs", "2", "--backend", "mpi", TRAIN, "out"])
    message = capsys.readouterr().err
    assert 'pip install "syncbn[mpi]"' in message and 'pip install -e ".[mpi]"' in message


def test_a_single_process_reports_single_and_trains_as_batchnorm(bare_env, tmp_path):
    train_everywhere.main(str(tmp_path))  # in this process: no launcher, no group
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert result["info"] == {"rank": 0, "world_size": 1, "local_rank": 0, "launcher": "single"}
    assert result["communicator"] == "SingleProcessCommunicator"
    assert not torch.distributed.is_initialized()
    plain = train_everywhere.make_model()
    train_everywhere.train(plain, 0, 1)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
