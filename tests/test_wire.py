"""The Twisted adapter (remap/wire.py) on StringTransports, with time from task.Clock.

One protocol on a StringTransport, or a server and a node paired in memory; no sockets,
no real time: handshake deadlines and heartbeats are driven with ``Clock.advance``.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from protocol import Authenticated, Connection
from protocol import messages as m
from protocol.framing import FrameDecoder, encode_frame
from remap.errors import (
    AuthError,
    ConnectionLost,
    FrameTooLarge,
    HandshakeTimeout,
    RemapError,
    RemoteProtocolError,
)
from remap.net import PeerFactory
from remap.node.agent import NodeAgent
from remap.server.service import RemapServerFactory
from remap.settings import Settings
from remap.wire import PeerProtocol

KEY = b"wire secret"
WRONG = b"wrong wire secret"
HANDSHAKE_TIMEOUT = 5.0
INTERVAL = 2.0
MISSES = 3


# --------------------------------------------------------------------------- helpers


@dataclass
class Recorder:
    """A handler that records what the adapter tells it."""

    events: list[tuple[str, Any]] = field(default_factory=list)

    def authenticated(self, link, event):
        self.events.append(("authenticated", event))

    def message_received(self, link, msg):
        self.events.append(("message", msg))

    def connection_failed(self, link, error):
        self.events.append(("failed", error))

    def connection_lost(self, link, error):
        self.events.append(("lost", error))

    def heartbeat(self):
        return m.Heartbeat(load=0.5)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def last(self, kind: str) -> Any:
        return [value for k, value in self.events if k == kind][-1]


class RecordingPool:
    """Stands in for CorePool on a node: records what the node would run (it runs nothing)."""

    size = 2
    busy = 0

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.on_result = self.on_failed = None

    def submit(self, msg):
        self.calls.append(("submit", msg))

    def load_job(self, msg):
        self.calls.append(("load_job", msg))
        pickle.loads(msg.payload)  # what the real pool's core does with it

    def cancel_job(self, job):
        self.calls.append(("cancel_job", job))

    def drop_job(self, job):
        self.calls.append(("drop_job", job))

    def cancel_all(self):
        self.calls.append(("cancel_all", None))


class Plant:
    """Unpickling this calls open(path, "w"): the file appearing means something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def connect(proto: PeerProtocol, port: int = 4000) -> StringTransport:
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    proto.makeConnection(transport)
    return transport


def peer(role: str, handler: Any, clock: Clock, key: bytes = KEY, **kw) -> PeerProtocol:
    conn = Connection(role, key, heartbeat=INTERVAL)
    return PeerProtocol(
        conn,
        handler,
        clock,
        handshake_timeout=kw.get("timeout", HANDSHAKE_TIMEOUT),
        heartbeat_interval=INTERVAL,
        heartbeat_misses=MISSES,
    )


