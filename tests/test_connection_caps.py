"""Connection caps on both ports, at the factory level (fake transports, a fake clock).

The cluster port holds at most so many connections still in the handshake (in all and per
source address); the HTTP port at most so many open connections, and a 401 ends its connection.
The real-process check (idle sockets beyond the cap, a console still runs a job) is in
``test_security_e2e.py``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from protocol import Connection, ConnectionFailed, ServerBusy, refusal_frame
from protocol import messages as m
from remap import runtime
from remap.cluster import start_server
from remap.server.admission import REFUSAL_LOG_INTERVAL, TRUSTED_SOURCES, Admission, Refused
from remap.server.http import BoundedSite
from remap.server.service import (
    MAX_HANDSHAKING,
    MAX_HANDSHAKING_PER_HOST,
    RemapServerFactory,
)
from remap.settings import Settings
from tests.http_harness import Served

KEY = b"the cluster secret for caps tests"


class Accepted:
    """One connection the factory accepted: its protocol and transport, as a listening port
    would have made them."""

    def __init__(self, factory: Any, host: str, port: int) -> None:
        addr = IPv4Address("TCP", host, port)
        self.proto = factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)

    @property
    def refused(self) -> bool:
        return isinstance(self.proto, Refused) and self.transport.disconnecting

    def lose(self) -> None:
        """The transport reports the close (what the reactor does after loseConnection)."""
        self.proto.connectionLost(Failure(net_error.ConnectionDone()))

    def authenticate(self, role: str = "node", key: bytes = KEY) -> Connection:
        """Run the mutual handshake with a sans-IO client; that client."""
        client = Connection(role, key)
        client.initiate()
        self.exchange(client)
        return client

    def exchange(self, client: Connection) -> None:
        """Move bytes between ``client`` and the server's protocol until both are quiet."""
        for _ in range(10):
            out = b"".join(bytes(p) for p in client.data_to_send())
            if out and not self.transport.disconnecting:
                self.proto.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                client.receive_data(back)
            if not out and not back:
                break


def cluster_factory(clock: Clock) -> RemapServerFactory:
    return RemapServerFactory(clock, KEY, max_frame=1 << 20, handshake_timeout=5.0)


def open_many(factory: Any, hosts: list[str], first_port: int = 40000) -> list[Accepted]:
    return [Accepted(factory, host, first_port + i) for i, host in enumerate(hosts)]


def spread(factory: RemapServerFactory, count: int) -> list[str]:
    """``count`` source addresses, each used at most MAX_HANDSHAKING_PER_HOST times, that
    authenticated before (so they may take every slot, the reserved half too)."""
    hosts = [f"10.0.{i // MAX_HANDSHAKING_PER_HOST}.1" for i in range(count)]
    for host in hosts:
        factory.handshaking.trust(host)
    return hosts


# =========================================================================== cluster port


def test_a_connection_beyond_the_handshake_cap_is_closed_unread() -> None:
    """With MAX_HANDSHAKING connections in the handshake, the next one (from a fresh address)
    is closed as it is accepted: no handler, no handshake deadline, nothing read; all it is
    written is the one ``busy`` frame saying why (not the server's side of the handshake)."""
    clock = Clock()
    factory = cluster_factory(clock)
    waiting = open_many(factory, spread(factory, MAX_HANDSHAKING))
    assert not any(c.refused for c in waiting)
    assert len(clock.getDelayedCalls()) == MAX_HANDSHAKING  # one handshake deadline each

    extra = Accepted(factory, "192.0.2.7", 50000)
    assert extra.refused
    assert extra.transport.value() == refusal_frame(
        f"too many connections in the handshake (at most {MAX_HANDSHAKING})"
    )
    assert len(clock.getDelayedCalls()) == MAX_HANDSHAKING  # no deadline armed for it


