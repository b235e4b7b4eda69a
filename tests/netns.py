"""Several hosts on one machine, for the multi-host tests: Linux network namespaces on a bridge.

``Network(count)`` makes ``count`` hosts. Each is a network namespace with its own loopback and
one interface, ``eth0``, at ``10.77.0.<i+1>/24``, plugged into a bridge that lives in a
namespace of its own (the "switch"), so the machine's own network stack gains nothing.
Every network has its own switch, so several test runs on one machine never share a wire
although they use the same addresses. No namespace has a route out: traffic stays between the
hosts of one network (and each host's loopback).

Host names: by default every host keeps the machine's name, as containers often share one.
``hostnames=[...]`` gives each host its own (a UTS namespace per command started on it), and
``resolve=True`` also gives each an ``/etc/hosts`` (``ip netns exec`` reads
``/etc/netns/<namespace>/hosts``) in which every host's name is its address, as a cluster's
DNS would.

Clean-up: a reaper process, in a session of its own, holds a pipe from the process that made
the network; when the network is closed, or that process dies in any way (SIGKILL included),
the reaper kills every process inside the namespaces and deletes them. Namespace names carry
the maker's pid and start time, so a later run also removes any that outlived their maker.

Where namespaces cannot be made (not root, no CAP_NET_ADMIN, no iproute2), tests using the
``network`` fixture skip with the reason, except where a skip would hide a broken fixture:
as root, or with ``CI`` set, they fail. ``SYNCBN_MULTIHOST=skip`` allows the skip (root in
an unprivileged container); ``SYNCBN_MULTIHOST=require`` forbids it anywhere.

Run as ``python netns.py reap NAME...`` this file is the reaper; it imports only the stdlib.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator, List, Optional, Sequence

PREFIX = "syncbn-mh"
SUBNET = "10.77.0"
INTERFACE = "eth0"
_NETNS_ETC = "/etc/netns"
_sequence = itertools.count()


class NetnsUnavailable(RuntimeError):
    """This machine does not let the tests make network namespaces."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One host of a :class:`Network`: its namespace, address and (own) host name."""

    namespace: str
    address: str
    hostname: Optional[str]  # None: the machine's name
    interface: str = INTERFACE

    def command(self, argv: Sequence[str]) -> List[str]:
        """``argv`` run on this host (as its own host name, if it has one)."""
        prefix = ["ip", "netns", "exec", self.namespace]
        if self.hostname:
            # A UTS namespace of its own, named through /proc: no hostname(1) needed.
            prefix += ["unshare", "--uts", "sh", "-c",
                       'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', self.hostname]
        return prefix + [str(arg) for arg in argv]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on this host, in a session of its own (so ``os.killpg`` ends it)."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)


class Network:
    """``count`` hosts on one private bridge; a context manager (``close()`` removes them)."""

    def __init__(self, count: int = 2, hostnames: Optional[Sequence[str]] = None,
                 resolve: bool = False) -> None:
        if hostnames is not None and len(hostnames) != count:
            raise ValueError(f"{count} hosts need {count} host names, got {list(hostnames)}")
        if resolve and hostnames is None:
            raise ValueError("resolve=True needs hostnames: the names to resolve")
        remove_stale()
        self.name = f"{PREFIX}-{os.getpid()}-{_start_time(os.getpid())}-{next(_sequence)}"
        self.switch = f"{self.name}-sw"
        self.hosts = [Host(f"{self.name}-h{index}", f"{SUBNET}.{index + 1}",
                           hostnames[index] if hostnames else None) for index in range(count)]
        self._namespaces = [self.switch] + [host.namespace for host in self.hosts]
        self._reaper: Optional[subprocess.Popen] = None
        _require_tools()
        self._reaper = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "reap", *self._namespaces],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            self._build(resolve)
        except BaseException:
            self.close()
            raise

    def _build(self, resolve: bool) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            port = f"h{index}"
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "add", host.interface, "type", "veth",
                "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            if resolve:
                folder = os.path.join(_NETNS_ETC, host.namespace)
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "hosts"), "w") as hosts_file:
                    hosts_file.write("127.0.0.1 localhost\n")
                    hosts_file.writelines(f"{peer.address} {peer.hostname}\n" for peer in self.hosts)

    def directory(self, by: str = "address") -> str:
        """JSON for ``NETNS_HOSTS``, which tells tests/multihost_scripts where each host is:
        every host under its address (``by="address"``) or its host name (``"hostname"``)."""
        return json.dumps({getattr(host, by): dataclasses.asdict(host) for host in self.hosts})

    def processes(self) -> List[int]:
        """The pids of every process running on a host of this network."""
        return sorted(set().union(*(_pids_in(name) for name in self._namespaces)))

    def close(self) -> None:
        """Kill every process on the hosts and remove the namespaces (through the reaper)."""
        if self._reaper is None:
            return
        reaper, self._reaper = self._reaper, None
        reaper.stdin.close()
        reaper.wait(60)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]


