"""A single call's path does no more work than it needs (issue 16, latency): each test counts
what one ``submit(f, x).result()`` costs at one hop (system calls, reactor wake-ups, passes
over the argument queue) and fails if the saved work comes back. No timings are asserted."""

from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Any

import pytest

from protocol import messages as m
from protocol.errors import RemoteProtocolError
from protocol.framing import encode_frame
from protocol.options import JobOptions
from remap import runtime
from remap.blobs import dumps
from remap.client import JobStream
from remap.node import core as core_module

# ============================================================================ caller → reactor


def test_the_caller_wakes_the_reactor_without_twisteds_waker(monkeypatch) -> None:
    """``thread_caller`` queues the call and writes the wake-up byte itself: the reactor runs
    it, and ``wakeUp`` (an ``os.write`` looked up through a deprecation proxy) is not used."""
    r = runtime.ensure_running()
    runtime.run(lambda: None, timeout=10)  # the reactor runs: its waker is installed
    wakes: list[int] = []
    monkeypatch.setattr(r, "wakeUp", lambda: wakes.append(1))
    ran: queue.SimpleQueue = queue.SimpleQueue()
    call_soon = runtime.thread_caller(r)
    for i in range(3):
        call_soon(lambda i=i: ran.put((i, threading.current_thread().name)))
    got = [ran.get(timeout=10) for _ in range(3)]
    assert got == [(i, "remap-reactor") for i in range(3)]
    assert wakes == []


def test_another_waker_is_woken_the_usual_way() -> None:
    class FakeReactor:
        def __init__(self) -> None:
            self.threadCallQueue: list[Any] = []
            self.waker = object()
            self.wakes = 0

        def wakeUp(self) -> None:
            self.wakes += 1

    r = FakeReactor()
    runtime.thread_caller(r)(print, 1)
    assert r.threadCallQueue == [(print, (1,), {})] and r.wakes == 1


# ============================================================================ the console's stream


class Client:
    """What a JobStream needs of a ClusterClient: a link, a frame size, a send."""

    redial = None
    link = object()

    def __init__(self) -> None:
        self.sent: list[m.Message] = []

    def frame_room(self) -> int:
        return 1 << 20

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def forget(self, stream: JobStream) -> None:
        pass

    def kill_quietly(self, job: int | None) -> None:
        pass


class CountingStream(JobStream):
    takes = 0

    def _take(self, limit: int, room: int, start: int) -> Any:
        self.takes += 1
        return super()._take(limit, room, start)


def test_one_call_takes_from_the_queue_once_and_its_result_not_at_all() -> None:
    """A put wakes the stream once: one pass sends the argument and sees the queue empty, so
    none looks again (it used to: 2). A result opens no window, so nothing looks at the queue
    for it (it used to: 3 + 1)."""
    scheduled: list[Any] = []  # the reactor's queue: run by hand, never under the caller's lock
    stream = CountingStream(b"fn", JobOptions(), call_soon=lambda *call: scheduled.append(call))
    client = Client()
    stream.submitting(client, 1)  # type: ignore[arg-type]
    stream.apply("submitted", 5, 100)
    client.sent.clear()
    stream.takes = 0
    stream.put_many([dumps(41)])
    assert len(scheduled) == 1, "one wake-up"
    fn, *args = scheduled.pop()
    fn(*args)
    assert [type(x) for x in client.sent] == [m.Args] and stream.takes == 1
    stream.takes = 0
    stream.results(m.Results(job=5, indices=[0], sizes=[2], payload=dumps([42])[:2]))
    assert stream.takes == 0
    kind, _, batch, _ = stream.events.get_nowait()
    assert kind == "items" and batch[0][0] == 0


