"""The Twisted adapter for :mod:`protocol`: feeds bytes in, writes bytes out.

All protocol state lives in :class:`protocol.Connection`; all application state lives
in the handler. This class only owns the two timers a connection needs: the
handshake deadline and the heartbeat (send one each interval; drop the peer when
nothing at all arrived for ``interval * misses``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import main, tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import Authenticated, Connection, ConnectionFailed, MessageReceived
from protocol import messages as m
from protocol.connection import _OPEN
from protocol.framing import READ_SIZE, SMALL_PAYLOAD, encode_frame, small_frame, unsent

from .errors import CertificateMismatch, ConnectionLost, FrameTooLarge, NodeLost, RemapError


def transport_idle(transport: Any) -> bool:
    """Nothing of ours waits in a Twisted transport's write buffer (so writing to its file
    descriptor now keeps the order of bytes); were the attributes renamed, writes go through
    the buffer."""
    return not getattr(transport, "_tempDataBuffer", True) and getattr(
        transport, "offset", -1
    ) == len(getattr(transport, "dataBuffer", b"?"))


def read_directly(
    reader: Any,
    buffer: Callable[[], memoryview | None],
    read_into: Callable[[memoryview], int],
    received: Callable[[int], None],
    *,
    read: Callable[[], bytes],
    data_received: Callable[[bytes], None],
) -> None:
    """Make a Twisted reader (a TCP connection, a process pipe) read a large frame straight
    into ``buffer()`` (None: no large frame) with ``read_into(view)``, reporting to
    ``received(n)``; other bytes go by ``read()`` to ``data_received``. A MiB then costs a few
    reads, not 16 or 128 turns and a join."""

    def do_read() -> Any:
        view = buffer()
        try:
            data = read() if view is None else read_into(view)  # bytes, or a count
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        if view is None:
            data_received(data)  # type: ignore[arg-type]
        else:
            received(data)  # type: ignore[arg-type]
        return None

    reader.doRead = do_read


def hear_out(
    transport: Any, received: Callable[[], int], paused: Callable[[], bool] = lambda: False
) -> None:
    """Make a plain TCP transport whose write finds the connection reset read what arrived
    before the reset first (``received()`` counts the bytes read): a peer's last frame, the
    ``busy`` of a refusal or an error, says why it closed. A reset socket still holds them, but
    an event that both completes a connect and reports it writable writes before it reads, and
    the loss was reported unread (a refused console then said "closed during the handshake").
    Not while ``paused()``: its reads wait for the read budget."""
    write = transport.doWrite

    def do_write() -> Any:
        why = write()
        if why is not main.CONNECTION_LOST or not transport.connected or paused():
            return why
        before = received()
        if transport.doRead() is None and received() > before:
            return None  # heard; the next write finds the loss again
        return why

    transport.doWrite = do_write


#: a Twisted FileDescriptor's write buffer: what :func:`transport_idle` reads
_BUFFER_ATTRIBUTES = ("_tempDataBuffer", "offset", "dataBuffer")


def _plain_tcp(transport: Any) -> Any:
    """The socket of a plain (not TLS) Twisted TCP transport whose write buffer reads as
    :func:`transport_idle` expects (``PeerProtocol.send_encoded`` reads it directly), else None."""
    if (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and all(hasattr(transport, name) for name in _BUFFER_ATTRIBUTES)
    ):
        return getattr(transport, "socket", None)
    return None


def write_now(
    transport: Any,
    sock: Any,
    data: list[bytes | memoryview],
    rest: Callable[[list[bytes | memoryview]], None] | None = None,
) -> None:
    """Write one message's buffers: on a plain TCP socket (``sock``) with nothing queued, in
    this call (Twisted's ``write`` waits a reactor turn, on every hop of a call); else through
    the transport's buffer. What the socket does not take goes to ``rest`` as views, or without
    one to the transport, in order.
    """
    if (
        sock is not None
        and transport.connected
        and not transport.disconnecting
        and transport_idle(transport)
    ):
        total = sum(map(len, data))
        try:
            if total > SMALL_PAYLOAD:
                sent = sock.sendmsg(data)
            else:
                data = [b"".join(data)]
                sent = sock.send(data[0])
        except OSError:  # full, or gone: Twisted's write path finds out and reports it
            sent = 0
        if sent >= total:
            return
        data = unsent(data, sent)
        if rest is not None:
            rest(data)
            return
    # transports take bytes only: one join is the single copy a payload makes here
    transport.write(b"".join(data))


#: bytes waiting for a watched peer (a console) past which it is congested (none of its jobs'
#: calls are dispatched), and down to which they drain before it is not: what a console that
#: reads slowly may cost the server
CONGESTED_BYTES = 16 * 1024 * 1024
DRAINED_BYTES = 4 * 1024 * 1024
#: seconds between looks at a congested peer's backlog
DRAIN_CHECK = 0.01

#: buffers handed to one ``sendmsg`` at most (Linux takes up to 1024)
SEND_PARTS = 64


class SendQueue:
    """A plain TCP transport's messages the socket did not take at once, kept as views (not
    joined into Twisted's buffer) and sent by ``sendmsg`` as it drains; the transport's
    ``doWrite`` sends this queue first, then does its own work.
    """

    def __init__(self, transport: Any, sock: Any) -> None:
        self.transport = transport
        self.sock = sock
        self.parts: deque[bytes | memoryview] = deque()
        #: bytes put in (under the write lock) and sent (reactor thread): one writer each
        self.added = 0
        self.removed = 0
        plain = transport.doWrite

        def do_write() -> Any:
            if self.parts:
                lost = self._send()
                if lost is not None or self.parts:
                    return lost
            return plain()

        transport.doWrite = do_write

    def queue(self, data: list[bytes | memoryview]) -> None:
        """Send ``data`` once what waits is sent (in order, as the socket drains)."""
        self.add(data)
        self.transport.startWriting()

    def add(self, data: list[bytes | memoryview]) -> None:
        """Put ``data`` behind what waits (under the write lock; any thread)."""
        self.parts.extend(data)
        self.added += sum(map(len, data))

    def resume(self) -> None:
        """Reactor thread: send what another thread left in :attr:`parts` as the socket drains."""
        if self.parts and self.transport.connected:
            self.transport.startWriting()

    def _send(self) -> Any:
        parts = self.parts
        try:
            sent = self.sock.sendmsg(list(itertools.islice(parts, SEND_PARTS)))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        self.removed += sent
        while sent:
            first = parts[0]
            if sent < len(first):
                parts[0] = memoryview(first)[sent:]
                break
            sent -= len(first)
            parts.popleft()
        return None


class ReadBudget:
    """Bytes that all of a server's connections may hold, together, in frames being received.

    A large frame reserves its whole size or its connection stops reading until it fits: every
    holder can finish, so pausing never deadlocks; a frame over the whole budget is refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiting: deque[PeerProtocol] = deque()

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give_back(self, n: int) -> None:
        self.used -= n
        while self._waiting:
            proto = self._waiting[0]
            if not proto.try_resume():
                return  # first come, first served: a big frame is not overtaken forever
            self._waiting.popleft()

    def wait(self, proto: PeerProtocol) -> None:
        if proto not in self._waiting:
            self._waiting.append(proto)

    def forget(self, proto: PeerProtocol) -> None:
        if proto in self._waiting:
            self._waiting.remove(proto)


class Handler(TypingProtocol):
    """What the application plugs into a :class:`PeerProtocol`."""

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None: ...
    def message_received(self, link: PeerProtocol, msg: m.Message) -> None: ...
    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None: ...
    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None: ...
    def heartbeat(self) -> m.Heartbeat: ...


@dataclass
class Traffic:
    """Bytes through a connection's socket; a server shares one among all its connections."""

    received: int = 0
    sent: int = 0


class PeerProtocol(Protocol):
    log = Logger()

    def __init__(
        self,
        connection: Connection,
        handler: Handler,
        clock: IReactorTime,
        *,
        handshake_timeout: float = 5.0,
        heartbeat_interval: float = 2.0,
        heartbeat_misses: int = 3,
        budget: ReadBudget | None = None,
    ) -> None:
        self.conn = connection
        self.budget = budget
        self._reserved = 0  # bytes of the budget this connection holds for its partial frame
        self._paused = False
        self._holding = False  # the handler's doing (see hold_reading)
        self.handler = handler
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self._silence_limit: float | None = None
        #: the last check found the peer silent but ran late: the next one judges
        self._verdict_deferred = False
        self._deadline: IDelayedCall | None = None
        self._beat: IDelayedCall | None = None
        self._last_seen = 0.0
        self.failure: RemapError | None = None
        self.open = False
        self.peer = ""
        #: the largest frame the peer accepts, once authenticated
        self.frame_limit = 0
        self.traffic = Traffic()
        self._socket: Any = None  # a plain TCP transport's socket: large frames skip copies
        self._sending: SendQueue | None = None  # and what it did not take at once
        #: more than CONGESTED_BYTES wait to be written (see :meth:`watch_backlog`)
        self.congested = False
        self._on_congestion: Callable[[PeerProtocol, bool], None] | None = None
        self._drain_check: IDelayedCall | None = None
        self._cut: IDelayedCall | None = None  # a close's deadline (see :meth:`_lose`)
        #: held around every write, so :meth:`send_from_thread` and the reactor never interleave
        self._write_lock = threading.Lock()

    # ---------------------------------------------------------------- Twisted API

    def connectionMade(self) -> None:
        # small frames (a single call, a grant) must not wait ~40 ms for a delayed ACK
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # not a TCP socket after all (e.g. a UNIX socket)
                set_no_delay(True)
        self._socket = _plain_tcp(self.transport)
        if self._socket is not None:
            self._sending = SendQueue(self.transport, self._socket)
            # small frames too: a recv handed to dataReceived, without Twisted's wrappers
            read_directly(
                self.transport,
                self.conn.decoder.read_buffer,
                self._socket.recv_into,
                self._received_into,
                read=functools.partial(self._socket.recv, READ_SIZE),
                data_received=self.dataReceived,
            )
            hear_out(self.transport, lambda: self.traffic.received, lambda: self._paused)
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self._last_seen = self.clock.seconds()
        self._deadline = self.clock.callLater(self.handshake_timeout, self._handshake_expired)
        if not self.conn.is_server:
            self.conn.initiate()
            self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._last_seen = self.clock.seconds()
        self.traffic.received += len(data)
        msg = self.conn.receive_message(data)
        if msg is None:
            with self._write_lock:  # what it answers itself is sealed in order (see send_encoded)
                events = self.conn.receive_data(data)
            self._handle(events)
            return
        # one whole message (a single call's): what _handle does with its one event
        transport = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return  # the handler closed this peer
        self.handler.message_received(self, msg)
        if self.conn.outgoing:
            self._flush()
        if self.budget is not None and self.conn.decoder.gathering != self._reserved:
            self._account()

    def _received_into(self, n: int) -> None:
        """``n`` bytes were read straight into the large frame being received."""
        self._last_seen = self.clock.seconds()
        self.traffic.received += n
        with self._write_lock:
            events = self.conn.received_into(n)
        self._handle(events)

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            t = type(event)
            if t is ConnectionFailed:
                # always acted on, even after messages of the same read: the peer is told why
                self._failed(event.error)
                return
            transport = self.transport  # once per message: the handler may have closed it
            if transport is None or getattr(transport, "disconnecting", False):
                continue  # the handler closed this peer: the rest of the read goes unheard
            if t is MessageReceived:
                self.handler.message_received(self, event[0])
            elif isinstance(event, Authenticated):
                self._cancel(self._deadline)
                self._deadline = None
                self.open = True
                self.frame_limit = self.conn.send_limit
                self._adopt_peer_heartbeat()
                self._beat = self.clock.callLater(self.heartbeat_interval, self._heartbeat)
                self.handler.authenticated(self, event)
        if self.conn.outgoing:  # what the connection answered itself (errors, the handshake)
            self._flush()
        if self.budget is not None and self.conn.decoder.gathering != self._reserved:
            self._account()

    # ---------------------------------------------------------------- read budget

    def _account(self) -> None:
        """Reserve the budget for a large frame being received, or stop reading until it fits."""
        budget, need = self.budget, self.conn.partial_frame
        assert budget is not None
        if self.transport is None:
            return
        if need < self._reserved:
            budget.give_back(self._reserved - need)
            self._reserved = need
        elif need > self._reserved and not self._paused:
            if need > budget.limit:
                self.close(
                    FrameTooLarge(
                        f"frame of {need} bytes exceeds the {budget.limit} bytes this server "
                        "buffers for all connections together"
                    )
                )
            elif budget.take(need - self._reserved):
                self._reserved = need
            else:
                self._paused = True
                self.transport.pauseProducing()
                budget.wait(self)

    def try_resume(self) -> bool:
        """Called by the budget when bytes came back: resume reading if this frame now fits."""
        budget = self.budget
        assert budget is not None
        if self.transport is None:
            return True  # gone: nothing to resume
        need = self.conn.partial_frame
        if need > self._reserved and not budget.take(need - self._reserved):
            return False
        self._reserved = max(need, self._reserved)
        self._paused = False
        self._last_seen = self.clock.seconds()  # the silence was ours, not the peer's
        if not self._holding:
            self.transport.resumeProducing()
        return True

    def hold_reading(self, held: bool) -> None:
        """Stop reading from the peer (or start again) while the handler cannot act on its
        messages yet (a console's submit waiting for the journal): what it sends meanwhile
        waits in the socket, not in this process."""
        self._holding = held
        if self.transport is None:
            return
        if held:
            self.transport.pauseProducing()
        elif not self._paused:
            self._last_seen = self.clock.seconds()  # the silence was ours, not the peer's
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: B006
        if self.budget is not None:
            self.budget.forget(self)
            reserved, self._reserved = self._reserved, 0
            if reserved:
                self.budget.give_back(reserved)
        self._cancel(self._deadline)
        self._cancel(self._beat)
        self._cancel(self._drain_check)
        self._cancel(self._cut)
        self._deadline = self._beat = self._drain_check = self._cut = None
        if self._sending is not None:  # what never left: its frame buffers are free again
            self._sending.parts.clear()
        self.conn.close()
        was_open, self.open = self.open, False
        self.handler.connection_lost(self, self.failure or self._lost_reason(reason, was_open))

    def _lost_reason(self, reason: Failure | None, was_open: bool) -> ConnectionLost:
        """Say why, when the transport knows: a failed TLS handshake is not a plain drop."""
        mismatch = _name_mismatch_text(reason)
        if mismatch is not None:
            self.log.info("TLS with {peer} failed: {error}", peer=self.peer, error=mismatch)
            return CertificateMismatch(f"TLS with {self.peer} failed: {mismatch}")
        tls = _tls_error_text(reason)
        if tls is not None:
            self.log.info("TLS with {peer} failed: {error}", peer=self.peer, error=tls)
            return ConnectionLost(
                f"TLS with {self.peer} failed: {tls} (check REMAP_TLS_CERT, REMAP_TLS_KEY and "
                "REMAP_TLS_CA on both sides)"
            )
        if not was_open and self.conn.is_server:
            # a client that rejects our certificate hangs up without an alert we can read
            tls_note = (
                " (over TLS: a client that rejects this server's certificate, e.g. because it "
                "dialled a host name the certificate does not name, does this)"
                if ISSLTransport.providedBy(self.transport)
                else ""
            )
            self.log.info(
                "connection from {peer} closed before the handshake finished{note}",
                peer=self.peer,
                note=tls_note,
            )
        if not was_open and not self.conn.is_server:
            hint = (  # under TLS a refusal says why, unless too many are refused at once
                "over TLS: the server may have had no room for it, too many connections being "
                "refused at once; try again in a moment"
                if ISSLTransport.providedBy(self.transport)
                else "if the server uses TLS, set REMAP_TLS_CA, REMAP_TLS_CERT and REMAP_TLS_KEY "
                "here too"
            )
            return ConnectionLost(
                f"connection to {self.peer} closed before the handshake finished ({hint})"
            )
        return self._peer_lost(f"connection to {self.peer} lost")

    def _peer_lost(self, text: str) -> ConnectionLost:
        """A lost peer: a node's loss is a :class:`NodeLost` (the server's link to it)."""
        return NodeLost(text) if self.conn.peer_role == "node" else ConnectionLost(text)

    # ---------------------------------------------------------------- sending

    def send(self, msg: m.Message) -> None:
        """Send, or drop quietly once the connection is closing (a handler may still answer a
        message read with the frame that ended it)."""
        self.send_encoded(*m.encode(msg))

    def send_encoded(self, header: bytes, payload: bytes | memoryview) -> None:
        """:meth:`send` of a message already encoded (a core's answer, forwarded as it came).
        A small one on an idle plain TCP socket leaves in this call as one buffer (:meth:`_flush`
        and :func:`write_now`, inlined); others go their way. Frames are sealed (numbered)
        under the write lock, in the order they leave, whichever thread writes
        (:meth:`send_from_thread`)."""
        conn, sending, transport = self.conn, self._sending, self.transport
        if transport is None or not self.open or conn.state is not _OPEN:
            return
        if sending is None or conn.outgoing or len(payload) > SMALL_PAYLOAD:
            with self._write_lock:
                conn.send_encoded(header, payload)
            self._flush()
        else:
            with self._write_lock:
                data = small_frame(conn.seal(header, payload), payload)
                self.traffic.sent += len(data)
                if sending.parts:  # behind what waits already
                    if transport.connected:
                        sending.queue([data])
                elif (
                    transport.connected
                    and not transport.disconnecting
                    # transport_idle, inlined: a transport with a SendQueue has these (_plain_tcp)
                    and not transport._tempDataBuffer
                    and transport.offset == len(transport.dataBuffer)
                ):
                    try:
                        sent = sending.sock.send(data)
                    except OSError:  # full, or gone: Twisted's write path finds out and reports it
                        sent = 0
                    if sent < len(data):
                        sending.queue([memoryview(data)[sent:]])
                else:
                    transport.write(data)
        if self._on_congestion is not None and not self.congested:
            self._check_backlog()

    # ---------------------------------------------------------------- backlog

    def watch_backlog(self, on_change: Callable[[PeerProtocol, bool], None]) -> None:
        """Call ``on_change(self, congested)`` as the backlog passes ``CONGESTED_BYTES`` and
        drains to ``DRAINED_BYTES``; reactor thread."""
        self._on_congestion = on_change

    def backlog(self) -> int:
        """Bytes written here that the peer's socket has not taken yet."""
        sending = self._sending
        waiting = sending.added - sending.removed if sending is not None else 0
        transport = self.transport
        while transport is not None and not hasattr(transport, "dataBuffer"):
            transport = getattr(transport, "transport", None)  # TLS: the TCP transport under it
        if transport is not None:
            waiting += len(transport.dataBuffer) - getattr(transport, "offset", 0)
            waiting += getattr(transport, "_tempDataLen", 0)
        return waiting

    def _check_backlog(self) -> None:
        if self.backlog() > CONGESTED_BYTES:
            self.congested = True
            self._drain_check = self.clock.callLater(DRAIN_CHECK, self._check_drained)
            self._on_congestion(self, True)  # type: ignore[misc]

    def _check_drained(self) -> None:
        self._drain_check = None
        if self.transport is None or not self.congested:
            return
        if self.backlog() > DRAINED_BYTES:
            self._drain_check = self.clock.callLater(DRAIN_CHECK, self._check_drained)
            return
        self.congested = False
        self._on_congestion(self, False)  # type: ignore[misc]

    def close(self, error: RemapError | None = None) -> None:
        """Close after telling the peer why (if an error is given)."""
        if error is not None and self.failure is None:
            self.failure = error
            if self.open:
                with self._write_lock:
                    self.conn.send(
                        m.Error(code=getattr(error, "code", "protocol"), message=str(error)[:500])
                    )
                self._flush()
        self._lose()

    def _lose(self) -> None:
        """Close after what is queued, within ``handshake_timeout`` s. A peer that stopped
        reading held the connection and what waited for it until heartbeats noticed (the
        silence only, as reads stop at the close), for ever while this side held its reads
        (a frame waiting for the read budget, a submit for the journal). A TLS transport
        bounds its own close (:func:`remap.net._closing_tls`)."""
        transport = self.transport
        if transport is None:
            return
        transport.loseConnection()
        if (
            self._cut is None
            and getattr(transport, "connected", False)
            and not ISSLTransport.providedBy(transport)
        ):
            self._cut = self.clock.callLater(self.handshake_timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _flush(self) -> None:
        conn, transport = self.conn, self.transport
        if not conn.outgoing or transport is None:
            return
        with self._write_lock:
            data, conn.outgoing = conn.outgoing, []
            self.traffic.sent += sum(map(len, data))
            sending = self._sending
            if sending is None:
                write_now(transport, None, data)
            elif sending.parts:  # behind what waits already
                if transport.connected:
                    sending.queue(data)
            else:
                write_now(transport, sending.sock, data, sending.queue)

    def send_from_thread(
        self,
        produce: Callable[[], list[m.Message]],
        call_soon: Callable[..., None],
    ) -> bool:
        """Another thread's messages, written to the socket in this call (no hop through the
        reactor): only on an open, idle plain TCP connection, with ``produce()`` called under
        the write lock. What the socket does not take waits in the send queue (``call_soon``
        wakes the reactor to send it). False: nothing was produced; send through the reactor.
        """
        with self._write_lock:
            sending, transport = self._sending, self.transport
            if (
                sending is None
                or sending.parts
                or self.conn.outgoing  # sealed before what this thread would seal
                or transport is None
                or not self.open
                or self.conn.state is not _OPEN
                or not transport.connected
                or transport.disconnecting
                or not transport_idle(transport)
            ):
                return False
            conn = self.conn
            data: list[bytes | memoryview] = []
            for msg in produce():
                header, payload = m.encode(msg)
                data += encode_frame(conn.seal(header, payload), payload)
            if not data:
                return True
            self.traffic.sent += sum(map(len, data))

            def later(rest: list[bytes | memoryview]) -> None:
                sending.add(rest)
                call_soon(sending.resume)

            write_now(transport, sending.sock, data, later)
            return True

    # ---------------------------------------------------------------- timers

    def _failed(self, error: RemapError) -> None:
        self.failure = error
        self.log.info("closing connection to {peer}: {error}", peer=self.peer, error=error)
        self._flush()
        self.handler.connection_failed(self, error)
        self._lose()

    def _handshake_expired(self) -> None:
        """The handshake's deadline: it fails, and its ``timeout`` frame has as long again to
        leave before the connection is cut; one that failed before and is not closed yet is cut
        now. (Under TLS a close waits for the peer, for its TLS handshake and its TLS close: one
        that sent neither held its connection and its place in the handshake caps for ever.)"""
        self._deadline = None
        event = self.conn.timeout()
        if event is not None:
            self._failed(event.error)
            self._deadline = self.clock.callLater(self.handshake_timeout, self._handshake_expired)
        elif not self.open:
            self.abort()

    def _adopt_peer_heartbeat(self) -> None:
        """Beat at least as often as the server expects; wait at least as long as it beats."""
        theirs = self.conn.peer_heartbeat
        if theirs:
            self._silence_limit = max(self.heartbeat_interval, theirs) * self.heartbeat_misses
            self.heartbeat_interval = min(self.heartbeat_interval, theirs)

    def _heartbeat(self) -> None:
        beat, self._beat = self._beat, None
        if self.transport is None:
            return
        now = self.clock.seconds()
        if self._paused or self._holding:  # not reading is this side's doing: not silent
            self._last_seen = now
        silent = now - self._last_seen
        overdue = silent > (self._silence_limit or self.heartbeat_interval * self.heartbeat_misses)
        # over an interval late, this process was stalled: the peer's beats may wait unread
        # (timers run before reads). The next check judges (once: one late every time does)
        if overdue and (
            self._verdict_deferred
            or beat is None
            or now - beat.getTime() <= self.heartbeat_interval
        ):
            self.failure = self._peer_lost(
                f"no heartbeat from {self.peer} for {silent:.1f}s: declaring it lost"
            )
            self.log.warn("{error}", error=self.failure)
            self.transport.abortConnection()
            return
        self._verdict_deferred = overdue
        self.send(self.handler.heartbeat())
        self._beat = self.clock.callLater(self.heartbeat_interval, self._heartbeat)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def _failure_of(reason: Failure | None, module: str, name: str) -> Any:
    """``reason``'s exception if it is ``module.name`` (imported only then: twisted[tls])."""
    if reason is None:
        return None
    cls = getattr(importlib.import_module(module), name)
    return reason.value if isinstance(reason.value, cls) else None


def _tls_error_text(reason: Failure | None) -> str | None:
    """The OpenSSL reason strings of a TLS failure, or None if ``reason`` is not one."""
    error = _failure_of(reason, "OpenSSL.SSL", "Error")
    if error is None:
        return None
    details = [
        str(part[-1])
        for part in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
        if isinstance(part, tuple) and part
    ]
    return "; ".join(d for d in details if d) or str(error) or "handshake failed"


def _name_mismatch_text(reason: Failure | None) -> str | None:
    """Name the mismatch when the server's certificate does not cover the name dialled."""
    error = _failure_of(reason, "service_identity", "VerificationError")
    if error is None:
        return None
    dialled = ", ".join(repr(_id_text(getattr(e, "mismatched_id", e))) for e in error.errors)
    return (
        f"host-name mismatch: the server's certificate does not name {dialled}, the address "
        "dialled; connect with a name or address its certificate names (see its "
        "subjectAltName), or give the server a certificate that includes it"
    )


def _id_text(ident: object) -> str:
    """``localhost`` or ``127.0.0.1`` for a service_identity id."""
    for attr in ("hostname", "ip"):
        value = getattr(ident, attr, None)
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return str(ident)
