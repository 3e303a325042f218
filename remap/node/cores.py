"""The node's pool of cores: child processes it can always kill and replace.

The pool queues the server's tasks, starts each on an idle core, and turns a core's death
into a ``TaskFailed`` naming the argument that was running (the core's shared slot). A
watchdog enforces per-call timeouts by killing the core: code that ignores signals or loops in
C still stops. A core's life changes only along :data:`CORE_TRANSITIONS`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from protocol import messages as m
from protocol.errors import RemoteProtocolError
from protocol.framing import READ_SIZE, Frame, FrameDecoder, frame_parts, unsent

from ..bundle import job_path, may_be_bundle, node_dir
from ..taskoutput import prefix_lines
from ..transitions import check_move
from ..wire import read_directly, transport_idle
from .core import CMD_FD, OUT_FD, SHM_FD, SLOT

_F_SETPIPE_SZ = 1031  # Linux fcntl: resize a pipe's buffer
PIPE_SIZE = 1024 * 1024
#: cores starting at once, the next spawned as one says ready: each is a Python starting up
#: (~0.1 s of CPU), and ``--cores 999`` spawned all in one reactor turn, starved by its own
#: children, with a SIGTERM waiting for the last spawn (minutes)
STARTING_AT_ONCE = max(8, 2 * (os.cpu_count() or 1))
#: cores dying before "ready" this many times in a row (none ready between) back off their
#: restarts, 1 s doubling to 30 s: a broken environment (an import error, a bad PYTHONPATH)
#: otherwise respawned a Python in a tight loop, forever, and the node never said why
START_DEATHS_BEFORE_BACKOFF = 3
RESTART_DELAYS = (1.0, 30.0)
#: bytes of a starting core's stderr kept to name why it died (the traceback's last line)
START_STDERR_BYTES = 4096


def _exit_detail(reason: Any) -> str:
    """``signal 9`` or ``exit code 1``: how a core process ended."""
    code = getattr(reason.value, "exitCode", None)
    sig = getattr(reason.value, "signal", None)
    return f"signal {sig}" if sig else f"exit code {code}"


def _widen_pipes(core: CoreProcess) -> None:
    """A MiB pipe instead of 64 KiB: a 1 MiB argument or result crosses in one write, not 16."""
    for pipe in getattr(core.transport, "pipes", {}).values():
        try:
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError, ValueError):  # not Linux, or above pipe-max-size
            return


#: the native thread pools (OpenMP, BLAS, ...) a core's numerical libraries start
THREAD_LIMIT_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def thread_limits(env: dict[str, str], cores: int) -> dict[str, str]:
    """CPUs / cores threads for each native pool, as loky does (N cores each with a pool of
    every CPU would oversubscribe N times); a value set in the environment wins."""
    per_core = str(max(1, (os.cpu_count() or 1) // max(1, cores)))
    return {name: per_core for name in THREAD_LIMIT_VARIABLES if name not in env}


class CoreLife(enum.Enum):
    """Where a core process is in its life."""

    STARTING = "starting"  # spawned; has not said "ready" yet
    IDLE = "idle"  # ready for a batch
    BUSY = "busy"  # running a batch (``CoreProcess.task``)
    KILLING = "killing"  # SIGKILL sent (``kill_reason`` says why); its exit follows
    DEAD = "dead"  # exited: the pool starts another in its place unless stopping

    #: members are singletons, equal only to themselves: hashed in C (Enum's is a Python call)
    __hash__ = object.__hash__


# read on every call: ``CoreLife.IDLE`` costs EnumType's ``__getattr__`` hook each time
_STARTING, _IDLE, _BUSY, _DEAD = CoreLife.STARTING, CoreLife.IDLE, CoreLife.BUSY, CoreLife.DEAD
_TaskResult = m.TaskResult

#: the only moves a core makes: anything alive may be killed or die on its own; a killed core
#: only dies; a dead one is replaced by a new process, never revived
CORE_TRANSITIONS: dict[CoreLife, frozenset[CoreLife]] = {
    CoreLife.STARTING: frozenset({CoreLife.IDLE, CoreLife.KILLING, CoreLife.DEAD}),
    CoreLife.IDLE: frozenset({CoreLife.BUSY, CoreLife.KILLING, CoreLife.DEAD}),
    CoreLife.BUSY: frozenset({CoreLife.IDLE, CoreLife.KILLING, CoreLife.DEAD}),
    CoreLife.KILLING: frozenset({CoreLife.DEAD}),
    CoreLife.DEAD: frozenset(),
}


@dataclass
class JobInfo:
    blob: bytes
    star: bool
    timeout: float | None
    reduce: bool
    #: it may have a directory on this node (its cores install a bundle there)
    bundled: bool = True


class CoreProcess(ProcessProtocol):
    """One child process and what it is doing."""

    log = Logger()

    def __init__(self, pool: CorePool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.life = CoreLife.STARTING
        #: the batch it runs; kept while KILLING, so its death can be blamed on the batch
        self.task: m.Task | None = None
        self.loaded: set[int] = set()
        #: why: "timeout", "cancel", "stop", "error", "start" (not ready by its deadline)
        self.kill_reason: str | None = None
        #: (position, span) of what was running when it was killed, or when it died
        self.kill_at = (-1, 1)
        self.slot_at_death = (-1, 1)
        #: the tail of its stderr while starting; set when it died before "ready" unkilled
        self.start_stderr = b""
        self.died_starting = False
        #: the pending kill of a core that does not say "ready" in time (the pool's deadline)
        self.start_deadline: Any = None
        self._decoder = FrameDecoder(max_frame=1 << 40)
        fd, path = tempfile.mkstemp(prefix="remap-core-")
        os.unlink(path)
        os.ftruncate(fd, SLOT.size)
        self.shm_fd = fd
        self.shm = mmap.mmap(fd, SLOT.size)
        SLOT.pack_into(self.shm, 0, -1, 0.0, 0)

    def slot(self) -> tuple[int, float, int]:
        """(position, start, span) of what the core runs: see ``core.SLOT``."""
        return SLOT.unpack_from(self.shm, 0)

    def move(self, life: CoreLife) -> None:
        """Change life along :data:`CORE_TRANSITIONS` (anything else raises)."""
        if life not in CORE_TRANSITIONS[self.life]:  # checked here: two moves on every call
            check_move(f"core {self.index}", CORE_TRANSITIONS, self.life, life)
        self.life = life

    def running(self) -> tuple[int, int]:
        """(position, span) of the argument or argument group running now."""
        pos, _, span = self.slot()
        return pos, max(1, span)

    # ---------------------------------------------------------------- ProcessProtocol

    def read_results_directly(self) -> None:
        """Read the answer pipe in 64 KiB reads, a large answer straight into its frame buffer
        (Twisted reads 8 KiB per turn)."""
        reader = getattr(self.transport, "pipes", {}).get(OUT_FD)
        if reader is None:
            return
        fd = reader.fileno()
        decoder = self._decoder
        read_directly(
            reader,
            decoder.read_buffer,
            lambda view: os.readv(fd, [view]),
            lambda n: (decoder.wrote(n), self._answers(decoder.frames())),
            read=functools.partial(os.read, fd, READ_SIZE),
            data_received=self._read,
        )

    def _read(self, data: bytes) -> None:
        """Bytes from the answer pipe (a whole small frame, the usual answer, handled here)."""
        frame = self._decoder.whole(data)
        self._answers(self._decoder.feed(data) if frame is None else [frame])

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == OUT_FD:
            self._read(data)
        else:  # output from outside Python's sys.stdout (C code, subprocesses)
            if self.life is _STARTING:
                self.start_stderr = (self.start_stderr + data)[-START_STDERR_BYTES:]
            self.log.debug(
                "core {i}: {text}", i=self.index, text=data.decode(errors="replace").rstrip()
            )

    def _answers(self, frames: list[Any]) -> None:
        turn = self.pool.read_turn
        if turn is None:
            self._handle_answers(frames)
        else:
            turn(self._handle_answers, frames)

    def _handle_answers(self, frames: list[Frame]) -> None:
        """Frames from the core, each checked like any message; one that breaks the protocol
        gets the core killed, and the rest are not read."""
        for frame in frames:
            try:
                msg = m.decode(frame.header, frame.payload, channel="pipe")
            except RemoteProtocolError as exc:  # a bug, or user code writing to fd 4
                self.log.error("core {i} broke the pipe protocol: {e}", i=self.index, e=exc)
                self.kill("error")
                return
            self.pool._core_message(self, msg, frame)

    def processEnded(self, reason: Any) -> None:
        self.died_starting = self.life is _STARTING
        self.cancel_start_deadline()
        self.move(CoreLife.DEAD)
        self.slot_at_death = self.running()
        with contextlib.suppress(BufferError, ValueError):
            self.shm.close()
        os.close(self.shm_fd)
        self.pool._core_ended(self, reason)

    # ---------------------------------------------------------------- commands

    def send(self, msg: m.Message) -> None:
        """Write a command now as far as the pipe takes it; the rest through the transport."""
        if self.transport is None or self.life is _DEAD:
            return
        parts = frame_parts(*m.encode(msg))
        writer = getattr(self.transport, "pipes", {}).get(CMD_FD)
        sent = 0
        if writer is not None and transport_idle(writer):
            try:
                sent = os.writev(writer.fileno(), parts)
            except OSError:  # full (EAGAIN) or gone: the transport takes it and reports a loss
                sent = 0
        if sent < sum(map(len, parts)):  # only what the pipe did not take is copied
            self.transport.writeToChild(CMD_FD, b"".join(unsent(parts, sent)))

    def cancel_start_deadline(self) -> None:
        if self.start_deadline is not None:
            if self.start_deadline.active():
                self.start_deadline.cancel()
            self.start_deadline = None

    def kill(self, why: str, at: int | None = None) -> None:
        if self.life is CoreLife.KILLING or self.life is CoreLife.DEAD:
            return
        self.move(CoreLife.KILLING)
        self.kill_reason = why
        self.kill_at = self.running() if at is None else (at, 1)
        with contextlib.suppress(Exception):  # already gone: processEnded follows
            self.transport.signalProcess("KILL")


class CorePool:
    """Runs tasks on ``size`` cores; reports through ``on_result`` / ``on_failed``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        size: int,
        on_result: Callable[[m.TaskResult], None],
        on_failed: Callable[[m.TaskFailed], None],
        *,
        watchdog_interval: float = 0.1,
        start_timeout: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.size = size
        #: seconds a core has to say "ready" before it is killed (None: no deadline)
        self.start_timeout = start_timeout
        self.on_result = on_result
        self.on_failed = on_failed
        self.jobs: dict[int, JobInfo] = {}
        self.queue: deque[m.Task] = deque()
        self.cores: list[CoreProcess] = []
        self.stopping = False
        self._watchdog = LoopingCall(self._check_timeouts)
        self._watchdog.clock = reactor
        self._watchdog_interval = watchdog_interval
        self._stopped_waiters: list[Any] = []
        #: indices of cores to spawn once fewer than ``starting_at_once`` are starting
        self._unstarted: deque[int] = deque()
        self.starting_at_once = STARTING_AT_ONCE
        #: cores dead before "ready" since one last was ready; the pending delayed restart
        self._start_deaths = 0
        self._restart_delay = RESTART_DELAYS[0]
        self._restart_call: Any = None
        self._start_failure: str | None = None  # what the last backoff line said
        self.started_at = time.monotonic()
        #: how task output names this node (the agent sets its host name)
        self.name = "node"
        #: when set, a result passed on unchanged goes here with the core's own frame
        self.on_result_frame: Callable[[m.TaskResult, Frame], None] | None = None
        #: ``read_turn(handle, frames)`` runs the handling of a core's answers (the embedded
        #: cluster's :func:`remap.local.in_one_turn`)
        self.read_turn: Callable[..., None] | None = None

    def start(self) -> None:
        self._unstarted.extend(range(self.size))
        self._spawn_more()
        self._watchdog.start(self._watchdog_interval, now=False)

    def _spawn_more(self) -> None:
        """Spawn waiting cores while fewer than ``starting_at_once`` are starting (never while
        stopping): a start is spread over the reactor turns that hear cores say ready."""
        if not self._unstarted or self.stopping or self._restart_call is not None:
            return
        starting = sum(1 for c in self.cores if c.life is _STARTING)
        while self._unstarted and starting < self.starting_at_once:
            self._spawn(self._unstarted.popleft())
            starting += 1

    def _spawn(self, index: int) -> CoreProcess:
        core = CoreProcess(self, index)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update(thread_limits(env, self.size))
        self.reactor.spawnProcess(
            core,
            sys.executable,
            [sys.executable, "-m", "remap.node.core"],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", CMD_FD: "w", OUT_FD: "r", SHM_FD: core.shm_fd},
        )
        _widen_pipes(core)
        core.read_results_directly()
        if self.start_timeout is not None:
            core.start_deadline = self.reactor.callLater(
                self.start_timeout, self._start_overdue, core
            )
        if index < len(self.cores):
            self.cores[index] = core
        else:
            self.cores.append(core)
        return core

    # ---------------------------------------------------------------- from the agent

    @property
    def busy(self) -> int:
        return sum(1 for c in self.cores if c.task is not None)

    def load_job(self, msg: m.JobLoad) -> None:
        bundled = may_be_bundle(msg.payload)
        self.jobs[msg.job] = JobInfo(msg.payload, msg.star, msg.timeout, msg.reduce, bundled)

    def drop_job(self, job: int) -> None:
        info = self.jobs.pop(job, None)
        if info is None or info.bundled:  # (a job without a bundle never had a directory)
            shutil.rmtree(job_path(os.getpid(), job), ignore_errors=True)  # its modules, files
        for core in self.cores:
            if job in core.loaded:
                core.loaded.discard(job)
                core.send(m.CoreDrop(job=job))

    def submit(self, task: m.Task) -> None:
        if task.job not in self.jobs:
            self.on_failed(
                m.TaskFailed(task=task.task, reason="error", message="job was not loaded")
            )
            return
        if not self.queue:  # the usual case: straight to an idle core (what _dispatch does)
            for core in self.cores:
                if core.life is _IDLE:
                    self._start(core, task)
                    return
        self.queue.append(task)
        self._dispatch()

    def cancel_job(self, job: int) -> None:
        """Forget queued tasks of a job and kill the cores running it (they are replaced)."""
        self.queue = deque(t for t in self.queue if t.job != job)
        for core in self.cores:
            if core.task is not None and core.task.job == job:
                core.kill("cancel")

    def cancel_all(self) -> None:
        """The server is gone: nothing running or queued can be delivered any more."""
        self.queue.clear()
        for core in self.cores:
            if core.task is not None:
                core.kill("cancel")
            # job ids are per server session: a restarted server reuses them for other functions
            for job in core.loaded:
                core.send(m.CoreDrop(job=job))
            core.loaded.clear()
        self.jobs.clear()
        shutil.rmtree(node_dir(os.getpid()), ignore_errors=True)

    def stop(self) -> Any:
        """Kill every core; the Deferred fires when all have exited."""
        from twisted.internet.defer import Deferred, succeed

        self.stopping = True
        self._unstarted.clear()
        if self._restart_call is not None:
            self._restart_call.cancel()
            self._restart_call = None
        shutil.rmtree(node_dir(os.getpid()), ignore_errors=True)
        if self._watchdog.running:
            self._watchdog.stop()
        for core in self.cores:
            core.cancel_start_deadline()
        alive = [c for c in self.cores if c.life is not CoreLife.DEAD]
        if not alive:
            return succeed(None)
        d = Deferred()
        self._stopped_waiters.append(d)
        for core in alive:
            core.kill("stop")
        return d

    # ---------------------------------------------------------------- scheduling

    def _dispatch(self) -> None:
        for core in self.cores:
            if not self.queue:
                return
            if core.life is _IDLE:
                self._start(core, self.queue.popleft())

    def _start(self, core: CoreProcess, task: m.Task) -> None:
        info = self.jobs.get(task.job)
        if info is None:  # dropped while queued
            self._dispatch()
            return
        if task.job not in core.loaded:
            timed = info.timeout is not None
            core.send(
                m.CoreLoad(
                    job=task.job, star=info.star, timed=timed, reduce=info.reduce, payload=info.blob
                )
            )
            core.loaded.add(task.job)
        core.move(_BUSY)
        core.task = task
        core.send(task)  # the server's task as it is: the core knows the job

    def _core_message(self, core: CoreProcess, msg: m.Message, frame: Frame | None = None) -> None:
        if type(msg) is _TaskResult:  # the usual answer: tested first
            part = msg.part
            task = core.task
            if not part:  # a streamed part leaves the batch running on this core
                core.task = None
                if core.life is _BUSY:
                    core.move(_IDLE)
            # a batch that finished just as its timeout fired still counts; a cancelled one does not
            why = core.kill_reason
            if task is not None and (why is None or why == "timeout"):
                if msg.output:
                    prefix = f"[{self.name} core {core.index}] "
                    msg = replace(msg, output=prefix_lines(msg.output, prefix))
                    frame = None  # changed: encoded again
                if frame is not None and self.on_result_frame is not None:
                    self.on_result_frame(msg, frame)
                else:
                    self.on_result(msg)
            if not part:
                self._dispatch()
        elif type(msg) is m.CoreReady:
            if core.life is _STARTING:  # a core killed while starting stays killing
                core.cancel_start_deadline()
                core.move(_IDLE)
                self._started_again()
            self._dispatch()
            self._spawn_more()
        else:  # what only a node sends (a task, core_load, ...) never comes from a core
            self.log.error("core {i} sent {t}, which only a node sends", i=core.index, t=msg.TYPE)
            core.kill("error")

    def _core_ended(self, core: CoreProcess, reason: Any) -> None:
        task, core.task = core.task, None
        if self.stopping:
            if all(c.life is CoreLife.DEAD for c in self.cores):
                waiters, self._stopped_waiters = self._stopped_waiters, []
                for d in waiters:
                    d.callback(None)
            return
        why = core.kill_reason
        if task is not None and why != "cancel":
            at, span = core.kill_at if why else core.slot_at_death
            if why == "timeout":
                self.on_failed(m.TaskFailed(task=task.task, reason="timeout", at=at, span=span))
            else:
                detail = _exit_detail(reason)
                self.log.warn(
                    "core {i} died running task {t} ({detail}); replacing it",
                    i=core.index,
                    t=task.task,
                    detail=detail,
                )
                self.on_failed(
                    m.TaskFailed(
                        task=task.task,
                        reason="crash",
                        at=at,
                        span=span,
                        message=f"core process died with {detail}",
                    )
                )
        self._unstarted.append(core.index)
        if core.died_starting:
            self._died_starting(core, _exit_detail(reason))
        self._spawn_more()

    def _start_overdue(self, core: CoreProcess) -> None:
        """A core not ready by its deadline (a hung import, a stalled network file system)
        held its start slot forever, and ``starting_at_once`` of them stopped every other core
        from starting: it is killed, counted as a core that died at start, and its slot
        goes to the next core now (its own replacement follows its exit)."""
        core.start_deadline = None
        if core.life is not _STARTING or self.stopping:
            return
        self.log.warn(
            "core {i} (pid {pid}) was not ready {s:g}s after it started "
            "(REMAP_CORE_START_TIMEOUT); killing it and starting another",
            i=core.index,
            pid=getattr(core.transport, "pid", None),
            s=self.start_timeout,
        )
        core.kill("start")
        self._died_starting(core, f"not ready within {self.start_timeout:g}s, killed")
        self._spawn_more()

    def _died_starting(self, core: CoreProcess, detail: str) -> None:
        """One more core lost before "ready" (none ready since the last): from the third in a
        row on, the waiting cores restart after a delay that doubles each time (one pending at
        a time), with one log line when cores start dying at start, or die of something else."""
        self._start_deaths += 1
        if self._start_deaths < START_DEATHS_BEFORE_BACKOFF or self._restart_call is not None:
            return
        lines = core.start_stderr.decode(errors="replace").strip().splitlines()
        why = detail + (f"): {lines[-1].strip()[:300]}" if lines else ")")
        delay = self._restart_delay
        if why != self._start_failure:
            self._start_failure = why
            self.log.error(
                "cores die at start ({why}; retrying in {delay:g}s, then up to every {most:g}s",
                why=why,
                delay=delay,
                most=RESTART_DELAYS[1],
            )
        self._restart_delay = min(delay * 2, RESTART_DELAYS[1])
        self._restart_call = self.reactor.callLater(delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        self._spawn_more()

    def _started_again(self) -> None:
        """A core said ready: the environment works; restarts are immediate again."""
        if self._start_failure is not None:
            self.log.info("cores start again")
        self._start_deaths = 0
        self._restart_delay = RESTART_DELAYS[0]
        self._start_failure = None
        if self._restart_call is not None:
            self._restart_call.cancel()
            self._restart_call = None

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for core in self.cores:
            task = core.task
            if task is None or core.life is not CoreLife.BUSY:
                continue
            info = self.jobs.get(task.job)
            if info is None or info.timeout is None:
                continue
            pos, started, _ = core.slot()
            if pos >= 0 and now - started > info.timeout:
                self.log.info(
                    "task {t}: argument at position {pos} passed its {s}s timeout; killing core {i}",
                    t=task.task,
                    pos=pos,
                    s=info.timeout,
                    i=core.index,
                )
                core.kill("timeout", at=pos)
