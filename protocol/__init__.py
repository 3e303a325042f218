"""remap's wire protocol, sans-IO: framing, the message catalogue and the handshake.

Nothing here imports ``twisted.internet`` or touches a socket; see README.md for the spec.
Names are imported from their modules on first use: a node's core reads only the catalogue,
and the handshake's modules (``connection``, ``hashlib``) would cost each of hundreds of cores.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> its module
_HOMES = {
    name: home
    for home, names in {
        "connection": "Authenticated Connection ConnectionFailed MessageReceived State "
        "local_versions refusal_frame",
        "errors": "AuthError FrameTooLarge HandshakeTimeout LocalProtocolError ProtocolError "
        "RemapError RemoteProtocolError ServerBusy VersionMismatch",
        "framing": "DEFAULT_MAX_FRAME PREAUTH_MAX_FRAME FrameDecoder encode_frame",
        "messages": "messages PROTOCOL_VERSION",
    }.items()
    for name in names.split()
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    module = importlib.import_module(f".{home}", __name__)
    return module if home == name else getattr(module, name)
