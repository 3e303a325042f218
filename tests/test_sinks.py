"""Tests for the console-side result sinks (remap/sinks.py)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from remap.errors import ConfigError, JobFailed, OutputError, RemapError, RemoteTaskError
from remap.sinks import (
    MISSING,
    SINK_MODES,
    FileSink,
    NoneSink,
    ObjectSink,
    ReduceSink,
    Sink,
    SqliteSink,
    StreamSink,
    TaskErrorInfo,
    lock_path,
    make_sink,
    staging_path,
    take_output,
    to_jsonable,
)

N = 50
FAILING = {3, 17, 18, 41}


def _error(index: int) -> TaskErrorInfo:
    return TaskErrorInfo(index, "ValueError", f"bad {index}", f"Traceback for {index}\n")


def _items(n: int = N, failing: set[int] = FAILING) -> list[tuple[int, Any, Any, Any]]:
    """(index, argument, result, error) for a job squaring 0..n-1, in a fixed shuffled order."""
    items = [(i, i, None, _error(i)) if i in failing else (i, i, i * i, None) for i in range(n)]
    random.Random(1234).shuffle(items)
    return items


def _feed(sink: Sink, items: list[tuple[int, Any, Any, Any]]) -> None:
    for item in items:
        sink.add(*item)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rows(path: Path, table: str = "results") -> list[tuple[Any, ...]]:
    """Rows as a second, independent connection sees them: only committed data."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            f"SELECT idx, argument, argument_type, result, result_type, error"
            f" FROM {table} ORDER BY idx"
        ).fetchall()


def _staged(path: Path) -> list[tuple[Any, ...]]:
    """Rows committed so far by a running job (its staging table in ``.OUTPUT.partial``), []
    before the first."""
    staging = staging_path(path)
    if not staging.exists():
        return []
    with closing(sqlite3.connect(staging)) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return _rows(staging, SqliteSink.STAGING) if SqliteSink.STAGING in names else []


class Opaque:
    """A result with no JSON form."""

    def __repr__(self) -> str:
        return "Opaque()"


class BrokenRepr:
    """A result whose __repr__ raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


# --- to_jsonable and TaskErrorInfo -------------------------------------------------------

_self_ref: list[Any] = []
_self_ref.append(_self_ref)


@pytest.mark.parametrize(
    ("value", "expected", "was_repr"),
    [
        (None, None, False),
        (True, True, False),
        (7, 7, False),
        ("héllo", "héllo", False),
        ((1, (2, 3)), [1, [2, 3]], False),
        ({"a": (1, None)}, {"a": [1, None]}, False),
        ({1: "x"}, "{1: 'x'}", True),
        ({"a": {2: 3}}, "{'a': {2: 3}}", True),
        (b"\x00ab", "b'\\x00ab'", True),
        ({1, 2}, "{1, 2}", True),
        ([1, Opaque()], "[1, Opaque()]", True),
        (_self_ref, "[[...]]", True),
    ],
)
def test_to_jsonable_table(value: Any, expected: Any, was_repr: bool) -> None:
    """JSON-safe values convert faithfully (tuples to lists); anything else is one whole repr."""
    converted, flagged = to_jsonable(value)
    assert (converted, flagged) == (expected, was_repr)
    json.dumps(converted)


def test_to_jsonable_nan_passes_through() -> None:
    """Non-finite floats are kept as floats and survive a json round trip (documented NaN)."""
    converted, flagged = to_jsonable([math.nan, math.inf])
    assert not flagged
    back = json.loads(json.dumps(converted))
    assert math.isnan(back[0]) and back[1] == math.inf


def test_to_jsonable_broken_repr_still_renders() -> None:
    """A user object whose __repr__ raises is still recorded, by object.__repr__."""
    converted, flagged = to_jsonable(BrokenRepr())
    assert flagged
    assert converted.startswith("<") and "BrokenRepr" in converted


def test_task_error_info_json_and_exception() -> None:
    """TaskErrorInfo serialises without its index and becomes a RemoteTaskError carrying all."""
    info = _error(5)
    assert info.to_json() == {"type": "ValueError", "message": "bad 5", "traceback": info.traceback}
    exc = info.to_exception()
    assert isinstance(exc, RemoteTaskError) and isinstance(exc, RemapError)
    assert (exc.type_name, exc.message, exc.remote_traceback, exc.index) == (
        "ValueError",
        "bad 5",
        "Traceback for 5\n",
        5,
    )


# --- common Sink behaviour ---------------------------------------------------------------


def _every_sink(tmp_path: Path) -> list[Sink]:
    return [
        ObjectSink(),
        StreamSink(out=io.StringIO()),
        SqliteSink(tmp_path / "r.db"),
        FileSink(tmp_path / "r.jsonl"),
        ReduceSink(lambda a, b: a + b),
        NoneSink(),
    ]


def test_every_sink_counts_done_and_failed_disjointly(tmp_path: Path) -> None:
    """Every mode reports done = successes and failed = errors, summing to all tasks."""
    for sink in _every_sink(tmp_path):
        _feed(sink, _items())
        sink.close(complete=True)
        summary = sink.summary()
        assert summary["mode"] == sink.mode
        assert (summary["done"], summary["failed"]) == (N - len(FAILING), len(FAILING))
        json.dumps(summary)


def test_add_after_close_is_refused(tmp_path: Path) -> None:
    """A closed sink refuses more results instead of silently losing them; close is idempotent."""
    for sink in _every_sink(tmp_path):
        sink.close(complete=False)
        sink.close(complete=True)
        assert sink.complete is False
        with pytest.raises(RuntimeError):
            sink.add(0, 0, 0, None)


def test_error_index_must_match(tmp_path: Path) -> None:
    """An error delivered under another task's index is a caller bug and is rejected."""
    for sink in _every_sink(tmp_path):
        with pytest.raises(ValueError):
            sink.add(1, 1, None, _error(2))
        with pytest.raises(ValueError):
            sink.add(-1, -1, 0, None)
        assert (sink.done, sink.failed) == (0, 0)
        sink.close(complete=False)


