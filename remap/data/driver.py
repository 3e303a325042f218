"""Running a data job: a map phase and a reduce phase, each one function job, then commit.

The driver runs beside the console or the Python API (it needs the data directory too). It
writes the job directory, runs the map tasks over the splits, waits for all of them (the
barrier), gives each reducer exactly the runs the *delivered* map results listed, runs the
reduce tasks, renames each delivered reduce attempt to its final name, and publishes the
output directory by one rename. On failure or kill nothing is published, intermediate files
are removed, and ``result`` says ``FAIL`` or ``INCOMPLETE``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import queue
import shutil
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import messages as m
from protocol.options import JobOptions

from .. import runtime, shipping
from ..blobs import dumps
from ..bundle import Bundle, wrap
from ..client import ClusterClient, JobStream
from ..errors import ConfigError, ConnectionLost, JobFailed, JobKilled, RemapError
from ..sinks import StreamSink, TaskErrorInfo, take_output
from . import layout
from .inputs import Split, finer_tail, make_splits, resolve_inputs
from .layout import DataDir
from .runs import DEFAULT_FANIN
from .tasks import DEFAULT_PURPOSE, JobFunctions, TaskContext, map_task, reduce_task

MB = 1024 * 1024
#: seconds between progress callbacks while a phase runs
POLL_INTERVAL = 0.25
#: seconds between reads of the running map tasks' progress files (for the MB read so far)
PROGRESS_READ_EVERY = 1.0
#: task errors whose messages say what and where (shown without their type)
_SELF_EXPLAINED = frozenset(
    "RecordError JobCodeError BadOutput CombineError HookError StorageError InputChanged "
    "UnreadableInput".split()
)


def error_text(type_name: str, message: str) -> str:
    """A task's error as the user reads it: the message alone when it says what and where."""
    return message if type_name in _SELF_EXPLAINED else f"{type_name}: {message}"


@dataclass(frozen=True)
class DataOptions:
    """How a data job runs: the job file's keys beyond what and where (same names)."""

    split_mb: float = 64.0
    spill_mb: float = 64.0
    fanin: int = DEFAULT_FANIN
    on_error: str = "fail"
    retries: int = 3
    timeout: float | None = None
    group: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class DataJob:
    """A resolved data job: the functions to run and where their files come from and go."""

    name: str
    functions: JobFunctions
    inputs: tuple[str, ...]
    output: Path
    reducers: dict[str, int] = field(default_factory=lambda: {DEFAULT_PURPOSE: 1})
    base_dir: Path = Path(".")
    options: DataOptions = DataOptions()
    module_path: Path | None = None
    #: the modules and files every task ships, as a function job's (see :mod:`remap.bundle`)
    bundle: Bundle = field(default_factory=Bundle)


@dataclass
class DataProgress:
    """What a console shows while a data job runs."""

    job_id: str
    phase: str = "starting"
    tasks_done: int = 0
    tasks_total: int = 0
    files: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    records: int = 0
    started: float = field(default_factory=time.monotonic)
    phase_job: int | None = None
    #: counts of the tasks whose results arrived so far (every phase)
    counters: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        text = f"{self.phase} {self.tasks_done}/{self.tasks_total} tasks"
        if self.phase == "map" and self.bytes_total:
            text += (
                f", {self.bytes_done / MB:.1f}/{self.bytes_total / MB:.1f} MB of {self.files} files"
            )
        if self.records:
            text += f", {self.records / elapsed:,.0f} records/s"
        return text


class _Phase:
    """One phase as a function job whose results are collected by task index."""

    def __init__(
        self,
        client: ClusterClient,
        params: JobOptions,
        blob: bytes,
        args: list[Any],
        on_notice: Callable[[str], None] | None = None,
        on_output: Callable[[int, str], None] | None = None,
    ) -> None:
        self.results: dict[int, Any] = {}
        call_soon = runtime.reactor().callFromThread
        self.run = JobStream(
            blob,
            params,
            call_soon=call_soon,
            total_hint=len(args),
            on_notice=on_notice,
            on_output=on_output,
        )
        self.run.start(client).put_many([dumps(a) for a in args])
        self.run.close_input()
        self.total = len(args)

    def _item(self, index: int, result: Any, error: TaskErrorInfo | None) -> None:
        if error is None:  # a failed task fails the phase; its session keeps the first error
            self.results[index] = result

    def wait(self, tick: Callable[[], None]) -> dict[int, Any]:
        self.run.collect(StreamSink(on_item=self._item), tick=tick, interval=POLL_INTERVAL)
        missing = self.total - len(self.results)
        if missing:
            raise JobFailed(f"{missing} task(s) delivered no result")
        return self.results


