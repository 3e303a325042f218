"""The node as Twisted services (issue 10, item 5): its connection is a ``ClientService`` that
counts a connection as made only once it has authenticated (``prepareConnection``). On a fake
clock and fake transports: no sockets, no processes; last, a real node stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from remap.cluster import Cores, NamedEndpoint, NodeService
from remap.net import PeerFactory, authenticated
from remap.node.agent import NodeAgent
from remap.server.service import RemapServerFactory
from remap.settings import load_settings
from tests.cluster_harness import (
    NODE_SCRIPT,
    PYTHON,
    clean_env,
    jobs_function,
    wait_for,
    write_job,
)
from tests.test_wire import RecordingPool, pump

KEY = b"k" * 32


class FakeEndpoint:
    """Every connect succeeds at once over a StringTransport (the TCP part always works)."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> defer.Deferred:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 7878)))
        self.protocols.append(proto)
        return defer.succeed(proto)


def node_connection(clock: Clock) -> tuple[ClientService, FakeEndpoint, NodeAgent, list[int]]:
    """A node's connection as start_node builds it, with a recording retry policy."""
    settings = load_settings({}, dotenv_path=None)
    agent = NodeAgent(RecordingPool(), host="n1")
    endpoint, attempts = FakeEndpoint(), []
    service = ClientService(
        NamedEndpoint(endpoint, "tcp:10.0.0.1:7878"),
        PeerFactory(clock, "node", KEY, agent, settings, wait_for_auth=True),
        retryPolicy=lambda n: attempts.append(n) or 1.0,
        clock=clock,
        prepareConnection=authenticated,
    )
    return service, endpoint, agent, attempts


def test_a_server_that_never_authenticates_is_retried_with_growing_delays() -> None:
    """TCP connects but the connection drops before the handshake ends: each attempt counts
    as failed, so the retry policy sees 1, 2, 3 (a plain ClientService saw 1, 1, 1: TCP alone
    reset it, and a broken server was hammered at the first delay forever). The loss of a
    refused connection raises nothing (Twisted's NoTransition is kept quiet)."""
    clock = Clock()
    service, endpoint, _, attempts = node_connection(clock)
    connected = service.whenConnected()
    service.startService()
    for expected in (1, 2, 3):
        assert len(endpoint.protocols) == expected
        endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
        assert attempts == list(range(1, expected + 1))
        clock.advance(1.0)
    assert not connected.called, "never authenticated: not connected"
    service.stopService()
    # the wait ends when the service stops (taken here: left unhandled, its CancelledError
    # was logged as "Unhandled error in Deferred" whenever the collector freed it)
    failed: list[Failure] = []
    connected.addErrback(failed.append)
    assert len(failed) == 1 and failed[0].check(defer.CancelledError), failed


def test_a_server_that_cannot_be_reached_is_named_with_the_reason_once() -> None:
    """A node whose server refuses connections or never answers (a typo in --server, a machine
    that is off) logs why, once per reason, while it keeps trying: before, its log said only
    ClientService's "Scheduling retry N" (seen on a namespace LAN). A reason that changes is
    said again; a connection made resets it."""
    from twisted.internet import error

    failures = [
        error.ConnectionRefusedError(),
        error.ConnectionRefusedError(),
        error.TimeoutError(),
        error.TimeoutError(),
        None,
        error.ConnectionRefusedError(),
        error.ConnectingCancelledError(None),  # the node stops while it dials: nothing to say
        defer.CancelledError(),
    ]

    class Flaky:
        def connect(self, factory: Any) -> defer.Deferred:
            failure = failures.pop(0)
            return defer.succeed("proto") if failure is None else defer.fail(failure)

    endpoint = NamedEndpoint(Flaky(), "tcp:10.0.0.1:7878", timeout=7)
    with capturedLogs() as events:
        for _ in range(8):
            endpoint.connect(object()).addErrback(lambda f: None)
    said = [formatEvent(e) for e in events]
    assert not failures and said == [
        "cannot reach the server at 10.0.0.1:7878: connection refused (is the server running, "
        "and on that port?); trying again",
        "cannot reach the server at 10.0.0.1:7878: no answer within 7s (is the address right, "
        "the machine up, and its TCP port open in any firewall?); trying again",
        "cannot reach the server at 10.0.0.1:7878: connection refused (is the server running, "
        "and on that port?); trying again",
    ], said
    assert {e["log_level"].name for e in events} == {"warn"}