@pytest.mark.parametrize("mode", [m for m in SINK_MODES if m != "reduce"])
def test_add_partial_only_for_reduce(mode: str, tmp_path: Path) -> None:
    """Partial folds make sense only for reduce; every other mode raises TypeError."""
    output = tmp_path / "out" if mode in ("sqlite", "file") else None
    sink = make_sink(mode, output=output, out=io.StringIO())
    with pytest.raises(TypeError):
        sink.add_partial(3, 42)
    sink.close(complete=False)


# --- object ------------------------------------------------------------------------------


def test_object_sink_orders_shuffled_results() -> None:
    """Out-of-order arrivals come back as one list in argument order, errors in place."""
    sink = ObjectSink()
    _feed(sink, _items())
    sink.close(complete=True)
    expected = [_error(i) if i in FAILING else i * i for i in range(N)]
    assert sink.value() == expected
    assert all(isinstance(sink.value()[i], TaskErrorInfo) for i in FAILING)
    assert sink.summary()["missing"] == 0


def test_object_sink_marks_gaps_of_failed_job() -> None:
    """A job that stopped early leaves MISSING (not None) where results never came."""
    sink = ObjectSink()
    sink.add(2, 2, None, None)
    sink.add(0, 0, "zero", None)
    sink.close(complete=False)
    assert sink.value() == ["zero", MISSING, None]
    assert sink.value()[1] is MISSING and sink.value()[2] is None
    assert sink.summary()["missing"] == 1
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING


def test_object_sink_rejects_duplicates() -> None:
    """A result delivered twice is a scheduler bug; the object sink catches it."""
    sink = ObjectSink()
    sink.add(0, 0, 1, None)
    with pytest.raises(ValueError):
        sink.add(0, 0, 1, None)
    assert sink.done == 1


# --- stream ------------------------------------------------------------------------------


def test_stream_sink_writes_json_lines_in_arrival_order() -> None:
    """Each item becomes one JSON line at once, in arrival order; odd results are flagged repr."""
    out = io.StringIO()
    sink = StreamSink(out=out)
    sink.add(2, "a", (1, 2), None)
    assert out.getvalue().count("\n") == 1
    sink.add(0, "b", b"raw", None)
    sink.add(1, "c", None, _error(1))
    sink.add(3, "d", {1: Opaque()}, None)
    sink.close(complete=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {"index": 2, "result": [1, 2]},
        {"index": 0, "result": "b'raw'", "repr": True},
        {"index": 1, "error": _error(1).to_json()},
        {"index": 3, "result": "{1: Opaque()}", "repr": True},
    ]
    assert sink.value() == {"mode": "stream", "done": 3, "failed": 1}


