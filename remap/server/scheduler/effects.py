"""Events into the scheduler, effects out of it, and their runner.

:meth:`Scheduler.handle` takes one event and returns the effects it decided on without
performing them; :class:`EffectRunner` performs them with real links and a clock. A test can
assert on the effects alone: no links, no time.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import messages as m
from protocol.errors import RemapError

# ==================================================================== events


@dataclass(frozen=True, slots=True)
class NodeJoined:
    """A node authenticated and described itself."""

    node: str
    link: Any
    info: m.NodeInfo


@dataclass(frozen=True, slots=True)
class NodeLost:
    """A node's connection ended (or it was dropped)."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeLeft:
    """A node said ``goodbye``: it is stopping as asked, so its leaving is no loss."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeSaid:
    """A node's answer or heartbeat: ``TaskResult``, ``TaskFailed`` or ``Heartbeat``."""

    node: str
    msg: m.TaskResult | m.TaskFailed | m.Heartbeat


@dataclass(frozen=True, slots=True)
class ConsoleSaid:
    """A console's arguments for a job: ``Args`` or ``ArgsEnd`` (job ids already resolved)."""

    link: Any
    msg: m.Args | m.ArgsEnd


@dataclass(frozen=True, slots=True)
class ConsoleLost:
    """A console's connection ended."""

    link: Any


