"""``remap.Executor``, the concurrent.futures interface: futures, batching of submits, remote
exceptions, map with a timeout, cancellation before start, shutdown(cancel_futures=True),
wait / as_completed, and done-callbacks off the reactor thread."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import remap
from remap.api import PicklingError, RemoteTraceback
from remap.errors import RemoteTaskError
from remap.server.scheduler import MIN_WINDOW
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, held_until, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # embedded clusters: cores are processes


# ---------------------------------------------------------------- functions run on cores


class CustomError(Exception):
    """Importable on the cores and here, so it travels as itself."""


def square(x: int) -> int:
    return x * x


def batched_square(x: int) -> int:
    return x * x


def power(base: int, exponent: int = 2) -> int:
    return base**exponent


def raise_custom(message: str) -> None:
    raise CustomError(message)


def sleep_then(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def noop(x: int) -> int:
    return x


def block_until(marker_dir: str, name: str, release: str, limit: float = 30.0) -> str:
    """Say "started" with a file, then hold the core until ``release`` exists (at most ``limit``)."""
    Path(marker_dir, name).touch()
    deadline = time.monotonic() + limit
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return name


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def embedded() -> Iterator[remap.Cluster]:
    """An embedded cluster with two cores, shared by this module's tests."""
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


@pytest.fixture
def executor(embedded: remap.Cluster) -> Iterator[remap.Executor]:
    """An Executor borrowing the module's cluster; shut down after the test."""
    ex = remap.Executor(cluster=embedded)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class BlockedCores:
    """Holds every core of a cluster with a blocking call until released (always, at exit)."""

    def __init__(self, executor: remap.Executor, tmp_path: Path, cores: int) -> None:
        self.dir = tmp_path
        self.release_file = tmp_path / "release"
        self.futures = []
        for i in range(cores):  # one at a time, so that each lands on its own core
            self.futures.append(
                executor.submit(block_until, str(tmp_path), f"b{i}", str(self.release_file))
            )
            wait_for(lambda i=i: (tmp_path / f"b{i}").exists(), 20, f"blocker {i} to start")

    def release(self) -> None:
        self.release_file.touch()


@pytest.fixture
def blocked(executor: remap.Executor, tmp_path: Path) -> Iterator[BlockedCores]:
    """Both cores of the embedded cluster busy until the test releases them."""
    holder = BlockedCores(executor, tmp_path, cores=2)
    try:
        yield holder
    finally:
        holder.release()


# ---------------------------------------------------------------- basics


def test_submit_returns_a_real_future(executor: remap.Executor) -> None:
    """submit gives a concurrent.futures.Future with the result; args and kwargs both travel."""
    future = executor.submit(power, 3, exponent=4)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 81
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception() is None


def test_executor_is_a_concurrent_futures_executor(embedded: remap.Cluster) -> None:
    """Executor subclasses concurrent.futures.Executor and works as a context manager."""
    with remap.Executor(cluster=embedded) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        assert ex.submit(square, 9).result(timeout=30) == 81


def test_many_small_submits_share_a_few_jobs(
    executor: remap.Executor, embedded: remap.Cluster
) -> None:
    """3000 submits of one function travel as a handful of streaming jobs, not 3000. Only this
    test's jobs count: the module's cluster also lists earlier tests' (another test submits
    batched_square once, and run before this one its job made 3001 received)."""
    before = {j["id"] for j in embedded.status()["jobs"]}
    futures = [executor.submit(batched_square, i) for i in range(3000)]
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(3000)]
    jobs = [
        j
        for j in embedded.status()["jobs"]
        if j["name"].endswith("batched_square") and j["id"] not in before
    ]
    assert 1 <= len(jobs) <= 5, jobs
    assert sum(j["received"] for j in jobs) == 3000


