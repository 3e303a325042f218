"""``remap.Executor``: a concurrent.futures.Executor whose calls run on a remap cluster.

Submits are batched: calls of the same function share one streaming job while any of them
is outstanding (and for a linger after), so ten thousand small submits cost one job,
one function load per core, and batches sized by the server, not ten thousand round trips.
The few functions used last keep their job open for a minute of idleness, so the next call
of an interactive session finds it open (re-opening one costs a job, a function load per
core and ~1 ms on a server and node); any other idle job closes after half a second.
A future is *pending* while its call waits in this process and *running* once its argument
was handed to the server; only pending futures can be cancelled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import pickle
import queue
import threading
import time
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from . import api, runtime, taskoutput
from .api import _PLAIN_TYPES, SMALL_MAP_BYTES
from .blobs import PICKLE_PROTOCOL
from .calls import INITIALIZER_FAILED, Apply, Initialized, Initializer
from .errors import JobFailed

if TYPE_CHECKING:
    from .api import Cluster, JobStream, ResultIterator
    from .sinks import TaskErrorInfo

__all__ = ["Executor", "RemoteFuture"]

log = Logger()

#: seconds a function's job stays open after its last outstanding call, for the next submit...
LINGER = 0.5
#: ...or, for the ``KEEP_IDLE`` functions used last, this long: an interactive session calls
#: again seconds later, and a loop over fresh lambdas still holds only a few idle jobs open
IDLE_KEEP = 60.0
KEEP_IDLE = 4
#: a future's states, as ``concurrent.futures`` names them
_PENDING, _RUNNING, _FINISHED = (
    concurrent.futures._base.PENDING,
    concurrent.futures._base.RUNNING,
    concurrent.futures._base.FINISHED,
)
#: the clock idle times are read from (a test moves it)
_now = time.monotonic
_WAKE = ("wake",)
_SHUT_DOWN = "cannot schedule new futures after shutdown"

#: executors whose calls may still run; the interpreter's exit waits for them, as the stdlib's
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False


def _python_exit() -> None:
    """At interpreter exit (before atexit hooks, while daemon threads still run), let every
    live executor finish its outstanding calls, as ``concurrent.futures`` does; later
    submits raise RuntimeError."""
    global _exiting
    _exiting = True
    for executor in list(_live):
        executor.shutdown(wait=True)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


def _parts(fn: Callable[..., Any]) -> tuple[Any, ...]:
    """The objects a function's batching identity is made of (bound methods are made afresh
    on every access: their object and function)."""
    if isinstance(fn, types.MethodType):
        return (fn.__self__, fn.__func__)
    return (fn,)


def _key(fn: Callable[..., Any]) -> Hashable:
    """Identity of a function for batching: its id, or a bound method's object's and
    function's (see :func:`_parts`)."""
    if type(fn) is types.MethodType:
        return (id(fn.__self__), id(fn.__func__))
    return id(fn)


