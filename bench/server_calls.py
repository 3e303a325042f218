"""What the server's own Python costs for one ``Cluster.submit(f, x)`` call: a console's
``args`` in → the ``task`` to the node; the node's ``result`` in → the ``results`` to the console.

    python bench/server_calls.py [CALLS]                    # CPU µs and bytecodes per call
    PYTHONPATH=/path/to/other/tree python bench/server_calls.py  # that tree's server
    SERVER_CALLS_OPCODES=/tmp/sops python bench/server_calls.py  # + /tmp/sops.server.txt
    SERVER_CALLS_SEQ=/tmp/sseq python bench/server_calls.py      # + /tmp/sseq.server.txt

``bench/call_hops.py`` measures the server process among the others, on a machine they share.
This runs the server's connection handling (``RemapServerFactory``: its protocol, service and
scheduler) in this process over two real loopback TCP connections, whose other ends are plain
sockets written and read here with frames built in C (no remap code on that side), and drives
the server's two reads per call itself: no reactor, no other process. One job of unknown size
(``Executor.submit``'s), one node of 2 cores, calls one at a time as ``submit().result()``
makes them. Printed for the first window (calls 20 to 250: a new job's, whose console needs no
grant) and after it (the steady state of a job kept open): the server's CPU per call
(``time.thread_time`` around its two reads, load-independent; includes its two ``recv`` and two
``send`` system calls) over CALLS calls (default 3000), and its bytecodes per call
(``sys.settrace``, over 200 calls).
"""

from __future__ import annotations

import importlib.util
import os
import select
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: a tree on PYTHONPATH is the one measured

import msgpack  # noqa: E402
from twisted.internet import tcp  # noqa: E402
from twisted.internet.address import UNIXAddress  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from protocol import Connection  # noqa: E402
from protocol import messages as m  # noqa: E402
from protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder  # noqa: E402
from protocol.options import JobOptions  # noqa: E402
from remap.server.service import RemapServerFactory  # noqa: E402

KEY = b"server-calls-bench-key"
COUNTED = 200
#: what a console and a node send for ``submit(inc, 5)`` (pickles as remap makes them)
ARG = b"\x80\x05\x95\n\x00\x00\x00\x00\x00\x00\x00M*\x01\x85\x94}\x94\x86\x94."
RESULT = b"\x80\x05\x95\x07\x00\x00\x00\x00\x00\x00\x00]\x94M+\x01a."
_PREFIX = struct.Struct(">II")


class _Reactor:
    """What a ``tcp.Connection`` asks of its reactor when the bench drives its reads."""

    def addReader(self, _: Any) -> None: ...
    def removeReader(self, _: Any) -> None: ...
    def addWriter(self, _: Any) -> None: ...
    def removeWriter(self, _: Any) -> None: ...


class _Transport(tcp.Connection):
    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)


