"""Where one ``Cluster.submit(f, x).result()`` spends its time, hop by hop (embedded cluster).

    python bench/call_hops.py [CALLS]

Wraps a few of remap's methods to timestamp each hop (caller → reactor → scheduler → node →
core pipe → the function in the core → back) and prints the median time of each, from the
submit, over CALLS calls (default 300). The function returns its own timestamp (the core and the
caller read the same monotonic clock). A measuring aid: the wrappers themselves cost ~1 µs each.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import remap
from remap import api, client
from remap import executor as ex
from remap.node import cores
from remap.server.scheduler import core as scheduler

MARKS: list[tuple[str, int]] = []


def _mark(label: str) -> None:
    MARKS.append((label, time.perf_counter_ns()))


def _wrap(cls: Any, name: str, label: str) -> None:
    original = getattr(cls, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _mark(label)
        return original(*args, **kwargs)

    setattr(cls, name, wrapped)


def now(_: Any) -> int:
    return time.perf_counter_ns()


def main(calls: int) -> None:
    _wrap(api.JobStream, "_wake", "reactor: the stream woken")
    _wrap(scheduler.Scheduler, "args_received", "server: args")
    _wrap(cores.CoreProcess, "send", "node: written to the core's pipe")
    _wrap(cores.CoreProcess, "childDataReceived", "node: read from the core's pipe")
    _wrap(scheduler.Scheduler, "task_result", "server: result")
    _wrap(client.JobRun, "results", "console: results")
    _wrap(ex._SubmitStream, "_resolve_now", "console: future resolved")
    rows = []
    with remap.connect(cores=2) as c:
        for _ in range(20):
            c.submit(now, 1).result()
        for _ in range(calls):
            MARKS.clear()
            _mark("caller: submit")
            future = c.submit(now, 1)
            _mark("caller: submit returned")
            ran = future.result()
            _mark("caller: woke with the result")
            MARKS.append(("core: the function runs", ran))
            rows.append(sorted(MARKS, key=lambda m: m[1]))
    times: dict[str, list[float]] = {}
    for row in rows:
        start = row[0][1]
        for label, t in row:
            times.setdefault(label, []).append((t - start) / 1000)
    previous = 0.0
    for label in sorted(times, key=lambda k: statistics.median(times[k])):
        median = statistics.median(times[label])
        print(f"{median:8.1f} µs  (+{median - previous:6.1f})  {label}")
        previous = median


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
