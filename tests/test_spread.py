"""Slow calls on real cores: a job's first calls spread over every core, and a batch's results
stream back as they complete. Asserts on structure (which core ran what, what arrived before
what started), never on elapsed time."""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import remap
from remap.settings import Settings
from tests.cluster_harness import held_until, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def held_in_turn(where: str, x: int) -> tuple[int, int]:
    """Say "started" (with this core's pid) in a file, then hold the core until the test
    releases this call (a minute at most), and 0.2 s more: every call takes longer than
    ``TARGET_BATCH_SECONDS``, so the server keeps sending one call per batch once it has
    measured them (a call released at once measured a few ms, and the rest went as one
    batch to one core). Say which call and core it was."""
    Path(where, f"started-{x}").write_text(str(os.getpid()))
    held_until(str(Path(where, f"release-{x}")), 1)
    time.sleep(0.2)
    return x, os.getpid()


def start_and_hold(where: str, x: int, release: str) -> int:
    """Say "started" with a file, then hold the core until ``release`` exists (a minute at most)."""
    Path(where, f"started-{x}").touch()
    held_until(release, 1)
    return os.getpid()


@pytest.fixture(scope="module")
def two_cores() -> Iterator[remap.Cluster]:
    with remap.connect(cores=2, settings=Settings()) as cluster:
        yield cluster


def test_two_submits_start_at_once_on_both_cores(two_cores: remap.Cluster, tmp_path: Path) -> None:
    """Two submits of a call that holds its core until the test releases it: both start, each
    on a core of its own, before either is released (had the second travelled in the first's
    batch, or waited for its core, it could not start: the wait would fail at its deadline)."""
    release = tmp_path / "release"
    futures = [two_cores.submit(start_and_hold, str(tmp_path), x, str(release)) for x in range(2)]
    try:
        wait_for(
            lambda: all((tmp_path / f"started-{x}").exists() for x in range(2)),
            60,
            "both held calls to start",
        )
    finally:
        release.touch()
    assert len({f.result(timeout=60) for f in futures}) == 2


def test_eight_slow_submits_run_four_on_each_core(two_cores: remap.Cluster, tmp_path: Path) -> None:
    """Eight submits of a call that holds its core until the test releases it: the test lets
    them run two at a time, and each pair runs one call on each core, so each core runs four
    (before call times are known each call travels alone; that the first two start at once is
    the test above's). Had calls travelled in batches of more than four, or all waited for one
    core, a pair would never start (the wait fails at its deadline).

    No clock: 0.5 s calls counted per core allowed one stall of half a second on a loaded
    machine to move a call, not two."""
    from remap.server.scheduler import TARGET_BATCH_SECONDS

    assert TARGET_BATCH_SECONDS < 0.2, "held_in_turn's calls must outlast a batch's target"
    futures = [two_cores.submit(held_in_turn, str(tmp_path), i) for i in range(8)]
    started: list[int] = []
    try:
        for pair in range(4):

            def two_more(pair: int = pair) -> list[int] | None:
                now = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("started-*"))
                return now if len(now) == 2 * (pair + 1) else None

            now = wait_for(two_more, 60, f"pair {pair + 1} of the held calls to start")
            running = [x for x in now if x not in started]
            pids = {(tmp_path / f"started-{x}").read_text() for x in running}
            assert len(pids) == 2, f"calls {running} ran on one core: {pids}"
            started = now
            for x in running:
                (tmp_path / f"release-{x}").touch()
    finally:
        for x in range(8):
            (tmp_path / f"release-{x}").touch()
    calls = [f.result(timeout=60) for f in futures]
    assert sorted(c[0] for c in calls) == list(range(8))
    per_core = Counter(c[1] for c in calls)
    assert sorted(per_core.values()) == [4, 4], per_core


def first_then_held(x: int, release: str) -> tuple[int, int, bool]:
    """The first call of each batch of 4 sleeps 0.2 s (longer than a core waits before it
    sends what a batch finished: ``STREAM_SECONDS``, on the same wall clock however loaded
    the machine); the others hold their core until the test has a result (``release``), 15 s
    at most, and say whether it came in time."""
    if x % 4 == 0:
        time.sleep(0.2)
    deadline = time.monotonic() + 15
    while x % 4 and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x, os.getpid(), os.path.exists(release)


def test_results_of_a_batch_stream_back_before_it_ends(
    two_cores: remap.Cluster, tmp_path: Path
) -> None:
    """With batches of 4 (one per core), the first result reaches the caller while the rest
    of its batch still runs: the batch's other calls are held until the caller has a result
    (a core that answered only at the batch's end would hold them to their deadline).
    No clock: a wall-clock version (first arrival before the last 0.5 s call started) had
    about a second of margin against a loaded machine's delays."""
    from remap.node.core import STREAM_SECONDS

    assert STREAM_SECONDS < 0.2, "first_then_held's first call must outlast STREAM_SECONDS"
    release = tmp_path / "release"
    calls = []
    try:
        for call in two_cores.imap_unordered(
            functools.partial(first_then_held, release=str(release)), range(8), chunksize=4
        ):
            release.touch()
            calls.append(call)
    finally:
        release.touch()
    assert sorted(c[0] for c in calls) == list(range(8))
    assert Counter(c[1] for c in calls).most_common(1)[0][1] == 4
    late = [x for x, _, released in calls if x % 4 and not released]
    assert not late, f"calls {late} ran to their deadline: the first result waited for the batch"
