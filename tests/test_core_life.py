"""A core process's life on the node: starting, idle, busy, killing, dead, along a table.

No process is started: a Clock that records ``spawnProcess`` stands in for the reactor, and
the test plays the core's side (``ready``, ``result``, its exit) into the pool.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from protocol import messages as m
from remap.node.cores import CORE_TRANSITIONS, CoreLife, CorePool, CoreProcess
from remap.transitions import IllegalTransition


class SpawnRecorder(Clock):
    """A reactor that records the processes it is asked to start and starts none."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[CoreProcess] = []

    def spawnProcess(self, proto: CoreProcess, *args: Any, **kwargs: Any) -> None:
        self.spawned.append(proto)


def _pool() -> tuple[CorePool, SpawnRecorder, list, list]:
    reactor = SpawnRecorder()
    results: list[m.TaskResult] = []
    failures: list[m.TaskFailed] = []
    pool = CorePool(reactor, 1, results.append, failures.append)
    pool.start()
    pool.load_job(m.JobLoad(job=1, star=False, timeout=None, reduce=False, payload=b"fn"))
    return pool, reactor, results, failures


def _result(task: int) -> m.TaskResult:
    return m.TaskResult(task=task, sizes=[1], elapsed=0.1, payload=b"r")


def _ended(core: CoreProcess, signal: int | None = 9) -> None:
    core.processEnded(Failure(ProcessTerminated(signal=signal)))


def test_table_names_every_state_and_dead_is_final() -> None:
    """Every state has a row; dead leads nowhere; a killed core can only die."""
    assert set(CORE_TRANSITIONS) == set(CoreLife)
    assert CORE_TRANSITIONS[CoreLife.DEAD] == frozenset()
    assert CORE_TRANSITIONS[CoreLife.KILLING] == {CoreLife.DEAD}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (CoreLife.STARTING, CoreLife.BUSY),  # a batch before "ready"
        (CoreLife.KILLING, CoreLife.IDLE),  # a killed core taking work again
        (CoreLife.DEAD, CoreLife.STARTING),  # revived instead of replaced
        (CoreLife.IDLE, CoreLife.IDLE),
    ],
)
def test_illegal_core_moves_raise(old: CoreLife, new: CoreLife) -> None:
    """A move the table does not list raises and leaves the core as it was."""
    pool, reactor, _, _ = _pool()
    core = reactor.spawned[0]
    core.life = old
    with pytest.raises(IllegalTransition, match=f"{old.value} → {new.value}"):
        core.move(new)
    assert core.life is old


def test_a_core_starts_takes_a_batch_after_ready_and_goes_idle_after_its_result() -> None:
    """A task waits while the core is starting; ready → busy with it; the result → idle."""
    pool, reactor, results, _ = _pool()
    (core,) = reactor.spawned
    assert core.life is CoreLife.STARTING
    pool.submit(m.Task(task=5, job=1, sizes=[1], payload=b"x"))
    assert core.life is CoreLife.STARTING and len(pool.queue) == 1, "no batch before ready"
    pool._core_message(core, m.CoreReady(pid=1))
    assert core.life is CoreLife.BUSY and core.task.task == 5 and not pool.queue
    pool._core_message(core, _result(5))
    assert core.life is CoreLife.IDLE and core.task is None
    assert [r.task for r in results] == [5]


def test_a_timed_out_core_is_killed_dies_and_is_replaced_by_a_starting_one() -> None:
    """Killing: no new batch; its exit reports the batch as timed out; a new core starts."""
    pool, reactor, _, failures = _pool()
    (core,) = reactor.spawned
    pool._core_message(core, m.CoreReady(pid=1))
    pool.submit(m.Task(task=6, job=1, sizes=[1], payload=b"x"))
    pool.submit(m.Task(task=7, job=1, sizes=[1], payload=b"x"))
    core.kill("timeout", at=0)
    assert core.life is CoreLife.KILLING
    core.kill("cancel")  # a second kill changes nothing
    assert core.kill_reason == "timeout"
    pool._dispatch()
    assert core.task.task == 6 and [t.task for t in pool.queue] == [7], "nothing new starts"
    _ended(core)
    assert core.life is CoreLife.DEAD
    assert [(f.task, f.reason) for f in failures] == [(6, "timeout")]
    new = reactor.spawned[-1]
    assert new is not core and new.life is CoreLife.STARTING and pool.cores == [new]
    pool._core_message(new, m.CoreReady(pid=1))
    assert new.life is CoreLife.BUSY and new.task.task == 7


