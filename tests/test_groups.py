"""Argument groups: several arguments in one pickle (protocol README, section 3).

The scheduler cuts batches only at group boundaries, explodes a group whose core crashed into
single arguments (so the culprit is found and the others are delivered once), keeps delivery
exactly-once through retries and lost nodes, and journals grouped arguments so a restarted
server resumes them. A core runs a group (or the arguments of it a retry names); a console
never sends a group past its window and never waits forever for room for one.
"""

from __future__ import annotations

import dataclasses
import mmap
import pickle
import random
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from protocol import messages as m
from protocol.options import JobOptions
from remap.api import _Feeder
from remap.blobs import split
from remap.client import JobStream
from remap.node.core import SLOT, Core
from remap.server.journal import FLUSH_INTERVAL, Journal
from remap.server.scheduler import Scheduler
from remap.shipping import function_blob
from remap.sinks import ObjectSink
from tests.test_inmemory import Cluster, SinkRun, call_soon, outcome, submit
from tests.test_scheduler import GRACE, FakeConsole, FakeLink, FakeNode, make, square


def task_groups(task: m.Task) -> list[list[Any]]:
    """The arguments a task runs, per pickle, as a core takes them (``skip``, ``count``)."""
    pickles = [pickle.loads(b) for b in split(task.sizes, task.payload)]
    if not task.groups:
        return [[p] for p in pickles]
    skip = task.skip
    left = task.count if task.count >= 0 else sum(task.groups) - skip
    out = []
    for group in pickles:
        group, skip = group[skip:], 0
        group = group[:left]
        left -= len(group)
        out.append(group)
    return out


class GroupNode(FakeNode):
    """A node whose cores take argument groups and mark a group once, as ``core.py`` does: a
    value in ``deadly`` kills the core, reported at its group's first position with its span."""

    def run(self, task: m.Task, deadly: set[Any] = frozenset()) -> bool:
        """Answer (or crash) one task; True if it crashed."""
        self.poll()
        self.tasks.pop(task.task, None)
        results: list[Any] = []
        pos = 0
        for group in task_groups(task):
            if any(v in deadly for v in group):
                self.sched.task_failed(
                    self.id,
                    m.TaskFailed(task=task.task, reason="crash", at=pos, span=len(group)),
                )
                return True
            results.extend(square(v) for v in group)
            pos += len(group)
        blob = pickle.dumps(results)
        self.sched.task_result(
            self.id,
            m.TaskResult(task=task.task, sizes=[len(blob)], packed=True, payload=blob),
        )
        return False


class GroupConsole(FakeConsole):
    """A console that sends its arguments in groups of ``size`` (never past its window)."""

    def __init__(self, sched: Scheduler, values: Any, *, size: int, **params: Any) -> None:
        self.size = size
        super().__init__(sched, values, **params)

    def feed(self, limit: int | None = None) -> int:
        n = min(self.allowance, len(self.values) - self.sent)
        n -= n % self.size if self.sent + n < len(self.values) else 0  # whole groups only
        if n > 0:
            self.send_args(self.values[self.sent : self.sent + n])
        if self.end and not self.ended and self.sent == len(self.values):
            self.ended = True
            assert (
                self.sched.args_ended(self.link, m.ArgsEnd(job=self.job, total=self.sent)) is None
            )
        return n

    def send_args(self, values: list[Any]) -> str | None:
        groups = [values[i : i + self.size] for i in range(0, len(values), self.size)]
        blobs = [pickle.dumps(g) for g in groups]
        msg = m.Args(
            job=self.job,
            start=self.sent,
            sizes=[len(b) for b in blobs],
            groups=[len(g) for g in groups],
            payload=b"".join(blobs),
        )
        return self.send(msg)

    def outcomes(self) -> dict[int, list[tuple[str, Any]]]:
        out: dict[int, list[tuple[str, Any]]] = {}
        for r in self.link.of(m.Results, self.job):
            errors = {e[0]: e for e in r.errors}
            values = (
                pickle.loads(r.payload)
                if r.packed
                else [pickle.loads(b) if len(b) else None for b in split(r.sizes, r.payload)]
            )
            for pos, (index, value) in enumerate(zip(r.answered, values, strict=True)):
                entry = ("error", errors[pos][1]) if pos in errors else ("ok", value)
                out.setdefault(index, []).append(entry)
        return out


