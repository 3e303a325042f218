"""Chaos for data jobs: nodes SIGKILLed mid-map and mid-reduce of a real job.

Real server, node and console processes on 127.0.0.1, sharing one data directory. Each kill
is triggered by the job's own progress files (a task of the phase running on that node),
never by a timer. The output must be byte-identical to what an undisturbed run writes,
``result`` must say OK, and no intermediate, uncommitted or duplicate file may remain.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from remap.data import layout
from remap.data.keys import default_partition, encode_key
from remap.data.layout import DataDir
from tests.cluster_harness import JOBS, Cluster, ClusterError

#: its own waits take up to 3 x DEADLINE; pytest's default 120 s would cut them short
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: nothing waits on a heartbeat (a SIGKILLed node's connection closes at once): 1 s beats spare
#: nodes starved for a second on a loaded machine, which 0.3 s beats lost as well
HEARTBEAT = 1.0
DEADLINE = 90.0
REDUCERS = 6
FILES = 12
LINES = 250


def _corpus(root: Path) -> Counter[str]:
    rng = random.Random(17)
    words = [f"w{i:03d}" for i in range(400)]
    counts: Counter[str] = Counter()
    root.mkdir()
    for n in range(FILES):
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randrange(1, 9))) for _ in range(LINES)
        ]
        for line in lines:
            counts.update(line.split())
        (root / f"part{n:02d}.txt").write_text("\n".join(lines) + "\n")
    return counts


def _undisturbed_files(counts: Counter[str]) -> dict[str, bytes]:
    """What an undisturbed run writes: each reducer's keys in byte order, ``word\\tcount``."""
    parts: dict[int, list[str]] = {r: [] for r in range(REDUCERS)}
    for word in sorted(counts, key=encode_key):
        parts[default_partition(encode_key(word), REDUCERS)].append(f"{word}\t{counts[word]}\n")
    return {f"reducer-{r:04d}-part-00000": "".join(lines).encode() for r, lines in parts.items()}


def _running_task_node(c: Cluster, data: DataDir, kind: str, console) -> int:
    """Index of a live node running a ``kind`` task now, found from the progress files."""

    def find() -> int | None:
        if console.poll() is not None:
            raise ClusterError(f"the console exited ({console.returncode}) before a {kind} ran")
        for path in (data.root / "im").glob(f"*/progress/{kind}-*.json"):
            info = layout.read_json(path) or {}
            if info.get("state") != "running":
                continue
            for index, node in enumerate(c.nodes):
                if node.alive() and node.pid == info.get("node_pid"):
                    return index
        return None

    return c.wait_for(find, DEADLINE, f"a {kind} task running on a live node")


def test_nodes_killed_mid_map_and_mid_reduce_change_nothing(make_cluster, tmp_path: Path) -> None:
    """Three one-core nodes; the node running a mapper is SIGKILLed, then the node running a
    reducer. The job ends OK, the output equals an undisturbed run's byte for byte, and the
    data directory holds no run, attempt, temporary or staging file."""
    counts = _corpus(tmp_path / "in")
    data = DataDir(tmp_path / "data")
    job = tmp_path / "wc.yaml"
    job.write_text(
        "kind: mapreduce\n"
        f"module: {JOBS / 'slow_wordcount.py'}\n"
        f"input: {tmp_path / 'in'}\n"
        f"output: {tmp_path / 'out'}\n"
        f"reducers: {REDUCERS}\n"
        "split_mb: 0.002\n"
        "spill_mb: 0.01\n"
        "fanin: 3\n"
    )
    # every node sees the data directory (a node that does not is left out of file jobs)
    env = {"REMAP_HEARTBEAT_MISSES": "3", "REMAP_DATA_DIR": str(data.root)}
    c = make_cluster(3, cores=1, heartbeat=HEARTBEAT, env=env)
    console = c.console_popen("compute", job, "--json", env={"REMAP_DATA_DIR": str(data.root)})

    c.kill_node(_running_task_node(c, data, "mapper", console), signal.SIGKILL)
    c.add_node(cores=1)
    c.kill_node(_running_task_node(c, data, "reducer", console), signal.SIGKILL)

    done = c.assert_ok(c.finish(console, timeout=DEADLINE))
    summary = json.loads(done.stdout)
    assert summary["state"] == "OK", summary
    out = tmp_path / "out"
    files = {p.name: p.read_bytes() for p in (out / "default").iterdir()}
    assert files == _undisturbed_files(counts)
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "default"]
    (job_id,) = data.jobs()
    assert layout.read_result(data, job_id) == "OK"
    assert not data.im_dir(job_id).exists()
    assert not [p for p in layout.walk_files(data.root) if p.name.endswith(".tmp")]
    assert not list(tmp_path.glob(".out.remap-*"))
    lost = [line for line in c.server.log_text().splitlines() if " lost: " in line]
    requeued = [
        int(m.group(1)) for line in lost for m in [re.search(r"(\d+) arguments re-q", line)] if m
    ]
    # each kill re-queued its task; a node with nothing in flight may also be lost by silence
    # (a second's starvation on a loaded 2-core machine) and re-queue nothing: not the kills' doing
    assert sum(1 for n in requeued if n) >= 2, "a kill hit no task:\n" + c.diagnostics()


