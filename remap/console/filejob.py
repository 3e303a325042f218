"""``compute`` of ``kind: mapreduce`` and ``kind: vertex`` job files: the job's driver with
progress, then its summary (``--json``: one object). A detached job's driver process runs the
same driver (:func:`run_file_job`) and reports its progress to the server instead."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..data.layout import new_job_id
from ..errors import EXIT_INTERRUPTED, JobFailed, JobKilled, RemapError
from . import render

if TYPE_CHECKING:
    from ..vertex.driver import SuperstepReport


def report_line(report: SuperstepReport) -> str:
    """``superstep 12: 300 active, 570 messages, dangling=0.0123``: one barrier, one line."""
    text = f"superstep {report.superstep}: {report.active} active, {report.delivered} messages"
    for name, value in sorted(report.aggregates.items()):
        shown = f"{value:.6g}" if isinstance(value, float) else repr(value)
        text += f", {name}={shown[:40]}"
    if report.errors:
        text += f", {report.errors} errors"
    return text


def run_file_job(
    spec: Any,
    settings: Any,
    connect: Callable[[], Any],
    job_id: str,
    on_progress: Callable[..., None],
    on_notice: Callable[[str], None] | None = None,
    on_output: Callable[[int, str], None] | None = None,
    wait_for_nodes: float | None = None,
) -> dict[str, Any]:
    """Run a data or vertex job file's driver here to its end; its summary (JobFailed,
    JobKilled). The job's own mistakes are raised before ``connect()`` is called;
    ``on_progress(phase=, done=, total=, line=, sub_job=)`` runs at every report;
    ``on_output(index, text)`` gets what the tasks print or log (on the reactor thread);
    ``wait_for_nodes``: fail if no node can run a phase (or the workers) within that time."""
    if spec.kind == "mapreduce":
        from ..data.driver import DataJobRunner
        from ..data.jobspec import to_job
        from ..data.layout import DataDir

        job, data = to_job(spec), DataDir.from_setting(settings.data_dir)
        runner = DataJobRunner(
            connect(),
            job,
            data,
            on_progress=lambda p: on_progress(
                phase=p.phase,
                done=p.tasks_done,
                total=p.tasks_total or None,
                line=p.line(),
                sub_job=p.phase_job,
            ),
            on_notice=on_notice,
            on_output=on_output,
            job_id=job_id,
            wait_for_nodes=wait_for_nodes,
        )
        return runner.run()
    from ..data.jobspec import shipped_with
    from ..vertex.jobspec import to_run
    from ..vertex.run import run_vertex

    program, config = to_run(spec)
    shipped = shipped_with(spec)
    launched: list[Any] = []
    client = connect()
    # reading the graph can take minutes before the first superstep reports: say so at once
    size = sum(os.path.getsize(p) for p in config.input)
    files = render.plural(len(config.input), "file")
    on_progress(
        phase="loading",
        done=0,
        total=spec.max_supersteps,
        line=f"loading the graph: {files} ({render.fmt_bytes(size)})",
        sub_job=None,
    )
    result = run_vertex(
        client,
        settings,
        program,
        config,
        group=spec.group,
        retries=spec.retries,
        priority=spec.priority,
        bundle=shipped,
        job_id=job_id,
        on_launch=launched.append,
        on_output=on_output,
        wait_for_nodes=wait_for_nodes,
        on_report=lambda r: on_progress(
            phase=f"superstep {r.superstep}",
            done=r.superstep + 1,
            total=spec.max_supersteps,
            line=report_line(r),
            sub_job=launched[0].run.job_id if launched else None,
        ),
    )
    return result.to_json()


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler: the drivers end a job on KeyboardInterrupt (kill, clean up)."""
    raise KeyboardInterrupt


#: set once a SIGTERM ended a command: the interactive shell leaves after it, as told
TERMINATED = threading.Event()


