"""The pure Pregel engine: partitions, one superstep, messages as bytes. No processes, no files:
what a worker does between two barriers, so its semantics are tested without a cluster."""

from __future__ import annotations

import itertools
import operator
import pickle
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import JobFailed
from .program import Program

try:  # optional: summed float messages to every neighbour add up in C (see Fanout)
    import numpy as _np
except ImportError:  # pragma: no cover - the pure-Python loop does the same
    _np = None

PICKLE_PROTOCOL = 5
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive ids over partitions
_MASK = (1 << 64) - 1

Tag = tuple[int, int]  # (input file index, byte offset of the line): orders merges stably
_by_tag = operator.itemgetter(0)  # records arrive as sorted runs: timsort merges them in O(n)


def partition_of(vertex_id: Any, count: int) -> int:
    """The partition owning ``vertex_id``: stable across processes and runs (not ``hash()``).

    Ids equal in Python are one vertex (a partition's dict holds them as one), so they must
    have one owner: ``True``, ``1.0`` and ``numpy.int64(1)`` are owned as ``1`` is."""
    if count == 1:
        return 0
    if type(vertex_id) is not int and type(vertex_id) is not str:
        vertex_id = _canonical(vertex_id)
    if type(vertex_id) is int:
        return (((vertex_id * _MIX) & _MASK) >> 32) % count
    text = vertex_id if type(vertex_id) is str else repr(vertex_id)
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % count


def _canonical(vertex_id: Any) -> Any:
    """An id as the plain value it equals: a whole number (bool, integral float, numpy's
    integers and floats) as an int, a tuple item by item; anything else as it is."""
    kind = type(vertex_id)
    if kind is tuple:
        return tuple(map(_canonical, vertex_id))
    if kind is str or kind is bytes:
        return vertex_id
    if hasattr(kind, "__index__"):  # bool, numpy.int64, ...
        try:
            return operator.index(vertex_id)
        except TypeError:
            return vertex_id
    if isinstance(vertex_id, float) or hasattr(vertex_id, "is_integer"):
        try:
            if vertex_id == vertex_id and float(vertex_id).is_integer():  # not NaN
                return int(vertex_id)
        except (TypeError, ValueError, OverflowError):
            pass
    return vertex_id


class VertexError(JobFailed):
    """User code of a vertex job raised; the message names the vertex and superstep."""

    shows_cause = True  # its remote traceback is the user's exception's


# --------------------------------------------------------------------------- input


Record = tuple[Any, Any, list[Any], list[Any] | None]  # id, value, targets, edge values


def _record(item: Any, line: str) -> Record:
    if type(item) is tuple and len(item) == 3 and type(item[2]) is list:
        edges = item[2]  # the common shape, (id, value, [targets]): no copy, no second look
        if not edges or type(edges[0]) is not tuple:
            return item[0], item[1], edges, None
    if not isinstance(item, (tuple, list)) or not 1 <= len(item) <= 3:
        raise VertexError(
            f"prepare({line!r}) must return (id, value, edges), a list of them or None; "
            f"got {type(item).__name__}"
        )
    vid = item[0]
    value = item[1] if len(item) > 1 else None
    try:  # a record's edges are all bare targets or all (target, value)
        targets = list(item[2] or ()) if len(item) > 2 else []
        weights = None
        if targets and type(targets[0]) is tuple and len(targets[0]) == 2:
            targets, weights = [e[0] for e in targets], [e[1] for e in targets]
    except TypeError:
        raise VertexError(
            f"prepare({line!r}) returned edges {item[2]!r}: expected a list of targets or "
            "of (target, value) pairs"
        ) from None
    return vid, value, targets, weights


def prepare_line(program: Program, line: str) -> list[Record]:
    """The vertex records of one input line: ``prepare`` may return one, a list, or None."""
    try:
        out = program.prepare(line)
    except Exception as exc:
        raise VertexError(f"prepare({line!r}) raised {type(exc).__name__}: {exc}") from exc
    if out is None:
        return []
    if isinstance(out, list):
        return [_record(item, line) for item in out]
    return [_record(out, line)]


# --------------------------------------------------------------------------- messages


