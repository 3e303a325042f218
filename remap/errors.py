"""The product's errors, the code → class table, and the one place an error becomes a line.

``protocol/errors.py`` holds the root (:class:`RemapError`) and the wire's own errors; this
module adds what remap raises and re-exports the rest: the one module callers import errors from.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from protocol.errors import (
    AuthError,
    FrameTooLarge,
    HandshakeTimeout,
    InvalidOption,
    LocalProtocolError,
    ProtocolError,
    RemapError,
    RemoteProtocolError,
    UnknownMessageType,
    VersionMismatch,
    error_codes,
)


class ConnectionLost(RemapError):
    """The connection to the peer closed while something was still waiting on it."""

    exit_code = 4


class NodeLost(ConnectionLost):
    """A node disconnected or stopped answering heartbeats."""


class ServerUnreachable(ConnectionLost):
    """The server could not be reached."""


class CertificateMismatch(ConnectionLost):
    """The server's TLS certificate does not name the address dialled: retrying cannot help."""

    exit_code = 3


class ConfigError(RemapError):
    """A job file or a setting is invalid; the message names the key and line."""

    exit_code = 2


class JobFailed(RemapError):
    """A job ended without producing all its results."""

    exit_code = 1
    #: where the user's code raised, when a data or vertex job failed on it (else empty)
    remote_traceback = ""


class JobKilled(JobFailed):
    """A job was killed on request."""


class OutputError(JobFailed):
    """The console could not write a job's output (disk full, output in use by another job)."""


class JobRefused(JobFailed):
    """The server refused to start the job; ``code`` is the server's reason code."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.code))


class RemoteTaskError(RemapError):
    """A task raised on a core; carries the remote type name and traceback."""

    def __init__(self, type_name: str, message: str, traceback: str = "", index: int | None = None):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback
        self.index = index

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.remote_traceback, self.index))


class RequestFailed(RemapError):
    """The server answered a request with an error (its code says which kind)."""

    code = "failed"


class BadRequest(RequestFailed):
    """The server found the request malformed or its options invalid."""

    code = "bad-request"
    exit_code = 2  # what the user typed or wrote, as a bad job file or command line


class NotFound(RequestFailed):
    """The request named a job or node the server does not have."""

    code = "not-found"
    exit_code = 2  # `kill 999` exits as `attach 999` does: the command line named nothing


class Forbidden(RequestFailed):
    """The request is not allowed for this console's key (another person's job, say)."""

    code = "forbidden"


class Unexpected(RequestFailed):
    """The peer does not take this message from this side."""

    code = "unexpected"


#: the exit code of a command stopped by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130

#: every code an ``error`` message may carry, and the class it becomes on this side
ERROR_CODES: dict[str, type[RemapError]] = error_codes()


def error_from_wire(code: str, message: str) -> RemapError:
    """The error a peer's ``error`` message stands for: the class of its code (else
    :class:`RequestFailed`), so callers tell errors apart by class or ``.code``, not text."""
    cls = ERROR_CODES.get(code)
    if cls is None:
        error = RequestFailed(message)
        error.code = code  # an unknown code still reaches the caller as it was sent
        return error
    return cls.from_wire(message)


def misspelt(wanted: str, namespace: Mapping[str, Any], known: Iterable[str] = ()) -> str:
    """`` (did you mean 'mapp'?)`` when a job module lacks function ``wanted`` but defines one
    spelt like it (not one of the ``known`` names it may define besides), else ""."""
    taken = set(known)
    names = [
        n for n, v in namespace.items() if callable(v) and not n.startswith("_") and n not in taken
    ]
    close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_line(error: BaseException) -> tuple[str, int]:
    """The one line a user sees for ``error`` and the exit code to leave with; anything but a
    :class:`RemapError` is a bug in remap, named by its type."""
    if isinstance(error, RemapError):
        return f"error: {error}", error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    return f"error: {type(error).__name__}: {error}", 1


__all__ = [
    "AuthError",
    "BadRequest",
    "CertificateMismatch",
    "ConfigError",
    "ConnectionLost",
    "ERROR_CODES",
    "EXIT_INTERRUPTED",
    "Forbidden",
    "FrameTooLarge",
    "HandshakeTimeout",
    "InvalidOption",
    "JobFailed",
    "JobKilled",
    "JobRefused",
    "LocalProtocolError",
    "NodeLost",
    "NotFound",
    "OutputError",
    "ProtocolError",
    "RemapError",
    "RemoteProtocolError",
    "RemoteTaskError",
    "RequestFailed",
    "ServerUnreachable",
    "Unexpected",
    "UnknownMessageType",
    "VersionMismatch",
    "error_from_wire",
    "one_line",
]
