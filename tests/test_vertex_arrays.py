"""Summed float messages as arrays: what Fanout sends (Sums), how it travels (raw bytes) and
how a receiver adds it up (DenseInbox), against the per-message dict path to the bit."""

from __future__ import annotations

import math
import operator
from pathlib import Path

import networkx as nx
import pytest

import remap.vertex.engine as engine
from remap.vertex.engine import (
    DenseInbox,
    Outbox,
    Partition,
    Sums,
    _with_sums,
    decode_bucket,
    gather,
)
from remap.vertex.program import program_from_namespace
from tests.test_vertex_driver import graph_input, run_threads
from tests.vertex_graphs import edge_lines, example, power_law_digraph
from tests.vertex_reference import deliver, run_local

np = pytest.importorskip("numpy")


def pagerank_partition(index: int, count: int, vertices: range) -> Partition:
    part = Partition(index, count, example("pagerank"))
    for v in vertices:
        if engine.partition_of(v, count) == index:
            part.add(v, None, [(v * v + 3 * k) % 40 for k in range(v % 4)], None)
    return part


def step_all(parts: list[Partition], inboxes: list, superstep: int, aggregated: dict) -> tuple:
    """One superstep of every partition, messages through bytes and ``gather``."""
    count = len(parts)
    outboxes = [Outbox(count, sum, operator.add) for _ in parts]
    folded: dict = {}
    for part, outbox in zip(parts, outboxes):
        stats = part.step(superstep, inboxes[part.index], outbox, 40, aggregated)
        engine.fold_into(part.program.aggregators, folded, stats.aggregates)
        outbox.finish()
    new = [
        gather(part, [o.encode(part.index) for o in outboxes if o.buckets[part.index]], True)
        for part in parts
    ]
    return new, folded


def test_summed_floats_travel_as_raw_arrays():
    """One float to every neighbour leaves the outbox as (int64 ids, float64 sums): 16 bytes a
    message and no pickle; decoded it gives the ids and sums the dict path would hold."""
    part = pagerank_partition(0, 2, range(40))
    outbox = Outbox(2, sum, operator.add)
    part.step(0, {}, outbox, 40, {})
    outbox.finish()
    remote = outbox.buckets[1]
    assert type(remote) is Sums and len(remote) > 0
    blob = outbox.encode(1)
    assert blob.startswith(Sums.MAGIC)
    assert len(blob) == len(Sums.MAGIC) + 8 + 16 * len(remote)
    combined, decoded = decode_bucket(blob)
    assert combined and decoded.keys() == remote.keys() and decoded.values() == remote.values()
    inbox: dict = {}
    deliver(inbox, decoded, True, operator.add)
    assert inbox == dict(zip(remote.keys(), remote.values()))
    with pytest.raises(ValueError, match="does not hold"):
        Sums.from_bytes(blob[:-1])


def test_dense_inbox_adds_senders_in_order_like_the_dict_inbox():
    """Two senders' sums to overlapping vertices: the arrays hold what the dict inbox holds,
    to the bit, and each vertex's message lines up with the partition's vertex order."""
    part = pagerank_partition(0, 1, range(40))
    part.fanout()
    a = Sums(np.array([3, 5, 7], dtype=np.int64), np.array([0.1, -0.0, 1e-17]))
    b = Sums(np.array([7, 3, 11], dtype=np.int64), np.array([1.0, 0.2, 0.3]))
    dense = gather(part, [a.to_bytes(), b], True)
    assert type(dense) is DenseInbox and len(dense) == 4
    want: dict = {}
    for sums in (a, b):
        deliver(want, sums, True, operator.add)
    got = dense.to_dict()
    assert got == want and [math.copysign(1, got[5])] == [-1.0]  # -0.0 taken as is
    pending = dense.per_vertex(len(part.values) + 2)
    assert dict((v, m) for v, m in zip(list(part.values), pending) if m is not None) == want
    assert pending[-2:] == [None, None]