def test_sending_a_pending_future_takes_no_lock_of_its_own() -> None:
    """A call handed to the server becomes running without its future's condition (three
    Python calls an argument, on the reactor or the submitting thread); a future cancelled
    first is still dropped, and its waiters told."""
    import concurrent.futures
    import types

    from remap.executor import RemoteFuture, _SubmitStream

    class NoCondition:
        def __enter__(self) -> None:
            raise AssertionError("the future's condition was taken")

        def __exit__(self, *exc: Any) -> None:
            pass

    settled: list[int] = []
    stream = types.SimpleNamespace(futures={}, _settled=lambda: settled.append(1))
    future = RemoteFuture()
    condition, future._condition = future._condition, NoCondition()  # type: ignore[assignment]
    assert _SubmitStream._on_send(stream, 3, future)  # type: ignore[arg-type]
    future._condition = condition
    assert future.running() and stream.futures == {3: future} and future._claimed
    cancelled = RemoteFuture()
    assert concurrent.futures.Future.cancel(cancelled)  # cancelled, its waiters not yet told
    assert not _SubmitStream._on_send(stream, 4, cancelled)  # type: ignore[arg-type]
    assert cancelled.cancelled() and settled == [1] and 4 not in stream.futures
    assert concurrent.futures.wait([cancelled], timeout=1).done == {cancelled}


def test_a_result_is_set_and_its_waiter_woken_without_entering_the_condition() -> None:
    """The reactor sets a future's result and wakes its waiters holding the condition's own
    lock: entering the condition and ``notify_all`` are four Python calls a result."""
    import threading as threads
    import types

    from remap.executor import RemoteFuture, _SubmitStream

    class Watched(threads.Condition):
        entered_by: list[str] = []

        def __enter__(self) -> bool:
            Watched.entered_by.append(threads.current_thread().name)
            return super().__enter__()

    future = RemoteFuture()
    future._condition = Watched(future._condition._lock)  # type: ignore[attr-defined]
    future._state = "RUNNING"
    got: queue.SimpleQueue = queue.SimpleQueue()
    waiter = threads.Thread(target=lambda: got.put(future.result(timeout=30)), name="waiter")
    waiter.start()
    job = types.SimpleNamespace(lock=threads.Lock())
    stream = types.SimpleNamespace(
        futures={3: future}, job=job, wake_later=None, _settled=lambda: None
    )
    stream._resolve_one = functools.partial(_SubmitStream._resolve_one, stream)
    assert _SubmitStream._resolve_now(stream, [(3, 42, None)]) == []  # type: ignore[arg-type]
    assert got.get(timeout=30) == 42
    waiter.join(30)
    assert set(Watched.entered_by) <= {"waiter"}  # only the waiter's own result() entered it


def test_a_waiter_that_saw_the_result_never_gets_it_again() -> None:
    """Waking a thread in ``result()`` waits for the reactor's sleep, but ``wait()`` and
    ``as_completed()`` waiters hear of a result with its state, as ``set_result`` does: one
    installed after it saw the future finished (as_completed yields it at once) is never
    handed it again (as_completed would yield it twice and fail)."""
    import concurrent.futures
    import threading as threads

    hooks: list[Any] = []
    future = _running_future()
    sleeper = threads.Lock()  # a thread waiting in result(), as Condition.wait holds it
    sleeper.acquire()
    future._condition._waiters.append(sleeper)
    assert _resolve_now(future, hooks) == []
    assert future.done() and hooks, "the result is set; the wake-up waits for the sleep"
    late = concurrent.futures._base._AsCompletedWaiter()
    with future._condition:
        future._waiters.append(late)  # as as_completed installs it, having seen FINISHED
    for hook in hooks:
        hook()
    assert late.finished_futures == []
    assert not sleeper.locked(), "the thread in result() was woken"
    assert future.result(timeout=0) == 42


def test_a_result_nobody_waits_on_books_no_wake_up() -> None:
    """A result set where no thread waits in ``result()`` (the waiting thread ran the loop
    that read it, or nobody asked yet) books no wake-up before the reactor's sleep."""

    hooks: list[Any] = []
    future = _running_future()
    assert _resolve_now(future, hooks) == []
    assert future.result(timeout=0) == 42 and hooks == []


def _running_future() -> Any:
    from remap.executor import RemoteFuture

    future = RemoteFuture()
    future._state = "RUNNING"
    return future


def _resolve_now(future: Any, hooks: list[Any]) -> list[Any]:
    """``_SubmitStream._resolve_now`` of result 42 for ``future`` (index 3) on a stub stream
    whose wake-ups go to ``hooks``."""
    import threading as threads
    import types

    from remap.executor import _SubmitStream

    stream = types.SimpleNamespace(
        futures={3: future},
        job=types.SimpleNamespace(lock=threads.Lock()),
        wake_later=hooks,
        _settled=lambda: None,
    )
    stream._resolve_one = functools.partial(_SubmitStream._resolve_one, stream)
    return _SubmitStream._resolve_now(stream, [(3, 42, None)])  # type: ignore[arg-type]