class CountingStream(io.StringIO):
    """A text stream that records how many lines were written when each flush happened."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed_at: list[int] = []

    def flush(self) -> None:
        self.flushed_at.append(self.getvalue().count("\n"))
        super().flush()


def test_stream_sink_flushes_every_line() -> None:
    """Each line is flushed as it is written, so a reader on a pipe sees it without waiting."""
    out = CountingStream()
    sink = StreamSink(out=out)
    for i in range(3):
        sink.add(i, i, i, None)
        assert out.flushed_at[-1] == i + 1
    sink.close(complete=True)


def test_stream_sink_calls_back_immediately() -> None:
    """With a callback, each add calls it before returning, with the error passed through."""
    calls: list[tuple[int, Any, Any]] = []
    sink = StreamSink(on_item=lambda i, r, e: calls.append((i, r, e)))
    for n, item in enumerate(_items(10, {4})):
        sink.add(*item)
        assert len(calls) == n + 1
        assert calls[-1] == (item[0], item[2], item[3])
    sink.close(complete=True)


def test_stream_sink_refuses_callback_and_stream_together() -> None:
    """Giving both on_item and out is ambiguous, so it is refused."""
    with pytest.raises(ValueError):
        StreamSink(on_item=lambda i, r, e: None, out=io.StringIO())


# --- sqlite ------------------------------------------------------------------------------


def test_sqlite_sink_rows_all_committed_after_close(tmp_path: Path) -> None:
    """After close every row, shuffled and with errors, is visible to another connection."""
    path = tmp_path / "results.db"
    sink = SqliteSink(path, batch_size=7)
    assert sink.needs_arguments
    items = _items()
    items.append((N, {1: 2}, Opaque(), None))
    _feed(sink, items)
    sink.close(complete=True)
    rows = _rows(path)
    assert [row[0] for row in rows] == list(range(N + 1))
    for idx, argument, arg_type, result, result_type, error in rows[:N]:
        assert (argument, arg_type) == (idx, "int")
        if idx in FAILING:
            assert (result, result_type) == (None, None)
            assert json.loads(error) == _error(idx).to_json()
        else:
            assert (result, result_type, error) == (idx * idx, "int", None)
    assert rows[N][1:] == ("{1: 2}", "repr", "Opaque()", "repr", None)
    assert sink.kept_count == N + 1
    assert sink.summary() == {
        "mode": "sqlite",
        "done": N + 1 - len(FAILING),
        "failed": len(FAILING),
        "output": str(path),
        "table": "results",
    }
    assert sink.kept() is None


def test_sqlite_sink_none_result_is_null_of_type_null(tmp_path: Path) -> None:
    """A task returning None stores NULL typed 'null'; a failure has no result_type at all."""
    path = tmp_path / "r.db"
    sink = SqliteSink(path)
    sink.add(0, 0, None, None)
    sink.add(1, 1, None, _error(1))
    sink.close(complete=True)
    assert _rows(path)[0] == (0, 0, "int", None, "null", None)
    assert _rows(path)[1][2:5] == ("int", None, None)


@pytest.mark.parametrize(
    ("value", "stored", "kind"),
    [
        (7, 7, "int"),
        (-(2**63), -(2**63), "int"),
        (2**70, str(2**70), "json"),
        (True, 1, "bool"),
        (2.5, 2.5, "float"),
        (math.inf, math.inf, "float"),
        (math.nan, "NaN", "json"),
        ("ünï", "ünï", "str"),
        ("20", "20", "str"),
        ("\udc80", "'\\udc80'", "repr"),
        (b"\x00\xff", b"\x00\xff", "bytes"),
        (bytearray(b"ab"), b"ab", "bytes"),
        (None, None, "null"),
        ([1, "a", None], '[1, "a", null]', "json"),
        ((1, 2), "[1, 2]", "json"),
        ({"k": [1.5]}, '{"k": [1.5]}', "json"),
        ({1, 2}, "{1, 2}", "repr"),
    ],
)
def test_sqlite_sink_stores_native_types(
    tmp_path: Path, value: Any, stored: Any, kind: str
) -> None:
    """Numbers, strings and bytes are stored as SQLite's own types; JSON only for structures."""
    path = tmp_path / "r.db"
    sink = SqliteSink(path)
    sink.add(0, value, value, None)
    sink.close(complete=True)
    assert _rows(path) == [(0, stored, kind, stored, kind, None)]


def test_sqlite_sink_numbers_sort_and_compare_as_numbers(tmp_path: Path) -> None:
    """ORDER BY result and WHERE result > 20 give the right answer (JSON text would not)."""
    values = [3, 100, 25, 9.5, 20, 21.25, -4]
    path = tmp_path / "r.db"
    sink = SqliteSink(path)
    for i, v in enumerate(values):
        sink.add(i, i, v, None)
    sink.close(complete=True)
    with closing(sqlite3.connect(path)) as conn:
        ordered = [r[0] for r in conn.execute("SELECT result FROM results ORDER BY result")]
        over = [r[0] for r in conn.execute("SELECT result FROM results WHERE result > 20")]
        total = conn.execute("SELECT sum(result) FROM results").fetchone()[0]
    assert ordered == sorted(values)
    assert sorted(over) == [21.25, 25, 100]
    assert total == sum(values)


def test_sqlite_sink_commits_by_batch_size(tmp_path: Path) -> None:
    """With a frozen clock, rows become visible exactly when a full batch is pending."""
    path = tmp_path / "r.db"
    sink = SqliteSink(path, batch_size=4, clock=FakeClock())
    for i in range(3):
        sink.add(i, i, i, None)
    assert _staged(path) == []
    sink.add(3, 3, 3, None)
    assert len(_staged(path)) == 4
    sink.add(4, 4, 4, None)
    assert len(_staged(path)) == 4
    sink.close(complete=True)
    assert len(_rows(path)) == 5


def test_sqlite_sink_commits_by_elapsed_time(tmp_path: Path) -> None:
    """Pending rows are committed on the first add once the oldest has waited `interval`."""
    path = tmp_path / "r.db"
    clock = FakeClock()
    sink = SqliteSink(path, batch_size=1000, interval=0.5, clock=clock)
    sink.add(0, 0, 0, None)
    clock.now += 0.3
    sink.add(1, 1, 1, None)
    assert _staged(path) == []
    clock.now += 0.19
    sink.add(2, 2, 2, None)
    assert _staged(path) == []
    clock.now += 0.01
    sink.add(3, 3, 3, None)
    assert len(_staged(path)) == 4
    # The timer restarts with the next pending row, not at the last commit.
    clock.now += 10
    sink.add(4, 4, 4, None)
    assert len(_staged(path)) == 4
    clock.now += 0.5
    sink.flush()
    assert len(_staged(path)) == 5
    sink.close(complete=True)


