"""Where one ``Cluster.submit(f, x).result()`` spends its time, hop by hop.

    python bench/call_hops.py [CALLS]            # the embedded cluster
    python bench/call_hops.py --procs [CALLS]    # a server and a node process, over TCP
    CALL_HOPS_CPROFILE=/tmp/hops python bench/call_hops.py --procs   # + cProfile of both
    CALL_HOPS_OPCODES=/tmp/ops python bench/call_hops.py --procs    # + bytecodes per function
    CALL_HOPS_SEQ=/tmp/seq python bench/call_hops.py --procs 2      # + every function in order

Wraps a few of remap's methods to timestamp each hop (caller → reactor → scheduler → node →
core pipe → the function in the core → back) and prints the median time of each, from the
submit, over CALLS calls (default 300). The function returns its own timestamp. With
``--procs`` the server and the node run as processes of their own (started through this file
with the same wrappers, marks written at exit); every process reads the same monotonic clock,
so a mark is given to the call whose submit and return enclose it. A measuring aid: the
wrappers themselves cost ~1 µs each. With ``--procs`` the Python functions entered per call
are also counted in the server's and the node's main thread (over up to 200 calls, after the
timed ones); ``CALL_HOPS_CPROFILE`` profiles the same calls there instead of counting, and
``CALL_HOPS_OPCODES`` counts the bytecodes each function executes (``PREFIX.ROLE.txt``, the
busiest first): a cost measure that cProfile's per-call overhead does not distort;
``CALL_HOPS_SEQ`` writes every function entered, in order and indented by depth, with its own
bytecodes (``PREFIX.ROLE.txt``): one call's path through each process, read top to bottom.
"""

from __future__ import annotations

import atexit
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARKS: list[tuple[str, int]] = []


def _mark(label: str) -> None:
    MARKS.append((label, time.perf_counter_ns()))


def _wrap(cls: Any, name: str, label: str) -> None:
    original = getattr(cls, name, None)
    if original is None:  # an older or newer tree: that hop is not marked
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _mark(label)
        return original(*args, **kwargs)

    setattr(cls, name, wrapped)


def now(_: Any) -> int:
    return time.perf_counter_ns()


def _wrap_server() -> None:
    from remap.server.scheduler import core as scheduler

    _wrap(scheduler.Scheduler, "args_received", "server: args")
    _wrap(scheduler.Scheduler, "task_result", "server: result")


def _wrap_node() -> None:
    from remap.node import agent, cores

    _wrap(agent.NodeAgent, "message_received", "node: a message")
    _wrap(cores.CoreProcess, "send", "node: written to the core's pipe")
    # the read of a core's answer (one whole frame is handled there without _answers)
    _wrap(cores.CoreProcess, "_read", "node: read from the core's pipe")


def _wrap_console() -> None:
    from remap import api, client, wire
    from remap import executor as ex

    _wrap(api.JobStream, "_wake", "reactor: the stream woken")
    # a lone call to a server: its arguments leave from the calling thread instead
    _wrap(wire.PeerProtocol, "send_from_thread", "caller: writes its args")
    _wrap(client.JobStream, "results", "console: results")
    # a lone result is set straight from its message (_resolve_one); a batch's through _resolve_now
    resolves = "_resolve_one" if hasattr(ex._SubmitStream, "_resolve_one") else "_resolve_now"
    _wrap(ex._SubmitStream, resolves, "console: future resolved")


def _wrap_bytes_in(role: str) -> None:
    from remap import wire

    _wrap(wire.PeerProtocol, "dataReceived", f"{role}: bytes in")


