"""One error model: codes derived from the classes, kept across the wire, one line per error."""

from __future__ import annotations

import pytest

from protocol import errors as protocol_errors
from remap import errors
from remap.errors import (
    ERROR_CODES,
    AuthError,
    BadRequest,
    ConfigError,
    ConnectionLost,
    Forbidden,
    JobKilled,
    NotFound,
    RemapError,
    RemoteProtocolError,
    RequestFailed,
    UnknownMessageType,
    error_from_wire,
    one_line,
)


def _all_subclasses(cls: type) -> list[type]:
    found, todo = [], [cls]
    while todo:
        c = todo.pop()
        found.append(c)
        todo.extend(c.__subclasses__())
    return found


def test_every_declared_code_is_in_the_table_once() -> None:
    """The code table is derived from the classes: a class that declares a code is found by
    it (or by a parent declaring the same code), and no two classes declare one code."""
    declared: dict[str, type] = {}
    for cls in _all_subclasses(RemapError):
        code = cls.__dict__.get("code")
        if isinstance(code, str) and cls.__module__ in ("protocol.errors", "remap.errors"):
            assert code not in declared, f"{code!r} declared by {declared.get(code)} and {cls}"
            declared[code] = cls
            assert ERROR_CODES[code] is cls
    assert {"not-found", "forbidden", "bad-request", "failed", "auth", "bad-frame"} <= set(
        ERROR_CODES
    )
    # the protocol package knows its own codes only (it never imports remap)
    assert set(protocol_errors.ERROR_CODES) < set(ERROR_CODES)
    assert "not-found" not in protocol_errors.ERROR_CODES


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("not-found", NotFound),
        ("forbidden", Forbidden),
        ("bad-request", BadRequest),
        ("failed", RequestFailed),
        ("auth", AuthError),
        ("unknown-message", UnknownMessageType),
    ],
)
def test_a_peers_code_becomes_its_class(code: str, cls: type) -> None:
    """``not-found`` and ``forbidden`` are told apart by class and by ``.code``, never by text."""
    error = error_from_wire(code, "no job 7")
    assert type(error) is cls
    assert error.code == code
    assert str(error) == "no job 7"


def test_an_unknown_code_still_reaches_the_caller() -> None:
    """A code this side does not know (a newer server) is a RequestFailed that keeps it."""
    error = error_from_wire("quota-exceeded", "too many jobs")
    assert isinstance(error, RequestFailed) and error.code == "quota-exceeded"


