"""syncbn.distributed: launcher detection, Slurm host lists and ports, and one training script
giving bitwise-identical results under syncbn-launch (gloo, mpi), torchrun, bare mpiexec and srun."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import syncbn
import syncbn.distributed as distributed
import syncbn.launch
from conftest import MPI_AVAILABLE
from launch_scripts import train_everywhere
from launch_scripts.harness import LIMIT_S, ROOT, SCRIPTS, launcher_command, launcher_env
from syncbn.testing import find_mpiexec

TRAIN = str(SCRIPTS / "train_everywhere.py")
WORLD = 2
# Every variable any launcher sets that detection reads: cleared before each unit test.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_RANK", "PMIX_SIZE",
                    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
                    "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST")


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
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    # torchrun under srun, and Hydra's proxies started by srun: the inner launcher numbered the ranks
    ({"RANK": "5", "WORLD_SIZE": "16", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "torchrun"),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "mpi"),
    ({"SLURM_JOB_ID": "12"}, "single"),  # inside an allocation, but not started by srun
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


def _record_init(env, calls: List[tuple]) -> None:
    """Record instead of starting a group (no GPU, no peers here): the wiring only."""
    env.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    env.setattr(torch.cuda, "device_count", lambda: 8)
    env.setattr(torch.distributed, "init_process_group",
                lambda backend, **options: calls.append(("init", backend, options)))
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        env.setenv(name, value)


def test_nccl_puts_each_rank_on_the_gpu_of_its_local_rank_before_the_group_starts(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    info = syncbn.init_distributed("nccl", timeout=5)
    assert info == syncbn.DistInfo(rank=5, world_size=8, local_rank=1, launcher="torchrun")
    assert calls == [("set_device", 1), ("init", "nccl", {"timeout": timedelta(seconds=5)})]


def test_a_rank_that_sees_one_gpu_uses_it(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per rank
    assert syncbn.init_distributed("nccl").local_rank == 1
    assert calls[0] == ("set_device", 0)


def test_the_default_backend_is_gloo_without_cuda(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.cuda, "is_available", lambda: False)
    syncbn.init_distributed(timeout=timedelta(minutes=2))
    assert calls == [("init", "gloo", {"timeout": timedelta(minutes=2)})]


def test_an_existing_group_is_reported_not_initialized_again(bare_env):
    calls: List[tuple] = []
    _record_init(bare_env, calls)
    bare_env.setattr(torch.distributed, "is_initialized", lambda: True)
    bare_env.setattr(torch.distributed, "get_rank", lambda group=None: 5)
    bare_env.setattr(torch.distributed, "get_world_size", lambda group=None: 8)
    info = syncbn.init_distributed()
    assert info == syncbn.DistInfo(rank=5, world_size=8, local_rank=1, launcher="torchrun")
    assert calls == []


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
