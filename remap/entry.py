"""What every long-running entry point shares: run ``serve`` on the reactor, map errors to codes."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task

from .errors import RemapError, one_line
from .logs import start_logging
from .settings import Settings, load_settings, locate_env_file


def daemon_settings(args: argparse.Namespace, **flags: Any) -> Settings:
    """A server's or node's settings (its flags, then the environment, then the ``.env`` file
    ``--env-file`` names or the first found), with logging started at their level."""
    settings = load_settings(
        {**flags, "log_level": args.log_level}, dotenv_path=locate_env_file(args.env_file)[0]
    )
    start_logging(settings.log_level)
    return settings


async def run_until_stopped(
    reactor: Any, stopped: defer.Deferred, stop: Callable[[], Awaitable[Any]]
) -> None:
    """Wait until ``stopped`` fires (a daemon's own reason to stop) or the reactor is told to
    stop (SIGTERM, Ctrl-C), then run ``stop()``. The reactor's shutdown waits for it, or what
    it does on later turns (the journal's last commit, a node's cores reaped) never runs.
    """
    finished: defer.Deferred = defer.Deferred()

    def reactor_stopping() -> defer.Deferred:
        if not stopped.called:
            stopped.callback(None)
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", reactor_stopping)
    await stopped
    try:
        await stop()
    finally:
        finished.callback(None)


def install_lean_reactor() -> bool:
    """Make the runtime's lean epoll reactor (~9 Python calls less per event; the server and
    node wake twice per call) this process's global reactor. False where a reactor is installed
    already or epoll is missing: Twisted's default then."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        from .runtime import _lean_epoll_reactor

        factory = _lean_epoll_reactor()
    except ImportError:  # not Linux
        return False
    from twisted.internet.main import installReactor

    installReactor(factory())
    return True


def react_main(
    serve: Callable[[Any, argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run ``serve(reactor, args)`` until it returns; a RemapError becomes one line and its exit code."""
    code = [0]
    install_lean_reactor()

    async def go(reactor: Any) -> None:
        try:
            code[0] = await serve(reactor, args)
        except RemapError as exc:
            line, code[0] = one_line(exc)
            start_logging("error")  # the error is the last line, not "Main loop terminated."
            print(line, file=sys.stderr)

    with contextlib.suppress(SystemExit):
        task.react(lambda r: defer.ensureDeferred(go(r)))
    return code[0]
