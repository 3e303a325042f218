"""CPU per call of remap's public API beside ``multiprocessing.Pool(2)``, per process, load-independent.

    python bench/cpu_per_call.py [--paths embedded,procs,pool] [--only 10000,200000,mib,submit]

For maps of 10^4 and 2·10^5 calls of ``x + 1``, a map of 1 MiB in + 1 MiB out per call and
``submit(f, x).result()`` one call at a time: CPU (psutil user + system) per call of each
process on the path, plus wall time per call. ``embedded`` is ``remap.connect(cores=2)``: the
caller's process holds console, server and node (its reactor thread); ``procs`` is
``remap.connect(address)`` to a ``remap_server.py`` process with one ``remap_node.py --cores 2``
process (the bench's ``api-procs``): console, server, node and cores are measured apart.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import workloads as w  # noqa: E402
from bench.systems import RemapApiSystem, children_of  # noqa: E402

MIB_CALLS = 64
#: map sizes and how many times each runs
SIZES = ((10_000, 40), (200_000, 6))


def inc(x: int) -> int:
    return x + 1


def _cpu(pid: int) -> float:
    try:
        return sum(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return 0.0


class Meter:
    """CPU seconds of each role's processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, roles: Callable[[], dict[str, list[int]]]) -> None:
        self.roles = roles
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {role: sum(map(_cpu, pids)) for role, pids in self.roles().items()}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        return {role: end[role] - self._start.get(role, 0.0) for role in end}


def _line(label: str, used: dict[str, float], n: int, wall: float, unit: float, name: str) -> str:
    parts = [f"{role} {cpu / n * unit:.2f}" for role, cpu in used.items()]
    total = sum(used.values()) / n * unit
    return f"{label}: {' + '.join(parts)} = {total:.2f} {name}/call (wall {wall / n * unit:.2f})"


def remap_figures(path: str, only: set[str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cpu-per-call-"))
    system = RemapApiSystem(path, workdir)
    system.start()
    me = psutil.Process()
    try:
        if path == "embedded":

            def roles() -> dict[str, list[int]]:
                return {"caller": [me.pid], "cores": children_of(me.pid)}
        else:
            node = system.procs["node"].pid
            server = system.procs["server"].pid

            def roles() -> dict[str, list[int]]:
                return {
                    "console": [me.pid],
                    "server": [server],
                    "node": [node],
                    "cores": children_of(node),
                }

        c = system.api
        _figures(path, Meter(roles), c.map, lambda i: c.submit(inc, i).result(), only, warm=50)
    finally:
        system.close()


def pool_figures(only: set[str]) -> None:
    me = psutil.Process()
    meter = Meter(lambda: {"tree": [me.pid, *children_of(me.pid)]})
    with mp.Pool(2) as pool:
        _figures("Pool", meter, pool.map, lambda i: pool.apply(inc, (i,)), only, call_name="apply")


def _figures(
    label: str,
    meter: Meter,
    map_fn: Callable[..., list],
    call: Callable[[int], object],
    only: set[str],
    *,
    warm: int = 0,
    call_name: str = "",
) -> None:
    """The same measurements for every system: maps of SIZES, 1 MiB calls, single calls."""
    for size, reps in SIZES:
        if str(size) not in only:
            continue
        xs = list(range(size))
        map_fn(inc, xs)
        meter.start()
        t = time.perf_counter()
        for _ in range(reps):
            map_fn(inc, xs)
        wall = time.perf_counter() - t
        print(_line(f"{label} map of {size}", meter.stop(), size * reps, wall, 1e6, "µs"))
    if "mib" in only:
        args = w.mib_arguments(MIB_CALLS)
        map_fn(w.reverse_bytes, args[:4])
        meter.start()
        t = time.perf_counter()
        for _ in range(2):
            got = map_fn(w.reverse_bytes, args)
        wall = time.perf_counter() - t
        assert got[0] == args[0][::-1]
        del got
        print(_line(f"{label} 1 MiB in+out", meter.stop(), MIB_CALLS * 2, wall, 1e3, "ms"))
    if "submit" in only:
        for _ in range(warm):
            call(1)
        meter.start()
        times = []
        for i in range(2000):
            t = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t)
        print(
            _line(
                f"{label} {call_name or 'submit().result()'}",
                meter.stop(),
                2000,
                sum(times),
                1e6,
                "µs",
            )
            + f", p50 {statistics.median(times) * 1e6:.0f} µs"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="embedded,procs,pool")
    parser.add_argument("--only", default="10000,200000,mib,submit")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    def load() -> str:
        return " ".join(f"{x:.2f}" for x in psutil.getloadavg())

    print("load average", load())
    for path in args.paths.split(","):
        if path == "pool":
            pool_figures(only)
        else:
            remap_figures(path, only)
    print("load average", load())


if __name__ == "__main__":
    main()
