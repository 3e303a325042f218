"""Detached data and vertex jobs: their drivers run as child processes of the server.

A data or vertex job's driver must live as long as the job: detached, the console that started
it cannot hold it, and a node's core would cost the job a worker, while the server outlives
consoles and knows every job. So ``drive`` starts ``python -m remap.console.detached DIR``
with the server's secret: a console child running the same driver code as ``compute``, which
reports JSON lines on its stdout (started, progress, output, end) that become a job in
``status``. ``<data dir>/detached/<id>/`` holds all it needs, so a restarted server starts an
unfinished one anew under its id; after a driver that died without saying how it ended, its
intermediate files are removed here and ``result`` says ``INCOMPLETE`` with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger

from protocol.status import JobStatus

from .. import bundle
from ..data import layout
from ..vertex.files import Layout

KINDS = ("mapreduce", "vertex")
#: bytes of ``files`` (the older way: file name → text) a ``drive`` may carry (its payload is
#: bounded by the frame limit and :data:`remap.bundle.MAX_BUNDLE`)
MAX_FILES_BYTES = 4 * 1024 * 1024
#: bytes of a detached job's task output the server keeps (the last ones; ``attach`` and the
#: HTTP job view show them, and OUTPUT_LOG in the job's directory once it ended)
MAX_OUTPUT = 64 * 1024
OUTPUT_LOG = "output.log"
#: seconds a killed driver gets to clean up before it is SIGKILLed (and cleaned up after)
KILL_GRACE = 20.0
#: longest JSON line read from a driver; longer ones are dropped
MAX_LINE = 256 * 1024
#: finished detached jobs remembered (for status and attach); the oldest are forgotten
MAX_KEPT = 100
_FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\.py")  # fullmatch: "$" takes "x.py\n"
#: where the parts of a shipped tree may go: the job's module at the top, the rest below these
_TREE_ROOTS = (bundle.TREE_MODULES, bundle.TREE_FILES)
CHILD_MODULE = "remap.console.detached"
#: a job's directory while :func:`_write_job_dir` writes it (``.ID-`` and mkdtemp's 8 characters)
_STAGING_NAME = re.compile(r"\.[0-9]+-[a-z0-9_]{8}")
_STOPPING = "the server is stopping: start the job again once it is back"


class DriveError(Exception):
    """A ``drive`` refused with a reason the console sees."""


def child_env(settings: Any, secret: bytes) -> dict[str, str]:
    """What a console child needs to join this server: the secret and the TLS files."""
    env = {"REMAP_SECRET_KEY": secret.decode("utf-8", "replace")}
    for name in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(settings, name)
        if value:
            env[f"REMAP_{name.upper()}"] = os.path.abspath(value)
    return env


def spawn_console_child(
    reactor: Any, proto: Any, args: list[str], child_env: dict[str, str], path: str, **env: str
) -> Any:
    """Start a console child of the server (a detached job's driver, an HTTP job's console):
    this Python with ``args``, the server's environment without its own REMAP_* settings but
    with what joins this cluster (``child_env``: the secret, the TLS files) and ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("REMAP_")}
    full.update(child_env)
    full.update(env)
    fds = {0: "w", 1: "r", 2: "r"}
    return reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *args], env=full, path=path, childFDs=fds
    )


