"""What one message costs at each hop of the server + node path, counted, never timed.

A single call crosses six codecs (console, server twice, node twice, core) and four TCP hops;
each Python function entered on the way is CPU on the call's critical path. These tests count
the functions (``sys.setprofile``: Python calls and calls into C) a message's encode and decode
enter, so a change that brings back a per-field loop fails here rather than in a benchmark.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from protocol import messages as m


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic collector off while calls are counted: a collection that falls in the counted
    call runs ``gc.callbacks`` (hypothesis registers one), Python calls that depend on the
    garbage earlier tests left, in whatever order they ran (pytest-randomly, seed 9999)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def entered(fn: Callable[[], Any]) -> tuple[int, int]:
    """(Python functions, C functions) ``fn`` enters, itself excluded."""
    fn()  # warm: a first call may build per-thread state
    counts = {"call": 0, "c_call": 0}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in counts:
            counts[event] += 1

    with _no_collection():
        sys.setprofile(profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
    # the profile sees fn's own call and the call of setprofile(None)
    return counts["call"] - 1, counts["c_call"] - 1


HOT = {
    "args": m.Args(job=3, start=5, sizes=[20], payload=b"x" * 20),
    "task": m.Task(task=3, job=5, sizes=[20], payload=b"x" * 20),
    "result": m.TaskResult(task=5, sizes=[20], elapsed=0.001, payload=b"x" * 20),
    "results": m.Results.of(3, range(5, 6), sizes=[20], payload=b"x" * 20),
}


@pytest.mark.parametrize("name", sorted(HOT))
def test_decoding_a_hot_message_checks_its_fields_inline(name: str) -> None:
    """Every field is checked in one generated function: no check function per field, no
    per-field ``__setattr__`` of a frozen dataclass (the old loop entered ~12 functions)."""
    msg = HOT[name]
    header, payload = m.encode(msg)
    channel = msg.CHANNEL if msg.CHANNEL != "both" else "pipe"
    assert m.decode(header, payload, channel=channel) == msg
    python, c = entered(lambda: m.decode(header, payload, channel=channel))
    # decode, its generated decoder and ``_int_list`` for ``sizes``
    assert python <= 3, python
    assert c <= 8 + len(m.message_types()[name].__dataclass_fields__), c


@pytest.mark.parametrize("name", sorted(HOT))
def test_encoding_a_hot_message_builds_its_header_in_one_expression(name: str) -> None:
    """No ``getattr`` per field, no msgpack ``Packer`` built per message."""
    msg = HOT[name]
    python, c = entered(lambda: m.encode(msg))
    assert python <= 2, python  # encode and its generated encoder
    assert c <= 4, c  # the encoder lookup, the thread's packer, pack


def test_generated_codecs_write_and_read_the_same_bytes_as_the_field_table() -> None:
    """The header is the map of ``t`` and every field not at its default, in declaration order
    (the spec's example bytes depend on it), for every message in the catalogue; decoding it
    gives the message back, the left-out fields at their defaults."""
    import dataclasses

    import msgpack

    from tests.test_messages import EXAMPLES

    def at_default(f: dataclasses.Field, value: Any) -> bool:
        if f.default_factory is not dataclasses.MISSING:
            return value == f.default_factory()
        return f.default is not dataclasses.MISSING and value == f.default

    for msg in EXAMPLES.values():
        header, payload = m.encode(msg)
        fields = [f for f in dataclasses.fields(msg) if f.name != "payload"]
        kept = {
            f.name: getattr(msg, f.name) for f in fields if not at_default(f, getattr(msg, f.name))
        }
        assert header == msgpack.packb({"t": msg.TYPE, **kept}, use_bin_type=True)
        channel = "pipe" if msg.CHANNEL == "pipe" else "wire"
        preauth = msg.PREAUTH
        assert m.decode(header, payload, channel=channel, preauth=preauth) == msg


def test_a_hot_message_leaves_its_fields_at_their_defaults_out() -> None:
    """A single call's result carried five fields at their defaults (no errors, no output, not
    partial, not packed, not a part); each was packed, then unpacked, interned and checked on
    the other side. Left out, they decode to the same message."""
    import msgpack

    result = HOT["result"]
    header, payload = m.encode(result)
    assert msgpack.unpackb(header) == {"t": "result", "task": 5, "sizes": [20], "elapsed": 0.001}
    assert m.decode(header, payload, channel="pipe") == result
    noisy = m.TaskResult(task=5, sizes=[20], errors=[[0, "E", "m", ""]], output="x", part=1)
    header, payload = m.encode(noisy)
    assert set(msgpack.unpackb(header)) == {"t", "task", "sizes", "errors", "output", "part"}
    assert m.decode(header, payload, channel="pipe") == noisy


# ----------------------------------------------------------------------------- large frames


def _receive(decoder: Any, payload: bytes) -> Any:
    """A large frame as a socket delivers it: its first bytes, then the rest."""
    from protocol.framing import encode_frame

    data = b"".join(encode_frame(b"\x80", payload))
    assert decoder.feed(data[:100]) == []
    (frame,) = decoder.feed(data[100:])
    return frame


def test_a_large_frame_reuses_the_buffer_of_one_nobody_holds(monkeypatch) -> None:
    """A MiB frame is received into the buffer of an earlier one once all views of that one are
    gone: no new allocation (a memset of the MiB, and 256 page faults where the allocator maps
    fresh memory), and the new frame's bytes are exactly its own."""
    from protocol import framing

    pool = framing.BufferPool()
    monkeypatch.setattr(framing, "POOL", pool)
    decoder = framing.FrameDecoder(max_frame=1 << 30)
    first, second = b"a" * (1 << 20), b"b" * ((1 << 20) - 3)
    frame = _receive(decoder, first)
    assert frame.payload == first and pool.made == 1
    held = frame.payload
    del frame
    frame2 = _receive(decoder, second)  # the first is still held: a new buffer
    assert pool.made == 2 and pool.reused == 0
    assert frame2.payload == second and held == first
    del held, frame2
    frame3 = _receive(decoder, first)
    assert pool.reused == 1 and pool.made == 2
    assert frame3.payload == first


