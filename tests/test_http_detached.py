"""Detached data and vertex jobs over HTTP: listed like function jobs, killed like ``kill``.

Their drivers are children of the server (``remap/server/drivers.py``); the job list, one
job's view, the dashboard's snapshot and the kill route reach them as the console does.
"""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remap import runtime
from remap.data import layout
from remap.data.layout import DataDir
from remap.server.drivers import DrivenJob, Drivers
from remap.server.http.security import derive_token
from remap.server.http.views import snapshot
from tests.cluster_harness import NodeSpec, wait_for
from tests.http_harness import Served
from tests.test_detached_file_jobs import MAPREDUCE, _slow_job, _start


class FakeDriver:
    """A driver process's transport: SIGTERM makes it report ``killed`` and exit, as one does."""

    def __init__(self, drivers: Drivers, job: DrivenJob) -> None:
        self.drivers, self.job, self.signals = drivers, job, []

    def signalProcess(self, sig: str) -> None:  # noqa: N802 - Twisted's name
        self.signals.append(sig)
        end = {"event": "end", "state": "killed", "message": "killed on request"}
        self.drivers.reactor.callLater(0, self.drivers.event, self.job, json.dumps(end).encode())
        self.drivers.reactor.callLater(0, self.drivers.ended, self.job, 0)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, Drivers]]:
    s = Served()
    drivers = Drivers(s.reactor, s.scheduler, data_dir=tmp_path, cluster_address=None, child_env={})
    s.factory.use_drivers(drivers)
    try:
        yield s, drivers
    finally:
        s.stop()


def _add_driven(s: Served, drivers: Drivers, tmp_path: Path) -> tuple[DrivenJob, FakeDriver]:
    def add() -> tuple[DrivenJob, FakeDriver]:
        job_id = s.scheduler.take_job_id()
        (tmp_path / str(job_id)).mkdir()
        job = DrivenJob(job_id, "vertex", "cc", "", tmp_path / str(job_id), s.reactor.seconds())
        drivers.jobs[job_id] = job
        drivers.event(job, b'{"event": "started", "data_job": "j1", "job_dir": "/d/j1"}')
        progress = {"event": "progress", "phase": "superstep 3", "done": 4, "total": 50}
        drivers.event(job, json.dumps({**progress, "line": "superstep 3: 7 active"}).encode())
        printed = {"event": "output", "text": "[n core 0] seen 3\n", "dropped": 0}
        drivers.event(job, json.dumps(printed).encode())
        job.transport = FakeDriver(drivers, job)
        return job, job.transport

    return runtime.run(add, timeout=5)


