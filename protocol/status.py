"""Status records: what ``status`` says of nodes, jobs and the server, declared once.

The scheduler builds them; ``status_reply`` (and the HTTP API) carries them as maps, checked
against these fields on arrival. A field defaulting to :data:`ABSENT` is left out of the map
when its maker does not know it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .checks import checker

R = TypeVar("R", bound="Record")


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


#: the default of a field that is left out of the map when not set
ABSENT: Any = _Absent()


class Record:
    """Base of the status records: to and from the maps that travel."""

    __slots__ = ()
    #: per field: (name, check of a value from a peer, may be left out)
    WIRE: ClassVar[tuple[tuple[str, Any, bool], ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            name: value for name, _, _ in self.WIRE if (value := getattr(self, name)) is not ABSENT
        }

    @classmethod
    def problem(cls, data: Any) -> str:
        """Why ``data`` is not the map of one of these ("" when it is)."""
        if type(data) is not dict:
            return f"{cls.__name__}: not a map"
        for name, check, optional in cls.WIRE:
            if name in data:
                if not check(data[name]):
                    return f"{cls.__name__}.{name}: bad value of type {type(data[name]).__name__}"
            elif not optional:
                return f"{cls.__name__}: missing field {name!r}"
        return ""  # keys it does not know are a later server's: ignored (protocol/README.md)

    @classmethod
    def from_wire(cls: type[R], data: dict[str, Any]) -> R:
        """The record a checked map describes; ValueError says what is wrong with it."""
        problem = cls.problem(data)
        if problem:
            raise ValueError(problem)
        return cls(**{name: data[name] for name, _, _ in cls.WIRE if name in data})


def record(cls: type[R]) -> type[R]:
    """Class decorator: a frozen record whose map is checked field by field."""
    cls = dataclass(frozen=True, slots=True)(cls)
    hints = typing.get_type_hints(cls)
    cls.WIRE = tuple(
        (f.name, checker(hints[f.name]), f.default is ABSENT) for f in dataclasses.fields(cls)
    )
    return cls


@record
class NodeStatus(Record):
    """One connected node."""

    id: str
    host: str
    pid: int
    cores: int
    busy: int  #: cores running a task
    tasks_in_flight: int  #: tasks sent and not answered (running or waiting on the node)
    memory: int
    load: float
    group: str | None
    draining: bool
    suspect: bool  #: let a task pass its deadline: no new work until it answers
    excluded: bool  #: on the server's exclusion list
    connected_for: float
    tasks_done: int
    data_dir: str | None  #: the node's data directory for file jobs...
    data_id: str | None  #: ...its token...
    data_error: str | None  #: ...or why it cannot use it

    @property
    def state(self) -> str:
        """What the node table's STATE column says."""
        if self.excluded:
            return "excluded"
        if self.suspect:
            return "suspect"
        return "draining" if self.draining else "ready"


@record
class JobStatus(Record):
    """One job: a function job of the scheduler, or a detached data or vertex job's driver."""

    id: int
    name: str
    state: str  #: running, done, failed, killed, cancelled
    phase: str
    mode: str
    group: str | None
    total: int | None  #: the console's hint (a range, a sized iterable) until the last argument
    received: int
    queued: int
    running: int
    done: int
    failed: int
    rate: float
    elapsed: float
    waiting: str
    detached: bool
    output: str | None
    attached: bool
    message: str
    owner: str | None
    # the job's part of the cluster (function jobs in ``status``)
    weight: float = ABSENT
    share: float = ABSENT  #: its weight over the weights of the running jobs with work
    cores: int = ABSENT  #: cores running its tasks now
    max_cores: int | None = ABSENT
    min_cores: int = ABSENT
    left_out: dict[str, str] = ABSENT  #: a file job's: nodes that cannot see its data, and why
    counters: dict[str, int] = ABSENT  #: a file job's counters so far
    #: a gang job's: the argument indices of its calls in flight (which a lost node took back)
    calls: list[int] = ABSENT
    #: a function job kept open (an Executor's) with nothing queued or running; state "running"
    idle: bool = ABSENT
    # a detached data or vertex job's
    kind: str = ABSENT
    data_job: str | None = ABSENT
    job_dir: str | None = ABSENT
    summary: dict[str, Any] | None = ABSENT

    @property
    def shared(self) -> bool:
        """The server said how many cores the job holds (not a detached job's driver)."""
        return self.cores is not ABSENT

    @property
    def shown_state(self) -> str:
        """What a person reads for ``state``: a running job with nothing to do is said idle."""
        return "idle, kept open for reuse" if self.idle and self.state == "running" else self.state


@record
class ServerStatus(Record):
    """The server itself."""

    uptime: float
    cores: int
    cpu_seconds: float
    excluded: list[str] = ABSENT  #: hosts on the exclusion list
    journal: str = ABSENT  #: why the journal cannot write, since when (absent: it can, or is off)


def read_status(status: dict[str, Any]) -> tuple[list[NodeStatus], list[JobStatus], ServerStatus]:
    """The records of a ``status`` answer (``{"nodes": [...], "jobs": [...], "server": {...}}``,
    as the Python API returns it)."""
    return (
        [NodeStatus.from_wire(node) for node in status["nodes"]],
        [JobStatus.from_wire(job) for job in status["jobs"]],
        ServerStatus.from_wire(status["server"]),
    )
