"""One adapter per system under test, all with the same four operations.

``map_list(fn, args, n)`` returns results in argument order; ``map_reduce(fn, reduce_fn,
args, chunksize)`` folds results in any order; ``call(fn, arg)`` is one round trip;
``pids()`` names the processes whose memory the lazy workload reports. Setup (starting
workers, a warm-up call) happens in ``start()`` and is never inside a timed region.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench import workloads as w

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A wrong result or a system that would not run: the bench fails loudly."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]
    except Exception:  # the process is gone
        return []


class System:
    name = "?"
    workers = 2

    def start(self) -> None: ...
    def close(self) -> None: ...

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        raise NotImplementedError

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        raise NotImplementedError

    def call(self, fn: Callable, arg: Any) -> Any:
        raise NotImplementedError

    def map_async_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        """One ``Pool.map_async`` per list, all issued before any result is taken."""
        raise NotImplementedError

    def map_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        """One synchronous ``Pool.map`` per list, each waited for before the next."""
        raise NotImplementedError

    def apply_async_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        """One ``Pool.apply_async`` per argument, all issued before any result is taken."""
        raise NotImplementedError

    def submit_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        """One ``Executor.submit`` per argument, all issued before any result is taken."""
        raise NotImplementedError

    def pids(self) -> dict[str, list[int]]:
        return {"driver": [os.getpid()], "workers": children_of(os.getpid())}

    def warm(self) -> None:
        got = self.map_list(w.inc, list(range(64)), 64)
        if got != [x + 1 for x in range(64)]:
            raise BenchError(f"{self.name}: warm-up returned a wrong result")


# ====================================================================== remap


class RemapSystem(System):
    """remap driven through its lower layers, the way the console does it.

    ``embedded``: EmbeddedCluster (server and node in this process's reactor thread, cores
    as child processes). ``procs``: ``remap_server.py`` and ``remap_node.py`` as separate
    processes, the console client in this process.
    """

    def __init__(self, kind: str, workdir: Path, workers: int = 2, journal: bool = True) -> None:
        self.kind = kind
        self.name = f"remap-{kind}" + ("" if journal else "-nojournal")
        self.journal = journal
        self.workdir = workdir
        self.workers = workers
        self.cluster: Any = None
        self.client: Any = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""
        self.secret = secrets.token_urlsafe(32)
        self._blobs: dict[tuple[Any, Any], bytes] = {}
        #: the checkout whose server and node processes run (another one: a before/after)
        self.root = ROOT

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from remap import runtime
        from remap.cluster import EmbeddedCluster
        from remap.dial import connect_console
        from remap.settings import load_settings

        self.runtime = runtime
        settings = load_settings({}, environ={}, dotenv_path=None)
        reactor = runtime.ensure_running()
        if self.kind == "embedded":
            self.cluster = EmbeddedCluster(reactor, settings, cores=self.workers)
            self.address = runtime.run(self.cluster.start, timeout=30)
            self.client = runtime.run(self.cluster.connect, timeout=30)
        else:
            self.address = self._spawn_processes()
            self.client = runtime.run(
                connect_console,
                reactor,
                settings,
                self.address,
                secret=self.secret.encode(),
                timeout=30,
            )
        wait_for(self._node_ready, 30, f"{self.name}: a node with {self.workers} cores")
        self.warm()

    def _env(self) -> dict[str, str]:
        env = w.env_for_children()
        env["HOME"] = str(self.workdir)
        env["REMAP_SECRET_KEY"] = self.secret
        if not self.journal:  # the server's journal is on unless told (bench: its cost)
            env["REMAP_JOURNAL"] = "off"
        return env

    def _spawn_processes(self, node: bool = True) -> str:
        port_file = self.workdir / f"port-{os.getpid()}-{time.monotonic_ns()}"
        env = self._env()
        log = open(self.workdir / "server.log", "ab")
        self.procs["server"] = subprocess.Popen(
            [
                sys.executable,
                str(self.root / "remap_server.py"),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--env-file",
                "/dev/null",
                "--log-level",
                "warn",
            ],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=log,
        )

        def port() -> int | None:
            if self.procs["server"].poll() is not None:
                raise BenchError(
                    f"server exited with {self.procs['server'].returncode}; see {log.name}"
                )
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text else None

        address = f"127.0.0.1:{wait_for(port, 30, 'the server port file')}"
        if node:
            nlog = open(self.workdir / "node.log", "ab")
            self.procs["node"] = subprocess.Popen(
                [
                    sys.executable,
                    str(self.root / "remap_node.py"),
                    "--server",
                    address,
                    "--cores",
                    str(self.workers),
                    "--env-file",
                    "/dev/null",
                    "--log-level",
                    "warn",
                ],
                cwd=self.workdir,
                env=env,
                stdout=nlog,
                stderr=nlog,
            )
        return address

    def status(self) -> dict[str, Any]:
        return self.runtime.run(self.client.status, timeout=30)

    def _node_ready(self) -> bool:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{self.name}: the {role} process exited with {proc.returncode}")
        nodes = self.status()["nodes"]
        return len(nodes) == 1 and nodes[0]["cores"] == self.workers

    def close(self) -> None:
        runtime = getattr(self, "runtime", None)
        try:
            if runtime is not None and self.client is not None and self.client.link is not None:
                runtime.run(self.client.link.close, timeout=5)
            if runtime is not None and self.cluster is not None:
                runtime.run(self.cluster.stop, timeout=15)
        except Exception as exc:  # still stop the processes below
            print(f"warning: {self.name} close: {exc}", file=sys.stderr)
        finally:
            stop_processes(self.procs)

    def pids(self) -> dict[str, list[int]]:
        if self.kind == "embedded":
            return {"console+server+node": [os.getpid()], "cores": children_of(os.getpid())}
        node = self.procs["node"].pid
        return {
            "console": [os.getpid()],
            "server": [self.procs["server"].pid],
            "node": [node],
            "cores": children_of(node),
        }

    def server_pid(self) -> int:
        return self.procs["server"].pid if "server" in self.procs else os.getpid()

    # ------------------------------------------------------------ jobs

    def _blob(self, fn: Callable, reduce_fn: Callable | None) -> bytes:
        from remap.shipping import function_blob

        key = (fn, reduce_fn)
        if key not in self._blobs:
            self._blobs[key] = function_blob(fn, reduce_fn)
        return self._blobs[key]

    def run_job(
        self,
        fn: Callable,
        args: Iterable[Any],
        mode: str,
        *,
        reduce_fn: Callable | None = None,
        total: int | None = None,
        chunksize: int = 0,
        timeout: float = 3600,
    ) -> Any:
        import time

        from protocol.options import JobOptions
        from remap.blobs import dumps
        from remap.client import JobStream, read_into
        from remap.sinks import make_sink

        sink = make_sink(mode, reduce_fn=reduce_fn if mode == "reduce" else None)
        run = JobStream(
            self._blob(fn, reduce_fn),
            JobOptions(name="bench", mode=mode, chunksize=chunksize or None),
            call_soon=self.runtime.reactor().callFromThread,
            total_hint=total,
            runs=True,
        ).start(self.client)
        if total is None:  # lazy: read on a thread, bounded, as the console reads a file
            read_into(run, iter(args))
        else:  # pickled here, ahead of the window
            run.put_many([dumps(a) for a in args])
            run.close_input()
        outcome = run.collect(sink, until=time.monotonic() + timeout)
        if outcome.state != "done" or outcome.failed:
            raise BenchError(
                f"{self.name}: job ended {outcome.state} with {outcome.failed} failures: "
                f"{outcome.message}"
            )
        return sink.value()

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return self.run_job(fn, args, "object", total=n)

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        # chunksize is a hint for peers that need one; remap sizes its batches itself.
        # A known length is passed on as the console does (the job file's count).
        total = len(args) if hasattr(args, "__len__") else None
        return self.run_job(fn, args, "reduce", reduce_fn=reduce_fn, total=total)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.run_job(fn, (arg,), "object", total=1)[0]


class RemapApiSystem(RemapSystem):
    """remap through its public API, as a user calls it: ``remap.connect()`` (embedded: a
    server and node in this process; ``procs``: the server and node processes of
    :class:`RemapSystem`), ``Cluster.map``, ``Cluster.reduce`` and ``Cluster.submit``."""

    def __init__(self, kind: str, workdir: Path, workers: int = 2, journal: bool = True) -> None:
        super().__init__(kind, workdir, workers, journal)
        self.name = f"api-{kind}" + ("" if journal else "-nojournal")
        self.api: Any = None

    def start(self) -> None:
        import remap
        from remap.settings import load_settings

        settings = load_settings({}, environ={}, dotenv_path=None)
        if self.kind == "embedded":
            self.api = remap.connect(cores=self.workers, settings=settings, task_output=False)
        else:
            self.address = self._spawn_processes()
            self.api = remap.connect(
                self.address, secret=self.secret, settings=settings, task_output=False
            )
        wait_for(self._node_ready, 30, f"{self.name}: a node with {self.workers} cores")
        self.warm()

    def status(self) -> dict[str, Any]:
        return self.api.status()

    def close(self) -> None:
        try:
            if self.api is not None:
                self.api.close()
        except Exception as exc:  # still stop the processes below
            print(f"warning: {self.name} close: {exc}", file=sys.stderr)
        finally:
            stop_processes(self.procs)

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return self.api.map(fn, args)

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        return self.api.reduce(fn, args, reduce_fn)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.api.submit(fn, arg).result()

    def map_async_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        import remap

        with remap.Pool(cluster=self.api) as pool:
            return _map_async_each(pool, fn, lists)

    def map_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        import remap

        with remap.Pool(cluster=self.api) as pool:
            return [pool.map(fn, x) for x in lists]

    def apply_async_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        import remap

        with remap.Pool(cluster=self.api) as pool:
            return _apply_async_each(pool, fn, args)

    def submit_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        import remap

        with remap.Executor(cluster=self.api) as ex:
            return [f.result() for f in [ex.submit(fn, a) for a in args]]


def _map_async_each(pool: Any, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
    return [r.get() for r in [pool.map_async(fn, x) for x in lists]]


def _apply_async_each(pool: Any, fn: Callable, args: list[Any]) -> list[Any]:
    return [r.get() for r in [pool.apply_async(fn, (a,)) for a in args]]


def stop_processes(
    procs: dict[str, subprocess.Popen], order: tuple[str, ...] = ("sim", "node", "server")
) -> None:
    """SIGTERM in order (nodes first, so cores go with them), then SIGKILL what is left."""
    names = [n for n in order if n in procs] + [n for n in procs if n not in order]
    for name in names:
        proc = procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    procs.clear()


# ====================================================================== peers


class PoolSystem(System):
    name = "mp.Pool"

    def start(self) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(self.workers)
        self.warm()

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return self.pool.map(fn, args)

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        return functools.reduce(reduce_fn, self.pool.imap_unordered(fn, args, chunksize=chunksize))

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.pool.apply(fn, (arg,))

    def map_async_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        return _map_async_each(self.pool, fn, lists)

    def map_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        return [self.pool.map(fn, x) for x in lists]

    def apply_async_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        return _apply_async_each(self.pool, fn, args)

    def submit_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        return self.apply_async_each(fn, args)  # (no submit: its nearest, the ratios' base)


class ExecutorSystem(System):
    name = "ProcessPoolExecutor"

    def start(self) -> None:
        self.ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        self.warm()

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return list(self.ex.map(fn, args, chunksize=w.pool_chunksize(n, self.workers)))

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        return functools.reduce(reduce_fn, self.ex.map(fn, args, chunksize=chunksize))

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.ex.submit(fn, arg).result()

    def submit_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        return [f.result() for f in [self.ex.submit(fn, a) for a in args]]


class DaskSystem(System):
    """Dask distributed, 2 worker processes with one thread each; tiny calls travel in chunks."""

    name = "dask"

    def start(self) -> None:
        import warnings

        from dask.distributed import Client, LocalCluster

        # arguments travel inside the task graph, as with any client.map over in-memory data
        warnings.filterwarnings("ignore", message="Sending large graph")
        self.cluster = LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.warm()

    def close(self) -> None:
        self.client.close()
        self.cluster.close()

    def pids(self) -> dict[str, list[int]]:
        info = self.client.scheduler_info()["workers"]
        return {"driver+scheduler": [os.getpid()], "workers": [v["pid"] for v in info.values()]}

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        items = list(args)
        if n <= 256:
            return self.client.gather(self.client.map(fn, items, pure=False))
        parts = self.client.map(
            functools.partial(w.apply_chunk, fn),
            w.chunks(items, w.pool_chunksize(n, self.workers)),
            pure=False,
        )
        return [x for part in self.client.gather(parts) for x in part]

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        from dask.distributed import as_completed

        items = list(args)
        if chunksize > 1:
            futures = self.client.map(
                functools.partial(w.fold_chunk, fn, reduce_fn),
                w.chunks(items, chunksize),
                pure=False,
            )
        else:
            futures = self.client.map(fn, items, pure=False)
        acc: Any = None
        first = True
        for fut in as_completed(futures):
            value = fut.result()
            acc, first = (value, False) if first else (reduce_fn(acc, value), False)
            fut.release()
        return acc

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.client.submit(fn, arg, pure=False).result()


class RaySystem(System):
    """Ray's multiprocessing.Pool replacement on a local Ray instance with 2 CPUs."""

    name = "ray.Pool"

    def start(self) -> None:
        import ray
        from ray.util.multiprocessing import Pool

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=self.workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=False,
        )
        self.ray = ray
        self.pool = Pool(processes=self.workers)
        self.warm()

    def close(self) -> None:
        self.pool.terminate()
        self.ray.shutdown()

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return self.pool.map(fn, list(args))

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        return functools.reduce(reduce_fn, self.pool.imap_unordered(fn, args, chunksize=chunksize))

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.pool.apply(fn, (arg,))

    def map_async_each(self, fn: Callable, lists: list[list[Any]]) -> list[list[Any]]:
        return _map_async_each(self.pool, fn, lists)

    def apply_async_each(self, fn: Callable, args: list[Any]) -> list[Any]:
        return _apply_async_each(self.pool, fn, args)