def pump(a: PeerProtocol, b: PeerProtocol, rounds: int = 20) -> None:
    """Move bytes both ways until both transports are quiet; deliver a close as connectionLost."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.transport.value()
            if data:
                src.transport.clear()
                if not dst.transport.disconnecting:
                    dst.dataReceived(data)
                moved = True
        if not moved:
            break
    for proto in (a, b):
        if proto.transport.disconnecting and not getattr(proto, "_lost", False):
            proto._lost = True
            proto.connectionLost(Failure(net_error.ConnectionDone()))
            other = b if proto is a else a
            if not getattr(other, "_lost", False):
                other._lost = True
                other.connectionLost(Failure(net_error.ConnectionDone()))


def written(transport: StringTransport) -> list[dict]:
    return [
        msgpack.unpackb(f.header, raw=False) for f in FrameDecoder(1 << 30).feed(transport.value())
    ]


def frame(header: dict, payload: bytes = b"") -> bytes:
    return b"".join(
        bytes(p) for p in encode_frame(msgpack.packb(header, use_bin_type=True), payload)
    )


# --------------------------------------------------------------------------- handshake through the adapter


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_pair_authenticates_and_cancels_the_deadline(clock):
    """Two adapters complete the handshake; the deadline is cancelled and a heartbeat timer runs."""
    s_handler, c_handler = Recorder(), Recorder()
    server, client = peer("server", s_handler, clock), peer("console", c_handler, clock)
    connect(server)
    connect(client)
    assert len(clock.getDelayedCalls()) == 2  # both deadlines
    pump(client, server)
    assert s_handler.kinds() == ["authenticated"] and c_handler.kinds() == ["authenticated"]
    assert server.open and client.open
    assert [call.getTime() for call in clock.getDelayedCalls()] == [INTERVAL, INTERVAL]
    clock.advance(HANDSHAKE_TIMEOUT * 3)  # the old deadline must not fire
    pump(client, server)
    assert "failed" not in s_handler.kinds() + c_handler.kinds()


def test_handshake_timeout_on_a_silent_client(clock):
    """A connection that never says hello is failed at the deadline, told why, and closed."""
    handler = Recorder()
    server = peer("server", handler, clock)
    transport = connect(server)
    clock.advance(HANDSHAKE_TIMEOUT - 0.01)
    assert not transport.disconnecting and handler.events == []
    clock.advance(0.02)
    assert transport.disconnecting
    assert isinstance(handler.last("failed"), HandshakeTimeout)
    assert written(transport) == [  # ``re`` at its default (None) is left out
        {"t": "error", "code": "timeout", "message": "handshake not completed in time"}
    ]
    server.connectionLost(Failure(net_error.ConnectionDone()))
    assert isinstance(handler.last("lost"), HandshakeTimeout)
    assert clock.getDelayedCalls() == []


def test_handshake_timeout_after_half_a_handshake(clock):
    """hello then silence (no auth): the server still times out and closes."""
    handler = Recorder()
    server = peer("server", handler, clock)
    transport = connect(server)
    hello_sender = Connection("node", KEY)
    hello_sender.initiate()
    server.dataReceived(b"".join(bytes(p) for p in hello_sender.data_to_send()))
    assert written(transport)[0]["t"] == "challenge"
    transport.clear()
    clock.advance(HANDSHAKE_TIMEOUT + 0.01)
    assert transport.disconnecting
    assert isinstance(handler.last("failed"), HandshakeTimeout)


def test_handshake_timeout_on_the_client(clock):
    """A client whose server never answers the hello fails at its own deadline."""
    handler = Recorder()
    client = peer("node", handler, clock, timeout=1.5)
    transport = connect(client)
    assert written(transport)[0]["t"] == "hello"
    clock.advance(1.6)
    assert transport.disconnecting
    assert isinstance(handler.last("failed"), HandshakeTimeout)


def test_trickled_bytes_do_not_extend_the_deadline(clock):
    """Sending a byte at a time keeps nothing alive: the deadline is absolute (slowloris)."""
    handler = Recorder()
    server = peer("server", handler, clock)
    transport = connect(server)
    hello_sender = Connection("node", KEY)
    hello_sender.initiate()
    hello = b"".join(bytes(p) for p in hello_sender.data_to_send())
    for i in range(len(hello) - 1):
        server.dataReceived(hello[i : i + 1])
        clock.advance(HANDSHAKE_TIMEOUT / len(hello))
    clock.advance(0.1)
    assert transport.disconnecting
    assert isinstance(handler.last("failed"), HandshakeTimeout)


def test_wrong_secret_through_the_adapter(clock):
    """A wrong secret fails both adapters with AuthError and closes both transports."""
    s_handler, c_handler = Recorder(), Recorder()
    server = peer("server", s_handler, clock, key=WRONG)
    client = peer("node", c_handler, clock)
    connect(server)
    connect(client)
    pump(client, server)
    assert isinstance(c_handler.last("failed"), AuthError)
    assert isinstance(s_handler.last("failed"), AuthError)
    assert "authenticated" not in s_handler.kinds() + c_handler.kinds()
    assert isinstance(c_handler.last("lost"), AuthError)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">I", 2**31), FrameTooLarge),
        (b"\x00\x00\x00\x08\x00\x00\x00\x04\xc1\xc1\xc1\xc1", RemoteProtocolError),
    ],
)
def test_garbage_fails_the_connection_with_an_error_frame(clock, data, error):
    """Garbage or an oversized frame: the handler hears why, the peer gets an error frame, and it closes."""
    handler = Recorder()
    server = peer("server", handler, clock)
    transport = connect(server)
    server.dataReceived(data)
    assert isinstance(handler.last("failed"), error)
    assert written(transport)[0]["t"] == "error"
    assert transport.disconnecting
    server.dataReceived(frame({"t": "hello"}))  # late bytes are ignored
    assert handler.kinds() == ["failed"]


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_are_sent_every_interval(clock):
    """Once open, each side sends the handler's heartbeat every interval."""
    s_handler, c_handler = Recorder(), Recorder()
    server, client = peer("server", s_handler, clock), peer("node", c_handler, clock)
    connect(server)
    connect(client)
    pump(client, server)
    for _ in range(3):
        clock.advance(INTERVAL)
        pump(client, server)
    beats = [msg for kind, msg in s_handler.events if kind == "message"]
    assert beats == [m.Heartbeat(load=0.5)] * 3


