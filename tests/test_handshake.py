"""The handshake (protocol/connection.py): mutual HMAC proof, and every way it must fail.

Pure tests: two sans-IO Connections talk through lists of bytes; no reactor, no sockets.
The handshake timeout driven by a ``task.Clock`` is in test_wire.py (it is the adapter's timer).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import msgpack
import pytest

from protocol import (
    Authenticated,
    Connection,
    ConnectionFailed,
    MessageReceived,
    State,
    local_versions,
    refusal_frame,
)
from protocol import (
    messages as m,
)
from protocol.connection import NONCE_SIZE
from protocol.errors import (
    AuthError,
    FrameTooLarge,
    HandshakeTimeout,
    LocalProtocolError,
    RemapError,
    RemoteProtocolError,
    ServerBusy,
    VersionMismatch,
)
from protocol.framing import (
    DEFAULT_MAX_FRAME,
    MAC_SIZE,
    PREAUTH_MAX_FRAME,
    FrameDecoder,
    encode_frame,
)
from protocol.messages import PROTOCOL_VERSION

KEY = b"the right secret"
WRONG = b"not the secret"
PY, CP = local_versions()


# --------------------------------------------------------------------------- helpers


def out(conn: Connection) -> bytes:
    return b"".join(bytes(part) for part in conn.data_to_send())


def frames(data: bytes, sealed: bool = False) -> list[tuple[dict, bytes]]:
    """Parse bytes a Connection wrote: [(header map, payload)]; ``sealed``: frames after its
    proof, each header behind its MAC (not checked here)."""
    decoder = FrameDecoder(max_frame=1 << 30)
    skip = MAC_SIZE if sealed else 0
    return [(msgpack.unpackb(f.header[skip:], raw=False), f.payload) for f in decoder.feed(data)]


def frame(header: dict, payload: bytes = b"", sealer: Connection | None = None) -> bytes:
    """A frame of ``header``; sealed by ``sealer`` (the sending side's Connection) if given."""
    raw = msgpack.packb(header, use_bin_type=True)
    if sealer is not None:
        raw = sealer.seal(raw, payload)
    return b"".join(bytes(p) for p in encode_frame(raw, payload))


def pair(role: str = "node", server_key: bytes = KEY, client_key: bytes = KEY, **kw):
    server = Connection("server", server_key, **kw.get("server", {}))
    client = Connection(role, client_key, **kw.get("client", {}))
    client.initiate()
    return server, client


def run_handshake(server: Connection, client: Connection):
    """Pump both ways until neither side has anything to say; return (server events, client events)."""
    s_events: list = []
    c_events: list = []
    for _ in range(10):
        to_server = out(client)
        to_client = out(server)
        if not to_server and not to_client:
            break
        if to_server:
            s_events += server.receive_data(to_server)
        if to_client:
            c_events += client.receive_data(to_client)
    return s_events, c_events


def failure(events: list) -> RemapError:
    failed = [e for e in events if isinstance(e, ConnectionFailed)]
    assert len(failed) == 1, events
    assert events[-1] is failed[0], "nothing may follow a failure"
    return failed[0].error


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def spec_sealed(key: bytes, seq: int, header: bytes, payload: bytes = b"") -> bytes:
    """A frame sealed as the README's section 4 says, written from it: the MAC ahead of the
    header, over the sequence number, the header's length, the header and the payload."""
    tag = hmac256(key, struct.pack(">QI", seq, len(header)) + header + payload)
    body = tag + header
    return struct.pack(">II", 4 + len(body) + len(payload), len(body)) + body + payload


def about_of(auth_and_about: bytes) -> dict:
    """The header of the sealed about behind a client's auth (its MAC not checked)."""
    _, about = FrameDecoder().feed(auth_and_about)
    header = msgpack.unpackb(about.header[MAC_SIZE:], raw=False)
    assert header["t"] == "about"
    return header


def counting_nonce(start: int = 0):
    """Deterministic, distinct nonces (each call gives a new value)."""
    state = {"n": start}

    def nonce(size: int) -> bytes:
        state["n"] += 1
        return state["n"].to_bytes(size, "big")

    return nonce


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("role", ["node", "console"])
def test_handshake_succeeds_and_both_sides_agree(role):
    """With the same secret both sides authenticate, agree on the session and open."""
    server, client = pair(role)
    s_events, c_events = run_handshake(server, client)
    assert len(s_events) == 1 and isinstance(s_events[0], Authenticated)
    assert len(c_events) == 1 and isinstance(c_events[0], Authenticated)
    assert s_events[0].peer_role == role
    assert c_events[0].peer_role == "server"
    assert s_events[0].session == c_events[0].session == server.session == client.session
    assert len(server.session) == 16
    assert server.state is client.state is State.OPEN
    assert server.peer_role == role and client.peer_role == "server"


def test_messages_flow_both_ways_after_the_handshake():
    """Once open, any catalogue message goes through in both directions, payload intact."""
    server, client = pair()
    run_handshake(server, client)
    client.send(m.NodeInfo(host="h", pid=1, cores=2, memory=3))
    server.send(m.Task(task=1, job=2, sizes=[3], payload=b"abc"))
    assert server.receive_data(out(client)) == [
        MessageReceived(m.NodeInfo(host="h", pid=1, cores=2, memory=3))
    ]
    assert client.receive_data(out(server)) == [
        MessageReceived(m.Task(task=1, job=2, sizes=[3], payload=b"abc"))
    ]


def test_client_takes_the_smaller_frame_limit():
    """The welcome's max_frame caps what the client accepts from then on."""
    server, client = pair(server={"max_frame": 50_000}, client={"max_frame": 1 << 20})
    run_handshake(server, client)
    server.send(m.JobLoad(job=1, payload=b"x" * 60_000))
    error = failure(client.receive_data(out(server)))
    assert isinstance(error, FrameTooLarge)


def test_the_server_learns_the_clients_smaller_frame_limit_from_its_about():
    """A client's about carries its own limit; the server sends it nothing larger (its
    ``send_limit``), while what the server accepts stays its own limit."""
    server, client = pair(
        role="console", server={"max_frame": 1 << 20}, client={"max_frame": 50_000}
    )
    server.receive_data(out(client))
    client.receive_data(out(server))
    auth_and_about = out(client)
    assert about_of(auth_and_about)["max_frame"] == 50_000
    server.receive_data(auth_and_about)
    run_handshake(server, client)
    assert server.peer_max_frame == 50_000 and server.send_limit == 50_000
    # the frame's MAC does not count against the limit
    assert server.max_frame == 1 << 20 and server.decoder.max_frame == (1 << 20) + MAC_SIZE
    assert client.send_limit == 50_000 and client.peer_max_frame == 1 << 20


def test_an_about_without_a_frame_limit_stands_for_the_default_one():
    """A client at the default limit leaves the field out; the server then never sends it more
    than the default limit, however large its own."""
    for limit in (4 * DEFAULT_MAX_FRAME, 1 << 20):
        server, client = pair("console", server={"max_frame": limit})
        server.receive_data(out(client))
        client.receive_data(out(server))
        auth_and_about = out(client)
        assert "max_frame" not in about_of(auth_and_about)
        server.receive_data(auth_and_about)
        assert server.peer_max_frame == DEFAULT_MAX_FRAME
        assert server.send_limit == min(limit, DEFAULT_MAX_FRAME)


def test_every_split_point_of_the_whole_handshake():
    """Each side's handshake bytes fed one byte at a time give the same outcome as one read."""
    server, client = pair(
        server={"nonce": counting_nonce(100)}, client={"nonce": counting_nonce(0)}
    )
    hello = out(client)
    s_events: list = []
    for i in range(len(hello)):
        s_events += server.receive_data(hello[i : i + 1])
    assert s_events == []
    challenge = out(server)
    assert challenge
    c_events: list = []
    for i in range(len(challenge)):
        c_events += client.receive_data(challenge[i : i + 1])
    auth = out(client)
    for i in range(len(auth)):
        s_events += server.receive_data(auth[i : i + 1])
    welcome = out(server)
    for i in range(len(welcome)):
        c_events += client.receive_data(welcome[i : i + 1])
    assert [type(e) for e in s_events] == [Authenticated]
    assert [type(e) for e in c_events] == [Authenticated]


@pytest.mark.parametrize("split", [0, 1, 4, 8, 20, -1])
def test_welcome_and_a_large_message_in_one_read(split):
    """A big message right behind the welcome (one TCP read) is accepted under the post-auth limit.

    Regression: the decoder used to parse the whole read under the 8 KiB pre-auth limit and
    fail the connection with FrameTooLarge, dropping the welcome too.
    """
    server, client = pair()
    client_events = client.receive_data(b"")
    server.receive_data(out(client))
    client_events += client.receive_data(out(server))
    server.receive_data(out(client))
    server.send(m.JobLoad(job=1, payload=b"x" * 100_000))
    data = out(server)
    welcome_len = struct.unpack(">I", data[:4])[0] + 4
    cut = welcome_len + split if split >= 0 else len(data)
    events = client.receive_data(data[:cut]) + client.receive_data(data[cut:])
    assert [type(e) for e in events] == [Authenticated, MessageReceived]
    assert events[1].message == m.JobLoad(job=1, payload=b"x" * 100_000)


def test_events_before_a_bad_frame_are_kept():
    """A good message followed by garbage in the same read is delivered before the failure."""
    server, client = pair()
    run_handshake(server, client)
    client.send(m.Heartbeat(load=1.0))
    events = server.receive_data(out(client) + struct.pack(">I", 3) + b"junk")
    assert isinstance(events[0], MessageReceived)
    assert isinstance(failure(events), RemoteProtocolError)


# --------------------------------------------------------------------------- wrong secret


@pytest.mark.parametrize("role", ["node", "console"])
def test_wrong_secret_detected_by_the_client(role):
    """A server without the secret cannot prove itself: the client refuses and says so."""
    server, client = pair(role, server_key=WRONG)
    s_events, c_events = run_handshake(server, client)
    error = failure(c_events)
    assert isinstance(error, AuthError)
    assert "REMAP_SECRET_KEY" in str(error)
    assert error.exit_code == 3
    # the client told the server why, and the server maps the code back to AuthError
    peer_error = failure(s_events)
    assert isinstance(peer_error, AuthError)
    assert server.state is client.state is State.CLOSED
    assert out(server) == b"", "a peer's error is never echoed back"


def test_wrong_secret_detected_by_the_server():
    """A client that skips checking the server and answers with the wrong key is refused by the server."""
    server = Connection("server", KEY)
    nonce = b"c" * NONCE_SIZE
    hello_header = msgpack.packb(
        {
            "t": "hello",
            "version": PROTOCOL_VERSION,
            "role": "node",
            "nonce": nonce,
        },
        use_bin_type=True,
    )
    assert server.receive_data(b"".join(bytes(p) for p in encode_frame(hello_header))) == []
    challenge_raw = FrameDecoder().feed(out(server))[0].header
    proof = hmac256(WRONG, b"remap/1 client" + sha256(hello_header) + sha256(challenge_raw))
    error = failure(server.receive_data(frame({"t": "auth", "proof": proof})))
    assert isinstance(error, AuthError)
    assert "REMAP_SECRET_KEY" in str(error)
    ((reply, _),) = frames(out(server), sealed=True)
    assert reply["t"] == "error" and reply["code"] == "auth"
    assert server.state is State.CLOSED


def test_client_receiving_an_auth_error_reports_auth_error():
    """The error frame a refusing server sends surfaces on the client as AuthError (exit code 3)."""
    client = Connection("console", KEY)
    client.initiate()
    out(client)
    error = failure(
        client.receive_data(frame({"t": "error", "code": "auth", "message": "go away"}))
    )
    assert isinstance(error, AuthError)
    assert "server refused: go away" in str(error)


@pytest.mark.parametrize("role", ["console", "node"])
def test_a_busy_refusal_is_one_small_preauth_error_frame_the_client_reports(role):
    """A server at its connection caps writes ``refusal_frame`` instead of a challenge: one
    frame well under the pre-authentication limit, a msgpack ``error`` with code ``busy`` and
    no payload (nothing a client unpickles). The client fails with ServerBusy carrying the
    server's words, and answers nothing (a peer's error is never echoed back)."""
    data = refusal_frame("too many connections from this host in the handshake (at most 16)")
    assert len(data) <= 120 < PREAUTH_MAX_FRAME
    (only,) = FrameDecoder(PREAUTH_MAX_FRAME).feed(data)
    assert only.payload == b"" and m.decode(only.header, only.payload, preauth=True) == m.Error(
        code="busy", message="too many connections from this host in the handshake (at most 16)"
    )
    client = Connection(role, KEY)
    client.initiate()
    out(client)
    error = failure(client.receive_data(data))
    assert isinstance(error, ServerBusy) and error.exit_code == 4
    assert error.peer_message == "too many connections from this host in the handshake (at most 16)"
    assert client.state is State.CLOSED and out(client) == b""


@pytest.mark.parametrize("code", ["busy", "auth", "protocol", "no-such-code"])
def test_an_unauthenticated_peers_error_text_is_one_printable_bounded_line(code):
    """Anyone answering the port may send an ``error`` in place of a challenge: its text reaches
    the user's terminal (``the server at H refused the connection: TEXT``), so terminal escapes
    and line breaks become ``?`` and it is cut at 500 characters; the code still picks the
    error's class."""
    hostile = "\x1b[2J\x1b[Hjob 7 finished: 100 of 100 right\nerror: " + "y" * 6000
    client = Connection("console", KEY)
    client.initiate()
    out(client)
    error = failure(client.receive_data(frame({"t": "error", "code": code, "message": hostile})))
    for text in (str(error), error.peer_message):
        assert text.isprintable() and "\x1b" not in text and len(text) < 600
    assert "?[2J?[Hjob 7 finished: 100 of 100 right?error: yyy" in error.peer_message
    assert isinstance(error, ServerBusy) == (code == "busy")


@pytest.mark.parametrize("role", ["server", "console"])
def test_a_preauth_header_cannot_make_either_side_build_what_it_declares(role):
    """Before authentication a header is one small flat map: 8 KiB of nested msgpack arrays,
    each declaring the header's length, are refused without building them (msgpack made a
    list of each declared length first: 64 MiB and ~80 ms per frame from anyone who can
    reach the port), as is a map declaring 4 G keys."""
    import tracemalloc

    size = PREAUTH_MAX_FRAME - 16
    nested = (b"\xdd" + struct.pack(">I", size)) * 1600
    for header in (nested + b"\xc0" * (size - len(nested)), b"\xdf\xff\xff\xff\xff"):
        conn = Connection(role, KEY)
        if role != "server":
            conn.initiate()
            out(conn)
        tracemalloc.start()
        error = failure(conn.receive_data(b"".join(bytes(p) for p in encode_frame(header))))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(error, RemoteProtocolError), error
        assert peak < 1 << 20, peak


def test_a_refusal_frame_carries_a_bounded_text():
    """However long the text it is given, the frame stays small (its text cut at 200)."""
    data = refusal_frame("x" * 10_000)
    assert len(data) < 300
    (only,) = FrameDecoder(PREAUTH_MAX_FRAME).feed(data)
    assert m.decode(only.header, b"", preauth=True).message == "x" * 200


# --------------------------------------------------------------------------- replay and reflection


def test_replayed_client_transcript_is_refused():
    """Bytes a genuine client sent cannot be replayed to a server: its nonce is new each time."""
    server, client = pair()
    transcript: list[bytes] = []
    for _ in range(3):
        data = out(client)
        transcript.append(data)
        server.receive_data(data)
        client.receive_data(out(server))
    assert server.state is State.OPEN
    replay_server = Connection("server", KEY)
    events = replay_server.receive_data(transcript[0])  # the old hello: accepted, new challenge
    assert events == []
    error = failure(
        replay_server.receive_data(transcript[1])
    )  # the old auth: wrong for the new nonce
    assert isinstance(error, AuthError)


def test_replayed_server_transcript_is_refused():
    """A recorded challenge cannot be replayed to a client: the proof covers the client's fresh hello."""
    server, client = pair()
    server.receive_data(out(client))
    old_challenge = out(server)
    fresh = Connection("node", KEY)
    fresh.initiate()
    out(fresh)
    error = failure(fresh.receive_data(old_challenge))
    assert isinstance(error, AuthError)
    assert fresh.state is State.CLOSED


def test_same_nonce_twice_would_replay_so_nonces_must_be_fresh():
    """Shows what freshness buys: with a repeated server nonce an old auth would pass (so os.urandom is used)."""
    hello_nonce = counting_nonce(0)
    client = Connection("node", KEY, nonce=hello_nonce)
    server = Connection("server", KEY, nonce=lambda n: b"S" * n)
    client.initiate()
    hello = out(client)
    server.receive_data(hello)
    client.receive_data(out(server))
    auth = out(client)
    replay = Connection("server", KEY, nonce=lambda n: b"S" * n)
    replay.receive_data(hello)
    out(replay)
    assert [type(e) for e in replay.receive_data(auth)] == [Authenticated]
    assert Connection("server", KEY)._nonce_source.__name__ == "urandom"


def test_a_servers_proofs_never_answer_its_own_challenge():
    """An attacker without the secret reflects what the server itself computes: its challenge's
    proof sent back as the auth, or a second connection's (whose hello carried the first one's
    challenge nonce, so that proof covers it) sent on the first. A server's proof covers its
    own fresh nonce, a client's the hash of the whole challenge (and their labels differ): no
    server proof is ever a client's, and every try is refused."""
    first = Connection("server", KEY)
    first.receive_data(hello_frame(b"A" * NONCE_SIZE))
    ((challenge, _),) = frames(out(first))
    second = Connection("server", KEY)
    second.receive_data(hello_frame(challenge["nonce"]))
    ((other, _),) = frames(out(second))
    for proof in (challenge["proof"], other["proof"]):
        server = Connection("server", KEY, nonce=lambda n: challenge["nonce"])
        server.receive_data(hello_frame(b"A" * NONCE_SIZE))
        out(server)
        assert isinstance(
            failure(server.receive_data(frame({"t": "auth", "proof": proof}))), AuthError
        )


def hello_frame(nonce: bytes) -> bytes:
    return frame(
        {"t": "hello", "version": PROTOCOL_VERSION, "role": "console", "nonce": nonce, "user": ""}
    )


def test_server_refuses_a_reflected_nonce():
    """A hello whose nonce equals the server's own fresh nonce is refused (reflection)."""
    server = Connection("server", KEY, nonce=lambda n: b"R" * n)
    client = Connection("node", KEY, nonce=lambda n: b"R" * n)
    client.initiate()
    error = failure(server.receive_data(out(client)))
    assert isinstance(error, RemoteProtocolError)
    assert "reflected" in str(error)


def test_client_refuses_its_own_nonce_reflected():
    """A challenge that reuses the client's nonce is refused even with a valid proof."""
    client = Connection("node", KEY, nonce=lambda n: b"C" * n)
    client.initiate()
    hello_raw = FrameDecoder().feed(out(client))[0].header
    proof = hmac256(KEY, b"remap/1 server" + sha256(hello_raw) + b"C" * NONCE_SIZE)
    error = failure(
        client.receive_data(
            frame(
                {
                    "t": "challenge",
                    "version": PROTOCOL_VERSION,
                    "nonce": b"C" * NONCE_SIZE,
                    "proof": proof,
                }
            )
        )
    )
    assert isinstance(error, AuthError)
    assert "reflected" in str(error)


# --------------------------------------------------------------------------- truncated, oversized, malformed


def test_truncated_hello_yields_nothing_until_timeout():
    """A hello cut anywhere produces no event and no reply; the timeout then fails the connection."""
    client = Connection("node", KEY)
    client.initiate()
    hello = out(client)
    for cut in range(len(hello)):
        server = Connection("server", KEY)
        assert server.receive_data(hello[:cut]) == []
        assert out(server) == b""
        assert server.state is State.HANDSHAKE
    error = server.timeout().error
    assert isinstance(error, HandshakeTimeout)
    ((reply, _),) = frames(out(server))
    assert reply["t"] == "error" and reply["code"] == "timeout"
    assert server.state is State.CLOSED
    assert server.timeout() is None


def test_truncated_challenge_then_timeout_on_the_client():
    """A client that received half a challenge times out cleanly."""
    server, client = pair()
    server.receive_data(out(client))
    challenge = out(server)
    assert client.receive_data(challenge[:-1]) == []
    assert isinstance(client.timeout().error, HandshakeTimeout)


def test_timeout_after_open_does_nothing():
    """The handshake deadline firing late on an open connection is harmless."""
    server, client = pair()
    run_handshake(server, client)
    assert server.timeout() is None and client.timeout() is None
    assert server.state is State.OPEN


@pytest.mark.parametrize("side", ["server", "client"])
def test_oversized_preauth_frame(side):
    """Before authentication a frame over 8 KiB is refused from its length prefix alone."""
    server, client = pair()
    conn = server if side == "server" else client
    out(conn)
    error = failure(conn.receive_data(struct.pack(">I", PREAUTH_MAX_FRAME + 1)))
    assert isinstance(error, FrameTooLarge)
    ((reply, _),) = frames(out(conn))
    assert reply["code"] == "frame-too-large"


def test_length_2_31_frame_costs_four_bytes():
    """A frame announcing 2**31 bytes is refused immediately; nothing is allocated for it."""
    server = Connection("server", KEY)
    error = failure(server.receive_data(struct.pack(">I", 2**31) + b"x" * 100))
    assert isinstance(error, FrameTooLarge)
    assert "2147483648" in str(error)


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (
            {
                "version": PROTOCOL_VERSION,
                "role": "node",
                "nonce": b"n" * 31,
            },
            "nonce length",
        ),
        (
            {"version": PROTOCOL_VERSION, "role": "node"},
            "missing field 'nonce'",
        ),
        (
            {
                "version": PROTOCOL_VERSION,
                "role": "server",
                "nonce": b"n" * 32,
            },
            "unknown role",
        ),
        (
            {
                "version": PROTOCOL_VERSION,
                "role": "admin",
                "nonce": b"n" * 32,
            },
            "unknown role",
        ),
        (
            {"version": "1", "role": "node", "nonce": b"n" * 32},
            "hello.version",
        ),
        (
            {
                "version": PROTOCOL_VERSION,
                "role": "node",
                "nonce": "n" * 32,
            },
            "hello.nonce",
        ),
    ],
)
def test_malformed_hello(hello, match):
    """Every malformed hello is a RemoteProtocolError, answered with an error frame."""
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame({"t": "hello", **hello})))
    assert isinstance(error, RemoteProtocolError)
    assert match in str(error)
    assert frames(out(server))[0][0]["t"] == "error"