class EngineSystem(System):
    """remap's console path on an engine of the seam: ``--engine dask://local``, ``ray://local``
    or ``remap://local`` (remap's embedded cluster behind the same seam).

    The job's function blob and argument chunks go through ``remap.engines`` (EngineRun and
    the console's sinks) exactly as ``remap compute --engine`` sends them; only the local
    cluster's start is outside the timed region.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"engine-{kind}"

    def start(self) -> None:
        from remap import engines

        self.engine = engines.open_engine(f"{self.kind}://local", workers=self.workers)
        self.warm()

    def close(self) -> None:
        self.engine.close()

    def run_job(self, fn: Callable, args: Iterable[Any], mode: str, total: int | None,
                reduce_fn: Callable | None = None) -> Any:  # fmt: skip
        from remap.engines import EngineRun
        from remap.shipping import function_blob
        from remap.sinks import make_sink

        sink = make_sink(mode, reduce_fn=reduce_fn)
        run = EngineRun(
            self.engine,
            function_blob(fn, reduce_fn),
            args,
            sink,
            total_hint=total,
            close_engine=False,
        )
        outcome = run.start().result()
        if outcome.failed:
            raise BenchError(f"{self.name}: {outcome.failed} failures")
        return sink.value()

    def map_list(self, fn: Callable, args: Iterable[Any], n: int) -> list[Any]:
        return self.run_job(fn, args, "object", n)

    def map_reduce(
        self, fn: Callable, reduce_fn: Callable, args: Iterable[Any], chunksize: int
    ) -> Any:
        total = len(args) if hasattr(args, "__len__") else None
        return self.run_job(fn, args, "reduce", total, reduce_fn)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.run_job(fn, (arg,), "object", 1)[0]


def available(name: str) -> str:
    """'' when the system can run here, else why not."""
    module = {
        "dask": "distributed",
        "ray.Pool": "ray",
        "engine-dask": "distributed",
        "engine-ray": "ray",
    }.get(name)
    if module is None:
        return ""
    try:
        __import__(module)
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    return ""


def make_system(name: str, workdir: Path, workers: int = 2) -> System:
    if name == "remap-embedded":
        return RemapSystem("embedded", workdir, workers)
    if name == "remap-procs":
        return RemapSystem("procs", workdir, workers)
    if name == "remap-procs-nojournal":
        return RemapSystem("procs", workdir, workers, journal=False)
    if name in ("api-embedded", "api-procs"):
        return RemapApiSystem(name.split("-")[1], workdir, workers)
    if name in ("engine-dask", "engine-ray", "engine-remap"):
        engine = EngineSystem(name.split("-")[1])
        engine.workers = workers
        return engine
    system = {
        "mp.Pool": PoolSystem,
        "ProcessPoolExecutor": ExecutorSystem,
        "dask": DaskSystem,
        "ray.Pool": RaySystem,
    }[name]()
    system.workers = workers
    return system


SYSTEMS = (
    "api-embedded",
    "api-procs",
    "remap-embedded",
    "remap-procs",
    "remap-procs-nojournal",
    "mp.Pool",
    "ProcessPoolExecutor",
    "dask",
    "ray.Pool",
    "engine-dask",
    "engine-ray",
    "engine-remap",
)