def test_silent_peer_is_declared_lost(clock):
    """No bytes at all for interval x misses: the connection is aborted with a clear error."""
    handler = Recorder()
    server = peer("server", handler, clock)
    client = peer("node", Recorder(), clock)
    s_transport = connect(server)
    connect(client)
    pump(client, server)
    client.transport.clear()
    for _ in range(MISSES):
        clock.advance(INTERVAL)
        assert not s_transport.disconnected
    clock.advance(INTERVAL)
    assert s_transport.disconnected  # aborted, not a polite close
    server.connectionLost(Failure(net_error.ConnectionLost()))
    lost = handler.last("lost")
    assert isinstance(lost, ConnectionLost) and "no heartbeat" in str(lost)


def test_a_stalled_process_reads_before_it_judges_its_peer(clock):
    """This process stalled past the silence limit (a loaded machine): its late check cannot
    tell a silent peer from beats still unread in the socket (a reactor runs due timers before
    it reads), so it waits for the next check; the beats read meanwhile keep the peer."""
    server, client = peer("server", Recorder(), clock), peer("node", Recorder(), clock)
    s_transport, c_transport = connect(server), connect(client)
    pump(client, server)
    clock.advance(INTERVAL * (MISSES + 2))  # one check each, far over the limit: both stalled
    assert not s_transport.disconnecting and not c_transport.disconnecting
    pump(client, server)  # the reactor reads what waited
    for _ in range(MISSES * 2):
        clock.advance(INTERVAL)
        pump(client, server)
    assert not s_transport.disconnecting and not c_transport.disconnecting


def test_a_stalled_process_still_loses_a_silent_peer(clock):
    """After a late check, the next one judges, late or not: a peer that sent nothing is lost."""
    handler = Recorder()
    server, client = peer("server", handler, clock), peer("node", Recorder(), clock)
    s_transport = connect(server)
    connect(client)
    pump(client, server)
    client.transport.clear()
    clock.advance(INTERVAL * (MISSES + 2))
    assert not s_transport.disconnecting
    clock.advance(INTERVAL * (MISSES + 2))  # late again: no more waiting
    assert s_transport.disconnected
    server.connectionLost(Failure(net_error.ConnectionLost()))
    assert "no heartbeat" in str(handler.last("lost"))


def test_any_bytes_count_as_a_sign_of_life(clock):
    """A peer that keeps sending anything (not only heartbeats) is never declared lost."""
    s_handler = Recorder()
    server = peer("server", s_handler, clock)
    client = peer("node", Recorder(), clock)
    s_transport = connect(server)
    connect(client)
    pump(client, server)
    for _ in range(MISSES * 4):
        clock.advance(INTERVAL)
        client.send(m.NodeInfo(host="h", pid=1, cores=1, memory=1))
        server.dataReceived(client.transport.value())
        client.transport.clear()
    assert not s_transport.disconnecting


# --------------------------------------------------------------------------- sending and closing


def test_send_before_open_is_dropped(clock):
    """The adapter never lets an application message out before authentication."""
    server = peer("server", Recorder(), clock)
    transport = connect(server)
    server.send(m.JobLoad(job=1, payload=b"x"))
    assert transport.value() == b""


