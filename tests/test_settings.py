"""Tests for remap.settings: precedence, conversion, strict errors, addresses, .env.example.

Every test passes an explicit ``environ`` dict and a temporary ``.env`` (or none), so the
developer's own environment and ``.env`` never leak in.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remap.errors import ConfigError
from remap.settings import (
    ENV_DOC,
    ENV_VARS,
    Settings,
    env_example_text,
    env_search_text,
    is_loopback,
    load_settings,
    locate_env_file,
    parse_address,
    secret_bytes,
    settings_help,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / ".env.example"


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_source() -> None:
    """With no overrides, an empty environment and no .env, every field has its default."""
    assert load_settings(environ={}, dotenv_path=None) == Settings()


@pytest.mark.parametrize(
    ("variable", "text", "field", "expected"),
    [
        ("REMAP_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("REMAP_HOST", "::", "host", "::"),
        ("REMAP_HOST", "[::1]", "host", "::1"),
        ("REMAP_PORT", "9000", "port", 9000),
        ("REMAP_PORT", "0", "port", 0),
        ("REMAP_PORT", " 65535 ", "port", 65535),
        ("REMAP_SERVER", "10.0.0.5:7878", "server", "10.0.0.5:7878"),
        ("REMAP_SERVER", "[::1]:7000", "server", "[::1]:7000"),
        ("REMAP_SECRET_KEY", "s3cret", "secret", "s3cret"),
        ("REMAP_TLS_CERT", "/etc/remap/cert.pem", "tls_cert", "/etc/remap/cert.pem"),
        ("REMAP_TLS_KEY", "key.pem", "tls_key", "key.pem"),
        ("REMAP_TLS_CA", "ca.pem", "tls_ca", "ca.pem"),
        ("REMAP_CORES", "4", "cores", 4),
        ("REMAP_GROUP", "gpu", "group", "gpu"),
        ("REMAP_HEARTBEAT_INTERVAL", "0.5", "heartbeat_interval", 0.5),
        ("REMAP_HEARTBEAT_INTERVAL", "3", "heartbeat_interval", 3.0),
        ("REMAP_HEARTBEAT_MISSES", "5", "heartbeat_misses", 5),
        ("REMAP_HANDSHAKE_TIMEOUT", "1.5", "handshake_timeout", 1.5),
        ("REMAP_MAX_FRAME", "1048576", "max_frame", 1048576),
        ("REMAP_MAX_HANDSHAKING", "128", "max_handshaking", 128),
        ("REMAP_MAX_HANDSHAKING_PER_HOST", "200", "max_handshaking_per_host", 200),
        ("REMAP_HTTP_MAX_CONNECTIONS", "1000", "http_max_connections", 1000),
        ("REMAP_HTTP_MAX_CONNECTIONS_PER_HOST", "4", "http_max_connections_per_host", 4),
        ("REMAP_CONSOLE_GRACE", "0", "console_grace", 0.0),
        ("REMAP_LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("REMAP_LOG_LEVEL", "warning", "log_level", "warn"),
        ("REMAP_JOURNAL_SYNC", " FULL ", "journal_sync", "full"),
        ("REMAP_JOURNAL", "off", "journal", False),
        ("REMAP_TASK_OUTPUT", "Yes", "task_output", True),
    ],
)
def test_environment_values_are_converted(
    variable: str, text: str, field: str, expected: Any
) -> None:
    """Each variable reaches its field with the field's type, not as the raw string."""
    settings = load_settings(environ={variable: text}, dotenv_path=None)
    value = getattr(settings, field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"REMAP_PORT": "abc"}, "REMAP_PORT from environment: expected an integer, got 'abc'"),
        ({"REMAP_PORT": "1.5"}, "REMAP_PORT from environment: expected an integer, got '1.5'"),
        ({"REMAP_PORT": "70000"}, "REMAP_PORT from environment: expected an integer from 0 to 65535"),
        ({"REMAP_PORT": "-1"}, "REMAP_PORT from environment: expected an integer from 0 to 65535"),
        ({"REMAP_PORT": "65536"}, "REMAP_PORT from environment: expected an integer from 0"),
        ({"REMAP_CORES": "0"}, "REMAP_CORES from environment: expected an integer >= 1, got '0'"),
        ({"REMAP_HEARTBEAT_MISSES": "0"}, "REMAP_HEARTBEAT_MISSES from environment: expected an integer >= 1"),
        ({"REMAP_MAX_FRAME": "lots"}, "REMAP_MAX_FRAME from environment: expected an integer"),
        ({"REMAP_HEARTBEAT_INTERVAL": "0"}, "REMAP_HEARTBEAT_INTERVAL from environment: expected a number > 0, got '0'"),
        ({"REMAP_HEARTBEAT_INTERVAL": "-2"}, "REMAP_HEARTBEAT_INTERVAL from environment: expected a number > 0"),
        ({"REMAP_HEARTBEAT_INTERVAL": "inf"}, "REMAP_HEARTBEAT_INTERVAL from environment: expected a number > 0"),
        ({"REMAP_HANDSHAKE_TIMEOUT": "soon"}, "REMAP_HANDSHAKE_TIMEOUT from environment: expected a number, got 'soon'"),
        ({"REMAP_CONSOLE_GRACE": "-1"}, "REMAP_CONSOLE_GRACE from environment: expected a number >= 0"),
        ({"REMAP_LOG_LEVEL": "loud"}, "REMAP_LOG_LEVEL from environment: expected one of debug, info, warn, error, critical"),
        ({"REMAP_SERVER": "::1"}, "REMAP_SERVER from environment: address '::1': put an IPv6 address in brackets"),
        ({"REMAP_SERVER": "host:port"}, "REMAP_SERVER from environment: address 'host:port': port must be a number"),
        ({"REMAP_HOST": "0.0.0.0:7878"}, "REMAP_HOST from environment: expected a host without a port"),
        ({"REMAP_HOST": "my host"}, "REMAP_HOST from environment: expected a host name or IP address, got 'my host'"),
        ({"REMAP_JOURNAL_SYNC": "always"}, "REMAP_JOURNAL_SYNC from environment: expected normal or full, got 'always'"),
        ({"REMAP_JOURNAL": "maybe"}, "REMAP_JOURNAL from environment: expected true or false, got 'maybe'"),
    ],
)  # fmt: skip
def test_bad_environment_value_names_variable_and_source(
    environ: dict[str, str], expected: str
) -> None:
    """A bad or unknown variable is a ConfigError naming the variable, its source and the problem."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ, dotenv_path=None)
    assert expected in str(info.value)


def test_unknown_environment_variable_only_warns() -> None:
    """Another tool's REMAP_* variable in the environment is a warning naming it, not an error
    (the environment is shared); the known ones still apply."""
    warnings: list[str] = []
    settings = load_settings(
        environ={"REMAP_PROT": "7878", "REMAP_SECRET": "x", "REMAP_PORT": "9000"},
        dotenv_path=None,
        warn=warnings.append,
    )
    assert settings.port == 9000
    assert warnings == [
        "REMAP_PROT from environment: unknown setting (did you mean REMAP_PORT?); ignored",
        "REMAP_SECRET from environment: unknown setting (did you mean REMAP_SECRET_KEY?); ignored",
    ]


def test_env_file_is_looked_for_here_then_next_to_the_job_then_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --env-file: ./.env wins, else the job file's directory, else ~/.remap/.env; every
    place looked is returned, in order. An explicit file is the only one."""
    here, project, home = tmp_path / "here", tmp_path / "project", tmp_path / "home"
    for d in (here, project, home / ".remap"):
        d.mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    job = project / "job.yaml"
    expected = [Path(".env"), project / ".env", home / ".remap" / ".env"]
    assert locate_env_file(None, job) == (None, expected)
    (home / ".remap" / ".env").write_text("REMAP_PORT=1\n")
    assert locate_env_file(None, job)[0] == home / ".remap" / ".env"
    (project / ".env").write_text("REMAP_PORT=2\n")
    assert locate_env_file(None, job)[0] == project / ".env"
    assert locate_env_file(None)[0] == home / ".remap" / ".env", "no job: not the project's"
    (here / ".env").write_text("REMAP_PORT=3\n")
    found, searched = locate_env_file(None, job)
    assert found == Path(".env") and searched == expected
    assert load_settings(environ={}, dotenv_path=found).port == 3
    (here / "other.env").write_text("REMAP_PORT=4\n")
    assert locate_env_file("other.env", job) == (Path("other.env"), [Path("other.env")])
    assert locate_env_file(None, here / "job.yaml")[1] == [Path(".env"), home / ".remap" / ".env"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"port": "abc"}, "setting 'port' from command line: expected an integer, got 'abc'"),
        ({"port": True}, "setting 'port' from command line: expected an integer, got True"),
        ({"port": 99999}, "setting 'port' from command line: expected an integer from 0 to 65535"),
        ({"cores": 0}, "setting 'cores' from command line: expected an integer >= 1"),
        ({"max_handshaking_per_host": 0}, "setting 'max_handshaking_per_host' from command line: expected an integer >= 1"),
        ({"heartbeat_interval": 0.0}, "setting 'heartbeat_interval' from command line: expected a number > 0"),
        ({"group": 5}, "setting 'group' from command line: expected text, got 5"),
        ({"handshake_timeout": [1]}, "setting 'handshake_timeout' from command line: expected a number, got [1]"),
        ({"journal": 1}, "setting 'journal' from command line: expected text, got 1"),
        ({"prot": 1}, "setting 'prot' from command line: unknown setting (did you mean 'port'?)"),
    ],
)  # fmt: skip
def test_bad_override_names_setting_and_source(overrides: dict[str, Any], expected: str) -> None:
    """Overrides are validated like text, and typed values of the wrong type are refused too."""
    with pytest.raises(ConfigError) as info:
        load_settings(overrides, environ={}, dotenv_path=None)
    assert expected in str(info.value)


