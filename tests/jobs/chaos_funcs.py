"""Functions for the chaos tests (tests/test_chaos.py): many tiny calls whose results are checkable.

Shipped by value, so nodes need no copy. Each call sleeps about half a millisecond (a sleep,
not a busy loop, so a two-core test machine is not starved by its own cores) and returns a
value the test can recompute from the index alone.
"""

from __future__ import annotations

import time


def expected(x):
    """The value :func:`tick` returns for ``x``; the test computes it locally to check results."""
    return x * x + 1


def tick(x):
    """A ~0.5 ms call: long enough that a 30,000-argument job lasts seconds, short enough to batch."""
    time.sleep(0.0005)
    return expected(x)
