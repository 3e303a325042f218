"""``remap.Pool``: the ``multiprocessing.Pool`` methods people use, running on a remap cluster."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.pool import MaybeEncodingError
from typing import Any

from .api import (
    MAP_CALLS,
    SMALL_MAP,
    SMALL_MAP_BYTES,
    Cluster,
    MapStyle,
    RemoteTaskError,
    ResultIterator,
    own_or_borrow,
)
from .calls import RESULT_REPR, UNPICKLABLE_RESULT
from .executor import Executor

__all__ = ["AsyncResult", "Pool", "SMALL_MAP", "SMALL_MAP_BYTES"]

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"
#: what a result of a terminated pool that never came raises (a CancelledError)
_TERMINATED = "the pool was terminated before this result came"


class AsyncResult:
    """The result of ``apply_async`` / ``map_async``, like ``multiprocessing.pool.AsyncResult``.

    ``callback`` / ``error_callback`` run (on the pool's one delivery thread, ``map_async``'s
    too) before ``get()`` returns, as in multiprocessing; they must not block. One that raises
    is logged and the result is still ready (multiprocessing's result thread dies there, and
    every later ``get()`` hangs).
    """

    def __init__(
        self,
        future: concurrent.futures.Future,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> None:
        self._future = future
        self._callback = callback
        self._error_callback = error_callback
        self._error: BaseException | None = None
        self._event = threading.Event()
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future) -> None:
        try:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                error = self._error = _encoding_error(error)
            if error is None and self._callback is not None:
                self._callback(future.result())
            elif error is not None and self._error_callback is not None:
                self._error_callback(error)
        finally:
            self._event.set()

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return not self._future.cancelled() and self._future.exception() is None

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result, or the remote exception raised again; multiprocessing.TimeoutError if late."""
        if not self._event.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        if self._future.cancelled():  # terminate() withdrew it before it left
            raise concurrent.futures.CancelledError(_TERMINATED)
        return self._future.result()


def _encoding_error(exc: BaseException) -> BaseException:
    """A result that could not be pickled on its core raises ``MaybeEncodingError`` from a
    Pool, as multiprocessing's does (its ``exc`` and ``value`` are reprs, as there)."""
    cause = exc.__cause__
    if not (
        isinstance(cause, RemoteTaskError) and cause.message.startswith(UNPICKLABLE_RESULT)
    ) or isinstance(exc, MaybeEncodingError):
        return exc
    wrapped = MaybeEncodingError(exc, None)
    wrapped.value = getattr(exc, RESULT_REPR, "<a result of unknown type>")
    wrapped.args = (wrapped.exc, wrapped.value)
    wrapped.__cause__ = cause
    return wrapped


class _Gathered:
    """Results in argument order past remote errors, as multiprocessing's map gathers them: a
    failed call's place holds None, and the first failure is kept to be raised at the end."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.first: Exception | None = None

    def take(self, results: ResultIterator, step: Callable[[list[Any]], Any]) -> Any:
        """``step(self.values)`` (``results.rest`` or ``rest_ready``), past every remote error."""
        while True:
            try:
                return step(self.values)
            except Exception as exc:  # a remote error: remember it and let the others finish
                if results.cancelled:  # the pool was terminated: no others will come
                    raise
                self.first = self.first or exc
                self.values.append(None)


def _all_then_first_error(results: ResultIterator) -> list[Any]:
    """Every result in order; if calls failed, raise the first failure once all have ended."""
    gathered = _Gathered()
    with results:
        gathered.take(results, results.rest)
    if gathered.first is not None:
        raise gathered.first
    return gathered.values


class _AsyncMap(_Gathered):
    """A ``map_async``'s results gathered as :func:`_all_then_first_error` does, on the pool's
    delivery thread as their events come (``Executor._adopt``), not on a thread per call."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        super().__init__()
        self.future = future
        self.results: ResultIterator | None = None
        #: events that came before the iterator was attached
        self.early: list[tuple[Any, ...]] = []

    def deliver(self, event: tuple[Any, ...]) -> bool:
        """Delivery thread: one event of the job (or ``("attach", self, iterator)``, queued
        once the iterator exists); True once the future is settled."""
        if self.future.done():  # what comes after it (its job's end) is not needed
            return True
        if event[0] == "attach":
            self.results = event[2]
            events, self.early = self.early, []
        elif self.results is None:
            self.early.append(event)
            return False
        else:
            events = [event]
        results = self.results
        try:
            for each in events:
                results.absorb(each)
            if not self.take(results, results.rest_ready):
                return False
        except BaseException as exc:  # noqa: BLE001 - delivered through the AsyncResult
            results.close()
            self.future.set_exception(exc)
            return True
        results.close()
        if self.first is not None:
            self.future.set_exception(self.first)
        else:
            self.future.set_result(self.values)
        return True


#: multiprocessing's map family: every call runs to its end, errors where they happen
_POOL_MAPS = MapStyle(
    kind="pool",
    gather=_all_then_first_error,
    stop_on_error=False,
    timeout_error=multiprocessing.TimeoutError,
    defer_errors=True,
    wrap_error=_encoding_error,
)

ApplyResult = AsyncResult
MapResult = AsyncResult


