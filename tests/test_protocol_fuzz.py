"""Property tests: arbitrary bytes never crash the protocol, and nothing is unpickled before auth.

Hypothesis feeds random bytes, random msgpack maps and mutated handshakes to the frame decoder,
the message decoder and both ends of a Connection. The only exceptions or failures allowed are
remap's own (RemapError); a peer never gets a MessageReceived before it authenticated; and a
pickle whose loading would create a file never creates it. Pure tests: no reactor, no sockets.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
from pathlib import Path

import cloudpickle
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import Authenticated, Connection, ConnectionFailed, MessageReceived, State
from protocol import messages as m
from protocol.errors import RemapError, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame

KEY = b"fuzz secret"
WRONG = b"some other secret"
#: no example database: the tests must not write into the work tree, and CI starts fresh anyway
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ_FEW = settings(FUZZ, max_examples=150)
CATALOGUE = m.message_types()
#: network messages that carry a payload (the core pipe's never reach a network connection)
PAYLOAD_TYPES = sorted(
    name
    for name, cls in CATALOGUE.items()
    if "payload" in cls.__dataclass_fields__ and cls.CHANNEL != "pipe"
)


# --------------------------------------------------------------------------- tripwires


class Plant:
    """Unpickling this object calls open(path, "w"): the file appearing means something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(path: Path) -> bytes:
    return pickle.dumps(Plant(path))


