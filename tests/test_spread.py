"""Slow calls on real cores: a job's first calls spread over every core, and a batch's results
stream back as they complete. Asserts on structure (which core ran what, what arrived before
what started), never on elapsed time."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest

import remap
from remap.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

CALL_SECONDS = 0.5


def timed_call(x: int) -> tuple[int, int, float, float]:
    """Sleep like a slow function; say which core ran it and when (wall clock, one machine)."""
    started = time.time()
    time.sleep(CALL_SECONDS)
    return x, os.getpid(), started, time.time()


@pytest.fixture(scope="module")
def two_cores() -> Iterator[remap.Cluster]:
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


def test_eight_slow_submits_run_four_on_each_core(two_cores: remap.Cluster) -> None:
    """Eight submits of a 0.5 s call on 2 cores: both cores start at once and each runs about
    four (about 2 s in all, not 4 s): before call times are known each call travels alone.

    (One stall of half a second on a loaded machine may move one call: hence not exactly 4.)
    """
    futures = [two_cores.submit(timed_call, i) for i in range(8)]
    calls = [f.result(timeout=60) for f in futures]
    assert sorted(c[0] for c in calls) == list(range(8))
    per_core = Counter(c[1] for c in calls)
    assert len(per_core) == 2 and max(per_core.values()) <= 5, per_core
    first_two = sorted(calls, key=lambda c: c[2])[:2]
    assert first_two[0][1] != first_two[1][1], "the first two calls ran on one core"


def test_results_of_a_batch_stream_back_before_it_ends(two_cores: remap.Cluster) -> None:
    """With batches of 4 (one per core), the first results reach the caller before the last
    calls of those batches start: the core sends finished calls while the batch runs."""
    arrived: list[float] = []
    calls = []
    for call in two_cores.imap_unordered(timed_call, range(8), chunksize=4):
        arrived.append(time.time())
        calls.append(call)
    assert Counter(c[1] for c in calls).most_common(1)[0][1] == 4
    last_start = max(c[2] for c in calls)
    assert arrived[0] < last_start, "the first result waited for the whole batch"