def test_the_buffer_pool_refers_to_a_bounded_number_of_bytes() -> None:
    """Buffers in use are never taken back; free ones beyond the limit are forgotten."""
    from protocol.framing import BufferPool

    pool = BufferPool(limit=3 << 20)
    views = [pool.take(1 << 20) for _ in range(5)]  # 5 MiB in use: the pool refers to 3
    assert pool.held() == 3 << 20 and pool.made == 5
    for i, view in enumerate(views):
        view[:1] = bytes([i])
    del views[:4]  # the 3 pooled buffers are free (the 4th and 5th were not pooled)
    again = pool.take(1 << 20)
    assert pool.reused == 1 and again[0] in (0, 1, 2)
    assert views[0][0] == 4  # the view still held is never handed out
    big = pool.take(2 << 20)  # makes room by forgetting free buffers
    assert pool.held() <= 3 << 20
    assert len(big) == 2 << 20


# ----------------------------------------------------------------------------- wake-ups


@pytest.mark.slow
def test_server_and_node_run_on_the_lean_reactor() -> None:
    """The server's and node's global reactor hands a ready socket to its handler without
    Twisted's legacy log context (~9 Python calls per event; each runs twice per call): what
    their entry points import leaves the reactor uninstalled until ``react_main`` installs it."""
    import subprocess

    code = (
        "import remap.server.main, remap.node.main\n"
        "from remap.entry import install_lean_reactor\n"
        "print(install_lean_reactor())\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["True", "LeanEPollReactor"]


def _counted(fn: Callable[[], Any]) -> list[str]:
    """The Python functions ``fn`` enters (``module:function``), itself excluded."""
    names: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            names.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}")

    with _no_collection():
        sys.setprofile(profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
    return names[1:]


def test_a_small_message_from_a_socket_to_the_handler_in_a_few_calls() -> None:
    """A server's read of one small message over plain TCP: the socket's bytes go to the
    protocol without Twisted's doRead and its wrappers, the connection's replies are flushed
    only when there are some, and the read budget is asked only while a large frame comes."""
    from protocol import Connection
    from protocol.framing import DEFAULT_MAX_FRAME
    from remap.wire import PeerProtocol, ReadBudget
    from tests.test_large_frames import KEY, FakeReactor, Recorder, SocketTransport, _pump
    from tests.test_large_frames import _tcp_pair as tcp_pair

    a, b = tcp_pair()
    try:
        peers = {}
        for role, sock, budget in (("server", a, ReadBudget(1 << 30)), ("console", b, None)):
            sock.setblocking(False)
            conn = Connection(role, KEY, max_frame=DEFAULT_MAX_FRAME)
            recorder = Recorder()
            from twisted.internet.task import Clock

            proto = PeerProtocol(conn, recorder, Clock(), budget=budget)
            transport = SocketTransport(sock, proto, FakeReactor())
            transport.connected = 1
            proto.makeConnection(transport)
            peers[role] = (proto, transport, recorder)
        (server, st, seen), (console, ct, _) = peers["server"], peers["console"]
        _pump(st, ct, until=lambda: console.open and server.open)
        import select

        # the process learns a header shape's decoder the first time it decodes one (five
        # calls more): an ``args`` read once here, not by whichever test ran before this one
        msg = m.Args(job=1, start=0, sizes=[3], payload=b"abc")
        console.send(msg)
        select.select([a], [], [], 5)
        st.doRead()
        console.send(msg)
        select.select([a], [], [], 5)
        calls = _counted(st.doRead)
        assert seen.events[-2:] == [("message", msg)] * 2
        assert "tcp.py:doRead" not in calls and "tcp.py:_dataReceived" not in calls
        assert "wire.py:_account" not in calls and "connection.py:data_to_send" not in calls
        # a read that is one whole frame never enters the decoder's buffer, nor a list of events
        assert "framing.py:add" not in calls and "framing.py:next_frame" not in calls
        assert "connection.py:_events" not in calls and "wire.py:_closing" not in calls
        assert "wire.py:_handle" not in calls and "connection.py:_open_frame" not in calls
        assert "connection.py:receive_data" not in calls
        # the decoder's buffer check, dataReceived, the clock, receive_message, whole, the MAC
        # check (_unseal, _mac, and its HMAC's copy, update and digest), decode and its
        # decoder, the handler
        assert len(calls) <= 15, calls
    finally:
        a.close()
        b.close()


def test_a_small_message_leaves_an_idle_socket_as_one_buffer() -> None:
    """A small message on an open plain TCP connection with nothing waiting goes to the socket
    in the sending call as one bytes object: not through the connection's queue, a list of
    parts, ``_flush`` and ``write_now`` (three of the four wrappers a send went through), and
    the peer reads it whole."""
    import select

    from tests.test_large_frames import Recorder, _peer, _pump
    from tests.test_large_frames import _tcp_pair as tcp_pair

    a, b = tcp_pair()
    try:
        seen = Recorder()
        server, st = _peer("server", a, seen)
        console, ct = _peer("console", b, Recorder())
        _pump(st, ct, until=lambda: console.open and server.open)
        msg = m.Args(job=1, start=0, sizes=[3], payload=b"abc")
        calls = _counted(lambda: console.send(msg))
        assert "connection.py:_queue" not in calls and "wire.py:_flush" not in calls, calls
        assert "wire.py:write_now" not in calls and "framing.py:encode_frame" not in calls
        # send, encode and its generated encoder, send_encoded, _write, the MAC (seal, _mac,
        # and its HMAC's copy, two updates and digest), small_frame
        assert len(calls) <= 13, calls
        assert not ct.dataBuffer and not ct._tempDataBuffer  # nothing left to Twisted
        select.select([a], [], [], 5)
        st.doRead()
        assert seen.events[-1] == ("message", msg)
    finally:
        a.close()
        b.close()


def test_small_messages_behind_large_ones_that_wait_keep_their_order() -> None:
    """A small message sent while a large one still waits for the socket queues behind it (its
    one buffer, not a write of its own that would overtake the rest)."""
    import os
    import select

    sockets: list[Any] = []
    try:
        console, ct, server, st, server_rec = _slow_reader(sockets)
        a = sockets[0]
        sent = []
        for i in range(6):
            payload = os.urandom(1 << 20) if i % 2 == 0 else f"small {i}".encode()
            console.send(m.Args(job=1, start=i, sizes=[len(payload)], payload=payload))
            sent.append(payload)
        assert console._sending is not None and console._sending.parts
        for _ in range(100_000):
            if len(server_rec.kinds()) >= len(sent) + 1:
                break
            ct.doWrite()
            if select.select([a], [], [], 0.01)[0]:
                st.doRead()
        got = [msg.payload for kind, msg in server_rec.events if kind == "message"]
        assert got == sent
    finally:
        for sock in sockets:
            sock.close()


def test_decoding_a_map_of_the_required_fields_looks_up_nothing_more() -> None:
    """A task (a console's arguments, a core's command) carries its required fields only: the
    decoder looks each of them up once and gives every optional field its default without a
    look-up (it looked up all seven of a task's fields); a missing or mistyped required field,
    and an unknown one, are still refused."""
    from protocol.errors import RemoteProtocolError

    msg = m.Task(task=3, job=5, sizes=[20], payload=b"x" * 20)
    header, payload = m.encode(msg)
    gets: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "get":
            gets.append("get")

    m.decode(header, payload)
    sys.setprofile(profile)
    try:
        decoded = m.decode(header, payload)
    finally:
        sys.setprofile(None)
    assert decoded == msg
    # the message type's decoder (one), then task, job and sizes
    assert len(gets) <= 4, gets
    import msgpack

    def header_of(**fields: Any) -> bytes:
        return msgpack.packb({"t": "task", **fields})

    with pytest.raises(RemoteProtocolError, match="missing field 'job'"):
        m.decode(header_of(task=3, sizes=[1]), b"x")
    with pytest.raises(RemoteProtocolError, match="task.job: bad value of type str"):
        m.decode(header_of(task=3, job="5", sizes=[1]), b"x")
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        m.decode(header_of(task=3, job=5, sizes=[1], nonsense=1), b"x")
    with pytest.raises(RemoteProtocolError, match="task.skip: bad value of type str"):
        m.decode(header_of(task=3, job=5, sizes=[1], skip="0"), b"x")
    assert m.decode(header_of(task=3, job=5, sizes=[1], skip=0, count=-1), b"x") == m.Task(
        task=3, job=5, sizes=[1], payload=b"x"
    )


def _slow_reader(sockets: list[Any]) -> tuple[Any, Any, Any, Any, Any]:
    """A console and a server over real loopback TCP, authenticated, the console's send buffer
    small (so MiB messages outrun the socket): (console, its transport, server, its transport,
    the server's recorder); ``sockets`` gets both sockets, to close."""
    import socket

    from tests.test_large_frames import Recorder, _peer, _pump
    from tests.test_large_frames import _tcp_pair as tcp_pair

    a, b = tcp_pair()
    sockets += [a, b]
    server_rec = Recorder()
    server, st = _peer("server", a, server_rec)
    console, ct = _peer("console", b, Recorder())
    _pump(st, ct, until=lambda: console.open and server.open)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    return console, ct, server, st, server_rec


def _args(console: Any, count: int) -> list[bytes]:
    """Send ``count`` MiB ``args`` messages; return their payloads."""
    import os

    payloads = [os.urandom(1 << 20) for _ in range(count)]
    for i, payload in enumerate(payloads):
        console.send(m.Args(job=1, start=i, sizes=[len(payload)], payload=payload))
    return payloads


def test_what_the_socket_cannot_take_waits_as_the_messages_own_buffers() -> None:
    """MiB messages faster than the peer reads: what the socket does not take at once waits as
    views of the messages' buffers and leaves by sendmsg as it drains, in order, never joined
    into a copy for Twisted's buffer (which then sent 128 KiB per turn, and took every message
    after it the same way)."""
    import select

    sockets: list[Any] = []
    try:
        console, ct, server, st, server_rec = _slow_reader(sockets)
        a = sockets[0]
        joined: list[int] = []
        write = ct.write
        ct.write = lambda data: (joined.append(len(data)), write(data))  # type: ignore[method-assign]
        payloads = _args(console, 6)
        for _ in range(100_000):
            if len(server_rec.kinds()) >= len(payloads) + 1:
                break
            ct.doWrite()
            if select.select([a], [], [], 0.01)[0]:
                st.doRead()
        got = [msg.payload for kind, msg in server_rec.events if kind == "message"]
        assert got == payloads
        assert not [n for n in joined if n >= 64 * 1024], joined
        assert console._sending is not None and not console._sending.parts
    finally:
        for sock in sockets:
            sock.close()


def test_closing_sends_what_waits_then_the_reason_then_closes() -> None:
    """A peer closed with messages still waiting for the socket: they leave first, in order,
    then the error frame saying why, and only then does the transport close."""
    import select

    from twisted.internet import main

    from remap.errors import RemoteProtocolError

    sockets: list[Any] = []
    try:
        console, ct, server, st, server_rec = _slow_reader(sockets)
        a = sockets[0]
        payloads = _args(console, 3)
        assert console._sending is not None and console._sending.parts
        console.close(RemoteProtocolError("going away"))
        assert ct.disconnecting
        closed = None
        for _ in range(100_000):
            if closed is None:
                closed = ct.doWrite()
            if select.select([a], [], [], 0.01)[0]:
                st.doRead()
            if closed is not None and len(server_rec.events) >= len(payloads) + 2:
                break
        assert closed is main.CONNECTION_DONE
        kinds = [(kind, type(msg).__name__) for kind, msg in server_rec.events[1:]]
        assert kinds == [("message", "Args")] * 3 + [("message", "Error")], kinds
        assert [msg.payload for _, msg in server_rec.events[1:4]] == payloads
    finally:
        for sock in sockets:
            sock.close()


def test_a_core_moves_along_its_table_without_a_call_per_move() -> None:
    """A core moves twice per call (idle → busy → idle): a legal move is one lookup in the
    table, no function; an illegal one still raises, naming the core."""
    from remap.node.cores import CoreLife, CoreProcess
    from remap.transitions import IllegalTransition

    core = CoreProcess(pool=None, index=3)  # type: ignore[arg-type]
    try:
        core.move(CoreLife.IDLE)
        assert _counted(lambda: core.move(CoreLife.BUSY)) == ["cores.py:move"]
        assert core.life is CoreLife.BUSY
        with pytest.raises(IllegalTransition, match="core 3: busy → starting"):
            core.move(CoreLife.STARTING)
    finally:
        core.shm.close()
        import os

        os.close(core.shm_fd)


def test_a_lost_connection_lets_go_of_what_never_left() -> None:
    """Messages still waiting when the connection is lost are dropped at once, so the frame
    buffers they view are free for the next frames (not pinned until garbage collection)."""
    from twisted.internet import error
    from twisted.python.failure import Failure

    sockets: list[Any] = []
    try:
        console, ct, *_ = _slow_reader(sockets)
        _args(console, 3)
        assert console._sending is not None and console._sending.parts
        console.connectionLost(Failure(error.ConnectionLost()))
        assert not console._sending.parts
    finally:
        for sock in sockets:
            sock.close()


def test_a_read_of_one_whole_frame_skips_the_buffer_and_keeps_every_check() -> None:
    """``whole`` takes a read that is exactly one small frame with nothing buffered; anything
    else (a part, two frames, bytes already waiting, a frame over the limit, a large frame)
    goes through the buffer as before, where the limits are enforced."""
    from protocol.errors import FrameTooLarge
    from protocol.framing import Frame, FrameDecoder, encode_frame

    one = b"".join(encode_frame(b"head", b"payload"))
    decoder = FrameDecoder(max_frame=1024)
    assert decoder.whole(one) == Frame(b"head", b"payload")
    assert decoder.buffered == 0
    assert decoder.whole(one[:5]) is None and decoder.whole(one + one) is None
    decoder.add(one[:5])  # a frame begun: the next read completes it, through the buffer
    assert decoder.whole(one) is None
    decoder.add(one[5:])
    assert decoder.next_frame() == Frame(b"head", b"payload")
    assert decoder.next_frame() is None
    assert decoder.whole(one) == Frame(b"head", b"payload")  # consumed: whole reads again
    big = b"".join(encode_frame(b"h", b"x" * 2000))
    assert decoder.whole(big) is None
    with pytest.raises(FrameTooLarge):
        decoder.feed(big)


def test_a_whole_frame_read_gives_the_same_events_as_a_split_one() -> None:
    """An open connection's read of one whole message: the same message event; an unknown
    type is answered and the connection stays open; garbage fails the connection, as when the
    frame came in pieces."""
    from protocol import ConnectionFailed, MessageReceived
    from protocol.framing import encode_frame
    from tests.test_handshake import pair, run_handshake

    server, console = pair("console")
    run_handshake(server, console)
    msg = m.Args(job=3, start=5, sizes=[20], payload=b"x" * 20)

    def sealed(header: bytes, payload: bytes = b"") -> bytes:
        return b"".join(encode_frame(console.seal(header, payload), payload))

    wire = sealed(*m.encode(msg))
    assert server.receive_data(wire) == [MessageReceived(msg)]
    wire = sealed(*m.encode(msg))
    split = server.receive_data(wire[:7]) + server.receive_data(wire[7:])
    assert split == [MessageReceived(msg)]
    import msgpack

    # sealed in the order the server reads them (each MAC covers its place in the stream)
    wire, unknown, garbage = (
        sealed(*m.encode(msg)),
        sealed(msgpack.packb({"t": "x"})),
        sealed(b"\xc1"),
    )
    # the one-message read (PeerProtocol's first try) takes what decodes, nothing else: the
    # unknown type and the garbage below are left to receive_data, which answers them
    assert server.receive_message(wire) == msg
    assert server.receive_message(unknown) is None and not server.outgoing
    wire = sealed(*m.encode(msg))  # (for after the close below)
    assert server.receive_message(wire[:7]) is None
    assert server.receive_message(garbage) is None
    assert server.state.value == "open" and not server.outgoing
    assert server.receive_data(unknown) == []
    assert server.outgoing  # the error answering it
    server.outgoing.clear()
    events = server.receive_data(garbage)
    assert len(events) == 1 and isinstance(events[0], ConnectionFailed)
    assert server.receive_data(wire) == []  # closed


def test_a_core_result_leaves_the_node_as_the_core_framed_it() -> None:
    """The pool hands a result it passes on unchanged to ``on_result_frame`` with the core's own
    frame; the agent writes that frame as it is (no encode of the same message again) and the
    server reads the very message the core sent. A result whose output the node prefixes is
    changed, so it is encoded again."""
    from twisted.internet.task import Clock

    from protocol import MessageReceived
    from protocol.framing import Frame
    from remap.node.agent import NodeAgent
    from remap.node.cores import CoreLife, CorePool, CoreProcess
    from tests.test_handshake import pair, run_handshake

    plain, changed = [], []
    pool = CorePool(Clock(), 0, on_result=changed.append, on_failed=changed.append)
    pool.on_result_frame = lambda msg, frame: plain.append((msg, frame))
    core = CoreProcess(pool, 0)
    try:
        task = m.Task(task=7, job=1, sizes=[1], payload=b"x")
        result = m.TaskResult(task=7, sizes=[3], elapsed=0.001, payload=b"abc")
        frame = Frame(*m.encode(result))
        core.life, core.task = CoreLife.BUSY, task
        pool._core_message(core, result, frame)
        assert plain == [(result, frame)] and not changed
        core.life, core.task = CoreLife.BUSY, task
        noisy = m.TaskResult(task=7, sizes=[3], output="hi\n", payload=b"abc")
        pool._core_message(core, noisy, Frame(*m.encode(noisy)))
        assert len(plain) == 1 and changed[0].output.endswith("hi\n")
        assert changed[0].output != noisy.output  # prefixed by the node
    finally:
        core.shm.close()
        import os

        os.close(core.shm_fd)

    server, node = pair("node")
    run_handshake(server, node)
    sent: list[tuple[bytes, Any]] = []

    class Link:
        def send_encoded(self, header: bytes, payload: Any) -> None:
            sent.append((header, payload))
            node.send_encoded(header, payload)

    agent = NodeAgent(pool)
    agent.link, agent._max_frame = Link(), 1 << 20  # type: ignore[assignment]
    entered_functions = _counted(lambda: agent._forward(result, frame))
    assert sent == [(frame.header, frame.payload)]
    assert "messages.py:encode" not in entered_functions
    assert server.receive_data(b"".join(node.data_to_send())) == [MessageReceived(result)]


def test_a_message_made_without_init_equals_the_one_init_makes() -> None:
    """``make`` sets the slots directly (no ``__init__``, no ``object.__setattr__`` per field):
    the same message for every example of the catalogue, defaults filled (a fresh list each
    time), unknown or missing fields refused as ``__init__`` refuses them; messages with rules of
    their own (``__post_init__``) are made by ``__init__``."""
    import dataclasses

    from tests.test_messages import EXAMPLES

    made = 0
    for msg in EXAMPLES.values():
        cls = type(msg)
        if hasattr(cls, "__post_init__"):
            assert cls.make is cls  # its own rules judge the values: made through __init__
            continue
        fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
        twin = cls.make(**fields)
        assert twin == msg and type(twin) is cls
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(twin, next(iter(fields)), None)
        # built as a plain twin of the class, then made one: what is decoded is the class too
        header, payload = m.encode(twin)
        channel = "pipe" if cls.CHANNEL == "pipe" else "wire"
        decoded = m.decode(header, payload, preauth=cls.PREAUTH, channel=channel)
        assert type(decoded) is cls and decoded == msg
        made += 1
    assert made >= 30
    a, b = m.Task.make(task=1, job=2, sizes=[3]), m.Task.make(task=1, job=2, sizes=[3])
    assert a == m.Task(task=1, job=2, sizes=[3]) and a.groups == [] and a.groups is not b.groups
    with pytest.raises(TypeError):
        m.Task.make(task=1, job=2, sizes=[3], nonsense=1)
    with pytest.raises(TypeError):
        m.Task.make(task=1, job=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.task = 5  # type: ignore[misc]
    python, _ = entered(lambda: m.Task.make(task=1, job=2, sizes=[3], payload=b"x"))
    assert python == 1, python  # make itself: no __init__


# ----------------------------------------------------------------------- a job's arguments


def test_taking_a_jobs_arguments_costs_a_few_c_calls_each() -> None:
    """Every argument of a job leaves the client through ``JobStream._take`` on the reactor
    thread: per argument, the queue's ``popleft``, one ``len`` and two list appends, no
    ``max``, ``bool`` or attribute store (270,000 ``max`` calls for 300 jobs of 300 before).
    Counted over 300 arguments, as many as a ``Pool.map_async`` of 300 values queues."""
    from protocol.options import JobOptions
    from remap.client import JobStream

    streams = []
    for _ in range(2):  # entered() calls twice: a warm-up, then the counted call
        stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: None, total_hint=300)
        stream.put_many([b"x" * 12] * 300)
        streams.append(stream)
    taken: list[Any] = []
    python, c = entered(lambda: taken.append(streams.pop()._take(300, 1 << 20, 0)))
    out, groups, tags, ended = taken[-1]
    assert len(out) == 300 and groups == [] and tags == [None] * 300 and not ended
    assert python <= 1, python  # _take alone
    assert c <= 4 * 300 + 4, c  # (2,401 before)


def test_sending_a_jobs_arguments_costs_no_call_per_argument_beyond_taking_them() -> None:
    """``JobSession.pump`` turns what ``_take`` gave into an ``args`` message: the pickles'
    sizes are measured once (``map(len, ...)``, no call per argument the profiler sees), the
    bound checked on them, and the message built from them (before: a ``len`` per argument
    for the bound and another for the message's sizes)."""
    from protocol.options import JobOptions
    from remap.client import JobStream

    streams = []
    for _ in range(2):  # entered() calls twice: a warm-up, then the counted call
        stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: None, total_hint=300)
        stream.session.submitted(7, 300)  # the job's id, a window of 300
        stream.put_many([b"x" * 12] * 300)
        streams.append(stream)
    pumped: list[Any] = []
    python, c = entered(lambda: pumped.append(s := streams.pop()) or s.session.pump(s._take))
    (msg,) = pumped[-1].session.outbox
    assert msg == m.Args(job=7, start=0, sizes=[12] * 300, payload=b"x" * 12 * 300)
    assert python <= 8, python
    assert c <= 4 * 300 + 16, c  # (1,809 before)


