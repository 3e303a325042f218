"""Other engines for a job file: the same function and arguments on a Dask or Ray cluster.

The seam is :meth:`Engine.outcomes`: it takes the function blob (``shipping.function_blob``,
possibly behind a ``bundle``) and an iterator of chunks of ``(index, argument)`` and yields
each argument's outcome ``(index, result, error)`` as chunks finish. remap's own server is the
default engine (``--engine remap``: the console's usual path) and one implementation of the
seam (``remap://``: :class:`RemapEngine`); Dask and Ray are others. Each runs one task per
*chunk*, never per argument (Dask and Ray pay milliseconds per task), with a bounded number of
chunks in flight (``Client.map`` is not lazy: it would submit every task at once).

The response-mode sinks stay on the console: :class:`EngineRun` feeds them from a thread of
its own, so the console's progress, report and exit codes are the same as with remap.

Neither engine can stop a call that runs too long the way remap does (by killing its core):
a call over the job's ``timeout`` runs to its end and is then reported as a ``TimeoutError``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import ConfigError, ConnectionLost, JobFailed, ServerUnreachable
from .sinks import Sink, TaskErrorInfo

Chunk = list[tuple[int, Any]]
Outcome = tuple[int, Any, TaskErrorInfo | None]

#: chunks in flight per worker: enough to hide a round trip, few enough to bound memory
WINDOW_PER_WORKER = 2
#: seconds between looks at a stop request while chunks run (Ctrl-C must not wait for a call)
STOP_POLL = 0.2
#: the largest automatic chunk
MAX_AUTO_CHUNK = 2000

# ----------------------------------------------------------------------- worker side

#: functions already unpickled in this worker process, by blob digest
_loaded: dict[str, tuple[Any, Any]] = {}


def job_blob(blob: bytes) -> bytes:
    """The job's function blob as a task's result (Dask): see :meth:`DaskEngine._share`."""
    return blob


def run_chunk(
    key: str, blob: bytes, star: bool, timeout: float | None, chunk: Chunk
) -> tuple[list[int], list[Any], list[list[Any]]]:
    """Call the job's function on one chunk (runs on a Dask or Ray worker).

    Returns the indices, the results (where a call failed: the pickled exception if it
    round-trips, else None) and remap's error entries
    ``[position, type, message, traceback]``; the user's exceptions never fail the task, so an
    engine's own retries only ever re-run chunks whose worker died.
    """
    from .bundle import unwrap
    from .node.core import _error_entry, _exception_blob
    from .shipping import load_function_blob

    loaded = _loaded.get(key)
    if loaded is None:
        loaded = _loaded[key] = load_function_blob(unwrap(blob, int(key[:8], 16)))
    fn = loaded[0]
    indices: list[int] = []
    results: list[Any] = []
    errors: list[list[Any]] = []
    clock = time.monotonic
    for pos, (index, arg) in enumerate(chunk):
        indices.append(index)
        started = clock()
        try:
            if star:
                value = fn(**arg) if isinstance(arg, dict) else fn(*arg)
            else:
                value = fn(arg)
        except Exception as exc:
            tb = exc.__traceback__
            errors.append(_error_entry(pos, exc.with_traceback(tb.tb_next if tb else None)))
            results.append(_exception_blob(exc) or None)  # for the Python API to re-raise
            continue
        took = clock() - started
        if timeout is not None and took > timeout:
            errors.append(
                [pos, "TimeoutError", f"the call took {took:.1f}s, over the timeout of "
                 f"{timeout:g}s (this engine cannot stop a running call)", ""]
            )  # fmt: skip
            results.append(None)
            continue
        results.append(value)
    return indices, results, errors


# ----------------------------------------------------------------------- console side


class Engine:
    """A cluster that runs chunks: subclasses say how to submit and close, and how to wait,
    cancel and read a result where their handles are not ``concurrent.futures`` futures."""

    name = "engine"
    workers = 1

    def outcomes(
        self,
        blob: bytes,
        chunks: Iterable[Chunk],
        *,
        star: bool = False,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Outcome]:
        """Each argument's ``(index, result, error)``, chunk by chunk as chunks finish.

        At most ``WINDOW_PER_WORKER * workers`` chunks are in flight; closing the generator
        early (``on_error: fail``), or setting ``stop`` (Ctrl-C: seen within ``STOP_POLL``
        even while a call runs on), cancels the chunks still pending.
        """
        key = hashlib.sha256(blob).hexdigest()[:16]
        shared = self._share(blob)
        window = max(1, WINDOW_PER_WORKER * self.workers)
        source = iter(chunks)
        pending: dict[Any, Chunk] = {}
        try:
            while True:
                while len(pending) < window:
                    chunk = next(source, None)
                    if chunk is None:
                        break
                    pending[self._submit(key, shared, star, timeout, chunk)] = chunk
                if not pending:
                    return
                for handle in self._wait(list(pending), None if stop is None else STOP_POLL):
                    chunk = pending.pop(handle)
                    yield from self._collect(handle, chunk)
                if stop is not None and stop.is_set():
                    return
        finally:
            if pending:
                self._cancel(list(pending))

    def _collect(self, handle: Any, chunk: Chunk) -> Iterator[Outcome]:
        from .client import _error_info  # a remap result's error entry, read the same way

        try:
            indices, results, errors = self._result(handle)
        except Exception as exc:  # the chunk itself failed: its worker died past the retries
            for index, _ in chunk:
                yield index, None, TaskErrorInfo(index, type(exc).__name__, str(exc)[:2000])
            return
        failed = {e[0]: e for e in errors}
        for pos, (index, value) in enumerate(zip(indices, results)):
            entry = failed.get(pos)
            if entry is None:
                yield index, value, None
            else:
                yield index, None, _error_info(index, entry, value)

    def _share(self, blob: bytes) -> Any:
        return blob

    def _submit(self, key: str, blob: Any, star: bool, timeout: float | None, chunk: Chunk) -> Any:
        raise NotImplementedError

    def _wait(self, handles: list[Any], timeout: float | None) -> list[Any]:
        """The handles done once one is (none when ``timeout`` passes first)."""
        done, _ = concurrent.futures.wait(
            handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(done)

    def _result(self, handle: Any) -> Any:
        return handle.result()

    def _cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            handle.cancel()

    def close(self) -> None:
        """Disconnect; a local cluster this engine started is stopped."""


def _need(module: str, scheme: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--engine {scheme}:// needs {module.split('.')[0]}: pip install 'remap[engines]'"
        ) from None


class DaskEngine(Engine):
    """``dask://HOST:PORT`` (a running scheduler) or ``dask://local`` (a LocalCluster).

    ``retries`` maps to the scheduler's ``allowed-failures`` (how often a task whose worker
    died is re-run) on a local cluster only; a running scheduler keeps its own setting.
    """

    name = "dask"

    def __init__(self, address: str, *, workers: int, retries: int = 3) -> None:
        dask = _need("dask", "dask")
        distributed = _need("distributed", "dask")
        self._distributed = distributed
        self._cluster = None
        try:
            if address == "local":
                with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
                    self._cluster = distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",  # a free port: never clash with 8787
                        silence_logs=40,
                    )
                self.client = distributed.Client(self._cluster)
            else:
                self.client = distributed.Client(address, timeout=10)
        except OSError as exc:
            self.close()
            raise ServerUnreachable(
                f"could not reach the dask scheduler at {address}: {exc}"
            ) from None
        if address != "local":
            workers = max(1, sum(self.client.nthreads().values()))
        self.workers = workers

    def _share(self, blob: bytes) -> Any:
        # a task's result, not scattered data: when the worker holding it dies (a call that
        # exits its process) the scheduler computes it again; scattered data is lost with it
        return self.client.submit(job_blob, blob, pure=False)

    def _submit(self, key: str, blob: Any, star: bool, timeout: float | None, chunk: Chunk) -> Any:
        return self.client.submit(run_chunk, key, blob, star, timeout, chunk, pure=False)

    def _wait(self, handles: list[Any], timeout: float | None) -> list[Any]:
        try:
            done, _ = self._distributed.wait(
                handles, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        except TimeoutError:  # dask's TimeoutError is the builtin
            return []
        return list(done)

    def _cancel(self, handles: list[Any]) -> None:
        self.client.cancel(handles)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


class RayEngine(Engine):
    """``ray://HOST:PORT`` (a Ray client server, port 10001 by default) or ``ray://local``.

    ``retries`` is the task's ``max_retries``: a chunk whose worker process died is re-run.
    """

    name = "ray"

    def __init__(self, address: str, *, workers: int, retries: int = 3) -> None:
        ray = self._ray = _need("ray", "ray")
        #: this process drives a local cluster itself: there a cancel racing a task's reply
        #: aborts the whole process (Ray 2.60's failed check "Tried to complete task that was not
        #: pending", seen in our engine tests), so the chunks still pending (a window at most)
        #: finish instead, and close() shuts the cluster down under them
        self._local = address == "local"
        self._address = address
        try:
            if self._local:
                ray.init(
                    address="local",  # never RAY_ADDRESS nor the last `ray start` cluster
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            else:
                _connect_ray_client(ray, address)
        except (OSError, ConnectionError) as exc:
            raise ServerUnreachable(
                f"could not reach the ray cluster at {address}: {exc}"
            ) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", workers)))
        self._remote = ray.remote(run_chunk).options(max_retries=retries, num_cpus=1)

    def _connected(self) -> Any:
        """``ray``, while connected: once a ``ray://`` connection is lost, any ray call would
        start a local Ray cluster in this process (Ray's auto-init) instead of failing."""
        if not self._ray.is_initialized():
            raise ConnectionLost(f"lost the connection to the ray cluster at {self._address}")
        return self._ray

    def _share(self, blob: bytes) -> Any:
        return self._connected().put(blob)

    def _submit(self, key: str, blob: Any, star: bool, timeout: float | None, chunk: Chunk) -> Any:
        self._connected()
        return self._remote.remote(key, blob, star, timeout, chunk)

    def _wait(self, handles: list[Any], timeout: float | None) -> list[Any]:
        try:
            done, _ = self._connected().wait(handles, num_returns=1, timeout=timeout)
        except ConnectionError as exc:  # a ray:// client that gave up reconnecting
            raise ConnectionLost(
                f"lost the connection to the ray cluster at {self._address} ({exc})"
            ) from None
        return done

    def _result(self, handle: Any) -> Any:
        return self._connected().get(handle)

    def _cancel(self, handles: list[Any]) -> None:
        if not self._local and self._ray.is_initialized():  # a lost cluster has nothing to cancel
            for handle in handles:
                self._ray.cancel(handle)

    def close(self) -> None:
        self._ray.shutdown()


#: attempts at a ``ray://`` connection whose server-side session died while starting
RAY_CLIENT_ATTEMPTS = 3


def _connect_ray_client(ray: Any, address: str, attempts: int = RAY_CLIENT_ATTEMPTS) -> None:
    """``ray.init("ray://ADDRESS")``, tried again when the cluster's client server reports
    "Initialization failure from server": the per-client server process it forks died while
    starting (a known Ray bug, ray-project/ray#63202, a few percent of connections), so a new
    attempt starts a new one. Anything else (nobody listening, a wrong token) is not retried."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=f"ray://{address}", logging_level=logging.ERROR)
            # the client sets its log channel's logger to INFO: its warnings ("Log channel is
            # reconnecting") would be lines of their own among the console's
            logging.getLogger("ray.util.client.logsclient").setLevel(logging.ERROR)
            return
        except ConnectionAbortedError as exc:
            if "initialization failure" not in str(exc).lower() or attempt == attempts:
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()
            logging.getLogger(__name__).info(
                "ray client server at %s failed to start a session (attempt %d of %d): %s",
                address, attempt, attempts, exc,
            )  # fmt: skip


class RemapEngine(Engine):
    """``remap://HOST:PORT`` (a running remap server) or ``remap://local`` (an embedded
    cluster): remap itself behind the seam, one remap call per chunk through the public API.

    The console's default path (``--engine remap``) speaks remap's job protocol instead —
    server-side progress, ``--detach``, ``attach``, resume after a restart, a timeout that
    kills the core — which a chunk-shaped seam cannot carry; this engine is the same job on
    the same cluster through the seam every other engine uses, and a test keeps the two
    paths' outputs identical.
    """

    name = "remap"

    def __init__(
        self, address: str, *, workers: int, retries: int = 3, settings: Any = None
    ) -> None:
        from dataclasses import replace

        from .api import connect
        from .settings import Settings

        settings = settings or Settings()
        if address == "local":  # this process's own cluster, whatever REMAP_SERVER says
            settings = replace(settings, server=None, discovery=False)
            self.cluster = connect(settings=settings, cores=workers, retries=retries)
        else:
            self.cluster = connect(address, settings=settings, retries=retries)
        try:
            self.workers = max(1, self.cluster.cores())
        except BaseException:
            self.cluster.close()
            raise

    def _submit(self, key: str, blob: Any, star: bool, timeout: float | None, chunk: Chunk) -> Any:
        return self.cluster.submit(run_chunk, key, blob, star, timeout, chunk)

    def close(self) -> None:
        self.cluster.close()


ENGINES = {"dask": DaskEngine, "ray": RayEngine, "remap": RemapEngine}


def open_engine(
    url: str, *, workers: int | None = None, retries: int = 3, settings: Any = None
) -> Engine:
    """Connect to (or start) the engine a URL names (``dask://HOST:PORT``, ...); the caller
    closes it."""
    if url == "remap":
        raise ConfigError("--engine remap is the console's own path, not an Engine")
    scheme, sep, address = url.partition("://")
    if not sep or scheme not in ENGINES or not address:
        raise ConfigError(
            f"unknown engine {url!r}: expected remap, remap://HOST:PORT, remap://local, "
            "dask://HOST:PORT, dask://local, ray://HOST:PORT or ray://local"
        )
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    if scheme == "remap":
        return RemapEngine(address, workers=workers, retries=retries, settings=settings)
    return ENGINES[scheme](address, workers=workers, retries=retries)


def chunked(items: Iterable[Any], size: int) -> Iterator[Chunk]:
    """``(index, item)`` lists of ``size``."""
    numbered = enumerate(items)
    while True:
        chunk = list(itertools.islice(numbered, size))
        if not chunk:
            return
        yield chunk


def auto_chunksize(total: int | None, workers: int) -> int:
    """About eight chunks per worker for a known count (fewer tasks, still balanced)."""
    if total is None:
        return 256
    return max(1, min(MAX_AUTO_CHUNK, math.ceil(total / (workers * 8))))


class EngineRun:
    """A job run on an engine, seen by the console like a remap job (its counts, first error).

    A thread of its own reads the arguments, ships chunks and feeds the job's sink (the same
    sinks as remap's); :meth:`start` returns a future of the job's ``JobOutcome``.
    """

    job_id = None  # nothing on remap's server to kill or attach to

    def __init__(
        self,
        engine: Engine,
        blob: bytes,
        arguments: Iterable[Any],
        sink: Sink,
        *,
        star: bool = False,
        on_error: str = "fail",
        timeout: float | None = None,
        chunksize: int = 0,
        total_hint: int | None = None,
    ) -> None:
        self.engine = engine
        self.blob = blob
        self.arguments = arguments
        self.sink = sink
        self.star = star
        self.on_error = on_error
        self.timeout = timeout
        self.chunksize = chunksize or auto_chunksize(total_hint, engine.workers)
        self.total_hint = total_hint
        self.done = 0
        self.failed = 0
        self.sent = 0
        self.exhausted = False
        self.first_error: TaskErrorInfo | None = None
        self._stop: Exception | None = None
        self._stopped = threading.Event()  # set with _stop: the engine's waits look at it
        #: arguments in flight, kept only for sinks that store them (sqlite)
        self._args: dict[int, Any] = {}
        self._thread: threading.Thread | None = None
        self._future: concurrent.futures.Future = concurrent.futures.Future()

    def start(self) -> concurrent.futures.Future:
        self._thread = threading.Thread(
            target=self._run, args=(self._future,), name="remap-engine", daemon=True
        )
        self._thread.start()
        return self._future

    def collect(
        self, sink: Sink, *, tick: Callable[[], None] | None = None, interval: float = 0.2
    ) -> Any:
        """Wait on this thread for the job's outcome, ``tick`` every ``interval`` s (the
        console's progress), as :meth:`remap.client.JobStream.collect` does for a remap job;
        here the job's own thread feeds ``sink``."""
        assert sink is self.sink
        while True:
            try:
                return self._future.result(timeout=interval)
            except concurrent.futures.TimeoutError:
                if tick is not None:
                    tick()

    def _chunks(self) -> Iterator[Chunk]:
        for chunk in chunked(self.arguments, self.chunksize):
            if self._stop is not None:
                return
            self.sent += len(chunk)
            if self.sink.needs_arguments:
                self._args.update(chunk)
            yield chunk
        self.exhausted = True

    def _run(self, future: concurrent.futures.Future) -> None:
        from .client import JobOutcome

        engine, sink = self.engine, self.sink
        outcomes = engine.outcomes(
            self.blob, self._chunks(), star=self.star, timeout=self.timeout, stop=self._stopped
        )
        error: Exception | None = None
        try:
            for index, result, info in outcomes:
                if self._stop is not None:
                    break
                sink.add(index, self._args.pop(index, None), result, info)
                if info is None:
                    self.done += 1
                    continue
                self.failed += 1
                if self.first_error is None:
                    self.first_error = info
                if self.on_error == "fail":
                    error = JobFailed(
                        f"job failed on {engine.name}: argument {index} raised "
                        f"{info.type_name}: {info.message}"
                    )
                    break
            if error is None and self._stop is not None:  # stopped (between outcomes, too)
                error = self._stop
            sink.flush()
        except Exception as exc:  # a bad argument line, a sink that cannot write, the engine
            error = exc if isinstance(exc, (JobFailed, ConfigError, ConnectionLost)) else JobFailed(
                f"job failed on {engine.name}: {type(exc).__name__}: "
                + " ".join(str(exc).split())[:1000]  # one line (Dask's texts have several)
            )  # fmt: skip
        finally:
            outcomes.close()  # cancels what is still pending
            engine.close()
        try:
            sink.close(complete=error is None)
        except Exception as exc:
            error = error or JobFailed(
                f"the job finished but its results could not be saved: {exc}"
            )
        if error is None:
            future.set_result(JobOutcome(None, "done", self.done, self.failed, ""))  # type: ignore[arg-type]
        else:
            future.set_exception(error)

    def fail(self, error: Exception) -> None:
        """Stop (Ctrl-C): pending chunks are cancelled; what arrived is kept."""
        self._stop = error
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def start_job(
    engine_url: str, spec: Any, sink: Sink, *, workers: int | None = None, settings: Any = None
) -> EngineRun:
    """Run a job file on the engine ``engine_url`` names; the console collects it."""
    from .console.session import job_blob
    from .jobfile import count_arguments, iter_arguments

    blob = job_blob(spec)
    engine = open_engine(
        engine_url, workers=workers, retries=spec.options.retries, settings=settings
    )
    run = EngineRun(
        engine,
        blob,
        iter_arguments(spec),
        sink,
        star=spec.options.star,
        on_error=spec.options.on_error,
        timeout=spec.options.timeout,
        chunksize=spec.options.chunksize or 0,
        total_hint=count_arguments(spec),
    )
    run.start()
    return run


class EngineCluster:
    """``remap.connect("dask://...")`` / ``("ray://...")``: the cluster handle's map-shaped
    calls on another engine (``map``, ``starmap``, ``imap_unordered``, ``reduce``).

    The first failing call raises its own exception (or a ``RemoteTaskError``), as with remap;
    ``task_timeout`` reports an overlong call only after it ran (see :func:`run_chunk`).
    """

    def __init__(
        self,
        url: str,
        *,
        cores: int | None = None,
        retries: int = 3,
        task_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.task_timeout = task_timeout
        self.engine = open_engine(url, workers=cores, retries=retries)

    def _results(
        self, fn: Any, iterable: Iterable[Any], star: bool, chunksize: int | None
    ) -> Iterator[tuple[int, Any]]:
        from .api import function_blob, remote_exception

        blob = function_blob(fn)
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        size = chunksize or auto_chunksize(total, self.engine.workers)
        outcomes = self.engine.outcomes(
            blob, chunked(iterable, size), star=star, timeout=self.task_timeout
        )
        with contextlib.closing(outcomes):  # an error cancels the chunks still pending
            for index, result, info in outcomes:
                if info is not None:
                    raise remote_exception(info)
                yield index, result

    def map(self, fn: Any, iterable: Iterable[Any], *, chunksize: int | None = None) -> list[Any]:
        """``[fn(x) for x in iterable]`` in argument order."""
        return _in_order(self._results(fn, iterable, False, chunksize))

    def starmap(
        self, fn: Any, iterable: Iterable[Any], *, chunksize: int | None = None
    ) -> list[Any]:
        """``[fn(*args) for args in iterable]`` in argument order."""
        return _in_order(self._results(fn, iterable, True, chunksize))

    def imap_unordered(
        self, fn: Any, iterable: Iterable[Any], *, chunksize: int | None = None
    ) -> Iterator[Any]:
        """Results as chunks finish; the iterable is read only as far as the window needs."""
        return (value for _, value in self._results(fn, iterable, False, chunksize))

    def reduce(
        self, fn: Any, iterable: Iterable[Any], combine: Any, *, chunksize: int | None = None
    ) -> Any:
        """Fold ``fn(x)`` with ``combine`` (associative and commutative), here as results come."""
        return functools.reduce(combine, self.imap_unordered(fn, iterable, chunksize=chunksize))

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> EngineCluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _in_order(pairs: Iterator[tuple[int, Any]]) -> list[Any]:
    got = dict(pairs)
    return [got[i] for i in range(len(got))]