def test_the_functions_used_last_keep_their_job_open_between_calls(
    executor: remap.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interactive session calls again seconds later: the function's job is still open (the
    same job, no new function load: it closed after 0.5 s and the next call paid ~1 ms for a
    new one). Only the ``KEEP_IDLE`` functions idle the shortest keep theirs; an older idle job
    closes after ``LINGER``, and a kept one after ``IDLE_KEEP``."""
    from remap import executor as executor_module

    clock = [time.monotonic()]
    monkeypatch.setattr(executor_module, "_now", lambda: clock[0])
    functions = [noop, square, batched_square, power, sleep_then]
    assert len(functions) == executor_module.KEEP_IDLE + 1

    def call(fn, x: int = 0):
        executor.submit(fn, x).result(timeout=60)
        return executor._streams.get(executor_module._key(fn))

    first = call(noop)
    assert first is not None
    clock[0] += executor_module.LINGER + 5.0  # a person reads the result, then calls again
    executor._reap_idle()
    assert call(noop) is first, "the job closed between two interactive calls"
    assert first.job.session.job_id is not None and not first.job.input_closed

    for fn in functions[1:]:  # noop is now the function idle the longest
        clock[0] += 1.0
        call(fn)
    clock[0] += executor_module.LINGER
    executor._reap_idle()
    open_now = {executor_module._key(fn) for fn in functions} & set(executor._streams)
    assert open_now == {executor_module._key(fn) for fn in functions[1:]}
    assert first.job.input_closed, "the oldest idle job beyond KEEP_IDLE was not closed"

    clock[0] += executor_module.IDLE_KEEP
    executor._reap_idle()
    assert not {executor_module._key(fn) for fn in functions} & set(executor._streams)


class Holder:
    def method(self) -> int:
        return 7


def test_a_job_kept_open_does_not_keep_the_callers_objects_alive(
    executor: remap.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job kept open for the next call holds its function weakly once idle past ``LINGER``:
    the instance behind a bound method is collected (CPython's test_no_stale_references
    waits for that), the kept job then ends, and a call on a new instance opens a new job."""
    import gc
    import weakref

    from remap import executor as executor_module

    clock = [time.monotonic()]
    monkeypatch.setattr(executor_module, "_now", lambda: clock[0])
    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    assert executor.submit(holder.method).result(timeout=30) == 7
    key = executor_module._key(holder.method)
    kept = executor._streams[key]
    clock[0] += executor_module.LINGER + 1.0
    executor._reap_idle()
    assert executor._streams.get(key) is kept, "a kept job closed at LINGER"
    assert executor.submit(holder.method).result(timeout=30) == 7  # the same object: same job
    assert executor._streams.get(key) is kept
    clock[0] += executor_module.LINGER + 1.0
    executor._reap_idle()
    del holder
    gc.collect()
    assert collected.is_set() and ref() is None, "the kept job kept the caller's object alive"
    executor._reap_idle()
    assert key not in executor._streams and kept.job.input_closed


def test_a_kept_job_is_taken_back_only_for_the_objects_it_was_opened_for() -> None:
    """Ids are reused once an object is gone: a kept job held weakly is taken back only for
    the very objects it was opened for."""
    from remap import executor as executor_module

    class Slotted:  # a callable that cannot be weakly referenced
        __slots__ = ()

        def __call__(self) -> None: ...

    def first() -> None: ...

    def second() -> None: ...

    stream = executor_module._SubmitStream.__new__(executor_module._SubmitStream)
    stream.fn, stream.weak = first, None
    assert stream.loosen() and stream.fn is None
    assert not stream.take_back(second) and stream.fn is None
    assert stream.take_back(first) and stream.fn is first
    stream.fn = Slotted()  # not weakly referable: such a job closes at LINGER, as before
    assert not stream.loosen()


def test_closing_ends_a_lingering_job_as_done_and_kills_a_busy_one(
    embedded: remap.Cluster, tmp_path: Path
) -> None:
    """A job kept open for the next submit, with nothing outstanding, is not killed when its
    executor is terminated (as ``Cluster.close`` does): the server's record says it ended
    done; a job with a call still running is killed."""
    before = {j["id"] for j in embedded.status()["jobs"]}
    ex = remap.Executor(cluster=embedded)
    assert ex.submit(noop, 1).result(timeout=30) == 1
    busy = ex.submit(block_until, str(tmp_path), "b", str(tmp_path / "release"), 30.0)
    wait_for(lambda: (tmp_path / "b").exists(), 20, "the busy call to start")

    def states() -> dict[str, str]:
        jobs = [j for j in embedded.status()["jobs"] if j["id"] not in before]
        return {j["name"].rsplit(".", 1)[-1]: j["state"] for j in jobs if j["state"] != "running"}

    # the busy call is released only once the test is over: _terminate asks the reactor to
    # kill, and a release right after it let the call return (the job ended "done") whenever
    # the kill reached the core later than the release (a stalled reactor thread)
    try:
        ex._terminate()
        wait_for(lambda: {"noop", "block_until"} <= set(states()), 20, "both jobs to end")
        assert states() == {"noop": "done", "block_until": "killed"}
        with pytest.raises(Exception):  # noqa: B017 - JobKilled or CancelledError, either way not a result
            busy.result(timeout=20)
    finally:
        (tmp_path / "release").touch()


