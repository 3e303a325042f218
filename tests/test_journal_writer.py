"""The server's journal writes on a thread of its own (``threaded``), never on the reactor's.

A submit with a big function (60 MiB cloudpickled) held the reactor 0.3 s while SQLite wrote
it; now the reactor goes on (timers fire, other peers are served) while the writer writes,
and what the server acknowledges still waits for the commit. The writer here is "slow":
patched to wait on an event the test sets, so each test decides when the commit happens.
Real reactor (pytest-twisted), no real sockets: the console is a recording link.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from protocol import messages as m
from remap.server.journal import Journal
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_journal import _peek, _results
from tests.test_scheduler import FakeLink

DEADLINE = 30.0


class SlowWriter:
    """``Journal._write`` held until :attr:`release` is set; it notes the thread it ran on and
    refuses to run on the reactor's (the test's) thread, so a write there fails at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reactor_thread = threading.current_thread()
        self.writing, self.release = threading.Event(), threading.Event()
        self.threads: list[threading.Thread] = []
        write = Journal._write

        def held(journal: Journal, *args: Any) -> None:
            self.threads.append(threading.current_thread())
            if threading.current_thread() is self.reactor_thread:
                raise AssertionError("the journal was written on the reactor thread")
            self.writing.set()
            assert self.release.wait(DEADLINE), "the test never released the writer"
            write(journal, *args)

        monkeypatch.setattr(Journal, "_write", held)


class Console(FakeLink):
    """A console link that says when ``submitted`` or an error comes, and whether it is read."""

    def __init__(self) -> None:
        super().__init__("console")
        self.answered: defer.Deferred = defer.Deferred()
        self.read_again: defer.Deferred = defer.Deferred()
        self.holds: list[bool] = []

    def send(self, msg: m.Message) -> None:
        super().send(msg)
        if type(msg) in (m.Submitted, m.Error, m.Ok) and not self.answered.called:
            self.answered.callback(msg)

    def hold_reading(self, held: bool) -> None:
        self.holds.append(held)
        if not held:
            self.read_again.callback(None)


def _server(tmp_path: Path) -> tuple[RemapServerFactory, Journal, ServerConnection, Console]:
    from twisted.internet import reactor

    factory = RemapServerFactory(reactor, b"k" * 32, max_frame=256 << 20, job_ids_from=1)
    journal = Journal(tmp_path / "journal.sqlite", reactor, threaded=True)
    factory.use_journal(journal)
    handler = ServerConnection(factory)
    handler.role = "console"
    return factory, journal, handler, Console()


async def _answer(console: Console) -> m.Message:
    """The console's answer, once what waited for it was handled and it is read again."""
    from twisted.internet import reactor

    await console.read_again.addTimeout(DEADLINE, reactor)
    return await console.answered


@pytest_twisted.ensureDeferred
async def test_a_big_submit_is_written_off_the_reactor_and_acknowledged_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer holds a detached submit with a 16 MiB function, the reactor runs (a
    timer fires) and the console has heard nothing: no ``submitted``, its next messages (an
    argument sent early) wait unread, nothing is on disk. Once committed it is accepted, and
    what waited is handled after, in order."""
    from twisted.internet import reactor

    slow = SlowWriter(monkeypatch)
    factory, journal, handler, console = _server(tmp_path)
    fn = os.urandom(16 << 20)
    handler.message_received(console, m.Submit(id=1, name="big", detach=True, payload=fn))
    handler.message_received(console, m.Args(job=-1, start=0, sizes=[1, 1], payload=b"ab"))
    assert slow.writing.wait(DEADLINE)
    fired = await task.deferLater(reactor, 0.01, lambda: "fired")  # the reactor is not held
    assert fired == "fired" and slow.threads[0] is not slow.reactor_thread
    assert console.sent == [] and console.holds == [True] and not factory.scheduler.jobs
    assert _peek(journal, "SELECT COUNT(*) FROM jobs") == [(0,)]

    slow.release.set()
    submitted = await _answer(console)
    assert type(submitted) is m.Submitted and submitted.re == 1
    assert _peek(journal, "SELECT job FROM functions") == [(submitted.job,)]  # before the ack
    job = factory.scheduler.jobs[submitted.job]
    assert job.received == 2 and console.holds == [True, False]  # the early args, handled after
    journal.flush()
    assert journal.job(submitted.job).args == [(0, [1, 1], b"ab", [])]  # read after the write
    journal.close()


@pytest_twisted.ensureDeferred
async def test_a_submit_the_writer_cannot_commit_is_refused_and_its_arguments_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal that cannot be written (its file closed under it) refuses the submit with one
    line once the writer failed, as before; the arguments that waited for it are dropped
    quietly and the console is read again."""
    slow = SlowWriter(monkeypatch)
    factory, journal, handler, console = _server(tmp_path)
    journal._db.close()
    slow.release.set()
    handler.message_received(console, m.Submit(id=1, name="j", detach=True, payload=b"fn"))
    handler.message_received(console, m.Args(job=-1, start=0, sizes=[1], payload=b"a"))
    error = await _answer(console)
    assert type(error) is m.Error and error.re == 1 and error.code == "failed"
    assert "cannot write the journal" in error.message
    assert console.sent == [error] and not factory.scheduler.jobs
    assert console.holds == [True, False]


