"""Throughput of the sans-IO wire protocol: framing + message codec, and a Connection pair.

    python bench/protocol_bench.py [--seconds 1.0] [--read-size 65536]

Measures, for a small payload (a typical batch of a few small pickled arguments) and a 1 MiB
payload (one large argument), frames per second and payload MB/s of:

- encode:  ``messages.encode`` + ``encode_frame`` + joining the buffers into bytes;
- decode:  ``FrameDecoder`` fed the byte stream in ``--read-size`` reads (as TCP delivers it)
           + ``messages.decode`` of every frame;
- pair:    what the library runs per message between two authenticated ``PeerProtocol``s
           (``remap.wire``) on plain TCP transports: ``send`` (a small frame sealed and sent
           as one buffer, a large one as its buffers) → the peer's read as a socket read does
           it (``read_directly``: a whole small frame by ``receive_message``, a large frame
           read straight into the decoder's buffer) → the handler's ``message_received``.

No reactor and no system calls (pair: the transports' socket is an in-memory stream, where a
kernel's copy is a copy): the wire's own cost, the ceiling under any transport.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import tcp  # noqa: E402
from twisted.internet.address import UNIXAddress  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from protocol import Connection, FrameDecoder, encode_frame  # noqa: E402
from protocol import messages as m  # noqa: E402
from protocol.framing import DEFAULT_MAX_FRAME  # noqa: E402
from remap.wire import PeerProtocol  # noqa: E402

MIB = 1024 * 1024


def make_task(payload_size: int) -> m.Task:
    """A task whose payload is split into pickles of ~64 bytes (small) or one pickle (large)."""
    payload = os.urandom(payload_size)
    if payload_size <= 4096:
        sizes = [64] * (payload_size // 64) + ([payload_size % 64] if payload_size % 64 else [])
    else:
        sizes = [payload_size]
    return m.Task(task=123456, job=7, sizes=sizes, payload=payload)


def timed(fn: Callable[[], int], seconds: float) -> tuple[int, float]:
    """Call ``fn`` (which returns how many frames it handled) until ``seconds`` pass."""
    fn()  # warm up
    frames = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        frames += fn()
        elapsed = time.perf_counter() - start
    return frames, elapsed


def bench_encode(msg: m.Task, batch: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(batch):
            header, payload = m.encode(msg)
            b"".join(encode_frame(header, payload))
        return batch

    return run


def bench_decode(msg: m.Task, batch: int, read_size: int) -> Callable[[], int]:
    header, payload = m.encode(msg)
    stream = b"".join(encode_frame(header, payload)) * batch
    view = memoryview(stream)
    reads = [view[i : i + read_size] for i in range(0, len(stream), read_size)]

    def run() -> int:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        count = 0
        for chunk in reads:
            for frame in decoder.feed(chunk):
                m.decode(frame.header, frame.payload)
                count += 1
        assert count == batch and decoder.buffered == 0
        return count

    return run


class _MemorySocket:
    """One end of an in-memory byte stream standing in for a TCP socket: what one end sends
    the other reads (``recv`` and ``recv_into`` as the kernel hands bytes over)."""

    def __init__(self) -> None:
        self.inbox = bytearray()
        self.pos = 0
        self.peer: _MemorySocket = self

    def setblocking(self, flag: bool) -> None: ...
    def setsockopt(self, *args: object) -> None: ...

    def fileno(self) -> int:
        return 1 << 20  # never polled: no reactor

    def send(self, data: bytes) -> int:
        self.peer.inbox += data
        return len(data)

    def sendmsg(self, buffers: list) -> int:
        return sum(self.send(b) for b in buffers)

    def recv(self, n: int) -> bytes:
        data = bytes(self._take(n))
        self._drained()
        return data

    def recv_into(self, view: memoryview) -> int:
        with self._take(len(view)) as data:
            view[: len(data)] = data
            n = len(data)
        self._drained()
        return n

    def _take(self, n: int) -> memoryview:
        if self.pos == len(self.inbox):
            raise BlockingIOError
        data = memoryview(self.inbox)[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def _drained(self) -> None:
        if self.pos == len(self.inbox):
            self.inbox.clear()
            self.pos = 0


class _Reactor:
    """What a ``tcp.Connection`` asks of its reactor (nothing is polled here)."""

    def addReader(self, _: object) -> None: ...
    def removeReader(self, _: object) -> None: ...
    def addWriter(self, _: object) -> None: ...
    def removeWriter(self, _: object) -> None: ...


class _Transport(tcp.Connection):
    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)


class _Counting:
    """A ``remap.wire.Handler`` that counts the messages its link hears."""

    def __init__(self) -> None:
        self.messages = 0
        self.open = False

    def authenticated(self, link: PeerProtocol, event: object) -> None:
        self.open = True

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        self.messages += 1

    def connection_failed(self, link: PeerProtocol, error: Exception) -> None:
        raise error

    def connection_lost(self, link: PeerProtocol, error: Exception) -> None: ...

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat()


def _link(role: str, sock: _MemorySocket) -> tuple[PeerProtocol, _Counting]:
    handler = _Counting()
    proto = PeerProtocol(Connection(role, b"bench secret"), handler, Clock())
    transport = _Transport(sock, proto, _Reactor())
    transport.connected = 1
    proto.makeConnection(transport)
    return proto, handler


def open_pair() -> tuple[PeerProtocol, PeerProtocol, _Counting]:
    """A node's link and the server's, authenticated; the server's handler."""
    near, far = _MemorySocket(), _MemorySocket()
    near.peer, far.peer = far, near
    server, heard = _link("server", near)
    client, _ = _link("node", far)
    for _ in range(2):
        server.transport.doRead()
        client.transport.doRead()
    assert server.open and client.open and heard.open
    return client, server, heard


