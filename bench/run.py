"""remap against multiprocessing.Pool and friends: one command, one table.

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--systems S[,S...]] [--profile]

Workloads: trivial10k, trivial, cpu100ms, latency, mib, wordcount, async1k, submit1k, jobs300,
map1k, lazy10m, nodes500
(all by default;
lazy10m, 10^7 lazily generated arguments on three systems, takes about a minute and a half
on 2 cores). Each system runs in its own child process ("cell"), so systems never share
a reactor, a fork or memory; every result is checked and a wrong one fails the run.
Figures are medians of a few repetitions; ratios are against mp.Pool in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

from bench import workloads as w  # noqa: E402
from bench.systems import (  # noqa: E402
    SYSTEMS,
    BenchError,
    RemapSystem,
    available,
    make_system,
    wait_for,
)

#: workloads every system runs in one cell; the others get a fresh cell each
SHARED_CELL = (
    "trivial10k",
    "trivial",
    "cpu100ms",
    "latency",
    "mib",
    "wordcount",
    "async1k",
    "submit1k",
    "jobs300",
    "map1k",
)
WORKLOADS = (*SHARED_CELL, "lazy10m", "nodes500")
DEFAULT_WORKLOADS = WORKLOADS
#: which systems run each of the special workloads
LAZY_SYSTEMS = ("api-embedded", "api-procs", "remap-procs", "remap-embedded", "mp.Pool")


def is_remap(system: str) -> bool:
    """remap through its public API (``api-*``) or its internal client (``remap-*``)."""
    return system.startswith(("remap", "api"))


WORKERS = 2
CELL_TIMEOUT = 1800

TARGETS = {
    "trivial10k": "≥0.25× Pool, ≥2× Ray",
    "trivial": "≥0.5× Pool",
    "cpu100ms": "wall ≤1.03× Pool",
    "latency": "≤1.5× Pool embedded; ≤2× Pool, <0.5 ms",
    "mib": "≥0.9× Pool embedded, ≥0.75× procs",
    "wordcount": "≥0.95× Pool",
    "async1k": "≤1.5× Pool",
    "submit1k": "≤1.5× Pool",
    "jobs300": "≤1.5× Pool",
    "map1k": "≤1.5× Pool",
    "lazy10m": "completes, peak RSS <200 MB",
    "nodes500": "CPU/batch flat (≤1.5× of 10 nodes)",
}


def params_for(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(
            trivial10k_n=10_000,
            trivial_n=50_000,
            trivial_reps=3,
            cpu_n=12,
            cpu_reps=2,
            lat_calls=30,
            lat_reps=3,
            mib_n=16,
            mib_reps=2,
            wc_bytes=40_000_000,
            wc_reps=2,
            async_n=1000,
            async_reps=2,
            jobs_n=300,
            jobs_len=300,
            lazy_n=1_000_000,
            sim_nodes=[10, 500],
            sim_n=100_000,
            sim_chunk=50,
        )
    return dict(
        trivial10k_n=10_000,
        trivial_n=200_000,
        trivial_reps=5,
        cpu_n=40,
        cpu_reps=3,
        lat_calls=100,
        lat_reps=3,
        mib_n=64,
        mib_reps=3,
        wc_bytes=200_000_000,
        wc_reps=3,
        async_n=1000,
        async_reps=3,
        jobs_n=300,
        jobs_len=300,
        lazy_n=10_000_000,
        sim_nodes=[10, 100, 500],
        sim_n=500_000,
        sim_chunk=50,
    )


# ====================================================================== measuring helpers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def check(ok: bool, what: str) -> None:
    if not ok:
        raise BenchError(f"WRONG RESULT: {what}")


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def tree_cpu() -> float:
    """CPU seconds used so far by this process and every live descendant (server, node,
    cores, pool workers...). Robust to other load on the machine, unlike wall time."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


@contextmanager
def cpu_meter(out: list[float]):
    c = tree_cpu()
    yield
    out.append(tree_cpu() - c)


def row(
    workload: str,
    system: str,
    value: float,
    unit: str,
    better: str,
    reps: list[float],
    details: str = "",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "workload": workload,
        "system": system,
        "value": value,
        "unit": unit,
        "better": better,
        "reps": reps,
        "details": details,
        **extra,
    }


# ====================================================================== profiling


