"""Sorted runs: the map side's spill buffer, the run file format, and the bounded merge.

A run file is a sequence of records ``<key length u32><value length u32><key><value>``
(big-endian), sorted by key bytes; values of one key keep the order they were emitted in.
Memory stays bounded on both sides: the map side spills when its buffer holds ``spill_bytes``
(estimated, Python overhead included), and the merge opens at most ``fanin`` runs at once,
pre-merging consecutive runs into bigger ones when a reducer has more.
"""

from __future__ import annotations

import heapq
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

from .keys import decode_key, decode_value, encode_value

Record = tuple[bytes, bytes]
#: combine(key, values) -> iterable of values for the same key
Combiner = Callable[[Any, Iterator[Any]], Iterable[Any]]

_HEADER = struct.Struct(">II")
_BUFFER = 256 * 1024
#: estimated bytes a buffered key costs beyond its encoding (dict slot, list, bytes object)
KEY_OVERHEAD = 160
#: estimated bytes a buffered value costs (list slot and a small object)
VALUE_OVERHEAD = 40
#: values one key may gather in the buffer before ``combine`` folds them early
COMBINE_EVERY = 512
DEFAULT_FANIN = 64
#: immutable values kept as objects in the buffer; others are pickled when emitted
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


class _Encoded(bytes):
    """A value pickled when it was emitted (it might have been mutated afterwards)."""


# ------------------------------------------------------------------ run files


def write_run(path: Path | str, records: Iterable[Record]) -> tuple[int, int]:
    """Write sorted records; return (records, bytes)."""
    count = 0
    pack = _HEADER.pack
    with open(path, "wb", buffering=_BUFFER) as handle:
        write = handle.write
        for key, value in records:
            write(pack(len(key), len(value)))
            write(key)
            write(value)
            count += 1
        size = handle.tell()
    return count, size


def read_run(path: Path | str) -> Iterator[Record]:
    """The records of a run file, in order; a truncated file is an error, not a short run."""
    unpack = _HEADER.unpack
    with open(path, "rb", buffering=_BUFFER) as handle:
        read = handle.read
        while True:
            header = read(8)
            if not header:
                return
            if len(header) < 8:
                raise ValueError(f"run file {path} is truncated")
            klen, vlen = unpack(header)
            body = read(klen + vlen)
            if len(body) < klen + vlen:
                raise ValueError(f"run file {path} is truncated")
            yield body[:klen], body[klen:]


# ------------------------------------------------------------------ map side


def _values(values: list[Any]) -> Iterator[Any]:
    for value in values:
        yield decode_value(value) if type(value) is _Encoded else value


def _encoded(value: Any) -> bytes:
    return bytes(value) if type(value) is _Encoded else encode_value(value)


class SpillBuffer:
    """Map output for many buckets (one per reducer), spilled as sorted runs when full.

    ``spill(bucket, records)`` is called once per non-empty bucket per spill, with the
    bucket's records in key order; it writes them wherever the caller keeps runs.
    """

    def __init__(
        self,
        spill_bytes: int,
        spill: Callable[[Any, Iterator[Record]], None],
        combine: Callable[[Any], Combiner | None] | None = None,
    ) -> None:
        self.spill_bytes = spill_bytes
        self._spill = spill
        self._combine_for = combine or (lambda bucket: None)
        self._buckets: dict[Any, dict[bytes, list[Any]]] = {}
        self.size = 0
        self.spills = 0
        self.records = 0

    def add(self, bucket: Any, key: bytes, value: Any) -> None:
        """Buffer one record; spills everything when the buffer is full."""
        keys = self._buckets.get(bucket)
        if keys is None:
            keys = self._buckets[bucket] = {}
        values = keys.get(key)
        if values is None:
            values = keys[key] = []
            self.size += len(key) + KEY_OVERHEAD
        if type(value) in _PLAIN:
            values.append(value)
            self.size += VALUE_OVERHEAD
        else:
            encoded = _Encoded(encode_value(value))
            values.append(encoded)
            self.size += VALUE_OVERHEAD + len(encoded)
        self.records += 1
        if len(values) >= COMBINE_EVERY:
            combine = self._combine_for(bucket)
            if combine is not None:
                folded = list(combine(decode_key(key), _values(values)))
                self.size -= VALUE_OVERHEAD * (len(values) - len(folded))
                keys[key] = folded
        if self.size >= self.spill_bytes:
            self.flush()

    def flush(self) -> None:
        """Spill every bucket as one sorted run each (nothing if the buffer is empty)."""
        if not self._buckets:
            return
        buckets, self._buckets = self._buckets, {}
        for bucket in sorted(buckets):
            keys = buckets[bucket]
            self._spill(bucket, self._sorted(keys, self._combine_for(bucket)))
        self.size = 0
        self.spills += 1

    @staticmethod
    def _sorted(keys: dict[bytes, list[Any]], combine: Combiner | None) -> Iterator[Record]:
        for key in sorted(keys):
            values = keys[key]
            if combine is not None:
                values = list(combine(decode_key(key), _values(values)))
            for value in values:
                yield key, _encoded(value)


# ------------------------------------------------------------------ reduce side


def merge(runs: Iterable[Iterator[Record]]) -> Iterator[Record]:
    """One sorted stream from sorted runs; equal keys keep the runs' order (stable)."""
    return heapq.merge(*runs, key=itemgetter(0))


def combined(records: Iterator[Record], combine: Combiner) -> Iterator[Record]:
    """Apply ``combine`` to each key's values in a sorted stream."""
    for key, group in itertools.groupby(records, key=itemgetter(0)):
        for value in combine(decode_key(key), (decode_value(v) for _, v in group)):
            yield key, encode_value(value)


def premerge(
    paths: list[str],
    fanin: int,
    scratch: Callable[[int], Path],
    combine: Combiner | None = None,
) -> tuple[list[str], int]:
    """Merge consecutive runs until at most ``fanin`` remain; return them and merges done.

    ``scratch(n)`` names the n-th intermediate file (the caller owns and deletes them).
    Consecutive runs are merged so that values of a key keep the input's order.
    """
    if fanin < 2:
        raise ValueError("fanin must be at least 2")
    merges = 0
    current = list(paths)
    while len(current) > fanin:
        merged: list[str] = []
        for start in range(0, len(current), fanin):
            group = current[start : start + fanin]
            if len(group) == 1:
                merged.append(group[0])
                continue
            target = scratch(merges)
            stream = merge(read_run(p) for p in group)
            if combine is not None:
                stream = combined(stream, combine)
            write_run(target, stream)
            merges += 1
            merged.append(str(target))
            for p in group:
                if p not in paths:  # our own scratch file: no longer needed
                    os.unlink(p)
        current = merged
    return current, merges


def grouped(
    records: Iterator[Record], group: Callable[[Any], Any] | None = None
) -> Iterator[tuple[Any, Iterator[Any]]]:
    """``(key, values)`` for a sorted stream; values are a lazy iterator (skipped if unread).

    With ``group``, consecutive keys with the same ``group(key)`` form one group (a secondary
    sort: values arrive in the order of their full keys) and the group's key is ``group(key)``.
    """
    if group is None:
        for key, items in itertools.groupby(records, key=itemgetter(0)):
            yield decode_key(key), (decode_value(v) for _, v in items)
        return
    decoded = ((decode_key(k), v) for k, v in records)
    for key, items in itertools.groupby(decoded, key=lambda kv: group(kv[0])):
        yield key, (decode_value(v) for _, v in items)