def test_garbage_instead_of_hello():
    """Random bytes are refused; an HTTP request is too (length prefix says 'GET ' = 1.1 GB)."""
    server = Connection("server", KEY)
    assert isinstance(failure(server.receive_data(b"GET / HTTP/1.1\r\n\r\n")), FrameTooLarge)
    server = Connection("server", KEY)
    error = failure(server.receive_data(struct.pack(">II", 8, 4) + b"\xc1\xc1\xc1\xc1"))
    assert isinstance(error, RemoteProtocolError)


# --------------------------------------------------------------------------- wrong version


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 0])
def test_server_refuses_a_different_protocol_version(version):
    """The server refuses a hello of another protocol version, clearly, before any proof (the
    catalogues may differ: the handshake could not go on)."""
    hello = {
        "t": "hello",
        "version": version,
        "role": "node",
        "python": PY,
        "cloudpickle": CP,
        "nonce": b"n" * 32,
    }
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame(hello)))
    assert isinstance(error, VersionMismatch)
    assert f"protocol version {version} is not" in str(error)
    assert error.exit_code == 3
    ((reply, _),) = frames(out(server))
    assert reply["code"] == "version"


@pytest.mark.parametrize(
    ("versions", "line"),
    [
        (
            ("2.7", CP),
            f"the console runs Python 2.7, the server Python {PY}: pickles are not portable "
            "between Python versions; run the same Python everywhere",
        ),
        (
            (PY, "0.1"),
            f"the console has cloudpickle 0.1, the server cloudpickle {CP}: install the same "
            "cloudpickle version everywhere",
        ),
    ],
)
def test_a_client_of_other_versions_is_told_so_once_it_proved_the_secret(versions, line):
    """A console on another Python or cloudpickle fails in one line naming both sides' versions
    (the server's words), and the server's log says the same; but only once it proved the
    secret: the challenge carries none of the server's versions, and a peer without the secret
    hears only that its proof failed (before, the challenge said them, and so did the refusal
    of a hello of other versions)."""
    server, client = pair("console", client={"versions": versions})
    s_events, c_events = run_handshake(server, client)
    assert str(failure(c_events)) == f"server refused: {line}"
    assert isinstance(failure(c_events), VersionMismatch) and failure(c_events).exit_code == 3
    assert str(failure(s_events)) == line

    server, client = pair("console", client={"versions": versions})
    assert server.receive_data(out(client)) == []
    ((challenge, _),) = frames(out(server))
    assert set(challenge) == {"t", "version", "nonce", "proof"}
    error = failure(server.receive_data(frame({"t": "auth", "proof": b"x" * 32})))
    ((refusal, _),) = frames(out(server), sealed=True)
    assert isinstance(error, AuthError) and refusal["code"] == "auth"
    assert "Python" not in refusal["message"] and "cloudpickle" not in refusal["message"]