@contextmanager
def profiling(system: Any, directory: str | None, label: str):
    """py-spy on every process of ``system`` for the duration of the block (if asked)."""
    if not directory:
        yield
        return
    procs = []
    for role, pids in system.pids().items():
        for i, pid in enumerate(pids):
            out = Path(directory) / f"{label}-{role}-{i}.txt"
            procs.append(
                (
                    role,
                    out,
                    subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(pid),
                            "--rate",
                            "250",
                            "--format",
                            "raw",
                            "--nonblocking",
                            "--output",
                            str(out),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
    time.sleep(1.0)  # let py-spy attach before the timed region
    try:
        yield
    finally:
        for _role, _out, proc in procs:
            proc.send_signal(signal.SIGINT)
        for _role, _out, proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def summarize_profile(path: Path, top: int = 12) -> str:
    """Top functions by own samples (where the CPU is) and by inclusive samples (why)."""
    own: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";")]
        names = [_short(f) for f in frames]
        if not names:
            continue
        total += n
        own[names[-1]] += n
        for name in set(names):
            incl[name] += n
    if not total:
        return f"{path.name}: no samples (idle, or py-spy could not attach)"
    lines = [f"{path.stem}: {total} samples"]
    lines.append("  own time:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("  inclusive (remap/protocol/twisted frames):")
    interesting = [
        (name, n)
        for name, n in incl.most_common(200)
        if any(k in name for k in ("remap/", "protocol/", "twisted/", "bench/"))
        and "run.py" not in name
        and "runtime.py" not in name
    ]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in interesting[:top]]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (to/file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


# ====================================================================== workloads (in a cell)


def bench_trivial10k(system: Any, p: dict[str, Any]) -> list[dict]:
    return bench_trivial(system, p, "trivial10k")


def bench_trivial(system: Any, p: dict[str, Any], name: str = "trivial") -> list[dict]:
    n = p[f"{name}_n"]
    expected = [x + 1 for x in range(n)]
    reps: list[float] = []
    cpu: list[float] = []
    with profiling(system, p.get("profile_dir"), f"{name}-{system.name}"):
        for _ in range(p["trivial_reps"]):
            with cpu_meter(cpu):
                dt, got = timed(lambda: system.map_list(w.inc, range(n), n))
            check(got == expected, f"{system.name} trivial: results differ from x+1")
            reps.append(n / dt)
    per_task = statistics.median(cpu) / n * 1e6
    return [
        row(
            name,
            system.name,
            statistics.median(reps),
            "tasks/s",
            "higher",
            reps,
            f"{n} calls of x+1; CPU {per_task:.1f} µs/task",
            cpu_per_unit=per_task,
        )
    ]


def bench_cpu(system: Any, p: dict[str, Any]) -> list[dict]:
    n, iters = p["cpu_n"], p["burn_iters"]
    expected = [tuple(x) for x in p["burn_expected"]]
    reps: list[float] = []
    cpu: list[float] = []
    for _ in range(p["cpu_reps"]):
        with cpu_meter(cpu):
            dt, got = timed(lambda: system.map_list(w.burn, [(i, iters) for i in range(n)], n))
        check([tuple(x) for x in got] == expected, f"{system.name} cpu100ms: wrong checksums")
        reps.append(dt)
    wall = statistics.median(reps)
    return [
        row(
            "cpu100ms",
            system.name,
            wall,
            "s wall",
            "lower",
            reps,
            f"{n}×{p['burn_call'] * 1e3:.0f} ms; CPU {statistics.median(cpu):.2f}s for "
            f"{p['burn_serial']:.2f}s serial; speedup {p['burn_serial'] / wall:.2f}×",
        )
    ]


def bench_latency(system: Any, p: dict[str, Any]) -> list[dict]:
    system.call(w.inc, -1)
    reps, p90s = [], []
    k = 0
    for _ in range(p["lat_reps"]):
        times = []
        for _ in range(p["lat_calls"]):
            k += 1
            dt, got = timed(lambda k=k: system.call(w.inc, k))
            check(got == k + 1, f"{system.name} latency: call({k}) returned {got!r}")
            times.append(dt)
        times.sort()
        reps.append(statistics.median(times) * 1e3)
        p90s.append(times[int(0.9 * (len(times) - 1))] * 1e3)
    return [
        row(
            "latency",
            system.name,
            statistics.median(reps),
            "ms p50",
            "lower",
            reps,
            f"{p['lat_reps']}×{p['lat_calls']} calls; p90 {statistics.median(p90s):.2f} ms",
        )
    ]


def bench_mib(system: Any, p: dict[str, Any]) -> list[dict]:
    n = p["mib_n"]
    args = w.mib_arguments(n)
    expected = [a[::-1] for a in args]
    reps: list[float] = []
    cpu: list[float] = []
    with profiling(system, p.get("profile_dir"), f"mib-{system.name}"):
        for _ in range(p["mib_reps"]):
            with cpu_meter(cpu):
                dt, got = timed(lambda: system.map_list(w.reverse_bytes, args, n))
            check(
                len(got) == n and all(g == e for g, e in zip(got, expected)),
                f"{system.name} mib: a result is not its argument reversed",
            )
            reps.append(n / dt)
            del got
    per = statistics.median(cpu) / n * 1e3
    return [
        row(
            "mib",
            system.name,
            statistics.median(reps),
            "MiB/s",
            "higher",
            reps,
            f"{n} calls, 1 MiB in + 1 MiB out each; CPU {per:.1f} ms/call",
            cpu_per_unit=per,
        )
    ]


def bench_wordcount(system: Any, p: dict[str, Any]) -> list[dict]:
    meta = json.loads(Path(p["corpus"]).read_text())
    expected = w.corpus_expected(meta)
    reps: list[float] = []
    cpu: list[float] = []
    for _ in range(p["wc_reps"]):
        with cpu_meter(cpu):
            dt, got = timed(
                lambda: system.map_reduce(w.count_words, w.merge_counts, meta["paths"], 1)
            )
        check(Counter(got) == expected, f"{system.name} wordcount: counts differ from the expected")
        reps.append(meta["bytes"] / 1e6 / dt)
    return [
        row(
            "wordcount",
            system.name,
            statistics.median(reps),
            "MB/s",
            "higher",
            reps,
            f"{meta['bytes'] / 1e6:.0f} MB in {len(meta['paths'])} files, reduce; "
            f"CPU {statistics.median(cpu):.2f}s",
        )
    ]


def _async_row(
    system: Any,
    p: dict[str, Any],
    name: str,
    run: Callable[[], Any],
    expected: Any,
    what: str,
    calls: int = 0,
) -> list[dict]:
    """Seconds for ``run()`` (``calls`` async calls, default ``async_n``, then their results),
    medians of reps."""
    reps: list[float] = []
    cpu: list[float] = []
    try:
        for _ in range(p["async_reps"]):
            with cpu_meter(cpu):
                dt, got = timed(run)
            check(got == expected, f"{system.name} {name}: results differ from x+1")
            reps.append(dt)
    except NotImplementedError:  # a system without the call: no row (see run_in_child)
        return [{"workload": name, "system": system.name, "absent": True}]
    per = statistics.median(cpu) / (calls or p["async_n"]) * 1e3
    return [
        row(
            name,
            system.name,
            statistics.median(reps),
            "s wall",
            "lower",
            reps,
            f"{what}; CPU {per:.2f} ms/call",
        )
    ]


def bench_async1k(system: Any, p: dict[str, Any]) -> list[dict]:
    """``Pool.map_async`` in a loop, each over a small list, as ported Pool code does."""
    lists = [list(range(k, k + 10)) for k in range(p["async_n"])]
    expected = [[x + 1 for x in each] for each in lists]
    return _async_row(
        system,
        p,
        "async1k",
        lambda: system.map_async_each(w.inc, lists),
        expected,
        f"{p['async_n']} map_async of 10 calls, then every get()",
    )


def bench_jobs300(system: Any, p: dict[str, Any]) -> list[dict]:
    """Hundreds of jobs queued at once: ``Pool.map_async`` over lists too long to share a job
    (each its own job), all issued before any result is taken."""
    n, size = p["jobs_n"], p["jobs_len"]
    lists = [list(range(k, k + size)) for k in range(n)]
    expected = [[x + 1 for x in each] for each in lists]
    return _async_row(
        system,
        p,
        "jobs300",
        lambda: system.map_async_each(w.inc, lists),
        expected,
        f"{n} map_async of {size} calls (a job each), then every get()",
        calls=n,
    )


def bench_submit1k(system: Any, p: dict[str, Any]) -> list[dict]:
    """``Executor.submit`` in a loop (mp.Pool: ``apply_async``), then every result; remap's
    ``Pool.apply_async`` in the details."""
    args = list(range(p["async_n"]))
    expected = [x + 1 for x in args]
    rows = _async_row(
        system,
        p,
        "submit1k",
        lambda: system.submit_each(w.inc, args),
        expected,
        f"{p['async_n']} submit (mp.Pool: apply_async), then every result",
    )
    if is_remap(system.name) and "absent" not in rows[0]:
        apply = _async_row(
            system, p, "apply", lambda: system.apply_async_each(w.inc, args), expected, ""
        )
        rows[0]["details"] += f"; Pool.apply_async {apply[0]['value']:.3f} s"
    return rows


def bench_map1k(system: Any, p: dict[str, Any]) -> list[dict]:
    """``Pool.map`` in a loop, each over a small list, waiting for each; remap's
    ``Cluster.map`` (``remap.connect(...).map``) in the details."""
    lists = [list(range(k, k + 10)) for k in range(p["async_n"])]
    expected = [[x + 1 for x in each] for each in lists]
    what = f"{p['async_n']} Pool.map of 10 calls, one after another"
    rows = _async_row(system, p, "map1k", lambda: system.map_each(w.inc, lists), expected, what)
    if is_remap(system.name) and "absent" not in rows[0]:
        run = lambda: [system.api.map(w.inc, each) for each in lists]  # noqa: E731
        cluster = _async_row(system, p, "cmap", run, expected, "")
        rows[0]["details"] += f"; Cluster.map {cluster[0]['value']:.3f} s"
    return rows


def bench_lazy(system: Any, p: dict[str, Any]) -> list[dict]:
    n = p["lazy_n"]
    dt, got = timed(lambda: system.map_reduce(w.double, w.add, w.lazy_arguments(n), 1000))
    check(
        got == w.lazy_expected(n),
        f"{system.name} lazy: sum is {got}, expected {w.lazy_expected(n)}",
    )
    peaks = {}
    for role, pids in system.pids().items():
        values = [v for v in (peak_rss_mb(pid) for pid in pids) if v is not None]
        if values:
            peaks[role] = max(values)
    worst = max(peaks.values()) if peaks else float("nan")
    text = ", ".join(f"{r} {v:.0f}" for r, v in peaks.items())
    return [
        row(
            "lazy10m",
            system.name,
            n / dt,
            "tasks/s",
            "higher",
            [n / dt],
            f"{n:.0e} args in {dt:.0f}s; peak RSS MB: {text}",
            peak_rss=worst,
            seconds=dt,
        )
    ]


def bench_nodes(p: dict[str, Any], workdir: Path) -> list[dict]:
    """One real server process; simulated nodes (echoing) in one other process; console here."""
    import psutil

    from remap.dial import connect_console
    from remap.settings import load_settings

    system = RemapSystem("procs", workdir)
    rows = []
    sim: subprocess.Popen | None = None
    try:
        from remap import runtime

        system.runtime = runtime
        reactor = runtime.ensure_running()
        system.address = system._spawn_processes(node=False)
        system.client = runtime.run(
            connect_console,
            reactor,
            load_settings({}, environ={}, dotenv_path=None),
            system.address,
            secret=system.secret.encode(),
            timeout=30,
        )
        server = psutil.Process(system.server_pid())
        n, chunk = p["sim_n"], p["sim_chunk"]
        for count in p["sim_nodes"]:
            sim = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench" / "sim_nodes.py"),
                    "--server",
                    system.address,
                    "--nodes",
                    str(count),
                ],
                env=system._env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            system.procs["sim"] = sim
            line = _readline(sim, 120)
            check(line.strip() == f"ready {count}", f"simulator said {line!r}")
            wait_for(
                lambda count=count: len(system.status()["nodes"]) == count, 60, f"{count} nodes"
            )
            c0 = sum(server.cpu_times()[:2])
            time.sleep(2.0)  # the idle cost of heartbeats, to subtract from the job's
            idle = (sum(server.cpu_times()[:2]) - c0) / 2.0
            c0 = sum(server.cpu_times()[:2])
            t0 = time.perf_counter()
            got = system.run_job(w.identity, range(n), "object", total=n, chunksize=chunk)
            dt = time.perf_counter() - t0
            cpu = sum(server.cpu_times()[:2]) - c0
            check(got == list(range(n)), f"{count} simulated nodes: results are not the arguments")
            batches = -(-n // chunk)
            per_batch = max(cpu - idle * dt, 0.0) / batches * 1e6
            rows.append(
                row(
                    "nodes500",
                    f"remap-procs {count} sim nodes",
                    n / dt,
                    "tasks/s",
                    "higher",
                    [n / dt],
                    f"server CPU {cpu:.2f}s ({idle:.2f} idle/s); {per_batch:.0f} µs/batch",
                    per_batch=per_batch,
                    nodes=count,
                )
            )
            sim.stdin.close()
            sim.wait(30)
            system.procs.pop("sim")
            wait_for(lambda: not system.status()["nodes"], 60, "simulated nodes to leave")
    finally:
        system.close()
    return rows


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"no answer from the simulator within {timeout:g}s")
    return proc.stdout.readline().decode()


