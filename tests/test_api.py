"""The cluster handle of the Python API (``remap.connect``), on an embedded cluster and on a
real server with two node processes: ordered and lazy mapping, remote errors, reduce,
status, shipping ``__main__`` code by value, and handles opened and closed repeatedly."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import remap
from remap.api import DEFAULT_BUFFERSIZE, PicklingError, RemoteTraceback
from remap.errors import ConnectionLost, RemoteTaskError
from remap.settings import Settings
from tests.cluster_harness import ROOT, NodeSpec, clean_env, held_until, wait_for
from tests.cluster_harness import Cluster as ProcessCluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # embedded clusters: cores are processes

EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------- functions run on cores


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError(f"five is not welcome ({x})")
    return x


def raise_local_class(x: int) -> int:
    class LocalOnly(Exception):
        """Defined inside the function: only cloudpickle (by value) can carry it."""

    raise LocalOnly(f"local {x}")


class HoldsALock(Exception):
    """An exception with an attribute no pickler can carry."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.lock = threading.Lock()


def raise_unpicklable(x: int) -> int:
    raise HoldsALock(f"locked {x}")


def pid_of_core(x: int) -> int:
    return os.getpid()


def slow_identity(x: float) -> float:
    import time

    time.sleep(x)
    return x


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def embedded() -> Iterator[remap.Cluster]:
    """An embedded cluster with two cores, shared by this module's tests."""
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[remap.Cluster]:
    """A real server and two one-core node processes on loopback, and a handle to them."""
    with ProcessCluster(
        tmp_path_factory.mktemp("api-remote"), nodes=[NodeSpec(cores=1), NodeSpec(cores=1)]
    ) as procs:
        settings = Settings()
        with remap.connect(procs.address, secret=procs.secret, settings=settings) as cluster:
            yield cluster


@pytest.fixture(params=["embedded", "remote"])
def cluster(request: pytest.FixtureRequest) -> remap.Cluster:
    """Each test that takes ``cluster`` runs on both kinds of cluster."""
    return request.getfixturevalue(request.param)


def job_named(cluster: remap.Cluster, job_id: int | None) -> dict:
    return next(j for j in cluster.status()["jobs"] if j["id"] == job_id)


# ---------------------------------------------------------------- mapping


def test_map_returns_results_in_argument_order(cluster: remap.Cluster) -> None:
    """map gives [f(x) for x in xs] in order, across batches and cores."""
    assert cluster.map(square, range(3000)) == [x * x for x in range(3000)]


def test_map_unordered_returns_every_result_once(cluster: remap.Cluster) -> None:
    """ordered=False returns each result exactly once (in completion order)."""
    out = cluster.map(square, range(500), ordered=False)
    assert sorted(out) == [x * x for x in range(500)]


def test_map_of_empty_iterable_is_empty(embedded: remap.Cluster) -> None:
    """A job with no arguments ends at once with an empty list."""
    assert embedded.map(square, []) == []


def test_starmap_unpacks_each_argument(cluster: remap.Cluster) -> None:
    """starmap calls f(*args) for each tuple, and keeps order; a dict is unpacked as a sequence."""
    assert cluster.starmap(add, [(1, 2), (3, 4), [5, 6]]) == [3, 7, 11]
    assert cluster.starmap(add, [{"a": 0, "b": 0}]) == ["ab"]  # like itertools.starmap


def test_chunksize_is_honoured(embedded: remap.Cluster) -> None:
    """An explicit chunksize still returns every result in order."""
    assert embedded.map(square, range(100), chunksize=7) == [x * x for x in range(100)]
    with pytest.raises(ValueError, match="chunksize"):
        embedded.map(square, range(3), chunksize=0)


def test_imap_over_an_endless_generator_reads_a_bounded_amount(cluster: remap.Cluster) -> None:
    """imap consumes an endless generator lazily: taking N results advances it at most
    N + buffersize, and closing the iterator kills the job."""
    pulled = itertools.count()
    taken: list[int] = []

    def endless() -> Iterator[int]:
        for n in itertools.count():
            taken.append(next(pulled))
            yield n

    results = cluster.imap(square, endless(), buffersize=40)
    first = [next(results) for _ in range(100)]
    assert first == [n * n for n in range(100)]
    assert len(taken) <= 100 + 40, f"the generator was advanced {len(taken)} times"
    assert results.taken == len(taken)
    job = results.job_id
    results.close()
    wait_for(
        lambda: job_named(cluster, job)["state"] == "killed",
        10,
        "the imap job to be killed",
        describe=lambda: str(job_named(cluster, job)),
    )
    with pytest.raises(StopIteration):
        next(results)


