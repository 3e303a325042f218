"""A job's phases: the transition table refuses illegal moves, and a job walks the legal ones.

Pure: fake links and a Clock (the fakes of ``test_scheduler``), no reactor.
"""

from __future__ import annotations

import pytest

from protocol import messages as m
from protocol.options import JobOptions
from remap.server.scheduler import TRANSITIONS, IllegalTransition, JobPhase, JobState
from tests.test_scheduler import FakeConsole, FakeNode, make, run_to_end

FINAL = [JobPhase.DONE, JobPhase.FAILED, JobPhase.KILLED, JobPhase.CANCELLED]


def _job(phase: JobPhase) -> JobState:
    return JobState(id=1, console=None, fn_blob=b"f", options=JobOptions(name="j"), phase=phase)


def test_table_names_every_phase_and_final_phases_have_no_way_out() -> None:
    """Every phase has a row; final phases lead nowhere; DONE is reached only from COMPLETING."""
    assert set(TRANSITIONS) == set(JobPhase)
    for phase in FINAL:
        assert phase.final and not TRANSITIONS[phase]
    assert [p for p, to in TRANSITIONS.items() if JobPhase.DONE in to] == [JobPhase.COMPLETING]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (JobPhase.RECEIVING, JobPhase.DONE),  # done before every argument arrived
        # (COMPLETING → RECEIVING is legal: a resumed job's console sends arguments again)
        (JobPhase.DONE, JobPhase.RECEIVING),  # an ended job takes arguments again
        (JobPhase.DONE, JobPhase.FAILED),  # an ended job ends again
        (JobPhase.KILLED, JobPhase.COMPLETING),
        (JobPhase.CANCELLED, JobPhase.CANCELLED),
    ],
)
def test_illegal_moves_raise(old: JobPhase, new: JobPhase) -> None:
    """A move the table does not list raises and leaves the phase as it was."""
    job = _job(old)
    with pytest.raises(IllegalTransition, match=f"{old.value} → {new.value}"):
        job.move(new)
    assert job.phase is old


def test_legal_moves_follow_the_table() -> None:
    """Every move the table lists is made."""
    for old, targets in TRANSITIONS.items():
        for new in targets:
            job = _job(old)
            job.move(new)
            assert job.phase is new


def test_a_job_walks_receiving_completing_done_and_status_shows_it() -> None:
    """Receiving until args_end, completing until every outcome, then done; status has the phase
    while ``state`` keeps saying running/done as before."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), chunksize=5)
    job = sched.jobs[console.job]
    assert job.phase is JobPhase.RECEIVING
    console.feed()
    assert job.phase is JobPhase.COMPLETING, "every argument sent and args_end with them"
    (info,) = sched.status()[1]
    assert (info.state, info.phase) == ("running", "completing")
    run_to_end([node], [console])
    assert job.phase is JobPhase.DONE
    (info,) = sched.status()[1]
    assert (info.state, info.phase) == ("done", "done")


def test_kill_while_receiving_then_a_late_args_end_changes_nothing() -> None:
    """A job killed while its console still sends ends KILLED; the console's args_end that
    crossed the kill is accepted quietly and does not move the job again."""
    sched, _ = make()
    FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), end=False)
    console.feed()
    sched.kill(console.job)
    job = sched.jobs[console.job]
    assert job.phase is JobPhase.KILLED
    assert sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=console.sent)) is None
    assert job.phase is JobPhase.KILLED and console.done().state == "killed"


@pytest.mark.parametrize("end", ["killed", "failed"])
def test_arguments_that_crossed_the_end_do_not_make_args_end_a_violation(end: str) -> None:
    """A job ends (killed, or failed: no node can run it) while its console still sends:
    the arguments that crossed the end are dropped, and the console's args_end counting them
    is accepted quietly. It was refused ("args_end says 12 arguments, 10 were sent") and the
    server closed the console's connection: every other job on it ended with ConnectionLost
    (an imap whose job failed at once on `requires`, a job killed from another console)."""
    sched, _ = make()
    FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(10), end=False)
    console.feed()
    assert console.sent == 10
    if end == "killed":
        sched.kill(console.job)
    else:
        sched.finish(sched.jobs[console.job], "failed", "no node can run this job")
    assert console.send_args([10, 11]) is None, "arguments after the end are dropped quietly"
    assert sched.args_ended(console.link, m.ArgsEnd(job=console.job, total=12)) is None
    assert sched.jobs[console.job].phase is JobPhase(end)
    (done,) = console.link.of(m.JobDone, console.job)
    assert done.state == end
