"""Detached data and vertex jobs, both ends: the console that starts or waits for one, and the
driver process the server runs for it (``python -m remap.console.detached DIR``).

``compute JOB.yaml --detach`` checks the job here (its mistakes are one line on this console),
then sends it with its files *by value* (``drive``: paths absolute, its module, ``modules:`` and
``files:`` as one tree). The server writes them to ``<data dir>/detached/<id>/`` and starts
:func:`main` there, which runs the driver ``compute`` runs attached and reports on stdout, one
JSON object a line: ``started`` (the data-directory job id), ``progress`` (phase, done, total, a
line), ``output`` (what the tasks printed, batched), ``end`` (state, message, summary).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from .. import bundle
from ..bundle import Bundle
from ..data.inputs import absolute_entry
from ..errors import ConfigError, JobFailed, JobKilled, RemapError
from . import render
from .filejob import interrupt, print_failure, print_summary, run_file_job

KINDS = ("mapreduce", "vertex")
#: seconds between progress lines a driver sends the server
PROGRESS_EVERY = 0.5
#: seconds between looks at a detached job's status while attached to it
ATTACH_POLL = 0.5
#: characters of task output one ``output`` line of a driver carries at most (the older text
#: of a batch is dropped and counted): escaped as JSON, well under the server's line limit
OUTPUT_BATCH = 32 * 1024


# ---------------------------------------------------------------- the console's side


def shipped_job(spec: Any, job_file: str | os.PathLike[str]) -> tuple[str, bytes]:
    """The job file as JSON with absolute paths, and its files packed (see :func:`ship`)."""
    raw = yaml.safe_load(Path(job_file).read_text(encoding="utf-8"))
    module = None
    if spec.module.endswith(".py"):
        module = (spec.base_dir / Path(spec.module).expanduser()).resolve()
    raw["input"] = [absolute_entry(i, spec.base_dir) for i in spec.inputs]
    raw["output"] = str(spec.output)
    raw["name"] = spec.name
    from ..data.jobspec import shipped_with

    return ship(raw, module, shipped_with(spec))


def ship(
    job: dict[str, Any], module: Path | None, shipped: Bundle | None = None
) -> tuple[str, bytes]:
    """``job`` as JSON and its files as one packed tree (:func:`remap.bundle.pack_tree`): its
    module file (if any) by value, named by its file name, and what it ships (``modules:``,
    packages too, and ``files:``) under ``modules/`` and ``files/``, its ``modules:`` and
    ``files:`` naming them there, so the driver finds them and ships them on."""
    entries: dict[str, bytes] = {}
    if module is not None:
        entries[module.name] = module.read_bytes()
        job = {**job, "module": module.name}
    job = {k: v for k, v in job.items() if k not in ("modules", "files")}
    if shipped:
        more, modules, files = bundle.tree(shipped)
        entries.update(more)
        job.update({k: v for k, v in (("modules", modules), ("files", files)) if v})
    return json.dumps(job), bundle.pack_tree(entries)


def outcome(job: dict[str, Any]) -> dict[str, Any]:
    """A finished detached job's summary, or its error raised (JobKilled, JobFailed)."""
    summary = job.get("summary")
    if job["state"] == "done" and isinstance(summary, dict):
        return summary
    error = JobKilled if job["state"] == "killed" else JobFailed
    raise error(f"job {job['id']} {job['state']}: {job.get('message') or 'no reason given'}")


class DetachedJob:
    """A data or vertex job whose driver runs on the server (``detach=True`` in the API)."""

    def __init__(self, cluster: Any, job_id: int, kind: str) -> None:
        self.cluster = cluster
        self.id = job_id
        self.kind = kind

    def __repr__(self) -> str:
        return f"<DetachedJob {self.id} ({self.kind})>"

    def status(self) -> dict[str, Any] | None:
        """The job as ``status`` shows it (state, phase, done, total, summary), or None."""
        return next((j for j in self.cluster.status()["jobs"] if j["id"] == self.id), None)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job to end; its summary, or JobFailed / JobKilled / TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status()
            if job is None:
                raise RemapError(f"job {self.id} is no longer on the server (restarted?)")
            if job["state"] != "running":
                return outcome(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"detached job {self.id} still runs after {timeout:g}s")
            time.sleep(ATTACH_POLL)

    def output(self) -> str:
        """What the job's tasks printed or logged, each line prefixed with its node and core:
        the last :data:`remap.server.drivers.MAX_OUTPUT` bytes the server keeps."""
        return self._request("watch", 0)["task_output"]

    def kill(self) -> dict[str, Any]:
        """End the job (``INCOMPLETE``, intermediate files removed); returns once it has."""
        return self._request("kill")

    def _request(self, method: str, *args: Any) -> Any:
        from .. import runtime

        client = self.cluster._client
        return runtime.run(lambda: getattr(client, method)(self.id, *args), timeout=60)


