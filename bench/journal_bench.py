"""The server journal's cost: the same jobs on a server with the journal on and off, one run.

    python bench/journal_bench.py [--rounds 3] [--trivial 200000] [--mib 64]

Each round starts ``remap-procs`` (a server process and a node process of 2 cores, the client
in this process) with ``REMAP_JOURNAL`` on, then off, and runs on each: ``trivial`` (``x + 1``
over N integers) and ``mib`` (64 distinct 1 MiB arguments, each returning a new 1 MiB result),
each attached and detached:

- attached: ``remap.connect(address, secret=...).map(fn, args)``, as a user calls it; the
  journal records the submit and the end.
- detached: what ``compute JOB.yaml --detach`` then ``attach JOB_ID`` do, on a console
  connection in this process: a ``JobStream`` submitted with ``detach``, its arguments read
  into it in argument groups (``read_into``), left once they are all on the server
  (``detach()``), then a second ``JobStream`` attached to the job collects every result.
  The journal also records every argument, every outcome and every result message (what a
  restarted server resumes from). The console itself is not run: the Python API has no
  detached function job, and the console's job file would add a process start and JSON
  parsing to what is measured (``args_path`` holds JSON values, so no ``bytes`` arguments);
  its ``Session.start_job`` and ``Session.attach`` drive these same two streams.

Each timed region runs from the submit to the last result in hand, results checked after.
Figures: the server process's CPU µs per task (psutil; what the journal adds is spent there)
and the whole tree's (this process, server, node, cores; each process counted once), medians
over rounds, with the load average.
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
from bench.systems import BenchError, RemapApiSystem  # noqa: E402

TIMEOUT = 3600.0


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process under it, each counted once."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class JournalBench:
    """A server and node (journal on or off), a ``remap.connect`` handle for attached jobs and
    a console connection for detached ones."""

    def __init__(self, workdir: Path, journal: bool) -> None:
        self.system = RemapApiSystem("procs", workdir, journal=journal)
        self.console: Any = None

    def start(self) -> None:
        from remap import runtime
        from remap.dial import connect_console
        from remap.settings import load_settings

        self.system.start()
        self.settings = load_settings({}, environ={}, dotenv_path=None)
        self.console = runtime.run(
            connect_console,
            runtime.ensure_running(),
            self.settings,
            self.system.address,
            secret=self.system.secret.encode(),
            timeout=30,
        )

    def close(self) -> None:
        from remap import runtime

        try:
            if self.console is not None and self.console.link is not None:
                runtime.run(self.console.link.close, timeout=5)
        finally:
            self.system.close()

    def attached(self, fn: Any, args: list[Any]) -> list[Any]:
        return self.system.api.map(fn, args)

    def detached(
        self,
        fn: Any,
        args: list[Any],
        *,
        after_end: bool = False,
        attaching: Any = None,
    ) -> list[Any]:
        """``compute --detach`` (submit, all arguments on the server, leave), then ``attach``;
        with ``after_end`` once the job has ended (its results in the journal, read back by
        the attach). ``attaching()`` is called just before the attach."""
        from protocol.options import JobOptions
        from remap import runtime
        from remap.client import JobStream, read_into
        from remap.sinks import make_sink

        until = time.monotonic() + TIMEOUT
        call_soon = runtime.reactor().callFromThread
        run = JobStream(
            self.system._blob(fn, None),
            JobOptions(name="journal-bench", detach=True),
            call_soon=call_soon,
            total_hint=len(args),
            runs=True,
        ).start(self.console)
        read_into(run, iter(args))  # as Session.start_job: argument groups, on a thread
        while run.session.job_id is None or not run.session.exhausted:
            if run.finished.wait(0.01):
                break
            if time.monotonic() > until:
                raise BenchError("the detached job's arguments did not all reach the server")
        if run.error is not None:
            raise BenchError(f"detached submit failed: {run.error}")
        job = run.job_id
        run.detach()
        if after_end:
            self._wait_ended(job, until)
        if attaching is not None:
            attaching()
        sink = make_sink("object")
        attach = JobStream(
            b"", JobOptions(), call_soon=call_soon, result_buffer=self.settings.result_buffer
        ).attach(self.console, job)
        outcome = attach.collect(sink, until=until)
        if outcome.state != "done" or outcome.failed:
            raise BenchError(f"job {job} ended {outcome.state}: {outcome.message}")
        return sink.value()

    def _wait_ended(self, job: int, until: float) -> None:
        """Until ``job`` ended (a look at the server's status every 0.1 s), then the journal's
        last group commit (50 ms at most)."""
        from remap import runtime

        while True:
            status = runtime.run(self.console.status, timeout=30)
            state = next((j["state"] for j in status["jobs"] if j["id"] == job), None)
            if state not in (None, "running"):
                break
            if time.monotonic() > until:
                raise BenchError(f"job {job} did not end")
            time.sleep(0.1)
        time.sleep(0.5)


def measure(bench: JournalBench, name: str, fn: Any, args: list[Any], expected: list[Any]) -> dict:
    figures = {}
    server = bench.system.server_pid()
    for mode, run in (("attached", bench.attached), ("detached", bench.detached)):
        server0, tree0, wall0 = _cpu(server), _cpu(os.getpid()), time.perf_counter()
        got = run(fn, args)
        wall = time.perf_counter() - wall0
        server_cpu, tree_cpu = _cpu(server) - server0, _cpu(os.getpid()) - tree0
        if got != expected:
            raise BenchError(f"WRONG RESULT: {name} {mode}")
        n = len(args)
        figures[mode] = {
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
                bench = JournalBench(Path(tmp), journal)
                try:
                    bench.start()
                    for name, fn, args, expected in workloads:
                        for mode, fig in measure(bench, name, fn, args, expected).items():
                            key = (name, mode, "on" if journal else "off")
                            results.setdefault(key, []).append(fig)
                finally:
                    bench.close()
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