def test_a_refused_console_is_told_which_cap_is_full() -> None:
    """The frame a refused connection gets names the cap that is full, per address or in
    all; a console reading it fails with ServerBusy in those words (it saw only a reset).
    What the refused peer sends is never read."""
    factory = cluster_factory(Clock())
    open_many(factory, ["203.0.113.9"] * MAX_HANDSHAKING_PER_HOST)
    extra = Accepted(factory, "203.0.113.9", 50000)
    assert extra.refused
    client = Connection("console", KEY)
    client.initiate()
    extra.proto.dataReceived(b"".join(bytes(p) for p in client.data_to_send()))  # ignored
    (failed,) = client.receive_data(extra.transport.value())
    assert isinstance(failed, ConnectionFailed) and isinstance(failed.error, ServerBusy)
    assert failed.error.peer_message == (
        f"too many connections from this host in the handshake (at most {MAX_HANDSHAKING_PER_HOST})"
    )
    assert extra.transport.value() == refusal_frame(failed.error.peer_message)  # nothing more


def test_a_flood_of_refusals_costs_one_prebuilt_frame_each() -> None:
    """Refusals write the frame the factory built once per cap (the same bytes object), so
    a flood of connects makes the server encode nothing."""
    factory = cluster_factory(Clock())
    open_many(factory, ["203.0.113.9"] * MAX_HANDSHAKING_PER_HOST)
    refused = open_many(factory, ["203.0.113.9"] * 50, first_port=50000)
    assert all(r.refused for r in refused)
    assert len({id(r.proto.frame) for r in refused}) == 1


def test_a_slot_frees_when_a_handshake_finishes() -> None:
    """An authenticated peer gives its slot back at once: the next connection is admitted,
    and the authenticated one stays open."""
    clock = Clock()
    factory = cluster_factory(clock)
    waiting = open_many(factory, spread(factory, MAX_HANDSHAKING))
    assert Accepted(factory, "192.0.2.7", 50000).refused

    waiting[0].authenticate("console")
    assert waiting[0].proto.open
    assert factory.handshaking.held == MAX_HANDSHAKING - 1
    assert not Accepted(factory, "10.0.0.1", 50001).refused
    assert waiting[0].proto.open and not waiting[0].transport.disconnecting


def test_a_slot_frees_when_a_handshake_fails_or_times_out() -> None:
    """A wrong secret and the handshake deadline both end the connection; once it is gone
    its slot is free again (and the per-address count is forgotten)."""
    clock = Clock()
    factory = cluster_factory(clock)
    waiting = open_many(factory, spread(factory, MAX_HANDSHAKING))
    factory.handshaking.trust("192.0.2.7")

    waiting[0].authenticate("node", key=b"not the secret")
    assert waiting[0].transport.disconnecting and not waiting[0].proto.open
    waiting[0].lose()
    assert factory.handshaking.held == MAX_HANDSHAKING - 1
    assert not Accepted(factory, "192.0.2.7", 50000).refused
    assert Accepted(factory, "192.0.2.8", 50001).refused

    clock.advance(5.0)  # every other handshake's deadline
    for c in waiting[1:]:
        assert c.transport.disconnecting
        c.lose()
    assert factory.handshaking.held == 1  # the one admitted above (its deadline is later)
    assert factory.handshaking.by_host == {"192.0.2.7": 1}


def test_one_address_gets_at_most_its_share() -> None:
    """From one source address at most MAX_HANDSHAKING_PER_HOST connections wait in the
    handshake; the next from it is refused while another address is still admitted."""
    clock = Clock()
    factory = cluster_factory(clock)
    same = open_many(factory, ["203.0.113.5"] * MAX_HANDSHAKING_PER_HOST)
    assert not any(c.refused for c in same)
    assert MAX_HANDSHAKING_PER_HOST < MAX_HANDSHAKING
    assert Accepted(factory, "203.0.113.5", 50000).refused
    assert not Accepted(factory, "203.0.113.6", 50001).refused
    same[0].lose()
    assert not Accepted(factory, "203.0.113.5", 50002).refused