class Outbox:
    """Messages sent in one superstep, one bucket per destination partition: folded as sent
    (``combine`` is sum, min or max), else kept as lists (a ``combine`` runs once, in
    :meth:`finish`). ``send`` and ``send_many`` are closures over local names: the hottest
    code of a vertex job.

    With ``spill`` and no combiner (messages kept one by one, so held in proportion to what
    is sent), once ``spill_after`` messages are held the buckets are handed to
    ``spill(destination, chunk, bucket)`` and emptied (checked after each vertex, by
    :meth:`Partition.step`, not per message): a superstep sending many messages holds at most
    that many and one vertex's. Chunks concatenated in order are the bucket a single one would
    have been (the same lists, the same first-sent order of ids)."""

    def __init__(
        self,
        count: int,
        combine: Callable[[list[Any]], Any] | None,
        fold: Callable[[Any, Any], Any] | None = None,
        spill: Callable[[int, int, dict[Any, list[Any]]], None] | None = None,
        spill_after: int = 0,
    ) -> None:
        self.count = count
        self.combine = combine
        self.fold = fold
        #: per destination: vertex id → message(s), or (after :meth:`finish`) a :class:`Sums`
        self.buckets: list[Any] = [{} for _ in range(count)]
        #: per destination: :class:`Sums` pieces noted by ``Fanout.flush``
        self.pieces: list[list[Sums]] = [[] for _ in range(count)]
        #: chunks handed to ``spill`` so far, and the messages in them per destination
        self.spills = 0
        self.spilled = [0] * count
        self._spill = spill if combine is None and spill_after > 0 else None
        self._spill_after = spill_after
        #: :attr:`sent` at which :meth:`spill_held` is due (None: this outbox never spills)
        self.spill_at: int | None = spill_after if self._spill is not None else None
        self._sent = [0]
        self._finished = False
        self.send, self.send_many = self._senders(fold)

    @property
    def combined(self) -> bool:
        """Whether a bucket maps a vertex to one message rather than a list."""
        return self.combine is not None

    @property
    def sent(self) -> int:
        """Messages sent so far (before combining)."""
        return self._sent[0]

    def _senders(self, fold: Callable[[Any, Any], Any] | None) -> tuple[Any, Any]:
        buckets, count, sent = self.buckets, self.count, self._sent
        only = buckets[0]

        def bucket_of(to: Any) -> dict[Any, Any]:
            if count == 1:
                return only
            if type(to) is int:
                return buckets[(((to * _MIX) & _MASK) >> 32) % count]
            return buckets[partition_of(to, count)]

        if fold is None:

            def send(to: Any, message: Any) -> None:
                sent[0] += 1
                bucket = bucket_of(to)
                box = bucket.get(to)
                if box is None:
                    bucket[to] = [message]
                else:
                    box.append(message)

        elif fold is operator.add:

            def send(to: Any, message: Any) -> None:
                sent[0] += 1
                bucket = bucket_of(to)
                if to in bucket:
                    # never ``+=``: the slot may hold the sender's own list or array, sent to
                    # other vertices too, which an in-place add would change under them
                    bucket[to] = bucket[to] + message
                else:
                    bucket[to] = message

        elif fold is min:

            def send(to: Any, message: Any) -> None:
                sent[0] += 1
                bucket = bucket_of(to)
                if to not in bucket or message < bucket[to]:
                    bucket[to] = message

        else:  # max: a fold is sum, min or max (program._COMBINERS)

            def send(to: Any, message: Any) -> None:
                sent[0] += 1
                bucket = bucket_of(to)
                if to not in bucket or message > bucket[to]:
                    bucket[to] = message

        def send_many(route: Any, message: Any) -> None:
            if fold is not operator.add or (
                type(message) is not float and type(message) is not int
            ):
                for _, targets in route:
                    for to in targets:
                        send(to, message)
                return
            # the PageRank loop: one number along every out-edge, summed (0 + x is x exactly)
            for b, targets in route:
                sent[0] += len(targets)
                bucket = buckets[b]
                get = bucket.get
                for to in targets:
                    bucket[to] = get(to, 0) + message

        return send, send_many

    def spill_held(self) -> None:
        """Hand every non-empty bucket to ``spill`` as chunk :attr:`spills`, and empty it
        (in place: the senders hold the dicts)."""
        assert self._spill is not None
        for d, bucket in enumerate(self.buckets):
            if bucket:
                self.spilled[d] += sum(map(len, bucket.values()))
                self._spill(d, self.spills, bucket)
                bucket.clear()
        self.spills += 1
        self.spill_at = self._sent[0] + self._spill_after

    def finish(self) -> None:
        """Add the Fanout's sums and apply a (non-fold) combiner: before reading the buckets."""
        if self._finished:
            return
        self._finished = True
        for d, pieces in enumerate(self.pieces):
            if pieces:
                self.buckets[d] = _with_sums(self.buckets[d], pieces)
        combine = self.combine
        if combine is None or self.fold is not None:  # a fold left no lists to combine
            return
        for bucket in self.buckets:
            for vid, box in bucket.items():
                try:
                    bucket[vid] = combine(box)
                except Exception as exc:  # the user's combine: name it and the vertex
                    raise VertexError(
                        f"combine of {len(box)} messages to vertex {vid!r} raised "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

    def counts(self) -> list[int]:
        """Messages that will be delivered, per destination partition (after combining)."""
        self.finish()
        if self.combine is not None:
            return [len(b) for b in self.buckets]
        return [
            spilled + sum(len(box) for box in b.values())
            for spilled, b in zip(self.spilled, self.buckets)
        ]

    def encode(self, partition: int) -> bytes:
        self.finish()
        return encode_bucket(self.buckets[partition], self.combined)


def encode_bucket(bucket: Mapping[Any, Any] | Sums, combined: bool) -> bytes:
    """A bucket as ids and messages in two lists (no tuple per message), a Sums as arrays."""
    if type(bucket) is Sums:
        return bucket.to_bytes()
    return pickle.dumps((combined, list(bucket), list(bucket.values())), PICKLE_PROTOCOL)


#: message types no one can change after sending: a bucket of only these may be delivered as is
_IMMUTABLE = frozenset({int, float, str, bytes, bool, complex, type(None)})
_TUPLED = _IMMUTABLE | {tuple}


def kept_bucket(
    bucket: Mapping[Any, Any] | Sums, combined: bool
) -> Mapping[Any, Any] | Sums | bytes:
    """A bucket for this worker's own partitions: as is when every message is immutable, else
    as bytes like one sent to another worker. Kept as objects, a mutable message would carry
    its sender's (or another receiver's) later changes: the output would depend on which
    partitions share a worker."""
    if type(bucket) is Sums:
        return bucket

    def messages() -> Iterable[Any]:
        values = bucket.values()
        return values if combined else itertools.chain.from_iterable(values)

    kinds = set(map(type, messages()))  # in C: about 3 sums' time
    if kinds <= _IMMUTABLE:
        return bucket
    fixed = kinds <= _TUPLED and all(  # a tuple of plain values cannot change either
        type(item) in _IMMUTABLE for m in messages() if type(m) is tuple for item in m
    )
    return bucket if fixed else encode_bucket(bucket, combined)


def decode_bucket(blob: bytes) -> tuple[bool, Any]:
    """``(combined, bucket)`` from :func:`encode_bucket`'s bytes."""
    if blob[: len(Sums.MAGIC)] == Sums.MAGIC:
        return True, Sums.from_bytes(blob)
    combined, ids, messages = pickle.loads(blob)
    return combined, _Pairs(ids, messages)


class _Pairs:
    """Decoded ids and messages, read like a bucket (``keys()``, ``values()``)."""

    __slots__ = ("ids", "messages")

    def __init__(self, ids: list[Any], messages: list[Any]) -> None:
        self.ids, self.messages = ids, messages

    def keys(self) -> list[Any]:
        return self.ids

    def values(self) -> list[Any]:
        return self.messages

    def __len__(self) -> int:
        return len(self.ids)


def gather(
    part: Partition, sources: Iterable[bytes | Mapping[Any, Any] | Sums], combined: bool
) -> dict[Any, Any] | DenseInbox:
    """A partition's inbox from what every sender sent it, in order. Fanout sums alone to
    known vertices add up in arrays (a :class:`DenseInbox`: the same additions in the same
    order); anything else into a dict (vertex id → its messages, or its folded message).
    ``sources`` is taken one at a time (a generator may read each file as it is asked for):
    a source is delivered and let go before the next is decoded, so a partition receiving
    many messages holds its inbox and one sender's file, not every file and its decoding too."""
    fold = part.program.fold
    inbox: dict[Any, Any] = {}
    #: the senders' Sums while every source so far sent only those (compact arrays, kept
    #: for a DenseInbox); None once another kind came and everything goes into the dict
    sums: list[tuple[bool, Sums]] | None = [] if fold is operator.add else None
    for source in sources:
        c, bucket = decode_bucket(source) if isinstance(source, bytes) else (combined, source)
        del source  # a file's bytes go before the next file is read
        if not len(bucket):
            continue
        if sums is not None:
            if type(bucket) is Sums:
                sums.append((c, bucket))
                continue
            for held_c, held in sums:  # in their order, before this one
                _deliver(inbox, held.keys(), held.values(), held_c, fold)
            sums = None
        _deliver(inbox, bucket.keys(), bucket.values(), c, fold)
        del bucket
    if sums:
        dense = DenseInbox.of(part, [b for _, b in sums])
        if dense is not None:
            return dense
        for held_c, held in sums:
            _deliver(inbox, held.keys(), held.values(), held_c, fold)
    return inbox


def _deliver(
    inbox: dict[Any, Any],
    ids: Iterable[Any],
    messages: Iterable[Any],
    combined: bool,
    fold: Callable[[Any, Any], Any] | None,
) -> None:
    if combined and fold is not None:
        # senders folded their messages; folding theirs in arrival order gives what sum(),
        # min() or max() over the list of them would (the same bits: sum starts from 0)
        if not inbox:
            inbox.update(zip(ids, messages))
            return
        if fold is operator.add:
            for vid, msg in zip(ids, messages):
                inbox[vid] = inbox[vid] + msg if vid in inbox else msg
            return
        for vid, msg in zip(ids, messages):
            inbox[vid] = fold(inbox[vid], msg) if vid in inbox else msg
        return
    if combined and not inbox:  # the first sender's bucket: build the lists in one go
        inbox.update({vid: [msg] for vid, msg in zip(ids, messages)})
        return
    for vid, msg in zip(ids, messages):
        box = inbox.get(vid)
        if combined:
            if box is None:
                inbox[vid] = [msg]
            else:
                box.append(msg)
        elif box is None:
            inbox[vid] = list(msg)
        else:
            box.extend(msg)


class Sums:
    """Summed float messages to integer vertex ids as two arrays (ids unique, in the order
    first sent to): what :class:`Fanout` sends, encoded as the raw arrays."""

    MAGIC = b"remap-sums-1\n"
    __slots__ = ("ids", "sums")

    def __init__(self, ids: Any, sums: Any) -> None:
        self.ids = ids  # int64
        self.sums = sums  # float64

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self) -> list[int]:
        return self.ids.tolist()

    def values(self) -> list[float]:
        return self.sums.tolist()

    def to_bytes(self) -> bytes:
        count = len(self.ids).to_bytes(8, "little")
        ids, sums = self.ids.astype("<i8", copy=False), self.sums.astype("<f8", copy=False)
        return b"".join((self.MAGIC, count, ids.tobytes(), sums.tobytes()))

    @classmethod
    def from_bytes(cls, blob: bytes) -> Sums:
        head = len(cls.MAGIC) + 8
        count = int.from_bytes(blob[len(cls.MAGIC) : head], "little")
        if len(blob) != head + 16 * count:
            raise ValueError(f"a message file of {len(blob)} bytes does not hold {count} sums")
        ids = _np.frombuffer(blob, dtype="<i8", count=count, offset=head)
        sums = _np.frombuffer(blob, dtype="<f8", count=count, offset=head + 8 * count)
        return cls(ids, sums)

    @classmethod
    def concat(cls, pieces: list[Sums]) -> Sums:
        """Several senders' Sums as one, added in piece order (what a shared dict would hold)."""
        ids, slot = _first_seen(_np.concatenate([p.ids for p in pieces]))
        sums = _np.concatenate([p.sums for p in pieces])
        out = _np.zeros(len(ids))
        seen = _np.zeros(len(ids), dtype=_np.bool_)
        bounds = _np.cumsum([len(p) for p in pieces])[:-1]
        for piece_slot, piece_sums in zip(_np.split(slot, bounds), _np.split(sums, bounds)):
            # per piece, not one bincount: a first sum is taken as is (0.0 + -0.0 is 0.0)
            out[piece_slot] = _np.where(seen[piece_slot], out[piece_slot] + piece_sums, piece_sums)
            seen[piece_slot] = True
        return cls(ids, out)


