"""The Python API's core: a cluster handle, and jobs that stream arguments in and results out.

``remap.connect()`` gives a :class:`Cluster`. Every call that runs work opens a
:class:`JobStream`: a job on the server whose arguments come from a thread-safe feed that
the caller's thread fills (pulling the user's iterable, pickling each argument) and the
reactor's thread drains as the server grants window. Results come back as events on a
queue. So user code (generators, pickling, reduce functions, done-callbacks) runs on the
caller's threads, the reactor thread only moves bytes, and a generator of any length runs
in bounded memory because the caller stays at most ``buffersize`` arguments ahead of the
results it has consumed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import itertools
import operator
import os
import pickle
import queue
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import cloudpickle
from twisted.internet import defer
from twisted.logger import Logger

from protocol import messages as m
from protocol.options import JobOptions

from . import bundle, discovery, runtime, shipping, taskoutput
from .blobs import LARGE_PICKLE, PICKLE_PROTOCOL, dumps_buffered
from .calls import Initialized
from .client import (
    GROUP_BYTES,
    GROUP_SPREAD,
    GROUP_WAIT,
    ClusterClient,
    JobStream,
    group_target,
    next_group,
)
from .dial import connect_console
from .errors import (
    ConfigError,
    ConnectionLost,
    JobFailed,
    RemapError,
    RemoteTaskError,
)
from .net import tls_enabled
from .settings import Settings, load_settings
from .sinks import TaskErrorInfo
from .vertex import DEFAULT_MAX_SUPERSTEPS

if TYPE_CHECKING:
    from .cluster import EmbeddedCluster
    from .executor import Executor, RemoteFuture

__all__ = [
    "DEFAULT_BUFFERSIZE",
    "MAP_CALLS",
    "Cluster",
    "MapStyle",
    "JobStream",
    "PicklingError",
    "RemoteTraceback",
    "ResultIterator",
    "connect",
    "remote_exception",
    "ship_by_value",
]

log = Logger()

#: arguments ``imap`` may take from the iterable ahead of the results the caller consumed
DEFAULT_BUFFERSIZE = 65536
#: pickled arguments a stream may hold before they are sent (the server bounds the rest)
FEED_MAX_BYTES = 64 * 1024 * 1024
#: seconds a result waits for the task output that came before it to be written
OUTPUT_FLUSH_TIMEOUT = 1.0
#: seconds to wait for the embedded cluster's node to join
CONNECT_TIMEOUT = 30.0
#: seconds ``close()`` waits for the connection to close and the embedded cluster to stop
CLOSE_TIMEOUT = 15.0
#: seconds ``close()`` waits for the server to confirm it killed the handle's running jobs
KILL_WAIT = 2.0

#: a map of at most this many arguments (a known length), of at most this many pickled bytes,
#: runs as calls in its executor's open job of its function (``Executor._small_map``): a job
#: costs a submit round trip, job set-up on the server and nodes, and a share of the server's
#: fair-share scan per dispatch while it runs (2-4 ms); a job of its own would send each
#: argument alone below GROUP_SPREAD
SMALL_MAP = GROUP_SPREAD - 1
SMALL_MAP_BYTES = 16 * GROUP_BYTES


def is_small(values: Iterable[Any]) -> bool:
    """A known length of at most :data:`SMALL_MAP`, above 0."""
    return isinstance(values, Sized) and 0 < len(values) <= SMALL_MAP


_PLAIN_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None)})
_SIZED = frozenset({str, bytes})
#: plain types whose pickle is always small: ``pickle.dumps`` straight, no size to look at
_SCALARS = _PLAIN_TYPES - _SIZED


# ====================================================================== pickling


class PicklingError(ConfigError, pickle.PicklingError):
    """A function or argument cannot be sent to the cluster; the message names it."""

    #: where in an argument group the argument is (:func:`dumps_group`)
    position: int | None = None


def describe(fn: Any) -> str:
    """A short name for a callable, for messages and job names."""
    fn = getattr(fn, "__wrapped__", fn)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else name


def function_blob(
    fn: Callable[..., Any], reduce_fn: Callable[..., Any] | None = None, *, name: str | None = None
) -> bytes:
    """Pickle a job's callables by value where needed, or say plainly which one cannot travel."""
    for what in (fn, reduce_fn):
        if what is not None and not callable(what):
            raise TypeError(f"{what!r} is not callable")
    try:
        return shipping.function_blob(fn, reduce_fn)
    except Exception as exc:
        culprit = name or describe(fn)
        if reduce_fn is not None:
            try:
                cloudpickle.dumps(reduce_fn, PICKLE_PROTOCOL)
            except Exception:
                culprit = describe(reduce_fn)
        raise PicklingError(
            f"function {culprit} cannot be sent to the cluster: {type(exc).__name__}: {exc}"
        ) from exc


def _plain(value: Any, depth: int = 2) -> bool:
    """Plain data (and tuples, lists, dicts of it, ``depth`` levels down): plain pickle
    carries it exactly, with no reference to any module."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    if not depth:
        return False
    if kind is tuple or kind is list:
        return all(_plain(v, depth - 1) for v in value)
    if kind is dict:
        return all(type(k) in _PLAIN_TYPES and _plain(v, depth - 1) for k, v in value.items())
    return False


def _dumps_plain(value: Any, protocol: int) -> bytes:
    """Plain data's pickle; a long str or bytes through a BytesIO (20× faster a MiB)."""
    if type(value) in _SIZED and len(value) >= LARGE_PICKLE:
        return dumps_buffered(value)
    return pickle.dumps(value, protocol)


def dumps_argument(value: Any, what: str | Callable[[], str]) -> bytes:
    """Pickle one argument; plain data takes the fast path, the rest goes through cloudpickle.

    cloudpickle (not plain pickle) so that objects defined in ``__main__`` travel by value:
    plain pickle would "succeed" by reference and the core would fail to find them.
    ``what`` names the argument in an error (a callable is only called then).
    """
    try:
        if _plain(value):
            return _dumps_plain(value, PICKLE_PROTOCOL)
        return shipping.dumps_for_cores(value)
    except Exception as exc:
        name = what if isinstance(what, str) else what()
        raise PicklingError(
            f"{name} cannot be sent to the cluster: {type(exc).__name__}: {exc}"
        ) from exc


