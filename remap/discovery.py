"""Finding the server on the LAN (mDNS / DNS-SD with python-zeroconf), and advertising it.

The server advertises ``_remap._tcp`` with a TXT record: the protocol version, whether TLS is on,
and a *cluster id*, an HMAC of a fixed label keyed with the shared secret. Nodes and consoles
that have the same secret compute the same id, so they can tell their cluster's server from
another's without the secret ever leaving them (the id is a keyed hash: it reveals nothing about
the secret beyond what an offline guess of a weak secret could confirm, so use a strong one).
Discovery is only a hint: mutual authentication still decides who may join.

Zeroconf runs its own threads. Nothing here runs zeroconf on the reactor thread: browsing is a
blocking function (:func:`browse`) that callers run on a worker thread, and :func:`discover`
hands its outcome to the reactor with ``callFromThread`` (through ``deferToThreadPool``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import queue
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet import threads
from twisted.logger import Logger

from protocol.messages import PROTOCOL_VERSION

from .errors import ConfigError
from .settings import Settings, is_loopback

SERVICE_TYPE = "_remap._tcp.local."
#: once one server of our cluster answered, how long to wait for a second one to answer too
SETTLE = 0.5
_LABEL = b"remap cluster id v1"

log = Logger()


def cluster_id(secret: bytes) -> str:
    """The id a server advertises: HMAC-SHA256 of a fixed label, keyed with the secret (64 bits)."""
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Advert:
    """One server seen on the network: what its service record and TXT record say."""

    name: str
    host: str
    port: int
    cluster: str = ""
    version: int | None = None
    tls: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        short = self.name.removesuffix("." + SERVICE_TYPE)
        return f"{short!r} at {self.address}"


def mismatch(advert: Advert, cid: str, want_tls: bool) -> str:
    """Why ``advert`` is not a server this side should join ("" when it is one)."""
    if advert.cluster != cid:
        return "another cluster (its cluster id does not match this secret)"
    if advert.version != PROTOCOL_VERSION:
        return f"protocol version {advert.version}, this side speaks {PROTOCOL_VERSION}"
    if advert.tls and not want_tls:
        return "it requires TLS and this side has no REMAP_TLS_* settings"
    if want_tls and not advert.tls:
        return "it does not use TLS and this side requires it"
    return ""


@dataclass
class Found:
    """What a browse saw: the chosen server (or none), and what was passed over and why."""

    seconds: float
    chosen: Advert | None = None
    also_matching: list[Advert] = field(default_factory=list)
    ignored: list[tuple[Advert, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per thing a person should know, in the order they matter."""
        out = []
        if self.chosen is not None:
            out.append(f"discovery: chose server {self.chosen.label} (cluster id matches)")
        if self.also_matching:
            others = ", ".join(a.label for a in self.also_matching)
            out.append(
                f"discovery: {len(self.also_matching) + 1} servers of this cluster answered; "
                f"also saw {others} (pass --server to pick one)"
            )
        out.extend(f"discovery: ignored server {a.label}: {why}" for a, why in self.ignored)
        return out

    def failure(self) -> str:
        """The one line for "nothing to join", naming what was seen."""
        seen = "; ".join(f"{a.label}: {why}" for a, why in self.ignored)
        return (
            f"no server of this cluster found by discovery within {self.seconds:g}s"
            + (f" (saw {seen})" if seen else " (no remap server answered)")
            + "; pass --server HOST:PORT or set REMAP_SERVER (a server that listens on "
            "127.0.0.1, the default, is not advertised: --server 127.0.0.1:7878 on its machine)"
        )


def choose(adverts: Iterable[Advert], cid: str, want_tls: bool, seconds: float) -> Found:
    """Pick the server to join: of those that match, the first by name (stable across runs)."""
    found = Found(seconds)
    matching = []
    for advert in adverts:
        why = mismatch(advert, cid, want_tls)
        if why:
            found.ignored.append((advert, why))
        else:
            matching.append(advert)
    matching.sort(key=lambda a: (a.name, a.address))
    if matching:
        found.chosen, found.also_matching = matching[0], matching[1:]
    return found