_LATE_MODULE = '''
"""Word count whose first {freeze} call stops its node (SIGSTOP, not this core): the server
loses the node and retries the task elsewhere while this attempt waits, to go on later."""

import os
import signal
import sys
import time
from pathlib import Path

MARK = Path({mark!r})
FREEZE = {freeze!r}


def _wait(path, what):
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def _freeze_once(role):
    if role != FREEZE:
        return
    try:
        os.close(os.open(MARK / "claim", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    frame = sys._getframe()
    while "attempt" not in frame.f_locals:  # the task running this call: its attempt's name
        frame = frame.f_back
    (MARK / "frozen.tmp").write_text(f"{{os.getppid()}} {{frame.f_locals['attempt']}}")
    os.rename(MARK / "frozen.tmp", MARK / "frozen")
    os.kill(os.getppid(), signal.SIGSTOP)
    _wait(MARK / "release", "the release of the frozen attempt")
    core = sys.modules["__main__"].Core  # the core's loop (python -m remap.node.core)
    reply = core._reply

    def answer(self, *args):  # the task returned (or raised): every file it writes is written
        core._reply = reply
        (MARK / "done").touch()
        return reply(self, *args)

    core._reply = answer


def map(line):
    _freeze_once("map")
    for word in line.split():
        yield word, 1


def reduce(word, counts):
    _freeze_once("reduce")
    if FREEZE == "map-during" and (MARK / "frozen").exists():
        # every map task was delivered (the barrier): wake the lost attempt, let it finish
        (MARK / "release").touch()
        _wait(MARK / "done", "the woken attempt to finish")
    yield word, sum(counts)
'''


def _tree(*tops: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``tops``: its inode and mtime (a file replaced changes)."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for top in tops for p in top.rglob("*")}


@pytest.mark.parametrize("freeze", ["map-during", "map", "reduce"])
def test_an_attempt_lost_and_woken_later_changes_nothing(
    make_cluster, tmp_path: Path, freeze: str
) -> None:
    """A map (or reduce) attempt stops its node (SIGSTOP) mid-task; the server loses the node
    and the task is retried on another; the job ends OK. Woken later (during the reduce phase,
    or after the job ended), the lost attempt finishes its task and writes what it writes: the
    output is an undisturbed run's, the counters the records', no report names the lost
    attempt, and (woken after the end) nothing under the data directory or the output changed;
    no scratch, temporary or staging file is left."""
    counts = _corpus(tmp_path / "in")
    data = DataDir(tmp_path / "data")
    mark = tmp_path / "mark"
    mark.mkdir()
    module = tmp_path / "late_wordcount.py"
    module.write_text(_LATE_MODULE.format(mark=str(mark), freeze=freeze.partition("-")[0]))
    if freeze == "map-during":  # its reducers wake the lost mapper
        text = module.read_text().replace("FREEZE = 'map'", "FREEZE = 'map-during'")
        module.write_text(text.replace('_freeze_once("map")', '_freeze_once("map-during")'))
    job = tmp_path / "wc.yaml"
    out = tmp_path / "out"
    job.write_text(
        "kind: mapreduce\n"
        f"module: {module}\n"
        f"input: {tmp_path / 'in'}\n"
        f"output: {out}\n"
        f"reducers: {REDUCERS}\n"
        "split_mb: 0.002\n"
    )
    env = {"REMAP_HEARTBEAT_MISSES": "3", "REMAP_DATA_DIR": str(data.root)}
    c = make_cluster(3, cores=1, heartbeat=HEARTBEAT, env=env)
    console = c.console_popen("compute", job, "--json", env={"REMAP_DATA_DIR": str(data.root)})
    frozen = c.wait_for(lambda: (mark / "frozen").exists(), DEADLINE, "an attempt to freeze")
    node_pid, attempt = (mark / "frozen").read_text().split()
    try:
        done = c.assert_ok(c.finish(console, timeout=DEADLINE))
        if freeze != "map-during":
            before = _tree(data.root, out)
            (mark / "release").touch()
        c.wait_for(lambda: (mark / "done").exists(), DEADLINE, "the woken attempt to finish")
        if freeze != "map-during":
            assert _tree(data.root, out) == before
    finally:
        os.kill(int(node_pid), signal.SIGCONT)
    assert frozen
    summary = json.loads(done.stdout)
    assert summary["state"] == "OK", summary
    files = {p.name: p.read_bytes() for p in (out / "default").iterdir()}
    assert files == _undisturbed_files(counts)
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "default"]
    assert summary["counters"]["map_records_in"] == FILES * LINES
    assert summary["counters"]["reduce_records_out"] == len(counts)
    (job_id,) = data.jobs()
    assert layout.read_result(data, job_id) == "OK"
    report = layout.read_json(data.consolidated(job_id))
    assert {t["state"] for t in report["tasks"].values()} == {"done"}, report["tasks"]
    assert attempt not in {t["attempt"] for t in report["tasks"].values()}, report["tasks"]
    assert not [p for p in layout.walk_files(data.job_dir(job_id)) if attempt in p.read_text()]
    assert not data.im_dir(job_id).exists()
    assert not [p for p in layout.walk_files(data.root) if p.name.endswith(".tmp")]
    assert not list(tmp_path.glob(".out.remap-*"))
