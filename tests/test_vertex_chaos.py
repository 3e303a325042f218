"""Chaos for vertex jobs: a node SIGKILLed mid-job (after a checkpoint, and before the first
one); the job rolls back, goes on with the node left, and writes the undisturbed output.

Real server and node processes on 127.0.0.1; the driver runs in this process through the
Python API. The kill is triggered by the job's own progress (a superstep's barrier), never by
a timer.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import networkx as nx
import pytest

import remap
from remap.settings import Settings
from tests.cluster_harness import NodeSpec, wait_for
from tests.vertex_graphs import EXAMPLES, edge_lines, example, parse_output, write_files
from tests.vertex_reference import read_tagged_lines, run_local

pytestmark = pytest.mark.slow


def _sssp_module():
    import sys

    from remap.jobfile import resolve_function

    return sys.modules[resolve_function("sssp.py:compute", EXAMPLES).__module__]


def _grid_input(tmp_path: Path) -> list[Path]:
    """A weighted 14x14 grid (both directions): SSSP from a corner takes ~30 supersteps."""
    g = nx.DiGraph(nx.convert_node_labels_to_integers(nx.grid_2d_graph(14, 14)))
    rnd = random.Random(1)
    for u, v in g.edges:
        g[u][v]["w"] = rnd.randint(1, 9)
    return write_files(tmp_path / "in", edge_lines(g, weight="w"), 3)


def _run(cluster, module, tmp_path: Path, max_supersteps: int, checkpoint_every: int, **kw):
    """``module`` as a vertex job of 4 partitions from ``tmp_path/in`` to ``tmp_path/out``
    (scratch in ``tmp_path/data``): its result, and its output parsed."""
    result = cluster.vertex(
        module,
        tmp_path / "in",
        tmp_path / "out",
        partitions=4,
        max_supersteps=max_supersteps,
        checkpoint_every=checkpoint_every,
        data_dir=tmp_path / "data",
        **kw,
    )
    parts = sorted((tmp_path / "out").glob("part-*"))
    return result, parse_output(sum((p.read_text().splitlines() for p in parts), []))


@pytest.mark.parametrize("kill_after,checkpoint_every", [(7, 3), (1, 5)])
def test_node_sigkilled_mid_job_gives_the_undisturbed_output(
    make_cluster, tmp_path: Path, kill_after: int, checkpoint_every: int
):
    """SIGKILL one of two nodes right after superstep ``kill_after``: the job goes on with one
    worker from the last checkpoint (or from the input) and its output equals the reference."""
    paths = _grid_input(tmp_path)
    ref = run_local(example("sssp"), read_tagged_lines(paths), 1, 500)
    want = parse_output(sum(ref.partitions, []))
    # a SIGKILLed node's connection closes at once: no heartbeat is needed to find it, and
    # 0.3 s ones could also lose the other node on a loaded machine (a second rollback)
    c = make_cluster([NodeSpec(cores=1), NodeSpec(cores=1)], heartbeat=2.0)
    killed: list[int] = []

    def on_superstep(report) -> None:
        if report.superstep == kill_after and not killed:
            c.kill_node(1)
            killed.append(report.superstep)

    with remap.connect(c.address, secret=c.secret, settings=Settings()) as cluster:
        result, got = _run(
            cluster,
            _sssp_module(),
            tmp_path,
            500,
            checkpoint_every,
            on_superstep=on_superstep,
            lost_after=600.0,  # found by the server's list of calls in flight, not by a timer
        )
    assert killed == [kill_after]
    assert result.workers == 2 and result.rollbacks == 1
    assert result.supersteps == ref.supersteps > kill_after + 3
    assert got == want


def test_kill_stops_a_vertex_job_and_publishes_nothing(make_cluster, tmp_path: Path):
    """``kill JOB_ID`` on the workers' gang job: the driver raises JobKilled at once, the
    job directory's result is INCOMPLETE; no output, scratch files, acks or heartbeats are
    left."""
    import threading

    from remap.data.layout import DataDir
    from remap.errors import JobKilled

    _grid_input(tmp_path)
    c = make_cluster([NodeSpec(cores=2)], heartbeat=2.0)  # nothing here waits on a heartbeat
    started = threading.Event()
    outcome: list[BaseException] = []

    def slow_compute(ctx, vid, value, messages):
        import time as t

        t.sleep(0.02)  # a slow superstep, so the job is surely running when killed
        return value, False

    module = {"prepare": example("sssp").prepare, "compute": slow_compute}
    with remap.connect(c.address, secret=c.secret, settings=Settings()) as cluster:

        def run() -> None:
            try:
                cluster.vertex(
                    module,
                    tmp_path / "in",
                    tmp_path / "out",
                    max_supersteps=1000,
                    data_dir=tmp_path / "data",
                    on_superstep=lambda r: started.set(),
                )
            except BaseException as exc:  # the test asserts on it
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        assert started.wait(60), "the vertex job never finished a superstep"
        (job,) = [j for j in c.status()["jobs"] if j["name"].startswith("vertex:")]
        done = c.console("kill", str(job["id"]))
        assert done.returncode == 0, done.stderr
        thread.join(30)
        assert not thread.is_alive()
    assert outcome and isinstance(outcome[0], JobKilled), outcome
    data = DataDir(tmp_path / "data")
    (job_id,) = data.jobs()
    assert (data.job_dir(job_id) / "result").read_text().strip() == "INCOMPLETE"
    assert not (tmp_path / "out").exists()
    assert not data.im_dir(job_id).exists()
    assert not {"acks", "alive"} & {p.name for p in data.job_dir(job_id).iterdir()}


def _counting_program(marker: Path, kill_at: int | str) -> dict:
    """Every vertex sends its id along its out-edges in supersteps 0-5 and keeps the sum and
    count of what it received (exact integers, no combiner: every message counts); the
    ``received`` and ``largest`` aggregators total them, and each vertex adds up the
    ``received`` total it is shown every superstep. The first core to compute a vertex
    of superstep ``kill_at`` (or to read a line, ``"load"``) SIGKILLs itself (``marker`` made
    exclusively says who is first)."""

    def die_once() -> None:
        import os
        import signal

        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    def prepare(line):
        if kill_at == "load":
            die_once()  # mid-read: none of its lines handed to the other worker yet
        src, dst = map(int, line.split())
        return [(src, (0, 0, 0), [dst]), (dst, (0, 0, 0), [])]

    def compute(ctx, vid, value, messages):
        if ctx.superstep == kill_at:
            die_once()  # mid-superstep: nothing sent yet
        total, count, shown = value
        shown += ctx.aggregated("received", 0)  # the previous superstep's total, folded
        value = (total + sum(messages), count + len(messages), shown)
        ctx.aggregate("received", len(messages))
        ctx.aggregate("largest", max(messages, default=-1))
        if ctx.superstep < 6:
            ctx.send_to_neighbors(vid)
            return value, False
        return value, True

    return {
        "prepare": prepare,
        "compute": compute,
        "aggregators": {"received": "sum", "largest": "max"},
        "output": lambda vid, value: f"{vid}\t{value[0]},{value[1]},{value[2]}",
    }


@pytest.mark.parametrize("kill_at,checkpoint_every", [(3, 2), (3, 0), ("load", 2)])
def test_a_core_sigkilled_mid_superstep_loses_and_repeats_no_message(
    tmp_path: Path, kill_at: int | str, checkpoint_every: int
):
    """A worker's core SIGKILLs itself computing its first vertex of superstep 3 (messages of
    superstep 2 from the other worker are in its inbox, none of 3 sent), or reading its first
    input line: the server retries its call, the job rolls back once (to the checkpoint of
    superstep 2, or to the input) and every vertex's sum and count of
    the messages it received, the aggregates it was shown, and the last superstep's
    aggregates equal the reference's: no message lost to the killed worker's partitions, none
    counted twice, no aggregate taken from the lost superstep."""
    from remap.vertex.program import program_from_namespace

    g = nx.gnm_random_graph(300, 1200, seed=5, directed=True)
    paths = write_files(tmp_path / "in", edge_lines(g), 3)
    module = _counting_program(tmp_path / "killed", kill_at)
    calm = _counting_program(tmp_path / "unused", kill_at=-1)  # the reference must not die
    ref = run_local(program_from_namespace(calm, "t"), read_tagged_lines(paths), 1, 50)
    with remap.connect(cores=2, settings=Settings()) as cluster:
        result, got = _run(
            cluster,
            module,
            tmp_path,
            50,
            checkpoint_every,
            lost_after=600.0,  # found by the server or the retry's heartbeat, not by a timer
        )
    assert (tmp_path / "killed").exists(), "no core was killed"
    assert result.workers == 2 and result.rollbacks == 1
    assert result.supersteps == ref.supersteps == 7
    assert result.aggregates == ref.reports[-1].aggregates
    assert result.messages == sum(r.delivered for r in ref.reports)
    assert got == parse_output(sum(ref.partitions, []))


def _freezing(module: dict, marker: Path, at: int | str, data: Path, out: Path) -> dict:
    """``module`` whose first core to compute a vertex of superstep ``at`` (or, ``"output"``,
    to turn one into an output line) writes ``marker`` (its pid and slot: partitions are
    dealt round robin over 2 workers) and stops itself (SIGSTOP). Woken in the output, it goes
    on only once the job has ended (the output is published and ``alive/`` is gone)."""

    def freeze_once(vid) -> None:
        import os
        import signal
        import time

        from remap.vertex.engine import partition_of

        try:
            os.close(os.open(f"{marker}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        Path(f"{marker}.tmp").write_text(f"{os.getpid()} {partition_of(vid, 4) % 2}")
        os.rename(f"{marker}.tmp", marker)
        os.kill(os.getpid(), signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while at == "output" and time.monotonic() < deadline:
            if out.exists() and not any(data.glob("job/*/alive")):
                return
            time.sleep(0.01)

    def compute(ctx, vid, value, messages):
        if ctx.superstep == at:
            freeze_once(vid)
        return module["compute"](ctx, vid, value, messages)

    def output(vid, value):
        if at == "output":
            freeze_once(vid)
        return module["output"](vid, value)

    return {**module, "compute": compute, "output": output}


def _tree(top: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``top``: its inode and mtime (a file replaced changes)."""
    return {
        str(p.relative_to(top)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in top.rglob("*")
    }


@pytest.mark.parametrize("freeze_at,last", [(4, 6), (4, 7), ("output", 7)])
def test_a_worker_woken_after_the_rollback_writes_nothing_a_newer_attempt_reads(
    tmp_path: Path, monkeypatch, freeze_at: int | str, last: int
):
    """A worker's core stops (SIGSTOP) in superstep 4 after checkpointing the first of its two
    partitions, or while writing its output; the driver loses it (its heartbeat stopped),
    rolls back and finishes with the other worker. Woken (SIGCONT) once the newer attempt's
    checkpoint of superstep 4 is complete (``last`` 6) or was removed again (7), the old worker
    changes nothing under the job's scratch (it replaced that checkpoint's file, or made
    ``ckpt/s4`` again); woken in the output, it leaves nothing beside the published output once
    the job ended (it made ``.out.remap-JOB/`` again). The output equals the reference's."""
    import functools
    import os
    import signal
    import time

    from remap.vertex import run as run_mod
    from remap.vertex.driver import Driver
    from remap.vertex.program import program_from_namespace

    g = nx.gnm_random_graph(300, 1200, seed=5, directed=True)
    paths = write_files(tmp_path / "in", edge_lines(g), 3)
    calm = _counting_program(tmp_path / "unused", kill_at=-1)
    ref = run_local(program_from_namespace(calm, "t"), read_tagged_lines(paths), 1, last)
    data, out, marker = tmp_path / "data", tmp_path / "out", tmp_path / "frozen"
    module = _freezing(calm, marker, freeze_at, data, out)
    leaps = 0

    def clock() -> float:
        """The driver's: once the victim froze, each reading leaps past ``lost_after`` (60 s)
        after dating every other worker's heartbeat anew, as their beats would have."""
        nonlocal leaps
        if marker.exists():
            leaps += 1
            victim = f"{marker.read_text().split()[1]}.1"
            for beat in data.glob("job/*/alive/*.*"):
                if beat.name != victim:
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(beat, ns=(leaps, leaps))
        return time.monotonic() + leaps * 120.0

    monkeypatch.setattr(run_mod, "Driver", functools.partial(Driver, clock=clock))
    woken: list[int] = []
    with remap.connect(cores=2, settings=Settings()) as cluster:

        def victim_returned(slot: int) -> bool:
            (job,) = [j for j in cluster.status()["jobs"] if j["name"].startswith("vertex:")]
            return slot not in job["calls"]

        def on_superstep(report) -> None:
            if report.superstep != last - 1 or not marker.exists() or woken:
                return
            pid, slot = map(int, marker.read_text().split())
            (scratch,) = (data / "im").iterdir()
            before = _tree(scratch)
            os.kill(pid, signal.SIGCONT)
            woken.append(pid)
            if freeze_at == "output":
                return  # it writes once the job has ended
            wait_for(lambda: victim_returned(slot), 60, "the woken worker to return")
            assert _tree(scratch) == before

        try:
            result, got = _run(cluster, module, tmp_path, last, 2, on_superstep=on_superstep)
        finally:
            if marker.exists() and not woken:
                os.kill(int(marker.read_text().split()[0]), signal.SIGCONT)
    assert woken, "no worker froze"
    assert result.workers == 2 and result.rollbacks == 1
    assert result.supersteps == ref.supersteps == last
    assert not list(tmp_path.glob(".out.remap-*"))
    assert not any((data / "im").iterdir())
    assert got == parse_output(sum(ref.partitions, []))