def drive(
    nodes: list[GroupNode], consoles: list[GroupConsole], deadly: set[Any] = frozenset()
) -> None:
    for _ in range(10_000):
        moved = sum(c.feed() for c in consoles)
        for node in nodes:
            for task in node.held():
                node.run(task, deadly)
                moved += 1
        if not moved:
            return
    raise AssertionError("the job did not settle")


# ============================================================================ scheduler


def test_batches_are_cut_only_at_group_boundaries() -> None:
    """Whatever the batch size (adaptive, a chunksize smaller than a group, the tail shared out),
    every task carries whole groups, byte for byte as the console pickled them."""
    for chunksize in (None, 3, 10):
        sched, _ = make()
        nodes = [GroupNode(sched, f"n{i}", cores=2) for i in range(3)]
        console = GroupConsole(sched, range(700), size=7, total=700, chunksize=chunksize)
        sent = {bytes(pickle.dumps(list(range(i, min(i + 7, 700))))) for i in range(0, 700, 7)}
        drive(nodes, [console])
        tasks = [t for n in nodes for t in n.link.of(m.Task)]
        assert tasks and all(t.skip == 0 and t.count == sum(t.groups) for t in tasks)
        for task in tasks:
            assert {bytes(b) for b in split(task.sizes, task.payload)} <= sent, "a group was cut"
        if chunksize == 3:
            assert all(t.groups == [7] for t in tasks), "a group larger than chunksize goes whole"
        assert console.outcomes() == {i: [("ok", i * i)] for i in range(700)}
        assert console.done().state == "done"


def test_a_crash_inside_a_group_reruns_its_arguments_alone_and_finds_the_culprit() -> None:
    """The core marked group 8..15 once; argument 13 kills it. Each of 8..15 re-runs alone
    (without an attempt counted), 13 kills its core again and fails with CoreCrashed (retries=0);
    every other argument is delivered once with its result."""
    sched, _ = make()
    node = GroupNode(sched, "n1", cores=1)
    console = GroupConsole(sched, range(32), size=8, total=32, retries=0, on_error="continue")
    console.feed()
    first = node.held()  # one pickle a batch until measured
    assert [t.groups for t in first] == [[8], [8]]  # arguments 0..7, 8..15
    assert node.run(first[1], deadly={13})  # group 8..15 crashed (its position 0, span 8)
    drive([node], [console], deadly={13})
    runs = [t for t in node.link.of(m.Task) if t.count == 1]
    assert all(t.groups == [8] for t in runs)  # the group's own pickle, one argument of it
    # each of 8..15 alone, once: 13's crash alone is its first counted attempt (retries=0)
    assert sorted(t.skip for t in runs) == list(range(8))
    out = console.outcomes()
    assert out[13] == [("error", "CoreCrashed")]
    assert {i: v for i, v in out.items() if i != 13} == {
        i: [("ok", i * i)] for i in range(32) if i != 13
    }
    assert console.done().state == "done" and console.done().failed == 1


def test_exactly_once_with_group_crashes_retries_and_lost_nodes() -> None:
    """Random groups, random crashes (deadly arguments and lost nodes), retries=2: every
    argument's outcome is delivered once; a deadly one fails, every other one succeeds."""
    rng = random.Random(16)
    for _round in range(20):
        sched, _ = make()
        nodes = [GroupNode(sched, f"n{i}", cores=rng.randint(1, 3)) for i in range(3)]
        n = rng.randint(50, 400)
        deadly = set(rng.sample(range(n), rng.randint(0, 3)))
        console = GroupConsole(
            sched, range(n), size=rng.randint(2, 12), total=n, retries=2, on_error="continue"
        )
        for _ in range(10_000):
            moved = console.feed()
            for node in list(nodes):
                for task in node.held():
                    moved += 1
                    if rng.random() < 0.03 and len(nodes) > 1:  # the node is lost
                        nodes.remove(node)
                        sched.remove_node(node.id, "lost")
                        nodes.append(GroupNode(sched, f"{node.id}x", cores=2))
                        break
                    node.run(task, deadly)
            if not moved:
                break
        out = console.outcomes()
        assert sorted(out) == list(range(n))
        for i, entries in out.items():
            assert entries == ([("error", "CoreCrashed")] if i in deadly else [("ok", i * i)])
        assert console.done().state == "done"


