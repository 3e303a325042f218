"""CPU per call of ``remap.connect(cores=2)`` beside ``multiprocessing.Pool(2)``, load-independent.

    python bench/cpu_per_call.py

For maps of 10^4 and 2·10^5 calls of ``x + 1`` and for ``submit(f, x).result()`` one call at a
time: CPU of the calling process (calling thread and reactor thread: server, node and console
work of the embedded cluster) and of the cores (psutil), per call, plus wall time per call.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import psutil

import remap


def inc(x: int) -> int:
    return x + 1


def _own_and_children(me: psutil.Process) -> tuple[float, float]:
    own = sum(me.cpu_times()[:2])
    kids = 0.0
    for p in me.children(recursive=True):
        try:
            kids += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return own, kids


def remap_figures() -> None:
    me = psutil.Process()
    with remap.connect(cores=2) as c:
        for size, reps in ((10_000, 40), (200_000, 6)):
            xs = list(range(size))
            c.map(inc, xs)
            o0, k0 = _own_and_children(me)
            w = time.perf_counter()
            for _ in range(reps):
                c.map(inc, xs)
            wall = time.perf_counter() - w
            o1, k1 = _own_and_children(me)
            n = size * reps
            print(
                f"remap map of {size}: caller process {(o1 - o0) / n * 1e6:.2f} µs/call, "
                f"cores {(k1 - k0) / n * 1e6:.2f} µs/call, wall {wall / n * 1e6:.2f} µs/call"
            )
        for _ in range(50):
            c.submit(inc, 1).result()
        o0, k0 = _own_and_children(me)
        times = []
        for i in range(2000):
            t = time.perf_counter()
            c.submit(inc, i).result()
            times.append(time.perf_counter() - t)
        o1, k1 = _own_and_children(me)
        print(
            f"remap submit().result(): caller process {(o1 - o0) / 2000 * 1e6:.0f} µs/call, "
            f"cores {(k1 - k0) / 2000 * 1e6:.0f} µs/call, p50 {statistics.median(times) * 1e6:.0f} µs"
        )


def pool_figures() -> None:
    me = psutil.Process()
    with mp.Pool(2) as pool:
        for size, reps in ((10_000, 40), (200_000, 6)):
            xs = list(range(size))
            pool.map(inc, xs)
            c0 = sum(_own_and_children(me))
            w = time.perf_counter()
            for _ in range(reps):
                pool.map(inc, xs)
            wall = time.perf_counter() - w
            n = size * reps
            cpu = (sum(_own_and_children(me)) - c0) / n * 1e6
            print(f"Pool map of {size}: tree {cpu:.2f} µs/call, wall {wall / n * 1e6:.2f} µs/call")
        c0 = sum(_own_and_children(me))
        times = []
        for i in range(2000):
            t = time.perf_counter()
            pool.apply(inc, (i,))
            times.append(time.perf_counter() - t)
        cpu = (sum(_own_and_children(me)) - c0) / 2000 * 1e6
        print(f"Pool apply: tree {cpu:.0f} µs/call, p50 {statistics.median(times) * 1e6:.0f} µs")


if __name__ == "__main__":
    print("load average", " ".join(f"{x:.2f}" for x in psutil.getloadavg()))
    remap_figures()
    pool_figures()
    print("load average", " ".join(f"{x:.2f}" for x in psutil.getloadavg()))
