"""The server's journal: jobs and delivered outcomes in SQLite, so a restarted server resumes.

One SQLite file in WAL mode in ``REMAP_STATE_DIR``, on a local disk: WAL needs memory shared
between writer and readers, which network file systems (NFS, CephFS) do not give.

* A job's ``submit`` (its function included) is committed *before* its console hears the job
  was accepted, so an accepted job is never forgotten.
* A detached job's arguments are kept as they arrive, and its ``args_end`` committed at once:
  its console goes away, so the server alone holds them. An attached job's arguments and
  outcomes are not stored: its console holds them, and a restart ends that job with a reason.
* A detached job's delivered outcomes are runs of argument indices keyed by (job, first
  index), checked never to overlap, so each (job, index) is recorded at most once (a row per
  index cost ~3 µs each, as much as the server spends on a trivial call); its result messages
  are kept for ``attach`` to replay.
* A job's end (state, message, counts).

All but a submit and a detached ``args_end`` is *group committed*: buffered and written in one
transaction at most ``flush_interval`` s later (at once past ``flush_bytes``). The server's
journal (``threaded``) writes its transactions on a thread of its own, in the order they were
made, so the reactor never waits for SQLite (a submit with a 60 MiB function held it 0.3 s);
what the server acknowledges waits for the commit instead: :meth:`Journal.job_submitted`
returns a Deferred that fires once the submit is on disk, and :meth:`Journal.recall` reads a job
there, after what was handed over before. Checkpoints, with their syncs, run on
a thread of their own too, and so do ``attach``'s reads of stored results
(:meth:`Journal.read_results`), on a connection of their own.

A transaction that fails (a full disk, an I/O error, a locked file) loses nothing: its rows
(all but a refused submit's) are kept and written first by the next transaction, so the file
never holds a row without those before it (a job's end without its outcomes). Meanwhile the
journal says why it cannot write (:attr:`Journal.trouble`, one log line when that starts and
one when it ends), tries again with backoff instead of every ``flush_interval``, and refuses new
detached jobs (the scheduler runs attached ones: their consoles hold what they need); what it
keeps is bounded by what the scheduler keeps of those jobs anyway (their arguments, and results
within REMAP_DETACHED_RESULTS_MEMORY).
"""

from __future__ import annotations

import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import messages as m

from ..errors import ConfigError
from ..settings import Settings
from .exclusion import state_dir

