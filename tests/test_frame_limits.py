"""Frames to a console are sized to the limit it said in its hello, header included.

A console whose ``REMAP_MAX_FRAME`` is smaller than the server's used to be sent a ``results``
frame over its limit: it closed the connection, resumed the job, was sent the same frame again,
for ever. Pure tests: the sizing functions, then the scheduler with fake links whose
``frame_limit`` is the console's (no reactor, no sockets). The in-memory and real-process
tests are in ``test_inmemory.py`` and ``test_e2e_cluster.py``.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from protocol import messages as m
from protocol.framing import frame_length
from remap.blobs import dumps, split
from remap.server.scheduler import Scheduler
from remap.server.scheduler.effects import NodeLost, NodeSaid
from remap.server.scheduler.sizing import TOO_LARGE, fit_results, fit_status, group_room
from tests.test_scheduler import (
    FakeConsole,
    FakeNode,
    assert_exactly_once,
    event,
    make,
    run_to_end,
)

KIB = 1024


def length(msg: m.Message) -> int:
    """The frame length a receiver holds against its limit."""
    return frame_length(*m.encode(msg))


def outcomes(pieces: list[m.Results]) -> list[tuple[int, Any]]:
    """(index, bytes of the result, or the error's type) of every result, in order."""
    out = []
    for piece in pieces:
        errors = {e[0]: e for e in piece.errors}
        blobs = list(split(piece.sizes, piece.payload))
        for pos, index in enumerate(piece.answered):
            out.append((index, errors[pos][1] if pos in errors else bytes(blobs[pos])))
    return out


# ============================================================================ the sizing functions


def test_a_results_frame_whose_payload_is_at_the_limit_is_over_it_and_is_split() -> None:
    """The header counts: results whose pickles add up to the limit exactly do not fit one
    frame; they leave as pieces each within the limit, every result once and in order."""
    limit = 64 * KIB
    blobs = [bytes([i]) * (limit // 4) for i in range(4)]
    msg = m.Results.of(12, range(100, 104), sizes=[len(b) for b in blobs], payload=b"".join(blobs))
    assert len(msg.payload) == limit and length(msg) > limit
    pieces = fit_results(msg, limit, limit)
    assert len(pieces) == 2 and all(length(p) <= limit for p in pieces)
    assert outcomes(pieces) == [(100 + i, b) for i, b in enumerate(blobs)]


def test_a_node_result_that_fits_the_servers_frames_may_not_fit_as_results() -> None:
    """A node's ``result`` at the limit (what the node checks) becomes a ``results`` with a
    longer header (the job id, the indices of a batch with gaps): a few bytes over. It is
    sent within the limit."""
    limit = 32 * KIB
    indices = list(range(0, 4000, 2))  # gaps: listed, not a run
    sizes = [10] * (len(indices) - 1) + [1000]
    answer = m.TaskResult(task=7, sizes=sizes, elapsed=0.25, payload=b"r" * sum(sizes))
    sizes[-1] += limit - length(answer)  # the node's answer exactly at the limit
    blobs = [b"r" * size for size in sizes]
    answer = m.TaskResult(task=7, sizes=sizes, elapsed=0.25, payload=b"".join(blobs))
    assert length(answer) == limit
    msg = m.Results.of(1_767_225_600_123, indices, sizes=answer.sizes, payload=answer.payload)
    assert length(msg) > limit
    pieces = fit_results(msg, limit, limit)
    assert all(length(p) <= limit for p in pieces)
    assert outcomes(pieces) == list(zip(indices, blobs, strict=True))


def test_a_result_too_large_for_a_frame_by_itself_becomes_its_error_in_one_line() -> None:
    """Its neighbours travel; it becomes a ResultTooLarge error whose one line names the
    frame it would need, the limit and the setting to raise."""
    limit = 16 * KIB
    blobs = [b"a" * 100, b"b" * (20 * KIB), b"c" * 100]
    msg = m.Results.of(3, range(3), sizes=[len(b) for b in blobs], payload=b"".join(blobs))
    pieces = fit_results(msg, limit, 256 * 1024 * 1024)
    assert all(length(p) <= limit for p in pieces)
    assert outcomes(pieces) == [(0, blobs[0]), (1, TOO_LARGE), (2, blobs[2])]
    ((_, _, text, _),) = [e for p in pieces for e in p.errors]
    assert "\n" not in text
    need = 20 * KIB + 100
    assert "16,384 bytes" in text and "raise the console's REMAP_MAX_FRAME" in text
    assert any(f"{n:,} bytes" in text for n in range(20 * KIB, need)), text


def test_when_the_server_has_the_same_limit_both_settings_are_named() -> None:
    """A console whose limit is the server's: raising its own alone would not help."""
    msg = m.Results.of(3, range(1), sizes=[20 * KIB], payload=b"x" * 20 * KIB)
    (piece,) = fit_results(msg, 16 * KIB, 16 * KIB)
    assert "the console's and the server's REMAP_MAX_FRAME" in piece.errors[0][2]


def test_a_packed_batch_or_a_fold_that_does_not_fit_is_an_error_for_each_argument() -> None:
    """One pickle for several arguments cannot be cut between them: each gets the error."""
    blob = b"p" * (40 * KIB)
    packed = m.Results.of(4, range(10, 13), sizes=[len(blob)], packed=True, payload=blob)
    (piece,) = fit_results(packed, 32 * KIB, 64 * KIB)
    assert not piece.packed and piece.sizes == [0, 0, 0] and piece.payload == b""
    assert [e[:2] for e in piece.errors] == [[0, TOO_LARGE], [1, TOO_LARGE], [2, TOO_LARGE]]
    fold = m.Results.of(4, [1, 5], sizes=[len(blob)], partial=True, payload=blob)
    (piece,) = fit_results(fold, 32 * KIB, 64 * KIB)
    assert piece.partial and piece.sizes == [] and len(piece.errors) == 2
    assert list(piece.answered) == [1, 5] and length(piece) <= 32 * KIB


def test_random_batches_are_cut_within_the_limit_keeping_every_outcome() -> None:
    """Batches of random sizes, errors, output and index layouts, at random limits: every
    piece is within the limit, every argument answered once in order, each result intact
    unless it could not fit by itself, errors kept with their texts."""
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 40)
        limit = rng.choice([2, 4, 16, 64]) * KIB + rng.randint(0, 999)
        sizes = [rng.choice([0, 10, 300, 1500, 5000, 70_000]) for _ in range(n)]
        blobs = [bytes([i % 251]) * s for i, s in enumerate(sizes)]
        failing = sorted(rng.sample(range(n), rng.randint(0, n // 3)))
        errors = [
            [p, "ValueError", f"bad {p}", "Traceback\n" * rng.randint(0, 30)] for p in failing
        ]
        for p in failing:
            blobs[p], sizes[p] = b"", 0
        start = rng.randint(0, 10**12)
        indices = (
            range(start, start + n) if rng.random() < 0.5 else sorted(rng.sample(range(10**6), n))
        )
        output = "é" * rng.choice([0, 10, 5000])
        msg = m.Results.of(
            rng.randint(1, 2**62),
            indices,
            sizes=sizes,
            errors=errors,
            output=output,
            payload=b"".join(blobs),
        )
        pieces = fit_results(msg, limit, 256 * KIB)
        assert all(length(p) <= limit for p in pieces), limit
        got = outcomes(pieces)
        assert [i for i, _ in got] == list(indices)
        for pos, (_, value) in enumerate(got):
            if pos in failing:
                assert value in ("ValueError", TOO_LARGE)
            elif value != blobs[pos]:
                assert value == TOO_LARGE and sizes[pos] + 200 > limit
        texts = [e[2] for p in pieces for e in p.errors if e[1] == "ValueError"]
        assert all(t.startswith("bad ") for t in texts)


def job_map(i: int, state: str) -> dict:
    return {"id": i, "state": state, "name": f"job {i}", "message": "m" * 400}


def test_a_status_reply_over_the_limit_leaves_out_its_oldest_finished_jobs() -> None:
    """Running jobs stay; finished ones go, oldest first, until the reply fits; None when
    even the running ones do not."""
    jobs = [job_map(i, "done") for i in range(20)] + [job_map(20 + i, "running") for i in range(3)]
    reply = m.StatusReply(re=5, nodes=[], jobs=jobs)
    assert fit_status(reply, length(reply)) is reply
    limit = length(reply) - 3 * KIB
    trimmed = fit_status(reply, limit)
    assert trimmed is not None and length(trimmed) <= limit and trimmed.re == 5
    ids = [j["id"] for j in trimmed.jobs]
    assert ids[-3:] == [20, 21, 22] and ids == sorted(ids) and ids[0] > 0
    assert ids[0] == 20 - (len(ids) - 3), "the newest finished jobs are kept"
    assert fit_status(reply, 1 * KIB) is None


# ============================================================================ the scheduler


class _Limited:
    """A fake peer whose link takes frames of at most ``limit_`` bytes (its hello said so)."""

    limit_: int
    link: Any

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "link":
            value.frame_limit = self.limit_
        super().__setattr__(name, value)

    def frames_ok(self) -> bool:
        return all(length(msg) <= self.limit_ for msg in self.link.sent)


class SmallConsole(_Limited, FakeConsole):
    """A console whose connection takes frames of at most ``limit`` bytes."""

    def __init__(self, sched: Scheduler, values: Any, *, limit: int, **params: Any) -> None:
        self.limit_ = limit
        super().__init__(sched, values, **params)


def blob_of(n: int) -> Any:
    return lambda x: bytes([x % 251]) * n


def packed_answer(node: FakeNode, task: m.Task, fn: Any) -> None:
    """Answer as a core does: one pickle of the list of every result."""
    node.poll()
    node.tasks.pop(task.task, None)
    blob = dumps([fn(pickle.loads(b)) for b in split(task.sizes, task.payload)])
    msg = m.TaskResult(task=task.task, sizes=[len(blob)], packed=True, payload=blob)
    event(node.sched, NodeSaid(node.id, msg))


def test_results_too_large_for_a_consoles_frames_reach_it_in_pieces() -> None:
    """A batch whose results are over the console's limit arrives split, every result once,
    and the job ends done; no frame to it is over its limit."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = SmallConsole(sched, range(10), limit=64 * KIB, chunksize=10)
    console.feed()
    (task,) = node.held()
    node.answer(task, fn=blob_of(20 * KIB))
    batches = console.link.of(m.Results)
    assert len(batches) >= 4 and console.frames_ok()
    assert {i: v for i, ((_, v),) in console.outcomes().items()} == {
        i: bytes([i]) * 20 * KIB for i in range(10)
    }
    assert console.done().state == "done"


def test_a_single_result_over_the_consoles_limit_fails_the_job_with_one_line() -> None:
    """``on_error: fail``: the job ends failed naming the argument, the frame size, the limit
    and the setting; nothing is sent again (no loop) and no frame is over the limit."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = SmallConsole(sched, range(3), limit=64 * KIB, chunksize=1)
    console.feed()
    for task in node.held():
        node.answer(task, fn=lambda x: b"x" * (100 * KIB if x == 1 else 10))
    done = console.done()
    assert done is not None and done.state == "failed", done
    assert done.message.startswith("argument 1 raised ResultTooLarge: its result needs a frame of")
    assert "65,536 bytes" in done.message and "REMAP_MAX_FRAME" in done.message
    assert "\n" not in done.message
    assert console.frames_ok() and not node.held()


def test_with_on_error_continue_the_too_large_result_is_that_arguments_error() -> None:
    """The others are delivered; the job ends done with one failed argument."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = SmallConsole(sched, range(4), limit=64 * KIB, chunksize=4, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.answer(task, fn=lambda x: b"y" * (100 * KIB if x == 2 else 10))
    outcomes = console.outcomes()
    assert outcomes[2] == [("error", TOO_LARGE)]
    assert [outcomes[i] for i in (0, 1, 3)] == [[("ok", b"y" * 10)]] * 3
    done = console.done()
    assert (done.state, done.done, done.failed) == ("done", 3, 1)


def test_a_packed_batch_over_the_limit_runs_again_one_argument_at_a_time() -> None:
    """A core packs a batch's results in one pickle, which cannot be cut: nothing of it is
    delivered, each argument runs again by itself (no attempt counted), later batches are
    capped so their results fit, and every result arrives once."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = SmallConsole(sched, range(40), limit=64 * KIB, chunksize=8, retries=0)
    console.feed()
    fn = blob_of(20 * KIB)
    first = node.held()
    assert [len(node.args_of(t)) for t in first] == [8, 8]  # (a core's credit: two tasks)
    for task in first:
        packed_answer(node, task, fn)
    assert not console.link.of(m.Results)
    counts = []
    for _ in range(200):
        held = node.held()
        if not held:
            break
        for task in held:
            counts.append(len(node.args_of(task)))
            packed_answer(node, task, fn)
    assert counts[:16] == [1] * 16, "the batches' arguments ran again one by one"
    assert max(counts) == 1 and len(counts) == 40, "later batches are capped to what fits"
    assert console.frames_ok()
    outcomes = console.outcomes()
    assert sorted(outcomes) == list(range(40))
    assert all(len(v) == 1 for v in outcomes.values())
    assert console.done().state == "done"


def test_a_detached_jobs_results_are_replayed_in_frames_the_attaching_console_takes() -> None:
    """The server keeps a detached job's results as they came; a console with a smaller
    limit that attaches gets them split (and a result that cannot fit as its error)."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(6), chunksize=6, detach=True, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.answer(task, fn=lambda x: b"z" * (100 * KIB if x == 5 else 20 * KIB))
    assert sched.jobs[console.job].finished
    small = SmallConsole(sched, [], limit=64 * KIB, name="late")
    assert sched.attach(small.link, console.job) is not None
    assert small.frames_ok() and len(small.link.of(m.Results, console.job)) >= 3
    small.job = console.job
    outcomes = small.outcomes()
    assert [outcomes[i] for i in range(5)] == [[("ok", b"z" * 20 * KIB)]] * 5
    assert outcomes[5] == [("error", TOO_LARGE)]


def test_a_detached_result_too_large_for_one_console_stays_whole_for_another() -> None:
    """The server counted the 100 KiB result done and keeps it: a console with small frames
    that attaches is told it is too large for *this* console and that the server keeps it, its
    ``job_done`` carries the job's own counts (status and attach agree); a console with larger
    frames that attaches after it gets the result itself."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(3), chunksize=3, detach=True)
    console.feed()
    (task,) = node.held()
    node.answer(task, fn=lambda x: bytes([x]) * (100 * KIB if x == 1 else 10))
    job = sched.jobs[console.job]
    assert (job.state, job.done, job.failed) == ("done", 3, 0)
    small = SmallConsole(sched, [], limit=64 * KIB, name="small")
    assert sched.attach(small.link, console.job) is not None and small.frames_ok()
    errors = [e for msg in small.link.of(m.Results, console.job) for e in msg.errors]
    ((_, type_name, text, _),) = errors
    assert type_name == TOO_LARGE and "over the limit of 65,536 bytes" in text, text
    assert "the server keeps it: attach with a larger REMAP_MAX_FRAME" in text, text
    (done,) = small.link.of(m.JobDone, console.job)
    assert (done.state, done.done, done.failed) == ("done", 3, 0)
    large = SmallConsole(sched, [], limit=1024 * KIB, name="large")
    assert sched.attach(large.link, console.job) is not None
    large.job = console.job
    assert large.outcomes()[1] == [("ok", bytes([1]) * 100 * KIB)]


@pytest.mark.parametrize("limit", [0, 256 * 1024 * 1024])
def test_a_console_without_a_small_limit_gets_the_batch_as_it_came(limit: int) -> None:
    """No limit (an in-process link) or a large one: one message, no re-run."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = SmallConsole(sched, range(5), limit=limit, chunksize=5)
    console.feed()
    (task,) = node.held()
    packed_answer(node, task, blob_of(100 * KIB))
    (results,) = console.link.of(m.Results)
    assert results.packed and list(results.answered) == list(range(5))
    assert console.done().state == "done"


def test_a_batch_too_large_for_the_nodes_frames_runs_again_alone_even_without_retries() -> None:
    """The other direction, node to server: a node reports a batch's results too large for
    its frames ("too-large"); each argument runs again alone without counting an attempt
    (nothing failed), so with ``retries: 0`` the ones that fit alone are delivered and only a
    result too large by itself fails."""
    sched, _ = make()
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(4), chunksize=4, retries=0, on_error="continue")
    console.feed()
    (task,) = node.held()
    node.crash(task, reason="too-large")
    for _ in range(10):
        for alone in node.held():
            assert len(node.args_of(alone)) == 1
            if node.args_of(alone) == [2]:
                node.crash(alone, reason="too-large")
            else:
                node.answer(alone)
    outcomes = console.outcomes()
    assert outcomes[2] == [("error", TOO_LARGE)]
    assert [outcomes[i] for i in (0, 1, 3)] == [[("ok", 0)], [("ok", 1)], [("ok", 9)]]
    assert console.done().state == "done"


# ============================================================================ frames to a node
#
# A node refuses a frame over its own REMAP_MAX_FRAME the same way (it closes, connects again,
# its work is re-queued and sent to it again): measured, a node at 1 MiB given a 2 MiB argument
# refused the frame 135 times in 30 s and the job never ended.


class SmallNode(_Limited, FakeNode):
    """A node whose connection takes frames of at most ``limit`` bytes (its hello said so)."""

    def __init__(self, sched: Scheduler, node_id: str, *, limit: int, **params: Any) -> None:
        self.limit_ = limit
        super().__init__(sched, node_id, **params)


def test_batches_to_a_node_with_small_frames_are_cut_to_fit_them() -> None:
    """A chunk of 20 arguments of 10 KiB (200 KiB) to a node that takes 64 KiB frames leaves
    in tasks each within its limit; every argument runs once and the job ends done."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=64 * KIB)
    console = FakeConsole(sched, [b"a" * 10 * KIB] * 20, chunksize=20)
    console.feed()
    run_to_end([node], [console], fn=len)
    assert node.frames_ok() and len(node.link.of(m.Task)) >= 4
    assert_exactly_once(console, 20)
    assert console.done().state == "done"


def test_an_argument_too_large_for_one_node_goes_to_a_node_whose_frames_take_it() -> None:
    """The node with small frames (it joined first and is asked first) never gets the 200 KiB
    argument; the node with larger frames runs it; the small one runs the rest."""
    sched, _ = make()
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    large = SmallNode(sched, "large", cores=1, limit=1024 * KIB)
    values = [b"s", b"L" * 200 * KIB] + [b"s"] * 6
    console = FakeConsole(sched, values, chunksize=1)
    console.feed()
    run_to_end([small, large], [console], fn=len)
    assert small.frames_ok() and large.frames_ok()
    ran_on = {
        i: name
        for name, node in (("small", small), ("large", large))
        for task in node.link.of(m.Task)
        for i in [pickle.loads(b) for b in split(task.sizes, task.payload)]
        if i == values[1]
    }
    assert list(ran_on.values()) == ["large"]
    assert small.link.of(m.Task), "the small node ran the others"
    outcomes = assert_exactly_once(console, 8)
    assert outcomes[1] == ("ok", 200 * KIB)
    assert console.done().state == "done"


def grouped_args(job: int, groups: list[list[Any]]) -> m.Args:
    """An ``args`` message of argument groups, one pickle each (as a console sends them)."""
    blobs = [pickle.dumps(g) for g in groups]
    return m.Args(
        job=job,
        start=0,
        sizes=[len(b) for b in blobs],
        groups=[len(g) for g in groups],
        payload=b"".join(blobs),
    )


def test_an_argument_group_too_large_for_a_node_goes_whole_to_one_that_takes_it() -> None:
    """A group is one pickle: the server cannot cut it. Over the small node's frames, it goes
    whole to the node with larger frames; the small node gets only what fits it."""
    sched, _ = make()
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    large = SmallNode(sched, "large", cores=1, limit=1024 * KIB)
    console = FakeConsole(sched, [], end=False, chunksize=8)
    big = [bytes([i]) * 10 * KIB for i in range(8)]  # 80 KiB in one pickle
    assert console.send(grouped_args(console.job, [[b"x"] * 8, big, [b"y"] * 8])) is None
    on_small = [t for t in small.held() if t.groups]
    on_large = [t for t in large.held() if t.groups]
    assert small.frames_ok() and large.frames_ok()
    assert on_small and all(len(t.payload) < 1 * KIB for t in on_small)
    assert [len(t.payload) > 80 * KIB for t in on_large].count(True) == 1
    assert sorted(t.groups for t in on_small + on_large) == [[8], [8], [8]]


def test_an_argument_too_large_for_every_node_fails_the_job_in_one_line() -> None:
    """``on_error: fail``: no node takes the 200 KiB argument's frame, so the job fails at once
    with one line naming the argument, the frame it needs, the largest node limit and the
    setting to raise; nothing over a node's limit is ever sent (no loop)."""
    sched, _ = make()
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    other = SmallNode(sched, "other", cores=1, limit=96 * KIB)
    console = FakeConsole(sched, [b"a", b"B" * 200 * KIB, b"c"], chunksize=1)
    console.feed()
    done = console.done()
    assert done is not None and done.state == "failed", done
    text = done.message
    assert text.startswith("argument 1 raised ArgumentTooLarge: its task needs a frame of 204,")
    assert "over the limit of 98,304 bytes on frames to the nodes" in text, text
    assert text.endswith("raise the nodes' REMAP_MAX_FRAME") and "\n" not in text, text
    assert small.frames_ok() and other.frames_ok()
    assert not any(1 in t.sizes and len(t.payload) > 64 * KIB for t in small.link.of(m.Task))


def test_with_on_error_continue_the_too_large_argument_is_its_error_and_the_rest_run() -> None:
    """The argument that fits no node is that argument's ``ArgumentTooLarge``; the others are
    delivered and the job ends done with one failed."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=64 * KIB)
    values = [b"a", b"B" * 200 * KIB, b"c", b"d"]
    console = FakeConsole(sched, values, chunksize=1, on_error="continue")
    console.feed()
    run_to_end([node], [console], fn=len)
    outcomes = assert_exactly_once(console, 4)
    assert outcomes[1] == ("error", "ArgumentTooLarge")
    assert [outcomes[i] for i in (0, 2, 3)] == [("ok", 1)] * 3
    done = console.done()
    assert (done.state, done.done, done.failed) == ("done", 3, 1)
    assert node.frames_ok()


def test_a_function_too_large_for_every_node_fails_the_job_in_one_line() -> None:
    """The job's function (its ``job_load``) over every node's frames: the job fails naming
    its size, the largest limit and the setting; no ``job_load`` or task leaves."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=64 * KIB)
    console = FakeConsole(sched, [1, 2], payload=b"f" * 100 * KIB, chunksize=1)
    console.feed()
    done = console.done()
    assert done is not None and done.state == "failed", done
    assert done.message.startswith("the job's function needs a frame of 102,"), done.message
    assert "over the limit of 65,536 bytes" in done.message
    assert done.message.endswith("raise the nodes' REMAP_MAX_FRAME")
    assert not node.link.of(m.JobLoad) and not node.link.of(m.Task) and node.frames_ok()


def test_a_function_too_large_for_one_node_runs_on_the_node_that_takes_it() -> None:
    """Only the node with larger frames loads the job and runs its tasks."""
    sched, _ = make()
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    large = SmallNode(sched, "large", cores=1, limit=1024 * KIB)
    console = FakeConsole(sched, range(6), payload=b"f" * 100 * KIB, chunksize=1)
    console.feed()
    run_to_end([small, large], [console])
    assert not small.link.of(m.JobLoad) and not small.link.of(m.Task)
    assert len(large.link.of(m.JobLoad)) == 1 and small.frames_ok() and large.frames_ok()
    assert_exactly_once(console, 6)
    assert console.done().state == "done"


def test_an_argument_waiting_for_the_one_node_that_takes_it_fails_when_that_node_goes() -> None:
    """Decided at dispatch, among the nodes connected: while a node whose frames take the
    argument is connected (busy), the argument waits for it; once it is gone, the argument
    fits no connected node and fails in one line rather than wait for a node that may never
    come."""
    sched, _ = make()
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    large = SmallNode(sched, "large", cores=1, limit=1024 * KIB)
    console = FakeConsole(sched, [0, 1, 2, 3, b"B" * 200 * KIB, 5], chunksize=1)
    console.feed()
    assert len(large.held()) == 2 and len(small.held()) == 2  # the large node is busy
    for task in small.held():
        small.answer(task)
    assert console.done() is None, "it waits while the large node is connected"
    assert all(len(t.payload) < 64 * KIB for t in small.held())
    event(sched, NodeLost("large", "cut off"))
    for _ in range(10):  # its tasks come back to the small node; then argument 4 is next
        for task in small.held():
            small.answer(task)
    done = console.done()
    assert done is not None and done.state == "failed", done
    assert "argument 4 raised ArgumentTooLarge" in done.message
    assert "over the limit of 65,536 bytes" in done.message and small.frames_ok()


def test_a_node_that_refuses_a_frame_is_never_sent_it_again() -> None:
    """A node whose hello said no limit (one from before ``hello.max_frame``: the server holds
    it to the default) but takes 64 KiB frames refuses a 200 KiB task: its error names its
    limit, it closes and connects again. The server keeps that limit for the node process: the
    argument fits no node and fails in one line; the node refused one frame, not one per
    reconnection."""
    sched, _ = make()
    real = 64 * KIB

    def join(k: int) -> SmallNode:
        return SmallNode(sched, f"old{k}", cores=1, limit=256 * 1024 * 1024, host="old", pid=42)

    node = join(0)
    console = FakeConsole(sched, [b"a", b"B" * 200 * KIB, b"c"], chunksize=1)
    console.feed()
    refusals = 0
    for k in range(1, 50):
        if console.done() is not None:
            break
        new = node.link.sent[node._seen :]
        over = [msg for msg in new if length(msg) > real]
        if over:
            refusals += 1
            said = f"frame of {length(over[0])} bytes exceeds the limit of {real} bytes"
            sched.node_refused_frame(node.id, said)
            event(sched, NodeLost(node.id, f"peer refused: {said}"))
            node = join(k)
            continue
        for task in node.held():
            node.answer(task, fn=len)
        console.feed()
    assert refusals == 1
    done = console.done()
    assert done is not None and done.state == "failed", done
    assert done.message.startswith("argument 1 raised ArgumentTooLarge"), done.message
    assert "over the limit of 65,536 bytes" in done.message
    assert all(length(msg) <= real for msg in node.link.sent)


def test_a_refusal_that_names_no_limit_halves_what_is_believed() -> None:
    """A refusal whose error names no limit (another implementation's wording): frames to that
    node are held to half of what was believed, so refusals end after a few at most."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=1024 * KIB, host="h", pid=9)
    sched.node_refused_frame("n", "too big")
    event(sched, NodeLost("n", "refused"))
    again = SmallNode(sched, "n2", cores=1, limit=1024 * KIB, host="h", pid=9)
    assert sched.nodes["n2"].frame_limit == 512 * KIB
    assert node.link is not again.link


@pytest.mark.parametrize("limit", [0, 256 * 1024 * 1024])
def test_a_node_without_a_small_limit_gets_batches_as_before(limit: int) -> None:
    """No limit (an in-process link) or the default: the batch is the chunk, one task."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=limit)
    console = FakeConsole(sched, [b"a" * 10 * KIB] * 20, chunksize=20)
    console.feed()
    (task,) = node.held()
    assert len(task.sizes) == 20


# ============================================================================ argument groups
#
# A console sizes its argument groups (about 64 KiB, up to 1 MiB) and the server cannot split
# one: on nodes with small frames a group could fit none of them, and each of its arguments
# failed with ArgumentTooLarge though each fitted alone. The server now says the bound.


def limits_told(console: FakeConsole) -> list[tuple[int, int]]:
    """(job, max_bytes) of every ``group_limit`` the console was sent, in order."""
    return [(msg.job, msg.max_bytes) for msg in console.link.of(m.GroupLimit)]


def test_a_console_is_told_the_largest_group_the_nodes_that_may_run_its_job_take() -> None:
    """Before ``submitted`` (under minus the submit's id), then whenever the bound changes while
    the console sends arguments: the smallest frame limit of the nodes that may run the job
    (its group only; a drained one does not count) less the task's header; 0 lifts it."""
    sched, _ = make()
    SmallNode(sched, "mid", cores=1, limit=64 * KIB)
    SmallNode(sched, "gpu", cores=1, limit=128 * KIB, group="gpu")
    console = FakeConsole(sched, range(10), end=False)
    kinds = [type(msg) for msg in console.link.sent]
    assert kinds[:2] == [m.GroupLimit, m.Submitted], "the bound comes first"
    assert limits_told(console) == [(-7, group_room(64 * KIB))]
    tiny = SmallNode(sched, "tiny", cores=1, limit=8 * KIB)
    assert limits_told(console)[1:] == [(console.job, group_room(8 * KIB))]
    event(sched, NodeLost(tiny.id, "cut off"))
    sched.drain("mid")
    sched.set_excluded(frozenset({"host-gpu"}))
    job = console.job
    assert limits_told(console)[2:] == [
        (job, group_room(64 * KIB)),
        (job, group_room(128 * KIB)),
        (job, m.EARLY_GROUP_BYTES),  # no node may run it: the first to come may be small
    ]
    sched.set_excluded(frozenset())
    sched.undrain("mid")
    assert limits_told(console)[5:] == [(job, group_room(128 * KIB)), (job, group_room(64 * KIB))]
    SmallNode(sched, "roomy", cores=1, limit=256 * 1024 * 1024)
    event(sched, NodeLost("mid", "cut off"))
    sched.drain("gpu")
    assert limits_told(console)[7:] == [(job, group_room(128 * KIB)), (job, 0)], "lifted"
    console.feed()
    assert sched.args_ended(console.link, m.ArgsEnd(job=job, total=console.sent)) is None
    SmallNode(sched, "late", cores=1, limit=4 * KIB)
    assert len(limits_told(console)) == 9, "nothing once every argument is in"
    sched.undrain("gpu")
    gpu_job = FakeConsole(sched, range(3), name="g", group="gpu")
    assert limits_told(gpu_job) == [(-7, group_room(128 * KIB))], "only its group's nodes count"


def test_a_job_waiting_for_nodes_is_told_small_groups_until_one_comes() -> None:
    """Submitted before any node: groups of ``EARLY_GROUP_BYTES`` at most (the first node may
    take small frames, and groups queued before it came could fit none); a node with small
    frames sets the bound, a node at the server's lifts it."""
    sched, _ = make()
    console = FakeConsole(sched, range(10), end=False)
    kinds = [type(msg) for msg in console.link.sent]
    assert kinds[:2] == [m.GroupLimit, m.Submitted]
    assert limits_told(console) == [(-7, m.EARLY_GROUP_BYTES)]
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    assert limits_told(console)[1:] == [(console.job, group_room(64 * KIB))]
    SmallNode(sched, "roomy", cores=1, limit=256 * 1024 * 1024)
    event(sched, NodeLost(small.id, "cut off"))
    assert limits_told(console)[2:] == [(console.job, 0)]
    other = FakeConsole(sched, range(3), name="other")
    assert not other.link.of(m.GroupLimit), "a node runs it, none with small frames"


def test_a_cluster_whose_nodes_take_the_servers_frames_sends_no_group_limit() -> None:
    """Nodes at the server's limit (the default) or in-process: the wire is as before."""
    sched, _ = make()
    SmallNode(sched, "a", cores=1, limit=256 * 1024 * 1024)
    SmallNode(sched, "b", cores=1, limit=0)
    console = FakeConsole(sched, range(10))
    SmallNode(sched, "c", cores=1, limit=256 * 1024 * 1024)
    assert not console.link.of(m.GroupLimit)


def pickle_of_size(size: int) -> list[bytes]:
    """A two-argument group whose pickle is exactly ``size`` bytes."""
    for k in range(size, 0, -1):
        group = [b"a" * k, b"b"]
        if len(pickle.dumps(group)) == size:
            return group
    raise AssertionError(size)


def test_a_group_at_the_bound_told_fits_the_node_it_was_told_for() -> None:
    """The bound is exact enough: a group whose pickle is ``max_bytes`` long goes to the node
    with the smallest frames as one task within its limit and runs."""
    sched, _ = make()
    node = SmallNode(sched, "n", cores=1, limit=64 * KIB)
    console = FakeConsole(sched, [], end=False, chunksize=8)
    ((_, bound),) = limits_told(console)
    group = pickle_of_size(bound)
    assert console.send(grouped_args(console.job, [group])) is None
    (task,) = node.held()
    assert task.groups == [2] and len(task.payload) == bound and node.frames_ok()


# ============================================================================ head-of-line wait


def args_run(node: FakeNode, job: int) -> list[Any]:
    """The arguments of the tasks of ``job`` the node holds now."""
    return [a for t in node.held() if t.job == job for a in node.args_of(t)]


def test_a_large_argument_waiting_for_a_busy_node_does_not_hold_back_what_fits_a_small_one() -> (
    None
):
    """The large node is busy; the next argument of a job (200 KiB) waits for it, but the
    arguments behind it go to the node with small frames now, instead of that node idling
    until the large one takes the head. The large argument then goes to the large node first;
    every argument runs once. Before, the small node got nothing of the job in that round."""
    sched, _ = make()
    large = SmallNode(sched, "large", cores=1, limit=1024 * KIB)
    first = FakeConsole(sched, [b"a", b"b"], name="first", chunksize=1)
    first.feed()
    assert len(large.held()) == 2, "the large node is busy"
    small = SmallNode(sched, "small", cores=1, limit=64 * KIB)
    values = [b"B" * 200 * KIB, b"1", b"2", b"3", b"4"]
    console = FakeConsole(sched, values, name="second", chunksize=1)
    console.feed()
    assert args_run(small, console.job) == [b"1", b"2"], "what fits the small node goes now"
    assert small.frames_ok()
    for task in large.held():
        large.answer(task, fn=len)
    assert args_run(large, console.job)[:1] == [values[0]], "the large one was next in line"
    run_to_end([small, large], [first, console], fn=len)
    assert small.frames_ok() and large.frames_ok()
    outcomes = assert_exactly_once(console, 5)
    assert outcomes[0] == ("ok", 200 * KIB)
    assert console.done().state == "done"