def _old_results(path: Path) -> None:
    """An output of a previous good run: 1,000 rows in results, and a table of the user's."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE results (idx INTEGER PRIMARY KEY, result)")
        conn.executemany("INSERT INTO results VALUES (?, ?)", [(i, i) for i in range(1000)])
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")


def _old_table(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM results ORDER BY idx").fetchall()


def test_sqlite_sink_failed_job_keeps_old_results_and_its_rows_apart(tmp_path: Path) -> None:
    """An incomplete job leaves `results` as it was; what arrived is kept in results_partial."""
    path = tmp_path / "r.db"
    _old_results(path)
    sink = SqliteSink(path, clock=FakeClock())
    _feed(sink, _items()[:10])
    sink.close(complete=False)
    assert _old_table(path) == [(i, i) for i in range(1000)]
    assert len(_staged(path)) == 10
    assert sink.kept() == (
        f"kept 10 result(s) in table results_partial of {tmp_path / '.r.db.partial'}; "
        f"{path} left unchanged"
    )
    assert sink.summary()["kept"] == 10


@pytest.mark.parametrize("end", ["close", "abandon"])
def test_sqlite_sink_job_that_never_starts_changes_nothing(tmp_path: Path, end: str) -> None:
    """A sink made and closed with no result (the server was unreachable) writes nothing:
    the old output is byte for byte the same, and a missing one is not created."""
    path = tmp_path / "r.db"
    _old_results(path)
    before = path.read_bytes()
    for output in (path, tmp_path / "new.db"):
        sink = SqliteSink(output)
        sink.close(complete=False) if end == "close" else sink.abandon()
    assert path.read_bytes() == before
    assert not (tmp_path / "new.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db"]


def test_sqlite_sink_replaces_results_table_only(tmp_path: Path) -> None:
    """A complete rerun replaces the old results table but leaves the file's other tables alone."""
    path = tmp_path / "r.db"
    _old_results(path)
    sink = SqliteSink(path)
    sink.add(0, "a", "b", None)
    sink.close(complete=True)
    assert _rows(path) == [(0, "a", "str", "b", "str", None)]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"results", "notes"}


def test_sqlite_sink_bad_output_is_config_error(tmp_path: Path) -> None:
    """An unopenable path or a non-database file is the user's mistake: ConfigError."""
    with pytest.raises(ConfigError, match="no-such-dir"):
        SqliteSink(tmp_path / "no-such-dir" / "r.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a sqlite database, just text" * 100)
    with pytest.raises(ConfigError, match="junk.db"):
        SqliteSink(junk)
    assert junk.read_bytes() == b"this is not a sqlite database, just text" * 100


# --- file --------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_file_sink_writes_shuffled_results_in_order(tmp_path: Path) -> None:
    """Shuffled arrivals with errors end up as one JSON line per index, in index order."""
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    _feed(sink, _items())
    sink.add(N, N, Opaque(), None)
    sink.close(complete=True)
    expected = [
        {"index": i, "error": _error(i).to_json()}
        if i in FAILING
        else {"index": i, "result": i * i}
        for i in range(N)
    ]
    expected.append({"index": N, "result": "Opaque()", "repr": True})
    assert _lines(path) == expected
    assert sink.summary()["lines"] == N + 1
    assert sink.buffered == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_file_sink_buffer_bounded_by_reorder_window(tmp_path: Path) -> None:
    """Arrivals reversed within windows of W hold at most W-1 items, and the prefix is written.

    After each window completes, the staging file holds exactly the contiguous prefix so
    far; a fully reversed run, by contrast, has to hold everything but one item.
    """
    window, n = 8, 64
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    for start in range(0, n, window):
        for i in reversed(range(start, start + window)):
            sink.add(i, i, i, None)
            assert sink.buffered <= window - 1
        sink.flush()
        assert [line["index"] for line in _lines(sink.partial)] == list(range(start + window))
    assert sink.max_buffered == window - 1
    sink.close(complete=True)

    reversed_sink = FileSink(tmp_path / "reversed.jsonl")
    for i in reversed(range(n)):
        reversed_sink.add(i, i, i, None)
    assert reversed_sink.max_buffered == n - 1
    reversed_sink.close(complete=True)


def test_file_sink_incomplete_job_keeps_its_lines_beside_the_old_output(tmp_path: Path) -> None:
    """close(complete=False) leaves OUTPUT as it was and keeps the in-order prefix, then the
    held items by index (gaps left), in OUTPUT.partial; kept() says so in words."""
    path = tmp_path / "out.jsonl"
    path.write_text("old\n" * 1000)
    sink = FileSink(path)
    for i in (7, 1, 0, 5, 3):
        sink.add(i, i, i, None)
    assert sink.buffered == 3
    sink.close(complete=False)
    assert path.read_text() == "old\n" * 1000
    assert [line["index"] for line in _lines(sink.partial)] == [0, 1, 3, 5, 7]
    assert sink.kept() == f"kept 5 result(s) in {sink.partial}; {path} left unchanged"