def test_a_clients_versions_reach_the_servers_log_printable_only():
    """The versions a client states are its own words: a client with the secret (a person's
    key is enough) cannot write terminal escapes or new lines into the server's log."""
    server, client = pair("console", client={"versions": ("3.1\x1b[2J\nforged", CP)})
    s_events, _ = run_handshake(server, client)
    line = str(failure(s_events))
    assert line.startswith("the console runs Python 3.1?[2J?forged, the server Python")
    assert line.isprintable()


@pytest.mark.parametrize("old_side", ["client", "server"])
def test_a_version_1_peer_is_refused_in_one_line_naming_both_versions(monkeypatch, old_side):
    """A peer of protocol version 1 (an older checkout's catalogue) is refused at the
    handshake, not mid-job: each side fails with one line naming both versions."""
    server, client = Connection("server", KEY), Connection("console", KEY)
    # both sides share this process's catalogue: the old side speaks version 1 for its
    # hello or challenge only
    with monkeypatch.context() as patch:
        if old_side == "client":
            patch.setattr(m, "PROTOCOL_VERSION", 1)
        client.initiate()
        hello = out(client)
    with monkeypatch.context() as patch:
        if old_side == "server":
            patch.setattr(m, "PROTOCOL_VERSION", 1)
        s_events = server.receive_data(hello)
        reply = out(server)
    c_events = client.receive_data(reply)
    s_events += server.receive_data(out(client))
    # the server judges the hello by its own version; the client hears the server's words
    theirs, mine = (1, PROTOCOL_VERSION) if old_side == "client" else (PROTOCOL_VERSION, 1)
    refusal = f"protocol version {theirs} is not supported (this side speaks {mine})"
    server_error, client_error = failure(s_events), failure(c_events)
    assert str(server_error) == refusal
    assert str(client_error) == f"server refused: {refusal}"
    assert isinstance(client_error, VersionMismatch) and client_error.exit_code == 3


