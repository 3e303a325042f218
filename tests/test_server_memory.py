"""The server's memory stays bounded however large the arguments (issue 9, item 8).

In memory: the real console JobStream, server and node adapters joined by iosim pumps (the
harness of test_inmemory), with the node holding its tasks so arguments pile up wherever the
protocol lets them.
"""

from __future__ import annotations

from collections import deque

import msgpack
from twisted.internet.task import Clock

from protocol import messages as m
from protocol.connection import Connection
from protocol.framing import encode_frame
from remap.server.scheduler import MAX_BATCH_BYTES, MAX_PENDING_BYTES, Segment, take_from
from remap.server.service import RemapServerFactory

from .test_inmemory import Cluster, job_run, outcome, submit
from .test_server_robustness import _console, _headers
from .test_wire import KEY

MB = 1024 * 1024


def _server_bytes(cluster: Cluster) -> int:
    """Argument bytes the server holds: queued for a job, or in flight on a node."""
    sched = cluster.scheduler
    queued = sum(job.pending_bytes for job in sched.jobs.values())
    flying = sum(
        len(task.segment.payload)
        for node in sched.nodes.values()
        for task in node.inflight.values()
    )
    return queued + flying


def test_a_job_of_4_mb_arguments_keeps_the_server_bounded() -> None:
    """40 arguments of 4 MB each (160 MB) and a node that sits on its tasks: the first window
    stops at INITIAL_WINDOW_BYTES (not at 256 arguments = 1 GB), and later grants keep what the
    server holds near MAX_PENDING_BYTES; the job then completes with every result."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=1, hold=True)
    client, _ = cluster.console()
    n, size = 40, 4 * MB
    run = job_run(len, (bytes(size) for _ in range(n)), total=n)
    d = submit(client, run)
    first = run.sent
    assert first * size <= m.INITIAL_WINDOW_BYTES + size, f"first window sent {first} arguments"
    bound = MAX_PENDING_BYTES + m.INITIAL_WINDOW_BYTES + 2 * MAX_BATCH_BYTES + size
    peak = 0
    for _ in range(200):
        cluster.settle()
        peak = max(peak, _server_bytes(cluster))
        if d.called:
            break
        pool.run_held()
    assert peak <= bound, f"the server held {peak / MB:.0f} MB (bound {bound / MB:.0f} MB)"
    result = outcome(d)
    assert result.state == "done", result
    assert run.sink.value() == [size] * n


def test_small_arguments_still_fill_a_large_first_window() -> None:
    """Tiny arguments are not slowed by the byte bound: the whole count window goes at once."""
    cluster = Cluster()
    cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    run = job_run(len, [b"x"] * 1000, total=1000)
    d = submit(client, run)
    assert run.sent == m.INITIAL_WINDOW
    cluster.settle()
    assert outcome(d).state == "done"
    assert run.sink.value() == [1] * 1000


# --------------------------------------------------------------------------- frames being received


def _submit_frame(client: Connection, size: int) -> bytes:
    """A valid ``submit`` from ``client`` (sealed as its next frame) whose function blob makes
    the frame ``size`` bytes or a little more."""
    header = msgpack.packb({"t": "submit", "id": 1, "name": "big", "mode": "object"})
    payload = b"f" * size
    return b"".join(bytes(p) for p in encode_frame(client.seal(header, payload), payload))


def test_peers_holding_huge_partial_frames_cannot_pin_unbounded_memory() -> None:
    """Six authenticated peers each start an 8 MiB frame and send 1 MiB of it, against a budget
    of 20 MiB for all connections: two reserve their frames, the other four stop being read
    (their bytes stay in TCP), so the server holds about the budget, not 6 × 8 MiB. As frames
    complete, waiting peers resume in turn, and every frame is finally received."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=8 * MB, max_buffered=20 * MB)
    peers = [_console(factory) for _ in range(6)]
    frames = {id(proto): _submit_frame(client, 8 * MB - 200) for proto, _, client in peers}
    for proto, _, _ in peers:
        proto.dataReceived(frames[id(proto)][:MB])
    budget = factory.read_budget
    assert budget.used <= budget.limit
    paused = [t for _, t, _ in peers if t.producerState == "paused"]
    assert len(paused) == 4, [t.producerState for _, t, _ in peers]
    held = sum(p.conn.decoder.buffered for p, _, _ in peers)
    assert held <= budget.limit + 6 * MB  # the read that found no room is all a paused peer costs
    remaining = list(peers)
    for _ in range(6):
        proto, transport, _ = next(p for p in remaining if p[1].producerState != "paused")
        proto.dataReceived(frames[id(proto)][MB:])
        remaining.remove((proto, transport, _))
        assert budget.used <= budget.limit
    assert not remaining and budget.used == 0
    assert len(factory.scheduler.jobs) == 6, "every frame was received whole"
    assert budget.peak <= budget.limit