def _opcode_tracer(opcodes: dict[str, int]) -> Any:
    """A ``sys.settrace`` function adding each bytecode executed to ``opcodes[file:function]``."""

    def trace(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        key = f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            opcodes[key] = opcodes.get(key, 0) + 1
        return trace

    return trace


def _sequence_tracer(seq: list[list[Any]], depth: list[int]) -> Any:
    """A ``sys.settrace`` function appending ``[depth, file:function, own bytecodes]`` to
    ``seq`` for every function entered, in order."""

    def sequence(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            code = frame.f_code
            frame.f_trace_opcodes = True
            row = [depth[0], f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}", 0]
            seq.append(row)
            depth[0] += 1

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "opcode":
                    row[2] += 1
                elif event == "return":
                    depth[0] -= 1
                return local

            return local
        return None

    return sequence


def _write_sequence(path: str, seq: list[list[Any]]) -> None:
    Path(path).write_text("".join(f"{'  ' * d}{k} {n}\n" for d, k, n in seq))


def _write_opcodes(path: str, opcodes: dict[str, int], calls: int | None = None) -> None:
    """The counts, busiest first; divided by ``calls`` when given (else totals)."""
    rows = sorted(opcodes.items(), key=lambda kv: -kv[1])
    per = calls or 1
    head = f"{sum(opcodes.values()) / per:.0f} in all{' per call' if calls else ''}\n"
    Path(path).write_text(head + "".join(f"{n / per:g} {k}\n" for k, n in rows))


def _count_on_signals(role: str, marks_file: str) -> None:
    """SIGUSR1 starts counting the Python functions the main (reactor) thread enters, SIGUSR2
    stops and writes the count to ``MARKS_FILE.calls``; with ``CALL_HOPS_CPROFILE=PREFIX`` in
    the environment the same window is profiled instead (``PREFIX.ROLE.prof``, for pstats)."""
    import signal

    count = [0]
    opcodes: dict[str, int] = {}
    op_prefix = os.environ.get("CALL_HOPS_OPCODES")
    seq_prefix = os.environ.get("CALL_HOPS_SEQ")
    seq: list[list[Any]] = []  # [depth, function, own bytecodes] in the order entered
    depth = [0]
    prefix = os.environ.get("CALL_HOPS_CPROFILE")
    profiler: Any = None
    if prefix:
        import cProfile

        profiler = cProfile.Profile()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            count[0] += 1

    trace = _opcode_tracer(opcodes)
    sequence = _sequence_tracer(seq, depth)

    def start(*_: Any) -> None:
        count[0] = 0
        if seq_prefix:
            seq.clear()
            depth[0] = 0
            sys.settrace(sequence)
        elif profiler is not None:
            profiler.enable()
        elif op_prefix:
            opcodes.clear()
            sys.settrace(trace)
        else:
            sys.setprofile(profile)
        Path(f"{marks_file}.counting").write_text("1")

    def stop(*_: Any) -> None:
        if seq_prefix:
            sys.settrace(None)
            _write_sequence(f"{seq_prefix}.{role}.txt", seq)
        elif profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{prefix}.{role}.prof")
        elif op_prefix:
            sys.settrace(None)
            _write_opcodes(f"{op_prefix}.{role}.txt", opcodes)
        else:
            sys.setprofile(None)
        Path(f"{marks_file}.calls").write_text(str(count[0]))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def serve(role: str, marks_file: str, argv: list[str]) -> None:
    """Run ``remap-server`` or ``remap-node`` with the wrappers; write the marks at exit."""
    _wrap_bytes_in(role)
    _count_on_signals(role, marks_file)
    if role == "server":
        _wrap_server()
        from remap.server.main import main as entry
    else:
        _wrap_node()
        from remap.node.main import main as entry

    def dump() -> None:
        with open(marks_file, "w") as f:
            f.writelines(f"{t} {label}\n" for label, t in MARKS)

    atexit.register(dump)
    sys.exit(entry(argv))


def _spawn(role: str, marks: Path, argv: list[str], env: dict[str, str], log: Path) -> Any:
    cmd = [sys.executable, __file__, "--serve", role, str(marks), *argv]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


#: CPU seconds per call, by who spent them (load-independent, unlike the wall times)
CPU: dict[str, float] = {}


def _reactor_cpu(cluster: Any) -> float:
    """CPU time of the reactor thread (console; and the server and node when embedded)."""
    from remap import runtime

    return runtime.run(lambda: time.thread_time(), timeout=10)


#: Python function calls per call, by thread
PY_CALLS: dict[str, float] = {}


def _python_calls(cluster: Any, calls: int, counters: Any = None) -> float:
    """Python functions the reactor thread enters per call (``sys.setprofile``): the work on
    the reactor that no wall time can hide, whatever the load. ``counters``: a context manager
    counting the same in other processes over the same calls."""
    import contextlib

    from remap import runtime

    count = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            count[0] += 1

    op_prefix = os.environ.get("CALL_HOPS_OPCODES")
    if op_prefix:  # bytecodes on the calling thread and the console's reactor thread
        caller: dict[str, int] = {}
        reactor: dict[str, int] = {}
        runtime.run(sys.settrace, _opcode_tracer(reactor), timeout=10)
        with counters or contextlib.nullcontext():
            sys.settrace(_opcode_tracer(caller))
            try:
                for _ in range(calls):
                    cluster.submit(now, 1).result()
            finally:
                sys.settrace(None)
                runtime.run(sys.settrace, None, timeout=10)
        _write_opcodes(f"{op_prefix}.caller.txt", caller, calls)
        _write_opcodes(f"{op_prefix}.console.txt", reactor, calls)
        return 0.0

    with counters or contextlib.nullcontext():
        runtime.run(sys.setprofile, profile, timeout=10)
        try:
            for _ in range(calls):
                cluster.submit(now, 1).result()
        finally:
            runtime.run(sys.setprofile, None, timeout=10)
    return count[0] / calls


def _calls(
    cluster: Any, calls: int, others: Any = dict, counters: Any = None
) -> list[list[tuple[str, int]]]:
    """``others()``: CPU seconds spent so far by other processes, by name; ``counters``: see
    :func:`_python_calls`."""
    for _ in range(20):
        cluster.submit(now, 1).result()
    rows = []
    reactor0, caller0, others0 = _reactor_cpu(cluster), time.thread_time(), others()
    for _ in range(calls):
        MARKS.clear()
        _mark("caller: submit")
        future = cluster.submit(now, 1)
        _mark("caller: submit returned")
        ran = future.result()
        _mark("caller: woke with the result")
        MARKS.append(("core: the function runs", ran))
        rows.append(list(MARKS))
    CPU["calling thread"] = (time.thread_time() - caller0) / calls
    CPU["reactor thread"] = (_reactor_cpu(cluster) - reactor0) / calls
    for name, spent in others().items():
        CPU[name] = (spent - others0[name]) / calls
    n = min(calls, 200)
    PY_CALLS["reactor thread"] = _python_calls(cluster, n, counters)
    for name, count in COUNTED.items():
        PY_CALLS[name] = count / n
    return rows


#: Python function calls in the server's and node's main threads over the counted calls
COUNTED: dict[str, int] = {}


class _ProcessCounters:
    """Count Python calls in the server and node processes (see :func:`_count_on_signals`)."""

    def __init__(self, procs: dict[str, Any], work: Path) -> None:
        self.procs, self.work = procs, work

    def _signal_all(self, sig: int, suffix: str) -> None:
        from bench.systems import wait_for

        for name, proc in self.procs.items():
            done = self.work / f"{name}.marks.{suffix}"
            done.unlink(missing_ok=True)
            proc.send_signal(sig)
            wait_for(done.exists, 30, f"the {name} to answer a signal")

    def __enter__(self) -> None:
        import signal

        self._signal_all(signal.SIGUSR1, "counting")

    def __exit__(self, *exc: Any) -> None:
        import signal

        self._signal_all(signal.SIGUSR2, "calls")
        for name in self.procs:
            text = (self.work / f"{name}.marks.calls").read_text()
            COUNTED[f"{name} process (main thread)"] = int(text)


def run_procs(calls: int) -> list[list[tuple[str, int]]]:
    import psutil

    import remap
    from bench.systems import wait_for
    from remap.settings import load_settings

    _wrap_console()
    _wrap_bytes_in("console")
    secret = secrets.token_urlsafe(32)
    work = Path(tempfile.mkdtemp(prefix="remap-hops-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    env.update(REMAP_SECRET_KEY=secret, HOME=str(work), REMAP_STATE_DIR=str(work / "state"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    port_file = work / "port"
    common = ["--env-file", "/dev/null", "--log-level", "warn"]
    procs = {
        "server": _spawn(
            "server",
            work / "server.marks",
            ["--port", "0", "--port-file", str(port_file), *common],
            env,
            work / "server.log",
        )
    }
    try:
        port = wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(), 30, "the server"
        )
        address = f"127.0.0.1:{port}"
        procs["node"] = _spawn(
            "node",
            work / "node.marks",
            ["--server", address, "--cores", "2", *common],
            env,
            work / "node.log",
        )
        settings = load_settings({}, environ={}, dotenv_path=None)
        with remap.connect(address, secret=secret, settings=settings, task_output=False) as c:
            wait_for(lambda: c.cores() >= 2, 30, "a node with 2 cores")

            def others() -> dict[str, float]:
                return {
                    f"{name} process (not its cores)": sum(psutil.Process(p.pid).cpu_times()[:2])
                    for name, p in procs.items()
                }

            rows = _calls(c, calls, others, _ProcessCounters(procs, work))
    finally:
        for name in ("node", "server"):
            if name in procs:
                procs[name].terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
    remote: list[tuple[str, int]] = []
    for name in ("server", "node"):
        path = work / f"{name}.marks"
        if path.exists():
            for line in path.read_text().splitlines():
                t, label = line.split(" ", 1)
                remote.append((label, int(t)))
    remote.sort(key=lambda m: m[1])
    for row in rows:
        start, end = row[0][1], row[-2][1]  # submit .. the caller woke
        row.extend(m for m in remote if start <= m[1] <= end)
    return rows


def run_embedded(calls: int) -> list[list[tuple[str, int]]]:
    import remap

    _wrap_console()
    _wrap_server()
    _wrap_node()
    with remap.connect(cores=2, task_output=False) as c:
        return _calls(c, calls)


#: spans measured call by call (median of the differences, not difference of the medians)
SPANS = (
    ("the client's part of the answer", "server: result", "caller: woke with the result"),
    ("the client's part of the submit", "caller: submit", "server: bytes in"),
)


def report(rows: list[list[tuple[str, int]]]) -> None:
    for name, first, last in SPANS:
        spans = []
        for row in rows:
            marks = dict(reversed(row))  # the first mark of each label
            if first in marks and last in marks:
                spans.append((marks[last] - marks[first]) / 1000)
        if len(spans) >= len(rows) // 2 and spans:
            print(f"{statistics.median(spans):8.1f} µs  {name} ({first} → {last}), median")
    times: dict[str, list[float]] = {}
    for row in rows:
        row = sorted(row, key=lambda m: m[1])
        start, seen = row[0][1], {}
        for label, t in row:
            seen[label] = seen.get(label, 0) + 1
            key = label if seen[label] == 1 else f"{label} #{seen[label]}"
            times.setdefault(key, []).append((t - start) / 1000)
    previous = 0.0
    for label in sorted(times, key=lambda k: statistics.median(times[k])):
        if len(times[label]) < len(rows) // 2:
            continue  # a heartbeat or a timer, not part of every call
        median = statistics.median(times[label])
        print(f"{median:8.1f} µs  (+{median - previous:6.1f})  {label}")
        previous = median


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve(argv[1], argv[2], argv[3:])
        return
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    procs = "--procs" in argv
    rest = [a for a in argv if a != "--procs"]
    if rest and not rest[0].isdigit():
        sys.exit(f"call_hops: CALLS must be a whole number, not {rest[0]!r} (see --help)")
    calls = int(rest[0]) if rest else 300
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    report(run_procs(calls) if procs else run_embedded(calls))
    for name, seconds in CPU.items():
        print(f"CPU per call: {seconds * 1e6:6.1f} µs  {name}")
    for name, count in PY_CALLS.items():
        if "process" in name and os.environ.get("CALL_HOPS_OPCODES"):
            print(f"bytecodes per function, all calls: {os.environ['CALL_HOPS_OPCODES']}.*.txt")
            break
        print(f"Python function calls per call: {count:6.1f}  {name}")
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main(sys.argv[1:])
