"""The two tasks a data job runs on cores: map one split, reduce one reducer's runs.

Tasks create no directories (the driver does, before the phase). Both run as function-job
calls, so they inherit retries, crash attribution, kill and exactly-once *delivery* of their
result. Exactly-once *output* comes from naming: an attempt commits its ``.tmp`` files by rename
under names that carry its attempt token and returns those names; the driver uses only the
names delivered to it and deletes the rest.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError, misspelt
from . import counters, layout
from .inputs import LINE_BLOCK, Split, line_number, read_line_blocks
from .keys import default_partition, encode_key
from .layout import DataDir, storage_error, storage_trouble
from .runs import (
    DEFAULT_FANIN,
    BadOutput,
    HookError,
    SpillBuffer,
    grouped,
    merge,
    premerge,
    read_run,
    short,
    write_run,
)

DEFAULT_PURPOSE = "default"
#: error lines a task keeps for the job's errors file (the count is always exact)
MAX_ERROR_LINES = 50
#: seconds between a running task's progress-file updates
PROGRESS_EVERY = 1.0
_CHECK_EVERY = 4096  # records between clock checks
#: bytes of lines a ``map_batch`` call gets: 16 KiB keeps the work on a block (its words, say)
#: in a core's L2 cache; 64 KiB and 1 MiB blocks measured slower for word count on a busy machine
BATCH_BYTES = 1 << 14
#: map outputs buffered between checks of the buffer's size (map_batch, map_final)
_FEED = 4096


class RecordError(Exception):
    """User code raised for one record; the message names the file and line (or the key)."""

    shows_cause = True  # its remote traceback is the user's exception's


class JobCodeError(Exception):
    """User code broke the data-job contract (bad yield shape, unknown purpose, ...)."""


def default_write(record: Any, file: TextIO) -> None:
    """One line per record; a pair is written ``key<TAB>value``."""
    if type(record) is tuple and len(record) == 2:
        file.write(f"{record[0]}\t{record[1]}\n")
    else:
        file.write(f"{record}\n")


@dataclass(frozen=True)
class JobFunctions:
    """The user's functions, by role; per-purpose ``reduce_<purpose>`` and ``combine_<purpose>``
    override ``reduce`` and ``combine`` for a named reducer set."""

    map: Callable[[Any], Iterable[Any] | None] | None
    reduce: Mapping[str, Callable[[Any, Iterator[Any]], Iterable[Any]]]
    combine: Mapping[str, Callable[[Any, Iterator[Any]], Iterable[Any]] | None] = field(
        default_factory=dict
    )
    read: Callable[[str], Iterable[Any]] | None = None
    write: Callable[[Any, TextIO], None] | None = None
    partition: Callable[[Any, int], int] | None = None
    group: Callable[[Any], Any] | None = None
    map_init: Callable[[], Any] | None = None
    map_final: Callable[[], Iterable[Any] | None] | None = None
    reduce_init: Callable[[], Any] | None = None
    reduce_final: Callable[[], Iterable[Any] | None] | None = None
    #: instead of ``map``: called once per block of records (a list), for map output
    map_batch: Callable[[list[Any]], Iterable[Any] | None] | None = None


#: optional hooks: ``*_init()`` runs before a task's first record, ``map_final()`` may yield
#: more map output (in-mapper combining), ``reduce_final()`` more output records
HOOKS = ("map_init", "map_final", "reduce_init", "reduce_final")
#: names a job module defines for a role of its own: never offered as a misspelt map or reduce
ROLES = ("map", "map_batch", "combine", "reduce", "read", "write", "partition", "group", *HOOKS)


def functions_from(namespace: Mapping[str, Any], purposes: Iterable[str]) -> JobFunctions:
    """Pick the job's functions from a module's namespace (or a dict); check what is needed."""

    def get(name: str) -> Any:
        value = namespace.get(name)
        if value is not None and not callable(value):
            raise ConfigError(f"'{name}' must be a function, not {type(value).__name__}")
        return value

    if get("map") is None and get("map_batch") is None:
        raise ConfigError(
            f"the job module has no 'map' function{misspelt('map', namespace, ROLES)} "
            "(map(record) yields pairs; or map_batch(records) for a block of records at a time)"
        )
    if get("map") is not None and get("map_batch") is not None:
        raise ConfigError("the job module has both 'map' and 'map_batch': keep one of them")
    reduce: dict[str, Any] = {}
    combine: dict[str, Any] = {}
    for purpose in purposes:
        reducer = get(f"reduce_{purpose}") or get("reduce")
        if reducer is None:
            raise ConfigError(
                "the job module has no 'reduce' function"
                + (f" (nor 'reduce_{purpose}')" if purpose != DEFAULT_PURPOSE else "")
                + misspelt("reduce", namespace, ROLES)
            )
        reduce[purpose] = reducer
        combine[purpose] = get(f"combine_{purpose}") or get("combine")
    return JobFunctions(
        map=get("map"),
        map_batch=get("map_batch"),
        reduce=reduce,
        combine=combine,
        read=get("read"),
        write=get("write"),
        partition=get("partition"),
        group=get("group"),
        **{hook: get(hook) for hook in HOOKS},
    )


@dataclass(frozen=True)
class TaskContext:
    """Everything a task needs, shipped once per phase with the task function."""

    data_root: str
    job_id: str
    reducers: Mapping[str, int]
    spill_bytes: int
    output: str  # the staging directory the job publishes by rename at the end
    functions: JobFunctions
    on_error: str = "fail"
    fanin: int = DEFAULT_FANIN

    @property
    def data(self) -> DataDir:
        return DataDir(Path(self.data_root))


class _Progress:
    """A task's progress file, rewritten at most once a second while it runs. Made as the task
    starts, once it sees the data directory (it writes nothing there otherwise)."""

    def __init__(self, ctx: TaskContext, kind: str, index: int, **fixed: Any) -> None:
        layout.require_visible(ctx.data, ctx.job_id)
        self.task = layout.task_name(kind, index)
        self.attempt = layout.attempt_token()
        self.path = ctx.data.progress_file(ctx.job_id, self.task, self.attempt)
        self.fixed = {
            "task": self.task,
            "attempt": self.attempt,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_pid": os.getppid(),  # a core's parent is its node
            **fixed,
        }
        self.started = time.time()
        self.last = 0.0
        counters.take()  # the user's counts from here on

    def update(self, state: str = "running", force: bool = False, **values: Any) -> None:
        now = time.time()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        layout.write_json(
            self.path,
            {**self.fixed, "state": state, "seconds": round(now - self.started, 3), **values},
            parents=False,  # woken after its job ended, a lost attempt makes no folder again
        )

    def result(self, failures: _Failures, counts: dict[str, int], **more: Any) -> dict[str, Any]:
        """What the task returns: ``more``, its ``counts`` with the user's, its errors, its time."""
        return {
            "task": self.task,
            "attempt": self.attempt,
            **more,
            "counters": {**counts, **counters.take()},
            "errors": failures.lines,
            "seconds": round(time.time() - self.started, 3),
        }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Failures:
    """``on_error`` for one task: raise a RecordError naming the record, or count and list it."""

    def __init__(self, on_error: str) -> None:
        self.go_on = on_error == "continue"
        self.count = 0
        self.lines: list[str] = []

    def record(self, where: str, what: str, exc: Exception) -> None:
        if not self.go_on:
            raise RecordError(f"{where}: {what} raised {_describe(exc)}") from exc
        self.count += 1
        if len(self.lines) < MAX_ERROR_LINES:
            self.lines.append(f"{where}: {_describe(exc)}")