@pytest.mark.parametrize("role", ["node", "console"])
def test_a_client_tells_a_server_without_the_secret_only_what_the_handshake_needs(role):
    """Whatever answers at the address dialled reads the hello: it holds the protocol version,
    role, nonce (and a person's name) only. The client's Python and cloudpickle versions and
    frame limit go in the about, sealed, after the server's proof: a server without the secret
    never gets them (before, the hello said them, and the node's host name, to anyone)."""
    server, client = pair(role, server_key=WRONG, client={"max_frame": 54_321})
    hello = out(client)
    ((header, _),) = frames(hello)
    assert set(header) == {"t", "version", "role", "nonce"}
    told = hello.replace(header["nonce"], b"")
    server.receive_data(hello)
    client.receive_data(out(server))
    told += out(client)
    assert client.state is State.CLOSED
    for said in (PY.encode(), CP.encode(), b"python", b"cloudpickle", msgpack.packb(54_321)):
        assert said not in told

    server, client = pair(role)
    s_events, _ = run_handshake(server, client)
    assert isinstance(s_events[0], Authenticated) and server.peer_max_frame == DEFAULT_MAX_FRAME


def test_a_hello_of_version_4_is_refused_as_a_version_mismatch():
    """A version 4 client's hello (its versions, name and frame limit in it) is refused in one
    line naming both versions, not as a malformed frame (its fields are not this version's)."""
    hello = {"t": "hello", "version": 4, "role": "node", "python": PY, "cloudpickle": CP,
             "nonce": b"n" * 32, "name": "old-node", "max_frame": 1 << 20}  # fmt: skip
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame(hello)))
    assert isinstance(error, VersionMismatch)
    assert (
        str(error) == f"protocol version 4 is not supported (this side speaks {PROTOCOL_VERSION})"
    )
    ((reply, _),) = frames(out(server))
    assert reply["code"] == "version"


