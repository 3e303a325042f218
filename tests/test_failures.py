"""Failure semantics with real processes: crashes, timeouts, kills, lost consoles, lost servers.

What remap promises when things fail (README): every argument ends with exactly one
delivered outcome; a core that crashes or overruns its ``timeout`` is killed and replaced and
only the argument it was running pays; ``kill`` frees cores at once; a job whose console
vanishes is cancelled after ``REMAP_CONSOLE_GRACE`` unless it was detached; nodes find a
restarted server by themselves; a console whose server dies says so in one line; a job with
no node to run it says it is waiting; a drained node takes no new work.

Each test starts its own server and one-core nodes on 127.0.0.1 (``make_cluster``), bounds
every wait, and polls ``status --json`` rather than sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from remap.node.cores import STARTING_AT_ONCE
from tests.cluster_harness import ROOT, Cluster, ClusterError, NodeSpec, jobs_function, write_job
from tests.jobs.fail_funcs import CULPRIT

pytestmark = pytest.mark.slow

#: no test here waits on a heartbeat (a SIGKILLed process closes its connections at once), and
#: 0.3 s beats lost a node to 0.9 s of silence on a loaded machine: 3 misses of 1 s tolerate that
HEARTBEAT = 1.0
#: the console grace the server gets in tests that lose or detach their console
GRACE = 1.0
#: a bound for console commands that should be quick
QUICK = 20.0
#: "within seconds": generous for a loaded CI machine (a console stalled for seconds there must
#: not fail a test), still half the 30 s a stuck call takes
SOON = 15.0


# ---------------------------------------------------------------------------------- helpers


def _cluster(
    make_cluster: Any,
    nodes: Any = 2,
    node_env: dict[str, str] | None = None,
    heartbeat: float = HEARTBEAT,
    **server_env: str,
) -> Cluster:
    env = {"REMAP_HEARTBEAT_MISSES": "3", **(node_env or {})}
    return make_cluster(nodes, cores=1, heartbeat=heartbeat, env=env, server_env=server_env)


def _job(tmp_path: Path, name: str, function: str, **keys: Any) -> Path:
    """A job file in the test's directory running ``fail_funcs.FUNCTION``."""
    return write_job(
        tmp_path / f"{name}.yaml",
        {"name": name, "function": jobs_function("fail_funcs", function), **keys},
    )


def _jobs(c: Cluster) -> list[dict]:
    """``jobs --json``, parsed."""
    done = c.console("jobs", "--json", timeout=QUICK)
    c.assert_ok(done)
    return json.loads(done.stdout)


def _job_named(c: Cluster, name: str) -> dict | None:
    return next((j for j in c.status()["jobs"] if j["name"] == name), None)


def _wait_running(
    c: Cluster, console: subprocess.Popen, name: str, *, every_node: bool = False
) -> dict:
    """Wait until job ``name`` has work on cores (on every node, if asked); fail if its console ended."""

    def started() -> dict | None:
        if console.poll() is not None:
            raise ClusterError(f"the console of job {name} exited ({console.returncode}) too early")
        status = c.status()
        job = next((j for j in status["jobs"] if j["name"] == name), None)
        if job is None or job["state"] != "running" or job["running"] < 1:
            return None
        if every_node and not all(n["tasks_in_flight"] > 0 for n in status["nodes"]):
            return None
        return job

    where = " on every node" if every_node else ""
    return c.wait_for(started, QUICK, f"job {name} to have arguments running{where}")


def _one_clear_line(stderr: str) -> str:
    """The console's error output must be one ``error: ...`` line, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line in stderr:\n{stderr}"
    return errors[0]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie has finished too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def _next_job_works(c: Cluster, tmp_path: Path, name: str = "next", timeout: float = QUICK) -> None:
    """A quick job completes with correct results: the cluster's cores are free and working."""
    job = _job(tmp_path, name, "square", args_range=[0, 50])
    done = c.assert_ok(c.console("compute", job, "--json", timeout=timeout))
    assert json.loads(done.stdout) == [x * x for x in range(50)], c.explain(done)


# ---------------------------------------------------------------------------------- cores