def test_a_paused_peer_is_not_dropped_for_silence_and_a_frame_over_the_budget_is_refused() -> None:
    """While the server is not reading a peer (budget full) its heartbeat silence does not count
    against it; a frame larger than the whole budget is refused with an error, not held."""
    clock = Clock()
    factory = RemapServerFactory(
        clock, KEY, max_frame=8 * MB, max_buffered=10 * MB, heartbeat_interval=1.0
    )
    first, waiting = _console(factory), _console(factory)
    data = _submit_frame(first[2], 6 * MB)
    first[0].dataReceived(data[:MB])
    waiting[0].dataReceived(_submit_frame(waiting[2], 6 * MB)[:MB])
    assert waiting[1].producerState == "paused"
    for _ in range(10):
        first[0].dataReceived(b"")  # the first peer keeps talking (any bytes would do)
        clock.advance(1.0)
    assert not waiting[1].disconnecting, "a peer the server stopped reading is not silent"
    first[0].dataReceived(data[MB:])
    assert waiting[1].producerState != "paused"
    big = RemapServerFactory(Clock(), KEY, max_frame=8 * MB, max_buffered=4 * MB)
    proto, transport, client = _console(big)
    proto.dataReceived(_submit_frame(client, 6 * MB)[:MB])
    assert transport.disconnecting
    assert "exceeds" in _headers(transport.value())[-1]["message"]


def test_an_argument_over_the_batch_byte_limit_travels_alone_and_leaves_no_empty_segment() -> None:
    """A 4 MiB-and-a-bit argument (over MAX_BATCH_BYTES) is taken alone, and the queue holds no
    empty segment afterwards (one would become a task of no arguments, which a node's answer
    cannot match)."""
    big = MAX_BATCH_BYTES + 100
    queue = deque([Segment(range(0, 1), [big], memoryview(bytes(big)))])
    queue.append(Segment(range(1, 3), [10, 10], memoryview(bytes(20))))
    first = take_from(queue, 20, MAX_BATCH_BYTES)
    assert list(first.indices) == [0] and len(first.payload) == big
    assert [len(seg) for seg in queue] == [2]
    assert list(take_from(queue, 20, MAX_BATCH_BYTES).indices) == [1, 2] and not queue


def test_large_arguments_are_not_joined_from_two_messages() -> None:
    """A batch takes MiB arguments from one ``args`` message only: its payload is a view of that
    message's (it used to join the rest of one message with the start of the next, a copy)."""
    blob = b"z" * MB
    first = memoryview(b"".join([blob] * 2))
    second = memoryview(b"".join([blob] * 2))
    queue = deque([Segment(range(0, 2), [MB, MB], first), Segment(range(2, 4), [MB, MB], second)])
    taken = [take_from(queue, 3, MAX_BATCH_BYTES) for _ in range(2)]
    assert [list(t.indices) for t in taken] == [[0, 1], [2, 3]]
    assert taken[0].payload.obj is first.obj and taken[1].payload.obj is second.obj
    small = deque(
        [
            Segment(range(0, 2), [3, 3], memoryview(b"a" * 6)),
            Segment(range(2, 4), [3, 3], memoryview(b"b" * 6)),
        ]
    )
    assert list(take_from(small, 4, MAX_BATCH_BYTES).indices) == [0, 1, 2, 3]  # small ones merge
