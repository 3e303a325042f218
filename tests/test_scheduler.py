"""The scheduler alone: fake links record what it sends, a Clock moves time.

Every test drives :class:`remap.server.scheduler.Scheduler` with the wire messages a
node or a console would send and reads back the messages it sends, so what is
asserted is the behaviour a peer sees, not the scheduler's internals (except where a
bound on internal memory is the point). Nodes speak through the scheduler's events
(``handle`` returns effects, the runner performs them, as the service does); consoles
call its commands, whose error answers the tests read.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from protocol import messages as m
from protocol.status import ABSENT
from remap.blobs import dumps, split
from remap.server import scheduler as sched_mod
from remap.server.scheduler import (
    MAX_BATCH_BYTES,
    PREFETCH,
    TARGET_BATCH_SECONDS,
    Scheduler,
)
from remap.server.scheduler.effects import NodeJoined, NodeLost, NodeSaid

GRACE = 10.0


# ============================================================================ fakes


class FakeLink:
    """A link that records every message it is asked to send."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[m.Message] = []
        self.closed = False

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def close(self, error: Any = None) -> None:
        self.closed = True

    def of(self, cls: type, job: int | None = None) -> list[Any]:
        return [x for x in self.sent if isinstance(x, cls) and (job is None or x.job == job)]

    def __repr__(self) -> str:
        return f"FakeLink({self.name})"


def square(x: Any) -> Any:
    return x * x


def event(sched: Scheduler, ev: Any) -> None:
    """What the service does with a peer's event: hand it in, perform the effects returned."""
    sched.runner.apply(sched.handle(ev))


class FakeNode:
    """A node as the scheduler sees it: a link, the tasks it holds, and answers it sends."""

    def __init__(
        self,
        sched: Scheduler,
        node_id: str,
        cores: int = 2,
        group: str | None = None,
        host: str | None = None,
        pid: int = 1000,
    ) -> None:
        self.sched = sched
        self.id = node_id
        self.cores = cores
        self.link = FakeLink(node_id)
        self.tasks: dict[int, m.Task] = {}
        self.max_held = 0
        self._seen = 0
        info = m.NodeInfo(
            host=host or f"host-{node_id}", pid=pid, cores=cores, memory=1 << 30, group=group
        )
        event(sched, NodeJoined(node_id, self.link, info))
        self.poll()

    def poll(self) -> list[m.Task]:
        """Take in what the server sent since the last poll; a Cancel drops the job's tasks."""
        for msg in self.link.sent[self._seen :]:
            if isinstance(msg, m.Task):
                self.tasks[msg.task] = msg
            elif isinstance(msg, m.Cancel):
                self.tasks = {t: task for t, task in self.tasks.items() if task.job != msg.job}
        self._seen = len(self.link.sent)
        self.max_held = max(self.max_held, len(self.tasks))
        return list(self.tasks.values())

    def held(self, job: int | None = None) -> list[m.Task]:
        return [t for t in self.poll() if job is None or t.job == job]

    def answer(
        self,
        task: m.Task,
        fn: Callable[[Any], Any] = square,
        *,
        elapsed: float = 0.0,
        raise_at: Iterable[int] = (),
    ) -> m.TaskResult:
        """Compute a task as a core would (positions in ``raise_at`` raise) and send the result."""
        self.poll()
        self.tasks.pop(task.task, None)
        blobs, errors = [], []
        fails = set(raise_at)
        for pos, blob in enumerate(split(task.sizes, task.payload)):
            if pos in fails:
                errors.append([pos, "ValueError", f"bad {pos}", "Traceback ..."])
                blobs.append(b"")
            else:
                blobs.append(dumps(fn(pickle.loads(blob))))
        msg = m.TaskResult(
            task=task.task,
            sizes=[len(b) for b in blobs],
            errors=errors,
            elapsed=elapsed,
            payload=b"".join(blobs),
        )
        event(self.sched, NodeSaid(self.id, msg))
        return msg

    def crash(self, task: m.Task, at: int = -1, reason: str = "crash") -> None:
        self.poll()
        self.tasks.pop(task.task, None)
        failed = m.TaskFailed(task=task.task, reason=reason, at=at, message="core died")
        event(self.sched, NodeSaid(self.id, failed))

    def answer_all(self, job: int | None = None, **kw: Any) -> int:
        n = 0
        for task in self.held(job):
            self.answer(task, **kw)
            n += 1
        return n

    def args_of(self, task: m.Task) -> list[Any]:
        return [pickle.loads(b) for b in split(task.sizes, task.payload)]


class FakeConsole:
    """A console: submits one job and sends its arguments only as the server grants."""

    def __init__(
        self,
        sched: Scheduler,
        values: Iterable[Any] = (),
        *,
        name: str = "console",
        end: bool = True,
        **params: Any,
    ) -> None:
        self.sched = sched
        self.link = FakeLink(name)
        self.values = list(values)
        self.sent = 0
        self.ended = False
        self.end = end
        self.errors: list[str] = []
        params.setdefault("name", "test-job")
        params.setdefault("payload", b"fn-blob")  # (the job's function, pickled)
        sched.submit(self.link, m.Submit(id=7, **params))
        (submitted,) = self.link.of(m.Submitted)
        assert submitted.re == 7
        self.job = submitted.job
        self.window = submitted.window

    @property
    def granted_total(self) -> int:
        return self.window + sum(g.count for g in self.link.of(m.Grant, self.job))

    @property
    def allowance(self) -> int:
        return self.granted_total - self.sent

    def feed(self, limit: int | None = None) -> int:
        """Send as many arguments as granted (at most ``limit``); end when all are sent."""
        n = min(self.allowance, len(self.values) - self.sent)
        if limit is not None:
            n = min(n, limit)
        if n > 0:
            self.send_args(self.values[self.sent : self.sent + n])
        if self.end and not self.ended and self.sent == len(self.values):
            self.ended = True
            error = self.sched.args_ended(self.link, m.ArgsEnd(job=self.job, total=self.sent))
            assert error is None, error
        return n

    def send_args(self, values: list[Any]) -> str | None:
        blobs = [dumps(v) for v in values]
        return self.send(
            m.Args(
                job=self.job,
                start=self.sent,
                sizes=[len(b) for b in blobs],
                payload=b"".join(blobs),
            )
        )

    def send(self, msg: m.Args) -> str | None:
        """Send one ``args`` message; count its arguments as sent unless it was refused."""
        error = self.sched.args_received(self.link, msg)
        if error is None:
            self.sent += msg.count
        else:
            self.errors.append(error)
        return error

    def outcomes(self) -> dict[int, list[tuple[str, Any]]]:
        """Every delivery per index: ("ok", value) or ("error", type name)."""
        out: dict[int, list[tuple[str, Any]]] = {}
        for r in self.link.of(m.Results, self.job):
            errors = {e[0]: e for e in r.errors}
            for pos, (index, blob) in enumerate(
                zip(r.answered, split(r.sizes, r.payload), strict=True)
            ):
                entry = ("error", errors[pos][1]) if pos in errors else ("ok", pickle.loads(blob))
                out.setdefault(index, []).append(entry)
        return out

    def done(self) -> m.JobDone | None:
        dones = self.link.of(m.JobDone, self.job)
        assert len(dones) <= 1, dones
        return dones[0] if dones else None


def make() -> tuple[Scheduler, Clock]:
    clock = Clock()
    clock.advance(1000)
    return Scheduler(clock, console_grace=GRACE), clock


def run_to_end(
    nodes: list[FakeNode], consoles: list[FakeConsole], rounds: int = 10_000, **kw: Any
) -> None:
    """Answer every task and feed every console until no message moves."""
    for _ in range(rounds):
        moved = sum(c.feed() for c in consoles if not c.ended or c.allowance)
        for node in nodes:
            if node.id in node.sched.nodes:
                moved += node.answer_all(**kw)
        if not moved:
            return
    raise AssertionError("the job did not settle")


