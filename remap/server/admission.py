"""Connection caps: how many connections a port holds at once, in all and per source address.

The cluster port counts connections still in the handshake, the HTTP port every open one. One
beyond a cap is closed as soon as it is accepted, unread (the cluster port says why first, under
TLS within bounds of its own), and refusals are logged at most once per interval (a flood of
connects must not become a flood of log lines). Both ports keep half their slots for source
addresses that authenticated before, so a flood of connections that never do, from however many
addresses, does not lock out nodes, consoles and API clients (after a restart too: the server
keeps those addresses in its state directory, see ``trusted``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from protocol.framing import PREAUTH_MAX_FRAME

#: seconds between two log lines about refused connections (the second one counts the rest)
REFUSAL_LOG_INTERVAL = 60.0
#: source addresses remembered as having authenticated (the most recent ones)
TRUSTED_SOURCES = 4096


class Slot:
    """One admitted connection's place; :meth:`release` frees it (once, however often called)."""

    __slots__ = ("_admission", "host")

    def __init__(self, admission: Admission, host: str) -> None:
        self._admission: Admission | None = admission
        self.host = host

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._free(self.host)

    def trust(self) -> None:
        """Its peer authenticated: its source may take the reserved slots from now on."""
        if self._admission is not None:
            self._admission.trust(self.host)


class Admission:
    """Counts held slots against ``total`` and ``per_host`` (by the peer's IP address); the last
    ``reserved`` slots only for sources in ``trusted``.

    Refusing the newest connection beyond a cap, not evicting the oldest: eviction only makes a
    flood faster (one that opens ``total`` connections per handshake's round trip, easy from an
    IPv6 /48's many /64s, evicts every honest handshake), while the reserved share holds against
    any rate from any number of addresses that never authenticated."""

    def __init__(self, total: int, per_host: int, reserved: int = 0) -> None:
        self.total = total
        self.per_host = per_host
        self.reserved = reserved
        self.held = 0
        self.by_host: dict[str, int] = {}
        #: sources that authenticated, least recently first (at most TRUSTED_SOURCES)
        self.trusted: dict[str, None] = {}
        #: called after each :meth:`trust` (``trusted.KeptSources`` saves the table)
        self.on_trust: Callable[[], None] | None = None

    def admit(self, host: str) -> Slot | str:
        """A slot, or why not: ``"total"``, ``"new"`` (the share open to sources that have not
        authenticated) or ``"per-host"`` (the cap that is full)."""
        if self.held >= self.total:
            return "total"
        host = source(host)
        if self.held >= self.total - self.reserved and host not in self.trusted:
            return "new"
        count = self.by_host.get(host, 0)
        if count >= self.per_host:
            return "per-host"
        self.held += 1
        self.by_host[host] = count + 1
        return Slot(self, host)

    def _free(self, host: str) -> None:
        self.held -= 1
        left = self.by_host[host] - 1
        if left:
            self.by_host[host] = left
        else:
            del self.by_host[host]  # the table never grows with addresses no longer connected

    def trust(self, host: str) -> None:
        self.trusted.pop(host, None)
        self.trusted[host] = None
        if len(self.trusted) > TRUSTED_SOURCES:
            del self.trusted[next(iter(self.trusted))]
        if self.on_trust is not None:
            self.on_trust()

    def cap(self, why: str) -> int:
        """The number the refusal ``why`` reached."""
        return {"total": self.total, "new": self.total - self.reserved}.get(why, self.per_host)


class RefusalLog:
    """Logs refused connections at most once per ``interval`` s, counting those in between."""

    log = Logger()

    def __init__(self, clock: IReactorTime, what: str, interval: float = REFUSAL_LOG_INTERVAL):
        self.clock = clock
        self.what = what
        self.interval = interval
        self.unlogged = 0
        self._next = float("-inf")

    def refused(self, host: str, why: str, admission: Admission) -> None:
        self.unlogged += 1
        now = self.clock.seconds()
        if now < self._next:
            return
        self._next = now + self.interval
        count, self.unlogged = self.unlogged, 0
        cap = admission.cap(why)
        self.log.warn(
            "refused {count} connection(s) to the {what} (last from {host}): "
            "{why} cap of {cap} reached; at most one such line per {interval:.0f}s",
            count=count,
            what=self.what,
            host=host,
            why=why,
            cap=cap,
            interval=self.interval,
        )


@dataclass(frozen=True)
class TlsRefusals:
    """Refused connections told why under TLS, where the ``busy`` frame needs the TLS handshake
    first: ``admission`` caps how many at once (per address too; one more is closed at once,
    unread), each has ``timeout`` seconds to take the frame before it is cut."""

    clock: IReactorTime
    admission: Admission
    timeout: float


class Refused(Protocol):
    """What a connection beyond a cap gets: nothing parsed, closed. The cluster port's ``frame``
    (its ``busy`` error, so a console can say why) is written first; under TLS only while
    ``tls`` has room (see :class:`TlsRefusals`), else the connection is closed at once."""

    def __init__(self, frame: bytes = b"", host: str = "", tls: TlsRefusals | None = None) -> None:
        self.frame = frame
        self.host = host
        self.tls = tls
        self._slot: Slot | None = None
        self._deadline: Any = None
        self._received = 0

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 - Twisted's name
        self.transport = transport
        if self.frame and (not ISSLTransport.providedBy(transport) or self._room(transport)):
            transport.write(self.frame)
            transport.loseConnection()  # after the frame (under TLS: after the TLS handshake)
        else:
            transport.abortConnection()

    def _room(self, transport: Any) -> bool:
        """A place among the refusals told under TLS, its deadline armed; False: none free."""
        tls = self.tls
        slot = tls.admission.admit(self.host) if tls is not None else None
        if not isinstance(slot, Slot):
            return False
        self._slot = slot
        self._deadline = tls.clock.callLater(tls.timeout, transport.abortConnection)
        return True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        """Under TLS only (the TLS layer reads on for its handshake and close): the peer's hello,
        not parsed; a peer sending more than a handshake's frame is cut."""
        self._received += len(data)
        if self._received > PREAUTH_MAX_FRAME:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted's name
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._slot is not None:
            self._slot.release()


def busy_text(why: str, admission: Admission) -> str:
    """Why a connection was refused, in the words its console shows (no addresses: the
    refused peer learns nothing but that a cap is full)."""
    place = {"per-host": " from this host", "new": " from addresses new to this server"}
    return (
        f"too many connections{place.get(why, '')} in the handshake (at most {admission.cap(why)})"
    )


def peer_host(addr: Any) -> str:
    """The IP address of an accepted connection (``addr`` as ``buildProtocol`` gets it)."""
    return str(getattr(addr, "host", addr))


def source(host: str) -> str:
    """What a per-host cap counts by: an IPv4 address (IPv4-mapped ones too), an IPv6 address's
    /64 (one machine commonly holds a whole /64: counting its addresses would cap nothing)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:  # (not an IP address: a UNIX socket's path, a test's name)
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host