def dial_host(host: str) -> str:
    """Where a local child reaches a server bound to ``host`` (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in host:
        return "[::1]" if host == "::" else f"[{host}]"
    return host


def child_dial_host(settings: Any) -> str:
    """Where a console child of the server dials it: :func:`dial_host`, unless the server
    listens on every address with a TLS certificate that does not name loopback (the README's
    recipe names the LAN address): then, so the child's host-name check passes, an address of
    this machine the certificate names, or ``localhost`` if it names that."""
    host = dial_host(settings.host)
    if not settings.tls_cert or settings.host not in ("0.0.0.0", "", "::"):
        return host  # bound to one address: only that one answers
    ips, dns = _certificate_names(settings.tls_cert)
    if host.strip("[]") in ips or (host in ("127.0.0.1", "[::1]") and "localhost" in dns):
        return host
    for ip in ips:
        if _is_local(ip):
            return f"[{ip}]" if ":" in ip else ip
    return "localhost" if "localhost" in dns else host


def _certificate_names(path: str) -> tuple[list[str], set[str]]:
    """The IP addresses and DNS names the first certificate in ``path`` names (none if unread:
    the server's own TLS setup reports a bad file)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return [], set()
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return ips, {name.lower() for name in names.get_values_for_type(x509.DNSName)}


def _is_local(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine (it can be bound)."""
    import socket

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


@dataclass(eq=False)
class DrivenJob:
    """One detached data or vertex job as the server sees it."""

    id: int
    kind: str
    name: str
    owner: str
    directory: Path
    started_at: float
    state: str = "running"
    progress: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    message: str = ""
    data_job: str | None = None
    job_dir: str | None = None
    output: str | None = None
    finished_at: float | None = None
    killing: bool = False
    stderr: bytearray = field(default_factory=bytearray)
    #: the last MAX_OUTPUT bytes of what its tasks printed, and how many came in all
    printed: bytearray = field(default_factory=bytearray)
    printed_end: int = 0
    transport: Any = None
    waiters: list[Callable[[DrivenJob], None]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def add_output(self, text: str, dropped: int = 0) -> None:
        """Keep what the tasks printed (``dropped``: characters the driver could not send)."""
        data = text.encode("utf-8", "replace")
        if dropped:
            data = f"[{dropped:,} characters of task output dropped]\n".encode() + data
        self.printed += data
        self.printed_end += len(data)
        del self.printed[: max(0, len(self.printed) - MAX_OUTPUT)]

    def task_output(self, since: int) -> dict[str, Any]:
        """The kept task output from byte ``since`` on: ``task_output``, ``task_output_from``
        (past ``since`` when what came between was not kept) and ``task_output_end`` (where the
        next look starts)."""
        first = self.printed_end - len(self.printed)
        start = min(max(since, first), self.printed_end)
        text = self.printed[start - first :].decode("utf-8", "replace")
        return {"task_output": text, "task_output_from": start, "task_output_end": self.printed_end}

    def describe(self, now: float) -> JobStatus:
        """The job's status record: what function jobs have, plus phase and summary."""
        p = self.progress
        done = int(p.get("done", 0))
        return JobStatus(
            id=self.id,
            name=self.name,
            state=self.state,
            phase=str(p.get("phase", "")),
            mode=self.kind,
            group=None,
            total=p["total"] if type(p.get("total")) is int else None,
            received=done,
            queued=0,
            running=0 if self.finished else 1,
            done=done,
            failed=0,
            rate=0.0,
            elapsed=round((self.finished_at or now) - self.started_at, 2),
            waiting="" if self.finished else str(p.get("line", "starting")),
            detached=True,
            output=self.output,
            attached=False,
            message=self.message,
            owner=self.owner or None,
            kind=self.kind,
            data_job=self.data_job,
            job_dir=self.job_dir,
            summary=self.summary,
        )


class ConsoleChild(protocol.ProcessProtocol):
    """A console child of the server: keeps the tail of its stderr in ``stderr`` (where its
    error line is) and calls ``ended(exit code or None)`` once it has exited."""

    def __init__(self, stderr: bytearray, ended: Callable[[int | None], None]) -> None:
        self.stderr = stderr
        self.ended = ended

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        buf = self.stderr
        buf += data
        del buf[: max(0, len(buf) - 8192)]  # keep the tail: the error line is last

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended(getattr(reason.value, "exitCode", None))


def last_error(stderr: bytearray) -> str:
    """The last line a console child wrote to stderr, without its "error: " ("" if none)."""
    lines = [s for s in stderr.decode("utf-8", "replace").splitlines() if s.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""


class _DriverProcess(ConsoleChild):
    """Also reads a driver child's JSON lines (stdout)."""

    def __init__(self, drivers: Drivers, job: DrivenJob) -> None:
        super().__init__(job.stderr, lambda code: drivers.ended(job, code))
        self.drivers = drivers
        self.job = job
        self.buffer = b""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        *lines, rest = (self.buffer + data).split(b"\n")
        self.buffer = rest if len(rest) <= MAX_LINE else b""
        for line in lines:
            if len(line) <= MAX_LINE:
                self.drivers.event(self.job, line)


class Drivers:
    """The detached data and vertex jobs of one server and their driver processes."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        scheduler: Any,
        *,
        data_dir: Path,
        cluster_address: str | None,
        child_env: dict[str, str],
    ) -> None:
        self.reactor = reactor
        self.scheduler = scheduler
        self.data_dir = Path(data_dir)
        self.cluster_address = cluster_address
        self.child_env = child_env
        self.jobs: OrderedDict[int, DrivenJob] = OrderedDict()
        #: the server is stopping (:meth:`stop`): no driver starts any more
        self.stopping = False
        if cluster_address is not None:  # a server that runs drivers is starting
            remove_stale_staging(self.data_dir / "detached")

    # ------------------------------------------------------------ requests

    def start(
        self, kind: str, name: str, job_text: str, files: dict, owner: str, shipped: bytes = b""
    ) -> defer.Deferred:
        """Check the job (DriveError says why not), write its directory (on a thread: its files
        may be many MiB) and start its driver; fires with the job, or fails (OSError)."""
        if self.cluster_address is None:
            raise DriveError("this server cannot run detached drivers (it listens nowhere)")
        if self.stopping:
            raise DriveError(_STOPPING)
        if kind not in KINDS:
            raise DriveError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if why := layout.open_to_all(self.data_dir):  # its driver imports modules from there
            raise DriveError(f"this server's data directory {self.data_dir} cannot be used: {why}")
        try:
            job = json.loads(job_text)
        except ValueError as exc:
            raise DriveError(f"the job is not JSON: {exc}") from None
        if not isinstance(job, dict) or job.get("kind") != kind:
            raise DriveError(f"the job must be a mapping with kind: {kind}")
        entries = shipped_tree(files, shipped)  # a copy: the payload may view a reused buffer
        job_id = self.scheduler.take_job_id()
        directory = self.data_dir / "detached" / str(job_id)
        entries["job.json"] = json.dumps({**job, "name": name}, indent=1).encode("utf-8")
        entries["owner"] = owner.encode("utf-8")

        def written(_: Any) -> DrivenJob:
            if self.stopping:  # while it was written: its driver would outlive the server
                shutil.rmtree(directory, ignore_errors=True)
                raise DriveError(_STOPPING)
            driven = self._add(job_id, job, name, owner, directory)
            self._spawn(driven)
            self.log.info(
                "detached {kind} job {id} ({name}) started", kind=kind, id=job_id, name=name
            )
            return driven

        return self._in_thread(_write_job_dir, directory, entries).addCallback(written)

    def _add(self, job_id: int, job: dict, name: str, owner: str, directory: Path) -> DrivenJob:
        driven = DrivenJob(job_id, job["kind"], name, owner, directory, self.reactor.seconds())
        driven.output = str(job.get("output") or "") or None
        self.jobs[job_id] = driven
        return driven

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def resume_unfinished(self) -> None:
        """(A restarted server, journal on.) Run again every detached job an earlier run of
        the server started and never saw end, under its id; its earlier run is cleaned up
        (intermediate files, unpublished output, ``result`` = INCOMPLETE) first."""
        try:
            entries = list((self.data_dir / "detached").iterdir())
        except FileNotFoundError:
            return
        unfinished = [e for e in entries if e.name.isdigit() and not (e / "ended.json").exists()]
        for job_id, directory in sorted((int(e.name), e) for e in unfinished):
            try:
                job = self._resume(job_id, directory)
            except (OSError, ValueError, KeyError) as exc:
                self.log.warn("cannot resume detached job {id}: {why}", id=job_id, why=str(exc))
                continue
            self.log.info("detached {kind} job {id} runs again", kind=job.kind, id=job_id)

    def _resume(self, job_id: int, directory: Path) -> DrivenJob:
        """Start the driver of an unfinished detached job again, under its id (the job runs
        from its start, as a new data-directory job, once the earlier run is cleaned up)."""
        earlier = layout.read_json(directory / "started.json") or {}
        job = json.loads((directory / "job.json").read_text(encoding="utf-8"))
        owner_file = directory / "owner"
        owner = owner_file.read_text(encoding="utf-8") if owner_file.exists() else ""
        driven = self._add(job_id, job, str(job.get("name", "")), owner, directory)
        why = "the server restarted; the job ran again"
        data = layout.DataDir(self.data_dir)
        d = self._in_thread(abandon, data, driven.kind, earlier.get("data_job"), why)
        d.addErrback(lambda f: self.log.failure("cleaning up job {id}", f, id=job_id))
        d.addCallback(lambda _: self.ended(driven, None) if driven.killing else self._spawn(driven))
        return driven

    def kill(self, job: DrivenJob, done: Callable[[DrivenJob], None]) -> None:
        """End a running job: SIGTERM (the driver kills its phase, cleans up, writes
        ``INCOMPLETE``), SIGKILL after :data:`KILL_GRACE`; ``done`` once it has ended."""
        if job.finished:
            done(job)
            return
        job.waiters.append(done)
        if job.killing:
            return
        job.killing = True
        if job.transport is None:
            return  # a resumed job not started yet: it ends instead of starting
        self._signal(job, "TERM")

        def hard() -> None:
            if not job.finished:
                self.log.warn("driver of job {id} ignored SIGTERM; SIGKILL", id=job.id)
                self._signal(job, "KILL")

        self.reactor.callLater(KILL_GRACE, hard)

    def describe(self, now: float) -> list[JobStatus]:
        return [job.describe(now) for job in self.jobs.values()]

    def stop(self) -> None:
        """The server is stopping: its drivers end (each cleans up and writes ``INCOMPLETE``),
        and none starts any more (a job whose directory is being written is refused)."""
        self.stopping = True
        for job in self.jobs.values():
            if not job.finished:
                job.killing = True
                self._signal(job, "TERM")

    # ------------------------------------------------------------ the child

    def _spawn(self, job: DrivenJob) -> None:
        root = str(Path(__file__).resolve().parents[2])  # remap importable as the server has it
        job.transport = spawn_console_child(
            self.reactor,
            _DriverProcess(self, job),
            ["-m", CHILD_MODULE, "--server", str(self.cluster_address), str(job.directory)],
            self.child_env,
            str(job.directory),
            REMAP_DATA_DIR=str(self.data_dir),
            PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
            # not the job's directory first on sys.path (``-m`` puts the current one there): a
            # job module named json.py would replace the standard json in the driver itself
            PYTHONSAFEPATH="1",
        )

    def _signal(self, job: DrivenJob, sig: str) -> None:
        with contextlib.suppress(Exception):  # ProcessExitedAlready: processEnded follows
            job.transport.signalProcess(sig)

    def event(self, job: DrivenJob, line: bytes) -> None:
        """One JSON line from a driver: ``started``, ``progress`` or ``end``."""
        try:
            event = json.loads(line)
        except ValueError:
            return  # something the user's module printed
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == "started":
            job.data_job = str(event.get("data_job") or "") or None
            job.job_dir = str(event.get("job_dir") or "") or None
            record = {"data_job": job.data_job, "job_dir": job.job_dir}
            self._in_thread(layout.write_json, job.directory / "started.json", record).addErrback(
                lambda f: self.log.failure("recording job {id}", f, id=job.id)
            )
        elif kind == "output":
            text, dropped = event.get("text"), event.get("dropped")
            if isinstance(text, str):
                job.add_output(text, dropped if type(dropped) is int and dropped > 0 else 0)
        elif kind == "progress" and not job.finished:
            job.progress = {k: event.get(k) for k in ("phase", "done", "total", "line", "sub_job")}
        elif kind == "end" and not job.finished:
            state = event.get("state")
            job.state = state if state in ("done", "failed", "killed") else "failed"
            job.message = str(event.get("message") or "")[:2000]
            summary = event.get("summary")
            job.summary = summary if isinstance(summary, dict) else None
            job.finished_at = self.reactor.seconds()
            if job.state == "done":  # the last progress line may be seconds old: show the end
                job.progress = _finished(job.progress, job.summary)

    def ended(self, job: DrivenJob, code: int | None) -> None:
        """The driver process exited: finish the job (and clean up after a driver that died)."""
        job.transport = None
        clean = None  # the data job to clean up after a driver that died
        if not job.finished:
            why = last_error(job.stderr)
            exit_text = f"exit code {code}" if code is not None else "killed by a signal"
            job.state = "killed" if job.killing else "failed"
            job.message = (
                "killed on request"
                if job.killing
                else f"the job's driver died ({exit_text}){': ' + why[:500] if why else ''}"
            )
            job.finished_at = self.reactor.seconds()
            clean = job.data_job
            sub = job.progress.get("sub_job")
            if isinstance(sub, int):
                self.scheduler.kill(sub, "its detached driver died")
        self.log.info(
            "detached {kind} job {id} {state}{why}",
            kind=job.kind,
            id=job.id,
            state=job.state,
            why=f": {job.message}" if job.message else "",
        )
        record = {"state": job.state, "message": job.message, "summary": job.summary}

        def finish(_: Any = None) -> None:
            waiters, job.waiters = job.waiters, []
            for waiter in waiters:
                waiter(job)
            finished = [j for j in self.jobs.values() if j.finished]
            for old in finished[: max(0, len(finished) - MAX_KEPT)]:
                del self.jobs[old.id]

        d = self._in_thread(
            _after_driver,
            job.directory,
            record,
            self.data_dir,
            job.kind,
            clean,
            job.message,
            bytes(job.printed),
        )
        d.addErrback(lambda f: self.log.failure("cleaning up after job {id}", f, id=job.id))
        d.addBoth(finish)


def _finished(progress: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    """A job that ended well is ``done`` with every step counted (a vertex job: the
    supersteps it ran, not its ``max_supersteps``)."""
    steps = (summary or {}).get("supersteps")
    total = steps if type(steps) is int else progress.get("total")
    ended = {**progress, "phase": "done", "line": ""}
    if type(total) is int:
        ended.update(done=total, total=total)
    return ended


def shipped_tree(files: dict, shipped: bytes | memoryview) -> dict[str, bytes]:
    """A ``drive``'s payload tree and its older ``files`` (NAME.py → text) as one tree;
    DriveError for a name that could leave the job's directory or land elsewhere in it, or
    files over the limits."""
    try:
        entries = bundle.unpack_tree(shipped)
    except ValueError as exc:
        raise DriveError(str(exc)) from None
    size = 0
    for file_name, text in files.items():
        if not isinstance(text, str) or not _FILE_NAME.fullmatch(str(file_name)):
            raise DriveError(f"shipped file {str(file_name)[:80]!r}: expected NAME.py: text")
        size += len(text.encode("utf-8"))
        entries.setdefault(file_name, text.encode("utf-8"))
    if size > MAX_FILES_BYTES:
        raise DriveError(f"the shipped files exceed {MAX_FILES_BYTES // 1024 // 1024} MiB")
    for name in entries:
        top = name.split("/")[0]
        if not (_FILE_NAME.fullmatch(name) or (top in _TREE_ROOTS and "/" in name)):
            raise DriveError(
                f"shipped file {name[:80]!r}: expected NAME.py, or a path under "
                f"{' or '.join(r + '/' for r in _TREE_ROOTS)}"
            )
    return entries


def _write_job_dir(directory: Path, entries: dict[str, bytes]) -> None:
    """Write a new detached job's directory whole, renamed into place (what an earlier server
    without a journal left under that id is replaced)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    held = None
    try:
        held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX)  # a live write: remove_stale_staging passes it by
        bundle.write_tree(staging, entries)
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


def remove_stale_staging(detached: Path) -> list[str]:
    """(A server starting.) Remove the half-written job directories (``.ID-xxxxxxxx``) a
    crashed server left; one being written holds an ``flock`` (another server on this data
    directory may be writing it) and is passed by. Returns the names."""
    removed = []
    try:
        entries = list(os.scandir(detached))
    except OSError:
        return removed
    for entry in entries:
        if not _STAGING_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        with layout.locked_if_free(entry.path, os.O_RDONLY | os.O_DIRECTORY) as free:
            if not free:  # being written now
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        Drivers.log.info(
            "removed {n} half-written detached job directories: {names}",
            n=len(removed),
            names=" ".join(sorted(removed)),
        )
    return removed


def _after_driver(
    directory: Path,
    record: dict,
    data_root: Path,
    kind: str,
    data_job: str | None,
    why: str,
    output: bytes = b"",
) -> None:
    """(A thread.) Record how the job ended and what its tasks printed; clean up after a
    driver that died."""
    abandon(layout.DataDir(data_root), kind, data_job, why)
    if output:
        layout.write_atomic(directory / OUTPUT_LOG, output)
    layout.write_json(directory / "ended.json", record)


def abandon(data: layout.DataDir, kind: str, job_id: str | None, why: str) -> None:
    """What a dead driver did not do: remove intermediate files and anything unpublished,
    and make ``result`` say ``INCOMPLETE`` with the reason (a finished result is left alone).
    No ``job_id``: the driver died before it made its data job, which left nothing."""
    if not job_id or layout.read_result(data, job_id) not in (None, "INCOMPLETE"):
        return
    config = layout.read_json(data.jobconfig(job_id)) or {}
    # both kinds' scratch, renamed away first: a task still running writes no more there
    layout.discard(data.im_dir(job_id))
    if config.get("staging"):  # where the output is written before it is published
        staging = Path(config["staging"])
        layout.remove_tree(staging)  # and the name a data job seals it under just before
        layout.remove_tree(staging.with_name(f"{staging.name}-sealed"))
    if kind != "mapreduce":
        output = Path(config.get("output", ""))
        if config.get("output") and output.is_dir() and not (output / "_SUCCESS").exists():
            layout.remove_tree(output)  # a job of an earlier release wrote its output in place
        Layout(data, job_id).remove_barriers()  # as the driver's own end does
    layout.remove_strays(data.job_dir(job_id))
    if data.job_dir(job_id).is_dir():
        layout.write_result(data, job_id, "INCOMPLETE", message=why)