BENCHES = {
    "trivial10k": bench_trivial10k,
    "trivial": bench_trivial,
    "cpu100ms": bench_cpu,
    "latency": bench_latency,
    "mib": bench_mib,
    "wordcount": bench_wordcount,
    "async1k": bench_async1k,
    "submit1k": bench_submit1k,
    "jobs300": bench_jobs300,
    "map1k": bench_map1k,
    "lazy10m": bench_lazy,
}


def run_cell(system_name: str, names: list[str], p: dict[str, Any], result_path: Path) -> int:
    """In a child process: start one system, run the workloads, write rows as JSON."""
    rows: list[dict] = []
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{system_name}-", dir=p["tmp"]))
    if names == ["nodes500"]:
        try:
            rows = bench_nodes(p, workdir)
        except Exception as exc:
            rows = [_error_row("nodes500", system_name, exc)]
            status = 1
        result_path.write_text(json.dumps(rows))
        return status
    system = make_system(system_name, workdir, WORKERS)
    try:
        system.start()
    except Exception as exc:
        rows = [_error_row(name, system_name, exc) for name in names]
        result_path.write_text(json.dumps(rows))
        _close(system)
        return 1
    try:
        for name in names:
            try:
                rows += BENCHES[name](system, p)
            except Exception as exc:
                rows.append(_error_row(name, system_name, exc))
                status = 1
            result_path.write_text(json.dumps(rows))
    finally:
        _close(system)
    return status