# --------------------------------------------------------------------------- zeroconf seam


class Network(Protocol):
    """What browsing needs from zeroconf; tests pass a fake (no multicast)."""

    def start(self, on_name: Callable[[str], None]) -> None: ...

    def resolve(self, name: str, timeout: float) -> Advert | None: ...

    def close(self) -> None: ...


def _text(props: dict[Any, Any], key: bytes) -> str:
    value = props.get(key)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def advert_from(name: str, addresses: list[str], port: int, props: dict[Any, Any]) -> Advert | None:
    """An :class:`Advert` from a resolved service (IPv4 first), or None without an address."""
    if not addresses or not port:
        return None
    addresses = sorted(addresses, key=lambda a: ":" in a)
    version = _text(props, b"v")
    return Advert(
        name=name,
        host=addresses[0],
        port=port,
        cluster=_text(props, b"cid"),
        version=int(version) if version.isdigit() else None,
        tls=_text(props, b"tls") == "1",
    )


class ZeroconfNetwork:
    """The real :class:`Network`: a zeroconf instance and a ``ServiceBrowser`` on its threads."""

    def __init__(self, interfaces: list[str] | None) -> None:
        from zeroconf import InterfaceChoice, IPVersion, Zeroconf

        self.zc = Zeroconf(
            interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only
        )
        self.browser: Any = None

    def start(self, on_name: Callable[[str], None]) -> None:
        from zeroconf import ServiceBrowser, ServiceStateChange

        def handler(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                on_name(name)  # zeroconf's thread: only queue it

        self.browser = ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[handler])

    def resolve(self, name: str, timeout: float) -> Advert | None:
        from zeroconf import ServiceInfo

        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.request(self.zc, int(timeout * 1000)):
            return None
        return advert_from(name, info.parsed_addresses(), info.port or 0, info.properties)

    def close(self) -> None:
        if self.browser is not None:
            self.browser.cancel()
        self.zc.close()


def browse(
    network: Network,
    secret: bytes,
    *,
    timeout: float,
    want_tls: bool = False,
    settle: float = SETTLE,
    clock: Callable[[], float] = time.monotonic,
) -> Found:
    """Blocking (run it on a worker thread): browse until a match has settled or ``timeout``."""
    cid = cluster_id(secret)
    names: queue.Queue[str] = queue.Queue()
    seen: dict[str, Advert] = {}
    start = clock()
    deadline = start + timeout
    try:
        network.start(names.put)
        matched_at: float | None = None
        while True:
            now = clock()
            end = deadline if matched_at is None else min(deadline, matched_at + settle)
            if now >= end:
                break
            try:
                name = names.get(timeout=end - now)
            except queue.Empty:
                break
            advert = network.resolve(name, max(0.1, min(1.0, deadline - clock())))
            if advert is None:
                continue
            seen[name] = advert
            if matched_at is None and not mismatch(advert, cid, want_tls):
                matched_at = clock()
    finally:
        network.close()
    return choose(seen.values(), cid, want_tls, timeout)


async def discover(
    reactor: Any,
    settings: Settings,
    secret: bytes,
    *,
    network: Callable[[], Network] | None = None,
    want_tls: bool = False,
) -> Found:
    """Browse on a thread of the reactor's pool; the outcome arrives back on the reactor thread."""
    make = network or (lambda: ZeroconfNetwork(interface_addresses(settings.discovery_interfaces)))
    return await threads.deferToThreadPool(
        reactor,
        reactor.getThreadPool(),
        lambda: browse(make(), secret, timeout=settings.discovery_timeout, want_tls=want_tls),
    )


def locate(
    settings: Settings,
    announce: Callable[[str], None],
    *,
    want_tls: bool,
    secret: bytes | None = None,
) -> tuple[Settings, Found | None]:
    """Blocking, on the caller's thread (never the reactor's): the settings with the server
    discovery chose, and what it found (None when discovery was not wanted). ``secret``
    overrides the settings' (the Python API's ``connect(secret=...)``)."""
    key = secret or (settings.secret.encode() if settings.secret else None)
    if settings.server or not settings.discovery or not key:
        return settings, None
    network = ZeroconfNetwork(interface_addresses(settings.discovery_interfaces))
    found = browse(network, key, timeout=settings.discovery_timeout, want_tls=want_tls)
    for line in found.lines():
        announce(line)
    if found.chosen is not None:
        settings = replace(settings, server=found.chosen.address)
    return settings, found


