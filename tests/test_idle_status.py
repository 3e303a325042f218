"""A job its console keeps open with nothing to do (an Executor's between calls, kept up to a
minute for an interactive session's next call) is said idle in ``status``: the ``idle`` field
of the job's record (``status --json``, the HTTP API) and ``idle, kept open for reuse`` in the
console's table, while ``state`` stays ``running`` for scripts and older consoles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import remap
from protocol.status import JobStatus, read_status
from remap.console import render
from remap.server.http import views
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, held_until
from tests.test_render import _job
from tests.test_scheduler import FakeConsole, FakeNode, make


def idle_of(sched: Any, job: int) -> bool:
    (status,) = sched.job_statuses([sched.jobs[job]])
    return status.idle


def test_a_job_is_idle_only_while_open_with_nothing_queued_or_running() -> None:
    """The scheduler says idle exactly when the job may get more arguments (no args_end) and
    has none queued or in flight: not while a task runs or arguments wait, again once the
    results are in, never after its last argument or once its console is gone."""
    sched, _ = make()
    node = FakeNode(sched, "n1", cores=1)
    console = FakeConsole(sched, [1, 2, 3], end=False)
    assert idle_of(sched, console.job), "a job with no argument yet has nothing to do"
    console.feed()
    assert node.held(console.job) and not idle_of(sched, console.job)
    while node.answer_all(console.job):
        pass
    (status,) = sched.job_statuses([sched.jobs[console.job]])
    assert status.idle and status.state == "running" and status.done == 3
    assert status.shown_state == "idle, kept open for reuse"

    console.values.append(4)
    console.feed()  # the next call of an interactive session: busy again
    assert not idle_of(sched, console.job)
    node.answer_all(console.job)
    assert idle_of(sched, console.job)
    sched.console_lost(console.link)  # nobody can send it more: not "kept open" any more
    assert not idle_of(sched, console.job)

    ended = FakeConsole(sched, [5], name="ended")
    ended.feed()  # all its arguments and args_end
    node.answer_all(ended.job)
    assert not idle_of(sched, ended.job)
    assert sched.jobs[ended.job].state == "done"


def test_idle_travels_in_the_status_reply_and_old_servers_read_as_not_idle() -> None:
    """The field is in the record's map (what ``status --json`` and the HTTP API print); a
    map from a server that predates it has no such key and reads as a running job."""
    record = _job(idle=True)
    assert record.to_wire()["idle"] is True
    assert JobStatus.from_wire(record.to_wire()) == record
    old = _job().to_wire()
    assert "idle" not in old
    assert JobStatus.from_wire(old).shown_state == "running"
    assert views.job_view(record)["idle"] is True


def test_the_console_table_and_head_say_idle() -> None:
    """``status``/``jobs``: the STATE column says the job is idle and kept open; the head line
    counts it among the running jobs and says how many of them are idle."""
    busy, idle = _job(id=1, idle=False), _job(id=2, idle=True, running=0)
    rows = render.jobs_table([busy, idle]).splitlines()[2:]
    assert " running " in rows[0] and "idle" not in rows[0]
    assert " idle, kept open for reuse " in rows[1]
    head = render.status_text([], [busy, idle]).splitlines()[0]
    assert head == "0 nodes, 0/0 cores busy, 2 jobs running (1 idle), 2 tasks/s"
    done = _job(id=3, state="done", idle=True)  # a finished job is never said idle
    assert render.jobs_table([done]).splitlines()[2].split()[2] == "done"


def executor_job(status: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in status["jobs"] if j["name"].startswith("submit:")]
    return job


@pytest.mark.slow
def test_an_executors_kept_job_is_idle_in_status_and_busy_while_it_runs(tmp_path: Path) -> None:
    """A real server and node: an Executor's call runs (the job is running, not idle); once
    its result is back the job stays open for the next call and ``status`` (text and
    ``--json``) says it is idle and kept open for reuse."""
    release = tmp_path / "release"
    with ProcessCluster(tmp_path, nodes=[NodeSpec(cores=1)]) as procs:
        with remap.Executor(procs.address, secret=procs.secret, settings=Settings()) as ex:
            future = ex.submit(held_until, str(release), 1)
            try:
                busy = procs.wait_for(
                    lambda: next((j for j in procs.status()["jobs"] if j["running"] == 1), None),
                    60,
                    "the call to run",
                )
                assert busy["idle"] is False and busy["state"] == "running", busy
            finally:
                release.touch()
            assert future.result(timeout=60) == 1

            def kept_idle() -> dict[str, Any] | None:
                job = executor_job(procs.status())
                return job if job["idle"] else None

            job = procs.wait_for(kept_idle, 60, "the kept job to be idle")
            assert job["state"] == "running" and job["queued"] == 0 and job["running"] == 0
            text = procs.assert_ok(procs.console("status", timeout=60)).stdout
            assert "idle, kept open for reuse" in text, text
            assert "(1 idle)" in text.splitlines()[0], text
            shown = json.loads(procs.assert_ok(procs.console("status", "--json")).stdout)
            assert executor_job(shown)["idle"] is True
            _, jobs, _ = read_status(shown)
            assert [j.shown_state for j in jobs] == ["idle, kept open for reuse"]
