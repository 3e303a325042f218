"""The one error hierarchy of remap.

Every error the product raises on purpose derives from :class:`RemapError`, so the
console can turn any of them into one clear line and an exit code in one place.
"""

from __future__ import annotations


class RemapError(Exception):
    """Base of every error remap raises on purpose."""

    exit_code = 1


class ProtocolError(RemapError):
    """The wire protocol was violated."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (a bug on this side)."""

    code = "local-protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: bad frame, unknown message, bad field."""

    code = "bad-frame"


class FrameTooLarge(RemoteProtocolError):
    """A frame's declared length exceeds this connection's limit."""

    code = "frame-too-large"


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


class JobKilled(JobFailed):
    """A job was killed on request."""


class OutputError(JobFailed):
    """The console could not write a job's output (disk full, output in use by another job)."""


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


#: error codes carried by the ``error`` message, mapped to the class raised locally
ERROR_CODES: dict[str, type[RemapError]] = {
    "protocol": RemoteProtocolError,
    "bad-frame": RemoteProtocolError,
    "frame-too-large": FrameTooLarge,
    "auth": AuthError,
    "version": VersionMismatch,
    "timeout": HandshakeTimeout,
}