def assert_exactly_once(console: FakeConsole, n: int) -> dict[int, tuple[str, Any]]:
    outcomes = console.outcomes()
    assert sorted(outcomes) == list(range(n)), f"missing {set(range(n)) - set(outcomes)}"
    twice = {i: o for i, o in outcomes.items() if len(o) != 1}
    assert not twice, f"delivered more than once: {twice}"
    return {i: o[0] for i, o in outcomes.items()}


# ============================================================================ credits


def test_node_never_holds_more_than_its_credit() -> None:
    """A node holds at most cores × PREFETCH tasks; each answer frees exactly one slot."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=3)
    console = FakeConsole(sched, range(200), chunksize=1)
    console.feed()
    limit = 3 * PREFETCH
    assert len(node.held()) == limit
    for _ in range(50):
        first = node.held()[0]
        node.answer(first)
        held = node.held()
        assert len(held) == limit, "an answer must free credit that is used again at once"
        assert first.task not in {t.task for t in held}
        console.feed()
    assert node.max_held == limit


def test_two_nodes_share_a_job_and_each_loads_the_function_once() -> None:
    """Both nodes get tasks of one job; each receives the job's function exactly once."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=2), FakeNode(sched, "b", cores=2)
    console = FakeConsole(sched, range(300), chunksize=5)
    console.feed()
    assert a.held() and b.held(), "both nodes must get work"
    run_to_end([a, b], [console])
    results = assert_exactly_once(console, 300)
    assert results == {i: ("ok", i * i) for i in range(300)}
    for node in (a, b):
        loads = node.link.of(m.JobLoad, console.job)
        assert len(loads) == 1 and loads[0].payload == b"fn-blob"
        tasks = node.link.of(m.Task, console.job)
        assert len(tasks) > 1
        first_task = next(i for i, x in enumerate(node.link.sent) if isinstance(x, m.Task))
        assert node.link.sent.index(loads[0]) < first_task, "the function must arrive before tasks"
    assert console.done() == m.JobDone(
        job=console.job, state="done", done=300, failed=0, message=""
    )


def test_function_shipped_once_per_node_per_job() -> None:
    """Two jobs on one node: one JobLoad per job; a JobDrop when each job ends."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    c1 = FakeConsole(sched, range(40), chunksize=2, name="c1")
    c2 = FakeConsole(sched, range(40), chunksize=2, name="c2")
    run_to_end([node], [c1, c2])
    assert c1.done().state == "done" and c2.done().state == "done"
    for job in (c1.job, c2.job):
        assert len(node.link.of(m.JobLoad, job)) == 1
        assert len(node.link.of(m.JobDrop, job)) == 1
        assert len(node.link.of(m.Task, job)) == 20


# ============================================================================ batching


def test_first_batches_are_small() -> None:
    """Before any call time is known a batch is small (a measuring batch); with a timeout, one call."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(1000))
    console.feed()
    assert all(1 <= len(t.sizes) <= 16 for t in node.held())
    timed = FakeConsole(sched, range(1000), name="timed", timeout=5.0, priority=1)
    timed.feed()
    node.answer_all(console.job)
    assert [len(t.sizes) for t in node.held(timed.job)] == [1] * PREFETCH


def test_first_calls_spread_over_every_core() -> None:
    """Until a call is measured, a job of unknown size sends one call per credit, on every node.

    (It used to send a batch of 16 to one core: 8 slow calls then ran one after another.)
    """
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=2), FakeNode(sched, "b", cores=2)
    console = FakeConsole(sched, range(8), end=False)
    console.feed()
    sizes = {x.id: [len(t.sizes) for t in x.held()] for x in (a, b)}
    assert sizes == {"a": [1] * (2 * PREFETCH), "b": [1] * (2 * PREFETCH)}


def test_known_size_first_batches_hold_one_call_until_measured() -> None:
    """Before a call of a job is measured (its time and the size of its result unknown), each
    batch holds one call: a first round of 20 MiB results is a few of them, not the whole job
    in flight at once, which no flow control could hold back."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    small = FakeConsole(sched, range(8), total=8)
    small.feed()
    assert [len(t.sizes) for t in node.held(small.job)] == [1] * (2 * PREFETCH)
    run_to_end([node], [small], elapsed=1.0)
    assert small.done().state == "done"


def test_measured_result_size_bounds_the_batches() -> None:
    """Once its results are measured as large, a job's batches bring back about
    MAX_BATCH_RESULT_BYTES of them, however fast its calls are."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(1000), total=1000)
    console.feed()
    first = node.held()
    result = b"x" * (1024 * 1024)
    for task in first:
        node.answer(task, lambda _: result, elapsed=1e-6 * len(task.sizes))
    sizes = [len(t.sizes) for t in node.held()]
    assert sizes and max(sizes) <= sched_mod.policy.MAX_BATCH_RESULT_BYTES // len(result), sizes


def test_queued_calls_of_a_job_of_unknown_size_are_shared_by_the_credits() -> None:
    """Calls measured as fast and queued together (``Executor.submit``) go out as one share per
    credit, not one batch: a slow call among them holds back at most its share on its core
    while the other cores run the rest (they all waited behind it in one batch)."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(10_000), end=False)
    console.feed(limit=4)
    for task in node.held():  # measured: 0.1 ms a call, so a full batch would hold 500
        node.answer(task, elapsed=0.0001 * len(task.sizes))
    console.feed(limit=40)
    sizes = [len(t.sizes) for t in node.held()]
    assert sum(sizes) == 40 and len(sizes) == 2 * PREFETCH, sizes
    assert max(sizes) == 40 // (2 * PREFETCH), sizes


def answer_part(node: FakeNode, task: m.Task, first: int, count: int, **kw: Any) -> None:
    """Stream the answer for arguments ``first .. first + count - 1`` of a running task."""
    blobs = [
        dumps(square(pickle.loads(b)))
        for b in list(split(task.sizes, task.payload))[first : first + count]
    ]
    event(
        node.sched,
        NodeSaid(
            node.id,
            m.TaskResult(
                task=task.task,
                sizes=[len(b) for b in blobs],
                elapsed=0.5 * count,
                part=count,
                payload=b"".join(blobs),
                **kw,
            ),
        ),
    )


def test_streamed_parts_reach_the_console_while_the_batch_runs() -> None:
    """Parts of a running batch are delivered at once; the task keeps its credit until the end."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(6), chunksize=6)
    console.feed()
    (task,) = node.held()
    answer_part(node, task, 0, 2)
    assert console.outcomes() == {0: [("ok", 0)], 1: [("ok", 1)]}
    assert sched.jobs[console.job].running == 4 and console.done() is None
    answer_part(node, task, 2, 1)
    blobs = [dumps(square(v)) for v in (3, 4, 5)]
    event(
        sched,
        NodeSaid(
            "n",
            m.TaskResult(task=task.task, sizes=[len(b) for b in blobs], payload=b"".join(blobs)),
        ),
    )
    assert assert_exactly_once(console, 6) == {i: ("ok", i * i) for i in range(6)}
    assert console.done().state == "done"


def test_crash_after_parts_blames_the_argument_the_node_named() -> None:
    """A crash position counts from the task's first argument, parts already answered or not."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(6), chunksize=6, retries=0, on_error="continue")
    console.feed()
    (task,) = node.held()
    answer_part(node, task, 0, 3)
    node.crash(task, at=4)
    run_to_end([node], [console])
    results = assert_exactly_once(console, 6)
    assert results[4] == ("error", "CoreCrashed")
    assert all(results[i] == ("ok", i * i) for i in (0, 1, 2, 3, 5))


def test_a_streamed_part_restarts_the_deadline_of_the_rest() -> None:
    """The calls left after a part get their own deadline from the part's arrival: a batch that
    keeps streaming is never taken for a stuck one."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(20), chunksize=20, timeout=1.0)
    console.feed()
    (task,) = node.held()
    for _ in range(14):
        clock.advance(1)
    answer_part(node, task, 0, 10)
    for _ in range(10):  # the rest may take 10 x 1 s + slack from here
        clock.advance(1)
    assert not node.link.of(m.Cancel) and not sched.nodes["n"].suspect
    assert sched.jobs[console.job].running == 10


