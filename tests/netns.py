"""A LAN made of network namespaces, for multi-host tests (root only; Linux ``ip`` and ``tc``).

A :class:`Lab` makes one namespace holding a bridge and, per host, a namespace joined to that
bridge by a veth pair, with an address from a private /24 the lab picks. Nothing is created or
changed in the namespace the tests run in: every interface, address and route lives inside the
lab's namespaces, and :meth:`Lab.close` deletes them all (deleting a namespace deletes its
interfaces), also after a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def why_not() -> str:
    """Why namespaces cannot be made here ("" when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"rmprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    link: str  # the host's interface name inside its namespace


@dataclass
class Lab:
    """Namespaces on one bridge; ``prefix`` keeps concurrent labs apart."""

    prefix: str = field(default_factory=lambda: f"rl{os.getpid() % 100000}")
    subnet: str = "10.213.77"
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def start(self) -> Lab:
        self._add_ns(self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def add_host(self, name: str) -> Host:
        """A namespace with one interface ``eth0`` on the bridge and the next free address."""
        index = len(self.hosts) + 1
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        outer = f"v{index}"
        # made inside the hub, then one end moved into the host's namespace
        _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", ns=self.hub)
        _ip("link", "set", "eth0", "netns", ns, ns=self.hub)
        _ip("link", "set", outer, "master", "br0", ns=self.hub)
        _ip("link", "set", outer, "up", ns=self.hub)
        address = f"{self.subnet}.{index + 1}"
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        # multicast (mDNS) leaves by this interface; there is no default route at all
        _ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=ns)
        host = Host(name, ns, address, "eth0")
        self.hosts[name] = host
        return host

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    def link(self, host: Host, up: bool) -> None:
        """Cut or restore a host's cable: its bridge-side end goes down or up."""
        index = list(self.hosts).index(host.name) + 1
        _ip("link", "set", f"v{index}", "up" if up else "down", ns=self.hub)

    def netem(self, host: Host, spec: str) -> None:
        """``tc qdisc ... netem SPEC`` on the host's interface (delay, loss)."""
        argv = ["tc", "qdisc", "replace", "dev", host.link, "root", "netem", *spec.split()]
        done = subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")

    def netem_missing(self) -> str:
        """Why ``tc netem`` cannot be used here ("" when it can); tried on the hub's loopback."""
        argv = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        if shutil.which("tc") is None:
            return "the tc command (iproute2) is not installed"
        done = subprocess.run(
            ["ip", "netns", "exec", self.hub, *argv], capture_output=True, text=True, timeout=20
        )
        return "" if done.returncode == 0 else done.stderr.strip()

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.namespaces.clear()
