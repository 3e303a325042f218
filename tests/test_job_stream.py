"""The client's job engine without processes or sockets: the pure JobSession, and the
JobStream bridge driven by a stand-in reactor thread and an in-memory server (issue 10, item 1).

The session is plain calls in, messages and result events out. The stream is tested across
real threads: a "reactor" thread of our own runs what the stream schedules, a caller's
thread feeds arguments and takes results into a sink, and a fake client records what goes
to the server.
"""

from __future__ import annotations

import operator
import pickle
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from protocol import messages as m
from protocol.options import JobOptions
from remap.blobs import dumps, pack
from remap.client import (
    ARGS_OVERHEAD,
    EARLY_GROUP_BYTES,
    KILL,
    ArgumentTooLarge,
    JobSession,
    JobStream,
    read_into,
)
from remap.errors import ConfigError, ConnectionLost, JobFailed, JobKilled, OutputError
from remap.sinks import ObjectSink, ReduceSink

# ============================================================================ the session


def take_from(blobs: list[bytes], ended: bool = True) -> Callable[..., Any]:
    """A ``take`` over a fixed list of pickled arguments."""
    queue_ = list(blobs)

    def take(limit: int, room: int, start: int) -> tuple[Any, ...]:
        out = queue_[:limit]
        del queue_[:limit]
        return out, [], [None] * len(out), ended and not queue_

    return take


def test_the_first_window_goes_with_the_submit_under_minus_its_id() -> None:
    """submit: the Submit message, then INITIAL_WINDOW arguments as job -rid; `submitted`
    counts them in the window; grants send the rest and args_end gives the total."""
    session = JobSession(JobOptions(name="j"), b"fn", total_hint=300)
    session.submit(7)
    take = take_from([dumps(i) for i in range(300)])
    session.pump(take)
    submit, *args = session.outbox
    assert isinstance(submit, m.Submit) and (submit.id, submit.total, submit.name) == (7, 300, "j")
    assert {a.job for a in args} == {-7} and session.sent == m.INITIAL_WINDOW
    session.outbox.clear()
    session.submitted(42, m.INITIAL_WINDOW)  # the server took the whole first window
    session.pump(take)
    assert session.outbox == [], "no window left until a grant"
    session.grant(100)
    session.pump(take)
    *more, end = session.outbox
    assert [a.job for a in more] == [42] and sum(len(a.sizes) for a in more) == 44
    assert end == m.ArgsEnd(job=42, total=300) and session.exhausted


def test_a_kill_before_the_job_is_named_goes_out_when_it_is() -> None:
    session = JobSession(JobOptions())
    session.submit(1)
    session.kill()
    assert all(not isinstance(x, tuple) for x in session.outbox)
    session.submitted(5, 0)
    assert session.outbox[-1] == (KILL, 5)


def test_an_argument_over_the_frame_is_refused_by_index_and_the_job_killed() -> None:
    session = JobSession(JobOptions())
    session.frame_room = 1000
    session.submit(1)
    session.submitted(3, 10)
    session.outbox.clear()
    session.pump(take_from([dumps(1), dumps(b"x" * 5000)]))
    assert isinstance(session.error, ArgumentTooLarge) and session.error.index == 1
    assert session.finished and session.outbox[-1] == (KILL, 3)


def test_a_broken_input_fails_after_the_arguments_before_it() -> None:
    """The input raises after two arguments: they go out, then the job fails naming it."""
    session = JobSession(JobOptions())
    session.submit(1)
    session.submitted(3, 10)
    sent: list[bytes] = [dumps(1), dumps(2)]

    def take(limit: int, room: int, start: int) -> tuple[Any, ...]:
        if sent:
            out = sent[:]
            sent.clear()
            return out, [], [None, None], False
        raise ValueError("line 3: not JSON")

    session.pump(take)
    args = [x for x in session.outbox if isinstance(x, m.Args)]
    assert sum(len(a.sizes) for a in args) == 2
    assert str(session.error) == "could not send argument 2: ValueError: line 3: not JSON"


def results(job: int, values: list[Any], start: int = 0, **fields: Any) -> m.Results:
    sizes, payload = pack(values)
    indices = list(range(start, start + len(values)))
    return m.Results(job=job, indices=indices, sizes=sizes, payload=payload, **fields)


def test_results_become_one_items_event_with_the_kept_arguments() -> None:
    session = JobSession(JobOptions(), keep_arguments=True)
    session.submit(1)
    session.submitted(2, 10)
    session.pump(take_with_tags(["a", "b"]))
    session.results(results(2, [10, 20]))
    assert session.events == [("items", [0, 1], [10, 20], None, ["a", "b"])]
    assert (session.done, session.failed) == (2, 0)


def test_a_run_of_results_is_answered_without_listing_its_indices() -> None:
    """Results sent as ``start``/``count`` are one items event over that range, marked
    answered (a resume sends none of them again), in order."""
    session = JobSession(JobOptions(), keep_arguments=True)
    session.submit(1, resumable=True)
    session.submitted(2, 10)
    session.pump(take_with_tags(["a", "b", "c"]))
    sizes, payload = pack([10, 20])
    session.results(m.Results.of(2, range(1, 3), sizes=sizes, payload=payload))
    assert session.events == [("items", range(1, 3), [10, 20], None, ["b", "c"])]
    assert session.resume_message(9).missing == [[0, 1]]
    assert (session.done, session.failed) == (2, 0)


def take_with_tags(tags: list[Any]) -> Callable[..., Any]:
    def take(limit: int, room: int, start: int) -> tuple[Any, ...]:
        out, tags[:] = tags[:], []
        return [dumps(t) for t in out], [], out, True

    return take


