"""In-process links: the embedded cluster's console, server and node without sockets.

A :class:`LocalLink` has the surface the handlers use on a :class:`~remap.wire.PeerProtocol`
but hands message objects to the other end's handler directly: no framing, no copies. Delivery
is queued, in order, so a handler is never re-entered from its own ``send``. All links of one
reactor share one :class:`_DeliveryLoop`: a message and those its handler sends on (console →
server → node) are delivered on one reactor turn.
"""

from __future__ import annotations

import secrets
import types
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from protocol import Authenticated
from protocol import messages as m

from .errors import ConnectionLost, RemapError
from .server.service import ServerConnection


class _DeliveryLoop:
    """Runs the links that have messages waiting, in the order they got them, until none has."""

    log = Logger()

    #: messages delivered on one turn at most, so sockets and timers are never starved
    MAX_PER_TURN = 10_000

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ready: deque[LocalLink] = deque()
        self.scheduled = False
        self.running = False
        #: inside :func:`in_one_turn`: its end delivers, so nothing is put on the reactor
        self.held = False
        self._call: Any = None

    def add(self, link: LocalLink) -> None:
        self.ready.append(link)
        if not self.scheduled:
            self.scheduled = True
            if not self.held:
                self._call = self.reactor.callLater(0, self.run)

    def run_now(self) -> None:
        """Deliver now what waits for the next turn (see :func:`in_one_turn`); a handler's error
        is logged, not raised into the caller (a core's pipe reader would see a broken pipe)."""
        if self.scheduled and not self.running:
            if self._call is not None and self._call.active():
                self._call.cancel()  # not yet in the reactor's heap: the turn is saved
            try:
                self.run()
            except Exception:
                self.log.failure("delivering an in-process message failed")

    def run(self) -> None:
        ready, delivered = self.ready, 0
        self.running = True
        try:
            while ready and delivered < self.MAX_PER_TURN:
                delivered += ready.popleft()._deliver()
        finally:
            self.running = False
            self.scheduled = bool(ready)
            self._call = self.reactor.callLater(0, self.run) if ready else None


_loops: weakref.WeakKeyDictionary[Any, _DeliveryLoop] = weakref.WeakKeyDictionary()


def _loop_of(reactor: Any) -> _DeliveryLoop:
    loop = _loops.get(reactor)
    if loop is None:
        loop = _loops[reactor] = _DeliveryLoop(reactor)
    return loop


def in_one_turn(reactor: Any) -> Callable[..., None]:
    """``run(fn, *args)``: call ``fn`` and deliver the messages it sent on in-process links
    when it returns, booking no timed call for them (~330 bytecodes each). Only at the top of
    a reactor turn: calls from other threads, a core's answers read from its pipe."""
    loop = _loop_of(reactor)

    def run(fn: Callable[..., Any], *args: Any) -> None:
        if loop.held or loop.running:  # not at the top of a turn after all: the usual way
            fn(*args)
            return
        loop.held = True
        try:
            fn(*args)
        finally:
            loop.held = False
            loop.run_now()

    return run


class LocalLink:
    """One end of an in-process connection."""

    def __init__(self, reactor: Any, peer: str, handler: Any, max_frame: int) -> None:
        self.reactor = reactor
        self.peer = peer
        self.handler = handler
        self.conn = types.SimpleNamespace(max_frame=max_frame)
        #: no frame to size: messages cross as objects (see ``PeerProtocol.frame_limit``)
        self.frame_limit = 0
        self.other: LocalLink | None = None
        self.open = True
        self._inbox: deque[m.Message] = deque()
        self._scheduled = False
        self._loop = _loop_of(reactor)

    #: nothing waits to be written in-process: never congested (see ``PeerProtocol``)
    congested = False

    def watch_backlog(self, on_change: Callable[[Any, bool], None]) -> None:
        """Messages cross as objects, handled in the turn they are sent: no backlog."""

    def send(self, msg: m.Message) -> None:
        other = self.other
        if not self.open or other is None or not other.open:
            return
        other._inbox.append(msg)
        if not other._scheduled:
            other._scheduled = True
            other._loop.add(other)

    def _deliver(self) -> int:
        """Hand every waiting message to the handler; how many."""
        self._scheduled = False
        inbox, n = self._inbox, 0
        try:
            while inbox and self.open:
                self.handler.message_received(self, inbox.popleft())
                n += 1
        finally:  # a handler raised: what came after it still goes, on a later turn
            if inbox and self.open and not self._scheduled:
                self._scheduled = True
                self._loop.add(self)
        return n

    def close(self, error: RemapError | None = None) -> None:
        """Close both ends; each handler hears ``connection_lost`` on a later turn."""
        reason = error or ConnectionLost(f"in-process connection to {self.peer} closed")
        for end in (self, self.other):
            if end is not None and end.open:
                end.open = False
                self.reactor.callLater(0, end.handler.connection_lost, end, reason)

    def abort(self) -> None:
        self.close()


def connect_local(
    reactor: Any, server_factory: Any, client_handler: Any, role: str, name: str = "local"
) -> LocalLink:
    """Join ``client_handler`` (a NodeAgent or ClusterClient) to the server; return its end."""
    limit = server_factory.max_frame
    server_end = LocalLink(reactor, name, ServerConnection(server_factory), limit)
    client_end = LocalLink(reactor, "local server", client_handler, limit)
    server_end.other, client_end.other = client_end, server_end
    session = secrets.token_hex(8)
    server_end.handler.authenticated(server_end, Authenticated(role, session))
    client_handler.authenticated(client_end, Authenticated("server", session))
    return client_end
