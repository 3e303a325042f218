"""A node that stops as asked says ``goodbye``: the server re-queues its work at once and logs
one calm info line; a node that crashed or lost its link (or predates the message) is still
"lost", with the warning, as before.

In layers: the message (sans-IO), the scheduler (events in, a Clock), a server handler and a
node agent joined over in-memory transports, and last real processes on loopback (``slow``).
"""

from __future__ import annotations

import re
import signal
from typing import Any

import msgpack
import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from protocol import Authenticated, MessageReceived
from protocol import messages as m
from protocol.errors import RemoteProtocolError, UnknownMessageType
from remap.errors import NodeLost as NodeLostError
from remap.server.http.metrics import ServerStats
from remap.server.scheduler.effects import NodeLeft, NodeLost
from remap.server.service import ServerConnection
from remap.wire import Traffic
from tests.cluster_harness import jobs_function, write_job
from tests.test_handshake import out, pair, run_handshake
from tests.test_node_service import joined_node
from tests.test_scheduler import FakeConsole, FakeLink, FakeNode, event, make
from tests.test_wire import RecordingPool, connect, node_peer, pump, server_factory

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


# ---------------------------------------------------------------------------- the scheduler


def scheduler_lines(events: list[dict]) -> list[tuple[str, str]]:
    """(level, text) of what the scheduler and the server's handlers logged."""
    return [
        (e["log_level"].name, formatEvent(e))
        for e in events
        if e.get("log_namespace", "").startswith("remap.server")
    ]


def loud(lines: list[tuple[str, str]]) -> list[str]:
    return [text for level, text in lines if level in ("warn", "error", "critical")]


def test_a_node_that_left_has_its_work_requeued_at_once_with_one_info_line() -> None:
    """``NodeLeft``: every argument the node held goes to the other node in the same step (no
    wait for its connection to end, no grace), and the log says it left, calmly: one info line
    with the count, no warning."""
    sched, _ = make()
    a = FakeNode(sched, "a", cores=2, host="box-a")
    console = FakeConsole(sched, range(6), chunksize=3)
    console.feed()
    held = {i for t in a.held() for i in a.args_of(t)}
    assert held == set(range(6)), "a holds the whole job"
    b = FakeNode(sched, "b", cores=2)
    assert not b.held()
    with capturedLogs() as events:
        event(sched, NodeLeft("a", "stopping"))
    assert {i for t in b.held() for i in a.args_of(t)} == held, "re-queued and sent at once"
    assert list(sched.nodes) == ["b"]
    lines = scheduler_lines(events)
    assert ("info", "node a (box-a) left (stopping); 6 arguments re-queued") in lines, lines
    assert not loud(lines), lines
    assert "node a left: stopping" in [text for _, text in sched.events.recent()]


def test_a_node_lost_without_a_goodbye_is_still_a_loss() -> None:
    """The same node gone without a goodbye (a crash, a cut link, an older node): the warning
    operators watch for, with the count, exactly as before."""
    sched, _ = make()
    a = FakeNode(sched, "a", cores=2, host="box-a")
    console = FakeConsole(sched, range(6), chunksize=3)
    console.feed()
    assert a.held()
    with capturedLogs() as events:
        event(sched, NodeLost("a", "connection to 10.0.0.1:5 lost"))
    lines = scheduler_lines(events)
    assert loud(lines) == [
        "node a (box-a) lost: connection to 10.0.0.1:5 lost; 6 arguments re-queued"
    ], lines


def test_a_node_told_to_stop_left_as_told_even_with_work_in_flight() -> None:
    """``kill --cluster`` (or the embedded cluster's close) told the node to go: its leaving is
    no loss either, with or without a goodbye, whatever it still held."""
    sched, _ = make()
    FakeNode(sched, "a", cores=2, host="box-a")
    FakeConsole(sched, range(4), chunksize=2).feed()
    sched.nodes_leaving()
    with capturedLogs() as events:
        event(sched, NodeLost("a", "connection lost"))
    lines = scheduler_lines(events)
    assert ("info", "node a (box-a) left as told; 4 arguments re-queued") in lines, lines
    assert not loud(lines), lines