def wanted(settings: Settings) -> bool:
    """Discovery runs for a node or console with no server set, discovery on, and a secret:
    without a secret there is no cluster id to match (and no cluster to join)."""
    return not settings.server and settings.discovery and bool(settings.secret)


# --------------------------------------------------------------------------- interfaces


def _adapters() -> list[Any]:
    import ifaddr

    return list(ifaddr.get_adapters())


def interface_addresses(names: str | None, adapters: list[Any] | None = None) -> list[str] | None:
    """IPv4 addresses of the named interfaces (names or addresses, comma-separated); None = all."""
    if not names:
        return None
    wanted_names = [n.strip() for n in names.split(",") if n.strip()]
    adapters = _adapters() if adapters is None else adapters
    out: list[str] = []
    for name in wanted_names:
        try:
            ipaddress.IPv4Address(name)
            out.append(name)
            continue
        except ValueError:
            pass
        hits = [
            ip.ip
            for adapter in adapters
            if name in (adapter.name, getattr(adapter, "nice_name", None))
            for ip in adapter.ips
            if isinstance(ip.ip, str)
        ]
        if not hits:
            known = sorted({a.name for a in adapters})
            raise ConfigError(
                f"REMAP_DISCOVERY_INTERFACES: no interface {name!r} with an IPv4 address "
                f"(this machine has {', '.join(known) or 'none'})"
            )
        out.extend(hits)
    return out


def advertised_addresses(host: str, names: str | None) -> list[str]:
    """The addresses to advertise for a server bound to ``host``: that address, or for a
    wildcard bind every non-loopback IPv4 address of the chosen interfaces."""
    if host not in ("0.0.0.0", "::", ""):
        return [host]
    chosen = interface_addresses(names)
    if chosen is None:
        chosen = [ip.ip for adapter in _adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return [a for a in dict.fromkeys(chosen) if not is_loopback(a)]


class Advertiser:
    """The server's advertisement; zeroconf's blocking calls run on the reactor's thread pool."""

    def __init__(self, reactor: Any, settings: Settings, secret: bytes, port: int) -> None:
        self.reactor = reactor
        self.settings = settings
        self.secret = secret
        self.port = port
        self.zc: Any = None
        self.info: Any = None
        self.addresses: list[str] = []

    def instance_name(self) -> str:
        """Unique on the LAN (address and port), readable (the machine's name), at most 63 bytes."""
        where = f"{self.addresses[0]}:{self.port}"
        return f"remap {socket.gethostname()[: 56 - len(where)]} {where}"

    def _register(self, tls: bool) -> str:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        self.addresses = advertised_addresses(
            self.settings.host, self.settings.discovery_interfaces
        )
        if not self.addresses:
            return ""
        # a unique host name: several servers (or network namespaces) share one machine name
        unique = f"remap-{uuid.uuid4().hex[:12]}.local."
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.instance_name()}.{SERVICE_TYPE}",
            port=self.port,
            properties={
                "v": str(PROTOCOL_VERSION),
                "tls": "1" if tls else "0",
                "cid": cluster_id(self.secret),
            },
            server=unique,
            parsed_addresses=self.addresses,
        )
        self.zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        self.zc.register_service(self.info, allow_name_change=True)
        return self.info.name

    async def start(self, tls: bool) -> str:
        """Advertise; returns the service name ("" when there is nothing to advertise on)."""
        if is_loopback(self.settings.host):
            return ""
        return await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._register, tls
        )

    def _unregister(self) -> None:
        zc, self.zc = self.zc, None
        if zc is None:
            return
        try:
            zc.unregister_service(self.info)
        finally:
            zc.close()

    async def stop(self) -> None:
        if self.zc is not None:
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._unregister
            )
