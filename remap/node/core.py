"""A core: a long-lived child process that loads job functions and runs batches.

Runs as ``python -m remap.node.core``. It reads commands on fd 3 and writes answers on fd 4
(catalogue messages in the wire's frames), and before each call writes ``(position, start time)``
into a shared file on fd 5, so the node can tell which argument was running when it kills the
core (timeout) or the core dies (crash). User code's stdout/stderr are captured per batch.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

from protocol import messages as m
from protocol.framing import READ_SIZE, FrameDecoder, frame_parts, unsent
from remap.blobs import PICKLE_PROTOCOL, dumps, dumps_buffered, split
from remap.bundle import enter, enter_job, unwrap
from remap.calls import RESULT_REPR, UNPICKLABLE_RESULT
from remap.malloc import keep_freed_memory
from remap.shipping import load_function_blob, user_frames, user_traceback

CMD_FD, OUT_FD, SHM_FD = 3, 4, 5
#: what is running: the position of its first argument (-1 idle), when it started (monotonic),
#: and how many arguments from that position (> 1: an argument group, marked once)
SLOT = struct.Struct("<qdq")
MAX_OUTPUT = 64 * 1024
#: a running batch sends what it has finished at most this often, so results stream back
STREAM_SECONDS = 0.05
#: two argument groups in a row slower than this (or one slower than FINE_ONCE_SECONDS) make
#: the rest of the batch run one argument at a time (a mark per call, ~0.3 µs), so a crash names
#: its argument; two, so a core descheduled once on a busy machine stays on groups
FINE_SECONDS = 0.001
FINE_ONCE_SECONDS = 0.05


def commands(fd: int) -> Iterator[m.Message]:
    """The node's commands, until it closes the pipe (blocking: a core has nothing else to do);
    a small one in one ``read``, a large one straight into its own buffer."""
    decoder = FrameDecoder(max_frame=1 << 40)
    read, readv = os.read, os.readv
    while True:
        view = decoder.read_buffer() if decoder.gathering else None  # large: a call less
        if view is not None:
            n = readv(fd, [view])
            if not n:
                return
            decoder.wrote(n)
            frames = decoder.frames()
        else:
            data = read(fd, READ_SIZE)
            if not data:
                return
            frame = decoder.whole(data)  # a whole small command, the usual read: unbuffered
            frames = [frame] if frame is not None else decoder.feed(data)
        for frame in frames:
            yield m.decode(frame.header, frame.payload, channel="pipe")


def write_frame(fd: int, msg: m.Message) -> None:
    """Send ``msg`` to the node from its own buffers (a large answer is not copied; a small one
    goes as one buffer)."""
    parts = frame_parts(*m.encode(msg))
    sent = os.writev(fd, parts)
    if len(parts) == 1 and sent == len(parts[0]):  # the usual small answer, taken whole
        return
    while parts := unsent(parts, sent):
        sent = os.writev(fd, parts)


def task_count(batch: m.Task) -> int:
    """How many arguments a ``task`` carries."""
    if not batch.groups:
        return len(batch.sizes)
    return batch.count if batch.count >= 0 else sum(batch.groups) - batch.skip


def _error_entry(pos: int, exc: BaseException) -> list[Any]:
    tb = user_traceback(exc)
    return [pos, type(exc).__qualname__, str(exc)[:2000], tb[-8000:]]


def _exception_blob(exc: BaseException) -> bytes:
    # a traceback travels only if the user's code installed a pickler for it (tblib, as
    # distributed and dask do on import): then it holds the user's frames, not the core's,
    # which differ between the lone call's path and the loop's
    exc.__traceback__ = user_frames(exc.__traceback__)
    for _ in range(2):
        try:
            blob = dumps(exc)  # cloudpickle for exception classes defined in the job's own code
            pickle.loads(blob)  # only ship what the other side can rebuild
            return blob
        except Exception:
            if exc.__traceback__ is None:
                return b""
            # its text is in the error entry already; its frames may overflow pickling (a
            # RecursionError from joblib's nested Parallel)
            exc.__traceback__ = None
    return b""


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the real error
        text = f"<{type(value).__qualname__} object (repr failed: {exc!r})>"
    return text if len(text) <= 500 else text[:500] + "..."


#: a lone result of these types is pickled by ``pickle.dumps`` (0.2 µs) instead of
#: :func:`dumps_buffered` (1.1 µs, for pickles of a MiB); ``str`` and ``bytes`` up to SMALL_TEXT
_SMALL_TYPES = frozenset({int, float, bool, complex, type(None)})
_TEXT_TYPES = frozenset({str, bytes})
SMALL_TEXT = 4096


def _dumps_results(results: list[Any]) -> bytes:
    """The pickle of a batch's list of results (the same bytes either way)."""
    if len(results) == 1:
        t = type(value := results[0])
        if (t in _SMALL_TYPES and (t is not int or value.bit_length() <= 8 * SMALL_TEXT)) or (
            t in _TEXT_TYPES and len(value) <= SMALL_TEXT
        ):
            return pickle.dumps(results, PICKLE_PROTOCOL)
    return dumps_buffered(results)