def test_a_handshake_that_expires_counts_as_a_failed_attempt() -> None:
    """A peer that says nothing: the handshake deadline closes the connection, refused."""
    clock = Clock()
    service, endpoint, _, attempts = node_connection(clock)
    service.startService()
    clock.advance(load_settings({}, dotenv_path=None).handshake_timeout)
    assert attempts == [1] and len(endpoint.protocols) == 1
    assert endpoint.protocols[0].transport.disconnecting
    endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))
    assert attempts == [1]
    service.stopService()


def test_connected_once_authenticated_and_the_count_starts_again() -> None:
    """Against a real server handler the connection is made when the handshake ends (the
    node has joined); a drop after that is the first failure again, not the fourth."""
    clock = Clock()
    service, endpoint, agent, attempts = node_connection(clock)
    server = RemapServerFactory(clock, KEY, max_frame=1 << 20)
    connected = service.whenConnected()
    service.startService()
    endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))  # one refused attempt
    clock.advance(1.0)
    client = endpoint.protocols[1]
    server_side = server.buildProtocol(IPv4Address("TCP", "10.0.0.2", 5000))
    server_side.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5000)))
    assert not connected.called, "TCP is up, the handshake is not done"
    pump(client, server_side)
    assert connected.called and agent.link is not None
    assert [n.host for n in server.scheduler.nodes.values()] == ["n1"]
    server_side.transport.loseConnection()
    pump(client, server_side)
    assert attempts == [1, 1], "a connection that authenticated resets the count"
    service.stopService()


def test_the_node_service_stops_its_connection_then_its_cores() -> None:
    """One stopService: the connection is dropped first, then the cores are stopped."""
    clock, order = Clock(), []
    service, _, agent, _ = node_connection(clock)
    pool = agent.pool
    pool.start = lambda: order.append("cores started")
    pool.stop = lambda: order.append("cores stopped")
    stop_connection = service.stopService
    service.stopService = lambda: order.append("connection stopped") or stop_connection()
    node = NodeService(pool, agent, service)
    assert isinstance(next(iter(node)), Cores)
    node.startService()
    assert service.running and order == ["cores started"]
    node.stopService()
    assert order == ["cores started", "connection stopped", "cores stopped"]


def joined_node(clock: Clock) -> tuple[NodeService, Any, Any, NodeAgent]:
    """A node service whose connection authenticated against a real server handler."""
    service, endpoint, agent, _ = node_connection(clock)
    agent.pool.start = agent.pool.stop = lambda: None
    node = NodeService(agent.pool, agent, service)
    node.startService()
    server = RemapServerFactory(clock, KEY, max_frame=1 << 20)
    server_side = server.buildProtocol(IPv4Address("TCP", "10.0.0.2", 5000))
    server_side.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5000)))
    client = endpoint.protocols[0]
    pump(client, server_side)
    assert agent.link is not None
    return node, client, server_side, agent


def node_events(events: list[dict]) -> list[dict]:
    """The node's own log events (the server handler in the same process logs too)."""
    return [e for e in events if e.get("log_namespace", "").startswith("remap.node")]


def test_a_node_that_stops_leaves_its_server_calmly_and_a_lost_server_is_still_said() -> None:
    """A node asked to stop (SIGTERM, the server's shutdown) ends its connection: one info line,
    no "lost the server ... reconnecting" warning and no cancel of a pool being stopped anyway.
    A server that goes away on its own is still a loss: the warning, and the work dropped."""
    node, client, server_side, agent = joined_node(Clock())
    with capturedLogs() as events:
        node.stopService()
        pump(client, server_side)
    lines = [(e["log_level"].name, formatEvent(e)) for e in node_events(events)]
    assert ("info", "left server 10.0.0.1:7878: this node is stopping") in lines, lines
    assert not [t for level, t in lines if level in ("warn", "error", "critical")], lines
    assert ("cancel_all", None) not in agent.pool.calls

    node, client, server_side, agent = joined_node(Clock())
    with capturedLogs() as events:
        server_side.transport.loseConnection()
        pump(client, server_side)
    warned = [formatEvent(e) for e in node_events(events) if e["log_level"].name == "warn"]
    assert any("lost the server" in t and "reconnecting" in t for t in warned), warned
    assert ("cancel_all", None) in agent.pool.calls
    node.stopService()