def test_metrics_count_a_goodbye_as_left_and_never_as_lost_or_failed() -> None:
    """``/metrics``: a node that said goodbye counts in ``remap_nodes_left``, not in
    ``remap_nodes_lost`` (what an alert on crashed or cut-off nodes reads), and its re-queued
    calls are no failures; a node gone without a goodbye counts as lost."""
    sched, _ = make()
    stats = ServerStats(sched, Traffic())
    FakeNode(sched, "a", cores=2)
    console = FakeConsole(sched, range(4), chunksize=2)
    console.feed()
    event(sched, NodeLeft("a", "stopping"))

    def counted(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", stats.prometheus_text().decode(), re.M)
        assert found, name
        return float(found.group(1))

    assert (counted("remap_nodes_left_total"), counted("remap_nodes_lost_total")) == (1, 0)
    b = FakeNode(sched, "b", cores=2)
    assert b.held(), "the re-queued calls went to b"
    event(sched, NodeLost("b", "connection lost"))
    assert (counted("remap_nodes_left_total"), counted("remap_nodes_lost_total")) == (1, 1)
    assert counted("remap_tasks_failed_total") == 0 and sched.jobs[console.job].failed == 0


# ---------------------------------------------------------------------------- over a connection


class LoadingPool(RecordingPool):
    """A recording pool that takes any function blob (the fake console's is not a pickle)."""

    def load_job(self, msg: m.JobLoad) -> None:
        self.calls.append(("load_job", msg))


def node_with_work(clock: Clock) -> tuple[Any, Any, Any, Any, FakeNode]:
    """A real server handler and a real node agent joined in memory, the agent's pool holding
    a job's tasks; a second (fake) node with nothing to do."""
    factory = server_factory(clock)
    server = factory.buildProtocol(None)
    node, agent, _, _ = node_peer(clock)
    agent.pool = pool = LoadingPool()
    connect(server)
    connect(node)
    pump(node, server)
    console = FakeConsole(factory.scheduler, range(4), chunksize=2)
    console.feed()
    pump(node, server)
    assert [kind for kind, _ in pool.calls].count("submit") == 2, pool.calls
    other = FakeNode(factory.scheduler, "other", cores=2)
    assert not other.held()
    return factory, server, node, agent, other


def test_goodbye_over_the_wire_requeues_before_the_connection_ends() -> None:
    """The node says goodbye: the server re-queues its tasks as soon as it reads it (the other
    node has them while the connection is still up), logs the info line, closes the
    connection itself, and its end then adds no "lost" warning."""
    factory, server, node, agent, other = node_with_work(Clock())
    (node_id,) = [n for n in factory.scheduler.nodes if n != "other"]
    with capturedLogs() as events:
        agent.leave("stopping")
        server.dataReceived(node.transport.value())
        node.transport.clear()
        assert len(other.held()) == 2, "re-queued on reading the goodbye"
        assert not server.transport.disconnected and server.transport.disconnecting
        pump(node, server)  # the close reaches both ends
    assert list(factory.scheduler.nodes) == ["other"]
    lines = scheduler_lines(events)
    left = f"node {node_id} (node-a) left (stopping); 4 arguments re-queued"
    assert ("info", left) in lines, lines
    assert not loud(lines), lines
    assert agent.link is None, "the node saw its connection end (as stopping: no reconnect)"


def test_an_old_node_without_goodbye_is_lost_as_before() -> None:
    """Compatibility: a node that never says goodbye (an older one) still works, and its
    connection's end is a loss, as always: the warning, the work re-queued."""
    factory, server, node, agent, other = node_with_work(Clock())
    (node_id,) = [n for n in factory.scheduler.nodes if n != "other"]
    with capturedLogs() as events:
        node.transport.loseConnection()
        pump(node, server)
    assert len(other.held()) == 2
    warned = loud(scheduler_lines(events))
    assert len(warned) == 1 and warned[0].startswith(f"node {node_id} (node-a) lost: "), warned
    assert warned[0].endswith("; 4 arguments re-queued"), warned


class NodeLink(FakeLink):
    """The server handler's view of a node's connection: what it sent, whether it was closed."""

    peer = "10.0.0.9:5000"

    def __init__(self) -> None:
        super().__init__("node")


def test_nothing_a_node_sends_after_its_goodbye_counts() -> None:
    """The server handler closes the connection on a goodbye; whatever the node still sends
    before the close takes effect counts for nothing: a late answer delivers nothing and a
    ``node_info`` does not join it again."""
    factory = server_factory(Clock())
    handler, link = ServerConnection(factory), NodeLink()
    handler.authenticated(link, Authenticated("node", "s1"))
    handler.message_received(link, m.NodeInfo(host="box-a", pid=1, cores=2, memory=1))
    FakeConsole(factory.scheduler, range(2), chunksize=2).feed()
    (task,) = [msg for msg in link.sent if type(msg) is m.Task]
    handler.message_received(link, m.Goodbye(reason="stopping"))
    assert link.closed and not factory.scheduler.nodes
    job = next(iter(factory.scheduler.jobs.values()))
    assert (job.pending_count, job.running) == (2, 0), "re-queued"
    late = m.TaskResult(task=task.task, sizes=[2, 2], payload=b"....")
    handler.message_received(link, late)
    handler.message_received(link, m.NodeInfo(host="box-a", pid=1, cores=2, memory=1))
    assert not factory.scheduler.nodes, "not joined again"
    assert (job.done, job.pending_count) == (0, 2), "the late answer delivered nothing"
    handler.connection_lost(link, NodeLostError("connection to 10.0.0.9:5000 lost"))
    assert not factory.scheduler.nodes and job.pending_count == 2


def test_a_node_service_that_stops_says_goodbye_first() -> None:
    """The node's own stop (SIGTERM, Ctrl-C, told to) sends the goodbye before its connection
    ends: the server reads it and says the node left, not that it was lost."""
    node, client, server_side, agent = joined_node(Clock())
    with capturedLogs() as events:
        node.stopService()
        pump(client, server_side)
    lines = scheduler_lines(events)
    assert [t for _, t in lines if " left (stopping); 0 arguments re-queued" in t], lines
    assert not loud(lines), lines


# ---------------------------------------------------------------------------- real processes


def node_ids(c: Any) -> dict[int, str]:
    """Node process id → the server's node id."""
    return {n["pid"]: n["id"] for n in c.status()["nodes"]}


@pytest.mark.slow
def test_a_node_stopped_by_sigterm_left_and_one_sigkilled_is_lost(make_cluster, tmp_path) -> None:
    """Two nodes with calls running. SIGTERM one: the server's log says it left, with the calls
    it re-queued, and not that it was lost. SIGKILL the other: that one is lost, warned as
    before (no goodbye could be said)."""
    c = make_cluster(2, cores=1)
    stuck = write_job(
        tmp_path / "stuck.yaml",
        {"function": jobs_function("funcs", "stuck"), "name": "stuck", "args_range": [0, 4]},
    )
    c.console_popen("compute", stuck, "--json")

    def both_busy() -> bool:
        return all(n["busy"] for n in c.status()["nodes"])

    c.wait_for(both_busy, 30, "both nodes' cores to be busy")
    ids = node_ids(c)
    first, second = ids[c.nodes[0].pid], ids[c.nodes[1].pid]
    c.kill_node(0, signal.SIGTERM)
    left = re.compile(rf"node {first} \(.+\) left \(stopping\); (\d+) arguments re-queued")
    said = c.wait_for(lambda: left.search(c.server.log_text()), 15, "the server's 'left' line")
    assert int(said.group(1)) >= 1, said.group(0)
    assert c.nodes[0].exit_code() == 0, c.diagnostics()

    c.kill_node(1, signal.SIGKILL)
    lost = re.compile(rf"node {second} \(.+\) lost: .*; \d+ arguments re-queued")
    c.wait_for(lambda: lost.search(c.server.log_text()), 15, "the server's 'lost' line")
    log = c.server.log_text()
    about_first = [line for line in log.splitlines() if f"node {first} " in line]
    assert not [line for line in about_first if "lost" in line], about_first
    assert not [line for line in log.splitlines() if f"node {second} " in line and " left " in line]
    assert [line for line in log.splitlines() if "lost" in line and "warn" in line], log


@pytest.mark.slow
def test_a_server_stopped_by_sigterm_logs_its_nodes_as_no_loss(make_cluster) -> None:
    """``systemctl restart remap-server`` (SIGTERM): the server drops its nodes itself, so its
    log says they left, without the "node ... lost" warning operators watch for (it warned
    for every connected node)."""
    c = make_cluster(1, cores=1)
    server = c.server
    c.kill_server(signal.SIGTERM)
    log = server.log_text()
    assert "remap server stopped" in log, log
    assert not [line for line in log.splitlines() if " lost" in line], log