# ------------------------------------------------------------------ map


def map_task(ctx: TaskContext, split: tuple[int, str, int, int]) -> dict[str, Any]:
    """Map one split into sorted runs per reducer; return the committed runs and counters."""
    data = ctx.data
    s = Split(*split)
    progress = _Progress(ctx, "mapper", s.index, path=s.path, start=s.start, end=s.end)
    progress.update(force=True, bytes_read=0, records_in=0)
    attempt = progress.attempt
    fns = ctx.functions
    user_map = fns.map
    reducers = dict(ctx.reducers)
    partition = fns.partition
    group = fns.group
    pending: list[tuple[Path, Path, str, int, int, int]] = []  # tmp, final, purpose, r, recs, bytes

    def spill(bucket: tuple[str, int], records: Iterator[tuple[bytes, bytes]]) -> None:
        purpose, reducer = bucket
        final = data.run_path(ctx.job_id, purpose, reducer, s.index, buffer.spills, attempt)
        tmp = layout.tmp_path(final, "w")
        try:
            count, size = write_run(tmp, records)
        except OSError as exc:
            if storage_trouble(exc):
                tmp.unlink(missing_ok=True)
                raise storage_error(tmp.parent, exc) from None
            raise
        pending.append((tmp, final, purpose, reducer, count, size))

    def locate(purpose: str, key: Any, encoded: bytes) -> int:
        n = reducers[purpose]
        if partition is not None:
            try:
                r = partition(key, n)
            except Exception as exc:
                raise HookError(f"partition({short(key)}, {n}) raised {_describe(exc)}") from exc
            if type(r) is not int or not 0 <= r < n:
                raise JobCodeError(f"partition({short(key)}, {n}) returned {r!r}")
            return r
        if group is not None:
            try:
                grouped_key = group(key)
            except Exception as exc:
                raise HookError(f"group({short(key)}) raised {_describe(exc)}") from exc
            return default_partition(encode_key(grouped_key), n)
        return default_partition(encoded, n)

    combine_of = {p: ctx.functions.combine.get(p) for p in reducers}
    buffer = SpillBuffer(
        ctx.spill_bytes, spill, locate, combine_of.__getitem__, reducers, DEFAULT_PURPOSE
    )
    extend = buffer.extend
    spill_bytes = ctx.spill_bytes
    records_in = 0
    failures = _Failures(ctx.on_error)
    custom = fns.read is not None
    if custom:
        blocks = _in_blocks(_read(s, fns.read))
    else:  # map_batch's blocks are smaller: its work on them stays in the core's caches
        blocks = read_line_blocks(s, BATCH_BYTES if fns.map_batch is not None else LINE_BLOCK)
    _hook(fns.map_init, "map_init")

    def feed(outputs: Any, where: Callable[[], str], what: str) -> None:
        """Buffer what one user call returned (``None``: nothing; a dict: its items), a slice
        at a time, relieving a full buffer between slices (never inside user code)."""
        if outputs is None:
            return
        if not hasattr(outputs, "__iter__"):
            raise JobCodeError(f"{where()}: {_returned(what, outputs)}")
        items = iter(outputs.items() if isinstance(outputs, dict) else outputs)
        while True:
            try:
                chunk = list(itertools.islice(items, _FEED))  # a generator's code runs here
                extend(chunk)
            except BadOutput as exc:
                raise JobCodeError(f"{where()}: {what}: {exc}") from None
            except HookError:
                raise
            except Exception as exc:  # the user's code: report with where its input came from
                failures.record(where(), what, exc)
                return
            if not chunk:
                return
            if buffer.size >= spill_bytes:
                buffer.relieve()

    if fns.map_batch is not None:
        map_batch = fns.map_batch
        for offset, records in blocks:
            try:
                outputs = map_batch(records)
            except Exception as exc:  # the user's code, reported with the block's place
                outputs = None
                failures.record(_batch_where(s, offset, records, custom), "map_batch", exc)
            where = functools.partial(_batch_where, s, offset, records, custom)
            feed(outputs, where, "map_batch")
            records_in += len(records)
            progress.update(bytes_read=min(offset - s.start, s.size), records_in=records_in)
    else:
        for offset, records in blocks:
            for index, record in enumerate(records):
                outputs = None
                try:
                    outputs = user_map(record)
                    if outputs is not None:  # None: in-mapper combining yields at the end
                        extend(outputs.items() if isinstance(outputs, dict) else outputs)
                except BadOutput as exc:  # a broken contract fails even on continue: say where
                    raise JobCodeError(f"{_where(s, offset, index, custom)}: {exc}") from None
                except HookError:  # combine folds many records' values: not this record's error
                    raise
                except Exception as exc:  # the user's map: report with the record's place
                    if outputs is not None and not hasattr(outputs, "__iter__"):  # no records
                        where = _where(s, offset, index, custom)
                        raise JobCodeError(f"{where}: {_returned('map', outputs)}") from None
                    failures.record(_where(s, offset, index, custom), "map", exc)
                if buffer.size >= spill_bytes:
                    buffer.relieve()
            records_in += len(records)
            progress.update(bytes_read=min(offset - s.start, s.size), records_in=records_in)
    if fns.map_final is not None:
        feed(_hook(fns.map_final, "map_final"), lambda: "map_final", "map_final")
    buffer.flush()
    runs = []
    for tmp, final, purpose, reducer, count, size in pending:
        layout.commit(tmp, final)
        runs.append([purpose, reducer, str(final), count, size])
    counts = {
        "map_records_in": records_in,
        "map_records_out": buffer.records,
        "map_bytes_in": s.size if fns.read is None else os.path.getsize(s.path),
        "map_spills": buffer.spills,
        "map_errors": failures.count,
    }
    result = progress.result(failures, counts, runs=runs)
    progress.update("done", force=True, bytes_read=s.size, records_in=records_in)
    return result