def test_typed_overrides_keep_their_values() -> None:
    """The Python API passes settings as Python values: a bool flag and a number are taken as
    they are (an int where a float is expected becomes the float)."""
    settings = load_settings(
        {"task_output": True, "journal": False, "handshake_timeout": 2},
        environ={},
        dotenv_path=None,
    )
    assert (settings.task_output, settings.journal) == (True, False)
    assert settings.handshake_timeout == 2.0 and type(settings.handshake_timeout) is float


def test_the_no_secret_error_says_where_a_dotenv_was_looked_for(tmp_path: Path) -> None:
    """The "no secret" line lists every .env place in order, read (without a secret) or
    missing; none at all is said too."""
    (tmp_path / "read.env").write_text("REMAP_PORT=1\n")
    text = env_search_text([tmp_path / "read.env", tmp_path / "gone.env"])
    assert text == (
        f"looked for .env in order: {tmp_path / 'read.env'} (read, no REMAP_SECRET_KEY), "
        f"{tmp_path / 'gone.env'} (missing)"
    )
    assert env_search_text([]) == "no .env file was read"


def test_bad_dotenv_value_names_file_and_line(tmp_path: Path) -> None:
    """An error in .env names the variable, the file and the line that set it."""
    path = write_env(tmp_path, "# comment\nOTHER_TOOL=1\n\nREMAP_PORT=eighty\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, dotenv_path=path)
    assert f"REMAP_PORT from {path}:4: expected an integer, got 'eighty'" in str(info.value)


def test_unknown_dotenv_variable_is_an_error(tmp_path: Path) -> None:
    """A misspelt REMAP_ variable in .env is reported with a suggestion, not silently ignored."""
    path = write_env(tmp_path, "REMAP_HEARTBEAT=3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, dotenv_path=path)
    assert f"REMAP_HEARTBEAT from {path}:1: unknown setting (did you mean" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "environ", "dotenv", "expected_port"),
    [
        (None, {}, "", 7878),
        (None, {}, "REMAP_PORT=1001\n", 1001),
        (None, {"REMAP_PORT": "1002"}, "REMAP_PORT=1001\n", 1002),
        ({"port": 1003}, {"REMAP_PORT": "1002"}, "REMAP_PORT=1001\n", 1003),
        ({"port": 1003}, {}, "REMAP_PORT=1001\n", 1003),
        ({"port": "1004"}, {"REMAP_PORT": "1002"}, "", 1004),
        ({"port": None}, {"REMAP_PORT": "1002"}, "REMAP_PORT=1001\n", 1002),
        ({"port": None}, {}, "REMAP_PORT=1001\n", 1001),
        (None, {"REMAP_PORT": ""}, "REMAP_PORT=1001\n", 1001),
        (None, {}, "REMAP_PORT=\n", 7878),
    ],
)
def test_precedence_overrides_then_environment_then_dotenv(
    tmp_path: Path,
    overrides: dict[str, Any] | None,
    environ: dict[str, str],
    dotenv: str,
    expected_port: int,
) -> None:
    """Overrides beat the environment, which beats .env; None overrides and empty values are unset."""
    path = write_env(tmp_path, dotenv)
    assert load_settings(overrides, environ=environ, dotenv_path=path).port == expected_port


