"""The server's journal alone (a temporary directory), then a scheduler restarted from it.

A "crash" here is a scheduler and journal dropped without ``close``: whatever the journal had
buffered but not committed is lost, as in a SIGKILL. The real-process version (SIGKILL of a
server process mid-job) is in ``tests/test_journal_restart.py``.
"""

from __future__ import annotations

import errno
import os
import pickle
import sqlite3
import threading
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from protocol import messages as m
from protocol.status import ABSENT
from remap.blobs import split
from remap.errors import ConfigError
from remap.server.journal import FLUSH_INTERVAL, Journal, JournalError
from remap.server.scheduler import Scheduler
from remap.settings import Settings
from tests.test_scheduler import GRACE, FakeConsole, FakeLink, FakeNode, run_to_end


def _journal(tmp_path: Path, clock: Clock | None = None, **kw) -> tuple[Journal, Clock]:
    clock = clock or Clock()
    return Journal(tmp_path / "state" / "journal.sqlite", clock, **kw), clock


def _submit(detach: bool = True, name: str = "j") -> m.Submit:
    return m.Submit(id=1, name=name, detach=detach, payload=b"fn-blob")


def _results(job: int, indices: list[int], errors: list[list] | None = None) -> m.Results:
    blobs = [pickle.dumps(i * i) for i in indices]
    return m.Results(
        job=job,
        indices=indices,
        sizes=[len(b) for b in blobs],
        errors=errors or [],
        payload=b"".join(blobs),
    )


def _peek(journal: Journal, sql: str) -> list[tuple]:
    """Read the file through a second connection: only what was committed is there."""
    with sqlite3.connect(journal.path) as other:
        return other.execute(sql).fetchall()


# ============================================================================ the journal alone


def test_the_journal_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """In a state directory others may read (systemd makes /var/lib/remap 0755), the journal
    and its -wal and -shm files are 0600: they hold jobs' functions, arguments and results.
    Files a crash left with a wider mode are narrowed when the journal opens again."""
    import os

    (tmp_path / "state").mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        journal, _ = _journal(tmp_path)
        journal.job_submitted(1, _submit(), 0.0)
        names = [journal.path.with_name(journal.path.name + s) for s in ("", "-wal", "-shm")]
        assert [oct(p.stat().st_mode & 0o777) for p in names] == ["0o600"] * 3
        for path in names:
            path.chmod(0o644)
        again, _ = _journal(tmp_path)
        assert [oct(p.stat().st_mode & 0o777) for p in names] == ["0o600"] * 3
        again.close()
        journal.close()
    finally:
        os.umask(old)


def test_a_state_dir_that_cannot_hold_the_journal_is_one_clear_error(tmp_path: Path) -> None:
    """REMAP_STATE_DIR naming a file, or a directory that cannot be made, is a ConfigError
    naming the journal (one line from remap-server), not a FileExistsError traceback."""
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "a-file" / "journal.sqlite", tmp_path / "a-file" / "x" / "j.sqlite"):
        with pytest.raises(ConfigError, match=f"cannot open the journal {path}"):
            Journal(path, Clock())


def test_file_is_wal_and_synchronous_level_is_a_setting(tmp_path: Path) -> None:
    journal, _ = _journal(tmp_path)
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    journal.close()
    full, _ = _journal(tmp_path, synchronous="full")
    assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    full.close()
    with pytest.raises(ConfigError):
        _journal(tmp_path, synchronous="sometimes")


def test_a_submit_is_committed_before_it_returns(tmp_path: Path) -> None:
    journal, _ = _journal(tmp_path)
    journal.job_submitted(5, _submit(), 1.0)
    assert _peek(journal, "SELECT id, detach FROM jobs") == [(5, 1)]


def test_outcomes_are_group_committed_in_one_transaction(tmp_path: Path) -> None:
    """A thousand deliveries wait for one commit ``FLUSH_INTERVAL`` later, not one each."""
    journal, clock = _journal(tmp_path)
    journal.job_submitted(5, _submit(), 1.0)
    before = journal.transactions
    for i in range(1000):
        journal.delivered(5, _results(5, [i]), store=True)
    assert _peek(journal, "SELECT COUNT(*) FROM outcomes") == [(0,)]  # nothing committed yet
    clock.advance(FLUSH_INTERVAL)
    assert journal.transactions == before + 1
    assert _peek(journal, "SELECT SUM(stop - start), MIN(start), MAX(stop) FROM outcomes") == [
        (1000, 0, 1000)
    ]
    assert _peek(journal, "SELECT COUNT(*) FROM results") == [(1000,)]


