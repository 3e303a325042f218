"""A detached job's results on the server stay within a memory budget, and none is lost.

With the journal the server holds in memory only the results it has not committed yet (a job
that reaches the budget waits for the commit); ``attach`` reads the rest back from disk a piece
at a time. Without it a job that reaches the budget runs no more calls, its status says why, and
``attach`` still gets every result kept. Measured on the scheduler's own count (``kept_bytes``,
``kept_peak``), not the process's RSS.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.task import Clock

from protocol import messages as m
from remap.blobs import split
from remap.server.journal import RETRY_MAX, Journal
from remap.server.scheduler.kept import REPLAY_BYTES
from remap.server.scheduler.policy import MAX_BATCH_RESULT_BYTES
from remap.server.scheduler.state import PREFETCH
from remap.sinks import ObjectSink
from tests.cluster_harness import ClusterFactory
from tests.test_e2e_cluster import job
from tests.test_inmemory import Cluster, attach, blob, job_run, outcome, submit
from tests.test_resume import RestartableCluster, wait_until
from tests.test_scheduler import GRACE, FakeConsole, FakeLink, FakeNode, Scheduler

BUDGET = 1024 * 1024
CORES = 2
#: what may arrive beyond the budget: the results of the tasks in flight when it is reached
IN_FLIGHT = CORES * PREFETCH * MAX_BATCH_RESULT_BYTES


def _detached(cluster: Cluster, n: int, *, hold: bool = False) -> tuple[int, object]:
    """A detached job of ``n`` 40 KiB results whose submitter left once its arguments were in."""
    cluster.scheduler.results_memory = BUDGET
    pool, _, _ = cluster.node("node-a", cores=CORES, hold=hold)
    first, pump = cluster.console("first")
    run = job_run(blob, range(n), detach=True)
    submit(first, run)
    cluster.settle()
    job = run.job_id
    assert cluster.scheduler.jobs[job].total == n, "every argument is on the server"
    assert run.stream.stored == {"job": job, "stored": True}, "and committed, it answered"
    assert run.stream.stored_event.is_set()
    pump.client.transport.loseConnection()
    cluster.settle()
    cluster.pumps.remove(pump)
    return job, pool


def _attach_all(cluster: Cluster, job: int, n: int) -> None:
    """A new console attaches and gets every result once (the sink refuses a second)."""
    second, _ = cluster.console("second")
    again = attach(second, job, job_run(blob, [], ObjectSink()))
    wait_until(cluster, lambda: again.called)
    assert outcome(again).state == "done"
    assert again.sink.value() == [blob(i) for i in range(n)]


def test_results_over_the_budget_stay_in_the_journal_and_attach_gets_each_once(
    tmp_path: Path,
) -> None:
    """1,000 results of 40 KiB (39 MiB, 39 × the budget): memory never holds more than the
    budget and what the tasks in flight bring; attach gets all of them, each once."""
    n = 1000
    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    job, _ = _detached(cluster, n)
    sched = cluster.scheduler
    wait_until(cluster, lambda: sched.jobs[job].finished)
    assert sched.jobs[job].state == "done"
    total = n * len(blob(0))
    assert sched.kept_peak <= BUDGET + IN_FLIGHT < total / 2, (sched.kept_peak, total)
    cluster.clock.advance(1)  # (the journal's last commit)
    assert sched.kept_bytes == 0 and not sched.jobs[job].kept
    _attach_all(cluster, job, n)
    assert sched.kept_bytes == 0, "a replay reads the journal, it keeps nothing"


def test_attach_after_a_restart_gets_every_result_once(tmp_path: Path) -> None:
    """Results committed before a restart (read from the journal, not into memory) and those
    after it (numbered on from the journal's last) reach a later attach once each, in order."""
    n = 400
    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    job, pool = _detached(cluster, n, hold=True)
    for _ in range(2):  # some results, committed
        pool.run_held()
        cluster.tick(0.1, cluster.pumps)
    before = cluster.scheduler.jobs[job].done
    assert 0 < before < n
    cluster.kill_server()
    cluster.start_server()
    sched = cluster.scheduler
    assert not sched.jobs[job].kept and sched.kept_bytes == 0, "nothing read into memory"
    sched.results_memory = BUDGET
    cluster.node("node-b", cores=CORES)
    wait_until(cluster, lambda: sched.jobs[job].finished)
    assert sched.jobs[job].state == "done"
    assert sched.kept_peak <= BUDGET + IN_FLIGHT
    cluster.clock.advance(1)
    assert sched.kept_bytes == 0, "every result committed, numbered after the earlier ones"
    _attach_all(cluster, job, n)
    assert sched.journal.duplicates == 0


def _journaled(tmp_path: Path) -> tuple[Scheduler, Clock]:
    clock = Clock()
    clock.advance(1000)
    sched = Scheduler(clock, console_grace=GRACE)
    sched.restore(Journal(tmp_path / "journal.sqlite", clock))
    return sched, clock


BIG = 1024 * 1024


def _twelve_detached_results(tmp_path: Path) -> tuple[Scheduler, Clock, FakeConsole, list]:
    """A journaled scheduler whose detached job delivered 12 results of ``BIG`` bytes, answered
    last first (delivery order is not index order); the order is returned."""
    sched, clock = _journaled(tmp_path)
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(12), chunksize=1, detach=True)
    console.feed()
    sched.console_lost(console.link)
    order = []
    for _ in range(12):
        task = node.held()[-1]
        order.append(node.args_of(task)[0])
        node.answer(task, fn=lambda x: bytes(BIG))
    clock.advance(1)
    return sched, clock, console, order