def _close(system: Any) -> None:
    try:
        system.close()
    except Exception as exc:
        print(f"warning: closing {system.name}: {exc}", file=sys.stderr)


def _error_row(workload: str, system: str, exc: BaseException) -> dict:
    traceback.print_exception(exc)
    return {"workload": workload, "system": system, "error": f"{type(exc).__name__}: {exc}"[:300]}


# ====================================================================== the orchestrator


def prepare(p: dict[str, Any], names: list[str], tmp: Path) -> None:
    if "cpu100ms" in names:
        iters = w.calibrate_burn(0.1)
        t = time.process_time()  # CPU time: the serial baseline must not include others' load
        expected = [w.burn_expected(i, iters) for i in range(p["cpu_n"])]
        serial = time.process_time() - t
        p.update(
            burn_iters=iters,
            burn_expected=expected,
            burn_serial=serial,
            burn_call=serial / p["cpu_n"],
        )
        print(
            f"cpu100ms: {iters} iterations ≈ {serial / p['cpu_n'] * 1e3:.0f} ms of CPU a call "
            f"(serial {serial:.1f}s)",
            file=sys.stderr,
        )
    if "wordcount" in names:
        t = time.perf_counter()
        meta = w.make_corpus(tmp / "corpus", p["wc_bytes"])
        p["corpus"] = str(tmp / "corpus" / "manifest.json")
        print(
            f"wordcount: {meta['bytes'] / 1e6:.0f} MB in {len(meta['paths'])} files "
            f"({time.perf_counter() - t:.1f}s to generate)",
            file=sys.stderr,
        )


