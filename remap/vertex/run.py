"""Run a vertex job on a cluster handle: the one entry the console and the Python API share."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from ..data.layout import DataDir
from .driver import Driver, VertexConfig, VertexResult
from .launch import ClusterLaunch
from .program import Program
from .reference import SuperstepReport

STOP_GRACE = 30.0  # seconds the worker calls get to return after the stop command

log = Logger()


class ClientHandle:
    """What a vertex job needs of ``remap.Cluster``, over the console's own client.

    :class:`~remap.api.JobStream` drives a job through ``_client``, ``_call_soon``,
    ``_track`` and ``task_output``; the driver asks for ``nodes()`` and the job options.
    """

    task_output = False  # a worker's prints are not forwarded to the console

    def __init__(
        self,
        client: Any,
        settings: Any,
        *,
        group: str | None = None,
        retries: int = 3,
        priority: int = 0,
    ) -> None:
        from .. import runtime

        self._runtime = runtime
        self._client = client
        self.settings = settings
        self.group = group
        self.retries = retries
        self.priority = priority

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._runtime.reactor().callFromThread(fn, *args)

    def _track(self, stream: Any) -> None:
        """The console ends with its job; nothing to close later."""

    def nodes(self) -> list[dict[str, Any]]:
        return self._runtime.run(self._client.status, timeout=30)["nodes"]


def workers_for(cluster: Any, config: VertexConfig, workers: int | None) -> int:
    """One worker per core that may run the job, at most one per partition."""
    if workers is None:
        nodes = cluster.nodes()
        if cluster.group is not None:
            nodes = [n for n in nodes if n.get("group") == cluster.group]
        workers = sum(int(n.get("cores", 0)) for n in nodes if not n.get("draining"))
    if config.partitions:
        workers = min(workers, config.partitions)
    return max(1, workers)


def run_vertex(
    cluster: Any,
    program: Program,
    config: VertexConfig,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    on_report: Callable[[SuperstepReport], None] | None = None,
) -> VertexResult:
    """Run one vertex job to the end on ``cluster``; raises JobFailed / ConfigError."""
    data = DataDir.from_setting(data_dir or cluster.settings.data_dir)
    launches: list[ClusterLaunch] = []

    def start(args: list[Any]) -> ClusterLaunch:
        launches.append(ClusterLaunch(cluster, args, f"vertex:{config.name}"))
        return launches[0]

    count = workers_for(cluster, config, workers)
    driver = Driver(program, config, data, count, start, on_report=on_report)
    result = driver.run()
    if launches and not launches[0].wait(STOP_GRACE):
        log.warn("vertex workers did not return after the stop command; killing them")
        launches[0].kill()
    return result
