"""How the console shows things to a person: progress, tables, one-line errors."""

from __future__ import annotations

import contextlib
import queue
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from protocol.status import JobStatus, NodeStatus

from ..errors import JobKilled, RemapError
from ..sinks import to_jsonable


def plural(count: int, noun: str) -> str:
    """``1 result``, ``2 results`` (no thousands separator: the line stays as it was)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def fmt_rate(rate: float) -> str:
    """Tasks a second: whole above 10, else with a tenth, so a job of slow tasks (a data job's
    map phase, seconds a task) shows ``0.4/s``, not ``0/s`` as if it were stalled."""
    return f"{rate:,.0f}" if rate >= 9.95 else f"{rate:.1f}".removesuffix(".0")


def fmt_duration(seconds: float) -> str:
    if 0 < seconds < 1:
        return "<1s"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class Progress:
    """A one-line progress bar with rate and ETA, redrawn in place on a terminal."""

    def __init__(
        self, out: TextIO = sys.stderr, width: int = 28, clock: Any = time.monotonic
    ) -> None:
        self.out = out
        self.width = width
        self.clock = clock
        self.started = clock()
        self.shown = False

    def draw(self, done: int, failed: int, total: int | None, note: str = "") -> None:
        elapsed = max(self.clock() - self.started, 1e-6)
        finished = done + failed
        rate = finished / elapsed
        if total:
            frac = min(1.0, finished / total)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            # no rate before the first result: an ETA would be a made-up "0s"
            eta = f"ETA {fmt_duration((total - finished) / rate)}" if rate > 0 else "ETA ?"
            line = f"[{bar}] {finished}/{total} {frac * 100:5.1f}% {fmt_rate(rate)}/s {eta}"
        else:
            line = f"{finished} done {fmt_rate(rate)}/s {fmt_duration(elapsed)}"
        if failed:
            line += f" ({failed} failed)"
        if note:
            line += f"  {note}"
        self.out.write("\r" + line[:160] + "\x1b[K")
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False


def progress_bar(out: TextIO, quiet: bool) -> Progress | None:
    """A progress bar on a terminal unless told to be quiet."""
    return Progress(out) if out.isatty() and not quiet else None


def print_task_output(
    output: queue.SimpleQueue,
    bar: Progress | None,
    out: TextIO,
    lock: Any = contextlib.nullcontext(),
) -> None:
    """What tasks printed or logged since the last call (queued by the reactor thread), each
    line naming node and core; the bar cleared first."""
    while True:
        try:
            text = output.get_nowait()
        except queue.Empty:
            return
        with lock:
            if bar is not None:
                bar.clear()
            out.write(text)
            out.flush()


def jsonable(value: Any) -> Any:
    """The JSON form of one value (its repr when JSON has none)."""
    return to_jsonable(value)[0]


def failure_json(exc: RemapError, job: Any) -> dict[str, Any]:
    """What ``compute --json`` prints for a job that did not finish (or never began)."""
    return {
        "job": job,
        "state": "killed" if isinstance(exc, JobKilled) else "failed",
        "error": str(exc),
        "exit_code": exc.exit_code,
    }


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def nodes_table(nodes: list[NodeStatus]) -> str:
    if not nodes:
        return "no nodes connected"
    rows = [
        [
            n.id[:8],
            n.host,
            f"{n.busy}/{n.cores}",
            fmt_bytes(n.memory),
            f"{n.load:.2f}",
            n.group or "-",
            n.state,
            fmt_duration(n.connected_for),
            n.tasks_done,
        ]
        for n in nodes
    ]
    return table(rows, ["NODE", "HOST", "BUSY", "MEMORY", "LOAD", "GROUP", "STATE", "UP", "TASKS"])


def jobs_table(jobs: list[JobStatus]) -> str:
    if not jobs:
        return "no jobs"
    rows = []
    for j in jobs:
        total = j.total if j.total is not None else f"{j.received}+"
        state = j.shown_state + (f" ({j.waiting})" if j.waiting else "")
        rows.append(
            [
                j.id,
                j.name,
                state,
                j.mode,
                j.done,
                j.failed,
                j.running,
                total,
                f"{fmt_rate(j.rate)}/s",
                _share(j),
            ]
        )
    return table(
        rows,
        ["JOB", "NAME", "STATE", "MODE", "DONE", "FAILED", "RUNNING", "TOTAL", "RATE", "CORES"],
    )


def _share(job: JobStatus) -> str:
    """Cores in use, the share the job is entitled to, its weight: ``3 (25% w2)``; ``-``
    for a job the server gives no share (a detached job's driver) or that has ended."""
    if not job.shared or job.state != "running":
        return "-"
    cap = f" max {job.max_cores}" if job.max_cores else ""
    share = f"{job.share * 100:.0f}%" if job.share else "-"
    return f"{job.cores} ({share} w{job.weight:g}{cap})"


def status_text(
    nodes: list[NodeStatus], jobs: list[JobStatus], excluded: Sequence[str] = (), journal: str = ""
) -> str:
    cores = sum(n.cores for n in nodes)
    busy = sum(n.busy for n in nodes)
    running = [j for j in jobs if j.state == "running"]
    rate = sum(j.rate for j in running)
    idle = sum(1 for j in running if j.idle)
    head = (
        f"{plural(len(nodes), 'node')}, {busy}/{cores} cores busy, "
        f"{plural(len(running), 'job')} running"
        + (f" ({idle} idle)" if idle else "")
        + f", {fmt_rate(rate)} tasks/s"
    )
    if excluded:
        head += f"\nexcluded hosts (no work until `include`): {', '.join(excluded)}"
    if journal:  # (the server's journal cannot write: it keeps the rows and tries again)
        head += f"\n{journal}"
    return "\n\n".join([head, nodes_table(nodes), jobs_table(jobs), *file_job_lines(nodes, jobs)])


def file_job_lines(nodes: list[NodeStatus], jobs: list[JobStatus]) -> list[str]:
    """Nodes left out of file jobs and why; running file jobs' counters (empty: nothing)."""
    lines = [
        f"node {n.host}: left out of file jobs: cannot use its data directory "
        f"{n.data_dir}: {n.data_error}"
        for n in nodes
        if n.data_error
    ]
    for j in jobs:
        if j.state != "running":  # an ended job's counters are in its summary
            continue
        for host, why in sorted((j.left_out or {}).items()):
            lines.append(f"job {j.id}: node {host} left out: {why}")
        if j.counters:
            counts = ", ".join(f"{k} {v:,}" for k, v in sorted(j.counters.items()))
            lines.append(f"job {j.id} counters: {counts}")
    return ["\n".join(lines)] if lines else []
