"""Readable server and node logs, reconnect jitter and the listen backlog (issue 9, small things).

Unit tests check the log filter, the retry policy and the endpoint; slow tests read the logs
of a real server and a node that had to retry before the server came up, and of a node that
was asked to stop (calm) beside one whose server was killed (a loss).
"""

from __future__ import annotations

import io
import random
import re
import signal
import socket

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from remap.cluster import RETRY_MAX, reconnect_delays
from remap.logs import log_observer, start_logging
from remap.net import LISTEN_BACKLOG, server_endpoint
from remap.settings import Settings

from .cluster_harness import alarming_lines, jobs_function, run_entry, write_job
from .test_security_e2e import Cluster, wait_for


def test_twisted_factory_and_port_noise_is_dropped_and_the_rest_kept():
    """Twisted's "<Factory> starting on N", "Starting factory <... at 0x...>", "(TCP Port N
    Closed)" and "Scheduling retry N to connect ..." lines are not shown; every other line is."""
    buf = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(log_observer("info", buf))
    log = Logger(observer=publisher)
    for text in (
        "RemapServerFactory starting on 33947",  # as Twisted's legacy log.msg events arrive
        "RemapServerFactory (TLS) starting on 1",
        "Starting factory <remap.net.PeerFactory object at 0x7fbb995bf6d0>",
        "Stopping factory <remap.net.PeerFactory object at 0x7fbb995bf6d0>",
        "(TCP Port 33947 Closed)",
        "(UDP Port 5353 Closed)",
        "node abc joined: keep this",
    ):
        log.info("{log_text}", log_text=text)
    log.info("Starting factory {factory!r}", factory=object())
    # ClientService's own, at every attempt of a node that cannot reach its server
    log.info(
        "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
        attempt=4,
        endpoint="tcp:127.0.0.1:7878",
        delay=3.3,
    )
    text = buf.getvalue()
    assert "keep this" in text
    assert "starting on" not in text and "0x" not in text and "Port" not in text, text
    assert "retry" not in text, text


def test_reconnect_delays_grow_are_rounded_and_really_jittered():
    """Delays grow to RETRY_MAX, are rounded to 0.1 s, and differ between two nodes (jitter is
    drawn, not a constant), so nodes that lost the same server do not reconnect in lockstep."""
    a, b = reconnect_delays(random.Random(1)), reconnect_delays(random.Random(2))
    first = [a(n) for n in range(12)]
    second = [b(n) for n in range(12)]
    assert first != second
    for delay in first + second:
        assert 0.1 <= delay <= RETRY_MAX
        assert delay == round(delay, 1)
    assert max(first[-3:]) > 10 * max(first[:2]), first
    same_step = {reconnect_delays(random.Random(seed))(3) for seed in range(20)}
    assert len(same_step) > 5, same_step


def test_the_server_listens_with_a_large_backlog():
    """A burst of new connections (a garbage flood) must not overflow the accept queue and push a
    console's connect into SYN retries: the listening endpoint asks for LISTEN_BACKLOG >= 1024."""
    assert LISTEN_BACKLOG >= 1024
    for host in ("127.0.0.1", "::1"):
        endpoint = server_endpoint(Clock(), Settings(), host, 0)
        assert endpoint._backlog == LISTEN_BACKLOG


@pytest.mark.slow
def test_server_and_node_logs_are_readable(tmp_path):
    """A node started before its server says once why it cannot reach it (with the address),
    not a Twisted "Scheduling retry" line per attempt; the server prints one "listening" line;
    neither log shows an object address."""
    # the port stays bound here (refusing connections: it never listens) until the server
    # listens beside it (SO_REUSEADDR on both): found free and closed, it could be taken by
    # another process's listener during the node's seconds of retries
    with socket.socket() as holder, Cluster(tmp_path) as cluster:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        node = cluster.node(port)
        wait_for(lambda: "cannot reach the server" in node.stderr(), 20, "the node's line")
        server, _ = cluster.server(args=["--port", str(port)])
        cluster.wait_node_joined(server)
        node_log, server_log = node.stderr(), server.stderr()
    for text in (node_log, server_log):
        assert " at 0x" not in text and "starting on" not in text, text
    listening = [
        line for line in server_log.splitlines() if re.search(r"listening on \S+:\d+", line)
    ]
    assert len(listening) == 1, server_log
    unreachable = [line for line in node_log.splitlines() if "cannot reach the server" in line]
    assert len(unreachable) == 1 and f"127.0.0.1:{port}: connection refused" in unreachable[0]
    assert "Scheduling retry" not in node_log, node_log