def test_close_with_an_error_tells_the_peer(clock):
    """close(error) on an open link sends an error frame, then closes; the handler hears that error."""
    s_handler, c_handler = Recorder(), Recorder()
    server, client = peer("server", s_handler, clock), peer("console", c_handler, clock)
    connect(server)
    connect(client)
    pump(client, server)
    server.close(RemoteProtocolError("you broke the protocol"))
    pump(client, server)
    received = [msg for kind, msg in c_handler.events if kind == "message"]
    assert received == [m.Error(code="bad-frame", message="you broke the protocol")]
    assert isinstance(s_handler.last("lost"), RemoteProtocolError)


def test_tls_failure_is_reported_as_tls(clock):
    """A connection lost to an OpenSSL error says TLS and the reason, not just 'lost'."""
    from OpenSSL import SSL

    handler = Recorder()
    client = peer("console", handler, clock)
    connect(client)
    client.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    error = handler.last("lost")
    assert isinstance(error, ConnectionLost)
    assert "TLS" in str(error) and "certificate verify failed" in str(error)
    assert "REMAP_TLS_CA" in str(error)


def test_client_dropped_during_handshake_gets_a_hint(clock):
    """A plain close before the handshake ends hints at TLS on the client; the server just says lost."""
    c_handler, s_handler = Recorder(), Recorder()
    client = peer("console", c_handler, clock)
    server = peer("server", s_handler, clock)
    connect(client)
    connect(server)
    client.connectionLost(Failure(net_error.ConnectionDone()))
    server.connectionLost(Failure(net_error.ConnectionDone()))
    assert "before the handshake finished" in str(c_handler.last("lost"))
    assert str(s_handler.last("lost")) == "connection to 127.0.0.1:4000 lost"


# --------------------------------------------------------------------------- real handlers, in memory


def node_peer(
    clock: Clock, key: bytes = KEY
) -> tuple[PeerProtocol, NodeAgent, RecordingPool, list]:
    pool = RecordingPool()
    refusals: list[RemapError] = []
    agent = NodeAgent(pool, host="node-a", on_auth_failure=refusals.append)  # type: ignore[arg-type]
    settings = Settings(
        heartbeat_interval=INTERVAL, heartbeat_misses=MISSES, handshake_timeout=HANDSHAKE_TIMEOUT
    )
    proto = PeerFactory(clock, "node", key, agent, settings).buildProtocol(None)
    return proto, agent, pool, refusals


def server_factory(clock: Clock, key: bytes = KEY) -> RemapServerFactory:
    return RemapServerFactory(
        clock,
        key,
        max_frame=1 << 20,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        heartbeat_interval=INTERVAL,
        heartbeat_misses=MISSES,
    )


def joined_node(clock: Clock) -> tuple[RemapServerFactory, PeerProtocol, NodeAgent, list]:
    """A real server factory and a real node agent, authenticated to each other in memory."""
    factory = server_factory(clock)
    server = factory.buildProtocol(None)
    node, agent, _pool, refusals = node_peer(clock)
    connect(server)
    connect(node)
    pump(node, server)
    return factory, node, agent, refusals


def test_server_and_node_pair_in_memory(clock):
    """A real server factory and a real node agent authenticate and register the node."""
    factory, node, agent, refusals = joined_node(clock)
    assert refusals == []
    assert agent.link is node
    (state,) = factory.scheduler.nodes.values()
    assert state.host == "node-a" and state.cores == 2


def test_node_refuses_a_server_with_the_wrong_secret_and_runs_nothing(clock, tmp_path):
    """A server without the secret is refused; work it pushes in the same read never reaches the pool."""
    marker = tmp_path / "unpickled"
    node, agent, pool, refusals = node_peer(clock)
    transport = connect(node)
    fake = Connection("server", WRONG)
    fake.receive_data(transport.value())
    transport.clear()
    blob = pickle.dumps(Plant(marker))
    push = b"".join(bytes(p) for p in fake.data_to_send())
    push += frame({"t": "job_load", "job": 1}, blob) + frame(
        {"t": "task", "task": 1, "job": 1, "sizes": [len(blob)]}, blob
    )
    node.dataReceived(push)
    assert len(refusals) == 1 and isinstance(refusals[0], AuthError)
    assert "secret" in str(refusals[0])
    assert pool.calls == [] and agent.link is None
    assert not marker.exists()
    assert transport.disconnecting


