"""remap: use every core on your network from Python.

    import remap

    with remap.connect() as cluster:          # no server configured: an embedded local cluster
        squares = cluster.map(square, range(1000))

    with remap.Executor() as ex:              # concurrent.futures
        future = ex.submit(square, 7)

    with remap.Pool() as pool:                # multiprocessing.Pool
        squares = pool.map(square, range(1000))

    import remap.joblib                       # joblib: parallel_backend("remap")

Names are imported on first use: node cores import this package too and must stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: the package version (pyproject.toml reads it from here)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Cluster, PicklingError, RemoteTraceback, connect, ship_by_value
    from .bundle import job_dir, job_file
    from .errors import (
        ConfigError,
        ConnectionLost,
        JobFailed,
        JobKilled,
        RemapError,
        RemoteTaskError,
        ServerUnreachable,
    )
    from .executor import Executor, RemoteFuture
    from .pool import AsyncResult, Pool

_LAZY: dict[str, str] = {
    "connect": "api",
    "Cluster": "api",
    "PicklingError": "api",
    "RemoteTraceback": "api",
    "ship_by_value": "api",
    "Executor": "executor",
    "RemoteFuture": "executor",
    "Pool": "pool",
    "AsyncResult": "pool",
    "RemapError": "errors",
    "RemoteTaskError": "errors",
    "ConfigError": "errors",
    "ConnectionLost": "errors",
    "ServerUnreachable": "errors",
    "JobFailed": "errors",
    "JobKilled": "errors",
    "job_dir": "bundle",
    "job_file": "bundle",
}

__all__ = [
    "AsyncResult",
    "Cluster",
    "ConfigError",
    "ConnectionLost",
    "Executor",
    "JobFailed",
    "JobKilled",
    "PicklingError",
    "Pool",
    "RemapError",
    "RemoteFuture",
    "RemoteTaskError",
    "RemoteTraceback",
    "ServerUnreachable",
    "connect",
    "job_dir",
    "job_file",
    "ship_by_value",
]


#: submodules the README names through the package (``remap.errors.JobRefused``,
#: ``remap.settings.Settings``): reachable after a plain ``import remap`` too
_SUBMODULES = frozenset({"errors", "settings"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'remap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
