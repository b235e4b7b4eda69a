"""This host's network, as the rendezvous of a multi-host job needs it; stdlib only.

A host name says little about where a process runs: hosts that share a name are common
(containers), and a name often resolves to loopback (Debian's ``127.0.1.1``, a container's
``127.0.0.1``). So the rendezvous tells hosts apart by their network stack, offers the
addresses of rank 0's interfaces, and lets every other rank take the first it can reach.
IPv4 only; ``MASTER_ADDR`` names any other address.
"""
from __future__ import annotations

import ipaddress
import os
import queue
import socket
import struct
import threading
import time
from typing import List, Optional, Sequence, Tuple

__all__ = ["interface_addresses", "network_stack", "local_address_towards", "interface_of",
           "offered_addresses", "first_reachable"]

# Linux ioctls (linux/sockios.h) and the interface flag (linux/if.h).
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1
# Between two connection attempts to an address that refused (its listener not up yet).
_RETRY_S = 0.25
# How long an address that answered waits for the silent addresses preferred to it.
_PREFERENCE_S = 1.0


def interface_addresses() -> List[Tuple[str, str]]:
    """(interface, IPv4 address) of every interface that is up, loopback included, in the
    kernel's order. Linux; elsewhere (no such ioctls) the addresses this host's name resolves to,
    under the interface name ``""``."""
    found: List[Tuple[str, str]] = []
    try:
        import fcntl

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                request = struct.pack("256s", name.encode()[:15])
                try:
                    flags = struct.unpack("H", fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, request)[16:18])[0]
                    if not flags & _IFF_UP:
                        continue
                    reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
                except OSError:  # no IPv4 address on this interface
                    continue
                found.append((name, socket.inet_ntoa(reply[20:24])))
    except (ImportError, OSError):
        pass
    if not found:
        found = [("", address) for address in _resolve(socket.gethostname())]
    return found


def network_stack() -> str:
    """An identifier of the network stack this process runs in: the same for every process that
    shares this machine's network namespace (and so its loopback), different across machines,
    containers and namespaces, whatever their host names."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/net"):
        try:
            parts.append(open(path).read().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("")
    if not any(parts):  # not Linux: the host name is all there is
        return socket.gethostname()
    return "/".join(parts)


def local_address_towards(host: str) -> Optional[str]:
    """This host's address on the route to ``host`` (a name or an IPv4 address): what a
    connection to it would come from. No packet is sent. None when ``host`` does not resolve or
    has no route."""
    for address in _resolve(host):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((address, 9))  # a UDP "connection" only picks the route
                return probe.getsockname()[0]
            except OSError:
                continue
    return None


def interface_of(address: str) -> Optional[str]:
    """The name of this host's interface that holds ``address``, if any."""
    for name, held in interface_addresses():
        if held == address and name:
            return name
    return None


def offered_addresses(name_first: str) -> List[str]:
    """This host's non-loopback IPv4 addresses, in the order another host should try them: those
    ``name_first`` (this host's name) resolves to first, then every other interface's."""
    own = [address for _, address in interface_addresses() if not _is_loopback(address)]
    by_name = [address for address in _resolve(name_first) if address in own]
    return list(dict.fromkeys(by_name + own))


def first_reachable(addresses: Sequence[str], port: int, timeout: float, retry: bool = False
                    ) -> Tuple[Optional[Tuple[str, str]], List[str]]:
    """Try a TCP connection to every address at once; the first in ``addresses``' order that
    accepted one, as (address, this host's address on that connection), and what each attempt
    gave (for an error message). An address that answers is preferred to every later one; one
    still silent a second after a later one answered is passed over. ``(None, ...)`` when none
    answered within ``timeout`` seconds. ``retry``: an address that refuses is tried again
    until then (its listener may not be up yet)."""
    outcomes: "queue.Queue[Tuple[int, object]]" = queue.Queue()
    last_errors: dict = {}  # of an attempt still under way when the time is up
    deadline = time.monotonic() + timeout

    def attempt(index: int, address: str) -> None:
        while True:
            try:
                with socket.create_connection(
                        (address, port), timeout=max(deadline - time.monotonic(), 0.01)) as connection:
                    outcomes.put((index, connection.getsockname()[0]))
                    return
            except OSError as error:
                last_errors[index] = error
                if not retry or time.monotonic() + _RETRY_S >= deadline:
                    outcomes.put((index, error))
                    return
            time.sleep(_RETRY_S)

    for index, address in enumerate(addresses):  # daemon threads: a silent address never holds up exit
        threading.Thread(target=attempt, args=(index, address), daemon=True,
                         name="syncbn-rendezvous-probe").start()
    results: dict = {}
    wait_until = deadline
    while len(results) < len(addresses):
        answered = [index for index, result in results.items() if isinstance(result, str)]
        if answered and all(index in results for index in range(min(answered))):
            break  # it answered, and everything preferred to it has failed
        try:
            index, result = outcomes.get(timeout=max(wait_until - time.monotonic(), 0))
        except queue.Empty:
            break
        results[index] = result
        if isinstance(result, str):  # a little longer for the addresses preferred to it
            wait_until = min(wait_until, time.monotonic() + _PREFERENCE_S)
    waited = timeout - max(deadline - time.monotonic(), 0)

    def outcome(index: int) -> str:
        if isinstance(results.get(index), str):
            return "connected"
        return str(results.get(index, last_errors.get(index, f"no answer within {waited:.3g} s")))

    report = [f"{address}: {outcome(index)}" for index, address in enumerate(addresses)]
    answered = sorted(index for index, result in results.items() if isinstance(result, str))
    if not answered:
        return None, report
    return (addresses[answered[0]], results[answered[0]]), report


def _resolve(host: str) -> List[str]:
    """The IPv4 addresses ``host`` resolves to, in the resolver's order; [] if it does not."""
    if not host:
        return []
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