def _with_sums(bucket: dict[Any, Any], pieces: list[Sums]) -> dict[Any, Any] | Sums:
    """A destination's bucket with the Fanout sums noted for it: arrays if nothing else was
    sent there, else added into the dict."""
    if not bucket:
        return pieces[0] if len(pieces) == 1 else Sums.concat(pieces)
    for piece in pieces:
        _deliver(bucket, piece.keys(), piece.values(), True, operator.add)
    return bucket


class DenseInbox:
    """A partition's summed float messages as arrays in its vertices' order (the Fanout's):
    ``hit`` marks the vertices with a message, ``sums`` holds it."""

    __slots__ = ("order", "sums", "hit")

    def __init__(self, order: list[Any], sums: Any, hit: Any) -> None:
        self.order, self.sums, self.hit = order, sums, hit

    @classmethod
    def of(cls, part: Partition, buckets: list[Sums]) -> DenseInbox | None:
        """Add the senders' sums in order (a first one taken as is, like the dict inbox);
        None if a message goes to a vertex the partition does not hold yet."""
        fan = part.fanout()
        sums = _np.zeros(fan.n)
        hit = _np.zeros(fan.n, dtype=_np.bool_)
        for source, bucket in enumerate(buckets):
            pos = fan.locate(bucket.ids, source)
            if pos is None:
                return None
            sums[pos] = _np.where(hit[pos], sums[pos] + bucket.sums, bucket.sums)
            hit[pos] = True
        return cls(fan.order, sums, hit)

    def __len__(self) -> int:
        return int(self.hit.sum())

    def per_vertex(self, total: int) -> list[Any]:
        """Each vertex's folded message or None, for ``total`` vertices (later ones: None)."""
        out = self.sums.tolist()
        for i in _np.flatnonzero(~self.hit).tolist():
            out[i] = None
        out.extend([None] * (total - len(out)))
        return out

    def to_dict(self) -> dict[Any, float]:
        """vertex id → folded message: what a dict inbox holds (checkpoints)."""
        idx = _np.flatnonzero(self.hit).tolist()
        order = self.order
        return dict(zip([order[i] for i in idx], self.sums[idx].tolist()))


