"""A node that stops as asked says ``goodbye``: the server re-queues its work at once and logs
one calm info line; a node that crashed or lost its link (or predates the message) is still
"lost", with the warning, as before.

In layers: the message (sans-IO), the scheduler (events in, a Clock), a server handler and a
node agent joined over in-memory transports, and last real processes on loopback (``slow``).
"""

from __future__ import annotations

import re

import msgpack
import pytest

from protocol import MessageReceived
from protocol import messages as m
from protocol.errors import RemoteProtocolError, UnknownMessageType
from tests.test_handshake import out, pair, run_handshake

# ---------------------------------------------------------------------------- the message


def test_goodbye_round_trips_and_leaves_its_default_out() -> None:
    """``goodbye`` encodes to ``{"t": "goodbye", "reason": ...}`` and back; a reason at its
    default ("") is left out of the header and read back as "" (a bare goodbye is valid)."""
    header, payload = m.encode(m.Goodbye(reason="stopping"))
    assert msgpack.unpackb(header) == {"t": "goodbye", "reason": "stopping"} and payload == b""
    assert m.decode(header, payload) == m.Goodbye(reason="stopping")
    bare, _ = m.encode(m.Goodbye())
    assert msgpack.unpackb(bare) == {"t": "goodbye"}
    assert m.decode(bare, b"") == m.Goodbye(reason="")


@pytest.mark.parametrize(
    "header, payload, problem",
    [
        ({"t": "goodbye", "reason": 7}, b"", "goodbye.reason: bad value of type int"),
        ({"t": "goodbye", "reason": b"stopping"}, b"", "goodbye.reason: bad value of type bytes"),
        ({"t": "goodbye", "reason": None}, b"", "goodbye.reason: bad value of type NoneType"),
        ({"t": "goodbye", "reason": "x", "when": 1}, b"", "unknown field"),
        ({"t": "goodbye"}, b"\x80\x05junk", "goodbye carries no payload"),
    ],
)
def test_a_malformed_goodbye_is_refused(header: dict, payload: bytes, problem: str) -> None:
    """Garbage in a goodbye (a reason that is not text, a field it does not have, a payload)
    is a protocol error, as for every message: never a goodbye with a wrong value inside."""
    raw = msgpack.packb(header, use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match=re.escape(problem)):
        m.decode(raw, payload)


def test_goodbye_travels_on_the_network_only_and_after_authentication() -> None:
    """A core's pipe does not carry it (refused as unknown there), nor does a connection that
    has not authenticated."""
    header, payload = m.encode(m.Goodbye(reason="stopping"))
    with pytest.raises(UnknownMessageType):
        m.decode(header, payload, channel="pipe")
    with pytest.raises(RemoteProtocolError, match="before authentication"):
        m.decode(header, payload, preauth=True)


def test_goodbye_goes_through_an_open_connection() -> None:
    """Sans-IO: a node's connection sends it once open; the server's reads it as a message."""
    server, client = pair("node")
    run_handshake(server, client)
    client.send(m.Goodbye(reason="stopping"))
    assert server.receive_data(out(client)) == [MessageReceived(m.Goodbye(reason="stopping"))]
