"""The scheduler core: jobs, nodes, credits, retries. No sockets, no reactor.

:meth:`Scheduler.handle` takes an event and returns the effects decided on without performing
them; commands (submit, kill, drain, ...) are methods whose effects the
:class:`~.effects.EffectRunner` performs when they return. The two events of every call come
in through :meth:`~Scheduler.node_said` and :meth:`~Scheduler.console_said`, where a send with
nothing queued ahead of it leaves at once, so a call's next hop starts earlier. Time is read
from an injected clock, so every decision can be tested with fake links and a fake clock.

Invariants that make delivery exactly-once:

* every argument index is in exactly one place: a job's ``pending`` queue, one node's
  in-flight task, or counted as finished (``done``/``failed``);
* a task id is answered at most once: it leaves ``node.inflight`` when answered, re-queued or
  its job ends, so a late or duplicate answer finds nothing and is dropped;
* a send that raises never cuts short the bookkeeping that decided it: :meth:`~Scheduler.unsent`
  notes it, then the message's job fails saying what could not be sent to whom (never "done");
  a message of no running job closes that peer instead (:meth:`~Scheduler.send_failed`).
"""

from __future__ import annotations

import heapq
import itertools
import re
import time
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import messages as m
from protocol.errors import RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, frame_length
from protocol.options import JobOptions
from protocol.status import JobStatus, NodeStatus, ServerStatus

from . import policy
from .answers import NodeAnswers
from .effects import (
    CancelTimer,
    Close,
    ConsoleLost,
    ConsoleSaid,
    Effect,
    EffectRunner,
    EventLog,
    NodeJoined,
    NodeLeft,
    NodeLost,
    NodeSaid,
    Send,
    StartTimer,
    Timer,
    TimerFired,
    Unsent,
    command,
    describe,
    new_send,
)
from .kept import RESULTS_KEEP, RESULTS_MEMORY, RESULTS_MEMORY_TOTAL, KeptResults
from .policy import SWEEP_INTERVAL
from .recovery import Recovery
from .segments import Segment, take_from
from .sizing import ARG_TOO_LARGE, group_room, node_too_large_text, task_bound, task_limits
from .state import PREFETCH, JobPhase, JobState, NodeState, TaskState, left_out_of_files, missing

#: what a node's ``frame-too-large`` error says of its limit (``protocol.framing``'s wording)
_LIMIT_SAID = re.compile(r"limit of (\d+) bytes")
#: what a node's record takes from its ``node_info`` as it is said
_AS_SAID = ("host", "pid", "memory", "load", "data_dir", "data_id", "data_error")
#: a task id no task reaches: a task measured before it has its id is measured with this one
_LONGEST_ID = (1 << 63) - 1

#: 2026-01-01T00:00:00Z: job ids count milliseconds from here (see :func:`first_job_id`)
JOB_ID_EPOCH = 1_767_225_600


def first_job_id(now: float | None = None) -> int:
    """The first job id of a server started at ``now`` (wall-clock seconds; default: now).

    Ids count milliseconds from the start, so a restarted server never reuses an earlier run's
    id (unless it averaged over a job per millisecond) and ``attach 7`` after a restart says
    "no such job" rather than return another job's results, with nothing stored.
    """
    return max(1, int(((time.time() if now is None else now) - JOB_ID_EPOCH) * 1000))


#: pickles waiting for a node with larger frames a dispatch passes over to find work that fits
#: a smaller node (see :meth:`Scheduler._behind_large`): a bound on the work of one dispatch
SKIP_LARGE = 32


def _task(task_id: int, job_id: int, seg: Segment) -> m.Task:
    """The task of ``seg``: with argument groups, which of its pickles' arguments run."""
    groups = seg.groups  # (None: the defaults, left out on the wire)
    return m.Task.make(
        task=task_id,
        job=job_id,
        sizes=seg.sizes,
        groups=groups or [],
        skip=seg.skip,
        count=-1 if groups is None else len(seg.indices),
        payload=seg.payload,
    )


def _besides(may_run: Any, job: JobState) -> Any:
    """``may_run`` that leaves ``job`` out too (what is next of it waits for larger frames)."""
    return lambda node, other: other is not job and may_run(node, other)