def test_a_full_buffer_is_committed_at_once(tmp_path: Path) -> None:
    journal, _ = _journal(tmp_path, flush_bytes=1000)
    journal.job_submitted(5, _submit(), 1.0)
    journal.args_received(5, 0, [600, 600], b"x" * 1200)
    assert _peek(journal, "SELECT start FROM args") == [(0,)]


def test_an_outcome_is_recorded_once(tmp_path: Path) -> None:
    journal, clock = _journal(tmp_path)
    journal.job_submitted(5, _submit(), 1.0)
    journal.delivered(5, _results(5, [0, 1]), store=False)
    journal.delivered(5, _results(5, [1]), store=False)
    clock.advance(FLUSH_INTERVAL)
    journal.delivered(5, _results(5, [7, 3, 4]), store=False)  # two runs: 3..4 and 7
    journal.delivered(5, _results(5, [2, 3]), store=False)  # 3 again: refused whole
    clock.advance(FLUSH_INTERVAL)
    assert _peek(journal, "SELECT start, stop FROM outcomes ORDER BY start") == [
        (0, 2),
        (3, 5),
        (7, 8),
    ]
    assert journal.duplicates == 2


def test_recover_returns_what_was_committed_and_nothing_else(tmp_path: Path) -> None:
    journal, clock = _journal(tmp_path)
    journal.job_submitted(5, _submit(name="kept"), 1.0)
    journal.args_received(5, 0, [1, 1, 1], b"abc")
    journal.args_ended(5, 3, now=True)
    journal.delivered(5, _results(5, [0, 2], errors=[[1, "ValueError", "bad", ""]]), store=True)
    clock.advance(FLUSH_INTERVAL)
    journal.delivered(5, _results(5, [1]), store=True)  # buffered: lost in the "crash"
    (job,) = Journal(journal.path, Clock()).recover()
    assert (job.id, job.submit.name, job.submit.payload) == (5, "kept", b"fn-blob")
    assert (job.args_total, job.args) == (3, [(0, [1, 1, 1], b"abc", [])])
    assert (job.delivered, job.done, job.failed) == ({0, 2}, 1, 1)
    stored = [r for _, r in Journal(journal.path, Clock()).results(5)]
    assert [list(r.answered) for r in stored] == [[0, 2]] and job.next_seq == 1
    assert stored[0].errors == [[1, "ValueError", "bad", ""]]


def test_finished_jobs_are_pruned_by_count_and_age(tmp_path: Path) -> None:
    journal, clock = _journal(tmp_path, keep_jobs=2, keep_seconds=100.0)
    for job in range(1, 5):
        journal.job_submitted(job, _submit(), clock.seconds())
        journal.delivered(job, _results(job, [0]), store=True)
        journal.finished(job, "done", "", 1, 0, clock.seconds())
    clock.advance(FLUSH_INTERVAL)
    assert _peek(journal, "SELECT id FROM jobs ORDER BY id") == [(3,), (4,)]
    assert _peek(journal, "SELECT DISTINCT job FROM results ORDER BY job") == [(3,), (4,)]
    journal.job_submitted(9, _submit(), clock.seconds())  # running: never pruned
    clock.advance(150)
    journal.job_submitted(10, _submit(), clock.seconds())
    journal.finished(10, "done", "", 0, 0, clock.seconds())
    clock.advance(FLUSH_INTERVAL)
    assert _peek(journal, "SELECT id FROM jobs ORDER BY id") == [(9,), (10,)]


def test_settings_turn_the_journal_off_or_place_it(tmp_path: Path) -> None:
    assert Journal.for_settings(Settings(journal=False), Clock()) is None
    journal = Journal.for_settings(Settings(state_dir=str(tmp_path), journal_sync="full"), Clock())
    assert journal is not None and journal.path == tmp_path / "journal.sqlite"
    journal.close()


# ============================================================================ a restarted scheduler


def _scheduler(path: Path, clock: Clock) -> Scheduler:
    sched = Scheduler(clock, console_grace=GRACE, job_ids_from=1)
    sched.restore(Journal(path, clock))
    return sched


