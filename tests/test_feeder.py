"""The caller's side of a map: how pickled arguments are handed to the reactor (no processes)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from protocol import messages as m
from remap.api import _Feeder


class RecordingStream:
    """A JobStream stand-in: records each ``put_many`` (one wake-up of the reactor each)."""

    def __init__(self, total: int | None) -> None:
        self.session = SimpleNamespace(
            params=SimpleNamespace(gang=False, chunksize=None), total_hint=total, group_bytes=0
        )
        self.unsent_bytes = 0
        self.puts: list[int] = []
        self.groups: list[int] = []
        self.closed = False

    def put_many(self, blobs: list[bytes], tags: Any = None, counts: Any = None) -> None:
        if blobs:
            self.puts.append(sum(counts) if counts else len(blobs))
            self.groups += counts or []

    def close_input(self) -> None:
        self.closed = True


def test_the_first_window_is_queued_before_the_rest_of_a_map_is_pickled() -> None:
    """A 10^4-call map queues its first window (what a console may send with the submit) alone,
    then pickles the rest: the submit no longer waits for every pickle of the job."""
    stream = RecordingStream(10_000)
    feeder = _Feeder(stream, iter(range(10_000)), None, star=False, fn_name="f")  # type: ignore[arg-type]
    feeder.top_up(0)
    assert stream.closed and sum(stream.puts) == 10_000
    assert len(stream.puts) >= 2, stream.puts
    assert m.INITIAL_WINDOW <= stream.puts[0] < m.INITIAL_WINDOW + 64, stream.puts


def test_a_large_map_travels_in_groups_of_128() -> None:
    """2·10^5 trivial calls: per-group costs (a pickle, a sizes entry, a core's loop turn and
    its slot mark) halve against groups of 64; the first argument still goes alone (its size
    sizes the groups) and a whole group fits the first window beside it."""
    stream = RecordingStream(200_000)
    feeder = _Feeder(stream, iter(range(200_000)), None, star=False, fn_name="f")  # type: ignore[arg-type]
    feeder.top_up(0)
    assert stream.closed and sum(stream.groups) == 200_000
    assert stream.groups[0] == 1 and set(stream.groups[1:-1]) == {128}, stream.groups[:4]
    assert 1 + 128 <= m.INITIAL_WINDOW


def test_a_generator_travels_in_argument_groups_too() -> None:
    """2·10^5 arguments from a generator (no length): a few thousand pickles and puts, not one
    pickle per argument; the groups ramp up from one argument (its calls spread over the cores
    first) to 128. Before, each argument was pickled alone: ~10x the caller's CPU of a list."""
    stream = RecordingStream(None)
    feeder = _Feeder(stream, (x for x in range(200_000)), None, star=False, fn_name="f")  # type: ignore[arg-type]
    feeder.top_up(0)
    assert stream.closed and sum(stream.groups) == 200_000
    assert len(stream.groups) < 200_000 // 50 and len(stream.puts) < 200, len(stream.groups)
    assert stream.groups[0] == 1 and max(stream.groups) == 128, stream.groups[:4]


def test_a_slow_generators_arguments_are_queued_as_they_come() -> None:
    """A generator pausing between arguments (over GROUP_WAIT): each argument it gave is queued
    before the next is asked for, the first at once. Before, they waited for 1,024 more."""
    stream = RecordingStream(None)
    queued_before: list[int] = []
    pace = threading.Event()  # never set: its wait paces the generator

    def source() -> Iterator[int]:
        for i in range(6):
            queued_before.append(sum(stream.puts))
            if i:
                pace.wait(0.02)
            yield i

    feeder = _Feeder(stream, source(), None, star=False, fn_name="f")  # type: ignore[arg-type]
    feeder.top_up(0)
    assert queued_before == [0, 1, 2, 3, 4, 5] and sum(stream.groups) == 6


def test_a_generator_that_fails_after_a_partial_group_queues_what_came_before() -> None:
    """Pool style (defer_errors): 1,000 arguments in groups, then the generator raises; the
    open group goes too, and the error waits for its position."""
    stream = RecordingStream(None)

    def source() -> Iterator[int]:
        yield from range(1000)
        raise ValueError("bad input")

    feeder = _Feeder(stream, source(), None, star=False, fn_name="f", defer_errors=True)  # type: ignore[arg-type]
    feeder.top_up(0)
    assert sum(stream.groups) == 1000 and len(stream.groups) < 1000
    assert isinstance(feeder.error, ValueError) and feeder.done and stream.closed


@pytest.mark.parametrize("limit", [20, 1000])
def test_a_generator_stays_within_the_buffer(limit: int) -> None:
    """imap's buffersize bounds a generator's groups: never more outstanding than ``limit``."""
    stream = RecordingStream(None)
    feeder = _Feeder(stream, iter(range(100_000)), limit, star=False, fn_name="f")  # type: ignore[arg-type]
    feeder.top_up(0)
    assert feeder.put == limit == sum(stream.puts) and not stream.closed
    feeder.top_up(limit)
    assert feeder.put == 2 * limit == sum(stream.puts)


def test_a_list_of_numbers_is_pickled_without_a_python_call_each() -> None:
    """A map of 300 numbers (a job of its own, not grouped) pickles each with ``pickle.dumps``
    straight from the feeding loop: no Python function entered per argument (one per argument
    before: ``_dumps_plain``, 90,000 calls for 300 such maps); the pickles are plain pickle's."""
    import pickle

    from tests.test_hop_costs import entered

    streams: list[Any] = []

    class Keeping(RecordingStream):
        def put_many(self, blobs: list[bytes], tags: Any = None, counts: Any = None) -> None:
            super().put_many(blobs, tags, counts)
            self.blobs = getattr(self, "blobs", []) + list(blobs)

    def feed() -> None:
        stream = Keeping(300)
        streams.append(stream)
        _Feeder(stream, iter(range(300)), None, star=False, fn_name="f").top_up(0)  # type: ignore[arg-type]

    python, _ = entered(feed)
    stream = streams[-1]
    assert stream.closed and stream.blobs == [pickle.dumps(x, 5) for x in range(300)]
    assert python <= 10, python  # set-up and the stand-in stream (307 before: one per argument)
