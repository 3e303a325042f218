"""``compute`` for ``kind: vertex`` job files: run the vertex driver with progress by superstep."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..data.layout import new_job_id
from ..errors import JobFailed
from ..vertex.jobspec import VertexSpec, to_run
from ..vertex.reference import SuperstepReport
from ..vertex.run import run_vertex
from . import render
from .datajob import print_failure


def report_line(report: SuperstepReport) -> str:
    """``superstep 12: 300 active, 570 messages, dangling=0.0123``: one barrier, one line."""
    text = f"superstep {report.superstep}: {report.active} active, {report.delivered} messages"
    for name, value in sorted(report.aggregates.items()):
        shown = f"{value:.6g}" if isinstance(value, float) else repr(value)
        text += f", {name}={shown[:40]}"
    if report.errors:
        text += f", {report.errors} errors"
    return text


def compute_vertex(console: Any, spec: VertexSpec, args: argparse.Namespace) -> int:
    """Run a vertex job attached to this console; print its summary (``--json``: one object)."""
    program, config = to_run(spec)
    session = console.session
    client = session.connect(allow_embedded=True)
    bar = render.Progress(console.err) if (console.err.isatty() and not args.quiet) else None
    last = [time.monotonic()]

    def on_report(report: SuperstepReport) -> None:
        line = report_line(report)
        if bar is not None:
            bar.draw(report.superstep + 1, 0, spec.max_supersteps, line)
        elif not args.json and not args.quiet and time.monotonic() - last[0] >= 2:
            last[0] = time.monotonic()
            console.note(line)

    job_id = new_job_id()
    try:
        result = run_vertex(
            client,
            session.settings,
            program,
            config,
            group=spec.group,
            retries=spec.retries,
            priority=spec.priority,
            on_report=on_report,
            job_id=job_id,
        )
    except JobFailed as exc:
        print_failure(console, args.json, "vertex", job_id, exc)
        raise
    finally:
        if bar is not None:
            bar.clear()
    return print_summary(console, result.to_json(), args.json)


def print_summary(console: Any, result: dict[str, Any], as_json: bool) -> int:
    """A finished vertex job's summary (``VertexResult.to_json()``): JSON, or lines. Returns
    the exit code: 5 (as a function job with failed arguments) if vertices failed."""
    from .main import EXIT_FAILED_ARGUMENTS

    code = EXIT_FAILED_ARGUMENTS if result["errors"] else 0
    if as_json:
        console.say(json.dumps(result))
        return code
    console.say(
        f"{result['state']}: {result['supersteps']} supersteps, {result['vertices']} vertices, "
        f"{result['messages']} messages ({render.fmt_bytes(result['bytes_moved'])} between "
        f"workers) on {result['workers']} workers -> {result['output']} in "
        f"{render.fmt_duration(result['elapsed'])}"
    )
    if result["rollbacks"]:
        console.note(f"{result['rollbacks']} rollback(s) after lost workers")
    if result["errors"]:
        console.note(
            f"{result['errors']} error(s) in vertices or input lines (on_error: continue): {result['first_error']}"
            f" (exit code {code})"
        )
    console.say(f"job directory: {result['job_dir']}")
    return code
