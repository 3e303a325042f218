"""A console resumes the job it feeds after its connection is cut or the server restarts.

In memory (real protocol bytes over iosim pumps, one Clock): the console's client dials again
by itself, sends ``resume`` with the arguments whose outcome it lacks, and sends those again;
the server (the same one, or a new one reading the old one's journal) drops what it held of
the job. Every result reaches the sink exactly once (an ObjectSink raises on a duplicate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer

from protocol import messages as m
from remap.client import ClusterClient, JobOutcome
from remap.errors import AuthError, ConnectionLost, ServerUnreachable
from remap.server.journal import Journal
from remap.server.service import RemapServerFactory
from tests.test_inmemory import (
    GRACE,
    HEARTBEAT,
    MISSES,
    SECRET,
    Cluster,
    job_run,
    outcome,
    square,
    submit,
)

#: why the in-memory dial fails while the server is down
DOWN = "connection refused (is the server running, and on that port?)"


class RestartableCluster(Cluster):
    """The in-memory cluster whose server can die (SIGKILL-like) and start again on its journal."""

    def __init__(self, journal_path: Path | None = None) -> None:
        super().__init__()
        self.journal_path = journal_path
        self.up = True
        self._use_journal()

    def _use_journal(self) -> None:
        if self.journal_path is not None:
            self.journal = Journal(self.journal_path, self.clock)
            self.factory.use_journal(self.journal)

    def redialling_console(self, name: str = "console") -> ClusterClient:
        """A console whose client dials this cluster's current server again when cut off."""
        client = ClusterClient(clock=self.clock, grace=GRACE)

        def redial() -> defer.Deferred:
            if not self.up:  # as the real dial says it (remap.dial)
                return defer.fail(ServerUnreachable(f"cannot reach the server at memory: {DOWN}"))
            link, _ = self._join("console", client, name)
            return defer.succeed(link)

        client.redial = redial
        self._join("console", client, name)
        return client

    def cut(self, client: ClusterClient) -> None:
        """Drop one console's connection (the network blinked)."""
        assert client.link is not None
        client.link.transport.loseConnection()
        self.settle()

    def kill_server(self) -> None:
        """The server dies: nothing more reaches its journal, every connection drops."""
        old = self.factory
        if self.journal_path is not None:
            journal = old.scheduler.journal
            if journal._timer is not None and journal._timer.active():
                journal._timer.cancel()  # what was not committed is lost, as on SIGKILL
            journal._db.close()
            old.scheduler.journal = None
        old.scheduler.stop()
        self.up = False
        for pump in self.pumps:
            pump.client.transport.loseConnection()
        self.settle()
        self.pumps = []

    def start_server(self) -> None:
        self.factory = RemapServerFactory(
            self.clock,
            SECRET,
            max_frame=self.max_frame,
            handshake_timeout=5.0,
            heartbeat_interval=HEARTBEAT,
            heartbeat_misses=MISSES,
            console_grace=GRACE,
        )
        self.scheduler = self.factory.scheduler
        self._use_journal()
        self.up = True


def rejoin(cluster: Cluster, name: str, reconnects: int, client: Any) -> Any:
    """After a restart: a node joins again (holding its calls), the console has reconnected
    ``reconnects`` times, the held calls run and the cluster settles; returns the node's pool."""
    pool, _, _ = cluster.node(name, cores=2, hold=True)
    wait_until(cluster, lambda: client.reconnects == reconnects)
    pool.run_held()
    cluster.settle()
    return pool


def run_to_end(cluster: Cluster, pool: Any, d: Any) -> Any:
    """Run held calls and pump the links until the job's Deferred fires; its outcome."""
    while not d.called:
        pool.run_held()
        cluster.tick(0.1, cluster.pumps)
    return outcome(d)


def wait_until(cluster: Cluster, cond: Any, seconds: float = 20.0) -> None:
    """Let fake time pass (pumping) until ``cond()``; fail if it never holds."""
    for _ in range(int(seconds / 0.1)):
        if cond():
            cluster.settle()
            return
        cluster.tick(0.1, cluster.pumps, step=0.1)
    assert cond(), "condition not reached in fake time"


def test_a_cut_connection_is_resumed_and_every_result_arrives_once() -> None:
    cluster = RestartableCluster()
    pool, _, _ = cluster.node("node-a", cores=2, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(2000), chunksize=50)
    d = submit(client, run)
    cluster.settle()
    for _ in range(3):  # some results arrive, some arguments stay in flight
        pool.run_held()
        cluster.settle()
    delivered = run.done
    assert 0 < delivered < 2000 and pool.held
    cluster.cut(client)
    assert not d.called, "the job waits for the console to come back"
    wait_until(cluster, lambda: client.reconnects == 1)
    job = cluster.scheduler.jobs[run.job_id]
    assert job.console is not None and job.state == "running"
    assert pool.cancels == [run.job_id], "what the node held for the old connection was dropped"
    while not d.called:
        pool.run_held()
        cluster.tick(0.1, cluster.pumps)
    result = outcome(d)
    assert isinstance(result, JobOutcome), result
    assert (result.state, result.done) == ("done", 2000)
    assert run.sink.value() == [i * i for i in range(2000)]