def _terminate(signum: int, frame: Any) -> None:
    TERMINATED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``, a CI's cancel) ends an attached job as Ctrl-C does: a
    data or vertex job's driver kills its phase and removes its staging output and intermediate
    files, which the default action (exit at once) left behind; a function job is killed on
    the server at once (not after its console's grace) and says what it kept. Main thread
    only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def compute_file_job(console: Any, spec: Any, args: argparse.Namespace) -> int:
    """Run a data or vertex job attached to this console; print its summary (``--json``: one
    object). A progress bar on a terminal, else a line now and then (none with --json)."""
    session = console.session
    bar = render.progress_bar(console.err, args.quiet)
    job_id = new_job_id()
    every, prefix = (5.0, f"job {job_id}: ") if spec.kind == "mapreduce" else (2.0, "")
    last = [time.monotonic()]
    output: queue.SimpleQueue[str] = queue.SimpleQueue()
    show_output = session.settings.task_output and not args.no_task_output

    def connect() -> Any:
        client = session.connect(allow_embedded=True)
        if args.dashboard:  # as for a function job: the embedded cluster serves one while it runs
            console.note(f"dashboard: {session.dashboard_link()}")
        return client

    def on_progress(done: int, total: int | None, line: str, **_: Any) -> None:
        render.print_task_output(output, bar, console.err)
        if bar is not None:
            bar.draw(done, 0, total, line)
        elif not args.json and not args.quiet and time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            console.note(prefix + line)

    try:
        with terminate_as_interrupt():
            summary = run_file_job(
                spec,
                session.settings,
                connect,
                job_id,
                on_progress,
                console.note if spec.kind == "mapreduce" else None,
                (lambda index, text: output.put(text)) if show_output else None,
                args.wait_for_nodes,
            )
    except RemapError as exc:  # failed, killed, or could not start (no server, no input)
        if isinstance(exc, JobFailed):
            if bar is not None:
                bar.clear()
            tb = exc.remote_traceback
            exc = console.with_traceback(exc, tb, "the first failure", args.traceback)
        print_failure(console, args.json, spec.kind, job_id, exc)
        raise exc from None
    except KeyboardInterrupt:  # the driver killed its phase and removed what it had written
        if bar is not None:
            bar.clear()
        kind = "data" if spec.kind == "mapreduce" else spec.kind
        console.note(f"interrupted: {kind} job {job_id} killed; nothing was published")
        # --json: a script still reads one object, as for a function job
        error = JobKilled(f"{kind} job {job_id} was interrupted and killed; nothing was published")
        print_failure(console, args.json, spec.kind, job_id, error, exit_code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    finally:
        render.print_task_output(output, bar, console.err)  # what came with the last results
        if bar is not None:
            bar.clear()
    return print_summary(console, spec.kind, summary, args.json)


def print_failure(
    console: Any, as_json: bool, kind: str, job_id: str, exc: RemapError, **extra: Any
) -> None:
    """``--json``: a data or vertex job that failed, was killed or could not start still
    prints one object on stdout, as a function job does (its error line goes to stderr)."""
    if as_json:
        console.say(json.dumps({**render.failure_json(exc, job_id), "kind": kind, **extra}))


def print_summary(console: Any, kind: str, summary: dict[str, Any], as_json: bool) -> int:
    """A finished data job's summary or a vertex job's (``VertexResult.to_json()``): one JSON
    object, or lines for a person. Returns the exit code: 5 (as a function job with failed
    arguments) if records or vertices failed under ``on_error: continue``."""
    from .main import EXIT_FAILED_ARGUMENTS

    if kind == "mapreduce":
        c = summary["counters"]
        errors = c.get("map_errors", 0) + c.get("reduce_errors", 0)
    else:
        errors = summary["errors"]
    code = EXIT_FAILED_ARGUMENTS if errors else 0
    if as_json:
        console.say(json.dumps(summary))
    elif kind == "mapreduce":
        console.say(
            f"{summary['state']}: {c.get('map_records_in', 0)} records in "
            f"{render.plural(summary['files'], 'file')} "
            f"({render.fmt_bytes(summary['bytes'])}) -> "
            f"{c.get('reduce_records_out', 0)} records in {summary['output']} "
            f"in {render.fmt_duration(summary['timings'].get('total', 0))}"
        )
        console.say(f"job directory: {summary['job_dir']}")
        if errors:
            console.note(
                f"{errors} record(s) failed (on_error: continue); see "
                f"{summary['job_dir']}/errors.log (exit code {code})"
            )
    else:
        console.say(
            f"{summary['state']}: {summary['supersteps']} supersteps, {summary['vertices']} "
            f"vertices, {summary['messages']} messages "
            f"({render.fmt_bytes(summary['bytes_moved'])} between workers) on "
            f"{summary['workers']} workers -> {summary['output']} in "
            f"{render.fmt_duration(summary['elapsed'])}"
        )
        if summary["rollbacks"]:
            console.note(f"{summary['rollbacks']} rollback(s) after lost workers")
        if errors:
            console.note(
                f"{errors} error(s) in vertices or input lines (on_error: continue): "
                f"{summary['first_error']} (exit code {code})"
            )
        console.say(f"job directory: {summary['job_dir']}")
    return code