def test_sources_merge_per_setting(tmp_path: Path) -> None:
    """Precedence is per setting: each source can supply different fields of one Settings."""
    path = write_env(tmp_path, "REMAP_CORES=2\nREMAP_GROUP=lab\nexport REMAP_LOG_LEVEL=error\n")
    settings = load_settings(
        {"group": "override", "cores": None},
        environ={"REMAP_CORES": "6", "PATH": "/bin"},
        dotenv_path=path,
    )
    assert (settings.cores, settings.group, settings.log_level) == (6, "override", "error")


def test_dotenv_none_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dotenv_path=None ignores a .env in the working directory; the default path reads it."""
    write_env(tmp_path, "REMAP_PORT=1234\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}, dotenv_path=None).port == 7878
    assert load_settings(environ={}).port == 1234


def test_missing_dotenv_file_is_not_an_error(tmp_path: Path) -> None:
    """A .env is optional: a path that does not exist simply contributes nothing."""
    assert load_settings(environ={}, dotenv_path=tmp_path / "absent.env") == Settings()


def test_load_settings_does_not_touch_os_environ(tmp_path: Path) -> None:
    """Reading .env must not export its values into this process's environment."""
    path = write_env(tmp_path, "REMAP_GROUP=leak-check-7f3a\n")
    load_settings(environ={}, dotenv_path=path)
    assert os.environ.get("REMAP_GROUP") != "leak-check-7f3a"


