"""The Twisted adapter for :mod:`protocol`: feeds bytes in, writes bytes out.

All protocol state lives in :class:`protocol.Connection`; all application state lives
in the handler. This class only owns the two timers a connection needs: the
handshake deadline and the heartbeat (send one each interval; drop the peer when
nothing at all arrived for ``interval * misses``).
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import Authenticated, Connection, ConnectionFailed, MessageReceived, messages as m
from protocol.errors import ConnectionLost, RemapError


class Handler(TypingProtocol):
    """What the application plugs into a :class:`PeerProtocol`."""

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None: ...
    def message_received(self, link: PeerProtocol, msg: m.Message) -> None: ...
    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None: ...
    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None: ...
    def heartbeat(self) -> m.Heartbeat: ...


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
    ) -> None:
        self.conn = connection
        self.handler = handler
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self._deadline: IDelayedCall | None = None
        self._beat: IDelayedCall | None = None
        self._last_seen = 0.0
        self.failure: RemapError | None = None
        self.open = False
        self.peer = ""

    # ---------------------------------------------------------------- Twisted API

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self._last_seen = self.clock.seconds()
        self._deadline = self.clock.callLater(self.handshake_timeout, self._handshake_expired)
        if not self.conn.is_server:
            self.conn.initiate()
            self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._last_seen = self.clock.seconds()
        for event in self.conn.receive_data(data):
            if isinstance(event, MessageReceived):
                self.handler.message_received(self, event.message)
            elif isinstance(event, Authenticated):
                self._cancel(self._deadline)
                self._deadline = None
                self.open = True
                self._beat = self.clock.callLater(self.heartbeat_interval, self._heartbeat)
                self.handler.authenticated(self, event)
            elif isinstance(event, ConnectionFailed):
                self._failed(event.error)
                return
            if self.transport is None or self.conn.state.value == "closed":
                break
        self._flush()

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: B006
        self._cancel(self._deadline)
        self._cancel(self._beat)
        self._deadline = self._beat = None
        self.conn.close()
        self.open = False
        self.handler.connection_lost(self, self.failure or ConnectionLost(f"connection to {self.peer} lost"))

    # ---------------------------------------------------------------- sending

    def send(self, msg: m.Message) -> None:
        if self.transport is None or not self.open:
            return
        self.conn.send(msg)
        self._flush()

    def close(self, error: RemapError | None = None) -> None:
        """Close after telling the peer why (if an error is given)."""
        if error is not None and self.failure is None:
            self.failure = error
            if self.open:
                self.conn.send(m.Error(code=getattr(error, "code", "protocol"), message=str(error)[:500]))
                self._flush()
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            # transports take bytes only; one join is the single copy a payload makes here
            self.transport.write(b"".join(data))

    # ---------------------------------------------------------------- timers

    def _failed(self, error: RemapError) -> None:
        self.failure = error
        self.log.info("closing connection to {peer}: {error}", peer=self.peer, error=error)
        self._flush()
        self.handler.connection_failed(self, error)
        if self.transport is not None:
            self.transport.loseConnection()

    def _handshake_expired(self) -> None:
        self._deadline = None
        event = self.conn.timeout()
        if event is not None:
            self._failed(event.error)

    def _heartbeat(self) -> None:
        self._beat = None
        if self.transport is None:
            return
        silent = self.clock.seconds() - self._last_seen
        if silent > self.heartbeat_interval * self.heartbeat_misses:
            self.failure = ConnectionLost(
                f"no heartbeat from {self.peer} for {silent:.1f}s: declaring it lost"
            )
            self.log.warn("{error}", error=self.failure)
            self.transport.abortConnection()
            return
        self.send(self.handler.heartbeat())
        self._beat = self.clock.callLater(self.heartbeat_interval, self._heartbeat)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
