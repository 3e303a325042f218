"""The console's connection to a server: requests by id, and job runs with windowed arguments."""

from __future__ import annotations

import itertools
import pickle
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
from twisted.internet import defer
from twisted.logger import Logger

from protocol import DEFAULT_MAX_FRAME, Authenticated
from protocol import messages as m
from protocol.options import JobOptions

from .blobs import PICKLE_PROTOCOL, dumps, split
from .errors import (
    AuthError,
    ConnectionLost,
    JobFailed,
    JobKilled,
    JobRefused,
    OutputError,
    ProtocolError,
    RemapError,
    RemoteProtocolError,
    VersionMismatch,
    error_from_wire,
)
from .sinks import Sink, TaskErrorInfo, os_reason
from .wire import PeerProtocol

#: arguments per ``args`` message, and the payload size at which a message is sent early
CHUNK_ARGS = 4096
CHUNK_BYTES = 4 * 1024 * 1024
#: bytes of an ``args`` frame that are not arguments: prefix, header, a size per argument
ARGS_OVERHEAD = 1024
#: pickled arguments a reader thread keeps ready ahead of the server's window
READ_AHEAD_BYTES = 64 * 1024 * 1024
READ_AHEAD_ITEMS = 2 * CHUNK_ARGS


log = Logger()


class ArgumentTooLarge(JobFailed):
    """One pickled argument does not fit in a frame: no peer would accept it."""

    def __init__(self, index: int, size: int, room: int) -> None:
        super().__init__(
            f"argument {index} is {size:,} bytes pickled, over the {room:,} bytes an argument "
            f"may have in one message (REMAP_MAX_FRAME): pass a file name or a smaller piece"
        )
        self.index = index
        self.size = size