@pytest.mark.parametrize("field", [{"role": "worker"}, {"nonce": b"n" * 64}])
def test_another_versions_hello_is_judged_by_its_version_first(field):
    """The version is checked before the role and nonce (another version may have other roles
    or nonce sizes): such a hello is a version mismatch in one line, not a malformed frame."""
    hello = {"t": "hello", "version": PROTOCOL_VERSION + 1, "role": "node", "nonce": b"n" * 32}
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame({**hello, **field})))
    assert isinstance(error, VersionMismatch)
    ((reply, _),) = frames(out(server))
    assert reply["code"] == "version"


def test_a_server_that_cannot_read_our_hello_is_a_version_mismatch():
    """A server of version 4 finds this hello malformed (``bad-frame``, a field missing): the
    client reports a protocol version mismatch (exit code 3), not a peer that is not remap."""
    client = Connection("console", KEY)
    client.initiate()
    out(client)
    words = "hello: missing field 'python'"
    error = failure(
        client.receive_data(frame({"t": "error", "code": "bad-frame", "message": words}))
    )
    assert isinstance(error, VersionMismatch) and error.exit_code == 3
    assert str(error) == (
        f"server refused: {words} (it speaks another protocol version than {PROTOCOL_VERSION})"
    )


def test_client_refuses_a_challenge_of_another_protocol_version():
    """A challenge announcing a later protocol version is refused as a version mismatch."""
    client = Connection("node", KEY)
    client.initiate()
    out(client)
    error = failure(
        client.receive_data(
            frame(
                {
                    "t": "challenge",
                    "version": PROTOCOL_VERSION + 1,
                    "nonce": b"s" * 32,
                    "proof": b"p" * 32,
                }
            )
        )
    )
    assert isinstance(error, VersionMismatch)


