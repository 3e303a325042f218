"""``remap.Pool``, the multiprocessing.Pool surface: map, imap, imap_unordered, starmap, apply,
apply_async, map_async, close/join, terminate and the context manager, on an embedded cluster
and on a real server with two nodes."""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import remap
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, held_until, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # embedded clusters: cores are processes


class PoolError(Exception):
    """Raised by tasks; importable on the cores, so it comes back as itself."""


def square(x: int) -> int:
    return x * x


def power(base: int, exponent: int) -> int:
    return base**exponent


def fail_on_three(x: int) -> int:
    if x == 3:
        raise PoolError("three")
    return x


def sleep_then(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def held(release: str) -> int:
    """1 once the test creates ``release`` (or a minute passed): never done before that."""
    return held_until(release, 1)


@pytest.fixture(scope="module")
def embedded() -> Iterator[remap.Cluster]:
    """An embedded cluster with two cores, shared by this module's tests."""
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


@pytest.fixture
def pool(embedded: remap.Cluster) -> Iterator[remap.Pool]:
    """A Pool borrowing the module's cluster, terminated after the test."""
    with remap.Pool(cluster=embedded) as p:
        yield p


def test_map_and_starmap(pool: remap.Pool) -> None:
    """map and starmap return ordered lists, like multiprocessing's."""
    assert pool.map(square, range(500)) == [x * x for x in range(500)]
    assert pool.map(square, range(100), chunksize=9) == [x * x for x in range(100)]
    assert pool.starmap(power, [(2, 3), (3, 2), (10, 0)]) == [8, 9, 1]


def test_map_raises_the_remote_error(pool: remap.Pool) -> None:
    """A failing call makes map raise that exception type."""
    with pytest.raises(PoolError, match="three"):
        pool.map(fail_on_three, range(6))


def logged_fail_on_three(path: str, x: int) -> int:
    if x > 3:
        time.sleep(0.05)  # the later calls are still queued or running when three fails
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return fail_on_three(x)


def test_map_lets_every_call_finish_then_raises_the_first_error(
    pool: remap.Pool, tmp_path: Path
) -> None:
    """As multiprocessing.Pool.map: a failing call does not cancel the others; once every call
    has ended, the first error is raised (map_async and starmap alike)."""
    log = tmp_path / "calls.log"
    with pytest.raises(PoolError, match="three"):
        pool.starmap(logged_fail_on_three, [(str(log), x) for x in range(40)], chunksize=1)
    assert sorted(int(x) for x in log.read_text().split()) == list(range(40))
    with pytest.raises(PoolError, match="three"):
        pool.map_async(fail_on_three, range(10)).get(timeout=60)


def test_a_dropped_running_pool_warns(embedded: remap.Cluster) -> None:
    """Like multiprocessing: a running pool that is garbage collected gives a ResourceWarning."""
    import gc

    p = remap.Pool(cluster=embedded)
    assert p.map(square, [2]) == [4]
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del p
        gc.collect()


UNCLOSED_SCRIPT = """
import remap
from remap.settings import Settings

def square(x):
    return x * x

pool = remap.Pool(1, settings=Settings())
print(pool.map(square, range(3)), flush=True)
"""


def test_a_script_that_never_closes_its_pool_exits_at_once(tmp_path: Path) -> None:
    """A script that ends with its Pool still open (multiprocessing lets it) exits as soon as
    it is done: the Pool garbage collected while the interpreter ends no longer waits for the
    reactor's thread, frozen by then (it timed out after 5 + 15 s)."""
    child = subprocess.Popen(
        [sys.executable, "-c", UNCLOSED_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "[0, 1, 4]\n"
        assert child.wait(timeout=10) == 0, child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.wait()


def test_imap_is_ordered_and_lazy(pool: remap.Pool) -> None:
    """imap yields in order from an endless iterable without reading it all."""
    source = itertools.count()
    results = pool.imap(square, source, buffersize=50)
    assert [next(results) for _ in range(120)] == [x * x for x in range(120)]
    assert next(source) <= 120 + 50 + 1
    results.close()


def test_a_generator_that_breaks_gives_every_result_before_its_error(pool: remap.Pool) -> None:
    """5,000 arguments from a generator (they travel in argument groups, the last one partial),
    then it raises: imap and map give exactly the 5,000 results in order, then its error."""

    def source() -> Iterator[int]:
        yield from range(5000)
        raise ValueError("the input broke")

    got: list[int] = []
    with pytest.raises(ValueError, match="the input broke"):
        for value in pool.imap(square, source()):
            got.append(value)
    assert got == [x * x for x in range(5000)]
    assert pool.map(square, (x for x in range(5000))) == [x * x for x in range(5000)]


def test_imap_goes_on_after_an_error(pool: remap.Pool) -> None:
    """Like multiprocessing, an imap error is raised at its position and iteration continues."""
    results = pool.imap(fail_on_three, range(6))
    got: list[object] = []
    for _ in range(6):
        try:
            got.append(next(results))
        except PoolError as exc:
            got.append(f"error {exc}")
    assert got == [0, 1, 2, "error three", 4, 5]
    with pytest.raises(StopIteration):
        next(results)


def test_imap_next_timeout_raises_multiprocessing_timeout(pool: remap.Pool, tmp_path: Path) -> None:
    """imap's next(timeout) raises multiprocessing.TimeoutError and the iterator stays usable
    (the call is held until the test releases it: it cannot be done before the timeout)."""
    release = tmp_path / "release"
    try:
        results = pool.imap(held, [str(release)])
        with pytest.raises(multiprocessing.TimeoutError):
            results.next(timeout=0.05)
    finally:
        release.touch()
    assert results.next(timeout=30) == 1


def test_imap_unordered_yields_each_result_once(pool: remap.Pool) -> None:
    """imap_unordered yields every result exactly once."""
    assert sorted(pool.imap_unordered(square, range(300))) == [x * x for x in range(300)]


def test_apply_and_apply_async(pool: remap.Pool) -> None:
    """apply waits; apply_async returns an AsyncResult whose callback runs before get() returns."""
    assert pool.apply(power, (2, 5)) == 32
    assert pool.apply(power, (), {"base": 3, "exponent": 3}) == 27
    seen: list[int] = []
    result = pool.apply_async(power, (7, 2), callback=seen.append)
    assert result.get(timeout=30) == 49
    assert seen == [49]
    assert result.ready() and result.successful()


def test_a_small_sync_map_in_a_callback_gets_its_results_and_its_error(pool: remap.Pool) -> None:
    """A callback (on the pool's delivery thread) may call ``pool.map``: a small map does not
    run in the shared job there, whose outcomes that very thread delivers (it waited for itself
    as soon as one of its calls failed)."""
    seen: list[Any] = []

    def callback(_: int) -> None:
        seen.append(pool.map(square, [1, 2, 3]))
        try:
            pool.map(fail_on_three, [1, 2, 3])
        except PoolError as exc:
            seen.append(str(exc))

    pool.apply_async(square, (1,), callback=callback).get(timeout=60)
    assert seen == [[1, 4, 9], "three"]


def test_apply_async_error_callback(pool: remap.Pool) -> None:
    """A failing apply_async calls error_callback, get() raises, successful() is False."""
    errors: list[BaseException] = []
    result = pool.apply_async(fail_on_three, (3,), error_callback=errors.append)
    with pytest.raises(PoolError):
        result.get(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], PoolError)
    assert not result.successful()


def test_a_callback_that_raises_leaves_the_result_and_the_pool_usable(pool: remap.Pool) -> None:
    """A callback or error_callback that raises is logged; get() still gives the result (or
    raises the call's error) and the pool goes on (multiprocessing's result thread dies and
    every later get() hangs)."""

    def broken(value: object) -> None:
        raise RuntimeError("the callback broke")

    done = pool.apply_async(square, (4,), callback=broken)
    failed = pool.apply_async(fail_on_three, (3,), error_callback=broken)
    mapped = pool.map_async(square, [1, 2], callback=broken)
    assert done.get(timeout=30) == 16
    with pytest.raises(PoolError):
        failed.get(timeout=30)
    assert mapped.get(timeout=30) == [1, 4]
    assert pool.apply(square, (5,)) == 25


def unpicklable_result(x: int) -> object:
    return threading.Lock() if x == 2 else x


def test_an_unpicklable_result_raises_maybe_encoding_error(pool: remap.Pool) -> None:
    """As multiprocessing: a result the core cannot pickle raises MaybeEncodingError (its
    ``exc`` and ``value`` are reprs) from map, imap and apply_async, and the pool goes on."""
    from multiprocessing.pool import MaybeEncodingError

    with pytest.raises(MaybeEncodingError, match="Error sending result: '<unlocked _thread.lock"):
        pool.map(unpicklable_result, range(4))
    results = pool.imap(unpicklable_result, range(4))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(MaybeEncodingError) as raised:
        next(results)
    assert "_thread.lock" in raised.value.exc and "_thread.lock" in raised.value.value
    assert next(results) == 3
    errors: list[BaseException] = []
    result = pool.apply_async(unpicklable_result, (2,), error_callback=errors.append)
    with pytest.raises(MaybeEncodingError) as raised:
        result.get(timeout=30)
    assert errors == [raised.value]
    assert pool.apply(unpicklable_result, (5,)) == 5


def test_async_result_get_timeout(pool: remap.Pool, tmp_path: Path) -> None:
    """get(timeout) on a slow result raises multiprocessing.TimeoutError; successful() before
    ready raises ValueError."""
    release = tmp_path / "release"
    try:
        result = pool.apply_async(held, (str(release),))  # held until released below
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.05)
        with pytest.raises(ValueError):
            result.successful()
    finally:
        release.touch()
    assert result.get(timeout=30) == 1


def test_map_async_and_starmap_async(pool: remap.Pool) -> None:
    """map_async / starmap_async deliver the whole list (and call callback with it)."""
    lists: list[list[int]] = []
    done = threading.Event()

    def callback(value: list[int]) -> None:
        lists.append(value)
        done.set()

    result = pool.map_async(square, range(50), callback=callback)
    assert result.get(timeout=30) == [x * x for x in range(50)]
    assert done.wait(30) and lists == [[x * x for x in range(50)]]
    assert pool.starmap_async(power, [(2, 2), (2, 3)]).get(timeout=30) == [4, 8]
    failing = pool.map_async(fail_on_three, range(5))
    with pytest.raises(PoolError):
        failing.get(timeout=30)


def test_outstanding_map_async_calls_hold_no_thread_each(pool: remap.Pool, tmp_path: Path) -> None:
    """200 map_async calls outstanding at once add no thread each (each had its own
    collecting thread: 200 more): they are gathered, and their callbacks run, on the pool's
    one delivery thread."""
    release = tmp_path / "release"
    pool.map(square, [1])  # the pool's delivery thread and the cores are up
    baseline = threading.active_count()
    threads: set[int] = set()
    try:
        results = [
            pool.map_async(
                held, [str(release)], callback=lambda v: threads.add(threading.get_ident())
            )
            for _ in range(200)
        ]
        assert not any(r.ready() for r in results)
        assert threading.active_count() <= baseline + 3
    finally:
        release.touch()
    assert [r.get(timeout=60) for r in results] == [[1]] * 200
    assert len(threads) == 1 and threading.get_ident() not in threads


def fail_on_sevens(x: int) -> int:
    if x % 7 == 3:
        raise PoolError(f"seven {x}")
    return x * x


def jobs_after(cluster: remap.Cluster, first: int) -> list[dict]:
    return [job for job in cluster.status()["jobs"] if job["id"] > first]


def test_small_map_async_calls_share_one_job_each_with_its_own_results(
    embedded: remap.Cluster,
) -> None:
    """200 small map_async and starmap_async calls, interleaved with apply_async and some
    raising, run in the pool's one job of their function (not a job each: a job costs a round
    trip, set-up on the server and its share of every dispatch): each result holds its own
    values in argument order, or raises its first failure in argument order, and each callback
    or error_callback runs once, on the pool's delivery thread. A map past SMALL_MAP arguments
    or SMALL_MAP_BYTES pickled gets a job of its own, as before."""
    from remap.pool import SMALL_MAP, SMALL_MAP_BYTES

    first = max((job["id"] for job in embedded.status()["jobs"]), default=0)
    got: dict[int, list[tuple[str, object, int]]] = {}
    lock = threading.Lock()

    def note(k: int, kind: str) -> Any:
        def called(value: object) -> None:
            with lock:
                got.setdefault(k, []).append((kind, value, threading.get_ident()))

        return called

    pool = remap.Pool(cluster=embedded)
    try:
        results, expected = [], []
        for k in range(200):
            args = list(range(k, k + 1 + k % 9))
            if k % 3 == 2:
                results.append(
                    pool.starmap_async(
                        power,
                        [(x, 2) for x in args],
                        callback=note(k, "ok"),
                        error_callback=note(k, "error"),
                    )
                )
                expected.append([x * x for x in args])
            else:
                results.append(
                    pool.map_async(
                        fail_on_sevens,
                        args,
                        callback=note(k, "ok"),
                        error_callback=note(k, "error"),
                    )
                )
                failing = [x for x in args if x % 7 == 3]
                expected.append(f"seven {failing[0]}" if failing else [x * x for x in args])
            if k % 4 == 0:
                results.append(
                    pool.apply_async(fail_on_sevens, (k,), callback=note(1000 + k, "ok"))
                )
                expected.append(f"seven {k}" if k % 7 == 3 else k * k)
        outcomes = []
        for result in results:
            try:
                outcomes.append(result.get(timeout=60))
            except PoolError as exc:
                outcomes.append(str(exc))
        assert outcomes == expected
        # one job of each function (another only if one idled past its linger meanwhile)
        kinds = [job["name"].partition(":")[0] for job in jobs_after(embedded, first)]
        assert set(kinds) == {"submit"} and len(kinds) < 10, kinds
        for k in range(200):  # once each, the right one, on the delivery thread
            ((kind, value, thread),) = got[k]
            assert kind == ("error" if isinstance(expected[k + (k + 3) // 4], str) else "ok")
            assert thread != threading.get_ident()
        # a longer map, or one of larger arguments, runs as a job of its own
        assert pool.map_async(square, range(SMALL_MAP + 1)).get(timeout=60) == [
            x * x for x in range(SMALL_MAP + 1)
        ]
        big = [b"x" * (SMALL_MAP_BYTES // 2 + 1)] * 2
        assert pool.map_async(len, big).get(timeout=60) == [len(big[0])] * 2
        kinds = [job["name"].partition(":")[0] for job in jobs_after(embedded, first)]
        assert kinds.count("pool") == 2, kinds
    finally:
        pool.terminate()


def test_terminate_fails_small_map_asyncs_sent_or_not(
    embedded: remap.Cluster, tmp_path: Path
) -> None:
    """terminate() with small map_async calls outstanding in the pool's shared job, some calls
    running, some queued on the server and some not yet sent (past the job's first window):
    each result raises CancelledError saying the pool was terminated, and its error_callback
    gets that error once."""
    from protocol.messages import INITIAL_WINDOW

    release = tmp_path / "release"
    pool = remap.Pool(cluster=embedded)
    errors: list[BaseException] = []
    try:
        n = INITIAL_WINDOW // 2 + 1
        results = [
            pool.map_async(held, [str(release)] * n, error_callback=errors.append) for _ in range(3)
        ]
        stream = next(iter(pool._executor._streams.values()))
        wait_for(lambda: stream.futures, 10, "calls of the job to be sent")
        assert stream.job._items  # (some calls were not sent yet)
        pool.terminate()
        for result in results:
            with pytest.raises(concurrent.futures.CancelledError, match="pool was terminated"):
                result.get(timeout=20)
        assert sorted(map(id, errors)) == sorted(id(r._error) for r in results)
    finally:
        release.touch()


def test_small_sync_maps_share_one_job_and_an_interrupted_one_stops_only_its_calls(
    embedded: remap.Cluster, tmp_path: Path
) -> None:
    """Small synchronous map and starmap calls run as calls in the pool's one job of their
    function (not a job each: 2-4 ms), each returning its own results in order or raising its
    first failure in argument order, in multiprocessing's types; chunksize is checked. A
    KeyboardInterrupt while one map waits skips its calls not yet sent and drops its outcomes:
    the shared job is not killed, a map_async in it gets its results, the pool goes on."""
    from multiprocessing.pool import MaybeEncodingError

    from protocol.messages import INITIAL_WINDOW
    from remap.pool import SMALL_MAP
    from remap.server.scheduler.state import PREFETCH

    first = max((job["id"] for job in embedded.status()["jobs"]), default=0)
    release = tmp_path / "release"
    pool = remap.Pool(cluster=embedded)
    try:
        for k in range(40):
            args = list(range(k, k + 1 + k % 9))
            failing = [x for x in args if x % 7 == 3]
            if failing:
                with pytest.raises(PoolError, match=f"^seven {failing[0]}$"):
                    pool.map(fail_on_sevens, args)
            else:
                assert pool.map(fail_on_sevens, args, chunksize=2) == [x * x for x in args]
            assert pool.starmap(power, [(x, 3) for x in args]) == [x**3 for x in args]
        with pytest.raises(MaybeEncodingError, match="Error sending result: '<unlocked"):
            pool.map(unpicklable_result, range(4))
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(square, [1], chunksize=0)
        kinds = [job["name"].partition(":")[0] for job in jobs_after(embedded, first)]
        assert set(kinds) == {"submit"} and len(kinds) < 10, kinds

        # both cores held by a map_async's calls; the next map's last calls wait unsent. The
        # server's window counts calls queued on it, not those its node took: once the first
        # window is spent it may grant back the calls in flight (cores x PREFETCH), or not yet
        # (it grants as a node has room), so n + m passes the window by more than that
        n, m = INITIAL_WINDOW // 2 + 1, SMALL_MAP
        assert n + m > INITIAL_WINDOW + 2 * PREFETCH
        other = pool.map_async(held, [str(release)] * n)
        main = threading.get_ident()
        stream = next(s for s in pool._executor._streams.values() if s.fn is held)
        failed: list[BaseException] = []

        def interrupt() -> None:
            try:  # the interrupted map has calls sent (outcomes to drop) and unsent (to skip)
                wait_for(
                    lambda: any(
                        tag.future is not other._future and tag.sent
                        for _, tag, _ in stream.job._items
                    ),
                    30,
                    "the interrupted map's calls past the window",
                    lambda: f"{stream.job.session.sent} calls sent",
                )
            except BaseException as exc:
                failed.append(exc)
                release.touch()  # the map returns: the test fails with this, never hangs
                return
            signal.pthread_kill(main, signal.SIGINT)

        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.map(held, [str(release)] * m)
        finally:
            interrupter.join(60)
            signal.signal(signal.SIGINT, previous)
            if failed:
                raise failed[0]
        release.touch()
        assert other.get(timeout=60) == [1] * n
        # the job ran on: every call of it settled, the interrupted map's unsent ones never sent
        wait_for(lambda: stream.outstanding == 0 and not stream.job._items, 30, "calls settled")
        assert stream.job.session.sent < n + m
        assert not stream.job.finished.is_set()
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        kinds = [job["name"].partition(":")[0] for job in jobs_after(embedded, first)]
        assert set(kinds) == {"submit"} and len(kinds) < 10, kinds
    finally:
        release.touch()
        pool.terminate()


def test_terminate_fails_an_outstanding_map_async(embedded: remap.Cluster, tmp_path: Path) -> None:
    """terminate() with a map_async outstanding: its get() raises (JobKilled, or
    CancelledError saying the pool was terminated) and its error_callback gets that error;
    the pool's delivery thread waits for it, so terminate() leaves no result hanging."""
    release = tmp_path / "release"
    pool = remap.Pool(cluster=embedded)
    errors: list[BaseException] = []
    try:
        result = pool.map_async(held, [str(release)], error_callback=errors.append)
        pool.terminate()
        with pytest.raises((remap.JobKilled, concurrent.futures.CancelledError)) as raised:
            result.get(timeout=20)
        assert errors == [raised.value]
    finally:
        release.touch()


def test_close_and_join_wait_for_outstanding_work(embedded: remap.Cluster) -> None:
    """After close(), new work is refused and join() returns once async results are ready."""
    pool = remap.Pool(cluster=embedded)
    results = [pool.apply_async(sleep_then, (0.2,)) for _ in range(3)]
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.map(square, [1])
    pool.join()
    assert all(r.ready() for r in results)
    assert not embedded.closed  # a borrowed cluster stays open


def test_terminate_stops_outstanding_work(embedded: remap.Cluster) -> None:
    """terminate() kills running calls and cancels queued ones: their results fail at once."""
    pool = remap.Pool(cluster=embedded)
    running = pool.apply_async(sleep_then, (30.0,))
    wait_for(lambda: running._future.running(), 10, "the call to reach the cluster")
    queued = [pool.apply_async(sleep_then, (30.0,)) for _ in range(3)]
    started = time.monotonic()
    pool.terminate()
    with pytest.raises(remap.JobKilled):
        running.get(timeout=20)
    for result in queued:
        with pytest.raises((remap.JobKilled, concurrent.futures.CancelledError)):
            result.get(timeout=20)
    assert time.monotonic() - started < 20


def test_terminate_ends_running_iterators_and_keeps_finished_ones(
    embedded: remap.Cluster, tmp_path: Path
) -> None:
    """After terminate(), an imap whose job was still running raises CancelledError saying the
    pool was terminated (it ended as if every result had come: StopIteration); the results of
    an imap whose job had finished stay readable, as in multiprocessing."""
    release = tmp_path / "release"
    pool = remap.Pool(cluster=embedded)
    try:
        finished = pool.imap(square, [1, 2, 3])
        wait_for(lambda: finished.finished, 30, "the first imap's job to end")
        running = pool.imap(held, [str(release)])
        wait_for(lambda: running.job_id is not None, 10, "the second imap's job to start")
        pool.terminate()
        with pytest.raises(concurrent.futures.CancelledError, match="pool was terminated"):
            running.next(timeout=20)
        with pytest.raises(concurrent.futures.CancelledError):
            next(running)
        assert list(finished) == [1, 4, 9]
    finally:
        release.touch()


def test_join_waits_for_imap_as_multiprocessing_does() -> None:
    """close() then join() waits for the calls of imap and imap_unordered too, so their results
    can be read after join, as with multiprocessing; join closed the pool's own cluster under
    them, and reading them raised JobKilled."""
    pool = remap.Pool(2, settings=Settings())
    try:
        ordered = pool.imap(sleep_then, [0.1] * 4)
        unordered = pool.imap_unordered(sleep_then, [0.1] * 3)
        pool.close()
        pool.join()
        assert pool.cluster.closed
        assert list(ordered) == [0.1] * 4
        assert list(unordered) == [0.1] * 3
    finally:
        pool.terminate()


def test_pool_with_its_own_cluster() -> None:
    """Pool(2) starts an embedded cluster with two cores; leaving the with block closes it."""
    with remap.Pool(2, settings=Settings()) as pool:
        assert pool.cluster.cores() == 2
        assert pool.map(square, [1, 2, 3]) == [1, 4, 9]
        cluster = pool.cluster
    assert cluster.closed


def test_unsupported_arguments_are_refused() -> None:
    """maxtasksperchild is refused plainly rather than silently ignored; bad values as stdlib."""
    with pytest.raises(NotImplementedError, match="maxtasksperchild"):
        remap.Pool(maxtasksperchild=10)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        remap.Pool(initializer=3)
    with pytest.raises(ValueError):
        remap.Pool(0)


_marker: dict[str, object] = {}


def remember(path: str, value: object) -> None:
    """A pool initializer: records that it ran in this process, and sets a global for tasks."""
    import os

    _marker["value"] = value
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def marked(x: int) -> tuple[object, int]:
    import os

    return _marker.get("value"), os.getpid()


def test_initializer_runs_once_per_core_before_the_pools_calls(
    embedded: remap.Cluster, tmp_path: Path
) -> None:
    """Pool(initializer, initargs): every call sees what the initializer set up, and it ran
    once in each core process that ran calls, shared by map, imap and apply."""
    log = tmp_path / "init.log"
    with remap.Pool(cluster=embedded, initializer=remember, initargs=(str(log), "ready")) as p:
        results = p.map(marked, range(40), chunksize=1)
        results += list(p.imap_unordered(marked, range(10)))
        results.append(p.apply(marked, (1,)))
    assert {value for value, _ in results} == {"ready"}
    runs = log.read_text().split()
    assert len(runs) == len(set(runs)), "the initializer ran twice in one core"
    assert {pid for _, pid in results} <= {int(pid) for pid in runs}


def test_executor_initializer_and_a_failing_one(
    embedded: remap.Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Executor(initializer=...) as ProcessPoolExecutor; an initializer that raises breaks the
    executor: the call fails with BrokenExecutor (the initializer's error as its cause), the
    error is logged on concurrent.futures' logger, and later submits and maps raise BrokenExecutor
    at once (map started a job that ran the failing initializer again on every core)."""
    log = tmp_path / "init.log"
    with remap.Executor(cluster=embedded, initializer=remember, initargs=(str(log), 7)) as ex:
        assert ex.submit(marked, 1).result()[0] == 7
        assert {v for v, _ in ex.map(marked, range(8))} == {7}
    with remap.Executor(cluster=embedded, initializer=fail_on_three, initargs=(3,)) as ex:
        with caplog.at_level("CRITICAL", logger="concurrent.futures"):
            with pytest.raises(concurrent.futures.BrokenExecutor, match="three") as broken:
                ex.submit(square, 2).result()
        assert isinstance(broken.value.__cause__, PoolError)
        assert "PoolError: three" in caplog.text and "fail_on_three" in caplog.text
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(square, 3)
        jobs = {job["id"] for job in embedded.status()["jobs"]}
        with pytest.raises(concurrent.futures.BrokenExecutor) as again:
            ex.map(square, range(3))  # raised by map itself, as submit: no job is started
        assert again.value.__cause__ is None
        assert not {job["id"] for job in embedded.status()["jobs"]} - jobs
    with remap.Executor(cluster=embedded, initializer=fail_on_three, initargs=(3,)) as ex:
        with pytest.raises(concurrent.futures.BrokenExecutor, match="three"):
            list(ex.map(square, range(3)))
    with remap.Pool(cluster=embedded, initializer=fail_on_three, initargs=(3,)) as pool:
        with pytest.raises(PoolError, match="three"):  # a Pool's calls fail with the error itself
            pool.apply(square, (2,))


def test_pool_on_a_server_with_two_nodes(tmp_path: Path) -> None:
    """map, imap and apply_async against a real server and two node processes."""
    with ProcessCluster(tmp_path, nodes=[NodeSpec(cores=1), NodeSpec(cores=1)]) as procs:
        settings = Settings()
        with remap.Pool(address=procs.address, secret=procs.secret, settings=settings) as pool:
            assert pool.map(square, range(100)) == [x * x for x in range(100)]
            assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
            assert pool.apply_async(power, (2, 8)).get(timeout=30) == 256


def thread_env(x: int) -> str | None:
    import os

    return os.environ.get("OMP_NUM_THREADS")


def test_cores_limit_native_thread_pools(embedded: remap.Cluster) -> None:
    """As loky does: each core's OpenMP/BLAS pools get CPUs / cores threads, so numpy on N
    cores does not start N × CPUs threads; a value the node was given wins."""
    import os

    from remap.node.cores import thread_limits

    # (a value this test process was given reaches the cores instead, as the node's would)
    expected = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    with remap.Pool(cluster=embedded) as p:
        assert set(p.map(thread_env, range(4))) == {expected}
    assert thread_limits({"OMP_NUM_THREADS": "3"}, 2).get("OMP_NUM_THREADS") is None
    assert thread_limits({}, 64)["MKL_NUM_THREADS"] == "1"