# --------------------------------------------------------------------------- aggregators


def fold_into(
    folds: Mapping[str, Callable[[Any, Any], Any]], acc: dict[str, Any], more: Mapping[str, Any]
) -> dict[str, Any]:
    """Fold partial aggregates ``more`` into ``acc`` (in place) with each aggregator's fold."""
    for name, value in more.items():
        acc[name] = folds[name](acc[name], value) if name in acc else value
    return acc


# --------------------------------------------------------------------------- partitions


class Context:
    """What ``compute`` sees besides the vertex's value: the ``ctx`` argument."""

    __slots__ = (
        "_part",
        "_partial",
        "_aggregated",
        "_vid",
        "_at",
        "_targets",
        "_route",
        "_send_many",
        "_folds",
        "_fan",
        "superstep",
        "num_vertices",
        "send",
    )

    def __init__(
        self,
        part: Partition,
        outbox: Outbox,
        superstep: int,
        num_vertices: int,
        aggregated: Mapping[str, Any],
        partial: dict[str, Any],
    ) -> None:
        self._part = part
        self._aggregated = aggregated
        self._partial = partial
        self._vid: Any = None
        self._at = -1  # the vertex's position in the partition (the Fanout's order)
        self.superstep = superstep
        self.num_vertices = num_vertices
        #: ``send(to, message)``: deliver ``message`` to vertex ``to`` in the next superstep
        self.send = outbox.send
        # bound once per superstep: these run once per vertex
        self._targets = part.targets
        self._route = part.route
        self._send_many = outbox.send_many
        self._folds = part.program.aggregators
        self._fan: Fanout | None = None

    def send_to_neighbors(self, message: Any) -> None:
        """Send ``message`` along every out-edge of this vertex."""
        fan = self._fan
        if fan is not None and type(message) is float:
            i = self._at
            if i < fan.n:  # a vertex the Fanout knows: its position, not a dict lookup
                fan.msgs[i] += message
                fan.sent[i] = 1
                return
        self._send_many(self._route(self._vid), message)

    @property
    def targets(self) -> list[Any]:
        """The ids this vertex's out-edges point to (in input order)."""
        return self._targets.get(self._vid, [])

    @property
    def edges(self) -> list[tuple[Any, Any]]:
        """``(target, edge value)`` pairs; the value is None for edges given without one."""
        targets = self._part.targets.get(self._vid, [])
        values = self._part.weights.get(self._vid)
        return list(zip(targets, values if values is not None else [None] * len(targets)))

    def aggregate(self, name: str, value: Any) -> None:
        """Fold ``value`` into aggregator ``name``; every vertex sees the total next superstep."""
        folds = self._folds
        if name not in folds:
            raise KeyError(f"no aggregator named {name!r} (declare it in 'aggregators')")
        partial = self._partial
        partial[name] = folds[name](partial[name], value) if name in partial else value

    def aggregated(self, name: str, default: Any = None) -> Any:
        """The folded value of aggregator ``name`` from the previous superstep."""
        return self._aggregated.get(name, default)


