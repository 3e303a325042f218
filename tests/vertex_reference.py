"""The test oracle of vertex jobs: the whole algorithm over P partitions in one process (the
semantics every runner must match), and the workers in threads of this process.

Messages between partitions go through the same byte encoding the distributed workers use.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remap.data.inputs import Split, read_lines
from remap.vertex.driver import SuperstepReport
from remap.vertex.engine import (
    Outbox,
    Partition,
    Record,
    Tag,
    VertexError,
    _deliver,
    decode_bucket,
    fold_into,
    gather,
    partition_of,
    prepare_line,
)
from remap.vertex.launch import _drain
from remap.vertex.program import Program
from remap.vertex.worker import WorkerArgs, run_worker


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


def bucket_records(
    program: Program,
    lines: Iterable[tuple[Tag, str]],
    count: int,
    skipped: list[str] | None = None,
) -> list[list[tuple[Tag, Record]]]:
    """Parse tagged lines and sort their records into one list per owning partition; with
    ``skipped`` (``on_error: continue``) a line whose ``prepare`` raised is left out and its
    error appended there."""
    buckets: list[list[tuple[Tag, Record]]] = [[] for _ in range(count)]
    for tag, line in lines:
        try:
            records = prepare_line(program, line)
        except VertexError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            continue
        for rec in records:
            buckets[partition_of(rec[0], count)].append((tag, rec))
    return buckets


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


def deliver(
    inbox: dict[Any, Any],
    bucket: Mapping[Any, Any],
    combined: bool,
    fold: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Add one sender's bucket to a partition's inbox: vertex id → list of messages, or
    with a ``fold`` (combine is sum, min or max) vertex id → the one folded message."""
    _deliver(inbox, bucket.keys(), bucket.values(), combined, fold)


def deliver_bytes(
    inbox: dict[Any, Any], blob: bytes, fold: Callable[[Any, Any], Any] | None = None
) -> None:
    """:func:`deliver` of a bucket as the wire carries it."""
    combined, bucket = decode_bucket(blob)
    _deliver(inbox, bucket.keys(), bucket.values(), combined, fold)


class ThreadLaunch:
    """Each worker in a thread of this process: the driver's whole file protocol (commands,
    acks, messages, checkpoints, rollback) in one process."""

    def __init__(self, args: list[WorkerArgs]) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.results: list[Any] = []
        self.threads = [
            threading.Thread(
                target=self._run, args=(a,), name=f"vertex-worker-{a.slot}", daemon=True
            )
            for a in args
        ]
        for t in self.threads:
            t.start()

    def _run(self, args: WorkerArgs) -> None:
        try:
            self.results.append(run_worker(args))
        except Exception as exc:  # reported to the driver like a remote error
            self._events.put(("error", f"{type(exc).__name__}: {exc}"))

    def events(self) -> list[tuple[str, Any]]:
        return _drain(self._events)

    def kill(self) -> None:
        """Threads cannot be killed: the stop command (or a missing driver) ends them."""

    def calls(self) -> set[int] | None:
        """Threads are never taken back: nothing to report."""
        return None

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def wait(self, timeout: float) -> bool:
        """Wait for every worker thread to return (within ``timeout`` s in all)."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)