def test_partial_folds_and_their_errors_become_events() -> None:
    """Reduce mode: a node's partial is one event with the count it covers; a failed
    argument of the batch comes first as an items event carrying its error."""
    session = JobSession(JobOptions(mode="reduce", on_error="continue"))
    session.attach(9)
    msg = m.Results(
        job=9,
        indices=[0, 1, 2],
        sizes=[1],
        errors=[[1, "ValueError", "no 1", "tb"]],
        partial=True,
        payload=pickle.dumps(5),
    )
    session.results(msg)
    (items, partial) = session.events
    assert items[:3] == ("items", [1], [None])
    assert [e.type_name for e in items[3]] == ["ValueError"]
    assert partial == ("partial", 2, 5)
    assert (session.done, session.failed) == (2, 1)


def test_the_end_gives_the_outcome_or_the_error() -> None:
    done, killed = JobSession(JobOptions()), JobSession(JobOptions())
    done.attach(1)
    killed.attach(2)
    done.ended(m.JobDone(job=1, state="done", done=3, failed=0))
    killed.ended(m.JobDone(job=2, state="killed", done=0, failed=0, message="by alice"))
    assert done.outcome is not None and done.outcome.done == 3 and done.error is None
    assert isinstance(killed.error, JobKilled) and "by alice" in str(killed.error)


# ============================================================================ the stream


class Reactor:
    """Runs what streams schedule, in order, on a thread of its own (the reactor's role)."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="fake-reactor", daemon=True)
        self.thread.start()

    def callFromThread(self, fn: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.calls.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self.calls.get()
            if fn is None:
                return
            fn(*args)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the reactor thread and wait for its result."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        self.callFromThread(lambda: box.put(fn(*args)))
        return box.get(timeout=10)

    def stop(self) -> None:
        self.calls.put((None, ()))
        self.thread.join(10)


class MemoryServer:
    """Stands in for ClusterClient and the server behind it: grants every argument it gets
    (runs ``fn`` on it) and answers with results, all on the reactor thread.

    Like a real connection, it answers in a later turn of the reactor, never inside ``send``:
    an answer given inside ``send`` re-entered the stream's flush, which then sent later
    arguments (and ``args_end``) before earlier ones, and a ``submitted`` counted after grants
    left the window negative (the job hung), depending on how the caller's puts raced the
    reactor thread."""

    redial = None  # a lost connection is not dialled again
    link = "up"
    runs = False  # results as ``start``/``count`` (a server's runs) rather than listed

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x, *, max_frame: int = 1 << 20):
        self.fn = fn
        self.max_frame = max_frame
        self.sent: list[Any] = []
        self.killed: list[int | None] = []
        self.forgotten: list[JobStream] = []
        self.stream: JobStream | None = None
        self.received = 0
        self.threads: set[str] = set()

    def frame_room(self) -> int:
        return self.max_frame - ARGS_OVERHEAD

    def submit(self, stream: JobStream) -> None:
        self.stream = stream
        stream.submitting(self, 1)  # type: ignore[arg-type]

    def forget(self, stream: JobStream) -> None:
        self.forgotten.append(stream)

    def kill_quietly(self, job: int | None) -> None:
        self.killed.append(job)
        self._later("ended", m.JobDone(job=50, state="killed", done=0, failed=0, message="x"))

    def send(self, msg: m.Message) -> None:
        self.threads.add(threading.current_thread().name)
        self.sent.append(msg)
        if isinstance(msg, m.Submit):
            self._later("submitted", 50, m.INITIAL_WINDOW)  # what the server allows under -id
        elif isinstance(msg, m.Args):
            values = _arguments(msg)
            self.received += len(values)
            answer = results(50, [self.fn(v) for v in values], msg.start)
            if self.runs:  # as a server sends a run: start/count, no list of indices
                run = range(msg.start, msg.start + len(values))
                answer = m.Results.of(50, run, sizes=answer.sizes, payload=answer.payload)
            self._later("results", answer)
            self._later("grant", len(values))
        elif isinstance(msg, m.ArgsEnd):
            self._later("ended", m.JobDone(job=50, state="done", done=msg.total, failed=0))

    def _later(self, event: str, *args: Any) -> None:
        """Hand the stream ``event`` in a later turn of the reactor thread, in order."""
        stream = self.stream
        assert stream is not None
        if event == "results":
            stream.call_soon(stream.results, *args)
        else:
            stream.call_soon(stream.apply, event, *args)


def _split(msg: m.Args) -> list[bytes]:
    out, pos = [], 0
    for size in msg.sizes:
        out.append(msg.payload[pos : pos + size])
        pos += size
    return out


def _arguments(msg: m.Args) -> list[Any]:
    """The arguments of an ``args`` message, argument groups taken apart."""
    values = [pickle.loads(b) for b in _split(msg)]
    return [v for group in values for v in group] if msg.groups else values


class ThreadSink(ObjectSink):
    """Records the thread of every call the stream's consumer makes into it."""

    needs_arguments = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()
        self.arguments: list[Any] = []

    def add_results(self, indices: list[int], arguments: Any, results: list[Any]) -> None:
        self.threads.add(threading.current_thread().name)
        self.arguments += arguments
        super().add_results(indices, arguments, results)

    def close(self, *, complete: bool) -> None:
        self.threads.add(threading.current_thread().name)
        super().close(complete=complete)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.stop()


def stream_on(reactor: Reactor, server: MemoryServer, **options: Any) -> JobStream:
    return JobStream(b"fn", JobOptions(), call_soon=reactor.callFromThread, **options).start(
        server  # type: ignore[arg-type]
    )


