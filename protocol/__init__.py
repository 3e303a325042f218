"""remap's wire protocol, sans-IO: framing, the message catalogue and the handshake.

Nothing here imports ``twisted.internet`` or touches a socket; see README.md for the spec.
"""

from . import messages
from .connection import (
    Authenticated,
    Connection,
    ConnectionFailed,
    MessageReceived,
    State,
    local_versions,
    refusal_frame,
)
from .errors import (
    AuthError,
    FrameTooLarge,
    HandshakeTimeout,
    LocalProtocolError,
    ProtocolError,
    RemapError,
    RemoteProtocolError,
    ServerBusy,
    VersionMismatch,
)
from .framing import DEFAULT_MAX_FRAME, PREAUTH_MAX_FRAME, FrameDecoder, encode_frame
from .messages import PROTOCOL_VERSION

__all__ = [
    "Authenticated",
    "AuthError",
    "Connection",
    "ConnectionFailed",
    "DEFAULT_MAX_FRAME",
    "FrameDecoder",
    "FrameTooLarge",
    "HandshakeTimeout",
    "LocalProtocolError",
    "MessageReceived",
    "PREAUTH_MAX_FRAME",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "RemapError",
    "RemoteProtocolError",
    "ServerBusy",
    "State",
    "VersionMismatch",
    "encode_frame",
    "local_versions",
    "messages",
    "refusal_frame",
]