def test_remote_exception_is_reraised_as_its_own_type(executor: remap.Executor) -> None:
    """A CustomError raised on a core is raised here as CustomError, with the remote traceback
    as __cause__ (a RemoteTaskError)."""
    future = executor.submit(raise_custom, "it broke")
    with pytest.raises(CustomError, match="it broke") as info:
        future.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and isinstance(cause, RemoteTaskError)
    assert cause.type_name == "CustomError"
    assert (
        "raise_custom" in cause.remote_traceback
        and "raise CustomError(message)" in cause.remote_traceback
    )
    assert future.exception() is info.value


def test_unpicklable_argument_fails_at_submit(executor: remap.Executor) -> None:
    """An argument that cannot be pickled raises at submit, naming the function."""
    with pytest.raises(PicklingError, match="square"):
        executor.submit(square, threading.Lock())


def make_lock(_: int) -> object:
    return threading.Lock()


def test_an_unpicklable_result_raises_the_pickling_error(executor: remap.Executor) -> None:
    """As ProcessPoolExecutor: the future raises the error pickling the result gave (here a
    TypeError), its remote traceback as the cause."""
    future = executor.submit(make_lock, 1)
    with pytest.raises(TypeError, match="_thread.lock") as info:
        future.result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "could not be pickled" in info.value.__cause__.message


def test_unpicklable_function_fails_at_submit(executor: remap.Executor) -> None:
    """A function that cannot be pickled raises at submit with its name."""
    lock = threading.Lock()

    def locked_square(x: int) -> int:
        with lock:
            return x * x

    with pytest.raises(PicklingError, match="locked_square"):
        executor.submit(locked_square, 2)


# ---------------------------------------------------------------- map


def test_map_returns_results_in_order(executor: remap.Executor) -> None:
    """map(fn, *iterables) zips its iterables and yields results in order."""
    assert list(executor.map(power, [1, 2, 3], [3, 3, 3])) == [1, 8, 27]
    assert list(executor.map(square, range(1000), chunksize=50)) == [x * x for x in range(1000)]


def test_map_timeout_raises_timeout_error(executor: remap.Executor, tmp_path: Path) -> None:
    """map(..., timeout=) raises TimeoutError when a result is not there in time: here the
    calls are held until the test releases them (or a minute passes, and they return), so
    the error can only come from the timeout, however slow the machine."""
    release = tmp_path / "release"
    try:
        results = executor.map(held_until, [str(release)] * 2, [1, 1], timeout=0.3)
        with pytest.raises(TimeoutError):
            next(results)
        with pytest.raises(StopIteration):  # like the stdlib: the generator is finished
            next(results)
    finally:
        release.touch()


def test_map_past_its_timeout_still_gives_the_results_that_arrived(
    executor: remap.Executor,
) -> None:
    """A consumer that comes back after map's deadline gets every result that arrived before
    it asks, as the stdlib's map gives a future that is done (result(negative) returns it);
    remap raised TimeoutError at once and dropped them all (a late consumer of
    map(square, range(100), timeout=1) read after 2 s: 0 results, the stdlib 100)."""
    results = executor.map(square, range(50), timeout=60)
    wait_for(lambda: results.finished, 30, "every result to arrive")
    results._deadline = time.monotonic() - 1.0  # the caller comes back after the deadline
    assert list(results) == [x * x for x in range(50)]


def test_map_raises_remote_error_at_its_position(executor: remap.Executor) -> None:
    """Results before a failing call are yielded; the failure is raised at its place."""
    results = executor.map(raise_or_return, [1, 2, 0, 4])
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(CustomError):
        next(results)


def raise_or_return(x: int) -> int:
    if x == 0:
        raise CustomError("zero")
    return x


# ---------------------------------------------------------------- waiting