def test_authenticated_nodes_beyond_the_cap_still_connect() -> None:
    """The cap is on connections in the handshake, not on the cluster: more nodes than
    MAX_HANDSHAKING (all from one address) connect one after another and all join."""
    clock = Clock()
    factory = cluster_factory(clock)
    count = MAX_HANDSHAKING + MAX_HANDSHAKING_PER_HOST + 1
    for i in range(count):
        node = Accepted(factory, "10.1.1.1", 30000 + i)
        assert not node.refused, i
        client = node.authenticate("node")
        assert node.proto.open, i
        client.send(m.NodeInfo(host=f"node-{i}", pid=1, cores=1, memory=1 << 30, load=0.0))
        node.exchange(client)
    assert len(factory.scheduler.nodes) == count
    assert factory.handshaking.held == 0


def test_refusals_are_logged_at_most_once_per_interval() -> None:
    """A flood of refused connects is one log line per interval, the next one counting what
    it stood for."""
    clock = Clock()
    factory = cluster_factory(clock)
    open_many(factory, ["198.51.100.1"] * MAX_HANDSHAKING_PER_HOST)
    lines: list[dict] = []
    globalLogPublisher.addObserver(lines.append)
    try:

        def refused() -> list[dict]:
            return [e for e in lines if e.get("log_namespace", "").endswith("RefusalLog")]

        for i in range(500):
            assert Accepted(factory, "198.51.100.1", 50000 + i).refused
        assert len(refused()) == 1 and refused()[0]["count"] == 1
        clock.advance(REFUSAL_LOG_INTERVAL / 2)
        for i in range(10):
            Accepted(factory, "198.51.100.1", 51000 + i)
        assert len(refused()) == 1
        clock.advance(REFUSAL_LOG_INTERVAL / 2)
        Accepted(factory, "198.51.100.1", 52000)
        assert len(refused()) == 2 and refused()[1]["count"] == 499 + 10 + 1
        assert refused()[1]["why"] == "per-host"
    finally:
        globalLogPublisher.removeObserver(lines.append)


def test_a_released_slot_is_released_once() -> None:
    """Authenticated, then lost: the slot is given back once, not twice."""
    admission = Admission(2, 2)
    slot = admission.admit("a")
    assert not isinstance(slot, str)
    slot.release()
    slot.release()
    assert admission.held == 0 and admission.by_host == {}


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    """A machine commonly holds a whole IPv6 /64: counted address by address, one client could
    take every slot of the total cap with fresh addresses. Its /64 shares one per-host count;
    another /64, and an IPv4 address (also written IPv4-mapped), count apart; a slot given
    back frees its /64's count."""
    admission = Admission(10, 2)
    first = [admission.admit(f"2001:db8:1:2::{n:x}") for n in range(1, 4)]
    assert [isinstance(s, str) for s in first] == [False, False, True] and first[2] == "per-host"
    assert not isinstance(admission.admit("2001:db8:1:3::1"), str)  # another /64
    assert not isinstance(admission.admit("fe80::1%eth0"), str)  # a link-local with its zone
    mapped = [admission.admit(a) for a in ("192.0.2.9", "::ffff:192.0.2.9", "::ffff:192.0.2.9")]
    assert [isinstance(s, str) for s in mapped] == [False, False, True]
    assert admission.by_host == {
        "2001:db8:1:2::/64": 2,
        "2001:db8:1:3::/64": 1,
        "fe80::/64": 1,
        "192.0.2.9": 2,
    }
    slot = first[0]
    assert not isinstance(slot, str)
    slot.release()
    assert not isinstance(admission.admit("2001:db8:1:2::ffff"), str)