def test_a_replay_goes_a_step_at_a_time_in_delivery_order_and_waits_for_a_congested_console(
    tmp_path: Path,
) -> None:
    """A replay sends ``REPLAY_BYTES`` a step (the next on a timer, once a congested console
    drained, once a console that holds takes more), in the order the results were delivered,
    then ``job_done``."""
    sched, clock, console, order = _twelve_detached_results(tmp_path)
    assert sched.jobs[console.job].state == "done" and sched.kept_bytes == 0
    later = FakeLink("later")
    later.congested = False
    sched.attach(later, console.job)
    first_step = len(later.of(m.Results))
    assert 0 < first_step * BIG <= REPLAY_BYTES + BIG and not later.of(m.JobDone)
    later.congested = True
    clock.advance(0)
    assert len(later.of(m.Results)) == first_step, "a congested console gets no more"
    later.congested = False
    sched.hold(later, console.job, True)  # the attaching console holds all it will
    sched.console_congested(later, False)
    clock.advance(0)
    assert len(later.of(m.Results)) == first_step, "a console that holds gets no more"
    sched.hold(later, console.job, False)
    while not later.of(m.JobDone):
        clock.advance(0)
    assert [r.answered[0] for r in later.of(m.Results)] == order
    assert later.sent[-1] == m.JobDone(job=console.job, state="done", done=12, failed=0)


DEADLINE = 30.0


class Attached(FakeLink):
    """An attaching console that says when its first ``results`` and its ``job_done`` came
    (on the reactor's next turn: not in the middle of the step sending them)."""

    def __init__(self) -> None:
        super().__init__("attached")
        self.congested = False
        self.first: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()

    def send(self, msg: m.Message) -> None:
        from twisted.internet import reactor

        super().send(msg)
        if type(msg) is m.Results and len(self.of(m.Results)) == 1:
            reactor.callLater(0, self.first.callback, None)
        elif type(msg) is m.JobDone:
            reactor.callLater(0, self.done.callback, None)