def test_the_journal_resumes_grouped_arguments_exactly_once(tmp_path: Path) -> None:
    """A detached job sends groups; a group crashes (so pieces of groups are queued), some
    outcomes are committed, the server dies. The restarted server resumes exactly the arguments
    whose outcome was not committed (inside groups too), and every result is stored once."""
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    clock.advance(1000)
    sched = Scheduler(clock, console_grace=GRACE)
    sched.restore(Journal(path, clock))
    n = 120
    console = GroupConsole(sched, range(n), size=6, total=n, detach=True, chunksize=12)
    node = GroupNode(sched, "n1", cores=2)
    while console.feed():
        pass
    node.run(node.held()[0], deadly={3})  # group 0..5 explodes into six single retries
    for _ in range(20):  # deliver what lies below 48, except argument 3...
        for task in node.held():
            args = [v for g in task_groups(task) for v in g]
            if 3 not in args and min(args) < 48:
                node.run(task)
    clock.advance(FLUSH_INTERVAL)  # ...and commit it
    committed = {i for _, r in sched.journal.results(console.job) for i in r.answered}
    assert {0, 1, 2, 4, 5} <= committed and 3 not in committed
    late = next(t for t in node.held() if 3 not in [v for g in task_groups(t) for v in g])
    node.run(late)  # delivered, not committed: lost with the server
    assert 0 < sched.jobs[console.job].done < n

    clock2 = Clock()
    clock2.advance(2000)
    again = Scheduler(clock2, console_grace=GRACE)
    again.restore(Journal(path, clock2))
    job = again.jobs[console.job]
    pending = sorted(i for seg in job.pending for i in seg.indices)
    assert len(pending) == len(set(pending)) and not set(pending) & committed
    assert set(pending) | committed == set(range(n))
    assert any(seg.skip or seg.tail for seg in job.pending), "a piece of a group resumed"
    node2 = GroupNode(again, "n2", cores=2)
    drive([node2], [])
    assert job.state == "done", job.message
    stored: dict[int, list[Any]] = {}
    attacher = FakeLink("attach")
    again.attach(attacher, console.job)
    for r in attacher.of(m.Results, console.job):
        values = pickle.loads(r.payload) if r.packed else [pickle.loads(r.payload)]
        for index, value in zip(r.answered, values, strict=True):
            stored.setdefault(index, []).append(value)
    assert stored == {i: [i * i] for i in range(n)}, "an argument lost or delivered twice"
    clock2.advance(FLUSH_INTERVAL)
    assert again.journal.duplicates == 0


# ============================================================================ core


def _core(fn: Any) -> Core:
    core = Core(mmap.mmap(-1, SLOT.size))
    core.load(m.CoreLoad(job=1, payload=function_blob(fn)))
    return core


def inverse(x: int) -> float:
    return 1 / x


def test_a_core_runs_groups_and_the_arguments_a_retry_names() -> None:
    groups = [[1, 2, 3], [0, 5], [6, 7, 8, 9]]
    blobs = [pickle.dumps(g) for g in groups]
    payload = b"".join(blobs)
    cmd = m.Task(task=3, job=1, sizes=[len(b) for b in blobs], groups=[3, 2, 4], payload=payload)
    reply = _core(inverse).run(cmd)
    assert reply.packed and len(pickle.loads(reply.payload)) == 9
    assert [e[:2] for e in reply.errors] == [[3, "ZeroDivisionError"]]
    # a retry inside groups: skip 2 of the first, run 4 (3 | 0, 5 | 6)
    reply = _core(inverse).run(dataclasses.replace(cmd, skip=2, count=4))
    values = pickle.loads(reply.payload)
    assert len(values) == 4 and values[0] == 1 / 3 and values[3] == 1 / 6
    assert [e[:2] for e in reply.errors] == [[1, "ZeroDivisionError"]]
    # a group that is not a list of its size fails each of its arguments, not the batch
    bad = pickle.dumps("not a list")
    reply = _core(square).run(
        m.Task(
            task=4, job=1, sizes=[len(bad), len(blobs[0])], groups=[2, 3], payload=bad + blobs[0]
        )
    )
    assert [e[0] for e in reply.errors] == [0, 1]
    assert pickle.loads(reply.payload)[2:] == [1, 4, 9]