def test_a_part_covering_the_whole_rest_is_malformed() -> None:
    """A part must leave something running: one that does not drops the node, nothing is lost."""
    sched, _ = make()
    bad = FakeNode(sched, "bad", cores=1)
    console = FakeConsole(sched, range(4), chunksize=4)
    console.feed()
    (task,) = bad.held()
    answer_part(bad, task, 0, 1)
    answer_part(bad, task, 1, 3)
    assert bad.link.closed and "bad" not in sched.nodes
    good = FakeNode(sched, "good", cores=1)
    run_to_end([good], [console])
    assert assert_exactly_once(console, 4) == {i: ("ok", i * i) for i in range(4)}


@pytest.mark.parametrize(
    "params", [{}, {"timeout": 5.0}, {"chunksize": 7}, {"gang": True}, {"total": 50}]
)
def test_the_batch_size_a_job_keeps_is_the_one_its_measures_give(params: dict) -> None:
    """``job.batch`` (read by every dispatch and window) is always ``batch_size(job)``: when
    the job starts, as call times are measured, once ``args_end`` gives its size."""
    from remap.server.scheduler.policy import batch_size

    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    values = range(params.get("total", 60))
    console = FakeConsole(sched, values, end=False, **params)
    job = sched.jobs[console.job]
    assert job.batch == batch_size(job)
    seen = set()
    for step in range(40):
        console.feed()
        for task in node.held():
            node.answer(task, elapsed=(0.001 + step * 0.0005) * len(task.sizes))
            assert job.batch == batch_size(job), step
            seen.add(job.batch)
    if not params:
        assert len(seen) > 1  # the measures changed it, and it followed
    console.end = True
    console.feed()
    assert job.total == len(values) and job.batch == batch_size(job)


@pytest.mark.parametrize("per_call", [0.001, 0.0002, 0.02, 0.2])
def test_batch_size_adapts_to_target_seconds(per_call: float) -> None:
    """After results with elapsed times, batches hold about TARGET_BATCH_SECONDS of work."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(200_000), end=False)
    console.feed()
    for _ in range(30):
        for task in node.held():
            node.answer(task, elapsed=per_call * len(task.sizes))
        console.feed()
    expected = max(1, round(TARGET_BATCH_SECONDS / per_call))
    sizes = [len(t.sizes) for t in node.held()]
    assert sizes and all(abs(s - expected) <= max(1, expected * 0.05) for s in sizes), (
        sizes,
        expected,
    )


def test_chunksize_overrides_the_adaptive_size() -> None:
    """With chunksize every batch has exactly that many arguments, whatever the call times."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(7 * 40), chunksize=7)
    sizes = []
    for _ in range(100):
        console.feed()
        held = node.held()
        if not held:
            break
        for task in held:
            sizes.append(len(task.sizes))
            node.answer(task, elapsed=0.00001)
    assert sizes == [7] * 40
    assert console.done().state == "done"


def test_big_arguments_travel_alone() -> None:
    """A 3 MiB argument is never batched with another (MAX_BATCH_BYTES caps a batch's payload)."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    big = [bytes([i]) * (3 * 1024 * 1024) for i in range(6)]
    console = FakeConsole(sched, big)
    console.feed()
    seen = 0
    for _ in range(10):
        for task in node.held():
            assert len(task.sizes) == 1
            node.answer(task, fn=len)
            seen += 1
    assert seen == 6
    assert assert_exactly_once(console, 6) == {i: ("ok", 3 * 1024 * 1024) for i in range(6)}


def test_batch_payload_stays_under_max_batch_bytes() -> None:
    """Many mid-sized arguments are cut so a batch's payload stays within MAX_BATCH_BYTES."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    values = [b"x" * 300_000 for _ in range(40)]
    console = FakeConsole(sched, values, chunksize=1000)
    console.feed()
    counts = []
    for _ in range(20):
        for task in node.held():
            assert len(task.payload) <= MAX_BATCH_BYTES
            counts.append(len(task.sizes))
            node.answer(task, fn=len)
    assert sum(counts) == 40 and max(counts) > 1
    assert console.done().state == "done"


def test_tail_is_shared_fairly() -> None:
    """Near the end of a known-size job, batches shrink so every core's credit gets some work."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=2), FakeNode(sched, "b", cores=2)
    console = FakeConsole(sched, range(40), total=40)  # the console's size hint, as JobRun sends
    console.feed()
    first = a.held() + b.held()
    assert len(first) == 4 * PREFETCH, "every credit slot gets a batch"
    for node in (a, b):  # measured: 1 ms a call, so full batches would hold 50
        for task in node.held():
            node.answer(task, elapsed=0.001 * len(task.sizes))
    sizes = [len(t.sizes) for t in a.held() + b.held()]
    assert len(sizes) == 4 * PREFETCH, "every credit slot gets a batch"
    assert max(sizes) <= 40 // (4 * PREFETCH), "no batch beyond an equal share of what is left"
    run_to_end([a, b], [console])
    assert_exactly_once(console, 40)


def test_the_rest_of_a_small_job_of_trivial_calls_is_shared_by_both_cores() -> None:
    """After its first round a 10^4-call map of 0.25 µs calls (2.5 ms of work) goes out in
    shares of at least 0.5 ms, not as one batch to one core while the other idles."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(10_000), total=10_000)
    console.feed()
    first = node.held()
    assert sum(len(t.sizes) for t in first) == 2 * PREFETCH  # one call a batch until measured
    for task in first:
        node.answer(task, elapsed=2.5e-7 * len(task.sizes))
    sizes = [len(t.sizes) for t in node.held()]
    assert len(sizes) >= 2 and min(sizes) >= 2_000, sizes  # 0.5 ms of 0.25 µs calls at least


def test_tail_share_after_args_end() -> None:
    """Without a hint, the share applies once args_end has told the job's size."""
    sched, _ = make()
    a = FakeNode(sched, "a", cores=1)
    console = FakeConsole(sched, range(1000))
    console.feed()
    for task in a.held():  # measure: 1 ms per call, so full batches would hold 50
        a.answer(task, elapsed=0.001 * len(task.sizes))
    b = FakeNode(sched, "b", cores=1)
    run_to_end([a, b], [console], elapsed=0.0)
    last = [len(t.sizes) for x in (a, b) for t in x.link.of(m.Task)][-6:]
    assert max(last) < 50 and min(last) >= 1
    assert b.link.of(m.Task), "the late node gets part of the tail"
    assert_exactly_once(console, 1000)


# ============================================================================ windowing


def test_a_small_job_of_known_size_is_granted_whole_at_submit() -> None:
    """A 10^4-call map may send every argument once ``submitted`` names its job: no round trip
    for a grant in the middle of a small job. A large one still gets a window of batches."""
    sched, _ = make()
    FakeNode(sched, "n", cores=2)
    small = FakeConsole(sched, range(10_000), total=10_000)
    assert small.window >= 10_000
    large = FakeConsole(sched, range(10), name="large", total=10_000_000)
    assert large.window < 100_000


def test_console_never_granted_more_than_the_window() -> None:
    """Outstanding grant plus queued arguments never exceed the server's window."""
    sched, _ = make()
    console = FakeConsole(sched, range(100_000), end=False)
    job = sched.jobs[console.job]
    assert console.window == sched._window(job)
    console.feed()
    assert console.allowance == 0 and not console.link.of(m.Grant), "no node: nothing more granted"
    node = FakeNode(sched, "n", cores=4)
    for step in range(300):
        outstanding = console.allowance
        assert outstanding + job.pending_count <= sched._window(job), step
        if step % 3 == 0:
            console.feed(limit=37)
        else:
            for task in node.held()[:2]:
                node.answer(task, elapsed=0.0001 * len(task.sizes))
    assert console.link.of(m.Grant), "grants must follow as the queue drains"


