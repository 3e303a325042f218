"""Packing many pickles into one payload and back, by offsets (never by delimiter)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Any

import cloudpickle

PICKLE_PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Plain pickle for data (fast); cloudpickle only for what plain pickle refuses."""
    try:
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return cloudpickle.dumps(obj, PICKLE_PROTOCOL)


def pack(objs: Iterable[Any]) -> tuple[list[int], bytes]:
    """Pickle each object; return (sizes, concatenated payload)."""
    blobs = [dumps(o) for o in objs]
    return [len(b) for b in blobs], b"".join(blobs)


def split(sizes: list[int], payload: bytes | memoryview) -> Iterator[memoryview]:
    """Yield each blob of a payload as a zero-copy view."""
    view = memoryview(payload)
    start = 0
    for end in accumulate(sizes):
        yield view[start:end]
        start = end
