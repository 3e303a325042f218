"""Status records (issue 10, item 3): the scheduler builds ``protocol.status`` records, the
``status_reply`` maps are checked against them on arrival, the renderer reads them back; the
HTTP API's schema is derived from them. No processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.errors import RemoteProtocolError
from protocol.status import JobStatus, NodeStatus, read_status
from remap.console import render
from remap.server.drivers import DrivenJob
from remap.server.http import openapi, views
from tests.test_data_dircheck import _node, _server


def _busy_server() -> tuple[object, object, object]:
    """A server with a file job (a node left out, counters), an unusable data directory, an
    excluded host and a detached driver's job."""
    factory, handler, console = _server()
    _node(factory, "sees", data_dir="/data", data_id="t1")
    _node(factory, "other", data_dir="/data2", data_id="t2")
    _node(factory, "broken", data_dir="/data", data_error="PermissionError: denied")
    submit = m.Submit(id=1, name="wc [map]", data_dir="/data", data_id="t1", payload=b"f")
    handler.message_received(console, submit)
    job = console.of(m.Submitted)[0].job
    handler.message_received(console, m.JobCounters(job=job, counters={"map_records_in": 5}))
    factory.exclusions.change("gone", True)
    factory.drivers.jobs[99] = DrivenJob(
        id=99, kind="vertex", name="pagerank", owner="", directory=Path("/nowhere"),
        started_at=0.0, progress={"phase": "superstep 3", "done": 3, "total": "junk"},
    )  # fmt: skip
    return factory, handler, console


def _status_over_the_wire(handler: object, console: object) -> m.StatusReply:
    handler.message_received(console, m.StatusRequest(id=7))
    (reply,) = console.of(m.StatusReply)
    return m.decode(*m.encode(reply))


def test_status_records_round_trip_the_wire() -> None:
    """What the scheduler (and the drivers) describe is what the console reads back, field for
    field; fields a record does not know are left out of its map (a driver has no share)."""
    factory, handler, console = _busy_server()
    nodes, jobs, server = read_status(vars_of(_status_over_the_wire(handler, console)))
    own_nodes, own_jobs, _ = factory.scheduler.status()
    assert nodes == own_nodes
    assert jobs == own_jobs + factory.drivers.describe(factory.scheduler.clock.seconds())
    assert server.excluded == ["gone"]
    file_job, driven = jobs
    assert sorted(file_job.left_out) == ["broken", "other"]
    assert file_job.shared and file_job.counters == {"map_records_in": 5}
    assert not driven.shared and "weight" not in driven.to_wire()
    assert (driven.kind, driven.phase, driven.total) == ("vertex", "superstep 3", None)


def vars_of(reply: m.StatusReply) -> dict:
    return {"nodes": reply.nodes, "jobs": reply.jobs, "server": reply.server}


def test_the_status_text_reads_the_records() -> None:
    """The console's status text, from the records that came over the wire."""
    _, handler, console = _busy_server()
    nodes, jobs, server = read_status(vars_of(_status_over_the_wire(handler, console)))
    text = render.status_text(nodes, jobs, server.excluded)
    # the file job has no argument yet: running, and idle (its console may still send some)
    assert text.startswith("3 nodes, 0/3 cores busy, 2 jobs running (1 idle), 0 tasks/s\n")
    assert "excluded hosts (no work until `include`): gone" in text
    assert "node broken: left out of file jobs: cannot use its data directory /data" in text
    assert "counters: map_records_in 5" in text
    assert [line.split()[-1] for line in render.jobs_table(jobs).splitlines()[2:]] == [
        "w1)",
        "-",
    ]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda node: node.pop("busy"), "missing field 'busy'"),
        (lambda node: node.update(cores="2"), "cores: bad value"),
    ],
)
def test_a_status_reply_off_the_records_is_refused(change, why) -> None:
    """A node map without a field or with a wrong type is a protocol error when it arrives,
    and the record says what is wrong with it."""
    _, handler, console = _busy_server()
    reply = _status_over_the_wire(handler, console)
    node = dict(reply.nodes[0])
    change(node)
    assert why in NodeStatus.problem(node)
    bad = m.StatusReply(re=7, nodes=[node], jobs=reply.jobs, server=reply.server)
    with pytest.raises(RemoteProtocolError, match="status_reply.nodes"):
        m.decode(*m.encode(bad))
    with pytest.raises(ValueError, match=why):
        NodeStatus.from_wire(node)


def test_the_http_schema_is_derived_from_the_records() -> None:
    """The OpenAPI Node and Job schemas name every field of the records (required unless a
    record may leave it out), and the HTTP job view adds only progress and ETA."""
    node_fields = {name for name, _, _ in NodeStatus.WIRE}
    assert set(openapi.SCHEMAS["Node"]["properties"]) == node_fields
    assert set(openapi.SCHEMAS["Node"]["required"]) == node_fields
    job = openapi.SCHEMAS["Job"]
    assert set(job["properties"]) == {n for n, _, _ in JobStatus.WIRE} | {
        "expected",
        "progress",
        "eta",
    }
    assert "weight" not in job["required"] and "done" in job["required"]
    factory, _, _ = _busy_server()
    (view,) = views.jobs_view(factory.scheduler)
    assert set(view) <= set(job["properties"]) and set(job["required"]) <= set(view)


def test_keys_a_record_does_not_know_are_ignored() -> None:
    """A later server may add keys (protocol/README.md: clients ignore them)."""
    _, handler, console = _busy_server()
    node = dict(_status_over_the_wire(handler, console).nodes[0], gpu_count=2)
    assert NodeStatus.problem(node) == ""
    assert NodeStatus.from_wire(node).to_wire() == {
        k: v for k, v in node.items() if k != "gpu_count"
    }


def test_a_finished_detached_job_is_shown_done_not_at_its_last_progress_line() -> None:
    """Drivers send progress every few seconds, so the last line before ``end`` may be a
    phase ago: once the job ended well, ``jobs`` shows it done with every step counted (a
    vertex job: the supersteps it ran), not ``map 0/1`` or ``superstep 12 13/100``."""
    factory, _, _ = _server()
    drivers = factory.drivers
    runs = {
        "mapreduce": ({"phase": "map", "done": 0, "total": 1}, {"state": "OK"}, (1, 1)),
        "vertex": ({"phase": "superstep 12", "done": 13, "total": 100}, {"supersteps": 32}, (32, 32)),
    }  # fmt: skip
    for number, (kind, (progress, summary, shown)) in enumerate(runs.items()):
        job = drivers.jobs[number] = DrivenJob(
            id=number, kind=kind, name=kind, owner="", directory=Path("/nowhere"),
            started_at=0.0, progress=progress,
        )  # fmt: skip
        end = {"event": "end", "state": "done", "message": "", "summary": summary}
        drivers.event(job, json.dumps(end).encode())
        status = job.describe(1.0)
        assert (status.state, status.phase) == ("done", "done")
        assert (status.done, status.total) == shown
    failed = drivers.jobs[9] = DrivenJob(
        id=9, kind="mapreduce", name="m", owner="", directory=Path("/nowhere"), started_at=0.0,
        progress={"phase": "reduce", "done": 1, "total": 2},
    )  # fmt: skip
    drivers.event(failed, b'{"event": "end", "state": "failed", "message": "boom"}')
    assert (failed.describe(1.0).phase, failed.describe(1.0).done) == ("reduce", 1)
