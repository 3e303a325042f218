"""The programs' first frame: a Ctrl-C while their modules still import (a second or more on a
loaded machine) leaves with one line and exit code 130, as it does once they run, never with a
Python traceback. Light on purpose: it imports nothing that takes time."""

from __future__ import annotations

import importlib
import sys

#: 128 + SIGINT, as ``remap.errors.EXIT_INTERRUPTED`` (not imported: that is what may be cut)
EXIT_INTERRUPTED = 130


def _launch(module: str) -> None:
    try:
        run = importlib.import_module(module).run
        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_INTERRUPTED) from None


def console() -> None:
    """``remap`` and ``remap_console.py``."""
    _launch("remap.console.main")


def server() -> None:
    """``remap-server`` and ``remap_server.py``."""
    _launch("remap.server.main")


def node() -> None:
    """``remap-node`` and ``remap_node.py``."""
    _launch("remap.node.main")
