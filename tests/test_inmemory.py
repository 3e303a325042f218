"""The server, nodes and a console paired in memory: real protocol bytes, no sockets, no processes.

Each peer is the production :class:`remap.wire.PeerProtocol` with its production handler
(:class:`RemapServerFactory`'s ServerConnection, :class:`NodeAgent`, :class:`ClusterClient`),
joined by ``twisted.test.iosim`` pumps and timed by one ``Clock``. Only the node's core
pool is replaced: an in-process pool that runs each batch through the real core code
(:class:`remap.node.core.Core`) synchronously, so the whole message path from a
console's ``Submit`` to its sink is exercised: handshake, framing, windowing, batches,
results, errors, partial folds, kills, heartbeats.
"""

from __future__ import annotations

import dataclasses
import mmap
import operator
from collections.abc import Iterable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from protocol import Connection
from protocol import messages as m
from protocol.framing import PREAUTH_MAX_FRAME, FrameDecoder
from protocol.options import JobOptions
from remap.blobs import dumps
from remap.client import ClusterClient, JobOutcome, JobStream
from remap.errors import JobKilled, JobRefused, NodeLost, NotFound, RequestFailed
from remap.node.agent import NodeAgent
from remap.node.core import SLOT, Core, task_count
from remap.server.service import RemapServerFactory
from remap.shipping import function_blob
from remap.sinks import MISSING, ObjectSink, ReduceSink, TaskErrorInfo
from remap.wire import PeerProtocol

SECRET = b"in-memory test secret, never a real one"
MAX_FRAME = 64 * 1024 * 1024
HEARTBEAT = 1.0
MISSES = 3
GRACE = 5.0


def square(x: int) -> int:
    return x * x


def blob(x: int) -> bytes:
    """40 KiB of one byte; 300 KiB for a negative ``x`` (a result too large for small frames)."""
    return bytes([abs(x) % 251]) * (300 * 1024 if x < 0 else 40 * 1024)


def fragile(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"no {x}")
    return x + 1


# ============================================================================ the in-process pool


class InProcessPool:
    """Stands in for CorePool: runs batches through the real core code, in this process.

    With ``hold`` tasks wait in ``held`` until :meth:`run_held`, so a test can keep work
    in flight on a node (to lose it, or to kill it).
    """

    def __init__(self, size: int, *, hold: bool = False) -> None:
        self.size = size
        self.hold = hold
        self.held: list[m.Task] = []
        self.ran: list[int] = []  # argument counts of every batch run
        self.loads: list[int] = []
        self.drops: list[int] = []
        self.cancels: list[int] = []
        self.cancel_all_calls = 0
        self.on_result: Any = None
        self.on_failed: Any = None
        self.core = Core(mmap.mmap(-1, SLOT.size))
        self._job_info: dict[int, m.JobLoad] = {}

    @property
    def busy(self) -> int:
        return min(self.size, len(self.held))

    def load_job(self, msg: m.JobLoad) -> None:
        self.loads.append(msg.job)
        self._job_info[msg.job] = msg
        self.core.load(
            m.CoreLoad(job=msg.job, star=msg.star, reduce=msg.reduce, payload=msg.payload)
        )

    def drop_job(self, job: int) -> None:
        self.drops.append(job)
        self._job_info.pop(job, None)
        self.core.jobs.pop(job, None)

    def submit(self, task: m.Task) -> None:
        if task.job not in self._job_info:
            self.on_failed(
                m.TaskFailed(task=task.task, reason="error", message="job was not loaded")
            )
        elif self.hold:
            self.held.append(task)
        else:
            self._run(task)

    def run_held(self) -> None:
        held, self.held = self.held, []
        for task in held:
            self._run(task)

    def _run(self, task: m.Task) -> None:
        result = self.core.run(task)  # as a node hands it to its core
        self.ran.append(task_count(task))
        self.on_result(dataclasses.replace(result, part=0))

    def cancel_job(self, job: int) -> None:
        self.cancels.append(job)
        self.held = [t for t in self.held if t.job != job]

    def cancel_all(self) -> None:
        self.cancel_all_calls += 1
        self.held.clear()
        self._job_info.clear()


