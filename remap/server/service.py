"""The server's network side: one handler per connection, routing messages to the scheduler."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol import Authenticated, Connection, refusal_frame
from protocol import messages as m
from protocol.framing import frame_length

from ..errors import ConfigError, RemapError, RemoteProtocolError
from ..settings import Settings
from ..wire import PeerProtocol, ReadBudget, Traffic
from .admission import Admission, RefusalLog, Refused, Slot, TlsRefusals, busy_text, peer_host
from .drivers import DriveError, Drivers
from .exclusion import ExclusionList
from .journal import JournalError
from .scheduler import Scheduler, first_job_id, left_out_of_files, missing
from .scheduler.effects import ConsoleLost, NodeJoined, NodeLeft, NodeLost
from .scheduler.sizing import fit_status

#: connections in the handshake the cluster port holds at once, in all and per source address
#: (REMAP_MAX_HANDSHAKING and _PER_HOST): unauthenticated clients cannot use up descriptors
MAX_HANDSHAKING: int = Settings.max_handshaking
MAX_HANDSHAKING_PER_HOST: int = Settings.max_handshaking_per_host

#: counters a console may show under one job in status (names of at most MAX_COUNTER_NAME chars)
MAX_COUNTERS = 64
MAX_COUNTER_NAME = 80


def bounded_counters(counters: dict) -> dict[str, int]:
    """The first MAX_COUNTERS well-formed entries of a console's counters (others ignored)."""
    kept: dict[str, int] = {}
    for name, value in counters.items():
        if len(kept) >= MAX_COUNTERS:
            break
        if type(name) is str and len(name) <= MAX_COUNTER_NAME and type(value) is int:
            kept[name] = value
    return kept


def _hold_reading(link: PeerProtocol, held: bool) -> None:
    hold = getattr(link, "hold_reading", None)  # (a test's fake link may lack it)
    if hold is not None:
        hold(held)


def _refuse(link: PeerProtocol, msg: m.Message, code: str, message: str) -> None:
    """Answer a console's request with an error (its ``re``: the request's id, if it has one)."""
    link.send(m.Error(code=code, message=message, re=getattr(msg, "id", None)))


def _killed(job: Any, ended: bool) -> dict[str, Any]:
    """``kill``'s answer: the job's state, and ``ended`` if it had ended before (nothing
    was killed)."""
    return {"job": job.id, "state": job.state, **({"ended": True} if ended else {})}


