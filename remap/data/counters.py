"""Counters a task's user code adds to; the task collects and returns them with its result.

A core runs one task at a time, so one module-level table per process is enough; the task
resets it before the user's code runs and takes it after.
"""

from __future__ import annotations

from collections import Counter

_current: Counter[str] = Counter()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``name`` of the running task (shown in status and the result)."""
    _current[str(name)] += n


def take() -> dict[str, int]:
    """The counts since the last take, and a fresh table."""
    global _current
    counts, _current = _current, Counter()
    return dict(counts)