def _stored_outcomes(sched: Scheduler, job_id: int) -> dict[int, list]:
    """What ``attach`` replays, per index (a list, so a duplicate shows)."""
    out: dict[int, list] = {}
    attacher = FakeLink("attach")
    sched.attach(attacher, job_id)
    for r in attacher.of(m.Results, job_id):
        for index, blob in zip(r.answered, split(r.sizes, r.payload), strict=True):
            out.setdefault(index, []).append(pickle.loads(blob))
    return out


def test_a_detached_job_resumes_after_a_crash_with_every_argument_delivered_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    clock.advance(1000)
    sched = _scheduler(path, clock)
    n = 300
    console = FakeConsole(sched, range(n), detach=True, total=n)
    node = FakeNode(sched, "n1", cores=2)
    while console.feed():
        pass
    assert console.ended
    for task in node.held()[:2]:
        node.answer(task)
    clock.advance(FLUSH_INTERVAL)  # committed
    for task in node.held()[:1]:
        node.answer(task)  # delivered but not committed: lost with the server
    assert 0 < sched.jobs[console.job].done < n

    clock2 = Clock()
    clock2.advance(2000)
    again = _scheduler(path, clock2)  # the "restarted server"
    job = again.jobs[console.job]
    assert job.state == "running" and job.total == n
    node2 = FakeNode(again, "n2", cores=2)
    run_to_end([node2], [])
    assert job.state == "done", job.message
    outcomes = _stored_outcomes(again, console.job)
    assert sorted(outcomes) == list(range(n))
    assert all(v == [i * i] for i, v in outcomes.items()), "an argument delivered twice"
    clock2.advance(FLUSH_INTERVAL)
    assert again.journal.duplicates == 0
    # after another restart the finished job still answers attach with every result
    third = _scheduler(path, Clock())
    assert third.jobs[console.job].state == "done"
    assert sorted(_stored_outcomes(third, console.job)) == list(range(n))
    assert third._job_ids.__next__() > console.job  # never reuses a journaled id


def test_a_detached_jobs_end_is_committed_with_its_last_outcomes_not_before(
    tmp_path: Path,
) -> None:
    """The scheduler ends a detached job "done" (status says so) as its last outcome is
    delivered; the journal commits that end in the group commit that holds its last outcomes,
    up to ``FLUSH_INTERVAL`` later. A reader of the file in between sees the job running with
    outcomes missing (what the chaos test once read: 'done' in status, 256 outcomes short);
    once the file records the end, every outcome is there, each once. Readers of the journal
    wait for the end it records, not for the status."""
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    sched = _scheduler(path, clock)
    n = 300
    console = FakeConsole(sched, range(n), detach=True, total=n)
    node = FakeNode(sched, "n1", cores=2)
    while console.feed():
        pass
    for task in node.held()[:2]:
        node.answer(task)
    clock.advance(FLUSH_INTERVAL)  # committed: the job's first outcomes
    run_to_end([node], [console])  # the rest, within one group commit's interval
    assert sched.jobs[console.job].state == "done"
    row = f"SELECT state, finished_at IS NOT NULL FROM jobs WHERE id={console.job}"
    runs = f"SELECT SUM(stop - start) FROM outcomes WHERE job={console.job}"
    assert _peek(sched.journal, row) == [("running", 0)]
    ((short,),) = _peek(sched.journal, runs)
    assert 0 < short < n  # the last outcomes are buffered with the end
    clock.advance(FLUSH_INTERVAL)
    assert _peek(sched.journal, row) == [("done", 1)]
    assert _peek(sched.journal, runs) == [(n,)]
    assert sched.journal.duplicates == 0


def test_jobs_fed_by_a_console_end_with_a_reason_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    sched = _scheduler(path, clock)
    attached = FakeConsole(sched, range(10), name="a")
    unfinished = FakeConsole(sched, range(10), name="b", detach=True, end=False)
    FakeNode(sched, "n1")
    attached.feed()
    unfinished.feed()
    clock.advance(FLUSH_INTERVAL)
    clock = Clock()
    again = _scheduler(path, clock)
    a, b = again.jobs[attached.job], again.jobs[unfinished.job]
    assert b.state == "failed", b.message
    assert b.message == (
        "the server restarted before its arguments were all in the journal (10 stored, their "
        "end not recorded): submit it again"
    )
    # the attached job waits for its console to resume it (tests/test_resume.py), for the grace
    assert a.state == "running" and "waiting for its console" in a.waiting
    clock.advance(again.console_grace + 1)
    assert a.state == "failed"
    assert "did not come back" in a.message and "submit it again" in a.message
    again.journal.flush()
    # the reasons are journaled too: a third start shows the same, not "running"
    third = _scheduler(path, Clock())
    assert third.jobs[attached.job].message == a.message


