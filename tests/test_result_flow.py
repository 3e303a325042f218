"""Flow control of results: a caller that takes results slowly holds a bounded amount of them.

Layers: the pure session (``hold`` withholds arguments), the stream's accounting of result
bytes on a hand-driven "reactor", the scheduler (a held or congested console's jobs get no
dispatch), the server's write backlog on a real socket pair, and (slow) the public API on the
embedded cluster with a small ``REMAP_RESULT_BUFFER``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.task import Clock

from protocol import messages as m
from protocol.options import JobOptions
from remap.client import ARGS_OVERHEAD, JobSession, JobStream
from remap.wire import CONGESTED_BYTES, DRAIN_CHECK

from .test_job_stream import results, take_from
from .test_latency import Client as StreamClient
from .test_scheduler import FakeConsole, FakeNode, make
from .test_wire import _open_over_tcp

MB = 1024 * 1024

# ============================================================================ the session


def test_a_held_session_sends_no_argument_until_it_goes_on() -> None:
    """``hold``: one ``hold`` message and no ``args`` while held, whatever the window; the
    window granted is kept and used once it goes on."""
    session = JobSession(JobOptions())
    session.submit(1)
    session.submitted(5, 0)
    session.outbox.clear()
    session.grant(10)
    session.hold(True)
    assert session.outbox == [m.Hold(job=5, held=True)]
    take = take_from([b"x"] * 10, ended=False)
    session.pump(take)
    assert session.outbox == [m.Hold(job=5, held=True)], "no argument while held"
    session.hold(True)
    assert len(session.outbox) == 1, "said once"
    session.hold(False)
    session.pump(take)
    assert session.outbox[1] == m.Hold(job=5, held=False)
    assert sum(len(a.sizes) for a in session.outbox[2:]) == 10


# ============================================================================ the stream


class Calls:
    """``call_soon`` run by hand: the test is the reactor thread."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, tuple]] = []

    def __call__(self, fn: Any, *args: Any) -> None:
        self.pending.append((fn, args))

    def run(self) -> None:
        while self.pending:
            fn, args = self.pending.pop(0)
            fn(*args)


class Client(StreamClient):
    """Records what the stream sends; answers nothing by itself."""

    def frame_room(self) -> int:
        return (1 << 20) - ARGS_OVERHEAD

    def of(self, kind: type) -> list[Any]:
        return [x for x in self.sent if type(x) is kind]


def _stream(limit: int) -> tuple[JobStream, Client, Calls]:
    calls, client = Calls(), Client()
    stream = JobStream(b"fn", JobOptions(), call_soon=calls, result_buffer=limit)
    stream.submitting(client, 1)  # type: ignore[arg-type]
    stream.apply("submitted", 7, 1000)
    calls.run()
    return stream, client, calls


def _take(stream: JobStream) -> int:
    """What a consumer does: take one event, say how many results it held."""
    event = stream.events.get_nowait()
    n = len(event[2]) if event[0] == "items" else sum(len(v) for _, v in event[2])
    stream.took(n)
    return n


