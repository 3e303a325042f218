"""Run a vertex job on a cluster handle: the one entry the console and the Python API share."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from ..data.layout import DataDir
from .driver import Driver, SuperstepReport, VertexConfig, VertexResult
from .launch import ClusterLaunch
from .program import Program

STOP_GRACE = 30.0  # seconds the worker calls get to return after the stop command

log = Logger()


def workers_for(nodes: list[dict[str, Any]], group: str | None, partitions: int | None) -> int:
    """One worker per core that may run the job, at most one per partition."""
    if group is not None:
        nodes = [n for n in nodes if n.get("group") == group]
    cores = sum(int(n.get("cores", 0)) for n in nodes if not n.get("draining"))
    return max(1, min(cores, partitions) if partitions else cores)


def run_vertex(
    client: Any,
    settings: Any,
    program: Program,
    config: VertexConfig,
    *,
    group: str | None = None,
    retries: int = 3,
    priority: int = 0,
    bundle: Any = None,
    data_dir: str | os.PathLike[str] | None = None,
    on_report: Callable[[SuperstepReport], None] | None = None,
    job_id: str | None = None,
    on_launch: Callable[[ClusterLaunch], None] | None = None,
    on_output: Callable[[int, str], None] | None = None,
    wait_for_nodes: float | None = None,
) -> VertexResult:
    """Run one vertex job to the end on a connected ``ClusterClient``; raises JobFailed,
    JobKilled or ConfigError. Blocks the calling thread (never call it on the reactor's)."""
    from .. import runtime

    data = DataDir.from_setting(data_dir or settings.data_dir)
    workers = workers_for(runtime.run(client.status, timeout=30)["nodes"], group, config.partitions)
    launches: list[ClusterLaunch] = []

    def start(args: list[Any]) -> ClusterLaunch:
        launch = ClusterLaunch(
            client,
            args,
            f"vertex:{config.name}",
            group=group,
            retries=retries,
            priority=priority,
            bundle=bundle,
            on_output=on_output,
            wait_for_nodes=wait_for_nodes,
        )
        launches.append(launch)
        if on_launch is not None:
            on_launch(launch)
        return launch

    driver = Driver(program, config, data, workers, start, on_report=on_report, job_id=job_id)
    result = driver.run()
    if launches and not launches[0].wait(STOP_GRACE):
        log.warn("vertex workers did not return after the stop command; killing them")
        launches[0].kill()
    return result