@dataclass
class StepStats:
    """What one partition reports at the barrier after a superstep."""

    active: int = 0  # vertices that did not vote to halt
    sent: int = 0  # messages sent (before combining)
    aggregates: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""
    vertices: int = 0


class Partition:
    """The vertices one partition owns: values, out-edges and halted flags, kept between steps."""

    def __init__(self, index: int, count: int, program: Program) -> None:
        self.index = index
        self.count = count
        self.program = program
        self.values: dict[Any, Any] = {}
        self.targets: dict[Any, list[Any]] = {}
        self.weights: dict[Any, list[Any]] = {}
        self.halted: set[Any] = set()
        #: vertex → its out-edges grouped by destination partition (built on first send)
        self.routes: dict[Any, tuple[tuple[int, list[Any]], ...]] = {}
        self._fanout: Fanout | None = None

    def __len__(self) -> int:
        return len(self.values)

    def add(self, vid: Any, value: Any, targets: list[Any], weights: list[Any] | None) -> None:
        """Merge one record: edges of one id from several records are concatenated in the
        order they are added, the first value that is not None wins."""
        values = self.values
        if vid not in values:
            values[vid] = value
            self.targets[vid] = list(targets)
            if weights is not None:
                self.weights[vid] = list(weights)
            return
        if not targets and weights is None:  # no edge (an edge's target): a value at most
            if value is not None and values[vid] is None:
                values[vid] = value
            return
        if values[vid] is None:
            values[vid] = value
        old = self.targets[vid]
        if weights is not None or vid in self.weights:
            self.weights.setdefault(vid, [None] * len(old)).extend(
                weights if weights is not None else [None] * len(targets)
            )
        old.extend(targets)

    def load(self, tagged: Iterable[tuple[Tag, Record]]) -> None:
        """Merge records in tag order; the result does not depend on who read what."""
        add = self.add
        for _tag, (vid, value, targets, weights) in sorted(tagged, key=_by_tag):
            add(vid, value, targets, weights)

    def pieces(self) -> tuple[dict[Any, Any], dict[Any, list[Any]], dict[Any, list[Any]]]:
        """The records added so far, compact (what a reader sends the owner of a partition)."""
        return self.values, self.targets, self.weights

    def absorb(self, pieces: tuple[dict, dict, dict]) -> None:
        """Merge another partition's :meth:`pieces` as if its records were added after ours
        (taking over its lists)."""
        values, targets, weights = pieces
        if not self.values:
            self.values, self.targets, self.weights = values, targets, weights
            return
        if weights or self.weights:  # edge values to line up: record by record
            add = self.add
            for vid, value in values.items():
                add(vid, value, targets[vid], weights.get(vid))
            return
        # values and targets hold the same ids in the same order (add appends to both): one
        # pass over both, no id looked up in theirs
        mine, own_targets = self.values, self.targets
        held = own_targets.get
        for (vid, value), edges in zip(values.items(), targets.values()):
            old = held(vid)
            if old is None:
                mine[vid] = value
                own_targets[vid] = edges
                continue
            if edges:
                old.extend(edges)
            if value is not None and mine[vid] is None:
                mine[vid] = value

    def route(self, vid: Any) -> tuple[tuple[int, list[Any]], ...]:
        """``vid``'s out-edges as (destination partition, targets) groups, kept for later
        supersteps."""
        route = self.routes.get(vid)
        if route is None:
            targets = self.targets.get(vid, [])
            if self.count == 1:
                return ((0, targets),)
            groups: dict[int, list[Any]] = {}
            count = self.count
            for to in targets:
                groups.setdefault(partition_of(to, count), []).append(to)
            route = self.routes[vid] = tuple(groups.items())
        return route

    def step(
        self,
        superstep: int,
        inbox: Mapping[Any, Any] | DenseInbox,
        outbox: Outbox,
        num_vertices: int,
        aggregated: Mapping[str, Any],
        on_error: str = "fail",
    ) -> StepStats:
        """Run ``compute`` for every active vertex and every vertex with messages."""
        program = self.program
        compute = program.compute
        stats = StepStats()
        ctx = Context(self, outbox, superstep, num_vertices, aggregated, stats.aggregates)
        fan = None
        if _np is not None and outbox.fold is operator.add:
            fan = ctx._fan = self.fanout()
            fan.start()
        values = self.values
        halted = self.halted
        if type(inbox) is DenseInbox:  # every message is to a vertex held (see DenseInbox.of)
            pending = inbox.per_vertex(len(values))
        else:
            if inbox.keys() - values.keys():  # a message creates its vertex (in inbox order)
                for vid in [v for v in inbox if v not in values]:
                    values[vid] = None
                    self.targets[vid] = []
            get = inbox.get
            pending = [get(vid) for vid in values]
        sent_before = outbox.sent
        sent, spill_at = outbox._sent, outbox.spill_at
        folded = program.fold is not None  # the inbox holds one folded message per vertex
        # the vertices in order: the Fanout's list when it holds them all (no copy per step)
        order = fan.order if fan is not None and fan.n == len(values) else list(values)
        active = 0
        for at, (vid, msgs) in enumerate(zip(order, pending)):
            if msgs is None:
                if vid in halted:
                    continue
                msgs = []
            elif folded:
                msgs = [msgs]
            ctx._vid = vid
            ctx._at = at
            try:
                out = compute(ctx, vid, values[vid], msgs)
            except Exception as exc:
                self._failed(stats, vid, superstep, f"{type(exc).__name__}: {exc}", on_error, exc)
                continue
            if type(out) is not tuple or len(out) != 2:
                problem = f"compute must return (value, halt), got {type(out).__name__}"
                self._failed(stats, vid, superstep, problem, on_error, None)
                continue
            value, halt = out
            if spill_at is not None and sent[0] >= spill_at:
                outbox.spill_held()
                spill_at = outbox.spill_at
            values[vid] = value
            if halt:
                halted.add(vid)
            else:
                halted.discard(vid)
                active += 1
        stats.active = active
        if fan is not None:
            fan.flush(outbox)
        stats.sent = outbox.sent - sent_before
        stats.vertices = len(values)
        return stats

    def _failed(
        self,
        stats: StepStats,
        vid: Any,
        superstep: int,
        problem: str,
        on_error: str,
        exc: BaseException | None,
    ) -> None:
        """A vertex raised: stop the job, or (``on_error: continue``) keep its value and halt it."""
        where = f"vertex {vid!r} in superstep {superstep}: {problem}"
        if on_error != "continue":
            raise VertexError(where) from exc
        stats.errors += 1
        stats.first_error = stats.first_error or where
        self.halted.add(vid)

    def output_lines(self) -> Iterator[str]:
        """The job's output for this partition: one line per vertex, ``output`` may skip one."""
        output = self.program.output
        for vid, value in self.values.items():
            try:
                line = output(vid, value)
            except Exception as exc:  # the user's output(): name it and the vertex
                text = repr(value)
                shown = text if len(text) <= 60 else text[:57] + "..."
                problem = f"output({vid!r}, {shown}) raised {type(exc).__name__}: {exc}"
                raise VertexError(problem) from exc
            if line is not None:
                yield str(line)

    # ------------------------------------------------------------ checkpoints

    def dump(self, inbox: Mapping[Any, Any] | DenseInbox) -> bytes:
        """The partition and its pending inbox as bytes: a checkpoint before a superstep."""
        pending = inbox.to_dict() if type(inbox) is DenseInbox else dict(inbox)
        state = (self.values, self.targets, self.weights, self.halted, pending)
        return pickle.dumps(state, PICKLE_PROTOCOL)

    def restore(self, blob: bytes) -> dict[Any, list[Any]]:
        """Replace this partition's state with a checkpoint; returns the inbox it held."""
        self.values, self.targets, self.weights, self.halted, inbox = pickle.loads(blob)
        self.routes = {}
        self._fanout = None
        return inbox

    def fanout(self) -> Fanout:
        """The out-edges as arrays (built once, on the first superstep that sums floats)."""
        if self._fanout is None:
            self._fanout = Fanout(self)
        return self._fanout