def _pack_results(results: list[Any], errors: list[list[Any]]) -> tuple[list[bytes], bool]:
    """One pickle for the whole batch when it round-trips (tens of ns a result, not ~0.7 µs);
    else one per result. An exception that would not unpickle is replaced by None (``errors``
    has its text), so one odd exception cannot make the whole batch unreadable.
    """
    for entry in errors:
        exc = results[entry[0]]
        if not _exception_blob(exc):
            results[entry[0]] = None
    try:
        return [_dumps_results(results)], True
    except Exception:  # something needs cloudpickle, or cannot travel at all: go one by one
        pass
    failed = {e[0] for e in errors}
    blobs = []
    for pos, value in enumerate(results):
        if pos in failed:
            blobs.append(_exception_blob(value) if value is not None else b"")
            continue
        try:
            blobs.append(dumps(value))
        except Exception as exc:
            errors.append(_error_entry(pos, exc))
            errors[-1][2] = f"{UNPICKLABLE_RESULT}{errors[-1][2]}"
            # the pickling error itself travels (as ProcessPoolExecutor raises it), with what
            # the result looked like for the Pool's MaybeEncodingError
            setattr(exc, RESULT_REPR, _short_repr(value))
            blobs.append(_exception_blob(exc))
    errors.sort(key=lambda e: e[0])
    return blobs, False


class _BatchOutput(io.TextIOBase):
    """The core's stdout and stderr while a batch runs, one object for the core's whole life:
    a ``logging.StreamHandler`` made in one batch keeps writing to it in later batches."""

    def __init__(self, fallback: Any) -> None:
        super().__init__()
        self.fallback = fallback
        #: a batch is running: what is written is its output (a buffer made at the first write)
        self.capturing = False
        self.buffer: io.StringIO | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self.capturing:
            return self.fallback.write(text)
        if self.buffer is None:
            self.buffer = io.StringIO()
        return self.buffer.write(text)

    def flush(self) -> None:
        if not self.capturing:
            self.fallback.flush()

    def take(self) -> str:
        """What the batch wrote since the last take."""
        text = self.buffer.getvalue() if self.buffer is not None else ""
        self.buffer = None
        return text