def test_a_jobs_submit_and_its_first_arguments_wake_the_reactor_once() -> None:
    """``Pool.map_async`` queues its job's submit, then its arguments: the reactor is woken
    (a pipe write from the calling thread) once, and the submit sends the arguments queued
    by then (two writes a job before); what is put after the submit ran wakes it again."""
    from protocol.options import JobOptions
    from remap.client import JobStream

    queued: list[tuple[Any, ...]] = []
    stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: queued.append(a), total_hint=3)
    sent: list[m.Message] = []
    client = type("Client", (), {})()
    client.link, client.redial = object(), None
    client.frame_room = lambda: 1 << 20
    client.send = sent.append
    client.submit = lambda s: s.submitting(client, 1)
    stream.start(client)
    stream.put_many([b"a", b"b"])
    assert len(queued) == 1, queued
    fn, *args = queued.pop()
    fn(*args)  # the reactor runs the submit
    assert [type(msg) for msg in sent] == [m.Submit, m.Args]
    assert sent[1].sizes == [1, 1]
    stream.put_many([b"c"])
    assert len(queued) == 1, queued


def test_a_jobs_options_judge_only_what_is_not_a_default() -> None:
    """A job's options are built three times (the caller's, its ``submit``, the server's copy)
    and each construction judged all 18 fields, one rule and ``_judge`` each (49 Python
    functions): a field that is its default object is valid as it is and is not judged again."""
    from protocol.options import JobOptions

    options = JobOptions(name="map:inc", mode="object")
    python, _ = entered(lambda: JobOptions(name="map:inc", mode="object"))
    # __init__, __post_init__, the rules of name and mode, the rules between fields
    assert python <= 8, python
    python, _ = entered(lambda: m.Submit.of(options, id=1, total=10, payload=b"x"))
    assert python <= 8, python


