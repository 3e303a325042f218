"""Finding the server on the LAN (mDNS / DNS-SD with python-zeroconf), and advertising it.

The server advertises ``_remap._tcp`` with a TXT record: the protocol version, whether TLS is on,
a *cluster id* (an HMAC of a fixed label keyed with the shared secret), the addresses it listens
on, and a *tag*: an HMAC, keyed with the secret, over the version, TLS flag, port and addresses.
Nodes and consoles that have the same secret compute the same id, so they can tell their
cluster's server from another's without the secret ever leaving them (a keyed hash reveals
nothing about the secret beyond what an offline guess of a weak secret could confirm, so use a
strong one). They dial only an address the tag vouches for: the id alone is public, and a
copy of it on an attacker's address lured a node to a relay that passed the handshake through
to the real server and then, the connection being plain TCP, wrote a job of its own to the
node. Mutual authentication still decides who may join; TLS keeps an on-path attacker out.

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
_TAG_LABEL = b"remap advert v1\0"
#: addresses one advert names at most (a TXT string holds 255 bytes)
MAX_ADDRESSES = 12

log = Logger()


def cluster_id(secret: bytes) -> str:
    """The id a server advertises: HMAC-SHA256 of a fixed label, keyed with the secret (64 bits)."""
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()[:16]


def advert_tag(secret: bytes, version: int | None, tls: bool, port: int, at: Iterable[str]) -> str:
    """The server's word, keyed with the secret, for where and how to dial it: only its holder
    can name an address (the cluster id anyone on the LAN can copy)."""
    text = f"{version}|{int(tls)}|{port}|{','.join(at)}".encode()
    return hmac.new(secret, _TAG_LABEL + text, hashlib.sha256).hexdigest()[:32]


def advert_properties(secret: bytes, tls: bool, port: int, addresses: list[str]) -> dict[str, str]:
    """The TXT record a server advertises (see the module's docstring)."""
    at = addresses[:MAX_ADDRESSES]
    return {
        "v": str(PROTOCOL_VERSION),
        "tls": "1" if tls else "0",
        "cid": cluster_id(secret),
        "at": ",".join(at),
        "tag": advert_tag(secret, PROTOCOL_VERSION, tls, port, at),
    }


@dataclass(frozen=True)
class Advert:
    """One server seen on the network: what its service record and TXT record say."""

    name: str
    host: str
    port: int
    cluster: str = ""
    version: int | None = None
    tls: bool = False
    #: the addresses its TXT record names (``host`` is one of them when there are any)
    at: tuple[str, ...] = ()
    tag: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        short = self.name.removesuffix("." + SERVICE_TYPE)
        return f"{short!r} at {self.address}"


def mismatch(advert: Advert, secret: bytes, want_tls: bool) -> str:
    """Why ``advert`` is not a server this side should join ("" when it is one)."""
    if advert.cluster != cluster_id(secret):
        return "another cluster (its cluster id does not match this secret)"
    if advert.version != PROTOCOL_VERSION:
        return f"protocol version {advert.version}, this side speaks {PROTOCOL_VERSION}"
    tag = advert_tag(secret, advert.version, advert.tls, advert.port, advert.at)
    if not (hmac.compare_digest(advert.tag, tag) and advert.host in advert.at):
        return (
            "its cluster id matches but its address is not vouched for by this secret (a copy "
            "of a server's advert pointing elsewhere, or an older server); not dialled"
        )
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


def choose(adverts: Iterable[Advert], secret: bytes, want_tls: bool, seconds: float) -> Found:
    """Pick the server to join: of those that match, the first by name (stable across runs)."""
    found = Found(seconds)
    matching = []
    for advert in adverts:
        why = mismatch(advert, secret, want_tls)
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
    """An :class:`Advert` from a resolved service, or None without an address. The address
    dialled is one its TXT record names (one resolved too first, IPv4 first): anyone may
    answer for the host name with an address record of their own."""
    at = tuple(a for a in _text(props, b"at").split(",") if a)
    if at:
        addresses = [a for a in addresses if a in at] or list(at)
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
        at=at,
        tag=_text(props, b"tag"),
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
        info = self.zc.get_service_info(SERVICE_TYPE, name, int(timeout * 1000))
        if info is None:
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
            if matched_at is None and not mismatch(advert, secret, want_tls):
                matched_at = clock()
    finally:
        network.close()
    return choose(seen.values(), secret, want_tls, timeout)


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
            properties=advert_properties(self.secret, tls, self.port, self.addresses),
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
