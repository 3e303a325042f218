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


def test_progress_line_has_count_percent_rate_and_eta() -> None:
    """The bar shows done/total, the percentage, the rate and an ETA from that rate."""
    now = [100.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0])
    now[0] += 10
    bar.draw(done=480, failed=20, total=1000, note="")
    line = out.getvalue()
    assert "500/1000" in line and "50.0%" in line and "50/s" in line and "ETA 10s" in line
    assert "(20 failed)" in line
