"""Large frames cross a hop without being joined or copied in Python (issue 16, throughput).

A large frame is read straight into one buffer of its size (``FrameDecoder.read_buffer``), its
payload is handed out as a view of that buffer, a socket sends a message from the message's own
buffers (``sendmsg``) and a core writes its answer with ``writev`` from the pickle itself. Real
sockets (a loopback TCP pair under a real ``tcp.Connection``), no reactor: reads are driven by hand.
"""

from __future__ import annotations

import os
import socket
import tracemalloc
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock

from protocol import Connection
from protocol import messages as m
from protocol.framing import DEFAULT_MAX_FRAME, LARGE_FRAME, FrameDecoder, encode_frame, unsent
from remap.node import core as core_module
from remap.wire import PeerProtocol, read_directly
from tests.test_wire import KEY, Recorder

MIB = 1 << 20


def frame_bytes(header: bytes, payload: bytes) -> bytes:
    return b"".join(bytes(p) for p in encode_frame(header, payload))


# --------------------------------------------------------------------------- the decoder


def test_a_large_frame_read_into_its_buffer_is_handed_out_as_a_view_of_it() -> None:
    """Bytes read into ``read_buffer()`` are the payload: no join, no copy of the MiB."""
    payload = os.urandom(MIB)
    data = frame_bytes(b"head", payload)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    assert decoder.feed(data[:1000]) == []
    buffers = set()
    pos = 1000
    while (view := decoder.read_buffer()) is not None:
        n = min(len(view), 300_000)
        view[:n] = data[pos : pos + n]
        buffers.add(id(view.obj))
        pos += n
        decoder.wrote(n)
    (frame,) = decoder.frames()
    assert frame.header == b"head" and frame.payload == payload
    assert buffers == {id(frame.payload.obj)}, "the payload is a view of the buffer read into"
    assert frame.payload.readonly
    assert decoder.buffered == 0 and decoder.read_buffer() is None


def test_a_large_frame_whose_reading_stops_after_its_prefix_pins_no_buffer() -> None:
    """The frame's buffer is allocated with its first bytes after the one that announced it:
    a peer the server stops reading (read budget) costs what it sent, not the frame's size."""
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    head = frame_bytes(b"h", b"x" * (8 * MIB))[:4096]
    tracemalloc.start()
    try:
        decoder.feed(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.gathering == 8 * MIB + 4 + 1 + 4
    assert peak < MIB, f"{peak} bytes allocated for 4 KiB of an 8 MiB frame"
    assert decoder.read_buffer() is not None  # reading resumes: now the buffer exists


def test_unsent_skips_what_was_written_without_copying() -> None:
    payload = memoryview(b"p" * 100)
    parts = [b"abcd", b"ef", payload]
    assert unsent(parts, 0) == parts
    rest = unsent(parts, 5)
    assert [bytes(p) for p in rest] == [b"f", b"p" * 100]
    assert rest[1] is payload
    tail = unsent(parts, 50)
    assert tail[0].obj is payload.obj and len(tail[0]) == 56
    assert unsent(parts, 106) == []


# --------------------------------------------------------------------------- sockets


class FakeReactor:
    """What a ``tcp.Connection`` asks of its reactor when nothing runs: reads and writes are
    driven by the test."""

    def addReader(self, _: Any) -> None: ...
    def removeReader(self, _: Any) -> None: ...
    def addWriter(self, _: Any) -> None: ...
    def removeWriter(self, _: Any) -> None: ...
    def callLater(self, *_: Any) -> None: ...


class SocketTransport(tcp.Connection):
    """A real TCP transport class over one end of a connected pair of sockets."""

    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)


def _peer(role: str, sock: socket.socket, handler: Recorder) -> tuple[PeerProtocol, Any]:
    sock.setblocking(False)
    proto = PeerProtocol(Connection(role, KEY, max_frame=DEFAULT_MAX_FRAME), handler, Clock())
    transport = SocketTransport(sock, proto, FakeReactor())
    transport.connected = 1  # as tcp.Server and tcp.Client set it
    proto.makeConnection(transport)
    return proto, transport


def _pump(*transports: Any, reads: list[int] | None = None, until: Any = None) -> None:
    """Write what Twisted buffered and read what arrived, until ``until()`` or nothing moves."""
    for _ in range(10_000):
        moved = False
        for t in transports:
            if t.dataBuffer[t.offset :] or t._tempDataBuffer:
                t.doWrite()
                moved = True
            try:
                ready = t.socket.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                ready = b""
            if ready:
                if reads is not None:
                    reads.append(1)
                t.doRead()
                moved = True
        if until is not None and until():
            return
        if not moved:
            return


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        b = socket.create_connection(listener.getsockname())
        a, _ = listener.accept()
    return a, b


