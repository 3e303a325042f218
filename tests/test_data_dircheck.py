"""File jobs run only on nodes that see the job's data directory; the others are left out with
a line saying why (in ``status`` and on the console)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from protocol import messages as m
from remap.console import render
from remap.data import layout
from remap.data.layout import DataDir
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_scheduler import FakeLink

# ------------------------------------------------------------------ the token


def test_one_directory_one_token_two_directories_two(tmp_path: Path) -> None:
    """Whoever comes first writes the token; everyone after reads the same one back."""
    first = layout.data_id(tmp_path / "shared")
    assert layout.data_id(tmp_path / "shared") == first
    assert layout.data_id(tmp_path / "other") != first
    assert not [p for p in (tmp_path / "shared").iterdir() if p.name.endswith(".tmp")]


def test_racing_writers_agree_on_one_token(tmp_path: Path) -> None:
    """Eight threads creating the token at once all read back the same one."""
    seen: list[str] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        seen.append(layout.data_id(tmp_path / "d"))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len(set(seen)) == 1


def test_probe_reports_an_unusable_directory_without_raising(tmp_path: Path) -> None:
    """A data directory that cannot be created is a report with the reason, not a crash."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    report = layout.probe(blocker / "data")
    assert report.token is None and report.error and report.path == str(blocker / "data")
    ok = layout.probe(tmp_path / "data")
    assert ok.error is None and ok.token == layout.data_id(tmp_path / "data")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757])
