"""Console-side collectors, one per response mode.

A job's results reach the console in any order, each exactly once, as
``(index, argument, result, error)``. A sink decides what to keep and where to put it,
so the scheduler never has to care whether the user wants a list, a database or a fold.
Sinks are plain in-process objects: no reactor, no sockets, an injectable clock.

Counting convention, shared by every sink: ``done`` counts results that succeeded and
``failed`` counts results that carry an error; the two are disjoint, so the number of
finished tasks is ``done + failed``.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

from protocol.errors import ConfigError, JobFailed, RemoteTaskError

__all__ = [
    "MISSING",
    "SINK_MODES",
    "FileSink",
    "NoneSink",
    "ObjectSink",
    "ReduceSink",
    "Sink",
    "SqliteSink",
    "StreamSink",
    "TaskErrorInfo",
    "make_sink",
    "render_line",
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
    """Placeholder for a result that never arrived; distinct from a task that returned None."""

    _instance: ClassVar[_Missing | None] = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

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
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
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
    """Return ``(json_safe_value, was_repr)`` so any result can be written as one JSON line.

    Tuples become lists. If any part of ``value`` has no faithful JSON form (bytes, sets,
    dicts with non-str keys, arbitrary objects, nesting deeper than 200 levels) the whole
    value is replaced by its ``repr()`` and ``was_repr`` is True: a partial conversion
    would make a half-real, half-string structure that readers would misinterpret.
    Non-finite floats pass through: they are written as Python's ``NaN``/``Infinity``
    JSON extension, which ``json.loads`` reads back but strict JSON parsers reject.
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

        A second call does nothing, so error paths can close unconditionally.
        """
        if self.closed:
            return
        try:
            self._close(complete=complete)
        finally:
            self.closed = True
            self.complete = complete

    def _close(self, *, complete: bool) -> None:
        self.flush()

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
        """Results by index; failures are :class:`TaskErrorInfo`, gaps are :data:`MISSING`.

        The list runs to the highest index received, so a job that failed early gives a
        shorter list rather than one padded to a length nobody told this sink.
        """
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


class SqliteSink(Sink):
    """Writes one row per task to a sqlite ``results`` table, committed in batches.

    At start the ``results`` table is dropped and recreated (other tables in the file are
    left alone): a rerun of a job replaces its results instead of failing or mixing runs.
    Columns hold JSON text; a value with no JSON form is stored as the JSON string of its
    repr with ``argument_repr``/``result_repr`` set to 1. ``result`` is SQL NULL exactly
    when ``error`` is not (a task returning None stores the text ``null``).

    A batch is committed when ``batch_size`` rows are pending or when the oldest pending
    row has waited ``interval`` seconds by ``clock`` (checked on each :meth:`add`; call
    :meth:`flush` from a timer to bound latency when results stop coming). :meth:`close`
    commits the rest and closes the connection, so every row is on disk when it returns.
    """

    mode = "sqlite"
    needs_arguments = True

    _INSERT = (
        "INSERT INTO results (idx, argument, result, error, argument_repr, result_repr)"
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
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.output = Path(output)
        self.batch_size = batch_size
        self.interval = interval
        self._clock = clock
        self._rows: list[tuple[int, str, str | None, str | None, int, int]] = []
        self._oldest_pending = 0.0
        #: rows committed so far; lets the console report progress that is really on disk
        self.committed = 0
        try:
            # made on the caller's thread, fed on the reactor's: access is serialised by the caller
            self._conn = sqlite3.connect(self.output, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open sqlite output {self.output}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses nothing on a crash of this process; close() checkpoints.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("DROP TABLE IF EXISTS results")
            self._conn.execute(
                "CREATE TABLE results (idx INTEGER PRIMARY KEY, argument TEXT, result TEXT,"
                " error TEXT, argument_repr INTEGER NOT NULL DEFAULT 0,"
                " result_repr INTEGER NOT NULL DEFAULT 0)"
            )
            self._conn.commit()
        except sqlite3.Error as exc:
            self._conn.close()
            raise ConfigError(f"cannot use {self.output} as sqlite output: {exc}") from exc

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        arg_value, arg_repr = to_jsonable(argument)
        if error is not None:
            result_text, result_repr, error_text = None, False, json.dumps(error.to_json())
        else:
            result_value, result_repr = to_jsonable(result)
            result_text, error_text = json.dumps(result_value), None
        if not self._rows:
            self._oldest_pending = self._clock()
        self._rows.append(
            (index, json.dumps(arg_value), result_text, error_text, int(arg_repr), int(result_repr))
        )
        if len(self._rows) >= self.batch_size or (
            self._clock() - self._oldest_pending >= self.interval
        ):
            self.flush()

    def flush(self) -> None:
        """Commit every pending row now."""
        self._check_open()
        if not self._rows:
            return
        self._conn.executemany(self._INSERT, self._rows)
        self._conn.commit()
        self.committed += len(self._rows)
        self._rows.clear()

    def _close(self, *, complete: bool) -> None:
        try:
            self.flush()
        finally:
            self._conn.close()

    def _extra(self) -> dict[str, Any]:
        return {"output": str(self.output), "table": "results"}


class FileSink(Sink):
    """Writes JSON lines in argument order, holding back only results that arrived early.

    An item is written as soon as every lower index has been written, so memory holds the
    reordering window (``buffered``; high-water mark ``max_buffered``), not the job. The
    file is truncated at start and is always sorted by index; after an incomplete job the
    held-back items are written at close, in index order, leaving gaps where results
    never came.
    """

    mode = "file"

    def __init__(self, output: Path | str) -> None:
        super().__init__()
        self.output = Path(output)
        try:
            self._file = open(self.output, "w", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise ConfigError(f"cannot open output file {self.output}: {exc}") from exc
        self._next = 0
        self._pending: dict[int, str] = {}
        self.max_buffered = 0
        self.lines_written = 0

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

    def _write(self, line: str) -> None:
        self._file.write(line + "\n")
        self.lines_written += 1

    def flush(self) -> None:
        """Push the written prefix to the OS so another reader sees it."""
        self._check_open()
        self._file.flush()

    def _close(self, *, complete: bool) -> None:
        # With complete=True nothing should be held back; if something is, it is still
        # written rather than lost, and the file stays sorted by index either way.
        try:
            for index in sorted(self._pending):
                self._write(self._pending[index])
            self._pending.clear()
        finally:
            self._file.close()

    def _extra(self) -> dict[str, Any]:
        return {"output": str(self.output), "lines": self.lines_written}


class ReduceSink(Sink):
    """Folds results into one value as they arrive, so nothing per task is kept.

    Arrival order is arbitrary and nodes may send partial folds, so ``reduce_fn`` must be
    associative and commutative for the value to be deterministic. There is no initial
    value: the first result (or partial) becomes the accumulator. An exception raised by
    ``reduce_fn`` propagates to the caller and leaves the accumulator as it was.
    """

    mode = "reduce"
    #: failures beyond this many are counted but their details are dropped
    MAX_ERRORS_KEPT: ClassVar[int] = 100

    def __init__(self, reduce_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self._reduce_fn = reduce_fn
        self._acc: Any = None
        self._has_value = False
        self.errors: list[TaskErrorInfo] = []

    def _fold(self, value: Any) -> None:
        if self._has_value:
            self._acc = self._reduce_fn(self._acc, value)
        else:
            self._acc = value
            self._has_value = True

    def _add(self, index: int, argument: Any, result: Any, error: TaskErrorInfo | None) -> None:
        if error is not None:
            if len(self.errors) < self.MAX_ERRORS_KEPT:
                self.errors.append(error)
            return
        self._fold(result)

    def add_partial(self, indices_count: int, partial: Any) -> None:
        """Fold in a node's reduction of ``indices_count`` successful results."""
        self._check_open()
        if indices_count < 1:
            raise ValueError(f"a partial must cover at least one result, not {indices_count}")
        self._fold(partial)
        self.done += indices_count

    def value(self) -> Any:
        """The folded value; raises :class:`JobFailed` if no result arrived to fold."""
        if not self._has_value:
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


SINK_MODES: tuple[str, ...] = ("object", "stream", "sqlite", "file", "reduce", "none")


def make_sink(
    mode: str,
    *,
    output: Path | str | None = None,
    reduce_fn: Callable[[Any, Any], Any] | None = None,
    on_item: ItemCallback | None = None,
    out: TextIO | None = None,
) -> Sink:
    """Build the sink for a job's response mode, refusing settings the mode cannot honour.

    ``output`` and ``reduce_fn`` come from the user's job, so giving one to a mode that
    would ignore it is a ConfigError; ``on_item``/``out`` are console plumbing and are
    ignored by modes other than stream.
    """
    if mode not in SINK_MODES:
        raise ConfigError(
            f"unknown response mode {mode!r}; expected one of {', '.join(SINK_MODES)}"
        )
    if mode in ("sqlite", "file"):
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
    if mode == "sqlite":
        assert output is not None
        return SqliteSink(output)
    if mode == "file":
        assert output is not None
        return FileSink(output)
    if mode == "reduce":
        assert reduce_fn is not None
        return ReduceSink(reduce_fn)
    return NoneSink()
