"""A send that raises (an encode error, a frame too large, a transport error) never leaves the
scheduler half-way: the answer or arguments it was handling are fully processed, every argument
is still in exactly one place, and the message's job fails with one clear line to its console.

``node_said``/``console_said`` write a call's task and results as soon as they are decided,
before the bookkeeping after them (see :meth:`Scheduler._send`); the same failure through
``handle`` + the runner (effects performed after the bookkeeping) ends the same way, except for a
job whose end the runner had decided before the send failed: its console is closed with the
reason, never told "done". Fake links whose ``send`` raises for chosen message types; a Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from protocol import Connection, MessageReceived
from protocol import messages as m
from protocol.errors import LocalProtocolError
from remap.blobs import dumps
from remap.server.scheduler import Scheduler
from remap.server.scheduler.effects import ConsoleSaid, NodeSaid
from remap.server.service import RemapServerFactory, ServerConnection

from .test_scheduler import FakeConsole, FakeLink, FakeNode, make
from .test_wire import KEY, connect


class SendRefused(Exception):
    """What a refusing link raises: stands for any error out of ``link.send``."""


def refuse(link: FakeLink, *types: type) -> None:
    """Make ``link.send`` raise for messages of ``types`` (every type if none given)."""
    record = link.send

    def send(msg: m.Message) -> None:
        if not types or type(msg) in types:
            raise SendRefused(f"cannot send {msg.TYPE}")
        record(msg)

    link.send = send  # type: ignore[method-assign]


def answer_to(task: m.Task) -> m.TaskResult:
    """A node's answer to ``task``: each argument's pickle back as its result."""
    blobs = [dumps(i) for i in range(len(task.sizes))]
    return m.TaskResult(task=task.task, sizes=[len(b) for b in blobs], payload=b"".join(blobs))


def args_message(job: int, start: int, values: list[Any]) -> m.Args:
    blobs = [dumps(v) for v in values]
    return m.Args(job=job, start=start, sizes=[len(b) for b in blobs], payload=b"".join(blobs))


def node_said(sched: Scheduler, node: str, msg: m.Message, eager: bool) -> None:
    """The service's entry (sends as decided), or ``handle`` + the runner (sends after)."""
    if eager:
        sched.node_said(node, msg)
    else:
        sched.runner.apply(sched.handle(NodeSaid(node, msg)))


def console_said(sched: Scheduler, link: Any, msg: m.Message, eager: bool) -> None:
    if eager:
        sched.console_said(link, msg)
    else:
        sched.runner.apply(sched.handle(ConsoleSaid(link, msg)))


def assert_consistent(sched: Scheduler) -> None:
    """The scheduler's bookkeeping invariants (core.py's docstring), and a deadline sweep
    pending while any task is in flight."""
    held: dict[int, int] = {}
    for node in sched.nodes.values():
        for task in node.inflight.values():
            assert not task.job.finished, f"task {task.id} of finished job {task.job.id} in flight"
            held[task.job.id] = held.get(task.job.id, 0) + len(task.segment)
    for job in sched.active.values():
        assert job.running == held.get(job.id, 0), (job.id, job.running, held)
        assert job.pending_count == sum(len(s) for s in job.pending)
        assert job.received == job.done + job.failed + job.pending_count + job.running
    if held:
        assert sched._sweep is not None, "tasks in flight with no deadline sweep"


def assert_failed_with(console: FakeConsole, *words: str) -> m.JobDone:
    done = console.done()
    assert done is not None and done.state == "failed", done
    assert all(w in done.message for w in words), done.message
    assert "\n" not in done.message
    return done


EAGER = pytest.mark.parametrize("eager", [True, False], ids=["as-decided", "via-runner"])


