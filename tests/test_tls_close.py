"""A TLS connection's close is bounded (remap/net.py): real TLS over 127.0.0.1, trustme's CA.

TLS's close waits for the peer's ``close_notify``; a peer that never sends it (frozen, buggy,
behind a dead network) and does not read held its socket and buffers for ever. Every TLS
connection of the endpoints in remap/net.py is cut once its close has waited its
``close_timeout`` (``REMAP_HANDSHAKE_TIMEOUT``).
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

from protocol import Authenticated, Connection
from remap import runtime
from remap.cluster import start_server
from remap.errors import RemoteProtocolError
from remap.net import client_endpoint, server_endpoint
from remap.settings import Settings

KEY = b"the cluster secret for tls close tests"


class RawConsole:
    """A console over real TLS (the stdlib's ``ssl``, not Twisted's) that authenticates and
    then neither reads nor sends anything: no ``close_notify`` ever (closing the socket at the
    end sends none either)."""

    def __init__(self, port: int, ca: str) -> None:
        context = ssl.create_default_context(cafile=ca)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        conn = Connection("console", KEY)
        conn.initiate()
        while True:
            self.sock.sendall(b"".join(bytes(p) for p in conn.data_to_send()))
            events = conn.receive_data(self.sock.recv(65536))
            if any(isinstance(e, Authenticated) for e in events):
                break
        self.sock.sendall(b"".join(bytes(p) for p in conn.data_to_send()))

    def close(self) -> None:
        self.sock.close()


def _watched_console(server: Any) -> tuple[Any, threading.Event]:
    """The server's link to its one console, and an event set once that connection is gone."""
    gone = threading.Event()

    def watch() -> Any:
        (link,) = server.factory.consoles
        lost = link.connectionLost

        def spy(reason: Any = None) -> None:
            gone.set()
            lost(reason)

        link.connectionLost = spy
        return link

    return runtime.run(watch, timeout=10), gone


def _serve(tls_files: dict[str, str], tmp_path: Any) -> Any:
    settings = Settings(
        port=0,
        state_dir=str(tmp_path),
        journal=False,
        tls_cert=tls_files["cert"],
        tls_key=tls_files["key"],
        # heartbeats cannot be what cuts the peer here: only the close's deadline
        heartbeat_interval=60.0,
    )
    return runtime.run(start_server, runtime.reactor(), settings, secret=KEY, timeout=30)


def test_a_peer_that_never_closes_tls_is_cut_after_the_close_deadline(tls_files, tmp_path):
    """The server drops an authenticated console (as on a protocol error or a kill) whose peer
    neither reads nor sends TLS's ``close_notify``: the connection is cut once its close has
    waited ``close_timeout`` (it was held for ever; heartbeats, 60 s apart here, did not cut
    it either: a live but broken peer keeps beating)."""
    server = _serve(tls_files, tmp_path)
    try:
        server.port.factory.close_timeout = 0.3  # the TLS factory of the port's connections
        peer = RawConsole(server.port.getHost().port, tls_files["ca"])
        try:
            link, gone = _watched_console(server)
            runtime.run(link.close, RemoteProtocolError("dropped by the test"), timeout=10)
            assert gone.wait(15), "the console's TLS close was never cut"
        finally:
            peer.close()
    finally:
        runtime.run(server.stop, timeout=30)


def test_stopping_the_server_is_not_held_by_a_close_that_waits(tls_files, tmp_path):
    """A console whose TLS close waits for a peer that never answers does not hold the
    server's stop (what SIGTERM runs): the stop cuts it."""
    server = _serve(tls_files, tmp_path)
    peer = RawConsole(server.port.getHost().port, tls_files["ca"])
    try:
        link, gone = _watched_console(server)
        runtime.run(link.close, timeout=10)  # its close waits (for 5 s)
        runtime.run(server.stop, timeout=30)
        assert gone.wait(15)
    finally:
        peer.close()


def test_a_close_has_as_long_as_a_handshake_on_both_sides(tls_files):
    """The close's deadline is REMAP_HANDSHAKE_TIMEOUT's, on the listening side (both ports)
    and on the dialling side (a console's or node's own close is bounded the same way)."""
    settings = Settings(tls_cert=tls_files["cert"], tls_key=tls_files["key"], handshake_timeout=2.5)
    assert server_endpoint(runtime.reactor(), settings, "127.0.0.1", 0).close_timeout == 2.5
    dialling = Settings(tls_ca=tls_files["ca"], handshake_timeout=2.5)
    assert client_endpoint(runtime.reactor(), dialling, "127.0.0.1", 1).close_timeout == 2.5