def check_here(spec: Any) -> None:
    """The job's own mistakes (its module, an output that exists, a missing input) as one
    error here, not as a job that fails on the server."""
    if spec.kind == "mapreduce":
        from ..data.jobspec import to_job

        to_job(spec)
    else:
        from ..vertex.jobspec import to_run

        to_run(spec)


def drive_module(
    cluster: Any, kind: str, module: Any, inputs: Any, output: Any, keys: dict[str, Any]
) -> DetachedJob:
    """The Python API's ``detach=True``: ship ``module`` (a module with a ``.py`` file) and
    the job's keys to the server, which runs the driver; a handle to wait for or kill it."""
    import types

    from .. import runtime
    from ..jobfile import load_job_text

    if cluster.embedded:
        raise ConfigError("detach=True needs a server: an embedded cluster ends with its handle")
    file = getattr(module, "__file__", None) if isinstance(module, types.ModuleType) else None
    if not file or not str(file).endswith(".py"):
        raise ConfigError(
            "detach=True ships the job's module by value: give a module loaded from a .py file"
        )
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    job = {
        "kind": kind,
        "input": [absolute_entry(i, Path.cwd()) for i in inputs],
        "output": str(Path(output).expanduser().absolute()),
        **{k: v for k, v in keys.items() if v is not None},
    }
    job.setdefault("name", Path(file).stem)
    check_here(load_job_text(ship(job, Path(file))[0], Path(file).parent, "<detached job>"))
    job_text, shipped = ship(job, Path(file), cluster.bundle)
    client = cluster._client
    job_id = runtime.run(lambda: client.drive(kind, job["name"], job_text, shipped), timeout=60)
    return DetachedJob(cluster, job_id, kind)


def start_detached(console: Any, spec: Any, args: argparse.Namespace) -> int:
    """``compute --detach`` of a data or vertex job: the server runs its driver; print the id."""
    check_here(spec)
    job_text, shipped = shipped_job(spec, args.job)
    job_id = console.session.request("drive", spec.kind, spec.name, job_text, shipped)
    if args.json:
        console.say(json.dumps({"job": job_id, "detached": True, "kind": spec.kind}))
    else:
        console.say(
            f"job {job_id} ({spec.kind}) runs detached on the server; see it in "
            f"{console.command_line('jobs')}; wait for its summary with: "
            f"{console.command_line('attach', str(job_id))}"
        )
    return 0


def attach_detached(
    console: Any,
    job: dict[str, Any],
    args: argparse.Namespace,
    *,
    clock: Any = time.monotonic,
    sleep: Any = time.sleep,
) -> int:
    """Follow a detached data or vertex job to its end: what its tasks print (the part the
    server kept, then as it comes, on stderr as ``compute`` shows it), progress (a bar on a
    terminal, else a line now and then, as ``compute`` of the job prints); print its summary
    as ``compute`` would have, or raise its error."""
    quiet = args.json or getattr(args, "quiet", False)
    bar = render.progress_bar(console.err, quiet)
    show = console.session.settings.task_output and not getattr(args, "no_task_output", False)
    every = 5.0 if job.get("kind") == "mapreduce" else 2.0  # as compute's lines
    said = [clock(), ""]  # when the last progress line was printed, and what it said
    since = 0
    try:
        while True:
            job = console.session.request("watch", job["id"], since)
            text = job.get("task_output") or ""
            if show and (text or job["task_output_from"] > since):
                if bar is not None:
                    bar.clear()
                if job["task_output_from"] > since:
                    skipped = job["task_output_from"] - since
                    console.err.write(f"[{skipped:,} bytes of earlier task output not kept]\n")
                console.err.write(text)
                console.err.flush()
            since = job["task_output_end"]
            if job["state"] != "running":
                break
            line = job.get("waiting", "")
            if bar is not None:
                bar.draw(job["done"], 0, job.get("total"), line)
            elif not quiet and line and line != said[1] and clock() - said[0] >= every:
                said[:] = [clock(), line]
                console.note(f"job {job['id']}: {line}")
            sleep(ATTACH_POLL)
    finally:
        if bar is not None:
            bar.clear()
    try:
        summary = outcome(job)
    except JobFailed as exc:
        print_failure(console, args.json, job["kind"], job["id"], exc)  # as compute --json
        raise
    return print_summary(console, job["kind"], summary, args.json)