@pytest.mark.parametrize(
    ("function", "retries", "detail"),
    [
        ("segfault_on_culprit", 1, "signal 11"),
        ("exit_on_culprit", 0, "exit code 3"),
    ],
)
def test_crashing_argument_gets_core_crashed_error_and_neighbours_succeed(
    make_cluster, tmp_path, function, retries, detail
):
    """A call that kills its core (SIGSEGV, or os._exit(3)) on one argument: the core is
    replaced, that argument alone is retried ``retries`` times and then reported as a
    CoreCrashed error saying it crashed its core retries+1 times; every other argument of the
    job (its batch neighbours included) gets its correct result; with on_error: continue the
    console exits 5 (finished with failed arguments)."""
    c = _cluster(make_cluster)
    job = _job(
        tmp_path, "crash", function, args_range=[0, 20], retries=retries, on_error="continue"
    )
    done = c.console("compute", job, "--json", timeout=60)
    assert done.returncode == 5, c.explain(done)
    values = json.loads(done.stdout)
    assert len(values) == 20, c.explain(done)
    for x, value in enumerate(values):
        if x != CULPRIT:
            assert value == x * x, f"argument {x}: {value!r}\n{c.explain(done)}"
    error = values[CULPRIT]
    assert isinstance(error, dict) and error.get("type") == "CoreCrashed", c.explain(done)
    times = retries + 1
    assert f"crashed its core {times} time{'s' if times != 1 else ''}" in error["message"], error
    assert detail in error["message"], error
    assert "1 argument(s) failed" in done.stderr, done.stderr


def test_call_past_timeout_is_stopped_and_only_its_argument_fails(make_cluster, tmp_path):
    """``timeout: 3`` and a call that would sleep 30 s: its core is killed (twice: retries 1)
    and that argument alone gets a TaskTimeout error "timed out after 3s"; the others (each
    microseconds, so a loaded machine cannot push one past 3 s) get their results. Had the
    core not been killed, the call would have returned 107 after 30 s instead of the error."""
    c = _cluster(make_cluster)
    job = _job(
        tmp_path,
        "overrun",
        "hang_on_culprit",
        args_range=[0, 12],
        timeout=3,
        retries=1,
        on_error="continue",
    )
    done = c.console("compute", job, "--json", timeout=60)
    assert done.returncode == 5, c.explain(done)  # finished, with a failed argument
    values = json.loads(done.stdout)
    assert [v for x, v in enumerate(values) if x != CULPRIT] == [
        x + 100 for x in range(12) if x != CULPRIT
    ]
    error = values[CULPRIT]
    assert isinstance(error, dict) and error.get("type") == "TaskTimeout", c.explain(done)
    assert "timed out after 3s" in error["message"] and "2 times" in error["message"], error


#: a ``sitecustomize`` that hangs the first HANG_CORES core processes before they can say
#: ready (a stalled import, a dead network file system): each takes a token file, once
HANG_BEFORE_READY = """
import os, threading
def _hang():
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            if b"remap.node.core" not in f.read():
                return  # the node itself
    except OSError:
        return
    for n in range(int(os.environ["HANG_CORES"])):
        try:
            os.close(os.open(os.path.join(os.environ["HANG_TOKENS"], str(n)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        threading.Event().wait(300)  # until the node kills it (or the test's teardown does)
        return
_hang()
"""


def test_cores_hung_before_ready_are_killed_at_the_deadline_and_the_rest_start(
    make_cluster, tmp_path
):
    """As many cores as start at once hang before "ready": they held every start slot, and the
    node never ran a call. With ``REMAP_CORE_START_TIMEOUT=10`` each is SIGKILLed at 10 s (one
    line naming it), the waiting core starts, the killed ones are started again (after the
    backoff their deaths trigger), and the job completes. (3 s was too short on a loaded
    2-CPU machine: 8 healthy cores starting at once took longer, and were killed too.)"""
    hooks = tmp_path / "hooks"
    tokens = tmp_path / "tokens"
    hooks.mkdir()
    tokens.mkdir()
    (hooks / "sitecustomize.py").write_text(HANG_BEFORE_READY)
    env = {
        "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}",
        "HANG_CORES": str(STARTING_AT_ONCE),
        "HANG_TOKENS": str(tokens),
        "REMAP_CORE_START_TIMEOUT": "10",
    }
    c = make_cluster([NodeSpec(cores=STARTING_AT_ONCE + 1, env=env)], heartbeat=HEARTBEAT)
    _next_job_works(c, tmp_path, timeout=60)
    assert len(os.listdir(tokens)) == STARTING_AT_ONCE, "the first cores did hang"
    log = c.nodes[0].log_text()
    killed = [line for line in log.splitlines() if "was not ready 10s after it started" in line]
    assert len(killed) >= STARTING_AT_ONCE, log
    assert "cores die at start (not ready within 10s, killed)" in log, log