def _call_blob(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> bytes:
    """One call's pickle for a submit job; an error names ``what`` (``"argument 3"``) of ``fn``."""
    if not kwargs and _PLAIN_TYPES.issuperset(map(type, args)):
        return pickle.dumps((args, kwargs), PICKLE_PROTOCOL)  # plain scalars: pickle exactly
    return api.dumps_argument((args, kwargs), lambda: f"{what} of {api.describe(fn)}")


class _Calls:
    """A small map's calls in its executor's open job of their function (shared with submits
    and other small maps, not a job each), as one group (:meth:`Executor._put`): its future
    gets the results in order once every call ended, else the first error in argument order.
    Once the future is settled (or its caller gave up, :meth:`result`) the group's calls not
    yet sent are skipped and the outcomes of the others dropped: the job goes on for its
    other callers. ``waits``: a synchronous map's, whose caller waits next (running the loop
    itself, as for a submit's ``result()``) and whose results are settled as they are read
    (its future has no callbacks: no hop through the delivery thread)."""

    _claimed = False  # (withdrawn: see _SubmitStream.withdraw_pending)
    _stream: _SubmitStream | None = None  # (set by _SubmitStream.add)

    def __init__(self, executor: Executor, n: int, waits: bool) -> None:
        self.future = RemoteFuture()
        self.future.set_running_or_notify_cancel()
        self.executor, self.waits = executor, waits
        self.values: list[Any] = [None] * n
        self.errors: dict[int, BaseException] = {}
        #: calls sent (under the job's lock, in order: the next one's place)
        self.left, self.sent = n, 0
        #: outcomes come on the delivery thread and, for ``waits``, the loop's
        self.lock = threading.Lock()

    def settle(self, place: int, value: Any, error: BaseException | None) -> None:
        """One call's outcome (delivery thread; a result of ``waits``: the loop's)."""
        with self.lock:
            self.left -= 1
            if self.done():  # failed already, or its caller gave up: dropped
                return
            if error is not None:
                if self.executor._killed:  # killed, or no matter: the executor is gone
                    return self.set_exception(error)
                self.errors[place] = error
            else:
                self.values[place] = value
            if not self.left:
                if self.errors:
                    self.set_exception(self.errors[min(self.errors)])
                else:
                    self.future.set_result(self.values)

    def done(self) -> bool:
        # the state read as is, without the future's condition (two Python calls, asked
        # twice a call): it only ever moves on to settled
        state = self.future._state
        return state is not _RUNNING and state is not _PENDING

    def set_exception(self, error: BaseException) -> None:
        """Every call fails: ``error``, or, once the executor was killed, as a withdrawn one."""
        if self.executor._killed:
            error = concurrent.futures.CancelledError(self.executor._killed)
        self.values = []
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # settled meanwhile
            self.future.set_exception(error)

    def _withdraw(self) -> None:
        self.set_exception(concurrent.futures.CancelledError(self.executor._killed or _SHUT_DOWN))

    def result(self) -> list[Any]:
        """Wait for the results (a synchronous map). Interrupted (Ctrl-C), the calls not yet
        sent are skipped and the outcomes of the others dropped; the job is not killed."""
        self.future._stream = self._stream  # result() runs the loop itself while it waits
        try:
            values = self.future.result()
        except BaseException as exc:
            if not self.future.done():
                self.set_exception(concurrent.futures.CancelledError(f"interrupted: {exc!r}"))
            raise
        # what the calls printed came before their results (as a map's results iterator)
        taskoutput.printer.flush(api.OUTPUT_FLUSH_TIMEOUT)
        return values


def _call_blobs(star: bool, fn: Callable[..., Any], values: list[Any]) -> list[bytes] | None:
    """A small map's calls pickled for its executor's job of ``fn``; None once they pass
    ``SMALL_MAP_BYTES`` (the map gets a job of its own, whose arguments are pickled as they
    are sent, at most ``FEED_MAX_BYTES`` ahead)."""
    blobs: list[bytes] = []
    size = 0
    plain, dumps = _PLAIN_TYPES, pickle.dumps
    for k, value in enumerate(values):
        if not star and type(value) in plain:  # (_call_blob's, without a call to it)
            blob = dumps(((value,), {}), PICKLE_PROTOCOL)
        else:
            blob = _call_blob(fn, tuple(value) if star else (value,), {}, f"argument {k}")
        size += len(blob)
        if size > SMALL_MAP_BYTES:
            return None
        blobs.append(blob)
    return blobs


class RemoteFuture(concurrent.futures.Future):
    """A Future for a call on the cluster; cancellable while it still waits in this process."""

    def __init__(self) -> None:
        super().__init__()
        self._stream: _SubmitStream | None = None
        #: set (under the stream's lock) once the call was handed to the server or withdrawn
        self._claimed = False
        #: the reactor whose loop a thread in :meth:`result` runs to get this result
        self._driven: Any = None

    def result(self, timeout: float | None = None) -> Any:
        """The result; a thread waiting for it runs the reactor's loop itself while it waits
        (``runtime`` ``drive``: the answer is read on this thread, not handed over from the
        reactor's), unless another thread runs it already."""
        if self._state is _PENDING or self._state is _RUNNING:
            stream = self._stream
            r = stream.reactor if stream is not None else None
            # only the lean epoll reactor (Linux) lends its loop; elsewhere wait as usual
            if getattr(r, "drive", None) is not None and (timeout is None or timeout > 0):
                deadline = None if timeout is None else time.monotonic() + timeout
                self._driven = r
                try:
                    drove = r.drive(self._left_waiting, deadline)
                finally:
                    self._driven = None
                if not drove:
                    try:
                        return super().result(timeout)
                    finally:
                        r.unwant()
                if self._state is _FINISHED and self._exception is None:
                    return self._result  # what Future.result returns, without its condition
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
        return super().result(timeout)

    def _left_waiting(self) -> bool:
        state = self._state
        return state is not _PENDING and state is not _RUNNING

    def _wake_driver(self) -> None:
        r = self._driven
        if r is not None:  # set on another thread (the delivery thread): the loop must see it
            r.wakeUp()

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._wake_driver()

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._wake_driver()

    def cancel(self) -> bool:
        stream = self._stream
        if stream is not None:
            with stream.job.lock:
                if self._claimed:
                    return self.cancelled()
                self._claimed = True  # the reactor will skip it; nobody else touches its state
        return self._withdraw()

    def _withdraw(self) -> bool:
        if not concurrent.futures.Future.cancel(self):
            return False
        # wake wait() / as_completed() now rather than when the item would have been sent
        self.set_running_or_notify_cancel()
        self._wake_driver()
        return True


def _notify(condition: threading.Condition) -> None:
    """``notify_all`` from outside the condition: wake the threads in ``result()``.

    Holds the condition's own lock (a C lock) rather than entering the condition, whose
    ``__enter__``/``__exit__`` and ``notify_all`` are Python functions."""
    with condition._lock:  # type: ignore[attr-defined]
        condition.notify(len(condition._waiters))  # type: ignore[attr-defined]


class _SubmitStream:
    """The open job of one function: pickled calls in, futures resolved as results come back."""

    def __init__(
        self, executor: Executor, fn: Callable[..., Any], key: Hashable, chunksize: int | None
    ) -> None:
        self.executor = executor
        self.fn: Callable[..., Any] | None = fn  # keeps id(fn) from being reused while open
        #: while kept open idle: the function's parts, held weakly (see ``loosen``)
        self.weak: tuple[weakref.ref[Any], ...] | None = None
        self.key = key
        self.futures: dict[int, RemoteFuture] = {}
        self.outstanding = 0  # calls put and neither resolved nor dropped (under job.lock)
        self.idle_since: float | None = None
        name = api.describe(fn)
        blob = api.function_blob(Apply(fn, executor._initializer), name=name)
        cluster = executor._cluster
        #: where the reactor wakes waiters once its turn is over (None: at once; embedded, the
        #: same turn runs the server and the node too, so the waiter is woken at once, and a
        #: call is sent in that turn: no call leaves from the calling thread)
        self.wake_later = None if cluster.embedded else runtime.before_sleep(cluster._reactor)
        #: the reactor a thread waiting in ``result()`` drives itself, if it lends its loop
        self.reactor = cluster._reactor
        params = cluster._params(f"submit:{name}", chunksize=chunksize)
        self.job: JobStream = cluster._stream(
            blob,
            params,
            events=executor._events,
            on_send=self._on_send,
            on_items=self._resolve_now,
            on_result=self._resolve_one,
            owner=self,
        )

    def add(self, blobs: list[bytes], futures: list[RemoteFuture], waits: bool = False) -> None:
        for future in futures:
            future._stream = self
        with self.job.lock:
            self.outstanding += len(futures)
            self.idle_since = None
            lone = self.outstanding == 1
            alone = self.outstanding == len(futures)
        # a lone call to a server leaves from this thread (no hop through the reactor); calls
        # that come while others are out go through the reactor, many to a message. A lone
        # call's caller is likely to wait for it next, running the loop itself if it keeps it
        # (drive): the reactor's thread is not woken to send it; so is a synchronous map's
        # (``waits``), whose calls leave from this thread when nothing else is out
        if lone and self.wake_later is not None:
            self.job.put_one(blobs[0], futures[0])
        elif waits and alone:
            self.job.put_many(blobs, futures, now=self.wake_later is not None, waits=True)
        else:
            self.job.put_many(blobs, futures, waits=lone)

    def _on_send(self, index: int, future: RemoteFuture) -> bool:
        # under job.lock, on the reactor thread or the submitting one (a lone call)
        if type(future) is not RemoteFuture:  # a call of a group: sent in order, its place next
            place = future.sent
            future.sent = place + 1
            if future.done():  # the group failed or was given up: not sent
                self._settled()
                return False
            self.futures[index] = (future, place)
            return True
        if not future._claimed and future._state == _PENDING:
            # what set_running_or_notify_cancel does for a pending future, without taking its
            # condition (three Python calls an argument): nothing else changes the state of an
            # unclaimed future (cancel claims it first, under this lock) and RUNNING wakes nobody
            future._state = _RUNNING
        elif future._claimed or not future.set_running_or_notify_cancel():
            future._claimed = True
            self._settled()
            return False
        future._claimed = True
        self.futures[index] = future
        return True

    def _settled(self) -> None:
        # under job.lock
        self.outstanding -= 1
        if self.outstanding == 0:
            self.idle_since = _now()

    def _resolve_now(self, batch: list[Any]) -> list[Any]:
        """Reactor thread: set the results of futures that have no done-callback at once (a
        waiting caller wakes without a hop through the delivery thread); return the rest.

        Callbacks are user code and may block, so a future with one (or an error to rebuild)
        still goes through the delivery thread.
        """
        resolve = self._resolve_one
        return [item for item in batch if item[2] is not None or not resolve(item[0], item[1])]

    def _resolve_one(self, index: int, result: Any) -> bool:
        """Reactor thread: set one call's result if its future has no done-callback (see
        :meth:`_resolve_now`); False if the delivery thread must. A lone call's answer comes
        here straight from the decoded message (``JobStream``'s ``on_result``).

        Holding the future's condition while looking keeps a callback from being added
        between the look and the result.
        """
        future = self.futures.get(index)
        if type(future) is not RemoteFuture:  # none, or a group's call
            if type(future) is not tuple or not future[0].waits:
                return False  # (a map_async's: its callbacks run on the delivery thread)
            del self.futures[index]
            future[0].settle(future[1], result, None)
            with self.job.lock:
                self._settled()
            return True
        # Future.set_result's work, under the one hold that looked (the condition's own
        # lock: see _notify)
        with future._condition._lock:  # type: ignore[attr-defined]
            if future._done_callbacks or future._state != _RUNNING:
                return False
            del self.futures[index]
            future._result = result
            future._state = _FINISHED
            # wait()/as_completed() waiters hear of it with the state, as set_result
            # does (one that saw FINISHED must never get the future again)
            for waiter in future._waiters:
                waiter.add_result(future)
            condition = future._condition
            if not condition._waiters:  # type: ignore[attr-defined]
                pass  # nobody waits in result(): the caller running the loop, or none yet
            elif self.wake_later is None:
                condition.notify(len(condition._waiters))  # type: ignore[attr-defined]
            else:  # a thread in result() wakes as the reactor sleeps: the GIL is free
                self.wake_later.append(functools.partial(_notify, condition))
        with self.job.lock:
            self._settled()
        return True

    def resolve(self, index: int, result: Any, error: TaskErrorInfo | None) -> None:
        future = self.futures.pop(index, None)
        if future is None:
            return
        failure = None if error is None else self.executor._broken_by(api.remote_exception(error))
        if type(future) is tuple:
            future[0].settle(future[1], result, failure)
        elif failure is None:
            future.set_result(result)
        else:
            future.set_exception(failure)
        with self.job.lock:
            self._settled()

    def loosen(self) -> bool:
        """Hold the function only weakly while the job is kept open idle, so that the job
        never keeps the caller's objects (a bound method's instance, a closure's cells) alive;
        False if that cannot be done (then the job must close)."""
        if self.fn is not None:
            try:
                self.weak = tuple(weakref.ref(part) for part in _parts(self.fn))
            except TypeError:  # not weakly referable: closing is the only way to let go
                return False
            self.fn = None
        return self.weak is not None and all(ref() is not None for ref in self.weak)

    def take_back(self, fn: Callable[..., Any]) -> bool:
        """Hold ``fn`` again for a new call, if this job was opened for that very function
        (its parts are the objects held weakly, not others that reused their ids)."""
        if self.fn is not None:
            return True
        parts = _parts(fn)
        if self.weak is None or any(r() is not p for r, p in zip(self.weak, parts, strict=True)):
            return False
        self.fn, self.weak = fn, None
        return True

    def idle_for(self, now: float) -> float:
        with self.job.lock:
            if self.outstanding or self.idle_since is None:
                return 0.0
            return now - self.idle_since

    def withdraw_pending(self) -> list[RemoteFuture]:
        """Take the calls not yet handed to the server out of the job; return their futures.

        Futures already cancelled are dropped too but not returned: they are settled.
        """
        fresh: list[RemoteFuture] = []

        def claim(future: RemoteFuture) -> None:
            self._settled()
            if not future._claimed:
                future._claimed = True
                fresh.append(future)

        self.job.withdraw(claim)
        return fresh

    def fail_all(self, error: BaseException) -> None:
        """The job ended before these calls came back: each future gets ``error``."""
        running = list(self.futures.values())
        self.futures.clear()
        for future in running + self.withdraw_pending():
            if type(future) is tuple:
                future = future[0]  # a group's call: the group fails as a whole
            if not future.done():
                future.set_exception(error)


class Executor(concurrent.futures.Executor):
    """Run calls on a remap cluster through the standard ``concurrent.futures`` interface.

    ``Executor()`` connects like :func:`remap.connect` (an embedded local cluster when no
    server is configured; ``max_workers``, or a lone integer as in ``Executor(4)``, is then
    its number of cores) and closes that connection at shutdown. ``Executor(cluster=handle)``
    borrows an open handle instead. ``initializer(*initargs)``, as in ``ProcessPoolExecutor``,
    runs once in each core process before the first of this executor's calls that lands there
    (cores are long-lived and shared, so "once per core per executor"); if it raises, the call
    that needed it fails with that exception.
    """

    def __init__(
        self,
        address: str | int | None = None,
        max_workers: int | None = None,
        *,
        cluster: Cluster | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: Any = None,
        max_tasks_per_child: int | None = None,
        **connect_kwargs: Any,
    ) -> None:
        # ProcessPoolExecutor's own arguments, refused plainly (None, their default, passes)
        if max_tasks_per_child is not None:
            raise NotImplementedError(
                "remap.Executor has no max_tasks_per_child: cores are long-lived "
                "and replaced only when they crash or time out"
            )
        if mp_context is not None:
            raise NotImplementedError(
                "remap.Executor has no mp_context: cores are started by their node"
            )
        if isinstance(address, int) and not isinstance(address, bool) and max_workers is None:
            address, max_workers = None, address  # Executor(4), as with ProcessPoolExecutor(4)
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        #: run once per core process before the first call of this executor that lands there
        self._initializer = Initializer(initializer, initargs) if initializer is not None else None
        self._cluster, self._owns_cluster = api.own_or_borrow(
            address, cluster, max_workers, connect_kwargs, "remap.Executor"
        )
        self._lock = threading.Lock()
        self._streams: dict[Hashable, _SubmitStream] = {}
        self._open: set[_SubmitStream] = set()
        self._maps: weakref.WeakSet[ResultIterator] = weakref.WeakSet()
        #: owners of other jobs whose events this thread delivers (:meth:`_adopt`)
        self._owners: set[Any] = set()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False
        #: why the executor is broken (an initializer raised), as ProcessPoolExecutor._broken
        self._broken: str | bool = False
        #: False for a Pool's executor: multiprocessing has no broken state, the call just fails
        self._breaks = True
        #: why a small map's calls raise CancelledError once killed (``_terminate``'s ``why``)
        self._killed: str | None = None
        #: calls of a submit job per server batch (None: adaptive); joblib's backend sets 1
        self._submit_chunksize: int | None = None
        self._thread = threading.Thread(target=self._deliver, name="remap-executor", daemon=True)
        self._thread.start()
        _live.add(self)

    @property
    def cluster(self) -> Cluster:
        return self._cluster

    # ------------------------------------------------------------ submitting

    def _check_accepting(self) -> None:
        if self._broken:  # no job, no initializer run again on every core
            raise concurrent.futures.BrokenExecutor(self._broken)
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError(_SHUT_DOWN)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RemoteFuture:
        """Schedule ``fn(*args, **kwargs)``; an unpicklable function or argument raises here."""
        self._check_accepting()
        future = RemoteFuture()
        self._put(fn, [_call_blob(fn, args, kwargs, "the arguments")], [future])
        return future

    def _put(
        self, fn: Callable[..., Any], blobs: list[bytes], futures: list[Any], waits: bool = False
    ) -> None:
        """Queue calls of ``fn`` (:func:`_call_blob`) in its open job, or a new one, each
        settling its future; or a group's calls, the group (``remap.Pool``'s ``_Calls``) for
        each: its ``sent`` counts the calls sent (the next one's place), it settles each
        (``settle(place, result, error)``) and fails as a whole (``done()``,
        ``set_exception``, ``_withdraw``, ``_claimed``: what the stream asks of a future)."""
        key = _key(fn)
        with self._lock:
            if self._shutdown:
                raise RuntimeError(_SHUT_DOWN)
            self._cluster._check_open()
            stream = self._streams.get(key)
            if stream is not None and not stream.take_back(fn):
                del self._streams[key]  # its function is gone and the id reused: a new job
                stream.job.close_input()
                stream = None
            if stream is None:
                stream = _SubmitStream(self, fn, key, self._submit_chunksize)
                self._streams[key] = stream
                self._open.add(stream)
                # the delivery thread may be waiting with no timeout (nothing was open): it
                # must start counting this job's idle time, or the job (and the function,
                # with whatever it holds) would stay until some other event came
                self._events.put(_WAKE)
            stream.add(blobs, futures, waits)

    def _small_map(
        self, fn: Callable[..., Any], values: Iterable[Any], star: bool, waits: bool
    ) -> _Calls | None:
        """A map of at most SMALL_MAP arguments of known length, SMALL_MAP_BYTES pickled, put
        as one group of calls in ``fn``'s open job (:class:`_Calls`; ``waits``: a synchronous
        map's); None for another (it gets a job of its own). Not from the delivery thread (a
        pool callback): the calls' outcomes come on that thread, so a synchronous map there
        would wait for itself."""
        if self._shutdown or threading.current_thread() is self._thread or not api.is_small(values):
            return None
        values = list(values)
        blobs = _call_blobs(star, fn, values)
        if blobs is None:
            return None
        calls = _Calls(self, len(blobs), waits)
        self._put(fn, blobs, [calls] * len(blobs), waits)
        return calls

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``, as one streaming job.

        The iterables are collected at once (unless ``buffersize`` bounds how far ahead of
        the consumer they are read); results come in order; ``timeout`` counts from this
        call; ``chunksize`` fixes the server's batch size (default: adaptive).
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        self._check_accepting()
        sized = iterables and all(isinstance(it, Sized) for it in iterables)
        results = self._cluster._iterate(
            Initialized(fn, self._initializer) if self._initializer is not None else fn,
            zip(*iterables),
            total=min(map(len, iterables)) if sized else None,  # type: ignore[arg-type]
            star=True,
            ordered=True,
            chunksize=chunksize,
            buffersize=buffersize,
            kind="map",
            deadline=deadline,
            style=api.MapStyle(wrap_error=self._broken_by),
        )
        with self._lock:
            self._maps.add(results)
        return results

    def _broken_by(self, exc: BaseException) -> BaseException:
        """An initializer that raised breaks the executor, as in ProcessPoolExecutor: the call
        fails with ``BrokenExecutor`` (the initializer's exception as its cause), the failure
        is logged on ``concurrent.futures``'s logger and later submits raise ``BrokenExecutor``."""
        if not self._breaks or not getattr(exc, INITIALIZER_FAILED, False):
            return exc
        with self._lock:
            first = not self._broken
            if first:
                self._broken = (
                    "a core's initializer raised "
                    f"{type(exc).__name__}: {exc}; the executor can no longer be used"
                )
        if first:
            import logging

            cause = exc.__cause__
            logging.getLogger("concurrent.futures").critical(
                "Exception in initializer:\n%s", getattr(cause, "remote_traceback", "") or exc
            )
        broken = concurrent.futures.BrokenExecutor(self._broken)
        broken.__cause__ = exc
        return broken

    def _adopt(self, owner: Any) -> queue.SimpleQueue:
        """Deliver the events of a job started with this queue and ``owner`` on this thread:
        ``owner.deliver(event)`` returns True once it wants no more (``remap.Pool.map_async``,
        whose callbacks run here, not on a thread of their own); shutdown waits for it."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError(_SHUT_DOWN)
            self._owners.add(owner)
        return self._events

    def _disown(self, owner: Any) -> None:
        """``owner`` takes no more events (its job never started, or it is done)."""
        with self._lock:
            self._owners.discard(owner)
        self._events.put(_WAKE)

    # ------------------------------------------------------------ shutting down

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with ``cancel_futures`` the calls not yet sent are cancelled.

        ``wait=True`` returns once every outstanding call finished (and, for an executor
        that made its own connection, once that connection and its cluster are closed).
        """
        self._stop(cancel_futures, kill=False)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()  # it waits for the map jobs and closes an owned cluster

    def _terminate(self, why: str | None = None) -> None:
        """Cancel everything, running calls included (their futures get JobKilled); a job with
        no call outstanding (one kept open for the next submit) is closed instead. ``why``:
        every small map's calls then raise CancelledError(why) (``remap.Pool``)."""
        self._killed = why
        self._stop(cancel=True, kill=True)

    def _stop(self, cancel: bool, kill: bool) -> None:
        with self._lock:
            self._shutdown = True
            # killing reaches the jobs no longer taking submits too, not only the reusable ones
            streams = list(self._open if kill else self._streams.values())
            self._streams.clear()
            maps = list(self._maps)
        withdrawn: list[RemoteFuture] = []
        for stream in streams:
            if cancel:
                withdrawn += stream.withdraw_pending()
            with stream.job.lock:
                idle = stream.outstanding == 0
            if kill and not idle:
                stream.job.kill()
            else:  # a lingering job with nothing running ends as done, not killed
                stream.job.close_input()
        for future in withdrawn:
            future._withdraw()
        if cancel:
            for results in maps:
                results.cancel()
        self._events.put(_WAKE)

    # ------------------------------------------------------------ delivery thread

    def _deliver(self) -> None:
        """Resolve futures off the reactor thread, so done-callbacks never block the network."""
        events = self._events
        while True:
            try:
                event = events.get(timeout=LINGER / 2 if self._open else None)
            except queue.Empty:
                event = None
            if event is not None and event is not _WAKE:
                try:
                    self._handle(event)
                except Exception:  # a bug here must not strand every later future
                    log.failure("delivering results failed")
                event = None  # waiting for the next one must not keep this job (and its fn) alive
            self._reap_idle()
            with self._lock:
                if self._shutdown and not self._open and not self._owners:
                    break
        self._finish()

    def _finish(self) -> None:
        """After shutdown: wait for map jobs that have all their input, then close what we own."""
        with self._lock:
            maps = list(self._maps)
        for results in maps:
            if results.input_read:  # a lazy map still reading its iterable is not waited for
                results.wait_finished()
        with self._lock:
            owns, self._owns_cluster = self._owns_cluster, False
        if owns:
            self._cluster.close()
        _live.discard(self)

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind, job = event[0], event[1]
        stream = job.owner
        if not isinstance(stream, _SubmitStream):  # an adopted job's (see _adopt)
            if stream.deliver(event):
                with self._lock:
                    self._owners.discard(stream)
            return
        if kind == "items":
            for index, result, error in event[2]:
                stream.resolve(index, result, error)
        elif kind == "end":
            self._ended(stream, event[2])

    def _ended(self, stream: _SubmitStream, error: BaseException | None) -> None:
        with self._lock:
            if self._streams.get(stream.key) is stream:
                del self._streams[stream.key]
            self._open.discard(stream)
        stream.fail_all(error or JobFailed("the job ended before this call's result arrived"))
        stream.fn = stream.weak = None  # the job and stream form a cycle: drop the function now

    def _reap_idle(self) -> None:
        """End the job of a function nobody submitted to for a while: ``IDLE_KEEP`` seconds
        for the ``KEEP_IDLE`` idle the shortest, ``LINGER`` for the others. A job kept past
        ``LINGER`` holds its function weakly and ends as soon as the function is gone."""
        now = _now()
        with self._lock:
            idle = sorted(
                ((stream.idle_for(now), key, stream) for key, stream in self._streams.items()),
                key=lambda entry: entry[0],
            )
            idle = [entry for entry in idle if entry[0] > 0.0]  # 0: calls outstanding
            for rank, (seconds, key, stream) in enumerate(idle):
                if seconds < LINGER:
                    continue
                if seconds >= IDLE_KEEP or rank >= KEEP_IDLE or not stream.loosen():
                    del self._streams[key]
                    stream.job.close_input()

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<remap.Executor {state} on {self._cluster!r}>"