def own_cpu(pid: int) -> float:
    """CPU seconds a live process used itself (not its reaped children), from /proc."""
    text = open(f"/proc/{pid}/stat").read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_a_node_stopped_by_sigterm_exits_after_reaping_its_cores(make_cluster, tmp_path) -> None:
    """SIGTERM: the node exits only once its cores have exited and been reaped, so their CPU
    time is in the node's rusage (what its parent counts: a bench, systemd) and none is left
    to init. A core holding 500 MiB takes long enough to die that a node that did not wait
    for it exited first (its cores' CPU was then missing from what its parent reaped)."""
    c = make_cluster(1, cores=1)
    job = write_job(
        tmp_path / "hold.yaml",
        {"function": jobs_function("funcs", "hold_memory"), "name": "hold", "args": [500]},
    )
    core_cpu = json.loads(c.assert_ok(c.console("compute", job, "--json")).stdout)[0]
    node = c.nodes[0]
    before = own_cpu(node.pid)
    os.kill(node.pid, signal.SIGTERM)
    pid, status, usage = wait_for(
        lambda: (ended := os.wait4(node.pid, os.WNOHANG))[0] and ended, 30, "the node to exit"
    )
    node.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    assert node.proc.returncode == 0, c.diagnostics()
    reaped = usage.ru_utime + usage.ru_stime - before
    assert reaped >= core_cpu, f"{reaped:.2f}s reaped with the node, its core used {core_cpu:.2f}s"


def group_members(pgid: int) -> list[int]:
    """Every process of a process group (zombies too), from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            text = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
        except OSError:  # exited meanwhile
            continue
        if text and int(text[text.rindex(")") + 2 :].split()[2]) == pgid:
            members.append(int(entry))
    return members


@pytest.mark.slow
def test_a_node_starting_many_cores_stops_at_once_on_sigterm(tmp_path) -> None:
    """``remap-node --cores 999`` on 2 CPUs ignored SIGTERM for minutes: every core was spawned
    in one reactor turn (starved by the cores already starting), and the stop waited for the
    last. SIGTERM once the first cores exist: the node exits within seconds, its cores with it
    (nothing left in its process group, nothing spawned or replaced while it stops)."""
    env = clean_env(tmp_path, {"REMAP_SECRET_KEY": "s" * 32, "REMAP_SERVER": "127.0.0.1:9"})
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen(
            [PYTHON, NODE_SCRIPT, "--cores", "200"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    children = f"/proc/{node.pid}/task/{node.pid}/children"
    try:
        wait_for(lambda: len(open(children).read().split()) >= 2, 60, "the first cores")
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(5)
        except subprocess.TimeoutExpired:
            left = len(group_members(node.pid))
            pytest.fail(f"the node ignored SIGTERM for 5 s ({left} processes in its group)")
        log_text = (tmp_path / "node.log").read_text(errors="replace")
        assert code == 0, log_text
        assert "Received SIGTERM" in log_text, log_text
        assert group_members(node.pid) == [], "cores outlived their node"
    finally:
        try:
            os.killpg(node.pid, signal.SIGKILL)  # the node's group: the node and its cores
        except ProcessLookupError:
            pass
        node.wait(10)


def test_a_node_with_more_cores_than_cpus_says_so_in_its_first_line(monkeypatch) -> None:
    """``remap-node --cores 100`` on a 10-CPU machine (a typo for 10?) starts 100 core processes
    sharing 10 CPUs: its first line says so; it said only "remap node: 100 cores"."""
    from remap.node import main as node_main

    monkeypatch.setattr(node_main.os, "cpu_count", lambda: 10)
    assert node_main.started_line(10, "h:1") == "remap node: 10 cores, connecting to h:1"
    assert node_main.started_line(100, "h:1") == (
        "remap node: 100 cores (more than this machine's 10 CPUs: they share them), "
        "connecting to h:1"
    )