def test_a_core_killed_while_starting_stays_killing_when_it_says_ready() -> None:
    """A ``ready`` that crosses the kill does not make the core idle (no batch goes to it)."""
    pool, reactor, _, _ = _pool()
    (core,) = reactor.spawned
    core.kill("stop")
    pool.submit(m.Task(task=8, job=1, sizes=[1], payload=b"x"))
    pool._core_message(core, m.CoreReady(pid=1))
    assert core.life is CoreLife.KILLING and core.task is None and len(pool.queue) == 1


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (b"\xc1 not msgpack", b""),  # garbage (user code writing to fd 4, say)
        (m.encode(m.Submit(id=1, payload=b"f"))[0], b"f"),  # a network message on the pipe
        (m.encode(m.TaskResult(task=5, sizes=[1]))[0].replace(b"sizes", b"sizez"), b""),
        (m.encode(m.Task(task=5, job=1, sizes=[1]))[0], b"x"),  # a node's command, sent back
        (m.encode(m.CoreDrop(job=1))[0], b""),
    ],
    ids=["garbage", "wire-message", "bad-field", "task", "node-command"],
)
def test_a_core_that_breaks_the_pipe_protocol_is_killed_and_its_batch_reported(
    header: bytes, payload: bytes
) -> None:
    """A core's answers are checked like any message: one that breaks the catalogue is not
    trusted; the core is killed and its exit reports the batch as a crash (run again)."""
    from protocol.framing import encode_frame
    from remap.node.core import OUT_FD

    pool, reactor, results, failures = _pool()
    (core,) = reactor.spawned
    pool._core_message(core, m.CoreReady(pid=1))
    pool.submit(m.Task(task=5, job=1, sizes=[1], payload=b"x"))
    core.childDataReceived(OUT_FD, b"".join(bytes(p) for p in encode_frame(header, payload)))
    assert core.life is CoreLife.KILLING and core.kill_reason == "error"
    _ended(core)
    assert [(f.task, f.reason) for f in failures] == [(5, "crash")] and not results


def test_a_core_gets_the_servers_task_as_it_came_and_the_jobs_reduce_once(monkeypatch) -> None:
    """The node writes a core the ``task`` object the server sent (no command built from it);
    the job's reduce flag and function come once, in ``core_load``; a task that arrives while
    the core is busy waits its turn, and the core's answer starts it."""
    sent: list[m.Message] = []
    monkeypatch.setattr(CoreProcess, "send", lambda self, msg: sent.append(msg))
    reactor = SpawnRecorder()
    results: list[m.TaskResult] = []
    pool = CorePool(reactor, 1, results.append, lambda f: None)
    pool.start()
    pool.load_job(m.JobLoad(job=4, star=True, timeout=2.0, reduce=True, payload=b"fn"))
    (core,) = reactor.spawned
    pool._core_message(core, m.CoreReady(pid=1))
    first = m.Task(task=1, job=4, sizes=[1], payload=b"a")
    second = m.Task(task=2, job=4, sizes=[1], payload=b"b")
    pool.submit(first)
    pool.submit(second)
    assert sent == [
        m.CoreLoad(job=4, star=True, timed=True, reduce=True, payload=b"fn"),
        first,
    ]
    assert sent[1] is first and list(pool.queue) == [second]
    pool._core_message(core, _result(1))
    assert sent[2:] == [second] and not pool.queue and core.task is second
    assert [r.task for r in results] == [1]