@EAGER
def test_results_that_cannot_be_sent_fail_the_job_once_the_answer_is_counted(eager: bool) -> None:
    """The console-bound ``results`` raises: the node's answer is still fully processed (its
    task released, the call counted, the node free), then the job fails with one line naming
    what could not be sent; its other task is recalled and the node keeps its connection."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=1)
    console = FakeConsole(sched, [1, 2], chunksize=1)
    console.feed()
    first, second = node.held()
    refuse(console.link, m.Results)
    node_said(sched, "n1", answer_to(first), eager)
    job = sched.jobs[console.job]
    assert job.done == 1 and job.running == 0 and job.tasks == 0
    assert_failed_with(console, "could not send", "results", "cannot send results")
    assert not sched.nodes["n1"].inflight and not node.link.closed
    assert node.link.of(m.Cancel, console.job), "the job's other task was cancelled on the node"
    assert_consistent(sched)


@EAGER
def test_a_task_that_cannot_be_sent_after_an_answer_fails_its_job_not_the_answer(
    eager: bool,
) -> None:
    """The node-bound ``task`` the answer's dispatch decides raises: the answer's results still
    reach the console and are counted, nothing stays in flight without a deadline, and the
    job fails with one line naming the task and the node."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=1)
    console = FakeConsole(sched, list(range(6)), chunksize=1)
    console.feed()
    held = node.held()
    assert len(held) < 6, "some arguments wait for the node's next credit"
    refuse(node.link, m.Task)
    node_said(sched, "n1", answer_to(held[0]), eager)
    assert [list(r.answered) for r in console.link.of(m.Results)] == [[0]]
    job = sched.jobs[console.job]
    assert job.done == 1 and job.tasks == 0 and job.running == 0
    assert_failed_with(console, "could not send", "task", "n1")
    assert not sched.nodes["n1"].inflight
    assert_consistent(sched)


@EAGER
def test_a_task_that_cannot_be_sent_for_new_arguments_fails_its_job(eager: bool) -> None:
    """The node-bound ``task`` a console's arguments are dispatched in raises: the arguments
    are taken in and accounted for, the job fails with one line, its console is answered and
    nothing is left in flight on the node."""
    sched, _ = make()
    FakeNode(sched, "n1", cores=1)
    console = FakeConsole(sched, name="c")
    refuse(sched.nodes["n1"].link, m.Task)
    console_said(sched, console.link, args_message(console.job, 0, [5, 6]), eager)
    job = sched.jobs[console.job]
    assert job.received == 2
    assert_failed_with(console, "could not send", "task")
    assert not sched.nodes["n1"].inflight
    assert_consistent(sched)


@EAGER
def test_a_console_that_cannot_be_sent_anything_is_dropped(eager: bool) -> None:
    """Every send to the console raises (its results, then the ``job_done`` that would say
    why): nothing is raised out of the scheduler, the job fails (as decided; through the runner
    its end was decided first), and that console's connection is closed, so it waits for
    nothing and is never told "done"; the node goes on."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=1)
    console = FakeConsole(sched, [1], chunksize=1)
    console.feed()
    (task,) = node.held()
    refuse(console.link)
    node_said(sched, "n1", answer_to(task), eager)
    job = sched.jobs[console.job]
    assert job.finished and job.done == 1 and not job.running
    assert console.link.closed and not node.link.closed
    assert not console.link.sent[1:], "nothing reached the console after submitted"
    if eager:  # noted before the job was found complete: it ends failed
        assert job.state == "failed" and "could not send results" in job.message
    assert_consistent(sched)


@EAGER
def test_a_send_that_fails_once_leaves_the_other_jobs_running(eager: bool) -> None:
    """One job's results cannot be sent: only that job fails; another job sharing the node runs
    to its end with every result delivered once. Through the runner the job's last results fail
    after its end was decided: its console is closed instead, and never told "done"."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=2)
    bad = FakeConsole(sched, [1], chunksize=1, name="bad")
    good = FakeConsole(sched, [1, 2, 3], chunksize=1, name="good")
    bad.feed()
    good.feed()
    refuse(bad.link, m.Results)
    for _ in range(10):
        for task in node.held():
            node_said(sched, "n1", answer_to(task), eager)
            node.tasks.pop(task.task, None)
        good.feed()
    if eager:
        assert_failed_with(bad, "results")
    else:  # the job's end was decided before its results were found unsent: closed, not "done"
        assert bad.done() is None and bad.link.closed
    assert good.done() is not None and good.done().state == "done"
    assert sorted(i for r in good.link.of(m.Results) for i in r.answered) == [0, 1, 2]
    assert_consistent(sched)


