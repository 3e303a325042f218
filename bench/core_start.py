"""How long N cores take from nothing to all running a call, through the public API.

    python bench/core_start.py [--cores 8,64,400] [--systems remap,mp.Pool] [--rounds 1]

Each (system, N) runs in a fresh child process. ``remap``: ``remap.connect(cores=N)`` (the
embedded cluster: a server, a node and N core processes) and one ``starmap`` of N calls with
``chunksize=1``, each call waiting until N distinct cores have arrived at a file barrier (so
the map returns only once all N cores were up at the same time), then ``close()``. ``mp.Pool``
(the peer): a spawn-context ``multiprocessing.Pool`` of N workers whose initializer waits at a
barrier, then ``terminate()``. Printed per run: wall seconds from the start to all N running,
and the CPU seconds (user + system) a core or worker had used when it arrived, on average: what
starting one costs (for remap: its start, the job's load and the call), whatever else the
machine runs; and the CPU seconds of the bench process itself until then (remap: importing
remap, the embedded server and node, spawning the cores; mp.Pool: spawning the workers).
Run it as users run remap, with bytecode caches (``__pycache__``) written: with
``PYTHONDONTWRITEBYTECODE=1`` and none written, every core compiles its modules afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD_TIMEOUT = 2400.0


def arrive(directory: str, n: int, deadline: float) -> int:
    """Mark this process at the barrier with the CPU it has used so far (its start), and wait
    until ``n`` processes have."""
    Path(directory, str(os.getpid())).write_text(str(time.process_time()))
    while len(os.listdir(directory)) < n:
        if time.time() > deadline:
            raise TimeoutError(f"{len(os.listdir(directory))} of {n} cores arrived")
        time.sleep(0.05)
    return os.getpid()


def one(system: str, size: int) -> dict[str, Any]:
    barrier = tempfile.mkdtemp(prefix="remap-core-start-")
    deadline = time.time() + CHILD_TIMEOUT
    t0, cpu0 = time.perf_counter(), time.process_time()
    if system == "remap":
        import remap

        cluster = remap.connect(cores=size, env_file=None)
        pids = cluster.starmap(arrive, [(barrier, size, deadline)] * size, chunksize=1)
        started, parent = time.perf_counter() - t0, time.process_time() - cpu0
        cluster.close()
    else:
        import functools
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(size, initializer=functools.partial(arrive, barrier, size, deadline))
        while len(os.listdir(barrier)) < size:
            time.sleep(0.01)
        started, parent = time.perf_counter() - t0, time.process_time() - cpu0
        pool.terminate()
        pool.join()
        pids = os.listdir(barrier)
    assert len(set(pids)) == size, f"{len(set(pids))} distinct processes of {size}"
    cpu = sum(float(Path(barrier, name).read_text()) for name in os.listdir(barrier))
    shutil.rmtree(barrier)
    return {
        "system": system,
        "cores": size,
        "start_s": started,
        "cpu_per_core_s": cpu / size,
        "parent_cpu_s": parent,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", default="8,64,400", help="core counts, comma-separated")
    p.add_argument("--systems", default="remap,mp.Pool", help="of remap, mp.Pool")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # SYSTEM:N, in the child
    args = p.parse_args()
    if args.one:
        system, size = args.one.split(":")
        print(json.dumps(one(system, int(size))), flush=True)
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env["PYTHONPATH"] = str(ROOT)
    print(
        f"{'system':8} {'cores':>5} {'start s':>8} {'CPU s/core':>10} {'parent CPU s':>12}"
        "  load average",
        flush=True,
    )
    for _ in range(args.rounds):
        for system in args.systems.split(","):
            for size in map(int, args.cores.split(",")):
                done = subprocess.run(
                    [sys.executable, __file__, "--one", f"{system}:{size}"],
                    capture_output=True,
                    text=True,
                    timeout=CHILD_TIMEOUT,
                    env=env,
                )
                if done.returncode != 0:
                    print(f"{system} {size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                row = json.loads(done.stdout.strip().splitlines()[-1])
                load = " ".join(f"{x:.1f}" for x in os.getloadavg())
                print(
                    f"{system:8} {size:5} {row['start_s']:8.2f} {row['cpu_per_core_s']:10.3f}"
                    f" {row['parent_cpu_s']:12.2f}  {load}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
