"""Every multi-node recipe of launch/ across two hosts: network namespaces on one machine.

Each host has its own network stack (own loopback, one address on a private bridge: see
tests/netns.py). The training runs are checked bitwise against one host running the same
4 ranks, at the same thread count (OMP_NUM_THREADS=1 on both sides; the recipes pass it on).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from launch_scripts.harness import ROOT, launcher_command, launcher_env
from netns import Host, Network, network  # noqa: F401  (network: the fixture)

pytestmark = pytest.mark.multihost

SCRIPTS = ROOT / "tests" / "multihost_scripts"
TRAIN = str(ROOT / "launch" / "train_example.py")
WHERE = str(SCRIPTS / "where.py")
STEPS = ["--steps", "3"]
LIMIT_S = 150  # a hang still ends the test (a run took 25-45 s on a loaded 2-core machine)
# Launcher variables that must not leak from the environment pytest runs in.
_LAUNCH_PREFIXES = ("SLURM_", "PMI_", "OMPI_", "PMIX_", "MV2_", "HYDRA_")
_LAUNCH_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GLOO_SOCKET_IFNAME", "SYNCBN_TIMEOUT")


def job_env(**extra: str) -> Dict[str, str]:
    env = {name: value for name, value in launcher_env().items()
           if not name.startswith(_LAUNCH_PREFIXES) and name not in _LAUNCH_NAMES}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


class Job:
    """Processes started on hosts, each writing to its own log."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: List[subprocess.Popen] = []
        self.ended: Dict[int, float] = {}

    def start(self, host: Host, argv: Sequence[str], env: Dict[str, str]) -> None:
        with open(self.folder / f"process{len(self.processes)}.log", "wb") as log:
            self.processes.append(host.popen(argv, cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT))

    def output(self, index: Optional[int] = None) -> str:
        indices = range(len(self.processes)) if index is None else [index]
        return "".join(f"--- process {i} ---\n" + (self.folder / f"process{i}.log").read_text(errors="replace")
                       for i in indices)

    def poll(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is not None and index not in self.ended:
                self.ended[index] = time.monotonic()

    def wait(self, limit: float = LIMIT_S) -> List[int]:
        """Every exit status; a process still running at the limit fails the test, named."""
        deadline = time.monotonic() + limit
        try:
            while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
                self.poll()
                time.sleep(0.1)
            self.poll()
            running = [i for i, p in enumerate(self.processes) if p.poll() is None]
            assert not running, f"process(es) {running} still running after {limit} s\n{self.output()}"
            return [p.returncode for p in self.processes]
        finally:
            self.stop()

    def wait_for_line(self, index: int, pattern: str, limit: float = LIMIT_S) -> None:
        deadline = time.monotonic() + limit
        while not re.search(pattern, self.output(index)):
            exited = [i for i, p in enumerate(self.processes) if p.poll() is not None]
            assert not exited and time.monotonic() < deadline, (
                f"no {pattern!r} from process {index} (exited: {exited})\n{self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def job(tmp_path):
    started = Job(tmp_path)
    yield started
    started.stop()


# --- bitwise: two hosts x 2 ranks against one host x 4 ----------------------------------------

@pytest.fixture(scope="module")
def one_host_result(tmp_path_factory) -> Dict[str, torch.Tensor]:
    """Rank 0's weights and running statistics after train_example.py trained as 4 ranks on
    one host (this machine's own network stack; syncbn-launch, gloo, OMP_NUM_THREADS=1)."""
    folder = tmp_path_factory.mktemp("one-host")
    completed = subprocess.run(
        launcher_command("--nprocs", "4", TRAIN, *STEPS, "--save", str(folder / "state.pt")),
        cwd=ROOT, env=job_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=LIMIT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return torch.load(folder / "state.pt")


def assert_trained_as_on_one_host(job: Job, saved: Path, expected: Dict[str, torch.Tensor]) -> None:
    statuses = job.wait()
    output = job.output()
    assert statuses == [0] * len(statuses), output
    for rank in range(4):
        assert f"rank {rank}/4: done, weights agree across ranks" in output, output
    got = torch.load(saved)
    assert got.keys() == expected.keys()
    unequal = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not unequal, f"differ from one host's run: {unequal}"
    assert any("running_mean" in key for key in expected)  # the statistics are compared too


def test_torchrun_recipe_on_two_hosts_sharing_a_name_trains_as_one_host(network, job, one_host_result, tmp_path):
    """One command per host, as documented; the hosts share the machine's name, which resolves to
    none of their addresses."""
    hosts = network(2)
    saved = tmp_path / "state.pt"
    for node_rank, host in enumerate(hosts):
        job.start(host, ["bash", "launch/torchrun_multinode.sh", *STEPS, "--save", str(saved)],
                  job_env(MASTER_ADDR=hosts[0].address, NODE_RANK=str(node_rank), NNODES="2",
                          NPROC_PER_NODE="2", SCRIPT=TRAIN))
    assert_trained_as_on_one_host(job, saved, one_host_result)


def _mpi_hostfile(tmp_path: Path, hosts: Network, ranks_per_host: int) -> Path:
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("".join(f"{host.address}:{ranks_per_host}\n" for host in hosts))
    return hostfile


def _mpirun_recipe_env(tmp_path: Path, hosts: Network, ranks_per_host: int, **extra: str) -> Dict[str, str]:
    """The hostfile recipe without ssh: Hydra starts host 2's proxy through on_host."""
    return job_env(HOSTFILE=str(_mpi_hostfile(tmp_path, hosts, ranks_per_host)),
                   LAUNCHER_EXEC=str(SCRIPTS / "on_host"), IFACE=hosts[0].interface,
                   NETNS_HOSTS=hosts.directory("address"), **extra)


def test_mpirun_recipe_on_two_hosts_sharing_a_name_trains_as_one_host(network, job, one_host_result, tmp_path):
    hosts = network(2)
    saved = tmp_path / "state.pt"
    job.start(hosts[0], ["bash", "launch/mpirun_hostfile.sh", *STEPS, "--save", str(saved)],
              _mpirun_recipe_env(tmp_path, hosts, 2, SCRIPT=TRAIN))
    assert_trained_as_on_one_host(job, saved, one_host_result)


def _slurm_job_env(hosts: Network, tasks_per_node: int, **extra: str) -> Dict[str, str]:
    """What sbatch gives the batch script of a 2-node job: srun and scontrol are
    tests/multihost_scripts/fake_slurm, which start the tasks on the hosts, as srun would."""
    nodes = len(hosts.hosts)
    return job_env(
        PATH=os.pathsep.join([str(SCRIPTS / "fake_slurm"), os.environ["PATH"]]),
        NETNS_HOSTS=hosts.directory("hostname"), SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST=f"node[1-{nodes}]", SLURM_NODELIST=f"node[1-{nodes}]",
        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(nodes * tasks_per_node), SLURM_NPROCS=str(nodes * tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node), SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
        SLURM_SUBMIT_DIR=str(ROOT), SLURMD_NODENAME=hosts[0].hostname, SCRIPT=TRAIN, **extra)


SLURM_RECIPES = {  # recipe -> (tasks per node, extra variables): 2 ranks per node, 1 thread each
    "slurm_srun.sbatch": (2, {"SLURM_CPUS_PER_TASK": "1"}),
    "slurm_torchrun.sbatch": (1, {"SLURM_CPUS_PER_TASK": "2", "GPUS_PER_NODE": "2"}),
    "slurm_mpi.sbatch": (2, {"SLURM_CPUS_PER_TASK": "1"}),
}


@pytest.mark.parametrize("recipe", SLURM_RECIPES)
def test_slurm_recipe_on_two_nodes_trains_as_one_host(network, job, one_host_result, tmp_path, recipe):
    """The batch script runs on the first node, as under sbatch; srun starts each node's tasks
    there with the variables srun sets. Node names resolve to the nodes, as on a cluster."""
    hosts = network(2, hostnames=["node1", "node2"], resolve=True)
    tasks_per_node, extra = SLURM_RECIPES[recipe]
    saved = tmp_path / "state.pt"
    job.start(hosts[0], ["bash", f"launch/{recipe}", *STEPS, "--save", str(saved)],
              _slurm_job_env(hosts, tasks_per_node, **extra))
    assert_trained_as_on_one_host(job, saved, one_host_result)


# --- where the ranks meet ----------------------------------------------------------------------

def _where(output: str) -> Dict[int, Dict[str, str]]:
    """Each rank's WHERE line (see multihost_scripts/where.py), by rank."""
    lines = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in output.splitlines()
             if line.startswith("WHERE ")]
    return {int(line["rank"]): line for line in lines}


def test_mpi_ranks_on_hosts_with_their_own_unresolvable_names_meet_at_rank_0s_address(network, job, tmp_path):
    """Host names that resolve nowhere: rank 1 reaches rank 0 at the address rank 0 offered,
    and gloo on both listens on the interface between them, never loopback."""
    hosts = network(2, hostnames=["alpha", "beta"])
    job.start(hosts[0], ["bash", "launch/mpirun_hostfile.sh"],
              _mpirun_recipe_env(tmp_path, hosts, 1, SCRIPT=WHERE))
    statuses = job.wait()
    where = _where(job.output())
    assert statuses == [0] and sorted(where) == [0, 1], job.output()
    assert where[1]["host"] == "beta" and where[1]["store"].startswith(f"{hosts[0].address}:"), where
    assert {line["gloo"] for line in where.values()} == {hosts[0].interface}, where
    assert {line["sum"] for line in where.values()} == {"3"}, where


# --- a rendezvous that cannot complete -------------------------------------------------------------

NOBODY = "10.77.0.99"  # on the hosts' subnet, but no host has it
TIMEOUT_S = 10


def _assert_every_rank_failed_naming(job: Job, ranks: int, address: str, limit: float) -> None:
    statuses = job.wait()
    output = job.output()
    failures = dict(re.findall(r"FAILED rank=(\d+) after ([\d.]+) s: .*" + re.escape(address), output))
    assert sorted(map(int, failures)) == list(range(ranks)), output
    assert all(float(seconds) < limit for seconds in failures.values()), failures
    assert all(status != 0 for status in statuses), output


def test_an_mpi_rendezvous_at_an_unreachable_address_fails_on_every_rank_naming_it(network, job, tmp_path):
    hosts = network(2)
    job.start(hosts[0], ["bash", "launch/mpirun_hostfile.sh"],
              _mpirun_recipe_env(tmp_path, hosts, 1, SCRIPT=WHERE, MASTER_ADDR=NOBODY,
                                 SYNCBN_TIMEOUT=str(TIMEOUT_S)))
    _assert_every_rank_failed_naming(job, 2, NOBODY, TIMEOUT_S + 2)


def test_an_srun_rendezvous_at_an_unreachable_address_ends_every_rank_within_the_timeout(network, job):
    """Rank 0 hosts the store but cannot reach it at MASTER_ADDR either; rank 1 keeps trying
    until SYNCBN_TIMEOUT; both name the address."""
    hosts = network(2)
    for rank, host in enumerate(hosts):
        job.start(host, [sys.executable, WHERE],
                  job_env(SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NTASKS="2",
                          SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="77", MASTER_ADDR=NOBODY,
                          SYNCBN_TIMEOUT=str(TIMEOUT_S)))
    _assert_every_rank_failed_naming(job, 2, NOBODY, TIMEOUT_S + 2)


# --- a rank killed on host 2 ----------------------------------------------------------------------

FAULT_LIMIT_S = 30


def _rank_process(host: Host, variable: str, rank: int) -> int:
    """The pid of the training process of rank ``rank`` (the launcher's ``variable``) on ``host``."""
    listed = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True)
    for pid in map(int, listed.stdout.split()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                variables, command = environ.read().split(b"\0"), cmdline.read().split(b"\0")
        except OSError:
            continue
        if f"{variable}={rank}".encode() in variables and command[0] == sys.executable.encode() \
                and any(arg.endswith(b"train_example.py") for arg in command):
            return pid
    raise AssertionError(f"no process of rank {rank} ({variable}) on {host.namespace}")


def _kill_and_time(job: Job, pid: int) -> float:
    """SIGKILL ``pid``; seconds until every process of the job has ended."""
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    job.wait(FAULT_LIMIT_S + 30)
    return max(job.ended.values()) - killed


def test_a_rank_killed_on_host_2_ends_the_torchrun_job_on_host_1_naming_it(network, job):
    hosts = network(2)
    for node_rank, host in enumerate(hosts):
        job.start(host, ["bash", "launch/torchrun_multinode.sh", "--steps", "100000"],
                  job_env(MASTER_ADDR=hosts[0].address, NODE_RANK=str(node_rank), NNODES="2",
                          NPROC_PER_NODE="1", SCRIPT=TRAIN))
    job.wait_for_line(0, r"step 5:")
    took = _kill_and_time(job, _rank_process(hosts[1], "RANK", 1))
    statuses = [process.returncode for process in job.processes]
    assert took < FAULT_LIMIT_S and all(status != 0 for status in statuses), (took, statuses, job.output())
    assert re.search(r"rank\s*:\s*1\b", job.output(1)), job.output()  # torchrun's failure summary


def test_a_rank_killed_on_host_2_ends_the_mpiexec_job_on_host_1_naming_it(network, job, tmp_path):
    hosts = network(2)
    job.start(hosts[0], ["bash", "launch/mpirun_hostfile.sh", "--steps", "100000"],
              _mpirun_recipe_env(tmp_path, hosts, 1, SCRIPT=TRAIN))
    job.wait_for_line(0, r"step 5:")
    took = _kill_and_time(job, _rank_process(hosts[1], "PMI_RANK", 1))
    assert took < FAULT_LIMIT_S and job.processes[0].returncode != 0, (took, job.output())
    assert "rank 1 on " in job.output(0) and "was killed by SIGKILL" in job.output(0), job.output()