def test_a_job_the_journal_cannot_record_is_not_accepted(tmp_path: Path) -> None:
    """A journal that cannot be written (here: its file closed under it) refuses the submit
    with one line; no job is registered and the console is not told it was accepted."""
    sched = _scheduler(tmp_path / "journal.sqlite", Clock())
    sched.journal._db.close()
    link = FakeLink("c")
    failures: list = []
    sched.submit(link, _submit()).addErrback(failures.append)
    (failure,) = failures
    assert failure.check(JournalError) and "cannot write the journal" in str(failure.value)
    assert not sched.jobs and not link.of(m.Submitted)


def test_a_group_commit_that_fails_keeps_its_rows_until_one_writes_them_once_in_order(
    tmp_path: Path,
) -> None:
    """A full disk fails a detached job's group commit, then the retry: nothing is dropped. The
    journal says once that it cannot write (log, status), refuses a detached submit with that
    line, runs an attached one, and tries again with backoff, not every group commit; the
    third try writes every row once. At every step the file holds a prefix of what happened:
    the job's end never without its outcomes, results numbered without a gap."""
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    sched = _scheduler(path, clock)
    journal = sched.journal
    logged: list[dict] = []
    journal.log = Logger(observer=logged.append)
    n = 12
    console = FakeConsole(sched, range(n), chunksize=1, detach=True, total=n)
    node = FakeNode(sched, "n1", cores=1)
    while console.feed():
        pass
    job = sched.jobs[console.job]
    write, tries = journal._write, []

    def full_disk(*args: object) -> None:
        tries.append(clock.seconds())
        if len(tries) <= 2:
            raise sqlite3.OperationalError("database or disk is full")
        write(*args)

    def answer(k: int) -> None:
        for _ in range(k):
            node.answer(node.held()[0])

    def on_disk() -> tuple[str, list[int], list[int]]:
        """The job's recorded state, delivered indices and stored result numbers."""
        ((state,),) = _peek(journal, f"SELECT state FROM jobs WHERE id={job.id}")
        runs = _peek(journal, f"SELECT start, stop FROM outcomes WHERE job={job.id}")
        seqs = _peek(journal, f"SELECT seq FROM results WHERE job={job.id} ORDER BY seq")
        delivered = sorted(i for start, stop in runs for i in range(start, stop))
        assert len(set(delivered)) == len(delivered), "an index recorded twice"
        assert [s for (s,) in seqs] == list(range(len(seqs))), "a result written out of order"
        assert state == "running" or delivered == list(range(n)), "an end before its outcomes"
        return state, delivered, [s for (s,) in seqs]

    answer(3)
    clock.advance(FLUSH_INTERVAL)
    assert on_disk() == ("running", [0, 1, 2], [0, 1, 2])
    journal._write = full_disk
    answer(3)
    clock.advance(FLUSH_INTERVAL)  # the group commit fails: its rows are kept
    assert len(tries) == 1 and journal.trouble.startswith(f"cannot write the journal {path} ")
    assert "database or disk is full" in journal.trouble
    assert sched.status()[2].journal == journal.trouble
    refused: list = []
    sched.submit(FakeLink("d"), _submit()).addErrback(refused.append)
    assert str(refused[0].value) == journal.trouble and len(sched.jobs) == 1
    attached = FakeConsole(sched, range(2), name="attached")  # runs, unrecorded
    attached.feed()
    while node.answer_all():  # the detached job ends in memory; its end waits behind its
        pass  # outcomes
    assert job.state == "done" and sched.jobs[attached.job].state == "done"
    assert len(job.kept) == n - 3  # in memory until written
    clock.advance(FLUSH_INTERVAL)  # the second try fails
    assert len(tries) == 2 and on_disk() == ("running", [0, 1, 2], [0, 1, 2])
    clock.advance(FLUSH_INTERVAL)  # the retry waits twice as long now
    assert len(tries) == 2
    clock.advance(FLUSH_INTERVAL)
    assert len(tries) == 3 and journal.trouble == "" and sched.status()[2].journal is ABSENT
    assert on_disk() == ("done", list(range(n)), list(range(n)))
    assert not job.kept and sched.kept_bytes == 0 and journal.duplicates == 0
    said = [e for e in logged if e["log_level"] in (LogLevel.error, LogLevel.info)]
    assert len(said) == 2, [formatEvent(e) for e in said]  # one line as it starts, one as it ends
    assert "it keeps every row" in formatEvent(said[0])
    assert "is written again" in formatEvent(said[1])
    assert len(tries) == 3  # nothing else was written meanwhile
    clock.advance(1)
    third = _scheduler(path, Clock())  # a restart reads every result, once, in order
    assert _stored_outcomes(third, job.id) == {i: [i * i] for i in range(n)}
    assert third.jobs[job.id].state == "done"