def test_imap_default_buffer_is_bounded(embedded: remap.Cluster) -> None:
    """Without a buffersize, imap still stays within DEFAULT_BUFFERSIZE of what was consumed."""
    source = itertools.count()
    with embedded.imap(square, source) as results:
        assert next(results) == 0
        assert results.taken <= 1 + DEFAULT_BUFFERSIZE
    assert next(source) <= 1 + DEFAULT_BUFFERSIZE


def test_imap_unordered_yields_every_result_once(cluster: remap.Cluster) -> None:
    """imap_unordered yields each result once, however they arrive."""
    got = list(cluster.imap_unordered(square, range(700), buffersize=100))
    assert sorted(got) == [x * x for x in range(700)]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_next_with_timeout_raises_timeout_error_and_goes_on(
    embedded: remap.Cluster, tmp_path: Path, method: str
) -> None:
    """next(timeout=) gives up with TimeoutError when no result arrives in time (the call is
    held until the test releases it, so it is never done before the timeout); the iterator
    and its job go on, as multiprocessing's imap and remap.Pool's (the job was killed and the
    next next() ended the iteration as if every result had come: a poll lost them all)."""
    release = tmp_path / "release"
    try:
        results = getattr(embedded, method)(functools.partial(held_until, str(release)), [1, 1])
        with pytest.raises(TimeoutError):
            results.next(timeout=0.2)
        with pytest.raises(TimeoutError):
            results.next(timeout=0)
        release.touch()
        assert [results.next(timeout=60), results.next(timeout=60)] == [1, 1]
        with pytest.raises(StopIteration):
            next(results)
    finally:
        release.touch()


def test_map_raises_the_remote_exception_with_its_traceback(cluster: remap.Cluster) -> None:
    """A task raising ValueError makes map raise ValueError; __cause__ carries the remote traceback."""
    with pytest.raises(ValueError, match="five is not welcome") as info:
        cluster.map(fail_on_five, range(20))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and isinstance(cause, RemoteTaskError)
    assert cause.index == 5
    assert "fail_on_five" in cause.remote_traceback
    assert 'raise ValueError(f"five is not welcome ({x})")' in cause.remote_traceback
    assert "fail_on_five" in str(cause)


def test_imap_yields_results_before_the_error(embedded: remap.Cluster) -> None:
    """Ordered imap yields results up to the failing argument, then raises there."""
    results = embedded.imap(fail_on_five, range(20))
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        next(results)


class SourceBroke(Exception):
    """Raised by the iterable itself, in this process."""


def _breaks_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise SourceBroke(f"broke after {n}")


@pytest.mark.parametrize("buffersize", [10, DEFAULT_BUFFERSIZE])
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_iterable_that_raises_gives_every_result_before_its_error(
    embedded: remap.Cluster, method: str, buffersize: int
) -> None:
    """imap and imap_unordered give the result of every argument the iterable gave, then
    raise its own exception there (as builtin map and Pool.imap), whatever the buffersize:
    they raised it when the feeder read it, after 41 results of 50 with buffersize=10 and
    none by default (the others computed and dropped). map still raises it at once."""
    results = getattr(embedded, method)(abs, _breaks_after(50), buffersize=buffersize)
    got: list[int] = []
    with pytest.raises(SourceBroke, match="broke after 50"):
        for value in results:
            got.append(value)
    assert sorted(got) == list(range(50))
    if method == "imap":
        assert got == list(range(50))
    with pytest.raises(SourceBroke):
        embedded.map(abs, _breaks_after(50))


@pytest.mark.parametrize("buffersize", [0, -1])
def test_a_buffersize_below_one_is_refused_before_any_job(
    embedded: remap.Cluster, buffersize: int
) -> None:
    """imap, imap_unordered, reduce and Executor.map refuse buffersize 0 or -1 with ValueError
    and start no job: 0 was taken as the default, and -1 raised after the job had started,
    which then waited for arguments (state running) until the handle closed."""
    before = {job["id"] for job in embedded.status()["jobs"]}
    for call in (
        lambda: embedded.imap(square, [1], buffersize=buffersize),
        lambda: embedded.imap_unordered(square, [1], buffersize=buffersize),
        lambda: embedded.reduce(square, [1], max, buffersize=buffersize),
        lambda: embedded.executor().map(square, [1], buffersize=buffersize),
    ):
        with pytest.raises(ValueError, match=f"buffersize must be at least 1, not {buffersize}"):
            call()
    assert not {job["id"] for job in embedded.status()["jobs"]} - before  # no new job


