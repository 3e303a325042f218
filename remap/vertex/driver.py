"""The driver of a vertex job, on the client: it writes numbered commands into the job
directory and counts every member worker's ack (the barrier: no timeout ends a superstep).

A lost worker triggers a rollback: a new epoch, the partitions re-dealt over the workers still
alive, restored from the last complete checkpoint (or the input). The server's list of calls
in flight names a worker whose node was lost; heartbeats catch a hung or retried one.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.logger import Logger

from ..data.layout import (
    SUCCESS_MARKER,
    DataDir,
    JobLock,
    discard,
    new_job_id,
    output_taken,
    remove_orphan_scratch,
    remove_tree,
    write_json,
    write_result,
)
from ..errors import ConfigError, ConnectionLost, JobFailed, JobKilled
from ..sinks import take_output, to_jsonable
from . import DEFAULT_MAX_SUPERSTEPS
from .engine import fold_into
from .files import Heartbeats, Layout, heartbeat_name, input_splits, read_pickle, write_pickle
from .program import Program
from .worker import POLL_MAX, Command, WorkerArgs, wait_for

START_TIMEOUT = 120.0
#: seconds a failed or killed job waits for its workers to stop before it cleans up
STOP_WAIT = 30.0
STATUS_INTERVAL = 1.0  # seconds between asking the server how many worker calls still run
CHECK_INTERVAL = 0.05  # seconds between liveness checks while the driver waits at a barrier
#: the share of the shorter of the last two supersteps a barrier wait sleeps through before its
#: fine polls (a superstep much shorter than those two is noticed at most that much later)
QUIET_SHARE = 0.75


def quiet_for(durations: list[float]) -> float:
    """Seconds from a superstep's command before the driver polls for its acks: each fine
    poll takes a CPU from a worker for a moment, and a job's supersteps take much the same
    time, so the driver sleeps through most of the expected one."""
    if len(durations) < 2:
        return 0.0
    return QUIET_SHARE * min(durations[-2:])


def busy_for(acks: list[dict[str, Any]]) -> float:
    """The wall seconds the slowest worker spent on its command, not counting its wait
    before it (counting the driver's sleep would keep it sleeping after supersteps got short)."""
    return max(
        (
            sum(wall for phase, (wall, _) in ack.get("times", {}).items() if phase != "wait")
            for ack in acks
        ),
        default=0.0,
    )


@dataclass(frozen=True)
class VertexConfig:
    """What a vertex job needs besides its program: the YAML keys, resolved."""

    input: list[Path]  # the files, as :func:`remap.data.inputs.resolve_inputs` finds them
    output: Path
    partitions: int | None = None  # None: one per worker
    max_supersteps: int = DEFAULT_MAX_SUPERSTEPS
    checkpoint_every: int = 0  # 0: no checkpoints (a lost worker restarts the job from its input)
    on_error: str = "fail"
    name: str = "vertex"
    #: seconds of the driver's clock a worker's heartbeat goes unchanged before it counts as
    #: lost: only a hung one (the server names a lost node or core), so long enough for a
    #: starved core or a long C call
    lost_after: float = 60.0
    heartbeat: float = 0.5


@dataclass
class SuperstepReport:
    """What the barrier counted after one superstep (the progress line of a job)."""

    superstep: int
    active: int
    sent: int
    delivered: int
    vertices: int
    aggregates: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""


@dataclass
class VertexResult:
    """The summary of a finished vertex job (also written as the job's ``result`` file)."""

    state: str
    supersteps: int
    vertices: int
    partitions: int
    workers: int
    messages: int
    bytes_moved: int
    rollbacks: int
    elapsed: float
    output: str
    job_id: str
    job_dir: str
    aggregates: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""
    #: per worker slot: phase (read, merge, receive, compute, ...) → [wall s, CPU s]
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``compute --json``'s object (``job`` as in a data job's)."""
        out = {"job": self.job_id, **asdict(self)}
        out["aggregates"] = {k: to_jsonable(v)[0] for k, v in self.aggregates.items()}
        return out


class Launch(Protocol):
    """The worker calls as the driver sees them, wherever they run."""

    def events(self) -> list[tuple[str, Any]]:
        """New events since the last call: ("error", text) or ("end", error_or_None)."""

    def kill(self) -> None: ...

    def wait(self, timeout: float) -> bool: ...

    def calls(self) -> set[int] | None:
        """The slots of the worker calls in flight (see :meth:`ClusterLaunch.calls`)."""


class WorkerLost(Exception):
    """Member workers (by slot) are gone: one rollback drops them all."""

    def __init__(self, slots: list[int], why: str) -> None:
        super().__init__(
            f"worker{'s' if len(slots) > 1 else ''} {', '.join(map(str, slots))} {why}"
        )
        self.slots = slots


class Driver:
    """One vertex job from submission to ``_SUCCESS`` (run :meth:`run` on a plain thread)."""

    log = Logger()

    def __init__(
        self,
        program: Program,
        config: VertexConfig,
        data: DataDir,
        workers: int,
        start: Callable[[list[WorkerArgs]], Launch],
        on_report: Callable[[SuperstepReport], None] | None = None,
        job_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ConfigError("a vertex job needs at least one core")
        if taken := output_taken(config.output, "vertex"):
            raise ConfigError(f"output {taken}")
        self.program = program
        self.config = config
        self.data = data
        self.job_id = job_id or new_job_id()
        self.layout = Layout(data, self.job_id)
        #: where the workers write the output, renamed to ``config.output`` once complete: a
        #: driver that dies leaves no partial output there
        self.staging = config.output.parent / f".{config.output.name}.remap-{self.job_id}"
        self.inputs = list(config.input)
        self.workers = workers
        self.partitions = config.partitions or workers
        self._start = start
        self.on_report = on_report
        self.members: dict[int, int] = {}  # slot → attempt number
        self.seq = 0
        self.epoch = 0
        self.rollbacks = 0
        self.bytes_moved = 0
        self.phases: dict[str, dict[str, list[float]]] = {}
        #: times liveness (heartbeat ages, the server's list): never the wall clock, which the
        #: heartbeats' mtimes (another machine's) need not agree with, and which may jump
        self.clock = clock
        self.beats = Heartbeats()
        self._asked_at = -math.inf
        self._stop = threading.Event()
        self.launch: Launch | None = None
        self.owners: list[int] = []
        self.step: int | None = None  # the next superstep; None: (re)load the input first
        self.checkpoint: int | None = None  # the last complete checkpoint
        self.restore_pending = False
        #: old epochs' folders, renamed away, that their removal left part of (on NFS, a file
        #: a superseded worker still held open): removed again at every command until gone
        self.trash: list[Path] = []
        self.history: dict[int, tuple[int, dict[str, Any]]] = {}  # step → (vertices, aggregated)
        self.reports: dict[int, SuperstepReport] = {}
        #: input lines skipped under ``on_error: continue``, and the first one's error
        self.load_errors, self.load_first_error = 0, ""

    # ------------------------------------------------------------ liveness

    def _beat(self) -> None:
        path = self.layout.driver_heartbeat
        while not self._stop.wait(self.config.heartbeat):
            path.touch()

    def _heartbeats(self) -> dict[int, tuple[int, float]]:
        """slot → (newest attempt, seconds its heartbeat has not changed by ``self.clock``).
        The newest is the highest attempt number (see :meth:`Layout.claim_attempt`), never
        the newest mtime: those come from different machines' clocks."""
        now = self.clock()  # before the stats: a change they see is never dated before it
        newest: dict[int, tuple[int, float]] = {}  # slot → (attempt, age)
        try:
            entries = list(os.scandir(self.layout.alive))
        except FileNotFoundError:
            return {}
        for entry in entries:
            slot, attempt = heartbeat_name(entry.name)
            if slot < 0 or (slot in newest and attempt < newest[slot][0]):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            newest[slot] = (attempt, self.beats.age(entry.path, st, now))
        return newest

    def _check_launch(self) -> None:
        """Raise if a worker call raised, or the gang job ended (killed, failed) under us."""
        assert self.launch is not None
        for kind, info in self.launch.events():
            if kind == "error":
                raise JobFailed(f"a vertex worker failed: {info}")
            if kind == "end":
                raise info if isinstance(info, BaseException) else JobFailed("workers ended early")

    def _check(self) -> None:
        """Raise if the job failed, was killed, or a member worker is gone."""
        now = self.clock()
        beats = self._heartbeats()
        taken: list[int] = []
        if now - self._asked_at >= STATUS_INTERVAL:
            self._asked_at = now
            assert self.launch is not None
            calls = self.launch.calls()
            # a member's call missing from the server's was taken back (never guessed from
            # heartbeat ages: just after a kill the lost worker's can be the freshest)
            taken = sorted(set(self.members) - calls) if calls is not None else []
        # after the server's answer: a call that raised is missing from it too, and its error,
        # sent before that answer, fails the job rather than passing for a lost worker
        self._check_launch()
        if taken:
            raise WorkerLost(taken, "lost its node or core (the server took its call back)")
        for slot, attempt in self.members.items():
            newest, age = beats.get(slot, (attempt, 0.0))
            if newest > attempt and self.layout.heartbeat(slot, newest).exists():
                raise WorkerLost([slot], "was restarted elsewhere")
            if age > self.config.lost_after:
                raise WorkerLost([slot], f"sent no heartbeat for {age:.0f}s")

    # ------------------------------------------------------------ commands

    def _command(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        """Issue one command and wait for every member's ack: the barrier."""
        cmd = self._issue(kind, **fields)
        return [] if kind == "stop" else self._await(cmd)

    def _issue(self, kind: str, **fields: Any) -> Command:
        """Write the next numbered command for every member worker."""
        cmd = Command(
            seq=self.seq,
            kind=kind,
            epoch=self.epoch,
            members=dict(self.members),
            owners=self.owners,
            on_error=self.config.on_error,
            **fields,
        )
        self.seq += 1
        for trash in self.trash:
            remove_tree(trash)
        self.trash = [trash for trash in self.trash if trash.exists()]
        # the directories its files go in: a worker makes only its own below them, so one
        # left over from before a rollback (or the job's end) finds them gone
        if kind == "read":
            self.layout.loaded(self.epoch, 0).parent.mkdir(parents=True, exist_ok=True)
        elif kind == "step":
            self.layout.step(self.epoch, cmd.superstep).mkdir(parents=True, exist_ok=True)
            if cmd.checkpoint:
                self.layout.checkpoint(self.epoch, cmd.superstep).mkdir(parents=True, exist_ok=True)
        write_pickle(self.layout.command(cmd.seq), cmd)
        return cmd

    def _await(self, cmd: Command, quiet: float = 0.0) -> list[dict[str, Any]]:
        """Every member's ack of ``cmd`` (only the attempt it names acks a command), in slot
        order: the liveness checks run every CHECK_INTERVAL, and for ``quiet`` seconds only
        they run, with a look for the ack (see :func:`quiet_for`)."""
        until = time.monotonic() + quiet
        acks: list[dict[str, Any]] = []
        for slot in sorted(self.members):
            path = self.layout.ack(cmd.seq, slot)
            wait_for(path, self._check, CHECK_INTERVAL, until - time.monotonic())
            acks.append(ack := read_pickle(path))
            phases = self.phases.setdefault(str(slot), {})
            for phase, (wall, cpu) in ack.get("times", {}).items():
                spent = phases.setdefault(phase, [0.0, 0.0])
                spent[0] += wall
                spent[1] += cpu
        errors = [a for a in acks if "error" in a]
        if errors:
            failed = JobFailed(errors[0]["error"])
            failed.remote_traceback = errors[0].get("traceback", "")
            raise failed
        return acks

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            beats = self._heartbeats()
            if len(beats) >= self.workers:
                self.members = {slot: beats[slot][0] for slot in sorted(beats)[: self.workers]}
                return
            self._check_launch()
            if time.monotonic() > deadline:
                raise JobFailed(
                    f"only {len(beats)} of {self.workers} vertex workers started within "
                    f"{START_TIMEOUT:.0f}s (are other jobs holding the cores?)"
                )
            time.sleep(POLL_MAX)

    def _deal(self) -> None:
        """Give every partition to a live worker, round robin over their slots."""
        slots = sorted(self.members)
        self.owners = [slots[p % len(slots)] for p in range(self.partitions)]

    # ------------------------------------------------------------ the job

    def run(self) -> VertexResult:
        started = time.monotonic()
        # as a function job's output: a second job writing here fails now, naming this one
        lock = take_output(self.config.output, f"vertex job {self.job_id} ({self.config.name})")
        # held while the job runs: a later job's sweep of dead drivers' scratch passes it by
        job_lock = JobLock(self.data, self.job_id)
        try:
            job_lock.acquire()
            remove_orphan_scratch(self.data)
            return self._run(started)
        except JobKilled:
            raise
        except JobFailed as exc:  # its one line names the job, as a data job's does
            exc.args = (f"vertex job {self.job_id} ({self.config.name}) failed: {exc}",)
            raise
        finally:
            job_lock.release()
            lock.release()

    def _run(self, started: float) -> VertexResult:
        self.layout.alive.mkdir(parents=True)  # workers write only inside alive/ and acks/
        self.layout.acks.mkdir()
        self.layout.driver_heartbeat.touch()
        config = {k: str(v) for k, v in asdict(self.config).items()}
        config["input"] = [str(p) for p in self.inputs]
        config.update(kind="vertex", partitions=self.partitions, workers=self.workers)
        config["staging"] = str(self.staging)
        write_json(self.data.jobconfig(self.job_id), config)
        write_result(self.data, self.job_id, "INCOMPLETE")
        beat = threading.Thread(target=self._beat, name="vertex-driver-heartbeat", daemon=True)
        beat.start()
        try:
            return self._gang(started)
        finally:
            self._stop.set()
            beat.join()  # before alive/ goes: it touches driver.alive there
            self.layout.remove_barriers()  # done, failed or killed alike

    def _gang(self, started: float) -> VertexResult:
        """Start the workers and run the job with them; on any failure stop them and remove
        what the job wrote that is of no use now (scratch, an unfinished output)."""
        args = [
            WorkerArgs(
                str(self.data.root),
                self.job_id,
                slot,
                self.program,
                heartbeat=self.config.heartbeat,
                lost_after=self.config.lost_after,
            )
            for slot in range(self.workers)
        ]
        self.launch = self._start(args)
        try:
            self._wait_for_workers()
            result = self._supersteps(started)
            self._command("stop")
            return result
        except BaseException as exc:
            self._command_quietly_stop()
            # killed, interrupted or cut off: INCOMPLETE; anything else: FAIL
            killed = isinstance(exc, (JobKilled, ConnectionLost, KeyboardInterrupt))
            write_result(
                self.data, self.job_id, "INCOMPLETE" if killed else "FAIL", message=str(exc)
            )
            discard(self.layout.scratch)  # (renamed away first: a worker still running
            remove_tree(self.staging)  # writes nothing there) and an output's part files
            raise

    def _command_quietly_stop(self) -> None:
        """Stop the workers and wait (a while) until they have: one still in a superstep would
        write its messages after the cleanup."""
        with contextlib.suppress(OSError):
            self._command("stop")
        if self.launch is not None:
            self.launch.kill()
            if not self.launch.wait(STOP_WAIT):
                self.log.warn(
                    "vertex workers still running {wait:.0f}s after the stop; cleaning up anyway",
                    wait=STOP_WAIT,
                )

    def _load(self) -> int:
        splits = input_splits(self.inputs, len(self.members))
        by_slot = dict(zip(sorted(self.members), splits))
        read = self._command("read", splits=by_slot)
        self.load_errors = sum(a.get("errors", 0) for a in read)
        self.load_first_error = next((a["first_error"] for a in read if a.get("first_error")), "")
        acks = self._command("merge")
        remove_tree(self.layout.epoch(self.epoch) / "load")
        return sum(a["vertices"] for a in acks)

    def _supersteps(self, started: float) -> VertexResult:
        """Load, run supersteps to the end, write the output; roll back whenever a worker is lost."""
        self._deal()
        while True:
            try:
                if self.step is None:
                    self.history[0] = (self._load(), {})
                    self.step = 0
                elif self.restore_pending:
                    self._command("restore", superstep=self.step)
                    self.restore_pending = False
                last = self._run_to_end()
                self._output()
                break
            except WorkerLost as lost:
                self._lose(lost)
        reports = [self.reports[s] for s in sorted(self.reports)]
        first_error = self.load_first_error or next(
            (r.first_error for r in reports if r.first_error), ""
        )
        result = VertexResult(
            state="done",
            supersteps=last.superstep + 1,
            vertices=last.vertices,
            partitions=self.partitions,
            workers=self.workers,
            messages=sum(r.delivered for r in reports),
            bytes_moved=self.bytes_moved,
            rollbacks=self.rollbacks,
            elapsed=round(time.monotonic() - started, 3),
            output=str(self.config.output),
            job_id=self.job_id,
            job_dir=str(self.layout.root),
            aggregates=last.aggregates,
            errors=self.load_errors + sum(r.errors for r in reports),
            first_error=first_error,
            phases={
                slot: {k: [round(v, 3) for v in t] for k, t in times.items()}
                for slot, times in sorted(self.phases.items())
            },
        )
        details = result.to_json()
        for key in ("state", "job_id"):  # given to write_result by position
            del details[key]
        write_result(self.data, self.job_id, "OK", **details)
        discard(self.layout.scratch)
        return result

    def _run_to_end(self) -> SuperstepReport:
        """Supersteps until every vertex halted with no message in flight, or the last one.
        The next command goes out as soon as the barrier allows; the bookkeeping runs while
        the workers compute it."""
        cfg = self.config
        cmd = self._issue_step()
        issued = time.monotonic()
        durations: list[float] = []  # the slowest worker's busy time, per superstep so far
        while True:
            step, take, old = cmd.superstep, cmd.checkpoint, self.checkpoint
            quiet = issued + quiet_for(durations) - time.monotonic()
            acks = self._await(cmd, quiet)
            durations.append(busy_for(acks))
            report = self._tally(step, acks)
            self.history[step + 1] = (report.vertices, report.aggregates)
            self.step = step + 1
            if take:
                self.checkpoint = step
            done = (report.active == 0 and report.delivered == 0) or self.step >= cfg.max_supersteps
            if not done:
                cmd = self._issue_step()
                issued = time.monotonic()
            if take and old is not None:
                remove_tree(self.layout.checkpoint(self.epoch, old))
            self._publish(report)
            remove_tree(self.layout.step(self.epoch, step - 1))
            if done:
                return report

    def _issue_step(self) -> Command:
        """The command for superstep ``self.step`` (a checkpoint first every ``checkpoint_every``)."""
        step = self.step
        assert step is not None
        every = self.config.checkpoint_every
        num_vertices, aggregated = self.history[step]
        take = bool(every) and step > 0 and step % every == 0 and step != self.checkpoint
        return self._issue(
            "step",
            superstep=step,
            num_vertices=num_vertices,
            aggregated=aggregated,
            checkpoint=take,
        )

    def _tally(self, step: int, acks: list[dict[str, Any]]) -> SuperstepReport:
        """The barrier's counts of one superstep (aggregates folded in slot order)."""
        folded: dict[str, Any] = {}
        for ack in sorted(acks, key=lambda a: a["slot"]):
            fold_into(self.program.aggregators, folded, ack["aggregates"])
        report = SuperstepReport(
            superstep=step,
            active=sum(a["active"] for a in acks),
            sent=sum(a["sent"] for a in acks),
            delivered=sum(a["delivered"] for a in acks),
            vertices=sum(a["vertices"] for a in acks),
            aggregates=folded,
            errors=sum(a["errors"] for a in acks),
            first_error=next((a["first_error"] for a in acks if a["first_error"]), ""),
        )
        self.reports[step] = report
        self.bytes_moved += sum(a["bytes_moved"] for a in acks)
        return report

    def _publish(self, report: SuperstepReport) -> None:
        """The progress file and the ``on_report`` callback of one superstep."""
        progress = asdict(report)
        progress["aggregates"] = {k: to_jsonable(v)[0] for k, v in report.aggregates.items()}
        write_json(self.data.consolidated(self.job_id), progress)
        if self.on_report is not None:
            self.on_report(report)

    def _lose(self, lost: WorkerLost) -> None:
        """A member is gone: new epoch, partitions re-dealt, back to the last checkpoint. A
        retried call of it already running takes its slot, else the others share its partitions."""
        self.log.warn("vertex job rolls back: {why}", why=str(lost))
        self.rollbacks += 1
        beats = self._heartbeats()
        for slot in lost.slots:
            old = self.members.pop(slot, None)
            fresh = beats.get(slot)
            if fresh and (old is None or fresh[0] > old) and fresh[1] < self.config.lost_after:
                self.members[slot] = fresh[0]
        if not self.members:
            raise JobFailed(f"every vertex worker was lost (last: {lost})")
        old, self.epoch = self.epoch, self.epoch + 1
        if self.checkpoint is not None:  # whole: no worker of the old epoch writes there now
            c = self.checkpoint
            os.renames(self.layout.checkpoint(old, c), self.layout.checkpoint(self.epoch, c))
        for folder in (self.layout.epoch(old), self.staging / f"e{old}"):
            if (left := discard(folder)) is not None:
                self.trash.append(left)
        self._deal()
        self.step = self.checkpoint
        self.restore_pending = self.checkpoint is not None

    def _output(self) -> None:
        # in its epoch's folder: a worker lost in an earlier epoch finds none to write in (it
        # makes its file's own folder, never the one above, which went at the rollback)
        staging = self.staging / f"e{self.epoch}" / "out"
        staging.mkdir(parents=True)
        self._command("output", output=str(staging))
        (staging / SUCCESS_MARKER).write_text("")
        out = self.config.output
        if out.exists() or out.is_symlink():
            raise JobFailed(f"output {out} appeared while the job ran; left it alone")
        os.rename(staging, out)  # published whole, by one rename
        remove_tree(self.staging)