def namespaces() -> List[str]:
    """Every network namespace of this machine that ``ip netns`` knows (by name)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def remove_stale() -> List[str]:
    """Remove the namespaces of networks whose maker is no longer running; returns their names."""
    if shutil.which("ip") is None:
        return []
    stale = []
    for name in namespaces():
        parts = name.split("-")
        if not name.startswith(PREFIX + "-") or len(parts) < 5:
            continue
        pid, started = parts[2], parts[3]
        if not (pid.isdigit() and _start_time(int(pid)) == started):
            stale.append(name)
    remove(stale)
    return stale


def remove(names: Sequence[str]) -> None:
    """Kill every process inside these namespaces, then delete them (and their /etc/netns)."""
    for _ in range(50):  # a process may start another while we kill: until none is left
        pids = set().union(*(_pids_in(name) for name in names)) - {os.getpid()}
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    existing = set(namespaces())
    for name in names:
        if name in existing:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(os.path.join(_NETNS_ETC, name), ignore_errors=True)


def must_not_skip() -> bool:
    """Whether a missing namespace facility fails the tests instead of skipping them."""
    setting = os.environ.get("SYNCBN_MULTIHOST", "").strip().lower()
    if setting in ("skip", "require"):
        return setting == "require"
    return os.geteuid() == 0 or os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _require_tools() -> None:
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable(f"network namespaces need Linux, this is {sys.platform}")
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{' and '.join(missing)} not found: install iproute2 and "
                               "util-linux (apt-get install iproute2 util-linux)")


def _ip(*args: str) -> None:
    completed = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise NetnsUnavailable(
            f"`ip {' '.join(args)}` failed: {completed.stderr.strip() or completed.returncode} "
            "(network namespaces need root or CAP_NET_ADMIN and CAP_SYS_ADMIN)")


def _pids_in(namespace: str) -> set:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                            check=False)
    return {int(word) for word in listed.stdout.split() if word.isdigit()}


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when it is gone): with the pid,
    it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["reap"]:
        while sys.stdin.buffer.read(65536):  # until the maker closes the pipe, or dies
            pass
        remove(sys.argv[2:])
else:
    import pytest

    @pytest.fixture
    def network():
        """``network(count=2, hostnames=None, resolve=False)``: a :class:`Network`, removed
        after the test; skips or fails where namespaces cannot be made (see the module)."""
        made: List[Network] = []

        def make(count: int = 2, hostnames: Optional[Sequence[str]] = None,
                 resolve: bool = False) -> Network:
            try:
                made.append(Network(count, hostnames, resolve))
            except NetnsUnavailable as error:
                if must_not_skip():
                    pytest.fail(f"no network namespaces here: {error}. As root or under CI this "
                                "fails instead of skipping; SYNCBN_MULTIHOST=skip allows the skip",
                                pytrace=False)
                pytest.skip(f"no network namespaces here: {error}")
            return made[-1]

        yield make
        for made_network in made:
            made_network.close()