def test_attach_finds_a_finished_job_only_the_journal_still_keeps(tmp_path: Path) -> None:
    """The scheduler keeps the newest finished jobs in memory; an older one the journal keeps
    comes back for ``attach`` with every result."""
    clock = Clock()
    sched = _scheduler(tmp_path / "journal.sqlite", clock)
    sched.keep_finished = 1
    node = FakeNode(sched, "n1")
    consoles = []
    for name in ("old", "new"):
        console = FakeConsole(sched, range(5), name=name, detach=True, total=5)
        run_to_end([node], [console])
        consoles.append(console)
    old = consoles[0].job
    assert old not in sched.jobs  # pruned from memory, not from the journal
    assert sorted(_stored_outcomes(sched, old)) == []  # attach alone does not look further
    recalled: list = []
    sched.recall(old).addCallback(recalled.append)  # (an inline journal's: fired at once)
    assert recalled[0] is not None and sched.jobs[old].state == "done"
    assert sorted(_stored_outcomes(sched, old)) == list(range(5))


def test_a_journal_of_another_schema_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=1")
    with pytest.raises(ConfigError, match="move it away"):
        Journal(path, Clock())


def _frames_written(journal: Journal, write) -> int:
    """WAL frames (pages) ``write()`` puts in the journal: checkpointed first, so the WAL
    restarts from its beginning and the next checkpoint counts only the write's frames."""
    journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    write()
    return journal._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_a_jobs_end_does_not_rewrite_its_function(tmp_path: Path) -> None:
    """The end of a job with a big function (a 16 MiB ``files:`` bundle) writes a few pages,
    not the function again: it is kept apart from the job's row, which SQLite rewrites whole
    on UPDATE. That rewrite held the server's reactor thread 1.25 s for a 60 MiB function,
    enough for nodes under a 1.5 s heartbeat deadline to declare the server lost."""
    journal, _ = _journal(tmp_path)
    journal._checkpoint = lambda: None  # no checkpoint but the test's own
    fn = os.urandom(16 << 20)
    journal.job_submitted(1, m.Submit(id=1, name="big", detach=True, payload=fn), 1.0)

    def end() -> None:
        journal.finished(1, "done", "", 3, 0, 2.0)
        journal.flush()

    assert _frames_written(journal, end) < 20
    assert journal.job(1).submit.payload == fn  # and it reads back whole


def test_a_big_submit_is_checkpointed_by_a_thread_not_in_its_commit(
    tmp_path: Path, monkeypatch
) -> None:
    """A submit with a 16 MiB function returns with the function in the WAL only: copying it
    into the database file (SQLite's automatic checkpoint, 0.4 s of a 60 MiB submit's 0.9 s
    on the server's reactor thread) is the checkpointer thread's, which does it after."""
    from remap.server import journal as journal_mod

    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    checkpoint = journal_mod.Journal._checkpoint

    def held(self) -> None:
        started.set()
        assert release.wait(30)
        checkpoint(self)
        finished.set()

    monkeypatch.setattr(journal_mod.Journal, "_checkpoint", held)
    journal, _ = _journal(tmp_path)
    fn = os.urandom(16 << 20)
    journal.job_submitted(1, m.Submit(id=1, name="big", detach=True, payload=fn), 1.0)
    assert started.wait(30), "the checkpointer was not woken"
    assert journal.path.stat().st_size < 1 << 20  # the commit copied nothing into the file
    release.set()
    assert finished.wait(30), "the checkpointer did not finish"
    assert journal.path.stat().st_size > 16 << 20
    journal.close()
    assert _peek(journal, "SELECT fn FROM functions") == [(fn,)]