@pytest.mark.parametrize(
    ("secret", "expected"),
    [(None, None), ("abc", b"abc"), ("pässwörd", "pässwörd".encode())],
)
def test_secret_bytes(secret: str | None, expected: bytes | None) -> None:
    """The secret becomes UTF-8 bytes for the HMAC, and an unset secret stays None."""
    assert secret_bytes(Settings(secret=secret)) == expected


def test_secret_is_not_in_repr() -> None:
    """Settings are logged; their repr must not reveal the shared secret."""
    assert "hunter2" not in repr(Settings(secret="hunter2"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org:9000", ("example.org", 9000)),
        ("example.org", ("example.org", 7878)),
        ("  10.1.2.3:80 ", ("10.1.2.3", 80)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 7878)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, bare HOST (default port) and bracketed IPv6 are all understood."""
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::1", "put an IPv6 address in brackets, like '[::1]:7878'"),
        ("fe80::1:7878", "put an IPv6 address in brackets"),
        ("", "empty address"),
        (":7878", "missing host"),
        ("host:", "port must be a number"),
        ("host:70000", "port must be a number from 0 to 65535"),
        ("host:-1", "port must be a number"),
        ("[::1", "missing ']'"),
        ("[nothost]:80", "is not an IPv6 address"),
        ("[::1]80", "expected ':PORT' after ']'"),
        ("tcp://host:80", "without a scheme"),
        ("my host:80", "host contains a space"),
    ],
)
def test_parse_address_rejects(text: str, expected: str) -> None:
    """Malformed addresses, and bare IPv6 (ambiguous with a port), are clear ConfigErrors."""
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert expected in str(info.value)


def test_parse_address_default_port() -> None:
    """The caller's default port is used when the text has none."""
    assert parse_address("box", default_port=1) == ("box", 1)


@given(
    host=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    ),
    port=st.integers(min_value=0, max_value=65535),
)
def test_parse_address_round_trips(host: str, port: int) -> None:
    """Any host and port, formatted the documented way (brackets for IPv6), parse back exactly."""
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("192.168.1.2", False),
        ("example.org", False),
        ("localhost.example.org", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    """Only addresses that never leave this machine count as loopback."""
    assert is_loopback(host) is expected


# --- .env.example ---------------------------------------------------------------------------------


def example_variables() -> dict[str, str]:
    """Variables .env.example mentions, commented out or not, with their example values."""
    found: dict[str, str] = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        body = line.removeprefix("#").strip()
        if body.startswith("REMAP_") and "=" in body:
            variable, _, value = body.partition("=")
            found[variable.strip()] = value.strip()
    return found


def test_env_example_lists_exactly_the_settings_fields() -> None:
    """.env.example and ENV_DOC name one variable per Settings field, no more and no fewer."""
    expected = {ENV_VARS[f.name] for f in dataclasses.fields(Settings)}
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(Settings)}
    assert set(example_variables()) == expected
    assert [variable for variable, _, _ in ENV_DOC] == list(example_variables())


def test_env_example_is_generated_from_env_doc() -> None:
    """The checked-in file equals the generator's output, so comments and defaults cannot drift."""
    assert EXAMPLE.read_text(encoding="utf-8") == env_example_text()


def test_env_example_has_no_secret_and_says_how_to_make_one() -> None:
    """The example ships no secret value, and tells the user how to generate one."""
    text = EXAMPLE.read_text(encoding="utf-8")
    assert example_variables()["REMAP_SECRET_KEY"] == ""
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in text


def test_env_example_as_dotenv_gives_defaults() -> None:
    """Copied unchanged to .env, the example loads and changes nothing: its values are safe."""
    assert load_settings(environ={}, dotenv_path=EXAMPLE) == Settings()


def test_every_setting_is_in_some_programs_help() -> None:
    """Each setting is read by the server, a node or the console, so one of their --help texts
    lists it, as ``NAME=DEFAULT`` (the default as .env.example writes it)."""
    listed = "\n".join(settings_help(program) for program in ("server", "node", "console"))
    for variable, default, _ in ENV_DOC:
        assert f"\n  {variable}={default}\n" in listed, variable


def test_env_doc_defaults_match_settings() -> None:
    """Each documented default is the dataclass default, written as text."""
    defaults = {ENV_VARS[f.name]: f.default for f in dataclasses.fields(Settings)}
    for variable, text, comment in ENV_DOC:
        default = defaults[variable]
        assert text == ("" if default is None else str(default))
        assert comment and "\n" not in comment


def test_a_short_secret_on_a_reachable_server_is_warned_about() -> None:
    """``REMAP_SECRET_KEY=short`` on ``--host 0.0.0.0`` was taken silently, though anyone who
    guesses it runs code on the nodes: the server warns, saying how to make a strong one; a
    strong secret, or a short one on loopback, says nothing."""
    from twisted.logger import capturedLogs

    from remap.auth import server_secret

    for secret, host, warned in (
        ("short", "0.0.0.0", True),
        ("x" * 43, "0.0.0.0", False),
        ("short", "127.0.0.1", False),
    ):
        with capturedLogs() as events:
            assert server_secret(Settings(secret=secret), host) == secret.encode()
        said = [e for e in events if "REMAP_SECRET_KEY is only" in e.get("log_format", "")]
        assert bool(said) == warned, (secret, host)
        if warned:
            assert said[0]["n"] == 5 and "token_urlsafe(32)" in said[0]["hint"]


def test_the_default_secret_file_must_be_private_and_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~/.remap/secret`` empty (a server stopped between making and writing it) was the empty
    secret: the server ran with an HTTP token anyone can compute and failed every handshake
    with a traceback. Empty or readable by others, it is one clear error for the server and
    its clients, as REMAP_SECRET_FILE is; a private one is read, a missing one made 0600."""
    from remap.auth import SecretMissing, client_secret, default_secret_file, server_secret

    monkeypatch.setenv("HOME", str(tmp_path))
    path = default_secret_file()
    assert path.parent.parent == tmp_path
    with pytest.raises(SecretMissing):
        client_secret(Settings())
    made = server_secret(Settings(), "127.0.0.1")
    assert len(made) >= 43 and path.stat().st_mode & 0o777 == 0o600
    assert client_secret(Settings()) == made
    for text, mode, problem in (("", 0o600, "is empty"), (" \n", 0o600, "is empty"),
                                ("s3cret-value", 0o644, "can be read by others")):  # fmt: skip
        path.write_text(text)
        path.chmod(mode)
        for read in (lambda: server_secret(Settings(), "127.0.0.1"),
                     lambda: client_secret(Settings())):  # fmt: skip
            with pytest.raises(ConfigError, match=problem):
                read()


def test_an_env_file_named_explicitly_must_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped ``--env-file`` is one error line and exit 2, not a run with no settings (on an
    embedded cluster instead of the server it names); ``/dev/null`` is how to read none."""
    from remap.console.main import main

    missing = tmp_path / "prod.evn"
    with pytest.raises(ConfigError, match="no such file"):
        locate_env_file(str(missing))
    assert locate_env_file(os.devnull)[0] == Path(os.devnull)
    assert main(["--env-file", str(missing), "status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --env-file {missing}: no such file (--env-file /dev/null reads none)"]


@pytest.mark.parametrize("address", ["bad address", "127.0.0.1:99999"])
def test_a_bad_address_given_to_remap_connect_is_not_called_a_command_line(address: str) -> None:
    """``remap.connect("bad address")`` names remap.connect as where the setting came from:
    its error said "from command line" to a Python caller who typed no command. It is refused
    before anything starts."""
    import remap

    with pytest.raises(ConfigError) as info:
        remap.connect(address, env_file=None)
    assert str(info.value).startswith(f"setting 'server' from remap.connect: address '{address}'")


def test_the_consoles_flags_still_say_command_line() -> None:
    """The console's and daemons' flags keep their "from command line"."""
    with pytest.raises(ConfigError, match="^setting 'cores' from command line: "):
        load_settings({"cores": 0}, environ={}, dotenv_path=None)


def test_an_env_file_named_to_remap_connect_must_exist(tmp_path: Path) -> None:
    """``remap.connect(env_file=...)`` naming a file that is not there is one line, as the
    console's ``--env-file`` is: it read nothing and went on (an embedded cluster, say). The
    default ``.env`` may be missing, and ``env_file=None`` reads none."""
    import remap

    missing = tmp_path / "typo.env"
    with pytest.raises(ConfigError) as info:
        remap.connect("127.0.0.1:1", env_file=str(missing))
    assert str(info.value) == f"env_file {str(missing)!r}: no such file (env_file=None reads none)"


@pytest.mark.parametrize(
    ("text", "mode", "warned"),
    [
        ("REMAP_SECRET_KEY=abc\n", 0o644, "REMAP_SECRET_KEY"),
        (
            "REMAP_HTTP_TOKEN=abc\nREMAP_SECRET_KEY=def\n",
            0o640,
            "REMAP_SECRET_KEY and REMAP_HTTP_TOKEN",
        ),
        ("REMAP_SECRET_KEY=abc\n", 0o600, None),
        ("REMAP_PORT=9000\n", 0o644, None),  # nothing secret in it
        ("REMAP_SECRET_KEY=\n", 0o644, None),  # an empty value is no secret
    ],
)
def test_a_dotenv_holding_a_secret_that_others_can_read_is_warned_about(
    tmp_path: Path, text: str, mode: int, warned: str | None
) -> None:
    """A ``.env`` made by ``echo ... >> .env`` under umask 022 holds the secret in a file every
    local user can read: one warning saying so and how to fix it (a secret file is refused for
    the same; a warning here, so a cluster that runs today still runs)."""
    env = tmp_path / ".env"
    env.write_text(text)
    env.chmod(mode)
    said: list[str] = []
    load_settings(environ={}, dotenv_path=env, warn=said.append)
    if warned is None:
        assert said == []
    else:
        assert said == [
            f"{env} holds {warned} and others can read it (mode {mode:04o}); run: chmod 600 {env}"
        ]
