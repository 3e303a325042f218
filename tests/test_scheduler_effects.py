"""The scheduler's one entry point: an event in, the effects it decided on out, none performed.

Pure: a Clock and links that cannot send (a bare ``object()``), so an effect that was
performed instead of returned fails the test. The runner that performs effects is tested
through the deadline and grace tests, which advance the clock.
"""

from __future__ import annotations

import pickle

import pytest
from twisted.internet.task import Clock

from protocol import messages as m
from protocol.errors import RemoteProtocolError
from remap.blobs import dumps
from remap.server.scheduler import JobPhase, Scheduler
from remap.server.scheduler.effects import (
    CancelTimer,
    Close,
    ConsoleLost,
    ConsoleSaid,
    NodeJoined,
    NodeLost,
    NodeSaid,
    Send,
    StartTimer,
    TimerFired,
)
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_scheduler import GRACE, FakeConsole, FakeNode, make
from tests.test_server_robustness import _Link
from tests.test_wire import KEY

INFO = m.NodeInfo(host="h", pid=1, cores=1, memory=1 << 30)


def _sent(effects: list, link: object) -> list[m.Message]:
    return [e.msg for e in effects if type(e) is Send and e.link is link]


def _queued_job(sched: Scheduler, n: int = 4) -> FakeConsole:
    """A job whose arguments are all in and queued, with no node to run them yet."""
    console = FakeConsole(sched, range(n), chunksize=n)
    console.feed()
    assert sched.jobs[console.job].pending_count == n
    return console


def test_node_joined_returns_the_function_a_task_and_the_deadline_sweep() -> None:
    """A node joining a cluster with queued work: the job's function, then a task with every
    argument, then the sweep timer — returned in that order, nothing sent."""
    sched, _ = make()
    console = _queued_job(sched)
    link = object()  # no send(): performing an effect would raise
    effects = sched.handle(NodeJoined("n1", link, INFO))
    load, task = _sent(effects, link)
    assert type(load) is m.JobLoad and load.job == console.job and load.payload == b"fn-blob"
    assert type(task) is m.Task and [pickle.loads(dumps(i)) for i in range(4)] == [0, 1, 2, 3]
    assert len(task.sizes) == 4
    (timer,) = [e for e in effects if type(e) is StartTimer]
    assert timer.timer.kind == "sweep"
    assert "n1" in sched.nodes and sched.jobs[console.job].running == 4


def test_a_result_becomes_results_for_the_console_and_the_end_of_the_job() -> None:
    """The last answer: results and job_done to the console, job_drop to the node."""
    sched, _ = make()
    console = _queued_job(sched, 2)
    node_link = object()
    (task,) = [msg for msg in _sent(sched.handle(NodeJoined("n1", node_link, INFO)), node_link)
               if type(msg) is m.Task]  # fmt: skip
    blobs = [dumps(0), dumps(1)]
    answer = m.TaskResult(task=task.task, sizes=[len(b) for b in blobs], payload=b"".join(blobs))
    before = len(console.link.sent)
    effects = sched.handle(NodeSaid("n1", answer))
    assert len(console.link.sent) == before, "returned, not sent"
    results, done = _sent(effects, console.link)
    assert type(results) is m.Results and list(results.answered) == [0, 1]
    assert (results.indices, results.start, results.count) == ([], 0, 2), "a run, not a list"
    assert done == m.JobDone(job=console.job, state="done", done=2, failed=0, message="")
    assert [type(x) for x in _sent(effects, node_link)] == [m.JobDrop]
    assert sched.jobs[console.job].phase is JobPhase.DONE


def test_a_console_over_its_window_is_closed_by_an_effect() -> None:
    """Arguments beyond the grant: a Close with the protocol error, the link left alone."""
    sched, _ = make()
    console = FakeConsole(sched, range(10), end=False)
    payload = dumps(1)
    too_many = console.window + 1
    msg = m.Args(job=console.job, start=0, sizes=[len(payload)] * too_many,
                 payload=payload * too_many)  # fmt: skip
    (effect,) = sched.handle(ConsoleSaid(console.link, msg))
    assert type(effect) is Close and effect.link is console.link
    assert isinstance(effect.error, RemoteProtocolError) and "window" in str(effect.error)
    assert not console.link.closed