# ============================================================================ node → core


def _frame(msg: m.Message) -> bytes:
    return b"".join(encode_frame(*m.encode(msg)))


def test_a_core_reads_a_small_command_in_one_system_call(monkeypatch) -> None:
    """A prefix read then a body read was two ``read`` calls per command."""
    r, w = os.pipe()
    reads: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    try:
        run = m.Task(task=1, job=2, sizes=[3], payload=b"abc")
        os.write(w, _frame(run))
        commands = core_module.commands(r)
        assert next(commands) == run
        assert len(reads) == 1
    finally:
        os.close(r)
        os.close(w)


def test_a_core_reads_commands_in_any_split_and_large_ones_whole() -> None:
    r, w = os.pipe()
    big = os.urandom(600_000)  # over the pipe's size and the decoder's large-frame mark
    sent = [
        m.CoreLoad(job=1, star=False, payload=b"f"),
        m.Task(task=1, job=1, sizes=[1, 2], payload=b"xyz"),
        m.Task(task=2, job=1, sizes=[len(big)], payload=big),
        m.CoreDrop(job=1),
    ]
    data = b"".join(map(_frame, sent))

    def writer() -> None:
        for k in range(0, len(data), 7777):  # splits land inside prefixes and headers
            os.write(w, data[k : k + 7777])
        os.close(w)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        got = list(core_module.commands(r))
    finally:
        thread.join(timeout=30)
        os.close(r)
    assert [type(x) for x in got] == [type(x) for x in sent]
    assert bytes(got[2].payload) == big and got[1].sizes == [1, 2]


@pytest.mark.parametrize("junk", [b"\x00\x00\x00\x09\x00\x00\x00\x05garbage!!"])
def test_a_core_refuses_a_malformed_command(junk: bytes) -> None:
    r, w = os.pipe()
    os.write(w, junk)
    os.close(w)
    try:
        with pytest.raises(RemoteProtocolError):
            list(core_module.commands(r))
    finally:
        os.close(r)


# ============================================================================ the reactor


