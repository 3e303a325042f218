"""The runtime's child processes (embedded cores) are its own: reaped and ended on its thread,
never by another reactor in the same process, and it never reaps another reactor's children."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
from typing import Any

import pytest
from twisted.internet import process, protocol

from remap import runtime


class Ended(protocol.ProcessProtocol):
    """Records the thread ``processEnded`` ran on."""

    def __init__(self) -> None:
        self.ended: concurrent.futures.Future = concurrent.futures.Future()

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self.ended.set_result(threading.current_thread().name)


def _wait_exited(pid: int) -> None:
    """Block until ``pid`` has exited, leaving it unreaped (a zombie); return at once if its
    reactor reaped it already (its SIGCHLD or its periodic reap may come first)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass


@pytest.mark.slow
def test_a_runtime_child_is_reaped_and_ended_by_the_runtime_alone() -> None:
    r = runtime.ensure_running()
    proto = Ended()

    def spawn() -> tuple[int, bool]:
        child = r.spawnProcess(
            proto, sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"], env={}
        )
        return child.pid, child.pid in process.reapProcessHandlers

    pid, in_twisteds_table = runtime.call(spawn).result(30)
    assert not in_twisteds_table  # so another reactor's reap cannot take it
    runtime.call(lambda: proto.transport.closeStdin()).result(30)  # the child exits
    _wait_exited(pid)
    process.reapAllProcesses()  # what another reactor on this (main) thread does on SIGCHLD
    assert proto.ended.result(30) == "remap-reactor"


def test_the_runtime_leaves_another_reactors_children_alone() -> None:
    """Another reactor's child that has exited stays that reactor's to reap: the runtime's
    reaper neither reaps it nor ends it on the runtime's thread."""
    r = runtime.ensure_running()
    proto = Ended()
    other_reactor = object()  # no pipes of Twisted's: the Process never touches its reactor
    release, held = os.pipe()  # the child exits once it is registered, not before
    code = "import os; os.read(3, 1)"
    try:
        child = process.Process(
            other_reactor,
            sys.executable,
            [sys.executable, "-c", code],
            {},
            None,
            proto,
            childFDs={3: release},
        )
    finally:
        os.close(release)
    try:
        os.close(held)
        _wait_exited(child.pid)
        runtime.call(r.remap_children.reap).result(30)
        assert not proto.ended.done()
        assert process.reapProcessHandlers.get(child.pid) is child
    finally:
        child.reapProcess()  # its own reactor's reap, here on the main thread
    assert proto.ended.result(5) == threading.current_thread().name
