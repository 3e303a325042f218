"""A joblib backend: ``import remap.joblib``, then ``with joblib.parallel_backend("remap"): ...``.

Each joblib batch (a ``BatchedCalls``) becomes one call of a streaming job, so joblib's
auto-batching sizes the batches and remap's scheduler spreads them over the cluster;
``n_jobs=-1`` means every core of every connected node.

Without arguments the backend uses one connection per process, made on first use like
:func:`remap.connect` (an embedded local cluster when no server is configured) and closed
at exit. ``parallel_backend("remap", cluster=handle)`` uses a handle of yours;
``parallel_backend("remap", address="host:7878", secret=...)`` connects elsewhere.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from .executor import Executor

__all__ = ["RemapBackend", "register"]

_shared_lock = threading.Lock()
_shared: dict[tuple[tuple[str, Any], ...], Any] = {}


def _run_batch(batch: Any) -> Any:
    """The job function on the cores: run one joblib batch."""
    return batch()


def shared_cluster(**connect_kwargs: Any) -> Any:
    """One connection per set of connection arguments, for this process's lifetime."""
    from .api import connect

    key = tuple(sorted(connect_kwargs.items()))
    with _shared_lock:
        cluster = _shared.get(key)
        if cluster is None or cluster.closed:
            cluster = connect(**connect_kwargs)
            _shared[key] = cluster
        return cluster


def _forget_shared_after_fork() -> None:
    """A forked child (joblib's own workers, say) connects afresh instead of hanging on a
    handle whose network thread stayed in the parent."""
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_after_fork)


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        clusters = list(_shared.values())
        _shared.clear()
    for cluster in clusters:
        with contextlib.suppress(Exception):  # exiting anyway; cores also die with their pipes
            cluster.close()


class RemapBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase on a remap cluster, with joblib's auto-batching."""

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = 1  # joblib's convention: Parallel() without n_jobs is one job
    # a batch pays a network round trip, so aim for batches a bit longer than loky's
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 2.0
    #: connection defaults of a backend registered by :func:`register` under another name
    _defaults: Mapping[str, Any] = MappingProxyType({})

    def __init__(
        self,
        cluster: Any = None,
        *,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        **connect_kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        defaults = dict(self._defaults)
        default_cluster = defaults.pop("cluster", None)
        self._cluster_given = cluster if cluster is not None else default_cluster
        self._connect_kwargs = {**defaults, **connect_kwargs}
        self._executor: Executor | None = None
        self._init: tuple[Any, tuple[Any, ...]] = (initializer, tuple(initargs))

    @property
    def _workers(self) -> Executor | None:
        """Where joblib's own tests look for a backend's worker pool: the executor, replaced
        after an abort and None once terminated, as loky's workers are."""
        return self._executor

    def _ready_executor(self) -> Executor:
        if self._executor is None:
            initializer, initargs = self._init
            executor = Executor(cluster=self.cluster, initializer=initializer, initargs=initargs)
            # a joblib batch is already sized (0.2-2 s of work): batching batches would put one
            # behind a slow one on the same core while other cores idle
            executor._submit_chunksize = 1
            self._executor = executor
        return self._executor

    @property
    def cluster(self) -> Any:
        if self._cluster_given is not None:
            return self._cluster_given
        return shared_cluster(**self._connect_kwargs)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1  # joblib's contract: None outside a parallel_config(n_jobs=...) is one job
        if n_jobs < 0:
            return max(self.cluster.cores() + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        self.parallel = parallel
        if "initializer" in backend_kwargs or "initargs" in backend_kwargs:
            # Parallel(..., initializer=f, initargs=(...)): once per core process, as with loky
            self._init = (backend_kwargs["initializer"], tuple(backend_kwargs.get("initargs", ())))
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            # as loky and multiprocessing: one job runs here, in this process
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._ready_executor()
        return n

    def submit(self, func: Any, callback: Any = None) -> Any:
        future = self._ready_executor().submit(_run_batch, func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Any) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: kill the batches still queued or running; they are not wanted."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor._terminate()
        if ensure_ready and self.parallel is not None:
            self.configure(
                n_jobs=self.parallel.n_jobs, parallel=self.parallel, **self.parallel._backend_kwargs
            )

    def terminate(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        self.reset_batch_stats()


def register(
    cluster: Any = None, *, name: str = "remap", make_default: bool = False, **connect_kwargs: Any
) -> None:
    """Register the backend under ``name`` (done once on import with the defaults).

    ``cluster`` / ``connect_kwargs`` become the defaults of every ``parallel_backend(name)``;
    arguments given to ``parallel_backend`` itself win.
    """

    if cluster is None and not connect_kwargs and name == "remap":
        backend: type[RemapBackend] = RemapBackend
    else:  # a subclass carrying these defaults: joblib keeps backend classes, not factories
        backend = type(
            f"RemapBackend_{name}",
            (RemapBackend,),
            {"_defaults": {"cluster": cluster, **connect_kwargs}},
        )
    joblib.register_parallel_backend(name, backend, make_default=make_default)


register()
