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

from .keys import decode_key, decode_value, encode_key, encode_value

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


class BadOutput(ValueError):
    """``map`` yielded something that is not a (key, value) or (purpose, key, value) tuple."""


class SpillBuffer:
    """Map output by purpose, spilled as one sorted run per (purpose, reducer) when full.

    Keys are buffered by identity: a text key as itself (the common case, with no encoding
    per record), any other key by its encoding. Encoding and ``locate`` (the partitioner)
    run once per distinct key per spill. ``spill((purpose, reducer), records)`` is called
    for each non-empty run with its records in key order.
    """

    def __init__(
        self,
        spill_bytes: int,
        spill: Callable[[tuple[str, int], Iterator[Record]], None],
        locate: Callable[[str, Any, bytes], int],
        combine: Callable[[str], Combiner | None] | None = None,
        purposes: Iterable[str] = ("default",),
        default: str = "default",
    ) -> None:
        self.spill_bytes = spill_bytes
        self._spill = spill
        self._locate = locate
        self._combine_for = combine or (lambda purpose: None)
        self._purposes = tuple(purposes)
        self._default = default
        self._fresh()
        self.size = 0
        self.spills = 0
        self.records = 0

    def _fresh(self) -> None:
        self._slots: dict[str, dict[Any, list[Any]]] = {p: {} for p in self._purposes}
        self._keys: dict[str, dict[bytes, Any]] = {p: {} for p in self._purposes}
        self._mixed: set[tuple[str, Any]] = set()  # slots holding values pickled at emission

    def add(self, purpose: str, key: Any, value: Any) -> None:
        """Buffer one record of a purpose."""
        self.extend(((purpose, key, value),))

    def extend(self, outputs: Iterable[Any]) -> None:
        """Buffer everything one ``map`` call yields: ``(key, value)`` for the default purpose,
        ``(purpose, key, value)`` for a named one. The caller spills (:meth:`flush`) once
        :attr:`full`, so an error in user code while spilling (a partitioner, say) is never
        mistaken for an error of the record being mapped."""
        all_slots = self._slots
        default = all_slots.get(self._default)
        plain = _PLAIN
        size = count = 0
        try:
            for out in outputs:
                if type(out) is tuple and len(out) == 2 and default is not None:
                    key, value = out
                    slots = default
                    purpose = self._default
                elif type(out) is tuple and len(out) == 3 and out[0] in all_slots:
                    purpose, key, value = out
                    slots = all_slots[purpose]
                else:
                    raise BadOutput(self._bad(out))
                if type(key) is str:
                    ident = key
                else:
                    ident = encode_key(key)
                    self._keys[purpose].setdefault(ident, key)
                values = slots.get(ident)
                if values is None:
                    values = slots[ident] = []
                    size += len(ident) + KEY_OVERHEAD
                if type(value) in plain:
                    values.append(value)
                    size += VALUE_OVERHEAD
                else:
                    encoded = _Encoded(encode_value(value))
                    values.append(encoded)
                    size += VALUE_OVERHEAD + len(encoded)
                    self._mixed.add((purpose, ident))
                count += 1
                if len(values) >= COMBINE_EVERY:
                    size -= self._fold(purpose, ident, slots)
        finally:
            self.size += size
            self.records += count

    def _bad(self, out: Any) -> str:
        if type(out) is tuple and len(out) == 3:
            return f"map yielded purpose {out[0]!r}, but the job's reducer sets are " + ", ".join(
                sorted(self._purposes)
            )
        if type(out) is tuple and len(out) == 2:
            return (
                f"map yielded a (key, value) pair, but the job has no {self._default!r} "
                "reducer set: yield (purpose, key, value)"
            )
        text = repr(out)
        text = text if len(text) <= 80 else text[:77] + "..."
        return f"map must yield (key, value) or (purpose, key, value) tuples, got {text}"

    def _fold(self, purpose: str, ident: Any, slots: dict[Any, list[Any]]) -> int:
        """Combine a hot key's values early; return the estimated bytes freed."""
        combine = self._combine_for(purpose)
        if combine is None:
            return 0
        values = slots[ident]
        key = ident if type(ident) is str else self._keys[purpose][ident]
        mixed = (purpose, ident) in self._mixed
        folded = list(combine(key, _values(values) if mixed else iter(values)))
        slots[ident] = folded
        return VALUE_OVERHEAD * (len(values) - len(folded))

    @property
    def full(self) -> bool:
        return self.size >= self.spill_bytes

    def flush(self) -> None:
        """Spill every (purpose, reducer) as one sorted run (nothing if the buffer is empty)."""
        if not any(self._slots.values()):
            return
        slots_by_purpose, keys_by_purpose, mixed = self._slots, self._keys, self._mixed
        self._fresh()
        for purpose in sorted(slots_by_purpose):
            keys = keys_by_purpose[purpose]
            runs: dict[int, list[tuple[bytes, Any, list[Any], bool]]] = {}
            for ident, values in slots_by_purpose[purpose].items():
                if type(ident) is str:
                    key, encoded = ident, encode_key(ident)
                else:
                    key, encoded = keys[ident], ident
                reducer = self._locate(purpose, key, encoded)
                runs.setdefault(reducer, []).append(
                    (encoded, key, values, (purpose, ident) in mixed)
                )
            combine = self._combine_for(purpose)
            for reducer in sorted(runs):
                items = runs[reducer]
                items.sort(key=itemgetter(0))
                self._spill((purpose, reducer), self._records(items, combine))
        self.size = 0
        self.spills += 1

    @staticmethod
    def _records(
        items: list[tuple[bytes, Any, list[Any], bool]], combine: Combiner | None
    ) -> Iterator[Record]:
        for encoded, key, values, mixed in items:
            if combine is not None:
                for value in list(combine(key, _values(values) if mixed else iter(values))):
                    yield encoded, encode_value(value)
            else:
                for value in values:
                    yield encoded, bytes(value) if type(value) is _Encoded else encode_value(value)


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