class Pool:
    """``multiprocessing.Pool`` on a cluster: map, imap, imap_unordered, starmap, apply, ...

    ``Pool()`` connects like :func:`remap.connect` (an embedded local cluster with
    ``processes`` cores when no server is configured) and closes the connection when the
    pool is terminated or joined; ``Pool(cluster=handle)`` borrows an open handle. As in
    multiprocessing, leaving the ``with`` block calls :meth:`terminate`. ``initializer(*initargs)``
    runs once in each core process before the first of this pool's calls that lands there.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        address: str | None = None,
        cluster: Cluster | None = None,
        **connect_kwargs: Any,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            raise NotImplementedError(
                "remap.Pool has no maxtasksperchild: cores are long-lived "
                "and replaced only when they crash or time out"
            )
        self._cluster, self._owns_cluster = own_or_borrow(
            address, cluster, processes, connect_kwargs, "remap.Pool"
        )
        self._executor = Executor(
            cluster=self._cluster,
            initializer=initializer,
            initargs=tuple(initargs),
        )
        self._executor._breaks = False
        #: as in multiprocessing: runs once in each core process, before its first call of this
        #: pool (shared by map and apply, so it never runs twice in one core for one pool)
        self._initializer = self._executor._initializer
        self._state = _RUN
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future] = set()
        self._iterators: weakref.WeakSet[ResultIterator] = weakref.WeakSet()

    @property
    def cluster(self) -> Cluster:
        return self._cluster

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _track(self, future: concurrent.futures.Future) -> concurrent.futures.Future:
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)
        return future

    def _untrack(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _map(
        self,
        method: str,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        buffersize: int | None = None,
        collect: bool = True,
        events: Any = None,
        owner: Any = None,
    ) -> Any:
        """The cluster's one map implementation in multiprocessing's style (:data:`_POOL_MAPS`),
        each call after this pool's initializer (a small map as calls in this pool's executor's
        job); iterators are closed by :meth:`terminate`."""
        self._check_running()
        return self._cluster._map(
            method,
            func,
            iterable,
            chunksize=chunksize,
            buffersize=buffersize,
            style=_POOL_MAPS,
            opened=self._iterators.add,
            collect=collect,
            events=events,
            owner=owner,
            executor=self._executor,
        )

    # ------------------------------------------------------------ one call

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        """``func(*args, **kwds)`` on the cluster, waiting for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        self._check_running()
        future = self._executor.submit(func, *tuple(args), **(kwds or {}))
        return AsyncResult(self._track(future), callback, error_callback)

    # ------------------------------------------------------------ many calls

    def map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """``[func(x) for x in iterable]``; as in multiprocessing, every call runs to its end,
        then the first remote error (in argument order) is raised."""
        return self._map("map", func, iterable, chunksize)

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        """``[func(*args) for args in iterable]``, with :meth:`map`'s error semantics."""
        return self._map("starmap", func, iterable, chunksize)

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        return self._map_async("map", func, iterable, chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        return self._map_async("starmap", func, iterable, chunksize, callback, error_callback)

    def _map_async(
        self,
        method: str,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[Any], Any] | None,
        error_callback: Callable[[BaseException], Any] | None,
    ) -> AsyncResult:
        # The iterable is read here, on the caller's thread (as multiprocessing does); the
        # results are gathered on the pool's delivery thread as they come (no thread per call)
        self._check_running()
        values = list(iterable)
        try:
            calls = self._executor._small_map(func, values, MAP_CALLS[method].star, False)
        except RuntimeError:
            if self._state != _RUN:  # terminated meanwhile
                raise ValueError("Pool not running") from None
            raise
        if calls is not None:
            return AsyncResult(self._track(calls.future), callback, error_callback)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        gather = _AsyncMap(future)
        executor = self._executor
        try:
            events = executor._adopt(gather)
        except RuntimeError:  # terminated meanwhile
            raise ValueError("Pool not running") from None
        try:
            results = self._map(
                method, func, values, chunksize, collect=False, events=events, owner=gather
            )
        except BaseException:
            executor._disown(gather)
            raise
        result = AsyncResult(self._track(future), callback, error_callback)
        events.put(("attach", results._stream, results))  # the delivery thread takes it on
        return result

    def imap(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        buffersize: int | None = None,
    ) -> ResultIterator:
        """Lazy ordered results; ``next(timeout)`` works; a remote error is raised at its place
        and iteration may go on."""
        return self._map("imap", func, iterable, chunksize, buffersize)

    def imap_unordered(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        buffersize: int | None = None,
    ) -> ResultIterator:
        """Like :meth:`imap`, in completion order."""
        return self._map("imap_unordered", func, iterable, chunksize, buffersize)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Accept no more work; :meth:`join` then waits for what was submitted."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self) -> None:
        """Stop now: running and queued work is killed, outstanding results fail."""
        with self._lock:
            if self._state == _TERMINATE:
                return
            self._state = _TERMINATE
        for results in list(self._iterators):
            # a job still running is killed and its iterator says so (it ended as if every
            # result had come); the results of a finished job stay readable, as in
            # multiprocessing
            if not results.finished:
                results.cancel(_TERMINATED)
        self._executor._terminate(_TERMINATED)
        self._executor.shutdown(wait=True)
        self._release_cluster()

    def join(self) -> None:
        """Wait for every ``apply_async`` / ``map_async`` result; call close() or terminate() first."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)
        if self._state == _CLOSE:
            # as multiprocessing, join waits for imap's calls too (before closing the pool's own
            # cluster under them); one still reading a long iterable on its consumer's thread
            # can never end here and is not waited for
            for results in list(self._iterators):
                if results.input_read:
                    results.wait_finished()
            self._executor.shutdown(wait=True)
            self._release_cluster()

    def _release_cluster(self) -> None:
        if self._owns_cluster:
            self._owns_cluster = False
            self._cluster.close()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # as multiprocessing.Pool: a pool dropped while running is a leak worth a warning; its
        # own embedded cluster (and so its cores) is closed rather than left running until exit
        if getattr(self, "_state", None) == _RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            with contextlib.suppress(Exception):  # interpreter shutdown: cores die with pipes
                self._release_cluster()

    def __repr__(self) -> str:
        return f"<remap.Pool state={self._state} cluster={self._cluster!r}>"