class PipeReader:
    """A reader of one byte per event from a pipe, for the runtime's reactor; records the
    thread it read on; ``fail``: then raises, as a bug in a handler would."""

    def __init__(self, read_fd: int, fail: bool = False) -> None:
        self.read_fd = read_fd
        self.fail = fail
        self.reads: queue.SimpleQueue = queue.SimpleQueue()

    def fileno(self) -> int:
        return self.read_fd

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        os.read(self.read_fd, 1)
        self.reads.put(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("a bug in a reader")

    def connectionLost(self, reason: Any) -> None:
        pass


def test_the_runtime_reactor_hands_a_ready_descriptor_to_its_handler_directly(
    monkeypatch,
) -> None:
    """No ``log.callWithLogger`` around each read (a log context pushed three calls deep, ~9
    Python calls per event, two events per call); an error escaping a handler is still logged
    and the reactor goes on."""
    from twisted.logger import globalLogPublisher
    from twisted.python import log

    r = runtime.ensure_running()
    runtime.run(lambda: None, timeout=10)
    wrapped: list[Any] = []
    monkeypatch.setattr(log, "callWithLogger", lambda *a, **k: wrapped.append(a))
    read_fd, write_fd = os.pipe()

    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for fail in (False, True):
            reader = PipeReader(read_fd, fail)
            runtime.run(r.addReader, reader, timeout=10)
            os.write(write_fd, b"x")
            assert reader.reads.get(timeout=10) == "remap-reactor"
            runtime.run(r.removeReader, reader, timeout=10)
    finally:
        globalLogPublisher.removeObserver(logged.append)
        os.close(read_fd)
        os.close(write_fd)
    assert wrapped == []
    assert any("a bug in a reader" in str(e) for e in logged)
    assert runtime.run(lambda: 42, timeout=10) == 42


def test_an_error_in_the_runtime_reactors_loop_is_logged_and_the_loop_goes_on(
    monkeypatch,
) -> None:
    """The lean main loop holds its error handler around the inner loop (not entered and left
    every turn): an error escaping a turn is still logged as Twisted logs it, then the next
    turn runs."""
    from twisted.logger import globalLogPublisher

    r = runtime.ensure_running()
    runtime.run(lambda: None, timeout=10)
    raised: list[int] = []
    timeout = type(r).timeout

    def broken(self: Any = r) -> Any:
        if not raised:
            raised.append(1)
            raise RuntimeError("a bug in a turn")
        return timeout(self)

    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        monkeypatch.setattr(r, "timeout", broken)
        assert runtime.run(lambda: 7, timeout=10) == 7
        assert runtime.run(lambda: 8, timeout=10) == 8
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert raised == [1]
    assert any("a bug in a turn" in str(e.get("log_failure", "")) for e in logged)


def test_a_turn_with_nothing_due_skips_the_timed_calls(monkeypatch) -> None:
    """A turn woken only by a descriptor (no call from a thread, no timed call due) does not
    run ``runUntilCurrent`` or ``timeout`` (four Python calls finding nothing to do); a timed
    call and a thread's call still run on time."""
    r = runtime.ensure_running()
    runtime.run(lambda: None, timeout=10)
    read_fd, write_fd = os.pipe()

    turns = [0]
    run_until_current = r.runUntilCurrent

    def counted() -> None:
        turns[0] += 1
        run_until_current()

    reader = PipeReader(read_fd)
    runtime.run(r.addReader, reader, timeout=10)
    try:
        monkeypatch.setattr(r, "runUntilCurrent", counted)
        runtime.run(lambda: None, timeout=10)  # the loop now calls the counting one
        turns[0] = 0
        for _ in range(20):
            os.write(write_fd, b"x")
            reader.reads.get(timeout=10)
        assert turns[0] <= 3, turns  # the process reaper's tick may fall in
        fired: queue.SimpleQueue = queue.SimpleQueue()
        runtime.run(r.callLater, 0.05, fired.put, "timed", timeout=10)
        assert fired.get(timeout=10) == "timed"
    finally:
        runtime.run(r.removeReader, reader, timeout=10)
        os.close(read_fd)
        os.close(write_fd)


def test_the_runtime_reactor_runs_what_waits_for_its_sleep_once_before_every_sleep() -> None:
    """``before_sleep``: the same list on every turn (a stream keeps it), each callable run
    once, on the reactor thread, before the reactor sleeps; a failing one is logged and the
    others still run."""
    r = runtime.ensure_running()
    runtime.run(lambda: None, timeout=10)
    hooks = runtime.before_sleep(r)
    assert hooks is not None
    for turn in range(3):
        ran: queue.SimpleQueue = queue.SimpleQueue()

        def add(turn: int = turn, ran: queue.SimpleQueue = ran) -> None:
            assert runtime.before_sleep(r) is hooks  # never a new list
            hooks.append(lambda: 1 / 0)
            hooks.append(lambda: ran.put((turn, threading.current_thread().name)))

        runtime.run(add, timeout=10)
        assert ran.get(timeout=10) == (turn, "remap-reactor")
        assert ran.empty()
    assert runtime.before_sleep(object()) is None


# ============================================================================ the whole call


def _now(_: Any) -> int:
    import time

    return time.perf_counter_ns()


def _counter(counts: dict[str, int], who: str) -> Any:
    """A ``sys.setprofile`` function adding the Python functions entered to ``counts[who]``,
    leaving out what wall time drives, not the calls: periodic checks (the node's watchdog,
    Twisted's process reaper) and the timer heap's upkeep. A loaded machine stretches the
    calls' wall time and these with it: 200 calls over 5 s counted ~8.5 more per call."""
    from twisted.internet.base import DelayedCall
    from twisted.internet.task import LoopingCall

    ticks = LoopingCall.__call__.__code__
    upkeep = {DelayedCall.__lt__.__code__, DelayedCall.activate_delay.__code__}
    counts.setdefault(who, 0)
    in_tick = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal in_tick
        code = frame.f_code
        if code is ticks:
            in_tick += 1 if event == "call" else -1 if event == "return" else 0
        elif event == "call" and not in_tick and code not in upkeep:
            counts[who] += 1

    return profile


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_single_call_enters_few_python_functions_on_either_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``cluster.submit(f, x).result()`` through the embedded cluster, counted with
    ``sys.setprofile`` on the reactor thread and on the calling thread: every function
    entered there is CPU on the call's path (issue 16: the gap to Pool is Python work).
    Before this round: ~250 on the reactor (Twisted's log context per read, a timed call per
    submit, the scheduler's properties and generators, ``Future.set_result`` re-taking the
    condition, Enum's Python ``__hash__`` per core move, the waker's four calls) and 33 on the
    caller (an import and a lock per submit, a recursive plain check); then ~136 and 20. Now
    the waiting caller runs the loop itself (``drive``): ~1 on the reactor's thread and ~158
    on the caller, the same work on one thread, with no wake-up handed between threads."""
    import sys

    import remap

    calls = 200
    # the caller keeps the loop between its calls: with the 5 ms default, a loaded machine
    # that kept this thread off a CPU longer handed the loop back to the reactor's thread for
    # a call (its count rose from ~1 to 6.4 a call at load 8.5, against a bound of 10); how
    # long the loop is kept is the waiting caller tests' subject, not this count's
    monkeypatch.setattr(runtime, "KEEP", 0.5)
    with remap.connect(cores=2, task_output=False) as cluster:
        for _ in range(50):  # the job is open, both cores have loaded the function
            cluster.submit(_now, 1).result(timeout=30)
        counts: dict[str, int] = {}
        runtime.run(sys.setprofile, _counter(counts, "reactor"), timeout=10)
        sys.setprofile(_counter(counts, "caller"))
        try:
            for _ in range(calls):
                cluster.submit(_now, 1).result(timeout=30)
        finally:
            sys.setprofile(None)
            runtime.run(sys.setprofile, None, timeout=10)
    per_call = {who: n / calls for who, n in counts.items()}
    assert per_call["reactor"] <= 10, per_call  # the caller ran the loop
    assert per_call["reactor"] + per_call["caller"] <= 175, per_call


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lone_call_through_a_server_skips_the_reactors_hop_and_turn(tmp_path) -> None:
    """``submit(f, x).result()`` through a server and a node process: the argument leaves
    from the calling thread (the reactor only reads the result: ~45 Python calls a call, ~80
    when it also took the argument in a turn of its own), and the caller is woken as the
    reactor sleeps, whichever way it waits (``result``, ``wait``, ``as_completed``, a
    done-callback)."""
    import concurrent.futures
    import sys

    import remap
    from remap.client import JobStream
    from remap.settings import Settings
    from tests.cluster_harness import Cluster as ProcessCluster
    from tests.cluster_harness import NodeSpec

    sent_from: set[str] = set()
    send_now, produce_one = JobStream._send_now, JobStream._produce_one

    def recording(self: JobStream) -> bool:
        done = send_now(self)
        if done:
            sent_from.add(threading.current_thread().name)
        return done

    def recording_one(self: JobStream) -> list:
        out = produce_one(self)
        if out:  # written by send_from_thread, on this thread
            sent_from.add(threading.current_thread().name)
        return out

    with ProcessCluster(tmp_path, nodes=[NodeSpec(cores=2)]) as procs:
        with remap.connect(procs.address, secret=procs.secret, settings=Settings()) as cluster:
            for _ in range(20):
                cluster.submit(_now, 1).result(timeout=30)
            JobStream._send_now = recording  # type: ignore[method-assign]
            JobStream._produce_one = recording_one  # type: ignore[method-assign]
            try:
                assert cluster.submit(pow, 2, 5).result(timeout=30) == 32
                done, _ = concurrent.futures.wait([cluster.submit(pow, 3, 2)], timeout=30)
                assert [f.result() for f in done] == [9]
                (first,) = concurrent.futures.as_completed([cluster.submit(pow, 2, 3)], 30)
                assert first.result() == 8
                called: queue.SimpleQueue = queue.SimpleQueue()
                cluster.submit(pow, 5, 2).add_done_callback(lambda f: called.put(f.result()))
                assert called.get(timeout=30) == 25
            finally:
                JobStream._send_now = send_now  # type: ignore[method-assign]
                JobStream._produce_one = produce_one  # type: ignore[method-assign]
            assert sent_from == {threading.current_thread().name}

            calls, counts = 100, {}
            runtime.run(sys.setprofile, _counter(counts, "reactor"), timeout=10)
            try:
                for _ in range(calls):
                    cluster.submit(_now, 1).result(timeout=30)
            finally:
                runtime.run(sys.setprofile, None, timeout=10)
    assert counts["reactor"] / calls <= 60, counts["reactor"] / calls


def _triple(x: int) -> int:
    return 3 * x


def _plus_one(x: int) -> int:
    return x + 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lone_calls_of_many_threads_share_one_connection_with_the_reactor(tmp_path) -> None:
    """Threads each sending their own lone calls (a job each: every call is its job's only
    one, so each leaves from its thread) on the one connection, while the reactor writes a
    map's large arguments on it: every frame arrives whole (the connection is never closed
    for a garbled frame) and every result is the call's own."""
    import functools

    import remap
    from remap.settings import Settings
    from tests.cluster_harness import Cluster as ProcessCluster
    from tests.cluster_harness import NodeSpec

    with ProcessCluster(tmp_path, nodes=[NodeSpec(cores=2)]) as procs:
        with remap.connect(procs.address, secret=procs.secret, settings=Settings()) as cluster:
            errors: list[BaseException] = []

            def caller(k: int) -> None:
                fn = functools.partial(pow, k)  # a function (and a job) of this thread's own
                try:
                    for i in range(60):
                        assert cluster.submit(fn, 2).result(timeout=60) == k**2, (k, i)
                except BaseException as exc:  # reported below, on the test's thread
                    errors.append(exc)

            big = [bytes(200_000) + bytes([i]) for i in range(40)]
            threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            sizes = cluster.map(len, big)
            for t in threads:
                t.join(120)
            assert not errors, errors[0]
            assert sizes == [200_001] * 40
            assert cluster.submit(_triple, 5).result(timeout=60) == 15
            assert cluster.map(_plus_one, range(1000)) == list(range(1, 1001))


