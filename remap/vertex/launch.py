"""Ways to start a vertex job's worker calls: on the cluster (a gang function job) or in threads.

The driver only needs ``events()`` and ``kill()`` from what it starts, so the whole file
protocol (commands, acks, messages, checkpoints, rollback) is testable in one process.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from .worker import WorkerArgs, run_worker


class ThreadLaunch:
    """Each worker in a thread of this process (tests, and a quick look without a cluster)."""

    def __init__(self, args: list[WorkerArgs]) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.results: list[Any] = []
        self.threads = [
            threading.Thread(
                target=self._run, args=(a,), name=f"vertex-worker-{a.slot}", daemon=True
            )
            for a in args
        ]
        for t in self.threads:
            t.start()

    def _run(self, args: WorkerArgs) -> None:
        try:
            self.results.append(run_worker(args))
        except Exception as exc:  # reported to the driver like a remote error
            self._events.put(("error", f"{type(exc).__name__}: {exc}"))

    def events(self) -> list[tuple[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def kill(self) -> None:
        """Threads cannot be killed: the stop command (or a missing driver) ends them."""

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


class ClusterLaunch:
    """The workers as one gang function job on a cluster handle (``remap.Cluster``)."""

    def __init__(self, cluster: Any, args: list[WorkerArgs], name: str) -> None:
        from ..api import JobStream, dumps_argument
        from ..client import JobParams
        from ..shipping import function_blob

        params = JobParams(
            name=name,
            mode="stream",
            group=cluster.group,
            retries=cluster.retries,
            timeout=None,  # a worker runs for the whole job
            on_error="continue",  # an error reaches the driver, which stops the job
            priority=cluster.priority,
            gang=True,
        )
        self.stream = JobStream(cluster, function_blob(run_worker), params, total_hint=len(args))
        self.stream.put_many([dumps_argument(a, "a vertex worker's argument") for a in args])
        self.stream.close_input()
        self.ended = threading.Event()
        self.end_error: BaseException | None = None

    def events(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        while True:
            try:
                event = self.stream.events.get_nowait()
            except queue.Empty:
                return out
            if event[0] == "items":
                out += [
                    ("error", f"{error.type_name}: {error.message}")
                    for _, _, error in event[2]
                    if error is not None
                ]
            elif event[0] == "end":
                self.ended.set()
                self.end_error = event[2]
                out.append(("end", event[2]))

    def wait(self, timeout: float) -> bool:
        """Wait for every worker call to return (after the stop command)."""
        self.events()
        return self.stream.finished.wait(timeout)

    def kill(self) -> None:
        self.stream.kill()