class Scheduler(NodeAnswers, Recovery, KeptResults):
    """Owns every job and node; takes events, returns effects (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        *,
        console_grace: float = 10.0,
        preempt_grace: float | None = None,
        keep_finished: int = 50,
        job_ids_from: int = 1,
        event_log: int = 1000,
        max_frame: int = DEFAULT_MAX_FRAME,
        results_memory: int = RESULTS_MEMORY,
        results_memory_total: int = RESULTS_MEMORY_TOTAL,
        results_keep: float = RESULTS_KEEP,
    ) -> None:
        self.clock = clock
        #: budgets of detached jobs' results in memory, per job and in all (see ``kept``), and
        #: what they hold now and at most since the server started
        self.results_memory = results_memory
        self.results_memory_total = results_memory_total
        #: seconds a finished detached job's results stay in memory without a journal
        self.results_keep = results_keep
        self.kept_bytes = 0
        self.kept_peak = 0
        #: the server's own frame limit, named in errors of frames too large for a peer's
        self.max_frame = max_frame
        self._outbox: list[Effect] = []
        self._depth = 0  # commands running (see :func:`command`)
        #: inside :meth:`node_said` or :meth:`console_said` (see :meth:`_send`)
        self._eager = False
        #: performs the effects of commands and of timers that run out; the service uses it too
        self.runner = EffectRunner(clock, self)
        #: the last ``event_log`` events and commands, for debugging (GET /api/v1/debug/scheduler)
        self.events = EventLog(event_log)
        self._timer_serials = itertools.count(1)
        #: what a job's timer does when it runs out: the failure message it ends the job with
        self._timer_notes: dict[Timer, str] = {}
        self.console_grace = console_grace
        #: seconds a job below its share waits for lower-priority jobs' tasks to end before they
        #: are cancelled and re-queued to make room; None: no preemption (the default)
        self.preempt_grace = preempt_grace
        self._preempt_timer: Timer | None = None
        self.keep_finished = keep_finished
        self.nodes: dict[str, NodeState] = {}
        #: nodes gone since the server started, lost or left as asked (for ``/metrics``)
        self.nodes_lost = 0
        self.nodes_left = 0
        self.jobs: dict[int, JobState] = {}  # running and recently finished, by id
        self.active: dict[int, JobState] = {}  # running only
        #: active jobs with arguments queued (what pump's scans look at, not every job)
        self._with_work: dict[int, JobState] = {}
        #: (key, job) entries, lowest :func:`~.policy.share_key` first, of the jobs that may
        #: take a free slot on some node (see :meth:`_renew`): a dispatch takes the top, not a scan
        #: of every job. An entry is live while it is its job's ``queued`` key; a stale one
        #: (the key moved on) is dropped when it comes to the top. (Keys end with the job's id:
        #: entries of two jobs never tie, and a tie of one job's is its own, equal to itself.)
        self._queue: list[tuple[tuple, JobState]] = []
        #: jobs whose work, tasks or pause moved since their entry: renewed before a choice
        self._moved: dict[int, JobState] = {}
        #: jobs whose grant may have changed (queue, credits, console) since the last one
        self._regrant: dict[int, JobState] = {}
        self._job_ids = itertools.count(job_ids_from)
        self.job_ids_from = job_ids_from
        self._task_ids = itertools.count(1)
        self._ready: dict[str, NodeState] = {}  # nodes with free credit, in arrival order
        self._all_credits = 0
        #: (host, pid) of drained node processes, so a reconnecting one stays drained
        self._drained: set[tuple[str, int]] = set()
        #: the limits node processes (host, pid) named when refusing a frame (see
        #: :meth:`node_refused_frame`)
        self._frame_limits: dict[tuple[str, int], int] = {}
        #: connected nodes whose frames are smaller than the server's (see :meth:`_group_limits`)
        self._small_frames: set[str] = set()
        #: host names on the exclusion list (see :meth:`set_excluded`)
        self.excluded_hosts: frozenset[str] = frozenset()
        self._group_credits: dict[str, int] = {}
        self._sweep: Timer | None = None  # the pending deadline check, while tasks are in flight
        self.started_at = clock.seconds()
        self.cpu_started = time.process_time()
        #: observers (metrics, the HTTP API) told ``batch_finished(job, n, seconds)`` and
        #: ``results_delivered(job, msg)``
        self.watchers: list[Any] = []
        #: the server's journal (:mod:`remap.server.journal`), once :meth:`restore` gave one
        self.journal: Any = None
        #: the server stops (:meth:`stop`): no replay reads its closing journal
        self.stopped = False

    # ================================================================ events in, effects out

    def handle(self, event: Any) -> list[Effect]:
        """Take one event; return the effects decided on, performing none of them."""
        t = type(event)
        if t is NodeSaid:
            return self._node_said(event.node, event.msg)
        if t is ConsoleSaid:
            return self._console_said(event.link, event.msg)
        self.events.add(self.clock.seconds(), describe(event))
        self._depth += 1
        try:
            if t is NodeJoined:
                self.add_node(event.node, event.link, event.info)
            elif t is NodeLost:
                self.remove_node(event.node, event.reason)
            elif t is NodeLeft:
                self.remove_node(event.node, event.reason, left=True)
            elif t is ConsoleLost:
                self.console_lost(event.link)
            elif t is TimerFired:
                self._timer_fired(event.timer)
            else:
                raise TypeError(f"the scheduler takes no {t.__name__} event")
        finally:
            self._depth -= 1
        return self.take_effects()

    # the two events of every call, without building the event: the service's entries

    def node_said(self, node: str, msg: m.TaskResult | m.TaskFailed | m.Heartbeat) -> None:
        """:class:`NodeSaid`, its effects performed (what ``runner.apply(handle(...))`` does),
        each send as soon as it is decided (see :meth:`_send`)."""
        self._eagerly(self._node_said, node, msg)

    def console_said(self, link: Any, msg: m.Args | m.ArgsEnd) -> None:
        """:class:`ConsoleSaid`, its effects performed, each send as soon as it is decided."""
        self._eagerly(self._console_said, link, msg)

    def _eagerly(self, said: Any, peer: Any, msg: m.Message) -> None:
        self._eager = True
        try:
            effects = said(peer, msg)
        finally:
            self._eager = False
        if effects:  # (mostly sent already)
            self.runner.apply(effects)

    def _node_said(self, node: str, msg: m.TaskResult | m.TaskFailed | m.Heartbeat) -> list[Effect]:
        self.events.node_said(self.clock.seconds(), node, msg)
        self._depth += 1
        try:
            t = type(msg)
            if t is m.TaskResult:
                self.task_result(node, msg)
            elif t is m.TaskFailed:
                self.task_failed(node, msg)
            elif (state := self.nodes.get(node)) is not None:  # a heartbeat
                state.load, state.busy = msg.load, msg.busy
        finally:
            self._depth -= 1
        return self.take_effects()

    def _console_said(self, link: Any, msg: m.Args | m.ArgsEnd) -> list[Effect]:
        self.events.console_said(self.clock.seconds(), msg)
        self._depth += 1
        try:
            if type(msg) is m.Args:
                problem = self.args_received(link, msg)
            else:
                problem = self.args_ended(link, msg)
            if problem:
                self.log.warn(
                    "console {peer} broke the protocol: {problem}",
                    peer=getattr(link, "peer", link),
                    problem=problem,
                )
                self._outbox.append(Close(link, RemoteProtocolError(problem)))
        finally:
            self._depth -= 1
        return self.take_effects()

    def take_effects(self) -> list[Effect]:
        """The effects decided on since the last call (and forget them)."""
        out, self._outbox = self._outbox, []
        return out

    def _send(self, link: Any, msg: m.Message) -> None:
        if self._eager and not self._outbox:
            # a send with nothing queued ahead of it leaves now, so a call's task (or results)
            # is on its way before the bookkeeping after it; the order of effects is kept
            try:
                link.send(msg)
                return  # (here, not after the except: no jump over it)
            except Exception:  # noqa: BLE001 - dealt with after the bookkeeping (send_failed)
                self._outbox.append(self.unsent(link, msg, Failure()))  # the rest queue behind
                return
        self._outbox.append(new_send(Send, (link, msg)))

    def unsent(self, link: Any, msg: m.Message, failure: Failure) -> Unsent:
        """A send just raised (``failure``): log it and note it on the message's running job,
        which then fails rather than end done. Nothing else changes here, in the middle of the
        bookkeeping that decided the send: :meth:`send_failed` acts on it."""
        node = next((n for n in self.nodes.values() if n.link is link), None)
        to = f"node {node.id} ({node.host})" if node else f"console {getattr(link, 'peer', link)}"
        self.log.failure("could not send {type} to {to}", failure, type=msg.TYPE, to=to)
        self.events.add(self.clock.seconds(), f"could not send {msg.TYPE} to {to}")
        error = failure.value
        text = (str(error).splitlines() or [""])[0][:200]
        why = f"could not send {msg.TYPE} to {to}: {type(error).__name__}"
        why += f": {text}" if text else ""
        job = self.active.get(getattr(msg, "job", None))
        if job is not None and not job.unsent:
            job.unsent = f"server error: {why}"
        return Unsent(link, msg, why, job is None)

    def send_failed(self, unsent: Unsent) -> list[Effect]:
        """Act on a send that raised, once the bookkeeping that decided it is done: its running
        job fails with the reason; a message of no running job closes that peer (told why), so
        it waits for nothing, as when a connection is lost. Returns the effects."""
        self._depth += 1
        try:
            if unsent.close:
                error = RemoteProtocolError(f"the server {unsent.why}"[:500])
                self._outbox.append(Close(unsent.link, error))
            else:
                job = self.active.get(getattr(unsent.msg, "job", None))
                if job is not None:  # (else it ended failed already: its console was told why)
                    self.finish(job, "failed", job.unsent)
        finally:
            self._depth -= 1
        return self.take_effects()

    def _start_timer(self, kind: str, delay: float, job: int = 0, note: str = "") -> Timer:
        timer = Timer(kind, job, next(self._timer_serials))
        if note:
            self._timer_notes[timer] = note
        self._outbox.append(StartTimer(timer, delay))
        return timer

    def _timer_fired(self, timer: Timer) -> None:
        kind = timer.kind
        if kind == "sweep" or kind == "preempt":  # the scheduler's own: only the last one started
            if timer == self._sweep:
                self._check_deadlines()
            elif timer == self._preempt_timer:
                self._preempt()
            return
        note = self._timer_notes.pop(timer, "")
        job = self.jobs.get(timer.job)
        if kind == "replay":  # (a finished job's too)
            if job is not None and job.replay_timer == timer:
                self._replay_timer(job)
            return
        if kind == "results-keep":  # (a finished job's only)
            if job is not None and job.keep_timer == timer:
                self._results_expired(job)
            return
        if job is None or job.finished:
            return
        if kind == "wait-for-nodes" and job.waiting:
            self.finish(job, "failed", note)
        elif kind in ("console-grace", "restart-grace") and (job.console is None or job.receiving):
            self.finish(job, "cancelled" if kind == "console-grace" else "failed", note)

    # ================================================================ nodes

    @command
    def add_node(self, node_id: str, link: Any, info: m.NodeInfo) -> NodeState:
        node = NodeState(
            **{name: getattr(info, name) for name in _AS_SAID},
            id=node_id,
            link=link,
            cores=max(1, info.cores),
            group=info.group or None,
            connected_at=self.clock.seconds(),
            draining=(info.host, info.pid) in self._drained,
            excluded=info.host in self.excluded_hosts,
            modules=None if info.modules is None else frozenset(info.modules),
        )
        limit = getattr(link, "frame_limit", 0)  # (0: an in-process link, no frames)
        known = self._frame_limits.get((info.host, info.pid))
        if known and (not limit or known < limit):
            limit = known
        self.nodes[node_id] = node
        self._limit_frames(node, limit)
        if node.has_credit():
            self._ready[node_id] = node
        self._add_credits(node, +1)
        self._all_moved()
        self.log.info(
            "node {id} joined: {host} with {cores} cores, group {group}",
            id=node_id,
            host=node.host,
            cores=node.cores,
            group=node.group,
        )
        for job in self.active.values():
            if not job.finished and job.waiting and self._group_ok(node, job):
                job.waiting = ""
        self._group_limits()
        self.pump()
        return node

    def _limit_frames(self, node: NodeState, limit: int) -> None:
        """Size what is sent to ``node`` to frames of ``limit`` bytes (0: no limit); consoles
        feeding jobs are told how large an argument group may be (:meth:`_group_limits`)."""
        node.frame_limit = limit
        node.batch_args, node.batch_bytes = task_limits(limit)
        if 0 < limit < self.max_frame:
            self._small_frames.add(node.id)
        else:
            self._small_frames.discard(node.id)

    def _group_bound(self, job: JobState) -> int:
        """The largest argument group's pickle that fits every connected node that may run
        ``job`` (0: no bound); while it waits for nodes, ``EARLY_GROUP_BYTES``: the first to
        come may take small frames, and groups queued before then could fit none."""
        if job.waiting:
            return m.EARLY_GROUP_BYTES
        if not self._small_frames:
            return 0
        bound = 0
        nodes = self.nodes
        for node_id in self._small_frames:
            node = nodes[node_id]
            if node.draining or node.excluded or not self._group_ok(node, job):
                continue
            room = group_room(node.frame_limit)
            if not bound or room < bound:
                bound = room
        return bound

    def _group_limits(self, jobs: Iterable[JobState] | None = None) -> None:
        """Tell each console still sending arguments the largest argument group worth sending
        (``group_limit``), when that changed: a group no node may take would fail each of its
        arguments though each fits alone, and the server cannot split a group (it never
        unpickles). Nothing is sent on a cluster of nodes with the server's frames."""
        for job in self.active.values() if jobs is None else jobs:
            if not job.receiving or job.console is None:
                continue
            bound = self._group_bound(job)
            if bound != job.group_bytes:
                job.group_bytes = bound
                self._send(job.console, m.GroupLimit(job=job.id, max_bytes=bound))

    @command
    def node_refused_frame(self, node_id: str, message: str) -> None:
        """A node closes its connection over a frame larger than its hello said it takes (its
        ``frame-too-large`` error ``message`` names its limit). Frames to it, also when that
        node process connects again, are held from now on to the limit it named (half of what
        was believed, if it named none or a larger one), so the frame it refused is never sent
        to it again (its work comes back as from any lost node)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        believed = node.frame_limit or self.max_frame
        said = _LIMIT_SAID.search(message)
        limit = int(said.group(1)) if said else believed
        if limit >= believed:
            limit = believed // 2
        limit = max(1, limit)
        self._frame_limits[(node.host, node.pid)] = limit
        self._limit_frames(node, limit)
        self._group_limits()
        self.log.warn(
            "node {id} ({host}) refused a frame over its limit of {limit} bytes, which its hello "
            "did not say; frames to it are held to that limit from now on ({message})",
            id=node_id,
            host=node.host,
            limit=limit,
            message=message[:200],
        )

    def _add_credits(self, node: NodeState, sign: int) -> None:
        """Keep credit totals (all nodes, per group) current, so sizing a window is O(1)."""
        credits = sign * node.cores * PREFETCH
        self._all_credits += credits
        if node.group is not None:
            self._group_credits[node.group] = self._group_credits.get(node.group, 0) + credits

    def _credits_for(self, job: JobState) -> int:
        """Total credits of the nodes that may run ``job``."""
        return (
            self._group_credits.get(job.options.group, 0)
            if job.options.group is not None
            else self._all_credits
        )

    @command
    def remove_node(self, node_id: str, reason: str, *, left: bool = False) -> None:
        """A node is gone: its in-flight work goes back to the front of its jobs' queues.

        Unless it said ``goodbye`` (``left``) or was told to stop, it is a loss: the warning
        operators watch for."""
        node = self.nodes.pop(node_id, None)
        self._ready.pop(node_id, None)
        if node is None:
            return
        self._add_credits(node, -1)
        self._small_frames.discard(node_id)
        requeued = 0
        for task in sorted(node.inflight.values(), key=lambda t: -t.id):
            job = task.job
            job.running -= len(task.segment)
            job.tasks -= 1
            if not job.finished:
                self._requeue(job, task.segment)
                requeued += len(task.segment)
        node.inflight.clear()
        if node.stopping or left:
            self.nodes_left += 1
            how = "left as told" if node.stopping else f"left ({reason[:200] or 'stopping'})"
            log = self.log.info
        else:
            self.nodes_lost += 1
            how, log = f"lost: {reason}", self.log.warn
        log(
            "node {id} ({host}) {how}; {n} arguments re-queued",
            id=node_id,
            host=node.host,
            how=how,
            n=requeued,
        )
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        """Which nodes take work changed: jobs left without one wait (their consoles told), and
        consoles hear the argument groups the nodes now take; then work is dispatched (work
        held for a node's larger frames may now fit no node: see :meth:`_too_large`)."""
        for job in self.active.values():
            if not job.finished:
                self._check_capacity(job)
        self._all_moved()  # (and the credits, when a node left)
        self._group_limits()
        self.pump()

    def _all_moved(self) -> None:
        """Every job's place and grant are renewed at the next pump (nodes came or went)."""
        self._moved.update(self.active)
        self._regrant.update(self.active)

    @command
    def stop_nodes(self, reason: str) -> None:
        """Tell every node to exit (``kill --cluster``): their leaving then is no loss."""
        self.nodes_leaving()
        for node in self.nodes.values():
            self._send(node.link, m.Shutdown(reason=reason))

    def nodes_leaving(self) -> None:
        """Every node now connected is about to leave as asked: logged as no loss."""
        for node in self.nodes.values():
            node.stopping = True

    def find_node(self, node_ref: str) -> NodeState | None:
        """The node named by its id, a unique id prefix, ``host:pid``, or a unique host.

        A blank reference names no node: as a prefix it would pick the only node connected
        (``drain "$NODE"`` with the variable unset, ``POST /api/v1/nodes//drain``)."""
        if not node_ref.strip():
            return None
        matches = [n for n in self.nodes.values() if node_ref in (n.id, f"{n.host}:{n.pid}")]
        if not matches:
            matches = [
                n for n in self.nodes.values() if n.id.startswith(node_ref) or n.host == node_ref
            ]
        return matches[0] if len(matches) == 1 else None

    @command
    def drain(self, node_ref: str) -> NodeState | None:
        """Drain a node (see :meth:`find_node` for ``node_ref``)."""
        return self._drain(node_ref, True)

    @command
    def undrain(self, node_ref: str) -> NodeState | None:
        """Let a drained node take work again (see :meth:`find_node` for ``node_ref``)."""
        return self._drain(node_ref, False)

    def _drain(self, node_ref: str, draining: bool) -> NodeState | None:
        node = self.find_node(node_ref)
        if node is not None:
            node.draining = draining
            if draining:
                self._drained.add((node.host, node.pid))  # still draining if it reconnects
                self._ready.pop(node.id, None)
            else:
                self._drained.discard((node.host, node.pid))
                if node.has_credit():
                    self._ready[node.id] = node
            self._capacity_changed()
        return node

    @command
    def set_excluded(self, hosts: frozenset[str]) -> None:
        """Nodes on these hosts stay connected but get no new work (in-flight work finishes)."""
        self.excluded_hosts = hosts
        for node in self.nodes.values():
            node.excluded = node.host in hosts
            if node.has_credit():
                self._ready[node.id] = node
            else:
                self._ready.pop(node.id, None)
        self._capacity_changed()

    # ================================================================ jobs

    def submit(self, console: Any, msg: m.Submit, owner: str = "") -> Deferred:
        """A new job, accepted (its console told ``submitted``) once the journal committed it:
        fires with the job (at once without a journal), or fails with JournalError, the job
        not accepted. ``owner`` is the person whose key the console used ("": cluster secret).
        While the journal cannot write, an attached job runs unrecorded (its console holds its
        arguments and outcomes: only a restart meanwhile forgets it); a detached one is refused
        (its arguments and results would have nowhere to go but memory)."""
        job_id, now = next(self._job_ids), self.clock.seconds()
        if self.journal is None or (self.journal.trouble and not msg.detach):
            return succeed(self.accept(console, msg, owner, job_id, now))
        committed = self.journal.job_submitted(job_id, msg, now, owner)
        return committed.addCallback(lambda _: self.accept(console, msg, owner, job_id, now))

    @command
    def accept(self, console: Any, msg: m.Submit, owner: str, job_id: int, now: float) -> JobState:
        """The job of a submit the journal (if any) committed: its console is told ``submitted``."""
        job = self._new_job(job_id, console, msg, now)
        job.owner = owner
        self.jobs[job.id] = job
        self.active[job.id] = job
        if getattr(console, "congested", False):
            self._console_changed(job)
        job.granted = self._window(job)
        self.log.info(
            "job {id} ({name}) submitted, mode {mode}",
            id=job.id,
            name=job.options.name,
            mode=job.options.mode,
        )
        runnable = self._runnable(job)
        if self._small_frames or not runnable:  # before `submitted`: the first groups wait
            job.group_bytes = self._group_bound(job) if runnable else m.EARLY_GROUP_BYTES
            if job.group_bytes:
                self._send(console, m.GroupLimit(job=-msg.id, max_bytes=job.group_bytes))
        self._send(console, m.Submitted(re=msg.id, job=job.id, window=job.granted))
        self._check_capacity(job, wait_for_nodes=msg.wait_for_nodes, runnable=runnable)
        self._prune_finished()
        return job

    @staticmethod
    def _new_job(job_id: int, console: Any, msg: m.Submit, now: float) -> JobState:
        """The job a submit message describes (a new one, or one a journal recorded)."""
        options = JobOptions.of(msg)
        return JobState(
            id=job_id,
            console=console,
            fn_blob=msg.payload,
            options=options,
            total=msg.total,
            requires=frozenset(name.split(".")[0] for name in options.requires),
            submitted_at=now,
        )

    def take_job_id(self) -> int:
        """A fresh job id for a job the scheduler does not run itself (a detached driver)."""
        return next(self._job_ids)

    def _group_ok(self, node: NodeState, job: JobState) -> bool:
        options = job.options
        return (  # (each check asked only of a job it concerns: every dispatch passes here)
            (options.group is None or node.group == options.group)
            and (not job.requires or not missing(node, job))
            and (options.data_id is None or not left_out_of_files(node, job))
        )

    def _runnable(self, job: JobState) -> bool:
        """Whether a connected node that takes work may run ``job``."""
        return any(
            self._group_ok(n, job) and not (n.draining or n.excluded) for n in self.nodes.values()
        )

    def _check_capacity(
        self, job: JobState, wait_for_nodes: float | None = None, runnable: bool | None = None
    ) -> None:
        if self._runnable(job) if runnable is None else runnable:
            job.waiting = ""
            return
        if job.options.group:
            where = f"in group {job.options.group!r}"
        elif any(not (n.draining or n.excluded) for n in self.nodes.values()):
            # nodes that take work, each left out of this job (a module it `requires`, the
            # data directory): the server names them and why in notices of their own
            where = "(every node that takes work is left out of this job)"
        elif any(n.excluded for n in self.nodes.values()):
            where = "(every node is draining or excluded)"
        else:
            where = "(every node is draining)" if self.nodes else "(no node is connected)"
        note = f"waiting for nodes {where}"
        if job.waiting != note:
            job.waiting = note
            if job.console is not None:
                self._send(job.console, m.JobNotice(job=job.id, message=note))
        if wait_for_nodes is not None:
            why = f"no nodes {where} after {wait_for_nodes:g}s"
            job.timers.append(self._start_timer("wait-for-nodes", wait_for_nodes, job.id, why))

    @command
    def args_received(self, console: Any, msg: m.Args) -> str | None:
        """Queue a console's arguments; return an error text for a protocol violation."""
        job = self.jobs.get(msg.job)
        if job is None or job.console is not console:
            return f"job {msg.job} is not yours"
        if job.finished:
            return None  # a race with kill/failure: drop silently
        groups = msg.groups
        if groups and (
            len(groups) != len(msg.sizes) or not 1 <= min(groups) <= max(groups) <= m.MAX_GROUP
        ):
            return f"argument groups must give 1 to {m.MAX_GROUP} arguments for each pickle"
        n = msg.count
        expect = job.expect
        first = expect[0][0] if expect else job.received
        if msg.start != first:
            return f"arguments out of order: expected start {first}, got {msg.start}"
        if expect:  # resent after a resume: a run the console lacks results for
            run = expect[0]
            if msg.start + n > run[1]:
                return f"arguments {msg.start}..{msg.start + n - 1} cross index {run[1]}"
            run[0] += n
            if run[0] == run[1]:
                expect.popleft()
        if n > job.granted:
            return f"sent {n} arguments with a window of {job.granted}"
        if sum(msg.sizes) != len(msg.payload):
            return "argument sizes do not add up to the payload"
        if groups:
            job.group_max = max(job.group_max, max(groups))
        job.granted -= n
        job.received += n
        job.received_bytes += len(msg.payload)
        if job.first_window and (
            job.granted == 0
            or (groups and job.granted < m.MAX_GROUP)
            or job.received_bytes >= m.INITIAL_WINDOW_BYTES
        ):
            # the console stops here too (protocol README, section 5): the rest is forfeited
            job.first_window = False
            job.granted = 0
        if n:
            job.pending.append(
                Segment(  # (positional: no keyword to match)
                    range(msg.start, msg.start + n),
                    msg.sizes,
                    memoryview(msg.payload),
                    0,
                    groups or None,
                )
            )
            job.pending_count += n
            job.pending_bytes += len(msg.payload)
            if job.options.detach and self.journal is not None:
                self.journal.args_received(job.id, msg.start, msg.sizes, msg.payload, groups)
        self._moved[job.id] = self._regrant[job.id] = job
        self.pump()
        return None

    @command
    def args_ended(self, console: Any, msg: m.ArgsEnd) -> str | None:
        job = self.jobs.get(msg.job)
        if job is None or job.console is not console:
            return f"job {msg.job} is not yours"
        # (arguments that crossed a kill or failure were dropped uncounted: see args_received)
        if not job.finished and (msg.total != job.received or job.expect):
            return f"args_end says {msg.total} arguments, {job.received} were sent"
        if job.receiving:  # a late args_end (the job was killed meanwhile) changes nothing
            job.move(JobPhase.COMPLETING)
        job.total = msg.total
        job.batch = policy.batch_size(job)  # (a size now known)
        job.granted = 0
        self._regrant[job.id] = job
        if self.journal is not None and job.options.detach and not job.finished:
            # committed at once: the console of a detached job leaves after this message (with
            # an ``id``, once told the arguments are committed)
            stored = self.journal.args_ended(job.id, msg.total, now=True)
            if msg.id:
                stored.addCallback(
                    lambda why: why and f"{why}; a restart of the server before it can ends the job"
                )
                stored.addCallback(self._args_stored, console, msg.id, job.id)
        elif msg.id:
            if job.finished:
                why = f"job {job.id} has ended ({job.state})"
            elif not job.options.detach:
                why = f"job {job.id} is not detached: its console holds its arguments"
            else:
                why = (
                    "the server keeps no journal (REMAP_JOURNAL is off): a restart forgets the job"
                )
            self._args_stored(why, console, msg.id, job.id)
        self._maybe_complete(job)
        return None

    @command
    def _args_stored(self, why: str, console: Any, request: int, job_id: int) -> None:
        """Answer an ``args_end`` request: the job's arguments are committed ("") or why not."""
        info: dict[str, Any] = {"job": job_id, "stored": not why}
        if why:
            info["why"] = why
        self._send(console, m.Ok(re=request, info=info))

    @command
    def kill(self, job_id: int, reason: str = "killed on request") -> JobState | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if not job.finished:
            self.finish(job, "killed", reason)
        return job

    @command
    def console_lost(self, console: Any) -> None:
        """Cancel the console's jobs after the grace period, unless detached or re-attached;
        a job whose console left before ``args_end`` can never complete, so even then."""
        for job in list(self.jobs.values()):
            if job.replays.pop(id(console), None) is not None:
                self._replay_ended(job)
            if job.console is not console:
                continue
            job.console = None
            self._console_changed(job)
            if job.finished or (job.options.detach and not job.receiving):
                continue
            self.log.info(
                "console of job {id} left; cancelling in {grace}s unless it returns",
                id=job.id,
                grace=self.console_grace,
            )
            why = "its console disconnected"
            if job.options.detach:
                why += f" after sending {job.received} arguments, before the last"
            self._orphan(job, why)

    def _orphan(self, job: JobState, why: str, kind: str = "console-grace") -> None:
        """End ``job`` after the console grace unless a console resumes or attaches it:
        ``console-grace`` cancels it, ``restart-grace`` (the server restarted) fails it."""
        self._stop_orphan_timer(job)
        job.orphan_timer = self._start_timer(kind, self.console_grace, job.id, why)
        job.timers.append(job.orphan_timer)

    def _stop_orphan_timer(self, job: JobState) -> None:
        timer, job.orphan_timer = job.orphan_timer, None
        if timer is not None and timer in job.timers:
            job.timers.remove(timer)
            self._timer_notes.pop(timer, None)
            self._outbox.append(CancelTimer(timer))

    @command
    def attach(self, console: Any, job_id: int) -> JobState | None:
        """Make ``console`` the receiver of a job's results; replay what was kept."""
        job = self.jobs.get(job_id)
        if job is None or (job.finished and not job.options.detach) or job.dropped:
            return None  # an attached job's results went to its console: none to replay
        # a finished job's replay is anyone's, any number of times; a running one has one
        # receiver at a time, but a detached job's submitter (not an attached console) has no
        # role left once every argument is in, so it does not block an attach
        if not job.finished:
            submitter_done = job.options.detach and not job.receiving and not job.attached
            if job.console is not None and job.console is not console and not submitter_done:
                return None
            job.replays.pop(id(job.console), None)  # (a submitter is owed none)
            job.console = console
            job.attached = True
            self._console_changed(job)
        # replay everything, every time: an earlier attach may have died half-way (a finished
        # job's job_done follows its last result)
        self._start_replay(job, console)
        if not job.finished:
            self._maybe_complete(job)  # an attached job does not end while no console hears it
        return job

    # ================================================================ flow control of results

    @command
    def hold(self, console: Any, job_id: int, held: bool) -> None:
        """The job's console holds as many of its results as it will (``held``), or took
        enough of them: dispatch none of its calls, or go on; a replay to it waits too."""
        job = self.jobs.get(job_id)
        replay = job.replays.get(id(console)) if job is not None else None
        if replay is not None and replay.held != held:
            replay.held = held
            if not held:
                self._replay(job, console)
        if job is None or job.finished or job.console is not console or job.held == held:
            return
        job.held = held
        self._pause(job)

    @command
    def console_congested(self, console: Any, congested: bool) -> None:
        """More than ``wire.CONGESTED_BYTES`` wait to be written to ``console`` (or they
        drained): its jobs' calls wait, so a slow reader makes the server buffer no more."""
        for job in self.active.values():
            if job.console is console and job.congested != congested:
                job.congested = congested
                self._pause(job, pump=False)
        if not congested:
            self._replay_drained(console)
            self.pump()

    def _console_changed(self, job: JobState) -> None:
        """A new console (or none) receives the job: a hold was the old one's."""
        job.held = False
        job.congested = bool(getattr(job.console, "congested", False))
        self._regrant[job.id] = job
        self._pause(job, pump=False)

    def _pause(self, job: JobState, pump: bool = True) -> None:
        paused = job.held or job.congested or bool(job.full)
        if paused == job.paused:
            return
        job.paused = paused
        self._moved[job.id] = job
        self.events.add(self.clock.seconds(), f"job {job.id} {'paused' if paused else 'goes on'}")
        if not paused and pump:
            self.pump()

    @command
    def finish(self, job: JobState, state: str | JobPhase, message: str = "") -> None:
        """End a job: drop its queue, stop its tasks on every node, tell its console."""
        if job.finished:
            return
        job.move(JobPhase(state))
        job.message = message
        job.waiting = job.full = ""
        self.active.pop(job.id, None)
        job.finished_at = self.clock.seconds()
        job.granted = 0
        for timer in job.timers:
            self._timer_notes.pop(timer, None)
            self._outbox.append(CancelTimer(timer))
        job.timers.clear()
        self._drop_work(job)
        self._regrant.pop(job.id, None)  # (kept till a pump grants: with no node, for ever)
        for node in self.nodes.values():
            if job.id in node.loaded:
                node.loaded.discard(job.id)
                self._send(node.link, m.JobDrop(job=job.id))
        if self.journal is not None:
            self.journal.finished(job.id, state, message, job.done, job.failed, job.finished_at)
        self.log.info(
            "job {id} {state}: {done} done, {failed} failed{why}",
            id=job.id,
            state=job.state,
            done=job.done,
            failed=job.failed,
            message=message,
            why=f" ({message})" if message else "",
        )
        if id(job.console) in job.replays:  # after the results it is still owed
            self._replay(job, job.console)
        elif job.console is not None:
            self._send(job.console, self._done_message(job))
        self._keep_finished(job)
        self._prune_finished()
        self.pump()

    def _drop_work(self, job: JobState) -> None:
        """Drop ``job``'s queue and take its tasks off the nodes (late answers dropped)."""
        job.pending.clear()
        job.pending_count = job.pending_bytes = 0
        self._moved[job.id] = self._regrant[job.id] = job
        for node in self.nodes.values():
            self._take_tasks(node, job)
        job.running = job.tasks = 0

    def _take_tasks(self, node: NodeState, job: JobState) -> list[TaskState]:
        """Take ``job``'s tasks off ``node`` (cancelled there; late answers dropped)."""
        stale = [t for t in node.inflight.values() if t.job is job]
        for task in stale:
            del node.inflight[task.id]
        if stale:
            self._send(node.link, m.Cancel(job=job.id))
            if node.has_credit():
                self._ready[node.id] = node
        return stale

    def _done_message(self, job: JobState) -> m.JobDone:
        return m.JobDone(
            job=job.id, state=job.state, done=job.done, failed=job.failed, message=job.message
        )

    def _prune_finished(self) -> None:
        """Keep the newest ``keep_finished`` finished jobs (for status and attach), forget older ones."""
        excess = len(self.jobs) - len(self.active) - self.keep_finished
        if excess > 0:
            # (a job being replayed stays until its consoles have it all); the oldest come
            # first: the scan stops at the excess, not at every job queued behind them
            old = (j for j in self.jobs.values() if j.finished and not j.replays)
            for job in list(itertools.islice(old, excess)):
                del self.jobs[job.id]
                self._forget_kept(job)

    def _maybe_complete(self, job: JobState) -> None:
        if (
            job.phase is JobPhase.COMPLETING
            and job.done + job.failed >= job.total
            and (job.console is not None or job.options.detach)  # else its console may resume it
        ):
            # never "done" while an outcome of it did not leave (see unsent)
            self.finish(job, "failed" if job.unsent else "done", job.unsent)
        else:
            self._grant(job)

    # ================================================================ windows and batches

    def _window(self, job: JobState) -> int:
        """How many arguments the server wants queued for a job, from the cluster's size."""
        return policy.window(job, self._credits_for(job))

    def _grant(self, job: JobState) -> None:
        more = policy.grant(job, self._credits_for(job))
        if more:
            job.granted += more
            self._send(job.console, m.Grant(job=job.id, count=more))

    @command
    def pump(self) -> None:
        """Send batches to every node with credit while there is work it may run."""
        if self._moved:
            self._renew()
        if self.preempt_grace is not None and self._preempt_timer is None and self._starved():
            self._preempt_timer = self._start_timer("preempt", self.preempt_grace)
        if not self._ready or not self._with_work:
            return
        now = self.clock.seconds()
        group_ok = self._group_ok
        for node_id in list(self._ready):
            node = self._ready.get(node_id)
            if node is None:
                continue
            may_run = group_ok
            while True:
                if not node.has_credit():
                    self._ready.pop(node_id, None)
                    break
                job = self._next_job(node, may_run)
                if job is None:
                    break  # (credit left: asked just now, and choosing no job spends none)
                if not self._dispatch(node, job, now):
                    may_run = _besides(may_run, job)  # (its next work waits for larger frames)
        # only jobs whose grant may have changed: a grant with nothing changed is none
        regrant, self._regrant = self._regrant, {}
        for job_id in sorted(regrant):  # (ids: the order of ``active``)
            job = regrant[job_id]
            if not job.finished:
                self._grant(job)

    def _renew(self) -> None:
        """Bring ``_with_work`` and the queue's entries up to date with the moved jobs."""
        queue, with_work = self._queue, self._with_work
        for job_id, job in self._moved.items():
            if job.pending_count and not job.finished:
                with_work[job_id] = job
            else:
                with_work.pop(job_id, None)
            cap = job.options.max_cores
            # what next_job asks of a job whatever the node (inline: a call per job moved)
            if (
                job.pending_count
                and not (job.finished or job.paused)
                and not (cap and job.tasks >= cap)
            ):
                key = policy.share_key(job)
                if key != job.queued:
                    job.queued = key
                    heapq.heappush(queue, (key, job))
            else:
                job.queued = None
        self._moved.clear()
        if len(queue) > 2 * len(with_work) + 64:  # mostly stale entries: drop them
            queue[:] = [entry for entry in queue if entry[1].queued is entry[0]]
            heapq.heapify(queue)

    def _next_job(self, node: NodeState, may_run: Any) -> JobState | None:
        """:func:`~.policy.next_job` of the active jobs, without a scan while the queue's top
        may run on ``node`` (the lowest key of all is the lowest of those that may); else the
        scan, of the jobs with work only."""
        if self._moved:
            self._renew()
        queue = self._queue
        while queue:
            key, job = queue[0]
            if job.queued is key:
                gang_waits = job.options.gang and len(node.inflight) >= node.cores
                if not gang_waits and may_run(node, job):
                    return job
                return policy.next_job(self._with_work.values(), node, may_run)
            heapq.heappop(queue)  # stale: the job's live entry is elsewhere, or none is
        return None  # (no live entry: no job may take a slot)

    # ================================================================ preemption

    def _entitled(self, job: JobState, busy: float | None = None) -> int:
        if busy is None:
            busy = policy.busy_weight(self.active.values())
        return policy.entitled(job, busy, self._credits_for(job))

    def _starved(self) -> list[JobState]:
        """Jobs with work, below their share, while a lower-priority job holds tasks."""
        if not self._with_work:
            return []
        holders = [j.options.priority for j in self.active.values() if j.tasks]
        if not holders:
            return []
        lowest = min(holders)
        busy = policy.busy_weight(self.active.values())
        return [
            job
            for job in self.active.values()
            if job.pending_count
            and not job.paused
            and lowest < job.options.priority
            and job.tasks < self._entitled(job, busy)
        ]

    def _preempt(self) -> None:
        """The grace passed: cancel lower-priority jobs' tasks (on whole nodes, lowest priority
        first) until each starved job's share is free; they re-queue without counting an
        attempt (execution is at-least-once)."""
        self._preempt_timer = None
        for job in sorted(self._starved(), key=lambda j: -j.options.priority):
            need = self._entitled(job) - job.tasks
            priority = job.options.priority
            victims = sorted(
                (v for v in self.active.values() if v.options.priority < priority and v.tasks),
                key=lambda v: v.options.priority,
            )
            for victim in victims:
                for node in self.nodes.values():
                    if need <= 0:
                        break
                    if not self._group_ok(node, job):
                        continue
                    stale = self._take_tasks(node, victim)
                    if not stale:
                        continue
                    for task in reversed(stale):
                        victim.running -= len(task.segment)
                        victim.tasks -= 1
                        self._requeue(victim, task.segment)
                    need -= len(stale)
                    self.log.info(
                        "job {v} preempted on node {n} ({k} tasks re-queued) for job {j}",
                        v=victim.id,
                        n=node.id,
                        k=len(stale),
                        j=job.id,
                    )
        self.pump()

    def _dispatch(self, node: NodeState, job: JobState, now: float) -> bool:
        """Send ``node`` a task of ``job`` (the job's function first, once per node), in frames
        the node takes. False: nothing went, as what is next of the job is too large for this
        node's frames and left for a node with larger ones (see :meth:`_too_large`)."""
        if job.id not in node.loaded:
            load = m.JobLoad(
                job=job.id,
                star=job.options.star,
                timeout=job.options.timeout,
                reduce=job.options.mode == "reduce",
                payload=job.fn_blob,
            )
            limit = node.frame_limit
            if limit and task_bound(len(job.fn_blob), 0) > limit:
                need = frame_length(*m.encode(load))
                if need > limit:
                    return self._too_large(node, job, need)
            node.loaded.add(job.id)
            self._send(node.link, load)
        credits = self._credits_for(job)
        size = policy.tail_share(job, job.batch, credits)
        if job.result_cap and size > job.result_cap:
            size = job.result_cap  # (results of more would not fit a frame to the console)
        if size > node.batch_args:
            size = node.batch_args  # (a header of more would not fit a frame to the node)
        room = node.batch_bytes  # (MAX_BATCH_BYTES, less for a node with small frames)
        seg = take_from(job.pending, size, room)
        nbytes = len(seg.payload)
        if nbytes > room and node.frame_limit:  # one pickle over the room, alone: measured
            need = self._task_length(job, seg, node.frame_limit)
            if need > node.frame_limit:
                if self._too_large(node, job, need, seg):
                    return True
                found = self._behind_large(node, job, size, room)
                if found is None:
                    return False
                seg, nbytes = found, len(found.payload)
        n = len(seg.indices)  # (len(seg) is a Python call)
        job.pending_count -= n
        job.pending_bytes -= nbytes
        job.running += n
        job.tasks += 1
        self._moved[job.id] = self._regrant[job.id] = job
        task = TaskState(next(self._task_ids), job, node, seg, now)
        node.inflight[task.id] = task
        self._send(node.link, _task(task.id, job.id, seg))
        if self._sweep is None:
            self._sweep = self._start_timer("sweep", SWEEP_INTERVAL)
        return True

    def _behind_large(self, node: NodeState, job: JobState, size: int, room: int) -> Segment | None:
        """The job's next arguments that fit ``node``'s frames, from behind (at most
        ``SKIP_LARGE``) pickles at the head of its queue that wait, in order, for a node with
        larger frames: a small node is not held idle while a larger one is busy. None: none."""
        limit = node.frame_limit
        pending = job.pending
        held = [pending.popleft()]  # (put back by _too_large: it waits for a larger node)
        try:
            while pending and len(held) <= SKIP_LARGE:
                seg = take_from(pending, size, room)
                if len(seg.payload) <= room or self._task_length(job, seg, limit) <= limit:
                    return seg
                held.append(seg)
            return None
        finally:
            pending.extendleft(reversed(held))

    @staticmethod
    def _task_length(job: JobState, seg: Segment, limit: int) -> int:
        """The frame length of a task of ``seg``, or a bound on it within ``limit``."""
        bound = task_bound(len(seg.payload), len(seg.sizes))
        if bound <= limit:
            return bound
        return frame_length(*m.encode(_task(_LONGEST_ID, job.id, seg)))

    def _too_large(
        self, node: NodeState, job: JobState, need: int, seg: Segment | None = None
    ) -> bool:
        """``job``'s function (``seg`` None) or the arguments ``seg`` (taken off its queue)
        need a frame of ``need`` bytes, over ``node``'s limit. If a connected node that may run
        the job has larger frames, they wait for it (back in the queue; False); if none has,
        waiting could be for ever: the job fails, or each of the arguments (True)."""
        largest = node.frame_limit
        for other in self.nodes.values():
            if other.draining or other.excluded or not self._group_ok(other, job):
                continue
            if not other.frame_limit or other.frame_limit >= need:
                if seg is not None:
                    job.pending.appendleft(seg)
                return False
            if other.frame_limit > largest:
                largest = other.frame_limit
        if seg is None:
            text = node_too_large_text("the job's function", need, largest, self.max_frame)
            self.log.warn("job {id} fails: {text}", id=job.id, text=text)
            self.finish(job, "failed", text)
            return True
        n = len(seg.indices)
        job.pending_count -= n
        job.pending_bytes -= len(seg.payload)
        self._moved[job.id] = self._regrant[job.id] = job
        what = "its task"
        if seg.groups is not None and seg.groups[0] > 1:
            what = f"its argument group ({seg.groups[0]} arguments in one pickle)"
        text = node_too_large_text(what, need, largest, self.max_frame)
        self.log.warn(
            "job {id}: arguments {first}..{last} fail: {text}",
            id=job.id,
            first=seg.indices[0],
            last=seg.indices[-1],
            text=text,
        )
        job.failed += n
        errors = [[pos, ARG_TOO_LARGE, text, ""] for pos in range(n)]
        self._deliver(job, m.Results.of(job.id, seg.indices, sizes=[0] * n, errors=errors))
        if job.options.on_error == "fail":
            self.finish(job, "failed", f"argument {seg.indices[0]} raised {ARG_TOO_LARGE}: {text}")
        else:
            self._maybe_complete(job)
        return True

    @command
    def stop(self) -> None:
        """Cancel the scheduler's own timers (the server is stopping)."""
        timers = [self._preempt_timer, self._sweep]
        for job in self.jobs.values():  # (a replay's next step would read a closed journal)
            timers += [job.replay_timer, job.keep_timer]
            job.replay_timer = job.keep_timer = None
        self._outbox.extend(CancelTimer(timer) for timer in timers if timer is not None)
        self._preempt_timer = self._sweep = None
        self.stopped = True

    # ================================================================ status

    def job_statuses(self, jobs: Iterable[JobState] | None = None) -> list[JobStatus]:
        """The status records of ``jobs`` (default: every job) with what only the scheduler
        knows: weight, share, cores in use (a node runs the first ``cores`` tasks it holds), a
        file job's left-out nodes and counters, a gang job's calls in flight."""
        now = self.clock.seconds()
        cores: dict[int, int] = {}
        calls: dict[int, list[int]] = {}  # a gang job's argument indices in flight
        for node in self.nodes.values():
            for task in itertools.islice(node.inflight.values(), node.cores):
                cores[task.job.id] = cores.get(task.job.id, 0) + 1
            for task in node.inflight.values():
                if task.job.options.gang:
                    calls.setdefault(task.job.id, []).extend(task.segment.indices)
        busy = {j.id for j in self.active.values() if j.pending_count or j.tasks}
        total = sum(self.jobs[i].weight for i in busy)
        records = []
        for job in self.jobs.values() if jobs is None else jobs:
            more: dict[str, Any] = {}
            if job.options.data_id is not None and not job.finished:
                more["left_out"] = {
                    n.host: why for n in self.nodes.values() if (why := left_out_of_files(n, job))
                }
            if job.counters:
                more["counters"] = dict(job.counters)
            if job.options.gang and not job.finished:
                more["calls"] = sorted(calls.get(job.id, ()))
            records.append(
                job.describe(
                    now,
                    weight=job.weight,
                    share=round(job.weight / total, 3) if job.id in busy else 0.0,
                    cores=cores.get(job.id, 0),
                    max_cores=job.options.max_cores or None,
                    min_cores=job.options.min_cores,
                    **more,
                )
            )
        return records

    def status(self) -> tuple[list[NodeStatus], list[JobStatus], ServerStatus]:
        now = self.clock.seconds()
        server = ServerStatus(
            uptime=round(now - self.started_at, 1),
            cores=sum(n.cores for n in self.nodes.values()),
            cpu_seconds=round(time.process_time() - self.cpu_started, 2),
            **({"journal": self.journal.trouble} if self.journal and self.journal.trouble else {}),
        )
        return [n.describe(now) for n in self.nodes.values()], self.job_statuses(), server
