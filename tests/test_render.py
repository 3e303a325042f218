"""What the console shows a person: durations and the progress line."""

from __future__ import annotations

import io

import pytest

from remap.console.render import Progress, fmt_duration


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


def test_no_eta_before_a_rate_is_known() -> None:
    """Before the first result there is no rate, so the ETA is unknown, not "0s"."""
    line = drawn(3, 0, 0, 1000)
    assert "0/1000" in line and "ETA ?" in line and "ETA 0s" not in line


def test_the_job_table_shows_a_known_total() -> None:
    """A job whose total the server knows shows it, one still receiving shows what came so far."""
    from remap.console.render import jobs_table

    base = {"name": "j", "state": "running", "mode": "object", "done": 1, "failed": 0}
    base |= {"running": 1, "rate": 1.0, "waiting": "", "received": 256}
    text = jobs_table([{**base, "id": 1, "total": 1000}, {**base, "id": 2, "total": None}])
    assert " 1000 " in text and " 256+ " in text


def test_the_job_table_shows_cores_share_and_weight() -> None:
    from remap.console.render import jobs_table

    job = {"id": 1, "name": "j", "state": "running", "mode": "object", "done": 1, "failed": 0}
    job |= {"running": 1, "rate": 1.0, "waiting": "", "received": 1, "total": 9}
    job |= {"cores": 4, "share": 0.5, "weight": 2.0, "max_cores": 6}
    assert "4 (50% w2 max 6)" in jobs_table([job])
