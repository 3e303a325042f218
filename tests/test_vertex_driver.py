"""The vertex driver and workers over the job directory, with workers as threads: barriers,
message files, checkpoints and rollback after a lost worker, without starting processes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import lzma
import math
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import networkx as nx
import pytest
from twisted.internet.task import Clock

from remap.data.inputs import Split, resolve_inputs
from remap.data.inputs import read_lines as read_split_lines
from remap.data.layout import DataDir, read_json, read_result, remove_tree
from remap.errors import ConfigError, JobFailed, JobKilled
from remap.vertex import worker as worker_mod
from remap.vertex.driver import Driver, VertexConfig, WorkerLost
from remap.vertex.files import Layout, input_splits, read_lines, read_pickle
from remap.vertex.program import program_from_namespace
from tests.vertex_graphs import edge_lines, example, parse_output, write_files
from tests.vertex_reference import ThreadLaunch, read_tagged_lines, run_local


def run_threads(
    program,
    tmp_path: Path,
    workers: int,
    *,
    name="run",
    release=None,
    launch=ThreadLaunch,
    clock=time.monotonic,
    **cfg,
):
    launches: list[ThreadLaunch] = []

    def start(args):
        launches.append(launch(args))
        return launches[-1]

    cfg.setdefault("max_supersteps", 200)
    config = VertexConfig(
        input=resolve_inputs("in", tmp_path), output=tmp_path / f"out-{name}", **cfg
    )
    reports = []
    try:
        result = Driver(
            program, config, DataDir(tmp_path / "data"), workers, start, reports.append, clock=clock
        ).run()
    finally:
        if release is not None:
            release.set()  # a frozen worker wakes, sees its slot taken over, and returns
    for launch in launches:
        launch.join(10)
        assert not any(t.is_alive() for t in launch.threads), "a worker did not stop"
    out = config.output
    assert (out / "_SUCCESS").exists()
    lines = sum((p.read_text().splitlines() for p in sorted(out.glob("part-*"))), [])
    return parse_output(lines), result, reports


def graph_input(tmp_path: Path, files: int = 3, weighted: bool = False) -> nx.DiGraph:
    g = nx.gnp_random_graph(250, 0.02, seed=9, directed=True)
    for u, v in g.edges:
        g[u][v]["w"] = (u * 5 + v) % 7 + 1
    write_files(tmp_path / "in", edge_lines(g, weight="w" if weighted else None), files)
    return g


def test_input_splits_cover_every_line_once(tmp_path: Path):
    """Byte-range splits cut anywhere, yet every line is read exactly once, by one split."""
    lines = [f"{i} {'x' * (i % 13)}" for i in range(500)]
    paths = write_files(tmp_path / "in", lines, 3)
    paths.append(tmp_path / "empty.txt")
    paths[-1].write_text("")
    want = sorted(line for _, line in read_tagged_lines(paths))
    for pieces in (1, 2, 5, 64):
        splits = input_splits(paths, pieces)
        got = sorted(
            line for piece in splits for s in piece for _, line in read_split_lines(Split(*s))
        )
        assert got == want, pieces


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 22])
def test_block_reader_gives_the_lines_of_a_split(tmp_path: Path, block: int):
    """A worker's loader reads blocks (any size), not lines: the same lines for every range
    (read as a data job's split),
    with CR LF ends, a last line without its newline, empty and non-ASCII lines."""
    paths = write_files(tmp_path / "in", [f"{i} {'é' * (i % 5)}" for i in range(300)], 2)
    paths[0].write_bytes(paths[0].read_bytes().replace(b"\n", b"\r\n") + b"\n\ntail")
    paths.append(tmp_path / "one.txt")
    paths[-1].write_bytes(b"no newline")
    for pieces in (1, 2, 7, 300):
        for piece in input_splits(paths, pieces):
            for split in piece:
                want = [line for _, line in read_split_lines(Split(*split))]
                assert list(read_lines(*split, block=block)) == want, (split, block)


#: what a vertex job's directory keeps once it ended, whatever the end: what its user reads
JOB_FILES = ["consolidated-progress.json", "jobconfig.json", "result", "result.json"]


@pytest.mark.parametrize("name", ["connected_components", "sssp", "propagate_max"])
@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 2), (3, 7)])
def test_distributed_output_equals_the_reference(tmp_path: Path, name, workers, partitions):
    """Workers exchanging message files give exactly the reference runner's output."""
    graph_input(tmp_path, weighted=name == "sssp")
    got, result, reports = run_threads(
        example(name), tmp_path, workers, partitions=partitions, checkpoint_every=2
    )
    ref = run_local(example(name), read_tagged_lines(sorted((tmp_path / "in").iterdir())), 1, 200)
    assert got == parse_output(sum(ref.partitions, []))
    assert result.supersteps == ref.supersteps == len(reports)
    assert [(r.sent, r.active) for r in reports] == [(r.sent, r.active) for r in ref.reports]
    assert read_result(DataDir(tmp_path / "data"), result.job_id) == "OK"
    assert not (tmp_path / "data" / "im" / result.job_id).exists(), "scratch files are removed"
    left = sorted(p.name for p in (tmp_path / "data" / "job" / result.job_id).iterdir())
    assert left == sorted([*JOB_FILES, "control"]), "the acks and heartbeats are removed"


@pytest.mark.parametrize("name", ["sssp", "connected_components"])
@pytest.mark.parametrize("spill", [1, 7, 10**9])
def test_loading_in_spilled_chunks_keeps_every_partition_in_input_order(
    tmp_path: Path, monkeypatch, spill: int, name: str
):
    """Readers write other workers' records in chunks of ``spill`` edges; merged by (reader,
    chunk) they give each partition file exactly the reference's lines in the same order, and
    every edge keeps its own value (sssp's weights; components: merged without edge values)."""
    monkeypatch.setattr(worker_mod, "LOAD_SPILL", spill)
    graph_input(tmp_path, files=4, weighted=name == "sssp")
    _, result, _ = run_threads(example(name), tmp_path, 3, partitions=7, checkpoint_every=0)
    paths = sorted((tmp_path / "in").iterdir())
    ref = run_local(example(name), read_tagged_lines(paths), 7, 200)
    out = tmp_path / "out-run"
    got = [(out / f"part-{p:05d}").read_text().splitlines() for p in range(7)]
    assert got == ref.partitions
    assert result.supersteps == ref.supersteps


def _grows_what_it_sent(ctx, vid, value, messages):
    """Superstep 0: send its value (a list) along its edge; 1: add to that list, then
    record what it received."""
    if ctx.superstep == 0:
        value = [vid]
        ctx.send_to_neighbors(value)
        return value, False
    if ctx.superstep == 1:
        value.append(-1)
        return (value, [list(m) for m in messages]), False
    return value, True


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 3)])
def test_a_message_is_what_was_sent_even_if_the_sender_changes_it_afterwards(
    tmp_path: Path, workers: int, partitions: int
):
    """A ring where each vertex sends its own list and appends to it in the next superstep:
    every receiver gets the list as sent ([u]), as from another worker, whichever vertex
    of a worker computes first. Kept as the sent object for the worker's own partitions,
    messages read [u, -1] when the sender had computed before the receiver (5 of 6)."""
    prog = program_from_namespace(
        {
            "prepare": lambda line: (int(line.split()[0]), None, [int(line.split()[1])]),
            "compute": _grows_what_it_sent,
        },
        "<test>",
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ring.txt").write_text("".join(f"{i} {(i + 1) % 6}\n" for i in range(6)))
    got, _, _ = run_threads(prog, tmp_path, workers, partitions=partitions)
    assert got == {v: f"([{v}, -1], [[{(v - 1) % 6}]])" for v in range(6)}
    ref = run_local(prog, read_tagged_lines([tmp_path / "in" / "ring.txt"]), partitions, 10)
    assert got == parse_output(sum(ref.partitions, []))


def test_pagerank_with_aggregators_across_workers(tmp_path: Path):
    """Aggregates fold across workers at the barrier: PageRank matches networkx."""
    g = graph_input(tmp_path)
    got, result, _ = run_threads(example("pagerank"), tmp_path, 3, partitions=5)
    want = nx.pagerank(g, alpha=0.85, tol=1e-12, max_iter=1000, weight=None)
    assert all(math.isclose(float(got[v]), want[v], rel_tol=1e-4) for v in want)
    assert result.bytes_moved > 0 and result.messages > 0


def _freeze_at(monkeypatch, superstep: int | str, on_freeze=None):
    """The worker computing the first vertex of ``superstep`` (``"output"``: turning the first
    vertex into an output line) stops heartbeating and hangs: what the driver sees of a node
    that was SIGKILLed (``on_freeze(worker)`` runs first).
    Returns the program, the event that releases the hung worker, the set holding the frozen
    worker, and every worker made."""
    frozen: set[Any] = set()  # workers (an attempt's number is its slot's)
    release = threading.Event()
    workers: list[worker_mod.Worker] = []
    init = worker_mod.Worker.__init__

    def tracking_init(self, args):
        init(self, args)
        workers.append(self)

    def beat(self):
        path = self.layout.heartbeat(self.slot, self.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        while not self._stop.wait(self.args.heartbeat):
            if self not in frozen:
                try:
                    path.touch()
                except FileNotFoundError:  # alive/ is gone: the job ended (as the real _beat)
                    return

    monkeypatch.setattr(worker_mod.Worker, "__init__", tracking_init)
    monkeypatch.setattr(worker_mod.Worker, "_beat", beat)
    program = example("sssp")
    compute = program.compute
    # taken once, never released: of workers reaching the superstep together only one freezes
    # (a check of ``frozen`` then an add let two through now and then: two lost, two rollbacks)
    first = threading.Lock()

    def freeze(vid) -> None:
        if first.acquire(blocking=False):
            owner = next(w for w in workers if any(vid in p.values for p in w.parts.values()))
            if on_freeze is not None:
                on_freeze(owner)
            frozen.add(owner)
            release.wait(30)

    def frozen_compute(ctx, vid, value, messages):
        if ctx.superstep == superstep:
            freeze(vid)
        return compute(ctx, vid, value, messages)

    def frozen_output(vid, value):
        if superstep == "output":
            freeze(vid)
        return program.output(vid, value)

    frozen_program = dataclasses.replace(program, compute=frozen_compute, output=frozen_output)
    return frozen_program, release, frozen, workers


def _skipping_clock(frozen: set[Any], workers: list[worker_mod.Worker], lost_after: float):
    """The driver's clock, which once a worker froze leaps twice ``lost_after`` ahead at every
    reading: the hung worker is lost at the driver's next looks instead of after ``lost_after``
    of real time, which a live worker's heartbeat thread must never lag by (0.74 s seen under
    load 13; a 5 s GIL hold of the whole process dropped every worker at a 3 s ``lost_after``).
    Each leap first dates every other running worker's heartbeat anew, as their beats in the
    skipped time would have (the driver reads its clock before it looks at the heartbeats)."""
    leaps = 0

    def clock() -> float:
        nonlocal leaps
        if frozen:
            leaps += 1
            for w in list(workers):
                if w not in frozen and not w._stop.is_set():  # one that returned beats no more
                    with contextlib.suppress(FileNotFoundError):  # the job ended: alive/ went
                        os.utime(w.layout.heartbeat(w.slot, w.attempt), ns=(leaps, leaps))
        return time.monotonic() + leaps * 2 * lost_after

    return clock


def test_one_worker_freezes_when_two_reach_the_superstep_together(monkeypatch):
    """``_freeze_at`` freezes one worker even when two compute their first vertex of the
    superstep at once (here each waits, inside the freeze, until the other is there or done).
    A check of ``frozen`` then an add froze both: the lost-worker tests then lost two workers
    and rolled back twice (``[1-3-False]`` failed so under load)."""
    program, release, frozen, workers = _freeze_at(monkeypatch, 1)
    there = [threading.Event(), threading.Event()]  # racer i is inside the freeze, or done
    racer: dict[int, int] = {}  # thread ident → racer
    errors: list[BaseException] = []

    class Racer:
        def __init__(self, i: int) -> None:
            self.attempt, self.i = f"racer{i}", i

        @property
        def parts(self):  # read by the freeze to find the vertex's owner
            me = racer[threading.get_ident()]
            there[me].set()
            assert there[1 - me].wait(10), "the other racer neither came nor finished"
            return {0: SimpleNamespace(values={self.i: 0})}

    def run(i: int) -> None:
        racer[threading.get_ident()] = i
        try:
            program.compute(SimpleNamespace(superstep=1), i, 0, [])
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            errors.append(exc)
        finally:
            there[i].set()

    workers += [Racer(0), Racer(1)]
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(10) for e in there)
    finally:
        release.set()
    for t in threads:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(frozen) == 1, frozen


def _lose_one_worker(program, tmp_path: Path, release, launch, clean, want, restart, **cfg):
    """Run ``program`` on 3 workers over 6 partitions while one is lost; it must roll back
    once, rerun from superstep ``restart`` (None: not checked) and give the clean output."""
    try:
        got, result, reports = run_threads(
            program,
            tmp_path,
            3,
            name="lost",
            release=release,
            launch=launch,
            partitions=6,
            heartbeat=0.05,
            **cfg,
        )
    finally:
        release.set()
    assert result.rollbacks == 1
    steps = [r.superstep for r in reports]
    if restart is not None:  # supersteps run again from the last complete checkpoint, or from 0
        assert next(b for a, b in zip(steps, steps[1:]) if b <= a) == restart, steps
    assert got == want
    assert result.supersteps == clean.supersteps
    # the lost worker, woken once the job ended, finished its superstep without leaving its
    # messages behind (it made its old epoch's directories again and wrote them there)
    assert not any((tmp_path / "data" / "im").iterdir()), "a woken worker left files"


@pytest.mark.parametrize(
    "superstep,checkpoint_every,told",
    [(5, 2, False), (1, 3, False), (0, 0, False), (5, 2, True)],
)
def test_lost_worker_rolls_back_to_the_checkpoint_and_output_is_unchanged(
    tmp_path: Path, monkeypatch, superstep, checkpoint_every, told
):
    """A worker that stops heartbeating mid-job (after a checkpoint, before the first one, or
    with none) is dropped; its partitions are re-dealt and restored; the output is identical.
    ``told``: the server's list of the calls in flight reveals the loss long before the
    heartbeat timeout would."""
    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    assert clean.supersteps > 6
    program, release, frozen, workers = _freeze_at(monkeypatch, superstep)

    class ServerTells(ThreadLaunch):
        def calls(self):
            return {w.slot for w in workers if w not in frozen}

    _lose_one_worker(
        program,
        tmp_path,
        release,
        ServerTells if told else ThreadLaunch,
        clean,
        want,
        (superstep // checkpoint_every) * checkpoint_every if superstep > 0 else None,
        checkpoint_every=checkpoint_every,
        # told: only the server's list can reveal the loss in time; else the driver's clock
        # skips ahead and the default holds, which no healthy worker thread comes near
        lost_after=600 if told else VertexConfig.lost_after,
        clock=time.monotonic if told else _skipping_clock(frozen, workers, VertexConfig.lost_after),
    )
    assert frozen, "the victim was never computed"


@pytest.mark.parametrize("phase,folder", [(2, "s2"), ("output", "out"), ("output", ".out-lost.")])
def test_a_lost_worker_writing_while_its_epoch_is_removed_leaves_nothing(
    tmp_path: Path, monkeypatch, phase, folder
):
    """A lost worker wakes in the instant the driver removes ``folder`` (listed, not yet
    removed) and writes its messages of superstep 2 (the folder: theirs), or its output part
    (the folder: the old epoch's output, or the staging folder of every epoch's). Nothing of
    the old epoch is left once the rollback is done (its messages kept e0/s2 and e0 on disk
    until the job's end), and nothing beside the output once the job is done (its part kept
    .out-lost.remap-JOB/e0 there for good)."""
    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    program, release, frozen, workers = _freeze_at(monkeypatch, phase)
    wrote = threading.Event()
    real_write, real_rmdir = worker_mod.write_atomic, os.rmdir

    def write_atomic(path, data, **kw):
        try:
            return real_write(path, data, **kw)
        finally:
            if frozen and threading.current_thread().name.endswith(f"-{next(iter(frozen)).slot}"):
                wrote.set()

    def rmdir(path, *args, **kw):
        if os.path.basename(os.fspath(path)).startswith(folder) and frozen and not release.is_set():
            release.set()
            assert wrote.wait(30), "the woken worker wrote nothing"
        return real_rmdir(path, *args, **kw)

    left: list[list[str]] = []  # the job's scratch right after the rollback
    real_lose = Driver._lose

    def lose(self, lost):
        real_lose(self, lost)
        left.append(sorted(p.name for p in self.layout.scratch.iterdir()))

    monkeypatch.setattr(worker_mod, "write_atomic", write_atomic)
    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(Driver, "_lose", lose)
    _lose_one_worker(
        program,
        tmp_path,
        release,
        ThreadLaunch,
        clean,
        want,
        None,
        clock=_skipping_clock(frozen, workers, VertexConfig.lost_after),
    )
    assert wrote.is_set() and left == [[]], left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_worker_still_in_the_superstep_when_another_is_lost_stays_a_member(
    tmp_path: Path, monkeypatch
):
    """One worker hangs in checkpointing superstep 4 while another is still computing it; the
    hung one is lost and the rollback removes that superstep's files under the other, whose
    next checkpoint write fails: it drops the superstep and restores as the member it still
    is (one rollback, the clean output). It stopped as if superseded and was lost too (two
    rollbacks; seen under load as a hang of the lost-worker test, whose clock kept it alive)."""
    import itertools

    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    program, release, frozen, workers = _freeze_at(monkeypatch, 4)
    rolled_back = threading.Event()
    real_lose = Driver._lose

    def lose(self, lost) -> None:
        real_lose(self, lost)
        rolled_back.set()

    arrivals = itertools.count()  # vertices of superstep 4 begun: the first one's worker hangs
    straggled: list[bool] = []

    def compute(ctx, vid, value, messages):
        if ctx.superstep == 4 and next(arrivals) == 1:  # another worker's (the first one hangs)
            straggled.append(rolled_back.wait(30))
        return program.compute(ctx, vid, value, messages)

    monkeypatch.setattr(Driver, "_lose", lose)
    _lose_one_worker(
        dataclasses.replace(program, compute=compute),
        tmp_path,
        release,
        ThreadLaunch,
        clean,
        want,
        2,
        checkpoint_every=2,
        clock=_skipping_clock(frozen, workers, VertexConfig.lost_after),
    )
    assert straggled == [True]


def test_the_call_the_server_took_back_names_the_lost_worker_not_heartbeat_ages(
    tmp_path: Path, monkeypatch
):
    """The server reports a worker's call taken back while that worker's heartbeat is the
    freshest (it beat just before its node died; the live workers' beats are a second old):
    the driver drops exactly that worker, rolls back once to the checkpoint, and the output
    equals the undisturbed run's. Guessing by the stalest heartbeat drops a live worker, then
    loses the real one too by its heartbeat timeout: two rollbacks."""
    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    program, release, frozen, workers = _freeze_at(monkeypatch, 5)
    dead: set[Any] = set()  # workers whose heartbeats stopped (their node is gone)

    def beat(self):
        path = self.layout.heartbeat(self.slot, self.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        while not self._stop.wait(self.args.heartbeat):
            if self not in dead:
                # once the victim is frozen the live workers' beats look a second old, its own fresh
                t = time.time() - (1.0 if frozen and self not in frozen else 0.0)
                os.utime(path, (t, t))

    monkeypatch.setattr(worker_mod.Worker, "_beat", beat)
    reported: dict[str, Any] = {}  # the victim, and every heartbeat's time, when first reported

    class ServerTells(ThreadLaunch):
        def calls(self):
            if frozen and not reported:
                victim = next(w for w in workers if w in frozen)
                reported["victim"] = victim.slot
                reported["beats"] = {
                    w.slot: w.layout.heartbeat(w.slot, w.attempt).stat().st_mtime for w in workers
                }
                dead.add(victim)  # it never beats again
            return {w.slot for w in workers if w not in frozen}

        def running(self):  # the same report as a count (what the driver once asked for)
            return len(self.calls())

    _lose_one_worker(
        program,
        tmp_path,
        release,
        ServerTells,
        clean,
        want,
        4,
        checkpoint_every=2,
        lost_after=6.0,  # well above the live workers' 1 s lag
    )
    assert reported, "the victim was never reported lost"
    victim, beats = reported["victim"], reported["beats"]
    assert all(beats[victim] > t for slot, t in beats.items() if slot != victim), beats


def test_a_retried_worker_takes_its_slot_whatever_the_clocks_date_its_heartbeat(
    tmp_path: Path, monkeypatch
):
    """A worker's node dies mid-superstep (it hangs, its heartbeat stops) and the server's
    retry of its call starts on a node whose clock is an hour behind, while the first nodes'
    clocks are an hour ahead: the lost attempt's heartbeat is dated after every one of the
    retry's. The retry is still the slot's newest attempt (its number is higher): it takes the
    slot at the one rollback, computes the rest of the job, and the output equals the
    undisturbed run's. (Picked by mtime, the lost attempt looked newest: the retry was never
    taken and idled to the end while the others shared its partitions.)"""
    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    hour = 3600.0
    retries: list[worker_mod.Worker] = []
    answers: list[dict[str, Any]] = []
    retried: list[threading.Thread] = []
    retry_dated = threading.Event()  # the retry's heartbeat is there, an hour behind

    def start_retry(victim: worker_mod.Worker) -> None:
        """The server's retry of the victim's call (the same argument), on another node."""
        retries.append(worker_mod.Worker(victim.args))
        retried.append(threading.Thread(target=lambda: answers.append(retries[0].run())))
        retried[0].start()
        assert retry_dated.wait(30), "the retried worker never beat"

    program, release, frozen, workers = _freeze_at(monkeypatch, 5, on_freeze=start_retry)

    def beat(self) -> None:
        """Every beat dated by the writer's clock: the retry's behind, the others' ahead."""
        skew = -hour if self in retries else hour
        path = self.layout.heartbeat(self.slot, self.attempt)
        _date(path, skew)
        if self in retries:
            retry_dated.set()
        while not self._stop.wait(self.args.heartbeat):
            if self in frozen:
                return  # its node is gone: it never beats again
            with contextlib.suppress(FileNotFoundError):  # the job ended: alive/ went
                _date(path, skew)

    monkeypatch.setattr(worker_mod.Worker, "_beat", beat)
    _lose_one_worker(
        program,
        tmp_path,
        release,
        ThreadLaunch,
        clean,
        want,
        4,
        checkpoint_every=2,
        clock=_skipping_clock(frozen, workers, VertexConfig.lost_after),
    )
    retried[0].join(10)
    assert not retried[0].is_alive(), "the retried worker did not stop"
    (victim,) = frozen
    (answer,) = answers
    assert "left" not in answer and answer["supersteps"] > 0, answer
    assert answer["attempt"] > victim.attempt, (answer, victim.attempt)


DAY = 86400.0


def _date(path: Path, seconds: float) -> None:
    """Set ``path``'s mtime to ``seconds`` from now, as another machine's clock might."""
    then = time.time() + seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("stopped_at", [-DAY, 0.0, DAY])
def test_a_worker_is_lost_when_its_heartbeat_stops_changing_whatever_its_mtime_says(
    tmp_path: Path, stopped_at
):
    """Heartbeat mtimes come from the file server's or the writing node's clock, which may be
    far off the driver's. Workers whose heartbeats keep changing, dated a day behind or ahead,
    are never lost; the one whose heartbeat stopped (dated a day back, now or a day ahead) is
    lost once it went unchanged for ``lost_after`` of the driver's own clock, not before.
    (Judged by mtime age the worker a day behind was lost at the first look, and a stopped
    one dated ahead never.)"""
    clock = Clock()
    config = VertexConfig(input=[], output=tmp_path / "out", lost_after=60.0)
    driver = Driver(
        example("sssp"),
        config,
        DataDir(tmp_path / "data"),
        3,
        lambda args: None,
        clock=clock.seconds,
    )
    driver.launch = SimpleNamespace(events=list, calls=lambda: None)  # the server tells nothing
    driver.members = {0: 1, 1: 1, 2: 1}  # slot 0 a day behind, 1 a day ahead, 2 stopped
    beats = {slot: driver.layout.heartbeat(slot, a) for slot, a in driver.members.items()}
    driver.layout.alive.mkdir(parents=True)
    for path in beats.values():
        path.touch()
    _date(beats[2], stopped_at)
    for second in range(0, 61, 5):  # the stopped one first seen at 0: 60 s unchanged, not lost
        clock.advance(5 if second else 0)
        _date(beats[0], -DAY + second)  # the live ones beat
        _date(beats[1], DAY + second)
        driver._check()
    clock.advance(1)
    with pytest.raises(WorkerLost) as lost:
        driver._check()
    assert lost.value.slots == [2], lost.value
    assert str(lost.value) == "worker 2 sent no heartbeat for 61s"


def test_an_older_attempt_still_beating_never_displaces_the_member(tmp_path: Path):
    """An older attempt of a slot still runs and beats (its node was cut off from the server,
    not from the data directory), each beat dated after the member's (attempt 2): the member
    stays the slot's newest attempt and no worker is lost. (By mtime the older one was the
    newest: the driver rolled back to drop its live member.)"""
    clock = Clock()
    config = VertexConfig(input=[], output=tmp_path / "out")
    driver = Driver(
        example("sssp"), config, DataDir(tmp_path / "data"), 1, lambda a: None, clock=clock.seconds
    )
    driver.launch = SimpleNamespace(events=list, calls=lambda: None)  # the server tells nothing
    driver.members = {0: 2}
    driver.layout.alive.mkdir(parents=True)
    older, member = driver.layout.heartbeat(0, 1), driver.layout.heartbeat(0, 2)
    older.touch()
    member.touch()
    for second in range(10):
        clock.advance(1)
        _date(member, second)
        _date(older, second + 30)  # its node's clock is half a minute ahead
        driver._check()
    assert driver._heartbeats()[0][0] == 2


@pytest.mark.parametrize("dated", [-DAY, DAY])
def test_a_worker_gives_up_on_its_driver_only_when_its_heartbeat_stops_changing(
    tmp_path: Path, dated
):
    """A worker judges the driver's heartbeat as the driver judges the workers': dated a day
    off the worker's clock but changing, the driver is alive; stopped, the worker gives up once
    it went unchanged for ``lost_after`` of the worker's own clock, not before. (By mtime age it
    gave up at once on a driver dated behind, and never on one dated ahead.)"""
    data = DataDir(tmp_path / "data")
    clock = Clock()
    args = worker_mod.WorkerArgs(str(data.root), "job", 0, example("sssp"), lost_after=30.0)
    worker = worker_mod.Worker(args, clock=clock.seconds)
    path = worker.layout.driver_heartbeat
    path.parent.mkdir(parents=True)
    path.touch()
    for second in range(0, 101, 10):  # the driver beats
        clock.advance(10 if second else 0)
        _date(path, dated + second)
        worker._check_driver()
    clock.advance(30)
    worker._check_driver()  # unchanged for exactly lost_after: not yet
    clock.advance(1)
    with pytest.raises(worker_mod._Superseded, match="^the driver stopped answering$"):
        worker._check_driver()


def test_a_killed_job_keeps_its_results_and_progress_but_not_its_acks_and_heartbeats(
    tmp_path: Path,
):
    """Killed mid-job (the gang job ended under the driver), the job directory keeps what its
    user reads (result INCOMPLETE, the progress, the config) and the commands, as a finished
    job's does; the acks and the heartbeats (``alive/``) go. They stayed, acks and all."""
    graph_input(tmp_path)
    launches: list[ThreadLaunch] = []

    def start(args):
        launches.append(ThreadLaunch(args))
        return launches[-1]

    def kill_at_superstep_2(report) -> None:
        if report.superstep == 2:
            raise JobKilled("job 7 killed: killed on request")

    config = VertexConfig(input=resolve_inputs("in", tmp_path), output=tmp_path / "out")
    data = DataDir(tmp_path / "data")
    driver = Driver(example("sssp"), config, data, 2, start, kill_at_superstep_2)
    with pytest.raises(JobKilled):
        driver.run()
    for launch in launches:
        launch.join(10)
        assert not any(t.is_alive() for t in launch.threads), "a worker did not stop"
    (job_id,) = data.jobs()
    assert read_result(data, job_id) == "INCOMPLETE"
    assert sorted(p.name for p in data.job_dir(job_id).iterdir()) == sorted([*JOB_FILES, "control"])
    assert (read_json(data.consolidated(job_id)) or {})["superstep"] == 2
    assert not data.im_dir(job_id).exists() and not config.output.exists()


def test_a_dead_drivers_cleanup_removes_the_acks_and_heartbeats_too(tmp_path: Path):
    """After a vertex driver that died (SIGKILL), the server's cleanup removes its acks and
    heartbeats with its scratch files and keeps the result, the progress and the config."""
    from remap.data.layout import new_job_id, write_json, write_result
    from remap.server.drivers import abandon

    data = DataDir(tmp_path / "data")
    job = new_job_id()
    root = data.job_dir(job)
    staging = tmp_path / f".out.remap-{job}"
    (staging / "part-00000").parent.mkdir()
    (staging / "part-00000").write_text("1\t1\n")  # its output, half written
    config = {"kind": "vertex", "output": str(tmp_path / "out"), "staging": str(staging)}
    write_json(data.jobconfig(job), config)
    write_json(data.consolidated(job), {"superstep": 3})
    write_result(data, job, "INCOMPLETE")
    for name in (
        "acks/000004/0.pkl",
        "alive/0.ab12",
        "alive/driver.alive",
        "control/cmd-000004.pkl",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    abandon(data, "vertex", job, "the driver died")
    assert not staging.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([*JOB_FILES, "control"])
    assert read_json(data.consolidated(job)) == {"superstep": 3}


def _call_in_thread(fn, *args) -> list[Any]:
    """Run ``fn(*args)`` on a thread; its return value, waited for with a deadline."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and out, "the worker call did not return"
    return out


def test_a_worker_call_starting_after_its_job_ended_leaves_nothing_behind(tmp_path: Path):
    """A worker call that starts late, after its job ended and the driver removed ``alive/``
    and ``acks/``, returns at once saying so, and the job directory stays as the job left
    it. (It made ``alive/`` again and left its heartbeat ``alive/<slot>.<attempt>`` there.)"""
    graph_input(tmp_path)
    _, result, _ = run_threads(example("sssp"), tmp_path, 2)
    data = DataDir(tmp_path / "data")
    root = data.job_dir(result.job_id)
    assert sorted(p.name for p in root.iterdir()) == sorted([*JOB_FILES, "control"])
    late = worker_mod.WorkerArgs(str(data.root), result.job_id, 1, example("sssp"))
    (answer,) = _call_in_thread(worker_mod.run_worker, late)
    assert answer["left"] == worker_mod.ENDED, answer
    assert sorted(p.name for p in root.iterdir()) == sorted([*JOB_FILES, "control"])


@pytest.mark.parametrize("stale", [False, True], ids=["local", "nfs-estale"])
def test_a_member_whose_job_ended_under_its_command_does_not_make_acks_again(
    tmp_path: Path, monkeypatch, stale
):
    """A member still running a command when its job ended (the driver removed ``acks/``
    and ``alive/``) stops without writing its ack: ``acks/`` is not made again. ``stale``:
    its ack's write fails with ESTALE, as on NFS: it stops the same (it raised OSError)."""
    from remap.data.layout import new_job_id, write_json
    from remap.vertex.files import Layout, write_pickle

    if stale:
        monkeypatch.setattr(worker_mod, "write_pickle", _stale(worker_mod.write_pickle))

    data = DataDir(tmp_path / "data")
    job = new_job_id()
    write_json(data.jobconfig(job), {"kind": "vertex"})
    layout = Layout(data, job)
    layout.alive.mkdir()
    layout.acks.mkdir()
    worker = worker_mod.Worker(worker_mod.WorkerArgs(str(data.root), job, 0, example("sssp")))
    members = {0: 1}  # the first attempt of slot 0

    def execute_while_the_job_ends(cmd) -> dict[str, Any]:
        remove_tree(layout.acks)  # the driver's cleanup, while this command ran
        remove_tree(layout.alive)
        return {"attempt": worker.attempt, "seq": cmd.seq, "slot": 0}

    monkeypatch.setattr(worker, "_execute", execute_while_the_job_ends)
    write_pickle(layout.command(0), worker_mod.Command(0, "merge", 0, members, [0]))
    write_pickle(layout.command(1), worker_mod.Command(1, "stop", 0, members, [0]))
    (answer,) = _call_in_thread(worker.run)
    assert answer["left"] == worker_mod.ENDED, answer
    assert not layout.acks.exists() and not layout.alive.exists()


def test_a_full_disk_fails_the_job_with_one_line_naming_the_file(tmp_path: Path, monkeypatch):
    """A worker whose output part finds the disk full: the job fails with one line naming
    the file and saying the disk is full (was "OSError: [Errno 28] No space left on device");
    nothing is published."""
    import errno

    real = worker_mod.write_atomic

    def write_atomic(path, data, **kw):
        if Path(path).name.startswith("part-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(worker_mod, "write_atomic", write_atomic)
    graph_input(tmp_path)
    with pytest.raises(JobFailed) as info:
        run_threads(example("connected_components"), tmp_path, 2, partitions=2)
    assert re.search(
        r"StorageError: cannot write \S+/part-0000[01]: disk full \(no space left on device\)$",
        str(info.value),
    ), str(info.value)
    assert not (tmp_path / "out-run").exists()


def test_a_worker_whose_error_arrives_with_the_servers_list_fails_the_job_not_rolls_back(
    tmp_path: Path, monkeypatch
):
    """A worker whose output part finds the disk full raises while the driver asks the
    server for its calls in flight: its error arrives before the answer that no longer lists
    it. The error fails the job (one line, nothing published), as any worker's error does.
    The driver looked at the errors before asking, took the call for a lost one and rolled
    back: the error was dropped, and the job reported done if no later look came."""
    import errno

    armed, go = threading.Event(), threading.Event()
    real = worker_mod.write_atomic

    def write_atomic(path, data, **kw):
        if Path(path).name == "part-00001":  # slot 1's: partitions are dealt round robin
            armed.set()
            assert go.wait(30), "the driver never asked the server"
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    class ServerTells(ThreadLaunch):
        def calls(self):
            if armed.is_set() and not go.is_set():
                go.set()  # the worker raises while the server answers
                self.threads[1].join(30)
            return {slot for slot, t in enumerate(self.threads) if t.is_alive()}

    rollbacks: list[str] = []
    real_lose = Driver._lose

    def lose(self, lost):
        rollbacks.append(str(lost))
        real_lose(self, lost)

    monkeypatch.setattr(worker_mod, "write_atomic", write_atomic)
    monkeypatch.setattr(Driver, "_lose", lose)
    graph_input(tmp_path)
    with pytest.raises(JobFailed, match=r"a vertex worker failed: StorageError: .*disk full"):
        run_threads(example("connected_components"), tmp_path, 2, partitions=2, launch=ServerTells)
    assert go.is_set() and rollbacks == []
    assert not (tmp_path / "out-run").exists()


def test_the_output_appears_whole_by_one_rename(tmp_path: Path):
    """While the workers write the output parts, nothing is at the output's path (a reader,
    or a driver that dies there, would find part files without _SUCCESS: an attached
    driver SIGKILLed in its output phase left them for good); at the end the output holds
    every part and _SUCCESS, and no staging directory is left beside it."""
    graph_input(tmp_path)
    out = tmp_path / "out-run"
    seen: list[bool] = []
    base = example("connected_components")

    def output(vertex_id, value):
        seen.append(out.exists())
        return base.output(vertex_id, value)

    program = dataclasses.replace(base, output=output)
    got, _, _ = run_threads(program, tmp_path, 2, partitions=3)
    assert seen and not any(seen), "the output's path held a partial output"
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS",
        "part-00000",
        "part-00001",
        "part-00002",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(got) == 250


def test_vertex_error_fails_the_job_with_one_line(tmp_path: Path):
    """A raising vertex ends the job with JobFailed naming the job (as a data job's failure
    does), the vertex and the superstep; no output."""
    graph_input(tmp_path)

    def compute(ctx, vid, value, messages):
        if ctx.superstep == 2 and vid == 7:
            raise ZeroDivisionError("oops")
        return value, False

    prog = program_from_namespace(
        {"prepare": example("propagate_max").prepare, "compute": compute}, "t"
    )
    with pytest.raises(JobFailed) as failed:
        run_threads(prog, tmp_path, 2, partitions=3, max_supersteps=5)
    assert re.fullmatch(
        r"vertex job \S+ \(vertex\) failed: vertex 7 in superstep 2: ZeroDivisionError: oops",
        str(failed.value),
    ), failed.value
    assert not (tmp_path / "out-run" / "_SUCCESS").exists()


def test_a_corrupt_compressed_input_fails_the_job_with_one_line(tmp_path: Path):
    """A vertex job's input is read by the data jobs' reader: a truncated .xz graph file
    fails the load with one line naming the file and the line it broke at; no output."""
    graph_input(tmp_path, files=2)
    first = sorted((tmp_path / "in").iterdir())[0]
    packed = first.with_name(first.name + ".xz")
    packed.write_bytes(lzma.compress(first.read_bytes())[:-30])
    first.unlink()
    message = rf"input {re.escape(str(packed.resolve()))}: corrupt or truncated xz data at line \d+"
    with pytest.raises(JobFailed, match=message):
        run_threads(example("propagate_max"), tmp_path, 2, partitions=3, max_supersteps=5)
    assert not (tmp_path / "out-run" / "_SUCCESS").exists()


def _listed_id(line: str):
    return [line.split()[0]], None, []  # a list cannot be a vertex id


def _int_edges(line: str):
    return int(line.split()[0]), None, 5  # edges must be a list


def _raising_combine(messages):
    raise ValueError("cannot combine")


def _to_neighbors(ctx, vid, value, messages):
    ctx.send_to_neighbors(1)
    return value, ctx.superstep > 0


@pytest.mark.parametrize(
    ("fns", "message"),
    [
        ({"prepare": _listed_id}, r"prepare\('\d+ \d+'\) returned vertex id \['\d+'\]: unhashable"),
        ({"prepare": _int_edges}, r"prepare\('\d+ \d+'\) returned edges 5: expected a list"),
        (
            {"combine": _raising_combine, "compute": _to_neighbors},
            r"combine of \d+ messages to vertex \d+ raised ValueError: cannot combine",
        ),
    ],
)
def test_a_broken_prepare_or_combine_fails_with_a_line_naming_it(
    tmp_path: Path, fns: dict, message: str
):
    """A prepare returning an unhashable id or edges that are not a list, or a combine function
    that raises, fails the job with one line naming the function and the line or vertex.
    Before: "a vertex worker failed: TypeError: unhashable type: 'list'" (or "'int' object is
    not iterable", "ValueError: cannot combine"), naming neither, without a traceback."""
    graph_input(tmp_path)
    namespace = {
        "prepare": example("propagate_max").prepare,
        "compute": lambda ctx, vid, value, messages: (value, True),
        **fns,
    }
    with pytest.raises(JobFailed, match=message):
        run_threads(program_from_namespace(namespace, "t"), tmp_path, 2, max_supersteps=3)


def _picky_prepare(line: str):
    if line.split()[0] == "13":
        raise ValueError(f"no vertex 13 ({line})")
    return example("propagate_max").prepare(line)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_prepare_that_raises_under_continue_skips_the_line_and_counts_it(
    tmp_path: Path, workers: int
):
    """on_error: continue: every line whose ``prepare`` raised is left out and counted among
    the job's errors (exit 5 on the console), the rest runs to the reference's output; under
    fail the same input fails the job quoting the line."""
    graph = graph_input(tmp_path)
    bad = sum(1 for src, _ in graph.edges if src == 13)
    assert bad, "the test graph has no edge out of vertex 13"
    base = example("propagate_max")
    prog = dataclasses.replace(base, prepare=_picky_prepare)
    got, result, _ = run_threads(prog, tmp_path, workers, on_error="continue", partitions=3)
    assert result.errors == bad and "no vertex 13" in result.first_error
    want = run_local(
        prog, read_tagged_lines(sorted((tmp_path / "in").iterdir())), 3, 200, on_error="continue"
    )
    assert want.load_errors == bad
    assert got == parse_output(sum(want.partitions, []))
    with pytest.raises(JobFailed, match="no vertex 13"):
        run_threads(prog, tmp_path, workers, name="fail", partitions=3)


def test_existing_output_is_refused(tmp_path: Path):
    """The output directory must not exist (nothing is ever overwritten)."""
    graph_input(tmp_path)
    (tmp_path / "out-run").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        run_threads(example("sssp"), tmp_path, 1)


def test_an_output_another_job_is_writing_is_refused_at_once(tmp_path: Path):
    """The output is locked like a function job's: while another job holds ``.OUT.lock`` the
    vertex job fails before any worker starts, naming that job, and leaves its output alone
    (it used to run, write into the same directory and, failing, remove the other's files)."""
    from remap.errors import OutputError
    from remap.sinks import OutputLock

    graph_input(tmp_path)
    out = tmp_path / "out"
    config = VertexConfig(input=resolve_inputs("in", tmp_path), output=out, name="second")
    held = OutputLock(out, "data job 20261202-first (first)")
    held.acquire()
    started: list[Any] = []
    driver = Driver(example("sssp"), config, DataDir(tmp_path / "data"), 1, started.append)
    try:
        with pytest.raises(OutputError) as caught:
            driver.run()
    finally:
        held.release()
    assert "\n" not in str(caught.value)
    assert "being written by another job (data job 20261202-first (first)" in str(caught.value)
    assert started == [] and not out.exists()
    # once the other job has let go, the output is free again
    assert run_threads(example("sssp"), tmp_path, 1, name="free")[1] is not None


def test_input_is_loaded_without_the_cyclic_collector(tmp_path: Path):
    """Loading builds millions of containers: the collector is off while it runs (its passes
    find nothing to free) and on again for the supersteps."""
    graph_input(tmp_path)
    seen: dict[str, set[bool]] = {"prepare": set(), "compute": set()}
    base = example("propagate_max")

    def prepare(line):
        seen["prepare"].add(gc.isenabled())
        return base.prepare(line)

    def compute(ctx, vid, value, messages):
        seen["compute"].add(gc.isenabled())
        return base.compute(ctx, vid, value, messages)

    program = dataclasses.replace(base, prepare=prepare, compute=compute)
    assert gc.isenabled()
    run_threads(program, tmp_path, 1)
    assert seen == {"prepare": {False}, "compute": {True}} and gc.isenabled()


def _split_prepare(line: str):
    src, dst = line.split()
    return [(src, src, [dst]), (dst, dst, [])]


def _halt(ctx, vertex_id, value, messages):
    return value, True


def test_input_bytes_that_are_not_utf8_reach_the_output_unchanged(tmp_path: Path):
    """Bytes that are not UTF-8 reach ``prepare`` as surrogate escapes and are written back as
    they were, as in data jobs; a worker failed with UnicodeDecodeError on them."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "g.txt").write_bytes(b"caf\xe9 ol\xe9\nol\xe9 \xff\xfe\n")
    program = program_from_namespace({"prepare": _split_prepare, "compute": _halt}, "test")
    config = VertexConfig(
        input=resolve_inputs("in", tmp_path), output=tmp_path / "out", max_supersteps=5
    )
    launches: list[ThreadLaunch] = []

    def start(args):
        launches.append(ThreadLaunch(args))
        return launches[-1]

    Driver(program, config, DataDir(tmp_path / "data"), 2, start).run()
    for launch in launches:
        launch.join(10)
    got = sorted(b"".join(p.read_bytes() for p in (tmp_path / "out").glob("part-*")).splitlines())
    assert got == sorted([b"caf\xe9\tcaf\xe9", b"ol\xe9\tol\xe9", b"\xff\xfe\t\xff\xfe"])


def _slow_compute(ctx, vertex_id, value, messages):
    """A superstep of about a tenth of a second: the driver waits at every barrier."""
    time.sleep(0.001)
    return value, ctx.superstep >= 3


def test_the_driver_checks_liveness_every_interval_not_every_poll(tmp_path: Path, monkeypatch):
    """Waiting at a barrier, the driver polls the acks with one stat and looks at heartbeats
    and the server's calls every CHECK_INTERVAL: it shares the CPUs with the workers (it
    scanned the heartbeat directory every 0.5-5 ms poll, a second of CPU in a 10 s job)."""
    from remap.vertex import driver as driver_mod

    graph_input(tmp_path)
    checks = []
    real_check = Driver._check
    monkeypatch.setattr(Driver, "_check", lambda self: checks.append(real_check(self)))
    program = program_from_namespace({"prepare": _split_prepare, "compute": _slow_compute}, "t")
    started = time.monotonic()
    _, result, _ = run_threads(program, tmp_path, 2)
    elapsed = time.monotonic() - started
    assert result.supersteps == 4
    # at most one check an interval (and one more per command), never one per poll
    assert len(checks) <= elapsed / driver_mod.CHECK_INTERVAL + 10, (len(checks), elapsed)


def test_a_waiting_worker_looks_at_the_driver_every_interval_not_every_poll(tmp_path: Path):
    """A worker waiting for the next command stats the command file each poll, and looks at
    the driver's heartbeat only every GIVE_UP_INTERVAL (it did every poll)."""
    target = tmp_path / "cmd"
    calls: list[float] = []
    start = time.monotonic()

    def give_up() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            target.touch()  # the command arrives

    worker_mod.wait_for(target, give_up)
    # the looks are an interval apart (half of one, for the few instructions between the
    # clock reading the loop keeps and this one); a look every poll comes every 0.5-5 ms.
    # Counted, not timed: stopping at 0.3 s left one look (failing '2 <=') to a thread stalled
    # 0.2 s before its first
    every = worker_mod.GIVE_UP_INTERVAL
    gaps = [b - a for a, b in zip([start, *calls], calls)]
    assert len(calls) == 3 and min(gaps) >= every / 2, (every, gaps)


def test_the_next_superstep_starts_before_the_progress_is_published(tmp_path: Path):
    """The driver writes the next superstep's command as soon as the barrier's counts are in;
    the progress file and ``on_report`` follow while the workers compute (they were on the
    path between two supersteps, and replacing the progress file can wait for the disk)."""
    graph_input(tmp_path)
    config = VertexConfig(
        input=resolve_inputs("in", tmp_path),
        output=tmp_path / "out",
        max_supersteps=6,
        checkpoint_every=2,
    )
    issued: list[tuple[int, bool]] = []
    drivers: list[Driver] = []

    def on_report(report) -> None:
        control = drivers[0].layout.root / "control"
        steps = {c.superstep for c in map(read_pickle, control.iterdir()) if c.kind == "step"}
        issued.append((report.superstep, report.superstep + 1 in steps))

    launches: list[ThreadLaunch] = []

    def start(args):
        launches.append(ThreadLaunch(args))
        return launches[-1]

    program = program_from_namespace({"prepare": _split_prepare, "compute": _slow_compute}, "t")
    drivers.append(Driver(program, config, DataDir(tmp_path / "data"), 2, start, on_report))
    result = drivers[0].run()
    for launch in launches:
        launch.join(10)
    assert result.supersteps == 4
    # every superstep but the last had its successor's command out before its report
    assert issued == [(0, True), (1, True), (2, True), (3, False)]


def test_quiet_for_sleeps_through_most_of_the_shorter_of_the_last_two_supersteps():
    from remap.vertex.driver import QUIET_SHARE, quiet_for

    assert quiet_for([]) == 0.0
    assert quiet_for([2.0]) == 0.0  # one superstep says little (the first one sets up)
    assert quiet_for([9.0, 2.0, 4.0]) == QUIET_SHARE * 2.0
    assert quiet_for([1.0, 3.0]) == QUIET_SHARE * 1.0


def _steady_compute(ctx, vertex_id, value, messages):
    """Supersteps of about a fifth of a second each (250 vertices over 2 workers)."""
    time.sleep(0.0016)
    return value, ctx.superstep >= 9


def test_the_driver_sleeps_through_most_of_a_superstep_instead_of_polling(
    tmp_path: Path, monkeypatch
):
    """Every poll of the driver takes a CPU from a worker for a moment (one worker per CPU:
    the slowest sets every barrier), so it polls finely only near the time the superstep is
    expected to end; it polled every 0.5-5 ms throughout (about 80 stats a superstep here).
    Counted against the quiet time the driver chose, not a total: a superstep that a loaded
    machine stretches is rightly polled finely past its expected end."""
    from remap.vertex import driver as driver_mod

    graph_input(tmp_path)
    stats: dict[int, list[float]] = {}  # command seq -> when each ack of it was looked for
    quiet: dict[int, tuple[float, float]] = {}  # seq -> (expected share, when its wait began)
    real_exists, real_quiet_for, real_await = os.path.exists, driver_mod.quiet_for, Driver._await
    chosen: list[float] = []

    def exists(path) -> bool:
        name = str(path)
        if f"{os.sep}acks{os.sep}" in name:
            stats.setdefault(int(Path(name).parent.name), []).append(time.monotonic())
        return real_exists(path)

    def quiet_for(durations: list[float]) -> float:
        chosen.append(real_quiet_for(durations))
        return chosen[-1]

    def await_(self, cmd, quiet_seconds: float = 0.0):
        quiet[cmd.seq] = (quiet_seconds, time.monotonic())
        return real_await(self, cmd, quiet_seconds)

    monkeypatch.setattr(driver_mod.os.path, "exists", exists)
    monkeypatch.setattr(driver_mod, "quiet_for", quiet_for)
    monkeypatch.setattr(Driver, "_await", await_)
    program = program_from_namespace({"prepare": _split_prepare, "compute": _steady_compute}, "t")
    _, result, _ = run_threads(program, tmp_path, 2)
    assert result.supersteps == 10
    # commands: read, merge, then supersteps 0..9 (seq 2..11); from superstep 2 on the driver
    # knows how long one takes, and means to sleep through most of it
    assert len(chosen) == 10 and all(q > 0 for q in chosen[2:]), chosen
    for seq in range(4, 12):
        seconds, began = quiet[seq]
        # while quiet, one look per liveness check (sleeps never end early, so load cannot
        # add looks here); fine polling would look every 0.5-5 ms
        looks = sum(began <= t < began + seconds for t in stats[seq])
        assert looks <= 2 * (2 + seconds / driver_mod.CHECK_INTERVAL), (seq, seconds, stats)


def test_the_loaded_partitions_are_kept_out_of_the_collectors_reach_until_the_end(tmp_path: Path):
    """The containers a load builds are frozen (``gc.freeze``) when it ends: the collections
    after it visited each of them once per generation, a pass over all the memory a partition
    holds, to free nothing. The worker unfreezes when it returns (its core runs other jobs)."""
    graph_input(tmp_path)
    frozen: list[int] = []
    base = example("propagate_max")

    def compute(ctx, vid, value, messages):
        if len(frozen) == ctx.superstep:  # once a superstep (the count walks a list)
            frozen.append(gc.get_freeze_count())
        return base.compute(ctx, vid, value, messages)

    program = dataclasses.replace(base, compute=compute)
    before = gc.get_freeze_count()
    _, result, _ = run_threads(program, tmp_path, 1)
    # every vertex's id, value and edge list was built by the load: all of them frozen
    assert min(frozen) >= before + result.vertices, (min(frozen), result.vertices)
    assert gc.get_freeze_count() == 0


def _slow_then_fast(ctx, vertex_id, value, messages):
    """Three supersteps of about 0.3 s (250 vertices over 2 workers), then instant ones."""
    if ctx.superstep < 3:
        time.sleep(0.0024)
    return value, ctx.superstep >= 9


def test_the_driver_expects_a_superstep_to_take_what_the_slowest_worker_was_busy(
    tmp_path: Path, monkeypatch
):
    """The expected superstep is the slowest worker's busy time (its ack's phases but the
    wait), not the time until the driver saw the acks: that one counted the driver's own
    sleep, so after slow supersteps it slept ~40 ms into each fast one, 3/4 less each time."""
    from remap.vertex.driver import QUIET_SHARE, busy_for

    graph_input(tmp_path)
    quiet: dict[int, float] = {}
    busy: dict[int, float] = {}
    real_await = Driver._await

    def spy(self, cmd, *args):
        acks = real_await(self, cmd, *args)
        if cmd.kind == "step":
            quiet[cmd.superstep] = args[0] if args else 0.0
            busy[cmd.superstep] = busy_for(acks)
        return acks

    monkeypatch.setattr(Driver, "_await", spy)
    program = program_from_namespace({"prepare": _split_prepare, "compute": _slow_then_fast}, "t")
    _, result, _ = run_threads(program, tmp_path, 2)
    assert result.supersteps == 10
    assert busy[2] > 0.1 and quiet[2] > 0.05, (busy, quiet)  # it sleeps through slow ones
    for s in range(2, 10):
        assert quiet[s] <= QUIET_SHARE * min(busy[s - 1], busy[s - 2]) + 1e-9, (s, busy, quiet)


def test_workers_that_read_other_partitions_build_their_own_again_in_fresh_memory(
    tmp_path: Path, monkeypatch
):
    """A worker whose read made other partitions' records between its own (then spilled and
    freed them) builds its partitions again after the merge, from their pickles, the old
    objects freed first (its supersteps were 15-30 % slower than one whole partition's for
    the memory they were strewn over); a worker that read only its own does not. Either way
    the output equals the reference."""
    graph_input(tmp_path)
    relaid: list[int] = []
    real = worker_mod.Worker._relayout

    def spy(self) -> None:
        relaid.append(self.slot)
        real(self)

    monkeypatch.setattr(worker_mod.Worker, "_relayout", spy)
    program = example("pagerank")
    want = run_local(program, read_tagged_lines(sorted((tmp_path / "in").iterdir())), 1, 200)
    got, _, _ = run_threads(program, tmp_path, 2, name="two")
    assert sorted(relaid) == [0, 1]
    assert got == parse_output(sum(want.partitions, []))
    relaid.clear()
    got, _, _ = run_threads(program, tmp_path, 1, name="one")
    assert relaid == []
    assert got == parse_output(sum(want.partitions, []))


def test_a_worker_error_that_says_where_is_shown_without_its_type():
    """A worker call's error reaches the driver as one line; an error whose message names what
    and where (a corrupt input: ``UnreadableInput``) reads as a data job's does, without its
    type ("a vertex worker failed: UnreadableInput: input ..." before); others keep it."""
    import queue

    from remap.sinks import TaskErrorInfo
    from remap.vertex.launch import ClusterLaunch

    events: queue.Queue = queue.Queue()
    unreadable = TaskErrorInfo(0, "UnreadableInput", "input /d/g.xz: corrupt or truncated xz data")
    plain = TaskErrorInfo(1, "TypeError", "unhashable type: 'list'")
    events.put(("items", None, [(0, None, unreadable), (1, None, plain), (2, 4, None)]))
    launch = ClusterLaunch.__new__(ClusterLaunch)  # (its events only: no cluster)
    launch.run = SimpleNamespace(events=events)
    assert launch.events() == [
        ("error", "input /d/g.xz: corrupt or truncated xz data"),
        ("error", "TypeError: unhashable type: 'list'"),
    ]


def test_racing_attempts_of_a_slot_claim_distinct_numbers_above_the_old_ones(tmp_path: Path):
    """Attempts of one slot claiming at once (a retry beside a stray) each get their own
    number, all above the attempts already there and independent of other slots'; once the
    job ended (``alive/`` gone) a claim makes nothing and raises FileNotFoundError."""
    from remap.vertex.files import Layout, heartbeat_name

    layout = Layout(DataDir(tmp_path / "data"), "job")
    layout.alive.mkdir(parents=True)
    for name in ("0.1", "0.2", "1.7", "driver.alive", "0.x"):
        (layout.alive / name).touch()
    start = threading.Barrier(8)
    got: list[int] = []

    def claim() -> None:
        start.wait(10)
        got.append(layout.claim_attempt(0))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(got) == list(range(3, 11)), got
    assert layout.claim_attempt(1) == 8 and layout.claim_attempt(2) == 1
    assert heartbeat_name("driver.alive") == heartbeat_name("0.x") == (-1, -1)
    remove_tree(layout.alive)
    with pytest.raises(FileNotFoundError):
        layout.claim_attempt(0)
    assert not layout.alive.exists()


def test_a_partition_receiving_from_many_senders_holds_one_senders_file_at_a_time(
    tmp_path: Path,
):
    """A partition whose vertices get a message from each of 40 senders (no combiner): the
    worker builds its inbox holding, besides the inbox, at most about one sender's file and
    its decoding (traced peak above the final inbox under 3x one sender's whole inbox), and
    every message arrives. It read every file and decoded them all before delivering one:
    the peak was 32x one sender's inbox above the inbox itself."""
    import tracemalloc

    from remap.data.layout import write_atomic
    from remap.vertex.engine import Partition, encode_bucket

    program = program_from_namespace(
        {"prepare": lambda line: None, "compute": lambda ctx, v, x, m: (x, True)}, "t"
    )
    vertices = 5000

    def inbox_cost(senders: int) -> tuple[int, int]:
        """(bytes the inbox holds, peak bytes above that while it was built)."""
        args = worker_mod.WorkerArgs(str(tmp_path / "data"), f"job{senders}", 0, program)
        worker = worker_mod.Worker(args)
        worker.parts = {0: Partition(0, 1, program)}
        for i in range(senders):
            bucket = {v: [f"message {i} to {v}"] for v in range(vertices)}
            blob = encode_bucket(bucket, False)
            write_atomic(worker.layout.inbox(0, 0, 0) / f"from{i + 1}", blob)
        cmd = worker_mod.Command(0, "step", 0, {0: 1}, [0], superstep=1)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            inbox = worker._inbox(cmd, 0)
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(inbox) == vertices
        assert all(m == [f"message {i} to {v}" for i in range(senders)] for v, m in inbox.items())
        return held - before, peak - held

    one, _ = inbox_cost(1)
    held, above = inbox_cost(40)
    assert held > 10 * one, (held, one)
    assert above < 3 * one, (above, one)


def _edge_prepare(line):
    src, dst = map(int, line.split())
    return [(src, None, [dst]), (dst, None, [])]


def _keeps_what_it_received(ctx, vid, value, messages):
    """Three supersteps of sending (id, superstep) along every edge; the value is the list of
    every message received, in the order received (any change of order shows)."""
    value = (value or []) + messages
    if ctx.superstep < 3:
        ctx.send_to_neighbors((vid, ctx.superstep))
        return value, False
    return value, True


@pytest.mark.parametrize("spill", [7, 100])
def test_messages_spilled_mid_superstep_arrive_as_if_held(tmp_path: Path, monkeypatch, spill):
    """Workers that write their messages out every ``spill`` messages (to other workers' and
    their own partitions) give every vertex the messages it gets when nothing is spilled, in
    the same order, and count the same messages."""
    graph_input(tmp_path)
    prog = program_from_namespace(
        {"prepare": _edge_prepare, "compute": _keeps_what_it_received},
        "t",
    )
    held, plain, _ = run_threads(prog, tmp_path, 3, name="held", partitions=5)
    monkeypatch.setattr(worker_mod, "MESSAGE_SPILL", spill)
    got, spilled, _ = run_threads(prog, tmp_path, 3, name="spilled", partitions=5)
    assert got == held
    assert spilled.messages == plain.messages > 3 * spill
    assert spilled.bytes_moved > plain.bytes_moved  # more, smaller files: it did spill


def test_a_superstep_sending_many_messages_holds_at_most_the_spill_of_them(
    tmp_path: Path, monkeypatch
):
    """A worker whose 2,000 vertices each send 50 messages to another worker's partition
    writes them out every MESSAGE_SPILL (here 1,000) messages: the superstep's traced peak
    stays under a tenth of what holding all 100,000 takes, and every message is in the files.
    (Held to the superstep's end, the peak was all of them.)"""
    import tracemalloc

    from remap.vertex.engine import Partition, decode_bucket, partition_of
    from remap.vertex.files import committed

    monkeypatch.setattr(worker_mod, "MESSAGE_SPILL", 1000, raising=False)

    def compute(ctx, vid, value, messages):
        for i in range(50):
            ctx.send(target, (vid, i, "a message of some length"))
        return value, True

    program = program_from_namespace({"prepare": lambda line: None, "compute": compute}, "t")
    target = next(v for v in range(100) if partition_of(v, 2) == 1)
    mine = [v for v in range(10**5) if partition_of(v, 2) == 0][:2000]
    args = worker_mod.WorkerArgs(str(tmp_path / "data"), "job", 0, program)
    worker = worker_mod.Worker(args)
    worker.parts = {0: Partition(0, 2, program)}
    for v in mine:
        worker.parts[0].add(v, 0, [], None)
    cmd = worker_mod.Command(0, "step", 0, {0: 1}, [0, 1], superstep=0, num_vertices=2000)
    worker.layout.step(0, 0).mkdir(parents=True)  # the driver's, before its command
    all_of_them = [(v, i, "a message of some length") for v in mine for i in range(50)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [(v, i, "a message of some length") for v in mine for i in range(50)]
        holding = tracemalloc.get_traced_memory()[0] - before
        del held
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        ack = worker._do_step(cmd)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert ack["delivered"] == ack["sent"] == 100_000
    got = []
    for path in committed(worker.layout.inbox(0, 0, 1)):
        _, bucket = decode_bucket(path.read_bytes())
        got += sum(bucket.values(), [])
    assert got == all_of_them
    assert peak < holding / 10, (peak, holding)


def test_a_worker_with_several_partitions_holds_one_inbox_at_a_time(tmp_path: Path):
    """A worker owning 4 partitions (as a survivor does after a rollback), each receiving a
    sender's file of 20,000 messages: its superstep gathers, checkpoints and computes one
    partition's inbox before the next one's, so its traced peak stays under 3x one
    partition's inbox (2x seen: the inbox, its sender's file and decoding, its checkpoint's
    pickle), and every message is seen once. It gathered all four first: 4.7x."""
    import tracemalloc

    from remap.data.layout import write_atomic
    from remap.vertex.engine import Partition, encode_bucket, partition_of

    seen = [0]

    def compute(ctx, vid, value, messages):
        seen[0] += len(messages)
        return value, True

    program = program_from_namespace({"prepare": lambda line: None, "compute": compute}, "t")
    args = worker_mod.WorkerArgs(str(tmp_path / "data"), "job", 0, program)
    worker = worker_mod.Worker(args)
    worker.parts = {p: Partition(p, 4, program) for p in range(4)}
    ids = {p: [v for v in range(10**4) if partition_of(v, 4) == p][:1000] for p in range(4)}
    for p, mine in ids.items():
        bucket = {v: [f"message {i} to {v}" for i in range(20)] for v in mine}
        write_atomic(
            worker.layout.inbox(0, 0, p) / "from00001-000000", encode_bucket(bucket, False)
        )
    cmd = worker_mod.Command(0, "step", 0, {0: 1}, [0] * 4, superstep=1, checkpoint=True)
    worker.layout.checkpoint(0, 1).mkdir(parents=True)  # the driver's, before its command
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        one = worker._inbox(cmd, 0)
        inbox = tracemalloc.get_traced_memory()[0] - before
        del one
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        worker._do_step(cmd)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert seen[0] == 4 * 20_000
    assert peak < 3 * inbox, (peak, inbox)


def _stale(fn):
    """``fn`` failing as on NFS when what it names was removed by another machine: ESTALE (a
    stale handle), where a local disk says FileNotFoundError."""

    def call(*args, **kw):
        try:
            return fn(*args, **kw)
        except FileNotFoundError as exc:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), exc.filename) from None

    return call


@pytest.mark.parametrize("stale", [False, True], ids=["local", "nfs-estale"])
def test_a_worker_woken_after_its_job_ended_writes_no_checkpoint_or_message(
    tmp_path: Path, monkeypatch, stale
):
    """A worker that resumes a checkpointing superstep after its job ended (the driver
    removed the scratch directory) drops the command at its first write and makes nothing:
    no checkpoint, no message file, no ``im/<job>`` again (it made them all again); one
    resuming a restore drops it at its read (it failed, failing the job: FileNotFoundError).
    ``stale``: the write or read fails with ESTALE, as on NFS, and is dropped the same (it
    raised OSError, which failed the job as the worker's error)."""
    from remap.vertex.engine import Partition, partition_of

    if stale:
        monkeypatch.setattr(worker_mod, "write_atomic", _stale(worker_mod.write_atomic))
        monkeypatch.setattr(worker_mod.Worker, "_read", _stale(worker_mod.Worker._read))

    other = next(v for v in range(100) if partition_of(v, 2) == 1)  # another worker's

    def compute(ctx, vid, value, messages):
        ctx.send(other, 1)
        return value, False

    program = program_from_namespace({"prepare": lambda line: None, "compute": compute}, "t")
    data = DataDir(tmp_path / "data")
    worker = worker_mod.Worker(worker_mod.WorkerArgs(str(data.root), "job", 0, program))
    worker.parts = {0: Partition(0, 2, program)}
    worker.parts[0].add(0, 0, [], None)
    data.im_dir("job").parent.mkdir(parents=True)  # im/ stays; the job's own is gone
    for kind, checkpoint in (("step", True), ("step", False), ("restore", False)):
        cmd = worker_mod.Command(0, kind, 0, {0: 1}, [0, 1], superstep=1, checkpoint=checkpoint)
        assert "error" not in worker._execute(cmd)
        assert not data.im_dir("job").exists()


def test_what_a_rollback_could_not_remove_goes_at_the_next_command(tmp_path: Path, monkeypatch):
    """An old epoch's folder whose removal at a rollback left part of it (on NFS, a file a
    superseded worker still holds open is renamed ``.nfs…`` and kept, and its folders with
    it) is removed again at the next command, not left until the job's end (it was); nothing
    in it is read or published: the output is the clean run's."""
    graph_input(tmp_path, weighted=True)
    want, clean, _ = run_threads(example("sssp"), tmp_path, 3, name="clean", partitions=6)
    program, release, frozen, workers = _freeze_at(monkeypatch, 2)
    real_rmdir, real_issue = os.rmdir, Driver._issue
    kept: list[Path] = []

    def rmdir(path, *args, **kw):
        name = Path(os.fspath(path))
        if name.name == "e0.gone" and name.parent.parent.name == "im" and not kept:
            kept.append(name / ".nfs0000000000001234")  # the removal's last rmdir: e0.gone
            kept[0].write_bytes(b"held open by the superseded worker")
        return real_rmdir(path, *args, **kw)

    after: list[list[str]] = []  # the job's scratch once each command after the rollback is out

    def issue(self, kind, **fields):
        cmd = real_issue(self, kind, **fields)
        if self.rollbacks and kind != "stop":  # (the stop comes once the scratch went)
            after.append(sorted(p.name for p in self.layout.scratch.iterdir()))
        return cmd

    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(Driver, "_issue", issue)
    _lose_one_worker(
        program,
        tmp_path,
        release,
        ThreadLaunch,
        clean,
        want,
        None,
        clock=_skipping_clock(frozen, workers, VertexConfig.lost_after),
    )
    assert kept and after, (kept, after)
    assert not [names for names in after if "e0.gone" in names], after


def test_a_worker_writing_while_its_jobs_scratch_is_removed_leaves_nothing(
    tmp_path: Path, monkeypatch
):
    """A worker still writing when its job's end removes the scratch (one of an earlier
    epoch, or any still running when a failed or killed job cleans up): here its message
    file comes when the removal has emptied a superstep's folder and is about to remove it.
    It finds no folder to write in, and nothing of ``im/<job>`` is left (the write made
    ``to0`` again there, which kept the superstep's folder, its epoch's and ``im/<job>``
    until the next job's sweep)."""
    graph_input(tmp_path)
    data = DataDir(tmp_path / "data")
    raced: list[str] = []
    real_rmdir = os.rmdir

    def rmdir(path, *args, dir_fd=None, **kw):
        name = os.fspath(path)
        if dir_fd is not None and re.fullmatch(r"s\d+", name) and not raced:
            (job,) = os.listdir(data.root / "job")
            late = Layout(data, job).inbox(0, int(name[1:]), 0) / worker_mod.message_file(9, 0)
            try:
                worker_mod.Worker._write_file(late, b"late")
                raced.append("written")
            except FileNotFoundError:
                raced.append("refused")
        return real_rmdir(path, *args, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(os, "rmdir", rmdir)
    run_threads(example("sssp"), tmp_path, 2)
    assert [p.relative_to(data.root) for p in (data.root / "im").rglob("*")] == []
    assert raced == ["refused"]