def dumps_group(values: list[Any], first: int, fn_name: str) -> bytes:
    """One pickle of a list of arguments; an argument that will not pickle is named alone."""
    try:
        if _PLAIN_TYPES.issuperset(map(type, values)) or all(map(_plain, values)):
            return pickle.dumps(values, PICKLE_PROTOCOL)
        return cloudpickle.dumps(values, PICKLE_PROTOCOL)
    except Exception:
        for k, value in enumerate(values):
            try:
                dumps_argument(value, lambda k=k: f"argument {first + k} of {fn_name}")
            except PicklingError as exc:
                exc.position = k
                raise
        raise


def ship_by_value(module: types.ModuleType) -> None:
    """Send a local module's functions by value, for nodes that cannot import it.

    By default functions from importable modules travel by reference (the nodes import
    the module); ``__main__`` always travels by value. Call this for a module of your own
    that is not installed on the nodes. It applies to this whole process.
    """
    cloudpickle.register_pickle_by_value(module)


# ====================================================================== remote errors


def _job_module(module: Any) -> Any:
    """A data or vertex job's module as a job file names it (``FILE.py`` relative to the
    current directory, or a module name) is loaded as ``compute`` loads it."""
    if isinstance(module, (str, os.PathLike)):
        from .jobfile import load_module

        return load_module(os.fspath(module), Path.cwd())[0]
    return module


class RemoteTraceback(RemoteTaskError):
    """The ``__cause__`` of a re-raised remote exception; its text is the remote traceback."""

    def __str__(self) -> str:
        where = f" (argument {self.index})" if self.index is not None else ""
        tb = self.remote_traceback.rstrip("\n")
        if not tb:
            return f"{self.type_name}: {self.message}{where}"
        return f'remote traceback{where}:\n"""\n{tb}\n"""'

    @property
    def tb(self) -> str:
        """The remote traceback's text, under the name ``multiprocessing.pool`` uses."""
        return self.remote_traceback


def remote_exception(info: TaskErrorInfo) -> BaseException:
    """The exception to raise for a failed task: its own type when it could be rebuilt here.

    Either way ``__cause__`` is a :class:`RemoteTraceback` (a RemoteTaskError) carrying the
    remote traceback, so a printed traceback shows where on the core it went wrong. When
    the original cannot be rebuilt (its class is not importable here, or a core crashed or
    timed out) the exception is a :class:`RemoteTaskError` naming the remote type.
    """
    cause = RemoteTraceback(info.type_name, info.message, info.traceback, info.index)
    exc = info.exception
    if exc is None:
        exc = RemoteTaskError(info.type_name, info.message, info.traceback, info.index)
    exc.__cause__ = cause
    return exc


# ====================================================================== streaming jobs


