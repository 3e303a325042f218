"""Instructions the server and the node process execute per single call, counted by callgrind.

    python bench/call_instructions.py [CALLS]     # default 300; needs valgrind

Starts ``remap_server.py`` and ``remap_node.py --cores 2`` under ``valgrind --tool=callgrind``
(the node's cores run as usual), warms up, zeroes both processes' counters, runs CALLS
``cluster.submit(f, x).result()`` one at a time through ``remap.connect(address)`` (the
bench's ``api-procs`` path) and dumps the counters: instructions per call of each process,
what the machine's load cannot change (CPU µs per call moves with it). The calls are ~10×
slower under valgrind; the few timers that run per second (heartbeats, the node's watchdog)
are a small part of each count. ``callgrind_annotate`` reads the dumps (their paths are
printed) for where the instructions go.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.systems import wait_for  # noqa: E402


def now(_: object) -> int:
    return time.perf_counter_ns()


def _totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"call_instructions: no totals in {path}")


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    if argv and not argv[0].isdigit():
        sys.exit(f"call_instructions: CALLS must be a whole number, not {argv[0]!r} (see --help)")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("call_instructions: needs valgrind (apt-get install valgrind)")
    calls = int(argv[0]) if argv else 300
    import remap
    from remap.settings import load_settings

    secret = secrets.token_urlsafe(32)
    work = Path(tempfile.mkdtemp(prefix="remap-instructions-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env.update(REMAP_SECRET_KEY=secret, HOME=str(work), REMAP_STATE_DIR=str(work / "state"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    common = ["--env-file", "/dev/null", "--log-level", "warn"]

    def under_callgrind(role: str, *args: str) -> subprocess.Popen:
        out = work / f"callgrind.{role}"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        log = (work / f"{role}.log").open("ab")
        return subprocess.Popen(
            [*cmd, str(ROOT / f"remap_{role}.py"), *args, *common],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    port_file = work / "port"
    procs = {"server": under_callgrind("server", "--port", "0", "--port-file", str(port_file))}
    try:
        port = wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 300, "server")
        address = f"127.0.0.1:{port}"
        procs["node"] = under_callgrind("node", "--server", address, "--cores", "2")
        settings = load_settings({}, environ={}, dotenv_path=None)
        with remap.connect(address, secret=secret, settings=settings, task_output=False) as c:
            wait_for(lambda: c.cores() >= 2, 300, "a node with 2 cores")
            for _ in range(50):
                c.submit(now, 1).result()
            for proc in procs.values():
                subprocess.run(
                    ["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True
                )
            for _ in range(calls):
                c.submit(now, 1).result()
            for proc in procs.values():
                subprocess.run(
                    ["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True
                )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=120)
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for role in procs:
        dumps = sorted(work.glob(f"callgrind.{role}.*"))
        if not dumps:
            sys.exit(f"call_instructions: no counter dump of the {role} in {work}")
        print(
            f"{_totals(dumps[0]) / calls:10,.0f} instructions per call  {role} process ({dumps[0]})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