def test_detached_jobs_are_listed_shown_and_killed_over_http(served, tmp_path: Path) -> None:
    """The job list, one job, the summary and the dashboard's snapshot show a detached vertex
    job's kind, superstep and progress, one job its task output; the kill route SIGTERMs its driver (as ``kill`` does)
    and answers once it has ended."""
    s, drivers = served
    function_job = s.add_job(total=10)
    job, driver = _add_driven(s, drivers, tmp_path)
    jobs = s.request("GET", "/api/v1/jobs", token=s.token).json()["jobs"]
    assert [j["id"] for j in jobs] == [function_job, job.id]
    shown = jobs[1]
    assert shown["kind"] == "vertex" and shown["detached"] is True
    assert shown["phase"] == "superstep 3" and shown["progress"] == 0.08
    assert shown["state"] == "running" and shown["waiting"] == "superstep 3: 7 active"
    one = s.request("GET", f"/api/v1/jobs/{job.id}", token=s.token).json()
    assert one["kind"] == "vertex" and one["data_job"] == "j1" and one["errors"] == []
    assert one["task_output"] == "[n core 0] seen 3\n"  # what its tasks printed
    # its results route says where its output is (it said the job's results went to its console)
    runtime.run(lambda: setattr(job, "output", "/d/out"), timeout=5)
    reply = s.request("GET", f"/api/v1/jobs/{job.id}/results", token=s.token)
    assert reply.status == 404 and reply.json()["message"] == (
        f"job {job.id} is a vertex job: it writes files, in /d/out, not results"
    )
    function_view = s.request("GET", f"/api/v1/jobs/{function_job}", token=s.token).json()
    assert "task_output" not in function_view
    summary = s.request("GET", "/api/v1/summary", token=s.token).json()
    assert summary["jobs_running"] == 2 and summary["jobs"] == 2
    snap = runtime.run(
        lambda: snapshot(s.scheduler, s.http.app.stats, s.factory.drivers), timeout=5
    )
    assert [j["id"] for j in snap["jobs"]] == [function_job, job.id]
    # the detached job's running phase is a function job of its own: still one running job
    phase = s.add_job(total=4)
    runtime.run(lambda: job.progress.update(sub_job=phase), timeout=5)
    summary = s.request("GET", "/api/v1/summary", token=s.token).json()
    assert summary["jobs_running"] == 2 and summary["jobs"] == 3, summary

    reply = s.request("POST", f"/api/v1/jobs/{job.id}/kill", token=s.token)
    assert reply.status == 200 and reply.json() == {"job": job.id, "state": "killed"}
    assert driver.signals == ["TERM"] and s.scheduler.jobs[function_job].state == "running"
    assert (job.directory / "ended.json").exists()
    again = s.request("POST", f"/api/v1/jobs/{job.id}/kill", token=s.token)
    assert again.json() == {"job": job.id, "state": "killed"} and driver.signals == ["TERM"]
    one = s.request("GET", f"/api/v1/jobs/{job.id}", token=s.token).json()
    assert one["state"] == "killed" and one["message"] == "killed on request"


def _call(port: int, token: str, method: str, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = "{}" if method == "POST" else None
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


@pytest.mark.slow
def test_detached_data_jobs_over_the_http_api(make_cluster, tmp_path: Path) -> None:
    """Real server, node and drivers: the examples' word count, detached, is listed with its
    kind and ends done with its result; a slow one is listed in its map phase and killed over
    HTTP, ending INCOMPLETE with its intermediate files removed (as ``kill`` leaves it)."""
    data = DataDir(tmp_path / "data")
    c = make_cluster(
        [NodeSpec(cores=2)],
        env={"REMAP_DATA_DIR": str(data.root)},
        server_env={"REMAP_HTTP_PORT": "0"},
    )
    port, token = c.http_port(), derive_token(c.secret.encode())

    def listed(job_id: int) -> dict | None:
        status, body = _call(port, token, "GET", "/api/v1/jobs")
        assert status == 200
        return next((j for j in body["jobs"] if j["id"] == job_id), None)

    example = tmp_path / "example"
    example.mkdir()
    (example / "in").mkdir()
    (example / "in" / "a.txt").write_text("the cat\nthe dog\n" * 50)
    shutil.copy(MAPREDUCE / "wordcount.py", example / "wordcount.py")
    (example / "job.yaml").write_text(
        "kind: mapreduce\nmodule: wordcount.py\ninput: in/\noutput: out/\nreducers: 2\n"
    )
    counted = _start(c, example, "job.yaml")

    def finished() -> dict | None:
        job = listed(counted)
        return job if job and job["state"] != "running" else None

    job = wait_for(finished, 120, "the example word count to end")
    assert job["kind"] == "mapreduce" and job["state"] == "done" and job["progress"] == 1.0
    assert job["summary"]["state"] == "OK" and job["output"].endswith("out")

    job_id, data_job = _slow_job(c, tmp_path, data)
    job = listed(job_id)
    assert job["kind"] == "mapreduce" and job["phase"] == "map" and job["detached"] is True
    assert job["state"] == "running" and job["progress"] is not None
    status, body = _call(port, token, "POST", f"/api/v1/jobs/{job_id}/kill")
    assert status == 200 and body == {"job": job_id, "state": "killed"}
    assert layout.read_result(data, data_job) == "INCOMPLETE"
    assert not data.im_dir(data_job).exists()
    assert not (tmp_path / "out").exists()
    status, body = _call(port, token, "GET", f"/api/v1/jobs/{job_id}")
    assert status == 200 and body["state"] == "killed"
