"""Closing connections on real loopback sockets: what a peer said before a reset is heard.

Real sockets because the kernel is the subject: a reset socket still holds what arrived before
the reset, and Twisted finds a connection lost by reading or by writing.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint

from protocol import ServerBusy, refusal_frame
from remap import runtime
from remap.errors import RemapError
from remap.net import PeerFactory, authenticated
from remap.settings import Settings

KEY = b"the cluster secret for closing tests"
BUSY = "too many connections from this host in the handshake (at most 1)"


class Quiet:
    """A console handler that only waits (the dialler's AuthWaiter reports the outcome)."""

    def authenticated(self, link: Any, event: Any) -> None:
        pass

    def message_received(self, link: Any, msg: Any) -> None:
        pass

    def connection_failed(self, link: Any, error: RemapError) -> None:
        pass

    def connection_lost(self, link: Any, error: RemapError) -> None:
        pass


def _refused_as_it_connects(listener: socket.socket) -> tuple[RemapError | None, bool]:
    """Dial ``listener`` as a console; the "server" (this test, in the reactor's thread) accepts,
    writes the ``busy`` frame and closes before the client's reactor next looks at its socket.
    That look then sees the connect done and the frame in one event: the client's hello meets
    a closed socket, the kernel answers with a reset, and Twisted writes (from the same event)
    before it reads. Returns what the dial failed with, and whether the refusal came before the
    client saw its connection made (the case under test)."""
    reactor = runtime.reactor()
    built: list[Any] = []
    refused_first: list[bool] = []

    class Factory(PeerFactory):
        def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
            built.append(addr)
            return super().buildProtocol(addr)

    def refuse() -> None:
        # runs in the timer turn that issued the connect (or the next ones, until the kernel
        # completed it): before the reactor polls the client's socket
        if not select.select([listener], [], [], 0)[0]:
            reactor.callLater(0, refuse)
            return
        sock, _ = listener.accept()
        refused_first.append(not built)
        sock.sendall(refusal_frame(BUSY))
        sock.close()  # nothing unread: a FIN; the client's hello then meets a closed socket

    async def dial() -> RemapError | None:
        factory = Factory(reactor, "console", KEY, Quiet(), Settings(), wait_for_auth=True)
        port = listener.getsockname()[1]
        connecting = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10).connect(factory)
        reactor.callLater(0, refuse)
        link = await connecting
        try:
            await authenticated(link)
        except RemapError as exc:
            return exc
        return None

    error = runtime.run(dial, timeout=30)
    return error, bool(refused_first and refused_first[0])


def test_a_refusal_that_arrives_with_the_connect_is_heard_not_a_plain_close() -> None:
    """A server that refuses a console (its caps full) writes one ``busy`` frame and closes.
    When that frame arrived before the client saw its connect done, the client's hello met the
    closed socket and the reset came back at once; Twisted then wrote again in the same event
    and reported the loss before reading: the console said "closed the connection during the
    handshake ... (if the server uses TLS, set REMAP_TLS_CA ...)" instead of why (in-process
    dials of a real server with a full cap: 461 of 1,000). The frame is read first: ServerBusy
    with the server's words, every time the race is set up (a few dials each)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raced = 0
        for _ in range(20):
            error, refused_first = _refused_as_it_connects(listener)
            if not refused_first:
                continue  # the client saw its connect before the refusal: not this race
            raced += 1
            assert isinstance(error, ServerBusy), repr(error)
            assert error.peer_message == BUSY
            if raced == 5:
                break
        assert raced == 5, f"the race was set up {raced} times in 20 dials"
