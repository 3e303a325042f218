"""How long a node takes to stop N running cores: from ``CorePool.stop()`` to every core reaped.

    python bench/core_stop.py [--cores 50,100,200,400] [--rounds 1] [--kinds node,embedded]

Each (kind, N) runs in a fresh child process: a ``CorePool`` of N real core processes
(``python -m remap.node.core``), each running ``time.sleep(600)`` (a job loaded and one task per
core, as the server sends them), then ``stop()``: every core SIGKILLed, the Deferred fires once
the last one's ``processEnded`` ran. ``node`` is the reactor ``remap-node`` runs (the lean epoll
reactor installed as the global one, Twisted's SIGCHLD waker reaping); ``embedded`` is
``remap.runtime``'s reactor on its thread (what ``remap.connect()`` runs its cores on);
``mp.Pool`` is the peer: ``multiprocessing``'s spawn-context ``Pool`` of N workers (each a fresh
interpreter, as a core is), all started and idle, then ``terminate()`` (SIGTERM, join). Printed
per run: wall seconds from ``stop()`` to all reaped, the ``waitpid`` calls and SIGCHLD reap
passes in that time (their growth with N shows whether reaping is quadratic), and the start-up
seconds (outside the timed region).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: a bound on one child (400 cores took over 15 minutes to start at a load of 20 on 2 CPUs)
CHILD_TIMEOUT = 2400.0


def _count_calls(module: Any, name: str, counter: dict[str, int], key: str) -> None:
    """Count calls of ``module.name`` (looked up at call time by its callers) in ``counter``."""
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[key] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def one(kind: str, size: int) -> dict[str, Any]:
    """Start ``size`` busy cores on a ``kind`` reactor, stop them; the figures as a dict."""
    counts = {"waitpid": 0, "reap_passes": 0}
    _count_calls(os, "waitpid", counts, "waitpid")
    if kind == "mp.Pool":
        return _pool_peer(size, counts)

    from twisted.internet import defer
    from twisted.internet import process as twisted_process

    _count_calls(twisted_process, "reapAllProcesses", counts, "reap_passes")

    if kind == "node":
        from remap.entry import install_lean_reactor

        install_lean_reactor()
        from twisted.internet import reactor

        def run(fn: Any) -> Any:
            out: list[Any] = []

            async def main() -> None:
                try:
                    out.append(await fn(reactor))
                finally:
                    reactor.stop()

            reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(main()))
            reactor.run()  # with signal handlers: SIGCHLD reaps, as in remap-node
            return out[0]
    else:
        from remap import runtime

        r = runtime.reactor()
        # the runtime reaps its own children (``_OwnChildren``), on SIGCHLD and every 0.25 s
        _count_calls(r.remap_children, "reap", counts, "reap_passes")
        runtime.ensure_running()

        def run(fn: Any) -> Any:
            return runtime.run(lambda: defer.Deferred.fromCoroutine(fn(r)), timeout=CHILD_TIMEOUT)

    async def measure(reactor: Any) -> dict[str, Any]:
        import pickle

        from protocol import messages as m
        from remap.node.cores import CoreLife, CorePool
        from remap.shipping import function_blob

        ready: defer.Deferred = defer.Deferred()
        pool = CorePool(reactor, size, lambda r: None, lambda f: None)
        original = pool._core_message

        def heard(core: Any, msg: Any, frame: Any = None) -> None:
            original(core, msg, frame)
            if not ready.called and all(c.life is CoreLife.BUSY for c in pool.cores):
                if len(pool.cores) == size:
                    ready.callback(None)

        pool._core_message = heard  # type: ignore[method-assign]
        t0 = time.perf_counter()
        pool.start()
        pool.load_job(
            m.JobLoad(
                job=1, star=False, timeout=None, reduce=False, payload=function_blob(time.sleep)
            )
        )
        arg = pickle.dumps(600)
        for task in range(size):
            pool.submit(m.Task(task=task, job=1, sizes=[len(arg)], payload=arg))
        await ready
        started = time.perf_counter() - t0
        counts["waitpid"] = counts["reap_passes"] = 0
        t1, cpu = time.perf_counter(), time.process_time()
        stopped = pool.stop()
        killed = time.perf_counter() - t1
        await stopped
        return {
            "kind": kind,
            "cores": size,
            "start_s": round(started, 2),
            "kill_s": round(killed, 4),
            "stop_s": round(time.perf_counter() - t1, 4),
            "cpu_s": round(time.process_time() - cpu, 4),
            **counts,
        }

    return run(measure)


def _pool_peer(size: int, counts: dict[str, int]) -> dict[str, Any]:
    """The peer: a spawn-context ``multiprocessing.Pool`` of ``size`` workers, terminated."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    everyone = ctx.Barrier(size + 1)  # every worker has started and run its initializer
    t0 = time.perf_counter()
    pool = ctx.Pool(size, initializer=everyone.wait)
    everyone.wait(timeout=CHILD_TIMEOUT)
    started = time.perf_counter() - t0
    counts["waitpid"] = counts["reap_passes"] = 0
    t1, cpu = time.perf_counter(), time.process_time()
    pool.terminate()
    return {
        "kind": "mp.Pool",
        "cores": size,
        "start_s": round(started, 2),
        "stop_s": round(time.perf_counter() - t1, 4),
        "cpu_s": round(time.process_time() - cpu, 4),
        **counts,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", default="50,100,200,400", help="core counts, comma-separated")
    p.add_argument("--kinds", default="node,embedded,mp.Pool", help="of node, embedded, mp.Pool")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # KIND:N, in the child
    args = p.parse_args()
    if args.one:
        kind, size = args.one.split(":")
        print(json.dumps(one(kind, int(size))), flush=True)
        return 0
    rows = []
    print(
        f"{'kind':9} {'cores':>5} {'stop s':>8} {'ms/core':>7} {'CPU s':>7} {'waitpid':>8} "
        f"{'reap passes':>11} {'start s':>8}"
    )
    for _ in range(args.rounds):
        for kind in args.kinds.split(","):
            for size in map(int, args.cores.split(",")):
                done = subprocess.run(
                    [sys.executable, __file__, "--one", f"{kind}:{size}"],
                    capture_output=True,
                    text=True,
                    timeout=CHILD_TIMEOUT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                if done.returncode != 0:
                    print(f"{kind} {size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{kind:9} {size:5} {row['stop_s']:8.3f} {1000 * row['stop_s'] / size:7.2f} "
                    f"{row['cpu_s']:7.3f} {row['waitpid']:8} "
                    f"{row['reap_passes']:11} {row['start_s']:8.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