def test_a_sum_to_a_vertex_not_held_takes_the_dict_path_and_creates_it():
    """Arrays only for vertices the partition holds: a message to a new id creates it."""
    part = pagerank_partition(0, 1, range(40))
    sums = Sums(np.array([3, 999], dtype=np.int64), np.array([0.5, 0.25]))
    inbox = gather(part, [sums.to_bytes()], True)
    assert inbox == {3: 0.5, 999: 0.25}
    part.step(0, inbox, Outbox(1, sum, operator.add), 41, {})
    assert 999 in part.values


def test_checkpoint_of_a_dense_inbox_restores_the_same_run():
    """A checkpoint taken with arrays in the inbox restores (as a dict inbox) to the very
    ranks of an uninterrupted run."""
    count = 3

    def fresh():
        return [pagerank_partition(i, count, range(40)) for i in range(count)]

    def run(parts, inboxes, start, stop):
        aggregated: dict = {}
        for s in range(start, stop):
            inboxes, aggregated = step_all(parts, inboxes, s, aggregated)
        return inboxes, aggregated

    straight = fresh()
    run(straight, [{}] * count, 0, 12)
    parts = fresh()
    inboxes, aggregated = run(parts, [{}] * count, 0, 5)
    assert all(type(i) is DenseInbox for i in inboxes)
    blobs = [p.dump(i) for p, i in zip(parts, inboxes)]
    restored = fresh()
    inboxes = [p.restore(b) for p, b in zip(restored, blobs)]
    for s in range(5, 12):
        inboxes, aggregated = step_all(restored, inboxes, s, aggregated)
    assert [p.values for p in restored] == [p.values for p in straight]


def test_sums_of_several_partitions_fold_as_a_shared_dict_would():
    """One worker's partitions each send sums to one destination: ids in first-sent order,
    each id's sums added piece by piece, the same bits as folding them into one dict."""
    pieces = [
        Sums(np.array([5, 1, 9], dtype=np.int64), np.array([0.1, 0.2, -0.0])),
        Sums(np.array([9, 2, 5], dtype=np.int64), np.array([0.7, 0.3, 0.2])),
        Sums(np.array([2, 8], dtype=np.int64), np.array([1e-16, 4.0])),
    ]
    merged = _with_sums({}, pieces)
    want = _with_sums({-1: 0.0}, pieces)
    del want[-1]
    assert type(merged) is Sums
    assert list(zip(merged.keys(), merged.values())) == list(want.items())


def mixed_program():
    """PageRank's fan-out plus single sends, some to vertices nobody declared."""
    pagerank = example("pagerank")

    def compute(ctx, vid, value, messages):
        value, halt = pagerank.compute(ctx, vid, 0.0 if value is None else value, messages)
        if ctx.superstep % 3 == 1 and vid % 5 == 0:
            ctx.send(vid + 1, 1e-3)  # to a neighbour in the same superstep as the fan-out
            ctx.send(10**6 + vid % 7, 0.5)  # creates a vertex
        return value, halt

    ns = {k: getattr(pagerank, k) for k in ("prepare", "output")}
    return program_from_namespace(
        {**ns, "compute": compute, "combine": "sum", "aggregators": pagerank.aggregators}, "t"
    )


@pytest.mark.parametrize("partitions", [1, 3])
def test_mixed_sends_match_the_python_loop_to_the_bit(monkeypatch, partitions):
    """Fan-out sums mixed with single sends and new vertices: numpy and the loop agree."""
    g = power_law_digraph(300, seed=5)
    tagged = [((0, i), line) for i, line in enumerate(edge_lines(g))]
    fast = run_local(mixed_program(), tagged, partitions, 10)
    monkeypatch.setattr(engine, "_np", None)
    slow = run_local(mixed_program(), tagged, partitions, 10)
    assert fast.partitions == slow.partitions
    assert [(r.sent, r.delivered) for r in fast.reports] == [
        (r.sent, r.delivered) for r in slow.reports
    ]


