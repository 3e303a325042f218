"""In-process links: the embedded cluster's console, server and node without sockets.

A :class:`LocalLink` has the surface the handlers use on a :class:`~remap.wire.PeerProtocol`
(``send``, ``close``, ``abort``, ``open``, ``peer``, ``conn.max_frame``) but hands message
objects to the other end's handler directly: no framing, no copies, no loopback hops. Delivery is
queued to the next reactor turn, in order, so a handler is never re-entered from its own ``send``
(the same ordering guarantee one TCP connection gives). There is nothing to authenticate: both
ends live in this process.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

from protocol import Authenticated
from protocol import messages as m
from protocol.errors import ConnectionLost, RemapError

from .server.service import ServerConnection


@dataclass(frozen=True)
class _Limits:
    max_frame: int


class LocalLink:
    """One end of an in-process connection."""

    def __init__(self, reactor: Any, peer: str, handler: Any, max_frame: int) -> None:
        self.reactor = reactor
        self.peer = peer
        self.handler = handler
        self.conn = _Limits(max_frame)
        self.other: LocalLink | None = None
        self.open = True
        self._inbox: deque[m.Message] = deque()
        self._scheduled = False

    def send(self, msg: m.Message) -> None:
        other = self.other
        if not self.open or other is None or not other.open:
            return
        other._inbox.append(msg)
        if not other._scheduled:
            other._scheduled = True
            self.reactor.callLater(0, other._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        inbox = self._inbox
        while inbox and self.open:
            self.handler.message_received(self, inbox.popleft())

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
    server_end.handler.authenticated(server_end, Authenticated(role, name, session))
    client_handler.authenticated(client_end, Authenticated("server", "", session))
    return client_end
