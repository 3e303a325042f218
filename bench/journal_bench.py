"""The server journal's cost: the same jobs on a server with the journal on and off, one run.

    python bench/journal_bench.py [--rounds 3] [--trivial 200000] [--mib 64]

Each round starts ``remap-procs`` (a server process and a node process of 2 cores, the console
client in this process) with ``REMAP_JOURNAL`` on, then off, and runs on each: ``trivial``
(``x + 1`` over N integers) and ``mib`` (64 distinct 1 MiB arguments, each returning a new
1 MiB result), each attached (the console collects the results: the journal records the submit
and the end) and detached (the journal also records every argument, every outcome and every
result message, which is what a restarted server resumes from). Detached results are checked
by attaching afterwards (not timed).

Figures: the server process's CPU µs per task (psutil; what the journal adds is spent there)
and the whole tree's (console, server, node, cores), medians over rounds, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads as w  # noqa: E402
from bench.systems import BenchError, RemapSystem  # noqa: E402


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            times = [proc.cpu_times()]
            for child in proc.children(recursive=True):
                try:
                    times.append(child.cpu_times())
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            continue
        total += sum(t.user + t.system for t in times)
    return total


def _run(system: RemapSystem, fn: Any, args: list[Any], detach: bool) -> Any:
    """One job; returns the outcome (attached: the results; detached: the job id)."""
    from protocol.options import JobOptions
    from remap.client import JobRun
    from remap.sinks import make_sink

    sink = make_sink("object")
    run = JobRun(
        JobOptions(name="journal-bench", detach=detach),
        system._blob(fn, None),
        iter(args),
        sink,
        total_hint=len(args),
    )
    outcome = system.runtime.run(system.client.submit, run, timeout=3600)
    if outcome.state != "done" or outcome.failed:
        raise BenchError(f"job ended {outcome.state}: {outcome.message}")
    return outcome.job if detach else sink.value()


def _attached_results(system: RemapSystem, job: int) -> list[Any]:
    from protocol.options import JobOptions
    from remap.client import JobRun
    from remap.sinks import make_sink

    sink = make_sink("object")
    run = JobRun(JobOptions(), b"", iter(()), sink)
    system.runtime.run(system.client.attach, job, run, timeout=600)
    return sink.value()


def measure(system: RemapSystem, name: str, fn: Any, args: list[Any], expected: list[Any]) -> dict:
    figures = {}
    server = [system.server_pid()]
    tree = [os.getpid(), *server, system.procs["node"].pid]
    for detach in (False, True):
        server0, tree0, wall0 = _cpu(server), _cpu(tree), time.perf_counter()
        got = _run(system, fn, args, detach)
        wall = time.perf_counter() - wall0
        server_cpu, tree_cpu = _cpu(server) - server0, _cpu(tree) - tree0
        if detach:
            got = _attached_results(system, got)
        if got != expected:
            raise BenchError(f"WRONG RESULT: {name} detach={detach}")
        n = len(args)
        figures["detached" if detach else "attached"] = {
            "server_us": server_cpu / n * 1e6,
            "tree_us": tree_cpu / n * 1e6,
            "per_s": n / wall,
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trivial", type=int, default=200_000)
    parser.add_argument("--mib", type=int, default=64)
    opts = parser.parse_args()
    trivial = list(range(opts.trivial))
    mib = w.mib_arguments(opts.mib)
    workloads = [
        ("trivial", w.inc, trivial, [x + 1 for x in trivial]),
        ("mib", w.reverse_bytes, mib, [w.reverse_bytes(b) for b in mib]),
    ]
    results: dict[tuple[str, str, str], list[dict]] = {}
    loads = []
    for _ in range(opts.rounds):
        for journal in (True, False):
            with tempfile.TemporaryDirectory(prefix="journal-bench-") as tmp:
                system = RemapSystem("procs", Path(tmp), journal=journal)
                try:
                    system.start()
                    for name, fn, args, expected in workloads:
                        for mode, fig in measure(system, name, fn, args, expected).items():
                            key = (name, mode, "on" if journal else "off")
                            results.setdefault(key, []).append(fig)
                finally:
                    system.close()
            loads.append(os.getloadavg()[0])
    print(
        f"journal on vs off, {opts.rounds} round(s), medians; load average (1 min) during the "
        f"run: {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'workload':8} {'mode':9} {'journal':7} {'server µs/task':>15} {'tree µs/task':>13} "
        f"{'tasks/s':>9}"
    )
    for (name, mode, journal), figs in sorted(results.items()):
        med = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
        print(
            f"{name:8} {mode:9} {journal:7} {med['server_us']:15.2f} {med['tree_us']:13.2f} "
            f"{med['per_s']:9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