class Core:
    def __init__(self, shm: mmap.mmap, emit: Any = None) -> None:
        self.shm = shm
        #: job → (function, reduce function, star, timed, reduce), or why it did not load
        self.jobs: dict[int, tuple[Any, Any, bool, bool, bool] | BaseException] = {}
        self.output = _BatchOutput(sys.__stderr__)
        #: ``emit(result)`` sends a streamed part of a running batch; None: no parts
        self.emit = emit
        #: the job whose directory the environment names (entered once, not per batch)
        self._entered: int | None = None
        #: jobs that shipped a bundle: only they have a directory to enter
        self._bundled: set[int] = set()

    def load(self, cmd: m.CoreLoad) -> None:
        inner = unwrap(cmd.payload, cmd.job)
        if inner is not cmd.payload:
            self._bundled.add(cmd.job)
        else:
            self._bundled.discard(cmd.job)
        fn, reduce_fn = load_function_blob(inner)
        self.jobs[cmd.job] = (fn, reduce_fn, cmd.star, cmd.timed, cmd.reduce)

    def drop(self, job: int) -> None:
        self.jobs.pop(job, None)
        self._bundled.discard(job)

    def run(self, cmd: m.Task) -> m.TaskResult:
        loaded = self.jobs.get(cmd.job)
        if not isinstance(loaded, tuple):
            return self._unloadable(cmd, loaded)
        fn, reduce_fn, star, timed, partial = loaded
        if cmd.job != self._entered:
            if cmd.job in self._bundled:
                enter_job(cmd.job)
            else:  # no bundle, no directory: nothing to look for on disk
                enter(None)
            self._entered = cmd.job
        if len(cmd.sizes) == 1 and not cmd.groups and not cmd.skip and not partial:
            return self._run_one(cmd, fn, star)
        shm, pack_into, clock = self.shm, SLOT.pack_into, time.monotonic
        loads = pickle.loads
        # a reduce job's batch (``partial``) keeps its fold as the only result
        results: list[Any] = []
        errors: list[list[Any]] = []
        captured = self.output
        captured.capturing, captured.buffer = True, None
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = captured
        emit, first, flushed = self.emit, 0, clock()
        skip, left = cmd.skip, task_count(cmd)
        # a job with a timeout marks every call (the node times each); others mark a group once
        fine, slow = bool(timed), False
        pos = 0
        try:
            blobs = split(cmd.sizes, cmd.payload)  # each with its count of arguments; 0: bare
            for blob, n in zip(blobs, cmd.groups) if cmd.groups else ((b, 0) for b in blobs):
                if left <= 0:
                    break
                bad: BaseException | None = None
                try:
                    group = loads(blob) if n else [loads(blob)]
                    if n and (type(group) is not list or len(group) != n):
                        raise ValueError(
                            f"an argument group of {n} did not unpickle as a list of {n}"
                        )
                except Exception as exc:  # every argument of the pickle fails with it
                    bad, group = exc, [None] * max(n, 1)
                if skip:
                    group, skip = group[skip:], 0
                if len(group) > left:
                    group = group[:left]
                left -= len(group)
                began = clock()
                pieces = [group[k : k + 1] for k in range(len(group))] if fine else (group,)
                for piece in pieces:
                    now = clock()
                    if emit is not None and now - flushed >= STREAM_SECONDS and pos > first:
                        # send what is done so far: results reach the caller as they complete
                        emit(self._reply(cmd, partial, results, errors, now - flushed, pos - first))
                        results, errors = [], []
                        first, flushed = pos, now
                    pack_into(shm, 0, pos, now, len(piece))
                    if bad is None and not star and not partial:
                        # the common case in C: a call's error resumes the map after it
                        done, size = 0, len(piece)
                        while done < size:
                            before = len(results)
                            try:
                                results.extend(map(fn, piece[done:] if done else piece))
                                done = size
                            except (Exception, KeyboardInterrupt, SystemExit) as exc:
                                done += len(results) - before
                                errors.append(_error_entry(pos + done - first, exc))
                                results.append(exc)
                                done += 1
                        pos += size
                        continue
                    for arg in piece:
                        try:
                            if bad is not None:
                                raise bad
                            if star:
                                result = fn(**arg) if isinstance(arg, dict) else fn(*arg)
                            else:
                                result = fn(arg)
                            if partial and results:
                                results[0] = reduce_fn(results[0], result)
                            else:
                                results.append(result)
                        except (Exception, KeyboardInterrupt, SystemExit) as exc:
                            # a task that raises KeyboardInterrupt or calls sys.exit() fails that
                            # call with it, as in multiprocessing; the core itself lives on
                            errors.append(_error_entry(pos - first, exc))
                            if not partial:
                                results.append(exc)
                        pos += 1
                if not fine:
                    took = clock() - began
                    fine = took > FINE_ONCE_SECONDS or (slow and took > FINE_SECONDS)
                    slow = took > FINE_SECONDS  # slow calls: mark each from now on
        finally:
            sys.stdout, sys.stderr = saved
            captured.capturing = False
        pack_into(shm, 0, -1, 0.0, 0)
        return self._reply(cmd, partial, results, errors, clock() - flushed, 0)

    def _run_one(self, cmd: m.Task, fn: Any, star: bool) -> m.TaskResult:
        """A batch of one bare argument (every lone ``submit``): :meth:`run`'s loop for it,
        without its set-up for groups, streaming and per-call marks."""
        shm, clock = self.shm, time.monotonic
        captured = self.output
        captured.capturing, captured.buffer = True, None
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = captured
        began = clock()
        try:
            bad: BaseException | None = None
            try:
                arg = pickle.loads(cmd.payload)
            except Exception as exc:  # the call fails with it
                bad, arg = exc, None
            SLOT.pack_into(shm, 0, 0, clock(), 1)
            try:
                if bad is not None:
                    raise bad
                if star:
                    results = [fn(**arg) if isinstance(arg, dict) else fn(*arg)]
                else:
                    results = [fn(arg)]
                errors: list[list[Any]] = []
            except (Exception, KeyboardInterrupt, SystemExit) as exc:  # as in run's loop
                results, errors = [exc], [_error_entry(0, exc)]
        finally:
            sys.stdout, sys.stderr = saved
            captured.capturing = False
        SLOT.pack_into(shm, 0, -1, 0.0, 0)
        return self._reply(cmd, False, results, errors, clock() - began, 0)

    def _reply(
        self,
        cmd: m.Task,
        partial: bool,
        results: list[Any],
        errors: list[list[Any]],
        elapsed: float,
        part: int,
    ) -> m.TaskResult:
        """The answer for the calls run since the last part (``part`` > 0: more follow);
        ``partial``: a reduce job's batch (its fold, ``results``' one value if any, is the
        answer)."""
        packed = False
        if partial:
            blobs = [dumps(value, large=True) for value in results]
        else:
            blobs, packed = _pack_results(results, errors)
        out = self.output.take()
        if len(out) > MAX_OUTPUT:
            out = out[:MAX_OUTPUT] + f"\n... ({len(out) - MAX_OUTPUT} more characters cut)"
        return m.TaskResult.make(
            task=cmd.task,
            sizes=list(map(len, blobs)),
            errors=errors,
            elapsed=elapsed,
            output=out,
            partial=partial,
            packed=packed,
            part=part,
            payload=b"".join(blobs),
        )

    @staticmethod
    def _unloadable(cmd: m.Task, exc: BaseException | None) -> m.TaskResult:
        """Every argument fails with the reason the function could not be loaded here."""
        exc = exc or RuntimeError(f"job {cmd.job} was never loaded on this core")
        entry = _error_entry(0, exc)
        entry[2] = f"the job's function could not be loaded on this node: {entry[2]}"
        if isinstance(exc, ModuleNotFoundError):  # a module of the caller's the node lacks
            entry[2] += (
                " (ship a module of yours with the job: the job file's modules:, or in Python"
                " modules=[...] / remap.ship_by_value(module); else install it on the node)"
            )
        n = task_count(cmd)
        errors = [[pos, *entry[1:]] for pos in range(n)]
        return m.TaskResult(task=cmd.task, sizes=[0] * n, errors=errors)