class DataJobRunner:
    """Runs one :class:`DataJob` on a cluster through a console connection."""

    def __init__(
        self,
        client: ClusterClient,
        job: DataJob,
        data: DataDir,
        *,
        on_progress: Callable[[DataProgress], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        on_output: Callable[[int, str], None] | None = None,
        job_id: str | None = None,
        wait_for_nodes: float | None = None,
    ) -> None:
        self.client = client
        self.job = job
        self.data = data
        self.job_id = job_id or layout.new_job_id()
        self.progress = DataProgress(self.job_id)
        self.on_progress = on_progress or (lambda p: None)
        self.on_notice = on_notice or (lambda text: None)
        #: what the tasks print or log (thread-safe: called on the reactor thread)
        self.on_output = on_output
        #: each phase fails if no node can run it within this many seconds (None: waits)
        self.wait_for_nodes = wait_for_nodes
        self.phase: _Phase | None = None
        self.counters: Counter[str] = Counter()
        self.timings: dict[str, float] = {}
        self.error_lines: list[str] = []
        #: task name -> its delivered attempt (the one whose files and progress count)
        self.delivered: dict[str, str] = {}
        #: what the server said while the job ran (nodes left out, waiting for nodes)
        self.notices: list[str] = []
        self.data_id: str | None = None
        self._inbox: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._shared: tuple[int, dict[str, int]] | None = None  # counters the server has
        self._running_read: tuple[float, int] = (-PROGRESS_READ_EVERY, 0)  # (when, bytes)
        self.staging = job.output.parent / f".{job.output.name}.remap-{self.job_id}"
        self.sealed = self.staging.with_name(f"{self.staging.name}-sealed")

    # ------------------------------------------------------------ the whole job

    def run(self) -> dict[str, Any]:
        """Run to the end; return the summary. Raises JobFailed/JobKilled with nothing published."""
        job = self.job
        started = time.monotonic()
        files, splits = self._plan()
        # as a function job's output: a second job writing here fails now, naming this one
        lock = take_output(job.output, f"data job {self.job_id} ({job.name})")
        # held while the job runs: a later job's sweep of dead drivers' scratch passes it by
        job_lock = layout.JobLock(self.data, self.job_id)
        try:
            job_lock.acquire()
            layout.remove_orphan_scratch(self.data)
            splits = self._write_job_dir(files, splits)
            state = "FAIL"
            try:
                map_results = self._map(splits)
                reduce_results = self._reduce(map_results)
                self._publish(reduce_results)
                state = "OK"
            except (JobKilled, KeyboardInterrupt, ConnectionLost) as exc:
                state = "INCOMPLETE"
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise JobKilled(f"data job {self.job_id} ({job.name}) was killed: {exc}") from None
            except JobFailed as exc:
                failed = JobFailed(f"data job {self.job_id} ({job.name}) failed: {exc}")
                failed.remote_traceback = exc.remote_traceback
                raise failed from None
            finally:
                if state != "OK":
                    self._kill_phase()
                self.timings["total"] = round(time.monotonic() - started, 3)
                self._finish(state)
        finally:
            job_lock.release()
            lock.release()
        return self.summary(state)

    def summary(self, state: str) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "name": self.job.name,
            "state": state,
            "output": str(self.job.output),
            "job_dir": str(self.data.job_dir(self.job_id)),
            "files": self.progress.files,
            "bytes": self.progress.bytes_total,
            "splits": self._splits,
            "reducers": dict(self.job.reducers),
            "counters": dict(self.counters),
            "timings": dict(self.timings),
            "errors": list(self.error_lines),
            "notices": list(self.notices),
        }

    # ------------------------------------------------------------ steps

    def _plan(self) -> tuple[list[Path], list[Split]]:
        job = self.job
        if taken := layout.output_taken(job.output):
            raise ConfigError(f"output {taken}")
        files = resolve_inputs(job.inputs, job.base_dir)
        splits = make_splits(
            files, max(1, int(job.options.split_mb * MB)), splittable=job.functions.read is None
        )
        self.progress.files = len(files)
        self.progress.bytes_total = sum(s.size for s in splits)
        self._splits = len(splits)
        return files, splits

    def _write_job_dir(self, files: list[Path], splits: list[Split]) -> list[Split]:
        """Write the job directory; return the splits to map (the last wave cut finer)."""
        job, data = self.job, self.data
        self.data_id = layout.data_id(data.root)  # nodes must see this token (or be left out)
        try:
            status = runtime.run(self.client.status, timeout=30)
        except Exception:  # noqa: BLE001 - the config is informative; the job can still run
            status = {"nodes": []}
        if job.functions.read is None:
            cores = sum(
                int(n.get("cores", 0))
                for n in status.get("nodes", [])
                if job.options.group is None or n.get("group") == job.options.group
            )
            splits = finer_tail(splits, cores)
            self._splits = len(splits)
        config = {
            "job": self.job_id,
            "name": job.name,
            "inputs": list(job.inputs),
            "files": [str(f) for f in files],
            "splits": [[s.index, s.path, s.start, s.end] for s in splits],
            "output": str(job.output),
            "staging": str(self.staging),
            "reducers": dict(job.reducers),
            **dataclasses.asdict(job.options),
            "nodes": [
                {"host": n.get("host"), "cores": n.get("cores"), "group": n.get("group")}
                for n in status.get("nodes", [])
            ],
            "cores": sum(int(n.get("cores", 0)) for n in status.get("nodes", [])),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        layout.write_json(data.jobconfig(self.job_id), config)
        app = data.app_dir(self.job_id)
        app.mkdir(parents=True, exist_ok=True)
        if job.module_path is not None and job.module_path.is_file():
            shutil.copy2(job.module_path, app / job.module_path.name)
        layout.write_result(data, self.job_id, "INCOMPLETE")
        # tasks create no directories: a late attempt of a finished job fails instead of
        # leaving strays behind
        for purpose, n in job.reducers.items():
            (self.staging / purpose).mkdir(parents=True, exist_ok=True)
            for reducer in range(n):
                data.run_dir(self.job_id, purpose, reducer).mkdir(parents=True, exist_ok=True)
        data.progress_dir(self.job_id).mkdir(parents=True, exist_ok=True)
        return splits

    def _context(self) -> TaskContext:
        job = self.job
        return TaskContext(
            data_root=str(self.data.root),
            job_id=self.job_id,
            reducers=dict(job.reducers),
            spill_bytes=max(1, int(job.options.spill_mb * MB)),
            output=str(self.staging),
            functions=job.functions,
            on_error=job.options.on_error,
            fanin=job.options.fanin,
        )

    def _params(self, phase: str) -> JobOptions:
        job = self.job
        return JobOptions(
            name=f"{job.name} [{phase} {self.job_id}]",
            mode="stream",
            group=job.options.group,
            retries=job.options.retries,
            timeout=job.options.timeout,
            on_error="fail",
            chunksize=1,
            priority=job.options.priority,
            data_dir=str(self.data.root),
            data_id=self.data_id,
            wait_for_nodes=self.wait_for_nodes,
        )

    def _blob(self, task: Callable[..., Any]) -> bytes:
        try:
            blob = shipping.function_blob(functools.partial(task, self._context()))
        except Exception as exc:
            raise ConfigError(
                f"the job's functions cannot be sent to the cluster: {type(exc).__name__}: {exc}"
            ) from None
        return wrap(blob, self.job.bundle)

    def _run_phase(self, phase: str, task: Callable[..., Any], args: list[Any]) -> dict[int, Any]:
        started = time.monotonic()
        self.progress.phase = phase
        self.progress.tasks_done = 0
        self.progress.tasks_total = len(args)
        self.on_progress(self.progress)
        if not args:
            return {}
        self.phase = current = _Phase(
            self.client, self._params(phase), self._blob(task), args, self._notice, self.on_output
        )
        try:
            results = self.phase.wait(lambda: self._tick(phase))
        except JobFailed as exc:
            raise self._explain(phase, exc) from None
        except BaseException:  # Ctrl-C, SIGTERM (kill of a detached job), a lost connection
            self._kill_phase()  # now: run()'s own cleanup no longer sees the phase
            raise
        finally:
            self.phase = None
            self._tell()
            self.timings[phase] = round(time.monotonic() - started, 3)
        for result in results.values():
            self.delivered[result["task"]] = result["attempt"]
            self.counters.update(result["counters"])
            self.error_lines.extend(result.get("errors", ()))
        self.progress.counters = dict(self.counters)
        self._share_counters(current.run.job_id, self.counters)
        self.progress.tasks_done = len(results)
        if phase == "map":  # the tasks that finished after the last tick read theirs too
            self.progress.bytes_done = self.counters.get("map_bytes_in", 0)
        self.on_progress(self.progress)
        return results

    def _notice(self, text: str) -> None:
        """A server notice, on the reactor thread: kept for :meth:`_tell` (the driver's thread)."""
        self._inbox.put(text)

    def _tell(self) -> None:
        """Pass new server notices on, each distinct line once per job."""
        while not self._inbox.empty():
            text = self._inbox.get()
            if text not in self.notices:
                self.notices.append(text)
                self.on_notice(text)

    def _explain(self, phase: str, exc: JobFailed) -> RemapError:
        if isinstance(exc, JobKilled):
            return exc
        assert self.phase is not None
        first = self.phase.run.session.first_error
        if first is not None:
            failed = JobFailed(
                f"{phase} task {first.index}: {error_text(first.type_name, first.message)}"
            )
            failed.remote_traceback = first.traceback
            return failed
        return JobFailed(f"{phase} phase: {exc}")

    def _tick(self, phase: str) -> None:
        self._tell()
        current = self.phase
        if current is None:
            return
        self.progress.phase_job = current.run.job_id
        done = dict(current.results)
        self.progress.tasks_done = len(done)
        records = sum(r["counters"].get(f"{phase}_records_in", 0) for r in done.values())
        if phase == "map":
            finished = sum(r["counters"]["map_bytes_in"] for r in done.values())
            self.progress.bytes_done = finished + self._running_bytes(done)
        self.progress.records = self.counters.get("map_records_in", 0) + records
        running = Counter(self.counters)
        for result in done.values():
            running.update(result["counters"])
        self.progress.counters = dict(running)
        self._share_counters(current.run.job_id, running)
        self.on_progress(self.progress)

    def _running_bytes(self, done: dict[int, Any]) -> int:
        """Bytes the map tasks still running have read, from their progress files (each
        rewritten at most once a second), so a long split shows progress before it ends."""
        when, running = self._running_read
        now = time.monotonic()
        if now - when < PROGRESS_READ_EVERY:
            return running
        tasks: dict[int, int] = {}  # a task's furthest attempt (a retry starts again)
        for path in self.data.progress_dir(self.job_id).glob("mapper-*.json"):
            try:
                index = int(path.name.partition(".")[0].rpartition("-")[2])
                task = None if index in done else layout.read_json(path)
            except ValueError:  # not a task's file
                continue
            if task and task.get("state") == "running":
                tasks[index] = max(tasks.get(index, 0), int(task.get("bytes_read", 0)))
        running = sum(tasks.values())
        self._running_read = (now, running)
        return running

    def _share_counters(self, job_id: int | None, counts: dict[str, int]) -> None:
        """Tell the server the counts so far (``status`` shows them) when they changed."""
        if job_id is None or (job_id, counts) == self._shared:
            return
        self._shared = (job_id, dict(counts))
        msg = m.JobCounters(job=job_id, counters=dict(counts))
        runtime.call(self.client.send, msg).add_done_callback(_ignore_outcome)

    def _map(self, splits: list[Split]) -> dict[int, Any]:
        args = [(s.index, s.path, s.start, s.end) for s in splits]
        return self._run_phase("map", map_task, args)

    def _reduce(self, map_results: dict[int, Any]) -> dict[int, Any]:
        runs: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        for mapper, result in map_results.items():
            for purpose, reducer, path, _count, _size in result["runs"]:
                part = len(runs.setdefault((purpose, reducer), []))
                runs[(purpose, reducer)].append((mapper, part, path))
        args = []
        for purpose in sorted(self.job.reducers, key=lambda p: (p != DEFAULT_PURPOSE, p)):
            for reducer in range(self.job.reducers[purpose]):
                ordered = sorted(runs.get((purpose, reducer), []))  # input order: mapper, part
                args.append((len(args), purpose, reducer, [path for _, _, path in ordered]))
        return self._run_phase("reduce", reduce_task, args)

    def _publish(self, reduce_results: dict[int, Any]) -> None:
        """Delivered attempts take their final names; everything else is a stray; one rename."""
        finals = set()
        for result in reduce_results.values():
            os.replace(result["path"], result["final"])
            finals.add(self.sealed / Path(result["final"]).relative_to(self.staging))
        # tasks write under the staging's name: once it is gone, a lost attempt woken now
        # cannot add a file after the sweep
        os.rename(self.staging, self.sealed)
        for path in list(layout.walk_files(self.sealed)):
            if path not in finals:
                path.unlink(missing_ok=True)
        layout.write_atomic(self.sealed / layout.SUCCESS_MARKER, b"")
        if self.job.output.exists():
            raise JobFailed(f"output {self.job.output} appeared while the job ran; left it alone")
        os.rename(self.sealed, self.job.output)

    def _kill_phase(self) -> None:
        current = self.phase
        if (
            current is not None
            and current.run.job_id is not None
            and not current.run.finished.is_set()
        ):
            job_id = current.run.job_id
            with contextlib.suppress(RemapError, TimeoutError, concurrent.futures.TimeoutError):
                runtime.run(lambda: self.client.kill(job_id), timeout=5)

    def _finish(self, state: str) -> None:
        """Remove intermediate files (and the unpublished output), write progress and result."""
        data = self.data
        progress = {
            "job": self.job_id,
            "state": state,
            "phase": self.progress.phase,
            "tasks": self._task_reports(),
            "counters": self.counters,
            "timings": self.timings,
        }
        # renamed away first: a task still running (killed, or lost and woken) writes nothing
        # there after the removal listed its folder, and makes no folder again
        layout.discard(data.im_dir(self.job_id))
        if state != "OK":
            layout.remove_tree(self.staging)
            layout.remove_tree(self.sealed)
        layout.remove_strays(data.job_dir(self.job_id))
        layout.write_json(data.consolidated(self.job_id), progress)
        if self.error_lines:
            errors = data.job_dir(self.job_id) / "errors.log"
            layout.write_atomic(errors, ("\n".join(self.error_lines) + "\n").encode())
        layout.write_result(
            data,
            self.job_id,
            state,
            name=self.job.name,
            counters=self.counters,
            timings=self.timings,
            output=str(self.job.output) if state == "OK" else None,
        )

    def _task_reports(self) -> dict[str, Any]:
        """Each task's last progress: its delivered attempt's (never a lost one's, woken
        later), or for a task never delivered its latest attempt's."""
        reports: dict[str, Any] = {}
        # each file is only ever replaced (os.replace), never removed, while the job runs
        for path in sorted(
            self.data.progress_dir(self.job_id).glob("*.json"), key=os.path.getmtime
        ):
            task, _, attempt = path.stem.partition(".")
            report = layout.read_json(path)
            if report is not None and self.delivered.get(task, attempt) == attempt:
                reports[task] = report
        return dict(sorted(reports.items()))


def _ignore_outcome(future: concurrent.futures.Future) -> None:
    """Counters are informative: a lost connection shows up where the phase waits."""
    future.exception()


def job_from_functions(
    functions: Any,
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    reducers: int | dict[str, int] = 1,
    base_dir: Path | str = ".",
    name: str | None = None,
    bundle: Bundle | None = None,
    **options: Any,
) -> DataJob:
    """A :class:`DataJob` from a module (or a mapping of role -> function) and paths."""
    import cloudpickle

    from ..jobfile import module_name_for
    from .tasks import functions_from

    module_path = None
    if isinstance(functions, types.ModuleType):
        namespace = vars(functions)
        file = getattr(functions, "__file__", None)
        module_path = Path(file) if file else None
        if functions.__name__ != "__main__":  # nodes need not have it: it travels by value
            cloudpickle.register_pickle_by_value(functions)
        default_name = functions.__name__.rpartition(".")[2]
        if module_path and functions.__name__ == module_name_for(module_path):  # a FILE.py
            default_name = module_path.stem
    elif isinstance(functions, dict):
        namespace = functions
        default_name = getattr(functions.get("map"), "__module__", None) or "mapreduce"
    else:
        raise TypeError(
            "give the job's functions as a module, a dict of role -> function, or the module's "
            f"FILE.py or name, not {functions!r}"
        )
    counts = {DEFAULT_PURPOSE: reducers} if isinstance(reducers, int) else dict(reducers)
    for purpose, n in counts.items():
        layout.check_name("purpose", purpose)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"reducers for {purpose!r} must be a positive integer, not {n!r}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    base = Path(base_dir).expanduser().resolve()
    return DataJob(
        name=name or default_name,
        functions=functions_from(namespace, counts),
        inputs=tuple(os.fspath(i) for i in inputs),
        output=(base / Path(os.fspath(output)).expanduser()).resolve(),
        reducers=counts,
        base_dir=base,
        module_path=module_path,
        options=DataOptions(**options),
        bundle=bundle or Bundle(),
    )