def test_node_lost_moves_its_task_to_another_node() -> None:
    """The lost node's task goes back to the queue and out to the other node at once."""
    sched, _ = make()
    console = _queued_job(sched, 3)
    a, b = object(), object()
    sched.handle(NodeJoined("a", a, INFO))
    first = sched.handle(NodeJoined("b", b, INFO))
    assert not _sent(first, b), "all three arguments went to a in one task"
    effects = sched.handle(NodeLost("a", "cable cut"))
    assert [type(x) for x in _sent(effects, b)] == [m.JobLoad, m.Task]
    assert not _sent(effects, a) and sched.jobs[console.job].running == 3


def test_console_lost_starts_the_grace_timer_and_its_firing_cancels_the_job() -> None:
    """Console lost → a grace timer; the timer fired → the job is cancelled: the node told to
    cancel and drop it, the timer not cancelled twice. Time never moves in this test."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), end=False)
    console.feed(limit=3)
    (start,) = sched.handle(ConsoleLost(console.link))
    assert type(start) is StartTimer and start.delay == GRACE
    assert start.timer.kind == "console-grace" and start.timer.job == console.job
    assert sched.jobs[console.job].phase is JobPhase.RECEIVING
    effects = sched.handle(TimerFired(start.timer))
    assert [type(x) for x in _sent(effects, node.link)] == [m.Cancel, m.JobDrop]
    assert CancelTimer(start.timer) in effects
    job = sched.jobs[console.job]
    assert job.phase is JobPhase.CANCELLED and "disconnected" in job.message
    on_clock = [call.args[0].kind for call in clock.getDelayedCalls()]
    assert on_clock == ["sweep"], "the grace timer was returned, never started on the clock"
    assert sched.handle(TimerFired(start.timer)) == [], "a second firing changes nothing"


def test_commands_perform_their_effects_through_the_runner() -> None:
    """Called directly (as the HTTP API and the tests do), a command performs what it decided:
    kill sends job_done to the console at once."""
    sched, _ = make()
    console = FakeConsole(sched, range(5), end=False)
    sched.kill(console.job)
    assert console.done().state == "killed"


def test_a_command_keeps_its_signature_and_runs_inside_another_without_its_own_effects() -> None:
    """``command`` generates its wrapper with the method's own parameters (defaults and
    keywords as declared, so a command inside another is a plain call): outermost, the effects
    are performed and the call logged; inside an event, only added to the event's effects."""
    import inspect

    from remap.server.scheduler.effects import EventLog, command

    class Tiny:
        def __init__(self) -> None:
            self._depth, self._outbox, self.performed = 0, [], []
            self.events = EventLog(10)
            self.clock = Clock()
            self.runner = type("R", (), {"apply": lambda _, e: self.performed.extend(e)})()

        def take_effects(self) -> list:
            out, self._outbox = self._outbox, []
            return out

        @command
        def act(self, a: int, b: str = "b", *, c: int = 3) -> tuple:
            self._outbox.append((a, b, c))
            return a, b, c

    assert str(inspect.signature(Tiny.act)) == str(inspect.signature(Tiny.act.__wrapped__))
    assert "<string>" in Tiny.act.__code__.co_filename  # generated, not ``*args, **kwargs``
    tiny = Tiny()
    assert tiny.act(1) == (1, "b", 3) and tiny.performed == [(1, "b", 3)]
    assert tiny.act(2, c=5) == (2, "b", 5) and tiny.performed[-1] == (2, "b", 5)
    assert [text for _, text in tiny.events.recent()] == ["act 1", "act 2"]
    tiny._depth = 1  # inside an event: its effects wait for the event's runner
    assert tiny.act(a=7, b="x") == (7, "x", 3)
    assert tiny._outbox == [(7, "x", 3)] and len(tiny.performed) == 2


def test_the_event_log_is_bounded_and_names_each_event() -> None:
    """The log keeps the newest events only, one short line each, with the clock's time."""
    sched = Scheduler(make()[1], event_log=5)
    sched.handle(NodeJoined("n1", object(), INFO))
    for _ in range(10):
        sched.handle(NodeSaid("n1", m.Heartbeat(load=0.5)))
    entries = sched.events.recent()
    assert len(entries) == 5
    assert all(text == "node n1 heartbeat" for _, text in entries)
    sched.kill(999)
    assert sched.events.recent(1)[0][1] == "kill 999"
    sched.handle(NodeLost("n1", "x" * 100_000))  # a peer's error text: bounded per entry too
    assert len(sched.events.recent(1)[0][1]) <= 300
    # a message's line is formatted when read; what is kept holds no message (nor its payload)
    sched.node_said("n1", m.TaskResult(task=99, sizes=[3], payload=b"abc"))
    kept = sched.events.entries[-1][1]
    assert not any(isinstance(x, (m.Message, bytes, memoryview)) for x in kept)
    assert sched.events.recent(1)[0][1] == "node n1 result task=99"


