"""The pure vertex engine and the in-process reference runner: Pregel semantics, examples
against networkx, and the same output for any number of partitions or input files."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest

from remap.errors import ConfigError
from remap.vertex.engine import (
    Outbox,
    Partition,
    VertexError,
    encode_bucket,
    partition_of,
)
from remap.vertex.program import program_from_namespace
from tests.vertex_graphs import (
    EXAMPLES,
    edge_lines,
    example,
    parse_output,
    power_law_digraph,
    write_files,
)
from tests.vertex_reference import deliver_bytes, read_tagged_lines, run_local


def tagged(lines):
    return [((0, i), line) for i, line in enumerate(lines)]


def program(**ns):
    ns.setdefault(
        "prepare", lambda line: (int(line.split()[0]), 0, [int(x) for x in line.split()[1:]])
    )
    return program_from_namespace(ns, "<test>")


def test_partition_of_is_stable_and_spreads():
    """Partitioning is a fixed function of the id (not the salted hash()) and balances ids."""
    assert [partition_of(i, 7) for i in range(5)] == [partition_of(i, 7) for i in range(5)]
    assert partition_of("abc", 5) == partition_of("abc", 5)
    counts = Counter(partition_of(i, 4) for i in range(10_000))
    assert min(counts.values()) > 2_000
    counts = Counter(partition_of(f"v{i}", 4) for i in range(10_000))
    assert min(counts.values()) > 2_000
    assert partition_of(("a", 1), 1) == 0


def test_ids_equal_in_python_have_one_owner():
    """1, True, 1.0, numpy.int64(1) and numpy.float64(1.0) are one key of a partition's dict,
    so one partition owns them (and tuples of them), whatever the count."""
    np = pytest.importorskip("numpy")
    for count in (2, 3, 7, 64):
        for same in ([5, 5.0, np.int64(5), np.int32(5), np.float64(5.0)], [1, True], [0, -0.0]):
            assert len({partition_of(v, count) for v in same}) == 1, (same, count)
        assert partition_of((np.int64(1), 2.0), count) == partition_of((1, 2), count)
    assert partition_of(2.5, 3) == partition_of(2.5, 3)


@pytest.mark.parametrize("partitions", [1, 3, 5])
def test_a_message_to_a_numpy_integer_id_reaches_that_vertex(partitions):
    """A vertex sending to numpy.int64(t) (ids from an array) reaches vertex t: on several
    partitions it went to the partition of repr(numpy.int64(t)) and made a second vertex
    with value None there (compute then raised on it)."""
    np = pytest.importorskip("numpy")

    def compute(ctx, vid, value, messages):
        if ctx.superstep == 0:
            for t in ctx.targets:
                ctx.send(np.int64(t), 1)
            return value, True
        return value + sum(messages), True

    lines = [f"{i} {(i + 1) % 8}" for i in range(8)]
    result = run_local(program(compute=compute), tagged(lines), partitions, 5)
    assert sorted(sum(result.partitions, [])) == [f"{i}\t1" for i in range(8)]


def test_message_sent_in_s_is_delivered_in_s_plus_1_and_wakes_a_halted_vertex():
    """Vertex 1 halts at once; a message vertex 0 sends in superstep 2 wakes it in 3 only."""
    seen = []

    def compute(ctx, vid, value, messages):
        seen.append((ctx.superstep, vid, list(messages)))
        if vid == 0 and ctx.superstep == 2:
            ctx.send(1, "hello")
        return value, vid == 1 or ctx.superstep >= 2

    result = run_local(program(compute=compute), tagged(["0", "1"]), 2, 10)
    assert (3, 1, ["hello"]) in seen
    assert [s for s in seen if s[1] == 1] == [(0, 1, []), (3, 1, ["hello"])]
    assert result.supersteps == 4  # 0..3; after 3 everyone halted with nothing in flight


def test_stops_when_all_halted_and_no_message_in_flight_or_at_max_supersteps():
    """A message still in flight keeps the job going; max_supersteps caps a job that never halts."""

    def compute(ctx, vid, value, messages):
        if ctx.superstep < 3:
            ctx.send(vid, 1)  # halt, but a message to self is in flight
        return value + len(messages), True

    result = run_local(program(compute=compute), tagged(["0"]), 1, 100)
    assert result.supersteps == 4 and result.partitions == [["0\t3"]]
    forever = run_local(program(compute=lambda c, v, x, m: (x + 1, False)), tagged(["0"]), 3, 5)
    assert forever.supersteps == 5 and sum(forever.partitions, []) == ["0\t5"]


@pytest.mark.parametrize("combine", [sum, "sum", lambda messages: sum(messages)])
def test_combiner_and_aggregators_fold_per_superstep(combine):
    """The combiner (a fold by name or builtin, or any function of a list) merges at the
    sender; an aggregator's fold is visible in the next superstep."""
    got = {}

    def compute(ctx, vid, value, messages):
        if ctx.superstep == 0:
            ctx.send(0, vid)
            ctx.aggregate("total", vid)
            ctx.aggregate("low", vid)
            ctx.aggregate("custom", {vid})
            return value, vid != 0
        got[ctx.superstep] = (
            list(messages),
            ctx.aggregated("total"),
            ctx.aggregated("low"),
            ctx.aggregated("custom"),
            ctx.aggregated("missing", "d"),
        )
        return value, True

    prog = program(
        compute=compute,
        combine=combine,
        aggregators={"total": "sum", "low": "min", "custom": lambda a, b: a | b},
    )
    lines = [str(i) for i in range(1, 11)] + ["0"]
    for parts in (1, 3):
        got.clear()
        run_local(prog, tagged(lines), parts, 10)
        messages, total, low, custom, missing = got[1]
        assert sum(messages) == 55 and len(messages) <= parts  # one combined message per sender
        assert (total, low, custom, missing) == (55, 0, set(range(11)), "d")


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_summed_message_object_sent_to_several_vertices_is_never_added_to_in_place(partitions):
    """combine = "sum" over list messages (or arrays): u sends one list to a and b, w sends
    to a only. Folding w's message into a's slot must not extend u's list, which b's slot
    holds too (b received w's message) — nor the list u keeps as its value."""

    def compute(ctx, vid, value, messages):
        if ctx.superstep == 0:
            mine = [vid]
            ctx.send_to_neighbors(mine)
            return mine, True
        return (value, sorted(x for m in messages for x in m)), True

    prog = program_from_namespace(
        {
            "prepare": lambda line: (line.split()[0], None, line.split()[1:]),
            "compute": compute,
            "combine": "sum",
        },
        "<test>",
    )
    result = run_local(prog, tagged(["u a b", "w a", "a", "b"]), partitions, 5)
    got = dict(line.split("\t") for line in sum(result.partitions, []))
    assert got["a"] == "(['a'], ['u', 'w'])"
    assert got["b"] == "(['b'], ['u'])"
    assert got["u"] == "['u']" and got["w"] == "['w']"