def test_closing_a_handle_fails_its_running_calls_as_killed(remote: remap.Cluster) -> None:
    """close() on a handle to a server fails its waiting future and its imap with JobKilled
    (the server confirms the kill), as on an embedded cluster; they failed with
    ConnectionLost 'lost the connection to the server', as if the server had gone."""
    handle = remap.connect(remote.address, secret=remote._secret, settings=Settings())
    future = handle.submit(slow_identity, 30.0)
    results = handle.imap(slow_identity, [30.0])
    wait_for(lambda: future.running() and results.job_id, 10, "the calls to be sent")
    handle.close()
    with pytest.raises(remap.JobKilled):
        future.result(timeout=15)
    with pytest.raises(remap.JobKilled):
        results.next(timeout=15)


@pytest.mark.parametrize("source", ["generator", "list"])
@pytest.mark.parametrize("buffersize", [10, DEFAULT_BUFFERSIZE])
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_argument_that_cannot_be_pickled_gives_every_result_before_it(
    embedded: remap.Cluster, method: str, buffersize: int, source: str
) -> None:
    """An argument that cannot be pickled is raised as PicklingError at its position, after
    the result of every argument before it (as Pool.imap raises its pickling error), like an
    exception of the iterable. imap raised it where the feeder read it: from imap() itself
    when it came in the first window (no result), or after 41 results of 50 with
    buffersize=10. map still raises it at once, starting no job."""
    values: list[object] = [*range(50), threading.Lock(), 51]
    args = iter(values) if source == "generator" else values
    results = getattr(embedded, method)(abs, args, buffersize=buffersize)
    got: list[int] = []
    with pytest.raises(PicklingError, match="argument 50 of abs"):
        for value in results:
            got.append(value)
    assert sorted(got) == list(range(50))
    if method == "imap":
        assert got == list(range(50))
    with pytest.raises(StopIteration):
        next(results)
    with pytest.raises(PicklingError, match="argument 50"):
        embedded.map(abs, values)


def test_exception_that_cannot_travel_becomes_remote_task_error(embedded: remap.Cluster) -> None:
    """An exception the core cannot pickle arrives as RemoteTaskError naming its type."""
    with pytest.raises(RemoteTaskError) as info:
        embedded.map(raise_unpicklable, [1])
    assert info.value.type_name.endswith("HoldsALock")
    assert "locked 1" in info.value.message
    assert "raise_unpicklable" in info.value.__cause__.remote_traceback


class TwoArgs(Exception):
    """Its constructor takes two arguments, its args hold one: unpickling calls it with one."""

    def __init__(self, a: int, b: str) -> None:
        super().__init__(f"{a}-{b}")


def raise_two_args(x: int) -> int:
    raise TwoArgs(x, "b")


def test_exception_that_cannot_be_rebuilt_becomes_remote_task_error(
    embedded: remap.Cluster,
) -> None:
    """An exception whose constructor cannot be called again with its args (unpickling it fails
    here) arrives as RemoteTaskError naming it; the handle goes on (ProcessPoolExecutor breaks)."""
    with pytest.raises(RemoteTaskError) as info:
        embedded.map(raise_two_args, [1])
    assert info.value.type_name.endswith("TwoArgs")
    assert "1-b" in info.value.message
    assert embedded.map(square, [3]) == [9]


def test_exception_class_defined_in_the_function_travels_by_value(embedded: remap.Cluster) -> None:
    """A class made inside the task is shipped back by value and re-raised as that class."""
    with pytest.raises(Exception) as info:
        embedded.map(raise_local_class, [1])
    assert type(info.value).__name__ == "LocalOnly"
    assert not isinstance(info.value, RemoteTaskError)
    assert "local 1" in str(info.value)
    assert "raise_local_class" in info.value.__cause__.remote_traceback


def test_unpicklable_function_fails_at_submit_and_names_it(embedded: remap.Cluster) -> None:
    """A function closing over a lock cannot be pickled: the error names it, before any job."""
    lock = threading.Lock()

    def holds_a_lock(x: int) -> int:
        with lock:
            return x

    jobs_before = len(embedded.status()["jobs"])
    with pytest.raises(PicklingError, match="holds_a_lock"):
        embedded.map(holds_a_lock, [1, 2])
    with pytest.raises(PicklingError, match="holds_a_lock"):
        embedded.submit(holds_a_lock, 1)
    assert len(embedded.status()["jobs"]) == jobs_before