# --------------------------------------------------------------------------- order and misuse


@pytest.mark.parametrize(
    "first",
    [
        {"t": "auth", "proof": b"x" * 32},
        {"t": "welcome", "session": "s", "max_frame": 1, "heartbeat": 1.0},
        {
            "t": "challenge",
            "version": PROTOCOL_VERSION,
            "nonce": b"n" * 32,
            "proof": b"p" * 32,
        },
        {"t": "grant", "job": 1, "count": 1},
        {"t": "task", "task": 1, "job": 1, "sizes": []},
        {"t": "no-such-type"},
    ],
)
def test_server_refuses_anything_but_hello_first(first):
    """The first frame to a server must be a hello; anything else closes the connection."""
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame(first)))
    assert isinstance(error, RemoteProtocolError)
    assert server.state is State.CLOSED


def test_server_refuses_a_second_hello():
    """A hello where the auth is expected is a protocol error."""
    server, client = pair()
    hello = out(client)
    server.receive_data(hello)
    assert isinstance(failure(server.receive_data(hello)), RemoteProtocolError)


@pytest.mark.parametrize(
    "first",
    [
        {"t": "welcome", "session": "s", "max_frame": 1 << 20, "heartbeat": 1.0},
        {
            "t": "hello",
            "version": PROTOCOL_VERSION,
            "role": "node",
            "nonce": b"n" * 32,
        },
        {"t": "auth", "proof": b"x" * 32},
        {"t": "job_load", "job": 1},
        {"t": "shutdown"},
    ],
)
def test_client_refuses_anything_but_a_challenge_first(first):
    """A server that skips the challenge (e.g. sends welcome or work at once) is refused."""
    client = Connection("node", KEY)
    client.initiate()
    out(client)
    error = failure(client.receive_data(frame(first)))
    assert isinstance(error, RemoteProtocolError)
    assert client.state is State.CLOSED


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("auth", AuthError),
        ("version", VersionMismatch),
        ("timeout", HandshakeTimeout),
        ("frame-too-large", FrameTooLarge),
        ("bad-frame", RemoteProtocolError),
        ("weird", RemoteProtocolError),
    ],
)
def test_error_frames_during_the_handshake_map_to_classes(code, cls):
    """An error frame from the peer becomes the matching local exception class; it is not echoed."""
    server = Connection("server", KEY)
    error = failure(server.receive_data(frame({"t": "error", "code": code, "message": "m"})))
    assert type(error) is cls
    assert out(server) == b""


def test_local_misuse_raises_local_protocol_error():
    """Sending before open, initiating twice or on the server: bugs on this side, said plainly."""
    server, client = pair()
    with pytest.raises(LocalProtocolError):
        client.send(m.Heartbeat())
    with pytest.raises(LocalProtocolError):
        client.initiate()
    with pytest.raises(LocalProtocolError):
        server.initiate()
    client.send(m.Error(code="x", message="errors may be sent any time"))


def test_constructor_validation():
    """Unknown roles and empty secrets are refused up front."""
    with pytest.raises(ValueError):
        Connection("admin", KEY)
    with pytest.raises(ValueError):
        Connection("node", b"")


def test_closed_connection_ignores_input():
    """After a failure nothing more is parsed or sent."""
    server = Connection("server", KEY)
    failure(server.receive_data(b"\xff\xff\xff\xff"))
    out(server)
    client = Connection("node", KEY)
    client.initiate()
    assert server.receive_data(out(client)) == []
    assert out(server) == b""


