"""Services: the printed systemd units, and the secret read from an owner-only file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remap.errors import ConfigError
from remap.node.main import main as node_main
from remap.server.main import main as server_main
from remap.settings import load_settings
from remap.systemd import unit_text


@pytest.mark.parametrize("role, main", [("server", server_main), ("node", node_main)])
def test_print_systemd_unit(role, main, capsys) -> None:
    """--print-systemd-unit prints a unit that reruns the same flags, restarts on failure and
    reads the secret from a file; nothing starts (no reactor, no socket)."""
    assert main(["--port" if role == "server" else "--cores", "3", "--print-systemd-unit"]) == 0
    text = capsys.readouterr().out
    (exec_line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert f"remap-{role}" in exec_line or f"remap.{role}.main" in exec_line
    assert exec_line.endswith(" 3") and "--print-systemd-unit" not in exec_line
    for line in ("Restart=on-failure", "Environment=REMAP_SECRET_FILE=/etc/remap/secret"):
        assert line in text.splitlines()
    assert ("StateDirectory=remap" in text) == (role == "server")
    assert ("StateDirectoryMode=0700" in text) == (role == "server")  # the journal is private
    assert "[Install]\nWantedBy=multi-user.target" in text


def test_unit_quotes_arguments() -> None:
    """A flag value with a space stays one argument in ExecStart."""
    text = unit_text("node", ["--group", "big box"], user="remap")
    assert "'big box'" in text and "User=remap" in text


def test_secret_file_must_be_owner_only(tmp_path: Path) -> None:
    """REMAP_SECRET_FILE: read when 0600; refused (with the chmod to run) when others may
    read it; an empty or missing file is one clear error; REMAP_SECRET_KEY wins over it."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    env = {"REMAP_SECRET_FILE": str(secret)}
    assert load_settings(environ=env, dotenv_path=None).secret == "s3cret"
    both = {**env, "REMAP_SECRET_KEY": "direct"}
    assert load_settings(environ=both, dotenv_path=None).secret == "direct"
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=rf"mode 0644\); run: chmod 600 {secret}"):
        load_settings(environ=env, dotenv_path=None)
    secret.write_text("")
    os.chmod(secret, 0o600)
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(environ=env, dotenv_path=None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(environ={"REMAP_SECRET_FILE": str(tmp_path / "no")}, dotenv_path=None)
