"""Settings for server, node and console: command line > process environment > ``.env`` file.

One strict loader, so a typo in ``REMAP_PORT`` is one clear line at start-up rather than a
refused connection later. Nothing here touches ``os.environ``; callers may pass their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .errors import ConfigError

PREFIX = "REMAP_"
DEFAULT_PORT = 7878
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error", "critical")


class _Bad(Exception):
    """A value's problem, before we know which variable and source to blame."""


Converter = Callable[[Any], Any]


def _integer(low: int, high: int | None = None) -> Converter:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def convert(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise _Bad(f"expected an integer, got {value!r}")
        if number < low or (high is not None and number > high):
            raise _Bad(f"expected {expected}, got {value!r}")
        return number

    return convert


def _number(low: float, *, allow_equal: bool) -> Converter:
    expected = f"a number {'>=' if allow_equal else '>'} {low:g}"

    def convert(value: Any) -> float:
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Bad(f"expected a number, got {value!r}") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise _Bad(f"expected a number, got {value!r}")
        if not math.isfinite(number) or number < low or (number == low and not allow_equal):
            raise _Bad(f"expected {expected}, got {value!r}")
        return number

    return convert


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected text, got {value!r}")
    return value.strip()


def _bind_host(value: Any) -> str:
    host = _text(value)
    if any(ch.isspace() for ch in host):
        raise _Bad(f"expected a host name or IP address, got {value!r}")
    if ":" in host:
        if not _is_ipv6(host.strip("[]")):
            raise _Bad(
                f"expected a host without a port, got {value!r} (set the port with REMAP_PORT)"
            )
        return host.strip("[]")
    return host


def _server(value: Any) -> str:
    text = _text(value)
    try:
        parse_address(text)
    except ConfigError as exc:
        raise _Bad(str(exc)) from None
    return text


def _log_level(value: Any) -> str:
    level = _text(value).lower()
    level = {"warning": "warn", "fatal": "critical"}.get(level, level)
    if level not in LOG_LEVELS:
        raise _Bad(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _sync_level(value: Any) -> str:
    level = _text(value).lower()
    if level not in ("normal", "full"):
        raise _Bad(f"expected normal or full, got {value!r}")
    return level


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _Bad(f"expected true or false, got {value!r}")


_PORT = _integer(0, 65535)
_POSITIVE = _number(0, allow_equal=False)


def _setting(default: Any, who: str, convert: Converter, comment: str, secret: bool = False) -> Any:
    """A setting's field (a ``secret`` one stays out of the settings' repr)."""
    meta = {"who": who, "convert": convert, "comment": comment}
    return dataclasses.field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to find and trust its peers; defaults are safe on one machine.

    Each field is a setting: its default, who reads it (s server, n node, c console and Python
    API), its converter and its one-line comment; the order is the order of .env.example and of
    each program's --help."""

    # fmt: off
    host: str = _setting("127.0.0.1", "s", _bind_host, "address the server listens on; 0.0.0.0 or :: lets other machines in")
    port: int = _setting(DEFAULT_PORT, "s", _PORT, "port the server listens on (0 = any free port)")
    server: str | None = _setting(None, "nc", _server, "HOST:PORT of the server for nodes and the console; empty = the console runs its own cluster")
    secret: str | None = _setting(None, "snc", _text, "shared secret that servers, nodes and consoles prove to each other", secret=True)
    secret_file: str | None = _setting(None, "snc", _text, "file holding the secret instead (mode 0600: refused if group or others can read it); REMAP_SECRET_KEY wins")
    tls_cert: str | None = _setting(None, "snc", _text, "PEM certificate this process presents (turns TLS on; nodes and consoles too)")
    tls_key: str | None = _setting(None, "snc", _text, "PEM private key file for REMAP_TLS_CERT")
    tls_ca: str | None = _setting(None, "snc", _text, "PEM CA that signed the peers' certificates (verified both ways)")
    cores: int | None = _setting(None, "nc", _integer(1), "cores a node uses; empty = CPU count - 1, at least 1")
    core_start_timeout: float = _setting(60.0, "nc", _POSITIVE, "seconds a node's core process has to start (import remap and say it is ready); one that takes longer is killed and started again, and counts as a core that died at start (3 in a row: restarts back off)")
    group: str | None = _setting(None, "n", _text, "group a node belongs to; jobs may ask for a group")
    heartbeat_interval: float = _setting(2.0, "snc", _POSITIVE, "seconds between heartbeats")
    heartbeat_misses: int = _setting(3, "snc", _integer(1), "heartbeats missed in a row before a peer counts as lost")
    handshake_timeout: float = _setting(5.0, "snc", _POSITIVE, "seconds a new connection has to finish the handshake, and any connection its close (one whose peer has not taken what was queued, or sent no TLS close, by then is cut)")
    max_handshaking: int = _setting(64, "s", _integer(1), "connections the server lets be in the handshake at once, half of them only for addresses that authenticated before; one more is closed as soon as it is accepted, unread (authenticated nodes and consoles do not count)")
    max_handshaking_per_host: int = _setting(16, "s", _integer(1), "of those, how many may come from one IP address (raise it for many nodes or consoles behind one NAT address starting at once)")
    max_frame: int = _setting(256 * 1024 * 1024, "snc", _integer(1), "largest message in bytes accepted after authentication; a console, API client or node says its own to the server, which sends it nothing larger (a single result that cannot fit a console's is that argument's ResultTooLarge error; an argument or job function that fits no connected node's is ArgumentTooLarge or the job's failure)")
    console_grace: float = _setting(10.0, "s", _number(0, allow_equal=True), "seconds before the job of a lost console is cancelled")
    log_level: str = _setting("info", "snc", _log_level, "one of debug, info, warn, error, critical")
    task_output: bool = _setting(True, "c", _flag, "show what tasks print or log (stdout, stderr, logging) on the console and in the Python API, each line prefixed with its node and core")
    data_dir: str | None = _setting(None, "snc", _text, "data directory of file jobs, the same path on every node (NFS on a LAN); empty = ~/.remap/data")
    http_host: str = _setting("127.0.0.1", "s", _bind_host, "address the server's HTTP API and dashboard listen on")
    http_port: int | None = _setting(None, "sc", _PORT, "port of the HTTP API and dashboard; empty = no HTTP (0 = any free port)")
    http_token: str | None = _setting(None, "s", _text, "bearer token for the HTTP API; empty = derived from REMAP_SECRET_KEY", secret=True)
    http_hosts: str | None = _setting(None, "s", _text, "extra names browsers may use for the dashboard, comma-separated (IP addresses and localhost always work)")
    http_max_connections: int = _setting(256, "s", _integer(1), "connections the HTTP port holds open at once, half of them only for addresses that sent credentials before; one more is closed as soon as it is accepted")
    http_max_connections_per_host: int = _setting(32, "s", _integer(1), "of those, how many may come from one IP address")
    apps_dir: str | None = _setting(None, "s", _text, "directory of the functions jobs submitted over HTTP may run; empty = no submitting over HTTP")
    discovery: bool = _setting(True, "snc", _flag, "on: the server advertises itself on the LAN (mDNS) and a node or console with a secret but no REMAP_SERVER looks for it; off: neither")
    discovery_interfaces: str | None = _setting(None, "snc", _text, "interfaces discovery uses, by name or IPv4 address, comma-separated; empty = all")
    discovery_timeout: float = _setting(3.0, "nc", _POSITIVE, "seconds a node or console looks for its cluster's server before giving up")
    user: str | None = _setting(None, "c", _text, "name a console authenticates as, with the key `remap-server --issue-key NAME` printed in REMAP_SECRET_KEY; empty = the cluster secret itself (may do everything)")
    node_name: str | None = _setting(None, "n", _text, "name a node reports (status, exclude/include); empty = the machine's host name")
    state_dir: str | None = _setting(None, "s", _text, "directory where the server keeps what must outlive it (the excluded-node list, the journal, the addresses that authenticated); a local disk, never a network file system; empty = ~/.remap")
    preempt_grace: float | None = _setting(None, "s", _number(0, allow_equal=True), "seconds a job below its fair share waits before lower-priority jobs' running calls are killed and re-queued to make room; empty = no preemption")
    result_buffer: int = _setting(256 * 1024 * 1024, "c", _integer(0), "bytes of results the console and the Python API hold for a caller that takes them slowly (an imap read slowly, a slow output) before the server stops running that job's calls until it took some; 0 = no bound")
    journal: bool = _setting(True, "s", _flag, "on: the server records jobs and delivered results in REMAP_STATE_DIR/journal.sqlite, so a restarted server resumes detached jobs and keeps their results; off: a restart forgets every job")
    journal_sync: str = _setting("normal", "s", _sync_level, "normal: what was committed survives the server's crash (a power cut may lose the last moments); full: it survives a power cut too, at an fsync per commit")
    journal_keep_jobs: int = _setting(1000, "s", _integer(0), "finished jobs the journal keeps (with a detached job's results); older ones are pruned")
    journal_keep_hours: float = _setting(168.0, "s", _number(0, allow_equal=True), "hours a finished job stays in the journal at most")
    detached_results_memory: int = _setting(256 * 1024 * 1024, "s", _integer(1), "bytes of a detached job's results the server holds in memory for attach: with the journal on, those it has not committed yet (it keeps the rest on disk); off, all of them. A job that reaches it runs no more calls until they are committed (journal off: it waits, its results kept, until killed; attach still gets them)")
    detached_results_memory_total: int = _setting(1024 * 1024 * 1024, "s", _integer(1), "the same bound over all detached jobs, finished ones included")
    detached_results_keep_hours: float = _setting(1.0, "s", _number(0, allow_equal=True), "with REMAP_JOURNAL off: hours a finished detached job's results stay in the server's memory for attach (counted in REMAP_DETACHED_RESULTS_MEMORY_TOTAL meanwhile, so they hold new detached jobs back at most this long); then they are dropped and attach and status say so. With the journal they are on disk (REMAP_JOURNAL_KEEP_HOURS)")
    # fmt: on


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
#: setting field -> environment variable: ``REMAP_`` and its name in capitals (the secret's
#: is REMAP_SECRET_KEY)
ENV_VARS: dict[str, str] = {name: PREFIX + name.upper() for name in _FIELDS}
ENV_VARS["secret"] = "REMAP_SECRET_KEY"
_FIELD_OF: dict[str, str] = {variable: name for name, variable in ENV_VARS.items()}

#: (variable, default as text, one-line comment), in the order .env.example lists them
ENV_DOC: list[tuple[str, str, str]] = [
    (ENV_VARS[name], "" if f.default is None else str(f.default), f.metadata["comment"])
    for name, f in _FIELDS.items()
]

_SECRET_HINT = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'


def env_file_candidates(job_file: str | Path | None = None) -> list[Path]:
    """Where a ``.env`` is looked for, in order; the first that exists is read, and only it.

    The current directory, then next to the job file (so a project's jobs find its secret
    from anywhere), then ``~/.remap/.env`` (one file for every project of this user).
    """
    places = [Path(".env")]
    if job_file is not None:
        places.append(Path(job_file).parent / ".env")
    places.append(Path(os.path.expanduser("~")) / ".remap" / ".env")
    unique: list[Path] = []
    for place in places:
        if all(place.resolve() != seen.resolve() for seen in unique):
            unique.append(place)
    return unique


def locate_env_file(
    explicit: str | Path | None, job_file: str | Path | None = None
) -> tuple[Path | None, list[Path]]:
    """The ``.env`` to read (``explicit`` if given, else the first candidate that exists) and
    every place looked, for an error that has to say where the secret was not found.

    A file named explicitly must exist: a mistyped ``--env-file`` would otherwise read nothing
    and run somewhere else than meant (on an embedded cluster, say). ``/dev/null`` reads none."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ConfigError(
                f"--env-file {explicit}: no such file (--env-file /dev/null reads none)"
            )
        return path, [path]
    candidates = env_file_candidates(job_file)
    return next((p for p in candidates if p.is_file()), None), candidates


def env_search_text(searched: Sequence[Path]) -> str:
    """Where a ``.env`` was looked for, in order, for the "no secret configured" error."""
    if not searched:
        return "no .env file was read"
    places = []
    for path in searched:
        state = "read, no REMAP_SECRET_KEY" if path.exists() else "missing"
        places.append(f"{path.absolute()} ({state})")
    return "looked for .env in order: " + ", ".join(places)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
    warn: Callable[[str], None] = _warn,
    overrides_from: str = "command line",
) -> Settings:
    """Merge the three sources, validating every value given, wherever it was given.

    ``overrides`` are keyed by field name; None values are skipped so unset flags do not hide
    the environment. ``environ=None`` reads ``os.environ``; ``dotenv_path=None`` reads no file;
    ``overrides_from`` names the overrides' source in errors. An unknown ``REMAP_*`` variable
    is an error in a ``.env`` file (written for remap) but only a warning in the environment,
    which other tools share.
    """
    chosen: dict[str, Any] = {}
    if dotenv_path is not None:
        path = Path(dotenv_path)
        values = dotenv_values(path)
        for variable, value in values.items():
            if variable.startswith(PREFIX):
                line = _dotenv_line(path, variable)
                label = f"{variable} from {path}:{line}" if line else f"{variable} from {path}"
                _take(chosen, variable, value, label)
        _warn_if_readable(path, [v for v in _SECRET_VARS if values.get(v)], warn)
    env = os.environ if environ is None else environ
    for variable, value in env.items():
        if variable.startswith(PREFIX):
            label = f"{variable} from environment"
            if variable not in _FIELD_OF:
                warn(f"{label}: {_unknown(variable)}; ignored")
                continue
            _take(chosen, variable, value, label)
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, list(_FIELDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"setting '{name}' from {overrides_from}: unknown setting{hint}")
        _take(chosen, ENV_VARS[name], value, f"setting '{name}' from {overrides_from}")
    if chosen.get("secret_file") and not chosen.get("secret"):
        chosen["secret"] = read_secret_file(chosen["secret_file"])
    return Settings(**chosen)


#: the variables whose value lets its holder run code on the cluster
_SECRET_VARS = ("REMAP_SECRET_KEY", "REMAP_HTTP_TOKEN")


def _warn_if_readable(path: Path, secrets: list[str], warn: Callable[[str], None]) -> None:
    """A ``.env`` holding a secret that other users can read gets a warning (a secret file is
    refused for that; a ``.env`` is often made by ``echo >>`` under a umask of 022)."""
    if not secrets:
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        warn(
            f"{path} holds {' and '.join(secrets)} and others can read it "
            f"(mode {mode & 0o777:04o}); run: chmod 600 {path}"
        )


def read_secret_file(path: str) -> str:
    """The secret in ``path``, which only its owner may read (like ssh's private keys)."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"REMAP_SECRET_FILE: cannot read {file}: {exc}") from None
    if mode & 0o077:
        raise ConfigError(
            f"REMAP_SECRET_FILE: {file} can be read by others (mode {mode & 0o777:04o}); "
            f"run: chmod 600 {file}"
        )
    if not text:
        raise ConfigError(f"REMAP_SECRET_FILE: {file} is empty")
    return text


def _take(chosen: dict[str, Any], variable: str, value: Any, label: str) -> None:
    """Convert one value and let it win over earlier (lower-precedence) sources."""
    name = _FIELD_OF.get(variable)
    if name is None:
        raise ConfigError(f"{label}: {_unknown(variable)}")
    if value is None or (isinstance(value, str) and not value.strip()):
        return  # unset: an empty line in .env or an argparse default must not clobber
    try:
        chosen[name] = _FIELDS[name].metadata["convert"](value)
    except _Bad as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _unknown(variable: str) -> str:
    close = difflib.get_close_matches(variable, list(_FIELD_OF), n=1)
    return "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")


def _dotenv_line(path: Path, variable: str) -> int | None:
    """The line that set ``variable`` (the last one, as python-dotenv keeps the last)."""
    pattern = re.compile(rf"^\s*(?:export\s+)?{re.escape(variable)}\s*=")
    found = None
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if pattern.match(line):
                    found = number
    except (OSError, UnicodeDecodeError):
        return None
    return found


def secret_bytes(settings: Settings) -> bytes | None:
    """The shared secret as the bytes the handshake's HMAC uses, or None when unset."""
    return settings.secret.encode("utf-8") if settings.secret else None


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``HOST`` or ``[IPv6]:PORT``; bare IPv6 is refused as ambiguous."""
    raw = text.strip()
    if not raw:
        raise ConfigError("empty address; expected HOST:PORT")
    if "://" in raw:
        raise ConfigError(f"address {text!r}: expected HOST:PORT without a scheme")
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ConfigError(f"address {text!r}: missing ']' after the IPv6 address")
        host, rest = raw[1:end], raw[end + 1 :]
        if not _is_ipv6(host):
            raise ConfigError(f"address {text!r}: {host!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"address {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif raw.count(":") > 1:
        example = f"[{raw}]:{default_port}" if _is_ipv6(raw) else f"[::1]:{default_port}"
        raise ConfigError(f"address {text!r}: put an IPv6 address in brackets, like {example!r}")
    else:
        host, colon, port_text = raw.partition(":")
        if not colon:
            port_text = None
        if not host:
            raise ConfigError(f"address {text!r}: missing host before ':'")
        if any(ch.isspace() for ch in host):
            raise ConfigError(f"address {text!r}: host contains a space")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True when ``host`` can only be reached from this machine (no secret needed there)."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def env_example_text() -> str:
    """The text of ``.env.example``, generated from :data:`ENV_DOC` so the two cannot drift."""
    lines = [
        "# remap settings. Copy this file to .env and uncomment what you change.",
        "# Precedence: command-line flags > process environment > .env file.",
        "# Generated from ENV_DOC in remap/settings.py by `python -m remap.settings`; edit there.",
    ]
    for variable, default, comment in ENV_DOC:
        lines.append("")
        lines.append(f"# {comment}")
        if variable == ENV_VARS["secret"]:
            lines.append(f"# {_SECRET_HINT}")
            lines.append(f"{variable}=")
        else:
            lines.append(f"# {variable}={default}")
    return "\n".join(lines) + "\n"


def settings_help(program: str) -> str:
    """The end of ``program``'s ``--help`` (server, node or console): the settings it reads,
    from the table, so the two cannot drift."""
    lines = ["settings (environment or .env; a flag wins), with their defaults:"]
    for f, (variable, default, comment) in zip(_FIELDS.values(), ENV_DOC):
        if program[0] in f.metadata["who"]:
            lines.append(f"  {variable}={default}")
            lines += textwrap.wrap(comment, 79, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_example_text(), end="")
