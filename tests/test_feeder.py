"""The caller's side of a map: how pickled arguments are handed to the reactor (no processes)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from protocol import messages as m
from remap.api import _Feeder


class RecordingStream:
    """A JobStream stand-in: records each ``put_many`` (one wake-up of the reactor each)."""

    def __init__(self, total: int) -> None:
        self.session = SimpleNamespace(
            params=SimpleNamespace(gang=False, chunksize=None), total_hint=total
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
