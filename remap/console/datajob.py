"""``compute`` for ``kind: mapreduce`` job files: run the data job's driver with progress."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..data.driver import DataJobRunner, DataProgress
from ..data.jobspec import MapReduceSpec, to_job
from ..data.layout import DataDir
from ..errors import JobFailed, JobKilled
from . import render


def compute_data(console: Any, spec: MapReduceSpec, args: argparse.Namespace) -> int:
    """Run a data job attached to this console; print its summary (``--json``: one object)."""
    job = to_job(spec)
    session = console.session
    data = DataDir.from_setting(session.settings.data_dir)
    client = session.connect(allow_embedded=True)
    bar = render.Progress(console.err) if (console.err.isatty() and not args.quiet) else None
    last = [time.monotonic()]

    def on_progress(progress: DataProgress) -> None:
        if bar is not None:
            bar.draw(progress.tasks_done, 0, progress.tasks_total or None, progress.line())
        elif not args.json and not args.quiet and time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            console.note(f"job {progress.job_id}: {progress.line()}")

    runner = DataJobRunner(client, job, data, on_progress=on_progress, on_notice=console.note)
    try:
        summary = runner.run()
    except JobFailed as exc:
        print_failure(console, args.json, "mapreduce", runner.job_id, exc)
        raise
    finally:
        if bar is not None:
            bar.clear()
    return print_summary(console, summary, args.json)


def print_failure(console: Any, as_json: bool, kind: str, job_id: str, exc: JobFailed) -> None:
    """``--json``: a data or vertex job that failed or was killed still prints one object on
    stdout, as a function job does (its error line goes to stderr as usual)."""
    if as_json:
        state = "killed" if isinstance(exc, JobKilled) else "failed"
        console.say(
            json.dumps(
                {
                    "job": job_id,
                    "kind": kind,
                    "state": state,
                    "error": str(exc),
                    "exit_code": exc.exit_code,
                }
            )
        )


def print_summary(console: Any, summary: dict[str, Any], as_json: bool) -> int:
    """A finished data job's summary: one JSON object, or a line for a person. Returns the
    exit code: 5 (as a function job with failed arguments) if records failed under continue."""
    from .main import EXIT_FAILED_ARGUMENTS

    c = summary["counters"]
    errors = c.get("map_errors", 0) + c.get("reduce_errors", 0)
    code = EXIT_FAILED_ARGUMENTS if errors else 0
    if as_json:
        console.say(json.dumps(summary))
        return code
    console.say(
        f"{summary['state']}: {c.get('map_records_in', 0)} records in "
        f"{summary['files']} files ({render.fmt_bytes(summary['bytes'])}) -> "
        f"{c.get('reduce_records_out', 0)} records in {summary['output']} "
        f"in {render.fmt_duration(summary['timings'].get('total', 0))}"
    )
    console.say(f"job directory: {summary['job_dir']}")
    if errors:
        console.note(
            f"{errors} record(s) failed (on_error: continue); see {summary['job_dir']}/errors.log"
            f" (exit code {code})"
        )
    return code
