"""Node exclusion: the scheduler gives excluded hosts no work, the list survives restarts, and the
console's exclude/include/status show it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import messages as m
from remap.errors import ConfigError
from remap.server.exclusion import ExclusionList
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_scheduler import (
    FakeConsole,
    FakeLink,
    FakeNode,
    assert_exactly_once,
    make,
    run_to_end,
)

# ============================================================================ scheduler


def test_excluded_node_stays_connected_gets_no_work_and_its_results_count() -> None:
    """Excluding a host mid-job: its node keeps what it holds (and those results count), gets
    nothing new, stays in the node list marked excluded; the job completes exactly once."""
    sched, _ = make()
    a, b = FakeNode(sched, "a", cores=1), FakeNode(sched, "b", cores=1)
    console = FakeConsole(sched, range(100), chunksize=5)
    console.feed()
    held = a.held()
    assert held, "node a had work before it was excluded"
    sched.set_excluded(frozenset({"host-a"}))
    tasks_before = len(a.link.of(m.Task))
    for task in held:
        a.answer(task)
    run_to_end([b], [console])
    assert len(a.link.of(m.Task)) == tasks_before
    assert_exactly_once(console, 100)
    described = {n.id: n for n in sched.status()[0]}
    assert described["a"].excluded and not described["b"].excluded


def test_a_node_joining_from_an_excluded_host_is_excluded_and_include_lets_it_work() -> None:
    """The list is by host: a node (re)joining from an excluded host gets no work; the console
    hears that every node is excluded; taking the host off the list lets the job finish."""
    sched, _ = make()
    sched.set_excluded(frozenset({"host-n"}))
    node = FakeNode(sched, "n", cores=1)
    console = FakeConsole(sched, range(20), chunksize=5)
    console.feed()
    assert node.held() == []
    notices = [n.message for n in console.link.of(m.JobNotice, console.job)]
    assert notices == ["waiting for nodes (every node is draining or excluded)"]
    sched.set_excluded(frozenset())
    assert sched.jobs[console.job].waiting == ""
    run_to_end([node], [console])
    assert_exactly_once(console, 20)


# ============================================================================ the list


def test_the_list_persists_and_a_bad_file_is_one_clear_error(tmp_path: Path) -> None:
    """Changes are saved at once and read back by a new instance (a restarted server); a
    broken file names itself; an unwritable place is a ConfigError, not a traceback."""
    path = tmp_path / "state" / "excluded-nodes.json"
    first = ExclusionList(path)
    assert first.change("box1", True) and not first.change("box1", True)
    assert first.change("box2", True) and first.change("box2", False)
    assert ExclusionList(path).hosts == {"box1"}
    assert json.loads(path.read_text()) == {"excluded": ["box1"]}
    path.write_text('{"excluded": "box1"}')
    with pytest.raises(ConfigError, match="excluded-nodes.json"):
        ExclusionList(path)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot save"):
        ExclusionList(blocked / "x.json").change("h", True)


# ============================================================================ the server's handler


def _server(tmp_path: Path) -> tuple[RemapServerFactory, ServerConnection, FakeLink]:
    from twisted.internet.task import Clock

    factory = RemapServerFactory(Clock(), b"k" * 32, max_frame=1 << 20)
    factory.use_exclusions(ExclusionList(tmp_path / "excluded-nodes.json"))
    handler = ServerConnection(factory)
    handler.role = "console"
    return factory, handler, FakeLink("console")


def test_exclude_and_include_requests(tmp_path: Path) -> None:
    """exclude by node id names the host and saves it; status lists it; include of an unknown
    name is not-found; include of the host takes it off; a host not connected may be excluded."""
    factory, handler, link = _server(tmp_path)
    FakeNode(factory.scheduler, "n1", host="box1")
    handler.message_received(link, m.Exclude(id=1, node="n1"))
    ok = link.sent[-1]
    assert isinstance(ok, m.Ok) and ok.info["host"] == "box1" and ok.info["nodes"] == 1
    assert factory.scheduler.nodes["n1"].excluded
    handler.message_received(link, m.StatusRequest(id=2))
    assert link.sent[-1].server["excluded"] == ["box1"]
    handler.message_received(link, m.Exclude(id=3, node="spare-box"))
    assert link.sent[-1].info == {
        "host": "spare-box",
        "excluded": True,
        "changed": True,
        "nodes": 0,
        "list": ["box1", "spare-box"],
    }
    handler.message_received(link, m.Include(id=4, node="nothing-here"))
    assert isinstance(link.sent[-1], m.Error) and link.sent[-1].code == "not-found"
    handler.message_received(link, m.Include(id=5, node="box1"))
    assert link.sent[-1].info["list"] == ["spare-box"]
    assert not factory.scheduler.nodes["n1"].excluded
    assert ExclusionList(tmp_path / "excluded-nodes.json").hosts == {"spare-box"}


def test_a_blank_node_name_names_no_node(tmp_path: Path) -> None:
    """``exclude ""`` and ``drain ""`` (a script's unset variable) pick no node, even when one
    node is connected (an empty prefix matched it): exclude says so, drain is not-found, and
    the list and the node stay as they were."""
    factory, handler, link = _server(tmp_path)
    FakeNode(factory.scheduler, "n1", host="box1")
    for number, blank in enumerate(("", "  ")):
        handler.message_received(link, m.Exclude(id=number, node=blank))
        assert isinstance(link.sent[-1], m.Error) and link.sent[-1].code == "bad-request"
        handler.message_received(link, m.Drain(id=10 + number, node=blank))
        assert isinstance(link.sent[-1], m.Error) and link.sent[-1].code == "not-found"
    assert not factory.exclusions.hosts and not (tmp_path / "excluded-nodes.json").exists()
    node = factory.scheduler.nodes["n1"]
    assert not node.excluded and not node.draining
    assert factory.scheduler.find_node("n") is node  # a real prefix still finds it


# ============================================================================ real processes


@pytest.mark.slow
def test_console_exclude_status_and_restart(make_cluster, tmp_path) -> None:
    """`exclude NAME` over the CLI: status shows the node excluded and its name listed, a job
    runs entirely on the other node, the list outlives a server restart, and include undoes it."""
    from tests.cluster_harness import NodeSpec

    c = make_cluster(
        [
            NodeSpec(cores=1, env={"REMAP_NODE_NAME": "box-a"}),
            NodeSpec(cores=1, env={"REMAP_NODE_NAME": "box-b"}),
        ]
    )
    c.wait_for_nodes(2)
    done = c.assert_ok(c.console("exclude", "box-a"))
    assert "host box-a excluded" in done.stdout, c.explain(done)
    text = c.assert_ok(c.console("status")).stdout
    assert "excluded hosts (no work until `include`): box-a" in text, text
    assert any("box-a" in line and "excluded" in line for line in text.splitlines()), text
    job = tmp_path / "job.yaml"
    job.write_text("function: math:sqrt\nargs_range: [0, 200]\nresponse_mode: none\nchunksize: 5\n")
    c.assert_ok(c.console("compute", str(job), "--quiet"))
    done_by = {n["host"]: n["tasks_done"] for n in c.status()["nodes"]}
    assert done_by["box-a"] == 0 and done_by["box-b"] > 0, done_by
    c.restart_server()
    c.wait_for_nodes(2)
    assert c.status()["server"]["excluded"] == ["box-a"]
    c.assert_ok(c.console("include", "box-a"))
    assert not any(n["excluded"] for n in c.status()["nodes"])