@pytest.mark.parametrize(
    ("error", "line", "code"),
    [
        (
            ConfigError("job.yaml:3: key 'retries': expected an integer"),
            "error: job.yaml:3: key 'retries': expected an integer",
            2,
        ),
        (AuthError("wrong secret"), "error: wrong secret", 3),
        (Forbidden("not your job"), "error: not your job", 1),
        (NotFound("no job 999"), "error: no job 999", 2),
        (BadRequest("bad options"), "error: bad options", 2),
        (ConnectionLost("lost the server"), "error: lost the server", 4),
        (JobKilled("job 3 killed"), "error: job 3 killed", 1),
        (RemoteProtocolError("bad frame"), "error: bad frame", 1),
        (KeyboardInterrupt(), "interrupted", 130),
        (ValueError("a bug"), "error: ValueError: a bug", 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_one_line_and_exit_code(error: BaseException, line: str, code: int) -> None:
    """Every error becomes one line and an exit code in one function."""
    assert one_line(error) == (line, code)
    assert "\n" not in one_line(error)[0]


def test_product_errors_live_in_remap_errors() -> None:
    """The protocol package holds the wire's errors only; the product's live in remap.errors."""
    for name in ("ConfigError", "JobFailed", "NodeLost", "RemoteTaskError", "NotFound"):
        assert not hasattr(protocol_errors, name), name
        assert getattr(errors, name).__module__ == "remap.errors"


def _dial(answer: bytes | None) -> str:
    """The console's error line for dialling a listener that answers ``answer`` to a new
    connection and then says nothing (None: a port where nothing listens)."""
    from twisted.internet import protocol
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from remap import runtime
    from remap.dial import connect_console
    from remap.settings import Settings

    class Answer(protocol.Protocol):
        def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
            self.transport.write(answer or b"")

    async def scenario() -> str:
        reactor = runtime.reactor()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Answer)
        )
        address = f"127.0.0.1:{port.getHost().port}"
        if answer is None:
            await port.stopListening()
        try:
            settings = Settings(handshake_timeout=0.5)
            await connect_console(reactor, settings, address, secret=b"k" * 32, timeout=5)
        except RemapError as exc:
            return one_line(exc)[0]
        finally:
            if answer is not None:
                await port.stopListening()
        raise AssertionError("the dial did not fail")

    return runtime.run(scenario, timeout=30)


def test_dialling_something_that_is_not_a_remap_server_says_so() -> None:
    """``--server`` pointing at the HTTP port (which waits for a request) or at anything that
    answers in another protocol: one line asking whether that is the server's port, not a
    frame length or a "closed the connection" that never happened."""
    for answer in (b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"):
        line = _dial(answer)
        assert "did not answer as a remap server" in line, line
        assert "not its HTTP port" in line and "closed the connection" not in line, line


def test_dialling_a_port_where_nothing_listens_says_it_once() -> None:
    """Connection refused is said once, with what to check (Twisted's text says it twice)."""
    line = _dial(None)
    assert line.startswith("error: cannot reach the server at 127.0.0.1:"), line
    assert line.count("refused") == 1 and "is the server running" in line, line


def test_dialling_an_address_that_never_answers_says_so_in_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server machine that is off or firewalled (SYNs dropped: seen on a namespace LAN, an
    address with no host behind it) ends the dial after its timeout with one line saying
    nothing answered within it and what to check, not Twisted's "User timeout caused
    connection failure"."""
    from twisted.internet import defer
    from twisted.internet import error as net_error
    from twisted.internet.task import Clock

    from remap import dial
    from remap.settings import Settings

    class Silent:
        def connect(self, factory: object) -> defer.Deferred:
            return defer.fail(net_error.TimeoutError())

    monkeypatch.setattr(dial, "client_endpoint", lambda *a, **k: Silent())
    dialled = defer.ensureDeferred(
        dial.connect_console(Clock(), Settings(), "10.9.9.9:7878", secret=b"k" * 32, timeout=7)
    )
    failures: list = []
    dialled.addErrback(failures.append)
    (failure,) = failures
    line, code = one_line(failure.value)
    assert line == (
        "error: cannot reach the server at 10.9.9.9:7878: no answer within 7s (is the address "
        "right, the machine up, and its TCP port open in any firewall?)"
    ), line
    assert code == 4


@pytest.mark.parametrize(
    ("errno_", "said"),
    [(113, "no route to host"), (101, "network is unreachable")],
)
def test_dialling_an_address_no_host_answers_for_says_so_in_words(
    monkeypatch: pytest.MonkeyPatch, errno_: int, said: str
) -> None:
    """A LAN address with no machine behind it (the ARP query unanswered: EHOSTUNREACH, seen on
    a namespace LAN) or no route to it: one line in words, not Twisted's "An error occurred
    while connecting: 113: No route to host.", naming the port dialled when the address gave
    none (``--server 10.9.9.9`` said "at 10.9.9.9", the port left to guess)."""
    import os

    from twisted.internet import defer
    from twisted.internet import error as net_error
    from twisted.internet.task import Clock

    from remap import dial
    from remap.settings import Settings

    class Unroutable:
        def connect(self, factory: object) -> defer.Deferred:
            return defer.fail(net_error.getConnectError((errno_, os.strerror(errno_))))

    monkeypatch.setattr(dial, "client_endpoint", lambda *a, **k: Unroutable())
    for given in ("10.9.9.9:7878", "10.9.9.9"):  # the line names the port dialled, given or not
        failures: list = []
        defer.ensureDeferred(
            dial.connect_console(Clock(), Settings(), given, secret=b"k" * 32)
        ).addErrback(failures.append)
        line, code = one_line(failures[0].value)
        assert line == (
            f"error: cannot reach the server at 10.9.9.9:7878: {said} (is the machine on, and "
            "on this network?)"
        ), line
        assert code == 4


def test_remap_errors_is_reachable_after_a_plain_import_remap() -> None:
    """The README's ``remap.errors.JobRefused`` / ``remap.errors.one_line`` and
    ``remap.settings.Settings`` work after ``import remap`` alone (a fresh interpreter: here
    the submodules are imported already). They raised AttributeError until something else
    imported them (``remap.connect`` does, so it showed only before the first connect)."""
    import subprocess
    import sys

    code = (
        "import remap\n"
        "print(remap.errors.JobRefused.__name__, remap.errors.one_line.__name__,"
        " remap.settings.Settings.__name__, 'errors' in dir(remap))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["JobRefused", "one_line", "Settings", "True"]
