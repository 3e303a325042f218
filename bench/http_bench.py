"""The HTTP API under load: status latency during a 10^6-argument job, and what 50 event streams cost.

    python bench/http_bench.py [--args 1000000] [--requests 300] [--streams 50] [--window 8]

Starts a real server (``--http-port 0``), one node and a console running a job of ``--args``
calls of ``spin`` (about 20 µs of work each), then:

1. ``GET /api/v1/summary`` and ``GET /api/v1/jobs`` ``--requests`` times each over one
   keep-alive connection with the bearer token: p50 and p99 latency;
2. the server process's CPU (utime + stime from /proc) over ``--window`` seconds with no event
   stream, then with ``--streams`` open streams read by this process, then with none again;
   the job's progress over each window shows whether the scheduler slowed down.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def spin(x: int) -> int:
    """About 20 µs of pure Python: the server dispatches tens of thousands of calls a second."""
    total = 0
    for i in range(150):
        total += i * x
    return total & 0xFFFF


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> dict:
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        reply = self.conn.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise SystemExit(f"{path}: {reply.status} {body[:200]!r}")
        return json.loads(body)

    def job(self) -> dict | None:
        jobs = self.get("/api/v1/jobs")["jobs"]
        return jobs[0] if jobs else None


def stream(port: int, token: str, stop: threading.Event, counts: list[int], i: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {token}"})
    reply = conn.getresponse()
    while not stop.is_set():
        data = reply.read1(65536)
        if not data:
            break
        counts[i] += data.count(b"event: snapshot")
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--args", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--cores", type=int, default=1)
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="remap-http-bench-"))
    secret = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env.update(REMAP_SECRET_KEY=secret, HOME=str(tmp), PYTHONPATH=str(ROOT))
    port_file = tmp / "port"
    log = open(tmp / "server.log", "w")
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "remap_server.py"), "--port", "0", "--port-file",
             str(port_file), "--http-port", "0", "--env-file", "/dev/null",
             "--log-level", "warn"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(server)
        port = int(
            wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "port")
        )
        http_port = int(
            wait_for(
                lambda: re.search(
                    r"dashboard: http://[^:]+:(\d+)/", (tmp / "server.log").read_text()
                ),
                20,
                "the HTTP port",
            ).group(1)
        )
        from remap.server.http.security import derive_token

        token = derive_token(secret.encode())
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "remap_node.py"),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--cores",
                    str(opts.cores),
                    "--env-file",
                    "/dev/null",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
        api = Api(http_port, token)
        wait_for(lambda: api.get("/api/v1/summary")["nodes"] == 1, 30, "the node")
        job_file = tmp / "job.yaml"
        job_file.write_text(
            f"function: {Path(__file__).resolve()}:spin\nargs_range: [0, {opts.args}]\n"
            "response_mode: none\nname: bench\n"
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "remap_console.py"),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--env-file",
                    "/dev/null",
                    "compute",
                    str(job_file),
                    "--quiet",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
        wait_for(lambda: (api.job() or {}).get("done", 0) > 1000, 60, "the job to run")

        print(
            f"job of {opts.args:,} calls running on {opts.cores} core(s); server pid {server.pid}"
        )
        for path in ("/api/v1/summary", "/api/v1/jobs"):
            times = []
            for _ in range(opts.requests):
                start = time.perf_counter()
                api.get(path)
                times.append((time.perf_counter() - start) * 1000)
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(
                f"GET {path:<16} n={len(times)}  p50 {statistics.median(times):6.2f} ms  "
                f"p99 {p99:6.2f} ms  max {times[-1]:6.2f} ms"
            )

        def window(label: str) -> tuple[float, float]:
            before_cpu, before_done = cpu_seconds(server.pid), api.job()["done"]
            start = time.monotonic()
            time.sleep(opts.window)
            elapsed = time.monotonic() - start
            cpu = (cpu_seconds(server.pid) - before_cpu) / elapsed
            rate = (api.job()["done"] - before_done) / elapsed
            print(f"{label:<22} server CPU {cpu * 100:5.1f}% of a core   job {rate:9,.0f} calls/s")
            return cpu, rate

        quiet1 = window("no event stream")
        stop, counts = threading.Event(), [0] * opts.streams
        threads = [
            threading.Thread(target=stream, args=(http_port, token, stop, counts, i), daemon=True)
            for i in range(opts.streams)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: all(counts), 30, "every stream's first snapshot")
        busy = window(f"{opts.streams} event streams")
        got = sum(counts)
        stop.set()
        for t in threads:
            t.join(timeout=5)
        quiet2 = window("no event stream again")
        base = (quiet1[0] + quiet2[0]) / 2
        print(
            f"streams cost {100 * (busy[0] - base):+.1f} points of a core "
            f"({100 * (busy[0] - base) / max(base, 1e-9):+.1f}% relative); "
            f"{got} snapshots received in all"
        )
        done = api.job()
        print(f"job state at the end: {done['state']}, {done['done']:,} done")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