def test_as_completed_yields_every_future(executor: remap.Executor, tmp_path: Path) -> None:
    """as_completed yields each future once, the quick ones before the slow one: the slow
    call is held (on one core; the quick ones run on the other) until the test has seen all
    twenty quick ones, so no machine is too slow for them to finish first."""
    release = tmp_path / "release"
    seen: list[concurrent.futures.Future] = []
    try:
        slow = executor.submit(held_until, str(release), 1)
        quick = [executor.submit(square, i) for i in range(20)]
        for future in concurrent.futures.as_completed([slow, *quick], timeout=60):
            seen.append(future)
            if len(seen) == len(quick):
                release.touch()
    finally:
        release.touch()
    assert len(seen) == 21 and set(seen) == {slow, *quick}
    assert seen[-1] is slow


def test_wait_first_completed_and_all(executor: remap.Executor, tmp_path: Path) -> None:
    """wait(FIRST_COMPLETED) returns before the slow call (held until the test releases it,
    so it cannot finish first however slow the machine); wait(ALL_COMPLETED) returns all."""
    release = tmp_path / "release"
    try:
        slow = executor.submit(held_until, str(release), 1)
        fast = executor.submit(square, 3)
        done, not_done = concurrent.futures.wait(
            [slow, fast], timeout=30, return_when=concurrent.futures.FIRST_COMPLETED
        )
        assert fast in done and slow in not_done
    finally:
        release.touch()
    done, not_done = concurrent.futures.wait([slow, fast], timeout=30)
    assert not not_done


def test_done_callbacks_run_off_the_reactor_thread(executor: remap.Executor) -> None:
    """add_done_callback runs the callback with the future, never on the reactor thread."""
    seen: list[tuple[str, int]] = []
    called = threading.Event()

    def callback(future: concurrent.futures.Future) -> None:
        seen.append((threading.current_thread().name, future.result()))
        called.set()

    executor.submit(square, 5).add_done_callback(callback)
    assert called.wait(30)
    assert seen[0][1] == 25
    assert seen[0][0] != "remap-reactor"