def test_outbox_without_combiner_keeps_every_message_and_counts_them():
    """Without a combiner every message arrives; counts are per destination partition."""
    box = Outbox(3, None)
    for i in range(30):
        box.send(i % 5, i)
    assert box.sent == 30 and sum(box.counts()) == 30
    inbox: dict = {}
    for p in range(3):
        deliver_bytes(inbox, box.encode(p))
    assert sorted(sum(inbox.values(), [])) == list(range(30))


@pytest.mark.parametrize("spill_after", [1, 4, 7, 1000])
def test_an_outbox_spilling_every_few_messages_gives_the_same_buckets_in_chunks(spill_after):
    """Without a combiner, an outbox spilling once ``spill_after`` messages are held hands over chunks
    that, delivered in order with what it still holds, give each destination exactly the
    inbox one unspilled outbox gives: the same lists in the same order, the same first-seen
    order of ids; it never holds more than ``spill_after`` messages, and counts them all."""
    rnd = random.Random(3)
    sends = [(rnd.randrange(12), (i, rnd.random())) for i in range(200)]
    chunks: list[tuple[int, int, bytes]] = []
    held: list[int] = []

    def spill(d: int, chunk: int, bucket: dict) -> None:
        chunks.append((d, chunk, encode_bucket(bucket, False)))

    plain, spilling = Outbox(3, None), Outbox(3, None, None, spill, spill_after)
    for to, message in sends:
        plain.send(to, message)
        spilling.send(to, message)
        if spilling.sent >= spilling.spill_at:  # what Partition.step checks after a vertex
            spilling.spill_held()
        held.append(sum(len(box) for b in spilling.buckets for box in b.values()))
    spilling.send_many([(0, [0, 3]), (1, [1])], "fan")
    plain.send_many([(0, [0, 3]), (1, [1])], "fan")
    assert max(held) < spill_after
    assert spilling.counts() == plain.counts() and spilling.sent == plain.sent == 203
    assert [c for _, c, _ in chunks] == sorted(c for _, c, _ in chunks)
    for d in range(3):
        want: dict = {}
        deliver_bytes(want, plain.encode(d))
        got: dict = {}
        for blob in [b for to, _, b in chunks if to == d] + [spilling.encode(d)]:
            deliver_bytes(got, blob)
        assert list(got.items()) == list(want.items()), d


def test_merges_vertex_records_from_many_lines_in_input_order():
    """One vertex's edges split over lines and files merge the same whichever partition reads them."""
    prog = program(compute=lambda c, v, x, m: (x, True))
    part = Partition(0, 1, prog)
    part.load([((1, 0), (5, None, [2], [9])), ((0, 9), (5, 7, [1], None))])
    assert part.values[5] == 7 and part.targets[5] == [1, 2] and part.weights[5] == [None, 9]