def test_workers_with_several_partitions_match_networkx_with_checkpoints(tmp_path: Path):
    """Array messages across workers owning several partitions each, checkpointed."""
    g = graph_input(tmp_path)
    got, result, _ = run_threads(example("pagerank"), tmp_path, 3, partitions=7, checkpoint_every=2)
    want = nx.pagerank(g, alpha=0.85, tol=1e-12, max_iter=1000, weight=None)
    assert all(math.isclose(float(got[v]), want[v], rel_tol=1e-4) for v in want)
    assert result.bytes_moved > 0


@pytest.mark.parametrize("count", [1, 2, 7])
def test_fanout_arrays_built_in_numpy_equal_the_loop(count):
    """Integer ids: the edge arrays come from numpy (partitions_of, first-seen order), equal
    to the per-edge loop's; partitions_of gives partition_of's numbers for any int64."""
    rnd = np.random.default_rng(3)
    ids = rnd.integers(-(2**63), 2**63 - 1, size=500).tolist() + list(range(-40, 40))
    assert engine.partitions_of(np.array(ids, dtype=np.int64), count).tolist() == [
        engine.partition_of(i, count) for i in ids
    ]
    part = Partition(0, count, example("pagerank"))
    for v in range(300):
        part.add(v * 7919 - 10**6, None, [ids[(v * k) % len(ids)] for k in range(v % 5)], None)
    fan = engine.Fanout(part)
    edges = [part.targets[v] for v in fan.order]
    loop = engine.Fanout._dests_by_loop(fan.order, edges, count)
    assert len(fan.dests) == len(loop)
    for (d, ids_a, flat_a, deg_a), (e, ids_b, flat_b, deg_b) in zip(fan.dests, loop):
        assert d == e and ids_a.tolist() == ids_b.tolist()
        assert flat_a.tolist() == flat_b.tolist() and deg_a.tolist() == deg_b.tolist()


def test_a_senders_positions_are_kept_while_its_ids_repeat():
    """The positions of a sender's ids are searched once while they repeat, and searched
    again when they change (never the last superstep's positions for other ids)."""
    part = pagerank_partition(0, 1, range(40))
    fan = part.fanout()
    first = fan.locate(np.array([3, 5, 7], dtype=np.int64), 0)
    again = fan.locate(np.array([3, 5, 7], dtype=np.int64), 0)
    assert again is first
    order = fan.order
    moved = fan.locate(np.array([7, 5, 9], dtype=np.int64), 0)
    assert [order[i] for i in moved.tolist()] == [7, 5, 9]
    for ids in ([9, 3], [3, 999]):
        sums = Sums(np.array(ids, dtype=np.int64), np.array([0.5, 0.25]))
        got = gather(part, [sums.to_bytes()], True)
        want: dict = {}
        deliver(want, sums, True, operator.add)
        assert (got.to_dict() if type(got) is DenseInbox else got) == want


@pytest.mark.parametrize("count", [1, 3])
def test_when_every_vertex_with_an_edge_sent_the_short_flush_gives_the_same_sums(count):
    """PageRank's supersteps: every vertex with an out-edge sends (a dangling one cannot).
    The flush then skips marking live edges and hit targets; its sums and counts are the
    masked path's to the bit (ids in the same order, -0.0 kept)."""
    part = pagerank_partition(0, count, range(60))
    fan = part.fanout()
    dangling = [i for i, v in enumerate(fan.order) if not part.targets[v]]
    assert dangling and len(fan.senders) == fan.n - len(dangling)

    def flush(force_masked: bool) -> tuple[list, int]:
        fan.start()
        for i in fan.senders.tolist():
            fan.msgs[i] += -0.0 if i % 7 == 0 else 1.0 / (i + 3)
            fan.sent[i] = 1
        outbox = Outbox(count, sum, operator.add)
        if force_masked:  # one more "sender" that did not send: the masked path
            fan.senders = np.append(fan.senders, dangling[0])
        try:
            fan.flush(outbox)
        finally:
            fan.senders = fan.senders[: fan.n - len(dangling)]
        got = [
            (d, p.ids.tobytes(), p.sums.tobytes()) for d in range(count) for p in outbox.pieces[d]
        ]
        return got, outbox.sent

    short, masked = flush(False), flush(True)
    assert short == masked and short[1] > 0