FILE_NAME = "journal.sqlite"
#: seconds a buffered write may wait for its transaction
FLUSH_INTERVAL = 0.05
#: payload bytes buffered before a transaction is written at once (bounds the buffer)
FLUSH_BYTES = 8 * 1024 * 1024
#: bytes (about) committed to the WAL before the checkpointer thread copies it into the
#: database file (SQLite's automatic checkpoint ran in the commit, on the reactor thread)
CHECKPOINT_BYTES = 1000 * 4096
#: payload bytes handed to the writer thread and not yet written past which the reactor thread
#: waits for it, as it did for every write before (a disk slower than the network must not
#: grow the queue without bound)
QUEUE_BYTES = 128 * 1024 * 1024
#: the longest wait between two tries of rows the journal could not write (the first waits
#: ``flush_interval``, each next twice as long)
RETRY_MAX = 2.0
SYNC_LEVELS = ("normal", "full")
#: bumped when the tables change; an older journal is refused with a clear line
SCHEMA_VERSION = 3
#: older schemas this server reads as they are (2: every function in ``jobs.fn``)
READS_SCHEMAS = (2,)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    submit BLOB NOT NULL,          -- the submit message's msgpack header
    fn BLOB NOT NULL,              -- empty: the function is in ``functions`` (schema 2 had it here)
    detach INTEGER NOT NULL,
    submitted_at REAL NOT NULL,
    args_total INTEGER,            -- set by args_end (detached jobs): every argument is stored
    state TEXT NOT NULL DEFAULT 'running',
    message TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    finished_at REAL,
    owner TEXT NOT NULL DEFAULT ''
);
-- apart from ``jobs``: SQLite rewrites a whole row on UPDATE (a job's end would rewrite
-- a 60 MiB function, a ``files:`` bundle, on the reactor thread)
CREATE TABLE IF NOT EXISTS functions (
    job INTEGER PRIMARY KEY,
    fn BLOB NOT NULL               -- the submit's payload: the pickled function
);
CREATE TABLE IF NOT EXISTS args (
    job INTEGER NOT NULL,
    start INTEGER NOT NULL,
    sizes BLOB NOT NULL,           -- msgpack list of the pickles' sizes
    payload BLOB NOT NULL,
    PRIMARY KEY (job, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    job INTEGER NOT NULL,
    start INTEGER NOT NULL,        -- a run of argument indices start .. stop - 1, delivered
    stop INTEGER NOT NULL,         -- (runs of a job never overlap: checked on every insert)
    errors BLOB NOT NULL,          -- msgpack list of the run's indices whose outcome is an error
    PRIMARY KEY (job, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    header BLOB NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (job, seq)
) WITHOUT ROWID;
"""
_FINISHED = "SELECT id FROM jobs WHERE finished_at IS NOT NULL"
#: the newest finished jobs (``LIMIT ?``): what a restart reads, what pruning by count keeps
_NEWEST_FINISHED = f"{_FINISHED} ORDER BY id DESC LIMIT ?"


class JournalError(Exception):
    """The journal file could not be written (full disk, lost directory): one clear line.
    ``reason`` is what SQLite said; ``held``: rows are kept to be written by the next try."""

    def __init__(self, message: str, reason: str = "", held: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.held = held


@dataclass
class _Rows:
    """Rows of a group commit: buffered, or kept from a transaction that failed."""

    args: list[tuple[int, int, bytes, Any]] = field(default_factory=list)
    outcomes: list[tuple[int, m.Results, int | None]] = field(default_factory=list)
    #: (args_total, job) and (state, message, done, failed, finished_at, job): UPDATE params
    ends: list[tuple[int, int]] = field(default_factory=list)
    finished: list[tuple[str, str, int, int, float, int]] = field(default_factory=list)
    nbytes: int = 0  # payload bytes

    def __bool__(self) -> bool:
        return bool(self.args or self.outcomes or self.ends or self.finished)

    def then(self, later: _Rows) -> _Rows:
        """These rows, then ``later``'s (one transaction writes them all)."""
        if not self:
            return later
        self.args += later.args
        self.outcomes += later.outcomes
        self.ends += later.ends
        self.finished += later.finished
        self.nbytes += later.nbytes
        return self


@dataclass
class JournaledJob:
    """One job as the journal recorded it (see :meth:`Journal.recover`)."""

    id: int
    submit: m.Submit
    submitted_at: float
    state: str
    message: str
    args_total: int | None
    done: int
    failed: int
    finished_at: float | None
    owner: str
    #: (start, sizes, payload, groups) of a detached job's stored arguments (running jobs only;
    #: ``groups`` is ``[]`` unless the pickles are argument groups)
    args: list[tuple[int, list[int], bytes, list[int]]] = field(default_factory=list)
    #: argument indices whose outcome was delivered (running jobs only)
    delivered: set[int] = field(default_factory=set)
    #: the ``seq`` a detached job's next stored result message takes (its messages stay on
    #: disk: :meth:`Journal.results` reads them a piece at a time)
    next_seq: int = 0


def _args_row(start: int, column: Any, payload: bytes) -> tuple[int, list[int], bytes, list[int]]:
    """A stored ``args`` row; its ``sizes`` column is a sizes list or ``{"sizes", "groups"}``."""
    if type(column) is dict:
        return start, column["sizes"], payload, column["groups"]
    return start, column, payload, []


def _private(path: Path) -> None:
    """Make the journal (jobs' functions, arguments and results) its owner's only, whatever
    the state directory's mode (a systemd StateDirectory is 0755); SQLite gives -wal and -shm
    the database file's mode, and ones left by a crash are fixed too."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if name.exists() and name.stat().st_mode & 0o077:
                name.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the journal {path}: {exc.strerror or exc}") from None


class _Writer:
    """Runs the journal's transactions (or, as its reader, ``attach``'s reads; its checkpoints)
    on one thread of its own in the order they were handed over; each one's outcome reaches the
    reactor thread through ``call_soon``. Without ``call_soon``, each runs at once on the calling
    thread (a fake clock's tests, tools)."""

    def __init__(
        self,
        call_soon: Callable[..., Any] | None,
        max_bytes: int = QUEUE_BYTES,
        name: str = "journal-writer",
    ) -> None:
        self.call_soon = call_soon
        self.max_bytes = max_bytes
        self.queued = 0  # payload bytes handed over and not yet written
        self._room = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        #: started by the first work handed over (one caller thread each): a journal that
        #: never checkpoints, or is never read, has no thread for it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def run(self, work: Callable[[], Any], nbytes: int) -> defer.Deferred:
        """``work()`` after everything handed over before; fires with its outcome."""
        if self.call_soon is None:
            return defer.maybeDeferred(work)
        if self._thread.ident is None:
            self._thread.start()
        with self._room:  # (one that adds no bytes, a read, never waits)
            self._room.wait_for(lambda: not nbytes or self.queued < self.max_bytes)
            self.queued += nbytes
        done: defer.Deferred = defer.Deferred()

        def report(outcome: Any) -> None:
            fire = done.errback if isinstance(outcome, Failure) else done.callback
            self.call_soon(fire, outcome)

        self._queue.put((work, report, nbytes))
        return done

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` after everything handed over before, waited for here (a read)."""
        if not self._thread.is_alive():  # inline, not started or closed: nothing is queued
            return fn()
        future: Future = Future()

        def report(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                future.set_exception(outcome.value)
            else:
                future.set_result(outcome)

        self._queue.put((fn, report, 0))
        return future.result()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, report, nbytes = item
            try:
                outcome = work()
            except BaseException:  # noqa: BLE001 - reported to the caller, who judges it
                outcome = Failure()
            with self._room:
                self.queued -= nbytes
                self._room.notify_all()
            report(outcome)

    def close(self) -> None:
        """Write what was handed over, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class Journal:
    """The journal file and its write buffer; ``clock`` schedules the group commits. With
    ``threaded``, transactions are written by a thread of their own and their outcomes
    reported through ``clock.callFromThread`` (the reactor); without, at once on the caller's
    thread."""

    log = Logger()

    def __init__(
        self,
        path: Path | str,
        clock: Any,
        *,
        synchronous: str = "normal",
        keep_jobs: int = 1000,
        keep_seconds: float = 7 * 86400.0,
        flush_interval: float = FLUSH_INTERVAL,
        flush_bytes: int = FLUSH_BYTES,
        threaded: bool = False,
    ) -> None:
        if synchronous not in SYNC_LEVELS:
            raise ConfigError(f"journal synchronous must be one of {', '.join(SYNC_LEVELS)}")
        self.path = Path(path)
        self.clock = clock
        self.keep_jobs = keep_jobs
        self.keep_seconds = keep_seconds
        self.flush_interval = flush_interval
        self.flush_bytes = flush_bytes
        self._db = self._open(self.path, synchronous)
        #: checkpoints (copies of the WAL into the database file) on a thread and connection of
        #: their own: passive, so the writer's commits go on meanwhile; nobody waits for them
        self._checkpoints = _Writer(lambda *_: None, name="journal-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None  # (the checkpointer's only)
        self._checkpoint_failing = False  # (the checkpointer's) said once until one succeeds
        #: (the writer's, like everything the transactions touch: ``_db``, ``_seq``, counts)
        self._uncheckpointed = 0  # bytes (about) committed since the checkpointer was woken
        self._writer = _Writer(clock.callFromThread if threaded else None)
        self._rows = _Rows()  # buffered
        #: (the writer's) rows of transactions that failed: the next one writes them first
        self._unwritten = _Rows()
        self._timer: Any = None
        #: why the journal cannot write and since when ("": it can); see :meth:`_cannot_write`
        self.trouble = ""
        self._trouble_since = 0.0
        self._retry: Any = None  # the timer of the next try while it cannot write
        self._retry_delay = flush_interval
        self._handed = 0  # transactions handed to the writer and not reported back
        self._closing = False
        #: next ``results.seq`` per job with stored results
        self._seq: dict[int, int] = {}
        #: rows a unique key refused: an outcome recorded twice (a bug; tests assert zero)
        self.duplicates = 0
        self.transactions = 0
        #: told ``[(job, seq), ...]`` of the stored result messages (numbered by the caller)
        #: each commit wrote, on the reactor thread once it is on disk: the scheduler then
        #: lets go of its copies, :meth:`results` reads them from there
        self.on_saved: Any = None
        #: reads of stored results (``attach``'s replay) on a thread and connection of their
        #: own: a replay of gigabytes never holds the reactor, nor waits behind a commit
        self._reads = _Writer(clock.callFromThread if threaded else None, name="journal-reader")
        self._read_db: sqlite3.Connection | None = None  # (the reader's only)
        self._closed = False

    @classmethod
    def for_settings(
        cls, settings: Settings, clock: Any, *, threaded: bool = False
    ) -> Journal | None:
        """The journal the settings ask for (``REMAP_JOURNAL``), or None when it is off."""
        if not settings.journal:
            return None
        return cls(
            state_dir(settings) / FILE_NAME,
            clock,
            synchronous=settings.journal_sync,
            keep_jobs=settings.journal_keep_jobs,
            keep_seconds=settings.journal_keep_hours * 3600.0,
            threaded=threaded,
        )

    @staticmethod
    def _open(path: Path, synchronous: str) -> sqlite3.Connection:
        _private(path)
        try:
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    f"journal {path}: SQLite refused WAL mode ({mode}); put REMAP_STATE_DIR "
                    "on a local disk (not a network file system)"
                )
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread's work
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION, *READS_SCHEMAS):
                raise ConfigError(
                    f"journal {path} has schema {version}, this server writes {SCHEMA_VERSION}: "
                    "move it away to start with an empty journal"
                )
            db.executescript(_SCHEMA)
            if "owner" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]:
                db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the journal {path}: {exc}") from None
        return db

    # ---------------------------------------------------------------- writes

    def job_submitted(
        self, job_id: int, msg: m.Submit, now: float, owner: str = ""
    ) -> defer.Deferred:
        """Commit a new job (and what was buffered): fires once committed, so its console hears
        it was accepted only then; fails with :class:`JournalError` (at once while the journal
        cannot write: nothing may be written before the rows it keeps)."""
        if self.trouble:
            return defer.fail(JournalError(self.trouble))
        header, fn = m.encode(msg)
        return self._flush(
            [
                (
                    "INSERT INTO jobs (id, submit, fn, detach, submitted_at, owner) "
                    "VALUES (?,?,?,?,?,?)",
                    (job_id, header, b"", int(msg.detach), now, owner),
                ),
                ("INSERT INTO functions (job, fn) VALUES (?,?)", (job_id, fn)),
            ]
        )

    def args_received(
        self, job_id: int, start: int, sizes: list[int], payload: Any, groups: list[int] = ()
    ) -> None:
        """Keep a detached job's arguments ``start ..`` (group committed; see :func:`_args_row`)."""
        packed = msgpack.packb({"sizes": sizes, "groups": list(groups)} if groups else sizes)
        self._rows.args.append((job_id, start, packed, payload))
        self._buffered(len(payload))

    def args_ended(self, job_id: int, total: int, *, now: bool = False) -> defer.Deferred[str]:
        """Every argument of the job is stored; with ``now``, its transaction is made at once
        (committed before anything the server decides later). Fires with "" once committed,
        or with why not (the journal cannot write: it keeps the rows and tries again)."""
        self._rows.ends.append((total, job_id))
        if not now:
            self._buffered(0)
            return defer.succeed("")  # (nobody waits for a buffered one)
        if self.trouble:  # the next try writes them, after the rows kept
            self._buffered(0)
            return defer.succeed(self.trouble)

        def not_written(failure: Failure) -> str:
            failure.trap(JournalError)  # (said once, by _cannot_write; its rows are kept)
            return self.trouble or failure.value.reason

        return self._flush([]).addCallbacks(lambda _: "", not_written)

    def delivered(self, job_id: int, msg: m.Results, *, store: bool, seq: int = -1) -> None:
        """Record a delivered outcome; ``store`` keeps the message for ``attach`` too, as the
        job's result ``seq`` (-1: the next after the last stored)."""
        self._rows.outcomes.append((job_id, msg, seq if store else None))
        self._buffered(len(msg.payload) if store else 0)

    def finished(
        self, job_id: int, state: str, message: str, done: int, failed: int, at: float
    ) -> None:
        """Record a job's end (group committed); old finished jobs are pruned with it."""
        self._rows.finished.append((state, message, done, failed, at, job_id))
        self._buffered(0)

    def _buffered(self, nbytes: int) -> None:
        self._rows.nbytes += nbytes
        if self.trouble:
            return  # the next try writes them, after the rows kept
        if self._rows.nbytes >= self.flush_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = self.clock.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write everything buffered in one transaction (while the journal cannot write, the
        next try does, after the rows it keeps)."""
        if not self.trouble:
            self._flush([]).addErrback(self._not_written)

    def _not_written(self, failure: Failure) -> None:
        failure.trap(JournalError)  # (said once, by _cannot_write; its rows are kept)

    def _flush(self, extra: list[tuple[str, tuple]], *, again: bool = False) -> defer.Deferred:
        """Hand what is buffered and ``extra`` to the writer as one transaction (``again``:
        even with nothing buffered, to write the rows kept from a failed one)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        rows, self._rows = self._rows, _Rows()
        if not (rows or extra or again):
            return defer.succeed(None)
        cutoff = self.clock.seconds() - self.keep_seconds  # (finished jobs older are pruned)
        self._handed += 1
        done = self._writer.run(functools.partial(self._commit, extra, rows, cutoff), rows.nbytes)
        return done.addBoth(self._reported)

    def _reported(self, outcome: Any) -> None:
        """A transaction's outcome (reactor thread, in the order they were handed over): the
        stored results it wrote are let go of (:attr:`on_saved`); the journal cannot write
        while a failure kept rows, and can once a transaction wrote them."""
        self._handed -= 1
        if isinstance(outcome, Failure):
            error = outcome.value
            if self.trouble or (isinstance(error, JournalError) and error.held):
                self._cannot_write(getattr(error, "reason", str(error)))
            return outcome
        if self.trouble:
            self._written_again()
        if outcome and self.on_saved is not None:
            self.on_saved(outcome)
        return None

    def _cannot_write(self, reason: str) -> None:
        """Rows are kept for want of a write: say so once, and try again after a wait that
        doubles up to ``RETRY_MAX`` (after what was handed over before is reported)."""
        if not self.trouble:
            self._trouble_since = self.clock.seconds()
            self._retry_delay = self.flush_interval
        at = time.strftime("%H:%M:%S", time.localtime(self._trouble_since))
        said = self.trouble
        self.trouble = (
            f"cannot write the journal {self.path} since {at}: {reason}; detached jobs are "
            "refused until it can (attached jobs run)"
        )
        if not said:
            self.log.error("{trouble}; it keeps every row and tries again", trouble=self.trouble)
        if self._retry is None and self._handed == 0 and not self._closing:
            self._retry = self.clock.callLater(self._retry_delay, self._try_again)
            self._retry_delay = min(2 * self._retry_delay, RETRY_MAX)

    def _try_again(self) -> None:
        self._retry = None
        self._flush([], again=True).addErrback(self._not_written)

    def _written_again(self) -> None:
        """A transaction wrote every row kept: the journal can write again."""
        self.log.info(
            "the journal {path} is written again ({s:.1f} s after it could not): every row it "
            "kept is on disk",
            path=self.path,
            s=self.clock.seconds() - self._trouble_since,
        )
        self.trouble = ""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._rows:  # (buffered meanwhile)
            self._buffered(0)

    def _commit(self, extra, rows: _Rows, cutoff) -> list[tuple[int, int]]:  # noqa: ANN001
        """One transaction (the writer's thread): the rows kept from a failed one first.
        Returns the ``(job, seq)`` of the stored results it wrote."""
        rows, self._unwritten = self._unwritten.then(rows), _Rows()
        runs, stored, seqs = self._outcome_rows(rows.outcomes)
        overlaps: list[tuple[int, int, int]] = []
        try:
            self._write(extra, rows, runs, stored, cutoff, overlaps)
        except sqlite3.Error as exc:
            self._unwritten = rows  # (a refused submit's ``extra`` is not: it is not accepted)
            message = f"cannot write the journal {self.path}: {exc}"
            raise JournalError(message, str(exc), held=bool(rows)) from None
        self.transactions += 1
        self._seq.update(seqs)
        for *_, job_id in rows.finished:
            self._seq.pop(job_id, None)
        for job_id, start, stop in overlaps:
            self.duplicates += 1
            self.log.error(
                "journal: job {job} arguments {a}..{b} were already recorded as delivered",
                job=job_id,
                a=start,
                b=stop - 1,
            )
        # every row touches a page or so besides its payload
        written = rows.nbytes + sum(
            len(p) for _, params in extra for p in params if isinstance(p, (bytes, memoryview))
        )
        rows_written = len(extra) + len(rows.args) + len(runs) + len(stored) + len(rows.ends)
        self._uncheckpointed += written + 4096 * (1 + rows_written + 2 * len(rows.finished))
        if self._uncheckpointed >= CHECKPOINT_BYTES:
            self._uncheckpointed = 0
            self._checkpoints.run(self._checkpoint, 0)
        return [(job_id, seq) for job_id, _, seq in rows.outcomes if seq is not None and seq >= 0]

    def _write(self, extra, rows: _Rows, runs, stored, cutoff, overlaps) -> None:  # noqa: ANN001
        """The transaction; ``overlaps`` gets the runs it did not record (overlapping ones)."""
        db = self._db
        if db.in_transaction:  # (a failed COMMIT SQLite did not roll back)
            db.execute("ROLLBACK")
        db.execute("BEGIN")
        try:
            for sql, params in extra:
                db.execute(sql, params)
            if rows.args:
                db.executemany(
                    "INSERT OR REPLACE INTO args (job, start, sizes, payload) VALUES (?,?,?,?)",
                    rows.args,
                )
            for run in runs:
                if not self._insert_run(db, run):
                    overlaps.append(run[:3])
            if stored:
                db.executemany(
                    "INSERT INTO results (job, seq, header, payload) VALUES (?,?,?,?)", stored
                )
            if rows.ends:
                db.executemany("UPDATE jobs SET args_total=? WHERE id=?", rows.ends)
            if rows.finished:
                db.executemany(
                    "UPDATE jobs SET state=?, message=?, done=?, failed=?, finished_at=? "
                    "WHERE id=?",
                    rows.finished,
                )
                for *_, job_id in rows.finished:
                    db.execute("DELETE FROM args WHERE job=?", (job_id,))
                self._prune(db, cutoff)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _insert_run(db: sqlite3.Connection, row: tuple[int, int, int, bytes]) -> bool:
        """Record a run of delivered indices unless it overlaps one recorded before (a bug:
        counted in ``duplicates`` and logged once committed, never recorded twice)."""
        job_id, start, stop, _errors = row
        before = db.execute(
            "SELECT start, stop FROM outcomes WHERE job=? AND start<? ORDER BY start DESC LIMIT 1",
            (job_id, stop),
        ).fetchone()
        if before is not None and before[1] > start:
            return False
        db.execute("INSERT INTO outcomes (job, start, stop, errors) VALUES (?,?,?,?)", row)
        return True

    @staticmethod
    def _runs(job_id: int, msg: m.Results) -> list[tuple[int, int, int, bytes]]:
        """The message's indices as runs ``(job, start, stop, errors)`` (one run, usually)."""
        indices = msg.answered
        if not indices:
            return []
        bad = sorted(indices[e[0]] for e in msg.errors)
        if type(indices) is range:  # a run (``start``/``count``): nothing to sort
            return [(job_id, indices.start, indices.stop, msgpack.packb(bad))]
        low, high = min(indices), max(indices)
        if high - low + 1 == len(indices):  # unique indices spanning their range: one run
            return [(job_id, low, high + 1, msgpack.packb(bad))]
        runs = []
        ordered = sorted(indices)
        first = 0
        for k in range(1, len(ordered) + 1):
            if k == len(ordered) or ordered[k] != ordered[k - 1] + 1:
                start, stop = ordered[first], ordered[k - 1] + 1
                errors = [i for i in bad if start <= i < stop]
                runs.append((job_id, start, stop, msgpack.packb(errors)))
                first = k
        return runs

    def _outcome_rows(
        self, outcomes: list[tuple[int, m.Results, int | None]]
    ) -> tuple[list[tuple[int, int, int, bytes]], list[tuple[int, int, bytes, Any]], dict]:
        """The outcome runs and stored results of ``outcomes``, and each job's next ``seq``
        once they are committed (``_seq`` is not moved by a transaction that fails)."""
        rows: list[tuple[int, int, int, bytes]] = []
        stored: list[tuple[int, int, bytes, Any]] = []
        seqs: dict[int, int] = {}
        for job_id, msg, seq in outcomes:
            rows.extend(self._runs(job_id, msg))
            if seq is not None:
                if seq < 0:
                    seq = seqs.get(job_id, self._seq.get(job_id))
                    seq = self.next_seq(job_id) if seq is None else seq
                seqs[job_id] = seq + 1
                header, payload = m.encode(msg)
                stored.append((job_id, seq, header, payload))
        return rows, stored, seqs

    def _checkpoint(self) -> None:
        """(The checkpointer's thread.) A passive checkpoint; one that fails is tried again
        after the next ``CHECKPOINT_BYTES`` committed. Commits go on meanwhile (they are in the
        WAL, which grows until a checkpoint succeeds), so the server runs on: said once when
        checkpoints start failing, whatever the error, and once when one succeeds again."""
        try:
            if self._checkpoint_db is None:  # (a failed open is a failed checkpoint too)
                self._checkpoint_db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception as exc:  # noqa: BLE001 - said, not hidden: nothing else would hear it
            if not self._checkpoint_failing:
                self._checkpoint_failing = True
                cause = str(exc) if isinstance(exc, sqlite3.Error) else repr(exc)
                self.log.error(
                    "cannot checkpoint the journal {path}: {cause}; commits go on into its "
                    "WAL, which grows until a checkpoint succeeds (tried again as more is "
                    "committed)",
                    path=self.path,
                    cause=cause,
                )
            return
        if self._checkpoint_failing:
            self._checkpoint_failing = False
            self.log.info("the journal {path} is checkpointed again", path=self.path)

    def _prune(self, db: sqlite3.Connection, cutoff: float) -> None:
        """Forget finished jobs past the newest ``keep_jobs`` or finished before ``cutoff``."""
        sql = f"{_FINISHED} AND (finished_at < ? OR id NOT IN ({_NEWEST_FINISHED}))"
        old = [row[0] for row in db.execute(sql, (cutoff, self.keep_jobs))]
        for table in ("jobs", "functions", "args", "outcomes", "results"):
            column = "id" if table == "jobs" else "job"
            db.executemany(f"DELETE FROM {table} WHERE {column}=?", [(j,) for j in old])

    def close(self) -> None:
        """Write what is buffered and queued and close the file (the server is stopping);
        closing the last connection checkpoints what is left. Rows the journal could not
        write are tried once more, and said lost if that fails too."""
        self._closing = True
        try:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self._flush([], again=bool(self.trouble)).addErrback(self._not_written)
            self._writer.close()
            self._checkpoints.close()
            if self._unwritten:  # (the writer has stopped: its rows may be read here)
                self.log.error(
                    "the journal {path} stopped with rows it could not write, lost: a restart "
                    "runs the calls whose outcomes they held again",
                    path=self.path,
                )
        finally:
            self._closed = True
            self._reads.close()  # (after the reads handed over: their outcomes are dropped)
            self._db.close()
            for db in (self._read_db, self._checkpoint_db):
                if db is not None:
                    db.close()
            self._read_db = self._checkpoint_db = None

    # ---------------------------------------------------------------- reading

    def recover(self, finished_limit: int = 50) -> list[JournaledJob]:
        """Every running job and the newest ``finished_limit`` finished ones, oldest first.

        A detached job brings where its stored results end (``attach`` reads them from here
        after a restart); a running one also its stored arguments and which indices were
        delivered.
        """
        return self._writer.call(functools.partial(self._recover, finished_limit))

    def job(self, job_id: int) -> JournaledJob | None:
        """One job as recorded (see :meth:`recover`), or None if the journal has no such job;
        read after every write handed over before (this thread waits for them)."""
        return self._writer.call(functools.partial(self._job, job_id))

    def recall(self, job_id: int) -> defer.Deferred:
        """:meth:`job` read by the writer's thread after every write handed over before (what
        is buffered too): fires on the reactor thread, which goes on meanwhile."""
        self.flush()
        return self._writer.run(functools.partial(self._job, job_id), 0)

    def _recover(self, finished_limit: int) -> list[JournaledJob]:
        running = "SELECT id FROM jobs WHERE finished_at IS NULL"
        sql = f"{running} UNION SELECT * FROM ({_NEWEST_FINISHED})"
        with_ids = self._db.execute(sql, (finished_limit,)).fetchall()
        return [job for (job_id,) in sorted(with_ids) if (job := self._job(job_id)) is not None]

    def _job(self, job_id: int) -> JournaledJob | None:
        db = self._db
        row = db.execute(
            "SELECT submit, COALESCE((SELECT fn FROM functions WHERE job=id), fn), submitted_at, "
            "state, message, args_total, done, failed, finished_at, owner FROM jobs WHERE id=?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        submit = _submit_of(row[0], row[1])
        job = JournaledJob(job_id, submit, *row[2:])
        if job.finished_at is None:
            for start, stop, errors in db.execute(
                "SELECT start, stop, errors FROM outcomes WHERE job=?", (job_id,)
            ):
                job.delivered.update(range(start, stop))
                job.failed += len(msgpack.unpackb(errors))
            job.done = len(job.delivered) - job.failed
            job.args = [
                _args_row(start, msgpack.unpackb(sizes), payload)
                for start, sizes, payload in db.execute(
                    "SELECT start, sizes, payload FROM args WHERE job=? ORDER BY start",
                    (job_id,),
                )
            ]
        if submit.detach:
            job.next_seq = self.next_seq(job_id)
        return job

    def next_seq(self, job_id: int) -> int:
        """The ``seq`` after the job's last committed result message (0: none)."""
        sql = "SELECT COALESCE(MAX(seq) + 1, 0) FROM results WHERE job=?"
        return self._db.execute(sql, (job_id,)).fetchone()[0]

    def results(
        self, job_id: int, first: int = 0, end: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[int, m.Results]]:
        """A detached job's committed result messages ``(seq, message)`` with ``first <= seq <
        end``, in order; past ``max_bytes`` of payload no more (one at least). Read by the
        reader's thread, waited for here (tests, tools; the server uses :meth:`read_results`)."""
        return self._reads.call(functools.partial(self._read, job_id, first, end, max_bytes))

    def read_results(
        self, job_id: int, first: int, end: int, max_bytes: int | None
    ) -> defer.Deferred[list[tuple[int, m.Results]]]:
        """:meth:`results` read off the reactor thread, by the reader's thread in the order
        asked: fires on the reactor thread (at once without ``threaded``). What ``attach``
        replays a piece at a time, so the server never reads a large job's whole. Fails with
        JournalError once the journal is closed."""
        if self._closed:
            return defer.fail(JournalError(f"the journal {self.path} is closed"))
        return self._reads.run(functools.partial(self._read, job_id, first, end, max_bytes), 0)

    def _read(
        self, job_id: int, first: int, end: int | None, max_bytes: int | None
    ) -> list[tuple[int, m.Results]]:
        """(The reader's thread.) Committed rows only: a connection of its own, not the
        writer's."""
        if self._read_db is None:
            self._read_db = sqlite3.connect(str(self.path), check_same_thread=False)
        sql = "SELECT seq, header, payload FROM results WHERE job=? AND seq>=? AND seq<? "
        found: list[tuple[int, m.Results]] = []
        size = 0
        rows = self._read_db.execute(
            sql + "ORDER BY seq", (job_id, first, 1 << 62 if end is None else end)
        )
        for seq, header, payload in rows:
            found.append((seq, m.decode(header, payload)))  # type: ignore[arg-type]
            size += len(payload)
            if max_bytes is not None and size >= max_bytes:
                break
        rows.close()
        return found


def _submit_of(header: bytes, fn: bytes) -> m.Submit:
    """A recorded ``submit``; one recorded before options had ``None`` for an automatic
    chunksize says ``0`` for it, which today's rules refuse: read it as ``None``."""
    data = msgpack.unpackb(header, raw=False)
    if data.get("chunksize") == 0:
        data["chunksize"] = None
        header = msgpack.packb(data, use_bin_type=True)
    submit = m.decode(header, fn)
    assert isinstance(submit, m.Submit)
    return submit