def test_a_data_directory_everyone_may_write_leaves_the_node_out(tmp_path: Path, mode: int) -> None:
    """Tasks unpickle files from the data directory: one everyone may write (a share made
    0777 so that NFS works, /tmp) is reported as unusable, so the node is left out of file
    jobs saying why; one a group shares (0775) is fine."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    report = layout.probe(data)
    assert report.error == (
        f"it is writable by everyone (mode {mode:04o}): anyone there could plant files that "
        f"tasks unpickle; let only the cluster's user or group write it (chmod o-w {data})"
    )
    why = layout.mismatch(report.path, report.token, report.error, str(data), str(report.token))
    assert why.startswith(f"cannot use its data directory {data}: it is writable by everyone")
    data.chmod(0o775)
    assert layout.probe(data).error is None


def test_mismatch_names_the_reason() -> None:
    """Same token and path: fine; another token or another path: a reason; no report: fine."""
    assert layout.mismatch("/d", "t", None, "/d", "t") == ""
    assert layout.mismatch(None, None, None, "/d", "t") == ""
    assert "is not the job's /d" in layout.mismatch("/e", "u", None, "/d", "t")
    assert "at the same path" in layout.mismatch("/mnt/d", "t", None, "/d", "t")
    assert "cannot use its data directory /d: EACCES" in layout.mismatch(
        "/d", None, "EACCES", "/d", "t"
    )


# ------------------------------------------------------------------ the server


def _server() -> tuple[RemapServerFactory, ServerConnection, FakeLink]:
    from twisted.internet.task import Clock

    factory = RemapServerFactory(Clock(), b"k" * 32, max_frame=1 << 20)
    handler = ServerConnection(factory)
    handler.role = "console"
    return factory, handler, FakeLink("console")


def _node(factory: RemapServerFactory, name: str, **data: str | None) -> FakeLink:
    link = FakeLink(name)
    info = m.NodeInfo(host=name, pid=1, cores=1, memory=0, **data)
    factory.scheduler.add_node(name, link, info)
    return link


def test_a_node_with_another_data_directory_gets_no_file_task() -> None:
    """The node that reports another token is named in a notice and in status, and gets no
    task; the node that sees the directory and one that does not report run the job."""
    factory, handler, console = _server()
    sees = _node(factory, "sees", data_dir="/data", data_id="t1")
    other = _node(factory, "other", data_dir="/data2", data_id="t2")
    silent = _node(factory, "embedded")
    submit = m.Submit(
        id=1, name="wc [map]", chunksize=1, data_dir="/data", data_id="t1", payload=b"f"
    )
    handler.message_received(console, submit)
    job = console.of(m.Submitted)[0].job
    (notice,) = [n.message for n in console.of(m.JobNotice, job)]
    assert notice.startswith("node other left out of file jobs: its data directory /data2")
    handler.message_received(console, m.Args(job=job, start=0, sizes=[1] * 6, payload=b"abcdef"))
    assert other.of(m.Task) == [] and sees.of(m.Task) and silent.of(m.Task)
    nodes, jobs, _ = factory.scheduler.status()
    (info,) = [j for j in jobs if j.id == job]
    assert list(info.left_out) == ["other"]
    text = render.status_text(nodes, jobs)
    assert f"job {job}: node other left out: its data directory /data2" in text
    # a function job (no data directory) still runs everywhere
    handler.message_received(console, m.Submit(id=2, name="f", chunksize=1, payload=b"f"))
    plain = console.of(m.Submitted)[1].job
    handler.message_received(console, m.Args(job=plain, start=0, sizes=[1] * 9, payload=b"x" * 9))
    assert [t for t in other.of(m.Task) if t.job == plain]


def test_a_file_job_no_node_can_run_fails_at_once_with_the_reasons() -> None:
    """Every node is left out: the job fails at submit naming each node and why; a node that
    could not use its directory at all shows that in status."""
    factory, handler, console = _server()
    _node(factory, "a", data_dir="/x", data_id="t9")
    _node(factory, "b", data_dir="/data", data_error="PermissionError: denied")
    handler.message_received(
        console, m.Submit(id=1, name="j", data_dir="/data", data_id="t1", payload=b"f")
    )
    (done,) = console.of(m.JobDone)
    assert done.state == "failed"
    assert done.message.startswith("no node can run this job (data directory): a its data")
    assert "b cannot use its data directory /data: PermissionError: denied" in done.message
    nodes, jobs, _ = factory.scheduler.status()
    text = render.status_text(nodes, jobs)
    assert "node b: left out of file jobs: cannot use its data directory /data" in text


def test_counters_from_the_jobs_console_show_in_status_bounded() -> None:
    """The job's console sets its counters (the latest replace the earlier); another console
    cannot; malformed entries are dropped and at most MAX_COUNTERS are kept."""
    from remap.server.service import MAX_COUNTERS

    factory, handler, console = _server()
    _node(factory, "n")
    handler.message_received(console, m.Submit(id=1, name="wc [map]", payload=b"f"))
    job = console.of(m.Submitted)[0].job
    handler.message_received(console, m.JobCounters(job=job, counters={"map_records_in": 5}))
    handler.message_received(
        console, m.JobCounters(job=job, counters={"map_records_in": 9, "blank": 1, "x" * 99: 1})
    )
    stranger = ServerConnection(factory)
    stranger.role = "console"
    stranger.message_received(FakeLink("other"), m.JobCounters(job=job, counters={"evil": 1}))
    nodes, jobs, _ = factory.scheduler.status()
    (info,) = [j for j in jobs if j.id == job]
    assert info.counters == {"map_records_in": 9, "blank": 1}
    text = render.status_text(nodes, jobs)
    assert f"job {job} counters: blank 1, map_records_in 9" in text
    many = {f"c{i}": i for i in range(MAX_COUNTERS + 10)}
    handler.message_received(console, m.JobCounters(job=job, counters=many))
    assert len(factory.scheduler.status()[1][0].counters) == MAX_COUNTERS


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_a_node_that_sees_another_directory_is_left_out(make_cluster, tmp_path: Path) -> None:
    """Two nodes, one with another REMAP_DATA_DIR: the job runs on the other only, and both the
    console and ``status`` (while the job runs) say which node was left out and why."""
    from tests.cluster_harness import JOBS, NodeSpec

    data = DataDir(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "in").mkdir()
    for n in range(10):  # 10 map tasks of 150 lines, 0.6 s each: status sees them add up
        (tmp_path / "in" / f"f{n}.txt").write_text("a b c\nb c\nc\n" * 50)
    job = tmp_path / "wc.yaml"
    job.write_text(
        "kind: mapreduce\n"
        f"module: {JOBS / 'slow_wordcount.py'}\n"
        f"input: {tmp_path / 'in'}\n"
        f"output: {tmp_path / 'out'}\n"
        "reducers: 2\n"
    )
    c = make_cluster(
        [
            NodeSpec(cores=1, env={"REMAP_DATA_DIR": str(data.root)}, args=["--name", "sees"]),
            NodeSpec(cores=1, env={"REMAP_DATA_DIR": str(elsewhere)}, args=["--name", "other"]),
        ]
    )
    c.wait_for_nodes(2)
    console = c.console_popen("compute", job, "--json", env={"REMAP_DATA_DIR": str(data.root)})

    def left_out_in_status() -> str | None:
        done = c.console("status")
        for line in done.stdout.splitlines():
            if "node other left out: its data directory" in line:
                return line
        return None

    line = c.wait_for(left_out_in_status, 60, "status to name the node left out")
    assert str(elsewhere) in line and str(data.root) in line

    def counting() -> int | None:  # counts of finished map tasks, before the job ended
        for job in c.status()["jobs"]:
            seen = (job.get("counters") or {}).get("map_records_in", 0)
            if "[map " in job["name"] and job["state"] == "running" and 0 < seen < 1500:
                return seen
        return None

    c.wait_for(counting, 60, "status to show the map counters adding up while the job runs")
    done = c.assert_ok(c.finish(console, timeout=90))
    summary = json.loads(done.stdout)
    assert summary["state"] == "OK"
    (last,) = [j for j in c.status()["jobs"] if "[reduce " in j["name"]]
    assert last["counters"] == summary["counters"]
    assert "node other left out of file jobs: its data directory" in done.stderr, c.explain(done)
    assert any("node other left out" in n for n in summary["notices"])
    (job_id,) = data.jobs()
    sees = c.nodes[0].pid
    tasks = layout.read_json(data.consolidated(job_id))["tasks"].values()
    pids = {task["node_pid"] for task in tasks}
    assert pids == {sees}, pids
    nodes = json.loads(c.console("nodes", "--json").stdout)
    by_name = {n["host"]: n for n in nodes}
    assert by_name["sees"]["data_id"] == layout.data_id(data.root)
    assert by_name["other"]["data_dir"] == str(elsewhere.resolve())
    assert os.path.isfile(elsewhere / layout.DATA_ID_FILE)
