"""Arguments travelling together: segments of a job's queue, cut and merged without copies.

A segment is a run of argument indices with their pickled sizes and one payload; the
queue of a job is a deque of them. Payloads are memoryviews, so cutting copies nothing.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import accumulate

Indices = range | list[int]


@dataclass(slots=True)
class Segment:
    """Arguments travelling together: their indices, pickled sizes and payload."""

    indices: Indices
    sizes: list[int]
    payload: memoryview
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.sizes)


def _merge_indices(parts: list[Indices]) -> Indices:
    if all(type(p) is range for p in parts):
        merged: list[range] = [parts[0]]  # type: ignore[list-item]
        for p in parts[1:]:
            last = merged[-1]
            if p.start == last.stop and p.step == 1 and last.step == 1:  # type: ignore[union-attr]
                merged[-1] = range(last.start, p.stop)  # type: ignore[union-attr]
            else:
                break
        else:
            return merged[0]
    return [i for p in parts for i in p]


def take_from(queue: deque[Segment], n: int, max_bytes: int) -> Segment:
    """Remove up to ``n`` arguments and ``max_bytes`` (but at least one argument) from the queue.

    Retried segments (attempts > 0) never merge with others: a suspect travels alone.
    Payloads are memoryviews, so cutting a segment copies nothing.
    """
    parts: list[Segment] = []
    count = nbytes = 0
    while queue and count < n:
        seg = queue[0]
        if parts and (seg.attempts or parts[0].attempts):
            break
        room, budget = n - count, max_bytes - nbytes
        if len(seg) <= room and len(seg.payload) <= budget:
            parts.append(queue.popleft())
            count += len(seg)
            nbytes += len(seg.payload)
            continue
        ends = list(accumulate(seg.sizes[:room]))
        k = bisect_right(ends, budget)
        if k == 0:
            if parts:
                break
            k = 1
        if k == len(seg):  # one argument over max_bytes, travelling alone: leave no empty rest
            parts.append(queue.popleft())
            count += k
            break
        cut = ends[k - 1]
        parts.append(Segment(seg.indices[:k], seg.sizes[:k], seg.payload[:cut], seg.attempts))
        queue[0] = Segment(seg.indices[k:], seg.sizes[k:], seg.payload[cut:], seg.attempts)
        count += k
        break
    if len(parts) == 1:
        return parts[0]
    return Segment(
        _merge_indices([p.indices for p in parts]),
        [s for p in parts for s in p.sizes],
        memoryview(b"".join(p.payload for p in parts)),
        0,
    )


def cut(seg: Segment, a: int, b: int) -> Segment:
    """Arguments ``a`` to ``b`` of a segment (a view: the payload is not copied)."""
    start = sum(seg.sizes[:a])
    end = start + sum(seg.sizes[a:b])
    return Segment(seg.indices[a:b], seg.sizes[a:b], seg.payload[start:end], seg.attempts)