def test_unknown_message_after_auth_gets_an_error_reply_and_keeps_the_connection():
    """A newer peer's unknown message is answered with an error carrying its id; the link stays open."""
    server, client = pair()
    run_handshake(server, client)
    events = server.receive_data(frame({"t": "from_v2", "id": 41}, sealer=client))
    assert events == []
    ((reply, _),) = frames(out(server), sealed=True)
    assert reply == {
        "t": "error",
        "code": "unknown-message",
        "message": "unknown message type 'from_v2'",
        "re": 41,
    }
    assert server.state is State.OPEN
    client.send(m.Heartbeat())
    assert [type(e) for e in server.receive_data(out(client))] == [MessageReceived]


def test_malformed_known_message_after_auth_closes():
    """A known message with a bad field after auth is a protocol violation: error frame, close."""
    server, client = pair()
    run_handshake(server, client)
    error = failure(
        server.receive_data(frame({"t": "grant", "job": "one", "count": 1}, sealer=client))
    )
    assert isinstance(error, RemoteProtocolError)
    assert frames(out(server), sealed=True)[0][0]["code"] == "bad-frame"


# --------------------------------------------------------------------------- sealed frames


def opened(**kw) -> tuple[Connection, Connection]:
    server, client = pair(**kw)
    run_handshake(server, client)
    assert server.state is client.state is State.OPEN
    return server, client


def integrity_failure(events: list) -> RemapError:
    error = failure(events)
    assert isinstance(error, RemoteProtocolError) and "integrity check (MAC)" in str(error)
    return error


@pytest.mark.parametrize("where", ["mac", "header", "payload"])
def test_a_frame_altered_on_the_way_is_refused_unread(where, monkeypatch):
    """One byte changed anywhere in a sealed frame (its MAC, header or payload) fails the
    connection before any of it is decoded; the peer is told why in a sealed error frame."""
    server, client = opened()
    client.send(m.TaskResult(task=1, sizes=[5], payload=b"hello"))
    data = bytearray(out(client))
    data[{"mac": 8, "header": 8 + MAC_SIZE + 3, "payload": len(data) - 1}[where]] ^= 1
    decoded: list = []
    monkeypatch.setattr(m, "decode", lambda *a, **k: decoded.append(a))
    events = server.receive_data(bytes(data))
    assert decoded == [] and [type(e) for e in events] == [ConnectionFailed]
    integrity_failure(events)
    monkeypatch.undo()
    ((reply, _),) = frames(out(server), sealed=True)
    assert reply["t"] == "error" and "integrity" in reply["message"]


@pytest.mark.parametrize("forger", ["unsealed", "wrong key", "reflected"])
def test_a_frame_injected_between_genuine_ones_is_refused(forger):
    """A frame put into the stream by someone on the path (unsealed as anyone can write it,
    sealed under another secret, or the receiver's own frame sent back to it) fails the
    connection; the genuine frame before it is delivered, the one after it is not read.
    Even an unknown message type, which a genuine peer may send, is not answered."""
    server, client = opened()
    strangers = opened(server_key=WRONG, client_key=WRONG)[0]
    client.send(m.Heartbeat(load=7.0))
    forged = {
        "unsealed": frame({"t": "job_load", "job": 1}, b"pickle"),
        "wrong key": frame({"t": "from_v9", "id": 1}, sealer=strangers),
        "reflected": out(client),
    }[forger]
    server.send(m.Heartbeat(load=1.0))
    first = out(server)
    server.send(m.Heartbeat(load=2.0))
    events = client.receive_data(first + forged + out(server))
    assert events[0] == MessageReceived(m.Heartbeat(load=1.0))
    integrity_failure(events)
    assert len(events) == 2


@pytest.mark.parametrize("order", ["replayed", "reordered", "dropped", "another connection's"])
def test_genuine_frames_out_of_place_are_refused(order):
    """A genuine frame delivered twice, out of order, after a dropped one, or taken from
    another connection with the same secret fails the connection: each frame's MAC covers
    its sequence number under keys drawn from this connection's nonces."""
    server, client = opened()
    other = opened()[0]
    sent = []
    for load in (1.0, 2.0):
        server.send(m.Heartbeat(load=load))
        sent.append(out(server))
    other.send(m.Heartbeat(load=9.0))
    a, b = sent
    stream = {
        "replayed": [a, a],
        "reordered": [b, a],
        "dropped": [b],
        "another connection's": [out(other)],
    }[order]
    events: list = []
    for data in stream:
        events += client.receive_data(data)
    delivered = [e.message.load for e in events if type(e) is MessageReceived]
    assert delivered == ([1.0] if order == "replayed" else [])
    integrity_failure(events)


def test_the_welcome_is_sealed_so_the_path_cannot_alter_it():
    """The welcome (frame limit, heartbeat) travels under the server's MAC: one written on
    the path in its place fails the client's handshake instead of opening it."""
    server, client = pair()
    server.receive_data(out(client))
    client.receive_data(out(server))
    server.receive_data(out(client))
    assert out(server)  # the genuine welcome, held back
    forged = frame({"t": "welcome", "session": "abc", "max_frame": 1 << 30, "heartbeat": 3600.0})
    integrity_failure(client.receive_data(forged))
    assert client.state is State.CLOSED and client.peer_heartbeat is None


