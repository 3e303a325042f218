"""The client side of a job: a pure job session, the thread bridge that drives it, and the
connection to a server. Shared by the console and the Python API."""

from __future__ import annotations

import contextlib
import itertools
import operator
import pickle
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partialmethod
from typing import Any

import cloudpickle
from twisted.internet import defer
from twisted.logger import Logger

from protocol import DEFAULT_MAX_FRAME, Authenticated
from protocol import messages as m
from protocol.framing import LARGE_FRAME, frame_length
from protocol.options import JobOptions

from .blobs import PICKLE_PROTOCOL, dumps, split
from .errors import (
    AuthError,
    ConfigError,
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
#: arguments a reader thread may take ahead of the results the consumer took: a sink slower
#: than the cluster slows the reading, instead of results piling up in memory
READ_AHEAD_RESULTS = 65536

#: argument groups: at most this many arguments to a pickle (128 halves per-group costs
#: against 64, bench/README.md), in at least GROUP_SPREAD groups (every core gets some early),
#: of about GROUP_BYTES at most
GROUP_ARGS = 128
GROUP_SPREAD = 256
GROUP_BYTES = 64 * 1024
#: a larger group waits for ``submitted`` (and a ``group_limit``): it might fit no node
EARLY_GROUP_BYTES = m.EARLY_GROUP_BYTES
#: seconds a group read from a slow source stays open before it goes as it is
GROUP_WAIT = 0.005


log = Logger()


def group_target(total: int | None, chunksize: int | None, read: int = 0) -> int:
    """Arguments per pickle (1: no groups), so at least ``GROUP_SPREAD`` groups share out the
    job. A job of unknown size ramps up, sized as if the ``read`` arguments so far were all."""
    size = read if total is None else total
    target = min(GROUP_ARGS, m.MAX_GROUP, size // GROUP_SPREAD)
    if chunksize:
        target = min(target, chunksize)
    return max(1, target)


def next_group(session: JobSession, read: int, size: int, n: int, cap: int = m.MAX_GROUP) -> int:
    """Arguments in the next group once ``read`` were: :func:`group_target`'s (at most ``cap``),
    bounded so a group of the last one's bytes per argument (``n`` in ``size``) holds about
    ``GROUP_BYTES``, or half the server's ``group_limit`` if smaller."""
    target = min(cap, group_target(session.total_hint, session.params.chunksize, read))
    most = session.group_bytes
    aim = GROUP_BYTES if not most or most >= 2 * GROUP_BYTES else max(1, most // 2)
    return max(1, min(target, aim * n // max(1, size)))


def split_group(blob: bytes, n: int, tag: Any) -> list[tuple[bytes, Any, int]]:
    """An argument group's queue entry as ``n`` groups of one, with their tags: a group no
    node takes would fail each argument though each fits alone (the server never unpickles)."""
    values = pickle.loads(blob)
    tags = itertools.repeat(None, n) if tag is None else ([v] for v in tag)
    return [(dumps([value]), t, 1) for value, t in zip(values, tags, strict=False)]


class ArgumentTooLarge(JobFailed):
    """One pickled argument does not fit in a frame: no peer would accept it."""

    def __init__(self, index: int, size: int, room: int) -> None:
        super().__init__(
            f"argument {index} is {size:,} bytes pickled, over the {room:,} bytes an argument "
            f"may have in one message (REMAP_MAX_FRAME): pass a file name or a smaller piece"
        )
        self.index = index
        self.size = size


@dataclass
class JobOutcome:
    job: int
    state: str
    done: int
    failed: int
    message: str


#: an ``outbox`` entry ``(KILL, job)``: ask the server to kill the job (a request of its own)
KILL = "kill"


class JobSession:
    """One job as a client sees it, pure (no user code: arguments come pickled): after each
    call :attr:`outbox` holds what to send (messages, or ``(KILL, job)``) and :attr:`events`
    what to deliver: ``("items", indices, results, errors or None, arguments or None)``,
    ``("partial", count, value)``. :attr:`finished` is set once, with :attr:`outcome` or
    :attr:`error`."""

    def __init__(
        self,
        params: JobOptions,
        fn_blob: bytes = b"",
        *,
        total_hint: int | None = None,
        keep_arguments: bool = False,
    ) -> None:
        self.params = params
        self.fn_blob = fn_blob
        self.total_hint = total_hint
        #: keep each argument (its tag) until its result comes, for the sink
        self.keep_arguments = keep_arguments
        self.job_id: int | None = None
        self.submit_id: int | None = None
        #: a detached job's ``args_end`` is a request with this id (0: not one): the server
        #: answers once it holds every argument where a restart finds it
        self.end_id = 0
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.exhausted = False
        #: bytes one argument may take (the connection's frame limit less a header)
        self.frame_room = DEFAULT_MAX_FRAME - ARGS_OVERHEAD
        #: the server's ``group_limit`` (0: none): a larger group fits no node, and is split here
        self.group_bytes = 0
        #: the first error that arrived, for a console to show
        self.first_error: TaskErrorInfo | None = None
        self.finished = False
        self.outcome: JobOutcome | None = None
        self.error: Exception | None = None
        self.outbox: list[Any] = []
        self.events: list[tuple[Any, ...]] = []
        self._granted = 0
        #: bytes the first window may still carry; None once a `grant` came or it was spent
        self._first_bytes: int | None = None
        self._args: dict[int, Any] = {}
        self._kill_on_start = False
        #: what a reconnected client sends again (None: the job cannot be resumed)
        self._unanswered: Unanswered | None = None
        #: the last ``args`` sent carried argument groups
        self._last_grouped = False
        #: (index, pickle) to send again after a ``resume``, before any new argument
        self._replay: deque[tuple[int, bytes]] = deque()
        #: a ``take`` left nothing queued: :meth:`pump` stops (a later put wakes the stream)
        self.drained = False
        #: the server was told to hold the job (see :meth:`hold`)
        self.held = False

    @property
    def wire_job(self) -> int:
        """The job id to put in `args`: the real one, or minus the submit id until it is known."""
        return self.job_id if self.job_id is not None else -(self.submit_id or 0)

    # ------------------------------------------------------------- events in

    def submit(self, rid: int, *, resumable: bool = False) -> None:
        """Send `submit`; the initial window may follow at once under ``-rid``. ``resumable``:
        keep what a resume needs."""
        self.submit_id = rid
        if resumable and not self.params.detach:
            self._unanswered = Unanswered()
        self._granted = m.INITIAL_WINDOW
        self._first_bytes = m.INITIAL_WINDOW_BYTES
        total = self.total_hint if self.total_hint is not None else -1
        self.outbox.append(m.Submit.of(self.params, id=rid, total=total, payload=self.fn_blob))

    def attach(self, job: int) -> None:
        """Receive a running or finished job's results; it takes no arguments from here."""
        self.job_id = job
        self.exhausted = True

    def submitted(self, job: int, window: int) -> None:
        """The job has its id; ``window`` counts what was already sent under -id."""
        early = self.job_id is None and self.submit_id is not None
        self.job_id = job
        self._granted = window - self.sent if early else window
        self._close_spent_window()
        if self._kill_on_start:
            self.outbox.append((KILL, job))

    @property
    def resumable(self) -> bool:
        return self._unanswered is not None and self.job_id is not None and not self.finished

    def resume_message(self, request_id: int) -> m.Resume:
        """The runs of arguments sent whose outcome never arrived, and the outcomes held."""
        assert self._unanswered is not None and self.job_id is not None
        return m.Resume(
            id=request_id,
            job=self.job_id,
            sent=self.sent,
            missing=self._unanswered.missing(),
            done=self.done,
            failed=self.failed,
        )

    def resumed(self, window: int) -> None:
        """The unanswered arguments go again, then the rest, under a fresh first window."""
        assert self._unanswered is not None
        self._replay = deque(_bare(self._unanswered.kept()))
        self.held = False  # the server forgot the hold with the connection
        self._granted = window
        self._first_bytes = m.INITIAL_WINDOW_BYTES
        self._last_grouped = False
        self.exhausted = False

    def _close_spent_window(self) -> None:
        """The first window closes once its bytes are spent, or groups left less than
        ``MAX_GROUP`` of it (protocol README, section 5): the server counts the same."""
        if self._first_bytes is not None and (
            self._first_bytes <= 0 or (self._last_grouped and self._granted < m.MAX_GROUP)
        ):
            self._granted = 0

    def _take_replay(self, limit: int, room: int) -> tuple[int, list[bytes]]:
        """The next run of consecutive indices to send again, within ``limit`` and ``room``."""
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

    def hold(self, held: bool) -> None:
        """Flow control of results: with ``held`` the server dispatches none of the job's calls
        and no argument goes (the window stays for later)."""
        if held == self.held or self.job_id is None or self.finished:
            return
        self.held = held
        self.outbox.append(m.Hold(job=self.job_id, held=held))

    def grant(self, count: int) -> None:
        self._first_bytes = None  # the server knows the sizes now: its grants bound the bytes
        self._granted += count

    def group_limit(self, max_bytes: int) -> None:
        """The largest argument group worth sending (0: no bound)."""
        self.group_bytes = max(0, max_bytes)

    def _sends_nothing(self) -> bool:
        return (
            self.exhausted
            or self.finished
            or self.held
            or (self.job_id is None and self.submit_id is None)
        )

    def pump(self, take: Callable[[int, int, int], tuple[Any, Any, Any, bool]]) -> None:
        """Send what the window allows; ``take`` is :meth:`JobStream._take`."""
        if self._sends_nothing():
            return
        room = self.frame_room
        try:
            while True:
                chunk_room = min(room, CHUNK_BYTES)
                if self._first_bytes is not None:
                    chunk_room = min(chunk_room, max(1, self._first_bytes))
                limit = min(max(self._granted, 0), CHUNK_ARGS)
                self.drained = False
                if self._replay:
                    if limit <= 0:
                        return
                    start, blobs = self._take_replay(limit, chunk_room)
                    groups: list[int] = []
                    tags, ended = [], False
                else:
                    start = self.sent
                    blobs, groups, tags, ended = take(limit, chunk_room, start)
                if blobs:
                    sizes = list(map(len, blobs))  # (no Python-level call per argument)
                    if max(sizes) > room:
                        k = next(k for k, size in enumerate(sizes) if size > room)
                        index = start + (sum(groups[:k]) if groups else k)
                        raise ArgumentTooLarge(index, sizes[k], room)
                    self.outbox.append(self.args_message(start, blobs, groups, tags, sizes))
                if ended:
                    self.exhausted = True
                    self.outbox.append(
                        m.ArgsEnd(job=self.wire_job, total=self.sent, id=self.end_id)
                    )
                    return
                if not blobs or self._granted <= 0 or self.drained:
                    return
        except Exception as exc:  # the input failed (bad line, unpicklable object...)
            self.abort(
                exc
                if isinstance(exc, RemapError)
                else JobFailed(f"could not send argument {self.sent}: {type(exc).__name__}: {exc}")
            )

    def args_message(
        self,
        start: int,
        blobs: list[bytes],
        groups: list[int],
        tags: list[Any],
        sizes: list[int] | None = None,
    ) -> m.Args:
        """The ``args`` message of pickles from ``start`` on (below :attr:`sent`: sent again
        after a resume), counted against the window; ``sizes``: the pickles' lengths."""
        msg = m.Args.make(
            job=self.wire_job,
            start=start,
            sizes=list(map(len, blobs)) if sizes is None else sizes,
            groups=groups,
            payload=b"".join(blobs),
        )
        count = sum(groups) if groups else len(blobs)  # msg.count
        if start == self.sent:  # new arguments (not sent again after a resume)
            if self.keep_arguments:
                if groups:  # a group's tag is the list of its arguments
                    tags = itertools.chain.from_iterable(
                        itertools.repeat(None, n) if t is None else t for t, n in zip(tags, groups)
                    )
                self._args.update(zip(range(start, start + count), tags))
            if self._unanswered is not None:
                self._unanswered.sent(start, count, blobs, groups)
            self.sent += count
        self._granted -= count
        self._last_grouped = bool(groups)
        if self._first_bytes is not None:
            self._first_bytes -= sum(map(len, blobs))
            self._close_spent_window()
        return msg

    def lone_args(
        self, blob: bytes, tag: Any, admit: Callable[[int, Any], bool] | None
    ) -> list[m.Args] | None:
        """:meth:`pump` for a lone call's argument (``JobStream.put_one``): ``[its message]``;
        ``[]`` if ``admit(index, tag)`` refused it; None if it cannot go now (:meth:`pump` then
        says why)."""
        if (
            self._granted <= 0
            or self._replay
            or len(blob) > self.frame_room
            or self._sends_nothing()
        ):
            return None
        if tag is not None and admit is not None and not admit(self.sent, tag):
            return []
        return [self.args_message(self.sent, [blob], [], [tag])]

    def results(self, msg: m.Results) -> None:
        """Decode one ``results`` message into events. A failure here kills this job with one
        line, instead of escaping into the connection (reported as a lost connection)."""
        if self.finished:  # already failed here: later results have nowhere to go
            return
        indices = msg.answered
        if self._unanswered is not None:
            self._unanswered.answered(indices)
        try:
            self._decode(msg, indices)
        except Exception as exc:
            self.abort(_console_error(exc, self.job_id, "reading"))

    def lone_result(self, msg: m.Results) -> tuple[int, Any] | None:
        """``(index, value)`` if the message answers one argument without an error, accounted
        as :meth:`results` does; else None (then :meth:`results` takes it)."""
        if msg.count != 1 or msg.errors or msg.partial or self.finished or self.keep_arguments:
            return None
        values, unreadable = _unpack(msg, {}, 1) if msg.packed else _load_each(msg, {})
        if unreadable or len(values) != 1:
            return None
        value, index = values[0], msg.start
        if self._unanswered is not None:
            self._unanswered.answered_one(index)
        self.done += 1
        return index, value

    def ended(self, msg: m.JobDone) -> None:
        if self.finished:  # failed here first (e.g. its input broke)
            return
        self.finished = True
        if msg.state == "done":
            self.outcome = JobOutcome(msg.job, msg.state, msg.done, msg.failed, msg.message)
        elif msg.state == "killed":
            self.error = JobKilled(f"job {msg.job} was killed: {msg.message}")
        else:
            self.error = JobFailed(f"job {msg.job} {msg.state}: {msg.message}")

    def kill(self) -> None:
        """Ask the server to kill the job, now or as soon as it is named."""
        if self.job_id is None:
            self._kill_on_start = True
        elif not self.finished:
            self.outbox.append((KILL, self.job_id))

    def abort(self, error: Exception) -> None:
        """Kill the job on the server and fail it here with ``error``."""
        if not self.finished:
            self.kill()
            self.fail(error)

    def fail(self, error: Exception) -> None:
        """End the job here with ``error`` (the connection is lost, the server refused it...)."""
        if not self.finished:
            self.finished = True
            self.error = error

    # ------------------------------------------------------------- decoding results

    def _decode(self, msg: m.Results, indices: list[int] | range) -> None:
        errors = {e[0]: e for e in msg.errors} if msg.errors else {}  # no comprehension call
        if errors and self.first_error is None:
            pos = min(errors)
            self.first_error = _error_info(indices[pos], errors[pos], None)
        unreadable: set[int] = set()
        if msg.partial:
            partial: Any = None
            if msg.sizes:
                try:
                    partial = (pickle.loads(msg.payload),)
                except Exception as exc:
                    unreadable = {pos for pos in range(len(indices)) if pos not in errors}
                    for pos in unreadable:
                        errors[pos] = _unreadable_entry(pos, exc, "partial result")
            bad = sorted(errors)
            if bad:
                info = [_error_info(indices[p], errors[p]) for p in bad]
                self._items([indices[p] for p in bad], [None] * len(bad), info)
            if partial is not None:
                self.events.append(("partial", len(indices) - len(errors), partial[0]))
        else:
            if msg.packed:
                values, unreadable = _unpack(msg, errors, len(indices))
            else:
                values, unreadable = _load_each(msg, errors)
            if not errors:  # the common case: the batch goes on in one step
                self._items(indices, values, None)
            else:
                infos = [
                    _error_info(index, errors[pos], values[pos]) if pos in errors else None
                    for pos, index in enumerate(indices)
                ]
                self._items(indices, [None if e else v for v, e in zip(values, infos)], infos)
        self.failed += len(errors)
        self.done += len(indices) - len(errors)
        if unreadable:
            self._check_unreadable(indices, errors, unreadable)

    def _items(
        self, indices: list[int] | range, values: list[Any], infos: list[Any] | None
    ) -> None:
        arguments = [self._args.pop(i, None) for i in indices] if self.keep_arguments else None
        self.events.append(("items", indices, values, infos, arguments))

    def _check_unreadable(
        self, indices: list[int], errors: dict[int, list[Any]], unreadable: set[int]
    ) -> None:
        """Results this client cannot unpickle end the job under ``on_error: fail``, as a
        remote error would (the server counted them as successes)."""
        pos = min(unreadable)
        info = _error_info(indices[pos], errors[pos], None)
        if self.first_error is None:
            self.first_error = info
        if self.params.on_error == "fail":
            raise JobFailed(
                f"job {self.job_id} failed: argument {info.index}: {info.type_name}: {info.message}"
            )


def _console_error(exc: Exception, job: int | None, doing: str) -> RemapError:
    """``exc`` if it is a RemapError; else a bug of this console, its traceback logged (call it
    in the ``except`` block)."""
    if isinstance(exc, RemapError):
        return exc
    log.failure(f"{doing} the results of job {{job}} failed", job=job)
    why = f"{type(exc).__name__}: {exc}"
    return JobFailed(f"job {job} failed on this console while {doing} its results: {why}")


def _load_each(msg: m.Results, errors: dict[int, list[Any]]) -> tuple[list[Any], set[int]]:
    """One pickle per result: one that will not load becomes an error (added to ``errors``,
    its position returned); error slots keep their blob (the pickled exception)."""
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


def _unpack(msg: m.Results, errors: dict[int, list[Any]], count: int) -> tuple[list[Any], set[int]]:
    """A packed batch of ``count`` results; if its pickle will not load, each is an error."""
    try:
        values = pickle.loads(msg.payload)
        if type(values) is not list or len(values) != count:
            raise ValueError(f"{len(values)} results for {count} arguments")
        return values, set()
    except Exception as exc:
        # the remote errors keep their type, message and traceback; the rest is unreadable
        unreadable = {pos for pos in range(count) if pos not in errors}
        for pos in unreadable:
            errors[pos] = _unreadable_entry(pos, exc, "batch's results")
        return [None] * count, unreadable


class Unanswered:
    """What a client keeps to resume a job: the pickles sent whose outcome has not arrived, per
    ``args`` message, and a byte per index from the first unanswered one (C loops on both hot
    paths, not a dict entry per argument)."""

    #: an answered prefix at least this long is cut off the bitmap (and its messages dropped)
    TRIM = 4096

    def __init__(self) -> None:
        self.base = 0  # the index of answered[0]
        self.done = bytearray()  # 1: the outcome arrived
        #: per ``args`` message not wholly answered: (start, count, pickles, groups)
        self.chunks: deque[tuple[int, int, list[bytes], list[int]]] = deque()

    def sent(self, start: int, count: int, blobs: list[bytes], groups: list[int]) -> None:
        self.done.extend(bytes(count))
        self.chunks.append((start, count, blobs, groups))

    def answered_one(self, index: int) -> None:
        """:meth:`answered` of one index (a lone call's fast path)."""
        done = self.done
        if len(done) == 1 and index == self.base:
            done.clear()
            self.base = index + 1
            self.chunks.clear()
        else:
            self.answered((index,))

    def answered(self, indices: list[int] | tuple[int, ...] | range) -> None:
        done, base = self.done, self.base
        if not indices:
            return
        if type(indices) is range:  # a run from the server (``start``/``count``)
            lo, hi, end = indices[0], indices[-1], base + len(done)
        else:
            lo, hi, end = min(indices), max(indices), base + len(done)
        if hi - lo == len(indices) - 1 and base <= lo and hi < end:  # a run (never repeated)
            done[lo - base : hi - base + 1] = b"\x01" * len(indices)
        else:
            for index in indices:
                if base <= index < end:  # below: answered and forgotten; above: never sent
                    done[index - base] = 1
        first = done.find(0)
        cut = len(done) if first < 0 else first
        if cut >= self.TRIM or first < 0:
            del done[:cut]
            self.base += cut
            chunks = self.chunks
            while chunks and chunks[0][0] + chunks[0][1] <= self.base:
                chunks.popleft()

    def missing(self) -> list[list[int]]:
        """Runs ``[start, stop)`` of indices sent whose outcome has not arrived."""
        done, base, runs, at = self.done, self.base, [], 0
        while True:
            start = done.find(0, at)
            if start < 0:
                return runs
            stop = done.find(1, start)
            stop = len(done) if stop < 0 else stop
            runs.append([base + start, base + stop])
            at = stop

    def kept(self) -> list[tuple[int, Any]]:
        """``(index, pickle or (group pickle, its first index))`` per unanswered argument."""
        done, base, out = self.done, self.base, []
        for start, _count, blobs, groups in self.chunks:
            index = start
            for k, blob in enumerate(blobs):
                n = groups[k] if groups else 1
                for i in range(index, index + n):
                    if i >= base and not done[i - base]:
                        out.append((i, (blob, index) if groups else blob))
                index += n
        return out


def _bare(kept: list[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    """``(index, pickle)`` of each argument to send again, taken out of its group if need be."""
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


class JobStream:
    """The thread bridge: drives one :class:`JobSession` on the reactor thread, fed pickled
    arguments from any thread (:meth:`put_many`, :func:`read_into`). Results become events on
    :attr:`events`: ``("items", stream, [(index, result, error), ...], arguments or None)``,
    with ``runs`` ``("runs", stream, [(first index, [result, ...])], arguments or None)`` for
    consecutive results without errors, ``("partial", stream, count, value)`` and last
    ``("end", stream, error_or_None)``. Another thread takes them, so user code (folds, sinks,
    done-callbacks) never runs on the reactor thread."""

    def __init__(
        self,
        fn_blob: bytes,
        params: JobOptions,
        *,
        call_soon: Callable[..., None],
        events: queue.SimpleQueue | None = None,
        on_send: Callable[[int, Any], bool] | None = None,
        on_items: Callable[[list[Any]], list[Any]] | None = None,
        on_result: Callable[[int, Any], bool] | None = None,
        on_output: Callable[[int, str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        owner: Any = None,
        total_hint: int | None = None,
        keep_arguments: bool = False,
        runs: bool = False,
        result_buffer: int = 0,
    ) -> None:
        self.runs = runs
        #: bytes of results held for the consumer before the job is held (0: no flow control)
        self.result_buffer = result_buffer
        self.session = JobSession(
            params, fn_blob, total_hint=total_hint, keep_arguments=keep_arguments
        )
        #: ``reactor.callFromThread``; its ``quiet`` form does not wake a loop the calling
        #: thread runs itself (``runtime.thread_caller``)
        self.call_soon = call_soon
        self._call_quietly = getattr(call_soon, "quiet", call_soon)
        self.events: queue.SimpleQueue = events if events is not None else queue.SimpleQueue()
        #: reactor-thread hooks. ``on_send(index, tag)`` (under :attr:`lock`) as a tagged item
        #: is sent: False drops it (a cancelled future); ``on_items(batch)`` settles what it
        #: can and returns the rest for an ``items`` event; ``on_result(index, value)`` for a
        #: lone result without an error: False sends it on as an event. ``on_output`` and
        #: ``on_notice`` only queue the text.
        self.on_send = on_send
        self.on_items = on_items
        self.on_result = on_result
        self.on_output = on_output
        self.on_notice = on_notice
        self.owner = owner
        self.client: ClusterClient | None = None
        #: the ``info`` of the server's answer to a detached job's ``args_end`` (``stored``,
        #: ``why``), set (reactor thread) before :attr:`stored_event`
        self.stored: dict[str, Any] | None = None
        self.stored_event = threading.Event()
        self.lock = threading.Lock()
        #: held while the session is driven (by the reactor, or a thread in :meth:`_send_now`);
        #: taken before :attr:`lock` and the connection's write lock
        self._drive = threading.RLock()
        self._direct = 0  # messages at the head of the outbox a calling thread is sending
        self._room = threading.Condition(self.lock)
        #: readers waiting in :meth:`put_waiting` (a take notifies only then)
        self._waiting = 0
        self.finished = threading.Event()
        self.error: Exception | None = None
        self.outcome: JobOutcome | None = None
        self.input_closed = False
        self.killing = False
        self.unsent_bytes = 0
        #: arguments put by :meth:`put_waiting`, and results the consumer took
        self._read = self.taken = 0
        self._input_error: BaseException | None = None
        #: (pickle, tag, 0 for a bare argument or n for a group of n)
        self._items: deque[tuple[bytes, Any, int]] = deque()
        #: the head entry being split (:meth:`_split_head`) and the error that stopped it
        self._split: tuple[tuple[bytes, Any, int], Exception | None] | None = None
        self._wake_pending = False
        #: :meth:`put_one`'s argument and tag while it tries to send them
        self._lone: tuple[bytes, Any] | None = None
        #: results delivered and their bytes; per results message not wholly taken, the
        #: running (count, bytes) after it; ``_base``: the totals before the first
        self._arrived = self._arrived_bytes = 0
        self._marks: deque[tuple[int, int]] = deque()
        self._base = (0, 0)
        #: the most result bytes held at once
        self.held_peak = 0
        #: once :attr:`taken` reaches it, the reactor looks whether to let the job go on
        self._resume_at = sys.maxsize
        #: the consumer waits for a result it does not have: holding then could wait for ever.
        #: Only while none came since it said so (``_wanted_at``: ``_arrived`` then): one that
        #: came wakes it, and it says again if it still lacks the one it waits for
        self.wanting = False
        self._wanted_at = 0

    @property
    def job_id(self) -> int | None:
        return self.session.job_id

    # ------------------------------------------------------------ any thread

    def start(self, client: ClusterClient) -> JobStream:
        """Submit the job on ``client``'s connection. The submit pumps what was queued by
        then: arguments put meanwhile wake the reactor no more (one wake-up, not two)."""
        with self.lock:
            self._wake_pending = True
        self.call_soon(self._submit, client)
        return self

    def _submit(self, client: ClusterClient) -> None:
        with self.lock:
            self._wake_pending = False  # (what is put from now on wakes it again)
        client.submit(self)

    def attach(self, client: ClusterClient, job: int) -> JobStream:
        """Receive a running or finished job's results."""
        self.call_soon(client.attach, job, self)
        return self

    def put_many(
        self,
        blobs: list[bytes],
        tags: list[Any] | None = None,
        counts: list[int] | None = None,
        *,
        now: bool = False,
        waits: bool = False,
    ) -> None:
        """Queue pickled arguments (tags for :attr:`on_send` or the sink; ``counts[i]`` > 0:
        pickle ``i`` is a group of that many). ``now``: send from this thread if it can
        (:meth:`_send_now`), saving a lone call the reactor's hop. ``waits``: this thread waits
        for the result next (running the loop if it keeps it)."""
        if not blobs:
            return
        with self.lock:
            if self.killing:
                # calls put after the end stay for the owner to withdraw (see _stop_input)
                if self.on_send and tags is not None:
                    self._items.extend((b"", tag, 0) for tag in tags)
                return
            if self.input_closed:
                raise RuntimeError("this job takes no more arguments")
            self._items.extend(
                zip(
                    blobs,
                    tags if tags is not None else itertools.repeat(None),
                    counts if counts is not None else itertools.repeat(0),
                )
            )
            self.unsent_bytes += sum(map(len, blobs))
            if not now or self._wake_pending:  # the reactor takes them (with others) anyway
                self._wake_soon(waits)
                return
        if not self._send_now():
            with self.lock:
                self._wake_soon(waits)

    def put_one(self, blob: bytes, tag: Any) -> None:
        """``put_many([blob], [tag], now=True, waits=True)``, written from this thread without
        the queue when nothing else waits and the window is open."""
        send = self._thread_sender()
        if send is not None and self._drive.acquire(blocking=False):
            try:
                self._lone = (blob, tag)
                if send(self._produce_one, self.call_soon) and self._lone is None:
                    return
            finally:
                self._lone = None
                self._drive.release()
        self.put_many([blob], [tag], now=True, waits=True)

    def _thread_sender(self) -> Callable[..., bool] | None:
        """The connection's ``send_from_thread``, if it is steady and has one."""
        link = self.client.steady_link() if self.client is not None else None
        return getattr(link, "send_from_thread", None)

    def _produce_one(self) -> list[m.Message]:
        """:meth:`put_one`'s message (under :attr:`_drive` and the write lock); nothing if it
        cannot go now (then :attr:`_lone` stays set)."""
        blob, tag = self._lone  # type: ignore[misc]
        with self.lock:
            if self.killing or self.input_closed or self._items or self._wake_pending:
                return []
            out = self.session.lone_args(blob, tag, self.on_send)
            if out is None:
                return []
            self._lone = None
            return out

    def _send_now(self) -> bool:
        """Calling thread: pump the session and write its ``args`` here, as the reactor would;
        False if the reactor must (it drives this job now, the link cannot, or is redialling).
        Anything else the pump made is left to the reactor, woken for it."""
        send = self._thread_sender()
        if send is None or not self._drive.acquire(blocking=False):
            return False
        session = self.session
        self._direct = 0
        try:
            if not send(self._pumped, self.call_soon):
                return False
            del session.outbox[: self._direct]  # written (until then the reactor would send them)
            return True
        finally:
            leftover = bool(
                session.outbox
                or session.events
                or (session.finished and not self.finished.is_set())
            )
            self._drive.release()
            if leftover:
                self.call_soon(self._wake)

    def _pumped(self) -> list[m.Message]:
        """The ``args`` and ``args_end`` at the head of the pumped outbox (under :attr:`_drive`)."""
        session = self.session
        session.pump(self._take)
        out = session.outbox
        n = 0
        while n < len(out) and type(out[n]) in _ARGS_MESSAGES:
            n += 1
        self._direct = n
        return out[:n]

    def put_waiting(
        self, blob: bytes, tag: Any, max_bytes: int, max_items: int, ahead: int, count: int = 0
    ) -> bool:
        """Queue one pickle (``count`` > 0: a group of that many) once fewer than
        ``max_bytes``/``max_items`` wait and at most ``ahead`` arguments would have no result
        taken; False once the job takes no more."""
        n = count or 1
        with self._room:
            while not self.killing and (
                self.unsent_bytes >= max_bytes
                or len(self._items) >= max_items
                or self._read + n - self.taken > max(ahead, n)
            ):
                self._waiting += 1
                try:
                    self._room.wait()
                finally:
                    self._waiting -= 1
            if self.killing or self.input_closed:
                return False
            self._read += n
            self._items.append((blob, tag, count))
            self.unsent_bytes += len(blob)
            self._wake_soon()
            return True

    def close_input(self, error: BaseException | None = None) -> None:
        """No more arguments. With ``error`` the job fails with it after those queued before."""
        with self.lock:
            if not self.input_closed:
                self.input_closed = True
                self._input_error = error
                self._wake_soon()

    def withdraw(self, on_item: Callable[[Any], None] | None = None) -> list[Any]:
        """Remove every unsent item; ``on_item(tag)`` runs for each under :attr:`lock`."""
        with self.lock:
            taken = list(self._items)
            self._items.clear()
            self.unsent_bytes = 0
            self._room.notify_all()
            if on_item is not None:
                for _, tag, _ in taken:
                    on_item(tag)
            if taken:
                self._wake_soon()  # the end of input may now be reachable
        return [tag for _, tag, _ in taken]

    def kill_soon(self) -> None:
        """Like :meth:`kill` without taking the lock (for finalizers, which may run anywhere)."""
        self.killing = True
        self.input_closed = True
        self.call_soon(self.apply, "kill")

    def kill(self) -> None:
        """Stop the job now: unsent arguments are dropped and running ones are cancelled."""
        self._stop_input()
        self.call_soon(self.apply, "kill")

    def detach(self) -> None:
        """Take no more results here (another console collects them); the job runs on."""
        self._stop_input()
        if self.client is not None:
            self.call_soon(self.client.forget, self)

    def collect(
        self,
        sink: Sink,
        *,
        tick: Callable[[], None] | None = None,
        interval: float = 0.2,
        until: float | None = None,
    ) -> JobOutcome:
        """Feed the job's results into ``sink`` on this thread until it ends; its outcome.
        ``tick`` runs every ``interval`` s; past ``until`` (monotonic) TimeoutError. A sink that
        cannot write kills the job; a job that did not finish raises, the sink closed incomplete.
        """
        next_tick = time.monotonic() + interval
        while True:
            wait = interval if until is None else min(interval, max(until - time.monotonic(), 0))
            try:
                event = self.next_event(wait)
            except queue.Empty:
                event = None
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + interval
            if event is None:
                if until is not None and time.monotonic() >= until:
                    raise TimeoutError("the job did not end in time")
                continue
            if event[0] == "end":
                return self._close_sink(sink)
            try:
                taken = _to_sink(event, sink)
                with self._room:  # a reader waiting for results to be taken may go on
                    self.took(taken)
                    self._room.notify()
            except Exception as exc:
                error = self._output_error(exc)
                self.kill()
                _close_quietly(sink)
                raise error from None

    def next_event(self, timeout: float | None) -> tuple[Any, ...]:
        """The consumer's next event (one already there even past ``timeout``); queue.Empty if
        none comes in time. While the consumer waits, a job held for its results goes on."""
        try:
            return self.events.get_nowait()
        except queue.Empty:
            if timeout is not None and timeout <= 0:
                raise
            if self.result_buffer:
                self.waiting_for_results()
            try:
                return self.events.get(timeout=timeout)
            finally:
                self.wanting = False

    def _output_error(self, exc: Exception) -> RemapError:
        job = self.session.job_id
        if isinstance(exc, OSError):  # a write the sink did not name (stdout, a pipe)
            reason = os_reason(exc)
            return OutputError(f"job {job}: this console could not write its results: {reason}")
        return _console_error(exc, job, "saving")

    def _close_sink(self, sink: Sink) -> JobOutcome:
        if self.error is not None:
            _close_quietly(sink)
            raise self.error
        try:
            sink.close(complete=True)
        except Exception as exc:  # the output could not be finished: say so, never hang
            raise JobFailed(
                f"job {self.session.job_id} finished but its results could not be saved: {exc}"
            ) from None
        assert self.outcome is not None
        return self.outcome

    # ------------------------------------------------------------ flow control of results

    def took(self, n: int) -> None:
        """The consumer (one thread) took ``n`` more results from :attr:`events`."""
        self.taken += n
        if self.taken >= self._resume_at:
            self._resume_at = sys.maxsize
            self.call_soon(self._regulate)

    def dropped(self) -> None:
        """The consumer dropped what it held (the job is being killed): none counts as held."""
        with self.lock:
            self.taken = max(self.taken, self._arrived)

    def waiting_for_results(self) -> None:
        """The consumer is about to wait for a result: a held job must go on."""
        with self.lock:
            self._wanted_at = self._arrived
            self.wanting = True
        if self.session.held:
            self.call_soon(self._regulate)

    @property
    def held_result_bytes(self) -> int:
        """Pickled bytes of results delivered and not yet taken (0 without ``result_buffer``)."""
        with self.lock:
            return self._arrived_bytes - self._bytes_at(self.taken)

    def _bytes_at(self, taken: int, forget: bool = False) -> int:
        """The bytes of the first ``taken`` results (a message taken in part counts its share);
        ``forget``: drop the marks of messages wholly taken (under :attr:`lock`)."""
        marks = self._marks
        if forget:
            while marks and marks[0][0] <= taken:
                self._base = marks.popleft()
        count, nbytes = self._base
        for mark_count, mark_bytes in marks:
            if mark_count > taken:
                return nbytes + (mark_bytes - nbytes) * (taken - count) // (mark_count - count)
            count, nbytes = mark_count, mark_bytes
        return nbytes

    def _regulate(self) -> None:
        """Reactor thread: hold the job while over ``result_buffer`` bytes of results wait (and
        the consumer is not waiting); go on at half of that. Calls already on nodes still
        answer: what is held beyond the bound is at most the results message that crossed it
        and the results of the calls out when the hold reaches the server."""
        session, limit = self.session, self.result_buffer
        if not limit or session.finished or session.job_id is None:
            return
        while True:
            taken = self.taken
            with self.lock:
                held = self._arrived_bytes - self._bytes_at(taken, forget=True)
                self.held_peak = max(self.held_peak, held)
                starved = self.wanting and self._wanted_at == self._arrived
                hold = held > (limit // 2 if session.held else limit) and not starved
                resume_at = sys.maxsize
                if hold:  # the count taken at which at most half the bound is held
                    target = self._arrived_bytes - limit // 2
                    resume_at = next((c for c, b in self._marks if b >= target), self._arrived)
            self._resume_at = resume_at
            if self.taken < resume_at:
                break  # (else the consumer took them meanwhile: look again)
        if hold != session.held:
            self.apply("hold", hold)

    # ------------------------------------------------------------ reactor thread

    def submitting(self, client: ClusterClient, rid: int) -> None:
        self.client = client
        self.session.frame_room = client.frame_room()
        self.apply("submit", rid, resumable=client.redial is not None)

    def apply(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Hand the session one event, send what the window allows, deliver the rest."""
        with self._drive:
            getattr(self.session, event)(*args, **kwargs)
            self._pump()
            self._flush()

    def _pump(self) -> None:
        if self.client is None or self.client.link is not None:  # else reconnecting: it waits
            self.session.pump(self._take)

    def results(self, msg: m.Results) -> None:
        """Results open no window: deliver them without pumping."""
        if msg.output and self.on_output is not None:
            self.on_output(msg.answered[0] if msg.answered else -1, msg.output)
        with self._drive:
            if self.on_result is not None:
                lone = self.session.lone_result(msg)
                if lone is not None:
                    index, value = lone
                    if not self.on_result(index, value):
                        self.events.put(("items", self, [(index, value, None)], None))
                    return
            self.session.results(msg)
            if self.result_buffer:  # counted before the consumer may take them (see wanting)
                with self.lock:
                    self._arrived += len(msg.answered)
                    self._arrived_bytes += len(msg.payload)
                    self._marks.append((self._arrived, self._arrived_bytes))
                self._regulate()
            self._flush()

    def notice(self, text: str) -> None:
        if self.on_notice is not None:
            self.on_notice(text)

    def fail(self, error: Exception) -> None:
        """The connection was lost, or the server refused the job."""
        self.apply("fail", error)

    def args_stored(self, info: dict[str, Any]) -> None:
        """(Reactor thread.) The server's answer to a detached job's ``args_end``."""
        self.stored = info
        self.stored_event.set()

    def _wake(self) -> None:
        with self._drive:
            with self.lock:
                self._wake_pending = False
            self._pump()
            self._flush()

    def _flush(self) -> None:
        """Send the session's messages, queue its events, and end once it has finished."""
        session, client = self.session, self.client
        while session.outbox:
            out, session.outbox = session.outbox, []
            for msg in out:
                if client is None:
                    break
                if type(msg) is tuple:
                    client.kill_quietly(msg[1])
                    continue
                try:
                    client.send(msg)
                except RemapError as exc:  # not connected: nothing more goes out
                    session.fail(exc)
                    break
        if session.events:
            events, session.events = session.events, []
            put = self.events.put
            for event in events:
                if event[0] == "items":
                    _, indices, values, infos, arguments = event
                    if infos is None and self.runs and _consecutive(indices):
                        put(("runs", self, [(indices[0], values)], arguments))
                        continue
                    batch = list(zip(indices, values, infos or itertools.repeat(None)))
                    if self.on_items is not None:
                        batch = self.on_items(batch)
                        if not batch:
                            continue
                    put(("items", self, batch, arguments))
                else:
                    put((event[0], self, *event[1:]))
        if session.finished and not self.finished.is_set():
            self._stop_input()
            if client is not None:
                client.forget(self)
            self.error, self.outcome = session.error, session.outcome
            self.events.put(("end", self, session.error))
            self.finished.set()

    def _wake_soon(self, waits: bool = False) -> None:
        # called with self.lock held; one wake-up per batch of puts, not one per argument
        if not self._wake_pending:
            self._wake_pending = True
            (self._call_quietly if waits else self.call_soon)(self._wake)

    def _stop_input(self) -> None:
        with self.lock:
            self.killing = True  # no args_end now: the job must end killed, not done
            self.input_closed = True
            # calls never sent stay (without pickles) for the owner to settle by withdraw
            kept = [(b"", tag, 0) for _, tag, _ in self._items] if self.on_send else []
            self._items.clear()
            self._items.extend(kept)
            self.unsent_bytes = 0
            self._room.notify_all()

    def _split_head(self, entry: tuple[bytes, Any, int]) -> None:
        """Splitter thread: put ``entry``, the group at the head of the queue, back as groups of
        one. Unpickling runs user code and may be slow: never on the reactor thread."""
        blob, tag, n = entry
        try:
            ones = split_group(blob, n, tag)
        except BaseException as exc:  # it will not unpickle here: _take raises it, in order
            if not isinstance(exc, Exception):  # (user code's SystemExit: not for the reactor)
                exc = JobFailed(f"unpickling an argument group raised {type(exc).__name__}")
            with self.lock:
                if self._split is not None and self._split[0] is entry:
                    self._split = (entry, exc)
                    self._wake_soon()
            return
        with self.lock:
            if self._split is None or self._split[0] is not entry:
                return  # (another split began: this entry was withdrawn meanwhile)
            self._split = None
            items = self._items
            if items and items[0] is entry:  # else withdrawn, or the job stopped meanwhile
                items.popleft()
                items.extendleft(reversed(ones))
                self.unsent_bytes += sum(len(one[0]) for one in ones) - len(blob)
            self._wake_soon()

    def _take(
        self, limit: int, room: int, start: int
    ) -> tuple[list[bytes], list[int], list[Any], bool]:
        """Up to ``limit`` arguments in ``room`` bytes (or one pickle; each costs 9 more): pickles
        of one kind (bare, or groups), the group sizes, their tags, and whether the input ended."""
        out: list[bytes] = []
        groups: list[int] = []
        tags: list[Any] = []
        count = nbytes = 0
        session = self.session
        most = session.frame_room
        if session.group_bytes and session.group_bytes < most:
            most = session.group_bytes
        on_send = self.on_send
        append, add_tag = out.append, tags.append
        with self.lock:
            items = self._items
            pop = items.popleft
            taken_bytes = 0
            try:  # a job's every argument passes here: one len() each, no max() or bool()
                while items:
                    blob, tag, n = items[0]
                    size = len(blob)
                    if n > 1 and size > EARLY_GROUP_BYTES and session.job_id is None:
                        break  # the server may say a bound first (pumped again on `submitted`)
                    if n > 1 and size > most:  # (over the frame, or no node takes it)
                        split = self._split
                        if split is None or split[0] is not items[0]:
                            self._split = (items[0], None)
                            threading.Thread(
                                target=self._split_head,
                                args=(items[0],),
                                name="remap-split-group",
                                daemon=True,
                            ).start()
                        elif split[1] is not None:
                            raise split[1]  # it would not unpickle: the job fails there, in order
                        break  # the split's end wakes the stream
                    cost = size + 9
                    if out and (
                        nbytes + cost > room or cost >= LARGE_FRAME or nbytes >= LARGE_FRAME
                    ):
                        break  # a large pickle goes alone: sent as is, not joined
                    if count + (n or 1) > limit or (out and (not groups if n else groups)):
                        break  # a group never passes the window; one message, one kind
                    pop()
                    taken_bytes += size
                    if tag is not None and on_send is not None and not n:
                        if not on_send(start + count, tag):
                            continue
                    append(blob)
                    add_tag(tag)
                    nbytes += cost
                    if n:
                        count += n
                        groups.append(n)
                    else:
                        count += 1
            finally:
                self.unsent_bytes -= taken_bytes
            if out and self._waiting:
                self._room.notify()
            # once the input closed, the next take must run: it ends the input or raises its error
            self.session.drained = not items and not self.input_closed
            ended = self.input_closed and not items and not self.killing
            if ended and not out and self._input_error is not None:
                raise self._input_error
            return out, groups, tags, ended and self._input_error is None


#: what a calling thread sends itself (see :meth:`JobStream._pumped`)
_ARGS_MESSAGES = (m.Args, m.ArgsEnd)


def _consecutive(indices: list[int] | range) -> bool:
    if type(indices) is range:  # a run as the server sent it: nothing to compare
        return bool(indices)
    return bool(indices) and indices == list(range(indices[0], indices[0] + len(indices)))


def _to_sink(event: tuple[Any, ...], sink: Sink) -> int:
    """One event's results into a sink; how many arguments they answer."""
    kind, count = event[0], 0
    if kind == "runs":
        for first, values in event[2]:
            sink.add_results(list(range(first, first + len(values))), event[3], values)
            count += len(values)
    elif kind == "items":
        batch, arguments = event[2], event[3]
        if not any(map(_ERROR, batch)):
            sink.add_results([i for i, _, _ in batch], arguments, [r for _, r, _ in batch])
        else:
            args = arguments if arguments is not None else itertools.repeat(None)
            for (index, result, error), argument in zip(batch, args):
                sink.add(index, argument, result, error)
        count = len(batch)
    elif kind == "partial":
        sink.add_partial(event[2], event[3])
        count = event[2]
    sink.flush()
    return count


_ERROR = operator.itemgetter(2)


def _close_quietly(sink: Sink) -> None:
    with contextlib.suppress(Exception):
        sink.close(complete=False)  # keep the first error; the sink's own is secondary


def read_into(
    stream: JobStream,
    source: Iterator[Any],
    *,
    max_bytes: int = READ_AHEAD_BYTES,
    max_items: int = READ_AHEAD_ITEMS,
    ahead: int = READ_AHEAD_RESULTS,
    wait: float = GROUP_WAIT,
) -> threading.Thread:
    """Read and pickle ``source`` into ``stream`` on a thread of its own, so a blocking source
    never stops the network. Arguments go in groups; one open ``wait`` seconds goes as it is.
    At most ``max_bytes`` (or ``max_items`` pickles) wait, and at most ``ahead`` arguments have
    no result taken (not for a detached job: its results are not taken here); an error in the
    source fails the job after the arguments before it."""
    if stream.session.params.detach:
        ahead = sys.maxsize
    reader = _GroupReader(stream, source, max_bytes, max_items, ahead, wait)
    thread = threading.Thread(target=reader.read, name="remap-arguments", daemon=True)
    thread.start()
    return thread


class _GroupReader:
    """:func:`read_into`'s two threads: the reader fills the open group and queues it once
    full; the flusher queues one that stayed open ``wait`` seconds. :attr:`put_lock` keeps
    groups in the source's order."""

    def __init__(
        self,
        stream: JobStream,
        source: Iterator[Any],
        max_bytes: int,
        max_items: int,
        ahead: int,
        wait: float,
    ) -> None:
        self.stream, self.session, self.source, self.wait = stream, stream.session, source, wait
        self.bounds = (max_bytes, max_items, ahead)
        #: a gang's arguments each go alone; else at most what ``ahead`` and ``max_items`` allow
        self.cap = 1 if self.session.params.gang else max(1, min(ahead, max_items, m.MAX_GROUP))
        #: guards the open group and the fields below (a plain lock: the reader takes it per
        #: argument, and a Condition's ``with`` is a Python call)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.put_lock = threading.Lock()
        self.group: list[Any] = []
        self.opened = 0  # groups opened so far: the flusher's way to tell one stayed open
        self.want = 1  # the first argument alone: its size tells how many fit a group
        self.queued = 0  # arguments queued
        self.ended = self.idle = self.stopped = False

    def read(self) -> None:
        flusher = threading.Thread(target=self._flush, name="remap-arguments-flush", daemon=True)
        flusher.start()
        stream, lock, cond, error = self.stream, self.lock, self.cond, None
        try:
            for value in self.source:
                if stream.killing or self.stopped:
                    return  # the job ended or is being killed
                with lock:
                    group = self.group
                    group.append(value)
                    n = len(group)
                    if n == 1:
                        self.opened += 1
                        if self.idle:
                            cond.notify()
                if n >= self.want and not self.close_group():
                    return
        except BaseException as exc:  # reported in order, after the arguments before it
            error = exc
        finally:
            with cond:
                self.ended = True
                cond.notify()
        if self.close_group():
            stream.close_input(error)

    def _flush(self) -> None:
        """Queue a group that stayed open a whole ``wait``; sleep while none is open."""
        cond, stream, seen = self.cond, self.stream, 0
        with cond:
            while not (self.ended or self.stopped or stream.killing):
                if not self.group:
                    self.idle = True  # the reader wakes us when it opens one
                    cond.wait(1.0)  # (or a reader stuck in a FIFO after a kill: look again)
                    self.idle = False
                elif self.opened != seen:
                    seen = self.opened
                    cond.wait(self.wait)
                else:  # open since the last look: the source is slow, or blocks
                    cond.release()
                    try:
                        self.close_group(seen)
                    finally:
                        cond.acquire()

    def close_group(self, serial: int | None = None) -> bool:
        """Pickle and queue the open group (if ``serial``: only if it is still that one); False
        once the job takes no more arguments."""
        with self.put_lock:
            with self.lock:
                group = self.group
                if not group or (serial is not None and serial != self.opened):
                    return not self.stopped
                self.group = []
            try:
                ok = self._queue(group)
            except BaseException as exc:  # an argument that will not pickle: the job fails there
                self.stream.close_input(exc)
                ok = False
            self.stopped = self.stopped or not ok
            return ok

    def _queue(self, group: list[Any]) -> bool:
        session, put, n = self.session, self.stream.put_waiting, len(group)
        keep = session.keep_arguments
        blob = None
        if n > 1:
            with contextlib.suppress(Exception):
                blob = dumps(group)  # else pickled one by one below: the culprit fails alone
        if blob is not None and len(blob) <= min(
            16 * GROUP_BYTES, session.frame_room // 2, session.group_bytes or sys.maxsize
        ):
            self.queued += n
            self.want = next_group(session, self.queued, len(blob), n, self.cap)
            return put(blob, group if keep else None, *self.bounds, count=n)
        # one by one: a large argument among small ones is checked against the frame alone
        for value in group:
            one = dumps(value)
            if not put(one, value if keep else None, *self.bounds):
                return False
            self.queued += 1
        size, n = (len(one), 1) if blob is None else (len(blob), n)
        self.want = next_group(session, self.queued, size, n, self.cap)
        return True


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

    With ``redial`` (connects this handler again, firing once authenticated), a lost
    connection is dialled again with backoff for up to ``grace`` seconds and every job this
    console feeds is resumed, without a result lost or delivered twice; calls made meanwhile
    wait for it, and fail with its error if it gives up. Lost while idle, it is dialled once by
    the next call (the calls made meanwhile wait for that attempt). A closed client never dials.
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
        self._submits: dict[int, JobStream] = {}
        #: detached jobs' streams by the id of their ``args_end`` request
        self._ends: dict[int, JobStream] = {}
        self.runs: dict[int, JobStream] = {}
        self.lost: defer.Deferred = defer.Deferred()
        self.error: RemapError | None = None
        self.redial = redial
        self.grace = grace
        self.clock = clock
        #: closed on purpose: not dialled again
        self.closing = False
        self._redial_deadline = 0.0
        #: the lost connection is being dialled again (calls made now wait)
        self.redialing = False
        #: calls made while dialling again, as (go, fail)
        self._parked: list[tuple[Callable[[], None], Callable[[RemapError], None]]] = []
        self.reconnects = 0

    def frame_room(self) -> int:
        """Bytes one argument may take: the connection's frame limit less an ``args`` header."""
        limit = self.link.conn.max_frame if self.link is not None else DEFAULT_MAX_FRAME
        return max(limit - ARGS_OVERHEAD, 1)

    @property
    def dials_on_use(self) -> bool:
        """Whether a call made with no connection dials again (it was lost, not closed)."""
        return self.redial is not None and not self.closing

    def _park(self, go: Callable[[], None], fail: Callable[[RemapError], None]) -> bool:
        """Reactor thread: hold a call until the connection is back, if it is being dialled
        again or may be (a dial starts now); whether it was held."""
        if not self.redialing:
            if self.link is not None or not self.dials_on_use:
                return False
            # lost while idle: one dial, which later calls wait for
            self.redialing = True
            self._dial(self._dial_on_use_failed)
        self._parked.append((go, fail))
        return True

    def steady_link(self) -> PeerProtocol | None:
        """The connection, unless it is being dialled again (traffic waits for ``resume``)."""
        return None if self.redialing else self.link

    def send(self, msg: m.Message) -> None:
        if self.link is None:
            raise ConnectionLost(self.error and str(self.error) or "not connected to the server")
        self.link.send(msg)

    # ------------------------------------------------------------- requests

    def _request(self, build: Callable[[int], m.Message], *, wait: bool = False) -> defer.Deferred:
        """Its reply fires the Deferred; ``wait``: wait for a redial (a resume does not)."""
        d: defer.Deferred = defer.Deferred()
        if not (wait and self._park(lambda: self._send_request(build, d), d.errback)):
            self._send_request(build, d)
        return d

    def _send_request(self, build: Callable[[int], m.Message], d: defer.Deferred) -> None:
        rid = next(self._ids)
        self._waiters[rid] = d
        try:
            self.send(build(rid))
        except RemapError as exc:
            del self._waiters[rid]
            d.errback(exc)

    def status(self) -> defer.Deferred:
        d = self._request(lambda rid: m.StatusRequest(id=rid), wait=True)
        return d.addCallback(lambda r: {"nodes": r.nodes, "jobs": r.jobs, "server": r.server})

    def _info(self, build: Callable[[int], m.Message]) -> defer.Deferred:
        """A caller's request whose reply is its ``info``."""
        return self._request(build, wait=True).addCallback(lambda r: r.info)

    def _ask(self, message: Callable[..., m.Message], *fields: Any) -> defer.Deferred:
        """:meth:`_info` of ``message(request id, *fields)``."""
        return self._info(lambda rid: message(rid, *fields))

    kill = partialmethod(_ask, m.Kill)
    kill_cluster = partialmethod(_ask, m.KillCluster)
    drain = partialmethod(_ask, m.Drain)
    undrain = partialmethod(_ask, m.Undrain)
    exclude = partialmethod(_ask, m.Exclude)
    include = partialmethod(_ask, m.Include)

    def drive(self, kind: str, name: str, job: str, shipped: bytes) -> defer.Deferred:
        """Have the server run a data or vertex job's driver, detached; fires with its id.
        ``shipped``: the job's files (:func:`remap.bundle.pack_tree`)."""

        def build(rid: int) -> m.Drive:
            msg = m.Drive(id=rid, kind=kind, name=name, job=job, payload=shipped)
            size = frame_length(*m.encode(msg))
            limit = self.link.conn.send_limit if self.link is not None else DEFAULT_MAX_FRAME
            if size > limit:
                raise ConfigError(
                    f"the detached job with its module, modules: and files: is {size:,} bytes, "
                    f"over the {limit:,} bytes a message to the server may have "
                    "(REMAP_MAX_FRAME, the server's and this console's): raise it on both, or "
                    "put large files in the shared data directory"
                )
            return msg

        return self._info(build).addCallback(operator.itemgetter("job"))

    def watch(self, job: int, since: int = 0) -> defer.Deferred:
        """A detached job's status map, with its task output from byte ``since`` on."""
        return self._info(lambda rid: m.Attach(id=rid, job=job, since=since))

    def kill_quietly(self, job: int | None) -> None:
        if job is not None and self.link is not None:
            self.kill(job).addErrback(lambda _f: None)

    def submit(self, stream: JobStream) -> None:
        """Start a job (reactor thread); its end reaches ``stream``'s consumer as an event."""
        if self._park(lambda: self._submit_parked(stream), stream.fail):
            return
        rid = next(self._ids)
        self._submits[rid] = stream
        if stream.session.params.detach:  # (before an argument can go: args_end may follow)
            end = stream.session.end_id = next(self._ids)
            self._ends[end] = stream
        stream.submitting(self, rid)

    def _submit_parked(self, stream: JobStream) -> None:
        if stream.killing:  # killed (its consumer gone) before it could start
            stream.fail(JobKilled("the job was killed before it started"))
        else:
            self.submit(stream)

    def attach(self, job: int, stream: JobStream) -> None:
        """Receive a running or finished job's results into ``stream`` (reactor thread)."""
        stream.client = self
        stream.session.attach(job)
        self.runs[job] = stream
        d = self._request(lambda rid: m.Attach(id=rid, job=job))

        def refused(f: Any) -> None:
            self.runs.pop(job, None)
            stream.fail(f.value)

        d.addErrback(refused)

    def forget(self, stream: JobStream) -> None:
        """Route no more of a job's traffic to ``stream``."""
        job = stream.session.job_id
        if job is not None and self.runs.get(job) is stream:
            del self.runs[job]
        rid = stream.session.submit_id
        if rid is not None and self._submits.get(rid) is stream:
            del self._submits[rid]
        # (its args_end's answer stays routed: a job may end before its commit is answered)

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
                run.apply("grant", msg.count)
        elif t is m.GroupLimit:  # (before `submitted`: under minus the submit's id)
            run = self.runs.get(msg.job) if msg.job > 0 else self._submits.get(-msg.job)
            if run is not None:
                run.apply("group_limit", msg.max_bytes)
        elif t is m.Submitted:
            run = self._submits.pop(msg.re, None)
            if run is not None:
                self.runs[msg.job] = run
                run.apply("submitted", msg.job, msg.window)
        elif t is m.JobDone:
            run = self.runs.pop(msg.job, None)
            if run is not None:
                run.apply("ended", msg)
        elif t is m.JobNotice:
            run = self.runs.get(msg.job)
            if run is not None:
                run.notice(msg.message)
        elif t in (m.Ok, m.StatusReply):
            d = self._waiters.pop(msg.re, None)
            if d is not None:
                d.callback(msg)
            elif (run := self._ends.pop(msg.re, None)) is not None:
                run.args_stored(msg.info)
        elif t is m.Error:
            self._error(msg)
        elif t is not m.Heartbeat:
            self.log.warn("unexpected {type} from the server", type=msg.TYPE)

    def _error(self, msg: m.Error) -> None:
        """A request's error keeps the server's code (its class, or ``.code``) to the caller."""
        error = error_from_wire(msg.code, msg.message)
        if msg.re is not None:
            d = self._waiters.pop(msg.re, None)
            if d is not None:
                d.errback(error)
                return
            end = self._ends.pop(msg.re, None)
            if end is not None:
                end.args_stored({"stored": False, "why": msg.message})
                return
            run = self._submits.pop(msg.re, None)
            if run is not None:
                self._ends.pop(run.session.end_id, None)  # (its args_end is dropped unanswered)
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
        elif self.redialing:  # what waits for the redial ends now, not at its next attempt
            self._give_up(self.error or ConnectionLost("closed while reconnecting"))

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        """Fail every waiter with one error; keep the jobs to resume if it can dial again."""
        if self.redialing and link is not self.link:
            return  # a new connection that failed before it was up: the redial loop goes on
        self.link = None
        err = self.error or ConnectionLost(f"lost the connection to the server ({error})")
        self.error = err
        waiters, self._waiters = self._waiters, {}
        for d in waiters.values():
            d.errback(err)
        ends, self._ends = self._ends, {}
        for run in ends.values():  # (a job not confirmed held: its consumer says so)
            run.args_stored({"stored": False, "why": f"no answer came: {err}"})
        keep = {}
        if self.redial is not None and self.grace > 0 and not self.closing:
            keep = {job: run for job, run in self.runs.items() if run.session.resumable}
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
                run.notice(
                    f"lost the connection to the server ({error}): reconnecting for up to "
                    f"{self.grace:g}s (REMAP_CONSOLE_GRACE)"
                )
            self.log.warn(
                "lost the server ({error}); reconnecting to resume job(s) {jobs}",
                error=error,
                jobs=sorted(keep),
            )
            self.redialing = True
            self._redial_soon(0.1)
        elif not self.lost.called:
            self.lost.callback(err)

    def _redial_soon(self, delay: float) -> None:
        self.clock.callLater(delay, self._redial_now, delay)

    def _dial(self, failed: Callable[[Exception], None]) -> None:
        """Dial once; ``failed(error)`` if it fails."""

        def errback(f: Any) -> None:
            if self.redialing:  # else given up meanwhile (closed)
                failed(f.value)

        assert self.redial is not None
        d = defer.maybeDeferred(self.redial)
        d.addCallbacks(lambda _link: self._resume_runs(), errback)

    def _dial_on_use_failed(self, exc: Exception) -> None:
        if not isinstance(exc, RemapError):  # a bug of the dial: still one line for the call
            exc = ConnectionLost(f"could not connect to the server again: {exc!r}")
        self._give_up(exc)  # the next call dials again

    def _redial_now(self, delay: float) -> None:
        if not self.redialing:
            return  # given up meanwhile (closed)
        if self.closing or not (self.runs or self._parked):
            self._give_up(self.error or ConnectionLost("closed while reconnecting"))
            return
        self._dial(lambda exc: self._redial_failed(exc, delay))

    def _redial_failed(self, exc: Exception, delay: float) -> None:
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
        self.redialing = False
        self.error = error
        runs, self.runs = list(self.runs.values()), {}
        parked, self._parked = self._parked, []
        for run in runs:
            run.fail(error)
        for _go, fail in parked:
            fail(error)
        if not self.lost.called:
            self.lost.callback(error)

    def _resume_runs(self) -> None:
        """Connected again: resume each job this console feeds, then run the parked calls."""
        if not self.redialing:  # closed while this dial went on: nothing is resumed
            if self.link is not None:
                self.link.close()
            return
        if self.link is None:  # lost again at once: what waits fails, the next call dials
            self._give_up(self.error or ConnectionLost("lost the server again while reconnecting"))
            return
        self.reconnects += 1
        self.error = None
        if self.lost.called:  # it fired when the idle connection was lost: a new one
            self.lost = defer.Deferred()
        self.log.info(
            "reconnected to the server at {peer} ({jobs} job(s) to resume, {calls} call(s) waiting)",
            peer=getattr(self.link, "peer", "?"),  # (a test's fake link has none)
            jobs=len(self.runs),
            calls=len(self._parked),
        )
        for job, run in list(self.runs.items()):
            d = self._request(run.session.resume_message)

            def resumed(reply: m.Ok, run: JobStream = run) -> None:
                if run.finished.is_set():
                    return
                run.notice("reconnected: the job goes on")
                run.apply("resumed", int(reply.info.get("window", 0)))

            def refused(f: Any, job: int = job, run: JobStream = run) -> None:
                if self.runs.get(job) is run:
                    del self.runs[job]
                run.fail(
                    JobFailed(
                        f"job {job} could not be resumed after the connection was lost: {f.value}"
                    )
                )

            d.addCallbacks(resumed, refused)
        # only now may a calling thread send a job's arguments itself (steady_link): each
        # job's resume request is out before any of its new arguments
        self.redialing = False
        parked, self._parked = self._parked, []
        for go, _fail in parked:
            go()

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat()
