"""The protocol's errors: the root of remap's hierarchy and what can go wrong on the wire.

The product's own errors live in ``remap/errors.py`` (``protocol/`` never imports ``remap``). An
error that travels in an ``error`` message is named by its class's ``code``: :func:`error_codes`
derives the code → class table, so a code is declared once, next to its class.
"""

from __future__ import annotations


class RemapError(Exception):
    """Base of every error remap raises on purpose."""

    exit_code = 1

    @classmethod
    def from_wire(cls, message: str) -> RemapError:
        """The error a peer's ``error`` message with this class's code stands for."""
        return cls(message)


class ProtocolError(RemapError):
    """The wire protocol was violated."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: bad frame, unknown message, bad field."""

    code = "bad-frame"


class FrameTooLarge(RemoteProtocolError):
    """A frame's declared length exceeds this connection's limit."""

    code = "frame-too-large"


class UnknownMessageType(RemoteProtocolError):
    """A well-formed header named a message type this side does not know."""

    code = "unknown-message"

    def __init__(self, type_name: str, re: int | None):
        super().__init__(f"unknown message type {type_name!r}")
        self.type_name = type_name
        self.re = re

    @classmethod
    def from_wire(cls, message: str) -> RemapError:
        error = cls("", None)
        error.args = (message,)
        return error


class AuthError(RemapError):
    """The peer could not prove it holds the shared secret (or we could not)."""

    code = "auth"
    exit_code = 3


class VersionMismatch(RemapError):
    """Protocol, Python or cloudpickle versions of the two sides are incompatible."""

    code = "version"
    exit_code = 3


class HandshakeTimeout(RemapError):
    """The peer did not complete the handshake in time."""

    code = "timeout"


class ServerBusy(RemapError):
    """The server would not take this connection now (its connection caps were full); trying
    again later may succeed (nodes retry by themselves)."""

    code = "busy"
    exit_code = 4  # as a server that cannot be reached


class InvalidOption(RemapError, ValueError):
    """A job option's value is not allowed (see ``protocol/options.py``); ``key`` names it.
    A ValueError too, as Python callers passing a bad argument expect."""

    exit_code = 2

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.key, self.problem))


def error_codes(root: type[RemapError] = RemapError) -> dict[str, type[RemapError]]:
    """Code → class for every subclass of ``root`` (loaded so far) that declares its own code
    (a code shared with a parent is the parent's)."""
    table: dict[str, type[RemapError]] = {}
    todo = [root]
    while todo:
        cls = todo.pop(0)
        code = cls.__dict__.get("code")
        if isinstance(code, str):
            table.setdefault(code, cls)
        todo.extend(cls.__subclasses__())
    return table


#: the codes of the errors above: what a peer may close a connection with during the handshake
ERROR_CODES: dict[str, type[RemapError]] = error_codes()