def test_a_restarted_server_waits_for_the_console_which_resumes(tmp_path: Path) -> None:
    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    pool, _, _ = cluster.node("node-a", cores=2, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(3000), chunksize=40, name="streamed")
    d = submit(client, run)
    cluster.settle()
    pool.run_held()
    cluster.settle()
    job_id = run.job_id
    assert 0 < run.done < 3000
    for restart in range(3):
        cluster.kill_server()
        cluster.tick(1.0, [])  # down a while: the console's first redials are refused
        assert not d.called and client.reconnects == restart
        cluster.start_server()
        job = cluster.scheduler.jobs[job_id]
        assert job.state == "running" and "waiting for its console" in job.waiting
        pool = rejoin(cluster, f"node-{restart}", restart + 1, client)
    result = run_to_end(cluster, pool, d)
    assert isinstance(result, JobOutcome), result
    assert (result.state, result.done, result.failed) == ("done", 3000, 0)
    assert run.sink.value() == [i * i for i in range(3000)]
    assert cluster.journal.duplicates == 0


def test_a_console_that_does_not_come_back_ends_the_job_with_the_reason(tmp_path: Path) -> None:
    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    cluster.node("node-a", cores=1, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(100), chunksize=10)
    d = submit(client, run)
    cluster.settle()
    job_id = run.job_id
    cluster.kill_server()
    cluster.tick(GRACE + 1, [])  # the console gives up: the server is still down
    failure = outcome(d)
    assert failure.check(Exception) and "REMAP_CONSOLE_GRACE" in str(failure.value)
    cluster.start_server()
    assert cluster.scheduler.jobs[job_id].state == "running"
    cluster.tick(GRACE + 1, cluster.pumps)
    job = cluster.scheduler.jobs[job_id]
    assert job.state == "failed"
    assert "did not come back" in job.message and "submit it again" in job.message


def test_a_resume_that_does_not_add_up_is_refused() -> None:
    cluster = RestartableCluster()
    cluster.node("node-a", cores=1, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(100), chunksize=10)
    submit(client, run)
    cluster.settle()
    sched = cluster.scheduler
    bad = [
        m.Resume(id=1, job=run.job_id, sent=10, missing=[[5, 3]], done=8, failed=0),
        m.Resume(id=1, job=run.job_id, sent=10, missing=[[0, 4]], done=8, failed=0),
        m.Resume(id=1, job=run.job_id, sent=10, missing=[[0, 11]], done=0, failed=0),
    ]
    for msg in bad:
        job, problem = sched.resume(object(), msg)
        assert job is None and problem.startswith("resume:"), problem
    job, problem = sched.resume(
        object(), m.Resume(id=1, job=999, sent=0, missing=[], done=0, failed=0)
    )
    assert job is None and "no job 999" in problem


def test_a_detached_job_is_not_resumed() -> None:
    """A detached job's console keeps nothing to send again: a cut fails its run at once."""
    cluster = RestartableCluster()
    cluster.node("node-a", cores=1, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(10), detach=True)
    d = submit(client, run)
    cluster.settle()
    assert not run.resumable
    cluster.cut(client)
    assert outcome(d).check(ConnectionLost)
    assert client.reconnects == 0


def test_a_server_restarted_without_its_journal_refuses_the_resume_with_the_reason() -> None:
    """With no journal a restarted server knows no earlier job: the console's run fails with
    one line saying so, rather than waiting or starting the job afresh."""
    cluster = RestartableCluster()  # no journal
    cluster.node("node-a", cores=1, hold=True)
    client = cluster.redialling_console()
    run = job_run(square, range(100), chunksize=10)
    d = submit(client, run)
    cluster.settle()
    cluster.kill_server()
    cluster.start_server()
    cluster.scheduler.job_ids_from = run.job_id + 1  # a later run of the server numbers later
    cluster.node("node-b", cores=1)
    wait_until(cluster, lambda: d.called)
    failure = outcome(d)
    assert "could not be resumed" in str(failure.value), failure
    assert "earlier run of the server" in str(failure.value), failure