@pytest_twisted.ensureDeferred
async def test_a_replay_reads_the_journal_off_the_reactor_thread_in_order_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 results of 1 MiB, delivered out of index order and committed, then the server
    restarted (real reactor, threaded journal): attach reads them on the journal's reader
    thread, never the reactor's (nothing is sent before the reactor turns), a step of
    ``REPLAY_BYTES`` per read; a console that holds while a read is under way gets that step
    and no more; then every result comes, in delivery order, each once, and ``job_done``."""
    from twisted.internet import reactor

    sched, clock, console, order = _twelve_detached_results(tmp_path)
    sched.stop()
    sched.journal.close()

    reactor_thread = threading.current_thread()
    threads: list[threading.Thread] = []
    read = Journal._read

    def recorded(journal: Journal, *args: Any) -> Any:
        threads.append(threading.current_thread())
        return read(journal, *args)

    monkeypatch.setattr(Journal, "_read", recorded)
    again = Scheduler(reactor, console_grace=GRACE)
    again.restore(Journal(tmp_path / "journal.sqlite", reactor, threaded=True))
    try:
        assert again.jobs[console.job].state == "done" and not again.jobs[console.job].kept
        later = Attached()
        again.attach(later, console.job)
        assert later.sent == [], "read off the reactor: nothing sent before it turns"
        again.hold(later, console.job, True)  # while the first read is under way
        await later.first.addTimeout(DEADLINE, reactor)
        first_step = len(later.of(m.Results))
        assert 0 < first_step * BIG <= REPLAY_BYTES + BIG
        await task.deferLater(reactor, 0.05, lambda: None)  # (a replay step's timer is 0 s)
        assert len(later.of(m.Results)) == first_step and len(threads) == 1, "held: no more"
        again.hold(later, console.job, False)
        await later.done.addTimeout(DEADLINE, reactor)
    finally:
        again.stop()
        again.journal.close()
    assert [r.answered[0] for r in later.of(m.Results)] == order
    assert later.sent[-1] == m.JobDone(job=console.job, state="done", done=12, failed=0)
    assert len(threads) >= 12 * BIG // REPLAY_BYTES, "a read per step"
    assert all(t is not reactor_thread and t.name == "journal-reader" for t in threads)


def test_without_a_journal_a_job_at_its_budget_is_held_and_attach_gets_what_it_kept() -> None:
    """No journal: a detached job whose results reach the budget runs no more calls, its
    status says why; attach gets every result kept, once; the job ends when killed."""
    clock = Clock()
    clock.advance(1000)
    sched = Scheduler(clock, console_grace=GRACE, results_memory=200_000)
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(40), chunksize=1, detach=True)
    console.feed()
    sched.console_lost(console.link)
    answered = 0
    while node.held():
        node.answer(node.held()[0], fn=lambda x: bytes(50_000))
        answered += 1
    job = sched.jobs[console.job]
    assert job.state == "running" and job.paused and answered < 40
    assert sched.kept_bytes == job.kept_bytes <= 200_000 + 2 * 51_000
    waiting = sched.status()[1][0].waiting
    assert waiting.startswith("held: 0 MiB of results waiting for attach"), waiting
    assert "REMAP_DETACHED_RESULTS_MEMORY" in waiting and "REMAP_JOURNAL is off" in waiting
    later = FakeLink("later")
    sched.attach(later, console.job)
    got = [i for r in later.of(m.Results) for i in r.answered]
    assert sorted(got) == list(range(answered)) and len(got) == answered
    assert all(len(b) > 50_000 for r in later.of(m.Results) for b in split(r.sizes, r.payload))
    assert not node.held(), "still held while a console is attached"
    sched.kill(console.job)
    assert later.of(m.JobDone)[0].state == "killed"


def test_without_a_journal_finished_results_are_dropped_after_their_time_and_held_jobs_go_on() -> (
    None
):
    """No journal, 300 kB for all detached jobs: job A ends holding 250 kB of results nobody
    collects, and job B is held at that budget, its status naming A's results and when they
    go. One hour (REMAP_DETACHED_RESULTS_KEEP_HOURS) after A ended, not before, and not while
    a console is being sent them (it gets them all), A's results are dropped: B goes on, A's
    status says when, and attach to A is refused with the line that says why."""
    from remap.server.service import RemapServerFactory, ServerConnection

    clock = Clock()
    clock.advance(1000)
    keep = 3600.0
    factory = RemapServerFactory(
        clock,
        b"k" * 32,
        max_frame=256 << 20,
        console_grace=GRACE,
        job_ids_from=1,
        results_memory=10**6,
        results_memory_total=300_000,
        results_keep=keep,
    )
    sched = factory.scheduler
    node = FakeNode(sched, "n", cores=1)

    def run(name: str, n: int) -> FakeConsole:
        console = FakeConsole(sched, range(n), chunksize=1, detach=True, name=name)
        console.feed()
        sched.console_lost(console.link)
        while node.held(console.job):
            node.answer(node.held(console.job)[0], fn=lambda x: bytes(50_000))
        return console

    def waiting(job: int) -> str:
        return next(j for j in sched.status()[1] if j.id == job).waiting

    a = run("a", 5)
    assert sched.jobs[a.job].state == "done" and 250_000 <= sched.kept_bytes < 300_000
    b = run("b", 20)
    job_b = sched.jobs[b.job]
    assert job_b.state == "running" and job_b.paused and job_b.done < 20
    assert "MiB of them finished jobs' results, each dropped 1 h after its job ended: REMAP_" in (
        waiting(b.job)
    ), waiting(b.job)
    clock.advance(keep - 1)
    slow = FakeLink("slow")
    slow.congested = True  # a console being sent A's results as the hour runs out
    sched.attach(slow, a.job)
    clock.advance(1)
    assert sched.jobs[a.job].kept and job_b.paused, "not while a console is being sent them"
    slow.congested = False
    sched.console_congested(slow, False)
    assert sorted(i for r in slow.of(m.Results) for i in r.answered) == list(range(5))
    assert slow.of(m.JobDone)[0].state == "done"
    assert not sched.jobs[a.job].kept and sched.kept_bytes == job_b.kept_bytes, "then dropped"
    assert not job_b.paused and node.held(b.job), "B goes on"
    assert waiting(a.job).startswith("results dropped at "), waiting(a.job)
    handler = ServerConnection(factory)
    handler.role = "console"
    later = FakeLink("later")
    handler.message_received(later, m.Attach(id=3, job=a.job))
    (refused,) = later.sent
    assert refused.code == "not-found" and refused.re == 3, refused
    assert refused.message.startswith(f"job {a.job}: its 0.2 MiB of results, which nobody "), (
        refused
    )
    assert "1 h after it ended (REMAP_DETACHED_RESULTS_KEEP_HOURS; REMAP_JOURNAL is off" in (
        refused.message
    ), refused.message
    while node.held(b.job):
        node.answer(node.held(b.job)[0])
    assert job_b.state == "done"


def test_results_a_failed_commit_left_in_memory_are_replayed_in_their_place(
    tmp_path: Path,
) -> None:
    """A commit that fails (a full disk) leaves its results in memory, not lost: attach gets
    them after the committed ones, in delivery order, each once; once the disk has room they
    are written (memory lets them go) and attach reads them all from there."""
    sched, clock = _journaled(tmp_path)
    journal = sched.journal
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(9), chunksize=1, detach=True)
    console.feed()
    sched.console_lost(console.link)
    write = journal._write

    def full_disk(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    for round_ in range(3):  # committed, failed, failed again
        journal._write = full_disk if round_ else write
        for _ in range(3):
            node.answer(node.held()[0])
        clock.advance(1)
    job = sched.jobs[console.job]
    assert job.state == "done" and sorted(job.kept) == list(range(3, 9)), "not written"

    def attached() -> list[int]:
        later = FakeLink("later")
        sched.attach(later, console.job)
        assert later.of(m.JobDone)[0].done == 9
        return [r.answered[0] for r in later.of(m.Results)]

    assert attached() == list(range(9))
    journal._write = write
    clock.advance(RETRY_MAX)
    assert not job.kept and not journal.trouble, "written once the disk had room"
    assert attached() == list(range(9))


def test_a_job_held_for_a_journal_that_cannot_write_says_why(tmp_path: Path) -> None:
    """A detached job whose results reach the budget while the journal cannot write (a full
    disk) is held, and its status line gives the journal's own line (it said "see the server
    log")."""
    sched, clock = _journaled(tmp_path)
    sched.results_memory = 1
    journal = sched.journal

    def full_disk(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(9), chunksize=1, detach=True)
    console.feed()
    sched.console_lost(console.link)
    journal._write = full_disk
    node.answer(node.held()[0])
    clock.advance(1)  # the commit fails
    node.answer(node.held()[0])  # over the budget now: held
    held = sched.jobs[console.job].full
    assert held.startswith("held: 0 MiB of results waiting for the journal to commit them ("), held
    assert journal.trouble and held.endswith(f"({journal.trouble})"), held