def _die_with_parent() -> None:
    """Linux: the kernel kills this core if its node dies, even mid-call in C code."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the node died before prctl took effect
        os._exit(1)


def main() -> None:
    _die_with_parent()
    keep_freed_memory()
    # Ctrl-C at a terminal reaches the whole process group: the node decides about its cores
    # (and PR_SET_PDEATHSIG ends them with it), so a core never takes SIGINT for itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = mmap.mmap(SHM_FD, SLOT.size)
    core = Core(shm, emit=lambda result: write_frame(OUT_FD, result))
    write_frame(OUT_FD, m.CoreReady(pid=os.getpid()))
    serve(core, CMD_FD, OUT_FD)


def serve(core: Core, cmd_fd: int, out_fd: int) -> None:
    """Answer the node's commands on ``cmd_fd`` until it closes the pipe (a bench runs it
    in-process)."""
    for cmd in commands(cmd_fd):
        t = type(cmd)
        if t is m.Task:
            write_frame(out_fd, core.run(cmd))
        elif t is m.CoreLoad:
            try:
                core.load(cmd)
            except Exception as exc:  # reported per argument when the job's batches run
                core.jobs[cmd.job] = exc
        elif t is m.CoreDrop:
            core.drop(cmd.job)


if __name__ == "__main__":
    sys.exit(main())