@dataclass(frozen=True, slots=True)
class Timer:
    """A timer's name: its kind, the job it is for (0: the scheduler's own) and a serial."""

    kind: str  # "sweep", "preempt", "wait-for-nodes", "console-grace", "restart-grace"
    job: int = 0
    serial: int = 0


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer the scheduler started (and did not cancel) ran out."""

    timer: Timer


Event = NodeJoined | NodeLost | NodeLeft | NodeSaid | ConsoleSaid | ConsoleLost | TimerFired

# ==================================================================== effects
# (not frozen: one is made per message sent, and a frozen dataclass is slower to build)


class Send(NamedTuple):
    """Send ``msg`` on ``link``: a tuple the scheduler builds with ``tuple.__new__`` (a C
    call, where a dataclass's ``__init__`` is a Python one), two or three per single call."""

    link: Any
    msg: m.Message


new_send = tuple.__new__


@dataclass(slots=True)
class Close:
    """Close a peer's connection; ``error`` (if any) is what it is told and why."""

    link: Any
    error: RemapError | None = None


@dataclass(slots=True)
class StartTimer:
    timer: Timer
    delay: float


@dataclass(slots=True)
class CancelTimer:
    timer: Timer


@dataclass(slots=True)
class Unsent:
    """A send that raised, noted by :meth:`Scheduler.unsent`, handed back to
    :meth:`Scheduler.send_failed` once the bookkeeping that decided it is done. ``close``:
    the message's job had ended (or it has none), so that peer is closed."""

    link: Any
    msg: m.Message
    why: str
    close: bool


Effect = Send | Close | StartTimer | CancelTimer | Unsent


def _node_said(node: str, type_name: str, task: int | None) -> str:
    return f"node {node} {type_name}" + (f" task={task}" if task is not None else "")


def _console_said(type_name: str, job: int, what: str, n: int) -> str:
    return f"console {type_name} job={job} {what}={n}"


def describe(event: Any) -> str:
    """One short line for the event log (never a payload: the log is kept in memory); a
    message from a node or a console is logged by :meth:`EventLog.node_said` and
    :meth:`EventLog.console_said` instead."""
    t = type(event)
    if t is NodeJoined:
        return f"node {event.node} joined ({event.info.host}, {event.info.cores} cores)"
    if t is NodeLost:
        return f"node {event.node} lost: {event.reason}"
    if t is NodeLeft:
        return f"node {event.node} left: {event.reason}"
    if t is ConsoleLost:
        return "console lost"
    if t is TimerFired:
        return f"timer {event.timer.kind} job={event.timer.job} fired"
    return str(event)


class EventLog:
    """The last ``size`` events and commands with their time: what the scheduler was told."""

    def __init__(self, size: int = 1000) -> None:
        #: (time, text) or (time, (formatter, its arguments)): see :meth:`node_said`
        self.entries: deque[tuple[float, Any]] = deque(maxlen=size)

    def add(self, now: float, text: str) -> None:
        self.entries.append((now, text[:300]))  # a peer's error text can be long

    # a message from a node or a console (the two events of every call) is kept as the few
    # fields its line needs, formatted only when read

    def node_said(self, now: float, node: str, msg: m.Message) -> None:
        self.entries.append((now, (_node_said, node, msg.TYPE, getattr(msg, "task", None))))

    def console_said(self, now: float, msg: m.Args | m.ArgsEnd) -> None:
        what, n = ("n", len(msg.sizes)) if type(msg) is m.Args else ("total", msg.total)
        self.entries.append((now, (_console_said, msg.TYPE, msg.job, what, n)))

    def recent(self, n: int | None = None) -> list[tuple[float, str]]:
        items = list(self.entries) if n is None else list(self.entries)[-n:]
        return [(t, text if type(text) is str else text[0](*text[1:])[:300]) for t, text in items]


class EffectRunner:
    """Performs effects on links and a clock; a timer that runs out goes back to the scheduler
    as :class:`TimerFired`, and its effects are performed too."""

    log = Logger()

    def __init__(self, clock: Any, scheduler: Any) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.timers: dict[Timer, Any] = {}

    def apply(self, effects: list[Effect]) -> None:
        """Perform ``effects`` in order; a send that raises stops none of the others (see
        :meth:`_unsent`)."""
        for effect in effects:
            t = type(effect)
            if t is Send:
                try:
                    effect.link.send(effect.msg)
                except Exception:  # noqa: BLE001 - the scheduler decides what it means
                    self._unsent(
                        effects, effect, self.scheduler.unsent(effect.link, effect.msg, Failure())
                    )
            elif t is StartTimer or t is CancelTimer:
                call = self.timers.pop(effect.timer, None)
                if call is not None and call.active():
                    call.cancel()
                if t is StartTimer:
                    self.timers[effect.timer] = self.clock.callLater(
                        effect.delay, self._fire, effect.timer
                    )
            elif t is Close:
                effect.link.close(effect.error)
            elif t is Unsent:  # a send the scheduler performed as soon as it decided it raised
                self._unsent(effects, effect, effect)

    def _unsent(self, effects: list[Effect], at: Effect, unsent: Unsent) -> None:
        """A send (``at`` in ``effects``) raised: a peer being closed gets none of the sends
        after it (decided as if that message had left: a ``job_done`` "done" after lost
        results would lie); what the scheduler decides is performed after the rest."""
        if unsent.close:
            i = next(k for k, e in enumerate(effects) if e is at)
            effects[i + 1 :] = [
                e for e in effects[i + 1 :] if type(e) is not Send or e.link is not unsent.link
            ]
        effects += self.scheduler.send_failed(unsent)

    def _fire(self, timer: Timer) -> None:
        self.timers.pop(timer, None)
        self.apply(self.scheduler.handle(TimerFired(timer)))


F = TypeVar("F", bound=Callable[..., Any])


def _same_signature(fn: Callable[..., Any], outermost: Callable[..., Any]) -> Callable[..., Any]:
    """``command``'s wrapper with ``fn``'s own parameters, generated (as dataclasses generates
    ``__init__``): a command inside another (``pump`` in every answer) is a plain call, with no
    packing into ``*args``/``**kwargs`` and out."""
    params, passed, namespace = [], [], {"_fn": fn, "_outermost": outermost}
    keyword_only = False
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"command {fn.__qualname__}: named parameters only")
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            keyword_only = True
            params.append("*")
        text = p.name
        if p.default is not p.empty:
            namespace[f"_d{i}"] = p.default
            text += f"=_d{i}"
        params.append(text)
        if i:
            passed.append(f"{p.name}={p.name}" if keyword_only else p.name)
    first, args = params[0], ", ".join([params[0], *passed])
    source = (
        f"def run({', '.join(params)}):\n"
        f"    if {first}._depth:  # inside another command or an event: theirs to perform\n"
        f"        return _fn({args})\n"
        f"    return _outermost({args})\n"
    )
    exec(source, namespace)  # noqa: S102 - our own source text, as dataclasses does
    return namespace["run"]


def command(fn: F) -> F:
    """A method callers use directly: when the outermost one returns (or raises), the effects
    it decided on are performed by the scheduler's runner. Called inside :meth:`handle` or
    another command, it only adds to their effects."""

    name = fn.__name__

    def outermost(self: Any, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        note = f"{name} {first!r:.40}" if type(first) is int or type(first) is str else name
        self.events.add(self.clock.seconds(), note)
        self._depth += 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if self._outbox:
                self.runner.apply(self.take_effects())

    run = _same_signature(fn, outermost)
    functools.update_wrapper(run, fn)
    return run  # type: ignore[return-value]
