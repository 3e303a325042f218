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