@pytest_twisted.ensureDeferred
async def test_writes_keep_their_order_and_a_close_writes_what_was_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commits handed over while the writer is busy are written after it, in order, and
    ``close`` (the server stopping) writes what was buffered and queued before it returns: a
    job submitted, its arguments and their end, its end."""
    from twisted.internet import reactor

    slow = SlowWriter(monkeypatch)
    journal = Journal(tmp_path / "journal.sqlite", reactor, threaded=True)
    now = reactor.seconds()
    first = journal.job_submitted(1, m.Submit(id=1, name="a", detach=True, payload=b"f"), now)
    assert slow.writing.wait(DEADLINE)
    journal.args_received(1, 0, [1], b"x")
    journal.args_ended(1, 1, now=True)
    journal.finished(1, "done", "", 1, 0, now)  # buffered: only close writes it
    assert not first.called
    slow.release.set()
    journal.close()
    assert _peek(journal, "SELECT id, args_total, state FROM jobs") == [(1, 1, "done")]
    assert all(t is not slow.reactor_thread for t in slow.threads) and len(slow.threads) == 3


@pytest_twisted.ensureDeferred
async def test_a_console_lost_while_its_submit_commits_is_lost_after_the_job_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console's end waits behind its submit like its messages: the job is accepted, then
    its console is gone (as if it had left just after ``submitted``: cancelled after the
    grace), not the other way round, which would leave a job fed by nobody for ever."""
    slow = SlowWriter(monkeypatch)
    factory, journal, handler, console = _server(tmp_path)
    handler.message_received(console, m.Submit(id=1, name="j", payload=b"fn"))
    assert slow.writing.wait(DEADLINE)
    handler.connection_lost(console, RuntimeError("gone"))
    slow.release.set()
    submitted = await _answer(console)
    job = factory.scheduler.jobs[submitted.job]
    assert job.console is None and job.orphan_timer is not None
    factory.scheduler.kill(job.id)  # (its grace timer is the real reactor's)
    journal.close()


@pytest_twisted.ensureDeferred
async def test_a_detached_jobs_args_end_is_answered_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``args_end`` with an id (``compute --detach`` returns on its answer): while the writer
    holds the commit of the arguments' end the reactor runs and the console hears nothing;
    once it is on disk the answer says so."""
    from twisted.internet import reactor

    slow = SlowWriter(monkeypatch)
    slow.release.set()
    factory, journal, handler, console = _server(tmp_path)
    handler.message_received(console, m.Submit(id=1, name="j", detach=True, payload=b"fn"))
    submitted = await _answer(console)
    slow.release.clear()
    slow.writing.clear()
    handler.message_received(console, m.Args(job=submitted.job, start=0, sizes=[1], payload=b"a"))
    handler.message_received(console, m.ArgsEnd(job=submitted.job, total=1, id=2))
    assert slow.writing.wait(DEADLINE)
    fired = await task.deferLater(reactor, 0.01, lambda: "fired")  # the reactor is not held
    assert fired == "fired" and not [x for x in console.sent if type(x) is m.Ok]
    answered: defer.Deferred = defer.Deferred()
    send = console.send
    console.send = lambda msg: (send(msg), type(msg) is m.Ok and answered.callback(msg))
    slow.release.set()
    ok = await answered.addTimeout(DEADLINE, reactor)
    assert ok == m.Ok(re=2, info={"job": submitted.job, "stored": True})
    assert _peek(journal, "SELECT args_total FROM jobs") == [(1,)]
    factory.scheduler.kill(submitted.job)
    journal.close()


#: a request about job 1, known only to the journal, and one about a job it never had
RECALLS = [
    m.Kill(id=7, job=1),
    m.Attach(id=7, job=1),
    m.Resume(id=7, job=1, sent=1, missing=[], done=1, failed=0),
    m.Attach(id=7, job=9),
]


@pytest.mark.parametrize("request_", RECALLS, ids=lambda msg: f"{msg.TYPE}-{msg.job}")
@pytest_twisted.ensureDeferred
async def test_a_job_only_the_journal_keeps_is_read_off_the_reactor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_: m.Message
) -> None:
    """``kill``, ``attach`` and ``resume`` of a job not in memory read the journal on its
    writer's thread after what was handed over before it (the job's end, buffered): while that
    write is held the reactor runs (a timer fires), the console hears nothing and its next
    message waits unread; then the answer is the one an inline journal (the read on the reactor,
    as before) gives, and what waited is answered after it."""
    from twisted.internet import reactor

    slow = SlowWriter(monkeypatch)
    slow.release.set()
    factory, journal, handler, console = _server(tmp_path)
    before = RemapServerFactory(reactor, b"k" * 32, max_frame=256 << 20, job_ids_from=1)
    before.use_journal(Journal(tmp_path / "journal.sqlite", reactor))  # inline: as before
    now = reactor.seconds()
    await journal.job_submitted(1, m.Submit(id=1, name="old", detach=True, payload=b"f"), now)
    slow.release.clear()
    slow.writing.clear()
    journal.finished(1, "done", "", 1, 0, now)  # buffered: the read must come after it
    handler.message_received(console, request_)
    handler.message_received(console, m.StatusRequest(id=8))
    assert slow.writing.wait(DEADLINE)
    fired = await task.deferLater(reactor, 0.01, lambda: "fired")  # the reactor is not held
    assert fired == "fired" and console.sent == [] and console.holds == [True]

    slow.release.set()
    answer = await _answer(console)
    assert type(answer) in (m.Ok, m.Error) and type(console.sent[-1]) is m.StatusReply
    assert console.holds == [True, False]
    inline = Console()
    ServerConnection(before).message_received(inline, request_)
    assert console.sent[:-1] == inline.sent  # (an attach: its replay's job_done and its Ok)
    journal.close()
    before.scheduler.journal.close()


@pytest_twisted.ensureDeferred
async def test_a_console_lost_while_its_job_is_recalled_is_lost_after_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A console that leaves while its ``attach`` waits for the journal: the attach is handled
    (its answer dropped with the link), then the console's end, which ends the replay it got."""
    slow = SlowWriter(monkeypatch)
    slow.release.set()
    factory, journal, handler, console = _server(tmp_path)
    from twisted.internet import reactor

    now = reactor.seconds()
    await journal.job_submitted(1, m.Submit(id=1, name="old", detach=True, payload=b"f"), now)
    slow.release.clear()
    journal.finished(1, "done", "", 1, 0, now)
    handler.message_received(console, m.Attach(id=7, job=1))
    assert slow.writing.wait(DEADLINE)
    handler.connection_lost(console, RuntimeError("gone"))
    slow.release.set()
    answer = await _answer(console)
    assert type(answer) is m.Ok and answer.info["state"] == "done"
    assert not factory.scheduler.jobs[1].replays  # the console's end came after
    journal.close()