def test_sending_beyond_the_grant_is_a_violation() -> None:
    """Arguments beyond the grant, out of order, or for another console's job are refused."""
    sched, _ = make()
    console = FakeConsole(sched, range(10_000), end=False)
    window = console.window
    assert console.send_args(list(range(window - 5))) is None
    error = console.send_args(list(range(6)))
    assert error is not None and "window" in error
    assert sched.jobs[console.job].received == window - 5, "refused arguments are not queued"
    bad_start = sched.args_received(
        console.link, m.Args(job=console.job, start=3, sizes=[1], payload=b"x")
    )
    assert bad_start is not None and "order" in bad_start
    other = FakeLink("intruder")
    assert (
        sched.args_received(
            other, m.Args(job=console.job, start=window - 5, sizes=[1], payload=b"x")
        )
        is not None
    )
    assert sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=3)) is not None


def test_pending_bytes_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once argument sizes are known, grants keep queued bytes within MAX_PENDING_BYTES."""
    limit = 256 * 1024
    monkeypatch.setattr(sched_mod.policy, "MAX_PENDING_BYTES", limit)
    sched, _ = make()
    node = FakeNode(sched, "n", cores=32)  # a big window: 2 × 64 credits × 16
    arg = b"y" * 1000
    console = FakeConsole(sched, [arg] * 60_000, end=False)
    job = sched.jobs[console.job]
    console.feed()  # the first window is sized before any argument size is known
    per_arg = len(dumps(arg))
    worst = 0
    for _ in range(200):
        node.answer_all(fn=len, elapsed=0.00001)
        console.feed()
        worst = max(worst, job.pending_bytes + console.allowance * per_arg)
    assert console.sent > 20_000, "the job must keep moving"
    assert worst <= limit, f"{worst} bytes queued or granted, limit {limit}"


# ============================================================================ exactly-once


def test_node_lost_mid_job_requeues_and_late_answers_are_ignored() -> None:
    """A lost node's tasks run elsewhere; its late answers afterwards deliver nothing twice."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=2), FakeNode(sched, "b", cores=2)
    console = FakeConsole(sched, range(120), chunksize=5)
    console.feed()
    lost_tasks = a.held()
    b.answer(b.held()[0])
    assert lost_tasks
    event(sched, NodeLost("a", "test: connection dropped"))
    requeued = {i for t in lost_tasks for i in a.args_of(t)}
    run_to_end([b], [console])
    for task in lost_tasks:  # a's answers arrive after the server gave up on it
        a.answer(task)
        event(sched, NodeSaid("a", m.TaskFailed(task=task.task, reason="crash", at=0)))
    results = assert_exactly_once(console, 120)
    assert results == {i: ("ok", i * i) for i in range(120)}
    ran_on_b = {i for t in b.link.of(m.Task) for i in b.args_of(t)}
    assert requeued <= ran_on_b
    assert console.done().done == 120


def test_duplicate_task_result_is_ignored() -> None:
    """A second answer to the same task id delivers nothing and changes no count."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), chunksize=5)
    console.feed()
    first = node.held()[0]
    msg = node.answer(first)
    event(sched, NodeSaid("n", msg))
    event(sched, NodeSaid("n", msg))
    run_to_end([node], [console])
    assert_exactly_once(console, 10)
    assert console.done().done == 10


def test_malformed_answer_requeues_and_drops_the_node() -> None:
    """A node answering with the wrong number of results is closed; its arguments run elsewhere."""
    sched, _ = make()
    bad, good = FakeNode(sched, "bad", cores=1), FakeNode(sched, "good", cores=1)
    console = FakeConsole(sched, range(20), chunksize=5)
    console.feed()
    task = bad.held()[0]
    event(sched, NodeSaid("bad", m.TaskResult(task=task.task, sizes=[1], payload=b"x")))
    assert bad.link.closed and "bad" not in sched.nodes
    run_to_end([good], [console])
    assert_exactly_once(console, 20)
    assert console.done().state == "done"


# ============================================================================ crash attribution


def test_crash_blames_only_the_running_argument() -> None:
    """TaskFailed(at=k) charges argument k alone; its neighbours retry free and succeed."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(5), chunksize=5, retries=1, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.crash(task, at=2)
    first, second = node.held()
    assert node.args_of(first) == [2], "the suspect retries alone"
    assert node.args_of(second) == [0, 1, 3, 4], "its neighbours travel on together"
    node.crash(second, at=0)  # argument 0's first crash: with retries=1 it is retried again
    node.crash(first, at=0)  # argument 2's second crash: beyond its retries
    run_to_end([node], [console])
    results = assert_exactly_once(console, 5)
    assert results == {
        0: ("ok", 0),
        1: ("ok", 1),
        2: ("error", "CoreCrashed"),
        3: ("ok", 9),
        4: ("ok", 16),
    }
    done = console.done()
    assert (done.state, done.done, done.failed) == ("done", 4, 1)


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_argument_fails_after_retries_plus_one_crashes(retries: int) -> None:
    """The poison argument is reported as CoreCrashed exactly on crash number retries+1."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, [7], retries=retries, on_error="continue")
    console.feed()
    for crash in range(retries + 1):
        assert not console.outcomes(), f"reported too early, after {crash} crashes"
        (task,) = node.held()
        node.crash(task, at=0)
    assert console.outcomes() == {0: [("error", "CoreCrashed")]}
    assert not node.held()
    error = console.link.of(m.Results)[0].errors[0]
    assert f"{retries + 1} time" in error[2]
    assert console.done().state == "done"


def test_timeout_reports_task_timeout_and_on_error_fail_fails_the_job() -> None:
    """reason "timeout" gives a TaskTimeout error; with on_error fail the job ends failed."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(6), retries=0, timeout=2.0, on_error="fail")
    console.feed()
    task = node.held()[0]
    culprit = node.args_of(task)[0]
    node.crash(task, at=0, reason="timeout")
    outcomes = console.outcomes()
    assert outcomes[culprit] == [("error", "TaskTimeout")]
    done = console.done()
    assert done.state == "failed" and "timed out after 2s" in done.message
    assert node.link.of(m.Cancel, console.job), "other running tasks of the job are cancelled"
    assert node.link.of(m.JobDrop, console.job)


def test_unknown_culprit_splits_the_batch() -> None:
    """TaskFailed(at=-1) re-queues every argument of the batch as its own task."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=4)
    console = FakeConsole(sched, range(4), chunksize=4, retries=1, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.crash(task, at=-1)
    held = node.held()
    assert sorted(node.args_of(t)[0] for t in held) == [0, 1, 2, 3]
    assert all(len(t.sizes) == 1 for t in held)
    run_to_end([node], [console])
    assert assert_exactly_once(console, 4) == {i: ("ok", i * i) for i in range(4)}


# ============================================================================ on_error


def test_on_error_fail_stops_the_job_at_the_first_error() -> None:
    """A raised error fails the job at once: JobDone(failed) and Cancel to nodes still running it."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(100), chunksize=10, on_error="fail")
    console.feed()
    first = node.held()[0]
    node.answer(first, raise_at=[3])
    done = console.done()
    assert done.state == "failed"
    assert f"argument {node.args_of(first)[3]} raised ValueError" in done.message
    assert node.link.of(m.Cancel, console.job) and node.link.of(m.JobDrop, console.job)
    assert not node.held(console.job)
    assert sched.jobs[console.job].pending_count == 0


def test_on_error_continue_counts_errors_and_completes() -> None:
    """With continue, raised errors are delivered per argument and the job still completes."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(50), chunksize=10, on_error="continue")
    run_to_end([node], [console], raise_at=[0])
    results = assert_exactly_once(console, 50)
    failed = {i for i, (kind, _) in results.items() if kind == "error"}
    assert len(failed) == 5
    done = console.done()
    assert (done.state, done.done, done.failed) == ("done", 45, 5)


# ============================================================================ kill


def test_kill_drops_queue_cancels_nodes_and_frees_credit() -> None:
    """Killing a job: its queue goes, its nodes get Cancel and JobDrop, the next job runs."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    first = FakeConsole(sched, range(500), chunksize=5, name="first", priority=5)
    first.feed()
    second = FakeConsole(sched, range(10), chunksize=5, name="second")
    second.feed()
    doomed = node.held()
    assert {t.job for t in doomed} == {first.job}
    assert sched.kill(first.job) is not None
    assert first.done().state == "killed"
    assert node.link.of(m.Cancel, first.job) and node.link.of(m.JobDrop, first.job)
    assert sched.jobs[first.job].pending_count == 0
    assert {t.job for t in node.held()} == {second.job}, "the freed credit goes to the next job"
    for task in doomed:
        node.answer(task)  # late answers of the killed job
    run_to_end([node], [second])
    assert second.done().state == "done"
    assert not first.link.of(m.Results), "answers after the kill deliver nothing"
    assert not any(r.job == first.job for r in second.link.of(m.Results))
    assert sched.kill(12345) is None