def test_a_flood_from_new_addresses_leaves_the_reserved_half_to_known_ones() -> None:
    """Handshakes never finished, from an IPv6 /48 spread over its /64s (no per-address cap
    binds), hold only the half of the slots open to sources that never authenticated; beyond it
    each is refused with ``busy`` saying so. A node whose address authenticated before still
    gets in and joins, and so do known addresses up to the whole cap; a console from an address
    new to the server waits for the flood (with all slots open to it, the flood held them all
    and the node was refused)."""
    factory = cluster_factory(Clock())
    Accepted(factory, "192.0.2.50", 30000).authenticate("node")
    flood = open_many(factory, [f"2001:db8:7:{n:x}::1" for n in range(MAX_HANDSHAKING * 3)])
    assert sum(not c.refused for c in flood) == MAX_HANDSHAKING // 2
    new = "too many connections from addresses new to this server in the handshake (at most 32)"
    assert flood[-1].transport.value() == refusal_frame(new)

    node = Accepted(factory, "192.0.2.50", 30001)
    assert not node.refused
    client = node.authenticate("node")
    client.send(m.NodeInfo(host="known", pid=1, cores=1, memory=1 << 30, load=0.0))
    node.exchange(client)
    assert [n.host for n in factory.scheduler.nodes.values()] == ["known"]
    assert Accepted(factory, "192.0.2.99", 30002).refused  # new to it

    known = spread(factory, MAX_HANDSHAKING // 2)
    assert not any(c.refused for c in open_many(factory, known, first_port=31000))
    assert factory.handshaking.held == MAX_HANDSHAKING
    assert Accepted(factory, "192.0.2.50", 30003).transport.value() == refusal_frame(
        "too many connections in the handshake (at most 64)"
    )


def test_the_sources_remembered_are_bounded() -> None:
    """The table of sources that authenticated keeps the most recent TRUSTED_SOURCES (one
    authenticating again counts as recent), so no number of peers grows it."""
    admission = Admission(4, 4, reserved=2)
    admission.trust("192.0.2.1")
    for n in range(TRUSTED_SOURCES - 1):
        admission.trust(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    admission.trust("192.0.2.1")
    admission.trust("192.0.2.2")
    assert len(admission.trusted) == TRUSTED_SOURCES
    assert "10.0.0.0" not in admission.trusted and "192.0.2.1" in admission.trusted


# =========================================================================== HTTP port


class Unauthorized(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(401)
        return b"log in"


class Open(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


REQUEST = b"GET /api/v1/summary HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def http_site(resource: Resource, **caps: int) -> BoundedSite:
    return BoundedSite(resource, reactor=MemoryReactorClock(), timeout=60, **caps)


def test_a_401_ends_the_connection() -> None:
    """An HTTP/1.1 request without credentials gets its 401 with ``Connection: close`` and the
    connection is closed after it (no keep-alive for unauthenticated clients)."""
    conn = Accepted(http_site(Unauthorized()), "127.0.0.1", 40000)
    conn.proto.dataReceived(REQUEST)
    response = conn.transport.value()
    assert response.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nConnection: close\r\n" in response
    assert conn.transport.disconnecting


def test_an_authorised_request_keeps_its_connection() -> None:
    """A 200 keeps the connection for the next request (keep-alive is unchanged for clients
    with credentials)."""
    conn = Accepted(http_site(Open()), "127.0.0.1", 40000)
    conn.proto.dataReceived(REQUEST)
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    assert not conn.transport.disconnecting
    conn.transport.clear()
    conn.proto.dataReceived(REQUEST)
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")


def test_http_connections_are_capped_in_all_and_per_address() -> None:
    """Beyond the per-address cap a connection from that address is closed unread; beyond
    the total cap any is; a closed connection frees its place. (These addresses sent
    credentials before: they may take the reserved half too.)"""
    site = http_site(Open(), max_connections=5, max_per_host=3)
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
        site.connections.trust(host)
    first = open_many(site, ["192.0.2.1"] * 3)
    assert not any(c.refused for c in first)
    refused = Accepted(site, "192.0.2.1", 50000)
    assert refused.refused and refused.transport.value() == b""
    others = open_many(site, ["192.0.2.2", "192.0.2.3"], first_port=41000)
    assert not any(c.refused for c in others)
    assert Accepted(site, "192.0.2.4", 50001).refused
    first[0].transport.loseConnection()
    first[0].lose()
    assert not Accepted(site, "192.0.2.1", 50002).refused


def test_the_default_http_caps() -> None:
    """The HTTP port holds 256 connections by default, 32 from one address."""
    site = http_site(Open())
    assert (site.connections.total, site.connections.per_host) == (256, 32)


def test_the_default_cluster_caps() -> None:
    """The cluster port lets 64 connections wait in the handshake, 16 from one address."""
    factory = cluster_factory(Clock())
    assert (factory.handshaking.total, factory.handshaking.per_host) == (64, 16)


def test_the_cap_holds_under_tls_too() -> None:
    """Behind TLS (the factory wrapped as the TLS endpoint wraps it) a connection beyond the
    cap gets no handler either. Its ``busy`` frame needs the TLS handshake, which it may take
    within the handshake deadline (then it is cut and its place freed); as many refusals wait
    for it at once as handshakes may (per address too), and one more is closed at accept,
    before any TLS byte is written."""
    from twisted.internet import ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    clock = Clock()
    factory = cluster_factory(clock)
    tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, factory, clock=clock)
    same = open_many(tls, ["203.0.113.9"] * (MAX_HANDSHAKING_PER_HOST + 1))
    assert not any(c.transport.disconnecting for c in same)
    assert isinstance(same[-1].proto.wrappedProtocol, Refused)
    told = open_many(tls, ["203.0.113.9"] * (MAX_HANDSHAKING_PER_HOST - 1), first_port=50000)
    assert not any(c.transport.disconnecting for c in told)  # each waits for its handshake
    assert factory.tls_refusals.admission.held == MAX_HANDSHAKING_PER_HOST
    beyond = Accepted(tls, "203.0.113.9", 51000)
    assert isinstance(beyond.proto.wrappedProtocol, Refused)
    assert beyond.transport.disconnecting and beyond.transport.value() == b""

    clock.advance(factory.handshake_timeout)  # no TLS handshake came: every refusal is cut
    for c in [same[-1], *told]:
        assert c.transport.disconnecting
        c.lose()
    assert factory.tls_refusals.admission.held == 0


def test_a_silent_connection_under_tls_is_cut_after_its_handshake_deadline() -> None:
    """Under TLS a peer that never starts TLS's handshake cannot be sent the ``timeout`` frame
    and TLS's close waits for it: at the deadline the connection fails, the frame has as long
    again, then the connection is cut and its place in the caps is free (it held it for ever:
    16 silent sockets locked their address out of the server)."""
    from twisted.internet import ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    clock = Clock()
    factory = cluster_factory(clock)
    tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, factory, clock=clock)
    silent = Accepted(tls, "203.0.113.9", 40000)
    clock.advance(factory.handshake_timeout)
    assert silent.proto.wrappedProtocol.failure is not None  # failed, its frame waits on TLS
    assert not silent.transport.disconnecting
    clock.advance(factory.handshake_timeout)
    assert silent.transport.disconnecting
    silent.lose()
    assert factory.handshaking.held == 0 and not clock.getDelayedCalls()


def test_a_failed_handshake_whose_close_hangs_is_cut_at_the_deadline() -> None:
    """A handshake that failed (a wrong secret) is closed after its error frame; should that
    close not finish (under TLS it waits for the peer's TLS close), the connection is cut at
    the handshake's deadline all the same."""

    class Hanging(StringTransport):
        """A transport whose graceful close never finishes, as TLS's without the peer."""

        aborted = False

        def abortConnection(self) -> None:
            self.aborted = True
            super().abortConnection()

    clock = Clock()
    factory = cluster_factory(clock)
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    transport = Hanging(peerAddress=addr)
    proto.makeConnection(transport)
    client = Connection("node", b"not the secret")
    client.initiate()
    for _ in range(3):
        proto.dataReceived(b"".join(bytes(p) for p in client.data_to_send()))
        client.receive_data(transport.value())
        transport.clear()
    assert transport.disconnecting and not transport.aborted  # closing, gracefully
    clock.advance(factory.handshake_timeout)
    assert transport.aborted


def test_a_refusal_told_under_tls_reads_no_more_than_a_hello() -> None:
    """Once its TLS handshake is done a refused connection is read only by the TLS layer (for
    its close): its peer's hello is ignored, and a peer that sends more than a handshake frame
    is cut, its place freed (time alone does not bound what it may send)."""
    from zope.interface import directlyProvides

    from protocol.framing import PREAUTH_MAX_FRAME
    from remap.server.admission import TlsRefusals

    class Cut(StringTransport):
        aborted = False

        def abortConnection(self) -> None:
            self.aborted = True
            super().abortConnection()

    told = TlsRefusals(Clock(), Admission(1, 1), 5.0)
    transport = Cut()
    directlyProvides(transport, ISSLTransport)
    refused = Refused(b"busy frame", "192.0.2.1", told)
    refused.makeConnection(transport)
    assert transport.value() == b"busy frame" and not transport.aborted
    assert told.admission.held == 1
    refused.dataReceived(b"h" * PREAUTH_MAX_FRAME)
    assert not transport.aborted
    refused.dataReceived(b"h")
    assert transport.aborted
    refused.connectionLost(Failure(net_error.ConnectionAborted()))
    assert told.admission.held == 0 and not told.clock.getDelayedCalls()


# =========================================================================== settings, real sockets


def _listening(tmp_path: Any, **caps: Any) -> Settings:
    """A real server's settings on port 0 with the given caps (a 60 s handshake deadline, so
    a silent connection waits rather than times out during the test)."""
    return Settings(
        port=0,
        state_dir=str(tmp_path),
        journal=False,
        discovery=False,
        handshake_timeout=60.0,
        **caps,
    )


def _closed_at_once(port: int) -> bytes | None:
    """Connect, say nothing: what the server wrote before it closed the connection (within
    10 s), or None if it is still open then."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionResetError:  # closed so soon that connect() itself saw the reset
        return b""
    got = b""
    with sock:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(100)
            except ConnectionResetError:
                return got
            except TimeoutError:
                return None
            if not chunk:
                return got
            got += chunk
    return None


def test_the_cluster_caps_are_settings(tmp_path) -> None:
    """REMAP_MAX_HANDSHAKING_PER_HOST reaches the listening server: with it at 2, two silent
    connections wait in the handshake and the third is closed at once (the deadline is 60 s)."""
    settings = _listening(tmp_path, max_handshaking=5, max_handshaking_per_host=2)
    server = runtime.run(start_server, runtime.reactor(), settings, secret=KEY, timeout=30)
    try:
        caps = server.factory.handshaking
        assert (caps.total, caps.per_host) == (5, 2)
        port = server.port.getHost().port
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        assert _closed_at_once(port) == refusal_frame(
            "too many connections from this host in the handshake (at most 2)"
        )
        for sock in waiting:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # still open, nothing said to it yet
                sock.recv(100)
            sock.close()
    finally:
        runtime.run(server.stop, timeout=30)


def test_a_console_refused_at_the_caps_says_so_in_one_line(tmp_path) -> None:
    """A console dialling a server whose per-address cap is full (real sockets, the real dial)
    fails with one line saying the server refused it and why, exit code 4: it said "closed
    the connection during the handshake ... (if the server uses TLS, set REMAP_TLS_CA ...)"."""
    from remap.dial import connect_console
    from remap.errors import RemapError, ServerUnreachable, one_line

    settings = _listening(tmp_path, max_handshaking_per_host=1)
    server = runtime.run(start_server, runtime.reactor(), settings, secret=KEY, timeout=30)
    try:
        port = server.port.getHost().port
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # holds the one slot

            async def dial() -> RemapError:
                try:
                    await connect_console(
                        runtime.reactor(), Settings(), f"127.0.0.1:{port}", secret=KEY
                    )
                except RemapError as exc:
                    return exc
                raise AssertionError("the dial did not fail")

            refused = runtime.run(dial, timeout=30)
        assert isinstance(refused, ServerUnreachable)
        assert one_line(refused) == (
            f"error: the server at 127.0.0.1:{port} refused the connection: too many "
            "connections from this host in the handshake (at most 1); try again in a moment",
            4,
        )
    finally:
        runtime.run(server.stop, timeout=30)


def _hello(source: str, port: int) -> tuple[socket.socket, Connection, list[Any]]:
    """A node's connection from ``source`` (a loopback address) that says hello and reads the
    answer: a challenge (the client's proof is then queued, not sent) or a refusal (its frame,
    or only the close: the hello may meet the closed socket and its reset come first)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    client = Connection("node", KEY)
    client.initiate()
    events: list[Any] = []
    try:
        sock.sendall(b"".join(bytes(p) for p in client.data_to_send()))
        while client.state.value == "handshake" and not client.outgoing:
            got = sock.recv(65536)
            if not got:
                break
            events += client.receive_data(got)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return sock, client, events


def _join(port: int) -> socket.socket:
    """A node from 127.0.0.1 through the whole handshake to ``node_info``: its socket."""
    sock, client, events = _hello("127.0.0.1", port)
    while client.state.value == "handshake":
        sock.sendall(b"".join(bytes(p) for p in client.data_to_send()))
        got = sock.recv(65536)
        assert got, "closed during the handshake"
        events = client.receive_data(got)
    assert client.state.value == "open", events
    client.send(m.NodeInfo(host="rejoined", pid=1, cores=1, memory=1 << 30, load=0.0))
    sock.sendall(b"".join(bytes(p) for p in client.data_to_send()))
    return sock


def test_a_flood_of_unfinished_handshakes_does_not_lock_out_a_known_node(tmp_path) -> None:
    """Real sockets: a flood from four loopback addresses, 16 connections each, that say hello
    and never prove anything; a node whose address authenticated before joins meanwhile (without
    the reserved half the flood held all 64 slots and the node was refused), while the flood
    holds every slot it may: the 32 open to addresses that never authenticated."""
    settings = _listening(tmp_path)
    server = runtime.run(start_server, runtime.reactor(), settings, secret=KEY, timeout=30)
    flood: list[socket.socket] = []
    try:
        port = server.port.getHost().port
        _join(port).close()  # the node's earlier life
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            flood += [_hello(source, port)[0] for _ in range(MAX_HANDSHAKING_PER_HOST)]
        with _join(port):
            nodes = server.factory.scheduler.nodes
            wait_until(lambda: [n.host for n in nodes.values()] == ["rejoined"], "the node")
        assert runtime.run(lambda: server.factory.handshaking.held, timeout=10) == 32
    finally:
        for sock in flood:
            sock.close()
        runtime.run(server.stop, timeout=30)


def test_the_http_caps_are_settings() -> None:
    """REMAP_HTTP_MAX_CONNECTIONS_PER_HOST reaches the HTTP port: with it at 2, two idle
    connections are held and the third is closed at once."""
    served = Served(Settings(http_port=0, http_max_connections=10, http_max_connections_per_host=2))
    try:
        waiting = [
            socket.create_connection(("127.0.0.1", served.port), timeout=10) for _ in range(2)
        ]
        assert _closed_at_once(served.port) == b""  # the HTTP port writes nothing
        for sock in waiting:
            sock.close()
        # the closes free their places: a request with the token is answered again
        deadline = time.monotonic() + 10
        while served_status(served) != 200:
            assert time.monotonic() < deadline, "the closed connections' places never came back"
    finally:
        served.stop()


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` (it said nothing on it, and did not close it)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1))
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def test_a_flood_of_idle_http_connections_does_not_lock_out_a_known_client(monkeypatch) -> None:
    """Real sockets: idle connections from eight loopback addresses that never send a request
    hold only the half of the HTTP port's places open to addresses that never sent credentials
    (the rest are closed at once); a client from 127.0.0.1, which sent the token before, is
    still answered (without the reserved half the flood held all 8 and it was reset)."""
    accepted: list[Any] = []
    build = BoundedSite.buildProtocol

    def counted(site: BoundedSite, addr: Any) -> Any:
        accepted.append(addr)
        return build(site, addr)

    monkeypatch.setattr(BoundedSite, "buildProtocol", counted)
    served = Served(Settings(http_port=0, http_max_connections=8, http_max_connections_per_host=2))
    flood: list[socket.socket] = []
    try:
        assert served_status(served) == 200
        for n in range(2, 10):
            for _ in range(2):
                try:
                    flood.append(
                        socket.create_connection(
                            ("127.0.0.1", served.port), 10, source_address=(f"127.0.0.{n}", 0)
                        )
                    )
                except ConnectionResetError:  # refused so soon that connect() saw the reset
                    pass
        wait_until(lambda: len(accepted) == 1 + 16, "the flood's connections")
        assert served_status(served) == 200
        assert sum(_open(sock) for sock in flood) == 4
    finally:
        for sock in flood:
            sock.close()
        served.stop()


def wait_until(done: Any, what: str) -> None:
    """Until ``done()`` (called in the reactor: server state) is true, at most 10 s."""
    deadline = time.monotonic() + 10
    while not runtime.run(done, timeout=10):
        assert time.monotonic() < deadline, f"waited 10 s for {what}"


def served_status(served: Served) -> int | None:
    try:
        return served.request("GET", "/api/v1/summary", token=served.token).status
    except OSError:  # refused while the server had not yet seen the closes
        return None


# =========================================================================== under TLS, real sockets


def test_a_console_refused_at_the_caps_under_tls_says_so_in_one_line(tmp_path, tls_files) -> None:
    """Under TLS too, a console and ``remap.connect`` refused by a full cap (real TLS sockets)
    fail with the line naming the cap, exit code 4: the refused connection gets the TLS
    handshake and then the ``busy`` frame (they saw only "closed the connection during the
    handshake ... (if the server uses TLS, set REMAP_TLS_CA ...)", TLS being set). With every
    place for such refusals taken too (by a socket that never starts TLS) a console is closed
    at once, and its line says that, not to set the TLS settings it has."""
    import remap
    from remap.dial import connect_console
    from remap.errors import RemapError, ServerUnreachable, one_line

    settings = _listening(
        tmp_path,
        max_handshaking_per_host=1,
        tls_cert=tls_files["cert"],
        tls_key=tls_files["key"],
    )
    server = runtime.run(start_server, runtime.reactor(), settings, secret=KEY, timeout=30)
    client = Settings(tls_ca=tls_files["ca"])
    try:
        port = server.port.getHost().port
        said = (
            f"error: the server at 127.0.0.1:{port} refused the connection: too many "
            "connections from this host in the handshake (at most 1); try again in a moment",
            4,
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # holds the one slot

            async def dial() -> RemapError:
                try:
                    await connect_console(
                        runtime.reactor(), client, f"127.0.0.1:{port}", secret=KEY
                    )
                except RemapError as exc:
                    return exc
                raise AssertionError("the dial did not fail")

            refused = runtime.run(dial, timeout=30)
            assert isinstance(refused, ServerUnreachable)
            assert one_line(refused) == said
            # the refusal is counted until its close is done (one at a time from here)
            told = server.factory.tls_refusals.admission
            wait_until(lambda: told.held == 0, "the refused connection's close")
            with pytest.raises(ServerUnreachable) as api:
                remap.connect(f"127.0.0.1:{port}", secret=KEY, settings=client, env_file=None)
            assert one_line(api.value) == said

            wait_until(lambda: told.held == 0, "the refused connection's close")
            with socket.create_connection(("127.0.0.1", port), timeout=10):  # the refusal place
                wait_until(lambda: told.held == 1, "the silent socket's refusal")
                closed = runtime.run(dial, timeout=30)
            assert one_line(closed) == (
                f"error: server at 127.0.0.1:{port} closed the connection during the handshake: "
                f"connection to 127.0.0.1:{port} closed before the handshake finished (over TLS: "
                "the server may have had no room for it, too many connections being refused at "
                "once; try again in a moment)",
                4,
            )
    finally:
        runtime.run(server.stop, timeout=30)