def test_node_says_why_a_connection_closed_before_its_handshake(clock):
    """A node without TLS dialling a TLS server sees its connection closed before the handshake:
    it logs one warning with the reason and the TLS hint (it retries, as for any lost
    connection), where it used to log nothing but ClientService's "Scheduling retry"; a
    refusal (connection_failed, which logs its own error) and a stop add no such line."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    def warnings(close: Any) -> list[str]:
        with capturedLogs() as events:
            close()
        return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]

    node, agent, _pool, refusals = node_peer(clock)
    connect(node)
    said = warnings(lambda: node.connectionLost(Failure(net_error.ConnectionDone())))
    assert len(said) == 1, said
    assert "could not join the server at 127.0.0.1:4000" in said[0], said
    assert "before the handshake finished" in said[0] and "REMAP_TLS_CA" in said[0], said
    assert "trying again" in said[0] and refusals == []

    wrong, _agent, _pool, refusals = node_peer(clock)
    transport = connect(wrong)
    fake = Connection("server", WRONG)
    fake.receive_data(transport.value())
    wrong.dataReceived(b"".join(bytes(p) for p in fake.data_to_send()))
    assert len(refusals) == 1
    assert warnings(lambda: wrong.connectionLost(Failure(net_error.ConnectionDone()))) == []

    stopping, agent, _pool, _refusals = node_peer(clock)
    connect(stopping)
    agent.leave()
    assert warnings(lambda: stopping.connectionLost(Failure(net_error.ConnectionDone()))) == []


def test_a_node_refused_at_the_servers_caps_warns_why_and_tries_again(clock):
    """The server's ``busy`` frame (its connection caps are full): the node logs one warning
    saying the server refused it and why, and is not stopped (it retries like a lost
    connection); it logged "connection to server refused" as an error, as for a wrong secret."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    from protocol import refusal_frame

    node, agent, _pool, refusals = node_peer(clock)
    transport = connect(node)
    with capturedLogs() as events:
        node.dataReceived(refusal_frame("too many connections in the handshake (at most 64)"))
        node.connectionLost(Failure(net_error.ConnectionDone()))
    said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert said == [
        "the server at 127.0.0.1:4000 refused the connection: too many connections in the "
        "handshake (at most 64); trying again"
    ], said
    assert not [e for e in events if e["log_level"] >= LogLevel.error]
    assert refusals == [] and agent.link is None and transport.disconnecting


def test_a_node_whose_open_connection_fails_says_it_lost_the_server_not_that_it_was_refused(clock):
    """A frame that fails its MAC after the handshake (altered or injected on the way): the
    node warns once that it lost the server, why, and that it reconnects, and is not stopped;
    it also logged "connection to server refused" as an error, as for a wrong secret."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    _factory, node, agent, refusals = joined_node(clock)
    assert agent.link is node
    with capturedLogs() as events:
        node.dataReceived(frame({"t": "heartbeat"}))  # unsealed: fails its MAC
        node.connectionLost(Failure(net_error.ConnectionDone()))
    said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert len(said) == 1 and said[0].startswith("lost the server: frame 1 from the peer"), said
    assert said[0].endswith("dropping its work and reconnecting"), said
    assert refusals == [] and agent.link is None


def test_a_node_dialling_a_port_that_is_not_remaps_says_so_and_tries_again(clock):
    """A node given the HTTP port (or any service that never answers the handshake) warns as
    the console says it: not a remap server, is that the server's port? It logged "connection
    to server refused: handshake not completed in time" as an error at every attempt."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    node, _agent, _pool, _refusals = node_peer(clock)
    transport = connect(node)
    with capturedLogs() as events:
        clock.advance(60)  # the handshake's deadline passes: nothing came back
    said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert said == [
        "127.0.0.1:4000 did not answer as a remap server (handshake not completed in time): "
        "is that the server's port (7878 by default), not its HTTP port? (trying again)"
    ], said
    assert transport.disconnecting