def test_past_its_bound_the_queue_makes_the_caller_wait_for_the_writer() -> None:
    """Bytes handed to the writer and not yet written are bounded: past ``max_bytes`` the next
    transaction waits (on the reactor thread, as every write did before) until the writer has
    caught up, so a disk slower than the network does not grow the queue without bound."""
    from remap.server import journal as journal_mod

    release, waiting, handed = threading.Event(), threading.Event(), threading.Event()

    class Watched(threading.Condition):
        def wait_for(self, predicate: Any, timeout: float | None = None) -> bool:
            if not predicate():
                waiting.set()
            return super().wait_for(predicate, timeout)

    writer = journal_mod._Writer(lambda fire, outcome: None, max_bytes=10)
    writer._room = Watched()
    writer.run(lambda: release.wait(DEADLINE), 10)  # 10 bytes queued: at the bound
    second = threading.Thread(target=lambda: (writer.run(lambda: None, 1), handed.set()))
    second.start()
    assert waiting.wait(DEADLINE) and not handed.is_set()
    release.set()
    assert handed.wait(DEADLINE)
    second.join(DEADLINE)
    writer.close()
    assert writer.queued == 0


@pytest_twisted.ensureDeferred
async def test_a_commit_queued_behind_a_failed_one_writes_both_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit fails (a full disk) while the next, with the job's end, is already
    queued behind it on the writer thread: that next one does not write its rows alone (the
    end without the outcome before it) but the failed one's first, each once, and the journal,
    which said it could not write, can again."""
    from twisted.internet import reactor

    journal = Journal(tmp_path / "journal.sqlite", reactor, threaded=True)
    await journal.job_submitted(1, m.Submit(id=1, name="a", detach=True, payload=b"f"), 0.0)
    entered, release = threading.Event(), threading.Event()
    written: list[list[int]] = []
    write = Journal._write

    def full_once(self: Journal, extra: Any, rows: Any, *args: Any) -> None:
        if not written:
            written.append([])
            entered.set()
            assert release.wait(DEADLINE), "the test never released the writer"
            raise sqlite3.OperationalError("database or disk is full")
        written.append([seq for _, _, seq in rows.outcomes])
        write(self, extra, rows, *args)

    monkeypatch.setattr(Journal, "_write", full_once)
    saved: defer.Deferred = defer.Deferred()
    journal.on_saved = saved.callback
    journal.delivered(1, _results(1, [0]), store=True, seq=0)
    journal.flush()
    assert entered.wait(DEADLINE)
    journal.delivered(1, _results(1, [1]), store=True, seq=1)
    journal.finished(1, "done", "", 2, 0, reactor.seconds())
    journal.flush()  # queued behind the one that fails
    release.set()
    assert await saved.addTimeout(DEADLINE, reactor) == [(1, 0), (1, 1)]
    assert written == [[], [0, 1]] and journal.trouble == ""
    assert _peek(journal, "SELECT start, stop FROM outcomes ORDER BY start") == [(0, 1), (1, 2)]
    assert _peek(journal, "SELECT seq FROM results ORDER BY seq") == [(0,), (1,)]
    assert _peek(journal, "SELECT state FROM jobs") == [("done",)]
    journal.close()
