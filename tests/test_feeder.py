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
        self.closed = False

    def put_many(self, blobs: list[bytes], tags: Any = None, counts: Any = None) -> None:
        if blobs:
            self.puts.append(sum(counts) if counts else len(blobs))

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
