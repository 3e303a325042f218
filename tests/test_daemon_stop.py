"""A daemon's stop is waited for: SIGTERM (or Ctrl-C) stops the reactor only once the server's
or node's own stop has finished (the server's stop hooks, the journal's close last, ran).

First the shared helper on a fake reactor (no sockets, no time); last, a real server SIGTERMed.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet import defer

from remap.entry import run_until_stopped


class TriggerReactor:
    """Records system event triggers; a test fires them as the reactor's shutdown would."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, fn: Any) -> None:  # noqa: N802
        self.triggers.append((phase, event, fn))

    def shutting_down(self) -> Any:
        """What the reactor's shutdown waits for: the ``before`` triggers' results."""
        return [
            fn() for phase, event, fn in self.triggers if (phase, event) == ("before", "shutdown")
        ]


def test_a_reactor_stopped_by_a_signal_waits_for_the_whole_stop() -> None:
    """SIGTERM: the reactor's ``before shutdown`` trigger starts the stop and hands the reactor a
    Deferred that fires only once the stop has finished (the server's used to return nothing:
    the reactor stopped at once, and the rest of the stop, the journal's close among it, never
    ran)."""
    reactor, stopped, release = TriggerReactor(), defer.Deferred(), defer.Deferred()
    steps: list[str] = []

    async def stop() -> None:
        steps.append("stop began")
        await release  # a port's stopListening, the journal's close: later turns
        steps.append("stop ended")

    running = defer.ensureDeferred(run_until_stopped(reactor, stopped, stop))
    assert steps == [] and not running.called, "nothing stops before it is asked to"
    [waited] = reactor.shutting_down()
    assert steps == ["stop began"]
    assert isinstance(waited, defer.Deferred) and not waited.called, "the reactor must wait"
    release.callback(None)
    assert steps == ["stop began", "stop ended"] and waited.called and running.called


def test_a_stop_of_the_daemons_own_ends_before_the_reactor_is_stopped() -> None:
    """``kill --cluster``, the server's ``shutdown``: the stop runs when ``stopped`` fires; the
    reactor's shutdown that follows finds it done (no second stop, nothing to wait for)."""
    reactor, stopped = TriggerReactor(), defer.Deferred()
    steps: list[str] = []

    async def stop() -> None:
        steps.append("stop")

    running = defer.ensureDeferred(run_until_stopped(reactor, stopped, stop))
    stopped.callback(None)
    assert steps == ["stop"] and running.called
    [waited] = reactor.shutting_down()
    assert waited.called and steps == ["stop"]


def test_a_stop_that_fails_still_lets_the_reactor_stop() -> None:
    """A stop that raises still fires the reactor's wait (a daemon never hangs on exit); the
    error reaches whoever awaited the run."""
    reactor, stopped = TriggerReactor(), defer.Deferred()

    async def stop() -> None:
        raise RuntimeError("boom")

    running = defer.ensureDeferred(run_until_stopped(reactor, stopped, stop))
    [waited] = reactor.shutting_down()
    assert waited.called
    failures: list[Any] = []
    running.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)


@pytest.mark.slow
def test_a_server_stopped_by_sigterm_finishes_its_stop_before_it_exits(make_cluster) -> None:
    """SIGTERM to a server with its journal on and a node connected: it exits 0 after its whole
    stop, the stop hooks with it (the journal closes last): its last line of its own is
    "remap server stopped" (a server that exited mid-stop never printed it)."""
    c = make_cluster(1, cores=1)
    server = c.server
    assert server is not None
    c.kill_server(signal.SIGTERM)
    log = server.log_text()
    assert server.exit_code() == 0, c.diagnostics()
    assert "Received SIGTERM" in log, log
    assert "remap server stopped" in log.split("Received SIGTERM", 1)[1], log
    assert (c.home / ".remap" / "journal.sqlite").exists(), "the journal was on"
