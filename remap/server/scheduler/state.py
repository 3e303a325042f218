"""What the scheduler knows: nodes, tasks in flight, jobs, and the phases a job moves through.

A job's phase changes only by :meth:`JobState.move`, along :data:`TRANSITIONS`: any other
move is a bug and raises :class:`IllegalTransition` rather than leave a job in two phases.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from protocol import messages as m
from protocol.options import JobOptions
from protocol.status import JobStatus, NodeStatus

from ...data.layout import mismatch
from ...transitions import check_move
from .segments import Segment

#: tasks a node may hold per core: one running plus prefetch, so a core never waits a round trip
PREFETCH = 2


class JobPhase(enum.Enum):
    """Where a job is in its life; the last four are final."""

    #: arguments are still arriving from the console (no ``args_end`` yet); tasks run meanwhile
    RECEIVING = "receiving"
    #: every argument is in (``args_end``): the job ends once each has an outcome
    COMPLETING = "completing"
    DONE = "done"
    FAILED = "failed"
    KILLED = "killed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (JobPhase.RECEIVING, JobPhase.COMPLETING)


_ENDS = frozenset({JobPhase.FAILED, JobPhase.KILLED, JobPhase.CANCELLED})

#: the only moves a job makes; DONE needs every argument, so it is reached from COMPLETING only
TRANSITIONS: dict[JobPhase, frozenset[JobPhase]] = {
    JobPhase.RECEIVING: _ENDS | {JobPhase.COMPLETING},
    # back to RECEIVING: a console resumed the job and sends its missing arguments again
    JobPhase.COMPLETING: _ENDS | {JobPhase.DONE, JobPhase.RECEIVING},
    JobPhase.DONE: frozenset(),
    JobPhase.FAILED: frozenset(),
    JobPhase.KILLED: frozenset(),
    JobPhase.CANCELLED: frozenset(),
}


def left_out_of_files(node: NodeState, job: JobState) -> str:
    """Why ``node`` may not run file job ``job`` (it does not see the job's data directory)."""
    if job.options.data_id is None or job.options.data_dir is None:
        return ""
    return mismatch(
        node.data_dir, node.data_id, node.data_error, job.options.data_dir, job.options.data_id
    )


def missing(node: NodeState, job: JobState) -> list[str]:
    """The modules ``job`` requires that ``node`` said it cannot import."""
    if not job.requires or node.modules is None:
        return []
    return sorted(job.requires - node.modules)


@dataclass(eq=False)
class NodeState:
    id: str
    link: Any
    host: str
    pid: int
    cores: int
    memory: int
    group: str | None
    connected_at: float
    load: float = 0.0
    busy: int = 0
    draining: bool = False
    #: told to exit (kill --cluster): its leaving is then no loss
    stopping: bool = False
    inflight: dict[int, TaskState] = field(default_factory=dict)
    loaded: set[int] = field(default_factory=set)
    tasks_done: int = 0
    #: the node let a task pass its deadline: no new work until it answers something
    suspect: bool = False
    #: on the server's persistent exclusion list: connected, but never given work
    excluded: bool = False
    #: top-level modules the node can import (None: it did not say)
    modules: frozenset[str] | None = None
    #: the node's data directory for file jobs, its token, or why it cannot use it
    data_dir: str | None = None
    data_id: str | None = None
    data_error: str | None = None
    #: the largest frame the node takes (0: an in-process link, no frames) and what a task to
    #: it may hold to fit one (``sizing.task_limits``): arguments, bytes of pickles
    frame_limit: int = 0
    batch_args: int = 1 << 62
    batch_bytes: int = 4 * 1024 * 1024

    def has_credit(self) -> bool:
        return (
            not self.draining
            and not self.suspect
            and not self.excluded
            and len(self.inflight) < self.cores * PREFETCH
        )

    def describe(self, now: float) -> NodeStatus:
        return NodeStatus(
            **{name: getattr(self, name) for name in _NODE_FIELDS},
            busy=min(self.cores, len(self.inflight)),
            tasks_in_flight=len(self.inflight),
            connected_for=round(now - self.connected_at, 1),
        )


#: a node's status fields its record holds, by the same names (see :meth:`NodeState.describe`)
_NODE_FIELDS = [
    f.name for f in fields(NodeStatus) if f.name not in ("busy", "tasks_in_flight", "connected_for")
]


@dataclass(eq=False, slots=True)
class TaskState:
    id: int
    job: JobState
    node: NodeState
    segment: Segment  # the arguments not answered yet (streamed parts leave from the front)
    sent_at: float
    answered: int = 0  # arguments answered by streamed parts: positions the node names count them


@dataclass(eq=False, slots=True)
class Replay:
    """A console being sent a detached job's kept results (``attach``), a step at a time."""

    console: Any
    seq: int = 0  # the next ``seq`` it is due
    held: bool = False  # it holds as many results as it will (flow control)
    #: a read of the journal for it is under way (off the reactor thread): it goes on when
    #: that read comes back, not before (one read at a time keeps its results in order)
    reading: bool = False


@dataclass(eq=False)
class JobState:
    id: int
    console: Any
    fn_blob: bytes
    options: JobOptions = JobOptions()
    total: int = -1
    requires: frozenset[str] = frozenset()  # top-level modules of options.requires
    counters: dict[str, int] = field(default_factory=dict)  # a file job's, from its console
    owner: str = ""  # the person who submitted it ("": a console with the cluster secret)
    submitted_at: float = 0.0
    phase: JobPhase = JobPhase.RECEIVING
    message: str = ""
    received: int = 0
    received_bytes: int = 0
    group_max: int = 1  # the most arguments one pickle of the job held (argument groups)
    pending: deque[Segment] = field(default_factory=deque)
    pending_count: int = 0
    pending_bytes: int = 0
    granted: int = 0  # arguments the console may still send
    #: the console's first window is open (neither spent nor forfeited at INITIAL_WINDOW_BYTES)
    first_window: bool = True
    running: int = 0  # arguments in flight on nodes
    tasks: int = 0  # tasks (batches) in flight on nodes: the job's slots in the fair share
    done: int = 0
    failed: int = 0
    per_call: float | None = None  # EWMA of core seconds per argument
    waiting: str = ""
    #: why one of its messages could not be sent ("": none failed): it fails, never ends done
    unsent: str = ""
    attached: bool = False  # a console asked for this detached job's results
    #: a detached job's result messages by ``seq`` (numbered in delivery order, from
    #: ``next_seq``) held in memory: every one without a journal, else those it has not
    #: committed yet (it serves the rest); bounded (:meth:`Scheduler.results_budget`)
    kept: dict[int, m.Results] = field(default_factory=dict)
    kept_bytes: int = 0
    next_seq: int = 0
    #: consoles being sent the job's kept results (attach), by ``id`` (a link need not be
    #: hashable)
    replays: dict[int, Replay] = field(default_factory=dict)
    replay_timer: Any = None  # the next replay step's
    #: without a journal, a finished detached job's: its results are dropped when it runs out
    keep_timer: Any = None
    #: that timer ran out while a console was being sent them: dropped once none is
    expired: bool = False
    #: why its results are no longer kept ("" while they are): what attach and status say
    dropped: str = ""
    timers: list[Any] = field(default_factory=list)
    finished_at: float | None = None
    #: ends the job unless its console comes back (see :meth:`Scheduler.console_lost`)
    orphan_timer: Any = None
    #: after a ``resume``: runs ``[start, stop]`` of indices the console sends again first
    expect: deque[list[int]] = field(default_factory=deque)
    #: flow control of results: its console asked to hold it, or its writes are congested, or
    #: (``full``, a detached job) its results in memory reached their budget; ``paused`` is
    #: any, and then none of its calls is dispatched
    held: bool = False
    congested: bool = False
    full: str = ""  # why (the status line), "" when not
    paused: bool = False
    #: bytes of a result, a moving average (0: none measured), for ``policy.batch_size``
    result_size: float = 0.0
    #: arguments a batch may hold so its results fit a frame to the console (0: no cap)
    result_cap: int = 0
    #: the ``group_limit`` its console was told (0: no bound said)
    group_bytes: int = 0

    #: ``phase`` is final; ``phase`` is RECEIVING. Attributes :meth:`move` keeps, not
    #: properties: they are read on every dispatch and answer (a property is a Python call)
    finished: bool = field(default=False, init=False)
    receiving: bool = field(default=True, init=False)
    #: arguments per batch (:func:`~.policy.batch_size`), set again by the scheduler whenever
    #: ``per_call`` or ``total`` change
    batch: int = field(default=1, init=False)
    #: the fair-share key of its live entry in the scheduler's queue (None: no live entry)
    queued: tuple | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.rebuilt(self.phase)
        from .policy import batch_size  # (policy reads this module's records)

        self.batch = batch_size(self)

    @property
    def state(self) -> str:
        """What status shows and ``job_done`` says: running until a final phase names the end."""
        return self.phase.value if self.phase.final else "running"

    def move(self, phase: JobPhase) -> None:
        """Change phase along :data:`TRANSITIONS` (anything else raises)."""
        check_move(f"job {self.id}", TRANSITIONS, self.phase, phase)
        self.rebuilt(phase)

    def rebuilt(self, phase: JobPhase) -> None:
        """Set the phase without a move (a job rebuilt from the journal)."""
        self.phase = phase
        self.finished = phase.final
        self.receiving = phase is JobPhase.RECEIVING

    @property
    def weight(self) -> float:
        """Share weight: 2 ** priority (clamped to ±20), so each priority step doubles a job's
        share, equal priorities share equally, and a large gap approaches strict priority."""
        return 2.0 ** max(-20, min(20, self.options.priority))

    def describe(self, now: float, **more: Any) -> JobStatus:
        """The job's status record (``more``: what only the scheduler knows, its share)."""
        end = self.finished_at or now
        elapsed = max(end - self.submitted_at, 1e-9)
        return JobStatus(
            id=self.id,
            name=self.options.name,
            state=self.state,
            phase=self.phase.value,
            mode=self.options.mode.value,
            group=self.options.group,
            # the console's hint (a job file's args_range, a sized iterable) until args_end
            total=self.total if self.total >= 0 else None,
            received=self.received,
            queued=self.pending_count,
            running=self.running,
            done=self.done,
            failed=self.failed,
            rate=round((self.done + self.failed) / elapsed, 1),
            elapsed=round(elapsed, 2),
            waiting=self.waiting or self.full,
            detached=self.options.detach,
            output=self.options.output,
            attached=self.console is not None,
            message=self.message,
            owner=self.owner or None,
            # its console may still send arguments and none is queued or in flight
            idle=self.receiving
            and self.console is not None
            and not self.pending_count
            and not self.tasks,
            **more,
        )