def _header(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


class Peer:
    """The far end of one server connection: a plain socket and a sans-IO client connection
    for the handshake; afterwards frames are written (sealed by it) and read raw."""

    def __init__(self, role: str, transport: Any, sock: socket.socket) -> None:
        self.transport, self.sock = transport, sock
        self.conn = Connection(role, KEY, max_frame=DEFAULT_MAX_FRAME)
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        # a tree from before sealed frames (protocol 3) has no seal: its frames go plain
        self.seal = getattr(self.conn, "seal", lambda header, payload: header)
        self.mac = 32 if hasattr(self.conn, "seal") else 0

    def handshake(self) -> None:
        self.conn.initiate()
        while not self.conn.state.value == "open":
            self._write_out()
            self.transport.doRead()
            self.conn.receive_data(self.sock.recv(1 << 16))
        self._write_out()

    def _write_out(self) -> None:
        data = b"".join(self.conn.data_to_send())
        if data:
            self.sock.sendall(data)
            select.select([self.transport.socket], [], [], 5)

    def send(self, header: bytes, payload: bytes = b"") -> None:
        head = self.seal(header, payload)
        self.sock.sendall(_PREFIX.pack(4 + len(head) + len(payload), len(head)) + head + payload)
        select.select([self.transport.socket], [], [], 5)

    def read(self, type_name: str) -> dict:
        """The header of the next message of that type the server sent (others skipped)."""
        while True:
            for header, _ in self.decoder.feed(self.sock.recv(1 << 16)):
                fields = msgpack.unpackb(header[self.mac :])
                if fields["t"] == type_name:
                    return fields


def _connect(factory: RemapServerFactory, role: str) -> Peer:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
    near.setblocking(False)
    proto = factory.buildProtocol(None)
    transport = _Transport(near, proto, _Reactor())
    transport.connected = 1
    proto.makeConnection(transport)
    peer = Peer(role, transport, far)
    peer.handshake()
    return peer


class Server:
    """A server, a node and a console connected to it, and a job; :meth:`call` makes one call."""

    def __init__(self) -> None:
        factory = RemapServerFactory(Clock(), KEY, max_frame=DEFAULT_MAX_FRAME, job_ids_from=1)
        self.node, self.console = _connect(factory, "node"), _connect(factory, "console")
        info = m.NodeInfo(host="bench", pid=1, cores=2, memory=1 << 30)
        self.node.send(*m.encode(info))
        self.node.transport.doRead()
        submit = m.Submit.of(JobOptions(name="submit:inc"), id=1, total=-1, payload=b"fn")
        self.console.send(*m.encode(submit))
        self.console.transport.doRead()
        self.job = self.console.read("submitted")["job"]
        self.start = 0

    def call(self, tracer: Any = None) -> float:
        """One call; the server's CPU seconds for it (its two reads)."""
        console, node = self.console, self.node
        args = {"t": "args", "job": self.job, "start": self.start, "sizes": [len(ARG)]}
        console.send(_header(args), ARG)
        sys.settrace(tracer)
        t0 = time.thread_time()
        console.transport.doRead()
        spent = time.thread_time() - t0
        sys.settrace(None)
        task = node.read("task")["task"]
        answer = {"t": "result", "task": task, "sizes": [len(RESULT)], "elapsed": 1e-5}
        node.send(_header({**answer, "packed": True}), RESULT)
        sys.settrace(tracer)
        t0 = time.thread_time()
        node.transport.doRead()
        spent += time.thread_time() - t0
        sys.settrace(None)
        console.read("results")
        self.start += 1
        return spent


def _report(name: str, cpu: float, opcodes: dict[str, int], calls: int) -> None:
    per = sum(opcodes.values()) / calls
    print(f"{name}: {cpu:6.1f} µs CPU per call (median), {per:.0f} bytecodes per call")


def main(argv: list[str]) -> None:
    # this tree's call_hops (for its tracers), whichever tree is measured
    spec = importlib.util.spec_from_file_location("_call_hops", ROOT / "bench" / "call_hops.py")
    hops = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(hops)  # type: ignore[union-attr]
    _opcode_tracer, _sequence_tracer = hops._opcode_tracer, hops._sequence_tracer
    _write_opcodes, _write_sequence = hops._write_opcodes, hops._write_sequence

    calls = int(argv[0]) if argv else 3000
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    server = Server()
    for _ in range(20):
        server.call()
    op_prefix = os.environ.get("SERVER_CALLS_OPCODES")
    seq_prefix = os.environ.get("SERVER_CALLS_SEQ")
    # the first window: calls 20 to 250 (a job's console may send 256 before its first grant)
    first: dict[str, int] = {}
    for _ in range(30):
        server.call(_opcode_tracer(first))
    cpu = statistics.median(server.call() for _ in range(200)) * 1e6
    _report("first window", cpu, first, 30)
    while server.start < 320:
        server.call()
    cpu = statistics.median(server.call() for _ in range(calls)) * 1e6
    after: dict[str, int] = {}
    for _ in range(COUNTED):
        server.call(_opcode_tracer(after))
    _report("after it", cpu, after, COUNTED)
    if op_prefix:
        _write_opcodes(f"{op_prefix}.server.txt", after, COUNTED)
    if seq_prefix:
        seq: list[list[Any]] = []
        server.call(_sequence_tracer(seq, [0]))
        _write_sequence(f"{seq_prefix}.server.txt", seq)


if __name__ == "__main__":
    main(sys.argv[1:])
