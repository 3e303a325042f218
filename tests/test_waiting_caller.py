"""A thread waiting in ``RemoteFuture.result()`` runs the reactor's loop itself
(``LeanEPollReactor.drive``): it reads its own answer instead of being woken by the reactor's
thread. These tests check that everything the reactor's thread would have done still happens,
on an embedded cluster and on a real server with node processes: heartbeats and timers, a cut
connection (resumed, or failing the call with one error), two waiting threads at once, Ctrl-C
while waiting, a timeout, and the reactor's thread taking the loop back once the caller is busy
elsewhere."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import remap
from remap import runtime
from remap.errors import RemapError
from remap.executor import _SubmitStream
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, held_until, wait_for
from tests.test_api import slow_identity

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # clusters: cores are processes


def square(x: int) -> int:
    return x * x


def cube(x: int) -> int:
    return x * x * x


def squared_here(x: int) -> int:
    """``square`` for one test alone: its job opens after the test's patches (a job another
    test opened, kept open idle, holds the methods bound when it opened)."""
    return x * x


@pytest.fixture(scope="module")
def embedded() -> Iterator[remap.Cluster]:
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with ProcessCluster(
        tmp_path_factory.mktemp("waiting-caller"), nodes=[NodeSpec(cores=1), NodeSpec(cores=1)]
    ) as procs:
        yield procs


@pytest.fixture(scope="module")
def remote(procs: ProcessCluster) -> Iterator[remap.Cluster]:
    with remap.connect(procs.address, secret=procs.secret, settings=Settings()) as cluster:
        yield cluster


@pytest.fixture(params=["embedded", "remote"])
def cluster(request: pytest.FixtureRequest) -> remap.Cluster:
    return request.getfixturevalue(request.param)


def reactor_of(cluster: remap.Cluster) -> Any:
    r = cluster._reactor
    assert hasattr(r, "drive"), "the runtime's reactor is not the lean epoll one"
    return r


def test_a_waiting_caller_reads_its_own_answer(
    cluster: remap.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread in result() sets its own future's result (it ran the loop that read the
    answer), not the reactor's thread and not the delivery thread; results are right."""
    set_on: list[str] = []
    resolve_one = _SubmitStream._resolve_one

    def recording(self: _SubmitStream, index: int, result: object) -> bool:
        done = resolve_one(self, index, result)
        if done:
            set_on.append(threading.current_thread().name)
        return done

    monkeypatch.setattr(_SubmitStream, "_resolve_one", recording)
    # a loaded machine may keep this thread off a CPU between two calls for longer than
    # KEEP: the reactor's thread would take the loop back and might read the next answer
    monkeypatch.setattr(runtime, "KEEP", 0.5)
    assert [cluster.submit(squared_here, i).result(timeout=30) for i in range(20)] == [
        i * i for i in range(20)
    ]
    # the first call may find the loop on the reactor's thread (it asks for it meanwhile)
    assert set_on[1:] == ["MainThread"] * 19, set_on
    r = reactor_of(cluster)
    assert r.wanted == 0
    # idle, the loop goes back to the reactor's thread (heartbeats, other jobs' messages)
    wait_for(lambda: r.driver is None, 10, "the reactor's thread to take the loop back")


def test_two_waiting_threads_at_once_each_get_their_own_results(cluster: remap.Cluster) -> None:
    """Two threads submitting and waiting at once (one function each, and one shared): one
    runs the loop, the other waits for its result as before; nothing is lost or crossed."""
    errors: list[BaseException] = []
    got: dict[str, list[int]] = {}
    start = threading.Barrier(3)

    def caller(name: str, fn: Any) -> None:
        try:
            start.wait(30)
            got[name] = [cluster.submit(fn, i).result(timeout=60) for i in range(100)]
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [
        threading.Thread(target=caller, args=("square", square)),
        threading.Thread(target=caller, args=("cube", cube)),
        threading.Thread(target=caller, args=("square again", square)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert got["square"] == got["square again"] == [i * i for i in range(100)]
    assert got["cube"] == [i**3 for i in range(100)]
    r = reactor_of(cluster)
    assert r.wanted == 0
    wait_for(lambda: not r.driving, 10, "no thread to run the loop any more")


def test_a_timeout_while_driving_raises_and_the_result_comes_later(cluster: remap.Cluster) -> None:
    future = cluster.submit(slow_identity, 1.0)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.2)
    assert future.result(timeout=30) == 1.0
    assert cluster.submit(square, 7).result(timeout=30) == 49


def test_a_remote_error_reaches_the_driving_caller(cluster: remap.Cluster) -> None:
    """An error result goes through the delivery thread (it rebuilds the exception): the
    caller running the loop hears of it at once and raises it."""
    with pytest.raises(ZeroDivisionError):
        cluster.submit(divmod, 1, 0).result(timeout=30)
    assert cluster.submit(square, 3).result(timeout=30) == 9


def test_ctrl_c_while_waiting_raises_keyboard_interrupt_and_the_cluster_goes_on(
    cluster: remap.Cluster,
) -> None:
    """SIGINT while the main thread waits (running the loop) raises KeyboardInterrupt from
    result() once the loop is left, the handler is the one it was, and the next call works."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    r = reactor_of(cluster)
    me = threading.get_ident()
    handler = signal.getsignal(signal.SIGINT)
    future = cluster.submit(slow_identity, 20.0)
    sent = threading.Event()

    def interrupt() -> None:
        wait_for(lambda: r.driver == me and r.driving, 30, "the caller to run the loop")
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        future.result(timeout=60)
    assert sent.is_set()
    assert time.monotonic() - started < 15, "Ctrl-C waited for the call to end"
    assert signal.getsignal(signal.SIGINT) is handler
    assert not r.driving
    future.cancel()
    assert cluster.submit(square, 5).result(timeout=30) == 25


def test_work_queued_by_another_thread_runs_while_the_loop_is_kept(
    cluster: remap.Cluster,
) -> None:
    """After a result the caller keeps the loop for its next call; another thread's request
    (here cluster.status()) makes the reactor's thread take it back and answer."""
    reactor_of(cluster)
    assert cluster.submit(square, 2).result(timeout=30) == 4
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(cluster.status(timeout=30)))
    t.start()
    t.join(60)
    assert out and "nodes" in out[0]
    # and from the caller's own thread too (runtime.run waits on another kind of future)
    assert runtime.run(threading.current_thread, timeout=30).name == "remap-reactor"