@pytest.mark.parametrize("weighted", [False, True])
def test_an_empty_partition_takes_the_first_chunk_over_and_merges_the_rest_after_it(weighted):
    """The merge after loading: a worker's partition starts from the first reader's chunk as
    it is (its dicts, no copy: a copy of ~10^5 entries on the slower worker's path), then
    the next chunk's records come after it: the same as adding every record in order."""
    prog = program(compute=lambda c, v, x, m: (x, True))
    records = [(1, None, [2, 3]), (2, "b", []), (1, "a", [4]), (3, None, [1]), (2, None, [1])]
    weights = [[7, 8], None, [9], [5], None] if weighted else [None] * 5
    chunks = [Partition(0, 1, prog), Partition(0, 1, prog)]
    for i, ((vid, value, targets), w) in enumerate(zip(records, weights)):
        chunks[i >= 2].add(vid, value, targets, w)
    want = Partition(0, 1, prog)
    for (vid, value, targets), w in zip(records, weights):
        want.add(vid, value, targets, w)
    first = chunks[0].pieces()
    part = Partition(0, 1, prog)
    part.absorb(first)
    assert part.values is first[0] and part.targets is first[1]
    part.absorb(chunks[1].pieces())
    assert (part.values, part.targets, part.weights) == (want.values, want.targets, want.weights)
    assert list(part.values) == list(want.values) == [1, 2, 3]


def test_checkpoint_round_trip():
    """A partition restored from its checkpoint continues exactly as the original."""
    prog = example("pagerank")
    lines = tagged(edge_lines(nx.gnp_random_graph(50, 0.1, seed=1, directed=True)))
    a = run_local(prog, lines, 1, 30)
    part = Partition(0, 1, prog)
    part.load([((0, i), r) for i, (_t, line) in enumerate(lines) for r in _records(prog, line)])
    blob = part.dump({1: [0.5]})
    other = Partition(0, 1, prog)
    assert other.restore(blob) == {1: [0.5]}
    assert other.values == part.values and other.targets == part.targets
    assert a.supersteps == 30


def _records(prog, line):
    from remap.vertex.engine import prepare_line

    return prepare_line(prog, line)


def test_vertex_errors_fail_or_continue():
    """A raising vertex fails the job naming vertex and superstep, or with on_error=continue
    keeps its value, halts, and is counted."""

    def compute(ctx, vid, value, messages):
        if vid == 3:
            raise ValueError("bad vertex")
        return value, True

    with pytest.raises(VertexError, match=r"vertex 3 in superstep 0: ValueError: bad vertex"):
        run_local(program(compute=compute), tagged(["1", "3"]), 2, 5)
    result = run_local(program(compute=compute), tagged(["1", "3"]), 2, 5, on_error="continue")
    assert result.reports[0].errors == 1
    with pytest.raises(VertexError, match="compute must return"):
        run_local(program(compute=lambda c, v, x, m: x), tagged(["1"]), 1, 5)
    with pytest.raises(VertexError, match=r"prepare\('x'\) raised ValueError"):
        run_local(program(compute=compute), tagged(["x"]), 1, 5)