def test_a_schema_2_journal_with_functions_in_its_jobs_rows_reads_back(tmp_path: Path) -> None:
    """A journal written before functions had a table of their own (schema 2: in ``jobs.fn``)
    is read as it is: its jobs come back with their functions, and new jobs go on beside."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, Clock())
    journal.job_submitted(4, _submit(name="old"), 1.0)
    journal.flush()
    with journal._db:  # as schema 2 wrote it
        journal._db.execute("UPDATE jobs SET fn=(SELECT fn FROM functions WHERE job=4)")
        journal._db.execute("DROP TABLE functions")
        journal._db.execute("PRAGMA user_version=2")
    journal.close()
    journal = Journal(path, Clock())
    journal.job_submitted(5, _submit(name="new"), 2.0)
    assert [(j.id, j.submit.name, j.submit.payload) for j in journal.recover()] == [
        (4, "old", b"fn-blob"),
        (5, "new", b"fn-blob"),
    ]


def test_a_submit_recorded_with_chunksize_0_reads_back_as_automatic(tmp_path: Path) -> None:
    """Journals written before job options had None for an automatic chunksize hold 0 there,
    which the options' rules now refuse: a restarted server still reads those jobs back."""
    import msgpack

    journal, _ = _journal(tmp_path)
    journal.job_submitted(5, _submit(), 1.0)
    journal.flush()
    header = msgpack.unpackb(journal._db.execute("SELECT submit FROM jobs").fetchone()[0])
    header["chunksize"] = 0  # what an older console sent for "automatic"
    with journal._db:
        journal._db.execute("UPDATE jobs SET submit=?", (msgpack.packb(header),))
    job = journal.job(5)
    assert job is not None and job.submit.chunksize is None and job.submit.name == "j"


def _detached_fed(sched: Scheduler, clock: Clock, n: int = 10) -> FakeConsole:
    """A detached job whose console sent all ``n`` arguments, committed, but not their end."""
    console = FakeConsole(sched, range(n), detach=True, end=False)
    console.feed()
    clock.advance(FLUSH_INTERVAL)
    return console


def test_a_detached_jobs_args_end_is_answered_once_its_arguments_are_committed(
    tmp_path: Path,
) -> None:
    """``args_end`` with an id (what ``compute --detach`` waits for before it returns) is
    answered ``stored`` once the job's arguments and their end are committed: a restart then
    resumes the job instead of failing it."""
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    sched = _scheduler(path, clock)
    console = _detached_fed(sched, clock)
    assert sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=10, id=9)) is None
    assert console.link.of(m.Ok) == [m.Ok(re=9, info={"job": console.job, "stored": True})]
    assert _peek(sched.journal, f"SELECT args_total FROM jobs WHERE id={console.job}") == [(10,)]
    again = _scheduler(path, Clock())
    assert again.jobs[console.job].state == "running" and again.jobs[console.job].total == 10


def test_an_args_end_the_journal_cannot_commit_is_answered_not_stored_and_a_restart_says_so(
    tmp_path: Path,
) -> None:
    """A disk that fills as the job's arguments end: the console is told they are not stored,
    with the journal's line and what a restart does; the server restarted then ends the job
    saying the journal never recorded their end (not that its console had not sent them)."""
    path = tmp_path / "journal.sqlite"
    clock = Clock()
    sched = _scheduler(path, clock)
    console = _detached_fed(sched, clock)

    def full_disk(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    sched.journal._write = full_disk
    sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=10, id=9))
    (ok,) = console.link.of(m.Ok)
    assert ok.re == 9 and ok.info["stored"] is False, ok
    why = ok.info["why"]
    assert why.startswith(f"cannot write the journal {path} since ") and "is full" in why, why
    assert why.endswith("; a restart of the server before it can ends the job"), why
    again = _scheduler(path, Clock())  # (the "crash": the rows kept were never written)
    job = again.jobs[console.job]
    assert job.state == "failed" and job.message == (
        "the server restarted before its arguments were all in the journal (10 stored, their "
        "end not recorded): submit it again"
    )