# ============================================================================ console ↔ server


def grouped_run(options: JobOptions, values: list[Any], size: int = 40) -> SinkRun:
    """A console job whose arguments travel in groups of ``size`` (as ``remap.api`` sends)."""
    stream = JobStream(function_blob(square), options, call_soon=call_soon, total_hint=len(values))
    groups = [values[at : at + size] for at in range(0, len(values), size)]
    stream.put_many([pickle.dumps(g) for g in groups], counts=[len(g) for g in groups])
    return SinkRun(stream, ObjectSink(), [])


def test_a_console_sending_groups_never_waits_forever_for_window() -> None:
    """Groups of 40 do not tile the first window of 256 (nor later ones): the first window
    closes on both sides when a group no longer fits, grants follow, every result arrives."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    n = 5000
    run = grouped_run(JobOptions(name="grouped"), list(range(n)))
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert (result.state, result.done) == ("done", n), result
    assert run.sink.value() == [i * i for i in range(n)]
    assert sum(pool.ran) == n


def test_a_console_resumes_a_grouped_job_after_server_restarts(tmp_path: Path) -> None:
    """The console keeps each group it sent until its results arrive; after a server restart it
    sends the arguments still lacking results again (one pickle each, taken out of its own
    groups), then new groups: every result arrives once."""
    from tests.test_resume import RestartableCluster, rejoin, run_to_end

    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    pool, _, _ = cluster.node("node-a", cores=2, hold=True)
    client = cluster.redialling_console()
    n = 3000
    run = grouped_run(JobOptions(name="grouped", chunksize=80), list(range(n)), size=7)
    d = submit(client, run)
    cluster.settle()
    pool.run_held()
    cluster.settle()
    assert 0 < run.done < n
    for restart in range(2):
        cluster.kill_server()
        cluster.tick(1.0, [])
        cluster.start_server()
        pool = rejoin(cluster, f"node-{restart}", restart + 1, client)
    result = run_to_end(cluster, pool, d)
    assert (result.state, result.done, result.failed) == ("done", n, 0), result
    assert run.sink.value() == [i * i for i in range(n)]
    assert cluster.journal.duplicates == 0


def test_a_client_keeps_what_a_resume_needs_and_forgets_what_was_answered() -> None:
    """Unanswered: the runs a resume names and the pickles it sends again (an argument of a
    group as its group's pickle and first index); an answered prefix is dropped."""
    from remap.client import Unanswered

    kept = Unanswered()
    kept.sent(0, 5, [b"a", b"b", b"c", b"d", b"e"], [])
    kept.sent(5, 6, [b"G1", b"G2"], [3, 3])
    kept.answered([0, 1, 2])
    kept.answered([7, 5])  # not in order, not a run
    assert kept.missing() == [[3, 5], [6, 7], [8, 11]]
    assert kept.kept() == [
        (3, b"d"),
        (4, b"e"),
        (6, (b"G1", 5)),
        (8, (b"G2", 8)),
        (9, (b"G2", 8)),
        (10, (b"G2", 8)),
    ]
    kept.answered([3, 4, 6, 8, 9, 10])
    assert kept.missing() == [] and kept.kept() == []
    assert not kept.chunks and not kept.done, "what was answered is not kept"


def test_a_generators_groups_run_through_the_server_without_a_total() -> None:
    """A generator's arguments (no length: the job's total is unknown) travel in groups that
    ramp up from single arguments; the server and node take them like a list's and every result
    arrives once, in order."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    n = 20_000
    stream = JobStream(function_blob(square), JobOptions(name="lazy"), call_soon=call_soon)
    _Feeder(stream, (x for x in range(n)), None, star=False, fn_name="square").top_up(0)
    assert stream.session.total_hint is None and 1 < len(stream._items) < n // 10
    run = SinkRun(stream, ObjectSink(), [])
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert (result.state, result.done) == ("done", n), result
    assert run.sink.value() == [i * i for i in range(n)]
    assert sum(pool.ran) == n