def test_kept_says_an_output_that_never_existed_was_not_written(tmp_path: Path) -> None:
    """An incomplete job whose output did not exist says it was not written, not that a
    file that is not there was "left unchanged"."""
    path = tmp_path / "new.jsonl"
    sink = FileSink(path)
    sink.add(0, 0, 0, None)
    sink.close(complete=False)
    assert not path.exists()
    assert sink.kept() == f"kept 1 result(s) in {sink.partial}; {path} not written"
    nothing = FileSink(tmp_path / "none.jsonl")
    nothing.close(complete=False)
    assert nothing.kept() == f"no results kept; {tmp_path / 'none.jsonl'} not written"


@pytest.mark.parametrize("end", ["close", "abandon"])
def test_file_sink_job_that_never_starts_changes_nothing(tmp_path: Path, end: str) -> None:
    """No result ever came (the server was unreachable): the old output keeps every line and
    no file is left beside it; kept() says that nothing was kept."""
    path = tmp_path / "out.jsonl"
    path.write_text("old\n" * 1000)
    sink = FileSink(path)
    sink.close(complete=False) if end == "close" else sink.abandon()
    assert path.read_text() == "old\n" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    if end == "close":
        assert sink.kept() == f"no results kept; {path} left unchanged"


def test_file_sink_empty_complete_job_writes_an_empty_output(tmp_path: Path) -> None:
    """A job with no arguments that completes does replace the output (with nothing)."""
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    sink = FileSink(path)
    sink.close(complete=True)
    assert path.read_text() == ""


def test_file_sink_rejects_duplicates(tmp_path: Path) -> None:
    """A repeated index (already written or still held) would break ordering and is refused."""
    sink = FileSink(tmp_path / "out.jsonl")
    sink.add(0, 0, 0, None)
    sink.add(2, 2, 2, None)
    for index in (0, 2):
        with pytest.raises(ValueError):
            sink.add(index, index, index, None)
    sink.close(complete=False)


