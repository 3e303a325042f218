"""A failing message handler closes that peer and leaves every job consistent (issue 9, item 10).

Scheduler-level tests use the fakes of test_scheduler; wire-level tests put a real
:class:`RemapServerFactory` protocol on a StringTransport and feed it bytes, as test_wire does.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import msgpack
import pytest
from twisted.internet.task import Clock

from protocol import Connection
from protocol import messages as m
from protocol.framing import MAC_SIZE, FrameDecoder
from remap.blobs import dumps
from remap.server.service import RemapServerFactory, ServerConnection
from tests.cluster_harness import jobs_function, write_job

from .test_handshake import frame
from .test_scheduler import FakeConsole, FakeNode, assert_exactly_once, make, run_to_end
from .test_task_deadlines import SilentNode
from .test_wire import KEY, connect

BAD_ENTRIES = [
    pytest.param([5], id="not-a-list"),
    pytest.param([[0]], id="too-short"),
    pytest.param([[0, "ValueError"]], id="no-message"),
    pytest.param([[0, 5, "bad", ""]], id="type-not-text"),
    pytest.param([[0, "ValueError", "bad", None]], id="traceback-not-text"),
    pytest.param([[True, "ValueError", "bad", ""]], id="position-bool"),
    pytest.param([[3, "ValueError", "bad", ""]], id="position-out-of-range"),
    pytest.param([None], id="null"),
]


@pytest.mark.parametrize("errors", BAD_ENTRIES)
@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_malformed_error_entry_on_the_last_task_drops_the_node_and_the_job_finishes(
    errors: list[Any], on_error: str
) -> None:
    """A node answers a job's only task with a malformed error entry: the server neither raises
    nor passes the entry on; that node is dropped, the argument runs on another node, and the
    job ends with every result delivered once."""
    sched, _ = make()
    bad = FakeNode(sched, "bad", cores=1)
    console = FakeConsole(sched, [3], on_error=on_error)
    console.feed()
    (task,) = bad.held()
    good = FakeNode(sched, "good", cores=1)
    blob = dumps(9)
    sched.task_result(
        "bad", m.TaskResult(task=task.task, sizes=[len(blob)], errors=errors, payload=blob)
    )
    assert bad.link.closed and "bad" not in sched.nodes
    assert not console.link.of(m.Results), "a malformed answer is never delivered"
    run_to_end([good], [console])
    assert assert_exactly_once(console, 1) == {0: ("ok", 9)}
    assert console.done().state == "done"


def test_a_handler_that_raises_closes_the_peer_and_a_job_that_lost_arguments_ends() -> None:
    """Whatever raises half-way through handling a node's answer (here: delivery), that node's
    connection is closed with an error and a job that lost track of arguments is failed with a
    message instead of staying "running" forever."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    sched = factory.scheduler
    link = _Link()
    handler = ServerConnection(factory)
    handler.role, handler.session = "node", "n1"
    handler.message_received(link, m.NodeInfo(host="h", pid=1, cores=1, memory=1))
    node = sched.nodes["n1"]
    console = FakeConsole(sched, [1, 2], chunksize=2)  # one task holds both arguments
    console.feed()
    (task_id,) = node.inflight

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug in delivery")

    sched._deliver = broken  # type: ignore[method-assign]
    blobs = [dumps(1), dumps(4)]
    handler.message_received(
        link,
        m.TaskResult(task=task_id, sizes=[len(b) for b in blobs], payload=b"".join(blobs)),
    )
    assert link.closed_with is not None and "result" in str(link.closed_with)
    done = console.done()
    assert done is not None and done.state == "failed" and "lost" in done.message, done


class _Link:
    peer = "127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[m.Message] = []
        self.closed_with: Any = None

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def close(self, error: Any = None) -> None:
        self.closed_with = error


# --------------------------------------------------------------------------- over the wire


def _console(factory: RemapServerFactory):
    """A server protocol on a StringTransport with an authenticated console speaking to it."""
    proto = factory.buildProtocol(None)
    transport = connect(proto)
    client = Connection("console", KEY)
    client.initiate()
    for _ in range(3):
        out = b"".join(bytes(p) for p in client.data_to_send())
        if out:
            proto.dataReceived(out)
        client.receive_data(transport.value())
        transport.clear()
    assert proto.open and client.state.value == "open"
    return proto, transport, client


def _headers(data: bytes) -> list[dict]:
    """The headers of the server's frames (sealed: each behind its MAC)."""
    frames = FrameDecoder(1 << 30).feed(data)
    return [msgpack.unpackb(f.header[MAC_SIZE:], raw=False) for f in frames]