def test_arguments_fed_from_one_thread_come_back_on_it(reactor: Reactor) -> None:
    """put_many from this thread, the window on the reactor's, the sink back on this one:
    every result, in order, with the argument it was kept with; the sink never ran on the
    reactor thread and the server never heard from this one."""
    server = MemoryServer(lambda x: x * x)
    stream = stream_on(reactor, server, keep_arguments=True, total_hint=1000)
    values = list(range(1000))
    for k in range(0, 1000, 100):
        stream.put_many([dumps(v) for v in values[k : k + 100]], values[k : k + 100])
    stream.close_input()
    sink = ThreadSink()
    outcome = stream.collect(sink, until=_soon())
    assert outcome.state == "done" and sink.value() == [v * v for v in values]
    assert sink.arguments == values
    assert sink.threads == {threading.current_thread().name}
    assert server.threads == {"fake-reactor"}
    assert server.forgotten == [stream], "the client routes nothing more to an ended job"


def test_a_reduce_folds_on_the_consumers_thread(reactor: Reactor) -> None:
    folded_on: set[str] = set()

    def add(a: int, b: int) -> int:
        folded_on.add(threading.current_thread().name)
        return a + b

    server = MemoryServer()
    stream = stream_on(reactor, server)
    stream.put_many([dumps(i) for i in range(100)])
    stream.close_input()
    sink = ReduceSink(add)
    stream.collect(sink, until=_soon())
    assert sink.value() == sum(range(100)) and folded_on == {threading.current_thread().name}


def test_a_sink_that_cannot_write_kills_the_job_with_one_line(reactor: Reactor) -> None:
    class FullDisk(ObjectSink):
        def add_results(self, indices: list[int], arguments: Any, results: list[Any]) -> None:
            raise OSError(28, "No space left on device")

    server = MemoryServer()
    stream = stream_on(reactor, server)
    stream.put_many([dumps(1)])
    sink = FullDisk()
    with pytest.raises(OutputError, match="could not write its results: disk full"):
        stream.collect(sink, until=_soon())
    assert stream.finished.wait(10) and server.killed == [50]
    assert sink.closed and sink.complete is False


def test_kill_drops_unsent_arguments_and_ends_killed(reactor: Reactor) -> None:
    server = MemoryServer()
    stream = stream_on(reactor, server)
    stream.kill()
    stream.put_many([dumps(1)])  # ignored: the job is being killed
    with pytest.raises(JobKilled):
        stream.collect(ObjectSink(), until=_soon())
    assert stream.unsent_bytes == 0 and server.killed == [50]


def test_on_items_settles_some_results_on_the_reactor_thread(reactor: Reactor) -> None:
    """The Executor's hook: it may take results at once; the rest go on as events."""
    server = MemoryServer()
    taken: list[int] = []

    def odd_only(batch: list[Any]) -> list[Any]:
        taken.extend(i for i, _, _ in batch if i % 2 == 0)
        return [item for item in batch if item[0] % 2]

    stream = stream_on(reactor, server, on_items=odd_only)
    stream.put_many([dumps(i) for i in range(10)])
    stream.close_input()
    events = []
    while not events or events[-1][0] != "end":
        events.append(stream.events.get(timeout=10))
    assert sorted(i for e in events[:-1] for i, _, _ in e[2]) == [1, 3, 5, 7, 9]
    assert sorted(taken) == [0, 2, 4, 6, 8]


def _soon() -> float:
    import time

    return time.monotonic() + 10


# ============================================================================ read_into


def test_arguments_are_read_on_their_own_thread_and_end(reactor: Reactor) -> None:
    """The source is pulled on the reader thread (never the caller's or the reactor's)."""
    pulled_on: set[str] = set()

    def source() -> Iterator[int]:
        for i in range(250):
            pulled_on.add(threading.current_thread().name)
            yield i

    server = MemoryServer()
    stream = stream_on(reactor, server)
    read_into(stream, source(), max_items=16)
    sink = ObjectSink()
    assert stream.collect(sink, until=_soon()).done == 250
    assert sink.value() == list(range(250)) and pulled_on == {"remap-arguments"}


def test_the_reader_stays_bounded_and_leaves_when_the_job_ends(reactor: Reactor) -> None:
    """Nothing is sent (no window): the reader stays ``max_items`` ahead, then leaves on kill."""
    pulled: list[int] = []
    ahead = threading.Event()

    def source() -> Iterator[int]:
        for i in range(10_000):
            pulled.append(i)
            if len(pulled) == 9:  # 8 queued and the 9th read, waiting for room
                ahead.set()
            yield i

    stream = JobStream(b"", JobOptions(), call_soon=reactor.callFromThread)  # never submitted
    thread = read_into(stream, source(), max_items=8)
    assert ahead.wait(10)
    stream.kill()
    thread.join(10)
    assert not thread.is_alive() and len(pulled) == 9, "the reader ran ahead of its bound"


def test_the_reader_waits_for_the_consumer_to_take_results(reactor: Reactor) -> None:
    """A sink slower than the cluster: the reader stays at most ``ahead`` arguments ahead of
    the results taken, so results do not pile up in memory; then every result arrives."""
    stream: JobStream | None = None
    most_ahead = [0]
    blocked = threading.Event()

    def source() -> Iterator[int]:
        for i in range(500):
            assert stream is not None
            most_ahead[0] = max(most_ahead[0], i - stream.taken)
            if i == 20:
                blocked.set()  # 20 read, none taken: the reader waits until results are
            yield i

    server = MemoryServer()
    stream = stream_on(reactor, server)
    read_into(stream, source(), ahead=20)
    assert blocked.wait(10) and stream.taken == 0
    sink = ObjectSink()
    stream.collect(sink, until=_soon())
    assert sink.value() == list(range(500)) and most_ahead[0] <= 20


