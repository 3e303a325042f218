"""Sorted runs: the map side's spill buffer, the run file format, and the bounded merge.

A run file is a sequence of records ``<key length u32><value length u32><times u32><key><value>``
(big-endian), sorted by key bytes: the pair (key, value) ``times`` times over, so a key's equal
neighbouring values (a count of 1 per word, say) are written, read and merged once, not once per
pair; values of one key keep the order they were emitted in.
Memory stays bounded on both sides: the map side spills when its buffer holds ``spill_bytes``
(estimated, Python overhead included), and the merge opens at most ``fanin`` runs at once,
pre-merging consecutive runs into bigger ones when a reducer has more.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

from .keys import TEXT_VALUE, decode_key, decode_value, encode_key, encode_text_key, encode_value

#: (encoded key, encoded value, times)
Record = tuple[bytes, bytes, int]
#: combine(key, values) -> iterable of values for the same key
Combiner = Callable[[Any, Iterator[Any]], Iterable[Any]]

_HEADER = struct.Struct(">III")
_BUFFER = 256 * 1024
#: bytes (measured: tracemalloc, RSS) a buffered key costs beyond its length: its text object, dict entry and list
KEY_OVERHEAD = 160
#: of which its list of values: a key's first value is held alone (a sort's keys are unique)
_LIST = 72
#: bytes a buffered value costs beyond its object: its slot in its key's list
VALUE_OVERHEAD = 9
#: values one key may gather in the buffer before ``combine`` folds them early
COMBINE_EVERY = 512
DEFAULT_FANIN = 64
#: plain values (kept as objects in the buffer; others are pickled when emitted) -> the bytes of
#: their object: text and bytes add their length, an int in -5..256 is shared and costs nothing
_PLAIN_COST = {int: 32, float: 32, str: 56, bytes: 40, bool: 0, type(None): 0}
#: distinct int values (encoded) or pickles (decoded) one spill or one merge remembers: a count
#: of 1 is pickled and unpickled once, not once per pair
_MEMO = 4096
#: pickled values whose decoding may be shared between records: immutable
_SHAREABLE = frozenset({int, float, bool, bytes, type(None)})
_MISS = object()


class _Encoded(bytes):
    """A value pickled when it was emitted (it might have been mutated afterwards)."""


#: buffered values whose equality is equality of their encodings (not floats: 0.0 == -0.0)
_EXACT = frozenset({int, str, bytes, bool, type(None), _Encoded})


# ------------------------------------------------------------------ run files


def write_run(path: Path | str, records: Iterable[Record]) -> tuple[int, int]:
    """Write sorted records; return (pairs, bytes)."""
    count = 0
    pack = _HEADER.pack
    with open(path, "wb", buffering=_BUFFER) as handle:
        write = handle.write
        for key, value, times in records:
            write(pack(len(key), len(value), times) + key + value)
            count += times
        size = handle.tell()
    return count, size


def read_run(path: Path | str) -> Iterator[Record]:
    """The records of a run file, in order; a truncated file is an error, not a short run.

    Read in blocks of ``_BUFFER`` bytes (more for a record that does not fit in one)."""
    unpack_from = _HEADER.unpack_from
    with open(path, "rb", buffering=0) as handle:
        read = handle.read
        data = read(_BUFFER)
        pos = 0
        while True:
            end = len(data)
            need = 12
            while pos + 12 <= end:
                klen, vlen, times = unpack_from(data, pos)
                mid = pos + 12 + klen
                stop = mid + vlen
                if stop > end:
                    need = stop - pos
                    break
                yield data[pos + 12 : mid], data[mid:stop], times
                pos = stop
            more = read(max(_BUFFER, need - (end - pos)))
            if not more:
                if pos != end:
                    raise ValueError(f"run file {path} is truncated")
                return
            data = data[pos:] + more
            pos = 0


# ------------------------------------------------------------------ map side


def _values(values: list[Any]) -> Iterator[Any]:
    for value in values:
        yield decode_value(value) if type(value) is _Encoded else value


class BadOutput(ValueError):
    """``map`` yielded something that is not a (key, value) or (purpose, key, value) tuple,
    or ``combine`` returned something that is not an iterable of values."""


class HookError(Exception):
    """One of the job's optional functions (``read``, ``partition``, ``group``) raised: the
    message names it; it fails its task even on ``continue`` (it is no one record's error)."""

    shows_cause = True  # its remote traceback is the user's exception's


class CombineError(HookError):
    """The user's ``combine`` raised: the message names it and the key (a combine serves many
    records, so it fails its task even on ``continue``)."""


def combine_values(combine: Combiner, key: Any, values: Iterator[Any]) -> list[Any]:
    """``combine(key, values)``'s values; what it raises, or a result that is not an iterable
    (None: a missing ``yield`` or ``return``), is named, not reported as remap's own error."""
    try:
        out = combine(key, values)
        if hasattr(out, "__iter__"):
            return list(out)
    except Exception as exc:
        what = f"combine({short(key)}, values) raised {type(exc).__name__}: {exc}"
        raise CombineError(what) from exc
    raise BadOutput(
        f"combine({short(key)}, values) returned {short(out)}: it must yield the combined "
        "values (or return a list of them)"
    )


def short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters for an error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class SpillBuffer:
    """Map output by purpose, spilled as one sorted run per (purpose, reducer) when full.

    Each purpose keeps a dict of key -> its value, or the list of its values in emission order
    once it has two; with a combiner, hot keys fold early and each spill combines. Text keys
    are buffered as themselves, any other key by its encoding; the encoding and ``locate`` (the
    partitioner) run once per distinct key per spill, and a key's equal neighbouring values are
    encoded and written once, with their count.
    Values that are not plain (numbers, text, bytes, None) are pickled when emitted.
    ``spill((purpose, reducer), records)`` is called for each non-empty run with its records in
    key order.
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
        self._purposes = tuple(purposes)
        self._combiners = {p: combine(p) if combine else None for p in self._purposes}
        self._default = default
        self._fresh()
        self.size = 0
        self.spills = 0
        self.records = 0

    def _fresh(self) -> None:
        self._stores: dict[str, dict[Any, Any]] = {p: {} for p in self._purposes}
        self._keys: dict[str, dict[bytes, Any]] = {p: {} for p in self._purposes}
        self._mixed: set[tuple[str, Any]] = set()  # slots holding values pickled at emission
        self._fast = self._stores.get(self._default)  # where plain pairs go

    def extend(self, outputs: Iterable[Any]) -> None:
        """Buffer everything one ``map`` call yields: ``(key, value)`` for the default purpose,
        ``(purpose, key, value)`` for a named one. The caller spills once :attr:`size` reaches
        ``spill_bytes``, so an error in user code while spilling (a partitioner, say) is never
        taken for the record's. A text key with a plain value for the default purpose takes a
        short path (measured: a word count's map CPU)."""
        fast = self._fast
        cost_of = _PLAIN_COST.get  # a plain value's type -> its object's bytes
        size = count = fast_count = 0
        try:
            if fast is None:
                for out in outputs:
                    size += self._add(out)
                    count += 1
                return
            # hot keys are folded by relieve() when the buffer fills, not per value
            get = fast.get
            for out in outputs:
                if type(out) is tuple:
                    try:
                        key, value = out
                    except ValueError:
                        pass
                    else:
                        kind = type(value)
                        if kind is int and -5 <= value <= 256 and type(key) is str:
                            try:
                                fast[key].append(value)
                            except KeyError:
                                fast[key] = value
                                size += len(key) + KEY_OVERHEAD - _LIST
                            except AttributeError:  # its second value: a list from now on
                                fast[key] = [fast[key], value]
                                size += _LIST
                            fast_count += 1
                            continue
                        cost = cost_of(kind)
                        if cost is not None and type(key) is str:
                            values = get(key, _MISS)
                            if type(values) is list:
                                values.append(value)
                            elif values is _MISS:
                                fast[key] = value
                                size += len(key) + KEY_OVERHEAD - _LIST
                            else:
                                fast[key] = [values, value]
                                size += _LIST
                            size += cost + len(value) if kind is str or kind is bytes else cost
                            fast_count += 1
                            continue
                size += self._add(out)
                count += 1
        finally:
            self.size += size + fast_count * VALUE_OVERHEAD
            self.records += count + fast_count

    def _add(self, out: Any) -> int:
        """Buffer one record of any shape; return its estimated size."""
        stores = self._stores
        if type(out) is tuple and len(out) == 2 and self._default in stores:
            key, value = out
            purpose = self._default
        elif type(out) is tuple and len(out) == 3 and out[0] in stores:
            purpose, key, value = out
        else:
            raise BadOutput(self._bad(out))
        store = stores[purpose]
        if type(key) is str:
            ident = key
        else:
            ident = encode_key(key)
            self._keys[purpose].setdefault(ident, key)
        kind = type(value)
        size = _PLAIN_COST.get(kind)
        if size is None:
            value = _Encoded(encode_value(value))
            size = 64 + len(value)  # a bytes subclass's object
            if (purpose, ident) not in self._mixed:
                self._mixed.add((purpose, ident))
                size += 100  # a tuple in a set
        elif kind is str or kind is bytes:
            size += len(value)
        elif kind is int and -5 <= value <= 256:
            size = 0
        values = store.get(ident, _MISS)
        if values is _MISS:
            store[ident] = value
            return size + len(ident) + KEY_OVERHEAD - _LIST + VALUE_OVERHEAD
        if type(values) is not list:
            values = store[ident] = [values]
            size += _LIST
        values.append(value)
        size += VALUE_OVERHEAD
        if len(values) >= COMBINE_EVERY and self._combiners[purpose] is not None:
            size -= self._fold(purpose, ident, store)
        return size

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
        return f"map must yield (key, value) or (purpose, key, value) tuples, got {short(out)}"

    def _fold(self, purpose: str, ident: Any, slots: dict[Any, Any]) -> int:
        """Combine a hot key's values early; return the estimated bytes freed."""
        combine = self._combiners[purpose]
        values = slots[ident]
        key = ident if type(ident) is str else self._keys[purpose][ident]
        mixed = (purpose, ident) in self._mixed
        folded = combine_values(combine, key, _values(values) if mixed else iter(values))
        slots[ident] = folded
        return VALUE_OVERHEAD * (len(values) - len(folded))

    def relieve(self) -> None:
        """The buffer is full: combine every key's values in memory first (hot keys fold to
        one value), and spill only if that did not free half of it."""
        if self._fold_all() and self.size < self.spill_bytes // 2:
            return
        self.flush()

    def _fold_all(self) -> bool:
        """Combine each key holding more than one value; return whether anything could fold."""
        folded = False
        for purpose, store in self._stores.items():
            if self._combiners[purpose] is None:
                continue
            for ident, values in list(store.items()):
                if type(values) is list and len(values) > 1:
                    self.size -= self._fold(purpose, ident, store)
                    folded = True
        self.size = max(self.size, 0)
        return folded

    def flush(self) -> None:
        """Spill every (purpose, reducer) as one sorted run (nothing if the buffer is empty)."""
        if not any(self._stores.values()):
            return
        stores, keys_by_purpose, mixed = self._stores, self._keys, self._mixed
        self._fresh()
        for purpose in sorted(stores):
            store = stores[purpose]
            if not store:
                continue
            runs = self._runs(purpose, store, keys_by_purpose[purpose], mixed)
            for reducer in sorted(runs):
                self._spill((purpose, reducer), runs[reducer])
        self.size = 0
        self.spills += 1

    def _runs(
        self,
        purpose: str,
        slots: dict[Any, Any],
        keys: dict[bytes, Any],
        mixed: set[tuple[str, Any]],
    ) -> dict[int, Iterator[Record]]:
        """Each key's values (combined, with a combiner), keys sorted per reducer."""
        by_reducer: dict[int, list[tuple[bytes, Any, list[Any], bool]]] = {}
        locate, some_mixed = self._locate, bool(mixed)
        for ident, values in slots.items():
            if type(ident) is str:
                key, encoded = ident, encode_text_key(ident)
            else:
                key, encoded = keys[ident], ident
            reducer = locate(purpose, key, encoded)
            items = by_reducer.get(reducer)
            if items is None:
                items = by_reducer[reducer] = []
            items.append((encoded, key, values, some_mixed and (purpose, ident) in mixed))
        combine = self._combiners[purpose]
        for items in by_reducer.values():
            items.sort(key=itemgetter(0))
        return {reducer: _records(items, combine) for reducer, items in by_reducer.items()}


def _records(
    items: list[tuple[bytes, Any, list[Any], bool]], combine: Combiner | None
) -> Iterator[Record]:
    """The records of one run: each key's values (combined, with a combiner), equal
    neighbours counted; each distinct int is encoded once."""
    ints: dict[int, bytes] = {}  # int value -> its pickle

    def encode(value: Any) -> bytes:
        kind = type(value)
        if kind is str:  # encode_value, inline for the common case
            return TEXT_VALUE + value.encode("utf-8", "surrogatepass")
        if kind is int:  # a count, say: the same few values over and over
            data = ints.get(value)
            if data is None:
                data = encode_value(value)
                if len(ints) < _MEMO:
                    ints[value] = data
            return data
        return value if kind is _Encoded else encode_value(value)

    groupby = itertools.groupby
    for encoded, key, values, mixed in items:
        if type(values) is not list:  # a key's only value
            if combine is None:
                if type(values) is str:  # encode_value, inline for the common case
                    yield encoded, TEXT_VALUE + values.encode("utf-8", "surrogatepass"), 1
                else:
                    yield encoded, encode(values), 1
                continue
            values = [values]
        if combine is not None:
            values = combine_values(combine, key, _values(values) if mixed else iter(values))
        kinds = set(map(type, values))
        if len(kinds) == 1 and kinds.pop() in _EXACT:  # equal values have equal encodings
            for value, same in groupby(values):
                yield encoded, encode(value), len(list(same))
        else:
            for data, same in groupby(map(encode, values)):
                yield encoded, data, len(list(same))


# ------------------------------------------------------------------ reduce side


def merge(runs: Iterable[Iterator[Record]]) -> Iterator[Record]:
    """One sorted stream from sorted runs; equal keys keep the runs' order (stable)."""
    runs = list(runs)
    if len(runs) == 1:
        return runs[0]
    return heapq.merge(*runs, key=itemgetter(0))


def combined(records: Iterator[Record], combine: Combiner) -> Iterator[Record]:
    """Apply ``combine`` to each key's values in a sorted stream."""
    expand = value_decoder()
    chain = itertools.chain.from_iterable
    for key, group in itertools.groupby(records, key=itemgetter(0)):
        values = combine_values(combine, decode_key(key), chain(map(expand, group)))
        yield from _records([(key, None, values, False)], None)


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
        # merge only as many runs as bring the count down to fanin (a merge of n runs removes
        # n - 1), the consecutive ones with the fewest bytes: the others are read once, by the
        # final merge, instead of twice
        width = min(fanin, len(current) - fanin + 1)
        ends = [0, *itertools.accumulate(os.path.getsize(p) for p in current)]
        start = min(range(len(current) - width + 1), key=lambda i: ends[i + width] - ends[i])
        group = current[start : start + width]
        target = scratch(merges)
        stream = merge(read_run(p) for p in group)
        if combine is not None:
            stream = combined(stream, combine)
        write_run(target, stream)
        merges += 1
        current[start : start + width] = [str(target)]
        for p in group:
            if p not in paths:  # our own scratch file: no longer needed
                os.unlink(p)
    return current, merges


def value_decoder() -> Callable[[Record], Iterable[Any]]:
    """A record's values, decoded: each distinct immutable value is unpickled once (up to
    ``_MEMO`` of them: a word count's values are the same few pickled ints) and repeated; a
    mutable one is unpickled once per pair, so each is an object of its own."""
    memo: dict[bytes, Any] = {}
    get = memo.get
    text = TEXT_VALUE[0]
    loads, repeat = pickle.loads, itertools.repeat

    def expand(record: Record) -> Iterable[Any]:
        data, times = record[1], record[2]
        if data[0] == text:
            value = data[1:].decode("utf-8", "surrogatepass")
        else:
            value = get(data, _MISS)
            if value is _MISS:
                value = loads(data)
                if type(value) in _SHAREABLE:
                    if len(memo) < _MEMO:
                        memo[data] = value
                elif times > 1:
                    return itertools.chain((value,), map(loads, repeat(data, times - 1)))
        return (value,) if times == 1 else repeat(value, times)

    return expand


def grouped(
    records: Iterator[Record], group: Callable[[Any], Any] | None = None
) -> Iterator[tuple[Any, Iterator[Any]]]:
    """``(key, values)`` for a sorted stream; values are a lazy iterator (skipped if unread).

    With ``group``, consecutive keys with the same ``group(key)`` form one group (a secondary
    sort: values arrive in the order of their full keys) and the group's key is ``group(key)``.
    """
    expand = value_decoder()
    chain = itertools.chain.from_iterable
    if group is None:
        for key, items in itertools.groupby(records, key=itemgetter(0)):
            yield decode_key(key), chain(map(expand, items))
        return
    decoded = ((decode_key(k), v, n) for k, v, n in records)
    for key, items in itertools.groupby(decoded, key=lambda kv: group(kv[0])):
        yield key, chain(map(expand, items))
