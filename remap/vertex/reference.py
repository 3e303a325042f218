"""The whole algorithm over P partitions in one process: the semantics every runner must match.

Used by the tests (same result for any partition count) and by ``cluster.vertex`` when asked
to run in-process. Messages between partitions go through the same byte encoding the
distributed workers use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.inputs import Split, read_lines
from .engine import Outbox, Partition, Tag, bucket_records, fold_into, gather
from .program import Program


@dataclass
class SuperstepReport:
    """What the barrier counted after one superstep (the progress line of a job)."""

    superstep: int
    active: int
    sent: int
    delivered: int
    vertices: int
    aggregates: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""


@dataclass
class LocalResult:
    supersteps: int
    partitions: list[list[str]]  # output lines per partition
    reports: list[SuperstepReport]
    #: input lines whose ``prepare`` raised under ``on_error: continue`` (left out)
    load_errors: int = 0


def read_tagged_lines(paths: Iterable[Path]) -> Iterator[tuple[Tag, str]]:
    """Every line of every file, tagged with (file index, byte offset) for a stable merge."""
    for i, path in enumerate(paths):
        for offset, line in read_lines(Split(i, str(path), 0, os.path.getsize(path))):
            yield (i, offset), line


def run_local(
    program: Program,
    lines: Iterable[tuple[Tag, str]],
    partitions: int,
    max_supersteps: int,
    on_error: str = "fail",
) -> LocalResult:
    """Run a vertex program to the end over ``partitions`` in-memory partitions."""
    parts = [Partition(i, partitions, program) for i in range(partitions)]
    skipped: list[str] | None = [] if on_error == "continue" else None
    for part, bucket in zip(parts, bucket_records(program, lines, partitions, skipped)):
        part.load(bucket)
    inboxes: list[Any] = [{} for _ in parts]
    aggregated: dict[str, Any] = {}
    reports: list[SuperstepReport] = []
    for superstep in range(max_supersteps):
        num_vertices = sum(len(p) for p in parts)
        outboxes = [Outbox(partitions, program.combine, program.fold) for _ in parts]
        folded: dict[str, Any] = {}
        report = SuperstepReport(superstep, 0, 0, 0, 0)
        for part, outbox in zip(parts, outboxes):
            stats = part.step(
                superstep, inboxes[part.index], outbox, num_vertices, aggregated, on_error
            )
            fold_into(program.aggregators, folded, stats.aggregates)
            report.active += stats.active
            report.sent += stats.sent
            report.errors += stats.errors
            report.vertices += stats.vertices
        for outbox in outboxes:
            report.delivered += sum(outbox.counts())
        combined = program.combine is not None
        inboxes = [
            gather(
                part, [o.encode(part.index) for o in outboxes if o.buckets[part.index]], combined
            )
            for part in parts
        ]
        aggregated = folded
        report.aggregates = dict(folded)
        reports.append(report)
        if report.active == 0 and report.delivered == 0:
            break
    return LocalResult(
        len(reports), [list(p.output_lines()) for p in parts], reports, len(skipped or ())
    )