def test_a_detached_jobs_reader_does_not_wait_for_results_nobody_takes(reactor: Reactor) -> None:
    """``compute --detach`` returns once the server holds every argument; its results stay on
    the server, so the read-ahead bound on results not taken must not stop the reader (a
    100,000-argument detached job hung at 65,536 arguments)."""
    server = MemoryServer()
    stream = JobStream(b"fn", JobOptions(detach=True), call_soon=reactor.callFromThread).start(
        server
    )  # type: ignore[arg-type]
    thread = read_into(stream, iter(range(100)), ahead=20)
    thread.join(10)
    assert not thread.is_alive() and stream.taken == 0
    reactor.run(lambda: None)  # what the reader queued has been sent
    assert server.received == 100


def test_a_broken_source_fails_the_job_after_the_arguments_before_it(reactor: Reactor) -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ConfigError("args.jsonl:3: invalid JSON argument")

    server = MemoryServer()
    stream = stream_on(reactor, server)
    read_into(stream, source())
    with pytest.raises(ConfigError, match="invalid JSON"):
        stream.collect(ObjectSink(), until=_soon())
    sent = [pickle.loads(b) for msg in server.sent if isinstance(msg, m.Args) for b in _split(msg)]
    assert sent == [1, 2] and server.killed == [50]


def counting_puts(stream: JobStream) -> list[int]:
    """Record the arguments of each of the stream's ``put_waiting`` rounds (a lock round, a
    wake-up and a pickle each)."""
    rounds: list[int] = []
    put = stream.put_waiting

    def counted(blob: bytes, tag: Any, *bounds: int, count: int = 0) -> bool:
        rounds.append(count or 1)
        return put(blob, tag, *bounds, count=count)

    stream.put_waiting = counted  # type: ignore[method-assign]
    return rounds


@pytest.mark.parametrize("total", [None, 20_000])
def test_a_lazy_source_is_read_in_argument_groups(reactor: Reactor, total: int | None) -> None:
    """20,000 arguments from a source, of unknown or known size, are queued in a few hundred
    pickles (one lock round each; an unknown size ramps up to its groups), not one each, and
    come back in order. Before, each took a
    pickle and a lock/condition round: ~10x the caller's CPU of a list's groups."""
    server = MemoryServer()
    stream = stream_on(reactor, server, total_hint=total)
    rounds = counting_puts(stream)
    read_into(stream, iter(range(20_000)))
    sink = ObjectSink()
    assert stream.collect(sink, until=_soon()).done == 20_000
    assert sink.value() == list(range(20_000))
    pickles = sum(len(msg.sizes) for msg in server.sent if isinstance(msg, m.Args))
    assert sum(rounds) == 20_000 and len(rounds) == pickles < 20_000 // 10, len(rounds)
    assert rounds[0] == 1 and max(rounds) > 64, rounds[:4]


def test_what_a_slow_source_gave_goes_out_without_waiting_for_its_group(
    reactor: Reactor,
) -> None:
    """The first argument goes at once, and arguments read before the source blocks leave while
    it blocks (groups of 39 are wanted here), then the rest follows in order."""
    gates = [threading.Event(), threading.Event()]

    def source() -> Iterator[int]:
        yield 0
        assert gates[0].wait(10)
        yield from range(1, 6)
        assert gates[1].wait(10)
        yield from range(6, 10_000)

    server = WatchedServer()
    stream = stream_on(reactor, server, total_hint=10_000)
    read_into(stream, source())
    try:
        for gate, read in zip(gates, (1, 6)):
            server.wait_for(read)
            gate.set()
    finally:
        for gate in gates:
            gate.set()
    sink = ObjectSink()
    assert stream.collect(sink, until=_soon()).done == 10_000
    assert sink.value() == list(range(10_000))


class WatchedServer(MemoryServer):
    """A MemoryServer the test can wait on: ``wait_for(n)`` returns once ``n`` arguments came."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Condition()

    def send(self, msg: m.Message) -> None:
        with self.arrived:
            super().send(msg)
            self.arrived.notify_all()

    def wait_for(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.received >= count, timeout=10)
            assert self.received == count, self.received


def test_a_source_that_breaks_after_a_partial_group_gives_exactly_what_came_before(
    reactor: Reactor,
) -> None:
    """1,000 arguments read in groups, then the source raises: the job gets exactly those
    1,000 (the open group too), then fails with the error."""

    def source() -> Iterator[int]:
        yield from range(1000)
        raise ConfigError("args.jsonl:1001: invalid JSON argument")

    server = MemoryServer()
    stream = stream_on(reactor, server, total_hint=5000)
    read_into(stream, source())
    sink = TakenSink()
    with pytest.raises(ConfigError, match="invalid JSON"):
        stream.collect(sink, until=_soon())
    sent = [v for msg in server.sent if isinstance(msg, m.Args) for v in _arguments(msg)]
    assert sent == list(range(1000)) and any(
        msg.groups for msg in server.sent if isinstance(msg, m.Args)
    )
    assert set(sink.taken) <= set(range(1000))  # those that came before the job was failed


class TakenSink(ObjectSink):
    """Records every result it is given (an incomplete sink keeps them too)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[Any] = []

    def add_results(self, indices: list[int], arguments: Any, results: list[Any]) -> None:
        self.taken += results
        super().add_results(indices, arguments, results)


def test_arguments_read_in_groups_are_kept_for_a_sink_that_stores_them(reactor: Reactor) -> None:
    """keep_arguments: each result comes with its own argument, groups or not."""
    server = MemoryServer(lambda x: x * 2)
    stream = stream_on(reactor, server, keep_arguments=True, total_hint=3000)
    read_into(stream, iter(range(3000)))
    sink = ThreadSink()
    stream.collect(sink, until=_soon())
    assert any(msg.groups for msg in server.sent if isinstance(msg, m.Args))
    assert sink.arguments == list(range(3000)) and sink.value() == [2 * i for i in range(3000)]


class BoundingServer(MemoryServer):
    """A server whose nodes take small frames: it says ``group_limit`` before ``submitted``."""

    def __init__(self, bound: int) -> None:
        super().__init__()
        self.bound = bound

    def send(self, msg: m.Message) -> None:
        if isinstance(msg, m.Submit):
            self._later("group_limit", self.bound)
        super().send(msg)