# ============================================================================ console lost


def test_console_lost_cancels_after_grace() -> None:
    """A job whose console left is cancelled after console_grace, not before."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(100), chunksize=5)
    console.feed()
    sched.console_lost(console.link)
    clock.advance(GRACE - 0.5)
    assert sched.jobs[console.job].state == "running"
    clock.advance(1.0)
    assert sched.jobs[console.job].state == "cancelled"
    assert node.link.of(m.Cancel, console.job)
    assert console.done() is None, "nobody is there to tell"


def test_a_finished_jobs_log_line_puts_its_reason_in_brackets() -> None:
    """The server's line for a job that ended reads 'job N cancelled: 0 done, 0 failed (its
    console disconnected)' and a done job's ends at its counts; it read '... 0 failed its
    console disconnected' (and a done job's line ended in a space), seen on a namespace LAN."""
    from twisted.logger import capturedLogs, formatEvent

    sched, clock = make()
    FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), chunksize=5)
    console.feed()
    with capturedLogs() as events:
        sched.console_lost(console.link)
        clock.advance(GRACE + 1)
    (line,) = [formatEvent(e) for e in events if "cancelled:" in formatEvent(e)]
    assert line.endswith(" failed (its console disconnected)"), line
    sched, _clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), chunksize=5)
    with capturedLogs() as events:
        run_to_end([node], [console])
    (line,) = [formatEvent(e) for e in events if " done: " in formatEvent(e)]
    assert line.endswith("10 done, 0 failed"), repr(line)


def test_console_returning_within_grace_keeps_the_job() -> None:
    """Attaching again inside the grace period stops the cancellation."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), chunksize=5)
    console.feed()
    sched.console_lost(console.link)
    clock.advance(GRACE / 2)
    assert sched.attach(console.link, console.job) is not None
    clock.advance(GRACE * 2)
    run_to_end([node], [console])
    assert console.done().state == "done"


def test_detached_job_survives_and_replays_on_attach() -> None:
    """A detached job runs on without its console; attach replays stored results, then live ones."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(30), chunksize=5, detach=True)
    console.feed()
    sched.console_lost(console.link)
    clock.advance(GRACE * 3)
    assert sched.jobs[console.job].state == "running"
    node.answer(node.held()[0])
    node.answer(node.held()[0])
    later = FakeLink("later")
    assert sched.attach(later, console.job) is not None
    assert [len(r.answered) for r in later.of(m.Results)] == [5, 5]
    assert sched.attach(FakeLink("third"), console.job) is None, "one console at a time"
    console.link = later
    run_to_end([node], [])
    assert_exactly_once(console, 30)
    assert console.done().state == "done"


def test_finished_detached_job_replays_job_done_on_attach() -> None:
    """Attaching to a detached job that already finished replays its results and its JobDone."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=2)
    console = FakeConsole(sched, range(12), chunksize=4, detach=True)
    console.feed()
    sched.console_lost(console.link)
    run_to_end([node], [])
    assert sched.jobs[console.job].state == "done"
    assert not console.link.of(m.Results)
    console.link = FakeLink("later")
    sched.attach(console.link, console.job)
    assert_exactly_once(console, 12)
    assert console.done() == m.JobDone(job=console.job, state="done", done=12, failed=0, message="")


def test_every_attach_replays_all_of_a_detached_jobs_results() -> None:
    """Every attach replays all of a detached job's results, including those an earlier attach got."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(12), chunksize=3, detach=True)
    console.feed()
    node.answer(node.held()[0])
    assert not console.link.of(m.Results), "the submitter only feeds arguments"
    sched.console_lost(console.link)
    second = FakeLink("second")
    assert sched.attach(second, console.job) is not None
    assert len(second.of(m.Results)) == 1
    sched.console_lost(second)
    node.answer(node.held()[0])
    third = FakeLink("third")
    assert sched.attach(third, console.job) is not None
    console.link = third
    run_to_end([node], [])
    outcomes = console.outcomes()
    assert sorted(outcomes) == list(range(12)), "the third attach gets every result, once each"
    assert all(len(o) == 1 for o in outcomes.values())
    assert console.done().state == "done"


def test_detached_job_whose_console_left_before_args_end_is_cancelled() -> None:
    """Only the console had the arguments: a detached job it left unfed is cancelled after grace."""
    sched, clock = make()
    FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(1000), chunksize=5, detach=True, end=False)
    console.feed(limit=100)
    sched.console_lost(console.link)
    assert sched.attach(FakeLink("later"), console.job) is not None  # cannot send the rest
    clock.advance(GRACE + 1)
    job = sched.jobs[console.job]
    assert job.state == "cancelled" and "100 arguments" in job.message


# ============================================================================ groups


def test_job_waits_for_its_group_and_fails_after_wait_for_nodes() -> None:
    """No node of the group: a notice, then failure after wait_for_nodes seconds."""
    sched, clock = make()
    other = FakeNode(sched, "cpu", cores=2, group="cpu")
    console = FakeConsole(sched, range(10), group="gpu", wait_for_nodes=5.0)
    console.feed()
    notices = console.link.of(m.JobNotice, console.job)
    assert [n.message for n in notices] == ["waiting for nodes in group 'gpu'"]
    clock.advance(4.9)
    assert console.done() is None
    clock.advance(0.2)
    done = console.done()
    assert done.state == "failed" and "gpu" in done.message
    assert not other.link.of(m.Task) and not other.link.of(m.JobLoad)


def test_group_node_joining_lets_the_job_run_only_there() -> None:
    """A node of the job's group joining runs it; nodes of other groups never get its tasks."""
    sched, clock = make()
    other = FakeNode(sched, "cpu", cores=2, group="cpu")
    plain = FakeNode(sched, "plain", cores=2)
    console = FakeConsole(sched, range(40), chunksize=2, group="gpu", wait_for_nodes=5.0)
    console.feed()
    clock.advance(3)
    gpu = FakeNode(sched, "gpu", cores=1, group="gpu")
    clock.advance(10)
    assert console.done() is None, "the wait_for_nodes timer must not fire once a node came"
    run_to_end([other, plain, gpu], [console])
    assert console.done().state == "done"
    assert not other.link.of(m.Task) and not plain.link.of(m.Task)
    assert len(gpu.link.of(m.Task)) == 20


# ============================================================================ drain and priority


def test_draining_node_gets_no_new_tasks_but_its_results_count() -> None:
    """After drain a node receives nothing new; answers to what it held are delivered."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=1), FakeNode(sched, "b", cores=1)
    console = FakeConsole(sched, range(100), chunksize=5)
    console.feed()
    held = a.held()
    assert sched.drain("host-a") is a.sched.nodes["a"]
    tasks_before = len(a.link.of(m.Task))
    for task in held:
        a.answer(task)
    run_to_end([b], [console])
    assert len(a.link.of(m.Task)) == tasks_before
    assert_exactly_once(console, 100)
    assert sched.drain("nonexistent") is None


def test_draining_the_last_node_tells_the_console() -> None:
    """When every node drains, a running job's console hears that it waits for nodes."""
    sched, _ = make()
    FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(100), chunksize=5)
    console.feed()
    assert not console.link.of(m.JobNotice)
    sched.drain("n")
    notices = [n.message for n in console.link.of(m.JobNotice, console.job)]
    assert notices == ["waiting for nodes (every node is draining)"]
    FakeNode(sched, "fresh", cores=1)
    assert sched.jobs[console.job].waiting == ""