@pytest.mark.parametrize("tampered", [False, True])
def test_a_large_frame_read_into_its_buffer_is_checked_in_place(tampered):
    """A large frame read straight into the decoder's buffer (``received_into``) is checked
    there, its payload a view of that buffer: delivered intact, or refused if one byte of
    its MiB changed."""
    server, client = opened()
    payload = os.urandom(1 << 20)
    server.send(m.JobLoad(job=1, payload=payload))
    data = bytearray(out(server))
    if tampered:
        data[len(data) // 2] ^= 1
    assert client.receive_data(bytes(data[:4096])) == [] and client.decoder.gathering
    view = client.decoder.read_buffer()
    view[: len(data) - 4096] = data[4096:]
    events = client.received_into(len(data) - 4096)
    if tampered:
        integrity_failure(events)
        return
    ((_, msg),) = [(type(e), e.message) for e in events]
    assert isinstance(msg.payload, memoryview) and msg.payload == payload


def test_the_one_message_fast_path_checks_the_mac_and_keeps_count():
    """``receive_message`` (one whole small frame) checks the MAC too; a frame it leaves to
    ``receive_data`` (an unknown type, a bad MAC) is read there under the same number."""
    server, client = opened()
    server.send(m.Heartbeat(load=1.0))
    assert client.receive_message(out(server)) == m.Heartbeat(load=1.0)
    unknown = frame({"t": "from_v9", "id": 5}, sealer=server)
    assert client.receive_message(unknown) is None
    assert client.receive_data(unknown) == [] and frames(out(client), sealed=True)
    server.send(m.Heartbeat(load=2.0))
    bad = bytearray(out(server))
    bad[-1] ^= 1
    assert client.receive_message(bytes(bad)) is None
    integrity_failure(client.receive_data(bytes(bad)))


# --------------------------------------------------------------------------- the spec's exact inputs


def test_reference_client_written_from_the_spec_authenticates():
    """A client built only from protocol/README.md (msgpack + struct + hmac) gets through.

    This pins the HMAC inputs the README documents: the labels, SHA-256 of the raw hello and
    challenge header bytes as they travelled, and the server's raw nonce.
    """
    server = Connection("server", KEY, max_frame=123_456, heartbeat=2.5)
    client_nonce = bytes(range(32))
    hello_header = msgpack.packb(
        {
            "t": "hello",
            "version": PROTOCOL_VERSION,
            "role": "console",
            "nonce": client_nonce,
        },
        use_bin_type=True,
    )
    assert (
        server.receive_data(
            struct.pack(">II", 4 + len(hello_header), len(hello_header)) + hello_header
        )
        == []
    )
    (challenge_frame,) = FrameDecoder().feed(out(server))
    challenge = msgpack.unpackb(challenge_frame.header, raw=False)
    assert challenge["t"] == "challenge" and challenge_frame.payload == b""
    expected = hmac256(KEY, b"remap/1 server" + sha256(hello_header) + challenge["nonce"])
    assert hmac.compare_digest(challenge["proof"], expected)
    proof = hmac256(KEY, b"remap/1 client" + sha256(hello_header) + sha256(challenge_frame.header))
    auth_header = msgpack.packb({"t": "auth", "proof": proof}, use_bin_type=True)
    transcript = sha256(hello_header) + sha256(challenge_frame.header)
    to_client = hmac256(KEY, b"remap/1 server frames" + transcript)
    to_server = hmac256(KEY, b"remap/1 client frames" + transcript)
    about = msgpack.packb({"t": "about", "python": PY, "cloudpickle": CP}, use_bin_type=True)
    events = server.receive_data(
        struct.pack(">II", 4 + len(auth_header), len(auth_header))
        + auth_header
        + spec_sealed(to_server, 0, about)
    )
    assert [type(e) for e in events] == [Authenticated]
    (welcome_frame,) = FrameDecoder().feed(out(server))
    welcome_header = welcome_frame.header[32:]
    assert welcome_frame.header[:32] == hmac256(
        to_client, struct.pack(">QI", 0, len(welcome_header)) + welcome_header
    )
    assert msgpack.unpackb(welcome_header, raw=False) == {
        "t": "welcome",
        "session": server.session,
        "max_frame": 123_456,
        "heartbeat": 2.5,
    }
    for seq in (1, 2):
        beat = msgpack.packb({"t": "heartbeat", "load": float(seq)}, use_bin_type=True)
        got = server.receive_data(spec_sealed(to_server, seq, beat))
        assert got == [MessageReceived(m.Heartbeat(load=float(seq)))]


def test_reference_server_written_from_the_spec_is_accepted_by_a_node():
    """A server built only from the spec is accepted by a real client Connection."""
    client = Connection("node", KEY)
    client.initiate()
    (hello_frame,) = FrameDecoder().feed(out(client))
    hello = msgpack.unpackb(hello_frame.header, raw=False)
    assert hello["role"] == "node" and len(hello["nonce"]) == 32
    server_nonce = b"\x42" * 32
    proof = hmac256(KEY, b"remap/1 server" + sha256(hello_frame.header) + server_nonce)
    challenge_header = msgpack.packb(
        {
            "t": "challenge",
            "version": PROTOCOL_VERSION,
            "nonce": server_nonce,
            "proof": proof,
        },
        use_bin_type=True,
    )
    assert client.receive_data(b"".join(bytes(p) for p in encode_frame(challenge_header))) == []
    auth_frame, about_frame = FrameDecoder().feed(out(client))
    auth = msgpack.unpackb(auth_frame.header, raw=False)
    assert auth["proof"] == hmac256(
        KEY, b"remap/1 client" + sha256(hello_frame.header) + sha256(challenge_header)
    )
    transcript = sha256(hello_frame.header) + sha256(challenge_header)
    to_client = hmac256(KEY, b"remap/1 server frames" + transcript)
    to_server = hmac256(KEY, b"remap/1 client frames" + transcript)
    about = msgpack.packb({"t": "about", "python": PY, "cloudpickle": CP}, use_bin_type=True)
    assert about_frame.header + about_frame.payload == spec_sealed(to_server, 0, about)[8:]
    welcome = {"t": "welcome", "session": "abc", "max_frame": 1 << 20, "heartbeat": 2.0}
    events = client.receive_data(
        spec_sealed(to_client, 0, msgpack.packb(welcome, use_bin_type=True))
    )
    assert events == [Authenticated("server", "abc")]
    client.send(m.TaskResult(task=9, sizes=[3], payload=b"xyz"))
    assert out(client) == spec_sealed(
        to_server, 1, msgpack.packb({"t": "result", "task": 9, "sizes": [3]}), b"xyz"
    )