class ServerConnection:
    """Handler for one peer: a node or a console, known once authenticated."""

    log = Logger()

    def __init__(self, server: RemapServerFactory, slot: Slot | None = None) -> None:
        self.server = server
        #: this connection's place among those still in the handshake (freed once it ends)
        self.slot = slot
        self.scheduler = server.scheduler
        self.role: str | None = None
        self.node_id: str | None = None
        #: the node said ``goodbye``: it is out of the scheduler; what it sends after is ignored
        self.left = False
        self.user = ""  # set by authenticated(): the person of a console with a person's key
        #: this console's submit ids → job ids, for arguments sent before `submitted`
        self._submits: dict[int, int | None] = {}
        #: what this console sent while its submit waits for the journal's commit, in order
        #: (its end too: None); None when no submit waits (see :meth:`_submit`)
        self._held: list[m.Message | None] | None = None

    # ---------------------------------------------------------------- Handler

    def authenticated(self, link: PeerProtocol, event: Authenticated) -> None:
        if self.slot is not None:
            self.slot.trust()
            self.slot.release()
        self.role = event.peer_role
        self.session = event.session
        #: the person this console authenticated as; "" holds the cluster secret (may do all)
        self.user = event.peer_user
        if self.role == "console":
            self.server.consoles.add(link)
            # its jobs' calls wait while it reads slower than they bring results (or not at all)
            watch = getattr(link, "watch_backlog", None)  # (a test's fake link may lack it)
            if watch is not None:
                watch(self.scheduler.console_congested)

    def message_received(self, link: PeerProtocol, msg: m.Message) -> None:
        if self._held is not None:
            self._held.append(msg)
            return
        try:
            if self.role == "node":
                self._from_node(link, msg)
            else:
                self._from_console(link, msg)
        except Exception:  # noqa: BLE001 - one peer's bad message must not wedge the others
            self._handling_failed(link, msg, Failure())

    def _handling_failed(self, link: PeerProtocol, msg: m.Message, failure: Failure) -> None:
        # a bug, or a message the checks let through: whatever it left half-done, this peer
        # goes (its in-flight work is re-queued) and every job's counts are put right
        self.log.failure(
            "handling {type} from {role} {peer} failed; closing that connection",
            failure,
            type=msg.TYPE,
            role=self.role,
            peer=link.peer,
        )
        link.close(
            RemoteProtocolError(
                f"the server could not handle a {msg.TYPE} message from this peer; "
                "closing the connection (the server log has the details)"
            )
        )
        self.scheduler.repair()

    def connection_failed(self, link: PeerProtocol, error: RemapError) -> None:
        self.log.info("peer {peer} rejected: {error}", peer=link.peer, error=error)

    def connection_lost(self, link: PeerProtocol, error: RemapError) -> None:
        if self.slot is not None:
            self.slot.release()
        if self.node_id is not None:
            node, self.node_id = self.node_id, None
            self._event(NodeLost(node, str(error)))
        elif self.role == "console":
            self.server.consoles.discard(link)
            if self._held is not None:  # after what it sent before (see _submit)
                self._held.append(None)
            else:
                self._event(ConsoleLost(link))

    def _event(self, event: Any) -> None:
        """The scheduler decides; this side performs what it decided."""
        self.scheduler.runner.apply(self.scheduler.handle(event))

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat()

    # ---------------------------------------------------------------- nodes

    def _from_node(self, link: PeerProtocol, msg: m.Message) -> None:
        t = type(msg)
        if t is m.TaskResult or t is m.Heartbeat or t is m.TaskFailed:
            if self.node_id is not None:
                self.scheduler.node_said(self.node_id, msg)
        elif t is m.NodeInfo and self.node_id is None and not self.left:
            self.node_id = self.session
            self._event(NodeJoined(self.node_id, link, msg))
        elif t is m.Goodbye:
            # stopping as asked: its work is re-queued now, not when the connection ends (and
            # that end is then no loss)
            self.left = True
            if self.node_id is not None:
                node, self.node_id = self.node_id, None
                self._event(NodeLeft(node, msg.reason))
            link.close()  # nothing more is wanted of it (a node that hung now is not "lost")
        elif t is m.Error:
            self.log.warn("node {peer} reported: {message}", peer=link.peer, message=msg.message)
            if msg.code == "frame-too-large" and self.node_id is not None:
                # (it closes now: what it refused must not be sent to it again, for ever)
                self.scheduler.node_refused_frame(self.node_id, msg.message)
        else:
            link.send(m.Error(code="unexpected", message=f"a node does not send {msg.TYPE}"))

    # ---------------------------------------------------------------- consoles

    def _from_console(self, link: PeerProtocol, msg: m.Message) -> None:
        sched = self.scheduler
        t = type(msg)
        if t is m.Args or t is m.ArgsEnd:
            if msg.job < 0:  # sent before `submitted`
                msg = self._early(msg)
            if msg is not None:
                sched.console_said(link, msg)
        elif t is m.Submit:
            if not msg.payload:  # the options were checked when decoded
                self._submits[msg.id] = None
                _refuse(link, msg, "bad-request", "a job needs a function")
            else:
                self._submit(link, msg)
        elif t is m.StatusRequest:
            nodes, jobs, server = sched.status()
            jobs += self.server.drivers.describe(sched.clock.seconds())
            server = dataclasses.replace(server, excluded=sorted(self.server.exclusions.hosts))
            reply = m.StatusReply(
                re=msg.id,
                nodes=[node.to_wire() for node in nodes],
                jobs=[job.to_wire() for job in jobs],
                server=server.to_wire(),
            )
            limit = getattr(link, "frame_limit", 0)
            fitted = fit_status(reply, limit) if limit else reply
            if fitted is None:
                why = (
                    f"the status reply of {frame_length(*m.encode(reply)):,} bytes does not fit "
                    f"the limit of {limit:,} bytes on frames to this console: raise the "
                    "console's REMAP_MAX_FRAME"
                )
                _refuse(link, msg, "failed", why)
            else:
                link.send(fitted)
        elif t is m.Drive:
            self._drive(link, msg)
        elif (t is m.Kill or t is m.Attach) and msg.job in self.server.drivers.jobs:
            self._driven(link, msg)
        elif t is m.Kill or t is m.Attach or t is m.Resume:
            self._recall(link, msg)
        elif t is m.Hold:
            sched.hold(link, msg.job, msg.held)
        elif t is m.JobCounters:
            job = sched.jobs.get(msg.job)
            if job is not None and job.console is link:
                job.counters = bounded_counters(msg.counters)
        elif self.user and t in (m.Drain, m.Undrain, m.Exclude, m.Include, m.KillCluster):
            what = "kill --cluster" if t is m.KillCluster else msg.TYPE
            why = f"{what} needs the cluster secret; {self.user}'s key may not"
            _refuse(link, msg, "forbidden", why)
        elif t is m.Drain or t is m.Undrain:
            node = sched.drain(msg.node) if t is m.Drain else sched.undrain(msg.node)
            if node is None:
                _refuse(link, msg, "not-found", f"no node {msg.node!r}")
            else:
                link.send(m.Ok(re=msg.id, info={"node": node.id, "host": node.host}))
        elif t is m.Exclude or t is m.Include:
            self._exclude(link, msg, t is m.Exclude)
        elif t is m.KillCluster:
            link.send(m.Ok(re=msg.id, info={"nodes": len(sched.nodes)}))
            self.server.shutdown_cluster("stopped by kill --cluster")
        elif t is m.Heartbeat:
            pass
        elif t is m.Error and msg.code == "unknown-message":
            # a console of an earlier release that does not know a message sent to it (a
            # ``group_limit``): it goes on without it, and so does the server
            self.log.debug("console {peer}: {message}", peer=link.peer, message=msg.message)
        else:
            _refuse(link, msg, "unexpected", f"a console does not send {msg.TYPE}")

    def _recall(self, link: PeerProtocol, msg: m.Kill | m.Attach | m.Resume) -> None:
        """``kill``, ``attach`` and ``resume``, answered once their job is known: one only the
        journal keeps is read off the reactor thread, this console's next messages waiting
        meanwhile (as for a submit)."""
        done = self.scheduler.recall(msg.job)
        self._hold(link, msg, done.addCallback(lambda job: self._touch(link, msg, job)))

    def _touch(self, link: PeerProtocol, msg: m.Kill | m.Attach | m.Resume, job: Any) -> None:
        sched = self.scheduler
        t = type(msg)
        if not self._may_touch(link, msg, job):
            return
        if t is m.Kill:
            ended = job is not None and job.finished
            job = sched.kill(msg.job)
            if job is None:
                _refuse(link, msg, "not-found", f"no job {msg.job}")
            else:
                link.send(m.Ok(re=msg.id, info=_killed(job, ended)))
        elif t is m.Attach:
            job = sched.attach(link, msg.job)
            if job is None:
                _refuse(link, msg, "not-found", self._no_attach(msg.job))
            else:
                link.send(m.Ok(re=msg.id, info=job.describe(sched.clock.seconds()).to_wire()))
        else:
            job, problem = sched.resume(link, msg)
            if job is None:
                code = "bad-request" if problem.startswith("resume:") else "not-found"
                if msg.job not in sched.jobs and code == "not-found":
                    problem = self._no_attach(msg.job)  # says when an earlier run had it
                _refuse(link, msg, code, problem)
            else:
                link.send(m.Ok(re=msg.id, info={"job": job.id, "window": job.granted}))

    def _submit(self, link: PeerProtocol, msg: m.Submit) -> None:
        """A job, accepted once the journal committed it. Meanwhile what this console sends
        next waits, in order (its arguments for the job among it), and its connection is not
        read: the reactor goes on with every other peer."""

        def accepted(job: Any) -> None:
            self._submits[msg.id] = job.id
            if job.requires or job.options.data_id is not None:
                self._left_out(job)

        def refused(failure: Failure) -> None:
            failure.trap(JournalError)  # not accepted: nothing would survive a restart
            self._submits[msg.id] = None
            _refuse(link, msg, "failed", str(failure.value))

        done = self.scheduler.submit(link, msg, owner=self.user)
        self._hold(link, msg, done.addCallbacks(accepted, refused))

    def _hold(self, link: PeerProtocol, msg: m.Message, done: defer.Deferred) -> None:
        """Until ``done`` (what ``msg`` asked) fires, what this console sends waits, in order,
        unread; should it fail, handling ``msg`` failed."""
        done.addErrback(lambda failure: self._handling_failed(link, msg, failure))
        if done.called:
            return
        self._held = []
        _hold_reading(link, True)
        done.addCallback(lambda _: self._release(link))

    def _release(self, link: PeerProtocol) -> None:
        """Handle what waited (for a submit's commit, a recall), until one more waits."""
        held, self._held = self._held or [], None
        for k, msg in enumerate(held):
            if self._held is not None:  # this one waits too: the rest after it
                self._held += held[k:]
                return
            if msg is None:
                self._event(ConsoleLost(link))
            else:
                self.message_received(link, msg)
        if self._held is None:
            _hold_reading(link, False)

    def _drive(self, link: PeerProtocol, msg: m.Drive) -> None:
        """Run a data or vertex job's driver on the server (``compute --detach``)."""
        if self.user:
            why = (
                "a detached data or vertex job's driver runs on the server with the "
                f"cluster secret; {self.user}'s key may not start one (run it attached)"
            )
            _refuse(link, msg, "forbidden", why)
            return
        try:
            started = self.server.drivers.start(
                msg.kind, msg.name, msg.job, msg.files, self.user, msg.payload
            )
        except DriveError as exc:
            _refuse(link, msg, "failed", str(exc))
            return

        def refused(failure: Any) -> None:
            failure.trap(DriveError, OSError, ValueError)
            why = str(failure.value)
            if not failure.check(DriveError):
                why = f"cannot write the job's directory: {why}"
            _refuse(link, msg, "failed", why)

        started.addCallbacks(lambda job: link.send(m.Ok(re=msg.id, info={"job": job.id})), refused)
        started.addErrback(lambda f: self.log.failure("starting a detached job", f))

    def _driven(self, link: PeerProtocol, msg: m.Kill | m.Attach) -> None:
        """``kill`` of a detached data or vertex job answers once its driver has exited;
        ``attach`` reads its status map and its task output (from byte ``since`` on)."""
        job = self.server.drivers.jobs[msg.job]
        if self.user and job.owner != self.user:
            _refuse(link, msg, "forbidden", f"job {job.id} is not yours")
        elif type(msg) is m.Attach:  # its map and its task output from msg.since on
            info = job.describe(self.scheduler.clock.seconds()).to_wire()
            link.send(m.Ok(re=msg.id, info={**info, **job.task_output(msg.since)}))
        else:
            ended = job.finished
            self.server.drivers.kill(
                job, lambda j: link.send(m.Ok(re=msg.id, info=_killed(j, ended)))
            )

    def _may_touch(self, link: PeerProtocol, msg: m.Kill | m.Attach | m.Resume, job: Any) -> bool:
        """A person may kill or attach to their own jobs only; the cluster secret to any."""
        if not self.user or job is None or job.owner == self.user:
            return True
        whose = f"{job.owner!r}" if job.owner else "the cluster administrator"
        why = (
            f"job {job.id} belongs to {whose}: {self.user!r} may {msg.TYPE} only "
            "their own jobs (the cluster secret may touch any)"
        )
        _refuse(link, msg, "forbidden", why)
        return False

    def _left_out(self, job: Any) -> None:
        """Say which nodes lack the job's ``requires`` or do not see its data directory; fail
        at once a job none can run."""
        sched = self.scheduler
        group = job.options.group
        candidates = [n for n in sched.nodes.values() if group is None or n.group == group]
        notices, short, kinds = [], [], set()
        for n in candidates:
            names = missing(n, job)
            if names:
                notices.append(f"node {n.host} left out: cannot import {', '.join(names)}")
                short.append(f"{n.host} lacks {', '.join(names)}")
                kinds.add("requires")
            elif why := left_out_of_files(n, job):
                notices.append(f"node {n.host} left out of file jobs: {why}")
                short.append(f"{n.host} {why}")
                kinds.add("data directory")
        if job.console is not None:
            for text in notices:
                job.console.send(m.JobNotice(job=job.id, message=text))
        if candidates and len(short) == len(candidates) and not job.finished:
            what = ", ".join(sorted(kinds, reverse=True))
            sched.finish(job, "failed", f"no node can run this job ({what}): {'; '.join(short)}")

    def _exclude(self, link: PeerProtocol, msg: m.Exclude | m.Include, excluded: bool) -> None:
        """Change the persistent exclusion list by host; a host need not be connected."""
        exclusions = self.server.exclusions
        if not msg.node.strip():
            _refuse(link, msg, "bad-request", "name a node: its id, a unique id prefix, "
                    "host:pid or its name")  # fmt: skip
            return
        node = self.scheduler.find_node(msg.node)
        host = node.host if node is not None else msg.node.strip()
        if not excluded and node is None and host not in exclusions.hosts:
            _refuse(link, msg, "not-found", f"no node or excluded host {host!r}")
            return
        try:
            changed = exclusions.change(host, excluded)
        except ConfigError as exc:
            _refuse(link, msg, "failed", str(exc))
            return
        self.scheduler.set_excluded(exclusions.hosts)
        what = "excluded" if excluded else "included"
        self.log.info("host {host} {what} by a console", host=host, what=what)
        info = {
            "host": host,
            "excluded": excluded,
            "changed": changed,
            "nodes": sum(n.host == host for n in self.scheduler.nodes.values()),
            "list": sorted(exclusions.hosts),
        }
        link.send(m.Ok(re=msg.id, info=info))

    def _early(self, msg: m.Args | m.ArgsEnd) -> m.Args | m.ArgsEnd | None:
        """Resolve ``job = -submit id`` (sent before `submitted`); None for a refused submit's."""
        job = self._submits.get(-msg.job, -1)
        if job is None:
            return None  # the submit was refused and the console told so: drop quietly
        return dataclasses.replace(msg, job=job)

    def _no_attach(self, job_id: int) -> str:
        sched = self.scheduler
        job = sched.jobs.get(job_id)
        if job is not None and job.dropped:
            return f"job {job_id}: {job.dropped}"
        if job is not None and job.finished and not job.options.detach:
            return (
                f"job {job_id} ran attached: its results went to the console that ran it "
                "(only jobs run with --detach keep their results on the server)"
            )
        if job is not None:
            return f"job {job_id} has another console attached"
        if 0 < job_id < sched.job_ids_from:
            return (
                f"no job {job_id} on this server: it is from an earlier run of the server "
                "and not in its journal (pruned, or REMAP_JOURNAL is off)"
            )
        return f"no job {job_id} on this server (unknown, or finished and forgotten)"