@contextlib.contextmanager
def unpickling_forbidden():
    """Replace every unpickling entry point with one that records the call and raises."""
    calls: list[str] = []

    def trip(name: str):
        def tripped(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called before authentication")

        return tripped

    targets = [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (cloudpickle, "loads"),
        (cloudpickle, "load"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets if hasattr(mod, name)]
    try:
        for mod, name, _ in saved:
            setattr(mod, name, trip(f"{mod.__name__}.{name}"))
        yield calls
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tripwire") / "unpickled-before-auth"
    yield path
    assert not path.exists(), "a pre-auth pickle was unpickled"


def test_tripwire_pickle_really_creates_the_file(tmp_path):
    """The planted pickle does create its file when unpickled (so its absence elsewhere means something)."""
    path = tmp_path / "proof"
    pickle.loads(evil_pickle(path)).close()
    assert path.exists()


def test_protocol_package_never_imports_pickle():
    """No module of protocol/ imports pickle at all (it moves payloads as opaque bytes)."""
    root = Path(__file__).resolve().parent.parent / "protocol"
    for source in root.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "import pickle" not in text and "from pickle" not in text, source
        assert "cloudpickle.loads" not in text and "pickle.loads" not in text, source


# --------------------------------------------------------------------------- helpers


def out(conn: Connection) -> bytes:
    return b"".join(bytes(p) for p in conn.data_to_send())


def raw_frame(header: dict, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return b"".join(bytes(p) for p in encode_frame(packed, payload))


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def check_events(events: list, *, may_authenticate: bool = False) -> None:
    """Events are of the three kinds; failures carry RemapErrors; nothing before authentication."""
    authenticated = False
    for i, event in enumerate(events):
        assert isinstance(event, (Authenticated, MessageReceived, ConnectionFailed)), event
        if isinstance(event, ConnectionFailed):
            assert isinstance(event.error, RemapError), event.error
            assert i == len(events) - 1, "events after a failure"
        elif isinstance(event, Authenticated):
            assert may_authenticate, "authenticated without the secret"
            authenticated = True
        else:
            assert authenticated, "a message was delivered before authentication"


def feed_all(conn: Connection, pieces: list[bytes]) -> list:
    events: list = []
    for piece in pieces:
        events += conn.receive_data(piece)
    return events


def genuine_transcript():
    """A complete, correct handshake: (client bytes per step, server bytes per step)."""
    server = Connection("server", KEY)
    client = Connection("node", KEY)
    client.initiate()
    hello = out(client)
    server.receive_data(hello)
    challenge = out(server)
    client.receive_data(challenge)
    auth = out(client)
    server.receive_data(auth)
    welcome = out(server)
    return hello, challenge, auth, welcome


# --------------------------------------------------------------------------- strategies

msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    sorted({f for cls in CATALOGUE.values() for f in cls.__dataclass_fields__} | {"t", "id", "x"})
)


@st.composite
def headers(draw) -> dict:
    """Maps that look like messages: a real or bogus type, real or bogus fields, any values."""
    header = draw(
        st.dictionaries(st.one_of(field_names, st.text(max_size=6)), msgpack_values, max_size=8)
    )
    if draw(st.booleans()):
        header["t"] = draw(st.one_of(st.sampled_from(sorted(CATALOGUE)), st.text(max_size=10)))
    return header


@st.composite
def frames_bytes(draw) -> bytes:
    """Well-framed bytes carrying arbitrary headers and payloads, or raw garbage."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        length = draw(st.integers(0, 2**32 - 1))
        return struct.pack(">I", length) + draw(st.binary(max_size=20))
    header = draw(headers())
    payload = draw(st.binary(max_size=50))
    return raw_frame(header, payload)


# --------------------------------------------------------------------------- decoders


@FUZZ
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    limit=st.sampled_from([64, 8192, DEFAULT_MAX_FRAME]),
)
def test_frame_decoder_only_raises_protocol_errors(data, cuts, limit):
    """Arbitrary bytes in arbitrary reads: frames or RemoteProtocolError, and chunking never matters."""
    whole = FrameDecoder(limit)
    try:
        expected = whole.feed(data)
        whole_error = None
    except RemoteProtocolError as exc:
        expected, whole_error = None, type(exc)
    decoder = FrameDecoder(limit)
    got: list[Frame] = []
    error = None
    for piece in chunks(data, cuts):
        try:
            got += decoder.feed(piece)
        except RemoteProtocolError as exc:
            error = type(exc)
            break
    assert error == whole_error
    if expected is not None:
        assert got == expected


@FUZZ
@given(header=st.binary(max_size=300), payload=st.binary(max_size=30), preauth=st.booleans())
def test_message_decoder_on_arbitrary_bytes(header, payload, preauth):
    """Any header bytes give a Message or a RemoteProtocolError, never another exception."""
    try:
        msg = m.decode(header, payload, preauth=preauth)
    except RemoteProtocolError:
        return
    assert isinstance(msg, m.Message)


@FUZZ
@given(header=headers(), payload=st.binary(max_size=30), preauth=st.booleans())
def test_message_decoder_on_arbitrary_maps(header, payload, preauth):
    """Message-shaped maps with any values: a valid Message that re-encodes identically, or RemoteProtocolError."""
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        assume(False)
    try:
        msg = m.decode(packed, payload, preauth=preauth)
    except RemoteProtocolError:
        return
    assert not preauth or type(msg).PREAUTH
    again = m.decode(*m.encode(msg))
    assert again == msg or _has_nan(msg)


def _has_nan(msg: m.Message) -> bool:
    return any(isinstance(v, float) and v != v for v in vars_of(msg))


def vars_of(msg: m.Message) -> list:
    return [getattr(msg, f) for f in msg.__dataclass_fields__]


# --------------------------------------------------------------------------- connections


@FUZZ
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    role=st.sampled_from(["server", "node", "console"]),
)
def test_connection_on_arbitrary_bytes(data, cuts, role):
    """Random bytes to either end: only library failures, never authentication, never a message."""
    conn = Connection(role, KEY)
    if role != "server":
        conn.initiate()
        out(conn)
    with unpickling_forbidden() as calls:
        events = feed_all(conn, chunks(data, cuts))
    check_events(events)
    assert calls == []
    if any(isinstance(e, ConnectionFailed) for e in events):
        assert conn.state is State.CLOSED


@FUZZ
@given(
    parts=st.lists(frames_bytes(), min_size=1, max_size=5),
    role=st.sampled_from(["server", "node"]),
    after_hello=st.booleans(),
)
def test_connection_on_message_shaped_frames(parts, role, after_hello):
    """Well-framed random messages, optionally after a genuine hello, never authenticate or deliver."""
    conn = Connection(role, KEY)
    if role == "server":
        if after_hello:
            hello, *_ = genuine_transcript()
            assert conn.receive_data(hello) == []
    else:
        conn.initiate()
    out(conn)
    with unpickling_forbidden() as calls:
        events = feed_all(conn, parts)
    check_events(events)
    assert calls == []


@FUZZ
@given(
    step=st.integers(0, 3),
    position=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    mode=st.sampled_from(["flip", "truncate", "insert", "drop"]),
)
def test_mutated_handshakes_fail_cleanly(step, position, byte, mode):
    """A genuine handshake with one byte changed, dropped, added, or cut short never gets through.

    The reader of altered hello, challenge or auth bytes fails with a library error or waits; it
    never authenticates, since the proofs cover those exact header bytes. The welcome carries no
    proof (the client already checked the server's in the challenge), so a client may accept an
    altered one: that is the documented limit of the handshake without TLS.
    """
    hello, challenge, auth, welcome = genuine_transcript()
    original = [hello, challenge, auth, welcome][step]
    pos = position % len(original)
    if mode == "flip":
        mutated = original[:pos] + bytes([original[pos] ^ (byte or 1)]) + original[pos + 1 :]
    elif mode == "truncate":
        mutated = original[:pos]
    elif mode == "insert":
        mutated = original[:pos] + bytes([byte]) + original[pos:]
    else:
        mutated = original[:pos] + original[pos + 1 :]
    assume(mutated != original)
    server = Connection("server", KEY)
    client = Connection("node", KEY)
    client.initiate()
    steps = [out(client)]
    s_events = server.receive_data(mutated if step == 0 else steps[0])
    c_events: list = []
    s_out = out(server)
    if step == 1:
        s_out = mutated
    c_events += client.receive_data(s_out)
    c_out = out(client)
    if step == 2:
        c_out = mutated
    s_events += server.receive_data(c_out)
    s_out = out(server)
    if step == 3:
        s_out = mutated
    c_events += client.receive_data(s_out)
    check_events(s_events, may_authenticate=step == 3)
    check_events(c_events, may_authenticate=step == 3)


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_open_connection_on_arbitrary_bytes(data, cuts):
    """After authentication random bytes give messages or one library failure, nothing else."""
    server = Connection("server", KEY)
    client = Connection("console", KEY)
    client.initiate()
    server.receive_data(out(client))
    client.receive_data(out(server))
    server.receive_data(out(client))
    out(server)
    assert server.state is State.OPEN
    events = feed_all(server, chunks(data, cuts))
    for i, event in enumerate(events):
        assert isinstance(event, (MessageReceived, ConnectionFailed))
        if isinstance(event, ConnectionFailed):
            assert isinstance(event.error, RemapError) and i == len(events) - 1


# --------------------------------------------------------------------------- no unpickling before auth


def evil_frames(path: Path) -> list[bytes]:
    """The planted pickle as the payload of every message that has one, plus handshake-typed frames."""
    blob = evil_pickle(path)
    found: list[bytes] = []
    for type_name in PAYLOAD_TYPES:
        fields = {
            "job_load": {"job": 1},
            "task": {"task": 1, "job": 1, "sizes": [len(blob)]},
            "result": {"task": 1, "sizes": [len(blob)]},
            "submit": {"id": 1, "name": "evil", "mode": "reduce"},
            "args": {"job": 1, "start": 0, "sizes": [len(blob)]},
            "results": {"job": 1, "indices": [0], "sizes": [len(blob)]},
            "drive": {"id": 1, "kind": "mapreduce", "name": "evil", "job": "{}"},
        }[type_name]
        found.append(raw_frame({"t": type_name, **fields}, blob))
    found.append(
        raw_frame({"t": "welcome", "session": "s", "max_frame": 1 << 20, "heartbeat": 1.0}, blob)
    )
    found.append(raw_frame({"t": "auth", "proof": b"p" * 32}, blob))
    found.append(raw_frame({"t": "error", "code": "auth", "message": "x"}, blob))
    found.append(b"".join(bytes(p) for p in encode_frame(b"", blob)))
    found.append(
        b"".join(bytes(p) for p in encode_frame(blob, b""))
    )  # the pickle as the header itself
    return found


def test_evil_payload_types_cover_every_payload_message():
    """Every message type that carries a payload is exercised by the pre-auth pickle tests."""
    assert set(PAYLOAD_TYPES) == {
        "job_load",
        "task",
        "result",
        "submit",
        "args",
        "results",
        "drive",
    }


@pytest.mark.parametrize("role", ["server", "node", "console"])
def test_planted_pickle_before_auth_is_never_unpickled(role, marker):
    """Each planted frame, alone, to a fresh server or client Connection: refused, file never created."""
    for data in evil_frames(marker):
        conn = Connection(role, KEY)
        if role != "server":
            conn.initiate()
            out(conn)
        with unpickling_forbidden() as calls:
            events = conn.receive_data(data)
        check_events(events)
        assert isinstance(events[-1], ConnectionFailed), events
        assert calls == []
        assert not marker.exists()


def test_planted_pickle_behind_a_wrong_key_challenge_is_never_delivered(marker):
    """A server without the secret sends its challenge then work at once: the node delivers none of it."""
    fake = Connection("server", WRONG)
    client = Connection("node", KEY)
    client.initiate()
    fake.receive_data(out(client))
    data = out(fake) + b"".join(evil_frames(marker))
    with unpickling_forbidden() as calls:
        events = client.receive_data(data)
    check_events(events)
    assert isinstance(events[-1], ConnectionFailed)
    assert calls == [] and not marker.exists()


def test_planted_pickle_behind_a_wrong_auth_is_never_delivered(marker):
    """A client with a wrong proof followed by work in the same read: the server delivers none of it."""
    hello, challenge, _auth, _welcome = genuine_transcript()
    server = Connection("server", KEY)
    server.receive_data(hello)
    out(server)
    forged = raw_frame({"t": "auth", "proof": b"\x00" * 32})
    with unpickling_forbidden() as calls:
        events = server.receive_data(forged + b"".join(evil_frames(marker)))
    check_events(events)
    assert calls == [] and not marker.exists()


@FUZZ_FEW
@given(
    role=st.sampled_from(["server", "node"]),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    picks=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    insert_at=st.integers(0, 3),
    secret_ok=st.booleans(),
)
def test_planted_pickles_spliced_into_handshakes(role, cuts, picks, insert_at, secret_ok, marker):
    """Planted frames spliced anywhere into a real handshake stream (right or wrong key) never
    come out as messages before authentication, and are never unpickled."""
    evil = evil_frames(marker)
    inject = b"".join(evil[p % len(evil)] for p in picks)
    server = Connection("server", KEY if secret_ok else WRONG)
    client = Connection("node", KEY)
    client.initiate()
    if role == "server":
        # the stream the server reads: hello, [inject], auth
        hello = out(client)
        stream = [hello]
        server_events = server.receive_data(hello)
        client.receive_data(out(server))
        auth = out(client)
        stream.append(auth)
        stream.insert(min(insert_at, 1), inject)
        fresh = Connection("server", KEY if secret_ok else WRONG)
        with unpickling_forbidden() as calls:
            events = feed_all(fresh, chunks(b"".join(stream), cuts))
        del server_events
    else:
        server.receive_data(out(client))
        challenge = out(server)
        stream = [challenge, inject] if insert_at else [inject, challenge]
        with unpickling_forbidden() as calls:
            events = feed_all(client, chunks(b"".join(stream), cuts))
    check_events(events, may_authenticate=False)
    assert calls == [] and not marker.exists()


def test_same_frames_after_auth_are_delivered_but_still_not_unpickled(marker):
    """Contrast: after a genuine handshake the payload frames, sealed by the genuine server, do
    come through, as opaque bytes.

    So the refusals above are the authentication gate at work, not a decoder that rejects
    these frames anyway; and the protocol layer never unpickles even once authenticated.
    """
    server = Connection("server", KEY)
    client = Connection("node", KEY)
    client.initiate()
    server.receive_data(out(client))
    client.receive_data(out(server))
    server.receive_data(out(client))
    client.receive_data(out(server))
    assert client.state is State.OPEN
    blob = evil_pickle(marker)
    delivered = 0
    with unpickling_forbidden() as calls:
        for data in evil_frames(marker)[: len(PAYLOAD_TYPES)]:
            (plain,) = FrameDecoder(DEFAULT_MAX_FRAME).feed(data)  # sealed by the server
            sealed = encode_frame(server.seal(plain.header, plain.payload), plain.payload)
            events = client.receive_data(b"".join(bytes(p) for p in sealed))
            assert [type(e) for e in events] == [MessageReceived], events
            assert events[0].message.payload == blob
            delivered += 1
    assert delivered == len(PAYLOAD_TYPES)
    assert calls == [] and not marker.exists()