# ============================================================================ wiring


class TakesLess(FrameDecoder):
    """A decoder that takes frames of at most ``real`` bytes once authenticated, whatever its
    connection's hello said (as a node of an earlier release, whose hello says no limit)."""

    def __init__(self, real: int) -> None:
        self.real = real
        super().__init__()

    @property
    def max_frame(self) -> int:
        return self._max

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max = value if value <= PREAUTH_MAX_FRAME else min(value, self.real)


class Cluster:
    """One server factory; nodes and consoles joined to it by iosim pumps sharing one Clock."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.clock = Clock()
        self.clock.advance(100)
        self.factory = RemapServerFactory(
            self.clock,
            SECRET,
            max_frame=max_frame,
            handshake_timeout=5.0,
            heartbeat_interval=HEARTBEAT,
            heartbeat_misses=MISSES,
            console_grace=GRACE,
        )
        self.scheduler = self.factory.scheduler
        self.pumps: list[iosim.IOPump] = []

    def _join(
        self,
        role: str,
        handler: Any,
        name: str,
        max_frame: int | None = None,
        takes: int | None = None,
    ) -> tuple[PeerProtocol, iosim.IOPump]:
        server = self.factory.buildProtocol(None)
        limit = self.max_frame if max_frame is None else max_frame
        conn = Connection(role, SECRET, max_frame=limit, heartbeat=HEARTBEAT)
        if takes is not None:  # (its hello says ``limit``, its frames take ``takes`` bytes)
            conn.decoder = TakesLess(takes)
        client = PeerProtocol(
            conn,
            handler,
            self.clock,
            handshake_timeout=5.0,
            heartbeat_interval=HEARTBEAT,
            heartbeat_misses=MISSES,
        )
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.settle()
        # (one whose frames take less may have closed already, refusing one)
        assert client.open or takes is not None, f"{role} {name} did not authenticate"
        return client, pump

    def node(
        self,
        name: str,
        cores: int = 2,
        *,
        hold: bool = False,
        group: str | None = None,
        takes: int | None = None,
    ) -> tuple[InProcessPool, NodeAgent, iosim.IOPump]:
        """A node; ``takes``: the largest frame it takes, when its hello says otherwise."""
        pool = InProcessPool(cores, hold=hold)
        agent = NodeAgent(pool, group=group, host=name)
        link, pump = self._join("node", agent, name, takes=takes)
        assert any(n.host == name for n in self.scheduler.nodes.values()) or not link.open
        return pool, agent, pump

    def console(
        self, name: str = "console", *, max_frame: int | None = None
    ) -> tuple[ClusterClient, iosim.IOPump]:
        """A console; ``max_frame``: its own frame limit (default: the server's)."""
        client = ClusterClient()
        self._join("console", client, name, max_frame)
        assert client.link is not None
        return client, self.pumps[-1]

    def settle(self, pumps: Iterable[iosim.IOPump] | None = None) -> None:
        """Move bytes on the given (default: every) connection until none moves."""
        pumps = list(self.pumps if pumps is None else pumps)
        for _ in range(10_000):
            if not any([p.pump() for p in pumps]) and not run_soon():
                return
        raise AssertionError("traffic did not settle")

    def tick(self, seconds: float, pumps: Iterable[iosim.IOPump], step: float = 0.25) -> None:
        """Let time pass in small steps, keeping the given connections talking."""
        pumps = list(pumps)
        elapsed = 0.0
        while elapsed < seconds - 1e-9:
            self.clock.advance(step)
            elapsed += step
            self.settle(pumps)


#: what JobStreams asked to run "on the reactor": run by settle(), on the test's thread
SOON: list[tuple[Any, tuple[Any, ...]]] = []


#: runs whose arguments are still being read
RUNS: list[Any] = []


def call_soon(fn: Any, *args: Any) -> None:
    SOON.append((fn, args))


def run_soon() -> int:
    """Run the calls streams asked for (and those they ask for meanwhile); how many ran."""
    ran = 0
    for run in RUNS:
        run.top_up()
    while SOON:
        fn, args = SOON.pop(0)
        fn(*args)
        ran += 1
    return ran


class SinkRun:
    """A job as the console runs it: a JobStream whose results this thread takes into a sink,
    its arguments pickled here a little ahead of what was sent (as ``read_into`` does)."""

    AHEAD = 16 * 1024 * 1024

    def __init__(self, stream: JobStream, sink: Any, source: Iterable[Any]) -> None:
        self.stream = stream
        self.sink = sink
        self.session = stream.session
        self.source: Any = iter(source)
        RUNS.append(self)
        self.top_up()

    def top_up(self) -> None:
        stream = self.stream
        while self.source is not None and stream.unsent_bytes < self.AHEAD:
            value = next(self.source, RUNS) if not stream.input_closed else RUNS
            if value is RUNS:
                self.source = None
                stream.close_input()
                RUNS.remove(self)
            else:
                tag = value if self.session.keep_arguments else None
                stream.put_many([dumps(value)], [tag])

    def __getattr__(self, name: str) -> Any:  # sent, job_id, wire_job, params, ...
        return getattr(self.session, name)

    @property
    def called(self) -> bool:
        """Whether the job has ended (like a fired Deferred)."""
        run_soon()
        return self.stream.finished.is_set()


def job_run(
    fn: Any,
    args: Iterable[Any],
    sink: Any = None,
    *,
    reduce_fn: Any = None,
    total: int | None = None,
    **params: Any,
) -> SinkRun:
    sink = sink if sink is not None else ObjectSink()
    stream = JobStream(
        function_blob(fn, reduce_fn),
        JobOptions(**params),
        call_soon=call_soon,
        total_hint=total,
        keep_arguments=sink.needs_arguments,
    )
    return SinkRun(stream, sink, args)


def submit(client: ClusterClient, run: SinkRun) -> SinkRun:
    """What ``stream.start(client)`` does once on the reactor thread."""
    client.submit(run.stream)
    return run


def attach(client: ClusterClient, job: int, run: SinkRun) -> SinkRun:
    client.attach(job, run.stream)
    return run


def outcome(d: Any) -> Any:
    """The result of a fired Deferred or an ended run (a Failure for an error), failing if it
    has not fired; a run's results are taken into its sink first, as a console does."""
    if isinstance(d, SinkRun):
        assert d.called, "the job has not ended"
        try:
            return d.stream.collect(d.sink, until=0)
        except Exception as exc:  # noqa: BLE001 - returned like an errback's Failure
            return Failure(exc)
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


# ============================================================================ tests


def test_job_runs_end_to_end_in_memory() -> None:
    """A console's job goes through the server to two nodes and back into an object sink."""
    cluster = Cluster()
    pool_a, _, _ = cluster.node("node-a", cores=2)
    pool_b, _, _ = cluster.node("node-b", cores=1)
    client, _ = cluster.console()
    # batches of 100: trivial calls measured in microseconds would otherwise go in batches of
    # 2 ms of work (the tail floor), all to the first node
    run = job_run(square, range(1000), total=1000, name="squares", chunksize=100)
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert isinstance(result, JobOutcome), result
    assert (result.state, result.done, result.failed) == ("done", 1000, 0)
    assert run.sink.value() == [i * i for i in range(1000)]
    assert sum(pool_a.ran) + sum(pool_b.ran) == 1000, "every argument ran exactly once"
    assert pool_a.ran and pool_b.ran, "both nodes took part"
    assert pool_a.loads == [result.job] and pool_b.loads == [result.job]
    assert pool_a.drops == [result.job] and pool_b.drops == [result.job]


def test_many_arguments_flow_through_several_windows() -> None:
    """More arguments than the first window: the console sends as grants arrive, all come back."""
    cluster = Cluster()
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    n = 20_000
    run = job_run(square, range(n))
    d = submit(client, run)
    cluster.settle()
    assert outcome(d).state == "done"
    assert run.sink.value() == [i * i for i in range(n)]
    first_window = 256
    assert run.sent == n > first_window


def test_task_errors_reach_the_sink_with_on_error_continue() -> None:
    """A raising function gives per-argument errors with type, message and remote traceback."""
    cluster = Cluster()
    cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    run = job_run(fragile, range(50), on_error="continue", chunksize=4)
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert (result.state, result.done, result.failed) == ("done", 43, 7)
    values = run.sink.value()
    for i, value in enumerate(values):
        if i % 7 == 3:
            assert isinstance(value, TaskErrorInfo)
            assert (value.type_name, value.message) == ("ValueError", f"no {i}")
            assert "fragile" in value.traceback
        else:
            assert value == i + 1


def test_on_error_fail_fails_the_run() -> None:
    """With on_error fail the run's Deferred fails and names the argument that raised."""
    cluster = Cluster()
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    run = job_run(fragile, range(50), chunksize=1)
    d = submit(client, run)
    cluster.settle()
    failure = outcome(d)
    assert isinstance(failure, Failure)
    assert "argument 3 raised ValueError" in str(failure.value)
    assert run.sink.closed and run.sink.complete is False


def test_reduce_mode_folds_partials_from_nodes() -> None:
    """In reduce mode nodes fold their batches and the console folds the partials."""
    cluster = Cluster()
    cluster.node("node-a", cores=2)
    cluster.node("node-b", cores=2)
    client, _ = cluster.console()
    run = job_run(
        square, range(500), ReduceSink(operator.add), reduce_fn=operator.add, mode="reduce"
    )
    d = submit(client, run)
    cluster.settle()
    assert outcome(d).state == "done"
    assert run.sink.value() == sum(i * i for i in range(500))


def test_status_over_the_wire() -> None:
    """status() answers with the nodes and jobs the scheduler knows."""
    cluster = Cluster()
    cluster.node("node-a", cores=3, hold=True, group="g1")
    client, _ = cluster.console()
    run = job_run(square, range(10), name="held")
    submit(client, run)
    cluster.settle()
    asked = client.status()
    cluster.settle()
    status = outcome(asked)
    (node,) = status["nodes"]
    (job,) = status["jobs"]
    assert (node["host"], node["cores"], node["group"]) == ("node-a", 3, "g1")
    assert (job["name"], job["state"], job["total"], job["received"]) == ("held", "running", 10, 10)
    # one call per credit (3 cores, 2 each) until call times are measured
    assert job["running"] == 6 and node["tasks_in_flight"] == 6


def test_kill_stops_a_running_job() -> None:
    """kill: the run fails with JobKilled, the node is told to cancel and forget the job."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=1, hold=True)
    client, _ = cluster.console()
    run = job_run(square, range(100), chunksize=5)
    d = submit(client, run)
    cluster.settle()
    assert pool.held, "the node holds work of the job"
    job = run.job_id
    killed = client.kill(job)
    cluster.settle()
    info = outcome(killed)
    assert info == {"job": job, "state": "killed"}
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(JobKilled)
    assert pool.cancels == [job] and pool.drops == [job] and not pool.held
    assert cluster.scheduler.jobs[job].pending_count == 0


def test_heartbeat_timeout_drops_a_silent_node_and_requeues_its_work() -> None:
    """A node silent for interval × misses is dropped by the server; its batches run elsewhere."""
    cluster = Cluster()
    pool_a, agent_a, pump_a = cluster.node("node-a", cores=2, hold=True)
    client, pump_c = cluster.console()
    run = job_run(square, range(40), chunksize=4, total=40)
    d = submit(client, run)
    cluster.settle()
    stranded = sum(len(t.sizes) for t in pool_a.held)
    assert stranded == 16, "node-a holds four batches and runs none"
    pool_b, _, pump_b = cluster.node("node-b", cores=2)
    cluster.settle()
    assert not d.called, "the job waits for node-a's batches"
    ((a_id, a_state),) = [(i, n) for i, n in cluster.scheduler.nodes.items() if n.host == "node-a"]
    a_server_side = pump_a.server
    assert not a_server_side.transport.disconnecting

    # node-a goes silent: its connection is no longer pumped; the others keep talking
    cluster.tick(HEARTBEAT * MISSES - 0.25, [pump_b, pump_c])
    assert not a_server_side.transport.disconnecting, "dropped before interval × misses"
    cluster.tick(HEARTBEAT + 0.5, [pump_b, pump_c])
    assert a_server_side.transport.disconnecting, "the server must drop a silent node"
    assert "no heartbeat" in str(a_server_side.failure)
    assert isinstance(a_server_side.failure, NodeLost), "the server's link to a node loses a node"

    # the network hole swallows whatever was in flight; the drop is then seen by both ends
    pump_a.clientIO.stream.clear()
    pump_a.serverIO.stream.clear()
    cluster.settle()
    assert a_id not in cluster.scheduler.nodes
    assert agent_a.link is None and pool_a.cancel_all_calls == 1
    result = outcome(d)
    assert isinstance(result, JobOutcome) and (result.state, result.done) == ("done", 40)
    assert run.sink.value() == [i * i for i in range(40)]
    assert sum(pool_b.ran) == 40 - sum(pool_a.ran), "node-b ran everything node-a did not"
    assert not a_state.inflight


def test_connection_drop_requeues_and_late_node_output_is_ignored() -> None:
    """A node whose connection drops has its work re-run elsewhere; every index arrives once."""
    cluster = Cluster()
    pool_a, _, pump_a = cluster.node("node-a", cores=1, hold=True)
    pool_b, _, _ = cluster.node("node-b", cores=1, hold=True)
    client, _ = cluster.console()
    run = job_run(square, range(30), chunksize=3)
    d = submit(client, run)
    cluster.settle()
    assert pool_a.held and pool_b.held
    pump_a.server.transport.loseConnection()  # the server side drops node-a
    cluster.settle()
    pool_a.hold = pool_b.hold = False
    pool_a.run_held()  # nothing: the pool was cleared when the server went away
    pool_b.run_held()
    cluster.settle()
    result = outcome(d)
    assert result.state == "done" and run.sink.value() == [i * i for i in range(30)]
    assert sum(pool_b.ran) == 30 and not pool_a.ran


def test_detached_job_is_attached_from_a_new_console() -> None:
    """A detached job outlives its console; another console attaches and gets every result."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=1, hold=True)
    first, pump_first = cluster.console("first")
    run = job_run(square, range(12), chunksize=3, detach=True)
    lost = submit(first, run)
    cluster.settle()
    job = run.job_id
    pump_first.client.transport.loseConnection()
    cluster.settle()
    assert isinstance(outcome(lost), Failure)
    cluster.tick(GRACE * 2, [p for p in cluster.pumps if p is not pump_first])
    assert cluster.scheduler.jobs[job].state == "running", "a detached job is not cancelled"
    pool.hold = False
    pool.run_held()
    cluster.settle()
    assert cluster.scheduler.jobs[job].state == "done"
    second, _ = cluster.console("second")
    again = job_run(square, [], ObjectSink())
    d = attach(second, job, again)
    cluster.settle()
    assert outcome(d).state == "done"
    assert again.sink.value() == [i * i for i in range(12)]
    assert MISSING not in again.sink.value()


def test_console_lost_cancels_its_job_after_grace() -> None:
    """A console that disconnects without detach: its job is cancelled after the grace period."""
    cluster = Cluster()
    pool, _, pump_node = cluster.node("node-a", cores=1, hold=True)
    client, pump_c = cluster.console()
    run = job_run(square, range(12), chunksize=3)
    submit(client, run)
    cluster.settle()
    job = run.job_id
    pump_c.client.transport.loseConnection()
    cluster.settle()
    cluster.tick(GRACE - 1, [pump_node])
    assert cluster.scheduler.jobs[job].state == "running"
    cluster.tick(2, [pump_node])
    assert cluster.scheduler.jobs[job].state == "cancelled"
    assert pool.cancels == [job] and not pool.held


def test_job_for_a_group_waits_for_its_node() -> None:
    """A job for a group with no node gets a notice; a node of the group joining runs it there."""
    group = "gpu"
    cluster = Cluster()
    other, _, _ = cluster.node("cpu-node", cores=2, group="cpu")
    client, _ = cluster.console()
    notices: list[str] = []
    run = job_run(square, range(20), group=group, wait_for_nodes=30.0)
    run.stream.on_notice = notices.append
    d = submit(client, run)
    cluster.settle()
    assert notices == [f"waiting for nodes in group {group!r}"]
    cluster.tick(3, cluster.pumps)
    gpu, _, _ = cluster.node("gpu-node", cores=1, group=group)
    cluster.settle()
    assert outcome(d).state == "done"
    assert sum(gpu.ran) == 20 and not other.ran


def test_big_arguments_fit_the_frame_limit() -> None:
    """Arguments whose first window exceeds max_frame still travel (the console cuts Args by bytes)."""
    cluster = Cluster(max_frame=8 * 1024 * 1024)
    cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    run = job_run(len, [bytes(64 * 1024)] * 300)  # the first window of 256 is 16 MiB
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert isinstance(result, JobOutcome), result
    assert run.sink.value() == [64 * 1024] * 300


SMALL = 256 * 1024


def test_a_console_with_a_small_frame_limit_gets_results_in_frames_it_takes() -> None:
    """A console whose limit is far below the server's says so in its hello; batches whose
    results are over it (a core packs them in one pickle) run again argument by argument and
    arrive within its limit: the job ends done on the first connection, nothing dropped."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=1)
    client, _ = cluster.console(max_frame=SMALL)
    link = client.link
    run = job_run(blob, range(30), total=30, chunksize=10)
    d = submit(client, run)
    cluster.settle()
    result = outcome(d)
    assert isinstance(result, JobOutcome), result
    assert (result.state, result.done, result.failed) == ("done", 30, 0)
    assert run.sink.value() == [blob(i) for i in range(30)]
    assert client.link is link and link.open and client.reconnects == 0
    assert pool.ran[0] == 10 and 1 in pool.ran, "a packed batch over the limit ran again alone"
    (server_end,) = cluster.factory.consoles
    assert server_end.frame_limit == SMALL and server_end.conn.max_frame == MAX_FRAME


def test_a_result_over_a_small_consoles_limit_fails_its_job_with_one_line() -> None:
    """One result that cannot fit the console's frames fails the job (``on_error: fail``)
    with one line naming the frame's size, the limit and REMAP_MAX_FRAME; the connection
    stays up and the job is not run again."""
    cluster = Cluster()
    pool, _, _ = cluster.node("node-a", cores=1)
    client, _ = cluster.console(max_frame=SMALL)
    run = job_run(blob, [0, 1, -2, 3], chunksize=1)
    d = submit(client, run)
    cluster.settle()
    failure = outcome(d)
    assert isinstance(failure, Failure), failure
    text = str(failure.value)
    assert "argument 2 raised ResultTooLarge: its result needs a frame of 307," in text
    assert "over the limit of 262,144 bytes" in text and "REMAP_MAX_FRAME" in text
    assert "\n" not in text
    assert client.link is not None and client.link.open and client.reconnects == 0
    assert sum(pool.ran) <= 4, "nothing ran twice"


def test_a_status_reply_over_a_small_consoles_limit_leaves_out_old_finished_jobs() -> None:
    """The server's status reply to a console with a 12 KiB limit keeps the running job and
    the newest finished ones that fit, instead of a frame the console would refuse."""
    cluster = Cluster()
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    for i in range(30):
        run = job_run(square, range(1), total=1, name=f"job {i:02d} " + "n" * 150)
        submit(client, run)
        cluster.settle()
        assert outcome(run).state == "done"
    small, _ = cluster.console("small", max_frame=12 * 1024)
    asked = small.status()
    cluster.settle()
    status = outcome(asked)
    assert isinstance(status, dict), status
    names = [job["name"][:6] for job in status["jobs"]]
    assert 5 < len(names) < 30 and names == [f"job {i:02d}" for i in range(30 - len(names), 30)]
    assert small.link is not None and small.link.open


def test_a_node_that_refuses_a_frame_it_did_not_say_it_would_is_not_sent_it_again() -> None:
    """A node whose hello said the server's limit but whose frames take 256 KiB (as a node
    of an earlier release, whose hello says none) refuses a task of a 300 KiB argument: its
    ``frame-too-large`` error names its limit and it closes. When it connects again (same
    host and process) the server holds it to that limit: the argument fits no node and the
    job fails in one line, with one refusal in all. Before, the node was sent the same task
    at every reconnection, for ever."""
    cluster = Cluster()
    run = job_run(len, [b"a", bytes(300 * 1024), b"c"], chunksize=1)
    client, _ = cluster.console()
    d = submit(client, run)
    refusals = 0
    for _ in range(5):  # a node that connects again each time it closed
        _, _, pump = cluster.node("old-node", cores=1, takes=SMALL)
        cluster.settle()
        link = pump.client
        if link.open:
            break
        assert "exceeds the limit of 262144 bytes" in str(link.failure), link.failure
        refusals += 1
    assert refusals == 1
    failure = outcome(d)
    assert isinstance(failure, Failure), failure
    text = str(failure.value)
    assert "argument 1 raised ArgumentTooLarge: its task needs a frame of 307," in text, text
    assert "over the limit of 262,144 bytes on frames to the nodes" in text, text
    assert "\n" not in text and client.reconnects == 0


def test_first_window_travels_before_the_server_names_the_job() -> None:
    """The console sends up to INITIAL_WINDOW arguments right after `submit`, as job -id,
    without waiting a round trip for `submitted`; the server maps them to the new job."""
    cluster = Cluster()
    cluster.node("node-a", cores=2)
    client, _ = cluster.console()
    run = job_run(square, range(300), total=300)
    d = submit(client, run)
    assert run.job_id is None and run.wire_job < 0, "no `submitted` can have arrived yet"
    assert run.sent == m.INITIAL_WINDOW, "the initial window went out with the submit"
    cluster.settle()
    result = outcome(d)
    assert result.state == "done" and run.job_id == result.job > 0
    assert run.sink.value() == [i * i for i in range(300)]


def test_early_arguments_of_a_refused_submit_are_dropped_and_the_console_stays() -> None:
    """A refused submit's early arguments are dropped quietly: the console is told why and
    its connection keeps working for the next request."""
    cluster = Cluster()
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    run = job_run(square, range(10), total=10)
    run.session.fn_blob = b""  # the server refuses a job without a function
    d = submit(client, run)
    cluster.settle()
    failure = outcome(d)
    assert isinstance(failure, Failure) and "refused" in str(failure.value)
    assert isinstance(failure.value, JobRefused) and failure.value.code == "bad-request"
    asked = client.status()
    cluster.settle()
    assert outcome(asked)["jobs"] == [], "nothing was started, and the connection still answers"


def test_error_codes_reach_the_caller_as_classes() -> None:
    """A request the server answers with an error fails with the class of its code: a caller
    tells "no such job" (NotFound) from a refused request by class or ``.code``, not by text."""
    cluster = Cluster()
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    missing = [client.kill(999), attach(client, 999, job_run(square, []))]
    drained = client.drain("no-such-node")
    cluster.settle()
    for d in missing + [drained]:
        failure = outcome(d)
        assert isinstance(failure, Failure), failure
        assert isinstance(failure.value, NotFound) and isinstance(failure.value, RequestFailed)
        assert failure.value.code == "not-found"