def test_a_mib_over_a_socket_is_sent_from_its_buffers_and_read_into_its_frame() -> None:
    """A console's 1 MiB ``args`` reaches the server's handler as a view of the one buffer it
    was received into, in a handful of reads; the sender gives the socket the payload itself
    and only what the socket did not take at once goes through Twisted's (copying) buffer."""
    a, b = _tcp_pair()
    server_rec, console_rec = Recorder(), Recorder()
    server, st = _peer("server", a, server_rec)
    console, ct = _peer("console", b, console_rec)
    try:
        _pump(st, ct, until=lambda: console.open and server.open)
        assert console.open and server.open
        payload = os.urandom(MIB)
        buffered: list[int] = []
        write = ct.write
        ct.write = lambda data: (buffered.append(len(data)), write(data))  # type: ignore[method-assign]
        console.send(m.Args(job=1, start=0, sizes=[MIB], payload=payload))
        assert sum(buffered) < MIB, "the socket took part of the payload from its own buffer"
        reads: list[int] = []
        _pump(st, ct, reads=reads, until=lambda: server_rec.kinds()[-1:] == ["message"])
        msg = server_rec.last("message")
        assert type(msg) is m.Args and msg.payload == payload
        assert isinstance(msg.payload, memoryview) and type(msg.payload.obj) is bytearray
        assert len(reads) <= 64, f"{len(reads)} reads for one MiB"
    finally:
        a.close()
        b.close()


def test_read_directly_reads_a_pipe_frame_in_place_and_small_bytes_as_usual() -> None:
    """The core pipe's reader: a large answer goes straight into its frame buffer; the small
    frame after it comes through ``read``/``data_received``."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    frames: list[Any] = []
    into: list[int] = []

    class Reader:
        def doRead(self) -> None:  # noqa: N802 - Twisted's name
            raise AssertionError("the reader's own 8 KiB read is replaced")

    reader = Reader()
    read_directly(
        reader,
        decoder.read_buffer,
        lambda view: into.append(1) or os.readv(r, [view]),
        lambda n: (decoder.wrote(n), frames.extend(decoder.frames())),
        read=lambda: os.read(r, 65536),
        data_received=lambda data: frames.extend(decoder.feed(data)),
    )
    payload = os.urandom(2 * LARGE_FRAME)
    data = frame_bytes(b"big", payload) + frame_bytes(b"small", b"s")
    view = memoryview(data)
    try:
        for _ in range(10_000):
            if view:
                try:
                    view = view[os.write(w, view[:65536]) :]
                except BlockingIOError:
                    pass
            reader.doRead()
            if len(frames) == 2:
                break
    finally:
        os.close(r)
        os.close(w)
    assert [f.header for f in frames] == [b"big", b"small"]
    assert frames[0].payload == payload and frames[1].payload == b"s"
    assert into, "the large frame was read in place"


# --------------------------------------------------------------------------- a core's answer


def test_a_core_writes_a_large_answer_from_its_pickle_without_joining(monkeypatch) -> None:
    """A result larger than the pipe takes several ``writev`` calls, each given views of the
    message's own buffers (the old path joined the frame into one new bytes object)."""
    payload = os.urandom(3 * MIB)
    calls: list[list[Any]] = []
    out: list[bytes] = []

    def writev(fd: int, buffers: list[Any]) -> int:
        calls.append(list(buffers))
        n = 0
        for buf in buffers:  # a pipe that takes at most 1 MiB per call
            k = min(len(buf), MIB - n)
            out.append(bytes(memoryview(buf)[:k]))
            n += k
            if n == MIB:
                break
        return n

    def write(fd: int, data: Any) -> int:
        raise AssertionError("a joined copy was written")

    monkeypatch.setattr(core_module.os, "writev", writev)
    monkeypatch.setattr(core_module.os, "write", write)
    core_module.write_frame(4, m.TaskResult(task=1, sizes=[len(payload)], payload=payload))
    assert len(calls) >= 3
    big = [buf for call in calls for buf in call if len(buf) > 1000]
    assert all(buf is payload or memoryview(buf).obj is payload for buf in big)
    (frame,) = FrameDecoder(DEFAULT_MAX_FRAME).feed(b"".join(out))
    assert frame.payload == payload


# --------------------------------------------------------------------------- the caller


def test_a_large_argument_leaves_the_caller_in_a_message_of_its_own() -> None:
    """The console sends a MiB pickle as the ``args`` payload itself: one per message, never
    joined with its neighbours into a new 3 MiB bytes object; small ones still share one."""
    from protocol.options import JobOptions
    from remap.client import JobStream

    stream = JobStream(b"fn", JobOptions(), call_soon=lambda fn, *a: None)
    big = [os.urandom(MIB) for _ in range(3)]
    stream.put_many([b"a", b"b", *big, b"c"])
    taken = [stream._take(100, 4 * MIB, 0)[0] for _ in range(5)]
    assert taken[0] == [b"a", b"b"]
    assert [t[0] is b for t, b in zip(taken[1:4], big)] == [True] * 3
    assert all(len(t) == 1 for t in taken[1:4]) and taken[4] == [b"c"]
    assert b"".join(taken[1]) is big[0], "a message of one pickle is that pickle"