class _RaisingLink:
    """A server-side link whose ``send`` raises for ``results`` (as an encode error would)."""

    peer = "127.0.0.1:1"

    def __init__(self, refused: type | None = None) -> None:
        self.sent: list[m.Message] = []
        self.closed_with: Any = None
        self.refused = refused

    def send(self, msg: m.Message) -> None:
        if type(msg) is self.refused:
            raise SendRefused(f"cannot encode {msg.TYPE}")
        self.sent.append(msg)

    def close(self, error: Any = None) -> None:
        self.closed_with = error


def test_through_the_service_a_failed_results_send_fails_the_job_and_keeps_the_node() -> None:
    """The service's node handler with a console link whose ``results`` cannot be sent: the
    node (which did nothing wrong) stays connected with nothing held, the job's console is told
    in one line, and nothing reaches the handler's catch-all."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    sched = factory.scheduler
    node_link, console_link = _RaisingLink(), _RaisingLink(m.Results)
    node = ServerConnection(factory)
    node.role, node.session = "node", "n1"
    node.message_received(node_link, m.NodeInfo(host="h", pid=1, cores=1, memory=1))
    console = ServerConnection(factory)
    console.role = "console"
    console.message_received(console_link, m.Submit(id=3, payload=b"fn", name="j"))
    (submitted,) = [x for x in console_link.sent if type(x) is m.Submitted]
    console.message_received(console_link, args_message(submitted.job, 0, [7]))
    (task,) = [x for x in node_link.sent if type(x) is m.Task]
    node.message_received(node_link, answer_to(task))
    assert node_link.closed_with is None, node_link.closed_with
    assert "n1" in sched.nodes and not sched.nodes["n1"].inflight
    (done,) = [x for x in console_link.sent if type(x) is m.JobDone]
    assert done.state == "failed" and "results" in done.message and "lost" not in done.message
    assert console_link.closed_with is None
    assert_consistent(sched)


# --------------------------------------------------------------------------- over the wire


class _Peer:
    """A node or console speaking to a real server protocol on a StringTransport."""

    def __init__(self, factory: RemapServerFactory, role: str) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = connect(self.proto)
        self.conn = Connection(role, KEY)
        self.conn.initiate()
        self.received: list[m.Message] = []
        for _ in range(3):
            self.pump()
        assert self.proto.open and self.conn.state.value == "open"

    def send(self, msg: m.Message) -> None:
        self.conn.send(msg)
        self.pump()

    def pump(self) -> None:
        out = b"".join(bytes(p) for p in self.conn.data_to_send())
        if out:
            self.proto.dataReceived(out)
        events = self.conn.receive_data(self.transport.value())
        self.transport.clear()
        self.received += [e.message for e in events if type(e) is MessageReceived]


def test_over_the_wire_results_that_cannot_be_encoded_fail_the_job_and_keep_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real server protocols (the wire's ``send``: encode, frame, write), a node and a console:
    the console-bound ``results`` cannot be encoded. The node's answer is fully processed and
    its connection stays open; the console is told in one line, and the job holds nothing."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    node, console = _Peer(factory, "node"), _Peer(factory, "console")
    node.send(m.NodeInfo(host="h", pid=1, cores=1, memory=1 << 30))
    console.send(m.Submit(id=1, payload=b"fn", name="j"))
    console.send(args_message(-1, 0, [3]))
    node.pump()
    (task,) = [x for x in node.received if type(x) is m.Task]
    encode = m.encode

    def refusing(msg: m.Message) -> tuple[bytes, bytes]:
        if type(msg) is m.Results:
            raise LocalProtocolError("cannot encode results: too deep")
        return encode(msg)

    monkeypatch.setattr(m, "encode", refusing)
    node.send(answer_to(task))
    console.pump()
    assert not node.transport.disconnecting, "the node did nothing wrong"
    (done,) = [x for x in console.received if type(x) is m.JobDone]
    assert done.state == "failed" and done.done == 1, done
    assert "could not send results" in done.message and "too deep" in done.message
    assert not console.transport.disconnecting
    assert_consistent(factory.scheduler)