class RemapServerFactory(Factory):
    """Builds one :class:`PeerProtocol` + :class:`ServerConnection` per accepted connection."""

    log = Logger()
    noisy = False  # the entry point prints the one "listening" line

    def __init__(
        self,
        clock: Any,
        secret: bytes,
        *,
        max_frame: int,
        handshake_timeout: float = 5.0,
        heartbeat_interval: float = 2.0,
        heartbeat_misses: int = 3,
        job_ids_from: int | None = None,
        max_buffered: int | None = None,
        max_handshaking: int = MAX_HANDSHAKING,
        max_handshaking_per_host: int = MAX_HANDSHAKING_PER_HOST,
        **scheduling: Any,
    ) -> None:
        """``scheduling``: the :class:`Scheduler`'s own options (``console_grace``,
        ``preempt_grace``, the ``results_*`` budgets of detached jobs)."""
        self.clock = clock
        #: connections not yet authenticated, capped (see :data:`MAX_HANDSHAKING`); half the
        #: slots only for sources that authenticated before (a flood cannot lock them out)
        self.handshaking = Admission(
            max_handshaking, max_handshaking_per_host, reserved=max_handshaking // 2
        )
        self.refusals = RefusalLog(clock, "cluster port")
        #: the frame a refused connection gets, per full cap (made once: a flood costs no work)
        self._busy = {
            why: refusal_frame(busy_text(why, self.handshaking))
            for why in ("total", "new", "per-host")
        }
        #: refused connections being told so under TLS (capped as the handshakes are)
        self.tls_refusals = TlsRefusals(
            clock, Admission(max_handshaking, max_handshaking_per_host), handshake_timeout
        )
        #: frames being received, over all connections: 2 × max_frame unless told
        self.read_budget = ReadBudget(max_buffered or 2 * max_frame)
        self.secret = secret
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.scheduler = Scheduler(
            clock,
            job_ids_from=first_job_id() if job_ids_from is None else job_ids_from,
            max_frame=max_frame,
            **scheduling,
        )
        self.consoles: set[PeerProtocol] = set()
        #: in memory unless :meth:`use_exclusions` gives it a file (the server entry point does)
        self.exclusions = ExclusionList()
        self.on_stop: Any = None
        self.traffic = Traffic()  # bytes in and out over every socket (for metrics)
        #: detached data and vertex jobs; :meth:`use_drivers` lets it start them
        self.drivers = Drivers(
            clock, self.scheduler, data_dir=Path("."), cluster_address=None, child_env={}
        )

    def use_journal(self, journal: Any) -> None:
        """Resume what ``journal`` recorded and record from now on (None: no journal)."""
        if journal is not None:
            self.scheduler.restore(journal)

    def use_drivers(self, drivers: Drivers) -> None:
        self.drivers = drivers

    def use_exclusions(self, exclusions: ExclusionList) -> None:
        self.exclusions = exclusions
        self.scheduler.set_excluded(exclusions.hosts)

    def buildProtocol(self, addr: Any) -> PeerProtocol | Refused:  # noqa: N802 - Twisted's name
        host = peer_host(addr)
        slot = self.handshaking.admit(host)
        if not isinstance(slot, Slot):
            self.refusals.refused(host, slot, self.handshaking)
            return Refused(self._busy[slot], host, self.tls_refusals)
        conn = Connection(
            "server", self.secret, max_frame=self.max_frame, heartbeat=self.heartbeat_interval
        )
        proto = PeerProtocol(
            conn,
            ServerConnection(self, slot),
            self.clock,
            handshake_timeout=self.handshake_timeout,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_misses=self.heartbeat_misses,
            budget=self.read_budget,
        )
        proto.factory = self
        proto.traffic = self.traffic
        return proto

    def shutdown_cluster(self, reason: str) -> None:
        """Tell every node to exit, end every job, then stop (the entry point decides how)."""
        self.drivers.stop()
        for job in list(self.scheduler.jobs.values()):
            self.scheduler.finish(job, "killed", reason)
        self.scheduler.stop_nodes(reason)
        if self.on_stop is not None:
            self.clock.callLater(0.2, self.on_stop)