def test_argument_groups_keep_to_the_bound_the_server_says(reactor: Reactor) -> None:
    """Groups of 1 KiB arguments (about 64 KiB each) against a bound of 16 KiB: nothing grouped
    over it leaves, groups still go (within it), and every result comes back with its own
    argument. Before, groups of 64 KiB went whatever the nodes took."""
    bound = 16 * 1024
    server = BoundingServer(bound)
    stream = stream_on(reactor, server, keep_arguments=True, total_hint=3000)
    values = [bytes([i % 251]) * 1024 for i in range(3000)]
    read_into(stream, iter(values))
    sink = ThreadSink()
    assert stream.collect(sink, until=_soon()).done == 3000
    assert sink.arguments == values and sink.value() == values
    grouped = [
        (size, n)
        for msg in server.sent
        if isinstance(msg, m.Args)
        for size, n in zip(msg.sizes, msg.groups, strict=False)
    ]
    assert grouped and max(size for size, _ in grouped) <= bound, max(grouped)
    assert max(n for _, n in grouped) > 1, "groups still go, within the bound"


def test_no_group_over_a_few_kib_leaves_before_the_jobs_id() -> None:
    """The first window may go before ``submitted``; a group larger than EARLY_GROUP_BYTES waits
    for it (and for the bound the server says before it), a small one goes at once, and the
    bound said then holds for the big one (taken apart). Before, both went with the submit."""
    stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: None, total_hint=10)
    session = stream.session
    session.submit(1)
    small, big = [b"s"] * 4, [bytes([i]) * 3000 for i in range(6)]
    stream.put_many([dumps(small), dumps(big)], counts=[4, 6])
    session.pump(stream._take)
    assert [(msg.job, msg.groups) for msg in session.outbox[1:]] == [(-1, [4])]
    session.group_limit(EARLY_GROUP_BYTES)
    session.submitted(50, 256)
    session.grant(256)  # (the first window closed after a group: MAX_GROUP might not fit)
    session.pump(stream._take)
    assert len(session.outbox) == 2, "the group is being taken apart off this thread"
    _splits_done()
    session.pump(stream._take)
    (late,) = session.outbox[2:]
    assert late.job == 50 and late.groups == [1] * 6 and max(late.sizes) <= EARLY_GROUP_BYTES
    assert [pickle.loads(b)[0] for b in _split(late)] == big


def _splits_done() -> None:
    """Wait (with a deadline) for every thread taking an argument group apart to end."""
    for thread in threading.enumerate():
        if thread.name == "remap-split-group":
            thread.join(10)
            assert not thread.is_alive(), "a group's split did not end in time"


#: names of the threads that unpickled a ``Recorded`` (see its ``__setstate__``)
UNPICKLED_ON: list[str] = []


class Recorded:
    """An argument whose unpickling records the thread it ran on (user code, like any
    ``__setstate__``)."""

    def __init__(self, size: int) -> None:
        self.data = b"r" * size

    def __setstate__(self, state: dict[str, Any]) -> None:
        UNPICKLED_ON.append(threading.current_thread().name)
        self.__dict__.update(state)


def test_a_group_over_the_bound_is_taken_apart_off_the_thread_that_pumps() -> None:
    """A group queued before the server's bound and over it is unpickled (user code: its
    arguments' ``__setstate__``) on a thread of its own, not on the thread that pumps the
    session (the reactor's, which an embedded cluster's server and nodes share); the stream is
    woken when its groups of one are queued, and they go in order. Before, the split ran in
    ``_take``, on the pumping thread, under the stream's lock."""
    woken = threading.Event()
    stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: woken.set(), total_hint=10)
    session = stream.session
    session.submit(1)
    stream.put_many([dumps([Recorded(1500) for _ in range(6)])], counts=[6])
    stream._wake_pending = False  # (this test is the reactor: it pumps by itself)
    woken.clear()
    session.group_limit(EARLY_GROUP_BYTES)
    session.submitted(50, 256)
    UNPICKLED_ON.clear()
    session.pump(stream._take)
    _splits_done()
    assert UNPICKLED_ON and threading.current_thread().name not in UNPICKLED_ON, UNPICKLED_ON
    assert woken.is_set(), "the split's end wakes the stream"
    session.pump(stream._take)
    (late,) = session.outbox[1:]
    assert late.job == 50 and late.groups == [1] * 6 and max(late.sizes) <= EARLY_GROUP_BYTES
    assert [len(pickle.loads(b)[0].data) for b in _split(late)] == [1500] * 6


class Unreadable:
    """An argument that pickles but will not unpickle."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise ValueError("no state today")


def test_a_group_that_will_not_unpickle_when_taken_apart_fails_the_job_in_order() -> None:
    """The splitter thread's error reaches the pump: the job fails at the group's first
    argument with one line, as when the split ran there."""
    stream = JobStream(b"fn", JobOptions(), call_soon=lambda *a: None, total_hint=10)
    session = stream.session
    session.submit(1)
    group = [Unreadable() for _ in range(3)]
    for k, value in enumerate(group):
        value.pad = bytes([k]) * 2000  # (distinct: one shared object is pickled once)
    stream.put_many([dumps(group)], counts=[3])
    session.group_limit(EARLY_GROUP_BYTES)
    session.submitted(50, 256)
    session.pump(stream._take)
    _splits_done()
    session.pump(stream._take)
    assert isinstance(session.error, JobFailed), session.error
    assert "could not send argument 0: ValueError: no state today" in str(session.error)


def test_results_that_will_not_unpickle_fail_the_job_under_on_error_fail() -> None:
    """Decoding stays in the session: an unreadable result under on_error: fail aborts it."""
    session = JobSession(JobOptions(on_error="fail"))
    session.attach(4)
    blobs = [pickle.dumps(0), b"not a pickle"]
    session.results(
        m.Results(job=4, indices=[0, 1], sizes=[len(b) for b in blobs], payload=b"".join(blobs))
    )
    assert isinstance(session.error, JobFailed) and "argument 1: ResultUnreadable" in str(
        session.error
    )
    assert session.outbox == [(KILL, 4)]
    assert operator.itemgetter(0)(session.events[0]) == "items"


# ============================================================================ a lone call's arguments


class ThreadLink:
    """A connection that lets a calling thread write (as ``PeerProtocol.send_from_thread``):
    what ``produce`` makes goes to the server, recorded with the thread that sent it."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def send_from_thread(self, produce: Callable[[], list[Any]], call_soon: Any) -> bool:
        for msg in produce():
            self.server.send(msg)
        return True