class PulledArguments:
    """Arguments pulled and pickled on the reactor thread as the window opens.

    Only for sources that never block and hold small values (a list, a range, tests on a
    fake clock): anything read from a file or pipe goes through :class:`ThreadedArguments`.
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self._keep = False
        self._exhausted = False
        #: pickled but not yet sent (read ahead, or they did not fit in the last message)
        self._ready: deque[tuple[bytes, Any]] = deque()

    def start(self, wake: Callable[[], None], *, keep_items: bool) -> None:
        self._keep = keep_items

    def take(self, limit: int, room: int) -> tuple[list[bytes], list[Any] | None, bool]:
        ready = self._ready
        if not self._exhausted and len(ready) <= limit:  # one more: the end is known in time
            want = limit + 1 - len(ready)
            for value in itertools.islice(self.source, want):
                ready.append((dumps(value), value if self._keep else None))
                want -= 1
            self._exhausted = want > 0
        blobs, items = _pop_chunk(ready, limit, room, self._keep)
        return blobs, items, self._exhausted and not ready

    def stop(self) -> None:
        self._ready.clear()


class ThreadedArguments:
    """Reads and pickles a job's arguments on a thread of its own, ahead of the window.

    The reactor only takes what is ready, so a FIFO with no writer, a pipe giving a line a
    second, or a huge line never stops heartbeats and results. At most ``max_bytes`` (or
    ``max_items``) of pickled arguments wait here, plus the one being read.
    """

    def __init__(
        self,
        reactor: Any,
        source: Iterator[Any],
        *,
        max_bytes: int = READ_AHEAD_BYTES,
        max_items: int = READ_AHEAD_ITEMS,
    ) -> None:
        self.reactor = reactor
        self.source = source
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._cond = threading.Condition()
        self._ready: deque[tuple[bytes, Any]] = deque()
        self._bytes = 0
        self._ended = False
        self._error: BaseException | None = None
        self._stopped = False
        self._wake_pending = False
        self._wake: Callable[[], None] = lambda: None
        self._keep = False
        self.thread: threading.Thread | None = None

    def start(self, wake: Callable[[], None], *, keep_items: bool) -> None:
        self._wake = wake
        self._keep = keep_items
        self.thread = threading.Thread(target=self._read, name="remap-arguments", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        """The reader thread: pull, pickle, queue; wait while the queue is full."""
        try:
            for value in self.source:
                blob = dumps(value)
                with self._cond:
                    while not self._stopped and (
                        self._bytes >= self.max_bytes or len(self._ready) >= self.max_items
                    ):
                        self._cond.wait()
                    if self._stopped:
                        return
                    self._ready.append((blob, value if self._keep else None))
                    self._bytes += len(blob)
                    self._wake_soon()
        except BaseException as exc:  # reported in order, after the arguments before it
            with self._cond:
                self._error = exc
                self._wake_soon()
            return
        with self._cond:
            self._ended = True
            self._wake_soon()

    def _wake_soon(self) -> None:
        # with the lock held; one reactor call per burst of arguments, not one per argument
        if not self._wake_pending and not self._stopped:
            self._wake_pending = True
            self.reactor.callFromThread(self._woken)

    def _woken(self) -> None:
        with self._cond:
            self._wake_pending = False
        self._wake()

    def take(self, limit: int, room: int) -> tuple[list[bytes], list[Any] | None, bool]:
        with self._cond:
            if self._error is not None and not self._ready:
                raise self._error
            blobs, items = _pop_chunk(self._ready, limit, room, self._keep)
            if blobs:
                self._bytes -= sum(len(b) for b in blobs)
                self._cond.notify()
            return blobs, items, self._ended and not self._ready

    def stop(self) -> None:
        """The job ended: drop what is queued and let the thread leave (unless it is blocked
        reading its source; it is a daemon and leaves at its next argument)."""
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._bytes = 0
            self._cond.notify_all()


def _bare(kept: list[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    """``(index, pickle)`` of each argument to send again after a resume, one pickle each: an
    argument kept as part of a group (this console's own pickle) is taken out of it."""
    groups: dict[int, list[Any]] = {}
    out = []
    for index, item in kept:
        if type(item) is tuple:
            blob, first = item
            values = groups.get(first)
            if values is None:
                values = groups[first] = pickle.loads(blob)
            item = cloudpickle.dumps(values[index - first], PICKLE_PROTOCOL)
        out.append((index, item))
    return out


def _pop_chunk(
    ready: deque[tuple[bytes, Any]], limit: int, room: int, keep: bool
) -> tuple[list[bytes], list[Any] | None]:
    """Up to ``limit`` queued arguments in at most ``room`` bytes (an argument over it goes alone).

    Each argument also costs its entry in the header's ``sizes`` list (at most 9 bytes).
    """
    blobs: list[bytes] = []
    items: list[Any] = []
    size = 0
    while ready and len(blobs) < limit:
        cost = len(ready[0][0]) + 9
        if blobs and size + cost > room:
            break
        blob, value = ready.popleft()
        blobs.append(blob)
        items.append(value)
        size += cost
    return blobs, items if keep else None


@dataclass
class JobOutcome:
    job: int
    state: str
    done: int
    failed: int
    message: str


@dataclass
class JobRun:
    """One job as the console sees it: feeds arguments as the server grants, collects results."""

    params: JobOptions
    fn_blob: bytes
    #: a plain iterator (pulled on the reactor thread: it must never block) or ThreadedArguments
    arguments: Iterator[Any] | ThreadedArguments
    sink: Sink
    total_hint: int | None = None
    on_notice: Callable[[str], None] | None = None
    on_output: Callable[[int, str], None] | None = None
    job_id: int | None = None
    sent: int = 0
    done: int = 0
    failed: int = 0
    exhausted: bool = False
    finished: defer.Deferred = field(default_factory=defer.Deferred)
    _client: Any = None
    _granted: int = 0
    #: bytes the first window may still carry; None once a `grant` came or it was spent
    _first_bytes: int | None = None
    #: the last ``args`` sent carried argument groups (see :meth:`_group_leaves_no_room`)
    _last_grouped: bool = False
    _args: dict[int, Any] = field(default_factory=dict)
    _source: PulledArguments | ThreadedArguments | None = None
    _sending: bool = False
    _kill_on_start: bool = False
    _submit_id: int | None = None
    #: pickled arguments sent whose outcome has not arrived, by index (None: the run cannot
    #: be resumed, so nothing is kept): what a reconnected console sends again
    _unanswered: dict[int, bytes | tuple[bytes, int]] | None = None
    #: (index, pickle) to send again after a ``resume``, before any new argument
    _replay: deque[tuple[int, bytes]] = field(default_factory=deque)
    #: the first error that arrived (with its remote traceback), for a console to show
    first_error: TaskErrorInfo | None = None

    # ------------------------------------------------------------- arguments out

    @property
    def wire_job(self) -> int:
        """The job id to put in `args`: the real one, or minus the submit id until it is known."""
        return self.job_id if self.job_id is not None else -(self._submit_id or 0)

    def begin(self, client: ClusterClient, submit_id: int) -> None:
        """Right after `submit`: send the protocol's initial window under ``job = -submit_id``."""
        self._client = client
        self._submit_id = submit_id
        self._granted = m.INITIAL_WINDOW
        self._first_bytes = m.INITIAL_WINDOW_BYTES
        if client.redial is not None and not self.params.detach:
            self._unanswered = {}
        if self._source is None:
            source = self.arguments
            self._source = (
                source if isinstance(source, ThreadedArguments) else PulledArguments(source)
            )
            self._source.start(self.send_arguments, keep_items=self.sink.needs_arguments)
        self.send_arguments()

    def start(self, client: ClusterClient, job_id: int, window: int) -> None:
        """`submitted`: the job has its id; ``window`` counts what was already sent under -id."""
        early = self.job_id is None and self._submit_id is not None
        self._client = client
        self.job_id = job_id
        self._granted = window - self.sent if early else window
        if self._first_bytes is not None and (
            self._first_bytes <= 0 or self._group_leaves_no_room()
        ):
            self._granted = 0  # the first window was spent in bytes: wait for a grant
        if self._kill_on_start:
            client.kill_quietly(job_id)
        self.send_arguments()

    @property
    def resumable(self) -> bool:
        """Whether a reconnected console can take this job back (see :meth:`resume_message`)."""
        return self._unanswered is not None and self.job_id is not None and not self.finished.called

    def resume_message(self, request_id: int) -> m.Resume:
        """What the server needs to take the job back: the runs of arguments sent whose
        outcome never arrived (this console sends them again) and the outcomes it holds."""
        assert self._unanswered is not None and self.job_id is not None
        missing: list[list[int]] = []
        for index in sorted(self._unanswered):
            if missing and missing[-1][1] == index:
                missing[-1][1] = index + 1
            else:
                missing.append([index, index + 1])
        return m.Resume(
            id=request_id,
            job=self.job_id,
            sent=self.sent,
            missing=missing,
            done=self.done,
            failed=self.failed,
        )

    def resumed(self, window: int) -> None:
        """The server took the job back: send the unanswered arguments again, then the rest
        (and ``args_end`` again), under a fresh first window."""
        assert self._unanswered is not None
        self._replay = deque(_bare(sorted(self._unanswered.items())))
        self._granted = window
        self._first_bytes = m.INITIAL_WINDOW_BYTES
        self._last_grouped = False
        self.exhausted = False
        self.send_arguments()

    def _keep_unanswered(self, start: int, blobs: list[bytes], groups: list[int]) -> None:
        """Keep what a resume would send again: each argument's pickle, or (an argument
        group) the group's pickle and its first index, shared by its arguments."""
        unanswered = self._unanswered
        assert unanswered is not None
        if not groups:
            unanswered.update(zip(range(start, start + len(blobs)), blobs))
            return
        for blob, n in zip(blobs, groups):
            kept = (blob, start)
            unanswered.update(zip(range(start, start + n), itertools.repeat(kept)))
            start += n

    def _group_leaves_no_room(self) -> bool:
        """The first window closes after a message with argument groups that leaves less than
        ``MAX_GROUP`` of it (protocol README, section 5): the next group might not fit."""
        return self._last_grouped and self._granted < m.MAX_GROUP

    def _take_replay(self, limit: int, room: int) -> tuple[int, list[bytes]]:
        """The next run of consecutive indices to send again: at most ``limit`` arguments and
        ``room`` bytes (or one)."""
        replay = self._replay
        start = replay[0][0]
        blobs: list[bytes] = []
        size = 0
        while replay and len(blobs) < limit and replay[0][0] == start + len(blobs):
            cost = len(replay[0][1]) + 9
            if blobs and size + cost > room:
                break
            blobs.append(replay.popleft()[1])
            size += cost
        return start, blobs

    def grant(self, count: int) -> None:
        self._first_bytes = None  # the server knows the sizes now: its grants bound the bytes
        self._granted += count
        self.send_arguments()

    def _take(self, limit: int, room: int) -> tuple[list[bytes], list[int], list[Any] | None, bool]:
        """Up to ``limit`` arguments ready now (at most ``room`` bytes, or one pickle): their
        pickles, the arguments in each pickle (``[]``: one each; else argument groups, never
        one that would pass ``limit``), their values if the sink keeps them, and whether the
        source has ended."""
        assert self._source is not None
        blobs, items, ended = self._source.take(limit, room)
        return blobs, [], items, ended

    def send_arguments(self) -> None:
        if self.exhausted or self._sending or self.finished.called or self._client is None:
            return
        if self._client.link is None:
            return  # reconnecting: what is ready waits for the resumed job's window
        self._sending = True
        try:
            room = self._client.frame_room()
            while True:
                chunk_room = min(room, CHUNK_BYTES)
                if self._first_bytes is not None:
                    chunk_room = min(chunk_room, max(1, self._first_bytes))
                limit = min(max(self._granted, 0), CHUNK_ARGS)
                if self._replay:
                    if limit <= 0:
                        return
                    start, blobs = self._take_replay(limit, chunk_room)
                    groups: list[int] = []
                    items, ended = None, False
                else:
                    start = self.sent
                    blobs, groups, items, ended = self._take(limit, chunk_room)
                if blobs:
                    for k, blob in enumerate(blobs):
                        if len(blob) > room:
                            index = start + (sum(groups[:k]) if groups else k)
                            raise ArgumentTooLarge(index, len(blob), room)
                    if items is not None and self.sink.needs_arguments:
                        self._args.update(zip(range(start, start + len(items)), items))
                    msg = m.Args(
                        job=self.wire_job,
                        start=start,
                        sizes=[len(b) for b in blobs],
                        groups=groups,
                        payload=b"".join(blobs),
                    )
                    self._client.send(msg)
                    if start == self.sent:  # new arguments (not sent again after a resume)
                        if self._unanswered is not None:
                            self._keep_unanswered(start, blobs, groups)
                        self.sent += msg.count
                    self._granted -= msg.count
                    self._last_grouped = bool(groups)
                    if self._first_bytes is not None:
                        self._first_bytes -= sum(len(b) for b in blobs)
                        if self._first_bytes <= 0 or self._group_leaves_no_room():
                            self._granted = 0  # forfeited: the server counts the same bytes
                if ended:
                    self.exhausted = True
                    self._client.send(m.ArgsEnd(job=self.wire_job, total=self.sent))
                    return
                if not blobs or self._granted <= 0:
                    return
        except Exception as exc:  # the argument source failed (bad line, unpicklable object...)
            error = (
                exc
                if isinstance(exc, RemapError)
                else JobFailed(f"could not send argument {self.sent}: {type(exc).__name__}: {exc}")
            )
            if self.job_id is None:
                self._kill_on_start = True  # no job id yet: kill it when `submitted` names it
            else:
                self._client.kill_quietly(self.job_id)
            self.fail(error)
        finally:
            self._sending = False

    # ------------------------------------------------------------- results in

    def results(self, msg: m.Results) -> None:
        """Deliver one ``results`` message to the sink; a failure here fails this job only.

        A sink that cannot write (disk full), a result that will not unpickle under
        ``on_error: fail``, or any other console-side failure kills the job on the server and
        fails the run with an error that says what went wrong, instead of escaping into the
        connection (which would be reported as a lost connection).
        """
        if self.finished.called:  # already failed here: later results have nowhere to go
            return
        unanswered = self._unanswered
        if unanswered is not None:
            pop = unanswered.pop
            for index in msg.indices:
                pop(index, None)
        try:
            self._deliver(msg)
            self.sink.flush()
        except Exception as exc:
            if isinstance(exc, OSError):  # a write the sink did not name (stdout, a pipe)
                exc = OutputError(
                    f"job {self.job_id}: this console could not write its results: {os_reason(exc)}"
                )
            elif not isinstance(exc, RemapError):  # a bug: its traceback goes to the log
                log.failure("saving the results of job {job} failed", job=self.job_id)
                exc = JobFailed(
                    f"job {self.job_id} failed on this console while saving its results: "
                    f"{type(exc).__name__}: {exc}"
                )
            if self._client is not None:
                self._client.kill_quietly(self.job_id)
            self.fail(exc)

    def _deliver(self, msg: m.Results) -> None:
        errors = {e[0]: e for e in msg.errors}
        if errors and self.first_error is None:
            pos = min(errors)
            self.first_error = _error_info(msg.indices[pos], errors[pos], None)
        sink = self.sink
        if msg.output and self.on_output is not None:
            self.on_output(msg.indices[0] if msg.indices else -1, msg.output)
        unreadable: set[int] = set()
        if msg.partial:
            for pos, entry in errors.items():
                sink.add(
                    msg.indices[pos],
                    self._args.pop(msg.indices[pos], None),
                    None,
                    _error_info(msg.indices[pos], entry),
                )
            if msg.sizes:
                try:
                    partial = pickle.loads(msg.payload)
                except Exception as exc:
                    unreadable = {pos for pos in range(len(msg.indices)) if pos not in errors}
                    for pos in sorted(unreadable):
                        index = msg.indices[pos]
                        entry = _unreadable_entry(pos, exc, "partial result")
                        errors[pos] = entry
                        sink.add(
                            index, self._args.pop(index, None), None, _error_info(index, entry)
                        )
                else:
                    sink.add_partial(len(msg.indices) - len(errors), partial)
            self.failed += len(errors)
            self.done += len(msg.indices) - len(errors)
            self._check_unreadable(msg, errors, unreadable)
            return
        pop = self._args.pop
        if msg.packed:
            values, unreadable = self._unpack(msg, errors)
        else:
            values, unreadable = self._load_each(msg, errors)
        if not errors:  # the common case: one call into the sink per batch
            arguments = [pop(i, None) for i in msg.indices] if sink.needs_arguments else None
            sink.add_results(msg.indices, arguments, values)
            self.done += len(msg.indices)
            return
        for pos, (index, value) in enumerate(zip(msg.indices, values)):
            entry = errors.get(pos)
            if entry is not None:
                sink.add(index, pop(index, None), None, _error_info(index, entry, value))
            else:
                sink.add(index, pop(index, None), value, None)
        self.failed += len(errors)
        self.done += len(msg.indices) - len(errors)
        self._check_unreadable(msg, errors, unreadable)

    def _check_unreadable(
        self, msg: m.Results, errors: dict[int, list[Any]], unreadable: set[int]
    ) -> None:
        """Results this console cannot unpickle are errors; under ``on_error: fail`` they end
        the job like a remote error would (the server counted them as successes)."""
        if not unreadable:
            return
        pos = min(unreadable)
        info = _error_info(msg.indices[pos], errors[pos], None)
        if self.first_error is None:
            self.first_error = info
        if self.params.on_error == "fail":
            raise JobFailed(
                f"job {self.job_id} failed: argument {info.index}: {info.type_name}: {info.message}"
            )

    @staticmethod
    def _load_each(msg: m.Results, errors: dict[int, list[Any]]) -> tuple[list[Any], set[int]]:
        """One pickle per result: a result that will not load becomes that argument's error.

        Error slots keep their blob (the pickled exception); ``errors`` gains an entry per
        unreadable result, whose positions are returned.
        """
        values: list[Any] = []
        unreadable: set[int] = set()
        for pos, blob in enumerate(split(msg.sizes, msg.payload)):
            if pos in errors:
                values.append(blob)
                continue
            try:
                values.append(pickle.loads(blob))
            except Exception as exc:
                errors[pos] = _unreadable_entry(pos, exc, "result")
                unreadable.add(pos)
                values.append(None)
        return values, unreadable

    @staticmethod
    def _unpack(msg: m.Results, errors: dict[int, list[Any]]) -> tuple[list[Any], set[int]]:
        """A packed batch: one pickle of every result; if it will not load, each becomes an error."""
        try:
            values = pickle.loads(msg.payload)
            if type(values) is not list or len(values) != len(msg.indices):
                raise ValueError(f"{len(values)} results for {len(msg.indices)} arguments")
            return values, set()
        except Exception as exc:
            # the remote errors keep their type, message and traceback; the rest is unreadable
            unreadable = {pos for pos in range(len(msg.indices)) if pos not in errors}
            for pos in unreadable:
                errors[pos] = _unreadable_entry(pos, exc, "batch's results")
            return [None] * len(msg.indices), unreadable

    def ended(self, msg: m.JobDone) -> None:
        if self.finished.called:  # failed here first (e.g. its argument source broke)
            return
        self._stop_source()
        complete = msg.state == "done"
        try:
            self.sink.close(complete=complete)
        except Exception as exc:  # the output could not be finished: say so, never hang
            self.fail(
                JobFailed(f"job {msg.job} finished but its results could not be saved: {exc}")
            )
            return
        outcome = JobOutcome(msg.job, msg.state, msg.done, msg.failed, msg.message)
        if complete:
            self.finished.callback(outcome)
        elif msg.state == "killed":
            self.finished.errback(JobKilled(f"job {msg.job} was killed: {msg.message}"))
        else:
            self.finished.errback(JobFailed(f"job {msg.job} {msg.state}: {msg.message}"))

    def _stop_source(self) -> None:
        if self._source is not None:
            self._source.stop()

    def fail(self, error: Exception) -> None:
        if not self.finished.called:
            self._stop_source()
            try:
                self.sink.close(complete=False)
            except Exception:  # keep the first error; the sink's own is secondary
                pass
            self.finished.errback(error)


#: the type name of the error given to a result this console could not unpickle
UNREADABLE = "ResultUnreadable"


def _unreadable_entry(pos: int, exc: BaseException, what: str) -> list[Any]:
    """An ``errors`` entry for a result that arrived but could not be unpickled here."""
    return [
        pos,
        UNREADABLE,
        f"the {what} could not be unpickled here: {type(exc).__name__}: {exc}",
        "",
    ]


def _error_info(index: int, entry: list[Any], exc: Any = b"") -> TaskErrorInfo:
    """``exc`` is the exception itself (a packed batch) or its pickle (one blob per result)."""
    _, type_name, message, tb = (list(entry) + ["", "", ""])[:4]
    if not isinstance(exc, BaseException):
        exc = _load_exception(exc) if exc is not None else None
    return TaskErrorInfo(
        index=index,
        type_name=str(type_name),
        message=str(message),
        traceback=str(tb),
        exception=exc,
    )


def _load_exception(blob: bytes | memoryview) -> BaseException | None:
    """The pickled exception a core put in an error's result slot, if this process can rebuild it."""
    if not blob:
        return None
    try:
        exc = pickle.loads(blob)
    except Exception:  # its class is not importable here: the type name and traceback still are
        return None
    return exc if isinstance(exc, BaseException) else None


class ClusterClient:
    """Handler of a console connection: correlates requests by id, routes job traffic.

    With ``redial`` (a callable connecting this handler again, firing once authenticated), a
    lost connection is dialled again with backoff for up to ``grace`` seconds and every job
    this console feeds is resumed (``resume``) rather than failed: the server restarted or
    the network blinked, and the job goes on without a result lost or delivered twice.
    """

    log = Logger()

    def __init__(
        self,
        *,
        redial: Callable[[], defer.Deferred] | None = None,
        grace: float = 0.0,
        clock: Any = None,
    ) -> None:
        self.link: PeerProtocol | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, defer.Deferred] = {}
        self._submits: dict[int, JobRun] = {}
        self.runs: dict[int, JobRun] = {}
        self.lost: defer.Deferred = defer.Deferred()
        self.error: RemapError | None = None
        self.redial = redial
        self.grace = grace
        self.clock = clock
        #: set by :meth:`close`: a connection closed on purpose is not dialled again
        self.closing = False
        self._redial_deadline = 0.0
        self._redialing = False
        #: times the connection was lost and dialled again (for tests and logs)
        self.reconnects = 0

    def frame_room(self) -> int:
        """Bytes one argument may take: the connection's frame limit less an ``args`` header."""
        limit = self.link.conn.max_frame if self.link is not None else DEFAULT_MAX_FRAME
        return max(limit - ARGS_OVERHEAD, 1)

    def send(self, msg: m.Message) -> None:
        if self.link is None:
            raise ConnectionLost(self.error and str(self.error) or "not connected to the server")
        self.link.send(msg)

    # ------------------------------------------------------------- requests

    def _request(self, build: Callable[[int], m.Message]) -> defer.Deferred:
        rid = next(self._ids)
        d: defer.Deferred = defer.Deferred()
        self._waiters[rid] = d
        try:
            self.send(build(rid))
        except RemapError as exc:
            del self._waiters[rid]
            d.errback(exc)
        return d

    def status(self) -> defer.Deferred:
        d = self._request(lambda rid: m.StatusRequest(id=rid))
        return d.addCallback(lambda r: {"nodes": r.nodes, "jobs": r.jobs, "server": r.server})

    def kill(self, job: int) -> defer.Deferred:
        return self._request(lambda rid: m.Kill(id=rid, job=job)).addCallback(lambda r: r.info)

    def drive(self, kind: str, name: str, job: str, files: dict[str, str]) -> defer.Deferred:
        """Have the server run a data or vertex job's driver, detached; fires with its id."""
        return self._request(
            lambda rid: m.Drive(id=rid, kind=kind, name=name, job=job, files=files)
        ).addCallback(lambda r: r.info["job"])

    def kill_quietly(self, job: int | None) -> None:
        if job is not None and self.link is not None:
            self.kill(job).addErrback(lambda _f: None)

    def kill_cluster(self) -> defer.Deferred:
        return self._request(lambda rid: m.KillCluster(id=rid)).addCallback(lambda r: r.info)

    def drain(self, node: str) -> defer.Deferred:
        return self._request(lambda rid: m.Drain(id=rid, node=node)).addCallback(lambda r: r.info)

    def undrain(self, node: str) -> defer.Deferred:
        return self._request(lambda rid: m.Undrain(id=rid, node=node)).addCallback(lambda r: r.info)

    def exclude(self, node: str) -> defer.Deferred:
        return self._request(lambda rid: m.Exclude(id=rid, node=node)).addCallback(lambda r: r.info)

    def include(self, node: str) -> defer.Deferred:
        return self._request(lambda rid: m.Include(id=rid, node=node)).addCallback(lambda r: r.info)

    def submit(self, run: JobRun) -> defer.Deferred:
        """Start a job; the returned Deferred is ``run.finished`` (a JobOutcome, or a failure)."""
        rid = next(self._ids)
        self._submits[rid] = run
        try:
            total = run.total_hint if run.total_hint is not None else -1
            self.send(m.Submit.of(run.params, id=rid, total=total, payload=run.fn_blob))
        except RemapError as exc:
            del self._submits[rid]
            run.fail(exc)
            return run.finished
        run.begin(self, rid)
        return run.finished

    def attach(self, job: int, run: JobRun) -> defer.Deferred:
        """Receive a running or finished job's results into ``run``."""
        run._client = self
        run.job_id = job
        run.exhausted = True
        self.runs[job] = run
        d = self._request(lambda rid: m.Attach(id=rid, job=job))

        def refused(f: Any) -> Any:
            self.runs.pop(job, None)
            run.fail(f.value)
            return None

        d.addErrback(refused)
        return run.finished

    # ------------------------------------------------------------- Handler

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None:
        self.link = link

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        t = type(msg)
        if t is m.Results:
            run = self.runs.get(msg.job)
            if run is not None:
                run.results(msg)
        elif t is m.Grant:
            run = self.runs.get(msg.job)
            if run is not None:
                run.grant(msg.count)
        elif t is m.Submitted:
            run = self._submits.pop(msg.re, None)
            if run is not None:
                self.runs[msg.job] = run
                run.start(self, msg.job, msg.window)
        elif t is m.JobDone:
            run = self.runs.pop(msg.job, None)
            if run is not None:
                run.ended(msg)
        elif t is m.JobNotice:
            run = self.runs.get(msg.job)
            if run is not None and run.on_notice is not None:
                run.on_notice(msg.message)
        elif t in (m.Ok, m.StatusReply):
            d = self._waiters.pop(msg.re, None)
            if d is not None:
                d.callback(msg)
        elif t is m.Error:
            self._error(msg)
        elif t is m.Heartbeat:
            pass
        else:
            self.log.warn("unexpected {type} from the server", type=msg.TYPE)

    def _error(self, msg: m.Error) -> None:
        """A request's error keeps the server's code (its class, or ``.code``) to the caller."""
        error = error_from_wire(msg.code, msg.message)
        if msg.re is not None:
            d = self._waiters.pop(msg.re, None)
            if d is not None:
                d.errback(error)
                return
            run = self._submits.pop(msg.re, None)
            if run is not None:
                run.fail(JobRefused(f"the server refused the job: {msg.message}", msg.code))
                return
        self.error = (
            error
            if not isinstance(error, ProtocolError)
            else RemoteProtocolError(f"the server closed the connection: {msg.message}")
        )

    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None:
        self.error = error

    def close(self) -> None:
        """Close the connection on purpose: no job is resumed, nothing is dialled again."""
        self.closing = True
        if self.link is not None:
            self.link.close()

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        """Fail every waiter at once with one error: nothing waits on a dead connection.

        Jobs this console feeds are kept when it can dial again: they are resumed once it is
        back (see the class docstring), or fail if it is not back within the grace.
        """
        if self._redialing and link is not self.link:
            return  # a new connection that failed before it was up: the redial loop goes on
        self.link = None
        err = self.error or ConnectionLost(f"lost the connection to the server ({error})")
        self.error = err
        waiters, self._waiters = self._waiters, {}
        for d in waiters.values():
            d.errback(err)
        keep = {}
        if self.redial is not None and self.grace > 0 and not self.closing:
            keep = {job: run for job, run in self.runs.items() if run.resumable}
        runs = list(self._submits.values()) + [
            run for job, run in self.runs.items() if job not in keep
        ]
        self._submits.clear()
        self.runs = keep
        for run in runs:
            run.fail(err)
        if keep:
            self._redial_deadline = self.clock.seconds() + self.grace
            for run in keep.values():
                if run.on_notice is not None:
                    run.on_notice(
                        f"lost the connection to the server ({error}): reconnecting for up to "
                        f"{self.grace:g}s (REMAP_CONSOLE_GRACE)"
                    )
            self.log.warn(
                "lost the server ({error}); reconnecting to resume job(s) {jobs}",
                error=error,
                jobs=sorted(keep),
            )
            self._redialing = True
            self._redial_soon(0.1)
        elif not self.lost.called:
            self.lost.callback(err)

    def _redial_soon(self, delay: float) -> None:
        self.clock.callLater(delay, self._redial_now, delay)

    def _redial_now(self, delay: float) -> None:
        if self.closing or not self.runs:
            self._give_up(self.error or ConnectionLost("closed while reconnecting"))
            return
        assert self.redial is not None
        d = defer.maybeDeferred(self.redial)
        d.addCallbacks(lambda _link: self._resume_runs(), lambda f: self._redial_failed(f, delay))

    def _redial_failed(self, failure: Any, delay: float) -> None:
        exc = failure.value
        left = self._redial_deadline - self.clock.seconds()
        if isinstance(exc, (AuthError, VersionMismatch)) or left <= 0:
            reason = str(exc) or type(exc).__name__
            self._give_up(
                ConnectionLost(
                    f"lost the connection to the server and could not resume within "
                    f"{self.grace:g}s (REMAP_CONSOLE_GRACE): {reason}"
                )
            )
            return
        self._redial_soon(min(delay * 2, 0.5, left))

    def _give_up(self, error: RemapError) -> None:
        self._redialing = False
        self.error = error
        runs, self.runs = list(self.runs.values()), {}
        for run in runs:
            run.fail(error)
        if not self.lost.called:
            self.lost.callback(error)

    def _resume_runs(self) -> None:
        """Connected again: ask the server to take back each job this console feeds."""
        self.reconnects += 1
        self._redialing = False
        self.error = None
        for job, run in list(self.runs.items()):
            d = self._request(run.resume_message)

            def resumed(reply: m.Ok, run: JobRun = run) -> None:
                if run.finished.called:
                    return
                if run.on_notice is not None:
                    run.on_notice("reconnected: the job goes on")
                run.resumed(int(reply.info.get("window", 0)))

            def refused(f: Any, job: int = job, run: JobRun = run) -> None:
                if self.runs.get(job) is run:
                    del self.runs[job]
                run.fail(
                    JobFailed(
                        f"job {job} could not be resumed after the connection was lost: {f.value}"
                    )
                )

            d.addCallbacks(resumed, refused)

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat()
