"""CPU per call of lazy inputs (a generator, no length) beside the same calls from a list.

    python bench/lazy_cpu.py [N]

On an embedded cluster with 2 cores (console, server and node in this process; cores are child
processes), the process's CPU (``time.process_time``) and wall time per call of ``Cluster.map``
over a list and over a generator (``x + 1``), ``Cluster.reduce`` over a generator (the Python
API's feeder) and a ``JobStream`` fed by ``read_into`` (the console's reader thread, as
``args_path`` is read), each twice. CPU per call is what other load on the machine moves least.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import remap  # noqa: E402
from bench import workloads as w  # noqa: E402
from bench.systems import RemapSystem  # noqa: E402


def timed(name: str, n: int, run: Callable[[], Any], expected: Any = None) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    got = run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert expected is None or got == expected, f"{name}: {got} != {expected}"
    print(f"{name:30} {n / wall / 1e3:8,.0f}k calls/s  {cpu / n * 1e6:5.2f} µs CPU/call")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    expected = w.lazy_expected(n)
    with remap.connect(cores=2, env_file=None, task_output=False) as cluster:
        cluster.map(w.inc, range(1000))
        for _ in range(2):
            timed("map(list)", n, lambda: cluster.map(w.inc, list(range(n))))
            timed("map(generator)", n, lambda: cluster.map(w.inc, (x for x in range(n))))
            timed(
                "reduce(generator)",
                n,
                lambda: cluster.reduce(w.double, w.lazy_arguments(n), w.add),
                expected,
            )
    system = RemapSystem("embedded", Path(tempfile.mkdtemp()))
    system.start()
    try:
        system.map_reduce(w.double, w.add, w.lazy_arguments(1000), 1000)
        for _ in range(2):
            timed(
                "read_into(generator), reduce",
                n,
                lambda: system.map_reduce(w.double, w.add, w.lazy_arguments(n), 1000),
                expected,
            )
    finally:
        system.close()


if __name__ == "__main__":
    main()