def _read(split: Split, reader: Callable[[str], Iterable[Any]]) -> Iterator[tuple[int, Any]]:
    """The user's ``read(path)``'s records; what it raises is named with the file."""
    try:
        yield from enumerate(reader(split.path))  # the whole file is one split
    except Exception as exc:
        raise HookError(f"read({split.path!r}) raised {_describe(exc)}") from exc


def _hook(hook: Callable[[], Any] | None, name: str) -> Any:
    """Call an optional hook; what it raises fails the task, named. What an ``_init`` hook
    returns is ignored; a ``_final`` hook's is more output (a dict: its pairs)."""
    if hook is None:
        return None
    try:
        result = hook()
        if name.endswith("_init") or result is None:
            return None
        if isinstance(result, dict):  # a dict of key -> value (a Counter, say) is its pairs
            result = result.items()
        if not hasattr(result, "__iter__"):
            raise JobCodeError(_returned(name, result))
        return list(result)
    except JobCodeError:
        raise
    except Exception as exc:
        raise RecordError(f"{name} raised {_describe(exc)}") from exc


def _in_blocks(
    records: Iterator[tuple[int, Any]], size: int = _CHECK_EVERY
) -> Iterator[tuple[int, list[Any]]]:
    """``(ordinal of the first, records)`` in lists of ``size``, like :func:`read_line_blocks`."""
    while True:
        block = list(itertools.islice(records, size))
        if not block:
            return
        yield block[0][0], [record for _, record in block]