def test_the_job_table_shows_the_hinted_total_before_the_arguments_end() -> None:
    """A job submitted with a known size (an args_range) shows that total while its arguments are
    still arriving; one without a hint shows none until args_end."""
    sched, _ = make()
    FakeNode(sched, "n", cores=1)
    hinted = FakeConsole(sched, range(1000), total=1000, end=False)
    hinted.feed(limit=10)
    unknown = FakeConsole(sched, range(1000), end=False, name="other")
    unknown.feed(limit=10)
    now = sched.clock.seconds()
    assert sched.jobs[hinted.job].describe(now).total == 1000
    assert sched.jobs[unknown.job].describe(now).total is None


def test_an_undrained_node_takes_work_again() -> None:
    """undrain reverses drain: the waiting job's only node gets batches again and it finishes;
    the node process is no longer remembered as drained, and an unknown node is None."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    sched.drain("n")
    console = FakeConsole(sched, range(20), chunksize=5)
    console.feed()
    assert node.held() == []
    assert sched.undrain("host-n") is sched.nodes["n"]
    assert not sched.nodes["n"].draining and sched.jobs[console.job].waiting == ""
    run_to_end([node], [console])
    assert_exactly_once(console, 20)
    assert sched.undrain("nonexistent") is None


def test_higher_priority_job_goes_first() -> None:
    """With two jobs queued, the higher priority job's batches are dispatched first."""
    sched, _ = make()
    low = FakeConsole(sched, range(50), chunksize=5, name="low", priority=0)
    high = FakeConsole(sched, range(50), chunksize=5, name="high", priority=3)
    low.feed()
    high.feed()
    node = FakeNode(sched, "n", cores=1)
    order = []
    for _ in range(30):
        held = node.held()
        if not held:
            break
        order.append(held[0].job)
        node.answer(held[0])
    assert order[:10] == [high.job] * 10
    assert order[10:] == [low.job] * 10


# ============================================================================ status


def test_status_lists_nodes_and_jobs_with_documented_keys() -> None:
    """status() describes every node and job with the keys the console and README rely on."""
    sched, clock = make()
    node = FakeNode(sched, "n", cores=3, group="g")
    console = FakeConsole(sched, range(20), chunksize=2)
    console.feed()
    clock.advance(2)
    node.answer(node.held()[0])
    records = sched.status()  # the maps status_reply carries
    nodes, jobs = [n.to_wire() for n in records[0]], [j.to_wire() for j in records[1]]
    server = records[2].to_wire()
    assert set(nodes[0]) >= {
        "id",
        "host",
        "pid",
        "cores",
        "busy",
        "tasks_in_flight",
        "memory",
        "load",
        "group",
        "draining",
        "connected_for",
        "tasks_done",
    }
    assert set(jobs[0]) >= {
        "id",
        "name",
        "state",
        "mode",
        "group",
        "total",
        "received",
        "queued",
        "running",
        "done",
        "failed",
        "rate",
        "elapsed",
        "waiting",
        "detached",
        "attached",
        "message",
    }
    assert set(server) >= {"uptime", "cores", "cpu_seconds"}
    n, j = nodes[0], jobs[0]
    assert (n["id"], n["cores"], n["group"], n["tasks_done"], n["connected_for"]) == (
        "n",
        3,
        "g",
        1,
        2.0,
    )
    assert n["tasks_in_flight"] == 3 * PREFETCH and n["busy"] == 3
    assert (j["id"], j["name"], j["state"], j["total"], j["received"]) == (
        console.job,
        "test-job",
        "running",
        20,
        20,
    )
    assert j["done"] == 2 and j["running"] == 12 and j["queued"] == 6 and j["attached"]
    assert server["cores"] == 3


# ============================================================================ property


_ANSWER = st.tuples(st.just("answer"), st.integers(0, 9), st.integers(0, 9), st.floats(0, 0.01))
_CRASH = st.tuples(
    st.just("crash"),
    st.integers(0, 9),
    st.integers(0, 9),
    st.integers(-1, 9),
    st.sampled_from(["crash", "timeout"]),
)
_FEED = st.tuples(st.just("feed"), st.integers(1, 40))
OPS = st.one_of(  # repeated entries weigh the common events
    _ANSWER,
    _ANSWER,
    _ANSWER,
    _CRASH,
    _CRASH,
    _FEED,
    _FEED,
    st.tuples(st.just("join"), st.integers(1, 3)),
    st.tuples(st.just("lose"), st.integers(0, 9)),
    st.tuples(st.just("raise"), st.integers(0, 9), st.integers(0, 9), st.integers(0, 20)),
    st.tuples(st.just("replay"), st.integers(0, 99)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 80),
    chunksize=st.sampled_from([None, 1, 3, 8]),  # None: the adaptive size
    retries=st.integers(0, 2),
    first_cores=st.integers(1, 3),
    first_feed=st.integers(1, 80),
    ops=st.lists(OPS, max_size=60),
)
def test_random_interleavings_deliver_every_index_exactly_once(
    n: int, chunksize: int | None, retries: int, first_cores: int, first_feed: int, ops: list[tuple]
) -> None:
    """Whatever joins, losses, answers, crashes and stale replays happen, each index is delivered once."""
    sched, _ = make()
    console = FakeConsole(
        sched, range(n), chunksize=chunksize, retries=retries, on_error="continue"
    )
    nodes: list[FakeNode] = []
    stale: list[
        tuple[str, m.Message]
    ] = []  # answers that were already sent once, or from lost nodes
    serial = 0

    def live() -> list[FakeNode]:
        return [x for x in nodes if x.id in sched.nodes]

    nodes.append(FakeNode(sched, "n0", cores=first_cores))
    console.feed(limit=first_feed)
    for op in ops:
        kind = op[0]
        alive = live()
        if kind == "join":
            serial += 1
            nodes.append(FakeNode(sched, f"n{serial}", cores=op[1]))
        elif kind == "feed":
            console.feed(limit=op[1])
        elif kind == "replay" and stale:
            node_id, msg = stale[op[1] % len(stale)]
            if isinstance(msg, m.TaskResult):
                event(sched, NodeSaid(node_id, msg))
            else:
                event(sched, NodeSaid(node_id, msg))
        elif alive and kind == "lose":
            node = alive[op[1] % len(alive)]
            for task in node.held():  # what it would have answered, arriving too late
                stale.append((node.id, m.TaskFailed(task=task.task, reason="crash", at=0)))
            event(sched, NodeLost(node.id, "random loss"))
        elif alive and kind in ("answer", "raise", "crash"):
            node = alive[op[1] % len(alive)]
            held = node.held()
            if not held:
                continue
            task = held[op[2] % len(held)]
            if kind == "answer":
                stale.append((node.id, node.answer(task, elapsed=op[3] * len(task.sizes))))
            elif kind == "raise":
                stale.append((node.id, node.answer(task, raise_at=[op[3] % len(task.sizes)])))
            else:
                node.crash(task, at=op[3], reason=op[4])  # an ``at`` beyond the batch means unknown
                stale.append((node.id, m.TaskFailed(task=task.task, reason=op[4], at=0)))
        # invariant at every step: nothing delivered twice, nothing counted twice
        outcomes = console.outcomes()
        assert all(len(o) == 1 for o in outcomes.values()), outcomes
        job = sched.jobs[console.job]
        if not job.finished:
            held_args = sum(len(t.sizes) for x in live() for t in x.held())
            assert job.pending_count + job.running + job.done + job.failed == job.received
            assert job.running == held_args
    # then a healthy node finishes whatever is left
    serial += 1
    nodes.append(FakeNode(sched, f"n{serial}", cores=2))
    run_to_end(live(), [console])
    for node_id, msg in stale:
        if isinstance(msg, m.TaskResult):
            event(sched, NodeSaid(node_id, msg))
    results = assert_exactly_once(console, n)
    done = console.done()
    assert done is not None and done.state == "done"
    assert done.done + done.failed == n
    assert done.failed == sum(1 for kind, _ in results.values() if kind == "error")