def test_an_unknown_event_is_refused() -> None:
    """Anything but an event type the scheduler knows raises (a bug in the caller)."""
    sched, _ = make()
    with pytest.raises(TypeError, match="no str event"):
        sched.handle("hello")


def test_the_service_hands_peers_messages_in_as_events_and_performs_the_effects() -> None:
    """A node's and a console's messages through the server's connection handler: each is an
    event in the scheduler's log, and what it decided reached the links (a console over its
    window is closed with the protocol error by the runner, not by the handler)."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    node_link, console_link = _Link(), _Link()
    node = ServerConnection(factory)
    node.role, node.session = "node", "n1"
    node.message_received(node_link, INFO)
    console = ServerConnection(factory)
    console.role = "console"
    console.message_received(console_link, m.Submit(id=3, payload=b"fn", name="j"))
    (submitted,) = [x for x in console_link.sent if type(x) is m.Submitted]
    blob = dumps(5)
    args = m.Args(job=-3, start=0, sizes=[len(blob)], payload=blob)  # before `submitted`
    console.message_received(console_link, args)
    task = next(x for x in node_link.sent if type(x) is m.Task)
    answer = m.TaskResult(task=task.task, sizes=[len(blob)], payload=blob)
    node.message_received(node_link, answer)
    assert [list(x.answered) for x in console_link.sent if type(x) is m.Results] == [[0]]
    over = m.Args(job=submitted.job, start=1, sizes=[1] * 10**6, payload=b"x" * 10**6)
    console.message_received(console_link, over)
    assert isinstance(console_link.closed_with, RemoteProtocolError)
    log = [text for _, text in factory.scheduler.events.recent()]
    assert "node n1 joined (h, 1 cores)" in log
    assert f"console args job={submitted.job} n=1" in log
    assert f"node n1 result task={task.task}" in log


class _Recording:
    """A link that logs what it is sent, with the job's ``done`` count at that moment."""

    def __init__(self, name: str, log: list, sched: Scheduler) -> None:
        self.name, self.log, self.sched = name, log, sched

    def send(self, msg: m.Message) -> None:
        done = [j.done for j in self.sched.jobs.values()]
        self.log.append((self.name, msg, done))


def test_a_calls_two_messages_send_as_decided_in_the_order_handle_returns() -> None:
    """``console_said`` and ``node_said`` (the service's entries for a call's arguments and its
    answer) write a message as soon as it is decided, before the bookkeeping after it: the
    results reach the console before the call is counted done; and every message goes out in
    the order ``handle`` returns the same effects in (the task, the function first, grants)."""
    runs = []
    for eager in (False, True):
        sched, _ = make()
        log: list = []
        node, console = _Recording("node", log, sched), _Recording("console", log, sched)
        sched.runner.apply(sched.handle(NodeJoined("n1", node, INFO)))
        sched.submit(console, m.Submit(id=1, payload=b"fn", name="j"))
        job = next(iter(sched.jobs))
        for i in range(300):  # past the first window: grants come too
            blob = dumps(i)
            args = m.Args(job=job, start=i, sizes=[len(blob)], payload=blob)
            if eager:
                sched.console_said(console, args)
            else:
                sched.runner.apply(sched.handle(ConsoleSaid(console, args)))
            task = log[-1][1] if log[-1][0] == "node" else log[-2][1]
            assert type(task) is m.Task
            answer = m.TaskResult(task=task.task, sizes=[len(blob)], payload=blob)
            if eager:
                sched.node_said("n1", answer)
            else:
                sched.runner.apply(sched.handle(NodeSaid("n1", answer)))
        runs.append(log)
    queued, eager_log = runs
    assert [(n, msg) for n, msg, _ in queued] == [(n, msg) for n, msg, _ in eager_log]
    assert any(type(msg) is m.Grant for _, msg, _ in eager_log)
    results = [(msg, done) for n, msg, done in eager_log if type(msg) is m.Results]
    assert len(results) == 300
    # sent as decided, before their call is counted; performed after the bookkeeping, after
    assert [done for _, done in results] == [[i] for i in range(300)]
    assert [d for n, msg, d in queued if type(msg) is m.Results] == [[i + 1] for i in range(300)]
