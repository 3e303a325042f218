"""What every long-running entry point shares: run ``serve`` on the reactor, map errors to codes."""

from __future__ import annotations

import argparse
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


def react_main(
    serve: Callable[[Any, argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run ``serve(reactor, args)`` until it returns; a RemapError becomes one line and its exit code."""
    code = [0]

    async def go(reactor: Any) -> None:
        try:
            code[0] = await serve(reactor, args)
        except RemapError as exc:
            line, code[0] = one_line(exc)
            print(line, file=sys.stderr)

    try:
        task.react(lambda r: defer.ensureDeferred(go(r)))
    except SystemExit:
        pass
    return code[0]
