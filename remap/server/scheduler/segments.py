"""Segments of a job's queue: runs of argument indices with their pickles' sizes and one
payload (a memoryview, so cutting copies nothing). With argument groups a pickle holds several
arguments: cuts then fall between pickles, except for retries inside a group (``skip``/``tail``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import accumulate

Indices = range | list[int]
#: a batch takes arguments from a second segment (joining their payloads) only while what it
#: holds is smaller than this: large arguments travel as views of the message they came in
MERGE_MAX_BYTES = 256 * 1024


@dataclass(slots=True)
class Segment:
    """Arguments travelling together: their indices, pickles and payload.

    With ``groups`` pickle ``i`` is a list of ``groups[i]`` arguments; the segment is then the
    run of arguments that starts ``skip`` arguments into the first pickle and ends ``tail``
    before the end of the last (both zero except for retries inside a group).
    """

    indices: Indices
    sizes: list[int]
    payload: memoryview
    attempts: int = 0
    groups: list[int] | None = None
    skip: int = 0
    tail: int = 0
    #: travels alone without having failed (its batch's results were too large for a frame)
    solo: bool = False

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def alone(self) -> bool:
        """Travels alone: a retried argument, or part of a group (never merged with others)."""
        return bool(self.attempts or self.skip or self.tail or self.solo)


def _merge_indices(parts: list[Indices]) -> Indices:
    if all(type(p) is range for p in parts):
        run: range = parts[0]  # type: ignore[assignment]
        for p in parts[1:]:
            if p.start != run.stop or p.step != 1 or run.step != 1:  # type: ignore[union-attr]
                break
            run = range(run.start, p.stop)  # type: ignore[union-attr]
        else:
            return run
    return [i for p in parts for i in p]


def _pickles_fitting(seg: Segment, room: int, budget: int) -> int:
    """How many of the segment's first whole pickles hold at most ``room`` arguments and
    ``budget`` bytes."""
    if seg.groups is None:
        return bisect_right(list(accumulate(seg.sizes[:room])), budget)
    count = nbytes = 0
    last = len(seg.sizes) - 1
    for k, (n, size) in enumerate(zip(seg.groups, seg.sizes)):
        count += n - (seg.skip if k == 0 else 0) - (seg.tail if k == last else 0)
        nbytes += size
        if count > room or nbytes > budget:
            return k
    return len(seg.sizes)


def _split(seg: Segment, k: int) -> tuple[Segment, Segment]:
    """The segment's first ``k`` pickles and the rest (a cut at a pickle boundary)."""
    at = sum(seg.sizes[:k])
    if seg.groups is None:
        return (
            Segment(seg.indices[:k], seg.sizes[:k], seg.payload[:at], seg.attempts),
            Segment(seg.indices[k:], seg.sizes[k:], seg.payload[at:], seg.attempts),
        )
    h = sum(seg.groups[:k]) - seg.skip
    head = Segment(
        seg.indices[:h], seg.sizes[:k], seg.payload[:at], seg.attempts, seg.groups[:k], seg.skip
    )
    rest = Segment(
        seg.indices[h:], seg.sizes[k:], seg.payload[at:], seg.attempts, seg.groups[k:], 0, seg.tail
    )
    return head, rest


def cut(seg: Segment, a: int, b: int) -> Segment:
    """Arguments ``a .. b-1`` of a segment (positions count arguments), copying no payload.

    Inside an argument group the slice keeps the group's whole pickle and says which of its
    arguments run (``skip``, ``tail``): the server never unpickles.
    """
    if seg.groups is None:
        start = sum(seg.sizes[:a])
        end = start + sum(seg.sizes[a:b])
        return Segment(seg.indices[a:b], seg.sizes[a:b], seg.payload[start:end], seg.attempts)
    if b <= a:
        return Segment(seg.indices[a:a], [], seg.payload[:0], seg.attempts, [])
    lo, hi = seg.skip + a, seg.skip + b  # positions in the pickles' arguments
    first = last = -1
    begin = start = nbytes = 0
    for k, (n, size) in enumerate(zip(seg.groups, seg.sizes)):
        if first < 0 and lo < begin + n:
            first, skip, start = k, lo - begin, nbytes
        if hi <= begin + n:
            last, tail = k, begin + n - hi
            break
        begin += n
        nbytes += size
    end = nbytes + seg.sizes[last]
    return Segment(
        seg.indices[a:b],
        seg.sizes[first : last + 1],
        seg.payload[start:end],
        seg.attempts,
        seg.groups[first : last + 1],
        skip,
        tail,
    )


def take_from(queue: deque[Segment], n: int, max_bytes: int) -> Segment:
    """Remove up to ``n`` arguments and ``max_bytes`` (but at least one pickle) from the queue.

    Cuts fall between pickles only, so an argument group is never split. Retried arguments
    and pieces of groups never merge with others: a suspect travels alone. Segments are joined
    (copied) only while the batch holds less than ``MERGE_MAX_BYTES``.
    """
    if len(queue) == 1:  # what the loop does with a lone segment that fits (a single call)
        seg = queue[0]
        if len(seg.indices) <= n and len(seg.payload) <= max_bytes:
            return queue.popleft()
    parts: list[Segment] = []
    count = nbytes = 0
    grouped = False
    while queue and count < n:
        seg = queue[0]
        if parts and (seg.alone or parts[0].alone or (seg.groups is not None) != grouped):
            break  # a message is grouped or not: the two kinds never share a batch
        if nbytes >= MERGE_MAX_BYTES:
            break  # merging would join (copy) large payloads: the rest goes in the next batch
        grouped = seg.groups is not None
        room, budget = n - count, max_bytes - nbytes
        length = len(seg.indices)  # len(seg), without a Python call: every dispatch passes here
        if length <= room and len(seg.payload) <= budget:
            parts.append(queue.popleft())
            count += length
            nbytes += len(seg.payload)
            continue
        k = _pickles_fitting(seg, room, budget)
        if k == 0:
            if parts:
                break
            k = 1
        if k == len(seg.sizes):  # one pickle over the limits, travelling alone: no empty rest
            parts.append(queue.popleft())
            count += len(seg)
            break
        head, queue[0] = _split(seg, k)
        parts.append(head)
        count += len(head)
        break
    if len(parts) == 1:
        return parts[0]
    return Segment(
        _merge_indices([p.indices for p in parts]),
        [s for p in parts for s in p.sizes],
        memoryview(b"".join(p.payload for p in parts)),
        0,
        [g for p in parts for g in p.groups] if grouped else None,  # type: ignore[union-attr]
    )
