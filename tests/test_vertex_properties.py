"""Vertex jobs on random graphs against a plain-Python Pregel written in this file (dicts, no
partitions, no combiner, no files): the workers in threads with 1-3 workers, 1-5 partitions,
checkpoints, a min combiner by name or as a function, aggregators read back by every vertex;
ids of mixed types, messages to vertices no line declared (they are created), halted
vertices woken by a message, blank and comment lines, CRLF files, a file without its last
newline, a compressed file (.gz, .bz2 or .xz)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
from pathlib import Path
from typing import Any

import pytest

import tests.test_vertex_driver as driver_tests
from remap.vertex.program import program_from_namespace

MAX_SUPERSTEPS = 40
AGGREGATORS = {"n": "sum", "low": "min"}


def prepare(line: str):
    parts = line.split()
    if not parts or parts[0].startswith("#"):
        return None
    ids = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return (ids[0], None, ids[1:])


def _start(vid: Any) -> int:
    return sum(map(ord, str(vid))) % 97


def compute(ctx, vid, value, messages):
    """Superstep 0: a label from the id, sent along every edge (+1), some to a vertex no one
    declared; some vertices halt at once. Later: the smallest label heard, passed on when it
    improves; every vertex halts and wakes only for a message. The value keeps the
    aggregates it read."""
    n, low = ctx.aggregated("n"), ctx.aggregated("low")
    ctx.aggregate("n", 1)
    if ctx.superstep == 0:
        label = _start(vid)
        for to in ctx.targets:
            ctx.send(to, label + 1)
        if label % 5 == 0:
            ctx.send(f"ghost-{vid}", label)
        return (label, n, low), label % 3 == 0
    heard = min(messages) if messages else None
    if heard is not None:
        ctx.aggregate("low", heard)
    label = None if value is None else value[0]
    if heard is not None and (label is None or heard < label):
        label = heard
        for to in ctx.targets:
            ctx.send(to, label + 1)
    return (label, n, low), True


def reference(lines: list[str]) -> tuple[dict[str, str], int]:
    """Pregel as the README states it, on one dict: records of one id merge (edges in input
    order); a message sent in S arrives in S+1 and wakes its vertex, creating it if no line
    declared it; aggregates of S are read in S+1; the job ends when all halted and nothing
    is in flight."""
    values: dict[Any, Any] = {}
    targets: dict[Any, list[Any]] = {}
    for line in lines:
        record = prepare(line)
        if record is None:
            continue
        vid, value, edges = record
        values.setdefault(vid, value)
        targets.setdefault(vid, []).extend(edges)
    halted: set[Any] = set()
    inbox: dict[Any, list[Any]] = {}
    aggregated: dict[str, Any] = {}
    folds = {"n": lambda a, b: a + b, "low": min}

    class Ctx:
        pass

    supersteps = 0
    for superstep in range(MAX_SUPERSTEPS):
        outbox: dict[Any, list[Any]] = {}
        partial: dict[str, Any] = {}
        for vid in inbox:
            if vid not in values:
                values[vid], targets[vid] = None, []
        active = 0
        for vid in list(values):
            messages = inbox.get(vid)
            if messages is None and vid in halted:
                continue
            ctx = Ctx()
            ctx.superstep, ctx.targets = superstep, targets[vid]
            ctx.send = lambda to, m, outbox=outbox: outbox.setdefault(to, []).append(m)
            ctx.aggregated = aggregated.get

            def aggregate(name, v, partial=partial):
                partial[name] = folds[name](partial[name], v) if name in partial else v

            ctx.aggregate = aggregate
            values[vid], halt = compute(ctx, vid, values[vid], messages or [])
            if halt:
                halted.add(vid)
            else:
                halted.discard(vid)
                active += 1
        supersteps += 1
        inbox, aggregated = outbox, partial
        if not active and not outbox:
            break
    return {str(k): str(v) for k, v in values.items()}, supersteps


def _graph(rng: random.Random) -> list[str]:
    n = rng.randrange(1, 30)
    ids = [rng.choice([i, f"v{i}", -i, f"é{i}"]) for i in range(n)]
    lines = []
    for _ in range(rng.randrange(1, 60)):
        roll = rng.random()
        if roll < 0.1:
            lines.append("")
        elif roll < 0.15:
            lines.append("# a comment")
        else:
            edges = rng.sample(ids, rng.randrange(0, min(4, n) + 1))
            lines.append(" ".join(map(str, [rng.choice(ids), *edges])))
    return lines


@pytest.mark.parametrize("seed", range(10))
def test_random_graphs_equal_a_plain_pregel(tmp_path: Path, seed: int, monkeypatch) -> None:
    """Every vertex's value (label and the aggregates it read) and the superstep count equal
    the plain reference's, whatever the workers, partitions, combiner and checkpoints."""
    rng = random.Random(seed)
    lines = _graph(rng)
    want, supersteps = reference(lines)
    namespace: dict[str, Any] = {"prepare": prepare, "compute": compute, "aggregators": AGGREGATORS}
    combine = rng.choice([None, "min", lambda messages: min(messages)])
    if combine is not None:
        namespace["combine"] = combine
    program = program_from_namespace(namespace, "<random>")
    workers = rng.choice([1, 2, 3])
    partitions = max(workers, rng.choice([1, 2, 3, 5]))
    (tmp_path / "in").mkdir()
    cut = rng.randrange(len(lines) + 1)
    (tmp_path / "in" / "a.txt").write_text("\n".join(lines[:cut]) + rng.choice(["", "\n"]))
    second = "\r\n".join(lines[cut:]).encode()
    if rng.random() < 0.3:  # read decompressed, by one worker
        suffix, pack = [(".gz", gzip), (".bz2", bz2), (".xz", lzma)][seed % 3]
        (tmp_path / "in" / f"b.txt{suffix}").write_bytes(pack.compress(second))
    else:
        (tmp_path / "in" / "b.txt").write_bytes(second)
    # ids are not all numbers here: keep the output's ids as text
    monkeypatch.setattr(driver_tests, "parse_output", lambda out: dict(x.split("\t") for x in out))
    got, result, _ = driver_tests.run_threads(
        program,
        tmp_path,
        workers,
        partitions=partitions,
        max_supersteps=MAX_SUPERSTEPS,
        checkpoint_every=rng.choice([0, 1, 3]),
    )
    assert got == want, (workers, partitions, combine)
    assert result.supersteps == supersteps
