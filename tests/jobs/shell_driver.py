"""Drive the console's interactive Shell in a fresh process (no tty needed) and print what it said.

Usage: ``python shell_driver.py SERVER LINE [LINE ...]`` with REMAP_SECRET_KEY in the environment.
Prints one JSON object: ``{"out": ..., "err": ..., "stops": [bool per line]}``. A separate
process keeps the console's global reactor thread away from the test runner's reactor.
"""

from __future__ import annotations

import io
import json
import os
import sys

from remap.console.main import Console, Shell, build_parser
from remap.console.session import Session
from remap.settings import load_settings


def main() -> int:
    server, *lines = sys.argv[1:]
    settings = load_settings({"server": server}, dotenv_path=None)
    out, err = io.StringIO(), io.StringIO()
    session = Session(settings, announce=lambda text: print(text, file=err))
    stops = []
    try:
        shell = Shell(Console(session, out=out, err=err), build_parser())
        for line in lines:
            stops.append(bool(shell.onecmd(line)))
    finally:
        session.close()
    print(json.dumps({"out": out.getvalue(), "err": err.getvalue(), "stops": stops}), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # the console's reactor thread is a daemon; do not wait on it