def bench_pair(msg: m.Task, batch: int) -> Callable[[], int]:
    client, server, heard = open_pair()
    read = server.transport.doRead

    def run() -> int:
        before = heard.messages
        for i in range(batch):
            client.send(msg)
            while heard.messages == before + i:  # a large frame takes a few reads
                read()
        assert heard.messages - before == batch
        return batch

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="time per measurement (default 1)"
    )
    parser.add_argument("--read-size", type=int, default=65536, help="bytes per simulated TCP read")
    args = parser.parse_args(argv)

    cases = [
        ("small (256 B, 4 pickles)", make_task(256), 2000),
        ("1 MiB (1 pickle)", make_task(MIB), 20),
    ]
    rows = []
    for label, msg, batch in cases:
        header, _ = m.encode(msg)
        frame_bytes = 8 + len(header) + len(msg.payload)
        for name, fn in (
            ("encode", bench_encode(msg, batch)),
            ("decode", bench_decode(msg, batch, args.read_size)),
            ("pair send→receive", bench_pair(msg, batch)),
        ):
            frames, elapsed = timed(fn, args.seconds)
            rate = frames / elapsed
            rows.append(
                (
                    label,
                    name,
                    frame_bytes,
                    rate,
                    rate * len(msg.payload) / 1e6,
                    rate * frame_bytes / 1e6,
                )
            )

    print(
        f"remap protocol benchmark — Python {platform.python_version()} on {platform.machine()}, "
        f"{args.seconds:g} s per cell, {args.read_size} B reads"
    )
    headers = ("payload", "path", "frame bytes", "frames/s", "payload MB/s", "wire MB/s")
    table = [headers] + [
        (a, b, f"{c:,}", f"{d:,.0f}", f"{e:,.1f}", f"{f:,.1f}") for a, b, c, d, e, f in rows
    ]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(headers))]
    for i, row in enumerate(table):
        cells = [
            str(v).ljust(w) if j < 2 else str(v).rjust(w)
            for j, (v, w) in enumerate(zip(row, widths))
        ]
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
