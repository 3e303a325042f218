"""Run a vertex job on a cluster handle: the one entry the console and the Python API share."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from .driver import Driver, VertexConfig, VertexResult, new_job_dir
from .launch import ClusterLaunch
from .program import Program
from .reference import SuperstepReport

DEFAULT_DATA_DIR = "~/.remap/data"
STOP_GRACE = 30.0  # seconds the worker calls get to return after the stop command

log = Logger()


def data_dir_for(cluster: Any, data_dir: str | os.PathLike[str] | None) -> Path:
    """The data directory: the argument, the cluster's setting, or ``~/.remap/data``."""
    value = data_dir or getattr(cluster.settings, "data_dir", None) or DEFAULT_DATA_DIR
    return Path(os.path.expanduser(os.fspath(value))).resolve()


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
    root = new_job_dir(data_dir_for(cluster, data_dir), config.name)
    launches: list[ClusterLaunch] = []

    def start(args: list[Any]) -> ClusterLaunch:
        launches.append(ClusterLaunch(cluster, args, f"vertex:{config.name}"))
        return launches[0]

    count = workers_for(cluster, config, workers)
    driver = Driver(program, config, root, count, start, on_report=on_report)
    result = driver.run()
    if launches and not launches[0].wait(STOP_GRACE):
        log.warn("vertex workers did not return after the stop command; killing them")
        launches[0].kill()
    return result