def cut(cluster: remap.Cluster, seen: list[str]) -> None:
    """Reactor code: drop the console's TCP connection as a network failure would."""
    seen.append(threading.current_thread().name)
    link = cluster._client.link
    assert link is not None
    link.transport.abortConnection()


def test_a_cut_while_the_caller_waits_is_resumed_on_its_thread(
    remote: remap.Cluster, tmp_path: Path
) -> None:
    """The connection drops while the main thread runs the loop for its call: the loop on
    that thread dials again and resumes the job; the result arrives, once."""
    r = reactor_of(remote)
    me = threading.get_ident()
    release = tmp_path / "release"
    future = remote.submit(held_until, str(release), 1)
    before = remote._client.reconnects
    seen: list[str] = []

    def cut_then_release() -> None:
        wait_for(lambda: r.driver == me and r.driving, 30, "the caller to run the loop")
        runtime.call(cut, remote, seen).result(30)
        wait_for(lambda: remote._client.reconnects > before, 30, "the console to dial again")
        release.touch()

    helper = threading.Thread(target=cut_then_release, daemon=True)
    helper.start()
    assert future.result(timeout=60) == 1
    helper.join(30)
    assert seen == ["MainThread"], "the cut was not handled by the thread running the loop"
    assert remote._client.reconnects == before + 1
    assert remote.submit(square, 6).result(timeout=30) == 36


def test_a_cut_that_cannot_be_resumed_fails_the_waiting_call(procs: ProcessCluster) -> None:
    """Without a grace to dial again, a cut while the caller runs the loop fails its call
    with one RemapError at once (not a hang until the timeout)."""
    settings = Settings(console_grace=0.0)
    with remap.connect(procs.address, secret=procs.secret, settings=settings) as cluster:
        r = reactor_of(cluster)
        assert cluster.submit(square, 4).result(timeout=30) == 16
        me = threading.get_ident()
        future = cluster.submit(slow_identity, 30.0)
        seen: list[str] = []

        def cut_soon() -> None:
            wait_for(lambda: r.driver == me and r.driving, 30, "the caller to run the loop")
            runtime.call(cut, cluster, seen)

        threading.Thread(target=cut_soon, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(RemapError):
            future.result(timeout=60)
        assert time.monotonic() - started < 20
        assert seen == ["MainThread"]


def test_a_map_on_another_thread_goes_on_while_the_caller_runs_the_loop(
    cluster: remap.Cluster,
) -> None:
    """Another thread's map is served by whichever thread runs the loop: its results keep
    coming while the main thread makes single calls, and both get every result, in order."""
    mapped: list[list[int]] = []
    errors: list[BaseException] = []

    def mapping() -> None:
        try:
            mapped.append(cluster.map(cube, range(3000)))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=mapping)
    t.start()
    singles = [cluster.submit(square, i).result(timeout=60) for i in range(60)]
    t.join(90)
    assert not errors, errors
    assert singles == [i * i for i in range(60)]
    assert mapped == [[i**3 for i in range(3000)]]


def test_timed_calls_and_queued_work_run_on_the_thread_that_drives(
    embedded: remap.Cluster,
) -> None:
    """A turn of a driving thread with nothing queued reads the next timed call's delay
    itself (no runUntilCurrent): a timed call still fires when it is due, on that thread, and
    work queued from another thread runs first."""
    r = reactor_of(embedded)
    ran: list[tuple[str, str]] = []

    def later() -> None:
        ran.append(("timed", threading.current_thread().name))

    def queued() -> None:
        ran.append(("queued", threading.current_thread().name))
        r.callLater(0.2, later)

    def until() -> bool:
        if not ran and not r.threadCallQueue:  # queued once this thread has the loop
            r.threadCallQueue.append((queued, (), {}))
        return len(ran) == 2

    deadline = time.monotonic() + 30
    # drive() may answer False by contract: the reactor's thread takes a handed-over loop back
    # after KEEP (5 ms) if this thread was not scheduled by then (a loaded machine); ask again.
    while not r.drive(until, deadline):
        r.unwant()
        assert time.monotonic() < deadline, "this thread never got the loop"
    me = threading.current_thread().name
    assert ran == [("queued", me), ("timed", me)]
    assert embedded.submit(square, 4).result(timeout=30) == 16
