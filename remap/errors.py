"""Re-export of the error hierarchy for ``import remap``'s users."""

from protocol.errors import (  # noqa: F401
    AuthError,
    ConfigError,
    ConnectionLost,
    FrameTooLarge,
    HandshakeTimeout,
    JobFailed,
    JobKilled,
    LocalProtocolError,
    NodeLost,
    ProtocolError,
    RemapError,
    RemoteProtocolError,
    RemoteTaskError,
    ServerUnreachable,
    VersionMismatch,
)
