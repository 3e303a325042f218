"""Where the cluster's shared secret comes from, and the safe-bind rule."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from twisted.logger import Logger

from .errors import ConfigError
from .settings import Settings, is_loopback, secret_bytes

GENERATE_HINT = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
#: a secret shorter than this on a server others can reach is warned about (token_urlsafe(32)
#: gives 43 characters)
MIN_SECRET = 16

log = Logger()


class SecretMissing(ConfigError):
    """No shared secret anywhere this process looked."""


def default_secret_file() -> Path:
    return Path(os.path.expanduser("~")) / ".remap" / "secret"


def server_secret(settings: Settings, host: str) -> bytes:
    """The server's secret; a loopback-only server without one makes a private one in ~/.remap
    (one reachable from the network must have an explicit secret: nodes run what it sends)."""
    key = secret_bytes(settings)
    if key:
        if len(key) < MIN_SECRET and not is_loopback(host):
            log.warn(
                "REMAP_SECRET_KEY is only {n} characters and this server is reachable from the "
                "network: whoever guesses it runs code on your nodes; generate one with {hint}",
                n=len(key),
                hint=GENERATE_HINT,
            )
        return key
    if not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without a secret: anyone who can reach it could run "
            f"code on your nodes. Set REMAP_SECRET_KEY (in .env or the environment) to the same "
            f"value on the server, every node and the console; generate one with {GENERATE_HINT}"
        )
    path = default_secret_file()
    key = _read_private(path)
    if key is not None:
        return key
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    return token


def client_secret(settings: Settings) -> bytes:
    """A node's or console's secret: the setting, else the local server's private file."""
    key = secret_bytes(settings)
    if key:
        return key
    path = default_secret_file()
    key = _read_private(path)
    if key is None:
        raise SecretMissing(
            f"no secret configured: REMAP_SECRET_KEY is not set and there is no {path} (made by "
            f"a server on this machine); set REMAP_SECRET_KEY to the server's secret, in the "
            f"environment or a .env file (generate one with {GENERATE_HINT})"
        )
    return key


def _read_private(path: Path) -> bytes | None:
    """The secret in ``~/.remap/secret`` (None: no such file), held to REMAP_SECRET_FILE's rules:
    not readable by others, and not empty (the empty secret is one everybody knows)."""
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path} can be read by others (mode {mode & 0o777:04o}); run: chmod 600 {path}"
        )
    if not key:
        raise ConfigError(
            f"{path} is empty: remove it (a server on this machine then makes a new one) or "
            "set REMAP_SECRET_KEY"
        )
    return key
