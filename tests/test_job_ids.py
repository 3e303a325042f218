"""Job ids never repeat across server restarts; ``attach`` to a job the server does not know
says so and exits non-zero (issue 9, item 3)."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from twisted.internet.task import Clock

from protocol import messages as m
from remap.server.scheduler import JOB_ID_EPOCH, first_job_id
from remap.server.service import RemapServerFactory, ServerConnection
from tests.cluster_harness import jobs_function, write_job

from .test_server_robustness import _Link

KEY = b"job id secret"


def _submit(factory: RemapServerFactory) -> int:
    link = _Link()
    handler = ServerConnection(factory)
    handler.role = "console"
    handler.message_received(link, m.Submit(id=1, payload=b"fn", name="j"))
    (submitted,) = [x for x in link.sent if isinstance(x, m.Submitted)]
    return submitted.job


def test_ids_of_a_restarted_server_follow_every_id_of_the_run_before() -> None:
    """A server started one second after another (a quick restart) numbers its jobs after
    all of the first run's, even after a thousand jobs; ids are consecutive within a run."""
    start = JOB_ID_EPOCH + 86_400 * 300
    first = RemapServerFactory(Clock(), KEY, max_frame=1 << 20, job_ids_from=first_job_id(start))
    ids = [_submit(first) for _ in range(1000)]
    assert ids == list(range(ids[0], ids[0] + 1000))
    second = RemapServerFactory(
        Clock(), KEY, max_frame=1 << 20, job_ids_from=first_job_id(start + 1.0)
    )
    assert _submit(second) > ids[-1]


def test_a_real_server_does_not_start_its_ids_at_one() -> None:
    """Without an explicit start the ids come from the wall clock, not from 1."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20)
    assert _submit(factory) >= first_job_id() - 10_000 > 1


def test_attach_to_an_id_of_an_earlier_run_says_so() -> None:
    """``attach`` to an id below this run's first id names the restart; an unknown id says
    unknown; neither attaches anything."""
    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20, job_ids_from=5000)
    handler, link = ServerConnection(factory), _Link()
    handler.role = "console"
    for job, words in ((7, "earlier run"), (9999, "unknown")):
        handler.message_received(link, m.Attach(id=job, job=job))
        error = link.sent[-1]
        assert isinstance(error, m.Error) and error.code == "not-found", error
        assert f"no job {job}" in error.message and words in error.message, error.message


def test_attach_to_a_finished_attached_job_says_its_results_went_to_its_console() -> None:
    """An attached job keeps no results on the server: ``attach`` to it once it finished
    said nothing and exited 0 (an empty list with --json), as if it had no results; it is
    refused saying where they went. A finished detached job still replays."""
    from tests.test_scheduler import FakeConsole, FakeNode, run_to_end

    factory = RemapServerFactory(Clock(), KEY, max_frame=1 << 20, job_ids_from=5000)
    node = FakeNode(factory.scheduler, "n", cores=2)
    attached = FakeConsole(factory.scheduler, range(6), chunksize=3)
    detached = FakeConsole(factory.scheduler, range(6), chunksize=3, detach=True)
    for console in (attached, detached):
        console.feed()
    run_to_end([node], [attached, detached])
    handler, link = ServerConnection(factory), _Link()
    handler.role = "console"
    handler.message_received(link, m.Attach(id=1, job=attached.job))
    error = link.sent[-1]
    assert isinstance(error, m.Error) and error.code == "not-found", error
    assert "ran attached: its results went to the console that ran it" in error.message
    assert not any(isinstance(sent, m.Results) for sent in link.sent)
    handler.message_received(link, m.Attach(id=2, job=detached.job))
    assert isinstance(link.sent[-1], m.Ok), link.sent[-1]
    assert sum(len(r.answered) for r in link.sent if isinstance(r, m.Results)) == 6


@pytest.mark.slow
@pytest.mark.parametrize("journal", ["off", "on"])
def test_attach_after_a_server_restart_never_returns_another_jobs_results(
    make_cluster: Any, tmp_path, journal: str
) -> None:
    """A detached job finishes; the server is killed and restarted and runs another detached
    job. The new job's id differs from the old one, and ``attach OLD`` never prints the new
    job's results: without a journal it exits non-zero saying the server has no such job; with
    the journal (the default) it returns the old job's own results. ``attach NEW`` returns the
    new job's results."""
    c = make_cluster(
        1,
        cores=1,
        heartbeat=1.0,  # nothing waits on one: the killed server's connections close at once
        server_env={"REMAP_JOURNAL": journal, "REMAP_STATE_DIR": str(tmp_path / "state")},
    )

    def detached(name: str, start: int) -> int:
        job = write_job(
            tmp_path / f"{name}.yaml",
            {
                "name": name,
                "function": jobs_function("fail_funcs", "square"),
                "args_range": [start, start + 5],
            },
        )
        done = c.assert_ok(c.console("compute", job, "--detach", "--json", timeout=20))
        return json.loads(done.stdout)["job"]

    old = detached("old", 0)
    c.assert_ok(c.console("attach", old, "--json", timeout=20))
    c.restart_server(signal.SIGKILL, timeout=30)
    new = detached("new", 100)
    assert new != old
    stale = c.console("attach", old, "--json", timeout=20)
    assert "10000" not in stale.stdout  # 100 * 100: none of the new job's results
    if journal == "off":
        assert stale.returncode != 0, c.explain(stale)
        assert f"no job {old}" in stale.stderr and "Traceback" not in stale.stderr, stale.stderr
    else:
        c.assert_ok(stale)
        assert json.loads(stale.stdout) == [x * x for x in range(5)], stale.stdout
    fresh = c.assert_ok(c.console("attach", new, "--json", timeout=20))
    assert json.loads(fresh.stdout) == [x * x for x in range(100, 105)]