def run_in_child(system: str, names: list[str], p: dict[str, Any], tmp: Path) -> list[dict]:
    result = tmp / f"result-{system}-{'-'.join(names)}.json"
    params = tmp / f"params-{system}-{'-'.join(names)}.json"
    params.write_text(json.dumps(p))
    print(f"-- {system}: {', '.join(names)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    busy0, ours0 = _machine_busy(), _children_cpu()
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--cell",
            system,
            "--workloads",
            ",".join(names),
            "--params",
            str(params),
            "--result",
            str(result),
        ],
        start_new_session=True,
    )
    try:
        proc.wait(CELL_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:  # whatever the cell left behind (cores, workers, a server) goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    elapsed = time.perf_counter() - t
    others = max(0.0, (_machine_busy() - busy0) - (_children_cpu() - ours0)) / max(elapsed, 1e-9)
    rows = json.loads(result.read_text()) if result.exists() else []
    for r in rows:
        r["bg"] = others
    done = {r["workload"] for r in rows}
    rows = [r for r in rows if "absent" not in r]
    for name in names:
        if name not in done:
            rows.append(
                {
                    "workload": name,
                    "system": system,
                    "error": f"cell exited with {proc.returncode} after {time.perf_counter() - t:.0f}s",
                }
            )
    print(
        f"   {elapsed:.0f}s; other processes on the machine used {others:.2f} cores meanwhile",
        file=sys.stderr,
        flush=True,
    )
    return rows


def _machine_busy() -> float:
    """CPU seconds spent by the whole machine (all processes, all cores) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (workload, system): the median over rounds; an error in any round wins."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rows in rounds:
        for r in rows:
            groups.setdefault((r["workload"], r["system"]), []).append(r)
    merged = []
    for group in groups.values():
        bad = [r for r in group if "error" in r]
        if bad:
            merged.append(bad[0])
            continue
        out = dict(group[-1])
        out["value"] = statistics.median(r["value"] for r in group)
        out["reps"] = [x for r in group for x in r["reps"]]
        out["bg"] = max(r["bg"] for r in group)
        for key in ("per_batch",):
            if key in out:
                out[key] = statistics.median(r[key] for r in group)
        if "peak_rss" in out:
            out["peak_rss"] = max(r["peak_rss"] for r in group)
        if len(group) > 1:
            out["details"] += f"; {len(group)} rounds"
        merged.append(out)
    return merged


def judge(rows: list[dict]) -> list[dict]:
    """Add ratio vs Pool and the target verdict to each row."""
    by = {(r["workload"], r["system"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        pool = by.get((r["workload"], "mp.Pool"))
        r["ratio"] = r["value"] / pool["value"] if pool else None
        r["met"] = None
        if not is_remap(r["system"]):
            continue
        wl, ratio = r["workload"], r["ratio"]
        embedded = r["system"].endswith("embedded")
        if wl in ("trivial10k", "trivial"):
            ray = by.get((wl, "ray.Pool"))
            r["vs_ray"] = r["value"] / ray["value"] if ray else None
            least = 0.25 if wl == "trivial10k" else 0.5
            r["met"] = (
                ratio is not None
                and ratio >= least
                and (r["vs_ray"] is None or r["vs_ray"] >= 2 or wl == "trivial")
            )
        elif wl == "cpu100ms":
            r["met"] = ratio is not None and ratio <= 1.03
        elif wl == "latency":
            r["met"] = ratio is not None and (
                ratio <= 1.5 if embedded else (ratio <= 2 and r["value"] < 0.5)
            )
        elif wl == "mib":
            r["met"] = ratio is not None and ratio >= (0.9 if embedded else 0.75)
        elif wl == "wordcount":
            r["met"] = ratio is not None and ratio >= 0.95
        elif wl in ("async1k", "submit1k", "jobs300", "map1k"):
            r["met"] = ratio is not None and ratio <= 1.5
        elif wl == "lazy10m":
            r["met"] = r["peak_rss"] < 200
        elif wl == "nodes500":
            base = min(
                (x for x in rows if x["workload"] == "nodes500" and "error" not in x),
                key=lambda x: x["nodes"],
            )
            r["met"] = r["per_batch"] <= 1.5 * max(base["per_batch"], 1.0)
    return rows


def fmt_value(r: dict) -> str:
    v, unit = r["value"], r["unit"]
    if unit in ("tasks/s",):
        return f"{v / 1000:,.1f}k tasks/s" if v >= 1000 else f"{v:,.0f} tasks/s"
    if unit in ("MiB/s", "MB/s"):
        return f"{v:,.0f} {unit}"
    if unit == "ms p50":
        return f"{v:.3f} ms p50"
    return f"{v:.2f} {unit}"


def render(rows: list[dict]) -> str:
    order = {name: i for i, name in enumerate(WORKLOADS)}
    sys_order = {name: i for i, name in enumerate(SYSTEMS)}
    rows = sorted(
        rows,
        key=lambda r: (
            order.get(r["workload"], 99),
            sys_order.get(r["system"], 50),
            r.get("nodes", 0),
        ),
    )
    table = [
        ("workload", "system", "figure", "ratio vs Pool", "target", "met?", "bg load", "details")
    ]
    for r in rows:
        if "error" in r:
            table.append((r["workload"], r["system"], "ERROR", "", "", "", "", r["error"]))
            continue
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}×"
        if r.get("vs_ray") is not None:
            ratio += f" ({r['vs_ray']:.2f}× Ray)"
        target = TARGETS[r["workload"]] if is_remap(r["system"]) else ""
        met = {None: "", True: "yes", False: "NO"}[r.get("met")]
        bg = f"{r['bg']:.2f}" if "bg" in r else ""
        table.append(
            (r["workload"], r["system"], fmt_value(r), ratio, target, met, bg, r.get("details", ""))
        )
    widths = [max(len(str(line[i])) for line in table) for i in range(len(table[0]))]
    out = []
    for k, line in enumerate(table):
        out.append("| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(line)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs and fewer repetitions")
    ap.add_argument("--only", help=f"comma-separated workloads: {', '.join(WORKLOADS)}")
    ap.add_argument("--systems", help=f"comma-separated systems: {', '.join(SYSTEMS)}")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every cell this many times, interleaved, and take medians (default 1)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run trivial and mib on remap under py-spy and print where time goes",
    )
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cell:
        p = json.loads(Path(args.params).read_text())
        return run_cell(args.cell, args.workloads.split(","), p, Path(args.result))

    names = list(DEFAULT_WORKLOADS)
    if args.only:
        names = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in names if x not in WORKLOADS]
        if unknown:
            ap.error(
                f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
            )
    systems = list(SYSTEMS)
    if args.systems:
        systems = [x.strip() for x in args.systems.split(",") if x.strip()]
        unknown = [x for x in systems if x not in SYSTEMS]
        if unknown:
            ap.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.profile:
        names = names if args.only else ["trivial", "mib"]
        systems = [s for s in systems if is_remap(s)]

    with tempfile.TemporaryDirectory(prefix="remap-bench-") as tmpdir:
        tmp = Path(tmpdir)
        p = params_for(args.quick)
        p["tmp"] = str(tmp)
        if args.profile:
            p["profile_dir"] = str(tmp / "profiles")
            Path(p["profile_dir"]).mkdir()
        prepare(p, names, tmp)
        skipped = [f"{s}: {available(s)}" for s in systems if available(s)]
        systems = [s for s in systems if not available(s)]
        shared = [x for x in names if x in SHARED_CELL]
        rounds: list[list[dict]] = []
        for k in range(args.rounds):
            if args.rounds > 1:
                print(f"== round {k + 1} of {args.rounds}", file=sys.stderr, flush=True)
            rows: list[dict] = []
            if shared:
                for system in systems:
                    rows += run_in_child(system, shared, p, tmp)
            if "nodes500" in names and "remap-procs" in systems:
                rows += run_in_child("remap-procs", ["nodes500"], p, tmp)
            rounds.append(rows)
        rows = merge_rounds(rounds)
        if "lazy10m" in names:  # minutes each: one round only
            for system in systems:
                if system in LAZY_SYSTEMS:
                    rows += [
                        dict(r, bg=r.get("bg", 0.0))
                        for r in run_in_child(system, ["lazy10m"], p, tmp)
                    ]
        rows = judge(rows)
        print()
        print(
            f"remap bench, {time.strftime('%Y-%m-%d')}, {platform.python_implementation()} "
            f"{platform.python_version()}, {os.cpu_count()} cores, workers={WORKERS}"
            f"{', --quick' if args.quick else ''}"
        )
        print(render(rows))
        print(
            "bg load: cores used by processes outside the bench while that system's cell ran "
            "(other users of this machine); ratios are only as good as that is small."
        )
        for line in skipped:
            print(f"not run: {line}")
        if args.profile:
            print()
            for path in sorted(Path(p["profile_dir"]).glob("*.txt")):
                print(summarize_profile(path))
                print()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    errors = [r for r in rows if "error" in r]
    wrong = [r for r in errors if "WRONG RESULT" in r["error"]]
    if wrong:
        print(f"\nFAILED: {len(wrong)} wrong result(s)", file=sys.stderr)
    elif errors:
        print(f"\nFAILED: {len(errors)} workload(s) did not run", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