# ---------------------------------------------------------------- the driver process


class _Out:
    """The driver's report lines, on a private copy of stdout (what user code prints goes to
    stderr, so it cannot be taken for a report)."""

    def __init__(self) -> None:
        self.stream = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="backslashreplace")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.last = 0.0
        self.lock = threading.Lock()  # task output leaves from a thread of its own

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str, ensure_ascii=False) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()

    def progress(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.emit("progress", **fields)


class _TaskOutput:
    """What the job's tasks print or log, on its way to the server: ``put`` (the reactor
    thread) only queues; a thread of its own sends one ``output`` line per
    :data:`PROGRESS_EVERY` at most, of at most :data:`OUTPUT_BATCH` characters (a batch's older
    text is dropped and counted in ``dropped``), so a job printing without end costs the
    server a bounded line twice a second."""

    def __init__(self, out: _Out) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.chunks: list[str] = []
        self.size = 0
        self.dropped = 0
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="remap-task-output", daemon=True)
        self.thread.start()

    def put(self, index: int, text: str) -> None:
        with self.lock:
            self.chunks.append(text)
            self.size += len(text)
            while self.size - len(self.chunks[0]) >= OUTPUT_BATCH:  # whole chunks too old
                self.size -= len(self.chunks[0])
                self.dropped += len(self.chunks.pop(0))
        self.wake.set()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait()
            self.stopped.wait(PROGRESS_EVERY)  # what comes meanwhile leaves in the same line
            self.send()

    def send(self) -> None:
        with self.lock:
            text, dropped = "".join(self.chunks), self.dropped
            self.chunks, self.size, self.dropped = [], 0, 0
            self.wake.clear()
        if len(text) > OUTPUT_BATCH:
            dropped += len(text) - OUTPUT_BATCH
            text = text[-OUTPUT_BATCH:]
        if text or dropped:
            self.out.emit("output", text=text, dropped=dropped)

    def close(self) -> None:
        """Send what is left (before the ``end`` line)."""
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout=5)
        self.send()


def main(argv: list[str] | None = None) -> int:
    """The driver of one detached job, run by the server in the job's directory."""
    from ..data.layout import DataDir, new_job_id
    from ..jobfile import load_job
    from ..logs import start_logging
    from ..settings import load_settings
    from .session import Session

    ap = argparse.ArgumentParser(prog="remap-detached-driver")
    ap.add_argument("--server", required=True)
    ap.add_argument("directory", type=Path)
    args = ap.parse_args(argv)
    out = _Out()
    output = _TaskOutput(out)
    signal.signal(signal.SIGTERM, interrupt)  # ends the job INCOMPLETE
    session = None
    state, message, summary = "failed", "", None
    try:
        settings = load_settings({"server": args.server}, dotenv_path=None)
        start_logging(settings.log_level)
        spec = load_job(args.directory / "job.json")
        if spec.kind not in KINDS:
            raise ConfigError(f"a detached driver runs data and vertex jobs, not {spec.kind}")
        job_id = new_job_id()
        job_dir = DataDir.from_setting(settings.data_dir).job_dir(job_id)
        out.emit("started", data_job=job_id, job_dir=str(job_dir))
        shipped = args.directory / bundle.TREE_FILES
        if shipped.is_dir():  # remap.job_file(NAME) finds a shipped file here too
            bundle.enter(shipped.resolve())
        session = Session(settings)
        summary = run_file_job(
            spec,
            settings,
            lambda: session.connect(allow_embedded=False),
            job_id,
            out.progress,
            on_output=output.put if settings.task_output else None,
        )
        if spec.kind == "mapreduce":
            summary["errors"] = summary.get("errors", [])[:20]
        state = "done"
    except (JobKilled, KeyboardInterrupt) as exc:
        state, message = "killed", str(exc) or "killed on request"
    except RemapError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the server as the job's reason
        message = f"{type(exc).__name__}: {exc}"
    output.close()
    out.emit("end", state=state, message=message, summary=summary)
    print(f"detached job {state}{': ' + message if message else ''}", file=sys.stderr)
    sys.stderr.flush()
    if session is not None:
        with contextlib.suppress(Exception):  # leaving anyway
            session.close()
    os._exit(0 if state == "done" else 1)  # the reactor thread is a daemon: do not wait on it


if __name__ == "__main__":
    main()