# ---------------------------------------------------------------------------------- jobs


def test_kill_stops_a_running_job_and_frees_its_cores(make_cluster, tmp_path):
    """``kill JOB_ID`` on a job whose calls each sleep 30 s: the computing console exits
    non-zero within seconds saying the job was killed, jobs --json shows it killed, the
    nodes survive, and the next job runs at once on the freed cores."""
    c = _cluster(make_cluster)
    pids = {n.pid for n in c.nodes}
    job = _job(tmp_path, "doomed", "stuck", args_range=[0, 40])
    console = c.console_popen("compute", job, "--json")
    info = _wait_running(c, console, "doomed", every_node=True)

    killed = c.assert_ok(c.console("kill", info["id"], timeout=QUICK))
    assert "killed" in killed.stdout, c.explain(killed)
    asked = time.monotonic()
    done = c.finish(console, timeout=QUICK)
    took = time.monotonic() - asked
    assert done.returncode != 0, c.explain(done)
    assert "killed" in _one_clear_line(done.stderr), done.stderr
    assert took < SOON, f"the console took {took:.1f}s to notice the kill"

    state = next(j for j in _jobs(c) if j["id"] == info["id"])
    assert state["state"] == "killed" and state["running"] == 0, state
    _next_job_works(c, tmp_path)  # the 30 s calls would block it if their cores still ran them
    assert {n["pid"] for n in c.status()["nodes"]} == pids, "kill must not cost a node"


def test_job_of_a_vanished_console_is_cancelled_after_the_grace(make_cluster, tmp_path):
    """The console that submitted a job is SIGKILLed: after REMAP_CONSOLE_GRACE (1 s here)
    the server cancels the job (state "cancelled" in jobs --json), kills its running calls,
    and the next job runs on the freed cores."""
    c = _cluster(make_cluster, REMAP_CONSOLE_GRACE=str(GRACE))
    job = _job(tmp_path, "orphan", "stuck", args_range=[0, 40])
    console = c.console_popen("compute", job, "--json")
    info = _wait_running(c, console, "orphan", every_node=True)
    os.killpg(console.pid, signal.SIGKILL)
    console.wait(10)

    def cancelled() -> dict | None:
        state = next((j for j in _jobs(c) if j["id"] == info["id"]), None)
        if state is not None and state["state"] not in ("running", "cancelled"):
            raise ClusterError(f"job {info['id']} ended {state['state']}, not cancelled: {state}")
        return state if state is not None and state["state"] == "cancelled" else None

    state = c.wait_for(cancelled, QUICK, "the orphaned job to be cancelled")
    assert "console" in state["message"], state
    _next_job_works(c, tmp_path)