def test_the_stream_holds_the_job_past_its_bound_and_lets_it_go_on_once_taken() -> None:
    """4.5 MiB bound, results of 1 MiB: the fifth puts 5 MiB in hand, so the job is held (one
    ``hold``) and arguments put meanwhile stay here; once the consumer took enough that at most
    half the bound is held, ``hold`` false goes and the arguments with it."""
    stream, client, calls = _stream(9 * MB // 2)
    blob = os.urandom(MB)
    for i in range(4):
        stream.results(results(7, [blob], start=i))
    assert client.of(m.Hold) == [] and stream.held_result_bytes > 4 * MB
    stream.results(results(7, [blob], start=4))
    assert client.of(m.Hold) == [m.Hold(job=7, held=True)]
    stream.put_many([b"a", b"b"])
    calls.run()
    assert client.of(m.Args) == [], "no argument goes while held"
    _take(stream)
    _take(stream)
    calls.run()
    assert client.of(m.Hold) == [m.Hold(job=7, held=True)], "3 MiB held: still over half"
    _take(stream)
    assert calls.pending, "the take that crossed half the bound wakes the reactor"
    calls.run()
    assert client.of(m.Hold)[-1] == m.Hold(job=7, held=False)
    assert sum(len(a.sizes) for a in client.of(m.Args)) == 2
    assert stream.held_peak > 5 * MB and stream.held_result_bytes <= 9 * MB // 4


def test_a_consumer_waiting_for_a_result_it_lacks_lets_the_held_job_go_on() -> None:
    """An ordered map holds results that arrived ahead of the one it waits for: holding the
    job then could wait for ever, so a consumer that waits releases the hold. A result that
    comes while it waits holds it again (it has that one to take); woken, it finds it still
    lacks result 0 and says so again: the job goes on."""
    stream, client, calls = _stream(2 * MB)
    blob = os.urandom(MB)
    for i in range(1, 4):  # 1..3 arrived, 0 did not
        stream.results(results(7, [blob], start=i))
    assert client.of(m.Hold) == [m.Hold(job=7, held=True)]
    stream.waiting_for_results()
    calls.run()
    assert client.of(m.Hold)[-1] == m.Hold(job=7, held=False)
    stream.results(results(7, [blob], start=4))
    assert client.of(m.Hold)[-1] == m.Hold(job=7, held=True), "a result came since it said so"
    stream.waiting_for_results()
    calls.run()
    assert client.of(m.Hold)[-1] == m.Hold(job=7, held=False)


def test_a_consumer_slow_to_wake_for_the_result_it_waited_for_holds_no_more() -> None:
    """The consumer waits for the first result; it comes, but its thread runs late (a busy
    machine): what comes meanwhile holds the job past the bound as if it had not waited,
    instead of the whole job arriving before it wakes."""
    stream, client, _ = _stream(2 * MB)
    stream.waiting_for_results()
    for i in range(3):
        stream.results(results(7, [os.urandom(MB)], start=i))
    assert client.of(m.Hold) == [m.Hold(job=7, held=True)]


class TakesAtOnce(list):
    """A stream's events queue whose consumer takes each event the moment it is queued, finds
    it is not result 0, and says it waits, before the reactor looks whether to hold."""

    stream: JobStream

    def put(self, event: Any) -> None:
        self.append(event)
        self.stream.waiting_for_results()


def test_a_consumer_that_took_every_result_and_waits_is_not_held() -> None:
    """Results are counted before they are queued: a consumer that took them at once and
    waits is seen waiting with nothing to take, so the job is not held (it would wait for
    result 0 for ever)."""
    calls, client, events = Calls(), Client(), TakesAtOnce()
    stream = JobStream(b"fn", JobOptions(), call_soon=calls, events=events, result_buffer=2 * MB)
    events.stream = stream
    stream.submitting(client, 1)  # type: ignore[arg-type]
    stream.apply("submitted", 7, 1000)
    calls.run()
    for i in range(1, 5):
        stream.results(results(7, [os.urandom(MB)], start=i))
        calls.run()
        assert not stream.session.held, f"held with result {i} taken and 0 awaited"


def test_without_a_bound_nothing_is_held() -> None:
    stream, client, _ = _stream(0)
    for i in range(8):
        stream.results(results(7, [bytes(MB)], start=i))
    assert client.of(m.Hold) == [] and stream.held_result_bytes == 0


# ============================================================================ the scheduler


def test_a_held_job_gets_no_new_task_until_its_console_lets_it_go_on() -> None:
    """``hold`` from the job's console: the tasks out finish, nothing more is dispatched;
    another console's ``hold`` changes nothing; ``hold`` false dispatches again."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(20), total=20)
    console.feed()
    out = node.held()
    assert out
    other = FakeConsole(sched, range(1), name="other")
    sched.hold(other.link, console.job, False)
    sched.hold(console.link, console.job, True)
    for task in out:
        node.answer(task, elapsed=0.001)
    assert node.held() == [], "held: nothing more dispatched"
    sched.hold(other.link, console.job, False)
    assert node.held() == [], "only its own console may let it go on"
    sched.hold(console.link, console.job, False)
    assert node.held(), "dispatched again"


def test_a_congested_console_gets_no_new_task_until_it_drained() -> None:
    """More than CONGESTED_BYTES unwritten to a console: none of its jobs' calls go out
    (another console's job still runs); drained: they go again."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    slow = FakeConsole(sched, range(20), total=20, name="slow")
    slow.feed()
    for task in node.held():
        node.answer(task, elapsed=0.001)
    sched.console_congested(slow.link, True)
    for task in node.held():
        node.answer(task, elapsed=0.001)
    assert node.held() == []
    fast = FakeConsole(sched, range(4), total=4, name="fast")
    fast.feed()
    assert {t.job for t in node.held()} == {fast.job}, "other jobs keep running"
    while node.held():
        node.answer(node.held()[0], elapsed=0.001)
    assert fast.done().state == "done"
    sched.console_congested(slow.link, False)
    assert {t.job for t in node.held()} == {slow.job}


# ============================================================================ the server's writes


def test_a_console_that_does_not_read_is_congested_until_it_drained() -> None:
    """A real socket whose peer reads nothing: once more than CONGESTED_BYTES wait to be
    written the watcher hears True (once); after the peer read them all, the next look
    (DRAIN_CHECK later) hears False."""
    clock = Clock()
    proto, theirs, _ = _open_over_tcp(clock)
    heard: list[bool] = []
    proto.watch_backlog(lambda link, congested: heard.append(congested))
    try:
        payload = bytes(4 * MB)
        for i in range(CONGESTED_BYTES // len(payload) + 2):
            proto.send(m.Results(job=1, indices=[i], sizes=[len(payload)], payload=payload))
        assert heard == [True] and proto.congested and proto.backlog() > CONGESTED_BYTES
        clock.advance(DRAIN_CHECK)
        assert heard == [True], "still full"
        for _ in range(100_000):  # the peer reads; the reactor's writes go on
            proto.transport.doWrite()
            _read_all(theirs)
            if proto.backlog() == 0:
                break
        assert proto.backlog() == 0
        clock.advance(DRAIN_CHECK)
        assert heard == [True, False] and not proto.congested
    finally:
        proto.transport.socket.close()
        theirs.close()


def _read_all(sock: Any) -> None:
    while True:
        try:
            if not sock.recv(1 << 20):
                return
        except BlockingIOError:
            return


# ============================================================================ end to end


def one_mib(i: int) -> bytes:
    return os.urandom(MB)


@pytest.mark.slow
def test_a_slow_imap_holds_a_bounded_amount_of_results() -> None:
    """imap of 60 results of 1 MiB with REMAP_RESULT_BUFFER at 8 MiB on the embedded cluster
    (2 cores), its caller slow to take any: the job is held once over 8 MiB wait, the calls
    out finish, and what the handle holds stays under the bound; then every result comes, in
    order. The bound, from the product's constants: the results message that crossed 8 MiB,
    then those of the tasks out when the hold reaches the server (in-process it does before
    the server reads another answer, a core answering one task at a time): cores × PREFETCH
    tasks, each a batch of at most MAX_BATCH_RESULT_BYTES of results once measured (as many
    whole results as fit; all of one size here). The caller takes none before the hold: one
    waiting for a result it lacks (result 0, late on a busy machine) is not held, by design."""
    import remap
    from remap.server.scheduler.policy import MAX_BATCH_RESULT_BYTES
    from remap.server.scheduler.state import PREFETCH
    from remap.settings import load_settings

    from .cluster_harness import wait_for

    cores, limit = 2, 8 * MB
    settings = load_settings({"result_buffer": limit}, environ={}, dotenv_path=None)
    with remap.connect(cores=cores, settings=settings, env_file=None, task_output=False) as cluster:
        it = cluster.imap(one_mib, range(60))
        wait_for(lambda: it.job_id is not None, 60, "the job submitted")
        sched = cluster._embedded.server.factory.scheduler  # type: ignore[union-attr]
        job = sched.jobs[it.job_id]
        wait_for(lambda: job.finished or (job.paused and not job.tasks), 60, "the job held")
        held = cluster.held_result_bytes
        assert not job.finished and job.done < 60, "held before it ran to the end"
        result = round(job.result_size)  # one result's pickle, as the server measured it
        bound = limit + (cores * PREFETCH + 1) * (MAX_BATCH_RESULT_BYTES // result * result)
        assert limit < held <= it._stream.held_peak <= bound, f"{held / MB:.1f} MiB held"
        assert len(next(it)) == MB
        rest = list(it)
        assert len(rest) == 59 and all(len(v) == MB for v in rest)
        assert cluster.held_result_bytes == 0