def test_file_sink_bad_output_is_config_error(tmp_path: Path) -> None:
    """An output path that cannot be opened is reported as ConfigError naming it."""
    with pytest.raises(ConfigError, match="no-such-dir"):
        FileSink(tmp_path / "no-such-dir" / "out.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        FileSink(tmp_path)


@pytest.mark.parametrize("cls", [FileSink, SqliteSink])
def test_an_output_that_is_no_regular_file_is_refused_untouched(tmp_path: Path, cls: type) -> None:
    """A device, a FIFO or a link to one (``output: /dev/stdout``) is refused with one line
    before anything is created next to it: a file job's finished output replaces OUTPUT by a
    rename, which (as root) turned /dev/full into a regular file holding the results."""
    import os
    import stat

    device = tmp_path / "stdout"
    device.symlink_to("/dev/null")  # a character device nothing may replace
    outputs = [device]
    if cls is FileSink:  # (sqlite would block opening a FIFO nobody writes)
        fifo = tmp_path / "results.fifo"
        os.mkfifo(fifo)
        outputs.append(fifo)
    for output in outputs:
        with pytest.raises(ConfigError, match="it is not a regular file"):
            cls(output)
    assert device.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(o.name for o in outputs)


# --- two jobs, one output ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [FileSink, SqliteSink])
def test_a_second_job_on_the_same_output_is_refused(tmp_path: Path, cls: type) -> None:
    """While one job writes OUTPUT, a second sink for it is refused with one line naming the
    output, the holder's pid and the lock file; once the first is done the output is free."""
    path = tmp_path / "out"
    first = cls(path)
    first.add(0, 0, "first", None)
    with pytest.raises(OutputError) as refused:
        cls(path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{path} is being written by another job" in message
    assert f"pid {os.getpid()}" in message and str(lock_path(path)) in message
    first.close(complete=True)
    assert not lock_path(path).exists()
    second = cls(path)
    second.close(complete=False)


def test_a_stale_lock_file_from_a_dead_console_does_not_block(tmp_path: Path) -> None:
    """A lock file left by a SIGKILLed console holds no lock: the next job takes it over."""
    path = tmp_path / "out.jsonl"
    lock_path(path).write_text("12345\n")
    sink = FileSink(path)
    sink.add(0, 0, 1, None)
    sink.close(complete=True)
    assert _lines(path) == [{"index": 0, "result": 1}]
    assert not lock_path(path).exists()


def test_the_lock_beside_an_output_is_no_input_of_a_job_walking_that_directory(
    tmp_path: Path,
) -> None:
    """The lock of a data job's output (and of a function job's file) sits beside it as a
    dot-file: a job whose input is that directory does not read it, while a second job on the
    same output is still refused. (``OUT.lock`` was read as input, a stale one for ever.)"""
    from remap.data.inputs import resolve_inputs
    from remap.sinks import take_output

    (tmp_path / "words.txt").write_text("a b\n")
    held = take_output(tmp_path / "out", "data job 20261202-first (first)")
    sink = FileSink(tmp_path / "results.jsonl")
    sink.add(0, 0, 1, None)
    try:
        assert lock_path(tmp_path / "out").exists()
        assert lock_path(tmp_path / "results.jsonl").exists()
        for entry in (str(tmp_path), "*"):  # a walk, a wildcard
            read = [p.name for p in resolve_inputs(entry, tmp_path)]
            assert "words.txt" in read and not [n for n in read if n.endswith(".lock")], read
        with pytest.raises(OutputError, match="being written by another job"):
            take_output(tmp_path / "out", "data job 20261202-second (second)")
        with pytest.raises(OutputError, match="being written by another job"):
            FileSink(tmp_path / "results.jsonl")
    finally:
        held.release()
        sink.close(complete=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "words.txt"]


def test_a_file_jobs_staging_file_is_no_input_of_a_job_walking_that_directory(
    tmp_path: Path,
) -> None:
    """While a ``file`` job writes, its staging file sits beside the output as a dot-file: a
    data job whose input walks that directory (or a wildcard) reads the inputs only, never a
    half-written output. The commit is still one rename. (``OUT.partial`` was read as input.)"""
    from remap.data.inputs import resolve_inputs

    (tmp_path / "words.txt").write_text("a b\n")
    sink = FileSink(tmp_path / "results.jsonl")
    sink.add(0, 0, 1, None)
    sink.flush()
    try:
        assert staging_path(tmp_path / "results.jsonl") == sink.partial
        assert sink.partial.parent == tmp_path and sink.partial.read_text()
        for entry in (str(tmp_path), "*", f"{tmp_path}/*"):  # a walk, wildcards
            read = [p.name for p in resolve_inputs(entry, tmp_path)]
            assert read == ["words.txt"], read
    finally:
        sink.close(complete=True)
    assert _lines(tmp_path / "results.jsonl") == [{"index": 0, "result": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "words.txt"]


_KILLED_WRITER = """
import os, signal, sys
from remap.sinks import FileSink
sink = FileSink(sys.argv[1])
for i in range(3):
    sink.add(i, i, i * 10, None)
sink.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_sigkilled_writers_staging_file_is_hidden_and_replaced_by_the_next_run(
    tmp_path: Path,
) -> None:
    """A console SIGKILLed mid-job leaves its staging file (what it had received) beside the
    output: hidden from a job walking that directory, not blocking the next run, which
    replaces it and commits by rename, leaving nothing beside the output but the output."""
    import subprocess
    import sys

    from remap.data.inputs import resolve_inputs

    out = tmp_path / "results.jsonl"
    (tmp_path / "words.txt").write_text("a b\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out)], env=env, timeout=60, capture_output=True
    )
    assert done.returncode == -9, done.stderr
    leftover = staging_path(out)
    assert [json.loads(line)["index"] for line in leftover.read_text().splitlines()] == [0, 1, 2]
    assert not out.exists()
    for entry in (str(tmp_path), "*"):
        assert [p.name for p in resolve_inputs(entry, tmp_path)] == ["words.txt"]
    sink = FileSink(out)
    sink.add(0, 0, 7, None)
    sink.close(complete=True)
    assert _lines(out) == [{"index": 0, "result": 7}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "words.txt"]


@pytest.mark.parametrize("existed", [False, True])
def test_a_sqlite_jobs_working_files_are_hidden_from_a_walk_and_gone_once_committed(
    tmp_path: Path, existed: bool
) -> None:
    """While a sqlite job writes, SQLite's working files (``-wal``, ``-shm``) sit beside its
    staging database ``.OUTPUT.partial``: dot-files, so a data job walking that directory
    reads only its inputs (and a committed OUTPUT of an earlier run). The commit is a rename
    of a database standing alone: nothing is left beside OUTPUT, and other tables stay."""
    from remap.data.inputs import resolve_inputs

    out = tmp_path / "r.db"
    (tmp_path / "words.txt").write_text("a b\n")
    if existed:
        _old_results(out)
    sink = SqliteSink(out)
    sink.add(0, "x", 1, None)
    sink.flush()
    try:
        beside = sorted(p.name for p in tmp_path.iterdir())
        assert ".r.db.partial-wal" in beside and ".r.db.partial-shm" in beside, beside
        assert "r.db-wal" not in beside and "r.db-shm" not in beside, beside
        for entry in (str(tmp_path), "*", f"{tmp_path}/*"):
            read = [p.name for p in resolve_inputs(entry, tmp_path)]
            assert read == (["r.db", "words.txt"] if existed else ["words.txt"]), read
    finally:
        sink.close(complete=True)
    assert _rows(out) == [(0, "x", "str", 1, "int", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db", "words.txt"]
    if existed:
        with closing(sqlite3.connect(out)) as conn:
            assert conn.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db", "words.txt"]


_KILLED_SQLITE_WRITER = """
import os, signal, sys
from remap.sinks import SqliteSink
sink = SqliteSink(sys.argv[1])
for i in range(3):
    sink.add(i, i, i * 10, None)
sink.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("existed", [False, True])
def test_a_sigkilled_sqlite_writers_leftovers_are_hidden_and_replaced_by_the_next_run(
    tmp_path: Path, existed: bool
) -> None:
    """A console SIGKILLed mid-job with a sqlite output leaves its staging database and
    SQLite's ``-wal``/``-shm`` beside it: all dot-files, hidden from a job walking that
    directory; OUTPUT is as it was; the next run replaces the leftovers and commits by
    rename, leaving nothing beside OUTPUT but OUTPUT."""
    import subprocess
    import sys

    from remap.data.inputs import resolve_inputs

    out = tmp_path / "r.db"
    (tmp_path / "words.txt").write_text("a b\n")
    if existed:
        _old_results(out)
    before = out.read_bytes() if existed else None
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_SQLITE_WRITER, str(out)],
        env=env,
        timeout=60,
        capture_output=True,
    )
    assert done.returncode == -9, done.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert ".r.db.partial-wal" in left, left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("r.db-")]
    assert (out.read_bytes() if existed else None) == before
    for entry in (str(tmp_path), "*"):
        read = [p.name for p in resolve_inputs(entry, tmp_path)]
        assert read == (["r.db", "words.txt"] if existed else ["words.txt"]), read
    sink = SqliteSink(out)
    sink.add(0, 0, 7, None)
    sink.close(complete=True)
    assert _rows(out) == [(0, 0, "int", 7, "int", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db", "words.txt"]


def test_taking_an_output_removes_a_dead_jobs_staging_directory(tmp_path: Path) -> None:
    """A data or vertex job's driver SIGKILLed (attached: no server cleans up after it) left
    its hidden staging directory beside the output, half written, for good; the next job to
    take that output's lock removes it (only a job holding the lock writes one), and leaves
    another output's alone."""
    from remap.sinks import take_output

    dead = tmp_path / ".out.remap-20261201-000000-abcdef" / "default"
    dead.mkdir(parents=True)
    (dead / "reducer-0000-part-00000").write_text("a\t1\n")
    other = tmp_path / ".other.remap-20261201-000000-abcdef"
    other.mkdir()
    lock = take_output(tmp_path / "out", "data job 20261202-x (x)")
    try:
        assert not dead.parent.exists()
        assert other.is_dir()
    finally:
        lock.release()


def test_an_output_under_a_file_is_one_line(tmp_path: Path) -> None:
    """A data or vertex job's output whose parent path runs through a file: a ConfigError
    naming that file (was a FileExistsError traceback from mkdir)."""
    from remap.sinks import take_output

    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ConfigError, match=r"output .*a.txt/sub/out: .*a.txt is a file, not a"):
        take_output(tmp_path / "a.txt" / "sub" / "out", "data job 20261202-x (x)")


# --- the disk fills up -------------------------------------------------------------------


def _fill(sink: Sink, line_bytes: int = 1000, limit: int = 100_000) -> OutputError:
    """Add results of ~line_bytes each (flushing per batch, as the console does) until a
    write fails; return that error."""
    for i in range(limit):
        try:
            sink.add(i, i, "x" * line_bytes, None)
            if i % 10 == 9:
                sink.flush()
        except OutputError as exc:
            return exc
    raise AssertionError("the disk never filled up")


def test_file_sink_disk_full_names_the_file_and_keeps_whole_lines(small_disk: Path) -> None:
    """ENOSPC while writing: an OutputError saying 'disk full' and naming the file; the old
    output is untouched and the partial file keeps only whole lines, as many as kept() says."""
    path = small_disk / "out.jsonl"
    path.write_text("old\n")
    sink = FileSink(path)
    error = _fill(sink)
    assert "disk full" in str(error) and str(sink.partial) in str(error)
    sink.close(complete=False)
    assert path.read_text() == "old\n"
    kept = _lines(sink.partial)
    assert kept and [line["index"] for line in kept] == list(range(len(kept)))
    assert sink.kept() == f"kept {len(kept)} result(s) in {sink.partial}; {path} left unchanged"


def test_file_sink_disk_full_keeps_what_fit_without_a_flush(small_disk: Path) -> None:
    """Results that arrive in one long run (no flush between them) into a 1 MiB disk: what fit
    is kept as whole lines and counted, not dropped because no flush came before ENOSPC."""
    path = small_disk / "out.jsonl"
    sink = FileSink(path)
    with pytest.raises(OutputError, match="disk full"):
        for i in range(300):
            sink.add(i, i, "x" * 10_000, None)
    sink.close(complete=False)
    kept = _lines(sink.partial)
    assert len(kept) > 50, len(kept)  # ~100 lines of 10 kB fit in 1 MiB
    assert [line["index"] for line in kept] == list(range(len(kept)))
    assert sink.kept_count == len(kept)


def test_sqlite_sink_disk_full_names_the_file_and_keeps_committed_rows(small_disk: Path) -> None:
    """A full disk under sqlite: OutputError naming the output and 'disk full'; the rows
    committed before stay readable in results_partial."""
    path = small_disk / "out.db"
    sink = SqliteSink(path, batch_size=10)
    error = _fill(sink)
    assert "disk full" in str(error) and str(path) in str(error)
    sink.close(complete=False)
    rows = _staged(path)
    assert rows and len(rows) == sink.kept_count
    assert [r[0] for r in rows] == list(range(len(rows)))


# --- reduce and none ---------------------------------------------------------------------


def test_reduce_sink_folds_shuffled_results() -> None:
    """A commutative, associative fold gives the same value whatever the arrival order."""
    sink = ReduceSink(lambda a, b: a + b)
    _feed(sink, _items(failing=set()))
    sink.close(complete=True)
    assert sink.value() == sum(i * i for i in range(N))


def test_reduce_sink_mixes_partials_and_adds() -> None:
    """Node partials and single results fold together; a partial counts all it covers."""
    sink = ReduceSink(lambda a, b: a + b)
    sink.add(9, 9, 81, None)
    sink.add_partial(5, sum(i * i for i in range(5)))
    sink.add(5, 5, None, _error(5))
    sink.add_partial(3, 36 + 49 + 64)
    sink.close(complete=False)
    assert sink.value() == sum(i * i for i in range(10) if i != 5)
    assert (sink.done, sink.failed) == (9, 1)
    assert sink.summary()["errors"] == [{"index": 5, **_error(5).to_json()}]


def test_reduce_sink_partial_must_cover_something() -> None:
    """A partial over zero results is a caller bug and does not touch the accumulator."""
    sink = ReduceSink(lambda a, b: a + b)
    with pytest.raises(ValueError):
        sink.add_partial(0, 10)
    with pytest.raises(JobFailed):
        sink.value()


def test_reduce_sink_keeps_at_most_100_errors() -> None:
    """Errors are all counted, but only the first 100 are kept, so memory stays bounded."""
    sink = ReduceSink(lambda a, b: a + b)
    for i in range(250):
        sink.add(i, i, None, _error(i))
    sink.add(250, 250, 1, None)
    assert sink.failed == 250
    assert len(sink.errors) == ReduceSink.MAX_ERRORS_KEPT == 100
    assert [e.index for e in sink.errors] == list(range(100))
    assert sink.value() == 1


def test_reduce_sink_nothing_to_reduce() -> None:
    """With only failures, value() raises JobFailed chained to the first remote error."""
    sink = ReduceSink(lambda a, b: a + b)
    sink.add(0, 0, None, _error(0))
    sink.close(complete=True)
    with pytest.raises(JobFailed, match="no results to reduce") as caught:
        sink.value()
    assert isinstance(caught.value.__cause__, RemoteTaskError)
    assert caught.value.__cause__.index == 0


def test_reduce_sink_fn_error_propagates_and_keeps_accumulator() -> None:
    """A failing reduce_fn raises to the caller and leaves the folded value unchanged."""

    def picky(acc: int, value: int) -> int:
        if value < 0:
            raise ArithmeticError("negative")
        return acc + value

    sink = ReduceSink(picky)
    sink.add(0, 0, 1, None)
    with pytest.raises(ArithmeticError):
        sink.add(1, 1, -1, None)
    sink.add(2, 2, 2, None)
    assert sink.value() == 3
    assert sink.done == 2


def test_none_sink_only_counts() -> None:
    """The none mode's value is the number of successes; failures show in the summary."""
    sink = NoneSink()
    _feed(sink, _items())
    sink.close(complete=True)
    assert sink.value() == N - len(FAILING)
    assert sink.summary() == {"mode": "none", "done": N - len(FAILING), "failed": len(FAILING)}


# --- make_sink ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kwargs", "cls"),
    [
        ("object", {}, ObjectSink),
        ("stream", {"out": io.StringIO()}, StreamSink),
        ("sqlite", {"output": "r.db"}, SqliteSink),
        ("file", {"output": "r.jsonl"}, FileSink),
        ("reduce", {"reduce_fn": max}, ReduceSink),
        ("none", {"on_item": print}, NoneSink),
    ],
)
def test_make_sink_builds_each_mode(
    mode: str, kwargs: dict[str, Any], cls: type[Sink], tmp_path: Path
) -> None:
    """Each response mode name yields its sink class, with mode matching the name."""
    if "output" in kwargs:
        kwargs = {**kwargs, "output": tmp_path / kwargs["output"]}
    sink = make_sink(mode, **kwargs)
    assert type(sink) is cls and sink.mode == mode
    sink.close(complete=False)


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("objects", {}, "unknown response mode 'objects'"),
        ("", {}, "unknown response mode"),
        ("sqlite", {}, "needs an output path"),
        ("file", {}, "needs an output path"),
        ("reduce", {}, "needs a reduce function"),
        ("object", {"output": "x.db"}, "does not write an output file"),
        ("file", {"output": "x", "reduce_fn": max}, "does not take a reduce function"),
    ],
)
def test_make_sink_rejects_bad_settings(mode: str, kwargs: dict[str, Any], message: str) -> None:
    """Unknown modes and settings a mode cannot honour are ConfigErrors naming the problem."""
    with pytest.raises(ConfigError, match=message):
        make_sink(mode, **kwargs)


def test_a_lock_file_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """Where the output's lock file should go stands a directory: the file output and a data
    job's output are refused with one line naming the lock file and why."""
    (tmp_path / ".r.jsonl.lock").mkdir()
    with pytest.raises(ConfigError) as info:
        make_sink("file", output=tmp_path / "r.jsonl")
    assert str(info.value) == (
        f"cannot create the lock file {tmp_path / '.r.jsonl.lock'} for output "
        f"{tmp_path / 'r.jsonl'}: Is a directory"
    )
    (tmp_path / ".out.lock").mkdir()
    with pytest.raises(ConfigError, match=r"cannot create the lock file .*\.out\.lock for output"):
        take_output(tmp_path / "out", "data job 1 (x)")
    assert not (tmp_path / "out").exists()