def test_detached_jobs_outlive_their_console_and_attach_collects_them(make_cluster, tmp_path):
    """Two jobs started with ``compute --detach`` (object mode and file mode) keep running after
    their consoles exit, although the server's console grace is 1 s; ``attach`` then returns
    every object result in order, and ``results`` writes every line of the file-mode job to
    the job's output file."""
    c = _cluster(make_cluster, REMAP_CONSOLE_GRACE=str(GRACE))
    n = 40  # 0.1 s each on two cores: about 2 s, longer than the grace
    output = tmp_path / "away.jsonl"
    obj = _job(tmp_path, "away-object", "nap", args_range=[0, n])
    fil = _job(
        tmp_path, "away-file", "nap", args_range=[0, n], response_mode="file", output=str(output)
    )
    ids, writers = [], []
    for job in (obj, fil):
        done = c.assert_ok(c.console("compute", job, "--detach", "--json", timeout=QUICK))
        reply = json.loads(done.stdout)
        assert reply["detached"] is True, c.explain(done)
        ids.append(reply["job"])
        writers.append(reply["writer_pid"])

    def finished() -> bool:
        states = {j["id"]: j for j in _jobs(c)}
        for job_id in ids:
            if job_id in states and states[job_id]["state"] not in ("running", "done"):
                raise ClusterError(
                    f"detached job ended {states[job_id]['state']}: {states[job_id]}"
                )
        return all(job_id in states and states[job_id]["state"] == "done" for job_id in ids)

    c.wait_for(finished, 60, "both detached jobs to finish")

    attached = c.assert_ok(c.console("attach", ids[0], "--json", timeout=QUICK))
    assert json.loads(attached.stdout) == [x * x for x in range(n)], c.explain(attached)
    # the file job's background writer holds its output (.OUTPUT.lock) until it is written
    c.wait_for(lambda: _gone(writers[1]), 30, "the background console to finish")

    collected = c.assert_ok(c.console("results", ids[1], "--json", timeout=QUICK))
    summary = json.loads(collected.stdout)
    assert summary["done"] == n and summary["state"] == "done", c.explain(collected)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines == [{"index": x, "result": x * x} for x in range(n)], lines[:5]


