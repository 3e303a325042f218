"""A node that heartbeats but never answers cannot hold its tasks forever (issue 9, item 9).

The scheduler alone with a ``task.Clock``: the fakes of test_scheduler, a node that takes tasks
and only ever sends heartbeats, and a healthy node that answers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from protocol import Authenticated, Connection, MessageReceived
from protocol import messages as m
from remap.console.render import nodes_table
from remap.server.scheduler import NO_TIMEOUT_MIN, SWEEP_INTERVAL, TASK_SLACK
from remap.server.scheduler.effects import NodeSaid
from tests.cluster_harness import jobs_function, write_job

from .test_scheduler import FakeConsole, FakeNode, assert_exactly_once, event, make, run_to_end


def _beat(
    sched,
    clock,
    node: FakeNode,
    seconds: float,
    answering: FakeNode | None = None,
    step: float = SWEEP_INTERVAL,
) -> None:
    """Let ``seconds`` pass in sweep-sized steps, the node heartbeating all along (and the
    ``answering`` node answering whatever it holds at each step)."""
    for _ in range(int(seconds / step)):
        event(sched, NodeSaid(node.id, m.Heartbeat(load=0.1, busy=1)))
        if answering is not None:
            answering.answer_all(elapsed=0.01)
        clock.advance(step)


def test_tasks_of_a_silent_node_are_requeued_after_the_jobs_timeout_and_it_is_suspect() -> None:
    """``timeout: 2``: a node holds two one-call tasks and only heartbeats. Before the first
    deadline (2 s + slack) nothing moves; after it the task runs on a healthy node and the
    silent node is marked suspect and gets no new work; the second task follows after its
    own deadline. Every result is delivered once; the silent node's late answer is dropped
    and clears the suspicion."""
    sched, clock = make()
    silent = FakeNode(sched, "silent", cores=1)
    console = FakeConsole(sched, [1, 2], timeout=2.0)
    console.feed()
    held = silent.held()
    assert len(held) == 2
    healthy = FakeNode(sched, "healthy", cores=1)
    own = 2.0 + TASK_SLACK
    _beat(sched, clock, silent, own - 1)
    assert not healthy.held() and not sched.nodes["silent"].suspect
    _beat(sched, clock, silent, 2)
    assert sched.nodes["silent"].suspect
    assert sched.status()[0][0].suspect is True
    assert len(healthy.held()) == 1
    healthy.answer_all()
    assert not healthy.held(), "the second task is not past its deadline yet"
    _beat(sched, clock, silent, own)
    assert len(healthy.held()) == 1
    healthy.answer_all()
    assert console.done().state == "done"
    assert assert_exactly_once(console, 2) == {0: ("ok", 1), 1: ("ok", 4)}
    silent.answer(held[0])  # the late answer of a task given to another node
    assert assert_exactly_once(console, 2) == {0: ("ok", 1), 1: ("ok", 4)}
    assert not sched.nodes["silent"].suspect


def test_a_suspect_node_gets_no_new_work_until_it_answers() -> None:
    """After a missed deadline the node takes nothing new, though it has free credit; once it
    answers (even late), it gets work again."""
    sched, clock = make()
    silent = FakeNode(sched, "silent", cores=2)
    console = FakeConsole(sched, range(3), timeout=1.0, end=False)
    console.feed()
    held = silent.held()
    assert len(held) == 3
    _beat(sched, clock, silent, 1.0 + TASK_SLACK + 2)
    assert sched.nodes["silent"].suspect
    console.values.extend(range(3, 20))
    console.feed()
    before = len(silent.link.of(m.Task))
    sched.pump()
    assert len(silent.link.of(m.Task)) == before, "a suspect node must get no new task"
    silent.answer(held[-1])
    assert not sched.nodes["silent"].suspect
    assert len(silent.link.of(m.Task)) > before


def test_each_missed_deadline_counts_an_attempt_and_then_the_argument_fails() -> None:
    """With ``retries: 1`` and only silent nodes, an argument is retried once and then reported
    as a TaskTimeout error ("no answer"), so the job ends instead of waiting forever."""
    sched, clock = make()
    FakeNode(sched, "a", cores=1)
    console = FakeConsole(sched, [5], timeout=1.0, retries=1, on_error="continue")
    console.feed()
    for name in ("b", "c"):
        FakeNode(sched, name, cores=1)
    for _ in range(60):
        clock.advance(SWEEP_INTERVAL)
        if console.done():
            break
    assert console.done() is not None and console.done().state == "done"
    ((index, outcome),) = assert_exactly_once(console, 1).items()
    assert outcome == ("error", "TaskTimeout")
    (result,) = console.link.of(m.Results)
    assert "no answer" in result.errors[0][2]


def test_without_a_timeout_and_no_measured_call_nothing_expires() -> None:
    """No ``timeout`` and no call measured yet: there is nothing to derive a deadline from, so
    a task may take as long as it takes (hours of heartbeats)."""
    sched, clock = make()
    silent = FakeNode(sched, "silent", cores=1)
    console = FakeConsole(sched, range(4), chunksize=1)
    console.feed()
    assert silent.held()
    _beat(sched, clock, silent, 10 * NO_TIMEOUT_MIN, step=30)
    assert not sched.nodes["silent"].suspect
    assert console.done() is None


def test_without_a_timeout_the_deadline_comes_from_measured_call_times() -> None:
    """No ``timeout``, calls measured at 0.01 s: a task on a node that never answers is
    re-queued after the generous floor NO_TIMEOUT_MIN (far above 100 × its measured time), not
    before, and the job then completes on the healthy node."""
    sched, clock = make()
    healthy = FakeNode(sched, "healthy", cores=1)
    console = FakeConsole(sched, range(400), chunksize=1, end=False)
    console.feed()
    for _ in range(3):
        healthy.answer_all(elapsed=0.01)
    assert sched.jobs[console.job].per_call is not None
    silent = FakeNode(sched, "silent", cores=1)
    assert silent.held()
    _beat(sched, clock, silent, NO_TIMEOUT_MIN - 5, healthy, step=5)
    assert not sched.nodes["silent"].suspect
    _beat(sched, clock, silent, 10, healthy, step=5)
    assert sched.nodes["silent"].suspect
    assert not sched.nodes["healthy"].suspect
    console.end = True
    run_to_end([healthy], [console], elapsed=0.01)
    _beat(sched, clock, silent, 2 * SWEEP_INTERVAL)  # the task it held second expires now too
    run_to_end([healthy], [console], elapsed=0.01)
    assert console.done().state == "done"
    assert_exactly_once(console, 400)


@pytest.mark.parametrize("answer", ["result", "failed"])
def test_the_deadline_timer_stops_when_nothing_is_in_flight(answer: str) -> None:
    """The deadline check runs only while tasks are in flight (no timer left behind)."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, [1], timeout=1.0)
    console.feed()
    (task,) = node.held()
    if answer == "result":
        node.answer(task)
    else:
        node.crash(task)
        node.answer_all()
    clock.advance(SWEEP_INTERVAL * 2)
    assert clock.getDelayedCalls() == []


