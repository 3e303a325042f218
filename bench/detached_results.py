"""Bytes of a detached job's results the server holds in memory, and an attach of them all.

A detached job of ``--count`` 40 KiB results whose submitter left, on the in-memory cluster of
the tests (the real server factory, scheduler and journal, protocol bytes over iosim pumps, one
fake clock), with the journal and without it (``REMAP_JOURNAL=off``, a 64 MiB budget). ``peak``
is the most result bytes the scheduler held (``kept_peak``; before the bound: the sum of the
job's ``stored`` messages, sampled); ``attach`` checks every result arrives once, in order.

    python bench/detached_results.py                      # 5,000 results: 195 MiB
    BENCH_ROOT=/path/to/main python bench/detached_results.py   # the same, before
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

#: the checkout measured (BENCH_ROOT: another one, e.g. main's, for a before/after)
ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from remap.sinks import ObjectSink  # noqa: E402
from tests.test_inmemory import attach, blob, job_run, outcome, submit  # noqa: E402
from tests.test_resume import RestartableCluster, wait_until  # noqa: E402


def held(sched: object) -> int:
    """Result bytes the server holds in memory now."""
    if hasattr(sched, "kept_bytes"):
        return sched.kept_bytes
    return sum(len(r.payload) for j in sched.jobs.values() for r in j.stored)


def cell(count: int, journal: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RestartableCluster(Path(tmp) / "journal.sqlite" if journal else None)
        sched = cluster.scheduler
        if not journal and hasattr(sched, "results_memory"):
            sched.results_memory = 64 << 20
        cluster.node("node-a", cores=2)
        first, pump = cluster.console("first")
        run = job_run(blob, range(count), detach=True)
        submit(first, run)
        cluster.settle()
        job = run.job_id
        pump.client.transport.loseConnection()
        cluster.settle()
        cluster.pumps.remove(pump)
        peak = 0
        for _ in range(100_000):
            cluster.tick(0.05, cluster.pumps, step=0.05)
            peak = max(peak, held(sched), getattr(sched, "kept_peak", 0))
            state = sched.jobs[job]
            if state.finished or getattr(state, "full", ""):
                break
        state = sched.jobs[job]
        what = "journal" if journal else "no journal, 64 MiB budget"
        print(
            f"{what}: {count * 40 / 1024:.0f} MiB of results; job {state.state}, "
            f"{state.done} done; peak held {peak / 2**20:.1f} MiB, after {held(sched) / 2**20:.1f}"
            f" MiB; status: {state.describe(0).waiting[:70] or '-'}"
        )
        if not state.finished:
            return
        second, _ = cluster.console("second")
        again = attach(second, job, job_run(blob, [], ObjectSink()))
        started = time.monotonic()
        wait_until(cluster, lambda: again.called, 600)
        ok = outcome(again).state == "done"
        ok = ok and again.sink.value() == [blob(i) for i in range(count)]
        print(
            f"  attach: every result once, in order: {ok} ({time.monotonic() - started:.1f} s); "
            f"held after it {held(sched) / 2**20:.1f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    for journal in (True, False):
        cell(args.count, journal)


if __name__ == "__main__":
    main()