def test_node_refuses_work_from_a_server_that_skips_the_handshake(clock, tmp_path):
    """A server that sends welcome and work without a challenge is refused before any of it runs."""
    marker = tmp_path / "unpickled"
    node, agent, pool, refusals = node_peer(clock)
    transport = connect(node)
    transport.clear()
    blob = pickle.dumps(Plant(marker))
    node.dataReceived(
        frame({"t": "welcome", "session": "x", "max_frame": 1 << 20, "heartbeat": 2.0})
        + frame({"t": "job_load", "job": 1}, blob)
    )
    assert pool.calls == [] and agent.link is None
    assert not marker.exists()
    assert transport.disconnecting
    assert isinstance(refusals[0], RemoteProtocolError)


def test_recording_pool_would_have_unpickled(clock, tmp_path):
    """Contrast: the same job_load from an authenticated server does reach the pool and unpickle."""
    marker = tmp_path / "unpickled"
    factory = server_factory(clock)
    server = factory.buildProtocol(None)
    node, _agent, pool, _refusals = node_peer(clock)
    connect(server)
    connect(node)
    pump(node, server)
    server.send(m.JobLoad(job=1, payload=pickle.dumps(Plant(marker))))
    pump(node, server)
    assert [name for name, _ in pool.calls] == ["load_job"]
    assert marker.exists()


def test_server_never_acts_on_pre_auth_work(clock, tmp_path):
    """Submit, args and results frames before authentication create no job and unpickle nothing."""
    marker = tmp_path / "unpickled"
    blob = pickle.dumps(Plant(marker))
    attempts = [
        frame({"t": "submit", "id": 1, "name": "evil", "mode": "reduce"}, blob),
        frame({"t": "args", "job": 1, "start": 0, "sizes": [len(blob)]}, blob),
        frame({"t": "result", "task": 1, "sizes": [len(blob)]}, blob),
        frame({"t": "node_info", "host": "evil", "pid": 1, "cores": 64, "memory": 1}),
    ]
    factory = server_factory(clock)
    for data in attempts:
        server = factory.buildProtocol(None)
        transport = connect(server)
        hello_sender = Connection("console", KEY)
        hello_sender.initiate()
        server.dataReceived(b"".join(bytes(p) for p in hello_sender.data_to_send()) + data)
        assert transport.disconnecting
        server.connectionLost(Failure(net_error.ConnectionDone()))
    assert factory.scheduler.jobs == {} and factory.scheduler.nodes == {}
    assert factory.consoles == set()
    assert not marker.exists()


def test_events_reach_the_handler_in_order_within_one_read(clock):
    """Authenticated is handled before a message that arrived in the same read."""
    handler = Recorder()
    client = peer("console", handler, clock)
    transport = connect(client)
    server = Connection("server", KEY)
    server.receive_data(transport.value())
    transport.clear()
    client.dataReceived(b"".join(bytes(p) for p in server.data_to_send()))
    server.receive_data(transport.value())
    transport.clear()
    server.send(m.Grant(job=1, count=5))
    client.dataReceived(b"".join(bytes(p) for p in server.data_to_send()))
    assert handler.kinds() == ["authenticated", "message"]
    assert isinstance(handler.events[0][1], Authenticated)


# ---------------------------------------------------------------- writing without a reactor turn