class Fanout:
    """A partition's out-edges as arrays, for one float to every neighbour, summed (PageRank):
    ``send_to_neighbors`` notes the float per sender, and at the end of the superstep
    ``numpy.bincount`` adds them along every edge, in the order the Python loop would (so the
    sums are the same to the bit)."""

    def __init__(self, part: Partition) -> None:
        assert _np is not None
        count = part.count
        order = self.order = list(part.values)
        self._sorted: tuple[Any, Any] | None = None  # see locate
        self._located: dict[int, tuple[Any, Any]] = {}  # sender → its last ids, their positions
        n = len(order)
        targets = part.targets
        edges = [targets.get(vid, ()) for vid in order]
        flat_ids = _int_array(list(itertools.chain.from_iterable(edges)))
        if flat_ids is None:
            self.dests = self._dests_by_loop(order, edges, count)
        else:
            sender = _np.repeat(_np.arange(n), [len(e) for e in edges])
            owner = partitions_of(flat_ids, count)
            self.dests = []
            for d in range(count):
                mine = owner == d
                if mine.any():
                    ids, flat = _first_seen(flat_ids[mine])
                    degree = _np.bincount(sender[mine], minlength=n).astype(_np.intp)
                    self.dests.append((d, ids, flat.astype(_np.intp), degree))
        self.n = n
        #: the vertices with an out-edge: when each of them sent, every edge carries a sum
        self.senders = _np.flatnonzero(sum(degree for _, _, _, degree in self.dests) > 0)
        self.msgs: list[float] = []
        self.sent = bytearray()

    @staticmethod
    def _dests_by_loop(order: list[Any], edges: list[Any], count: int) -> list[tuple]:
        """Per destination partition: its target ids (in first-seen order), per edge the
        target's index among them, per sender its number of edges there."""
        n = len(order)
        universe: list[list[Any]] = [[] for _ in range(count)]
        index: list[dict[Any, int]] = [{} for _ in range(count)]
        flat: list[list[int]] = [[] for _ in range(count)]
        degree = [[0] * n for _ in range(count)]
        for i, targets in enumerate(edges):
            for to in targets:
                d = 0 if count == 1 else partition_of(to, count)
                j = index[d].get(to)
                if j is None:
                    j = index[d][to] = len(universe[d])
                    universe[d].append(to)
                flat[d].append(j)
                degree[d][i] += 1
        dests = []
        for d in range(count):
            if universe[d]:
                ids = _int_array(universe[d])
                if ids is None:
                    ids = _np.empty(len(universe[d]), dtype=object)
                    ids[:] = universe[d]
                dests.append(
                    (d, ids, _np.array(flat[d], dtype=_np.intp), _np.array(degree[d], _np.intp))
                )
        return dests

    def locate(self, ids: Any, source: int | None = None) -> Any:
        """The positions of vertex ``ids`` (an int64 array) in :attr:`order`, or None if one
        is not held here (or this partition's ids are not all int64). Kept per ``source``
        (sender): its ids repeat every superstep, and comparing them is cheaper than a search."""
        if source is not None:
            known = self._located.get(source)
            if known is not None and _np.array_equal(known[0], ids):
                return known[1]
            pos = self.locate(ids)
            if pos is not None:
                self._located[source] = (_np.array(ids), pos)  # a copy: ids may be a view
            return pos
        if self._sorted is None:
            keys = _int_array(self.order) if self.n else None
            if keys is None:
                self._sorted = (None, None)
            else:
                by = _np.argsort(keys, kind="stable")
                self._sorted = (keys[by], by)
        keys, by = self._sorted
        if keys is None:
            return None
        at = _np.searchsorted(keys, ids)
        _np.minimum(at, len(keys) - 1, out=at)
        if not _np.array_equal(keys[at], ids):
            return None
        return by[at]

    def start(self) -> None:
        self.msgs = [0.0] * self.n
        self.sent = bytearray(self.n)

    def flush(self, outbox: Outbox) -> None:
        """Add this superstep's floats along every edge into the outbox's buckets."""
        if not any(self.sent):
            return
        msgs = _np.array(self.msgs, dtype=_np.float64)
        senders = _np.frombuffer(bytes(self.sent), dtype=_np.bool_)
        if senders[self.senders].all():  # every target has a sum: no live edges to pick
            senders = None
        for d, ids, flat, degree in self.dests:
            weights = _np.repeat(msgs, degree)
            if senders is None:
                sums = _np.bincount(flat, weights=weights, minlength=len(ids))
                outbox._sent[0] += len(flat)
                self._put(outbox, d, ids, sums)
                continue
            live = _np.repeat(senders, degree)
            if not live.any():
                continue
            sums = _np.bincount(flat, weights=weights, minlength=len(ids))
            hit = _np.zeros(len(ids), dtype=_np.bool_)
            hit[flat[live]] = True
            chosen = _np.flatnonzero(hit)
            outbox._sent[0] += int(live.sum())
            self._put(outbox, d, ids[chosen], sums[chosen])

    @staticmethod
    def _put(outbox: Outbox, d: int, ids: Any, sums: Any) -> None:
        """Sums to destination ``d``: as arrays for integer ids, else into its bucket."""
        if ids.dtype != object:
            outbox.pieces[d].append(Sums(ids, sums))
        else:
            _deliver(outbox.buckets[d], ids.tolist(), sums.tolist(), True, operator.add)


def _int_array(ids: list[Any]) -> Any:
    """``ids`` as an int64 array if they are all plain ints that fit, else None."""
    if not all(type(i) is int for i in ids):
        return None
    try:
        return _np.array(ids, dtype=_np.int64)
    except OverflowError:
        return None


def _first_seen(ids: Any) -> tuple[Any, Any]:
    """The distinct ``ids`` in the order they first occur, and each element's index among
    them (what a dict filled in order would number them)."""
    uniq, first, inverse = _np.unique(ids, return_index=True, return_inverse=True)
    perm = _np.argsort(first, kind="stable")
    rank = _np.empty_like(perm)
    rank[perm] = _np.arange(len(perm))
    return uniq[perm], rank[inverse.reshape(-1)]


def partitions_of(ids: Any, count: int) -> Any:
    """:func:`partition_of` of every id of an int64 array, in numpy (the same numbers)."""
    if count == 1:
        return _np.zeros(len(ids), dtype=_np.int64)
    mixed = ids.view(_np.uint64) * _np.uint64(_MIX)  # wraps mod 2**64 like ``& _MASK``
    return ((mixed >> _np.uint64(32)) % _np.uint64(count)).astype(_np.int64)
