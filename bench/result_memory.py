"""Memory held for results a caller takes slowly: peak RSS of the caller and of the server.

``imap`` over ``--count`` arguments, each returning ``--mib`` MiB, the caller sleeping
``--delay`` s per result (a slow sink), on the embedded cluster and on a server + node on
127.0.0.1; with the default ``buffersize`` and a small one. Peak RSS is the kernel's high-water
mark (``VmHWM``) of each process; ``held`` is the largest number of result bytes the handle
reported holding undelivered (``Cluster.held_result_bytes``, when the product has it).

    python bench/result_memory.py                       # the five cells
    python bench/result_memory.py --systems stalled     # a console stopped: the server's RSS
    python bench/result_memory.py --systems console --count 200 --mib 4 --delay 0.03
                                                        # compute to a slow stdout
    python bench/result_memory.py --systems embedded --count 200 --mib 20 --delay 0.02
    BENCH_ROOT=/path/to/other/checkout python bench/result_memory.py   # the same, before
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: the checkout measured (BENCH_ROOT: another one, e.g. main's, for a before/after)
ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

import remap  # noqa: E402


def make_result(size: int) -> bytes:
    """A result of ``size`` bytes (module level: pickled by reference from the bench)."""
    return os.urandom(64) * (size // 64)


def hwm_mb(pid: int) -> float:
    """The process's peak resident set, MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm(pid: int) -> None:
    """Start the peak afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def spawn(workdir: Path, secret: str, cores: int) -> tuple[str, list[subprocess.Popen]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env.update(HOME=str(workdir), REMAP_SECRET_KEY=secret, PYTHONPATH=str(ROOT))
    port_file = workdir / "port"
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "remap_server.py"), "--port", "0", "--port-file",
         str(port_file), "--env-file", "/dev/null", "--log-level", "warn"],
        cwd=workdir, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    node = subprocess.Popen(
        [sys.executable, str(ROOT / "remap_node.py"), "--server", address, "--cores",
         str(cores), "--env-file", "/dev/null", "--log-level", "warn"],
        cwd=workdir, env=env,
    )  # fmt: skip
    return address, [server, node]


def run_cell(cluster: remap.Cluster, args: argparse.Namespace, buffersize: int | None) -> dict:
    size = args.mib * 1024 * 1024
    held_peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal held_peak
        while not stop.wait(0.005):
            held_peak = max(held_peak, getattr(cluster, "held_result_bytes", 0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    kwargs = {} if buffersize is None else {"buffersize": buffersize}
    started = time.monotonic()
    n = 0
    for value in cluster.imap(make_result, [size] * args.count, **kwargs):
        assert len(value) == size
        n += 1
        del value
        if args.delay:
            time.sleep(args.delay)
    stop.set()
    watcher.join()
    return {"results": n, "seconds": time.monotonic() - started, "held_mb": held_peak / 2**20}


def stalled_console(address: str, secret: str, args: argparse.Namespace) -> None:
    """The console of the ``stalled`` cell: says when its first result came, then is stopped."""
    cluster = remap.connect(address, secret=secret, env_file=None, task_output=False)
    size = args.mib * 1024 * 1024
    for _ in cluster.imap(make_result, [size] * args.count):
        print("first", flush=True)
        time.sleep(3600)


def run_stalled(args: argparse.Namespace) -> None:
    """A console stopped (SIGSTOP) after its first result, so it reads nothing: what the server
    holds over the next ``--stall`` seconds (its heartbeats stop too: the server drops it after
    REMAP_HEARTBEAT_INTERVAL x REMAP_HEARTBEAT_MISSES, 6 s by default)."""
    import signal

    with tempfile.TemporaryDirectory() as tmp:
        secret = secrets.token_urlsafe(32)
        address, procs = spawn(Path(tmp), secret, args.cores)
        console = None
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
            console = subprocess.Popen(
                [sys.executable, __file__, "--console", f"{address},{secret}", "--count",
                 str(args.count), "--mib", str(args.mib)],
                stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            assert console.stdout is not None and console.stdout.readline().strip() == "first"
            os.kill(console.pid, signal.SIGSTOP)
            reset_hwm(procs[0].pid)
            time.sleep(args.stall)
            server = hwm_mb(procs[0].pid)
        finally:
            if console is not None:
                console.kill()
                console.wait(10)
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)
    print(f"{'stalled':<10} {'-':<10} {'':>10} {server:>10.0f} {'':>8} "
          f"{args.stall:>6.1f}", flush=True)  # fmt: skip


def run_console(args: argparse.Namespace) -> None:
    """``remap_console.py compute`` of ``--count`` results of ``--mib`` MiB in stream mode, on
    its embedded cluster, its stdout read 1 MiB per ``--delay`` s (a slow sink): the peak RSS
    of the console (or of one of its cores, whichever is larger)."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "big.py").write_text(f"def big(x):\n    return 'x' * ({args.mib} * 1024 * 1024)\n")
        (work / "big.yaml").write_text(
            f"function: big.py:big\nargs_range: [0, {args.count}]\nresponse_mode: stream\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
        env.update(HOME=str(work), PYTHONPATH=str(ROOT))
        started = time.monotonic()
        console = subprocess.Popen(
            [sys.executable, str(ROOT / "remap_console.py"), "--env-file", "/dev/null",
             "compute", "big.yaml"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=work,
        )  # fmt: skip
        assert console.stdout is not None
        while console.stdout.read(1 << 20):
            time.sleep(args.delay)
        console.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{'console':<10} {'-':<10} {peak:>10.0f} {'':>10} {'':>8} "
          f"{time.monotonic() - started:>6.1f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="embedded,procs,stalled")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--mib", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--buffersizes", default="default,4")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds of the stalled cell")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # one cell, in a fresh process
    parser.add_argument("--console", help=argparse.SUPPRESS)  # the stalled cell's console
    args = parser.parse_args()
    if args.console is not None:
        stalled_console(*args.console.split(","), args)
        return
    if args.cell is None:
        print(f"imap of {args.count} x {args.mib} MiB, {args.delay * 1000:.0f} ms per result taken")
        print(f"{'system':<10} {'buffersize':<10} {'caller MB':>10} {'server MB':>10} "
              f"{'held MB':>8} {'s':>6}")  # fmt: skip
        for system in args.systems.split(","):
            for bs in args.buffersizes.split(",") if system in ("embedded", "procs") else ["-"]:
                cmd = [sys.executable, __file__, "--cell", f"{system}:{bs}"]
                for opt in ("count", "mib", "delay", "cores", "stall"):
                    cmd += [f"--{opt}", str(getattr(args, opt))]
                subprocess.run(cmd, check=True)
        return
    system, bs = args.cell.split(":")
    if system == "stalled":
        run_stalled(args)
        return
    if system == "console":
        run_console(args)
        return
    buffersize = None if bs == "default" else int(bs)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if system == "embedded":
                cluster = remap.connect(cores=args.cores, env_file=None, task_output=False)
                server_pid = os.getpid()
            else:
                secret = secrets.token_urlsafe(32)
                address, procs = spawn(Path(tmp), secret, args.cores)
                server_pid = procs[0].pid
                cluster = remap.connect(address, secret=secret, env_file=None, task_output=False)
                while cluster.cores() < args.cores:
                    time.sleep(0.05)
            list(cluster.imap(make_result, [1024] * 8))  # warm: cores started, function loaded
            reset_hwm(os.getpid())
            reset_hwm(server_pid)
            cell = run_cell(cluster, args, buffersize)
            caller = hwm_mb(os.getpid())
            server = hwm_mb(server_pid) if procs else float("nan")
            cluster.close()
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)
    print(f"{system:<10} {bs:<10} {caller:>10.0f} {server:>10.0f} {cell['held_mb']:>8.0f} "
          f"{cell['seconds']:>6.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
