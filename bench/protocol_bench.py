"""Throughput of the sans-IO wire protocol: framing + message codec, and a Connection pair.

    python bench/protocol_bench.py [--seconds 1.0] [--read-size 65536]

Measures, for a small payload (a typical batch of a few small pickled arguments) and a 1 MiB
payload (one large argument), frames per second and payload MB/s of:

- encode:  ``messages.encode`` + ``encode_frame`` + joining the buffers into bytes;
- decode:  ``FrameDecoder`` fed the byte stream in ``--read-size`` reads (as TCP delivers it)
           + ``messages.decode`` of every frame;
- pair:    an authenticated client ``Connection.send`` → ``data_to_send`` → server
           ``Connection.receive_data`` → ``MessageReceived`` event, in one thread.

No sockets and no reactor: this is the protocol's own cost, the ceiling under any transport.
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

from protocol import Connection, FrameDecoder, MessageReceived, encode_frame  # noqa: E402
from protocol import messages as m  # noqa: E402
from protocol.framing import DEFAULT_MAX_FRAME  # noqa: E402

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


def open_pair() -> tuple[Connection, Connection]:
    server = Connection("server", b"bench secret", max_frame=DEFAULT_MAX_FRAME)
    client = Connection("node", b"bench secret", max_frame=DEFAULT_MAX_FRAME)
    client.initiate()
    for _ in range(2):
        server.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
        client.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
    assert server.state.value == client.state.value == "open"
    return client, server


def bench_pair(msg: m.Task, batch: int) -> Callable[[], int]:
    client, server = open_pair()

    def run() -> int:
        count = 0
        for _ in range(batch):
            client.send(msg)
            events = server.receive_data(b"".join(client.data_to_send()))
            count += sum(1 for e in events if isinstance(e, MessageReceived))
        assert count == batch
        return count

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