def test_a_job_submitted_while_the_console_redials_starts_once_the_server_is_back(
    tmp_path: Path,
) -> None:
    """A job started while the client dials again (it feeds a job, so it will resume) waits
    for the redial instead of failing with ConnectionLost, then goes out once: the restarted
    server holds one job for it and its results arrive once."""
    cluster = RestartableCluster(tmp_path / "journal.sqlite")
    pool, _, _ = cluster.node("node-a", cores=2, hold=True)
    client = cluster.redialling_console()
    first = submit(client, job_run(square, range(100), chunksize=10))
    cluster.settle()
    cluster.kill_server()
    assert client.redialing
    late = submit(client, job_run(square, range(30), chunksize=10, name="late"))
    cluster.tick(1.0, [])  # the server is still down: its redials are refused
    assert not late.called, "the new job waits for the redial"
    cluster.start_server()
    pool = rejoin(cluster, "node-b", 1, client)
    for run in (first, late):
        result = run_to_end(cluster, pool, run)
        assert isinstance(result, JobOutcome) and result.state == "done", result
    assert late.sink.value() == [i * i for i in range(30)]
    named = [job for job in cluster.scheduler.jobs.values() if job.options.name == "late"]
    assert len(named) == 1, "the new job was submitted once"
    assert client.reconnects == 1


def test_a_job_submitted_while_a_redial_gives_up_fails_with_the_same_error() -> None:
    """A redial that gives up (the server stays down past the grace) fails the job started
    meanwhile with the one-line error the job it was resuming gets, when it gives up."""
    cluster = RestartableCluster()
    cluster.node("node-a", cores=1, hold=True)
    client = cluster.redialling_console()
    first = submit(client, job_run(square, range(100), chunksize=10))
    cluster.settle()
    cluster.kill_server()
    late = submit(client, job_run(square, range(30), chunksize=10))
    cluster.tick(GRACE - 1, [])
    assert not late.called, "the new job waits while the redial goes on"
    cluster.tick(2, [])
    errors = [outcome(run).value for run in (first, late)]
    assert all(isinstance(e, ConnectionLost) for e in errors), errors
    assert str(errors[0]) == str(errors[1]) and "REMAP_CONSOLE_GRACE" in str(errors[1])


def test_a_job_waiting_for_a_redial_fails_at_once_when_closed_or_refused() -> None:
    """Closing the client, or a server that refuses the redial's authentication, ends the
    redial and the job started meanwhile at once (no wait for the grace)."""
    for end in ("close", "auth"):
        cluster = RestartableCluster()
        cluster.node("node-a", cores=1, hold=True)
        client = cluster.redialling_console()
        submit(client, job_run(square, range(100), chunksize=10))
        cluster.settle()
        if end == "auth":
            client.redial = lambda: defer.fail(AuthError("the server refused our secret"))
        cluster.kill_server()
        late = submit(client, job_run(square, range(30), chunksize=10))
        if end == "close":
            client.close()
        cluster.tick(0.25, [])
        assert late.called, end
        failure = outcome(late)
        assert failure.check(ConnectionLost), failure
        assert not client.redialing


def test_an_idle_console_that_lost_its_server_dials_again_at_its_next_call() -> None:
    """A console that lost its server with nothing in flight does not dial at once; its next
    call (a job, a status request) dials once, and the calls made meanwhile wait for that dial.
    Server down: they fail with the dial's own error and nothing goes on dialling; the call
    after them dials again and, the server back, goes out. A closed console never dials."""
    cluster = RestartableCluster()
    client = cluster.redialling_console()
    dial = client.redial
    gates: list[defer.Deferred] = []

    def slow_dial() -> defer.Deferred:  # the dial ends when the test fires its gate
        gates.append(defer.Deferred())
        return gates[-1].addCallback(lambda _: dial())

    client.redial = slow_dial
    cluster.kill_server()
    assert client.link is None and not client.redialing and not gates, "idle: no dial yet"

    down = submit(client, job_run(square, range(3)))
    status = client.status()
    assert client.redialing and len(gates) == 1 and len(client._parked) == 2
    cluster.tick(60, [])
    assert not down.called and not status.called, "both wait for the one dial"
    gates[0].callback(None)  # the server is still down
    cluster.settle()
    errors = [outcome(down).value, outcome(status).value]
    assert all(isinstance(e, ServerUnreachable) for e in errors), errors
    assert str(errors[0]) == str(errors[1]) == f"cannot reach the server at memory: {DOWN}"
    assert not client.redialing and client.reconnects == 0

    cluster.start_server()
    pool, _, _ = cluster.node("node-b", cores=2, hold=True)
    late = submit(client, job_run(square, range(30), chunksize=10, name="late"))
    status = client.status()
    assert client.redialing and len(gates) == 2, "a failed dial leaves no dead state"
    gates[1].callback(None)
    cluster.settle()
    assert client.reconnects == 1 and client.link is not None
    result = run_to_end(cluster, pool, late)
    assert isinstance(result, JobOutcome) and result.state == "done", result
    assert late.sink.value() == [i * i for i in range(30)]
    assert [n["host"] for n in outcome(status)["nodes"]] == ["node-b"]
    assert not client.lost.called, "lost fires again when the new connection goes"

    client.close()
    cluster.settle()
    assert client.lost.called
    closed = submit(client, job_run(square, range(3)))
    cluster.settle()
    assert outcome(closed).check(ConnectionLost) and len(gates) == 2, "closed: no dial"
