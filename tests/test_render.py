"""What the console shows a person: durations and the progress line."""

from __future__ import annotations

import io
from typing import Any

import pytest

from protocol.status import JobStatus
from remap.console.render import Progress, fmt_duration, jobs_table, plural


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (0.4, "<1s"), (1.9, "1s"), (59, "59s"), (61, "1m01s"), (3725, "1h02m")],
)
def test_durations(seconds: float, shown: str) -> None:
    """Durations read naturally; less than a second left is not shown as 0s."""
    assert fmt_duration(seconds) == shown


def drawn(after: float, done: int, failed: int, total: int) -> str:
    """The progress line drawn ``after`` seconds from the start."""
    now = [100.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0])
    now[0] += after
    bar.draw(done=done, failed=failed, total=total, note="")
    return out.getvalue()


def test_progress_line_has_count_percent_rate_and_eta() -> None:
    """The bar shows done/total, the percentage, the rate and an ETA from that rate."""
    line = drawn(10, 480, 20, 1000)
    assert "500/1000" in line and "50.0%" in line and "50/s" in line and "ETA 10s" in line
    assert "(20 failed)" in line


def test_a_slow_jobs_progress_rate_is_not_zero() -> None:
    """4 of 21 tasks done in 10 s (a data job's map phase) draws 0.4/s, not 0/s."""
    line = drawn(10, 4, 0, 21)
    assert " 0.4/s ETA " in line, line


def test_no_eta_before_a_rate_is_known() -> None:
    """Before the first result there is no rate, so the ETA is unknown, not "0s"."""
    line = drawn(3, 0, 0, 1000)
    assert "0/1000" in line and "ETA ?" in line and "ETA 0s" not in line


def _job(**fields: Any) -> JobStatus:
    """A function job's status record: the fields these tests do not care about filled in."""
    base = {"id": 1, "name": "j", "state": "running", "phase": "receiving", "mode": "object"}
    base |= {"group": None, "total": 9, "received": 1, "queued": 0, "running": 1, "done": 1}
    base |= {"failed": 0, "rate": 1.0, "elapsed": 1.0, "waiting": "", "detached": False}
    base |= {"output": None, "attached": True, "message": "", "owner": None}
    return JobStatus(**(base | fields))


def test_the_job_table_shows_a_known_total() -> None:
    """A job whose total the server knows shows it, one still receiving shows what came so far."""
    text = jobs_table([_job(id=1, total=1000, received=256), _job(id=2, total=None, received=256)])
    assert " 1000 " in text and " 256+ " in text


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        (0.0, "0/s"),
        (0.04, "0/s"),
        (2.0, "2/s"),
        (0.4, "0.4/s"),
        (9.9, "9.9/s"),
        (9.96, "10/s"),
        (1234.5, "1,234/s"),
    ],
)
def test_a_slow_jobs_rate_is_not_shown_as_zero(rate: float, shown: str) -> None:
    """A job of slow tasks (a data job's map phase) shows its rate with a tenth below 10 a
    second: it showed ``0/s`` at 0.4 tasks a second, as if stalled."""
    assert f" {shown} " in jobs_table([_job(rate=rate)])


def test_the_job_table_shows_cores_share_and_weight() -> None:
    job = _job(cores=4, share=0.5, weight=2.0, max_cores=6, min_cores=0)
    assert "4 (50% w2 max 6)" in jobs_table([job])
    assert jobs_table([_job()]).splitlines()[2].endswith(" -"), "no share said: a driver's job"


def test_an_ended_job_has_no_share_to_show() -> None:
    """A finished or killed job holds no cores: its CORES cell is ``-``, not ``0 (- w1)``."""
    for state in ("done", "failed", "killed"):
        job = _job(state=state, cores=0, share=0.0, weight=1.0, max_cores=None, min_cores=0)
        assert jobs_table([job]).splitlines()[2].endswith(" -"), state


def test_only_running_jobs_list_their_counters_under_the_status() -> None:
    """Every finished map and reduce phase kept its ``job N counters: ...`` line under the
    status table (up to 50 finished jobs' worth); only running jobs' lines are shown."""
    from remap.console.render import file_job_lines

    done = _job(id=1, state="done", counters={"map_records_in": 4})
    running = _job(id=2, counters={"map_records_in": 7})
    assert file_job_lines([], [done, running]) == ["job 2 counters: map_records_in 7"]


def test_counts_are_said_in_words_that_agree() -> None:
    """A file job's closing line said "9 results, 1 errors written to ..."."""
    assert [plural(n, "error") for n in (0, 1, 2, 1000)] == [
        "0 errors",
        "1 error",
        "2 errors",
        "1000 errors",
    ]
