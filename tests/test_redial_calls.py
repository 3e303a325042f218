"""Calls made while a ``remap.connect`` handle dials its lost server again (real processes on
127.0.0.1, the server SIGKILLed; journal on, in its own ``REMAP_STATE_DIR``).

A handle that loses its server while a call is in flight dials again and resumes that call.
A call made meanwhile (``submit``, ``map``) waits for the redial as the call in flight does:
it runs once the server is back, or fails with the redial's one-line error when it gives up;
on a closed handle it fails at once. A handle that lost its server while idle dials again at
its next call: the call runs if the server is back, or fails with the dial's one-line error
(as ``remap.connect`` raises it), and the call after that dials again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import remap
from remap.errors import ConnectionLost, ServerUnreachable
from remap.settings import Settings
from tests.cluster_harness import Cluster as ProcessCluster
from tests.cluster_harness import NodeSpec, wait_for, wait_then

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def square(x: int) -> int:
    return x * x


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` on a thread of its own; its result or exception lands in the list."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def interrupted_wait(c: remap.Cluster, future: Any) -> None:
    """Ctrl-C (SIGINT) while this thread waits for ``future`` raises KeyboardInterrupt."""
    r, me = c._reactor, threading.get_ident()

    def interrupt() -> None:
        wait_for(lambda: r.driver == me and r.driving, 30, "the caller to wait (run the loop)")
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        future.result(timeout=60)
    helper.join(30)


def cluster(tmp_path: Path) -> ProcessCluster:
    state = {"REMAP_STATE_DIR": str(tmp_path / "state"), "REMAP_JOURNAL": "on"}
    return ProcessCluster(tmp_path / "cluster", nodes=[NodeSpec(cores=1)], server_env=state)


def lose_the_server(procs: ProcessCluster, c: remap.Cluster, tmp_path: Path) -> Any:
    """A call in flight, then the server SIGKILLed: the handle dials again. The call's future
    and the release file that lets it return."""
    tmp_path.mkdir(exist_ok=True)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    in_flight = c.submit(wait_then, started, release, 11)
    wait_for(lambda: os.path.exists(started), 60, "the call in flight to start")
    procs.kill_server()
    wait_for(lambda: c._client.redialing, 30, "the handle to dial the server again")
    return in_flight, release


def test_calls_made_while_the_handle_redials_run_once_the_server_is_back(tmp_path: Path) -> None:
    """A submit and a map made while the handle dials again wait for the redial (today's
    code raised ConnectionLost at once) and run once the restarted server is back, each
    sent once; the call in flight is resumed too. Ctrl-C interrupts a wait for such a call."""
    with cluster(tmp_path) as procs:
        settings = Settings(console_grace=60.0)
        with remap.connect(procs.address, secret=procs.secret, settings=settings) as c:
            in_flight, release = lose_the_server(procs, c, tmp_path)
            future = c.submit(square, 3)
            mapper, mapped = in_thread(lambda: c.map(square, range(5)))
            wait_for(lambda: len(c._client._parked) == 2, 30, "the map to wait for the redial")
            assert not future.done() and not mapped
            if threading.current_thread() is threading.main_thread() and hasattr(
                c._reactor, "drive"
            ):
                interrupted_wait(c, future)
            procs.start_server(procs.port)
            open(release, "w").close()
            assert future.result(timeout=120) == 9
            mapper.join(120)
            assert mapped == [[0, 1, 4, 9, 16]]
            assert in_flight.result(timeout=120) == 11
            assert c._client.reconnects == 1
            name = f"map:{square.__module__}.square"
            jobs = [j for j in c.status()["jobs"] if j["name"] == name]
            assert [(j["received"], j["done"]) for j in jobs] == [(5, 5)], jobs


def test_calls_made_while_a_redial_gives_up_fail_with_its_error(tmp_path: Path) -> None:
    """The server stays down: a submit and a map made during the redial fail with the same
    one-line ConnectionLost as the call in flight, when the redial gives up (its grace, plus
    its last attempt); a call after that dials again, and fails with that dial's error. A
    handle closed while a call waits for its redial ends that call at once, and refuses the
    next one."""
    grace = 3.0
    with cluster(tmp_path) as procs:
        settings = Settings(console_grace=grace)
        with remap.connect(procs.address, secret=procs.secret, settings=settings) as c:
            lost_at = time.monotonic()
            in_flight, _ = lose_the_server(procs, c, tmp_path / "a")
            future = c.submit(square, 3)
            mapper, mapped = in_thread(lambda: c.map(square, range(5)))
            with pytest.raises(ConnectionLost) as first:
                in_flight.result(timeout=grace + 30)
            with pytest.raises(ConnectionLost) as late:
                future.result(timeout=5)
            mapper.join(5)
            assert len(mapped) == 1 and isinstance(mapped[0], ConnectionLost), mapped
            assert time.monotonic() - lost_at < grace + 10
            line = str(first.value)
            assert "REMAP_CONSOLE_GRACE" in line and "\n" not in line
            assert str(late.value) == line and str(mapped[0]) == line
            started = time.monotonic()
            with pytest.raises(ServerUnreachable) as after:  # it dials again: still down
                c.submit(square, 4).result(timeout=30)
            assert procs.address in str(after.value) and time.monotonic() - started < 10

        open(tmp_path / "a" / "release", "w").close()  # the first call must not hold the core
        procs.start_server(procs.port)
        settings = Settings(console_grace=60.0)
        c = remap.connect(procs.address, secret=procs.secret, settings=settings)
        try:
            lose_the_server(procs, c, tmp_path / "b")
            future = c.submit(square, 3)
            mapper, mapped = in_thread(lambda: c.map(square, range(5)))
            wait_for(lambda: len(c._client._parked) == 2, 30, "the map to wait for the redial")
            started = time.monotonic()
            c.close()
            mapper.join(5)
            assert future.cancelled() or isinstance(future.exception(timeout=5), ConnectionLost)
            assert len(mapped) == 1 and isinstance(mapped[0], Exception), mapped
            assert time.monotonic() - started < 5
            with pytest.raises(RuntimeError, match="closed"):
                c.submit(square, 4)
        finally:
            c.close()


def reconnect_lines() -> tuple[list[str], Callable[[], None]]:
    """The console's "reconnected" log lines from now on, and the function that stops
    collecting them."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").endswith("ClusterClient"):
            text = formatEvent(event)
            if text.startswith("reconnected"):
                lines.append(text)

    globalLogPublisher.addObserver(observe)
    return lines, lambda: globalLogPublisher.removeObserver(observe)