@pytest.mark.slow
def test_a_real_server_without_a_journal_holds_a_job_at_its_budget_and_says_so(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """remap-server with REMAP_JOURNAL=off and REMAP_DETACHED_RESULTS_MEMORY=1 MiB: ``compute
    --detach`` warns that the job is in memory only; a detached job of 40 results of 256 KiB
    stops after a few, ``status`` says it is held and why, and it
    goes no further; ``kill`` ends it."""
    cluster = make_cluster(
        1, server_env={"REMAP_JOURNAL": "off", "REMAP_DETACHED_RESULTS_MEMORY": str(1 << 20)}
    )
    detached = job(tmp_path, "kibibytes", args=[256] * 40, chunksize=1)
    began = cluster.console("compute", str(detached), "--detach", "--json", timeout=60)
    summary = json.loads(cluster.assert_ok(began).stdout)
    job_id = summary["job"]
    why = "the server keeps no journal (REMAP_JOURNAL is off): a restart forgets the job"
    assert summary["stored"] is False and summary["why"] == why, summary
    assert f"warning: job {job_id}'s arguments are not on the server's disk: {why}" in began.stderr

    def held() -> dict[str, Any] | None:
        status = json.loads(cluster.assert_ok(cluster.console("status", "--json")).stdout)
        state = next(j for j in status["jobs"] if j["id"] == job_id)
        return state if state["waiting"].startswith("held: ") else None

    state = cluster.wait_for(held, 60, "the detached job to be held")
    assert "REMAP_DETACHED_RESULTS_MEMORY" in state["waiting"], state
    # 1 MiB is four results; past it only the calls in flight on the one core (two at most)
    assert state["state"] == "running" and state["done"] <= 6, state
    assert held()["done"] <= 6, "a held job runs no more calls"
    cluster.assert_ok(cluster.console("kill", str(job_id)))