def test_without_a_journal_an_args_end_is_answered_not_stored(tmp_path: Path) -> None:
    """No journal: the answer says the job lives in memory only, and why."""
    sched = Scheduler(Clock(), console_grace=GRACE)
    console = FakeConsole(sched, range(3), detach=True, end=False)
    console.feed()
    sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=3, id=4))
    (ok,) = console.link.of(m.Ok)
    assert ok == m.Ok(
        re=4,
        info={
            "job": console.job,
            "stored": False,
            "why": "the server keeps no journal (REMAP_JOURNAL is off): a restart forgets the job",
        },
    )


def test_a_checkpoint_that_cannot_open_the_journal_says_so(tmp_path: Path) -> None:
    """The checkpointer opens its own connection at its first checkpoint; if that fails (here
    the state directory is gone; on a busy server, out of file descriptors) it is an error in
    the log, as a failed checkpoint is, and the next one tries again: never dropped unsaid."""
    journal, _ = _journal(tmp_path)
    logged: list[dict] = []
    journal.log = Logger(observer=logged.append)
    for name in os.listdir(journal.path.parent):
        os.unlink(journal.path.parent / name)
    os.rmdir(journal.path.parent)  # the open connections go on with their files
    journal.job_submitted(
        1, m.Submit(id=1, name="big", detach=True, payload=os.urandom(8 << 20)), 1.0
    )
    journal.close()  # (waits for the checkpoint handed over)
    said = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert said == [
        f"cannot checkpoint the journal {journal.path}: unable to open database file; commits "
        "go on into its WAL, which grows until a checkpoint succeeds (tried again as more is "
        "committed)"
    ]


class _FailingCheckpoints:
    """The checkpointer's connection, failing with an error that is not SQLite's (an
    ``OSError`` from below, a bug) as long as ``failing``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failing = True

    def execute(self, sql: str) -> sqlite3.Cursor:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        return self.db.execute(sql)

    def close(self) -> None:
        self.db.close()


def test_checkpoints_failing_with_any_error_are_said_once_and_their_end_too(
    tmp_path: Path,
) -> None:
    """A checkpoint that fails with an error that is not ``sqlite3.Error`` is said too, with
    its cause (it was dropped unsaid: the checkpointer's outcomes go nowhere); a run of
    failures is one line, not one per checkpoint, and the one that succeeds after them says
    so. Commits go on meanwhile: the journal reads back everything written."""
    journal, _ = _journal(tmp_path)
    logged: list[dict] = []
    journal.log = Logger(observer=logged.append)
    journal._checkpoint_db = failing = _FailingCheckpoints(
        sqlite3.connect(str(journal.path), check_same_thread=False)
    )

    def submit_big(job_id: int) -> None:
        payload = os.urandom(8 << 20)  # past CHECKPOINT_BYTES: the commit wakes the checkpointer
        journal.job_submitted(job_id, m.Submit(id=job_id, name="big", payload=payload), 1.0)
        journal._checkpoints.call(lambda: None)  # (the checkpoint handed over is done)

    submit_big(1)
    submit_big(2)
    failing.failing = False
    submit_big(3)
    journal.close()
    said = [(e["log_level"], formatEvent(e)) for e in logged]
    assert said == [
        (
            LogLevel.error,
            f"cannot checkpoint the journal {journal.path}: OSError(5, 'Input/output error'); "
            "commits go on into its WAL, which grows until a checkpoint succeeds (tried again "
            "as more is committed)",
        ),
        (LogLevel.info, f"the journal {journal.path} is checkpointed again"),
    ]
    assert [j for (j,) in _peek(journal, "SELECT id FROM jobs ORDER BY id")] == [1, 2, 3]


def test_a_journal_starts_its_checkpointer_thread_when_it_first_checkpoints(
    tmp_path: Path,
) -> None:
    """The checkpointer's thread starts with the first checkpoint, not with every journal: a
    journal dropped without ``close`` (a crash in these tests) that never checkpointed leaves
    no thread behind; one that did has its thread stopped by ``close``."""
    journal, _ = _journal(tmp_path)
    journal.job_submitted(1, _submit(), 1.0)
    assert not journal._checkpoints._thread.is_alive()
    journal.job_submitted(
        2, m.Submit(id=2, name="big", detach=True, payload=os.urandom(8 << 20)), 1.0
    )
    assert journal._checkpoints._thread.is_alive()
    journal.close()
    assert not journal._checkpoints._thread.is_alive()