def test_unpicklable_argument_names_its_position(embedded: remap.Cluster) -> None:
    """An argument that cannot be pickled is reported with its index and the function's name."""
    with pytest.raises(PicklingError, match=r"argument 2 of .*square"):
        embedded.map(square, [1, 2, threading.Lock()])


def test_closures_ship_by_value(embedded: remap.Cluster) -> None:
    """A closure over local data runs on the cores (cloudpickle sends it by value)."""
    offset = 1000
    assert embedded.map(lambda x: x + offset, [1, 2, 3]) == [1001, 1002, 1003]


def test_ship_by_value_sends_a_module_the_nodes_cannot_import(
    embedded: remap.Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function from a module only this process can import fails on the cores (they cannot
    import it) until remap.ship_by_value(module) sends the module's code with it."""
    import cloudpickle

    (tmp_path / "only_here_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod  # type: ignore[import-not-found]

    with pytest.raises(RemoteTaskError, match="only_here_mod"):
        embedded.map(only_here_mod.triple, [1])
    remap.ship_by_value(only_here_mod)
    try:
        assert embedded.map(only_here_mod.triple, [1, 2]) == [3, 6]
    finally:
        cloudpickle.unregister_pickle_by_value(only_here_mod)
        sys.modules.pop("only_here_mod", None)


# ---------------------------------------------------------------- reduce and submit


def test_reduce_folds_every_result(cluster: remap.Cluster) -> None:
    """reduce(f, xs, combine) equals the local fold, with partial folds on the nodes."""
    assert cluster.reduce(square, range(2000), add) == sum(x * x for x in range(2000))


def test_reduce_initial_and_empty(embedded: remap.Cluster) -> None:
    """initial is folded in once; an empty input without initial is a TypeError."""
    assert embedded.reduce(square, [3], add, initial=10) == 19
    assert embedded.reduce(square, [], add, initial=10) == 10
    with pytest.raises(TypeError, match="empty"):
        embedded.reduce(square, [], add)


def test_reduce_raises_the_first_remote_error(embedded: remap.Cluster) -> None:
    """A failing task makes reduce raise an error naming the remote type."""
    with pytest.raises(RemoteTaskError, match="ValueError"):
        embedded.reduce(fail_on_five, range(10), add)


def test_submit_returns_a_future(cluster: remap.Cluster) -> None:
    """submit(fn, *args, **kwargs) returns a concurrent.futures.Future with the result."""
    future = cluster.submit(add, 20, b=22)
    assert future.result(timeout=30) == 42


# ---------------------------------------------------------------- the cluster


def test_status_and_nodes_describe_the_cluster(
    embedded: remap.Cluster, remote: remap.Cluster
) -> None:
    """nodes() lists the connected nodes and cores() adds up their cores."""
    assert [n["cores"] for n in embedded.nodes()] == [2]
    assert embedded.cores() == 2
    assert sorted(n["cores"] for n in remote.nodes()) == [1, 1]
    assert remote.cores() == 2
    status = embedded.status()
    assert set(status) >= {"nodes", "jobs", "server"}


def test_work_really_runs_on_both_nodes(remote: remap.Cluster) -> None:
    """Slow enough tasks spread over both node processes (two distinct core pids)."""
    pids = set(remote.map(pid_of_core_slowly, range(12), chunksize=1))
    assert len(pids) == 2 and os.getpid() not in pids


def pid_of_core_slowly(x: int) -> int:
    import time

    time.sleep(0.05)
    return os.getpid()


def core_pids(cluster: remap.Cluster) -> list[int]:
    embedded = cluster._embedded
    assert embedded is not None and embedded.node is not None
    return [core.transport.pid for core in embedded.node.pool.cores if core.transport is not None]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_handles_open_and_close_repeatedly_and_closing_kills_cores() -> None:
    """Three handles in a row, each with its own embedded cluster; closing one kills its cores."""
    for _ in range(3):
        cluster = remap.connect(cores=1, settings=Settings())
        try:
            assert cluster.embedded
            assert cluster.map(square, [4]) == [16]
            pids = core_pids(cluster)
            assert pids and all(alive(p) for p in pids)
        finally:
            cluster.close()
        assert not any(alive(p) for p in pids), f"cores {pids} outlived close()"
        cluster.close()  # idempotent
        # still said of the closed handle ("<remap.Cluster remote ... closed>" and False)
        assert cluster.embedded and repr(cluster).startswith("<remap.Cluster embedded ")


def test_a_closed_handle_refuses_work() -> None:
    """After close(), map and submit raise instead of hanging."""
    cluster = remap.connect(cores=1, settings=Settings())
    cluster.close()
    with pytest.raises(RuntimeError, match="closed"):
        cluster.map(square, [1])
    with pytest.raises(RuntimeError, match="closed"):
        cluster.submit(square, 1)


def test_close_fails_a_running_imap_instead_of_hanging() -> None:
    """Closing the handle under a consumer makes its iterator raise rather than wait forever.
    The second call sleeps 30 s (it was 5 s: a stall that long before close let its result
    arrive, and next() returned it)."""
    cluster = remap.connect(cores=1, settings=Settings())
    results = cluster.imap(slow_identity, [0.0, 30.0], chunksize=1)
    assert next(results) == 0.0
    cluster.close()
    with pytest.raises((ConnectionLost, remap.JobKilled)):
        next(results)


def test_connect_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    """A server address where nothing listens gives ServerUnreachable, not a hang."""
    with pytest.raises(remap.ServerUnreachable):
        remap.connect("127.0.0.1:1", secret="x", settings=Settings(), connect_timeout=5)


# ---------------------------------------------------------------- __main__ and examples


SCRIPT = """
import remap
from remap.settings import Settings

scale = 3

def scaled(x):
    return x * scale            # a global of __main__: travels with the function

class Boom(Exception):
    pass

def boom(x):
    raise Boom("from main")

if __name__ == "__main__":
    with remap.connect(cores=1, settings=Settings()) as cluster:
        print(cluster.map(scaled, [1, 2]))
        print(cluster.map(lambda x: -x, [5]))
        try:
            cluster.map(boom, [1])
        except Boom as exc:  # the script's own class, as the README promises
            print("caught Boom", type(exc) is Boom)
        except Exception as exc:
            print("remote", getattr(exc, "type_name", type(exc).__name__))
"""


def run_python(argv: list[str], tmp_path: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    env = clean_env(tmp_path / "home")
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_functions_of_main_ship_by_value(tmp_path: Path) -> None:
    """A script's own functions and lambdas run on cores that never saw the script."""
    (tmp_path / "job.py").write_text(SCRIPT)
    done = run_python(["job.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["[3, 6]", "[-5]"]
    assert lines[2] == "caught Boom True"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_run(example: str, tmp_path: Path) -> None:
    """Every example in examples/ runs to completion on an embedded cluster."""
    done = run_python([str(EXAMPLES / example)], tmp_path, timeout=120)
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{example} printed nothing"


def test_a_forked_child_gets_a_clear_error_and_can_connect_afresh(tmp_path: Path) -> None:
    """After os.fork() the parent's handle has no network thread in the child: using it raises
    one clear error instead of hanging, and remap.connect() in the child works."""
    import os

    with remap.connect(cores=1, settings=Settings()) as cluster:
        assert cluster.map(abs, [-1]) == [1]
        report = tmp_path / "child.txt"
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                try:
                    cluster.map(abs, [-2])
                    report.write_text("no error")
                except remap.RemapError as exc:
                    with remap.connect(cores=1, settings=Settings()) as fresh:
                        report.write_text(f"{exc}|{fresh.map(abs, [-3])}")
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, report.read_text() if report.exists() else ""
        error, fresh = report.read_text().split("|")
        assert "before os.fork()" in error and fresh == "[3]"
        assert cluster.map(abs, [-4]) == [4], "the parent's handle still works"


def test_closing_an_embedded_handle_logs_no_loss() -> None:
    """``close()`` is a stop asked for: the embedded server and node say nothing of a loss or
    a reconnect (a program with Twisted's logging on saw the server's "node ... lost" and
    the node's "lost the server ... reconnecting" warnings at every close)."""
    from twisted.logger import capturedLogs, formatEvent

    with capturedLogs() as events:
        with remap.connect(cores=1, settings=Settings()) as cluster:
            assert cluster.map(abs, [-1]) == [1]
    loud = [
        formatEvent(e)
        for e in events
        if getattr(e.get("log_level"), "name", "") in ("warn", "error", "critical")
    ]
    assert not loud, loud