def test_an_output_function_that_raises_names_itself_and_the_vertex():
    """output(id, value) raising fails the job with a line naming output, the vertex and its
    value (and the user's traceback as the cause). Before, the worker's call failed with the
    bare "ZeroDivisionError: division by zero", naming neither, and --traceback showed nothing."""

    def output(vid, value):
        return 1 / value

    prog = program(compute=lambda ctx, vid, value, messages: (value, True), output=output)
    with pytest.raises(VertexError, match=r"output\(3, 0\) raised ZeroDivisionError") as caught:
        run_local(prog, tagged(["3"]), 1, 5)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_the_readme_vertex_module_runs_on_the_example_graph():
    """The README's vertex job module, copied as written, runs over the example web graph
    (whose first line is a comment) and over a vertex without edges. Before, its prepare
    unpacked parse_edge's None for the comment and the job failed at its first line."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Vertex jobs", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    prog = program_from_namespace(namespace, "README.md")
    graph = sorted((EXAMPLES / "graphs" / "web").iterdir())
    assert next(iter(read_tagged_lines(graph)))[1].startswith("#")
    lines = [*read_tagged_lines(graph), ((9, 0), "9999")]
    result = run_local(prog, lines, 2, 3)
    lines_out = [line for part in result.partitions for line in part]
    assert "9999\tNone" in lines_out and len(lines_out) > 100


def test_program_validation_names_what_is_missing():
    """A module without compute, or with an unknown fold, is a one-line ConfigError."""
    with pytest.raises(ConfigError, match="must define compute"):
        program_from_namespace({"prepare": print}, "job.py")
    with pytest.raises(ConfigError, match="unknown fold 'avg'"):
        program_from_namespace(
            {"prepare": print, "compute": print, "aggregators": {"x": "avg"}}, "j"
        )


# ------------------------------------------------------------------ examples against networkx


def _run(name, lines, partitions, max_supersteps=200):
    result = run_local(example(name), tagged(lines), partitions, max_supersteps)
    return parse_output(sum(result.partitions, [])), result


GRAPHS = {
    "karate": lambda: nx.DiGraph(nx.karate_club_graph()),
    "gnp": lambda: nx.gnp_random_graph(300, 0.02, seed=3, directed=True),
    "powerlaw": lambda: power_law_digraph(10_000, seed=5),
}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_pagerank_matches_networkx(graph):
    """PageRank (dangling mass through an aggregator) within 1e-4 relative of networkx."""
    g = GRAPHS[graph]()
    got, result = _run("pagerank", edge_lines(g), 3)
    want = nx.pagerank(g, alpha=0.85, tol=1e-12, max_iter=1000, weight=None)
    assert set(got) == set(want)
    worst = max(abs(float(got[v]) - want[v]) / want[v] for v in want)
    assert worst < 1e-4, worst
    assert result.supersteps < 200  # it converged and halted by itself


@pytest.mark.parametrize("graph", ["karate", "gnp", "powerlaw"])
def test_connected_components_match_networkx(graph):
    """Components identical to networkx's up to relabelling (here: the smallest id)."""
    g = GRAPHS[graph]().to_undirected()
    g.add_nodes_from([10_001, 10_002])  # isolated vertices are components of their own
    got, _ = _run("connected_components", edge_lines(g), 4)
    want = {v: str(min(c)) for c in nx.connected_components(g) for v in c}
    assert got == want


def test_sssp_matches_networkx_with_unreachable_vertices():
    """Distances exact (integer weights) and unreachable vertices reported as such."""
    g = nx.gnp_random_graph(400, 0.01, seed=11, directed=True)
    rnd = random.Random(2)
    for u, v in g.edges:
        g[u][v]["w"] = rnd.randint(1, 20)
    got, _ = _run("sssp", edge_lines(g, weight="w"), 3)
    dist = nx.single_source_dijkstra_path_length(g, 0, weight="w")
    want = {v: str(dist[v]) if v in dist else "unreachable" for v in g.nodes}
    assert got == want and "unreachable" in want.values()


def test_propagate_max_matches_networkx():
    """Every vertex ends with the largest id that can reach it."""
    g = nx.gnp_random_graph(300, 0.008, seed=4, directed=True)
    got, _ = _run("propagate_max", edge_lines(g), 2)
    want = {v: str(max(nx.ancestors(g, v) | {v})) for v in g.nodes}
    assert got == want


@pytest.mark.parametrize("name", ["pagerank", "connected_components", "sssp", "propagate_max"])
def test_same_output_for_1_2_7_partitions_and_several_files(name, tmp_path: Path):
    """Partition count and how vertices are spread over input files do not change the output."""
    g = nx.gnp_random_graph(200, 0.03, seed=8, directed=True)
    for u, v in g.edges:
        g[u][v]["w"] = (u * 7 + v) % 9 + 1
    lines = edge_lines(g, weight="w" if name == "sssp" else None)
    outputs = []
    for parts, files in ((1, 1), (2, 3), (7, 5)):
        paths = write_files(tmp_path / f"in-{parts}", lines, files)
        result = run_local(example(name), read_tagged_lines(paths), parts, 300)
        outputs.append(parse_output(sum(result.partitions, [])))
    if name == "pagerank":
        for other in outputs[1:]:
            assert other.keys() == outputs[0].keys()
            assert all(
                math.isclose(float(other[v]), float(outputs[0][v]), rel_tol=1e-12) for v in other
            )
    else:
        assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("partitions", [1, 3])
def test_fanout_sums_are_those_of_the_python_loop_to_the_bit(monkeypatch, partitions):
    """Summed floats to every neighbour add up in numpy (Fanout) exactly as the per-edge loop
    adds them: same ranks, same counts, same aggregates, whichever runs."""
    import remap.vertex.engine as engine

    pytest.importorskip("numpy")
    g = power_law_digraph(400, seed=3)
    lines = list(enumerate(edge_lines(g)))
    tagged = [((0, i), line) for i, line in lines]
    fast = run_local(example("pagerank"), tagged, partitions, 12)
    monkeypatch.setattr(engine, "_np", None)
    slow = run_local(example("pagerank"), tagged, partitions, 12)
    assert fast.partitions == slow.partitions
    assert [(r.sent, r.delivered, r.aggregates) for r in fast.reports] == [
        (r.sent, r.delivered, r.aggregates) for r in slow.reports
    ]