def test_cores_start_a_few_at_a_time_and_a_stop_spawns_none_and_replaces_none() -> None:
    """``--cores 999`` spawned every core in one reactor turn: a SIGTERM waited minutes for the
    last spawn. Only ``starting_at_once`` start at a time, the next as one says ready or dies;
    a stop spawns none of the rest, replaces none that die, and fires once all spawned died."""
    reactor = SpawnRecorder()
    pool = CorePool(reactor, 10, lambda r: None, lambda f: None)
    pool.starting_at_once = 3
    pool.start()
    assert [c.index for c in reactor.spawned] == [0, 1, 2]
    pool._core_message(reactor.spawned[0], m.CoreReady(pid=1))
    assert [c.index for c in reactor.spawned] == [0, 1, 2, 3], "one ready: one more starts"
    _ended(reactor.spawned[1], signal=None)  # died starting: replaced, after those waiting
    assert [c.index for c in reactor.spawned] == [0, 1, 2, 3, 4]
    assert pool._unstarted[-1] == 1 and pool.cores[1].life is CoreLife.DEAD

    stopped = pool.stop()
    assert not stopped.called and not pool._unstarted
    for core in reactor.spawned:
        pool._core_message(core, m.CoreReady(pid=1))
        if core.life is not CoreLife.DEAD:
            _ended(core)
    assert len(reactor.spawned) == 5, "nothing spawned or replaced while stopping"
    assert stopped.called