def test_work_queued_by_the_thread_keeping_the_loop_brings_the_reactors_thread_back() -> None:
    """A thread that ran the loop for its last result keeps it (``drive``). Work it queues
    (a map's arguments, a close) wakes the reactor's thread to take the loop back, unless it
    is a lone call's argument this thread sends as it waits for its result (``quiet``);
    another thread's work always does, and work queued while the loop runs never needs to."""
    import threading as threads

    r = runtime._new_reactor()
    call_soon = runtime.thread_caller(r)
    r.driver, r.driving = threads.get_ident(), False  # this thread keeps the loop, idle
    call_soon.quiet(lambda: None)
    assert not r._poked, "left for this thread, which runs the loop next"
    call_soon(lambda: None)
    assert r._poked, "this thread will not run it: the reactor's thread must"
    r._poked = False
    other = threads.Thread(target=call_soon.quiet, args=(lambda: None,))
    other.start()
    other.join(10)
    assert r._poked, "another thread's work never waits for this one"
    r._poked, r.driving = False, True
    call_soon(lambda: None)
    assert not r._poked, "the loop is running: it finds the work itself"


def test_a_driving_turn_never_polls_with_a_negative_delay() -> None:
    """A turn of a thread that drives the loop reads the next timed call's delay once: read
    again after finding the call not due, a thread switch between the two readings (the GIL's
    5 ms, on a loaded machine) made the delay negative, and epoll_wait takes any negative
    timeout as none at all: the timed call and the caller's deadline then waited for the next
    descriptor event. The clock here moves 10 ms between any two readings."""
    r = runtime._lean_epoll_reactor()()
    try:
        now = [100.0]

        def seconds() -> float:
            now[0] += 0.01
            return now[0]

        polls: list[float | None] = []
        r.seconds = seconds
        r.doPoll = polls.append  # no sleep: each turn's timeout is recorded
        fired: list[int] = []
        r.callLater(0.035, fired.append, 1)
        r._started = True
        r._drive(lambda: bool(fired), None, [])
        assert fired == [1]
        assert polls and all(t is not None and t >= 0 for t in polls), polls
    finally:
        r._started = False
        r._poller.close()
        for fd in (r.waker.i, r.waker.o):
            os.close(fd)