def test_a_result_nobody_called_back_for_is_set_without_the_delivery_thread(
    executor: remap.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A future with no done-callback gets its result where the answer is read (the reactor
    thread, or the caller's own thread running the loop while it waits), not through the
    delivery thread (one thread hop less per call); results, errors and callbacks are
    unchanged."""
    from remap.executor import _SubmitStream

    set_on: list[str] = []  # the thread each result was set on, there and then
    delivered: list[int] = []  # results handed to the delivery thread instead
    resolve_one, resolve = _SubmitStream._resolve_one, _SubmitStream.resolve

    def recording_now(self: _SubmitStream, index: int, result: object) -> bool:
        done = resolve_one(self, index, result)
        if done:
            set_on.append(threading.current_thread().name)
        return done

    def recording(self: _SubmitStream, index: int, result: object, error: object) -> None:
        delivered.append(index)
        resolve(self, index, result, error)

    monkeypatch.setattr(_SubmitStream, "_resolve_one", recording_now)
    monkeypatch.setattr(_SubmitStream, "resolve", recording)
    assert [executor.submit(square, i).result(timeout=30) for i in range(5)] == [
        i * i for i in range(5)
    ]
    assert len(set_on) == 5 and delivered == [], (set_on, delivered)
    assert set(set_on) <= {"remap-reactor", "MainThread"}, set_on


# ---------------------------------------------------------------- cancelling and shutdown


def test_cancel_before_start(executor: remap.Executor, blocked: BlockedCores) -> None:
    """While the cores are busy, a future still waiting in this process can be cancelled: it
    never runs, wait() sees it at once, and the others still complete."""
    futures = [executor.submit(noop, i) for i in range(2 * MIN_WINDOW)]
    wait_for(lambda: futures[0].running(), 10, "the first calls to be handed to the server")
    last = futures[-1]
    assert not last.running(), "the last call should still be waiting for window"
    assert last.cancel() is True
    assert last.cancelled() and last.done()
    done, _ = concurrent.futures.wait([last], timeout=5)
    assert last in done
    with pytest.raises(concurrent.futures.CancelledError):
        last.result()
    running = next(f for f in futures if f.running())
    assert running.cancel() is False  # already handed to the cluster
    blocked.release()
    assert [f.result(timeout=60) for f in futures[:-1]] == list(range(2 * MIN_WINDOW - 1))


def test_shutdown_cancel_futures(embedded: remap.Cluster, tmp_path: Path) -> None:
    """shutdown(cancel_futures=True) cancels the calls not yet sent; sent ones still finish;
    nothing is left pending and new submits are refused."""
    ex = remap.Executor(cluster=embedded)
    holder = BlockedCores(ex, tmp_path, cores=2)
    try:
        futures = [ex.submit(noop, i) for i in range(2 * MIN_WINDOW)]
        wait_for(lambda: futures[0].running(), 10, "the first calls to be handed to the server")
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(noop, 1)
        cancelled = [f for f in futures if f.cancelled()]
        assert cancelled, "some calls should have been waiting"
        assert futures[-1].cancelled()
    finally:
        holder.release()
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    for i, f in enumerate(futures):
        if not f.cancelled():
            assert f.result() == i


def test_shutdown_wait_waits_for_outstanding_calls(embedded: remap.Cluster) -> None:
    """shutdown(wait=True) returns only once every submitted call has finished."""
    ex = remap.Executor(cluster=embedded)
    futures = [ex.submit(sleep_then, 0.2) for _ in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() and f.result() == 0.2 for f in futures)


def test_process_pool_arguments_and_unknown_ones_are_refused_plainly() -> None:
    """ProcessPoolExecutor's mp_context and max_tasks_per_child are refused by name (None, their
    default, passes), and a misspelt argument is named as Executor's or Pool's: both were
    "connect() got an unexpected keyword argument", a function the caller never called, after
    importing the embedded cluster's modules. Nothing is started."""
    with pytest.raises(NotImplementedError, match="no max_tasks_per_child"):
        remap.Executor(2, max_tasks_per_child=1)
    with pytest.raises(NotImplementedError, match="no mp_context"):
        remap.Executor(2, mp_context=multiprocessing.get_context("spawn"))
    with pytest.raises(
        TypeError, match=r"^remap\.Executor\(\) got an unexpected keyword argument 'max_worker'$"
    ):
        remap.Executor(max_worker=2)
    with pytest.raises(
        TypeError, match=r"^remap\.Pool\(\) got an unexpected keyword argument 'process'$"
    ):
        remap.Pool(process=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_worker'"):
        remap.Executor(cluster=object(), max_worker=2)  # type: ignore[arg-type]


def test_executor_with_its_own_embedded_cluster() -> None:
    """Executor(2) starts an embedded cluster with two cores and stops it at shutdown."""
    with remap.Executor(2, settings=Settings()) as ex:
        assert ex.cluster.embedded and ex.cluster.cores() == 2
        assert ex.submit(square, 4).result(timeout=30) == 16
        cluster = ex.cluster
    assert cluster.closed


def test_shutdown_without_wait_still_closes_its_own_cluster() -> None:
    """shutdown(wait=False) returns at once; the outstanding call still completes, and then the
    executor's own cluster is closed."""
    ex = remap.Executor(1, settings=Settings())
    future = ex.submit(sleep_then, 0.3)
    ex.shutdown(wait=False)
    assert future.result(timeout=30) == 0.3
    wait_for(lambda: ex.cluster.closed, 20, "the executor's cluster to be closed")


def test_closing_the_cluster_fails_outstanding_futures() -> None:
    """Futures still outstanding when their cluster goes away fail instead of hanging. The
    call sleeps 30 s (it was 5 s: a stall that long between sending it and closing would let
    it return its result), longer than the 15 s the failure may take."""
    cluster = remap.connect(cores=1, settings=Settings())
    future = cluster.submit(sleep_then, 30.0)
    wait_for(lambda: future.running(), 10, "the call to be sent")
    cluster.close()
    with pytest.raises(remap.RemapError):
        future.result(timeout=15)


# ---------------------------------------------------------------- on real processes


def test_executor_on_a_server_with_two_nodes(tmp_path: Path) -> None:
    """submit, map and remote errors work against a real server and two node processes."""
    with ProcessCluster(tmp_path, nodes=[NodeSpec(cores=1), NodeSpec(cores=1)]) as procs:
        settings = Settings()
        with remap.Executor(procs.address, secret=procs.secret, settings=settings) as ex:
            assert ex.submit(power, 2, 10).result(timeout=30) == 1024
            assert list(ex.map(square, range(200))) == [x * x for x in range(200)]
            with pytest.raises(CustomError):
                ex.submit(raise_custom, "remote").result(timeout=30)


EXIT_SCRIPT = """
import atexit, sys, time
from pathlib import Path
import remap

def write_later(path):
    time.sleep(1.0)
    Path(path).write_text("done")

@atexit.register
def submit_too_late():
    try:
        executor.submit(id, None)
    except RuntimeError as exc:
        print(exc)

executor = remap.Executor(2)
executor.submit(write_later, sys.argv[1])
if sys.argv[2] == "nowait":
    executor.shutdown(wait=False)
"""


@pytest.mark.parametrize("how", ["exit", "nowait"])
def test_interpreter_exit_waits_for_outstanding_calls(tmp_path: Path, how: str) -> None:
    """As concurrent.futures: a script that submits and exits (or shuts down with wait=False)
    still runs its calls before the interpreter ends; a submit from an atexit hook raises
    RuntimeError("cannot schedule new futures after interpreter shutdown")."""
    marker = tmp_path / "marker"
    run = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(marker), how],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert marker.read_text() == "done"
    assert "cannot schedule new futures after interpreter shutdown" in run.stdout


def record(shared: dict, key: int) -> int:
    shared[key] = key * 2
    return len(shared)


def test_manager_proxies_work_on_cores(executor: remap.Executor) -> None:
    """A multiprocessing.Manager proxy passed to calls works on the cores: it travels with its
    manager's authkey (the core's own is random, so the manager refused it before), as
    multiprocessing sends it to a child it spawns; the Pool takes the same path."""
    import multiprocessing

    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        futures = [executor.submit(record, shared, i) for i in range(4)]
        assert all(1 <= f.result(timeout=60) <= 4 for f in futures)
        assert dict(shared) == {0: 0, 1: 2, 2: 4, 3: 6}
        assert len(list(executor.map(record, [shared] * 2, [10, 11]))) == 2
        assert dict(shared) == {0: 0, 1: 2, 2: 4, 3: 6, 10: 20, 11: 22}


def test_only_arguments_holding_a_proxy_carry_the_authkey() -> None:
    """The authkey is in the pickle of a proxy sent to cores and nowhere else."""
    import multiprocessing
    import pickle

    from remap.shipping import dumps_for_cores

    key = bytes(multiprocessing.current_process().authkey)
    with multiprocessing.Manager() as manager:
        shared = manager.list()
        assert key in dumps_for_cores(("x", shared))
        assert key not in dumps_for_cores(("x", [1, 2], record))
        assert key not in pickle.dumps(shared)  # plain pickling still leaves it out


class Dropped:
    """A result whose lifetime the test watches."""


def make_dropped(_: int) -> Dropped:
    return Dropped()


def test_map_keeps_no_reference_to_yielded_results(executor: remap.Executor) -> None:
    """As concurrent.futures (its test_free_reference): a result the caller dropped is freed;
    the iterator does not keep the run of results it came in."""
    import gc
    import weakref

    for obj in executor.map(make_dropped, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_a_slow_call_holds_back_at_most_its_share_of_the_queued_calls(
    executor: remap.Executor, tmp_path: Path
) -> None:
    """Calls measured as fast and submitted together are shared out by the free credits (2 cores,
    4 credits; at worst 13 of them behind call 1, when call 0 came alone and took a credit):
    while call 1 is held, the calls in other batches come back (they all used to go in one
    batch behind it while the other core idled: 17 waited in one run)."""
    release = str(tmp_path / "release")
    try:
        warm = [executor.submit(held_until, release, 0) for _ in range(20)]
        assert [f.result(timeout=60) for f in warm] == [0] * 20
        futures = [executor.submit(held_until, release, x) for x in range(40)]
        fast = [f for x, f in enumerate(futures) if x != 1]
        wait_for(
            lambda: sum(f.done() for f in fast) >= len(fast) - 14,
            30,
            "the calls outside call 1's batch",
            lambda: f"{sum(not f.done() for f in fast)} calls waited behind call 1",
        )
    finally:
        Path(release).touch()
    assert [f.result(timeout=60) for f in futures] == list(range(40))


def test_result_waits_as_usual_on_a_reactor_that_does_not_lend_its_loop() -> None:
    """Only the lean epoll reactor (Linux) lends its loop to a waiting thread; on another
    (the poll reactor elsewhere) ``result`` waits as a plain future does."""
    from types import SimpleNamespace

    from remap.executor import RemoteFuture

    future = RemoteFuture()
    future._stream = SimpleNamespace(reactor=object())  # a reactor without ``drive``
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.01)
    future.set_result(5)
    assert future.result(timeout=0.01) == 5