class _Feeder:
    """Pulls a user's iterable on the caller's thread into a stream, at most ``limit`` ahead."""

    #: arguments pickled before the reactor is woken, when many are taken at once
    BATCH = 1024

    def __init__(
        self,
        stream: JobStream,
        source: Iterator[Any],
        limit: int | None,
        *,
        star: bool,
        fn_name: str,
        defer_errors: bool = False,
    ) -> None:
        self.stream = stream
        self.source: Iterator[Any] | None = source
        self.limit = limit
        self.star = star
        self.fn_name = fn_name
        self.put = 0
        self.done = False
        #: with ``defer_errors``, an exception the iterable raised: it takes the position of the
        #: argument it failed to give and is raised when the caller's iteration reaches it
        self.defer_errors = defer_errors
        self.error: BaseException | None = None
        # refill only once a few results were consumed: one reactor wake-up per refill
        self._slack = 0 if limit is None else max(1, limit // 8) - 1
        job = stream.session
        #: an iterable of unknown length (a generator): grouped too, its groups growing with
        #: what was taken (see :func:`group_target`); a gang's arguments each go alone
        self.lazy = job.total_hint is None and not job.params.gang
        #: whether arguments go in groups, and how many to the next (bounded by their bytes)
        self.grouped = self.lazy or (
            not job.params.gang and group_target(job.total_hint, job.params.chunksize) > 1
        )
        self._group_now = 1  # the first argument alone: its size tells how many fit a group

    def top_up(self, consumed: int) -> None:
        """Take arguments until ``limit`` are outstanding (or the iterable ends)."""
        if self.done:
            return
        limit = self.limit
        if limit is not None and self.put - consumed > limit - 1 - self._slack:
            return
        if self.grouped:
            self._top_up_groups(consumed)
            return
        stream = self.stream
        batch: list[bytes] = []
        room = FEED_MAX_BYTES - stream.unsent_bytes
        source, star, append = self.source, self.star, batch.append
        # the hot loop of a map of unknown length: plain values skip dumps_argument, and
        # numbers (most maps' arguments) skip _dumps_plain too: no Python call per argument
        dumps, plain, protocol = _dumps_plain, _PLAIN_TYPES, PICKLE_PROTOCOL
        scalars, dumps_scalar, batch_max = _SCALARS, pickle.dumps, self.BATCH
        try:
            while limit is None or self.put + len(batch) - consumed < limit:
                if room <= 0:
                    break
                try:
                    value = next(source)  # type: ignore[arg-type]
                except StopIteration:
                    self.done = True
                    self.source = None
                    break
                except Exception as exc:
                    if not self._source_failed(exc):
                        raise
                    break
                if star:
                    value = tuple(value)
                kind = type(value)
                if kind in scalars:
                    blob = dumps_scalar(value, protocol)
                elif kind in plain:
                    blob = dumps(value, protocol)
                else:
                    try:
                        blob = dumps_argument(
                            value, f"argument {self.put + len(batch)} of {self.fn_name}"
                        )
                    except PicklingError as exc:
                        if not self._unpicklable(exc):
                            raise
                        break
                append(blob)
                room -= len(blob)
                if len(batch) >= batch_max:
                    stream.put_many(batch)
                    self.put += len(batch)
                    batch = []
                    append = batch.append
        finally:
            stream.put_many(batch)
            self.put += len(batch)
        if self.done:
            stream.close_input()

    def _source_failed(self, exc: Exception) -> bool:
        """The iterable raised: with ``defer_errors`` keep it for its position (True)."""
        if not self.defer_errors:
            return False
        self.error, self.done, self.source = exc, True, None
        return True

    def _unpicklable(self, exc: PicklingError) -> bool:
        """An argument cannot be pickled: a lazy iterator (``limit``) with ``defer_errors``
        keeps the error for its position, as one the iterable raised (True), so the results
        of the arguments taken before it are still given."""
        return self.limit is not None and self._source_failed(exc)

    def _pickle_group(self, group: list[Any]) -> tuple[list[Any], bytes | None]:
        """The group and its pickle; with an argument that cannot be pickled and the error
        deferred (:meth:`_unpicklable`), the arguments before it and theirs (None: none)."""
        try:
            return group, self._close_group(group, self.put)
        except PicklingError as exc:
            if not self._unpicklable(exc):
                raise
            group = group[: exc.position]
        return group, self._close_group(group, self.put) if group else None

    def _top_up_groups(self, consumed: int) -> None:
        """:meth:`top_up` in argument groups: each taken and pickled in one C call. A lazy
        source's groups are queued at least every ``GROUP_WAIT`` s, and shrink to what it gives
        in that time: a slow generator's arguments are not held back for a group or a batch."""
        stream, limit, star, lazy = self.stream, self.limit, self.star, self.lazy
        batch: list[bytes] = []
        counts: list[int] = []
        room = FEED_MAX_BYTES - stream.unsent_bytes
        clock = time.monotonic
        since = read = clock() if lazy else 0.0  # when the oldest argument not queued was taken
        try:
            while room > 0 and not self.done:
                want = self._group_now
                if limit is not None:
                    want = min(want, limit - (self.put - consumed))
                    if want <= 0:
                        break
                group: list[Any] = []
                try:
                    group.extend(itertools.islice(self.source, want))  # type: ignore[arg-type]
                    if len(group) < want:
                        self.done, self.source = True, None
                except Exception as exc:  # what came before the error still goes
                    if not self._source_failed(exc):
                        raise
                if not group:
                    break
                if star:
                    group = [tuple(v) for v in group]
                group, blob = self._pickle_group(group)
                if blob is None:
                    break
                batch.append(blob)
                counts.append(len(group))
                self.put += len(group)
                room -= len(blob)
                # the first window is ready: queue it and let the reactor thread take the GIL
                # to send it with the submit while this thread pickles the rest
                first_window = self.put - len(group) < m.INITIAL_WINDOW <= self.put
                due = False
                if lazy:  # a slow source: groups of what it gives in GROUP_WAIT, queued now
                    now = clock()
                    fits = int(len(group) * GROUP_WAIT / max(now - read, 1e-9))
                    self._group_now = max(1, min(self._group_now, fits))
                    # the first argument goes at once (its call starts as early as a list's)
                    due = now - since >= GROUP_WAIT or self.put == len(group)
                    read = now
                if len(batch) >= self.BATCH or first_window or due:
                    stream.put_many(batch, counts=counts)
                    batch, counts = [], []
                    since = read
                    if first_window:
                        time.sleep(0)
        finally:
            stream.put_many(batch, counts=counts)
        if self.done:
            stream.close_input()

    def _close_group(self, group: list[Any], first: int) -> bytes:
        """Pickle a group; size the next from the bytes per argument of this one."""
        blob = dumps_group(group, first, self.fn_name)
        self._group_now = next_group(self.stream.session, first + len(group), len(blob), len(group))
        return blob


class ResultIterator(Iterator[Any]):
    """Results of a streaming job, in argument order or as they complete.

    ``next(timeout=)`` raises TimeoutError when no result comes in time, and iteration may go
    on (a deadline of the whole map, ``Executor.map``'s ``timeout``, ends it). A remote error is
    raised at its position with its remote traceback; with ``stop_on_error`` (the default)
    the job is then killed and iteration ends, otherwise iteration may go on (like
    ``multiprocessing.Pool.imap``). Closing the iterator (``close()``, ``with``, or dropping
    it) kills the job if it is still running.
    """

    def __init__(
        self,
        stream: JobStream,
        source: Iterator[Any],
        *,
        ordered: bool,
        buffersize: int | None,
        star: bool = False,
        style: MapStyle,
        deadline: float | None = None,
        fn_name: str = "",
    ) -> None:
        self._stream = stream
        self._closed = False
        self._style = style
        self._ordered = ordered
        self._deadline = deadline
        try:
            self._feeder = _Feeder(
                stream,
                source,
                buffersize,
                star=star,
                fn_name=fn_name,
                defer_errors=style.defer_errors,
            )
        except BaseException:
            stream.kill()  # started already: it would wait for arguments until the handle closed
            raise
        self._consumed = 0
        self._next_index = 0
        self._buffer: dict[int, tuple[Any, TaskErrorInfo | None]] = {}
        #: ordered runs of results: first index not yet taken -> (results, offset of it)
        self._runs: dict[int, tuple[list[Any], int]] = {}
        self._ready: deque[tuple[Any, TaskErrorInfo | None]] = deque()
        self._ended = False
        self._end_error: BaseException | None = None
        #: why every later next() raises CancelledError (None: not cancelled)
        self._cancelled: str | None = None
        self._lock = threading.Lock()
        self._top_up()

    @property
    def job_id(self) -> int | None:
        """The server's id of the job, once it has answered the submit."""
        return self._stream.job_id

    @property
    def finished(self) -> bool:
        """The job has ended: every result it will give is here."""
        return self._stream.finished.is_set()

    @property
    def input_read(self) -> bool:
        """The whole iterable was taken (or the iterator was closed)."""
        return self._feeder.done

    @property
    def cancelled(self) -> bool:
        return self._cancelled is not None

    def wait_finished(self) -> None:
        """Block until the job has ended."""
        self._stream.finished.wait()

    @property
    def taken(self) -> int:
        """How many arguments were taken from the iterable so far."""
        return self._feeder.put

    def __iter__(self) -> ResultIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; TimeoutError if none arrives within ``timeout`` seconds."""
        with self._lock:
            return self._next(timeout)

    def _next(self, timeout: float | None, wait: bool = True) -> Any:
        if self._cancelled is not None:
            raise concurrent.futures.CancelledError(self._cancelled)
        if self._closed:
            raise StopIteration
        deadline = self._deadline
        #: the deadline is this call's own timeout (a poll), not the whole map's
        polled = False
        if timeout is not None:
            mine = time.monotonic() + timeout
            if deadline is None or mine < deadline:
                deadline, polled = mine, True
        while True:
            self._top_up()
            item = self._pop_ready()
            if item is not None:
                return self._deliver(*item)
            if self._feeder.done and self._consumed >= self._feeder.put:
                self.close()
                error, self._feeder.error = self._feeder.error, None
                if error is not None:  # the iterable failed here: raise it at its position
                    raise error
                raise StopIteration
            if self._ended:
                error = self._end_error or JobFailed("the job ended before every result arrived")
                self.close()
                raise error
            if not wait:  # the caller is told instead: it takes the next event itself
                if self._stream.result_buffer:
                    self._stream.waiting_for_results()
                return _NOT_YET
            self._wait(deadline, polled)

    def rest(self, out: list[Any] | None = None) -> list[Any]:
        """Every result left, exactly as ``list(self)`` would give them, without a Python call
        per result: results that are ready are taken in runs (``map``'s hot path). They are
        appended to ``out`` (kept up to a remote error this raises) and returned."""
        out = [] if out is None else out
        self.rest_ready(out, wait=True)
        return out

    def rest_ready(self, out: list[Any], wait: bool = False) -> bool:
        """:meth:`rest` without waiting, for a consumer that takes the stream's events from a
        queue of its own (``remap.Pool.map_async``, on the pool's delivery thread, see
        :meth:`absorb`): True once every result is in ``out``, False while one has not come."""
        with self._lock:
            while True:
                self._take_ready(out)
                try:
                    value = self._next(None, wait)
                except StopIteration:
                    return True
                if value is _NOT_YET:
                    return False
                out.append(value)

    def absorb(self, event: tuple[Any, ...]) -> None:
        """An event of this iterator's stream, taken from a shared queue by its consumer."""
        with self._lock:
            self._stream.wanting = False
            self._handle(event)

    def _take_ready(self, out: list[Any]) -> None:
        """Move the run of successful results that are next in line into ``out``."""
        append, taken = out.append, 0
        if self._ordered:
            buffer, index = self._buffer, self._next_index
            pop, runs = buffer.pop, self._runs
            while True:
                run = runs.pop(index, None) if runs else None
                if run is not None:  # a whole run in one step
                    values, offset = run
                    out.extend(values[offset:] if offset else values)
                    index += len(values) - offset
                    continue
                item = pop(index, None)
                if item is None:
                    break
                if item[1] is not None:  # an error: _next raises it in its turn
                    buffer[index] = item
                    break
                append(item[0])
                index += 1
            taken = index - self._next_index
            self._next_index = index
        else:
            ready = self._ready
            while ready and ready[0][1] is None:
                append(ready.popleft()[0])
                taken += 1
        self._consumed += taken
        if taken and self._stream.result_buffer:
            self._stream.took(taken)

    def _top_up(self) -> None:
        try:
            self._feeder.top_up(self._consumed)
        except BaseException:
            self.close()
            raise

    def _pop_ready(self) -> tuple[Any, TaskErrorInfo | None] | None:
        if self._ordered:
            index = self._next_index
            run = self._runs.pop(index, None) if self._runs else None
            if run is not None:
                values, offset = run
                if offset + 1 < len(values):
                    self._runs[index + 1] = (values, offset + 1)
                self._next_index += 1
                # hand the result over without keeping it (the caller may drop it at once)
                value, values[offset] = values[offset], None
                return value, None
            item = self._buffer.pop(index, None)
            if item is not None:
                self._next_index += 1
            return item
        return self._ready.popleft() if self._ready else None

    def _deliver(self, result: Any, error: TaskErrorInfo | None) -> Any:
        self._consumed += 1
        if self._stream.result_buffer:
            self._stream.took(1)
        if error is None:
            return result
        if self._style.stop_on_error:
            self.close()
        exc = remote_exception(error)
        raise exc if self._style.wrap_error is None else self._style.wrap_error(exc)

    def _wait(self, deadline: float | None, polled: bool = False) -> None:
        # past the deadline, what already arrived is still given (as the stdlib's map gives a
        # future that is done): only an empty queue times out
        try:
            event = self._stream.next_event(
                None if deadline is None else deadline - time.monotonic()
            )
        except queue.Empty:
            # the map's own deadline (Executor.map's timeout=) ends it, as the stdlib's;
            # next(timeout=) only gives up waiting: the iterator and its job go on
            if self._style.stop_on_error and not polled:
                self.close()
            raise self._style.timeout_error("no result arrived in time") from None
        self._handle(event)

    def _handle(self, event: tuple[Any, ...]) -> None:
        # what the tasks printed came before their results: show it before handing them out
        taskoutput.printer.flush(OUTPUT_FLUSH_TIMEOUT)
        kind = event[0]
        if kind == "items":
            batch = event[2]
            pairs = map(_RESULT_AND_ERROR, batch)
            if self._ordered:
                self._buffer.update(zip(map(_INDEX, batch), pairs))
            else:
                self._ready.extend(pairs)
        elif kind == "runs":
            for first, values in event[2]:
                if self._ordered:
                    self._runs[first] = (values, 0)
                else:
                    self._ready.extend(zip(values, itertools.repeat(None)))
        elif kind == "partial":  # a fold of ``count`` results (a reduce): one value to take
            self._ready.append((event[3], None))
            self._consumed += event[2] - 1
        elif kind == "end":
            self._ended = True
            self._end_error = event[2]

    def close(self) -> None:
        """Stop: kill the job if it still runs and drop what was buffered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._runs.clear()
        self._ready.clear()
        self._stream.dropped()  # what it held is no longer held
        self._feeder.source = None
        self._feeder.done = True
        if not self._stream.finished.is_set():
            self._stream.kill()

    def cancel(self, why: str = "the executor was shut down with cancel_futures=True") -> None:
        """Close, and make every later ``next()`` raise CancelledError saying ``why``."""
        self._cancelled = why
        self.close()

    def __enter__(self) -> ResultIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if self._closed or self._stream.finished.is_set():
            return
        with contextlib.suppress(Exception):  # interpreter shutdown: the reactor may be gone
            self._stream.kill_soon()


#: what :meth:`ResultIterator._next` returns when it would wait and may not
_NOT_YET: Any = object()
_INDEX = operator.itemgetter(0)
_RESULT_AND_ERROR = operator.itemgetter(1, 2)


# ====================================================================== the handle


def _check_buffersize(buffersize: int | None) -> None:
    """Refuse a buffersize below 1 before its job starts (a started job would wait for
    arguments until the handle closed)."""
    if buffersize is not None and buffersize < 1:
        raise ValueError(f"buffersize must be at least 1, not {buffersize}")


class _NoInitial:
    def __repr__(self) -> str:
        return "<no initial value>"


_NO_INITIAL: Any = _NoInitial()


class MapCall(NamedTuple):
    """What one method of the map family means (a row of :data:`MAP_CALLS`)."""

    kind: str  #: the job's name prefix
    star: bool  #: ``fn(*args)`` rather than ``fn(x)``
    ordered: bool  #: results in argument order, else as they complete
    lazy: bool  #: an iterator bounded by ``buffersize``, else a list (the input read at once)


#: the map family of :class:`Cluster` and :class:`remap.Pool`, declared once
MAP_CALLS: dict[str, MapCall] = {
    "map": MapCall("map", star=False, ordered=True, lazy=False),
    "starmap": MapCall("starmap", star=True, ordered=True, lazy=False),
    "imap": MapCall("imap", star=False, ordered=True, lazy=True),
    "imap_unordered": MapCall("imap", star=False, ordered=False, lazy=True),
}


def _rest(results: ResultIterator) -> list[Any]:
    with results:
        return results.rest()


class MapStyle(NamedTuple):
    """What a facade changes in the map family (``remap.Pool`` follows multiprocessing;
    ``remap.Executor`` breaks on an initializer's error)."""

    kind: str | None = None  #: one job-name prefix for every method (None: the table's)
    gather: Callable[[ResultIterator], list[Any]] = _rest  #: how map and starmap collect
    #: a remote error closes the iterator (kills the job), else iteration may go on
    stop_on_error: bool = True
    timeout_error: type[BaseException] = concurrent.futures.TimeoutError
    #: an exception from the iterable is raised where it happened, after the results before it
    defer_errors: bool = False
    #: turns a remote error into what the caller's API raises (the Pool's MaybeEncodingError)
    wrap_error: Callable[[BaseException], BaseException] | None = None


CLUSTER_MAPS = MapStyle()


class Cluster:
    """A connection to a remap cluster (or an embedded local one), usable from any thread.

    Use it as a context manager or call :meth:`close`; closing an embedded cluster kills its
    cores. Methods block the calling thread; the network runs on a shared reactor thread.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        secret: str | bytes | None = None,
        cores: int | None = None,
        settings: Settings | None = None,
        env_file: str | None = ".env",
        group: str | None = None,
        priority: int = 0,
        retries: int = 3,
        task_timeout: float | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        task_output: bool | None = None,
        modules: Sequence[str | types.ModuleType] = (),
        files: Sequence[str | os.PathLike] = (),
        requires: Sequence[str] = (),
        max_cores: int = 0,
        min_cores: int = 0,
    ) -> None:
        #: options every job of this handle takes (attributes: a caller may change them later)
        self.group, self.priority, self.retries = group, priority, retries
        self.task_timeout, self.requires = task_timeout, [str(name) for name in requires]
        self.max_cores, self.min_cores = max_cores, min_cores
        self._params("job")  # checked now by the one validator, not at the first map
        #: local modules and small files every job of this handle ships (see remap.bundle)
        self.bundle = bundle.collect(list(modules), list(files), ".")
        if cores is not None and (type(cores) is not int or cores < 1):  # True is no core count
            raise ValueError(f"cores must be a positive integer, not {cores!r}")
        if env_file not in (None, ".env") and not Path(env_file).exists():
            # as the console's --env-file: a mistyped name would read nothing and run elsewhere
            raise ConfigError(f"env_file {env_file!r}: no such file (env_file=None reads none)")
        if settings is None:
            settings = load_settings(
                {"server": address, "cores": cores},
                dotenv_path=env_file,
                overrides_from="remap.connect",
            )
        else:
            settings = replace(
                settings, server=address or settings.server, cores=cores or settings.cores
            )
        self.settings = settings
        #: print what tasks print or log to this process's stderr (REMAP_TASK_OUTPUT)
        self.task_output = settings.task_output if task_output is None else bool(task_output)
        self.address: str | None = None
        self._client: ClusterClient | None = None
        self._embedded: EmbeddedCluster | None = None
        self._was_embedded = False  # kept once closed (``_embedded`` is dropped then)
        self._streams: weakref.WeakSet[JobStream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._executor: Executor | None = None
        self.dashboard_url: str | None = None
        key = secret.encode() if isinstance(secret, str) else secret
        self._secret = key
        reactor = runtime.ensure_running()
        runtime.check_not_reactor_thread()
        self._reactor = reactor
        #: runs a function on the reactor thread (see :func:`runtime.thread_caller`)
        self._call_soon = runtime.thread_caller(reactor)
        self._generation = runtime.generation
        if not settings.server:  # a secret but no address: look for this cluster's server
            say = lambda text: print(text, file=sys.stderr)  # noqa: E731
            settings, found = discovery.locate(
                settings, say, want_tls=tls_enabled(settings), secret=key
            )
            if found is not None and found.chosen is None:
                say(found.failure().partition("; pass")[0] + ": starting an embedded local cluster")
            self.settings = settings
        try:
            if settings.server:
                self.address = settings.server
                server = settings.server
                self._client = runtime.run(
                    lambda: defer.ensureDeferred(
                        connect_console(
                            reactor, settings, server, secret=key, timeout=connect_timeout
                        )
                    ),
                    timeout=connect_timeout + 5,
                )
            else:
                from .cluster import EmbeddedCluster  # the composition root: only when embedded

                self._embedded = EmbeddedCluster(reactor, settings, cores)
                self._was_embedded = True
                # what a call from here sends reaches the server and the node in that turn
                self._call_soon = runtime.thread_caller(reactor, self._embedded.in_one_turn)
                self.address = runtime.run(self._embedded.start, timeout=connect_timeout)
                self._client = runtime.run(self._embedded.connect, timeout=connect_timeout)
                runtime.run(
                    self._embedded.until_node_joined,
                    connect_timeout,
                    timeout=connect_timeout + 5,
                )
        except BaseException:
            self._stop_embedded()
            raise

    def open_dashboard(self, out: Any = None) -> str:
        """A one-time login link to this cluster's dashboard, also printed to ``out`` (stderr)."""
        embedded = self._embedded
        if embedded is not None:
            url = runtime.run(embedded.start_dashboard, timeout=10)
        else:
            from .console.dashboard import login_link

            settings = self.settings
            if self._secret:
                settings = replace(settings, secret=self._secret.decode("utf-8", "replace"))
            url = login_link(settings)
        self.dashboard_url = url
        print(f"remap dashboard: {url}", file=out or sys.stderr, flush=True)
        return url

    # ------------------------------------------------------------ plumbing

    @property
    def embedded(self) -> bool:
        """True when this handle runs (or, closed, ran) its own local cluster (no server was
        configured)."""
        return self._was_embedded

    @property
    def held_result_bytes(self) -> int:
        """Bytes of results this handle holds that its callers have not taken yet (pickled
        sizes), over every running ``imap``/``map``: at most about ``REMAP_RESULT_BUFFER``
        plus the results of the calls already running when the bound was reached."""
        return sum(stream.held_result_bytes for stream in list(self._streams))

    @property
    def closed(self) -> bool:
        return self._closed

    def _output_handler(self) -> Callable[[int, str], None] | None:
        """Where this handle's task output goes: the printer thread, or nowhere."""
        return taskoutput.printer.put if self.task_output else None

    def _stream(self, fn_blob: bytes, params: JobOptions, **options: Any) -> JobStream:
        """Start a job of this handle: its modules and files travel along, its task output is
        printed here (by the printer thread)."""
        stream = JobStream(
            bundle.wrap(fn_blob, self.bundle),
            params,
            call_soon=self._call_soon,
            on_output=self._output_handler(),
            **options,
        )
        self._streams.add(stream)
        return stream.start(self._client)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this cluster handle is closed")
        if self._generation != runtime.generation:
            raise RemapError(
                "this cluster handle was opened before os.fork(): its network thread stayed "
                "in the parent; call remap.connect() again in this process"
            )
        client = self._client
        if client is None or (
            client.link is None and not client.redialing and not client.dials_on_use
        ):
            # while it dials again, or if it lost its server while idle (this call dials
            # again), a call made now waits for that dial (ClusterClient.submit)
            error = client.error if client is not None else None
            raise ConnectionLost(str(error) if error else "not connected to the server")

    def _params(
        self,
        name: str,
        *,
        mode: str = "object",
        star: bool = False,
        chunksize: int | None = None,
        on_error: str = "continue",
    ) -> JobOptions:
        """A job's options from this handle's and the call's; a bad one is an InvalidOption
        (a ValueError) from the same validator the job file and the server use."""
        return JobOptions(
            name=name,
            mode=mode,
            group=self.group,
            retries=self.retries,
            timeout=self.task_timeout,
            on_error=on_error,
            chunksize=chunksize,
            priority=self.priority,
            max_cores=self.max_cores,
            min_cores=self.min_cores,
            star=star,
            requires=tuple(self.requires),
        )

    def _iterate(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        star: bool,
        ordered: bool,
        chunksize: int | None,
        buffersize: int | None,
        kind: str,
        deadline: float | None = None,
        style: MapStyle = CLUSTER_MAPS,
        events: queue.SimpleQueue | None = None,
        owner: Any = None,
        total: int | None = None,
    ) -> ResultIterator:
        _check_buffersize(buffersize)
        self._check_open()
        blob = function_blob(fn)
        # a known length lets the server share the last batches out over every core
        if isinstance(iterable, Sized):
            total = len(iterable)
        source = iter(iterable)
        fn_name = describe(fn)
        params = self._params(f"{kind}:{fn_name}", star=star, chunksize=chunksize)
        stream = self._stream(
            blob,
            params,
            total_hint=total,
            runs=True,
            result_buffer=self.settings.result_buffer,
            events=events,
            owner=owner,
        )
        return ResultIterator(
            stream,
            source,
            ordered=ordered,
            buffersize=buffersize,
            star=star,
            style=style,
            deadline=deadline,
            fn_name=fn_name,
        )

    # ------------------------------------------------------------ mapping

    def _map(
        self,
        method: str,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None,
        buffersize: int | None = None,
        ordered: bool | None = None,
        style: MapStyle = CLUSTER_MAPS,
        opened: Callable[[ResultIterator], Any] | None = None,
        collect: bool = True,
        events: queue.SimpleQueue | None = None,
        owner: Any = None,
        executor: Executor | None = None,
    ) -> Any:
        """The one implementation of ``map``, ``starmap``, ``imap`` and ``imap_unordered`` for
        :class:`Cluster` and :class:`remap.Pool`: the method's row of :data:`MAP_CALLS`, the
        facade's :class:`MapStyle`. ``opened`` sees the iterator before anything is gathered;
        ``collect=False`` returns the iterator of an eager method (``map_async``); its
        stream's events then go to ``events`` (with ``owner``) when given. With an
        ``executor`` (``remap.Pool``'s) each call runs after its initializer, and a small
        ``map``/``starmap`` (:func:`is_small`) runs as calls in its open job of ``fn``,
        ``chunksize`` checked but the server sizing its batches, as for submits. (Not this
        handle's own maps: that job keeps ``fn`` as pickled when it opened, so a later
        ``ship_by_value`` or change to a global it captured by value would not be seen.)"""
        call = MAP_CALLS[method]
        small = executor is not None and collect and not call.lazy and ordered is not False
        if small and is_small(iterable):
            self._params(call.kind, chunksize=chunksize)  # refused as a job's would be
            calls = executor._small_map(fn, iterable, call.star, True)
            if calls is not None:
                try:
                    return calls.result()
                except Exception as exc:  # the first remote error, in the facade's type
                    error = exc if style.wrap_error is None else style.wrap_error(exc)
                raise error
        if executor is not None and executor._initializer is not None:
            fn = Initialized(fn, executor._initializer)
        if call.lazy and not style.defer_errors:
            # an exception from the iterable is raised at its position, after the results
            # before it (as builtin map and Pool.imap), not when the feeder read it
            style = style._replace(defer_errors=True)
        results = self._iterate(
            fn,
            iterable,
            star=call.star,
            ordered=call.ordered if ordered is None else ordered,
            chunksize=chunksize,
            buffersize=(DEFAULT_BUFFERSIZE if buffersize is None else buffersize)
            if call.lazy
            else None,
            kind=style.kind or call.kind,
            style=style,
            events=events,
            owner=owner,
        )
        if opened is not None:
            opened(results)
        return results if call.lazy or not collect else style.gather(results)

    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
    ) -> list[Any]:
        """``[fn(x) for x in iterable]`` on the cluster; raises the first remote error.

        The iterable is read (and pickled) at once, like ``multiprocessing.Pool.map``; use
        :meth:`imap` for long or endless inputs. ``ordered=False`` returns the results in
        the order they completed.
        """
        return self._map("map", fn, iterable, chunksize=chunksize, ordered=ordered)

    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
    ) -> list[Any]:
        """``[fn(*args) for args in iterable]`` on the cluster."""
        return self._map("starmap", fn, iterable, chunksize=chunksize, ordered=ordered)

    def imap(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int = DEFAULT_BUFFERSIZE,
    ) -> ResultIterator:
        """Lazy, ordered results; takes at most ``buffersize`` arguments ahead of what you consumed."""
        return self._map("imap", fn, iterable, chunksize=chunksize, buffersize=buffersize)

    def imap_unordered(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int = DEFAULT_BUFFERSIZE,
    ) -> ResultIterator:
        """Lazy results in completion order; bounded like :meth:`imap`."""
        return self._map("imap_unordered", fn, iterable, chunksize=chunksize, buffersize=buffersize)

    def reduce(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        combine: Callable[[Any, Any], Any],
        *,
        initial: Any = _NO_INITIAL,
        chunksize: int | None = None,
        buffersize: int = DEFAULT_BUFFERSIZE,
    ) -> Any:
        """Fold ``fn(x)`` for every x with ``combine``; nodes fold their batches first.

        ``combine`` must be associative and commutative: results are folded in whatever
        order they complete. ``initial`` (if given) is folded in once. An empty iterable
        without ``initial`` raises TypeError, like :func:`functools.reduce`.
        """
        _check_buffersize(buffersize)
        self._check_open()
        blob = function_blob(fn, combine)
        source = iter(iterable)
        stream = self._stream(
            blob,
            self._params(
                f"reduce:{describe(fn)}", mode="reduce", chunksize=chunksize, on_error="fail"
            ),
        )
        acc, have = initial, initial is not _NO_INITIAL
        results = ResultIterator(
            stream,
            source,
            ordered=False,
            buffersize=buffersize,
            style=CLUSTER_MAPS,
            fn_name=describe(fn),
        )
        with results:
            for value in results:
                acc = combine(acc, value) if have else value
                have = True
        if not have:
            raise TypeError("reduce() of empty iterable with no initial value")
        return acc

    # ------------------------------------------------------------ data jobs

    def mapreduce(
        self,
        functions: Any,
        input: Any,
        output: Any,
        *,
        reducers: int | dict[str, int] = 1,
        data_dir: str | None = None,
        on_progress: Callable[[Any], None] | None = None,
        detach: bool = False,
        **options: Any,
    ) -> Any:
        """Run a data job (map/reduce over files; see the README) and return its summary.

        ``functions`` is a module (or its ``FILE.py`` or name, as in a job file) or a dict
        with ``map`` and ``reduce`` (and optionally
        ``combine``, ``read``, ``write``, ``partition``, ``group``). ``options`` are the job
        file's keys: ``split_mb``, ``spill_mb``, ``fanin``, ``on_error``, ``name``.
        Raises JobFailed or JobKilled (nothing published) when the job does not finish.
        ``detach=True`` (a module from a ``.py`` file, on a server): the server runs the
        job; returns a handle with ``id``, ``status()``, ``wait()`` (the summary) and ``kill()``.
        """
        from .data.driver import DataJobRunner, job_from_functions
        from .data.layout import DataDir

        self._check_open()
        functions = _job_module(functions)
        options = {
            "retries": self.retries,
            "timeout": self.task_timeout,
            "group": self.group,
            "priority": self.priority,
            **options,
        }
        if detach:
            from .console.detached import drive_module

            keys = {"reducers": reducers, **options}
            return drive_module(self, "mapreduce", functions, input, output, keys)
        job = job_from_functions(
            functions, input, output, reducers=reducers, bundle=self.bundle, **options
        )
        data = DataDir.from_setting(data_dir or self.settings.data_dir)
        assert self._client is not None
        runner = DataJobRunner(
            self._client, job, data, on_progress=on_progress, on_output=self._output_handler()
        )
        try:
            return runner.run()
        finally:  # what the tasks printed is shown before the call returns
            taskoutput.printer.flush(OUTPUT_FLUSH_TIMEOUT)

    # ------------------------------------------------------------ vertex jobs

    def vertex(
        self,
        module: Any,
        input: str | os.PathLike[str] | list[str | os.PathLike[str]],
        output: str | os.PathLike[str],
        *,
        partitions: int | None = None,
        max_supersteps: int = DEFAULT_MAX_SUPERSTEPS,
        checkpoint_every: int = 0,
        on_error: str = "fail",
        data_dir: str | os.PathLike[str] | None = None,
        on_superstep: Callable[[Any], None] | None = None,
        lost_after: float = 60.0,
        detach: bool = False,
    ) -> Any:
        """Run a vertex (Pregel) job and return its summary (``remap.vertex.VertexResult``).

        ``module`` is a module (or its ``FILE.py`` or name, or a dict) with ``prepare`` and
        ``compute`` and optionally
        ``combine``, ``output`` and ``aggregators`` (see the README). ``input`` is a file, a
        directory of files or a list of them; ``output`` a directory that must not exist.
        ``on_superstep(report)`` is called after every superstep's barrier. A worker whose
        node or core the server lost, or without a heartbeat for ``lost_after`` seconds,
        counts as lost (rollback to the last checkpoint). ``detach=True``: as for
        :meth:`mapreduce`, a handle to the job the server runs.
        """
        from .data.inputs import resolve_inputs
        from .vertex.driver import VertexConfig
        from .vertex.program import program_from_module, program_from_namespace
        from .vertex.run import run_vertex

        self._check_open()
        module = _job_module(module)
        if detach:
            from .console.detached import drive_module

            keys = {
                "partitions": partitions or "auto",
                "max_supersteps": max_supersteps,
                "checkpoint_every": checkpoint_every,
                "on_error": on_error,
                "retries": self.retries,
                "group": self.group,
                "priority": self.priority,
            }
            return drive_module(self, "vertex", module, input, output, keys)
        if isinstance(module, types.ModuleType):
            if module.__name__ != "__main__":
                ship_by_value(module)
            program = program_from_module(module)
        else:
            program = program_from_namespace(module, "vertex job")
        inputs = input if isinstance(input, (list, tuple)) else [input]
        config = VertexConfig(
            input=resolve_inputs([os.fspath(p) for p in inputs], Path.cwd()),
            output=Path(output).expanduser().resolve(),
            partitions=partitions,
            max_supersteps=max_supersteps,
            checkpoint_every=checkpoint_every,
            on_error=on_error,
            name=Path(getattr(module, "__file__", None) or "vertex").stem,
            lost_after=lost_after,
        )
        try:
            return run_vertex(
                self._client,
                self.settings,
                program,
                config,
                group=self.group,
                retries=self.retries,
                priority=self.priority,
                bundle=self.bundle,
                data_dir=data_dir,
                on_report=on_superstep,
                on_output=self._output_handler(),
            )
        finally:
            taskoutput.printer.flush(OUTPUT_FLUSH_TIMEOUT)

    # ------------------------------------------------------------ futures

    def executor(self) -> Executor:
        """This handle's shared :class:`remap.Executor` (closed with the handle)."""
        executor = self._executor  # every submit asks: the common case takes no lock, no import
        if executor is not None and not self._closed:
            return executor
        from .executor import Executor

        with self._lock:
            if self._closed:
                raise RuntimeError("this cluster handle is closed")
            if self._executor is None:
                self._executor = Executor(cluster=self)
            return self._executor

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RemoteFuture:
        """Run ``fn(*args, **kwargs)`` on the cluster; return a concurrent.futures.Future."""
        return self.executor().submit(fn, *args, **kwargs)

    # ------------------------------------------------------------ the cluster

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        """``{"nodes": [...], "jobs": [...], "server": {...}}`` as the server reports it."""
        self._check_open()
        client = self._client
        assert client is not None
        return runtime.run(client.status, timeout=timeout)

    def nodes(self) -> list[dict[str, Any]]:
        """The connected nodes: id, host, pid, cores, busy, group, ..."""
        return self.status()["nodes"]

    def cores(self) -> int:
        """Cores on every connected node."""
        return sum(int(n.get("cores", 0)) for n in self.nodes())

    def close(self) -> None:
        """Kill this handle's running jobs, disconnect, and stop the embedded cluster. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if self._generation != runtime.generation:
            return  # opened before fork(): the connection and cores are the parent's to close
        if sys.is_finalizing():
            # a handle garbage collected as the interpreter ends (a Pool never closed): the
            # reactor's daemon thread is frozen by now, so waiting for it would only time out
            # (20 s); the cores end with their pipes when this process exits
            return
        if executor is not None:
            executor._terminate()
        streams = list(self._streams)
        for stream in streams:
            if not stream.finished.is_set():
                stream.kill()
        # the server's answers end those jobs as killed (JobKilled, as on an embedded cluster),
        # not as if the server had gone (which disconnecting first would)
        client = self._client
        if client is not None and client.link is not None:  # nobody answers a lost link
            deadline = time.monotonic() + KILL_WAIT
            for stream in streams:
                stream.finished.wait(max(0.0, deadline - time.monotonic()))
        if self._client is not None:
            try:
                runtime.run(_disconnect, self._client, timeout=5)
            except Exception as exc:  # noqa: BLE001 - closing anyway; say why
                log.warn("closing the connection failed: {error}", error=exc)
        self._stop_embedded()

    def _stop_embedded(self) -> None:
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            try:
                runtime.run(embedded.stop, timeout=CLOSE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - cores die with their pipes anyway
                log.warn("stopping the embedded cluster failed: {error}", error=exc)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self._was_embedded else "remote"
        state = "closed" if self._closed else "open"
        return f"<remap.Cluster {kind} {self.address} {state}>"


def _disconnect(client: ClusterClient) -> defer.Deferred | None:
    """Close the console connection; fire once it is really gone."""
    if client.link is None:
        client.close()  # stops a reconnection under way
        return None
    gone: defer.Deferred = defer.Deferred()

    def lost(result: Any) -> Any:
        if not gone.called:
            gone.callback(None)
        return result

    client.lost.addBoth(lost)
    client.close()
    return gone


def own_or_borrow(
    address: Any,
    cluster: Cluster | None,
    cores: int | None,
    connect_kwargs: dict[str, Any],
    owner: str = "remap.Executor",
) -> tuple[Cluster, bool]:
    """The cluster an Executor or Pool runs on, and whether it made (and so must close) it."""
    unknown = sorted(set(connect_kwargs) - set(inspect.signature(connect).parameters))
    if unknown:  # named as the caller's, not as connect()'s, which the caller never called
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if cluster is not None:
        if address is not None or connect_kwargs:
            raise TypeError("give either cluster= or connection arguments, not both")
        return cluster, False
    connect_kwargs.setdefault("cores", cores)
    return connect(address, **connect_kwargs), True


def connect(
    address: str | None = None,
    *,
    secret: str | bytes | None = None,
    cores: int | None = None,
    settings: Settings | None = None,
    env_file: str | None = ".env",
    group: str | None = None,
    priority: int = 0,
    retries: int = 3,
    task_timeout: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    task_output: bool | None = None,
    dashboard: bool = False,
    modules: Sequence[str | types.ModuleType] = (),
    files: Sequence[str | os.PathLike] = (),
    requires: Sequence[str] = (),
    max_cores: int = 0,
    min_cores: int = 0,
) -> Cluster:
    """Connect to a remap server, or start an embedded local cluster when none is configured.

    ``address`` is ``HOST:PORT``; without it ``REMAP_SERVER`` (environment or ``env_file``)
    is used, and without that a server and a node with ``cores`` cores start inside this
    process. ``secret`` defaults to ``REMAP_SECRET_KEY``. ``group``, ``priority``,
    ``retries``, ``task_timeout`` (seconds one call may run), ``max_cores`` (at most this many
    cores at once; 0: no cap) and ``min_cores`` (served first until it has this many) apply to
    every job.
    ``task_output`` (default ``REMAP_TASK_OUTPUT``, on) prints what tasks print or log to
    this process's stderr, each line prefixed with its node and core.
    ``dashboard=True`` prints a login link to the dashboard (an embedded cluster serves one on
    loopback; a server must run with ``--http-port``) and keeps it in ``dashboard_url``.
    ``modules`` (module objects, names, ``FILE.py`` or package paths) travel with every job so
    nodes need no copy; ``files`` are copied into each job's directory on every node (read them
    with ``remap.job_file(NAME)``); nodes lacking a module named in ``requires`` are left out.

    ``address`` may also be ``dask://HOST:PORT``, ``dask://local``, ``ray://HOST:PORT`` or
    ``ray://local``: a :class:`remap.engines.EngineCluster` with ``map``, ``starmap``,
    ``imap_unordered`` and ``reduce`` on that engine (``cores``, ``retries``, ``task_timeout``).
    """
    if address is not None and address.startswith(("dask://", "ray://")):
        from .engines import EngineCluster

        return EngineCluster(  # type: ignore[return-value]
            address, cores=cores, retries=retries, task_timeout=task_timeout
        )
    cluster = Cluster(
        address,
        secret=secret,
        cores=cores,
        settings=settings,
        env_file=env_file,
        group=group,
        priority=priority,
        retries=retries,
        task_timeout=task_timeout,
        connect_timeout=connect_timeout,
        task_output=task_output,
        modules=modules,
        files=files,
        requires=requires,
        max_cores=max_cores,
        min_cores=min_cores,
    )
    if dashboard:
        try:
            cluster.open_dashboard()
        except BaseException:
            cluster.close()
            raise
    return cluster
