"""systemd units for ``remap-server`` and ``remap-node``: ``--print-systemd-unit`` writes one.

The unit runs the same program with the same flags, as the user who printed it, restarts it
when it fails (a node that found no server yet tries again), and reads the secret from a file
only its owner can read (``REMAP_SECRET_FILE``, refused when group or others may read it).
"""

from __future__ import annotations

import getpass
import shlex
import shutil
import sys
from pathlib import Path

SECRET_FILE = "/etc/remap/secret"

_WHAT = {
    "server": "remap server (nodes and consoles connect here)",
    "node": "remap node (runs tasks on this machine's cores)",
}


def _program(role: str) -> list[str]:
    """The installed entry point next to this interpreter, else the interpreter running it."""
    script = Path(sys.executable).parent / f"remap-{role}"
    if script.is_file():
        return [str(script)]
    found = shutil.which(f"remap-{role}")
    if found:
        return [found]
    return [sys.executable, "-c", f"from remap.{role}.main import run; run()"]


def unit_text(role: str, args: list[str], *, user: str | None = None) -> str:
    """The unit file for ``role`` (server or node) started with ``args``."""
    command = shlex.join(_program(role) + args)
    state = (
        "Environment=REMAP_STATE_DIR=%S/remap\nStateDirectory=remap\nStateDirectoryMode=0700\n"
        if role == "server"
        else ""
    )
    return f"""\
# {_WHAT[role]} as a systemd service. Install (as root):
#   install -d -m 755 /etc/remap
#   install -m 600 -o {user or getpass.getuser()} /dev/null {SECRET_FILE}
#   echo 'THE SECRET' > {SECRET_FILE}     # the same secret on every machine
#   remap-{role} ... --print-systemd-unit > /etc/systemd/system/remap-{role}.service
#   systemctl daemon-reload && systemctl enable --now remap-{role}
[Unit]
Description={_WHAT[role]}
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={user or getpass.getuser()}
WorkingDirectory=~
Environment=REMAP_SECRET_FILE={SECRET_FILE}
{state}ExecStart={command}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def unit_args(argv: list[str] | None) -> list[str]:
    """The command's flags, less the one that asked for the unit."""
    return [a for a in (sys.argv[1:] if argv is None else argv) if a != "--print-systemd-unit"]
