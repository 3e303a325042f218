"""Console-side collectors, one per response mode: results arrive in any order, each once, as
``(index, argument, result, error)``. Plain in-process objects (no reactor, no sockets).

``done`` counts results that succeeded, ``failed`` those that carry an error (disjoint).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import glob
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

try:
    import fcntl
except ImportError:  # not POSIX: outputs are still staged and renamed, but not locked
    fcntl = None  # type: ignore[assignment]

from protocol.options import ResponseMode

from .errors import ConfigError, JobFailed, OutputError, RemoteTaskError

__all__ = [
    "MISSING",
    "SINK_MODES",
    "FileSink",
    "NoneSink",
    "ObjectSink",
    "OutputLock",
    "ReduceSink",
    "Sink",
    "SqliteSink",
    "StreamSink",
    "TaskErrorInfo",
    "lock_path",
    "make_sink",
    "os_reason",
    "render_line",
    "sql_value",
    "commit_path",
    "staging_path",
    "take_output",
    "to_jsonable",
]

#: deeper nesting than this is rendered with repr(); it also stops self-referencing lists
_MAX_DEPTH = 200


@dataclass(frozen=True)
class TaskErrorInfo:
    """What is known of a task that raised on a core; plain data so it can be stored anywhere."""

    index: int
    type_name: str
    message: str
    traceback: str = ""
    #: the exception object itself, when the core could pickle it and this process can rebuild
    #: it (so the Python API can re-raise the same type); never stored or compared
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, str]:
        """The form written to JSON lines and sqlite (the index lives beside it, not inside)."""
        return {"type": self.type_name, "message": self.message, "traceback": self.traceback}

    def to_exception(self) -> RemoteTaskError:
        """The exception to raise locally when the caller wants the failure to propagate."""
        return RemoteTaskError(self.type_name, self.message, self.traceback, self.index)


class _Missing:
    """Placeholder for a result that never arrived; distinct from a task that returned None.
    One instance: pickling and copying give back :data:`MISSING` itself (``__reduce__``)."""

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"


#: fills the gaps of :meth:`ObjectSink.value` when a job ended before every result arrived
MISSING = _Missing()


class _NotJson(Exception):
    """Internal: a value (or a part of it) has no faithful JSON form."""


def _plain(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _NotJson
    if value is None or isinstance(value, bool):
        return value
    # Subclasses (IntEnum, numpy.float64, ...) are reduced to the base type json knows.
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            # json.dumps would silently turn 1 into "1"; a repr at least says what it was.
            raise _NotJson
        return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    raise _NotJson


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # the user's __repr__ is broken; still record that something arrived
        return object.__repr__(value)


def to_jsonable(value: Any) -> tuple[Any, bool]:
    """``(json_safe_value, was_repr)`` so any result can be written as one JSON line.

    If any part of ``value`` has no faithful JSON form, the whole value is its ``repr()``: a
    half-real, half-string structure would be misread. Non-finite floats pass through
    (Python's ``NaN``/``Infinity`` extension, which strict JSON parsers reject).
    """
    try:
        return _plain(value, 0), False
    except _NotJson:
        return _safe_repr(value), True


def render_line(index: int, result: Any, error: TaskErrorInfo | None) -> str:
    """One JSON line (without newline) for the stream and file modes."""
    if error is not None:
        return json.dumps({"index": index, "error": error.to_json()})
    value, was_repr = to_jsonable(result)
    item: dict[str, Any] = {"index": index, "result": value}
    if was_repr:
        item["repr"] = True
    return json.dumps(item)


class Sink(abc.ABC):
    """Where the results of one job go; the scheduler only ever calls these methods."""

    mode: ClassVar[str]
    #: True if the sink stores arguments, so the console must keep them until the result comes
    needs_arguments: ClassVar[bool] = False

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.closed = False
        #: None while open; the ``complete`` flag given to :meth:`close` afterwards
        self.complete: bool | None = None

    def add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        """Take one finished task; ``result`` is ignored when ``error`` is given."""
        self._check_open()
        if index < 0:
            raise ValueError(f"negative result index {index}")
        if error is not None and error.index != index:
            raise ValueError(f"error for index {error.index} delivered as index {index}")
        self._add(index, argument, result, error)
        if error is None:
            self.done += 1
        else:
            self.failed += 1

    def add_results(
        self, indices: list[int], arguments: list[Any] | None, results: list[Any]
    ) -> None:
        """Take a batch of successful tasks at once (the console's hot path; modes may override)."""
        args = arguments if arguments is not None else [None] * len(indices)
        for index, argument, result in zip(indices, args, results):
            self.add(index, argument, result, None)

    @abc.abstractmethod
    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        """Mode-specific part of :meth:`add`; counting and checks are done by the caller."""

    def add_partial(self, indices_count: int, partial: Any) -> None:
        """Fold in a node's partial reduction; only the reduce mode has anything to fold."""
        raise TypeError(f"the {self.mode!r} response mode takes no partial results")

    def flush(self) -> None:  # noqa: B027 - a deliberate no-op hook, not an abstract method
        """Make what has arrived visible now; a console timer may call it between results."""

    def close(self, *, complete: bool) -> None:
        """Flush and release; ``complete=False`` (job failed or killed) still keeps what arrived.
        A second call does nothing, so error paths can close unconditionally."""
        if self.closed:
            return
        try:
            self._close(complete=complete)
        finally:
            self.closed = True
            self.complete = complete

    def _close(self, *, complete: bool) -> None:
        self.flush()

    def abandon(self) -> None:
        """Stop taking results without delivering them anywhere (they are collected elsewhere)."""
        self.closed = True
        self.complete = False

    def kept(self) -> str | None:
        """After an incomplete job, what was kept and where (for the closing line); else None."""
        return None

    def summary(self) -> dict[str, Any]:
        """JSON-able account of the job's results for the console's final report."""
        return {"mode": self.mode, "done": self.done, "failed": self.failed, **self._extra()}

    def _extra(self) -> dict[str, Any]:
        return {}

    def value(self) -> Any:
        """What ``remap`` returns to a Python caller; for file-like modes, the summary."""
        return self.summary()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self.mode} sink is closed")


class ObjectSink(Sink):
    """Keeps every result in memory and hands back the list in argument order."""

    mode = "object"

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[int, Any] = {}

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        if index in self._items:
            raise ValueError(f"result {index} delivered twice")
        self._items[index] = error if error is not None else result

    def add_results(
        self, indices: list[int], arguments: list[Any] | None, results: list[Any]
    ) -> None:
        self._check_open()
        before = len(self._items)
        self._items.update(zip(indices, results))
        if len(self._items) - before != len(indices):
            raise ValueError("a result was delivered twice")
        self.done += len(indices)

    def value(self) -> list[Any]:
        """Results by index, to the highest received; failures are :class:`TaskErrorInfo`,
        gaps are :data:`MISSING`."""
        length = max(self._items, default=-1) + 1
        return [self._items.get(i, MISSING) for i in range(length)]

    def _extra(self) -> dict[str, Any]:
        length = max(self._items, default=-1) + 1
        return {"missing": length - len(self._items)}


#: ``on_item(index, result, error)`` for the stream mode
ItemCallback = Callable[[int, Any, TaskErrorInfo | None], None]


class StreamSink(Sink):
    """Passes each result on the moment it arrives, in arrival order; keeps nothing."""

    mode = "stream"

    def __init__(self, on_item: ItemCallback | None = None, out: TextIO | None = None) -> None:
        super().__init__()
        if on_item is not None and out is not None:
            raise ValueError("give on_item or out, not both")
        # Resolved now, not per line, so a later swap of sys.stdout does not split the stream.
        self._out: TextIO | None = None
        if on_item is None:
            self._out = out if out is not None else sys.stdout
            on_item = self._write_line
        self._on_item = on_item

    def _write_line(self, index: int, result: Any, error: TaskErrorInfo | None) -> None:
        assert self._out is not None
        self._out.write(render_line(index, result, error) + "\n")
        # A reader at the other end of a pipe should see each line now, not at exit.
        self._out.flush()

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        self._on_item(index, result, error)

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()


def lock_path(output: Path) -> Path:
    """``.OUTPUT.lock``: beside it, so two jobs naming one output meet at one lock; a dot-file,
    so a job whose input walks that directory never reads it (walks skip dot-files)."""
    return output.with_name(f".{output.name}.lock")


def staging_path(output: Path) -> Path:
    """``.OUTPUT.partial``: beside it, so the commit is a rename on one file system; a dot-file,
    as :func:`lock_path`."""
    return output.with_name(f".{output.name}.partial")


class OutputLock:
    """``.OUTPUT.lock``, held with ``flock`` while a job writes OUTPUT, so two jobs never mix.
    The kernel drops it when its process dies; the file is removed on release (a stale one is
    taken over)."""

    def __init__(self, output: Path, owner: str = "") -> None:
        self.output = output
        self.path = lock_path(output)
        #: who writes OUTPUT (a data or vertex job's id and name), for the error another job sees
        self.owner = " ".join(owner.split())
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputError` saying who holds it."""
        while self._fd is None and fcntl is not None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the lock file {self.path} for output {self.output}: "
                    f"{os_reason(exc)}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, _, owner = os.read(fd, 512).decode("utf-8", "replace").strip().partition(" ")
                os.close(fd)
                holder = f"{owner}, pid {pid or '?'}" if owner else f"console pid {pid or '?'}"
                raise OutputError(
                    f"{self.output} is being written by another job ({holder}, "
                    f"lock {self.path}): wait for it to finish or choose another output"
                ) from None
            try:  # the holder may have released (and removed) it between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {self.owner}".strip().encode() + b"\n")
            self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held, so nobody locks a file about to vanish
        os.close(self._fd)
        self._fd = None


def take_output(output: Path, owner: str) -> OutputLock:
    """Lock a data or vertex job's output directory as function jobs lock their output file.
    Staging directories (``.NAME.remap-JOBID``) found once the lock is held are a dead
    driver's (only a live job holding the lock writes one): they are removed."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # the lock file sits beside the output
    except OSError as exc:
        blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else os_reason(exc)
        raise ConfigError(f"cannot create the directory of output {output}: {reason}") from None
    lock = OutputLock(output, owner)
    lock.acquire()
    if output.exists() or output.is_symlink():  # published by a job that just released it
        lock.release()
        raise ConfigError(
            f"output {output} already exists: a job never overwrites results "
            "(remove it or choose another output)"
        )
    for stray in output.parent.glob(f".{glob.escape(output.name)}.remap-*"):
        if stray.is_dir() and not stray.is_symlink():
            shutil.rmtree(stray, ignore_errors=True)
    return lock


def os_reason(exc: BaseException) -> str:
    """A short reason for a failed write, naming a full disk plainly."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk full (no space left on device)"
        if exc.errno == errno.EDQUOT:
            return "disk quota exceeded"
        return exc.strerror or str(exc)
    text = str(exc)
    return "disk full (database or disk is full)" if "disk is full" in text else text


def _check_directory(output: Path, what: str) -> None:
    """Refuse an output with no directory, or no file to replace, before anything is created."""
    if not output.parent.is_dir():
        raise ConfigError(f"cannot write {what} {output}: directory {output.parent} does not exist")
    if output.is_dir():
        raise ConfigError(f"cannot write {what} {output}: it is a directory")
    if output.exists() and not output.is_file():
        # the finished output replaces OUTPUT by a rename: run as root, /dev/full or
        # /dev/stdout would have become a regular file (the device node gone)
        raise ConfigError(
            f"cannot write {what} {output}: it is not a regular file (a device, pipe or "
            "socket); the output replaces it when the job ends: name a file"
        )


class _OutputSink(Sink):
    """A sink that writes a file: staged in ``.OUTPUT.partial``, committed only when complete.

    Nothing next to OUTPUT is touched before the first result arrives (only ``.OUTPUT.lock``
    is taken). A complete job replaces OUTPUT atomically; an incomplete one leaves OUTPUT
    unchanged and keeps what arrived in the staging place, which :meth:`kept` names.
    """

    #: the output, in the error for a directory that will not do
    what: ClassVar[str]
    #: what is held back from the staging place (rows, or lines waiting for a lower index)
    _pending: list[Any] | dict[int, Any]

    def __init__(self, output: Path | str) -> None:
        super().__init__()
        self.output = Path(output)
        #: whether there was an output to leave as it was (the closing line says which)
        self.existed = self.output.exists()
        self.partial = staging_path(self.output)
        #: how the staging place is named in messages (a file, or a table in it)
        self.staging_name = str(self.partial)
        self._lock = OutputLock(self.output)
        #: rows or lines safely in the staging place (what an incomplete job keeps)
        self.kept_count = 0
        self.committed_output = False
        self._broken = False
        _check_directory(self.output, self.what)
        self._check_output()
        self._lock.acquire()

    def _check_output(self) -> None:
        """Refuse an existing OUTPUT this mode cannot replace."""

    def _check_writable(self) -> None:
        if self._broken:
            raise OutputError(f"{self.partial} could not be written earlier")

    def close(self, *, complete: bool) -> None:
        try:
            super().close(complete=complete)
        finally:
            self._lock.release()

    def abandon(self) -> None:
        """Stop without committing or keeping anything (the results go elsewhere)."""
        if not self.closed:
            super().abandon()
            self._pending.clear()
            self.kept_count = 0
            self._finish()
        self._lock.release()

    def _close(self, *, complete: bool) -> None:
        try:
            if not self._broken:
                self._write_rest()
                if complete:
                    self._commit()
        finally:
            self._pending.clear()
            self._finish()

    @abc.abstractmethod
    def _write_rest(self) -> None:
        """Write what is held back to the staging place."""

    @abc.abstractmethod
    def _commit(self) -> None:
        """Replace OUTPUT by what was staged."""

    @abc.abstractmethod
    def _finish(self) -> None:
        """Release resources; remove the staging place when it keeps nothing."""

    def kept(self) -> str | None:
        """After an incomplete close: what was kept and where, in words; else None."""
        if not self.closed or self.committed_output:
            return None
        untouched = "left unchanged" if self.existed else "not written"
        kept = f"kept {self.kept_count} result(s) in {self.staging_name}"
        return f"{kept if self.kept_count else 'no results kept'}; {self.output} {untouched}"

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"output": str(self.output)}
        if self.closed and not self.committed_output:
            extra["kept"] = self.kept_count
            extra["kept_in"] = self.staging_name if self.kept_count else None
        return extra


#: ``results`` columns; ``*_type`` says how to read the value beside it (see sql_value)
_SQLITE_COLUMNS = (
    "idx INTEGER PRIMARY KEY, argument, argument_type TEXT NOT NULL,"
    " result, result_type TEXT, error TEXT"
)
_INT64 = 1 << 63


def sql_value(value: Any) -> tuple[Any, str]:
    """``(stored, type)`` for one value in a ``results`` row: native SQLite types first.

    int (64-bit) -> INTEGER ``int``; bool -> INTEGER 0/1 ``bool``; float -> REAL ``float``;
    str -> TEXT ``str``; bytes -> BLOB ``bytes``; None -> NULL ``null``; lists, tuples and
    dicts with str keys (and ints too big or NaN) -> JSON TEXT ``json``; anything else ->
    TEXT of its repr() ``repr``. So ``ORDER BY result`` and ``WHERE result > 20`` compare
    numbers as numbers.
    """
    if value is None:
        return None, "null"
    if isinstance(value, bool):
        return int(value), "bool"
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return int(value), "int"
    elif isinstance(value, float):
        if value == value:  # SQLite would store NaN as NULL
            return float(value), "float"
    elif isinstance(value, str):
        if value.isascii():
            return str(value), "str"
        try:
            value.encode("utf-8")
            return str(value), "str"
        except UnicodeEncodeError:  # lone surrogates: SQLite text must be valid UTF-8
            return _safe_repr(value), "repr"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "bytes"
    plain, was_repr = to_jsonable(value)
    if was_repr:
        return plain, "repr"
    return json.dumps(plain), "json"


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo a failed transaction; a rollback that fails too leaves sqlite to recover."""
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def commit_path(output: Path) -> Path:
    """``.OUTPUT.commit``: where a ``sqlite`` job builds the database replacing OUTPUT."""
    return output.with_name(f".{output.name}.commit")


#: the files SQLite keeps beside a database while it is open (or after a crash)
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def _remove_database(path: Path) -> None:
    """Remove a database file and whatever SQLite left beside it."""
    for suffix in ("", *_SQLITE_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _seal(conn: sqlite3.Connection) -> None:
    """Fold the WAL into the database file and leave WAL mode: the file then stands alone
    (no ``-wal``/``-shm`` beside it once closed), ready to be renamed or read."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteSink(_OutputSink):
    """Writes one row per task to the ``results`` table of a sqlite file, committed in batches.

    Rows go to ``results_partial`` of the staging database. A complete job replaces OUTPUT by
    a rename: the staging database itself, or a copy of OUTPUT (``.OUTPUT.commit``) with its
    ``results`` swapped (other tables kept), so readers never see a mix and no ``-wal`` or
    ``-shm`` is left beside it. ``result`` and ``result_type`` are NULL exactly when
    ``error`` (JSON text) is not.

    A batch is committed when ``batch_size`` rows are pending or the oldest has waited
    ``interval`` seconds by ``clock`` (checked on each :meth:`add`).
    """

    mode = "sqlite"
    what = "sqlite output"
    needs_arguments = True
    TABLE = "results"
    STAGING = "results_partial"

    _INSERT = (
        f"INSERT INTO {STAGING} (idx, argument, argument_type, result, result_type, error)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    )

    def __init__(
        self,
        output: Path | str,
        *,
        batch_size: int = 1000,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.interval = interval
        self._clock = clock
        self._pending: list[tuple[int, Any, str, Any, str | None, str | None]] = []
        self._oldest_pending = 0.0
        self._conn: sqlite3.Connection | None = None
        super().__init__(output)
        self.staging_name = f"table {self.STAGING} of {self.partial}"

    def _check_output(self) -> None:
        """Read-only look at an existing output: is it a database we may write to later?"""
        if not self.output.exists():
            return
        try:
            conn = sqlite3.connect(f"file:{self.output}?mode=ro", uri=True)
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot use {self.output} as sqlite output: {exc}") from None

    def _error(self, exc: BaseException) -> OutputError:
        self._broken = True
        self._pending.clear()  # not on disk and never will be: kept() counts committed rows only
        return OutputError(
            f"could not write sqlite output {self.output} (staged in {self.partial}): "
            f"{os_reason(exc)}"
        )

    def _open(self) -> sqlite3.Connection:
        """Create the staging database at the first write, replacing a crashed job's (under the
        lock, so no live job's)."""
        if self._conn is not None:
            return self._conn
        try:
            _remove_database(self.partial)
            _remove_database(commit_path(self.output))
        except OSError as exc:
            raise self._error(exc) from None
        try:
            # made on the caller's thread, fed on the reactor's: access is serialised by the caller
            conn = sqlite3.connect(self.partial, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot open sqlite staging {self.partial}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses nothing on a crash of this process; close() checkpoints.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"CREATE TABLE {self.STAGING} ({_SQLITE_COLUMNS})")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc) from None
        self._conn = conn
        return conn

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        arg_value, arg_type = sql_value(argument)
        if error is not None:
            row = (index, arg_value, arg_type, None, None, json.dumps(error.to_json()))
        else:
            result_value, result_type = sql_value(result)
            row = (index, arg_value, arg_type, result_value, result_type, None)
        if not self._pending:
            self._oldest_pending = self._clock()
        self._pending.append(row)
        if len(self._pending) >= self.batch_size or (
            self._clock() - self._oldest_pending >= self.interval
        ):
            self.flush()

    def flush(self) -> None:
        """Commit every pending row now (to the staging table)."""
        self._check_open()
        if not self._pending:
            return
        self._check_writable()
        conn = self._open()
        try:
            conn.execute("BEGIN")
            conn.executemany(self._INSERT, self._pending)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._error(exc) from None
        self.kept_count += len(self._pending)
        self._pending.clear()

    def _write_rest(self) -> None:
        self.flush()

    def _commit(self) -> None:
        """Put the staged rows in place as OUTPUT's ``results``, by one rename."""
        conn = self._open()
        replace = self.output.exists()
        try:
            if not replace:
                conn.execute(f"ALTER TABLE {self.STAGING} RENAME TO {self.TABLE}")
            _seal(conn)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        conn.close()
        self._conn = None
        built = self.partial
        try:
            if replace:
                built = commit_path(self.output)
                self._build_replacement(built)
            _fsync(built)
            os.replace(built, self.output)
        except (OSError, sqlite3.Error) as exc:
            if built != self.partial:
                _remove_database(built)
            self._broken = True
            raise OutputError(
                f"could not replace {self.output}: {os_reason(exc)} "
                f"(the results are in {self.staging_name})"
            ) from None
        self.committed_output = True
        if replace:
            _remove_database(self.partial)

    def _build_replacement(self, target: Path) -> None:
        """``.OUTPUT.commit``: OUTPUT as it is now, with ``results`` made of the staged rows."""
        source = sqlite3.connect(self.output)
        try:
            dest = sqlite3.connect(target, isolation_level=None)
            try:
                source.backup(dest)
                dest.execute("PRAGMA journal_mode=DELETE")
                dest.execute("ATTACH DATABASE ? AS staged", (str(self.partial),))
                dest.execute("BEGIN IMMEDIATE")
                dest.execute(f"DROP TABLE IF EXISTS main.{self.TABLE}")
                dest.execute(f"CREATE TABLE main.{self.TABLE} ({_SQLITE_COLUMNS})")
                dest.execute(f"INSERT INTO main.{self.TABLE} SELECT * FROM staged.{self.STAGING}")
                dest.execute("COMMIT")
                dest.execute("DETACH DATABASE staged")
            except sqlite3.Error:
                _rollback(dest)
                raise
            finally:
                dest.close()
        finally:
            source.close()

    def _finish(self) -> None:
        """Close the staging database standing alone (no ``-wal``/``-shm``); remove it when it
        holds nothing to keep."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sqlite3.Error):
                _seal(conn)  # else the WAL stays beside it: SQLite folds it in when opened
            conn.close()
        if not self.committed_output and self.kept_count == 0:
            with contextlib.suppress(OSError):
                _remove_database(self.partial)

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "table": self.TABLE}


class FileSink(_OutputSink):
    """Writes JSON lines in argument order to ``.OUTPUT.partial``, renamed to OUTPUT when complete.

    An item is written once every lower index is, so memory holds the reordering window
    (``buffered``; high-water mark ``max_buffered``), not the job. After an incomplete job
    the held-back items are written last, in index order. If a write fails (disk full), the
    file is cut back to the last line known to be whole.
    """

    mode = "file"
    what = "output file"
    #: written bytes pushed to the OS at least this often, so a disk that fills up keeps
    #: (and ``kept()`` counts) everything that fit
    PUSH_BYTES = 64 * 1024

    def __init__(self, output: Path | str) -> None:
        self._file: Any = None
        self._next = 0
        self._pending: dict[int, str] = {}
        self.max_buffered = 0
        self.lines_written = 0
        self._bytes = 0
        #: (bytes, lines) on disk at the last successful flush
        self._flushed = (0, 0)
        super().__init__(output)

    @property
    def buffered(self) -> int:
        """Items received but not yet written because a lower index is still missing."""
        return len(self._pending)

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        if index < self._next or index in self._pending:
            raise ValueError(f"result {index} delivered twice")
        # Render now: the buffer then holds a string, not the (maybe large) result object.
        line = render_line(index, result, error)
        if index != self._next:
            self._pending[index] = line
            self.max_buffered = max(self.max_buffered, len(self._pending))
            return
        self._write(line)
        self._next += 1
        while self._next in self._pending:
            self._write(self._pending.pop(self._next))
            self._next += 1

    def _error(self, exc: BaseException) -> OutputError:
        self._broken = True
        return OutputError(f"could not write {self.partial}: {os_reason(exc)}")

    def _open(self) -> Any:
        if self._file is None:
            try:
                self._file = open(self.partial, "wb")
            except OSError as exc:
                raise self._error(exc) from None
        return self._file

    def _write(self, line: str) -> None:
        self._check_writable()
        data = line.encode("utf-8") + b"\n"
        try:
            self._open().write(data)
        except OSError as exc:
            raise self._error(exc) from None
        self._bytes += len(data)
        self.lines_written += 1
        if self._bytes - self._flushed[0] >= self.PUSH_BYTES:
            self._push()

    def flush(self) -> None:
        """Push the written prefix to the OS so another reader sees it."""
        self._check_open()
        self._push()

    def _push(self) -> None:
        if self._file is None or self._broken:
            return
        try:
            self._file.flush()
        except OSError as exc:
            raise self._error(exc) from None
        self._flushed = (self._bytes, self.lines_written)
        self.kept_count = self.lines_written

    def _write_rest(self) -> None:
        # nothing should be held back when complete; if something is, it is still written
        # rather than lost, and the file stays sorted by index either way
        for index in sorted(self._pending):
            self._write(self._pending[index])
        self._pending.clear()
        self.flush()

    def _commit(self) -> None:
        file = self._open()
        try:
            os.fsync(file.fileno())
            file.close()
            os.replace(self.partial, self.output)
        except OSError as exc:
            raise self._error(exc) from None
        self.committed_output = True

    def _finish(self) -> None:
        """Close the partial file; after a failed write, cut it back to its last whole line."""
        if self._file is None:
            return
        file, self._file = self._file, None
        with contextlib.suppress(OSError):
            file.close()  # else the truncate below drops what was left of the buffer
        if self._broken and not self.committed_output:
            with contextlib.suppress(OSError):
                os.truncate(self.partial, self._flushed[0])
            self.kept_count = self._flushed[1]
        if not self.committed_output and self.kept_count == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.partial)

    def _extra(self) -> dict[str, Any]:
        return {**super()._extra(), "lines": self.lines_written}


#: the accumulator of a reduce job before its first result (None may be a result)
_NOTHING = object()


class ReduceSink(Sink):
    """Folds results into one value as they arrive (``reduce_fn`` must be associative and
    commutative: order is arbitrary and nodes send partial folds). The first result (or
    partial) becomes the accumulator; an exception from ``reduce_fn`` leaves it as it was.
    """

    mode = "reduce"
    #: failures beyond this many are counted but their details are dropped
    MAX_ERRORS_KEPT: ClassVar[int] = 100

    def __init__(self, reduce_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self._reduce_fn = reduce_fn
        self._acc: Any = _NOTHING
        self.errors: list[TaskErrorInfo] = []

    def _fold(self, value: Any) -> None:
        self._acc = value if self._acc is _NOTHING else self._reduce_fn(self._acc, value)

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        if error is None:
            self._fold(result)
        elif len(self.errors) < self.MAX_ERRORS_KEPT:
            self.errors.append(error)

    def add_partial(self, indices_count: int, partial: Any) -> None:
        """Fold in a node's reduction of ``indices_count`` successful results."""
        self._check_open()
        if indices_count < 1:
            raise ValueError(f"a partial must cover at least one result, not {indices_count}")
        self._fold(partial)
        self.done += indices_count

    def value(self) -> Any:
        """The folded value; raises :class:`JobFailed` if no result arrived to fold."""
        if self._acc is _NOTHING:
            cause = self.errors[0].to_exception() if self.errors else None
            raise JobFailed(f"no results to reduce ({self.failed} tasks failed)") from cause
        return self._acc

    def _extra(self) -> dict[str, Any]:
        return {"errors": [{"index": e.index, **e.to_json()} for e in self.errors]}


class NoneSink(Sink):
    """Counts results and drops them, for jobs run only for their side effects."""

    mode = "none"

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        pass

    def add_results(
        self, indices: list[int], arguments: list[Any] | None, results: list[Any]
    ) -> None:
        self._check_open()
        self.done += len(indices)

    def value(self) -> int:
        """The number of tasks that succeeded."""
        return self.done


#: the response modes (the job options' :class:`~protocol.options.ResponseMode`)
SINK_MODES: tuple[str, ...] = tuple(mode.value for mode in ResponseMode)


def make_sink(
    mode: str,
    *,
    output: Path | str | None = None,
    reduce_fn: Callable[[Any, Any], Any] | None = None,
    on_item: ItemCallback | None = None,
    out: TextIO | None = None,
) -> Sink:
    """Build the sink for a job's response mode, refusing an ``output`` or ``reduce_fn`` the
    mode would ignore; ``on_item``/``out`` are console plumbing, for stream only."""
    if mode not in SINK_MODES:
        raise ConfigError(
            f"unknown response mode {mode!r}; expected one of {', '.join(SINK_MODES)}"
        )
    if ResponseMode(mode).writes_output:
        if output is None:
            raise ConfigError(f"response mode {mode!r} needs an output path")
    elif output is not None:
        raise ConfigError(f"response mode {mode!r} does not write an output file")
    if mode == "reduce":
        if reduce_fn is None:
            raise ConfigError("response mode 'reduce' needs a reduce function")
    elif reduce_fn is not None:
        raise ConfigError(f"response mode {mode!r} does not take a reduce function")

    if mode == "object":
        return ObjectSink()
    if mode == "stream":
        return StreamSink(on_item=on_item, out=out)
    if output is not None:  # (checked above: the mode writes an output)
        return SqliteSink(output) if mode == "sqlite" else FileSink(output)
    if reduce_fn is not None:
        return ReduceSink(reduce_fn)
    return NoneSink()