def _where(split: Split, offset: int, index: int, custom: bool) -> str:
    """The record's place: ``file: record N`` (a custom reader) or ``file:LINE``."""
    if custom:
        return f"{split.path}: record {offset + index + 1}"
    return f"{split.path}:{line_number(split.path, offset) + index}"


def _batch_where(split: Split, offset: int, records: list[Any], custom: bool) -> str:
    """A block's place: where its first record is, and how many it holds."""
    return f"{_where(split, offset, 0, custom)} (a batch of {len(records)} records)"


def _returned(what: str, outputs: Any) -> str:
    """The line for a user function that returned something other than its output."""
    if what.startswith("reduce"):
        must = "yield its output records (or return a list of them)"
    else:
        must = "yield (key, value) pairs, or return a list of them, a dict or None"
    return f"{what} returned {short(outputs)}: it must {must}"


# ------------------------------------------------------------------ reduce


def reduce_task(ctx: TaskContext, work: tuple[int, str, int, list[str]]) -> dict[str, Any]:
    """Merge one reducer's committed runs and reduce them into an attempt-named output file."""
    data = ctx.data
    index, purpose, reducer, paths = work
    progress = _Progress(ctx, "reducer", index, purpose=purpose, reducer=reducer, runs=len(paths))
    progress.update(force=True, records_out=0)
    task, attempt = progress.task, progress.attempt
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"committed run {path} is missing from the data directory")
    fns = ctx.functions
    combine = fns.combine.get(purpose)
    scratch_dir = data.run_dir(ctx.job_id, purpose, reducer)

    def scratch(n: int) -> Path:
        return scratch_dir / f"premerge-{n:05d}.{attempt}{layout.TMP_SUFFIX}"

    inputs, merges = premerge(list(paths), ctx.fanin, scratch, combine)
    final = layout.output_part(Path(ctx.output), purpose, reducer)
    tmp = layout.tmp_path(final, attempt)
    committed = final.with_name(f"{final.name}.{attempt}")
    user_reduce = fns.reduce[purpose]
    write = fns.write or default_write
    keys_reduced = records_out = 0
    failures = _Failures(ctx.on_error)
    try:
        _hook(fns.reduce_init, "reduce_init")
        try:
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as out:
                for key, values in grouped(merge(read_run(p) for p in inputs), fns.group):
                    keys_reduced += 1
                    outputs: Any = ()
                    try:
                        outputs = user_reduce(key, values)
                        for record in outputs:
                            write(record, out)
                            records_out += 1
                    except Exception as exc:  # the user's reduce or write: report with its key
                        if storage_trouble(exc):  # the file's buffer, not this key's records
                            raise
                        where = f"{task} ({purpose} reducer {reducer}) key {short(key)}"
                        if not hasattr(outputs, "__iter__"):  # broken contract: fails on continue
                            raise JobCodeError(f"{where}: {_returned('reduce', outputs)}") from None
                        failures.record(where, "reduce", exc)
                    if keys_reduced % _CHECK_EVERY == 0:
                        progress.update(keys=keys_reduced, records_out=records_out)
                for record in _hook(fns.reduce_final, "reduce_final") or ():
                    write(record, out)
                    records_out += 1
        except OSError as exc:  # raised by a write, or by the close flushing the last ones
            if storage_trouble(exc):
                raise storage_error(final, exc) from None
            raise
        layout.commit(tmp, committed)
    finally:
        tmp.unlink(missing_ok=True)
        for p in inputs:
            if p not in paths:
                Path(p).unlink(missing_ok=True)
    progress.update("done", force=True, keys=keys_reduced, records_out=records_out)
    counts = {
        "reduce_keys": keys_reduced,
        "reduce_records_out": records_out,
        "reduce_premerges": merges,
        "reduce_errors": failures.count,
    }
    return progress.result(
        failures, counts, purpose=purpose, reducer=reducer, path=str(committed), final=str(final)
    )