def test_a_small_maps_calls_cost_no_python_call_each_to_pickle_and_two_to_settle() -> None:
    """A ``Pool.map`` of at most ``SMALL_MAP`` values runs as calls in its executor's open
    job: each plain value is pickled in ``_call_blobs``'s loop (``_call_blob`` was entered
    per value) and each outcome settles its group entering ``settle`` and ``done`` only
    (``done`` read the future's state through its condition: three Python calls, twice a
    call with ``_on_send``'s). 100 settled: 413 Python calls before, 213 now."""
    from types import SimpleNamespace

    from remap.executor import _call_blobs, _Calls

    python, _ = entered(lambda: _call_blobs(False, abs, list(range(100))))
    assert python <= 1, python
    assert _call_blobs(False, abs, [3, "x"]) == [
        pickle.dumps(((3,), {}), 5),
        pickle.dumps((("x",), {}), 5),
    ]
    groups = [_Calls(SimpleNamespace(_killed=None), 100, False) for _ in range(2)]

    def settle_all() -> None:
        group = groups.pop()
        for k in range(100):
            group.settle(k, k, None)
        assert group.future.result(timeout=0) == list(range(100))

    python, _ = entered(settle_all)
    assert python <= 2 * 100 + 16, python  # (+ the future's set_result and result: 13)