def test_detached_submitter_does_not_block_an_attach_once_its_arguments_are_in() -> None:
    """While the submitter of a detached job is still connected, an attach is refused until
    every argument has arrived, then accepted; a second attacher is refused (one receiver)."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(6), chunksize=3, detach=True, end=False)
    console.feed()
    early = FakeLink("early")
    assert sched.attach(early, console.job) is None, "the submitter still owes arguments"
    assert sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=console.sent)) is None
    writer = FakeLink("writer")
    assert sched.attach(writer, console.job) is not None
    assert sched.attach(FakeLink("other"), console.job) is None, "one attached console at a time"
    node.answer(node.held()[0])
    assert [len(r.answered) for r in writer.of(m.Results)] == [3]


def test_a_drained_node_that_reconnects_stays_drained() -> None:
    """Draining is remembered per node process: its new session after a reconnect gets no work."""
    sched, _ = make()
    first = FakeNode(sched, "n", cores=1)
    assert sched.drain(first.id) is not None
    event(sched, NodeLost(first.id, "connection dropped"))
    again = FakeNode(sched, "n2", cores=1, host="host-n", pid=1000)
    FakeConsole(sched, range(10)).feed()
    assert again.held() == [], "the drained process took work after reconnecting"
    assert sched.nodes[again.id].draining


def test_finished_jobs_are_pruned_even_while_their_console_stays() -> None:
    """A long-lived console running job after job (the Python API, a bench) does not make the
    server keep every job: only the newest keep_finished finished jobs remain."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    keep = sched.keep_finished
    link = FakeLink("long-lived")
    for i in range(keep + 20):
        sched.submit(link, m.Submit(id=i, name=f"job{i}", payload=b"fn", total=1))
        job = max(sched.jobs)
        assert (
            sched.args_received(
                link, m.Args(job=job, start=0, sizes=[len(dumps(i))], payload=dumps(i))
            )
            is None
        )
        assert sched.args_ended(link, m.ArgsEnd(job=job, total=1)) is None
        node.answer_all(fn=lambda x: x)
    assert len(sched.jobs) == keep and not sched.active
    assert min(sched.jobs) == 21, "the oldest finished jobs went first"


def test_results_too_large_for_a_frame_retry_alone_then_fail_the_culprit() -> None:
    """A node reports "too-large" for a batch: every argument retries alone; the ones still too
    large after the retries end with ResultTooLarge, the others succeed; the job completes."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(4), chunksize=4, retries=1, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.crash(task, reason="too-large")
    for _ in range(20):
        held = node.held()
        if not held:
            break
        for t in held:
            if 2 in node.args_of(t):
                node.crash(t, reason="too-large")
            else:
                node.answer(t)
    outcomes = console.outcomes()
    assert sorted(outcomes) == [0, 1, 2, 3] and all(len(v) == 1 for v in outcomes.values())
    assert outcomes[2] == [("error", "ResultTooLarge")]
    assert console.done().state == "done"


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_a_lone_arguments_result_too_large_fails_at_once(on_error: str) -> None:
    """A task of one argument whose result is too large for a frame is that argument's own
    result: it fails with ResultTooLarge at the first report, not after `retries` more runs of
    the same call (4 runs of a call returning 300 MB: 11 s), and its error gives no count."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(2), chunksize=1, retries=3, on_error=on_error)
    console.feed()
    (first,) = [t for t in node.held() if 0 in node.args_of(t)]
    node.crash(first, reason="too-large")
    assert all(0 not in node.args_of(t) for t in node.held()), "the call ran again"
    assert console.outcomes()[0] == [("error", "ResultTooLarge")]
    (errors,) = [r.errors for r in console.link.of(m.Results, console.job) if 0 in r.answered]
    assert errors[0][2] == "returned a result too large to send (core died)"
    if on_error == "fail":
        done = console.done()
        assert done is not None and done.state == "failed"
    else:
        node.answer_all()
        assert console.outcomes()[1] == [("ok", 1)]
        assert console.done() is not None


def test_a_finished_detached_job_replays_to_anyone_even_while_another_console_is_attached() -> None:
    """Once a detached job is over, attach never waits for the attached console to leave:
    every attacher gets every result and the job's end."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(3), chunksize=3, detach=True)
    console.feed()
    writer = FakeLink("writer")
    assert sched.attach(writer, console.job) is not None
    node.answer_all()
    assert sched.jobs[console.job].finished and sched.jobs[console.job].console is writer
    late = FakeLink("late")
    assert sched.attach(late, console.job) is not None
    assert [len(r.answered) for r in late.of(m.Results)] == [3]
    assert [d.state for d in late.of(m.JobDone)] == ["done"]


# ============================================================================ gang jobs


def test_gang_calls_go_one_per_idle_core_never_queued_behind_another_call() -> None:
    """A gang job (vertex workers) gets one call per task, only onto a node with an idle core:
    with two one-core nodes, both calls run at once instead of one waiting behind the other."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=1), FakeNode(sched, "b", cores=1)
    console = FakeConsole(sched, range(3), gang=True)
    console.feed()
    assert [len(t.sizes) for t in a.held()] == [1] and [len(t.sizes) for t in b.held()] == [1]
    (lost,) = b.held()
    event(sched, NodeLost("b", "gone"))
    assert len(a.held()) == 1, "the lost call waits for an idle core, not on a busy one"
    a.answer(a.held()[0])
    assert len(a.held()) == 1
    run_to_end([a], [console])
    assert_exactly_once(console, 3)
    assert lost.task not in {t.task for t in a.held()}


def test_gang_job_status_names_its_calls_in_flight_and_not_one_a_lost_node_took() -> None:
    """A gang job's status lists the argument index of each call in flight (a vertex worker's
    slot): the call a lost node took back is missing, so its driver knows exactly which worker
    was lost. Other jobs' records have no such list."""
    sched, _ = make()
    for host in "ab":
        FakeNode(sched, host, cores=1)
    console = FakeConsole(sched, range(2), gang=True)
    plain = FakeConsole(sched, range(1))
    console.feed()
    plain.feed()
    calls = {j.id: j.calls for j in sched.status()[1]}
    assert calls[console.job] == [0, 1] and calls[plain.job] is ABSENT
    (index,) = (t.segment.indices[0] for t in sched.nodes["b"].inflight.values())
    event(sched, NodeLost("b", "gone"))
    status = {j.id: j for j in sched.status()[1]}
    assert status[console.job].calls == [1 - index] and status[console.job].running == 1
    assert status[console.job].to_wire()["calls"] == [1 - index]


def test_gang_call_waits_for_a_node_whose_cores_run_other_jobs() -> None:
    """A node whose cores are all taken by another job's calls gets no gang call until one ends."""
    sched, _ = make()
    node = FakeNode(sched, "a", cores=1)
    other = FakeConsole(sched, range(1), chunksize=1)
    other.feed()
    gang = FakeConsole(sched, range(1), gang=True)
    gang.feed()
    assert [t.job for t in node.held()] == [other.job]
    node.answer_all()
    assert [t.job for t in node.held()] == [gang.job]


def test_gang_calls_have_no_server_side_deadline() -> None:
    """A gang call runs for its whole job: no deadline, even once other calls were measured."""
    sched, clock = make()
    node = FakeNode(sched, "a", cores=2)
    console = FakeConsole(sched, range(2), gang=True)
    console.feed()
    first, second = node.held()
    clock.advance(5)
    node.answer(first, elapsed=0.001)
    clock.advance(100_000)
    assert [t.task for t in node.held()] == [second.task]
    assert not sched.nodes["a"].suspect


# ============================================================================ fair share by weight


def _run_shares(
    sched: Scheduler, nodes: list[FakeNode], consoles: list[FakeConsole], steps: int
) -> dict[int, list[int]]:
    """Advance time in steps: each node runs the first ``cores`` tasks it holds (one step each,
    as FIFO cores would), answers them, and the scheduler refills. Returns, per job, the cores
    it had busy at each step, and checks every step's count of tasks in flight per job."""
    busy: dict[int, list[int]] = {c.job: [] for c in consoles}
    for _ in range(steps):
        for c in consoles:
            c.feed()
        running: list[tuple[FakeNode, m.Task]] = []
        for node in nodes:
            running += [(node, t) for t in node.held()[: node.cores]]
        for job in busy:
            busy[job].append(sum(t.job == job for _, t in running))
            held = sum(t.job == job for n in nodes for t in n.held())
            assert held == sched.jobs[job].tasks
            cap = sched.jobs[job].options.max_cores
            assert not cap or held <= cap, f"job {job} holds {held} tasks, max_cores {cap}"
        for node, task in running:
            node.answer(task)
    return busy


