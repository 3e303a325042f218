"""The console reads and pickles arguments off the reactor thread (issue 9, item 7).

A FIFO with no writer, a pipe that gives a line a second, or one huge line must never stop
the console's network thread: heartbeats and results keep flowing, Ctrl-C works, and an
argument too large for one message is refused with a line naming its index and size.
"""

from __future__ import annotations

import os
import signal
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from remap.client import ArgumentTooLarge, ClusterClient, JobStream
from remap.jobfile import ConfigError, iter_arguments, load_job
from tests.cluster_harness import Cluster, NodeSpec, jobs_function, wait_for, write_job
from tests.test_inmemory import Cluster as MemoryCluster
from tests.test_inmemory import job_run, outcome, submit

#: the processes' heartbeat interval in the FIFO tests: three missed (1.5 s) lose a peer. Short
#: enough that a console whose network thread blocks on a read is dropped, long enough that a
#: console starved for a moment on a loaded 2-core machine is not
HEARTBEAT = 0.5
DEADLINE = 3 * HEARTBEAT
#: the writer's pause between lines: a blocked read would keep the console silent this long
PACE = DEADLINE + 1.0

# ------------------------------------------------------------------ units
# (the reader thread itself: tests/test_job_stream.py)


def test_an_argument_too_large_for_a_frame_is_refused_by_index_and_size() -> None:
    """Over the frame limit: the job fails naming argument 2 and its size; the link stays up.

    Before, the frame went out anyway and the server dropped the whole connection.
    """
    cluster = MemoryCluster(max_frame=64 * 1024)
    cluster.node("node-a", cores=1)
    client, _ = cluster.console()
    run = job_run(len, [b"a", b"b", b"x" * 100_000, b"c"])
    d = submit(client, run)
    cluster.settle()
    failure = outcome(d)
    assert isinstance(failure, Failure) and isinstance(failure.value, ArgumentTooLarge), failure
    assert failure.value.index == 2 and failure.value.size > 100_000
    assert "argument 2 is 100,0" in str(failure.value) and "REMAP_MAX_FRAME" in str(failure.value)
    assert client.link is not None, "the connection must survive a refused argument"
    assert isinstance(client, ClusterClient) and isinstance(run.stream, JobStream)


def test_a_huge_argument_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """A 20 MB line over a 1000-byte limit: a clear line with its number and size, little memory."""
    path = tmp_path / "args.jsonl"
    with open(path, "w") as f:
        f.write("1\n\n2\n")
        f.write('"' + "x" * 20_000_000 + '"\n')
        f.write("3\n")
    job = write_job(tmp_path / "job.yaml", {"function": "math:sqrt", "args_path": str(path)})
    arguments = iter_arguments(load_job(job), max_line=1000)
    tracemalloc.start()
    try:
        assert [next(arguments), next(arguments)] == [1, 2]
        with pytest.raises(ConfigError) as info:
            next(arguments)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == (
        f"{path}:4: argument 2 is 20,000,002 bytes of JSON, over the 1,000 bytes an argument "
        f"may have in one message (REMAP_MAX_FRAME)"
    )
    assert peak < 4_000_000, f"reading the long line took {peak} bytes"


# ------------------------------------------------------------------ real processes


def fifo_job(tmp_path: Path, mode: str = "stream") -> tuple[Path, Path]:
    fifo = tmp_path / "args.fifo"
    os.mkfifo(fifo)
    job = write_job(
        tmp_path / "fifo.yaml",
        {
            "function": jobs_function("funcs", "square"),
            "args_path": str(fifo),
            "response_mode": mode,
        },
    )
    return fifo, job


@pytest.mark.slow
def test_a_slow_pipe_keeps_the_console_alive(make_cluster: Any, tmp_path: Path) -> None:
    """Arguments from a FIFO, one line every 2.5 s (over the 1.5 s heartbeat deadline): the job
    runs to the end with every result. Before, reading blocked the console's network thread,
    the server missed its heartbeats and cancelled the job. (A 0.6 s deadline, 0.2 s beats,
    also caught a console merely starved that long on a loaded 2-core CI machine.)"""
    cluster: Cluster = make_cluster(
        [NodeSpec(cores=1)], heartbeat=HEARTBEAT, server_env={"REMAP_CONSOLE_GRACE": "0"}
    )
    fifo, job = fifo_job(tmp_path)
    console = cluster.console_popen("compute", job, "--json")
    pace = threading.Event()  # never set: its wait paces the writer past the deadline

    def writer() -> None:
        with open(fifo, "w") as f:
            for i in range(3):
                f.write(f"{i + 5}\n")
                f.flush()
                pace.wait(PACE)

    feeder = threading.Thread(target=writer, daemon=True)
    feeder.start()
    done = cluster.finish(console, timeout=60)
    feeder.join(10)
    assert done.returncode == 0, cluster.explain(done)
    lines = sorted(done.stdout.splitlines())
    assert lines == sorted(f'{{"index": {i}, "result": {(i + 5) ** 2}}}' for i in range(3)), (
        cluster.explain(done)
    )


@pytest.mark.slow
def test_a_fifo_without_a_writer_can_be_interrupted(make_cluster: Any, tmp_path: Path) -> None:
    """No writer ever opens the FIFO: the job still reaches the server and stays alive
    (heartbeats flow), and Ctrl-C ends the console at once, killing its job. Before, the
    console blocked in open() on its network thread: the submit never left it."""
    cluster: Cluster = make_cluster(
        [NodeSpec(cores=1)], heartbeat=HEARTBEAT, server_env={"REMAP_CONSOLE_GRACE": "0"}
    )
    _, job = fifo_job(tmp_path, mode="object")
    console = cluster.console_popen("compute", job)
    jobs = cluster.wait_for(lambda: cluster.status()["jobs"], 30, "the job on the server")
    job_id = jobs[0]["id"]

    def alive_past_the_heartbeat_deadline() -> bool:
        job = cluster.job(job_id) or {}
        if job.get("state") != "running":
            raise AssertionError(f"the job ended: {job}")
        return job["elapsed"] > 2 * DEADLINE and job["attached"]

    cluster.wait_for(alive_past_the_heartbeat_deadline, 30, "twice the deadline of a waiting job")
    os.kill(console.pid, signal.SIGINT)
    done = cluster.finish(console, timeout=15)
    assert done.returncode == 130, cluster.explain(done)
    assert f"killing job {job_id}" in done.stderr
    wait_for(
        lambda: (cluster.job(job_id) or {}).get("state") in (None, "killed"),
        15,
        "the job killed",
    )


@pytest.mark.slow
def test_the_python_api_refuses_a_too_large_argument_and_goes_on(make_cluster: Any) -> None:
    """Through remap.connect to a server whose frame limit is 64 KiB, the same check names the
    argument and the handle stays usable. Before, the oversized frame went out and the server
    dropped the connection."""
    import remap
    from remap.settings import Settings

    cluster: Cluster = make_cluster([NodeSpec(cores=1)], server_env={"REMAP_MAX_FRAME": "65536"})
    with remap.connect(cluster.address, secret=cluster.secret, settings=Settings()) as handle:
        with pytest.raises(ArgumentTooLarge, match=r"argument 1 is 100,0\d\d bytes pickled"):
            handle.map(len, [b"a", b"x" * 100_000])
        assert handle.map(len, [b"a", b"bb"]) == [1, 2]
