"""The hosts fixture (tests/netns.py): own addresses, names, a private wire, and clean-up."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import netns
from netns import network  # noqa: F401  (the fixture)

pytestmark = pytest.mark.multihost

NETWORK_PY = str(Path(netns.__file__).resolve().parents[1] / "syncbn" / "_network.py")
# Plain python, no torch: what each host sees (its stack, addresses, name, how names resolve).
LOOK = textwrap.dedent("""
    import importlib.util, json, socket, sys
    spec = importlib.util.spec_from_file_location("n", sys.argv[1])
    n = importlib.util.module_from_spec(spec); spec.loader.exec_module(n)
    def resolve(name):
        try: return socket.gethostbyname(name)
        except OSError: return None
    print(json.dumps({"stack": n.network_stack(), "addresses": n.interface_addresses(),
                      "name": socket.gethostname(), "peer": resolve(sys.argv[2])}))
""")


def _look(host: netns.Host, peer_name: str = "node3") -> dict:
    completed = host.run([sys.executable, "-c", LOOK, NETWORK_PY, peer_name], capture_output=True,
                         text=True, check=True)
    return json.loads(completed.stdout)


def test_each_host_has_its_own_stack_address_and_no_route_out(network):
    hosts = network(3)
    looks = [_look(host) for host in hosts]
    assert len({look["stack"] for look in looks}) == 3
    for host, look in zip(hosts, looks):
        assert look["addresses"] == [["lo", "127.0.0.1"], ["eth0", host.address]]
        routes = host.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
        assert routes.split()[:1] == ["10.77.0.0/24"] and "default" not in routes, routes
    assert _network_stack_here() not in {look["stack"] for look in looks}


def _network_stack_here() -> str:
    spec = importlib.util.spec_from_file_location("network_here", NETWORK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.network_stack()


def test_hosts_reach_each_other_across_the_bridge(network):
    hosts = network(3)
    server = hosts[2].popen([sys.executable, "-c", textwrap.dedent("""
        import socket
        listener = socket.create_server(("0.0.0.0", 5555))
        print("listening", flush=True)
        connection, (peer, _) = listener.accept()
        connection.sendall(peer.encode())
    """)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline() == "listening\n"
    client = hosts[0].run([sys.executable, "-c",
                           "import socket; print(socket.create_connection(('10.77.0.3', 5555), 5).recv(64).decode())"],
                          capture_output=True, text=True, check=True)
    assert client.stdout.strip() == hosts[0].address  # host 3 saw host 1's own address
    server.wait(10)


def test_hosts_share_the_machines_name_unless_given_their_own(network):
    shared = network(2)
    assert {_look(host)["name"] for host in shared} == {socket.gethostname()}
    named = network(3, hostnames=["node1", "node2", "node3"])
    assert [_look(host)["name"] for host in named] == ["node1", "node2", "node3"]
    assert _look(named[0])["peer"] is None  # names that resolve nowhere, unless asked
    resolving = network(3, hostnames=["node1", "node2", "node3"], resolve=True)
    assert _look(resolving[0])["peer"] == resolving[2].address


def test_closing_a_network_ends_its_processes_and_removes_it(network):
    hosts = network(2)
    sleeper = hosts[1].popen(["sleep", "600"])
    time.sleep(0.3)
    assert hosts.processes()
    hosts.close()
    assert sleeper.wait(10) == -signal.SIGKILL
    assert not [name for name in netns.namespaces() if name.startswith(hosts.name)]


def test_a_maker_killed_by_sigkill_leaves_no_host_and_no_process_behind(network):
    """The reaper cleans up after a test run that died without running any teardown."""
    network(1)  # skips or fails here, first, where namespaces cannot be made
    maker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(netns.__file__).parent)!r})
        import netns
        hosts = netns.Network(2)
        hosts[1].popen(["sleep", "600"])
        print(hosts.name, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        name = maker.stdout.readline().strip()
        assert name.startswith(netns.PREFIX), name
        deadline = time.monotonic() + 10
        while not _sleepers_in(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        sleepers = _sleepers_in(name)
        assert sleepers
    finally:
        os.killpg(maker.pid, signal.SIGKILL)
        maker.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [n for n in netns.namespaces() if n.startswith(name)]:
        time.sleep(0.2)
    assert not [n for n in netns.namespaces() if n.startswith(name)]
    assert not [pid for pid in sleepers if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's exit status waits for a pid 1 that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _sleepers_in(name: str) -> set:
    return set().union(*(netns._pids_in(n) for n in netns.namespaces() if n.startswith(name)))


def test_namespaces_outliving_their_maker_are_removed_by_the_next_network(network):
    network(1)  # skips or fails here, first, where namespaces cannot be made
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now (or one with another start time)
    stale = f"{netns.PREFIX}-{dead.pid}-1-0-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in netns.namespaces()
        network(1)
        assert stale not in netns.namespaces()
    finally:
        netns.remove([stale])


@pytest.mark.parametrize("setting, root, ci, must", [
    ("", True, "", True),          # CI runs as root: a skip there would hide a broken fixture
    ("", False, "true", True),     # CI set, whoever runs it
    ("", False, "", False),        # a developer without root: skip, with the reason
    ("", False, "false", False),
    ("skip", True, "true", False),  # root in an unprivileged container, by choice
    ("require", False, "", True),
])
def test_where_namespaces_are_missing_the_tests_fail_as_root_or_under_ci_else_skip(monkeypatch, setting, root, ci, must):
    monkeypatch.setenv("SYNCBN_MULTIHOST", setting)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    assert netns.must_not_skip() is must


def test_a_machine_without_iproute2_fails_the_fixture_where_required_else_skips(tmp_path):
    test_file = tmp_path / "test_needs_hosts.py"
    test_file.write_text("from netns import network\n\ndef test_it(network):\n    network(2)\n")
    tests_dir = str(Path(netns.__file__).parent)
    outcomes = {}
    for setting in ("require", "skip"):
        env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=tests_dir, SYNCBN_MULTIHOST=setting)
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--noconftest",
             "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        outcomes[setting] = completed
    required = outcomes["require"].stdout
    assert outcomes["require"].returncode == 1 and "ip and unshare not found" in required, required
    assert "SYNCBN_MULTIHOST=skip" in required
    skipped = outcomes["skip"].stdout
    assert outcomes["skip"].returncode == 0 and "1 skipped" in skipped and "ip and unshare not found" in skipped, skipped