def idle_handle_loses(procs: ProcessCluster, c: remap.Cluster) -> None:
    """The handle ran a map (nothing open after it), then its server is SIGKILLed: it sees
    the connection go and does not dial (nothing to resume)."""
    assert c.map(square, range(3)) == [0, 1, 4]
    # its results are in; its end (the server's job_done) may still be on its way
    wait_for(lambda: not c._client.runs, 30, "the map job to end")
    procs.kill_server()
    wait_for(lambda: c._client.link is None, 30, "the handle to see its server gone")
    assert not c._client.redialing and c._client.reconnects == 0, c._client.runs


def test_an_idle_handle_dials_its_restarted_server_at_the_next_call(tmp_path: Path) -> None:
    """The server is SIGKILLed and started again on its port while the handle is idle: the
    next submit dials again and runs (today's code raised ConnectionLost, for ever), and
    the console logs one line for it."""
    with cluster(tmp_path) as procs:
        with remap.connect(procs.address, secret=procs.secret, connect_timeout=5.0) as c:
            idle_handle_loses(procs, c)
            procs.start_server(procs.port)
            lines, stop = reconnect_lines()
            try:
                assert c.submit(square, 7).result(timeout=120) == 49
            finally:
                stop()
            assert c._client.reconnects == 1
            assert len(lines) == 1 and procs.address in lines[0], lines
            assert c.map(square, range(4)) == [0, 1, 4, 9]
            assert len(c.status()["nodes"]) == 1


def test_an_idle_handle_whose_server_stays_down_fails_then_dials_again(tmp_path: Path) -> None:
    """The server stays down: the next call dials once and fails within connect_timeout with
    the one-line error ``remap.connect`` gives; so does a status after it (no dead state, no
    wait); the server back on its port, the call after that runs."""
    connect_timeout = 3.0
    with cluster(tmp_path) as procs:
        with remap.connect(
            procs.address, secret=procs.secret, connect_timeout=connect_timeout
        ) as c:
            idle_handle_loses(procs, c)
            with pytest.raises(ServerUnreachable) as first:
                remap.connect(procs.address, secret=procs.secret, connect_timeout=connect_timeout)
            started = time.monotonic()
            future = c.submit(square, 5)
            with pytest.raises(ServerUnreachable) as down:
                future.result(timeout=connect_timeout + 30)
            assert time.monotonic() - started < connect_timeout + 5
            line = str(down.value)
            assert line == str(first.value) and "\n" not in line, line
            started = time.monotonic()
            with pytest.raises(ServerUnreachable) as again:
                c.status()
            assert str(again.value) == line and time.monotonic() - started < connect_timeout + 5
            assert not c._client.redialing and c._client.reconnects == 0
            procs.start_server(procs.port)
            assert c.submit(square, 6).result(timeout=120) == 36
            assert c._client.reconnects == 1
            assert c.map(square, range(4)) == [0, 1, 4, 9]
