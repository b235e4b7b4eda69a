"""init_distributed's rendezvous on one machine: where rank 0 is looked for, how long, and what
gloo listens on (syncbn.distributed and syncbn._network). Across hosts: tests/test_multihost.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

import syncbn.distributed as distributed
from syncbn import _network
from launch_scripts.harness import ROOT, launcher_env

WHERE = str(ROOT / "tests" / "multihost_scripts" / "where.py")


@pytest.fixture
def bare_env(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "SYNCBN_TIMEOUT", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- the timeout ----------------------------------------------------------------------------

def test_the_timeout_is_the_argument_else_syncbn_timeout_else_torchs_default(bare_env):
    assert distributed.rendezvous_timeout() is None  # torch's own defaults apply
    bare_env.setenv("SYNCBN_TIMEOUT", "42")
    assert distributed.rendezvous_timeout() == timedelta(seconds=42)
    assert distributed.rendezvous_timeout(7) == timedelta(seconds=7)
    assert distributed.rendezvous_timeout(timedelta(minutes=1)) == timedelta(minutes=1)
    assert distributed._store_timeout(None) == timedelta(minutes=30)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_timeout_says_which_setting_is_wrong(bare_env, value):
    bare_env.setenv("SYNCBN_TIMEOUT", value)
    with pytest.raises(ValueError, match="SYNCBN_TIMEOUT|positive"):
        distributed.rendezvous_timeout()


# --- the addresses rank 0 offers ---------------------------------------------------------------

@pytest.fixture
def rank0_host(bare_env):
    """Rank 0 on a host named "node7" (resolving to its eth0 address) with a docker bridge."""
    bare_env.setattr(_network, "interface_addresses", lambda: [
        ("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("eth0", "10.1.2.3"), ("ib0", "10.9.0.3")])
    bare_env.setattr(socket, "gethostname", lambda: "node7")
    bare_env.setattr(_network, "_resolve", lambda host: {"node7": ["127.0.1.1", "10.1.2.3"]}.get(host, []))
    return bare_env


def test_ranks_on_rank_0s_network_stack_meet_it_over_loopback(rank0_host):
    assert distributed.rendezvous_addresses(on_rank0_stack=True) == ["127.0.0.1"]


def test_other_hosts_are_offered_every_address_but_loopback_the_host_names_first(rank0_host):
    assert distributed.rendezvous_addresses(on_rank0_stack=False) == ["10.1.2.3", "172.17.0.1", "10.9.0.3"]


def test_master_addr_is_the_only_address_offered_when_set(rank0_host):
    rank0_host.setenv("MASTER_ADDR", "10.9.0.3")
    assert distributed.rendezvous_addresses(on_rank0_stack=False) == ["10.9.0.3"]
    assert distributed.rendezvous_addresses(on_rank0_stack=True) == ["10.9.0.3"]


def test_this_machine_lists_its_loopback_and_routes_to_it():
    assert ("lo", "127.0.0.1") in _network.interface_addresses()
    assert _network.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert _network.local_address_towards("no-such-host.invalid") is None
    assert _network.interface_of("127.0.0.1") == "lo"
    assert _network.network_stack() == _network.network_stack()


# --- taking the first address that answers -------------------------------------------------------

def _listener(address: str) -> socket.socket:
    server = socket.socket()
    server.bind((address, 0))
    server.listen()
    return server


def test_the_first_address_that_answers_is_taken_in_the_order_offered():
    with _listener("0.0.0.0") as server:
        port = server.getsockname()[1]
        for order in (["127.0.0.2", "127.0.0.1"], ["127.0.0.1", "127.0.0.2"]):
            reached, tried = _network.first_reachable(order, port, 5)
            assert reached[0] == order[0] and tried[0] == f"{order[0]}: connected", (reached, tried)


def test_an_address_that_refuses_is_passed_over_and_reported():
    with _listener("127.0.0.1") as server:  # nothing listens on 127.0.0.3
        port = server.getsockname()[1]
        reached, tried = _network.first_reachable(["127.0.0.3", "127.0.0.1"], port, 5)
    assert reached[0] == "127.0.0.1"
    assert tried[0].startswith("127.0.0.3: ") and "refused" in tried[0], tried


def test_without_retry_a_refusal_is_final_with_retry_the_listener_is_awaited():
    with _listener("127.0.0.1") as probe:
        port = probe.getsockname()[1]  # free again once closed
    started = time.monotonic()
    assert _network.first_reachable(["127.0.0.1"], port, 5)[0] is None
    assert time.monotonic() - started < 2

    def listen_later(server: socket.socket) -> None:
        time.sleep(0.7)
        server.bind(("127.0.0.1", port))
        server.listen()

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=listen_later, args=(server,)).start()
        reached, _ = _network.first_reachable(["127.0.0.1"], port, 10, retry=True)
        assert reached is not None and reached[0] == "127.0.0.1"


# --- gloo's interface --------------------------------------------------------------------------

def test_gloo_is_pointed_at_the_interface_of_this_ranks_rendezvous_address(bare_env):
    distributed._bind_gloo_to("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_a_gloo_interface_set_by_the_user_is_kept(bare_env):
    bare_env.setenv("GLOO_SOCKET_IFNAME", "ib0")
    distributed._bind_gloo_to("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"


def test_an_address_on_no_interface_leaves_gloo_to_its_default(bare_env):
    distributed._bind_gloo_to("192.0.2.77")  # TEST-NET-1: on no interface here
    distributed._bind_gloo_to(None)
    assert "GLOO_SOCKET_IFNAME" not in os.environ


# --- a rendezvous that cannot complete ends at the timeout, naming the address --------------------

def test_a_rank_that_cannot_reach_rank_0_gives_up_at_the_timeout_naming_the_address():
    with _listener("127.0.0.1") as probe:
        port = probe.getsockname()[1]  # nothing listens there once closed
    info = distributed.DistInfo(1, 2, 0, "slurm")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank\(s\) 1 could not reach rank 0's rendezvous store at 127\.0\.0\.1:{port} within 1\.5 s"):
        distributed._slurm_store("127.0.0.1", port, info, timedelta(seconds=1.5))
    assert time.monotonic() - started < 3


def test_rank_0_left_waiting_for_a_rank_ends_at_syncbn_timeout_naming_the_store():
    with _listener("127.0.0.1") as probe:
        port = probe.getsockname()[1]
    env = launcher_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                       SLURM_JOB_ID="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       SYNCBN_TIMEOUT="3")
    for name in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        env.pop(name, None)
    completed = subprocess.run([sys.executable, WHERE], env=env, capture_output=True, text=True,
                               timeout=120, stdin=subprocess.DEVNULL)
    assert completed.returncode == 3, completed.stdout + completed.stderr
    failed = completed.stdout.strip().splitlines()[-1]
    seconds = float(failed.split(" after ")[1].split()[0])
    assert 3 <= seconds < 5, failed
    assert f"the store at 127.0.0.1:{port}" in failed and "SYNCBN_TIMEOUT" in failed, failed