def test_detached_file_job_writes_its_output_without_an_attach(make_cluster, tmp_path):
    """``compute --detach`` of a file-mode job leaves a background console that writes every
    line of the output as the job runs, with nobody attaching by hand; it exits when done."""
    c = _cluster(make_cluster, REMAP_CONSOLE_GRACE=str(GRACE))
    n = 40
    output = tmp_path / "background.jsonl"
    job = _job(
        tmp_path, "away-bg", "nap", args_range=[0, n], response_mode="file", output=str(output)
    )
    done = c.assert_ok(c.console("compute", job, "--detach", "--json", timeout=QUICK))
    writer = json.loads(done.stdout)["writer_pid"]
    assert isinstance(writer, int), c.explain(done)
    try:

        def written() -> bool:
            return output.exists() and len(output.read_text().splitlines()) == n

        c.wait_for(written, 60, "the background console to write every line")
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert lines == [{"index": x, "result": x * x} for x in range(n)], lines[:5]
        c.wait_for(lambda: _gone(writer), 30, "the background console to exit")
    finally:
        try:
            os.kill(writer, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_reattach_after_an_interrupted_attach_gets_every_result(make_cluster, tmp_path):
    """A detached job is attached by a console that is SIGKILLed mid-job; a second ``attach``
    must still return every result in order, as a JSON list: the results the dead console
    had been sent were never delivered to anyone who kept them."""
    gate = tmp_path / "gate"
    c = _cluster(make_cluster, node_env={"TEST_GATE": str(gate)}, REMAP_CONSOLE_GRACE=str(GRACE))
    n = 160  # held at the gate until the first attach is dead, however slow the machine
    job = _job(tmp_path, "resumable", "gated_nap", args_range=[0, n], chunksize=1)
    submitted = c.assert_ok(c.console("compute", job, "--detach", "--json", timeout=QUICK))
    job_id = json.loads(submitted.stdout)["job"]

    def state(predicate: Any, what: str) -> dict:
        def check() -> dict | None:
            info = _job_named(c, "resumable")
            if info is not None and info["state"] != "running":
                raise ClusterError(f"the job ended ({info['state']}) before {what}: {info}")
            return info if info is not None and predicate(info) else None

        return c.wait_for(check, QUICK, what)

    state(lambda j: j["done"] >= 2, "some results to be kept for attach")
    first = c.console_popen("attach", job_id, "--json")
    state(lambda j: j["attached"], "the first attach to take the job")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    gate.touch()

    def finished() -> bool:
        info = _job_named(c, "resumable")
        return info is not None and info["state"] == "done"

    c.wait_for(finished, 60, "the detached job to finish")
    second = c.assert_ok(c.console("attach", job_id, "--json", timeout=QUICK))
    values = json.loads(second.stdout)
    assert isinstance(values, list), (
        f"attach --json printed {type(values).__name__}: {second.stdout[:300]}"
    )
    assert values == [x * x for x in range(n)], second.stdout[:1000]


# ---------------------------------------------------------------------------------- the server


def test_server_killed_mid_job_fails_the_console_and_nodes_rejoin_its_restart(
    make_cluster, tmp_path
):
    """The server is SIGKILLed while a console computes a job of 30 s calls: the console tries
    to get back for its grace (1 s here), then exits non-zero within seconds with one ``error:``
    line about the lost connection and no traceback. A new server on the same port then gets both nodes back without help
    (they reconnect with backoff), and they drop the dead server's work and run the next
    job promptly and correctly."""
    c = _cluster(make_cluster)
    pids = [n.pid for n in c.nodes]
    job = _job(tmp_path, "stranded", "stuck", args_range=[0, 40])
    console = c.console_popen("compute", job, "--json", env={"REMAP_CONSOLE_GRACE": str(GRACE)})
    _wait_running(c, console, "stranded", every_node=True)
    assert c.server is not None
    c.server.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    done = c.finish(console, timeout=QUICK)
    took = time.monotonic() - killed
    assert done.returncode != 0, c.explain(done)
    line = _one_clear_line(done.stderr)
    assert "connection" in line or "server" in line, line
    assert took < SOON, f"the console took {took:.1f}s to notice the server died"

    c.restart_server(signal.SIGKILL, timeout=30)  # same port; returns once both nodes are back
    assert [n.pid for n in c.live_nodes()] == pids, "the nodes must survive the server's death"
    _next_job_works(c, tmp_path)  # the 30 s calls would block it if the nodes still ran them


def test_restarted_server_jobs_never_run_the_old_servers_functions(make_cluster, tmp_path):
    """The server is SIGKILLed while one node is stuck in a 30 s call of job 1 and the other
    node sits idle with job 1's function loaded on its core. The new server's job (x * x) must
    compute x * x on every node, never the old job's function (x + 100), even if a server
    ever numbered its jobs like the old one did."""
    c = _cluster(make_cluster)
    old = _job(tmp_path, "old", "hang_on_culprit", args_range=[0, 12], chunksize=1)
    # a grace of 0: the console does not resume job 1 on the new server (it would hang there)
    console = c.console_popen("compute", old, "--json", env={"REMAP_CONSOLE_GRACE": "0"})

    def one_node_idle() -> dict | None:
        if console.poll() is not None:
            raise ClusterError(f"the console exited ({console.returncode}) too early")
        status = c.status()
        info = next((j for j in status["jobs"] if j["name"] == "old"), None)
        idle = [n for n in status["nodes"] if n["tasks_in_flight"] == 0]
        return status if info and info["queued"] == 0 and info["done"] >= 2 and idle else None

    c.wait_for(one_node_idle, QUICK, "one node to finish its share of job 1 and sit idle")
    c.restart_server(signal.SIGKILL, timeout=30)
    assert c.finish(console, timeout=QUICK).returncode != 0
    new = _job(
        tmp_path, "new", "square", args_range=[10, 60]
    )  # no CULPRIT: a stale core would hang
    done = c.assert_ok(c.console("compute", new, "--json", timeout=QUICK))
    assert json.loads(done.stdout) == [x * x for x in range(10, 60)], c.explain(done)


# ---------------------------------------------------------------------------------- capacity


def test_job_for_an_empty_group_waits_visibly_or_gives_up(make_cluster, tmp_path):
    """A job for group "gpu" on a cluster with no such node. With ``--wait-for-nodes 1`` the
    console says it is waiting for nodes in group 'gpu', then fails (non-zero, one clear
    line) instead of waiting forever. Without it the job waits: status --json shows
    jobs[].waiting and the console's stderr says so; when a gpu node joins, the job runs
    there and completes."""
    c = _cluster(make_cluster, nodes=1)
    hopeless = _job(tmp_path, "nowhere", "square", args_range=[0, 10], group="gpu")
    started = time.monotonic()
    done = c.console("compute", hopeless, "--json", "--wait-for-nodes", "1", timeout=QUICK)
    took = time.monotonic() - started
    assert done.returncode != 0, c.explain(done)
    assert "waiting for nodes in group 'gpu'" in done.stderr, c.explain(done)
    line = _one_clear_line(done.stderr)
    assert "gpu" in line, line
    assert took < SOON, f"--wait-for-nodes 1 took {took:.1f}s to give up"

    patient = _job(tmp_path, "patient", "square", args_range=[0, 30], group="gpu")
    console = c.console_popen("compute", patient, "--json")

    def waiting() -> dict | None:
        if console.poll() is not None:
            raise ClusterError(f"the console exited ({console.returncode}) while it should wait")
        info = _job_named(c, "patient")
        return (
            info
            if info is not None and "waiting for nodes in group 'gpu'" in info["waiting"]
            else None
        )

    info = c.wait_for(waiting, QUICK, "status to show the job waiting for group gpu")
    assert info["done"] == 0 and info["state"] == "running", info
    c.add_node(cores=1, group="gpu")
    done = c.assert_ok(c.finish(console, timeout=QUICK))
    assert json.loads(done.stdout) == [x * x for x in range(30)], c.explain(done)
    assert "waiting for nodes in group 'gpu'" in done.stderr, c.explain(done)


def test_drained_node_finishes_its_work_and_takes_no_more(make_cluster, tmp_path):
    """``drain NODE_ID`` while a job runs on two nodes: nodes --json shows the node draining,
    the work it had in flight finishes there, the running job completes with every result
    exactly once, the drained node stays connected, and the next job runs on the other node
    only."""
    gate = tmp_path / "gate"
    c = _cluster(
        make_cluster,
        nodes=[NodeSpec(env={"TEST_NODE_NAME": "a"}), NodeSpec(env={"TEST_NODE_NAME": "b"})],
        node_env={"TEST_GATE": str(gate)},
        # nothing here waits on a heartbeat, and a node lost to 0.9 s of silence on a loaded
        # machine comes back a new session, not draining: its work and the next job's move
        heartbeat=2.0,
    )
    a, b = c.nodes
    n = 40  # one per batch; held at the gate until the drain is checked, however slow the machine
    job = _job(tmp_path, "busy", "gated_where", args_range=[0, n], chunksize=1)
    console = c.console_popen("compute", job, "--json")

    def both_busy() -> dict | None:
        if console.poll() is not None:
            raise ClusterError(
                f"the console exited ({console.returncode}) before both nodes got work"
            )
        nodes = {node["pid"]: node for node in c.status()["nodes"]}
        ok = all(nodes.get(p, {}).get("tasks_in_flight", 0) > 0 for p in (a.pid, b.pid))
        return nodes if ok else None

    nodes = c.wait_for(both_busy, QUICK, "both nodes to have work in flight")
    drained = c.assert_ok(c.console("drain", nodes[a.pid]["id"], timeout=QUICK))
    assert "draining" in drained.stdout, c.explain(drained)

    listed = c.assert_ok(c.console("nodes", "--json", timeout=QUICK))
    flags = {node["pid"]: node["draining"] for node in json.loads(listed.stdout)}
    assert flags == {a.pid: True, b.pid: False}, flags

    gate.touch()
    done = c.assert_ok(c.finish(console, timeout=60))
    values = json.loads(done.stdout)
    assert [v[0] for v in values] == list(range(n)), c.explain(done)
    assert "a" in {v[1] for v in values}, "the drained node's in-flight work did not finish there"

    after = _job(tmp_path, "after", "where", args_range=[0, 10])
    done = c.assert_ok(c.console("compute", after, "--json", timeout=QUICK))
    ran_on = {node for _, node in json.loads(done.stdout)}
    assert ran_on == {"b"}, f"a drained node ran work of a later job: {ran_on}"
    assert a.pid in {node["pid"] for node in c.status()["nodes"]}, (
        "drain must not disconnect the node"
    )