def test_the_nodes_table_shows_a_suspect_node() -> None:
    """``nodes``/``status`` text names the state, so an operator sees which node is stuck."""
    sched, clock = make()
    silent = FakeNode(sched, "silent", cores=1)
    console = FakeConsole(sched, [1], timeout=1.0)
    console.feed()
    _beat(sched, clock, silent, 1.0 + TASK_SLACK + 2)
    text = nodes_table(sched.status()[0])
    assert "suspect" in text.splitlines()[2].split(), text


# --------------------------------------------------------------------------- a real server


class SilentNode(threading.Thread):
    """A node that authenticates, takes tasks and heartbeats, and never answers one (unless
    ``answer`` makes a reply for a task)."""

    def __init__(
        self,
        port: int,
        secret: str,
        cores: int = 4,
        answer: Callable[[m.Task], m.Message | None] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = Connection("node", secret.encode(), heartbeat=0.3)
        self.cores = cores
        self.tasks = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        conn, sock = self.conn, self.sock
        conn.initiate()
        sock.settimeout(0.1)
        last_beat = 0.0
        try:
            while not self.stopped.is_set():
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    data = None
                if data == b"":
                    return
                for event in conn.receive_data(data) if data else []:
                    if isinstance(event, Authenticated):
                        conn.send(
                            m.NodeInfo(
                                host="silent-host", pid=os.getpid(), cores=self.cores, memory=1
                            )
                        )
                    elif isinstance(event, MessageReceived) and type(event.message) is m.Task:
                        self.tasks += 1
                        reply = self.answer(event.message) if self.answer else None
                        if reply is not None and conn.state.value == "open":
                            conn.send(reply)
                if conn.state.value == "open" and time.monotonic() - last_beat > 0.3:
                    conn.send(m.Heartbeat(load=0.0, busy=self.cores))
                    last_beat = time.monotonic()
                out = b"".join(bytes(p) for p in conn.data_to_send())
                if out:
                    sock.sendall(out)
        finally:
            sock.close()


@pytest.mark.slow
def test_a_real_server_requeues_the_tasks_of_a_node_that_never_answers(make_cluster, tmp_path):
    """A real server and one real node, plus a node that heartbeats and takes tasks but never
    answers. A job with ``timeout: 1`` still completes with every result (the silent node's
    tasks are re-queued after their deadline), and ``status`` shows that node as suspect."""
    # the silent node (a thread of this process) must stay connected to be shown suspect:
    # with 0.3 s beats a starved moment (0.9 s of silence) could drop it instead
    c = make_cluster(1, cores=1, heartbeat=2.0)
    assert c.port is not None
    silent = SilentNode(c.port, c.secret)
    silent.start()
    try:
        c.wait_for(lambda: len(c.status()["nodes"]) == 2, 20, "the silent node to join")
        job = write_job(
            tmp_path / "deadline.yaml",
            {
                "name": "deadline",
                "function": jobs_function("fail_funcs", "square"),
                "args_range": [0, 30],
                "timeout": 1,
                "chunksize": 1,
            },
        )
        done = c.assert_ok(c.console("compute", job, "--json", timeout=60))
        assert json.loads(done.stdout) == [x * x for x in range(30)]
        assert silent.tasks >= 1, "the silent node must have held some of the job's tasks"
        (node,) = [n for n in c.status()["nodes"] if n["host"] == "silent-host"]
        assert node["suspect"] is True
    finally:
        silent.stopped.set()
        silent.join(5)
