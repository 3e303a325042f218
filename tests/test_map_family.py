"""The map family of ``Cluster`` and ``Pool`` is one table and one implementation (issue 10's
done-when): no processes, ``Cluster._iterate`` (what opens a job) is recorded instead."""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import threading
import weakref
from typing import Any

import pytest

from remap.api import MAP_CALLS, Cluster, MapCall
from remap.executor import Executor
from remap.pool import SMALL_MAP, Pool


class FakeResults:
    """Stands for a ResultIterator: what the facades do with it, without a job."""

    _stream = None

    def __init__(self) -> None:
        self.closed = False

    def rest(self, out: list[Any] | None = None) -> list[Any]:
        return out if out is not None else []

    def __enter__(self) -> FakeResults:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.closed = True


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every job the facades open: ``_iterate``'s keyword arguments."""
    calls: list[dict[str, Any]] = []

    def record(self: Cluster, fn: Any, iterable: Any, **kwargs: Any) -> FakeResults:
        calls.append(kwargs)
        return FakeResults()

    monkeypatch.setattr(Cluster, "_iterate", record)
    return calls


def handles() -> tuple[Cluster, Pool]:
    """A cluster handle and a pool over it, built without connecting, the pool with a fake
    executor (where its small maps' calls go)."""
    cluster = object.__new__(Cluster)
    cluster.group, cluster.priority, cluster.retries, cluster.task_timeout = None, 0, 3, None
    cluster.requires, cluster.max_cores, cluster.min_cores = [], 0, 0
    pool = object.__new__(Pool)
    pool._cluster, pool._owns_cluster, pool._initializer = cluster, False, None
    pool._state, pool._iterators = "RUN", weakref.WeakSet()
    pool._executor = FakeExecutor()
    return cluster, pool


def put_calls(executor: FakeExecutor) -> list[tuple[Any, list[Any]]]:
    """The calls of small maps put in the executor's jobs: (function, [each call])."""
    return [(fn, [pickle.loads(blob) for blob in blobs]) for fn, blobs in executor.put]


@pytest.mark.parametrize("method", sorted(MAP_CALLS))
def test_cluster_and_pool_read_each_method_from_the_one_table(
    opened: list[dict[str, Any]], method: str
) -> None:
    """Both facades' method of one name opens the same kind of job: the table's row; the
    pool's small map or starmap of a known length is put in its executor's job of the function
    instead, as the row's calls."""
    cluster, pool = handles()
    getattr(cluster, method)(abs, [1])
    getattr(pool, method)(abs, iter([1]))
    row = MAP_CALLS[method]
    if not row.lazy:
        getattr(pool, method)(abs, [(-2,)] if row.star else [-2])
        assert put_calls(pool._executor) == [(abs, [((-2,), {})])]
    pool._state = "TERMINATE"
    for seen in opened:
        assert (seen["star"], seen["ordered"]) == (row.star, row.ordered)
        assert (seen["buffersize"] is not None) is row.lazy
    assert [seen["kind"] for seen in opened] == [row.kind, "pool"]
    # what only the facade decides: multiprocessing's semantics for the pool
    assert opened[0]["style"].stop_on_error and not opened[1]["style"].stop_on_error
    assert opened[1]["style"].timeout_error is multiprocessing.TimeoutError


def test_a_changed_row_changes_both_facades(
    opened: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One table: change imap's row and Cluster.imap and Pool.imap both follow (with copies
    of the wrappers, only the copy reading the changed place would)."""
    monkeypatch.setitem(MAP_CALLS, "imap", MapCall("probe", star=True, ordered=False, lazy=True))
    cluster, pool = handles()
    cluster.imap(abs, [1])
    pool.imap(abs, [1])
    pool._state = "TERMINATE"
    assert [(seen["star"], seen["ordered"]) for seen in opened] == [(True, False)] * 2
    assert opened[0]["kind"] == "probe"


def test_eager_methods_gather_through_the_facades_style(opened: list[dict[str, Any]]) -> None:
    """map returns a list gathered inside ``with`` (the job is killed if the caller leaves);
    map_async takes the same row without gathering; a pool's iterators are tracked."""
    cluster, pool = handles()
    assert cluster.map(abs, [1]) == [] and pool.map(abs, iter([1])) == []
    results = pool._map("map", abs, [1], None, collect=False)
    assert isinstance(results, FakeResults) and not results.closed
    assert results in pool._iterators
    pool._state = "TERMINATE"


class FakeExecutor:
    """Stands for a pool's executor: the queue map_async's job events go to."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        #: the calls of small maps put in its submit jobs: (function, [each call's pickle])
        self.put: list[tuple[Any, list[bytes]]] = []

    _shutdown, _killed, _initializer, _thread = False, None, None, None
    _small_map = Executor._small_map

    def _put(self, fn: Any, blobs: list[bytes], tags: list[Any], waits: bool = False) -> None:
        self.put.append((fn, blobs))
        for tag in tags:  # every call is sent (as _on_send counts it) and returns 1 at once
            tag.sent += 1
            tag.settle(tag.sent - 1, 1, None)

    def _adopt(self, owner: Any) -> queue.SimpleQueue:
        return self.events

    def _disown(self, owner: Any) -> None:
        pass


def test_async_methods_read_the_eager_rows(
    opened: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """map_async and starmap_async open their eager method's job (its row of the one table,
    changed rows followed), its events going to the pool's delivery queue; a map of at most
    SMALL_MAP arguments is put as calls in the executor's job instead, read by the same row."""
    monkeypatch.setitem(
        MAP_CALLS, "starmap", MapCall("probe", star=True, ordered=False, lazy=False)
    )
    cluster, pool = handles()
    pool._lock, pool._pending = threading.Lock(), set()
    pool.map_async(abs, [1] * (SMALL_MAP + 1))
    pool.starmap_async(abs, [(1,)] * (SMALL_MAP + 1))
    pool.map_async(abs, [(1, 2)])
    pool.starmap_async(abs, [(1, 2)])
    pool._state = "TERMINATE"
    seen = [(job["star"], job["ordered"], job["buffersize"]) for job in opened]
    assert seen == [(False, True, None), (True, False, None)]
    assert all(job["events"] is pool._executor.events for job in opened)
    assert put_calls(pool._executor) == [(abs, [(((1, 2),), {})]), (abs, [((1, 2), {})])]