@pytest.mark.parametrize(
    "fatal",
    [
        pytest.param(b"\xff\xff\xff\xff", id="oversized-prefix"),
        pytest.param(b"\x00\x00\x00\x01", id="short-length"),
        pytest.param(b"\x00\x00\x00\x05\x00\x00\x00\x01\xc1", id="garbage-header"),
    ],
)
def test_a_valid_message_then_a_fatal_frame_in_one_read_closes_cleanly(fatal: bytes) -> None:
    """A status request and a fatal frame arrive in the same read: the server does not raise
    (its reply to the first message is dropped, the connection is closing), tells the peer
    why, and closes the connection."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    proto, transport, client = _console(factory)
    request = frame({"t": "status", "id": 1}, sealer=client)
    proto.dataReceived(request + fatal)
    assert transport.disconnecting
    assert [h["t"] for h in _headers(transport.value())] == ["error"]


def test_a_submit_then_an_oversized_frame_leaves_the_job_to_be_cancelled() -> None:
    """A submit, arguments and then a frame over the limit (a huge single line) in one read:
    no exception; the connection closes, and the job it started is cancelled after the grace
    instead of waiting for arguments forever."""
    clock = Clock()
    factory = RemapServerFactory(clock, KEY, max_frame=1 << 20, console_grace=5)
    proto, transport, client = _console(factory)
    blob = dumps(1)
    data = (
        frame({"t": "submit", "id": 1, "name": "j", "mode": "object"}, b"fn", client)
        + frame({"t": "args", "job": -1, "start": 0, "sizes": [len(blob)]}, blob, client)
        + (300 * 1024 * 1024).to_bytes(4, "big")
        + b"\x00" * 1000
    )
    proto.dataReceived(data)
    assert transport.disconnecting
    proto.connectionLost(None)
    (job,) = factory.scheduler.jobs.values()
    clock.advance(6)
    assert job.state == "cancelled"


def test_a_console_of_an_earlier_release_answering_group_limit_is_left_alone() -> None:
    """A console that does not know ``group_limit`` answers it with
    ``error(code="unknown-message")`` (``re`` nil: the message has no id) and goes on; the
    server takes that answer quietly (no error back, the connection stays) and the console's
    next request is answered."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    proto, transport, client = _console(factory)
    answer = {"t": "error", "code": "unknown-message", "message": "unknown message type 'x'"}
    proto.dataReceived(frame(answer, sealer=client))
    assert not transport.disconnecting and transport.value() == b""
    proto.dataReceived(frame({"t": "status", "id": 1}, sealer=client))
    assert [h["t"] for h in _headers(transport.value())] == ["status_reply"]


# --------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_a_real_server_survives_a_bad_node_and_a_bad_console(make_cluster, tmp_path) -> None:
    """Against a real server: a node answering every task with a malformed error entry is
    dropped and its work runs on the real node (the job completes, exactly once); a console
    sending a valid request and a fatal frame in one write gets an error and is closed; and
    the server goes on serving."""
    # the bad node (a thread of this process) must stay until it is dropped for its answers:
    # 0.3 s beats (0.9 s of silence) could drop it first when this process is starved
    c = make_cluster(1, cores=1, heartbeat=2.0)
    assert c.port is not None

    def malformed(task: m.Task) -> m.Message:
        blob = dumps(0)
        return m.TaskResult(
            task=task.task,
            sizes=[len(blob)] * len(task.sizes),
            errors=[[0]],
            payload=blob * len(task.sizes),
        )

    bad = SilentNode(c.port, c.secret, cores=2, answer=malformed)
    bad.start()
    try:
        c.wait_for(lambda: len(c.status()["nodes"]) == 2, 20, "the bad node to join")
        job = write_job(
            tmp_path / "survive.yaml",
            {
                "name": "survive",
                "function": jobs_function("fail_funcs", "square"),
                "args_range": [0, 40],
                "chunksize": 1,
            },
        )
        done = c.assert_ok(c.console("compute", job, "--json", timeout=60))
        assert json.loads(done.stdout) == [x * x for x in range(40)]
        assert bad.tasks >= 1, "the bad node must have been given work"
    finally:
        bad.stopped.set()
        bad.join(5)

    sock = socket.create_connection(("127.0.0.1", c.port), timeout=10)
    client = Connection("console", c.secret.encode())
    client.initiate()
    while client.state.value != "open":
        sock.sendall(b"".join(bytes(p) for p in client.data_to_send()))
        client.receive_data(sock.recv(1 << 16))
    sock.sendall(frame({"t": "status", "id": 1}) + b"\xff\xff\xff\xff")
    received = b""
    while chunk := sock.recv(1 << 16):
        received += chunk
    sock.close()
    assert "error" in [h["t"] for h in _headers(received)]
    assert c.status()["nodes"], "the server still answers"