def test_three_jobs_of_weights_1_1_2_get_2_2_4_of_8_cores_over_time() -> None:
    sched, _clock = make()
    nodes = [FakeNode(sched, "a", cores=4), FakeNode(sched, "b", cores=4)]
    n = 5000
    jobs = [
        FakeConsole(sched, range(n), name=f"c{p}{i}", chunksize=1, priority=p)
        for i, p in enumerate((0, 0, 1))
    ]
    assert [sched.jobs[c.job].weight for c in jobs] == [1.0, 1.0, 2.0]
    busy = _run_shares(sched, nodes, jobs, steps=200)
    means = [sum(b[20:]) / len(b[20:]) for b in busy.values()]  # after the first few steps
    assert [round(x, 1) for x in means] == [2.0, 2.0, 4.0], means
    status = {j.id: j for j in sched.status()[1]}
    assert [status[c.job].share for c in jobs] == [0.25, 0.25, 0.5]
    assert [status[c.job].weight for c in jobs] == [1.0, 1.0, 2.0]
    assert sum(status[c.job].cores for c in jobs) == 8


def test_max_cores_is_never_exceeded_and_the_rest_goes_to_others() -> None:
    """A heavy job (weight 4) capped at 3 cores holds at most 3 tasks in flight at every step;
    the light job takes the other 5 cores, so no core idles."""
    sched, _clock = make()
    nodes = [FakeNode(sched, "a", cores=4), FakeNode(sched, "b", cores=4)]
    capped = FakeConsole(sched, range(3000), name="h", chunksize=1, priority=2, max_cores=3)
    light = FakeConsole(sched, range(3000), name="l", chunksize=1)
    busy = _run_shares(sched, nodes, [capped, light], steps=100)
    assert max(busy[capped.job]) == 3
    assert all(a + b == 8 for a, b in zip(busy[capped.job], busy[light.job], strict=True))


def test_min_cores_comes_before_weight() -> None:
    """A job of weight 1/32 with ``min_cores: 4`` still holds 4 tasks beside a weight-32 job."""
    sched, _clock = make()
    nodes = [FakeNode(sched, "a", cores=8)]
    big = FakeConsole(sched, range(3000), name="big", chunksize=1, priority=5)
    small = FakeConsole(sched, range(3000), name="small", chunksize=1, priority=-5, min_cores=4)
    _run_shares(sched, nodes, [big, small], steps=30)
    assert sched.jobs[small.job].tasks == 4
    assert sched.jobs[big.job].tasks == 8 * PREFETCH - 4


def test_preemption_frees_cores_for_a_higher_priority_job_within_its_grace() -> None:
    """A low job fills every slot with calls that never end; a job of priority 3 (weight 8)
    arrives. Without preemption it gets nothing; with a 5 s grace it gets nothing for 5 s, then
    the low job's tasks are cancelled on the node and re-queued, and the high job takes its share
    (8 of 9 parts of 8 slots: 7). Every argument still ends delivered exactly once."""
    for grace in (None, 5.0):
        clock = Clock()
        sched = Scheduler(clock, console_grace=GRACE, preempt_grace=grace)
        node = FakeNode(sched, "n", cores=4)
        low = FakeConsole(sched, range(100), name="low", chunksize=1)
        low.feed()
        assert sched.jobs[low.job].tasks == 8
        high = FakeConsole(sched, range(40), name="high", chunksize=1, priority=3)
        high.feed()
        clock.advance(4.9)
        assert sched.jobs[high.job].tasks == 0
        clock.advance(0.2)
        if grace is None:
            assert sched.jobs[high.job].tasks == 0 and not node.link.of(m.Cancel)
            continue
        assert node.link.of(m.Cancel, low.job)
        assert sched.jobs[high.job].tasks >= 7  # its share (the tie at 8 goes to priority)
        run_to_end([node], [low, high])
        assert_exactly_once(low, 100)
        assert_exactly_once(high, 40)


def test_a_detached_job_gets_a_window_for_all_its_arguments() -> None:
    """A detached job's console leaves once every argument is in: its window is not held to a
    few batches (an attached job's is), only to the bytes bound, so ``compute --detach`` returns
    early in a long job rather than near its end."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    detached = FakeConsole(sched, range(50_000), name="d", detach=True, total=50_000)
    attached = FakeConsole(sched, range(50_000), name="a", total=50_000)
    for _ in range(3):
        detached.feed()
        attached.feed()
        node.answer_all()
    assert detached.ended, "every argument of the detached job is on the server"
    assert attached.sent < 50_000 // 2, "an attached job's window stays a few batches"


def test_a_job_every_working_node_is_left_out_of_is_not_said_to_wait_for_draining_nodes() -> None:
    """A job whose `requires` no node meets (none draining) waits with a notice saying the
    nodes are left out of it, not "(every node is draining)", which sent the user looking
    for a drain nobody made."""
    sched, _ = make()
    link = FakeLink("n")
    info = m.NodeInfo(host="host-n", pid=1, cores=1, memory=1 << 30, modules=["json"])
    event(sched, NodeJoined("n", link, info))
    console = FakeConsole(sched, range(3), requires=["notamodule_xyz"])
    (notice,) = console.link.of(m.JobNotice, console.job)
    assert (
        notice.message == "waiting for nodes (every node that takes work is left out of this job)"
    )
    assert sched.drain("n") is not None
    other = FakeConsole(sched, range(3), name="other", requires=["notamodule_xyz"])
    (notice,) = other.link.of(m.JobNotice, other.job)
    assert notice.message == "waiting for nodes (every node is draining)"


@pytest.mark.parametrize(
    ("text", "said"), [("", "KeyboardInterrupt"), ("stop", "KeyboardInterrupt: stop")]
)
def test_an_error_without_a_message_fails_the_job_with_a_tidy_line(text: str, said: str) -> None:
    """The job's line names the exception, and its message only when it has one ("raised
    KeyboardInterrupt:  (add --traceback ...)" had a dangling colon)."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(1), on_error="fail")
    console.feed()
    (task,) = node.held()
    node.poll()
    node.tasks.pop(task.task, None)
    failed = m.TaskResult(
        task=task.task, sizes=[0], errors=[[0, "KeyboardInterrupt", text, "tb"]], payload=b""
    )
    event(sched, NodeSaid(node.id, failed))
    done = console.done()
    assert done is not None and done.message == f"argument 0 raised {said}"


def test_pruning_a_job_that_kept_no_results_scans_no_active_job(monkeypatch) -> None:
    """A pruned job's kept results are let go and the jobs held over the results budget looked
    at again (a scan of every active job); an attached job keeps none, so with hundreds of
    jobs queued each job's end scanned them all for nothing. Only a job that kept some makes
    the scan; pruning goes on as before."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    link = FakeLink("long-lived")
    scans: list[int] = []
    real = sched._unfill
    monkeypatch.setattr(sched, "_unfill", lambda: (scans.append(len(sched.active)), real()))
    for i in range(sched.keep_finished + 5):
        sched.submit(link, m.Submit(id=i, name=f"job{i}", payload=b"fn", total=1))
        job = max(sched.jobs)
        sched.args_received(link, m.Args(job=job, start=0, sizes=[len(dumps(i))], payload=dumps(i)))
        sched.args_ended(link, m.ArgsEnd(job=job, total=1))
        node.answer_all(fn=lambda x: x)
    assert len(sched.jobs) == sched.keep_finished and scans == []
    detached = sched.jobs[max(sched.jobs)]
    detached.kept_bytes, sched.kept_bytes = 100, sched.kept_bytes + 100
    sched._forget_kept(detached)
    assert scans == [0] and sched.kept_bytes == 0