def test_cores_that_die_at_start_back_off_say_why_once_and_a_ready_core_resets_it() -> None:
    """A broken environment (an import error in every core) respawned cores in a tight loop,
    forever, silently: after 3 deaths before "ready" restarts wait 1 s, 2 s, 4 s ... (30 s at
    most), one line says why (the stderr's last line), a ready core resets it, a stop cancels
    the pending restart."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = SpawnRecorder()
        pool = CorePool(reactor, 1, lambda r: None, lambda f: None)
        pool.start()

        def die() -> None:
            core = reactor.spawned[-1]
            core.childDataReceived(2, b"Traceback ...\nModuleNotFoundError: No module named 'x'\n")
            core.processEnded(Failure(ProcessTerminated(exitCode=1)))

        die()
        die()
        assert len(reactor.spawned) == 3, "the first deaths are replaced at once"
        waits = []
        for _ in range(8):
            count = len(reactor.spawned)
            die()
            assert len(reactor.spawned) == count, "not respawned at once"
            waits.append(pool._restart_call.getTime() - reactor.seconds())
            reactor.advance(waits[-1] - 0.5)
            assert len(reactor.spawned) == count, "nothing respawned before the delay"
            reactor.advance(0.5)
            assert len(reactor.spawned) == count + 1
        assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
        said = [e for e in events if "cores die at start" in e.get("log_format", "")]
        assert len(said) == 1, "one line, not one per death"
        assert formatEvent(said[0]) == (
            "cores die at start (exit code 1): ModuleNotFoundError: No module named 'x'; "
            "retrying in 1s, then up to every 30s"
        )

        pool._core_message(reactor.spawned[-1], m.CoreReady(pid=1))
        assert [e for e in events if e.get("log_format") == "cores start again"]
        _ended(reactor.spawned[-1], signal=None)  # died after ready: replaced at once
        assert len(reactor.spawned) == 12 and pool._restart_call is None
        die()
        die()
        die()
        call = pool._restart_call
        assert call.getTime() - reactor.seconds() == 1, "a ready core reset the delay"
        pool.stop()
        assert call.cancelled and not reactor.getDelayedCalls(), "a stop cancels the restart"
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_core_not_ready_by_its_deadline_is_killed_and_its_start_slot_goes_to_the_next() -> None:
    """A core that hung before "ready" kept its start slot forever: ``starting_at_once`` of
    them and no other core ever started. At ``start_timeout`` it is killed (one line names it),
    the next waiting core starts at once (before the hung one is reaped), and a core that says
    ready in time keeps no deadline."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = SpawnRecorder()
        pool = CorePool(reactor, 4, lambda r: None, lambda f: None, start_timeout=10.0)
        pool.starting_at_once = 2
        pool.start()
        first, hung = reactor.spawned
        reactor.advance(5)
        pool._core_message(first, m.CoreReady(pid=1))  # in time: its slot goes to core 2
        assert [c.index for c in reactor.spawned] == [0, 1, 2]
        reactor.advance(4.9)
        assert hung.life is CoreLife.STARTING and len(reactor.spawned) == 3, "not before"
        reactor.advance(0.1)
        assert hung.life is CoreLife.KILLING and hung.kill_reason == "start"
        assert [c.index for c in reactor.spawned] == [0, 1, 2, 3], "its slot is free at once"
        said = [e for e in events if "was not ready" in e.get("log_format", "")]
        assert [formatEvent(e) for e in said] == [
            "core 1 (pid None) was not ready 10s after it started (REMAP_CORE_START_TIMEOUT); "
            "killing it and starting another"
        ]
        _ended(hung)  # its exit: replaced once a slot is free (cores 2 and 3 are starting)
        assert len(reactor.spawned) == 4 and list(pool._unstarted) == [1]
        pool._core_message(reactor.spawned[2], m.CoreReady(pid=1))
        assert [c.index for c in reactor.spawned] == [0, 1, 2, 3, 1]
        reactor.advance(100)
        assert first.life is CoreLife.IDLE, "a ready core has no deadline"
        assert len([e for e in events if "was not ready" in e.get("log_format", "")]) == 3, (
            "cores 3 and the new 1 never said ready: each killed at its own deadline"
        )
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_cores_killed_at_their_start_deadline_count_as_dying_at_start_and_back_off() -> None:
    """A deadline kill counts as a death before "ready": three in a row and restarts wait
    (1 s, then doubling), one error line says they were not ready in time; a core ready resets
    it; a stop leaves no deadline pending."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = SpawnRecorder()
        pool = CorePool(reactor, 1, lambda r: None, lambda f: None, start_timeout=10.0)
        pool.start()
        for _ in range(2):
            reactor.advance(10)
            _ended(reactor.spawned[-1])
        assert len(reactor.spawned) == 3, "the first two are replaced at once"
        reactor.advance(10)
        assert pool._restart_call is not None, "the third backs off, counted at its deadline"
        _ended(reactor.spawned[-1])
        assert len(reactor.spawned) == 3
        reactor.advance(1)
        assert len(reactor.spawned) == 4, "restarted after 1 s"
        said = [e for e in events if "cores die at start" in e.get("log_format", "")]
        assert [formatEvent(e) for e in said] == [
            "cores die at start (not ready within 10s, killed); retrying in 1s, then up to "
            "every 30s"
        ]
        pool._core_message(reactor.spawned[-1], m.CoreReady(pid=1))
        assert pool._start_deaths == 0 and pool._restart_delay == 1
        _ended(reactor.spawned[-1], signal=None)  # died after ready: replaced, with a deadline
        assert len(reactor.spawned) == 5 and reactor.getDelayedCalls()
        pool.stop()
        assert not reactor.getDelayedCalls(), "a stop cancels the start deadlines"
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_job_without_a_bundle_ends_without_touching_the_disk(monkeypatch) -> None:
    """A job's end removed its directory on the node (an ``rmtree``: an ``lstat`` at least,
    on the reactor) whether or not it had one; only a job that shipped a bundle has one. A
    job the node never loaded is still looked for (nothing tells what it shipped)."""
    import os

    from remap import bundle
    from remap.node import cores

    removed: list[str] = []
    monkeypatch.setattr(cores.shutil, "rmtree", lambda path, **kw: removed.append(str(path)))
    pool = CorePool(SpawnRecorder(), 1, lambda r: None, lambda f: None)
    plain = m.JobLoad(job=1, star=False, timeout=None, reduce=False, payload=b"fn")
    shipped = bundle.wrap(b"fn", bundle.Bundle({"mod_q.py": b"X = 1\n"}, {}))
    assert shipped != b"fn"
    pool.load_job(plain)
    pool.load_job(m.JobLoad(job=2, star=False, timeout=None, reduce=False, payload=shipped))
    pool.drop_job(1)
    assert removed == []
    pool.drop_job(2)
    pool.drop_job(3)
    assert removed == [str(bundle.job_path(os.getpid(), j)) for j in (2, 3)]