def _tcp_pair() -> tuple[Any, Any, Any]:
    """A Twisted TCP transport on one end of a socket pair (never run by a reactor), the other
    end non-blocking, and the fake reactor: what arrives on the peer arrived without a turn."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    return transport, theirs, reactor


def test_a_message_leaves_in_the_call_that_sends_it():
    from remap.wire import write_now

    transport, peer, reactor = _tcp_pair()
    try:
        write_now(transport, transport.socket, [b"one ", b"frame"])
        assert peer.recv(100) == b"one frame"  # Twisted's write() would wait for a turn
        assert transport not in reactor.getWriters()
    finally:
        transport.socket.close()
        peer.close()


def test_bytes_already_queued_keep_their_order():
    from remap.wire import write_now

    transport, peer, reactor = _tcp_pair()
    try:
        transport.write(b"first ")
        write_now(transport, transport.socket, [b"second"])
        with pytest.raises(BlockingIOError):
            peer.recv(100)  # nothing jumped the queue
        transport.doWrite()
        assert peer.recv(100) == b"first second"
    finally:
        transport.socket.close()
        peer.close()


# ---------------------------------------------------------------- writing from a calling thread


def _open_over_tcp(clock: Clock) -> tuple[PeerProtocol, Any, Any]:
    """A PeerProtocol on a Twisted TCP transport over a socket pair, taken as open (the
    handshake is not what these tests are about), and the other end of the pair."""
    from protocol.connection import State

    transport, theirs, reactor = _tcp_pair()
    proto = peer("server", Recorder(), clock)
    transport.protocol = proto
    proto.makeConnection(transport)
    proto.open, proto.conn.state = True, State.OPEN
    return proto, theirs, reactor


def _frames_from(sock: Any) -> list[dict]:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [msgpack.unpackb(f.header, raw=False) for f in FrameDecoder(1 << 30).feed(data)]


def test_a_thread_writes_its_messages_whole_when_nothing_waits(clock):
    proto, theirs, reactor = _open_over_tcp(clock)
    try:
        later: list[Any] = []
        assert proto.send_from_thread(
            lambda: [m.Heartbeat(), m.Grant(job=3, count=2)], later.append
        )
        assert [f["t"] for f in _frames_from(theirs)] == ["heartbeat", "grant"]
        assert later == [] and proto.transport not in reactor.getWriters()
    finally:
        proto.transport.socket.close()
        theirs.close()


def test_a_thread_never_jumps_bytes_the_reactor_queued(clock):
    """Bytes waiting in the transport's buffer or the send queue: the thread produces nothing
    and says so (its messages then go through the reactor, behind them)."""
    proto, theirs, reactor = _open_over_tcp(clock)
    try:
        made: list[int] = []

        def produce() -> list[m.Message]:
            made.append(1)
            return [m.Heartbeat()]

        proto.transport.write(b"queued by the reactor")
        assert not proto.send_from_thread(produce, lambda fn: None) and made == []
        proto.transport.doWrite()
        assert proto._sending is not None
        proto._sending.parts.append(b"left by a large message")
        assert not proto.send_from_thread(produce, lambda fn: None) and made == []
        proto._sending.parts.clear()
        proto.open = False
        assert not proto.send_from_thread(produce, lambda fn: None) and made == []
    finally:
        proto.transport.socket.close()
        theirs.close()


def test_what_the_socket_does_not_take_from_a_thread_leaves_first(clock):
    """A thread's message larger than the socket takes at once: the rest waits in the send
    queue (the reactor is asked to drain it) and what the reactor sends next goes after it."""
    proto, theirs, reactor = _open_over_tcp(clock)
    try:
        later: list[Any] = []
        big = m.Args(job=1, start=0, sizes=[4 << 20], payload=bytes(4 << 20))
        assert proto.send_from_thread(lambda: [big], later.append)
        assert proto._sending is not None and proto._sending.parts
        assert later == [proto._sending.resume]
        proto.send(m.Heartbeat())  # the reactor's next message queues behind
        later[0]()
        assert proto.transport in reactor.getWriters()
        data = b""
        for _ in range(10_000):
            proto.transport.doWrite()
            try:
                data += theirs.recv(1 << 20)
            except BlockingIOError:
                pass
            if not proto._sending.parts and len(data) >= (4 << 20):
                break
        while True:
            try:
                data += theirs.recv(1 << 20)
            except BlockingIOError:
                break
        frames = list(FrameDecoder(1 << 30).feed(data))
        kinds = [msgpack.unpackb(f.header, raw=False)["t"] for f in frames]
        assert kinds == ["args", "heartbeat"] and len(frames[0].payload) == 4 << 20
    finally:
        proto.transport.socket.close()
        theirs.close()
