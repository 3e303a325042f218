"""How long the server's reactor stalls while its journal writes, journal on and off, one run.

    python bench/journal_stall.py [--rounds 3] [--fn-mib 60] [--mib 64] [--roots DIR,DIR]

A server process and a node process of 2 cores (``REMAP_STATE_DIR`` in a temporary
directory), the client in this process. A probe thread in the server process (a
``sitecustomize`` on its path) posts a call to the reactor every 10 ms and times how long it
waits to run: what a heartbeat or a task's answer waits meanwhile. Per workload, the longest
wait between its submit and its last result:

- ``submit``: ``remap.connect(...).map(fn, [0, 1])`` of a function closing over ``--fn-mib``
  MiB (cloudpickled by value): the journal commits the submit with its function.
- ``detached``: ``--mib`` distinct 1 MiB arguments, each returning 1 MiB, detached then
  attached (as ``bench/journal_bench.py``): the journal group-commits arguments, outcomes and
  results.
- ``attach``: the same job attached once it has ended: the window is the attach alone, whose
  results the server reads back from its journal (journal off: from memory).

``--roots`` runs the server and node of other checkouts too (e.g. one of the commit before a
change: ``git archive BASE | tar -x -C /tmp/before``), for a before/after in one run.
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
from bench.journal_bench import JournalBench  # noqa: E402
from bench.systems import ROOT, RemapApiSystem  # noqa: E402

#: the probe, run by the server process at start (found first on its PYTHONPATH)
PROBE = """
import os, sys, threading, time

def _probe(out_dir):
    while "twisted.internet.reactor" not in sys.modules:
        time.sleep(0.05)
    reactor = sys.modules["twisted.internet.reactor"]
    while not reactor.running:
        time.sleep(0.05)
    ran = threading.Event()
    with open(os.path.join(out_dir, f"lag-{os.getpid()}"), "a", buffering=1) as out:
        while True:
            ran.clear()
            posted = time.monotonic()
            reactor.callFromThread(ran.set)
            ran.wait()
            lag = time.monotonic() - posted
            if lag > 0.002:
                out.write(f"{posted:.6f} {lag:.6f}\\n")
            time.sleep(0.01)

if os.environ.get("JOURNAL_STALL_PROBE"):
    threading.Thread(
        target=_probe, args=(os.environ["JOURNAL_STALL_PROBE"],), daemon=True
    ).start()
"""


class ProbedSystem(RemapApiSystem):
    """Server and node processes of ``root``, the server's reactor probed."""

    def __init__(self, workdir: Path, journal: bool, root: Path, probe_dir: Path) -> None:
        super().__init__("procs", workdir, journal=journal)
        self.root, self.probe_dir = root, probe_dir

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["PYTHONPATH"] = os.pathsep.join([str(self.probe_dir), str(self.root)])
        env["JOURNAL_STALL_PROBE"] = str(self.probe_dir)
        env["REMAP_STATE_DIR"] = str(self.workdir / "state")
        return env

    def longest_stall(self, since: float, until: float) -> float:
        path = self.probe_dir / f"lag-{self.server_pid()}"
        longest = 0.0
        for line in path.read_text().splitlines() if path.exists() else []:
            posted, lag = map(float, line.split())
            if since <= posted <= until:
                longest = max(longest, lag)
        return longest


def big_function(mib: int) -> Any:
    """A function closing over ``mib`` MiB of random bytes (pickled with them, by value)."""
    blob = os.urandom(mib << 20)
    return lambda x: len(blob) + x


def stalls_of(bench: JournalBench, system: ProbedSystem, fn_mib: int, mib: list) -> dict:
    """Each workload's longest stall (s), its results checked."""
    work = {
        "submit": (
            lambda: bench.attached(big_function(fn_mib), [0, 1]),
            [fn_mib << 20, (fn_mib << 20) + 1],
        ),
        "detached": (
            lambda: bench.detached(w.reverse_bytes, mib),
            [w.reverse_bytes(b) for b in mib],
        ),
    }
    window = [0.0]

    def attaching() -> None:
        window[0] = time.monotonic()

    work["attach"] = (
        lambda: bench.detached(w.reverse_bytes, mib, after_end=True, attaching=attaching),
        work["detached"][1],
    )
    stalls = {}
    for name, (run, expected) in work.items():
        window[0] = time.monotonic()
        if run() != expected:
            raise SystemExit(f"WRONG RESULT: {name}")
        time.sleep(0.05)  # the probe's last look at the window
        stalls[name] = system.longest_stall(window[0], time.monotonic())
    return stalls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fn-mib", type=int, default=60)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--roots", default=str(ROOT), help="checkouts to run, comma-separated")
    opts = parser.parse_args()
    mib = w.mib_arguments(opts.mib)
    stalls: dict[tuple[str, str, str], list[float]] = {}
    loads = []
    for _ in range(opts.rounds):
        for root in opts.roots.split(","):
            for journal in (True, False):
                with tempfile.TemporaryDirectory(prefix="journal-stall-") as tmp:
                    probe = Path(tmp) / "probe"
                    probe.mkdir()
                    (probe / "sitecustomize.py").write_text(PROBE)
                    bench = JournalBench(Path(tmp), journal)
                    bench.system = system = ProbedSystem(Path(tmp), journal, Path(root), probe)
                    try:
                        bench.start()
                        for name, stall in stalls_of(bench, system, opts.fn_mib, mib).items():
                            key = (root, name, "on" if journal else "off")
                            stalls.setdefault(key, []).append(stall)
                    finally:
                        bench.close()
                loads.append(os.getloadavg()[0])
    print(
        f"longest reactor stall of the server (s), {opts.rounds} round(s): median (max); load "
        f"average (1 min) during the run {min(loads):.1f}..{max(loads):.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'checkout':30} {'workload':9} {'journal':7} {'median':>7} {'max':>7}")
    for (root, name, journal), values in sorted(stalls.items()):
        print(
            f"{root[-30:]:30} {name:9} {journal:7} {statistics.median(values):7.3f} "
            f"{max(values):7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