class DirectServer(MemoryServer):
    """A MemoryServer whose connection takes a calling thread's writes; records which thread
    sent each ``args``."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x) -> None:
        super().__init__(fn)
        self.link = ThreadLink(self)  # type: ignore[assignment]
        self.redialing = False
        self.args_threads: list[str] = []

    def steady_link(self) -> Any:
        return None if self.redialing else self.link

    def send(self, msg: m.Message) -> None:
        if isinstance(msg, m.Args):
            self.args_threads.append(threading.current_thread().name)
        super().send(msg)


def _one_call(stream: JobStream, value: int, *, now: bool = True) -> Any:
    """Put one argument and wait for its result event."""
    stream.put_many([dumps(value)], [value], now=now)
    event = stream.events.get(timeout=10)
    assert event[0] == "items", event
    return event[2][0][1]


def _named(stream: JobStream, reactor: Reactor) -> None:
    """Wait until the job has its id (the first window's arguments went with the submit)."""
    reactor.run(lambda: None)  # the submit went out on the reactor
    reactor.run(lambda: None)  # and `submitted` came back


def test_a_lone_call_leaves_from_the_calling_thread() -> None:
    """put_many(now=True) on a steady connection: the argument is sent by the thread that put
    it, with the session's window and accounting; its result comes back as usual."""
    reactor, server = Reactor(), DirectServer(lambda x: x * 10)
    try:
        stream = stream_on(reactor, server)
        _named(stream, reactor)
        me = threading.current_thread().name
        assert [_one_call(stream, v) for v in (1, 2, 3)] == [10, 20, 30]
        assert server.args_threads == [me, me, me]
        assert stream.session.sent == 3 and stream.session.done == 3
        assert [(a.start, len(a.sizes)) for a in server.sent if isinstance(a, m.Args)] == [
            (0, 1),
            (1, 1),
            (2, 1),
        ]
    finally:
        reactor.stop()


def test_calls_put_without_now_and_while_redialing_go_through_the_reactor() -> None:
    """Without ``now``, and on a connection being dialled again (a job's traffic waits for its
    resume), arguments go as before: from the reactor thread."""
    reactor, server = Reactor(), DirectServer()
    try:
        stream = stream_on(reactor, server)
        _named(stream, reactor)
        assert _one_call(stream, 1, now=False) == 1
        server.redialing = True
        assert _one_call(stream, 2) == 2
        assert server.args_threads == ["fake-reactor", "fake-reactor"]
    finally:
        reactor.stop()


def test_a_call_put_while_the_reactor_drives_the_job_goes_through_it() -> None:
    """While the reactor thread drives the job (an event for it being handled), a calling
    thread never touches the session: the argument waits and the reactor sends it."""
    reactor, server = Reactor(), DirectServer()
    try:
        stream = stream_on(reactor, server)
        _named(stream, reactor)
        reactor.run(stream._drive.acquire)
        stream.put_many([dumps(5)], [5], now=True)
        assert server.args_threads == [] and stream.session.sent == 0
        reactor.run(stream._drive.release)
        event = stream.events.get(timeout=10)
        assert event[2][0][1] == 5 and server.args_threads == ["fake-reactor"]
    finally:
        reactor.stop()


def test_what_a_calling_thread_cannot_send_is_left_to_the_reactor() -> None:
    """An argument over the frame, put by a calling thread: the session kills the job; the
    kill and the failure are the reactor's to deliver (woken for them)."""
    reactor, server = Reactor(), DirectServer()
    try:
        stream = stream_on(reactor, server)
        _named(stream, reactor)
        stream.session.frame_room = 10
        stream.put_many([dumps("x" * 100)], [None], now=True)
        assert stream.finished.wait(10)
        assert isinstance(stream.error, ArgumentTooLarge)
        assert server.killed == [50] and server.args_threads == []
    finally:
        reactor.stop()


def test_no_calling_thread_sends_before_every_jobs_resume_request_is_out() -> None:
    """Dialled again, the client asks the server to take back each job; until the last of
    those requests is written, the connection is not steady: a calling thread must not send
    a job's new arguments ahead of that job's own resume request."""
    from twisted.internet.task import Clock

    from remap.client import ClusterClient

    client = ClusterClient(redial=lambda: None, grace=5.0, clock=Clock())
    seen: list[tuple[str, Any]] = []

    class Link:
        def send(self, msg: m.Message) -> None:
            seen.append((msg.TYPE, client.steady_link()))

    link = Link()
    for job in (7, 8):
        stream = JobStream(b"fn", JobOptions(), call_soon=lambda *call: None)
        stream.session.submit(job, resumable=True)
        stream.session.submitted(job, 10)
        client.runs[job] = stream
    client.link = link  # type: ignore[assignment]
    client.redialing = True
    assert client.steady_link() is None
    client._resume_runs()
    assert [kind for kind, _ in seen] == ["resume", "resume"]
    assert [steady for _, steady in seen] == [None, None]
    assert client.steady_link() is link


def test_an_input_error_after_the_last_queued_arguments_still_fails_the_job() -> None:
    """The input closes with an error while arguments still wait, and one take empties the
    queue: that take must not mark the input drained, or nothing asks again and the error is
    never raised (the job waited forever). Run step by step, so the order is the bad one."""
    calls: list[tuple[Any, tuple[Any, ...]]] = []

    class WindowServer(MemoryServer):
        """Grants nothing more: two arguments fit the first window, as a real server's does."""

        def _later(self, event: str, *args: Any) -> None:
            if event != "grant":
                super()._later(event, *args)

    server = WindowServer()
    stream = JobStream(b"fn", JobOptions(), call_soon=lambda fn, *a: calls.append((fn, a)))

    def run_queued() -> None:
        for _ in range(1000):  # every queued reactor call, in order, until none is left
            if not calls:
                return
            fn, args = calls.pop(0)
            fn(*args)

    stream.start(server)  # type: ignore[arg-type]
    run_queued()  # submitted, with nothing to send yet
    stream.put_many([dumps(1), dumps(2)])
    stream.close_input(ConfigError("args.jsonl:3: invalid JSON argument"))
    run_queued()  # one wake-up takes both arguments and sees the input closed
    assert stream.finished.is_set(), "the job never ended: the input's error was not raised"
    assert isinstance(stream.error, ConfigError) and server.killed == [50]
    sent = [pickle.loads(b) for msg in server.sent if isinstance(msg, m.Args) for b in _split(msg)]
    assert sent == [1, 2]


# ============================================================================ a lone call's fast lane


def test_put_one_sends_from_the_calling_thread_or_falls_back_to_the_queue() -> None:
    """``put_one`` (a lone submit) writes its argument from the calling thread with the
    session's window and accounting, as ``put_many(now=True)`` does; behind arguments still
    queued, with the window closed, or while the connection is dialled again it takes the
    queue (the reactor sends it, in order)."""
    reactor, server = Reactor(), DirectServer(lambda x: x * 10)
    server.runs = True
    try:
        stream = stream_on(reactor, server, on_send=lambda index, tag: True)
        _named(stream, reactor)
        me = threading.current_thread().name
        stream.put_one(dumps(1), 1)
        assert stream.events.get(timeout=10)[2] == [(0, 10, None)]
        assert server.args_threads == [me] and stream.session.sent == 1
        assert stream._items == deque() and stream.unsent_bytes == 0 and stream._lone is None
        server.redialing = True
        stream.put_one(dumps(2), 2)
        assert stream.events.get(timeout=10)[2] == [(1, 20, None)]
        server.redialing = False
        reactor.run(stream._drive.acquire)  # the reactor drives the job: the call waits
        stream.put_one(dumps(3), 3)
        stream._items.append((dumps(4), 4, 0))  # another argument behind it, still queued
        stream.put_one(dumps(5), 5)  # goes behind both
        reactor.run(stream._drive.release)
        got: list[Any] = []
        while len(got) < 3:
            got += stream.events.get(timeout=10)[2]
        assert got == [(2, 30, None), (3, 40, None), (4, 50, None)]
        assert server.args_threads[0] == me and set(server.args_threads[1:]) == {"fake-reactor"}
        stream.session._granted = 0  # the window is closed: the argument waits for a grant
        stream.put_one(dumps(6), 6)
        assert stream.session.sent == 5 and len(stream._items) == 1
        reactor.run(stream.apply, "grant", 1)
        assert stream.events.get(timeout=10)[2] == [(5, 60, None)]
    finally:
        reactor.stop()


def test_put_one_of_a_future_cancelled_meanwhile_sends_nothing() -> None:
    """``on_send`` refusing the lone argument (its future was withdrawn) drops it, as the
    queue's take does: nothing is sent or counted."""
    reactor, server = Reactor(), DirectServer()
    try:
        refused: list[int] = []
        stream = stream_on(reactor, server, on_send=lambda index, tag: refused.append(index))
        _named(stream, reactor)
        stream.put_one(dumps(1), "tag")
        assert refused == [0] and stream.session.sent == 0 and server.args_threads == []
        assert stream._items == deque()
    finally:
        reactor.stop()


def _lone_session() -> JobSession:
    session = JobSession(JobOptions())
    session.submit(1, resumable=True)
    session.submitted(2, 10)
    session.pump(take_from([dumps(i) for i in range(3)], ended=False))
    return session


def test_a_lone_result_is_decoded_and_counted_as_results_counts_it() -> None:
    """``lone_result``: one result without an error, packed or not, gives ``(index, value)``
    and counts as ``results`` would (done, answered for a resume); anything else (several
    results, an error, a partial, a result that will not load) is left to ``results``."""
    session = _lone_session()
    packed = pickle.dumps([41])
    assert session.lone_result(
        m.Results.of(2, range(1, 2), sizes=[len(packed)], packed=True, payload=packed)
    ) == (1, 41)
    plain = pickle.dumps(40)
    assert session.lone_result(m.Results.of(2, range(0, 1), sizes=[len(plain)], payload=plain)) == (
        0,
        40,
    )
    assert session.done == 2 and session.events == []
    assert session.resume_message(9).missing == [[2, 3]]
    sizes, payload = pack([1, 2])
    two = m.Results.of(2, range(0, 2), sizes=sizes, payload=payload)
    error = m.Results.of(2, range(2, 3), sizes=[1], errors=[[0, "E", "m", ""]], payload=b"x")
    partial = m.Results.of(2, range(2, 3), sizes=[len(plain)], partial=True, payload=plain)
    garbage = m.Results.of(2, range(2, 3), sizes=[3], payload=b"bad")
    listed = m.Results(job=2, indices=[2], sizes=[len(plain)], payload=plain)
    for msg in (two, error, partial, garbage, listed):
        assert session.lone_result(msg) is None, msg
    assert session.done == 2 and session.events == []
    session.results(garbage)  # the general way reports it, as before
    assert session.failed == 1 and session.events[0][3][0].type_name == "ResultUnreadable"


def test_a_lone_result_goes_to_on_result_or_on_as_an_event(reactor: Reactor) -> None:
    """A stream with ``on_result`` hands it a lone result straight from the message; one it
    does not take (False) goes on as an ``items`` event, as do results of several arguments
    (through ``on_items``)."""
    taken: list[tuple[int, Any]] = []
    first = threading.Event()

    def on_result(index: int, value: Any) -> bool:
        taken.append((index, value))
        first.set()
        return index != 1

    server = MemoryServer(lambda x: x + 1)
    server.runs = True
    stream = stream_on(reactor, server, on_result=on_result, on_items=lambda batch: batch)
    stream.put_many([dumps(10)], [None])
    assert first.wait(10)
    stream.put_many([dumps(20)], [None])
    assert stream.events.get(timeout=10)[2] == [(1, 21, None)]
    stream.put_many([dumps(30), dumps(40)], [None, None])
    assert stream.events.get(timeout=10)[2] == [(2, 31, None), (3, 41, None)]
    assert taken == [(0, 11), (1, 21)]


def test_a_lone_answer_leaves_the_resume_bookkeeping_as_a_batch_answer_does() -> None:
    """``Unanswered.answered_one`` (a lone call's answer): the only argument out answered
    leaves nothing kept; one of several out is marked as ``answered`` marks it."""
    from remap.client import Unanswered

    def state(kept: Unanswered) -> tuple[Any, ...]:
        return kept.base, bytes(kept.done), list(kept.chunks), kept.missing()

    for sent, answer in (([(0, 1)], 0), ([(0, 1), (1, 2)], 2), ([(0, 3)], 1), ([(5, 1)], 5)):
        one, batch = Unanswered(), Unanswered()
        for kept in (one, batch):
            kept.base = sent[0][0]
            for start, count in sent:
                kept.sent(start, count, [b"x"] * count, [])
        one.answered_one(answer)
        batch.answered([answer])
        assert state(one) == state(batch), (sent, answer)
    assert state(one) == (6, b"", [], [])


def test_calls_never_sent_stay_for_their_owner_to_settle_when_the_job_fails() -> None:
    """A job that fails before its calls went out (it waited for a redial that gave up) keeps
    their tags, not their pickles: the executor withdraws them and fails their futures (they
    were dropped, and the futures waited forever)."""
    soon: list[Any] = []
    stream = JobStream(
        b"fn",
        JobOptions(),
        call_soon=lambda fn, *args: soon.append((fn, args)),
        on_send=lambda index, tag: True,
    )
    stream.put_many([dumps(1), dumps(2)], ["a", "b"])
    stream.fail(ConnectionLost("lost the server"))
    assert stream.finished.is_set() and isinstance(stream.error, ConnectionLost)
    assert stream.unsent_bytes == 0 and all(blob == b"" for blob, _, _ in stream._items)
    assert stream.withdraw() == ["a", "b"]


def test_a_call_put_after_the_job_ended_stays_for_its_owner_to_settle() -> None:
    """A call put once the job has ended, before its owner heard of the end (an executor's
    submit finding the function's job that had just failed: no node meets ``requires``),
    keeps its tag for the owner to withdraw and fail, as the calls the end found unsent do.
    It was dropped: 1 submit in 3 of two functions in turn waited forever."""
    soon: list[Any] = []
    stream = JobStream(
        b"fn",
        JobOptions(),
        call_soon=lambda fn, *args: soon.append((fn, args)),
        on_send=lambda index, tag: True,
    )
    stream.fail(JobFailed("no node can run this job"))
    assert stream.finished.is_set()
    stream.put_many([dumps(1)], ["late"], now=True, waits=True)
    stream.put_one(dumps(2), "later")
    assert stream.unsent_bytes == 0
    assert stream.withdraw() == ["late", "later"]


def test_a_detached_jobs_args_end_is_a_request_whose_answer_comes_even_after_its_end() -> None:
    """A detached job's ``args_end`` carries a request id of its own (``compute --detach``
    returns on its answer). Its answer reaches the stream even when the job's ``job_done``
    came first (a short job whose commit was slow): once the stream had ended, the answer was
    dropped and ``compute --detach`` waited for ever."""
    from remap.client import ClusterClient

    calls: list[tuple[Any, tuple[Any, ...]]] = []

    def run_calls() -> None:
        while calls:
            fn, args = calls.pop(0)
            fn(*args)

    client = ClusterClient()
    sent: list[m.Message] = []

    class Link:
        conn = SimpleNamespace(max_frame=1 << 20)

        def send(self, msg: m.Message) -> None:
            sent.append(msg)

    link = Link()
    client.link = link  # type: ignore[assignment]
    stream = JobStream(
        b"fn", JobOptions(detach=True), call_soon=lambda fn, *args: calls.append((fn, args))
    )
    client.submit(stream)
    stream.put_many([pickle.dumps(1)])
    stream.close_input()
    run_calls()
    submit, _args, end = sent
    assert type(submit) is m.Submit and end == m.ArgsEnd(job=-submit.id, total=1, id=end.id)
    assert end.id and end.id != submit.id
    client.message_received(link, m.Submitted(re=submit.id, job=5, window=256))
    client.message_received(link, m.JobDone(job=5, state="done", done=1, failed=0))
    run_calls()
    assert stream.finished.is_set() and not stream.stored_event.is_set()
    client.message_received(link, m.Ok(re=end.id, info={"job": 5, "stored": True}))
    assert stream.stored_event.is_set() and stream.stored == {"job": 5, "stored": True}