def test_an_entry_point_run_again_in_one_process_keeps_one_observer_on_the_current_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tests and notebooks call ``main()`` many times: each call used to add an observer bound
    to that call's stderr; once those streams closed, every event raised in each observer and
    the observers logged each other's failures, stalling the reactor for seconds."""
    from twisted.logger import globalLogPublisher

    start_logging("error")
    observers = len(globalLogPublisher._observers)
    start_logging("info")
    assert len(globalLogPublisher._observers) == observers
    Logger().info("seen {n}", n=1)
    assert "seen 1" in capsys.readouterr().err  # the level changed; the stream is today's
    start_logging("error")
    Logger().info("hidden")
    assert "hidden" not in capsys.readouterr().err


#: a process that used remap before it calls the console's main() (a notebook, a test run)
EARLIER_ERROR_THEN_MAIN = """
import sys
from twisted.logger import Logger
from remap.console.main import main

Logger().error("an error from earlier work in this process")
code = main(["--env-file", "/dev/null", "compute", sys.argv[1]])
Logger().error("an error while logging is on")
sys.exit(code)
"""


@pytest.mark.slow
def test_the_first_in_process_main_does_not_replay_what_was_logged_before(tmp_path):
    """Twisted keeps every event from the process's start until logging begins; the first
    ``main()`` replayed them, so an old error of other work was printed above the console's
    one error line (a test comparing that line saw a line of an earlier test). What is logged
    once it runs still shows."""
    done = run_entry(
        "-c", EARLIER_ERROR_THEN_MAIN, str(tmp_path / "missing.yaml"), home=tmp_path, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: ") and "missing.yaml" in lines[0], done.stderr
    assert len(lines) == 2 and lines[1].endswith("an error while logging is on"), done.stderr


@pytest.mark.slow
def test_a_server_that_cannot_listen_ends_on_one_clear_line(tmp_path):
    """A busy port is the last line of the server's output, said once and with what to do
    (not Twisted's "Couldn't listen on ..." inside our line, nor "Main loop terminated."
    after it), exit code 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "HOME": str(tmp_path), "REMAP_STATE_DIR": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, str(root / "remap_server.py"), "--port", str(port)],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
        )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another server running? choose another port)"
    ), done.stderr
    assert [line for line in lines if "error" in line] == lines[-1:], done.stderr


@pytest.mark.slow
def test_a_node_stopped_by_sigterm_leaves_calmly_and_a_killed_server_is_still_a_loss(
    make_cluster, tmp_path
):
    """SIGTERM to a node whose core is busy: its log says it is stopping, with no "lost the
    server ... reconnecting" and no "Unhandled Error" (it used to drop the work of cores it was
    killing, writing to their closed pipes), exit 0. A server SIGKILLed under the other node is
    still a loss: that node says so and reconnects."""
    c = make_cluster(2, cores=1)
    stuck = write_job(
        tmp_path / "stuck.yaml",
        {"function": jobs_function("funcs", "stuck"), "name": "stuck", "args_range": [0, 4]},
    )
    c.console_popen("compute", stuck, "--json")
    first = c.nodes[0]

    def busy() -> bool:
        return any(n["pid"] == first.pid and n["busy"] for n in c.status()["nodes"])

    c.wait_for(busy, 30, "the first node's core to be busy")
    c.kill_node(0, signal.SIGTERM)
    log = first.log_text()
    assert first.exit_code() == 0, c.diagnostics()
    assert "this node is stopping" in log and not alarming_lines(log), log

    c.restart_server(signal.SIGKILL)
    other = c.nodes[1].log_text()
    assert "lost the server" in other and "reconnecting" in other, other
